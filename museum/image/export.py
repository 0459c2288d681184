"""Export an image model for other runtimes (ONNX Runtime, TorchScript), checked against the model itself.

The exported graph (`museum.image.scoring.ScoringGraph`) takes what `ImageModel` scores, a uint8 batch
(B, 3, S, S) at the model's input size, and holds the whole torch part of its scoring: normalisation,
every member network (batch-norm folded, `torchutil.inference_copy`), the mirror view (`tta`) and the
members' mean probability, or for a head model the (mirror-averaged) feature vector. What is not a network stays in Python, as in
`ImageModel`: the scikit-learn head (its `head.json`/`head.npz` are copied beside the graph) and the
binary decision shift. `ExportedImageModel` loads such a folder and scores like `ImageModel`.

An export folder holds the graph (`model.onnx` or `model.ts`), the head files if any, and `export.json`
(classes, input size, interpolation, decision, the parity figures and the sha256 of every file),
written last: each file is replaced atomically, and a folder whose files do not match its
`export.json` is refused in one line. `export_model` writes nothing over a model folder and nothing
unless the exported graph agrees with the model on real images (largest probability difference
`PARITY_TOLERANCE`).
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from museum import __version__
from museum.data.images import IMAGE_SUFFIXES, decode_loader
from museum.errors import MuseumError
from museum.extras import require
from museum.folders import check_not_input, is_model_folder
from museum.image.model import SCORING_BATCH, ImageModel
from museum.image.scoring import OPSET, ScoringGraph, contiguous_copy, onnx_session, write_onnx
from museum.log import logger
from museum.utils import atomic_path, read_json, sha256_file, write_json

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
EXPORT_FORMAT = "museum-image-export/1"
INDEX = "export.json"
HEAD_FILES = ("head.json", "head.npz")
PARITY_TOLERANCE = 1e-4  # largest probability difference allowed between the export and the model
PARITY_IMAGES = 100


def scoring_graph(model: ImageModel) -> ScoringGraph:
    """The CPU scoring module of a loaded model (conv/batch-norm folded copies of its networks)."""
    return contiguous_copy(model.scoring_graph())


# ----------------------------------------------------------------------------- writing the graph


def write_torchscript(graph: nn.Module, path: Path, size: int) -> None:
    """`graph` traced to TorchScript at `path` (batch size free: the graph has no batch-dependent branch)."""
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 2.10+ marks torch.jit deprecated; it still runs everywhere
        traced = torch.jit.trace(graph, (example,), check_trace=False)
        torch.jit.save(torch.jit.freeze(traced.eval()), str(path))


def quantize_onnx(src: str | Path, dst: str | Path, calibration: torch.Tensor | None = None) -> None:
    """An int8 copy of an exported ONNX graph at `dst`. With `calibration` (a uint8 batch of training images)
    static: weights per channel and activations at their calibrated ranges (QDQ); without, dynamic (weights
    only, activations quantised per batch at run time). Only Conv/Gemm/MatMul are quantised: the normalisation,
    mirror averaging and softmax stay in float."""
    require("onnxruntime", "export")
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, images: torch.Tensor, size: int = 16):
            self.batches = iter([{"images": images[i:i + size].numpy()} for i in range(0, len(images), size)])

        def get_next(self):
            return next(self.batches, None)

    ops = ["Conv", "Gemm", "MatMul"]
    with tempfile.TemporaryDirectory() as work, atomic_path(dst) as tmp:
        prepared = Path(work) / "prepared.onnx"  # shapes inferred, graph optimised: what the quantiser expects
        # onnxruntime's symbolic shape inference gave up on tf_efficientnet_lite2's graph and left its temporary
        # files in the working directory; ONNX's own shape inference covers every op of these convolutional graphs.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        if calibration is None:
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
        else:
            quantize_static(str(prepared), str(tmp), Batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=ops)


# ----------------------------------------------------------------------------- scoring an export


class ExportedImageModel:
    """An exported graph scored like `ImageModel`: `proba_uint8(batch)` and `predict_paths(paths)`.

    `ExportedImageModel.load(folder)` reads an export folder; the constructor takes its index (`meta`),
    a graph file and the head, so a graph can be checked before it is put in place."""

    def __init__(self, meta: dict, graph: str | Path, head=None, threads: int = 0, device: str = "cpu"):
        self.meta = meta
        self.classes_: list[str] = list(meta["classes"])
        self.input_size = int(meta["input_size"])
        self.interpolation = meta["interpolation"]
        self.decision = meta.get("decision")
        self.runtime = meta["runtime"]
        self.head = head  # a `museum.image.heads.Head` when the graph returns features
        if self.runtime == "onnx":
            session = onnx_session(graph, threads, device)
            self._run = lambda x: session.run(None, {"images": x.numpy()})[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ marks torch.jit deprecated
                module = torch.jit.load(str(graph), map_location="cpu").eval()

            def run(x: torch.Tensor) -> np.ndarray:
                with torch.no_grad():
                    return module(x).numpy()
            self._run = run

    @classmethod
    def load(cls, folder: str | Path, threads: int = 0, device: str = "cpu") -> "ExportedImageModel":
        """The export in `folder` (written by `museum export`), its files checked against export.json."""
        folder = Path(folder)
        meta = read_export_index(folder)
        head = None
        if meta["output"] == "features":
            from museum.image.heads import Head  # scikit-learn: loaded only for heads

            head = Head.load(folder)
        return cls(meta, folder / meta["graph"], head, threads, device)

    def proba_uint8(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """Probabilities (B, len(classes_)) of a uint8 batch (B, 3, S, S), as `ImageModel._proba_uint8` gives."""
        batch = torch.as_tensor(batch)
        if batch.dtype != torch.uint8 or batch.shape[1:] != (3, self.input_size, self.input_size):
            raise MuseumError(f"exported model: a batch of {tuple(batch.shape)} {batch.dtype}; expected uint8 "
                              f"(B, 3, {self.input_size}, {self.input_size})")
        scores = np.asarray(self._run(batch.contiguous()), dtype=np.float32)
        proba = self.head.predict_proba(scores) if self.head is not None else scores
        if self.decision is not None:  # binary task: 0.5 moves to the saved threshold
            from museum.image.binary import shift_proba

            pos = self.classes_.index(self.decision["positive"])
            proba = shift_proba(proba, pos, self.decision["threshold"]).astype(np.float32)
        return proba

    def predict_paths(self, paths: list[Path | None], batch_size: int | None = None,
                      num_workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, C) with NaN rows for unreadable or None paths, ok mask), as `ImageModel.predict_paths`."""
        proba = np.full((len(paths), len(self.classes_)), np.nan, dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        batch_size = batch_size or SCORING_BATCH["cpu"]  # ONNX Runtime scores on the CPU here
        for rows, batch in _decoded_batches(paths, self.input_size, self.interpolation, batch_size, num_workers):
            proba[rows] = self.proba_uint8(batch)
            ok[rows] = True
        return proba, ok


def read_export_index(folder: Path) -> dict:
    """`folder/export.json`, checked: of this package, its files as they were written."""
    index = folder / INDEX
    if not index.is_file():
        raise MuseumError(f"{folder}: no {INDEX}; pass a folder written by `museum export`")
    meta = read_json(index)
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise MuseumError(f"{index}: not an image export of this package; export the model again")
    for name, digest in (meta.get("files") or {}).items():
        file = folder / name
        if not file.is_file() or sha256_file(file) != digest:
            raise MuseumError(f"{folder}: {name} is missing or differs from the file this export was written with; "
                              "export the model again")
    return meta


# ----------------------------------------------------------------------------- export with a parity check


def _decoded_batches(paths, size: int, interpolation: str, batch_size: int, num_workers: int):
    """(row indices, uint8 batch) of the readable `paths`, decoded as `ImageModel.predict_paths` decodes."""
    for batch in decode_loader(list(paths), size, batch_size, num_workers, interpolation=interpolation):
        good = [(i, t) for i, t, _ in batch if t is not None]
        if good:
            yield [i for i, _ in good], torch.stack([t for _, t in good])


def parity_paths(model_dir: Path, images: Path | None, n: int = PARITY_IMAGES) -> list[Path]:
    """Up to `n` real images to compare on: image files under `images`, else the model's validation images
    (metrics.json); evenly spread over the sorted list, so a folder per class gives every class."""
    if images is not None:
        if not images.is_dir():
            raise MuseumError(f"--images {images}: not a folder; give a folder of images (any layout)")
        found = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        where = f"--images {images}"
    else:
        metrics = model_dir / "metrics.json"
        rows = (read_json(metrics) or {}).get("val_predictions", []) if metrics.is_file() else []
        found = sorted({Path(r["path"]) for r in rows if isinstance(r, dict) and Path(r.get("path", "")).is_file()})
        where = f"{model_dir}'s validation images (metrics.json)"
    if not found:
        raise MuseumError(f"no images to check the export on in {where}; pass --images DIR")
    picks = np.unique(np.linspace(0, len(found) - 1, min(n, len(found))).round().astype(int))
    return [found[i] for i in picks]


def compare(model: ImageModel, exported: ExportedImageModel, paths: list[Path], batch_size: int = 32) -> dict:
    """Largest probability difference and argmax agreement of `exported` against `model` on `paths` (set
    `model.runtime = "torch"` for a check against torch rather than the model's own ONNX Runtime session)."""
    worst, agree, n = 0.0, 0, 0
    for _, batch in _decoded_batches(paths, model.input_size, model.interpolation, batch_size, 0):
        want, got = model._proba_uint8(batch), exported.proba_uint8(batch)
        worst = max(worst, float(np.abs(want - got).max()))
        agree += int((want.argmax(1) == got.argmax(1)).sum())
        n += len(batch)
    if n == 0:
        raise MuseumError("none of the images to check the export on could be read; pass --images DIR")
    return {"images": n, "max_abs_diff": worst, "argmax_agreement": agree / n}


def check_export_destination(out: Path, model_dir: Path) -> Path:
    """`out` if an export may be written there: not the model folder, not inside it, not another model folder."""
    check_not_input(out, [model_dir], folder=True)
    if out.exists() and not out.is_dir():
        raise MuseumError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and is_model_folder(out):
        raise MuseumError(f"--out {out}: holds a model folder, whose files an export must not replace; pick another folder")
    return out


def export_model(model_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, images: Path | None = None,
                 tolerance: float = PARITY_TOLERANCE, n_images: int = PARITY_IMAGES) -> dict:
    """`museum export`: write `model_dir`'s model as `fmt` into `out` (default MODEL_DIR-FORMAT beside it)
    once it agrees with the model on up to `n_images` real images; returns export.json's content and `folder`."""
    if fmt not in FORMATS:
        raise MuseumError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":  # before any work: a missing extra is one line
        require("onnx", "export")
        require("onnxruntime", "export")
    model_dir = Path(model_dir)
    out = check_export_destination(Path(out) if out is not None else model_dir.parent / f"{model_dir.name}-{fmt}",
                                   model_dir)
    model = ImageModel.load(model_dir, device="cpu")
    model.runtime = "torch"  # the reference the export is checked against
    paths = parity_paths(model_dir, images, n_images)
    graph = scoring_graph(model)
    meta = {
        "format": EXPORT_FORMAT, "runtime": fmt, "graph": FORMATS[fmt], "package_version": __version__,
        "torch_version": torch.__version__, "opset": OPSET if fmt == "onnx" else None,
        "source": str(model_dir.resolve()), "backbone": model.config.backbone, "kind": model.kind,
        "classes": list(model.classes_), "input_size": model.input_size, "interpolation": model.interpolation,
        "mean": list(model.mean), "std": list(model.std), "tta": bool(model.config.tta),
        "members": 1 + len(model.members), "member_preprocess": model.member_preprocess,
        "output": "features" if model.head is not None else "proba",
        "decision": model.decision, "head": model.head.kind if model.head is not None else None,
    }
    new_folder, started = not out.exists(), time.perf_counter()
    try:
        with atomic_path(out / FORMATS[fmt]) as tmp:  # put in place only once it passed the check
            (write_onnx if fmt == "onnx" else write_torchscript)(graph, tmp, model.input_size)
            checked = compare(model, ExportedImageModel(meta, tmp, model.head), paths)
            checked |= {"tolerance": tolerance, "seconds": round(time.perf_counter() - started, 1)}
            if not checked["max_abs_diff"] <= tolerance:
                raise MuseumError(f"{fmt} export of {model_dir}: probabilities differ from the model's by up to "
                                  f"{checked['max_abs_diff']:.2e} on {checked['images']} images (tolerance "
                                  f"{tolerance:g}); nothing written")
    except BaseException:
        if new_folder and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the folder this call made for the graph that did not pass
        raise
    files = [FORMATS[fmt]]
    if model.head is not None:
        for name in HEAD_FILES:
            with atomic_path(out / name) as tmp:
                shutil.copyfile(model_dir / name, tmp)
        files += HEAD_FILES
    # The index last: it names what belongs together, so a folder cut short by a crash is refused on load.
    meta |= {"parity": checked, "files": {name: sha256_file(out / name) for name in files}}
    write_json(out / INDEX, meta)
    meta["folder"] = str(out)
    logger.debug(f"{out}: {fmt} export of {model_dir}; on {checked['images']} images the largest probability "
                f"difference is {checked['max_abs_diff']:.2e} (tolerance {tolerance:g})")
    return meta
