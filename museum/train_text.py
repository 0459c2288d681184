"""`museum train-text`: read, split, fit the TextModel, write the model folder and its metrics."""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path

import numpy as np

from museum.config import TextConfig, config_to_dict
from museum.data.competition import CompetitionTable, read_competition_csv, stratified_split
from museum.errors import MuseumError
from museum.log import logger
from museum.metrics import classification_metrics, format_report
from museum.reports import write_report_safely
from museum.text.model import TextModel
from museum.folders import check_destination, check_not_input, staged_folder
from museum.provenance import save_training_record, training_record
from museum.utils import atomic_path, check_classes, write_json


def train_text_model(
    train_path: str | Path, out: str | Path, config: TextConfig, unlabeled: list[Path] = (), progress: bool = True
) -> tuple[TextModel, dict]:
    """Train on a labelled CSV with a seeded stratified validation split; write `out/`.

    Returns the fitted model and the metrics dict also written to `out/metrics.json`.
    """
    start = time.perf_counter()
    check_not_input(out, [train_path, *unlabeled], folder=True)
    out = check_destination(out)
    table = read_competition_csv(train_path, require_labels=True)
    extra = [t for path in unlabeled for t in read_competition_csv(path).descriptions]
    table = _rows_with_text(table)
    train_idx, val_idx = stratified_split(table.labels, config.val_fraction, config.seed)
    if len(val_idx) == 0:
        raise MuseumError(f"{train_path}: no row left for validation (every class has a single description); "
                          "add rows: a class needs two to be both trained and measured")
    train, val = table.subset(train_idx), table.subset(val_idx)
    logger.info(
        f"train-text: {len(train)} training / {len(val)} validation rows, {len(set(table.labels))} classes, "
        f"{sum(1 for t in extra if t)} unlabelled descriptions for Word2Vec"
    )
    model = TextModel(config).fit(train.descriptions, train.labels, val.descriptions, val.labels, extra, progress)

    # The linear experts are refit on train + validation at the end of `fit`; score the
    # validation rows with the experts as they were before that, or the numbers would leak.
    proba = model.blend(model.val_probas_)
    classes = model.classes_
    predicted = [classes[i] for i in proba.argmax(1)]
    metrics = classification_metrics(val.labels, predicted, sorted(set(val.labels)))
    metrics["experts"] = {name: classification_metrics(val.labels, [classes[i] for i in p.argmax(1)])["macro_f1"]
                          for name, p in model.val_probas_.items()}
    y = np.array([classes.index(c) for c in val.labels])
    losses = -np.log(np.clip(proba[np.arange(len(y)), y], 1e-9, None))
    metrics.update(
        kind="text",
        classes=classes,
        blend_weights=model.blend_weights_,
        best_epoch=model.best_epoch_,
        history=model.history_,
        word2vec=model.stats_["word2vec"],
        config=config_to_dict(config),
        train_rows=len(train),
        train_class_counts=dict(Counter(table.labels)),
        val_rows=len(val),
        seconds=time.perf_counter() - start,
        val_predictions=[
            # every class's probability (in `classes` order): the report's precision-recall curves need them
            {"guid": g, "text": t, "true": c, "pred": p, "confidence": float(proba[i].max()), "loss": float(losses[i]),
             "proba": [round(float(v), 6) for v in proba[i]]}
            for i, (g, t, c, p) in enumerate(zip(val.guids, val.descriptions, val.labels, predicted))
        ],
        # what the automatic options came to, shown beside the config in the report
        resolved={"device": str(model.device), **({"blend_weight": model.blend_weights_.get("lstm")}
                                                  if config.blend_weight is None else {})},
    )
    logger.info(format_report(metrics, "validation report (blended text model)"))
    experts = ", ".join(f"{name} {f1:.4f} × {model.blend_weights_.get(name, 0):.2f}" for name, f1 in metrics["experts"].items())
    logger.info(
        f"train-text done: val macro-F1 {metrics['macro_f1']:.4f} (experts: {experts}), "
        f"accuracy {metrics['accuracy']:.4f}, best epoch {model.best_epoch_}, {metrics['seconds']:.1f} s → {out}"
    )
    # Everything goes into a staging folder that replaces `out` as a whole once complete.
    with staged_folder(out, "text") as staging:
        model.write_files(staging)
        save_training_record(staging, training_record(train_path, unlabeled=unlabeled))
        write_json(staging / "metrics.json", metrics)
        _write_summary(staging / "summary.csv", model.history_)
        _write_tensorboard(staging / "tensorboard", model.history_, metrics)
        report = write_report_safely(staging, shown_as=out)
    if report is not None:
        logger.info(f"report: {out / report.name}")
    return model, metrics


def _rows_with_text(table: CompetitionTable) -> CompetitionTable:
    """The rows that have a description (an empty one means "no text": nothing to learn); at least two classes."""
    keep = np.flatnonzero(table.has_text)
    if len(keep) < len(table):
        logger.info(f"{table.path}: {len(table) - len(keep)} row(s) with an empty description left out of text training")
    table = table.subset(keep)
    check_classes(table.labels or [], f"{table.path}: rows with a description")
    return table


def _write_summary(path: Path, history: list[dict]) -> None:
    """One CSV row per epoch (timm's summary.csv)."""
    if not history:
        return
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)


def _write_tensorboard(folder: Path, history: list[dict], metrics: dict) -> None:
    """TensorBoard events of the BiLSTM's epochs (as image runs write them) and of the blended model's final scores.

    Written from the history once training is over: the events then describe exactly the epochs in summary.csv."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: summary.csv and metrics.json hold the same numbers
        return
    with SummaryWriter(log_dir=str(folder)) as writer:
        for row in history:
            for key in ("loss", "val_loss", "val_macro_f1", "lr"):
                if isinstance(row.get(key), (int, float)):
                    writer.add_scalar(key, float(row[key]), int(row["epoch"]))
        step = int(metrics.get("best_epoch") or len(history) or 1)
        writer.add_scalar("blend/val_macro_f1", float(metrics["macro_f1"]), step)
        writer.add_scalar("blend/val_accuracy", float(metrics["accuracy"]), step)
        for name, f1 in metrics["experts"].items():
            writer.add_scalar(f"experts/{name}_val_macro_f1", float(f1), step)
