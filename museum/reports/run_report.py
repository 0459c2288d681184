"""`report.html` (and its PNG figures) for a training run or for predictions on a labelled file.

`build_run_report(run_dir)` reads what a text or image run folder holds: `config.json`,
`summary.csv` (one row per epoch; `member1/`, `member2/`… hold those of the other networks of a
multi-network run) and `metrics.json` (per-class report, validation predictions with every
class's probability, and `resolved`: what the automatic options came to). An interrupted run
has no `metrics.json` yet: its report still shows the config and the learning curves, and
says what is missing. `build_report_from_predictions`
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
from markupsafe import Markup
from sklearn.metrics import confusion_matrix

from museum.errors import MuseumError
from museum.log import logger
from museum.metrics import classification_metrics
from museum.reports import html, plots
from museum.reports.thumbs import thumbnail_tag
from museum.utils import read_json, write_json

GRID_EXAMPLES = 48  # bounded so that the report of a huge validation set stays quick and small
WORST_EXAMPLES = 16
WORST_TEXTS = 25
CONFUSED_PAIRS = 12
PR_PANELS = 30  # classes with a precision-recall panel (the worst ones), so a 100-class run stays readable
# Options whose value in config.json means "chosen by the trainer"; `resolved` in metrics.json says what it chose.
AUTO = {"input_size": 0, "epochs": 0, "members": 0, "mixup": None, "workers": 0, "threads": 0, "device": "auto",
        "blend_weight": None}


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
    resolved: dict = field(default_factory=dict)  # what the config's automatic options came to
    # Multi-network runs: (label, history, best epoch) of every network, the first one included.
    networks: list[tuple[str, list[dict], int | None]] = field(default_factory=list)
    members: list[dict] = field(default_factory=list)  # each network's seed, best epoch and validation macro-F1


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
    networks = _networks(run_dir, history, members, saved.get("best_epoch") or _best_epoch(history))
    if len(networks) > 1:
        notes.append(f"the learning curves show each of the {len(networks)} networks; the scores above are those "
                     "of their averaged probabilities (each network's score is under Data)")
    names = {"train_rows": "training rows", "val_rows": "validation rows", "blend_weights": "blend weights",
             "seconds": "training seconds"}
    data = {label: _plain_text(saved[key]) for key, label in names.items() if key in saved}
    data.update({f"{name} validation macro-F1": value for name, value in (saved.get("experts") or {}).items()})
    # Image runs keep their probability columns in sorted class order (the trainer's), as counted here.
    classes = list(saved.get("classes") or sorted(saved.get("train_class_counts") or {}))
    report = ReportInput(
        title=f"{kind.capitalize()} run {run_dir.resolve().name}", kind=kind, config=config, history=history,
        best_epoch=saved.get("best_epoch") or _best_epoch(history), classes=classes,
        examples=examples, metrics=metrics, data=data, notes=notes, binary=saved.get("binary"),
        resolved=_resolved(run_dir, config, saved), networks=networks if len(networks) > 1 else [],
        members=members,
    )
    return render_report(run_dir, report)


def _networks(run_dir: Path, history: list[dict], members: list[dict], best: int | None) -> list[tuple]:
    """(label, history, best epoch) of each network: the first in the run folder, the others in member1/, member2/…"""
    networks = [(_network_label(0, members), history, best)]
    k = 1
    while (run_dir / f"member{k}" / "summary.csv").is_file():
        extra = _read_summary(run_dir / f"member{k}" / "summary.csv")
        saved_best = members[k].get("best_epoch") if k < len(members) else None
        networks.append((_network_label(k, members), extra, saved_best or _best_epoch(extra)))
        k += 1
    return networks


def _network_label(k: int, members: list[dict]) -> str:
    saved = members[k] if k < len(members) else {}
    about = ", ".join(part for part in (saved.get("backbone"), f"seed {saved['seed']}" if "seed" in saved else "") if part)
    return f"network {k + 1}" + (f" ({about})" if about else "")


def _resolved(run_dir: Path, config: dict, saved: dict) -> dict:
    """What the automatic options came to: metrics.json's `resolved`, completed for runs written before it
    from what else the folder holds (the checkpoint's input size and network count, the blend weights)."""
    resolved = dict(saved.get("resolved") or {})
    weights = saved.get("blend_weights")
    if "blend_weight" not in resolved and isinstance(weights, dict) and "lstm" in weights:
        resolved["blend_weight"] = weights["lstm"]
    if "members" not in resolved and saved and config.get("head", "finetune") == "finetune" and "backbone" in config:
        resolved["members"] = len(saved.get("members") or []) or 1
    if "input_size" not in resolved:
        resolved.update({k: v for k, v in _checkpoint_meta(run_dir).items() if k not in resolved})
    return resolved


def _checkpoint_meta(run_dir: Path) -> dict:
    """input_size and members from best.pt (else last.pt) of an image run; {} when there is none or it can't be read."""
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).is_file():
            try:
                import torch

                meta = torch.load(run_dir / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a report never fails for want of a detail
                return {}
            return {k: meta[k] for k in ("input_size", "members") if isinstance(meta.get(k), int)}
    return {}


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
            row["proba"] = [round(float(v), 6) for v in proba[i]]  # the precision-recall curves need them
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
    pr = _pr_curves(examples, report.classes)
    notes = list(report.notes)
    if pr is None and examples and report.kind != "predictions":  # predictions without probabilities say so already
        notes.append("the validation predictions carry no per-class probabilities (a run written before they were "
                     "saved): no precision-recall curves; retrain to get them")
    elif pr and pr["unseen"]:
        notes.append(f"no validation row of {', '.join(pr['unseen'][:5])}{' …' if len(pr['unseen']) > 5 else ''}: "
                     "no precision-recall curve for it")
    if pr and pr["curves"]:
        summary["mean average precision"] = pr["mean_ap"]
    else:
        pr = None
    sections.append(Markup().join([html.cards(summary), *map(html.note, notes)]))
    if report.config:
        sections.append(_config_section(report.config, report.resolved))
    sections.append(_data_section(out_dir, report, metrics))
    if report.history or report.networks:
        figure = plots.learning_curves(report.networks or report.history, out_dir / "learning_curves.png",
                                       report.best_epoch)
        sections.append(html.section("Learning curves", html.png(figure, "learning curves")))
    if metrics:
        sections.append(_per_class_section(out_dir, metrics, pr))
    if pr:
        figure = plots.per_class_pr_curves(pr["curves"][:PR_PANELS], out_dir / "pr_curves.png")
        shown = "" if len(pr["curves"]) <= PR_PANELS else f" (the {PR_PANELS} worst of {len(pr['curves'])} classes)"
        sections.append(html.section(f"Precision–recall per class{shown}", html.png(figure, "precision-recall curves")))
    if report.binary:
        sections.append(_binary_section(out_dir, report.binary))
    if any(e.get("confidence") is not None for e in examples):
        sections.append(_reliability_section(out_dir, examples))
    if examples:
        sections.append(_confusion_section(out_dir, examples, report.classes))
        sections.extend(_example_sections(examples))
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
    if report.members:
        parts.append(html.table(("network", "backbone", "seed", "best epoch", "validation macro-F1 alone"),
                                [(k + 1, m.get("backbone", ""), m.get("seed"), m.get("best_epoch"), m.get("best_metric"))
                                 for k, m in enumerate(report.members)]))
    if counts:
        parts.append(html.png(plots.class_distribution(dict(counts), out_dir / "class_distribution.png",
                                                       "Validation classes"), "validation class distribution"))
    return html.section("Data", *parts) if parts else ""


def _config_section(config: dict, resolved: dict) -> str:
    """Every option; an automatic one shows the value the trainer chose for it."""
    items = {}
    for key, value in sorted(config.items()):
        marker = AUTO.get(key, ...)
        automatic = key in AUTO and (value is None if marker is None else value == marker and not isinstance(value, bool))
        if not automatic:
            items[key] = _compact(value) if isinstance(value, float) else value
        else:
            chosen = resolved.get(key)
            items[key] = html.macros("run_report.html").auto_value(None if chosen is None else _compact(chosen))
    return html.section("Config", html.key_values(items),
                        html.muted("(auto): left to the trainer, which chose the value shown.", "p"))


def _compact(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _per_class_section(out_dir: Path, metrics: dict, pr: dict | None) -> str:
    per_class = metrics["per_class"]
    rows = sorted(per_class.items(), key=lambda kv: (kv[1]["f1"], kv[0]))
    ap = pr["ap"] if pr else {}
    table = html.table(("class", "precision", "recall", "F1", "support") + (("average precision",) if ap else ()),
                       [(c, m["precision"], m["recall"], m["f1"], m["support"]) + ((ap.get(c),) if ap else ())
                        for c, m in rows],
                       bad_rows=[m["f1"] < metrics["macro_f1"] for _, m in rows])
    figure = plots.per_class_scores(per_class, out_dir / "per_class.png")
    return html.section("Per-class scores (worst F1 first; shaded: below macro-F1)", table, html.png(figure, "per-class scores"))


def _pr_curves(examples: list[dict], classes: Sequence[str]) -> dict | None:
    """Per class: its precision-recall curve, average precision and operating point, worst first;
    None when the rows do not all carry probabilities for `classes`."""
    if not examples or not classes or any(len(e.get("proba") or ()) != len(classes) for e in examples):
        return None
    from sklearn.metrics import average_precision_score, precision_recall_curve

    proba = np.asarray([e["proba"] for e in examples], dtype=np.float64)
    truth = np.array([e["true"] for e in examples], dtype=object)
    pred = np.array([e["pred"] for e in examples], dtype=object)
    curves, unseen = [], []
    for j, c in enumerate(classes):
        positive = truth == c
        if not positive.any():
            unseen.append(c)
            continue
        precision, recall, _ = precision_recall_curve(positive, proba[:, j])
        chosen = pred == c
        hits = int((chosen & positive).sum())
        curves.append({"class": c, "precision": precision, "recall": recall,
                       "ap": float(average_precision_score(positive, proba[:, j])), "support": int(positive.sum()),
                       "prevalence": float(positive.mean()), "at_recall": hits / int(positive.sum()),
                       "at_precision": hits / int(chosen.sum()) if chosen.any() else 0.0})
    curves.sort(key=lambda c: (c["ap"], c["class"]))
    ap = {c["class"]: c["ap"] for c in curves}
    return {"curves": curves, "ap": ap, "mean_ap": float(np.mean(list(ap.values()))) if ap else float("nan"),
            "unseen": unseen}


def _reliability_section(out_dir: Path, examples: list[dict]) -> str:
    rows = [e for e in examples if e.get("confidence") is not None]
    confidence = [float(e["confidence"]) for e in rows]
    correct = [e["true"] == e["pred"] for e in rows]
    figure = plots.reliability_diagram(confidence, correct, out_dir / "reliability.png")
    return html.section("Calibration (reliability diagram)", html.png(figure, "reliability diagram"), html.note(
        "A calibrated model is right as often as it is confident: bars on the diagonal. Bars below it mean "
        "over-confidence; the red gaps, weighted by their rows, add up to the expected calibration error."))


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
                        html.heading("Confusion matrix at the threshold"), table)


def _confusion_section(out_dir: Path, examples: list[dict], classes: Sequence[str]) -> str:
    seen = {e["true"] for e in examples} | {e["pred"] for e in examples}
    labels = [c for c in classes if c in seen] + sorted(seen - set(classes))
    matrix = confusion_matrix([e["true"] for e in examples], [e["pred"] for e in examples], labels=labels)
    figure = plots.confusion_matrix(matrix, labels, out_dir / "confusion_matrix.png")
    support = matrix.sum(1)
    pairs = sorted(((matrix[i, j], i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j and matrix[i, j]),
                   reverse=True)[:CONFUSED_PAIRS]
    table = html.table(("true class", "predicted as", "rows", "share of the true class"),
                       [(labels[i], labels[j], int(n), float(n / support[i])) for n, i, j in pairs])
    return html.section("Confusion matrix", html.png(figure, "confusion matrix"),
                        html.heading("Most-confused pairs"), table if pairs else html.note("no errors"))


def _example_sections(examples: list[dict]) -> list[str]:
    worst = sorted(examples, key=_loss_key, reverse=True)
    exact = all("loss" in e for e in examples)
    ranking = "" if exact else (" Only the top probability was saved: wrong predictions are ranked by their "
                                "confidence, a lower bound of their loss.")
    sections = []
    images = [e for e in examples if e.get("path")]
    if images:
        sample = _spread(images, GRID_EXAMPLES)
        wrong = sum(e["true"] != e["pred"] for e in sample)
        worst_images = [e for e in worst if e.get("path")][:WORST_EXAMPLES]
        sections.append(html.section(f"Validation examples: {len(sample)}, {wrong} wrong",
                                     html.note("Red frame and ✗: wrong prediction. Taken class by class in turn, "
                                               "so that rare classes show too."), _image_grid(sample)))
        sections.append(html.section("Highest-loss examples", _image_grid(worst_images, with_loss=True),
                                     html.note(ranking) if ranking else ""))
    texts = [e for e in worst if e.get("text")][:WORST_TEXTS]
    if texts:
        rows = [(e["text"], e["true"], e["pred"], e.get("confidence"), e.get("loss")) for e in texts]
        sections.append(html.section("Highest-loss descriptions",
                                     html.table(("description", "true", "predicted", "confidence", "loss"), rows,
                                                bad_rows=[e["true"] != e["pred"] for e in texts]),
                                     html.note(ranking) if ranking else ""))
    return sections


def _image_grid(examples: list[dict], with_loss: bool = False) -> str:
    """Thumbnails with the true and predicted class (full names, wrapped) and the confidence."""
    caption = html.macros("run_report.html").example_caption
    figures = []
    for e in examples:
        confidence, loss = e.get("confidence"), e.get("loss") if with_loss else None
        figures.append((thumbnail_tag(e["path"], Path(e["path"]).name),
                        caption(e["true"], e["pred"], None if confidence is None else float(confidence),
                                None if loss is None else float(loss)), e["true"] != e["pred"]))
    return html.figure_grid(figures)


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
