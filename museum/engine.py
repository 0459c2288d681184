"""The training loop shared by image trainers: epochs, evaluation, early stopping, checkpoints.

`train_one_epoch` and `evaluate` are plain functions over batch iterators; `fit` runs them
epoch after epoch, keeps the best epoch by validation macro-F1, stops after `patience`
epochs without improvement, writes `last.pt`/`best.pt` atomically, one `summary.csv` row
per epoch and TensorBoard events when tensorboard is installed. `--resume` continues from
`last.pt` with optimizer, scheduler, scaler and random state. Under `torchrun` the model is
wrapped in DistributedDataParallel; only rank 0 writes anything.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from museum.errors import MuseumError, load_failure
from museum.log import logger, progress_bar
from museum.metrics import classification_metrics
from museum.torchutil import inference_copy
from museum.utils import atomic_path

SUMMARY_FIELDS = ["epoch", "loss", "val_loss", "val_macro_f1", "val_accuracy", "lr", "seconds", "images_per_s"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Where this process stands: rank 0 of 1 unless started by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> tuple[DistInfo, str]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); returns (info, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        device = f"cuda:{info.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info, device


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- losses


def soft_f1_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − macro soft-F1 over the batch: a differentiable stand-in for the metric we select on."""
    proba = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, proba.shape[1]).float()
    tp = (proba * onehot).sum(0)
    fp = (proba * (1 - onehot)).sum(0)
    fn = ((1 - proba) * onehot).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn + 1e-7)
    present = onehot.sum(0) > 0  # classes absent from the batch have no defined F1
    return 1 - f1[present].mean()


class MixedLoss(nn.Module):
    """(1 − w)·cross-entropy (class weights, label smoothing) + w·soft-F1."""

    def __init__(self, class_weights: torch.Tensor | None, label_smoothing: float, soft_f1: float):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        self.soft_f1 = soft_f1

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits.float(), target)
        if self.soft_f1 > 0:
            loss = (1 - self.soft_f1) * loss + self.soft_f1 * soft_f1_loss(logits, target)
        return loss


def warmup_cosine(total_steps: int, warmup_steps: int, hold_steps: int = 0, floor: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: constant for `hold_steps` (head-only epochs), linear warm-up, cosine to `floor`."""

    def factor(step: int) -> float:
        if step < hold_steps:
            return 1.0
        step -= hold_steps
        if step < warmup_steps:
            return 0.1 + 0.9 * (step + 1) / warmup_steps
        span = max(1, total_steps - hold_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- weight averaging


class WeightEMA:
    """Exponential moving average of a model's weights and BatchNorm statistics.

    On a few hundred images the validation macro-F1 of the raw weights jumps by several
    points from epoch to epoch; the average is smoother and usually better. Until
    `1 / (1 - decay)` steps have passed it is the plain mean of all steps so far, so a run of
    few steps is not dominated by the pretrained weights it started from.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, 1 - 1 / self.steps)
        for avg, cur in zip(self.module.state_dict().values(), unwrap(model).state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(cur, 1 - d)
            else:  # BatchNorm's batch counter
                avg.copy_(cur)



# ----------------------------------------------------------------------------- one epoch


class Mixup:
    """Train on convex blends of image pairs (mixup, Zhang et al. 2018) in a share of the batches.

    The blend weight is uniform in [0, 1] (mixup's Beta(1, 1)) and, like the pairing, drawn from
    the run's generator, so a resumed run draws the same. On a few hundred images the network can
    no longer memorise single pictures.
    """

    def __init__(self, share: float, generator: torch.Generator) -> None:
        self.share, self.generator = share, generator

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """(images, partner index or None, weight of the originals)."""
        draw = torch.rand(2, generator=self.generator)
        if float(draw[0]) >= self.share or len(x) < 2:
            return x, None, 1.0
        lam = float(draw[1])
        partner = torch.randperm(len(x), generator=self.generator).to(x.device)
        return lam * x + (1 - lam) * x[partner], partner, lam


def train_one_epoch(model: nn.Module, batches: Batches, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, device: str, prepare: Callable[[torch.Tensor], torch.Tensor],
                    scaler: torch.amp.GradScaler | None = None, amp: bool = False, progress=None,
                    ema: WeightEMA | None = None, mixup: Mixup | None = None) -> dict:
    """One pass over `batches` (uint8 images, int labels); returns mean loss, images and seconds."""
    model.train()
    total, n, start = 0.0, 0, time.perf_counter()
    for images, target in batches:
        target = target.to(device, non_blocking=True)
        x = prepare(images.to(device, non_blocking=True))
        partner, lam = None, 1.0
        if mixup is not None:
            x, partner, lam = mixup(x)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
            logits = model(x)
        loss = criterion(logits, target)
        if partner is not None:
            loss = lam * loss + (1 - lam) * criterion(logits, target[partner])
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        total += float(loss.detach()) * len(target)
        n += len(target)
        if progress is not None:
            progress.update(len(target))
            progress.set_postfix(loss=f"{total / n:.3f}", refresh=False)
    return {"loss": total / max(n, 1), "images": n, "seconds": time.perf_counter() - start}


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Batches, device: str,
                   prepare: Callable[[torch.Tensor], torch.Tensor], amp: bool = False, tta_flip: bool = False) -> torch.Tensor:
    """Logits (float32, CPU) for every batch, in order; with `tta_flip` averaged with the mirrored image's.

    Runs a conv/batch-norm fused copy of `model` (`inference_copy`): half the CPU time, same logits."""
    model = inference_copy(model)
    out = []
    for images, _ in batches:
        x = prepare(images.to(device, non_blocking=True))
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(logits: torch.Tensor, target: np.ndarray, classes: list[str]) -> dict:
    """Validation loss (plain cross-entropy), macro-F1, accuracy and the per-class report."""
    y = torch.as_tensor(target, dtype=torch.long)
    loss = float(F.cross_entropy(logits, y)) if len(y) else float("nan")
    pred = logits.argmax(1).numpy() if len(y) else np.zeros(0, dtype=int)
    metrics = classification_metrics([classes[i] for i in target], [classes[i] for i in pred], labels=classes)
    metrics["loss"] = loss
    return metrics


# ----------------------------------------------------------------------------- the loop


@dataclass
class Loop:
    """Everything `fit` needs; the trainer builds it, the engine only runs it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    train_batches: Callable[[int], Iterator]  # epoch → batches of (uint8 images, labels)
    val_batches: Callable[[], Iterator] | None
    val_target: np.ndarray  # class index per validation row of this process, in batch order
    val_index: np.ndarray  # global row number per validation row of this process
    classes: list[str]
    prepare_train: Callable[[torch.Tensor], torch.Tensor]
    prepare_eval: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator
    out: Path
    meta: dict  # self-description written into every checkpoint
    epochs: int
    patience: int
    device: str
    images_per_epoch: int
    set_frozen: Callable[[bool], None] = lambda frozen: None
    freeze_epochs: int = 0
    amp: bool = False
    scaler: torch.amp.GradScaler | None = None
    info: DistInfo = field(default_factory=DistInfo)
    ema: WeightEMA | None = None  # when set, the averaged weights are validated and kept as best
    mixup: Mixup | None = None
    tta_flip: bool = False  # validate on the mean logits of each image and its mirror
    history: list[dict] = field(default_factory=list)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def _checkpoint(loop: Loop, epoch: int, metric: float, **extra) -> dict:
    return {**loop.meta, "epoch": epoch, "metric": metric, "state_dict": unwrap(loop.eval_model).state_dict(), **extra}


def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by this package, loaded with `weights_only=True` (plain types only)."""
    if not path.is_file():
        raise MuseumError(f"{path}: no checkpoint there; train first (museum train-image) or pass the folder it wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MuseumError(f"{path}: not a readable checkpoint ({load_failure(exc)}); retrain or restore it") from None


def write_summary(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: CSV and JSON logs are always written
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _gather_val_logits(loop: Loop, logits: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Validation (logits, global row, class index) of all processes, ordered by global row."""
    parts = all_gather_objects((loop.val_index, loop.val_target, logits.numpy()), loop.info)
    index = np.concatenate([p[0] for p in parts])
    order = np.argsort(index, kind="stable")
    target = np.concatenate([p[1] for p in parts])[order]
    n_classes = len(loop.classes)
    stacked = np.concatenate([p[2].reshape(-1, n_classes) for p in parts])[order]
    return torch.from_numpy(stacked), index[order], target


def run_validation(loop: Loop) -> tuple[dict | None, dict | None]:
    """(metrics, {"logits", "index", "target"}) on the whole validation set, or (None, None) without one."""
    if loop.val_batches is None:
        return None, None
    logits = predict_logits(loop.eval_model, loop.val_batches(), loop.device, loop.prepare_eval, loop.amp, loop.tta_flip)
    logits, index, target = _gather_val_logits(loop, logits)
    if not len(target):
        return None, None
    return evaluate(logits, target, loop.classes), {"logits": logits, "index": index, "target": target}


def fit(loop: Loop, resume: bool = False) -> dict:
    """Train until `epochs` or early stopping; restore the best epoch. Returns the best state."""
    start_epoch, best_metric, best_epoch, bad = 1, -1.0, 0, 0
    best_state = None
    if resume:
        state = load_checkpoint(loop.out / "last.pt")
        try:
            unwrap(loop.model).load_state_dict(state.get("train_state_dict", state["state_dict"]))
            if loop.ema is not None:  # `state_dict` holds the averaged weights, `train_state_dict` the raw ones
                loop.ema.module.load_state_dict(state["state_dict"])
                loop.ema.steps = state.get("ema_steps", 0)
            loop.optimizer.load_state_dict(state["optimizer"])
            loop.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise MuseumError(f"--resume: {loop.out / 'last.pt'} does not fit this network or data ({load_failure(exc)}); "
                              "pass the options and data of the interrupted run, or drop --resume") from None
        loop.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        if loop.scaler is not None and state.get("scaler"):
            loop.scaler.load_state_dict(state["scaler"])
        start_epoch, best_metric, best_epoch, bad = state["epoch"] + 1, state["best_metric"], state["best_epoch"], state["bad_epochs"]
        loop.history = list(state["history"])
        if (loop.out / "best.pt").is_file():
            best_state = load_checkpoint(loop.out / "best.pt")["state_dict"]
        if loop.info.is_main:
            logger.info(f"resuming from {loop.out / 'last.pt'} after epoch {state['epoch']} (best {best_metric:.4f} at epoch {best_epoch})")
    writer = _tensorboard(loop.out) if loop.info.is_main else None
    for epoch in range(start_epoch, loop.epochs + 1):
        if bad >= loop.patience:
            break
        epoch_start = time.perf_counter()
        loop.set_frozen(epoch <= loop.freeze_epochs)
        with progress_bar(total=loop.images_per_epoch * loop.info.world, unit="img", desc=f"epoch {epoch}/{loop.epochs}",
                          show=loop.info.is_main) as bar:
            bar.update(0)
            stats = train_one_epoch(loop.model, loop.train_batches(epoch), loop.criterion, loop.optimizer,
                                    loop.scheduler, loop.device, loop.prepare_train, loop.scaler, loop.amp, _WorldBar(bar, loop.info),
                                    loop.ema, loop.mixup)
        val, _ = run_validation(loop)
        seconds = time.perf_counter() - epoch_start
        metric = val["macro_f1"] if val else -float(stats["loss"])  # no validation: lowest loss wins
        row = {
            "epoch": epoch, "loss": round(stats["loss"], 5),
            "val_loss": round(val["loss"], 5) if val else "", "val_macro_f1": round(val["macro_f1"], 5) if val else "",
            "val_accuracy": round(val["accuracy"], 5) if val else "", "lr": f"{max(g['lr'] for g in loop.optimizer.param_groups):.3g}",
            "seconds": round(seconds, 2), "images_per_s": round(stats["images"] * loop.info.world / max(stats["seconds"], 1e-9), 1),
        }
        loop.history.append(row)
        improved = metric > best_metric
        if improved:
            best_metric, best_epoch, bad = metric, epoch, 0
            best_state = copy.deepcopy(unwrap(loop.eval_model).state_dict())
        else:
            bad += 1
        if loop.info.is_main:
            logger.info(
                f"epoch {epoch}: loss {stats['loss']:.4f}"
                + (f"  val loss {val['loss']:.4f}  val macro-F1 {val['macro_f1']:.4f}  acc {val['accuracy']:.4f}" if val else "")
                + f"  {row['images_per_s']} img/s  {seconds:.1f}s{'  *' if improved else ''}"
            )
            if improved:
                save_checkpoint(_checkpoint(loop, epoch, best_metric), loop.out / "best.pt")
            save_checkpoint(_checkpoint(
                loop, epoch, metric, optimizer=loop.optimizer.state_dict(), scheduler=loop.scheduler.state_dict(),
                generator=loop.generator.get_state(), torch_rng=torch.get_rng_state(),
                scaler=loop.scaler.state_dict() if loop.scaler is not None else {}, best_metric=best_metric, best_epoch=best_epoch, bad_epochs=bad,
                history=loop.history, train_state_dict=unwrap(loop.model).state_dict(),
                ema_steps=loop.ema.steps if loop.ema is not None else 0), loop.out / "last.pt")
            write_summary(loop.out / "summary.csv", loop.history)
            if writer is not None:
                for key in ("loss", "val_loss", "val_macro_f1", "val_accuracy", "images_per_s"):
                    if row[key] != "":
                        writer.add_scalar(key, float(row[key]), epoch)
                writer.add_scalar("lr", float(row["lr"]), epoch)
                writer.flush()
    if writer is not None:
        writer.close()
    if best_state is not None:  # the trainer's model and the evaluated one both end as the best
        unwrap(loop.model).load_state_dict(best_state)
        unwrap(loop.eval_model).load_state_dict(best_state)
    if best_epoch and loop.info.is_main:
        logger.info(f"best epoch {best_epoch}: {'val macro-F1' if loop.val_batches else 'minus train loss'} {best_metric:.4f}")
    return {"best_epoch": best_epoch, "best_metric": best_metric}


class _WorldBar:
    """Progress updates scaled to all processes (each rank sees only its own shard)."""

    def __init__(self, bar, info: DistInfo):
        self.bar, self.world = bar, info.world

    def update(self, n: int) -> None:
        self.bar.update(n * self.world)

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)
