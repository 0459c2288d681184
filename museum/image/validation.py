"""What both image trainers validate on, and how they report it.

`split_train_val` is the seeded stratified split that fine-tuning and every head share, so the two
are compared on the same rows; `val_prediction_rows` are metrics.json's per-image validation rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from museum.config import ImageConfig
from museum.data.competition import leak_free_split, split_leaks, stratified_split
from museum.image.duplicates import image_groups
from museum.log import logger


def split_train_val(paths: list[Path], labels: list[str], config: ImageConfig):
    """Seeded stratified (train paths, train labels, val paths, val labels).

    With `config.dedup_split`, near-duplicate groups (`museum.image.duplicates`) are moved whole to one
    side, so a copy of a validation image never sits in training and inflates the score.
    """
    if config.dedup_split:
        groups = image_groups(paths, device=config.device)
        before = split_leaks(groups, *stratified_split(labels, config.val_fraction, config.seed))
        train_idx, val_idx = leak_free_split(labels, groups, config.val_fraction, config.seed)
        logger.info(f"--dedup-split: {len(groups)} duplicate group(s), {len(before)} straddled the split and were moved whole")
    else:
        train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
    return ([paths[i] for i in train_idx], [labels[i] for i in train_idx],
            [paths[i] for i in val_idx], [labels[i] for i in val_idx])


def val_prediction_rows(val_paths, index, target, proba: np.ndarray, classes: list[str]) -> list[dict]:
    """metrics.json's per-image validation rows: `index` picks the path, `target` is the true class index."""
    return [
        {"path": str(Path(val_paths[i]).resolve()), "true": classes[t], "pred": classes[int(p.argmax())],
         "confidence": float(p.max()), "loss": float(-np.log(max(float(p[t]), 1e-9))),
         "proba": [float(v) for v in p]}  # every class's probability: ROC/PR analysis needs them
        for i, t, p in zip(index, target, proba)
    ]
