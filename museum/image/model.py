"""`ImageModel`: a trained image classifier, for inference only.

It is one of two kinds (`kind`): a fine-tuned classifier network (``finetuned``, with any
`members` averaged in), or a scikit-learn head on a frozen feature extractor (``head``).
The trainers make them (`museum.image.train.fit_image_model`: fine-tuning there, heads in
`museum.image.head_train`) and `load` rebuilds them; neither kind trains itself.
`predict_proba(images)` scores PIL images, uint8 arrays or files, `predict_paths(paths)` decodes
files through the safe decoder in DataLoader workers (with the backbone's interpolation), and
`save`/`load` use one self-describing checkpoint, `best.pt`. `classes_` fixes the column order
of every probability matrix.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from museum import __version__
from museum.config import ImageConfig, config_from_dict, config_to_dict
from museum.data.images import decode_bytes, decode_loader, image_to_tensor, read_bytes, to_rgb
from museum.engine import load_checkpoint, save_checkpoint
from museum.errors import MuseumError, load_failure
from museum.folders import staged_folder, verify_folder
from museum.log import logger as log
from museum.image.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, check_input_size, create_backbone
from museum.image.embed import head_extractor
from museum.image.scoring import ScoringGraph, contiguous_copy, onnx_session, write_onnx
from museum.torchutil import inference_copy
from museum.utils import resolve_device, write_json

CHECKPOINT_FORMAT = "museum-image/1"
KINDS = ("finetuned", "head")  # a fine-tuned classifier network; a scikit-learn head on a feature extractor
# Images per scoring batch when the caller names none (`batch_size=None`, or submit's --batch-size 0), by device.
# Measured with scripts/bench_catalogue.py (20,000 museum photos through `museum submit`, 15 decoding workers, one
# H200): 559 images/s at 64, 1,173 at 256, 1,215 at 1024, which holds 4x the decoded images in flight for +4%.
# A CPU scores slower than its workers decode at any size; 64 keeps the batches in flight small.
SCORING_BATCH = {"cpu": 64, "cuda": 256}


@functools.cache
def _onnxruntime_installed() -> bool:
    """Whether the `export` extra's onnxruntime is importable (looked up once, not per batch)."""
    return importlib.util.find_spec("onnxruntime") is not None


def _check_member_spec(spec, path: Path) -> None:
    """A checkpoint's member description is {"backbone": name, "mean": 3 numbers, "std": 3 positive numbers}."""
    triple = lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)  # noqa: E731
    if not (isinstance(spec, dict) and isinstance(spec.get("backbone"), str) and triple(spec.get("mean"))
            and triple(spec.get("std")) and min(spec["std"]) > 0):
        raise MuseumError(f"{path}: member_preprocess is malformed (each needs a backbone name and RGB mean/std); retrain")


class ImageModel:
    """Image classifier made by a trainer or `load`; `classes_` names the probability columns, `kind` says
    which of `KINDS` it is."""

    def __init__(self, config: ImageConfig | None = None):
        self.config = config or ImageConfig()
        self.classes_: list[str] = []
        self.kind = "head" if self.config.head != "finetune" else "finetuned"
        self.net: torch.nn.Module | None = None
        self.members: list[torch.nn.Module] = []  # further fine-tuned networks averaged with `net` (`--members`)
        # per member: {"backbone", "mean", "std"}; a mixed ensemble's members normalise as their own backbone was
        # pretrained (`--mix-backbone`), all of them on the images `net`'s interpolation and input size made
        self.member_preprocess: list[dict] = []
        self.input_size = self.config.input_size
        self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        self.preprocess: dict = {}  # the backbone's pretrained preprocessing (`museum.image.preprocess.FIELDS`)
        self.library: str | None = None  # "torchvision" | "timm"
        self.device = "cpu"
        self.epoch, self.metric = 0, float("nan")
        self.report_: dict = {}  # validation results of the last `fit`, for metrics.json
        self.head = None  # a fitted `museum.image.heads.Head` on frozen features (`--head`), else None
        self.features: str | None = None  # with a head: the feature kind `net` returns (embed.FEATURES)
        self.decision: dict | None = None  # binary tasks: {"positive": class, "threshold": raw probability}
        self._graph: tuple | None = None  # (networks it was made from, their scoring graph on fused copies)
        # "auto": the scoring graph in ONNX Runtime on a CPU where onnxruntime (the export extra) is installed,
        # else torch; "torch": torch everywhere (what `museum export` checks its graphs against).
        self.runtime = "auto"
        self._onnx: tuple | None = None  # (the scoring graph it was made from, its ONNX Runtime session)

    # ------------------------------------------------------------------ construction

    def build(self, classes: list[str], input_size: int, weights: str, head: bool = False,
              check_size: bool = True, preprocess: dict | None = None) -> str:
        """Create the network for `classes` (with `head`, the backbone as a feature extractor for a
        scikit-learn head, see `embed.head_extractor`); returns where its initial weights came from.
        The trainers call it before training, `load` before reading the weights.

        Mean/std, interpolation and crop come from the backbone's pretrained config (`self.preprocess`),
        overridden by `preprocess` (a loaded checkpoint's). `check_size` runs one dry forward pass at
        `input_size` (needed before training; a loaded checkpoint was trained at its size, so `load` skips it)."""
        self.classes_, self.input_size = list(classes), int(input_size)
        backbone = create_backbone(self.config.backbone, len(classes), weights, self.input_size)
        self.net, source = backbone.module, backbone.source
        self.library = backbone.library
        self.preprocess = {**backbone.preprocess, **(preprocess or {})}
        self.mean, self.std = list(self.preprocess["mean"]), list(self.preprocess["std"])
        if check_size:
            check_input_size(self.net, self.config.backbone, self.input_size)
        self.kind = "head" if head else "finetuned"
        if head:
            self.net, self.features = head_extractor(self.net, self.config.head_features, self.mean, self.std)
        return source

    def new_member(self, backbone: str, weights: str) -> tuple[torch.nn.Module, dict, str]:
        """(a fresh network of `backbone` for the classes and input size of `net`, its {"backbone", "mean", "std"},
        where its initial weights came from): a further ensemble member for a trainer."""
        made = create_backbone(backbone, len(self.classes_), weights, self.input_size)
        if backbone == self.config.backbone:  # the same normalisation as `net`, overrides included
            mean, std = self.mean, self.std
        else:
            mean, std = made.preprocess["mean"], made.preprocess["std"]
            check_input_size(made.module, backbone, self.input_size)
        return made.module, {"backbone": backbone, "mean": list(mean), "std": list(std)}, made.source

    def net_spec(self) -> dict:
        """{"backbone", "mean", "std"} of `net`, in the form `member_preprocess` holds for the other networks."""
        return {"backbone": self.config.backbone, "mean": list(self.mean), "std": list(self.std)}

    def network_norms(self) -> tuple[list, list]:
        """(mean, std) per network, `net` first."""
        specs = [self.net_spec(), *self.member_preprocess]
        return [list(s["mean"]) for s in specs], [list(s["std"]) for s in specs]

    @property
    def interpolation(self) -> str:
        """How images are resized to `input_size`: the backbone's pretrained interpolation."""
        return self.preprocess.get("interpolation", "bilinear")

    def meta(self) -> dict:
        """The self-description stored in every checkpoint (plain types only)."""
        return {
            "format": CHECKPOINT_FORMAT, "package_version": __version__, "backbone": self.config.backbone,
            "classes": list(self.classes_), "input_size": self.input_size, "mean": list(self.mean),
            "std": list(self.std), "config": config_to_dict(self.config),
            "library": self.library, "kind": self.kind,
            "preprocess": {**self.preprocess, "mean": list(self.mean), "std": list(self.std)},
            "head": self.head.kind if self.head is not None else None, "decision": self.decision,
            "members": 1 + len(self.members), "member_preprocess": [dict(spec) for spec in self.member_preprocess],
        }

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> torch.nn.Module:
        if self.net is None:
            raise MuseumError("image model is not trained; train one (museum.image.train.fit_image_model) "
                              "or ImageModel.load(folder)")
        return self.net

    def scoring_graph(self) -> ScoringGraph:
        """This model's scoring as one module (`museum.image.scoring.ScoringGraph`: uint8 batch → members'
        mean probability, or a head's features) over conv/batch-norm fused eval copies of `net` and the
        members (`inference_copy`) in channels-last memory format, rebuilt when the networks change. The
        torch path runs it; ONNX Runtime and `museum export` take a copy of it."""
        nets = [self._check_fitted(), *self.members]
        if self._graph is None or len(self._graph[0]) != len(nets) or any(a is not b for a, b in zip(self._graph[0], nets)):
            fused = [inference_copy(net).to(self.device, memory_format=torch.channels_last) for net in nets]
            means, stds = self.network_norms()
            graph = ScoringGraph(fused, means, stds, self.config.tta, features=self.head is not None)
            self._graph = (nets, graph.to(self.device).eval())
        return self._graph[1]

    def _onnx_session(self):
        """The ONNX Runtime session of the scoring graph (`museum.image.scoring`) where `runtime` allows it,
        built on first use (about 1.5 s a network), else None.

        scripts/bench_image_speed.py (MobileNetV2 on the four character sets, one thread of a shared 2-core
        CPU): 4.5-5.4x torch eager at 160 px and 2.2x at 64 px, same macro-F1, probabilities within 2e-6;
        torch in channels-last (the path without onnxruntime) 2.4-4.2x and 1.6x; bfloat16 autocast and
        int8 were faster but lost up to 0.010 and 0.091 macro-F1. tf_efficientnet_lite2 (session 12): 2.8-2.9x
        at 160 px and 1.6x at 64 px, same macro-F1; bfloat16 4.2-4.3x within 0.005 macro-F1 but probabilities
        up to 0.077 apart and fast only on CPUs with bfloat16 instructions."""
        if self.runtime != "auto" or self.device != "cpu" or not _onnxruntime_installed():
            return None
        graph = self.scoring_graph()
        if self._onnx is None or self._onnx[0] is not graph:
            try:
                with tempfile.TemporaryDirectory() as work:
                    write_onnx(contiguous_copy(graph), Path(work) / "scoring.onnx", self.input_size)
                    self._onnx = (graph, onnx_session(Path(work) / "scoring.onnx"))
            except Exception as exc:  # an op the exporter or the runtime lacks (any timm backbone may come here)
                log.warning("image model: ONNX Runtime cannot take this network (%s); scoring in torch",
                            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                self.runtime = "torch"
                return None
        return self._onnx[1]

    def _autocast(self):
        """float16 autocast for fine-tuned networks on CUDA (with channels-last, what its tensor cores are
        fast at); a CPU and heads' features stay float32 (bfloat16 lost 0.010 macro-F1 on quintuplets_faces)."""
        if self.kind != "finetuned" or not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16)

    @torch.no_grad()
    def _scores(self, batch: torch.Tensor) -> np.ndarray:
        """The scoring graph's output for a uint8 batch: the members' mean probability, or a head's features."""
        session = self._onnx_session()
        if session is not None:
            return session.run(None, {"images": batch.contiguous().numpy()})[0]
        graph = self.scoring_graph()
        with self._autocast():
            return graph(batch.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()

    def _proba_uint8(self, batch: torch.Tensor) -> np.ndarray:
        scores = self._scores(batch)
        # members vote with their probabilities, as validation averaged them; a head maps its features
        proba = self.head.predict_proba(scores) if self.head is not None else scores
        if self.decision is not None:  # binary task: 0.5 moves to the saved threshold
            from museum.image.binary import shift_proba  # scikit-learn: loaded only for yes/no tasks

            pos = self.classes_.index(self.decision["positive"])
            proba = shift_proba(proba, pos, self.decision["threshold"]).astype(np.float32)
        return proba

    def scoring_batch(self, batch_size: int | None = None) -> int:
        """`batch_size`, or this device's default (`SCORING_BATCH`) when it is None or 0."""
        return batch_size or SCORING_BATCH[torch.device(self.device).type]

    def predict_proba(self, images: Sequence[Image.Image | np.ndarray | str | Path], batch_size: int | None = None) -> np.ndarray:
        """Probabilities (n, len(classes_)) for PIL images of any mode and size, numpy arrays (H×W×C or H×W,
        uint8) or image file paths (through the safe decoder; an unusable file is a one-line error naming it,
        `predict_paths` skips such files instead)."""
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3
                                                              and images.shape[-1] in (1, 3, 4)):
            raise MuseumError("predict_proba: one image; pass a list of images, e.g. [image]")
        images, batch_size = list(images), self.scoring_batch(batch_size)
        self._check_fitted().eval()
        out = np.zeros((len(images), len(self.classes_)), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([self._as_tensor(img, start + i) for i, img in enumerate(chunk)])
            out[start:start + len(chunk)] = self._proba_uint8(batch)
        return out

    def _as_tensor(self, image: Image.Image | np.ndarray | str | Path, row: int) -> torch.Tensor:
        """One input as the uint8 (3, S, S) tensor the networks take, decoded as `predict_paths` decodes files."""
        if isinstance(image, (str, Path)):
            return image_to_tensor(decode_bytes(read_bytes(image), image, draft=self.input_size), self.input_size,
                                   self.interpolation)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
                raise MuseumError(f"image {row}: array of shape {image.shape} and dtype {image.dtype}; expected "
                                  "H×W×3 (RGB), H×W×4 (RGBA) or H×W uint8 values 0..255")
            image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        if not isinstance(image, Image.Image):
            raise MuseumError(f"image {row}: a {type(image).__name__}; expected a PIL image, a uint8 array or a file path")
        return image_to_tensor(to_rgb(image), self.input_size, self.interpolation)

    def predict_paths(self, paths: list[Path | None], batch_size: int | None = None,
                      num_workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, C) with NaN rows for unreadable or None paths, ok mask (n,)).

        Files are decoded by the same safe decoder, in DataLoader worker processes.
        """
        self._check_fitted().eval()
        proba = np.full((len(paths), len(self.classes_)), np.nan, dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        for batch in decode_loader(list(paths), self.input_size, self.scoring_batch(batch_size), num_workers,
                                   interpolation=self.interpolation):
            good = [(i, t) for i, t, _ in batch if t is not None]
            if good:
                rows = [i for i, _ in good]
                proba[rows] = self._proba_uint8(torch.stack([t for _, t in good]))
                ok[rows] = True
        return proba, ok

    def wants(self, items) -> np.ndarray:
        """The expert contract: rows this expert could score (those with an image path or photo)."""
        return np.array([image is not None for image in items.images], dtype=bool)

    def score_rows(self, items, batch_size: int | None = None, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """The expert contract (`museum.data.items.Items` → probabilities, usable rows): file paths are
        decoded by the safe decoder in worker processes, decoded photos scored as they are; rows without
        an image, or whose file does not decode, get NaN and are not usable."""
        proba = np.full((len(items), len(self.classes_)), np.nan, dtype=np.float32)
        usable = np.zeros(len(items), dtype=bool)
        paths = [i for i, image in enumerate(items.images) if isinstance(image, (str, Path))]
        if paths:
            p, ok = self.predict_paths([items.images[i] for i in paths], batch_size=batch_size, num_workers=workers)
            proba[paths], usable[paths] = p, ok
        decoded = [i for i, image in enumerate(items.images) if image is not None and not isinstance(image, (str, Path))]
        if decoded:
            proba[decoded] = self.predict_proba([items.images[i] for i in decoded], batch_size=batch_size)
            usable[decoded] = True
        return proba, usable

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path) -> Path:
        """Write the model folder as a whole (best.pt, head files, config.json); returns best.pt's path.

        The complete old folder stays in place until the new one is complete (`museum.folders`)."""
        self._check_fitted()
        with staged_folder(folder, "image") as staging:
            self.write_files(staging)
            write_json(staging / "config.json", config_to_dict(self.config))
        return Path(folder) / "best.pt"

    def write_files(self, folder: str | Path) -> Path:
        """Write `folder/best.pt` (weights + self-description) and the head's files into a working folder."""
        net = self._check_fitted()
        path = Path(folder) / "best.pt"
        plain = lambda module: {k: v.cpu() for k, v in module.state_dict().items()}  # noqa: E731
        save_checkpoint({**self.meta(), "epoch": self.epoch, "metric": self.metric, "state_dict": plain(net),
                         "member_state_dicts": [plain(member) for member in self.members]}, path)
        if self.head is not None:
            self.head.save(folder)
        return path

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> "ImageModel":
        """Rebuild a model from `folder/best.pt` (or a checkpoint file) without network or pretrained files."""
        folder = Path(folder)
        if folder.is_dir() or not folder.suffix:
            verify_folder(folder, "image")
        path = folder / "best.pt" if folder.is_dir() or not folder.suffix else folder
        state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise MuseumError(f"{path}: not an image-model checkpoint of this package; pass the folder written by train-image")
        model = cls(config_from_dict(ImageConfig, state["config"]))
        # Older checkpoints carry no `preprocess`: the backbone's own, with the mean/std they stored.
        preprocess = {**(state.get("preprocess") or {}), "mean": list(state["mean"]), "std": list(state["std"])}
        model.build(state["classes"], state["input_size"], weights="none", head=bool(state.get("head")), check_size=False,
                    preprocess=preprocess)
        model.decision = state.get("decision")
        model.epoch, model.metric = state["epoch"], state["metric"]
        try:
            model.net.load_state_dict(state["state_dict"])
            # Checkpoints from before mixed ensembles: every member is `backbone`, normalised as `net`.
            specs = state.get("member_preprocess") or []
            for k, member_state in enumerate(state.get("member_state_dicts") or []):
                spec = specs[k] if k < len(specs) else model.net_spec()
                _check_member_spec(spec, path)
                member, _ = build_backbone(spec["backbone"], len(model.classes_), "none", model.input_size)
                member.load_state_dict(member_state)
                model.members.append(member.eval())
                model.member_preprocess.append(dict(spec))
        except RuntimeError as exc:
            raise MuseumError(f"{path}: weights do not fit backbone {state['backbone']} ({load_failure(exc)}); retrain") from None
        if state.get("head"):
            from museum.image.heads import Head  # scikit-learn: loaded only for heads

            model.head = Head.load(path.parent)
        model.device = resolve_device(device)
        model.net.to(model.device).eval()
        for member in model.members:
            member.to(model.device)
        return model
