"""Backbone features ("embeddings"), computed once per image set and kept in one file.

`museum embed` and `train-image --head` both go through `load_or_embed`: images are decoded
once (the same safe decoder and optional on-disk decode cache as fine-tuning), pushed through
the ImageNet backbone with its classifier removed, and the vectors are written to an `.npz`
with the labels, paths, backbone, input size and normalisation that made them. The file
carries a key over those settings and every file's size and mtime, so a second call with
the same data is answered from the file without loading a network.

Two kinds of features (`FEATURES`):
- ``pooled``: the backbone's final pooled vector (what the classifier sees). Near-duplicate
  search uses these: copies of one picture agree on them exactly where it matters.
- ``stages``: [mean ; max] pooled outputs of the trunk's last five stages plus a 4×4×4 RGB
  colour histogram (the default for heads). The final ImageNet vector is nearly colour-blind
  and object-level, while characters differ in hair colour and drawing detail that live in
  the middle stages: on the 80/20 splits a logistic head went 0.868 → 0.920 on simpsons_small,
  0.921 → 0.944 on quintuplets_faces and 0.567 → 0.718 on simpsons_mnist. Backbones without
  a `features` trunk (ResNets) fall back to ``pooled``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from museum.errors import MuseumError, load_failure
from museum.log import logger
from museum.utils import atomic_path

if TYPE_CHECKING:
    import torch
    from torch import nn

EMBED_FORMAT = "museum-embeddings/2"
FEATURES = ("stages", "pooled")
STAGES = 5  # trunk stages tapped by `stages` features
HIST_BINS = 4  # per RGB channel
EMBED_CHUNK = 2048  # images decoded at once (about 160 MB at 160 px)


@dataclass
class Embeddings:
    """Feature rows with their labels and paths, and how they were made."""

    features: np.ndarray  # (n, d) float32, raw features (heads standardise them)
    labels: list[str]
    paths: list[str]  # resolved paths, the lookup key for reuse
    meta: dict = field(default_factory=dict)  # backbone, weights, input_size, mean, std, key

    def rows(self, paths) -> np.ndarray:
        """Row index of each of `paths` in this file; -1 for a path without a row (it was unreadable)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return np.array([index.get(str(Path(p).resolve()), -1) for p in paths], dtype=np.int64)


def feature_extractor(net: "nn.Module") -> "nn.Module":
    """`net` with its last Linear layer (the classifier) replaced by Identity: it returns pooled features."""
    from torch import nn

    from museum.image.backbones import last_linear

    parent, attr = last_linear(net)
    setattr(parent, attr, nn.Identity())
    return net


def check_features(kind: str, option: str = "--features") -> str:
    """`kind` if it is one of FEATURES; else a one-line error naming the option."""
    if kind not in FEATURES:
        raise MuseumError(f"{option} {kind}: expected one of {', '.join(FEATURES)}")
    return kind


def head_extractor(net: "nn.Module", features: str, mean, std) -> tuple["nn.Module", str]:
    """(module returning feature vectors, the kind actually used) for a classifier network.

    `stages` needs a `features` trunk (MobileNet, EfficientNet, ConvNeXt…); other backbones get `pooled`.
    """
    from torch import nn

    from museum.image.backbones import StageFeatures, stage_ends

    check_features(features)
    trunk = getattr(net, "features", None)
    if features == "stages" and isinstance(trunk, nn.Sequential) and len(trunk) > 1:
        return StageFeatures(trunk, stage_ends(trunk)[-STAGES:], mean, std, HIST_BINS), "stages"
    return feature_extractor(net), "pooled"


def build_extractor(backbone: str, weights: str, features: str = "pooled", mean=None, std=None) -> tuple["nn.Module", str, str]:
    """(pretrained feature extractor, where its weights came from, the feature kind it returns)."""
    from museum.image.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone

    if weights == "none":
        # Random features make every head a coin toss: refuse rather than train on noise.
        raise MuseumError("--weights none: embedding heads need pretrained weights; use --weights imagenet or a .pth file")
    net, source = build_backbone(backbone, 1, weights)
    extractor, kind = head_extractor(net, features, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    return extractor.eval(), source, kind


def embed_tensors(net: "nn.Module", images: "torch.Tensor", mean, std, device: str = "cpu", batch_size: int = 64,
                  progress: bool = True, tta: bool = False) -> np.ndarray:
    """Features (n, d) float32 of uint8 images (n, 3, S, S), batched, with a progress bar.

    `tta` averages each image's features with its mirror's, as `ImageModel` does at prediction."""
    import torch
    from tqdm import tqdm

    from museum.image.augment import normalize
    from museum.image.backbones import inference_copy

    net = inference_copy(net).to(device)
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    out = []
    with torch.no_grad(), tqdm(total=len(images), unit="img", desc="embed", disable=None if progress else True,
                               leave=False) as bar:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device), mean_t, std_t)
            if device.startswith("cpu"):
                x = x.contiguous(memory_format=torch.channels_last)
            features = net(x).float()
            if tta:
                features = (features + net(x.flip(3)).float()) / 2
            out.append(features.flatten(1).cpu().numpy())
            bar.update(len(x))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def data_key(paths, spec: dict) -> str:
    """Hash of the settings and every file's path, size and mtime, in any order: equal keys mean equal features."""
    entries = []
    for p in paths:
        p = Path(p)
        try:
            st = p.stat()
            entries.append(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n")
        except OSError:
            entries.append(f"{p}\0missing\n")
    h = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
    for entry in sorted(entries):  # order-free: a split of a folder has the folder's key
        h.update(entry.encode())
    return h.hexdigest()


def embed_spec(backbone: str, weights: str, input_size: int, mean, std, tta: bool = True, features: str = "pooled") -> dict:
    return {"format": EMBED_FORMAT, "backbone": backbone, "weights": weights, "input_size": int(input_size),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "tta": bool(tta), "features": features}


def resolve_input_size(input_size: int, paths, seed: int = 0) -> int:
    """`--input-size 0` means what fine-tuning would use on these images (64 px thumbnails, else 160)."""
    if input_size:
        return input_size
    from museum.data.images import probe_median_side
    from museum.image.train import auto_input_size

    return auto_input_size(probe_median_side(list(paths), seed=seed))


def save_embeddings(emb: Embeddings, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, features=emb.features.astype(np.float32), labels=np.array(emb.labels, dtype=str),
                     paths=np.array(emb.paths, dtype=str), meta=np.array(json.dumps(emb.meta)))
    return path


def load_embeddings(path: str | Path) -> Embeddings:
    """Read a file written by `museum embed` (no pickles: strings are stored as unicode arrays)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            emb = Embeddings(z["features"], z["labels"].tolist(), z["paths"].tolist(), meta)
    except FileNotFoundError:
        raise MuseumError(f"{path}: not found; write it with `museum embed`") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise MuseumError(f"{path}: not an embeddings file ({load_failure(exc)}); write it with `museum embed`") from None
    if meta.get("format") != EMBED_FORMAT:
        raise MuseumError(f"{path}: not an embeddings file of this package; write it with `museum embed`")
    return emb


def compute_embeddings(paths, labels, spec: dict, device: str = "cpu", workers: int = 0,
                       cache_dir: str | None = None, net: "nn.Module | None" = None) -> Embeddings:
    """Decode once, embed in batches; unreadable images are skipped (and counted in the log)."""
    from museum.data.files import skipped_text
    from museum.data.images import decode_cache, default_workers

    start = time.perf_counter()
    if net is None:
        net, source, kind = build_extractor(spec["backbone"], spec["weights"], spec["features"], spec["mean"], spec["std"])
        logger.info(f"embedding {len(paths)} images with {spec['backbone']} ({source}, {kind} features) "
                    f"at {spec['input_size']} px")
    paths = list(paths)
    parts, kept, failures = [], [], Counter()
    # Decoded in chunks, each embedded and dropped before the next: memory stays bounded
    # (EMBED_CHUNK images) however many there are; only the feature rows accumulate.
    for first in range(0, len(paths), EMBED_CHUNK):
        cache, ok, failed = decode_cache(paths[first:first + EMBED_CHUNK], spec["input_size"], workers or default_workers(),
                                         Path(cache_dir) if cache_dir else None, progress=True)
        failures.update(failed)
        keep = np.flatnonzero(ok)
        if len(keep):
            parts.append(embed_tensors(net, cache[keep], spec["mean"], spec["std"], device, tta=spec["tta"]))
            kept.extend((first + keep).tolist())
        del cache
    if not kept:  # an empty file would only fail later, far from its cause
        where = os.path.commonpath([str(Path(p).parent) for p in paths]) if paths else "the given folder"
        raise MuseumError(f"{where}: none of its {len(paths)} image(s) is readable"
                          f"{f' ({skipped_text(failures)})' if failures else ''}; nothing to embed: "
                          "replace the files or give another folder")
    if failures:
        logger.warning(f"embed: skipped {sum(failures.values())} image(s): {skipped_text(failures)}")
    keep = np.array(kept, dtype=np.int64)
    features = np.concatenate(parts)
    logger.info(f"embedded {len(keep)} images ({features.shape[1]} features) in {time.perf_counter() - start:.1f}s")
    return Embeddings(features, [labels[i] for i in keep], [str(Path(paths[i]).resolve()) for i in keep],
                      {**spec, "key": data_key(paths, spec)})


def load_or_embed(paths, labels, spec: dict, file: str | Path | None = None, extra: dict | None = None,
                  **kwargs) -> Embeddings:
    """Embeddings of `paths`: read from `file` when it was made with the same settings from the same,
    unchanged files; else computed and, when `file` is given, (re)written there for the next call.

    Unreadable images have no row: callers look rows up by path (`Embeddings.rows`)."""
    if file is not None and Path(file).is_file():
        saved = load_embeddings(file)
        if saved.meta.get("key") == data_key(paths, spec):
            logger.info(f"embeddings: reusing {file} ({len(saved.paths)} images, same files and settings)")
            return saved
        logger.info(f"embeddings: {file} was made from other files or settings; recomputing it")
    emb = compute_embeddings(paths, labels, spec, **kwargs)
    emb.meta.update(extra or {})
    if file is not None:
        save_embeddings(emb, file)
    return emb


def embed_folder(images: Path, out: Path, train_csv: Path | None = None, backbone: str = "mobilenet_v2",
                 weights: str = "imagenet", input_size: int = 0, device: str = "auto", workers: int = 0,
                 cache_dir: str | None = None, seed: int = 0, tta: bool = True, features: str = "stages") -> Embeddings:
    """`museum embed`: embeddings of a folder-per-class set (or train.csv + images) written to `out`.

    An up-to-date `out` is recognised by a key over the options as given and the files' stats,
    before the input size is probed or any network (or torchvision, sklearn) is loaded.
    """
    from museum.data.files import skipped_text
    from museum.data.images import list_competition_images, list_image_folder

    items = list_competition_images(train_csv, images) if train_csv is not None else list_image_folder(images, option="")
    if train_csv is not None and items.skipped:  # the folder listing warns by itself
        logger.warning(f"{train_csv}: skipped {sum(items.skipped.values())} row(s): {skipped_text(items.skipped)}")
    check_features(features)
    request = {"backbone": backbone, "weights": weights, "input_size": input_size, "tta": tta, "seed": seed,
               "features": features}
    request_key = data_key(items.paths, request)
    if Path(out).is_file():
        saved = load_embeddings(out)
        if saved.meta.get("request_key") == request_key:
            logger.info(f"embeddings: {out} is up to date")
            return saved
    from museum.image.backbones import IMAGENET_MEAN, IMAGENET_STD
    from museum.utils import resolve_device

    spec = embed_spec(backbone, weights, resolve_input_size(input_size, items.paths, seed), IMAGENET_MEAN, IMAGENET_STD,
                      tta, features)
    return load_or_embed(items.paths, items.labels, spec, out, extra={"request_key": request_key},
                         device=resolve_device(device), workers=workers, cache_dir=cache_dir)
