"""`museum evaluate` and `museum tune`: the cascade on a labelled CSV.

`evaluate` shows what each part contributes: text alone, image alone, the cascade, and
the cascade on the rows of each route. `tune` searches the routing settings for macro-F1
and saves them as `fusion.json` beside the models, where `submit` finds them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from museum.config import FusionConfig
from museum.crossfit import cross_fit
from museum.data.competition import iter_competition_chunks
from museum.experts import ChunkScores, availability_counts, concat_scores, score_chunk
from museum.fusion import (ROUTES, CascadeResult, FusionChoice, TuneResult, fast_macro_f1, format_choice, format_tune, save_fusion,
                           save_settings, settings_path, tune_cascade)
from museum.folders import check_not_input, model_files
from museum.log import logger
from museum.metrics import classification_metrics, format_report
from museum.submit import RunSetup, prepare
from museum.utils import check_classes, write_json


@dataclass
class Labelled:
    """A labelled CSV scored by both experts and routed by the cascade."""

    setup: RunSetup
    scores: ChunkScores
    labels: list[str]
    result: CascadeResult

    def single(self, kind: str) -> list[str]:
        """Predictions of one expert alone; rows it cannot judge get the fallback class."""
        classes, fallback = self.setup.cascade.classes, self.setup.cascade.fallback
        proba, usable = (
            (self.scores.text_p, self.scores.has_text) if kind == "text" else (self.scores.image_p, self.scores.has_image)
        )
        arg = np.argmax(np.nan_to_num(proba, nan=0.0), axis=1)
        return [classes[a] if ok else fallback for a, ok in zip(arg, usable)]


def score_labelled(
    csv_path: Path,
    images: Path | None,
    text_model: Path | None,
    image_model: Path | None,
    overrides: dict,
    use_saved_settings: bool = True,
) -> Labelled:
    """Read a labelled CSV, score it with the experts and route it (labelled files are held whole)."""
    csv_path = Path(csv_path)
    setup = prepare(csv_path, images, text_model, image_model, overrides, use_saved=use_saved_settings)
    parts, labels = [], []
    for chunk in iter_competition_chunks(csv_path, chunk_size=setup.config.chunk_size, require_labels=True):
        parts.append(score_chunk(setup.experts, chunk, setup.images, setup.config.batch_size, setup.config.workers))
        labels.extend(chunk.labels or [])
    scores = concat_scores(parts)
    labels = _binary_labels(labels, setup)
    unknown = sorted(set(labels) - set(setup.cascade.classes))
    if unknown:
        n = sum(1 for label in labels if label in unknown)
        logger.warning(f"{csv_path}: {n} row(s) carry classes no model knows ({', '.join(unknown)}); they count as errors")
    result = setup.cascade.combine(scores.text_p, scores.image_p, scores.has_text, scores.has_image)
    return Labelled(setup, scores, labels, result)


def _binary_labels(labels: list[str], setup: RunSetup) -> list[str]:
    """Labels as a one-vs-rest image model (`--positive`) names them: the other classes become `not_<positive>`."""
    from museum.image.binary import negative_name

    image = setup.experts.image
    decision = getattr(image, "decision", None) if image is not None else None
    if not decision or negative_name(decision["positive"]) not in image.classes_:
        return labels
    positive, rest = decision["positive"], negative_name(decision["positive"])
    return [label if label == positive else rest for label in labels]


# ----------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateReport:
    """Metrics of every system and subset, and the text to print."""

    metrics: dict = field(default_factory=dict)
    text: str = ""


def evaluate(
    csv_path: Path,
    images: Path | None = None,
    text_model: Path | None = None,
    image_model: Path | None = None,
    overrides: dict | None = None,
    json_out: Path | None = None,
    report_dir: Path | None = None,
) -> EvaluateReport:
    """Macro-F1, accuracy and per-class reports of text-only, image-only, cascade and each route.

    With `report_dir`, also the same HTML report a training run gets, for the cascade's predictions.
    """
    start = time.perf_counter()
    inputs = [csv_path, *model_files(text_model), *model_files(image_model)]
    check_not_input(json_out, inputs, "--json")
    check_not_input(report_dir, [csv_path, images, text_model, image_model], "--report", folder=True)
    run = score_labelled(csv_path, images, text_model, image_model, overrides or {})
    y = run.labels
    cascade = run.result.labels(run.setup.cascade.classes)
    systems = {"cascade": cascade}
    if run.setup.experts.text is not None:
        systems["text-only"] = run.single("text")
    if run.setup.experts.image is not None:
        systems["image-only"] = run.single("image")
    order = [s for s in ("text-only", "image-only", "cascade") if s in systems]
    routes = np.array([ROUTES[r] for r in run.result.routes])
    both = run.scores.has_text & run.scores.has_image

    def measure(rows: np.ndarray) -> dict:
        idx = np.flatnonzero(rows)
        if not idx.size:  # e.g. no row has both modalities: nothing to score
            return {}
        return {s: classification_metrics([y[i] for i in idx], [systems[s][i] for i in idx]) for s in order}

    everything = np.ones(len(y), dtype=bool)
    metrics: dict = {
        "file": str(csv_path),
        "config": asdict(run.setup.config),
        "classes": run.setup.cascade.classes,
        "availability": dict(availability_counts(run.scores)),
        "all_rows": measure(everything),
        "both_modalities": measure(both),
        "routes": {r: classification_metrics([y[i] for i in idx], [cascade[i] for i in idx])
                   for r in ROUTES if (idx := np.flatnonzero(routes == r)).size},
    }
    metrics["seconds"] = time.perf_counter() - start
    if json_out is not None:
        write_json(json_out, metrics)
    text = _format_evaluation(metrics, order, json_out)
    if report_dir is not None:
        text += f"\nreport: {_write_report(report_dir, csv_path, run, cascade, metrics['config'])}"
    return EvaluateReport(metrics, text)


def _write_report(report_dir: Path, csv_path: Path, run: Labelled, cascade: list[str], config: dict) -> Path:
    """report.html for the cascade's predictions, with each row's description and readable image as examples."""
    from museum.data.competition import read_competition_csv
    from museum.reports import build_report_from_predictions

    table = read_competition_csv(csv_path, require_labels=True)  # labelled files are small: read the texts again
    examples = [
        {"guid": guid, "text": text, **({"path": str(run.setup.images / f"{guid}.jpg")} if status == "ok" else {})}
        for guid, text, status in zip(table.guids, table.descriptions, run.scores.image_status)
    ]
    return build_report_from_predictions(
        report_dir, run.labels, cascade, proba=run.result.proba, classes=run.setup.cascade.classes,
        examples=examples, title=f"Cascade evaluation: {Path(csv_path).name}", config=config,
    )


def _format_evaluation(metrics: dict, order: list[str], json_out: Path | None) -> str:
    lines = [f"{'rows':<34}{'n':>6}  {'macro-F1':>8}  {'accuracy':>8}"]

    def add(name: str, m: dict) -> None:
        lines.append(f"{name:<34}{m['n']:>6}  {m['macro_f1']:8.4f}  {m['accuracy']:8.4f}")

    for s in order:
        add(f"all rows, {s}", metrics["all_rows"][s])
    for s, m in metrics["both_modalities"].items():
        add(f"text+image rows, {s}", m)
    for route, m in metrics["routes"].items():
        add(f"cascade, route {route}", m)
    lines.append("availability: " + ", ".join(f"{k} {v}" for k, v in sorted(metrics["availability"].items())))
    for s in order:
        lines += ["", format_report(metrics["all_rows"][s], f"== {s}, all rows")]
    for route, m in metrics["routes"].items():
        lines += ["", format_report(m, f"== cascade, route {route}")]
    if json_out is not None:
        lines += ["", f"metrics written to {json_out}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tune


def tune(
    valid_csv: Path,
    images: Path | None = None,
    text_model: Path | None = None,
    image_model: Path | None = None,
    overrides: dict | None = None,
    out: Path | None = None,
) -> tuple[TuneResult, Path, str]:
    """Tune thresholds and blend weight on a labelled CSV; save them as `fusion.json` for `submit`.

    The baseline is FusionConfig's defaults (or the thresholds given as options), never an
    earlier `fusion.json`, so re-tuning does not drift.
    """
    check_not_input(out, [valid_csv, *model_files(text_model), *model_files(image_model)], "--out")
    # Macro-F1 over one class has nothing to trade off: refuse before any model is loaded.
    labels = [label for chunk in iter_competition_chunks(valid_csv, require_labels=True) for label in chunk.labels or []]
    check_classes(labels, f"{valid_csv}: the labels", "macro-F1 tuning")
    run = score_labelled(valid_csv, images, text_model, image_model, overrides or {}, use_saved_settings=False)
    classes = run.setup.cascade.classes
    label_space = classes + sorted(set(run.labels) - set(classes))
    index = {c: i for i, c in enumerate(label_space)}
    y = np.array([index[c] for c in run.labels])
    result = tune_cascade(
        run.scores.text_p, run.scores.image_p, run.scores.has_text, run.scores.has_image,
        y, classes, run.setup.cascade.fallback, run.setup.config,
    )
    tt, it, w = result.chosen
    chosen = FusionConfig(**{**asdict(run.setup.config), "text_threshold": tt, "image_threshold": it, "blend_weight": w})
    out = out or settings_path(text_model, image_model)
    save_settings(
        out,
        chosen,
        text_model=str(text_model.resolve()) if text_model is not None else None,
        image_model=str(image_model.resolve()) if image_model is not None else None,
        classes=classes,
        fallback_source=run.setup.fallback_source,
        tuned_on={"file": str(valid_csv), "rows": len(y), "availability": dict(availability_counts(run.scores))},
        tuning=asdict(result),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    counts = Counter(ROUTES[r] for r in run.result.routes)
    text = "\n".join([
        f"validation: {len(y)} rows ({', '.join(f'{r} {counts[r]}' for r in ROUTES)} under the defaults)",
        format_tune(result),
        f"saved to {out}; " + ("museum submit reads it when it uses these models"
                               if Path(out).resolve() == settings_path(text_model, image_model).resolve()
                               else f"pass `--settings {out}` to museum submit"),
    ])
    return result, out, text


# ----------------------------------------------------------------------------- tune --cross-fit


def tune_cross_fit(
    labelled_csv: Path,
    images: Path | None = None,
    text_model: Path | None = None,
    image_model: Path | None = None,
    overrides: dict | None = None,
    out: Path | None = None,
    folds: int = 5,
    seed: int = 0,
) -> tuple[FusionChoice, Path, str]:
    """Fit the fusion on honest inputs: out-of-fold probabilities of both experts, each retrained per fold
    without that fold's rows (`museum.crossfit`); choose the rule by an inner cross-validation against the
    0.7/0.7 default and save it as `fusion.json`, which submit, evaluate and serve then use."""
    overrides = overrides or {}
    check_not_input(out, [labelled_csv, *model_files(text_model), *model_files(image_model)], "--out")
    labels = [label for chunk in iter_competition_chunks(labelled_csv, require_labels=True) for label in chunk.labels or []]
    check_classes(labels, f"{labelled_csv}: the labels", "macro-F1 tuning")
    setup = prepare(labelled_csv, images, text_model, image_model, overrides, use_saved=False)
    oof = cross_fit(labelled_csv, setup.images, text_model, image_model, n_folds=folds, seed=seed,
                    device=overrides.get("device"))
    choice = oof.choose(setup.config, setup.cascade.fallback)
    out = out or settings_path(text_model, image_model)
    save_fusion(
        out, choice, setup.config,
        text_model=str(text_model.resolve()) if text_model is not None else None,
        image_model=str(image_model.resolve()) if image_model is not None else None,
        fallback_source=setup.fallback_source,
        tuned_on={"file": str(labelled_csv), "rows": len(oof.labels), "cross_fit": {"folds": folds, "seed": seed,
                                                                                      "cache": str(oof.path)}},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    text = "\n".join([
        oof.summary(),
        side_by_side(oof, choice, setup.cascade.fallback),
        format_choice(choice),
        f"saved to {out}; " + ("museum submit, evaluate and serve read it when they use these models"
                               if Path(out).resolve() == settings_path(text_model, image_model).resolve()
                               else f"pass `--settings {out}` to museum submit"),
    ])
    return choice, out, text


def side_by_side(oof, choice: FusionChoice, fallback: str) -> str:
    """Out-of-fold macro-F1 of each expert alone (its rows; the fallback elsewhere) beside the fusion's
    inner cross-validated estimates, on all rows and on rows with both modalities."""
    y = oof.targets()
    k = max(len(oof.classes), int(y.max()) + 1)
    both = oof.has_text & oof.has_image
    fall = oof.classes.index(fallback)

    def alone(proba: np.ndarray, usable: np.ndarray) -> np.ndarray:
        pred = np.full(len(y), fall)
        pred[usable] = np.nan_to_num(proba[usable], nan=-1.0).argmax(1)
        return pred

    def row(name: str, pred: np.ndarray) -> str:
        return (f"{name:<28}{fast_macro_f1(y, pred, k):>10.4f}"
                + (f"{fast_macro_f1(y[both], pred[both], k):>14.4f}" if both.any() else f"{'-':>14}"))

    lines = [f"{'out of fold':<28}{'all rows':>10}{'with both':>14}   (n = {len(y)} / {int(both.sum())})"]
    if oof.has_text.any():
        lines.append(row("text expert alone", alone(oof.text_p, oof.has_text)))
    if oof.has_image.any():
        lines.append(row("image expert alone", alone(oof.image_p, oof.has_image)))
    for name, label in (("default", "cascade 0.7/0.7"), (choice.name, f"fused: {choice.name} (chosen)")):
        est = choice.estimates[name]
        lines.append(f"{label:<28}{est['all']:>10.4f}" + (f"{est['both']:>14.4f}" if both.any() else f"{'-':>14}"))
    return "\n".join(lines)
