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


def learning_curves(history: Sequence[dict], path: Path, best_epoch: int | None = None) -> Path:
    """Train/validation loss and validation macro-F1 (and accuracy) per epoch, side by side."""
    epochs = [to_float(row.get("epoch")) for row in history]
    with _figure(10, 3.8) as fig:
        loss_ax, score_ax = fig.subplots(1, 2)
        for ax, keys, ylabel in ((loss_ax, ("loss", "val_loss"), "loss"),
                                 (score_ax, ("val_macro_f1", "val_accuracy"), "score")):
            for key in keys:
                values = [to_float(row.get(key)) for row in history]
                if not all(math.isnan(v) for v in values):
                    ax.plot(epochs, values, marker="o", markersize=4, label=key.replace("_", " "))
            if best_epoch:
                ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            if len(set(epochs)) <= 20:
                ax.set_xticks(sorted(set(e for e in epochs if not math.isnan(e))))
            else:
                ax.xaxis.get_major_locator().set_params(integer=True)
        score_ax.set_ylim(0, 1.02)
        loss_ax.set_title("Loss")
        score_ax.set_title("Validation macro-F1")
        return _save(fig, path)


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "Confusion matrix") -> Path:
    """Row-normalised heatmap (each true class sums to 1) with class names on both axes."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(classes)
    side = max(4.5, 0.62 * n + 2.5)
    with _figure(side + 2.0, side) as fig:
        ax = fig.add_subplot()
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        labels = [wrap_label(c, 24, 3) for c in classes]
        ax.set_xticks(range(n), labels, rotation=60 if n > 5 else 0, ha="right" if n > 5 else "center",
                      rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if n <= 25:  # beyond that the numbers would overlap
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        ax.text(j, i, f"{share[i, j]:.2f}".lstrip("0") if share[i, j] < 1 else "1", ha="center",
                                va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
        ax.spines[:].set_visible(False)
        fig.colorbar(image, ax=ax, shrink=0.6, label="share of the true class")
        ax.set_title(f"{title} (row-normalised, {int(matrix.sum()):,} rows)")
        return _save(fig, path)


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


def image_grid(examples: Sequence[dict], path: Path, title: str, columns: int = 8, thumb: int = 88) -> Path:
    """Thumbnails with true class, predicted class and confidence; errors framed and captioned in red.

    Each example is a dict with `path`, `true`, `pred` and `confidence`. The thumbnails are
    pasted into one mosaic drawn on a single axes (dozens of axes would take seconds to lay
    out), and the PNG is saved with a 256-colour palette to keep photos small. Unreadable or
    missing files become a grey tile that says why, so a moved data folder still yields a report.
    """
    cell_w, caption = thumb + 28, 32
    cell_h = thumb + caption + 10
    columns = max(1, min(columns, len(examples)))
    rows = max(1, math.ceil(len(examples) / columns))
    mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    notes = []
    for k, ex in enumerate(examples):
        r, c = divmod(k, columns)
        tile, reason = _thumbnail(ex["path"], thumb)
        wrong = ex["true"] != ex["pred"]
        h, w = tile.shape[:2]
        x, y = c * cell_w + (cell_w - w) // 2, r * cell_h + caption + (thumb - h) // 2
        b = 3 if wrong else 1
        mosaic[y - b:y + h + b, x - b:x + w + b] = _rgb(ERROR_COLOUR if wrong else OK_COLOUR)
        mosaic[y:y + h, x:x + w] = tile
        label = f"T: {shorten(ex['true'], 17)}\n{'✗ ' if wrong else ''}P: {shorten(ex['pred'], 12)} {ex['confidence']:.2f}"
        notes.append((c * cell_w + cell_w / 2, r * cell_h + caption - 3, label, wrong, reason, x + w / 2, y + h / 2))
    height, width = mosaic.shape[:2]
    with _figure(width / 100, (height + 36) / 100, layout=None) as fig:
        ax = fig.add_axes((0, 0, 1, height / (height + 36)))
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_axis_off()
        for cx, cy, label, wrong, reason, tx, ty in notes:
            ax.text(cx, cy, label, ha="center", va="bottom", fontsize=7, linespacing=1.1,
                    color=ERROR_COLOUR if wrong else OK_COLOUR)
            if reason:
                ax.text(tx, ty, reason, ha="center", va="center", fontsize=7)
        fig.text(0.5, 1 - 8 / (height + 36), title, ha="center", va="top", fontsize=11, fontweight="bold")
        return _save(fig, path, palette=True, tight=False)


def _thumbnail(path, size: int) -> tuple[np.ndarray, str]:
    """(uint8 RGB array fitting in size × size, "") or a grey tile and the reason it could not be read."""
    from PIL import Image

    from museum.data.images import ImageDecodeError, safe_open_image

    try:
        img = safe_open_image(path, draft=size)
    except ImageDecodeError as exc:
        return np.full((size, size, 3), 215, dtype=np.uint8), exc.reason
    scale = size / max(img.size)
    if scale < 1:
        img.thumbnail((size, size))
    elif scale >= 2:  # blow tiny thumbnails (28 px) up by whole pixels, so they stay sharp and visible
        img = img.resize((img.width * int(scale), img.height * int(scale)), Image.NEAREST)
    return np.asarray(img, dtype=np.uint8), ""


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
