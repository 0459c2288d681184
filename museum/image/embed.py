"""Backbone features ("embeddings"), computed once per image set and kept in one file.

`museum embed`, `train-image --head`, `dedup` and `clean` all go through `load_or_embed`: images
are decoded once (the same safe decoder, interpolation and optional on-disk decode cache as
fine-tuning), pushed through the pretrained backbone (`backbones.create_backbone`, the model
factory fine-tuning uses) with its classifier removed and its own preprocessing (mean/std,
interpolation: 0.5/0.5 and bicubic for the EfficientNet-Lites), and the vectors are written to
an `.npz` with the labels, paths, backbone, input size and preprocessing that made them. The
file carries a key over those settings and every file's size and mtime, so a second call with
the same data is answered from the file without loading a network.

Two kinds of features (`FEATURES`):
- ``pooled``: the backbone's final pooled vector (what the classifier sees). Near-duplicate
  search uses these: copies of one picture agree on them exactly where it matters.
- ``stages``: [mean ; max] pooled outputs of the trunk's last five stages plus a 4×4×4 RGB
  colour histogram (the default for heads; `backbones.stage_extractor`). The final ImageNet
  vector is nearly colour-blind and object-level, while characters differ in hair colour and
  drawing detail that live in the middle stages: on the 80/20 splits a logistic head went
  0.868 → 0.920 on simpsons_small, 0.921 → 0.944 on quintuplets_faces and 0.567 → 0.718 on
  simpsons_mnist (MobileNetV2). torchvision's `features` trunks and timm models (through
  `forward_intermediates`) have stages; torchvision's ResNets fall back to ``pooled``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from museum.config import HEAD_FEATURES, ImageConfig
from museum.errors import MuseumError, load_failure
from museum.log import logger, progress_bar
from museum.utils import atomic_path, resolve_device

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, torchvision, timm and the decoder are imported where a network is built or images are
# decoded: an up-to-date embeddings file is answered without them.

EMBED_FORMAT = "museum-embeddings/2"
FEATURES = HEAD_FEATURES  # stages, pooled
STAGES = 5  # trunk stages tapped by `stages` features
HIST_BINS = 4  # per RGB channel
EMBED_CHUNK = 2048  # images decoded at once (about 160 MB at 160 px)


@dataclass
class Embeddings:
    """Feature rows with their labels and paths, and how they were made."""

    features: np.ndarray  # (n, d) float32, raw features (heads standardise them)
    labels: list[str]
    paths: list[str]  # resolved paths, the lookup key for reuse
    meta: dict = field(default_factory=dict)  # backbone, weights, input_size, mean, std, interpolation, key

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

    `stages` needs stages to tap (`backbones.stage_extractor`: a torchvision `features` trunk or a
    timm model); other backbones (torchvision's ResNets) get `pooled`. `mean`/`std` are the
    backbone's normalisation, which the colour histogram undoes."""
    from museum.image.backbones import stage_extractor

    check_features(features)
    if features == "stages":
        stages = stage_extractor(net, mean, std, STAGES, HIST_BINS)
        if stages is not None:
            return stages, "stages"
    return feature_extractor(net), "pooled"


def build_extractor(backbone: str, weights: str, features: str = "pooled", mean=None, std=None,
                    input_size: int | None = None) -> tuple["nn.Module", str, str]:
    """(pretrained feature extractor, where its weights came from, the feature kind it returns).

    `mean`/`std` default to the backbone's own; `input_size` builds fixed-size models (ViT) for it."""
    from museum.image.backbones import create_backbone

    if weights == "none":
        # Random features make every head a coin toss: refuse rather than train on noise.
        raise MuseumError("--weights none: embedding heads need pretrained weights; use --weights imagenet or a .pth file")
    built = create_backbone(backbone, 1, weights, input_size)
    extractor, kind = head_extractor(built.module, features, mean or built.preprocess["mean"],
                                     std or built.preprocess["std"])
    return extractor.eval(), built.source, kind


def embed_tensors(net: "nn.Module", images: "torch.Tensor", mean, std, device: str = "cpu", batch_size: int = 64,
                  progress: bool = True, tta: bool = False) -> np.ndarray:
    """Features (n, d) float32 of uint8 images (n, 3, S, S), batched, with a progress bar.

    `tta` averages each image's features with its mirror's, as `ImageModel` does at prediction."""
    import torch

    from museum.image.augment import normalize
    from museum.torchutil import inference_copy

    net = inference_copy(net).to(device)
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    out = []
    with torch.no_grad(), progress_bar(total=len(images), unit="img", desc="embed", show=progress) as bar:
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


def embed_spec(backbone: str, weights: str, input_size: int, preprocess: dict, tta: bool = True,
               features: str = "pooled") -> dict:
    """What makes a set of features: the network, its input size and `preprocess` (the backbone's
    mean, std and interpolation, `backbones.backbone_preprocess`), mirror averaging and the feature kind."""
    return {"format": EMBED_FORMAT, "backbone": backbone, "weights": weights, "input_size": int(input_size),
            "mean": [float(m) for m in preprocess["mean"]], "std": [float(s) for s in preprocess["std"]],
            "interpolation": str(preprocess.get("interpolation", "bilinear")), "tta": bool(tta), "features": features}


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
        net, source, kind = build_extractor(spec["backbone"], spec["weights"], spec["features"], spec["mean"], spec["std"],
                                            spec["input_size"])
        logger.info(f"embedding {len(paths)} images with {spec['backbone']} ({source}, {kind} features) "
                    f"at {spec['input_size']} px")
    paths = list(paths)
    parts, kept, failures = [], [], Counter()
    # Decoded in chunks, each embedded and dropped before the next: memory stays bounded
    # (EMBED_CHUNK images) however many there are; only the feature rows accumulate.
    for first in range(0, len(paths), EMBED_CHUNK):
        cache, ok, failed = decode_cache(paths[first:first + EMBED_CHUNK], spec["input_size"], workers or default_workers(),
                                         Path(cache_dir) if cache_dir else None, progress=True,
                                         interpolation=spec.get("interpolation", "bilinear"))
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


def embed_folder(images: Path, out: Path, train_csv: Path | None = None, backbone: str = ImageConfig.backbone,
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
    # "preprocess": files written before embeddings took the backbone's own preprocessing are remade.
    request = {"backbone": backbone, "weights": weights, "input_size": input_size, "tta": tta, "seed": seed,
               "features": features, "preprocess": "backbone"}
    request_key = data_key(items.paths, request)
    if Path(out).is_file():
        saved = load_embeddings(out)
        if saved.meta.get("request_key") == request_key:
            logger.info(f"embeddings: {out} is up to date")
            return saved
    from museum.image.backbones import backbone_preprocess
    from museum.image.preprocess import resolve_input_size

    spec = embed_spec(backbone, weights, resolve_input_size(input_size, items.paths, seed), backbone_preprocess(backbone),
                      tta, features)
    return load_or_embed(items.paths, items.labels, spec, out, extra={"request_key": request_key},
                         device=resolve_device(device), workers=workers, cache_dir=cache_dir)


# Near duplicates are found on pooled MobileNetV2 features: the thresholds of `museum.image.duplicates`
# were chosen on them.
DUPLICATE_BACKBONE = "mobilenet_v2"


def image_embeddings(paths: Sequence[Path | None], cache_file: Path | None = None, device: str = "auto",
                     input_size: int = 0, features: str = "pooled", given: Path | None = None,
                     any_backbone: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 embeddings (n, d), readable mask) of `paths` (None: no image), one
    `DUPLICATE_BACKBONE` pass cached in `cache_file`.

    `given`: a file written by `museum embed` to read rows from instead (never rewritten); it must
    hold `features`, and `DUPLICATE_BACKBONE`'s unless `any_backbone` (a caller that fits a head on
    them, not one whose thresholds were set on that network)."""
    from museum.image.backbones import backbone_preprocess
    from museum.image.preprocess import resolve_input_size

    present = [Path(p) for p in paths if p is not None]
    if not present:
        return np.zeros((len(paths), 1), dtype=np.float32), np.zeros(len(paths), dtype=bool)
    if given is not None:
        emb = load_embeddings(given)
        if emb.meta.get("features") != features:
            raise MuseumError(f"--embeddings {given}: holds {emb.meta.get('features')} features, this needs {features}; "
                              f"write them with `museum embed --features {features}`")
        if not any_backbone and emb.meta.get("backbone") != DUPLICATE_BACKBONE:
            raise MuseumError(f"--embeddings {given}: holds {emb.meta.get('backbone')} features; the thresholds "
                              f"here are set on {DUPLICATE_BACKBONE}'s: write them with "
                              f"`museum embed --backbone {DUPLICATE_BACKBONE} --features {features}`")
    else:
        spec = embed_spec(DUPLICATE_BACKBONE, "imagenet", resolve_input_size(input_size, present),
                          backbone_preprocess(DUPLICATE_BACKBONE), features=features)
        emb = load_or_embed(present, [""] * len(present), spec, cache_file, device=resolve_device(device))
    found = emb.rows([p if p is not None else "\0" for p in paths])
    rows = np.array([-1 if p is None else r for p, r in zip(paths, found)], dtype=np.int64)
    if given is not None:
        missing = sum(1 for p, r in zip(paths, rows) if p is not None and r < 0)
        if missing == len(present):
            raise MuseumError(f"--embeddings {given}: none of these {len(present)} images is in it; "
                              "embed this folder (museum embed) or drop --embeddings")
        if missing:
            logger.warning(f"--embeddings {given}: {missing} of {len(present)} images have no row (unreadable when "
                           "it was written, or not in it); they are left out")
    ok = rows >= 0
    feats = np.zeros((len(paths), emb.features.shape[1]), dtype=np.float32)
    feats[ok] = emb.features[rows[ok]]
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats, ok
