"""Train `--head logreg|svm|mlp|knn`: embed once, search the head, validate; returns an `ImageModel` of kind head.

The backbone, its preprocessing (mean/std, interpolation) and its stage features come from the
same model factory as fine-tuning (`ImageModel.build`, `museum.image.backbones`).

The split, input size and metrics.json layout are those of fine-tuning, so the two are
compared on the same rows and the run folder reads the same to `report`, `evaluate` and
`submit`; only `history` is empty (there are no epochs) and `head` describes the search.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from museum.config import ImageConfig
from museum.errors import MuseumError
from museum.image.embed import embed_spec, load_or_embed
from museum.image.heads import HEADS, describe, fit_head
from museum.image.model import ImageModel
from museum.image.preprocess import resolve_input_size
from museum.image.validation import split_train_val, val_prediction_rows
from museum.log import logger
from museum.metrics import classification_metrics
from museum.utils import resolve_device, seed_everything


def fit_head_model(config: ImageConfig, paths: list[Path], labels: list[str], val_paths: list[Path] | None = None,
                   val_labels: list[str] | None = None, out: str | Path | None = None) -> ImageModel:
    """A head on frozen `config.head_features` of the pretrained `config.backbone`, validated on the
    split fine-tuning would use; with `out`, its files (best.pt, head.npz, head.json) are written there."""
    model = ImageModel(config)
    if config.head not in HEADS[1:]:
        raise MuseumError(f"--head {config.head}: expected one of {', '.join(HEADS)}")
    if not paths:
        raise MuseumError("no training images; check --images")
    if config.weights == "none":  # random features would make the head a coin toss
        raise MuseumError(f"--head {config.head} --weights none: heads need pretrained features; use --weights imagenet")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MuseumError(f"--head {config.head}: trains in seconds in one process; run it without torchrun")
    seed_everything(config.seed)
    torch.set_num_threads(config.threads or max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    classes = sorted(set(labels))
    if val_paths is None:  # the same seeded split as fine-tuning
        paths, labels, val_paths, val_labels = split_train_val(paths, labels, config)
    val_labels = list(val_labels or [])
    unknown = sorted(set(val_labels) - set(classes))
    if unknown:
        raise MuseumError(f"validation classes not in training: {', '.join(unknown[:5])}; give --val the same class folders")
    size = resolve_input_size(config.input_size, paths, config.seed)
    source = model.build(classes, size, config.weights, head=True)
    model.device = resolve_device(config.device)
    logger.info(f"{config.backbone} ({source}) {model.features} features + {config.head} head, {len(classes)} classes, {size} px, "
                f"{len(paths)} train / {len(val_paths)} validation images")

    # One embedding pass (and one cache file) for training and validation rows together.
    spec = embed_spec(config.backbone, config.weights, size, model.preprocess, config.tta, model.features)
    emb = load_or_embed(list(paths) + list(val_paths), list(labels) + val_labels, spec, config.embeddings,
                        device=model.device, workers=config.workers, cache_dir=config.cache_dir, net=model.net)
    col = {c: i for i, c in enumerate(classes)}
    tr, va = emb.rows(paths), emb.rows(val_paths)
    keep_tr, keep_va = np.flatnonzero(tr >= 0), np.flatnonzero(va >= 0)
    if len(keep_tr) < 2:
        raise MuseumError("fewer than 2 readable training images; add images")
    y_train = np.array([col[labels[i]] for i in keep_tr], dtype=np.int64)
    head, info = fit_head(config.head, emb.features[tr[keep_tr]], y_train, len(classes), config.seed)
    model.head = head
    logger.info(describe(info))

    report = {"best_epoch": None, "best_metric": float("nan"), "history": [], "validation": None,
              "val_predictions": [], "head": info}
    if len(keep_va):
        proba = head.predict_proba(emb.features[va[keep_va]])
        truth = [val_labels[i] for i in keep_va]
        pred = [classes[int(j)] for j in proba.argmax(1)]
        report["validation"] = classification_metrics(truth, pred, labels=classes)
        report["best_metric"] = model.metric = report["validation"]["macro_f1"]
        report["val_predictions"] = val_prediction_rows(val_paths, keep_va, [col[t] for t in truth], proba, classes)
    report["seconds"] = round(time.perf_counter() - start, 2)
    model.report_ = report
    if out is not None:
        model.write_files(out)
    return model
