"""`museum dedup`: find exact, near and text duplicates in a folder or a competition CSV and report them.

A workflow over the duplicate finders: `museum.image.duplicates.image_groups` (same bytes, or
near-identical embeddings confirmed by a crop hash) and `museum.data.competition.text_groups`
(descriptions equal after `normalise_description`; groups whose rows carry more than one label
are flagged as conflicting). It writes groups.csv, dedup.html, dedup.json and, with
`--keep one`, the deduplicated CSV or file list. Splits that keep each group on one side are
`museum.data.competition.leak_free_split`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from museum.data.competition import guid_image_paths, read_competition_csv, text_groups
from museum.data.files import file_problem, skipped_text
from museum.errors import MuseumError
from museum.image.duplicates import DEFAULT_THRESHOLD, finish_groups, image_groups, keep_one
from museum.log import logger
from museum.utils import output_folder, write_csv, write_csv_copy, write_json

KEEP = ("all", "one")
TOP_GROUPS = 200  # groups shown on the page; the CSV lists all


@dataclass
class DedupItems:
    source: Path
    names: list[str]  # guid, or path relative to the folder
    paths: list[Path | None] | None = None
    labels: list[str] | None = None
    texts: list[str] | None = None
    lines: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- input


def load_dedup_items(path: str | Path, images: str | Path | None = None) -> DedupItems:
    """A folder (per-class sub-folders, or images directly inside) or a competition CSV with optional `images/{guid}.jpg`."""
    from museum.data.images import IMAGE_SUFFIXES, list_image_folder  # torch: only for folders

    path = Path(path)
    if not path.exists():
        raise MuseumError(f"{path}: not found; give a folder of images or a competition CSV")
    if path.is_dir():
        # Class sub-folders; a folder named like an image (x.jpg) is a bad image in a flat folder, not a class.
        if any(p.is_dir() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES
               for p in path.iterdir()):
            found = list_image_folder(path)
            paths, labels = list(found.paths), list(found.labels)
        else:
            named = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            # Only regular files: a FIFO named x.jpg would block the hashing forever.
            problems = {p: file_problem(p) for p in named}
            skipped = Counter(problem for problem in problems.values() if problem is not None)
            paths, labels = [p for p, problem in problems.items() if problem is None], None
            if skipped:
                logger.warning(f"{path}: skipped {sum(skipped.values())} image name(s) that are not files to read: "
                               f"{skipped_text(skipped)}")
            if not paths:
                found = f" ({skipped_text(skipped)} skipped)" if skipped else ""
                raise MuseumError(f"{path}: no images found{found} (suffixes {', '.join(IMAGE_SUFFIXES)})")
        return DedupItems(path, [p.relative_to(path).as_posix() for p in paths], paths, labels)
    from museum.reports.eda import read_labels

    table = read_competition_csv(path)
    # Labels are optional here (a test file has none): only conflicts need them.
    items = DedupItems(path, table.guids, None, read_labels(path, len(table), table.lines), table.descriptions, table.lines)
    if images is not None:
        items.paths = guid_image_paths(path, table.guids, images, "check --images, or drop it to compare descriptions only")
    return items


# ----------------------------------------------------------------------------- keep one


def _keep_groups(groups: list[dict], with_images: bool) -> list[dict]:
    # With images, identical descriptions ("Открытка") usually name different objects: only image groups decide.
    return [g for g in groups if g["kind"] != "text"] if with_images else groups


def write_kept(items: DedupItems, keep: np.ndarray, out_dir: Path) -> Path:
    """The deduplicated CSV (original columns, kept rows) or, for a folder, a path,label file list."""
    if items.texts is not None:
        keep_set = set(keep.tolist())
        return write_csv_copy(items.source, out_dir / f"{items.source.stem}.dedup.csv",
                              f"--out {out_dir}: the deduplicated copy would overwrite the input {items.source}",
                              lambda header, rows: (r for i, r in enumerate(rows) if i in keep_set))
    return write_csv(out_dir / "kept.csv", ["path", "label"],
                     ([str(items.paths[i]), items.labels[i] if items.labels else ""] for i in keep))


# ----------------------------------------------------------------------------- the command


@dataclass
class DedupResult:
    out_dir: Path
    groups: list[dict]
    page: Path
    kept: Path | None
    text: str


def run_dedup(path: str | Path, images: str | Path | None = None, out: str | Path | None = None,
              threshold: float = DEFAULT_THRESHOLD, keep: str = "all", device: str = "auto",
              embeddings: str | Path | None = None) -> DedupResult:
    """Find groups, write groups.csv, dedup.html and (with keep="one") the deduplicated list or CSV."""
    from museum.reports.cleaning import dedup_page

    if not 0.0 < threshold <= 1.0:
        raise MuseumError(f"--threshold {threshold}: must be in (0, 1]; cosine similarity of embeddings")
    if keep not in KEEP:
        raise MuseumError(f"--keep {keep}: expected one of {', '.join(KEEP)}")
    items = load_dedup_items(path, images)
    out_dir = output_folder(out, "dedup", items.source)
    start = time.perf_counter()
    groups: list[dict] = []
    if items.paths is not None:
        groups += image_groups(items.paths, threshold, out_dir / "embeddings.npz", device,
                               Path(embeddings) if embeddings else None)
    if items.texts is not None:
        groups += text_groups(items.texts, items.labels)
    groups = finish_groups(groups, items.labels)
    seconds = time.perf_counter() - start
    _write_groups(out_dir / "groups.csv", items, groups)
    page = dedup_page(out_dir / "dedup.html", items.source, groups, items.names, items.paths, items.labels, items.texts,
                      TOP_GROUPS)
    kept = None
    if keep == "one":
        kept = write_kept(items, keep_one(len(items.names), _keep_groups(groups, items.paths is not None), items.labels),
                          out_dir)
    counts = Counter(g["kind"] for g in groups)
    summary = {"source": str(items.source), "items": len(items.names), "threshold": threshold, "groups": dict(counts),
               "duplicate_rows": sum(len(g["members"]) - 1 for g in _keep_groups(groups, items.paths is not None)),
               "conflicting_groups": sum(g["conflicting"] for g in groups), "seconds": round(seconds, 2),
               "kept": str(kept) if kept else None}
    write_json(out_dir / "dedup.json", summary)
    lines = [f"{items.source}: {len(items.names):,} items in {seconds:.1f}s",
             "groups: " + (", ".join(f"{counts[k]:,} {k}" for k in ("exact", "near", "text") if counts[k]) or "none")
             + f"; {summary['conflicting_groups']:,} with conflicting labels",
             f"groups: {out_dir / 'groups.csv'}"]
    if kept is not None:
        lines.append(f"kept one per group ({summary['duplicate_rows']:,} rows left out): {kept}")
    lines.append(f"page: {page}")
    logger.debug(f"dedup summary: {summary}")
    return DedupResult(out_dir, groups, page, kept, "\n".join(lines))


def _write_groups(path: Path, items: DedupItems, groups: list[dict]) -> None:
    write_csv(path, ["group", "kind", "similarity", "conflicting", "row", "id", "label", "image", "description"],
              ([g["group"], g["kind"], f"{g['similarity']:.4f}", int(g["conflicting"]),
                items.lines[i] if items.lines else i, items.names[i],
                items.labels[i] if items.labels else "",
                str(items.paths[i]) if items.paths is not None and items.paths[i] is not None else "",
                items.texts[i] if items.texts is not None and g["kind"] == "text" else ""]
               for g in groups for i in g["members"]))
