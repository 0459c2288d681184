"""`ImageModel.fit` for `--head logreg|svm|mlp|knn`: embed once, search the head, validate.

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

from museum.errors import MuseumError
from museum.log import logger
from museum.metrics import classification_metrics
from museum.utils import resolve_device, seed_everything


def fit_head_model(model, paths: list[Path], labels: list[str], val_paths: list[Path] | None,
                   val_labels: list[str] | None, out: str | Path | None = None, resume: bool = False):
    from museum.image.embed import embed_spec, load_or_embed, resolve_input_size
    from museum.image.heads import HEADS, describe, fit_head
    from museum.image.train import split_train_val, val_prediction_rows

    config = model.config
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
    size = config.input_size or resolve_input_size(0, paths, config.seed)
    source = model.build(classes, size, config.weights, head=True)
    model.device = resolve_device(config.device)
    logger.info(f"{config.backbone} ({source}) {model.features} features + {config.head} head, {len(classes)} classes, {size} px, "
                f"{len(paths)} train / {len(val_paths)} validation images")

    # One embedding pass (and one cache file) for training and validation rows together.
    spec = embed_spec(config.backbone, config.weights, size, model.mean, model.std, config.tta, config.head_features)
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
