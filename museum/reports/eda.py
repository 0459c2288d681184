"""`museum eda`: what a dataset looks like before anything is trained on it.

Takes a competition CSV (`guid,description[,typology]`, with an optional folder of
`{guid}.jpg`) or a folder-per-class image set. Reports class counts and imbalance,
description lengths, duplicate descriptions and those with conflicting labels, image
sizes with outliers, and unreadable files; writes `eda.html` (figures embedded),
`eda.json` and a terminal summary. With `stats`, the same single pass over the images
also sums per-channel moments for `channel_stats.json` (see `STATS_FORMAT`).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from museum.data.competition import LABEL_COLUMN, is_safe_id, looks_missing, read_competition_csv, text_groups
from museum.errors import MuseumError
from museum.log import logger, progress_bar
from museum.reports import html, plots
from museum.utils import output_folder, write_json

STATS_FORMAT = "museum-channel-stats/1"
# Each image is squashed to this square before its pixels are counted, as the trainer does,
# so that every image weighs the same whatever its resolution.
STATS_SIZE = 64
MAX_LISTED = 30  # rows of outliers, unreadable files and duplicates shown in the page


@dataclass
class ImageScan:
    """One pass over image files: sizes, failures and (optionally) channel moments."""

    paths: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: Counter = field(default_factory=Counter)  # left out by the folder listing (FIFOs…), by reason
    missing: int = 0
    sums: np.ndarray = field(default_factory=lambda: np.zeros(3))
    squares: np.ndarray = field(default_factory=lambda: np.zeros(3))
    pixels: int = 0


@dataclass
class EdaResult:
    """Where the page and files went, the summary as plain types, and the terminal text."""

    out_dir: Path
    page: Path
    stats_path: Path | None
    summary: dict
    text: str


def run_eda(path: str | Path, images: str | Path | None = None, stats: bool = False,
            out: str | Path | None = None) -> EdaResult:
    """Analyse a competition CSV (+ image folder) or a folder-per-class image set; write the page."""
    path = Path(path)
    if not path.exists():
        raise MuseumError(f"{path}: not found; give a competition CSV or a folder of class sub-folders")
    texts, image_paths, image_source, unsafe, skipped = None, None, path, {}, Counter()
    if path.is_dir():
        if images is not None:
            raise MuseumError(f"--images {images}: only for a CSV; {path} is already an image folder")
        from museum.data.images import list_image_folder

        items = list_image_folder(path, option="")
        labels, image_paths, skipped = items.labels, [str(p) for p in items.paths], items.skipped
    else:
        table = read_competition_csv(path)
        texts, labels = table.descriptions, read_labels(path, len(table), table.lines)
        folder = Path(images) if images is not None else path.parent / "images"
        if images is not None and not folder.is_dir():
            raise MuseumError(f"--images {folder}: not a folder; give the folder holding {{guid}}.jpg files")
        if folder.is_dir():
            image_source = folder
            image_paths = [str(folder / f"{g}.jpg") if is_safe_id(g) else "" for g in table.guids]
            unsafe = {i: f"line {line}: guid {g[:40]!r}" for i, (line, g) in enumerate(zip(table.lines, table.guids))
                      if not is_safe_id(g)}
    if stats and not image_paths:
        raise MuseumError(f"--stats: {path} has no images; give --images DIR or a folder of class sub-folders")

    out_dir = output_folder(out, "eda", path)
    summary: dict = {"source": str(path), "rows": len(labels) if labels is not None else len(texts or [])}
    sections = []
    if labels is not None:
        sections.append(_class_section(out_dir, labels, summary))
    if texts is not None:
        sections.append(_text_section(out_dir, texts, labels, summary))
    stats_path = None
    if image_paths:
        scan = scan_images(image_paths, stats, unsafe)
        scan.skipped.update(skipped)
        if not scan.paths and not stats:  # the page says why (--stats refuses below, in one line)
            logger.warning(f"{image_source}: none of its {len(image_paths) + sum(skipped.values())} image(s) is readable")
        sections.append(_image_section(out_dir, scan, summary))
        if stats:
            stats_path = write_channel_stats(out_dir / "channel_stats.json", scan, str(image_source))
            summary["channel_stats"] = str(stats_path)
    write_json(out_dir / "eda.json", summary)
    page = html.write_page(out_dir / "eda.html", html.page(f"Dataset analysis: {path.name}", str(path.resolve()), sections))
    return EdaResult(out_dir, page, stats_path, summary, format_summary(summary, page))


# ----------------------------------------------------------------------------- labels and text


def read_labels(path: Path, n_rows: int, lines: list[int] | None = None) -> list[str] | None:
    """The typology column (blank for unlabelled rows), or None when the file has no such column.

    `read_competition_csv` has validated the file already; this pass only picks the column. Labels
    that say "no label" (`nan`, `N/A`, `-`…) are blanked, with a warning counting them: labels are
    optional here, and a class named "nan" would only mislead.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
        if LABEL_COLUMN not in reader.fieldnames:
            return None
        labels = [(row.get(LABEL_COLUMN) or "").strip() for row in reader]
    if len(labels) != n_rows:
        raise MuseumError(f"{path}: rows changed while being read; run eda again")
    placeholders = Counter(label for label in labels if label and looks_missing(label))
    if placeholders:
        first = next(i for i, label in enumerate(labels) if label and looks_missing(label))
        logger.warning(f"{path}: {sum(placeholders.values())} row(s) have a missing-value placeholder as {LABEL_COLUMN} ("
                       + ", ".join(f"{n} {v!r}" for v, n in placeholders.most_common())
                       + f"; the first at {f'line {lines[first]}' if lines else f'data row {first + 1}'}); "
                       "they count as unlabelled")
        labels = ["" if looks_missing(label) else label for label in labels]
    if not any(labels):
        return None  # an unlabelled test file with an empty typology column
    return labels


def _class_section(out_dir: Path, labels: list[str], summary: dict) -> str:
    counts = Counter(label for label in labels if label)
    ratio = plots.imbalance_ratio(counts)
    summary.update(classes=dict(counts.most_common()), imbalance_ratio=round(ratio, 2),
                   unlabelled_rows=sum(1 for label in labels if not label))
    figure = plots.class_distribution(dict(counts), out_dir / "class_distribution.png")
    notes = [html.note(f"{summary['unlabelled_rows']} rows have no label.")] if summary["unlabelled_rows"] else []
    return html.section("Classes", html.cards({"rows": len(labels), "classes": len(counts), "imbalance (max/min)": ratio}),
                        *notes, html.png(figure, "class distribution"))


def duplicate_groups(texts: list[str], labels: list[str] | None) -> list[dict]:
    """Descriptions appearing more than once (case and spacing ignored, as `text_groups` finds them), with
    their label counts; a blank label is no label, so it makes no conflict."""
    groups = []
    for rows in (g["members"] for g in text_groups(texts)):
        label_counts = Counter(labels[i] for i in rows if labels[i]) if labels else Counter()
        groups.append({"description": texts[rows[0]], "rows": len(rows), "labels": dict(label_counts.most_common()),
                       "conflicting": len(label_counts) > 1})
    return sorted(groups, key=lambda g: (not g["conflicting"], -g["rows"], g["description"]))


def _text_section(out_dir: Path, texts: list[str], labels: list[str] | None, summary: dict) -> str:
    lengths = [len(t) for t in texts]
    nonempty = [n for n in lengths if n]
    groups = duplicate_groups(texts, labels)
    conflicting = [g for g in groups if g["conflicting"]]
    summary["descriptions"] = {
        "empty": len(lengths) - len(nonempty),
        "median_chars": float(np.median(nonempty)) if nonempty else 0.0,
        "max_chars": max(nonempty, default=0),
        "duplicate_groups": len(groups), "duplicate_rows": sum(g["rows"] for g in groups),
        "conflicting_groups": len(conflicting), "conflicting_rows": sum(g["rows"] for g in conflicting),
        "conflicting": conflicting[:MAX_LISTED],
    }
    d = summary["descriptions"]
    figure = plots.histogram(nonempty, out_dir / "text_lengths.png",
                             f"Description length ({len(nonempty):,} non-empty, {d['empty']:,} empty)", "characters")
    parts = [html.cards({"empty descriptions": d["empty"], "median length": d["median_chars"],
                         "duplicated texts": d["duplicate_groups"], "with conflicting labels": d["conflicting_groups"]}),
             html.png(figure, "description lengths")]
    if groups:
        shown = groups[:MAX_LISTED]
        parts.append(html.heading("Duplicate descriptions (conflicting labels first)"))
        parts.append(html.table(("description", "rows", "labels"),
                                [(g["description"], g["rows"], ", ".join(f"{k} ×{v}" for k, v in g["labels"].items()))
                                 for g in shown], bad_rows=[g["conflicting"] for g in shown]))
    return html.section("Descriptions", *parts)


# ----------------------------------------------------------------------------- images


def scan_images(paths: list[str], stats: bool = False, unsafe: dict[int, str] | None = None) -> ImageScan:
    """Read every image once: its size from the header, a full decode to prove it is usable,
    and with `stats` the per-channel sums of its STATS_SIZE² squashed pixels (memory stays bounded)."""
    from PIL import Image

    from museum.data.images import ImageDecodeError, decode_bytes, read_bytes

    scan = ImageScan()
    for i, path in enumerate(progress_bar(paths, unit="img", desc="eda images")):
        if not path:  # an id that cannot be a file name: never turned into a path
            scan.failures.append(((unsafe or {}).get(i, "(unsafe guid)"), "unsafe file name"))
            continue
        try:
            data = read_bytes(path)
            img = decode_bytes(data, path, draft=STATS_SIZE)
        except ImageDecodeError as exc:
            if exc.reason == "missing":
                scan.missing += 1
            else:
                scan.failures.append((path, exc.reason))
            continue
        with Image.open(io.BytesIO(data)) as header:  # the stored size; `draft` shrank `img`
            width, height = header.size
        scan.paths.append(path)
        scan.widths.append(width)
        scan.heights.append(height)
        if stats:
            x = np.asarray(img.resize((STATS_SIZE, STATS_SIZE), Image.BILINEAR), dtype=np.float64) / 255.0
            scan.sums += x.sum(axis=(0, 1))
            scan.squares += np.square(x).sum(axis=(0, 1))
            scan.pixels += STATS_SIZE * STATS_SIZE
    return scan


def size_outliers(widths: list[int], heights: list[int], factor: float = 4.0) -> np.ndarray:
    """Mask of images whose sides are `factor` times smaller or larger than the median's,
    that are very elongated (aspect above `factor`), or tiny (a side under 16 px).

    A fold change rather than a z-score: a whole class of smaller photos (coins scanned at
    120 px among 384 px paintings) is a property of the data, not a list of outliers.
    """
    w, h = np.asarray(widths, dtype=np.float64), np.asarray(heights, dtype=np.float64)
    if not len(w):
        return np.zeros(0, dtype=bool)
    short, long = np.minimum(w, h), np.maximum(w, h)
    return ((short < np.median(short) / factor) | (long > np.median(long) * factor)
            | (long / short > factor) | (short < 16))


def _image_section(out_dir: Path, scan: ImageScan, summary: dict) -> str:
    outlier = size_outliers(scan.widths, scan.heights)
    reasons = Counter(reason for _, reason in scan.failures) + scan.skipped
    summary["images"] = {
        "readable": len(scan.paths), "missing": scan.missing, "unreadable": dict(reasons),
        "median_width": float(np.median(scan.widths)) if scan.widths else 0.0,
        "median_height": float(np.median(scan.heights)) if scan.heights else 0.0,
        "outlier_count": int(outlier.sum()),
        "outliers": [{"path": p, "width": w, "height": h} for p, w, h, o in
                     zip(scan.paths, scan.widths, scan.heights, outlier) if o][:MAX_LISTED],
        "unreadable_files": [{"path": p, "reason": r} for p, r in scan.failures][:MAX_LISTED],
    }
    s = summary["images"]
    parts = [html.cards({"readable": s["readable"], "missing": s["missing"], "unreadable": sum(reasons.values()),
                         "size outliers": int(outlier.sum())})]
    if scan.widths:
        figure = plots.size_scatter(scan.widths, scan.heights, outlier, out_dir / "image_sizes.png")
        parts.append(html.png(figure, "image sizes"))
    if s["outliers"]:
        parts += [html.heading("Size outliers"), html.table(("file", "width", "height"),
                                                            [(o["path"], o["width"], o["height"]) for o in s["outliers"]])]
    if scan.failures:
        parts += [html.heading("Unreadable files"), html.table(("file", "reason"), scan.failures[:MAX_LISTED],
                                                               bad_rows=[True] * len(scan.failures))]
    return html.section("Images", *parts)


def write_channel_stats(path: Path, scan: ImageScan, source: str) -> Path:
    """Save the per-channel mean and std (RGB, 0..1 scale like ImageNet's) as JSON."""
    if not scan.pixels:
        raise MuseumError(f"--stats: no readable image in {source}; nothing to measure")
    mean = scan.sums / scan.pixels
    std = np.sqrt(np.maximum(scan.squares / scan.pixels - np.square(mean), 0.0))
    write_json(path, {"format": STATS_FORMAT, "mean": [round(float(v), 6) for v in mean],
                      "std": [round(float(v), 6) for v in std], "scale": "RGB 0..1", "images": len(scan.paths),
                      "resized_to": STATS_SIZE, "source": source})
    logger.info(f"channel mean {np.round(mean, 4).tolist()}, std {np.round(std, 4).tolist()} → {path}")
    return path


# ----------------------------------------------------------------------------- terminal


def format_summary(summary: dict, page: Path) -> str:
    """A few lines for the terminal."""
    lines = [f"{summary['source']}: {summary['rows']:,} rows"]
    classes = summary.get("classes")
    if classes:
        names = list(classes)
        lines.append(f"classes: {len(classes)}, imbalance {summary['imbalance_ratio']}× "
                     f"(largest {names[0]} {classes[names[0]]:,}, smallest {names[-1]} {classes[names[-1]]:,})"
                     + (f", {summary['unlabelled_rows']:,} unlabelled rows" if summary.get("unlabelled_rows") else ""))
    d = summary.get("descriptions")
    if d:
        lines.append(f"descriptions: {d['empty']:,} empty, median {d['median_chars']:.0f} characters, "
                     f"{d['duplicate_groups']:,} duplicated ({d['duplicate_rows']:,} rows), "
                     f"{d['conflicting_groups']:,} with conflicting labels ({d['conflicting_rows']:,} rows)")
    s = summary.get("images")
    if s:
        bad = ", ".join(f"{n} {r}" for r, n in sorted(s["unreadable"].items())) or "none"
        median = f" (median {s['median_width']:.0f}×{s['median_height']:.0f} px)" if s["readable"] else ""
        lines.append(f"images: {s['readable']:,} readable{median}, "
                     f"{s['missing']:,} missing, unreadable: {bad}, {s['outlier_count']:,} size outlier(s)")
        for f in s["unreadable_files"][:10]:
            lines.append(f"  unreadable: {f['path']} ({f['reason']})")
    if summary.get("channel_stats"):
        lines.append(f"channel stats: {summary['channel_stats']}")
    lines.append(f"report: {page}")
    return "\n".join(lines)
