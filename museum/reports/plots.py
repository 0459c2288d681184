"""The report figures, drawn with matplotlib's Agg canvas and saved as PNG files.

Figures are built on `matplotlib.figure.Figure` directly (never pyplot), so no global
backend or window state is touched. Long Russian class names are wrapped onto a few lines
and figure sizes grow with the class count, so 15 typologies fit without being cut off.
Text is set in the first installed font that has Cyrillic glyphs.
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from museum.errors import MuseumError
from museum.utils import atomic_path

# DejaVu Sans ships with matplotlib and covers Cyrillic; the others are common fallbacks.
FONT_CANDIDATES = ("DejaVu Sans", "Noto Sans", "Liberation Sans", "Arial")
CYRILLIC_SAMPLE = "АБВЖЩЫЭЮЯабвжщыэюяёЁ"
# A class share ratio (largest / smallest) from which a linear axis hides the rare classes.
LOG_SCALE_RATIO = 10.0
OK_COLOUR, ERROR_COLOUR = "#2e7d32", "#c62828"


@functools.lru_cache(maxsize=1)
def cyrillic_font() -> str:
    """Family name of the first candidate font whose glyph table covers `CYRILLIC_SAMPLE`."""
    from matplotlib import font_manager, ft2font

    for family in FONT_CANDIDATES:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        charmap = ft2font.FT2Font(path).get_charmap()
        if all(ord(ch) in charmap for ch in CYRILLIC_SAMPLE):
            return family
    raise MuseumError(f"no installed font among {', '.join(FONT_CANDIDATES)} has Cyrillic glyphs; "
                      "install fonts-dejavu-core (apt) or reinstall matplotlib")


@contextmanager
def _figure(width: float, height: float, layout: str | None = "constrained") -> Iterator:
    """A fresh Agg figure with the report style; the caller saves it with `_save`."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    style = {"font.family": cyrillic_font(), "font.size": 9, "axes.titlesize": 11, "axes.titleweight": "bold",
             "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100}
    with matplotlib.rc_context(style):
        fig = Figure(figsize=(width, height), layout=layout)
        FigureCanvasAgg(fig)
        yield fig


def _save(fig, path: Path, palette: bool = False, tight: bool = True) -> Path:
    """Save as PNG, atomically; `palette` stores 256 colours (photos shrink about threefold)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight" if tight else None, pad_inches=0.15)
    with atomic_path(path) as tmp:
        if palette:
            img = Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
            img.save(tmp, format="PNG", optimize=True)
        else:
            tmp.write_bytes(buffer.getvalue())
    return Path(path)


def wrap_label(name: str, width: int = 24, max_lines: int = 3) -> str:
    """`name` on at most `max_lines` lines of `width` characters, with `…` when cut."""
    lines = textwrap.wrap(str(name), width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1].rstrip(" ,;") + "…"
    return "\n".join(lines)


def shorten(name: str, width: int) -> str:
    """One line of at most `width` characters, ending in `…` when cut."""
    name = " ".join(str(name).split())
    return name if len(name) <= width else name[: width - 1].rstrip(" ,;") + "…"


def imbalance_ratio(counts: dict[str, int]) -> float:
    """Largest class count over the smallest non-zero one (1.0 for balanced or empty data)."""
    values = [v for v in counts.values() if v > 0]
    return max(values) / min(values) if values else 1.0


def to_float(value) -> float:
    """A history cell (number, numeric string or blank) as a float, NaN when blank."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- figures


def class_distribution(counts: dict[str, int], path: Path, title: str = "Class distribution") -> Path:
    """Horizontal bars of rows per class, most frequent on top; log scale when unbalanced."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ratio = imbalance_ratio(counts)
    with _figure(8.5, 1.2 + 0.42 * len(items)) as fig:
        ax = fig.add_subplot()
        y = np.arange(len(items))
        ax.barh(y, [v for _, v in items], color="#4c72b0")
        ax.set_yticks(y, [wrap_label(k, 32, 2) for k, _ in items])
        ax.invert_yaxis()
        for yi, (_, v) in zip(y, items):
            ax.annotate(f"{v:,}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        if ratio >= LOG_SCALE_RATIO:
            ax.set_xscale("log")
        ax.set_xlabel("rows" + (" (log scale)" if ratio >= LOG_SCALE_RATIO else ""))
        ax.set_title(f"{title}: {sum(counts.values()):,} rows, {len(items)} classes, imbalance {ratio:.1f}×")
        ax.margins(x=0.12)
        return _save(fig, path)


# One colour per network of a multi-network run (matplotlib's default cycle, colour-blind safe order).
NETWORK_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
REPORT_WIDTH = 11.0  # inches at 100 dpi: the page's column, so figures show at their natural size


def learning_curves(curves: Sequence, path: Path, best_epoch: int | None = None) -> Path:
    """Loss, validation macro-F1 and learning rate per epoch, in three panels side by side.

    `curves` is one network's history (a list of per-epoch dicts), or a list of
    (label, history, best epoch) with one entry per network of a multi-network run: each is
    drawn in its own colour, training loss solid and validation loss dashed."""
    from matplotlib.lines import Line2D

    if curves and isinstance(curves[0], dict):
        curves = [("", curves, best_epoch)]
    several = len(curves) > 1
    with _figure(REPORT_WIDTH, 3.6) as fig:
        loss_ax, score_ax, lr_ax = fig.subplots(1, 3)
        all_epochs: set[float] = set()
        lr_values: list[float] = []
        for k, (label, history, best) in enumerate(curves):
            colour = NETWORK_COLOURS[k % len(NETWORK_COLOURS)]
            epochs = [to_float(row.get("epoch")) for row in history]
            all_epochs.update(e for e in epochs if not math.isnan(e))
            column = {key: [to_float(row.get(key)) for row in history]
                      for key in ("loss", "val_loss", "val_macro_f1", "val_accuracy", "lr")}
            drawn = {key: not all(math.isnan(v) for v in values) for key, values in column.items()}
            style = dict(marker="o", markersize=3.5)
            if several:
                for key, dashes in (("loss", "-"), ("val_loss", "--")):
                    if drawn[key]:
                        loss_ax.plot(epochs, column[key], dashes, color=colour, **style)
                if drawn["val_macro_f1"]:
                    score_ax.plot(epochs, column["val_macro_f1"], color=colour, label=label, **style)
                    if best in epochs:
                        score_ax.plot([best], [column["val_macro_f1"][epochs.index(best)]], "*", color=colour,
                                      markersize=13, markeredgecolor="black", markeredgewidth=0.6)
                if drawn["lr"]:
                    lr_ax.plot(epochs, column["lr"], color=colour, label=label, **style)
            else:
                for ax, key, name in ((loss_ax, "loss", "training"), (loss_ax, "val_loss", "validation"),
                                      (score_ax, "val_macro_f1", "macro-F1"), (score_ax, "val_accuracy", "accuracy"),
                                      (lr_ax, "lr", "learning rate")):
                    if drawn[key]:
                        ax.plot(epochs, column[key], label=name, **style)
                if best:
                    for ax in (loss_ax, score_ax, lr_ax):
                        ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best}")
            lr_values += [v for v in column["lr"] if not math.isnan(v)]
        for ax, ylabel in ((loss_ax, "loss"), (score_ax, "validation score"), (lr_ax, "learning rate")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(all_epochs) <= 20:
                ax.set_xticks(sorted(all_epochs))
            else:
                ax.xaxis.get_major_locator().set_params(integer=True)
        positive = [v for v in lr_values if v > 0]
        if positive and max(positive) / min(positive) > 20:  # warm-up and decay span decades
            lr_ax.set_yscale("log")
        if not lr_values:
            lr_ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=lr_ax.transAxes, color="grey")
        if several:
            loss_ax.legend([Line2D([], [], color="grey"), Line2D([], [], color="grey", linestyle="--")],
                           ["training", "validation"], fontsize=8)
            score_ax.legend(fontsize=8, title="★ best epoch", title_fontsize=8)
        else:
            for ax in (loss_ax, score_ax, lr_ax):
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        score_ax.set_ylim(0, 1.02)
        loss_ax.set_title("Loss")
        score_ax.set_title("Validation macro-F1" + (f" of {len(curves)} networks" if several else ""))
        lr_ax.set_title("Learning rate (end of epoch)")
        return _save(fig, path)


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "Confusion matrix") -> Path:
    """Row-normalised heatmap (each true class sums to 1).

    Beyond 6 classes the columns are numbered and each row's name carries its number: long
    Russian typologies stay horizontal and full-size instead of slanting across the figure."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(classes)
    numbered = n > 6
    cell = min(0.55, 7.0 / max(n, 1))  # inches: the matrix stays within the page's width
    with _figure(min(REPORT_WIDTH, 5.0 + cell * n), 1.8 + cell * n + (0 if numbered else 0.8)) as fig:
        ax = fig.add_subplot()
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        if numbered:
            ax.set_xticks(range(n), [str(k + 1) for k in range(n)], fontsize=10)
            ax.set_yticks(range(n), [f"{wrap_label(c, 34, 2)}  {k + 1:>2}" for k, c in enumerate(classes)], fontsize=10)
        else:
            ax.set_xticks(range(n), [wrap_label(c, 16, 3) for c in classes], fontsize=10)
            ax.set_yticks(range(n), [wrap_label(c, 34, 2) for c in classes], fontsize=10)
        ax.set_xlabel("predicted class" + (" (numbered as the rows)" if numbered else ""), fontsize=10)
        ax.set_ylabel("true class", fontsize=10)
        ax.tick_params(length=0)
        if n <= 25:  # beyond that the numbers would overlap
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        ax.text(j, i, f"{share[i, j]:.2f}".lstrip("0") if share[i, j] < 1 else "1", ha="center",
                                va="center", fontsize=9 if n <= 15 else 7, color="white" if share[i, j] > 0.5 else "black")
        ax.spines[:].set_visible(False)
        fig.colorbar(image, ax=ax, shrink=0.6, label="share of the true class")
        ax.set_title(f"{title} (row-normalised, {int(matrix.sum()):,} rows)")
        return _save(fig, path)


def per_class_pr_curves(curves: Sequence[dict], path: Path, columns: int = 5) -> Path:
    """One small precision–recall panel per class: the curve, its average precision, the share of the
    class (what a random ranking reaches) and the point where the predictions operate.

    Each item of `curves`: class, precision, recall (arrays), ap, support, and the operating
    point's precision and recall (`at_precision`, `at_recall`)."""
    columns = max(1, min(columns, len(curves)))
    rows = max(1, math.ceil(len(curves) / columns))
    with _figure(REPORT_WIDTH, 0.6 + 2.75 * rows) as fig:
        axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
        for ax, c in zip(axes, curves):
            ax.step(c["recall"], c["precision"], where="post", color="#2b8cbe", linewidth=1.6)
            ax.axhline(c["prevalence"], color="grey", linestyle="--", linewidth=0.8)
            ax.plot([c["at_recall"]], [c["at_precision"]], "o", color=ERROR_COLOUR, markersize=4)
            ax.set_title(f"{wrap_label(c['class'], 24, 3)}\nAP {c['ap']:.2f} · {c['support']} rows", fontsize=9,
                         fontweight="normal")
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.05)
            ax.grid(alpha=0.3)
        for ax in axes[len(curves):]:
            ax.set_visible(False)
        for ax in axes.reshape(rows, columns)[:, 0]:
            ax.set_ylabel("precision")
        for ax in axes.reshape(rows, columns)[-1, :]:
            ax.set_xlabel("recall")
        fig.suptitle("worst average precision (AP) first · dashed: the class's share of the rows, what a random "
                     "ranking reaches · red dot: the predictions as made", fontsize=9, color="#555555")
        return _save(fig, path)


def reliability_diagram(confidence: Sequence[float], correct: Sequence[bool], path: Path, bins: int = 10) -> Path:
    """Calibration: accuracy against confidence in equal-width bins (on the diagonal when calibrated),
    with the expected calibration error, and beside it how many rows fall in each bin."""
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=bool)
    stats = calibration_bins(confidence, correct, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    width = 1.0 / bins
    with _figure(REPORT_WIDTH, 4.0) as fig:
        rel_ax, count_ax = fig.subplots(1, 2)
        used = stats["count"] > 0
        left = edges[:-1][used]
        rel_ax.bar(left, stats["accuracy"][used], width=width, align="edge", color="#9ecae1", edgecolor="white",
                   label="accuracy of the bin")
        gap_bottom = np.minimum(stats["accuracy"][used], stats["confidence"][used])
        rel_ax.bar(left, np.abs(stats["accuracy"][used] - stats["confidence"][used]), bottom=gap_bottom, width=width,
                   align="edge", fill=False, hatch="///", edgecolor=ERROR_COLOUR, linewidth=0.8,
                   label="gap to its mean confidence")
        rel_ax.plot(left + width / 2, stats["confidence"][used], "_", color="black", markersize=14, markeredgewidth=2,
                    label="mean confidence of the bin")
        rel_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        rel_ax.set_xlim(0, 1)
        rel_ax.set_ylim(0, 1.02)
        rel_ax.set_xlabel("confidence (top probability)")
        rel_ax.set_ylabel("accuracy")
        rel_ax.set_title(f"Reliability: expected calibration error {stats['ece']:.3f}")
        rel_ax.legend(fontsize=8, loc="upper left")
        rel_ax.grid(alpha=0.3)
        right = confidence[correct], confidence[~correct]
        count_ax.hist(right, bins=edges, stacked=True, color=[OK_COLOUR, ERROR_COLOUR],
                      label=[f"right ({int(correct.sum()):,})", f"wrong ({int((~correct).sum()):,})"])
        count_ax.set_xlim(0, 1)
        count_ax.set_xlabel("confidence (top probability)")
        count_ax.set_ylabel("rows")
        count_ax.set_title(f"Confidence of {len(confidence):,} validation rows")
        count_ax.legend(fontsize=8, loc="upper left")
        count_ax.grid(alpha=0.3)
        return _save(fig, path)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """Per equal-width confidence bin: row count, accuracy and mean confidence; and the expected
    calibration error (the count-weighted mean gap between the two)."""
    index = np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    hits = np.bincount(index, weights=np.asarray(correct, dtype=np.float64), minlength=bins)
    total = np.bincount(index, weights=np.asarray(confidence, dtype=np.float64), minlength=bins)
    accuracy = np.divide(hits, count, out=np.zeros(bins), where=count > 0)
    mean_conf = np.divide(total, count, out=np.zeros(bins), where=count > 0)
    ece = float(np.sum(count * np.abs(accuracy - mean_conf)) / max(count.sum(), 1))
    return {"count": count, "accuracy": accuracy, "confidence": mean_conf, "ece": ece}


def roc_pr_curves(binary: dict, path: Path) -> Path:
    """ROC and precision–recall curves side by side, the chosen threshold marked on both."""
    b = binary
    with _figure(10, 4.2) as fig:
        roc_ax, pr_ax = fig.subplots(1, 2)
        fpr_at = b["confusion"]["fp"] / max(1, b["confusion"]["fp"] + b["confusion"]["tn"])
        roc_ax.plot(b["roc"]["fpr"], b["roc"]["tpr"], color="#2b8cbe", label=f"ROC-AUC {b['roc_auc']:.3f}")
        roc_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
        roc_ax.plot([fpr_at], [b["recall"]], "o", color=ERROR_COLOUR, label=f"threshold {b['threshold']:.3f}")
        roc_ax.set_xlabel("false positive rate")
        roc_ax.set_ylabel("true positive rate (recall)")
        roc_ax.set_title("ROC")
        pr_ax.step(b["pr"]["recall"], b["pr"]["precision"], where="post", color="#2b8cbe",
                   label=f"PR-AUC (average precision) {b['average_precision']:.3f}")
        pr_ax.axhline(b["positives"] / max(1, b["n"]), color="grey", linestyle="--", linewidth=1, label="chance")
        pr_ax.plot([b["recall"]], [b["precision"]], "o", color=ERROR_COLOUR, label=f"F1 {b['f1']:.3f} at the threshold")
        pr_ax.set_xlabel("recall")
        pr_ax.set_ylabel("precision")
        pr_ax.set_title(f"Precision–recall: {shorten(b['positive'], 40)}")
        for ax in (roc_ax, pr_ax):
            ax.set_xlim(-0.01, 1.01)
            ax.set_ylim(-0.01, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right" if ax is roc_ax else "lower left")
        return _save(fig, path)


def per_class_scores(per_class: dict[str, dict], path: Path, title: str = "Per-class precision, recall, F1") -> Path:
    """Grouped horizontal bars of precision, recall and F1, worst F1 on top."""
    items = sorted(per_class.items(), key=lambda kv: (kv[1]["f1"], kv[0]))
    y = np.arange(len(items))
    with _figure(8.5, 1.3 + 0.55 * len(items)) as fig:
        ax = fig.add_subplot()
        for k, (key, colour) in enumerate((("precision", "#8da0cb"), ("recall", "#fc8d62"), ("f1", "#2b8cbe"))):
            ax.barh(y + (k - 1) * 0.27, [m[key] for _, m in items], height=0.26, color=colour, label=key)
        ax.set_yticks(y, [f"{wrap_label(c, 32, 2)} ({m['support']})" for c, m in items])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("score (support in brackets)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
        ax.set_title(title, pad=22)
        return _save(fig, path)


def histogram(values: Sequence[float], path: Path, title: str, xlabel: str, bins: int = 40) -> Path:
    """Histogram; log-spaced bins on a log axis when the values span more than two decades."""
    values = np.asarray([v for v in values if v > 0], dtype=np.float64)
    with _figure(8, 3.6) as fig:
        ax = fig.add_subplot()
        if len(values) and values.max() / values.min() > 100:
            ax.hist(values, bins=np.geomspace(values.min(), values.max(), bins), color="#4c72b0")
            ax.set_xscale("log")
            xlabel += " (log scale)"
        else:
            ax.hist(values, bins=bins, color="#4c72b0")
        if len(values):
            ax.axvline(float(np.median(values)), color="#c62828", linestyle="--", label=f"median {np.median(values):.0f}")
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
        ax.set_title(title)
        return _save(fig, path)


def size_scatter(widths: Sequence[int], heights: Sequence[int], outlier: Sequence[bool], path: Path,
                 title: str = "Image sizes") -> Path:
    """Width × height scatter, outliers in red; log axes when sizes span more than a decade."""
    w, h, bad = np.asarray(widths), np.asarray(heights), np.asarray(outlier, dtype=bool)
    with _figure(6.5, 5) as fig:
        ax = fig.add_subplot()
        ax.scatter(w[~bad], h[~bad], s=8, alpha=0.4, color="#4c72b0", label=f"{int((~bad).sum()):,} images")
        if bad.any():
            ax.scatter(w[bad], h[bad], s=18, color=ERROR_COLOUR, label=f"{int(bad.sum()):,} outliers")
        if len(w) and max(w.max() / max(w.min(), 1), h.max() / max(h.min(), 1)) > 10:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("width, px")
        ax.set_ylabel("height, px")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title)
        return _save(fig, path)
