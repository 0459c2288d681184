"""`report.html` (and its PNG figures) for a training run or for predictions on a labelled file.

`build_run_report(run_dir)` reads what a text or image run folder holds: `config.json`,
`summary.csv` (one row per epoch) and `metrics.json` (per-class report and validation
predictions). An interrupted run has no `metrics.json` yet: its report still shows the
config and the learning curves, and says what is missing. `build_report_from_predictions`
writes the same report, plus `metrics.json`, for any labelled predictions (`museum evaluate`).
"""

from __future__ import annotations

import csv
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from museum.errors import MuseumError
from museum.log import logger
from museum.metrics import classification_metrics
from museum.reports import html, plots
from museum.utils import read_json, write_json

GRID_EXAMPLES = 48  # bounded so that the report of a huge validation set stays quick and small
WORST_EXAMPLES = 16
WORST_TEXTS = 25
CONFUSED_PAIRS = 12


@dataclass
class ReportInput:
    """Everything a report shows; empty fields become notes in the page."""

    title: str
    kind: str  # "text", "image" or "predictions"
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    classes: list[str] = field(default_factory=list)
    # One dict per validation row: true, pred, confidence, optional loss, path, text, guid.
    examples: list[dict] = field(default_factory=list)
    metrics: dict | None = None  # classification_metrics(); computed from `examples` when None
    data: dict = field(default_factory=dict)  # data summary: name → value
    notes: list[str] = field(default_factory=list)  # what is missing, and caveats
    binary: dict | None = None  # yes/no tasks: `museum.image.binary.binary_analysis` output


# ----------------------------------------------------------------------------- public entry points


def build_run_report(run_dir: str | Path) -> Path:
    """Write `report.html` and its PNGs into a run folder of train-text or train-image; returns the page."""
    try:
        return _build_run_report(run_dir)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        # Files edited by hand or written by something else: one line, not a traceback.
        raise MuseumError(f"{run_dir}: config.json, metrics.json or summary.csv is not as train-text/train-image "
                          f"write it ({type(exc).__name__}: {str(exc)[:80]}); retrain, or restore the files") from None


def _build_run_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MuseumError(f"{run_dir}: not a folder; give a run folder written by train-text or train-image")
    found = {name: (run_dir / name).is_file() for name in ("config.json", "summary.csv", "metrics.json")}
    if not any(found.values()):
        raise MuseumError(f"{run_dir}: no config.json, summary.csv or metrics.json; "
                          "give a run folder written by train-text or train-image")
    config = read_json(run_dir / "config.json") if found["config.json"] else {}
    saved = read_json(run_dir / "metrics.json") if found["metrics.json"] else {}
    history = saved.get("history") or (_read_summary(run_dir / "summary.csv") if found["summary.csv"] else [])
    examples = [dict(row) for row in saved.get("val_predictions") or []]
    kind = "text" if saved.get("kind") == "text" or any("text" in e for e in examples) else \
        "image" if "backbone" in config or any("path" in e for e in examples) else "text"
    for ex in examples:
        if "path" in ex:
            ex["path"] = _locate(ex["path"], run_dir)
    # train-text keeps the per-class report at the top level, train-image under "validation".
    metrics = saved.get("validation") or (saved if "per_class" in saved else None)
    # A scikit-learn head trains in one go: it has no epochs, so no summary.csv to miss.
    one_shot = config.get("head") not in (None, "finetune")
    notes = [f"{name} is missing" for name, ok in found.items() if not ok and not (one_shot and name == "summary.csv")]
    if not found["metrics.json"]:
        notes.append("the run stopped before its final validation, so there is no per-class table, confusion "
                       "matrix or example grid; finish it (train again with --resume) and run `museum report` again")
    elif saved.get("experts") and saved.get("blend_weights") is not None:
        notes.append("the learning curves follow the BiLSTM alone; the scores above are those of the blended "
                       "model (see the experts' validation macro-F1 under Data)")
    elif not examples:
        notes.append("metrics.json holds no val_predictions: no confusion matrix or examples")
    members = saved.get("members") or []
    if members:
        notes.append(f"the learning curves follow the first of {len(members)} networks; the scores above are those "
                     "of their averaged probabilities (each network's score is under Data)")
    names = {"train_rows": "training rows", "val_rows": "validation rows", "blend_weights": "blend weights",
             "seconds": "training seconds"}
    data = {label: _plain_text(saved[key]) for key, label in names.items() if key in saved}
    data.update({f"{name} validation macro-F1": value for name, value in (saved.get("experts") or {}).items()})
    if members:
        data["networks' validation macro-F1"] = " · ".join(f"seed {m['seed']}: {m['best_metric']:.4f} (epoch {m['best_epoch']})"
                                                          for m in members)
    report = ReportInput(
        title=f"{kind.capitalize()} run {run_dir.resolve().name}", kind=kind, config=config, history=history,
        best_epoch=saved.get("best_epoch") or _best_epoch(history), classes=list(saved.get("classes") or []),
        examples=examples, metrics=metrics, data=data, notes=notes, binary=saved.get("binary"),
    )
    return render_report(run_dir, report)


def _plain_text(value):
    """A dict of numbers as "a 0.20 · b 0.60" rather than its Python repr; anything else as is."""
    if isinstance(value, dict):
        return " · ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    return value


def build_report_from_predictions(
    out_dir: str | Path,
    y_true: Sequence[str],
    y_pred: Sequence[str],
    proba: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    examples: Sequence[dict] | None = None,
    title: str = "Evaluation",
    config: dict | None = None,
) -> Path:
    """Write `report.html`, its PNGs and `metrics.json` for labelled predictions; returns the page.

    `proba` (rows × `classes`) gives each row's confidence and loss; `examples`, aligned with
    `y_true`, may carry `path` (image file), `text` and `guid` for the example sections.
    """
    out_dir = Path(out_dir)
    y_true, y_pred = [str(y) for y in y_true], [str(y) for y in y_pred]
    if len(y_true) != len(y_pred) or (examples is not None and len(examples) != len(y_true)):
        raise ValueError("y_true, y_pred and examples must have the same length")
    if (out_dir / "best.pt").exists() or (out_dir / "config.json").exists():
        raise MuseumError(f"{out_dir}: is a model folder; write the evaluation report to another folder")
    classes = list(classes) if classes is not None else sorted(set(y_true) | set(y_pred))
    col = {c: j for j, c in enumerate(classes)}
    rows = []
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        row = dict(examples[i]) if examples is not None else {}
        row.update(true=t, pred=p)
        if proba is not None:
            row["confidence"] = float(np.max(proba[i]))
            if t in col:  # a class no model knows has no probability, hence no loss
                row["loss"] = float(-math.log(max(float(proba[i, col[t]]), 1e-9)))
        rows.append(row)
    metrics = classification_metrics(y_true, y_pred)
    write_json(out_dir / "metrics.json", {**metrics, "kind": "predictions", "classes": classes,
                                          "config": config or {}, "val_predictions": rows})
    report = ReportInput(title=title, kind="predictions", config=config or {}, classes=classes, examples=rows,
                         metrics=metrics, notes=[] if proba is not None else ["no probabilities: no confidences or losses"])
    return render_report(out_dir, report)


# ----------------------------------------------------------------------------- rendering


def render_report(out_dir: Path, report: ReportInput) -> Path:
    """Draw the figures into `out_dir` and assemble `out_dir/report.html`."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    examples = report.examples
    metrics = report.metrics
    if metrics is None and examples:
        metrics = classification_metrics([e["true"] for e in examples], [e["pred"] for e in examples])
    sections = []
    summary = {}
    if metrics:
        summary = {"macro-F1": metrics["macro_f1"], "accuracy": metrics["accuracy"], "validation rows": metrics["n"],
                   "classes": len(metrics["per_class"])}
    if report.best_epoch:
        summary["best epoch"] = report.best_epoch
    if report.history:
        summary["epochs run"] = len(report.history)
    sections.append(html.cards(summary) + "".join(html.note(m) for m in report.notes))
    if report.config:
        sections.append(html.section("Config", html.key_values(dict(sorted(report.config.items())))))
    sections.append(_data_section(out_dir, report, metrics))
    if report.history:
        figure = plots.learning_curves(report.history, out_dir / "learning_curves.png", report.best_epoch)
        sections.append(html.section("Learning curves", html.png(figure, "learning curves")))
    if metrics:
        sections.append(_per_class_section(out_dir, metrics))
    if report.binary:
        sections.append(_binary_section(out_dir, report.binary))
    if examples:
        sections.append(_confusion_section(out_dir, examples, report.classes))
        sections.extend(_example_sections(out_dir, examples))
    subtitle = f"{report.kind} report written {time.strftime('%Y-%m-%d %H:%M')} from {out_dir.resolve()}"
    path = html.write_page(out_dir / "report.html", html.page(report.title, subtitle, sections))
    # debug: a trainer builds the report in a staging folder whose name means nothing to the user
    logger.debug(f"report written to {path} in {time.perf_counter() - start:.1f}s")
    return path


def _data_section(out_dir: Path, report: ReportInput, metrics: dict | None) -> str:
    counts = Counter(e["true"] for e in report.examples) or Counter(
        {c: m["support"] for c, m in (metrics or {}).get("per_class", {}).items()})
    parts = []
    if report.data:
        parts.append(html.key_values(report.data))
    if counts:
        parts.append(html.png(plots.class_distribution(dict(counts), out_dir / "class_distribution.png",
                                                       "Validation classes"), "validation class distribution"))
    return html.section("Data", *parts) if parts else ""


def _per_class_section(out_dir: Path, metrics: dict) -> str:
    per_class = metrics["per_class"]
    rows = sorted(per_class.items(), key=lambda kv: (kv[1]["f1"], kv[0]))
    table = html.table(("class", "precision", "recall", "F1", "support"),
                       [(c, m["precision"], m["recall"], m["f1"], m["support"]) for c, m in rows],
                       bad_rows=[m["f1"] < metrics["macro_f1"] for _, m in rows])
    figure = plots.per_class_scores(per_class, out_dir / "per_class.png")
    return html.section("Per-class scores (worst F1 first; shaded: below macro-F1)", table, html.png(figure, "per-class scores"))


def _binary_section(out_dir: Path, b: dict) -> str:
    c = b["confusion"]
    facts = {"ROC-AUC": b["roc_auc"], "PR-AUC (average precision)": b["average_precision"],
             "threshold": b["threshold"], "chosen by": b["threshold_rule"], "precision at it": b["precision"],
             "recall at it": b["recall"], "F1 at it": b["f1"]}
    table = html.table(("true \\ predicted", b["positive"], b["negative"]),
                       [(b["positive"], c["tp"], c["fn"]), (b["negative"], c["fp"], c["tn"])])
    figure = plots.roc_pr_curves(b, out_dir / "roc_pr.png")
    return html.section(f"{b['positive']} vs {b['negative']}: ROC, precision–recall and the threshold",
                        html.key_values(facts), html.png(figure, "ROC and precision-recall curves"),
                        "<h3>Confusion matrix at the threshold</h3>", table)


def _confusion_section(out_dir: Path, examples: list[dict], classes: Sequence[str]) -> str:
    seen = {e["true"] for e in examples} | {e["pred"] for e in examples}
    labels = [c for c in classes if c in seen] + sorted(seen - set(classes))
    index = {c: i for i, c in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for e in examples:
        matrix[index[e["true"]], index[e["pred"]]] += 1
    figure = plots.confusion_matrix(matrix, labels, out_dir / "confusion_matrix.png")
    support = matrix.sum(1)
    pairs = sorted(((matrix[i, j], i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j and matrix[i, j]),
                   reverse=True)[:CONFUSED_PAIRS]
    table = html.table(("true class", "predicted as", "rows", "share of the true class"),
                       [(labels[i], labels[j], int(n), float(n / support[i])) for n, i, j in pairs])
    return html.section("Confusion matrix", html.png(figure, "confusion matrix"),
                        "<h3>Most-confused pairs</h3>", table if pairs else html.note("no errors"))


def _example_sections(out_dir: Path, examples: list[dict]) -> list[str]:
    worst = sorted(examples, key=_loss_key, reverse=True)
    exact = all("loss" in e for e in examples)
    ranking = "" if exact else (" Only the top probability was saved: wrong predictions are ranked by their "
                                "confidence, a lower bound of their loss.")
    sections = []
    images = [e for e in examples if e.get("path")]
    if images:
        sample = _spread(images, GRID_EXAMPLES)
        wrong = sum(e["true"] != e["pred"] for e in sample)
        grid = plots.image_grid(sample, out_dir / "examples.png", f"{len(sample)} validation examples ({wrong} wrong)")
        worst_images = [e for e in worst if e.get("path")][:WORST_EXAMPLES]
        worst_grid = plots.image_grid(worst_images, out_dir / "highest_loss.png", "Highest-loss validation examples")
        sections.append(html.section("Validation examples", html.note("Red frame and ✗: wrong prediction."),
                                     html.png(grid, "validation examples")))
        sections.append(html.section("Highest-loss examples", html.png(worst_grid, "highest-loss examples"),
                                     html.note(ranking) if ranking else ""))
    texts = [e for e in worst if e.get("text")][:WORST_TEXTS]
    if texts:
        rows = [(e["text"], e["true"], e["pred"], e.get("confidence"), e.get("loss")) for e in texts]
        sections.append(html.section("Highest-loss descriptions",
                                     html.table(("description", "true", "predicted", "confidence", "loss"), rows,
                                                bad_rows=[e["true"] != e["pred"] for e in texts]),
                                     html.note(ranking) if ranking else ""))
    return sections


# ----------------------------------------------------------------------------- helpers


def _loss_key(example: dict) -> float:
    """The row's loss; without one, -log(1 - confidence) for errors (a lower bound) and -log(confidence) else."""
    if example.get("loss") is not None:
        return float(example["loss"])
    p = float(example.get("confidence") or 0.0)
    return -math.log(max(1.0 - p if example["true"] != example["pred"] else p, 1e-9))


def _spread(examples: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Up to `n` examples taken class by class in turn (seeded), so rare classes show up too."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[dict]] = {}
    for e in examples:
        by_class.setdefault(e["true"], []).append(e)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_class.items())]
    picked: list[dict] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked


def _read_summary(path: Path) -> list[dict]:
    """summary.csv rows with numbers as floats (blank cells stay blank)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value) if value not in ("", None) else ""
            except ValueError:
                pass
    return rows


def _best_epoch(history: list[dict]) -> int | None:
    scores = [(plots.to_float(r.get("val_macro_f1")), int(plots.to_float(r.get("epoch")))) for r in history]
    scores = [s for s in scores if not math.isnan(s[0])]
    # The trainers keep the first epoch that reached the best score.
    return max(scores, key=lambda s: (s[0], -s[1]))[1] if scores else None


def _locate(path: str, run_dir: Path) -> str:
    """An image path as saved (relative to where training ran), else relative to the run folder."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    beside = run_dir / p
    return str(beside) if beside.exists() else str(p)
