"""Yes/no image tasks: one class against the rest, ROC and PR analysis, a saved decision threshold.

`--positive CLASS` turns any labelled set into CLASS vs `not_CLASS`; a two-class set is a
binary task as it is. After training, validation scores of the positive class give ROC and
precision–recall curves, and a threshold is chosen: the one maximising F1, or the lowest one
reaching `--target-precision`. The threshold is stored in the checkpoint; `ImageModel`
then shifts its probabilities so that 0.5 sits at the threshold. That way every consumer
that takes the most probable class (predict-image, submit, evaluate, serve) applies it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from museum.data.images import ImageItems
from museum.errors import MuseumError
from museum.log import logger
from museum.metrics import classification_metrics


def negative_name(positive: str) -> str:
    return f"not_{positive}"


def resolve_positive(labels: list[str], positive: str | None) -> str | None:
    """The positive class of a binary task, or None for a many-class one.

    A two-class set without `--positive` takes its smaller class (ties: the later name), the
    usual "thing we look for".
    """
    counts = Counter(labels)
    if positive is not None:
        if positive not in counts:
            raise MuseumError(f"--positive {positive}: no such class; classes are {', '.join(sorted(counts)[:12])}")
        if len(counts) < 2:
            raise MuseumError(f"--positive {positive}: it is the only class; the rest needs images too")
        return positive
    if len(counts) == 2:
        return sorted(counts, key=lambda c: (counts[c], c))[0] if len(set(counts.values())) > 1 else sorted(counts)[1]
    return None


def one_vs_rest(items: ImageItems | None, positive: str) -> ImageItems | None:
    """`items` with every label but `positive` renamed `not_<positive>` (two-class sets keep their names)."""
    if items is None or len(set(items.labels)) <= 2:
        return items
    rest = negative_name(positive)
    return ImageItems(items.paths, [l if l == positive else rest for l in items.labels], items.skipped)


def _logit_shift(p: np.ndarray, threshold: float, sign: float) -> np.ndarray:
    """sigmoid(logit(p) + sign·logit(threshold)), the threshold kept inside (0, 1)."""
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    return 1 / (1 + np.exp(-(np.log(p / (1 - p)) + sign * np.log(t / (1 - t)))))


def shift_proba(proba: np.ndarray, pos: int, threshold: float) -> np.ndarray:
    """Probabilities with the positive column moved on the logit scale so that `threshold` → 0.5.

    Monotone, so rankings, ROC and PR are unchanged; only which side of 0.5 a row falls changes.
    """
    shifted = _logit_shift(np.clip(proba[:, pos].astype(np.float64), 1e-7, 1 - 1e-7), threshold, -1.0)
    out = np.empty_like(proba)
    out[:, pos], out[:, 1 - pos] = shifted, 1 - shifted
    return out


def unshift_score(shifted: np.ndarray, threshold: float) -> np.ndarray:
    """The raw positive probability behind a shifted one (inverse of `shift_proba`'s column)."""
    return _logit_shift(np.clip(np.asarray(shifted, dtype=np.float64), 1e-12, 1 - 1e-12), threshold, 1.0)


def choose_threshold(y: np.ndarray, score: np.ndarray, target_precision: float | None = None) -> tuple[float, str]:
    """(threshold, how it was chosen); a row is positive when its score is above the threshold.

    Candidate cut points lie half-way between neighbouring distinct scores, so no validation
    row sits exactly on the threshold and `>` vs `>=` cannot disagree.
    """
    precision, recall, cuts = precision_recall_curve(y, score)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    distinct = np.unique(score)
    below = np.concatenate([[distinct[0] / 2], distinct[:-1]])  # the next lower distinct score

    def midpoint(cut: float) -> float:
        return float((cut + below[np.searchsorted(distinct, cut)]) / 2)

    if target_precision is not None:
        ok = np.flatnonzero(precision >= target_precision)
        if len(ok):
            i = ok[np.argmax(recall[ok])]  # the most recall that keeps the precision
            return midpoint(cuts[i]), f"lowest threshold with validation precision >= {target_precision:g}"
        logger.warning(f"--target-precision {target_precision}: no threshold reaches it on validation "
                       f"(best {precision.max():.3f}); using the most precise one")
        return midpoint(cuts[int(np.argmax(precision))]), f"most precise threshold (target {target_precision:g} unreachable)"
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    return midpoint(cuts[int(np.argmax(f1))]), "maximum validation F1"


def binary_analysis(y: np.ndarray, score: np.ndarray, target_precision: float | None = None) -> dict:
    """ROC and PR curves with their AUCs, the chosen threshold and the confusion matrix at it (plain types)."""
    y, score = np.asarray(y, dtype=bool), np.asarray(score, dtype=np.float64)
    if y.all() or not y.any():
        raise MuseumError("validation has only one of the two classes; ROC needs both (use a larger --val-fraction)")
    fpr, tpr, roc_cuts = roc_curve(y, score)
    precision, recall, pr_cuts = precision_recall_curve(y, score)
    threshold, rule = choose_threshold(y, score, target_precision)
    pred = score > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "roc_auc": float(roc_auc_score(y, score)), "average_precision": float(average_precision_score(y, score)),
        "threshold": threshold, "threshold_rule": rule, "target_precision": target_precision,
        "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": np.nan_to_num(roc_cuts, posinf=1.0).tolist()},
        "pr": {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": pr_cuts.tolist()},
        "n": int(len(y)), "positives": int(y.sum()),
    }


def finish_binary(model, positive: str, target_precision: float | None) -> dict:
    """Analyse `model.report_`'s validation rows, store the threshold in the model, and
    re-state the validation report (per-class table, predictions) at that threshold."""
    report = model.report_
    rows = report.get("val_predictions") or []
    if not rows or "proba" not in rows[0]:
        raise MuseumError("binary task: no validation probabilities to choose a threshold on; keep a validation split")
    pos = model.classes_.index(positive)
    y = np.array([r["true"] == positive for r in rows])
    score = np.array([r["proba"][pos] for r in rows])
    analysis = binary_analysis(y, score, target_precision)
    analysis["positive"], analysis["negative"] = positive, model.classes_[1 - pos]
    model.decision = {"positive": positive, "threshold": analysis["threshold"]}
    shifted = shift_proba(np.array([r["proba"] for r in rows], dtype=np.float64), pos, analysis["threshold"])
    for row, p in zip(rows, shifted):
        row["pred"] = model.classes_[int(p.argmax())]
        row["confidence"] = float(p.max())
    report["validation_argmax"] = report.get("validation")
    report["validation"] = classification_metrics([r["true"] for r in rows], [r["pred"] for r in rows],
                                                  labels=model.classes_)
    report["best_metric"] = report["validation"]["macro_f1"]
    report["binary"] = analysis
    logger.info(f"{positive} vs {analysis['negative']}: ROC-AUC {analysis['roc_auc']:.4f}, "
                f"PR-AUC {analysis['average_precision']:.4f}, threshold {analysis['threshold']:.4f} "
                f"({analysis['threshold_rule']}): precision {analysis['precision']:.3f}, recall {analysis['recall']:.3f}, "
                f"F1 {analysis['f1']:.3f}")
    return analysis
