"""Classification metrics shared by every expert: macro-F1 and the per-class report."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Macro-F1 over `labels` (default: the classes present in `y_true`), as the competition scored it."""
    labels = sorted(set(y_true)) if labels is None else list(labels)
    return float(f1_score(list(y_true), list(y_pred), labels=labels, average="macro", zero_division=0))


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Macro-F1, accuracy and a per-class precision/recall/F1/support table, in plain types."""
    y_true, y_pred = list(y_true), list(y_pred)
    labels = sorted(set(y_true)) if labels is None else list(labels)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "macro_f1": macro_f1(y_true, y_pred, labels),
        "accuracy": float(accuracy_score(y_true, y_pred)) if y_true else 0.0,
        "n": len(y_true),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, label in enumerate(labels)
        },
    }


def format_report(metrics: dict, title: str = "") -> str:
    """A fixed-width text table of `classification_metrics` output, sorted by F1 (worst first).

    Not scikit-learn's `classification_report`, which lists classes in label order and recomputes the scores:
    this one prints the metrics already computed, weakest classes on top as the reports show them."""
    rows = sorted(metrics["per_class"].items(), key=lambda kv: kv[1]["f1"])
    width = max([len(k) for k in metrics["per_class"]] + [10])
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for label, m in rows:
        lines.append(f"{label:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines.append(f"{'macro-F1':<{width}}  {'':9}  {'':6}  {metrics['macro_f1']:5.3f}  {metrics['n']:7d}")
    lines.append(f"{'accuracy':<{width}}  {'':9}  {'':6}  {metrics['accuracy']:5.3f}")
    return "\n".join(lines)


def top_k(proba: np.ndarray, classes: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """For each row, the k most probable (class, probability) pairs."""
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(proba[i, j])) for j in row] for i, row in enumerate(order)]
