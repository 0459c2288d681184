"""Train an image model: `fit_image_model` fine-tunes a network, or fits a head (`museum.image.head_train`).

Both return an inference-only `ImageModel` whose `kind` says which it is. Fine-tuning: each
process (one, or one per torchrun rank) decodes only its own shard of the training and
validation rows, once, with the backbone's interpolation; epochs then run on uint8 tensors in
memory, through `museum.engine`. `museum train-image` (data listing, run folder, report) is
`museum.train_image`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from museum.config import ImageConfig
from museum.data.images import decode_cache, default_workers
from museum.engine import (DistInfo, Loop, MixedLoss, Mixup, WeightEMA, all_gather_objects, evaluate, fit, run_validation,
                           setup_distributed, unwrap, warmup_cosine)
from museum.errors import MuseumError
from museum.image.augment import augment, normalize
from museum.image.backbones import head_parameter_names
from museum.image.head_train import fit_head_model
from museum.image.model import ImageModel
from museum.image.preprocess import PHOTO_INPUT, resolve_input_size
from museum.image.validation import split_train_val, val_prediction_rows
from museum.log import logger
from museum.utils import check_classes, resolve_device, seed_everything


# What one CPU fine-tune may cost, in image views at 160 px (a 96 px view counts (96/160)² of one):
# simpsons_mnist's 6 epochs of 6,400 thumbnails at 96 px, 13,824, take about 8.5 minutes with Lite2 on the 2-core
# AVX-512 machine of sessions 12-13 (80 s an epoch); an AVX2-only 2-core EPYC took 2.2x as long.
CPU_BUDGET_VIEWS = 14_000


def auto_epochs(n_train: int, input_size: int = PHOTO_INPUT, device: str = "cpu") -> int:
    """Epochs for the data size: about 4,000 image views in all, between 8 and 20 epochs, and on a CPU
    no more than `CPU_BUDGET_VIEWS` (at least one epoch).

    A few hundred images need many passes (each one is only a handful of steps), while on
    thousands of images a few passes converge. The CPU cap keeps a fine-tune of one network within
    about 10 minutes on a 2-core machine: simpsons_mnist (6,400 thumbnails at 96 px) trains 6 epochs,
    0.937 / 0.926 / 0.930 on split seeds 0 / 1 / 2 against 8 epochs' 0.945 / 0.939 / 0.936 in 11 minutes;
    sets below 1,700 photos at 160 px are not capped (museum_multimodal's 600 keep 8).
    """
    n_train = max(n_train, 1)
    epochs = int(np.clip(round(4000 / n_train), 8, 20))
    if device == "cpu":
        views_at_photo_size = n_train * (input_size / PHOTO_INPUT) ** 2
        epochs = min(epochs, max(1, int(CPU_BUDGET_VIEWS / views_at_photo_size)))
    return epochs


MAX_CLASS_WEIGHT_RATIO = 10.0


def balanced_class_weights(counts: np.ndarray, max_ratio: float = MAX_CLASS_WEIGHT_RATIO) -> np.ndarray:
    """Loss weight per class ∝ 1/count, at most `max_ratio` × the largest class's; mean 1 over
    the classes present (0 for absent ones).

    Uncapped, museum_multimodal (224 paintings vs 4 printed items) gave the rare class a 56×
    weight, so one image steered a whole batch: validation accuracy 0.90 / 0.84 / 0.77 on split
    seeds 0 / 1 / 2 (macro-F1 0.712 / 0.716 / 0.675); capped at 10×, 0.93 / 0.95 / 0.91 (0.723 /
    0.748 / 0.714). Sets whose largest and smallest class differ by less than the cap keep exact
    inverse-frequency weights (square-root weights, also tried, changed those runs too).
    """
    present = counts > 0
    inv = np.where(present, counts.max() / np.maximum(counts, 1), 0.0)
    inv = np.minimum(inv, max_ratio)
    return inv / inv[present].mean()


def auto_mixup(epochs: int) -> float:
    """Mixup on every batch when the run makes at least 10 passes, else off.

    Blended batches regularise but slow convergence. Measured with default options (80/20
    splits), runs of 11–20 epochs gained: quintuplets 0.943 → 0.971, quintuplets_faces
    0.944 → 0.967, simpsons_small 0.963 → 0.964; runs of 8 epochs lost: simpsons_mnist
    0.913 → 0.880, museum_multimodal 0.712 → 0.631.
    """
    return 1.0 if epochs >= 10 else 0.0


# Member k of an ensemble trains under seed + 100·k, so member 0 is the single network of the same seed.
MEMBER_SEED_STEP = 100
SMALL_SET = 500


def auto_members(n_train: int) -> int:
    """Networks to train and average: 4 below 500 training images (two of each backbone of a mixed
    ensemble, `ImageConfig.mix_backbone`), else 1.

    On a small set one network's validation score swings with its random initialisation,
    order and augmentation. quintuplets_faces (362 training images, 90 validation), split
    seeds 0 / 1 / 2: networks alone 0.944–0.978 (mean 0.960), three averaged 0.989 / 0.967 /
    0.967 (mean 0.974). quintuplets (137 training images): alone 0.852–0.971 (mean 0.889),
    averaged 0.885; simpsons_small: 0.961–0.965 alone, 0.964 averaged. At that size three
    networks take 2–3 minutes on a 2-core CPU; larger sets vary less and cost more per network.

    Networks of two backbones disagree more than two of one: re-scoring the saved members of the
    backbone grid (split seeds 0/1/2, validation macro-F1), Lite2 + MobileNetV2 + Lite2 gave 0.904 /
    0.986 / 0.970 on quintuplets / simpsons_small / quintuplets_faces where three Lite2 gave 0.894 /
    0.975 / 0.955 and three MobileNetV2 0.894 / 0.972 / 0.978, and a fourth network (MobileNetV2)
    0.924 / 0.988 / 0.974. Trained (scripts/bench_image.py --backbones tf_efficientnet_lite2+mobilenet_v2),
    four mixed networks gave 0.895 / 0.991 / 0.970, at 1.0-1.1x three Lite2's time: MobileNetV2 trains
    in about two thirds of Lite2's (quintuplets_faces, quiet 2-core CPU: 390 s against 376 s for three Lite2).
    """
    return 4 if n_train < SMALL_SET else 1


def _shard(n: int, info: DistInfo, seed: int) -> np.ndarray:
    """This process's fixed share of `n` rows (all of them without torchrun)."""
    if not info.enabled:
        return np.arange(n)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[info.rank::info.world])


def _decode(paths: list[Path], config: ImageConfig, size: int, interpolation: str, what: str, info: DistInfo):
    workers = config.workers or default_workers()
    if info.enabled:
        workers = max(1, workers // info.world)
    cache, ok, failures = decode_cache(paths, size, workers, Path(config.cache_dir) if config.cache_dir else None,
                                       progress=info.is_main, interpolation=interpolation)
    total: Counter = Counter()
    for part in all_gather_objects(failures, info):
        total.update(part)
    if total and info.is_main:
        logger.warning(f"{what}: skipped {sum(total.values())} image(s): "
                       + ", ".join(f"{n} {reason}" for reason, n in sorted(total.items())))
    return cache, ok


def _batches(cache: torch.Tensor, target: torch.Tensor, order: torch.Tensor, batch_size: int, train: bool):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if train and len(idx) < 2:  # BatchNorm cannot train on a batch of one
            break
        yield cache[idx], target[idx]


def fit_image_model(config: ImageConfig, paths: Sequence[Path], labels: Sequence[str],
                    val_paths: Sequence[Path] | None = None, val_labels: Sequence[str] | None = None,
                    out: str | Path | None = None, resume: bool = False) -> ImageModel:
    """An `ImageModel` trained on image files as `config` says: fine-tuned (`config.head` "finetune"),
    or a head on frozen features (`museum.image.head_train`). Without `val_paths` a seeded
    stratified split validates; `out` receives last.pt/best.pt/summary.csv as training goes
    (a temporary folder when None)."""
    paths, labels = list(paths), list(labels)
    val_paths = None if val_paths is None else list(val_paths)
    val_labels = None if val_labels is None else list(val_labels)
    check_classes(labels, "training images")  # fine-tuning and every head alike
    if config.head != "finetune":  # (ImageConfig refuses members > 1 with a head)
        return fit_head_model(config, paths, labels, val_paths, val_labels, out)
    return fine_tune(config, paths, labels, val_paths, val_labels, out, resume)


def fine_tune(config: ImageConfig, paths: list[Path], labels: list[str], val_paths: list[Path] | None,
              val_labels: list[str] | None, out: str | Path | None, resume: bool = False) -> ImageModel:
    """Split, decode once, fine-tune (`config.members` networks), restore the best epoch."""
    model = ImageModel(config)
    if not paths:
        raise MuseumError("no training images; check --images")
    info, device = setup_distributed(resolve_device(config.device))
    seed_everything(config.seed)
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    classes = sorted(set(labels))
    if val_paths is None:
        paths, labels, val_paths, val_labels = split_train_val(paths, labels, config)
    unknown = sorted(set(val_labels or []) - set(classes))
    if unknown:
        raise MuseumError(f"validation classes not in training: {', '.join(unknown[:5])}; give --val the same class folders")
    size = resolve_input_size(config.input_size, paths, config.seed)
    epochs = config.epochs or auto_epochs(len(paths), size, device)
    mixup = auto_mixup(epochs) if config.mixup is None else config.mixup
    source = model.build(classes, size, config.weights)
    if info.is_main:
        logger.info(f"{config.backbone} ({source}), {len(classes)} classes, {size} px, "
                    f"{len(paths)} train / {len(val_paths)} validation images, {epochs} epochs"
                    + (f", mixup on {mixup:.0%} of batches" if mixup > 0 else "") + f", {info.world} process(es)")

    col = {c: i for i, c in enumerate(classes)}
    tr = _shard(len(paths), info, config.seed)
    va = _shard(len(val_paths), info, config.seed + 1)
    start = time.perf_counter()
    train_cache, train_ok = _decode([paths[i] for i in tr], config, size, model.interpolation, "training", info)
    val_cache, val_ok = _decode([val_paths[i] for i in va], config, size, model.interpolation, "validation", info)
    if info.is_main:
        share = f" (this process's share of {len(paths) + len(val_paths)})" if info.enabled else ""
        logger.info(f"decoded {len(tr) + len(va)} images once in {time.perf_counter() - start:.1f}s{share}")
    tr_keep, va_keep = np.flatnonzero(train_ok), np.flatnonzero(val_ok)
    train_cache, val_cache = train_cache[tr_keep], val_cache[va_keep]
    y_train = torch.tensor([col[labels[i]] for i in tr[tr_keep]], dtype=torch.long)
    readable = sum(np.bincount(part, minlength=len(classes)) for part in all_gather_objects(y_train.numpy(), info))
    if (readable == 0).any():
        empty = [c for c, n in zip(classes, readable) if n == 0]
        raise MuseumError(f"class(es) {', '.join(empty[:5])}: no readable training image; fix or remove their files "
                          "(the log names the unreadable ones)")
    val_index = va[va_keep]
    y_val = np.array([col[val_labels[i]] for i in val_index], dtype=np.int64)
    n_local = len(y_train)
    local_counts = all_gather_objects(n_local, info)
    per_rank = max(local_counts)
    if min(local_counts) < 2:
        raise MuseumError("fewer than 2 readable training images (per process); add images or use fewer processes")

    counts = np.bincount([col[l] for l in labels], minlength=len(classes)).astype(np.float64)
    data = _Decoded(train_cache, y_train, per_rank, counts, val_cache, y_val, val_index, classes)
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="museum-image-"))
    seeds = [config.seed + MEMBER_SEED_STEP * k for k in range(config.members or auto_members(len(paths)))]
    n_members = len(seeds)
    if n_members > 1 and info.is_main:
        logger.info(f"{n_members} networks will be trained on these images and averaged (--members)")
    loops, bests, specs = [], [], []
    for k, member_seed in enumerate(seeds):
        # member 0 is the network built above, initialised under the run's seed
        net, spec = model.net, model.net_spec()
        if k:
            seed_everything(member_seed)
            net, spec, member_source = model.new_member(config.member_backbone(k), config.weights)
            specs.append(spec)
            if info.is_main:
                logger.info(f"member {k + 1}/{n_members} (seed {member_seed}): {spec['backbone']}"
                            + (f" ({member_source})" if spec["backbone"] != config.backbone else ""))
        member_out = out_dir if k == 0 else out_dir / f"member{k}"
        member_out.mkdir(parents=True, exist_ok=True)
        loop = _member_loop(net, spec, _member_meta(model.meta(), spec), data, config, device, info, size, epochs, mixup,
                            member_seed, member_out)
        bests.append(fit(loop, resume=resume and (member_out / "last.pt").is_file()))
        loop.set_frozen(False)
        loop.optimizer.state.clear()  # the moments of a finished network would only hold memory
        loops.append(loop)
    model.net, model.device = unwrap(loops[0].model), device
    model.members = [unwrap(loop.model) for loop in loops[1:]]
    model.member_preprocess = specs
    model.epoch, model.metric = bests[0]["best_epoch"], bests[0]["best_metric"]
    val, outputs = _ensemble_validation(loops)
    if val is not None and n_members > 1:
        model.metric = val["macro_f1"]
    model.report_ = _report(val, outputs, val_paths, classes, loops[0].history, bests[0])
    # What the auto options (0 or None in config.json) came to: the report shows them beside the config.
    model.report_["resolved"] = {"input_size": size, "epochs": epochs, "mixup": mixup, "members": n_members, "device": device,
                                 "workers": config.workers or default_workers(), "threads": torch.get_num_threads()}
    if n_members > 1:
        if info.is_main:  # best.pt held member 0 alone while the others trained
            model.write_files(out_dir)
        backbones = [config.backbone, *(spec["backbone"] for spec in specs)]
        model.report_["members"] = [{"seed": seed, "backbone": name, **best} for seed, name, best in zip(seeds, backbones, bests)]
        if info.is_main and val is not None:
            logger.info("members' val macro-F1 " + ", ".join(f"{b['best_metric']:.4f}" for b in bests)
                        + f"; averaged {val['macro_f1']:.4f}")
    return model


def _member_meta(meta: dict, spec: dict) -> dict:
    """The self-description of one member's own checkpoints (member{k}/best.pt): the model's, as a single
    network of the member's backbone and normalisation."""
    if spec["backbone"] == meta["backbone"]:
        return meta
    norm = {"mean": list(spec["mean"]), "std": list(spec["std"])}
    return {**meta, **norm, "backbone": spec["backbone"], "preprocess": {**meta["preprocess"], **norm},
            "config": {**meta["config"], "backbone": spec["backbone"], "members": 1}, "members": 1, "member_preprocess": []}


@dataclass
class _Decoded:
    """The decoded rows of this process, shared by every member network."""

    train_cache: torch.Tensor  # uint8 images
    y_train: torch.Tensor  # class index per training row
    per_rank: int  # training rows per epoch on every process (the largest shard)
    counts: np.ndarray  # training rows per class, over all processes
    val_cache: torch.Tensor
    y_val: np.ndarray
    val_index: np.ndarray  # global validation row of each local one
    classes: list[str]


def _member_loop(net: torch.nn.Module, spec: dict, meta: dict, data: _Decoded, config: ImageConfig, device: str,
                 info: DistInfo, size: int, epochs: int, mixup: float, seed: int, out_dir: Path) -> Loop:
    """The optimiser, schedule, loss and batches of `net` (normalised with `spec`'s mean/std; `meta` describes
    its checkpoints), ready for `engine.fit`."""
    net = net.to(device)
    if device.startswith("cpu"):
        net = net.to(memory_format=torch.channels_last)
    classes, counts, y_train, per_rank = data.classes, data.counts, data.y_train, data.per_rank
    n_local = len(y_train)
    class_weights = torch.tensor(balanced_class_weights(counts), dtype=torch.float32, device=device)
    head = head_parameter_names(net)
    body_names = [n for n, _ in net.named_parameters() if n not in head]
    # Early layers stay fixed: on a CPU their backward pass costs most and, on small data,
    # ImageNet's low-level filters are already as good as they get.
    fixed = set(body_names[: int(round(len(body_names) * (1 - config.trainable)))]) if config.weights != "none" else set()
    for name, p in net.named_parameters():
        p.requires_grad_(name not in fixed)
    groups = [
        # `--backbone-lr` below 1 slows the pretrained layers; on simpsons_small 0.3 converged
        # more slowly and no better than 1, so all layers share the head's rate by default.
        {"params": [p for n, p in net.named_parameters() if n not in head and n not in fixed], "lr": config.lr * config.backbone_lr},
        {"params": [p for n, p in net.named_parameters() if n in head], "lr": config.lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps = per_rank // config.batch_size + (1 if per_rank % config.batch_size >= 2 else 0)
    freeze = min(config.freeze_epochs, epochs - 1) if config.weights != "none" else 0
    body = warmup_cosine(steps * epochs, int(config.warmup_epochs * steps), hold_steps=steps * freeze)
    # The backbone's LR is 0 while frozen: DDP needs the same parameters to get gradients every step.
    backbone_factor = lambda s: 0.0 if s < steps * freeze else body(s)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [backbone_factor, body])
    amp = config.amp and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[info.local_rank] if device.startswith("cuda") else None)

    generator = torch.Generator().manual_seed(seed + 1000 * info.rank)
    mean = torch.tensor(spec["mean"], device=device)
    std = torch.tensor(spec["std"], device=device)
    # Balanced draws: each class is drawn equally often, so a row's weight is 1 / its class count.
    sample_weights = torch.tensor(1.0 / np.maximum(counts, 1), dtype=torch.float64)[y_train]

    def train_batches(epoch: int):
        if config.balance == "sampler":
            order = torch.multinomial(sample_weights, per_rank, replacement=True, generator=generator)
        else:
            order = torch.randperm(n_local, generator=generator)
            order = order.repeat(-(-per_rank // n_local))[:per_rank]  # equal steps on every rank
        return _batches(data.train_cache, y_train, order, config.batch_size, train=True)

    def set_frozen(frozen: bool) -> None:
        if info.enabled:
            return  # DDP: the zero learning rate above does the freezing
        for name, p in unwrap(net).named_parameters():
            if name not in fixed:
                p.requires_grad_(not frozen or name in head)

    def to_device_layout(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if device.startswith("cpu") else x

    return Loop(
        model=net, optimizer=optimizer, scheduler=scheduler,
        criterion=MixedLoss(class_weights if config.balance == "loss" else None, config.label_smoothing, config.soft_f1),
        train_batches=train_batches,
        val_batches=(lambda: _batches(data.val_cache, torch.from_numpy(data.y_val), torch.arange(len(data.y_val)), 128,
                                      train=False)) if len(data.y_val) else None,
        val_target=data.y_val, val_index=data.val_index, classes=classes,
        prepare_train=lambda x: to_device_layout(augment(x, size, generator, config.crop_scale, config.color_jitter, mean, std, config.grayscale)),
        prepare_eval=lambda x: to_device_layout(normalize(x, mean, std)),
        generator=generator, out=out_dir, meta=meta, epochs=epochs, patience=config.patience,
        device=device, images_per_epoch=per_rank, set_frozen=set_frozen, freeze_epochs=freeze, amp=amp,
        scaler=scaler, info=info, tta_flip=config.tta,
        ema=WeightEMA(net, 1 - 1 / max(1.0, config.ema * steps * epochs)) if config.ema > 0 else None,
        mixup=Mixup(mixup, generator) if mixup > 0 else None,
    )


def _ensemble_validation(loops: list[Loop]) -> tuple[dict | None, dict | None]:
    """`run_validation` of the members' averaged probabilities (of the one network when alone)."""
    val, outputs = run_validation(loops[0])
    if outputs is None or len(loops) == 1:
        return val, outputs
    proba = outputs["logits"].softmax(1)
    for loop in loops[1:]:
        proba += run_validation(loop)[1]["logits"].softmax(1)
    # Log-probabilities act as logits: their softmax is the averaged probability again.
    outputs["logits"] = (proba / len(loops)).clamp_min(1e-12).log()
    return evaluate(outputs["logits"], outputs["target"], loops[0].classes), outputs


def _report(val, outputs, val_paths, classes, history, best) -> dict:
    """metrics.json content: per-class report, per-image validation predictions, history."""
    report = {"best_epoch": best["best_epoch"], "best_metric": best["best_metric"], "history": history,
              "validation": val, "val_predictions": []}
    if outputs is not None:
        report["val_predictions"] = val_prediction_rows(val_paths, outputs["index"], outputs["target"],
                                                        outputs["logits"].softmax(1).numpy(), classes)
    return report
