"""Read and validate competition CSVs (`guid,description,typology`), group duplicate descriptions, split rows.

Splits are seeded and stratified; `leak_free_split` also keeps each duplicate group (of descriptions,
here, or of images, `museum.image.duplicates`) on one side. Errors name the file, the line and the field, and say what to do; they are raised as
`MuseumError`, which the CLI prints on one line.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from museum.data.files import file_problem, skipped_text
from museum.errors import MuseumError
from museum.log import logger

REQUIRED_COLUMNS = ("guid", "description")
LABEL_COLUMN = "typology"
# A guid becomes part of an image path: allow only plain file-name characters.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# Labels that say "no label" (compared lower-cased, stripped): what spreadsheets and pandas write
# for an empty cell (pandas' default NA strings), and the placeholders people type.
MISSING_LABELS = frozenset({
    "nan", "-nan", "na", "n/a", "n.a.", "#n/a", "#n/a n/a", "#na", "<na>", "nat", "none", "null", "nil", "missing",
    "-", "--", "—", "–", "?", "??", "-1.#ind", "-1.#qnan", "1.#ind", "1.#qnan",
})

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class CompetitionTable:
    """Rows of a competition CSV; `labels` is None for an unlabelled (test) file."""

    path: Path
    guids: list[str]
    descriptions: list[str]
    labels: list[str] | None = None
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.guids)

    def subset(self, idx: np.ndarray | list[int]) -> "CompetitionTable":
        idx = list(map(int, idx))
        return CompetitionTable(
            path=self.path,
            guids=[self.guids[i] for i in idx],
            descriptions=[self.descriptions[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            lines=[self.lines[i] for i in idx] if self.lines else [],
        )

    @property
    def has_text(self) -> np.ndarray:
        """Boolean mask: True where the description is non-empty."""
        return np.array([bool(d.strip()) for d in self.descriptions], dtype=bool)


def looks_missing(label: str) -> bool:
    """True for a label that only says "no label": `nan`, `N/A`, `None`, `null`, `-`, `?`… (any case, spaces ignored)."""
    return label.strip().lower() in MISSING_LABELS


def is_safe_id(guid: str) -> bool:
    """True when `guid` can be used as a file name (no separators, no `..`, no hidden files)."""
    return bool(_SAFE_ID.match(guid)) and ".." not in guid


def guid_image_paths(csv_path: str | Path, guids: list[str], images: str | Path,
                     hint: str = "check --images") -> list[Path | None]:
    """`images/{guid}.jpg` per row where the guid is a safe file name and the file exists, else None.

    Rows without one are counted by reason (unsafe guid, missing, not a regular file (FIFO)…) in a warning.
    One-line errors when `images` is not a folder or holds none of the rows' images (`hint` says what to do)."""
    root = Path(images)
    if not root.is_dir():
        raise MuseumError(f"--images {root}: not a folder; expected {root}/{{guid}}.jpg for the rows of {csv_path}")
    paths: list[Path | None] = []
    skipped: Counter[str] = Counter()
    for g in guids:
        problem = file_problem(root / f"{g}.jpg") if is_safe_id(g) else "unsafe guid"
        paths.append(root / f"{g}.jpg" if problem is None else None)
        if problem is not None:
            skipped[problem] += 1
    if not any(paths):
        raise MuseumError(f"{csv_path}: none of its {len(guids)} rows has an image {root}/{{guid}}.jpg "
                          f"({skipped_text(skipped)}); {hint}")
    if skipped:
        logger.warning(f"{csv_path}: {sum(skipped.values())} row(s) without an image to read: {skipped_text(skipped)}")
    return paths


def _open_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) from a UTF-8 (optionally BOM) CSV, after checking its header."""
    if not path.exists():
        raise MuseumError(f"{path}: file not found")
    if path.is_dir():
        raise MuseumError(f"{path}: is a folder; expected a CSV file with columns guid,description,typology")
    problem = file_problem(path)
    if problem is not None:  # a FIFO would block the read forever, and the file is read twice
        raise MuseumError(f"{path}: {problem}; expected a CSV file with columns guid,description,typology")
    with open(path, "rb") as fb:
        head = fb.read(4096)
    if not head.strip():
        raise MuseumError(f"{path}: empty file; expected a CSV header guid,description[,typology]")
    if b"\x00" in head:
        raise MuseumError(f"{path}: not a CSV file (binary content); expected UTF-8 text with columns guid,description,typology")
    start = 1  # the line of the row being read, for messages
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, strict=True)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                found = ",".join(header)[:120] or "nothing"
                raise MuseumError(
                    f"{path} line 1: missing column(s) {', '.join(missing)} (found: {found}); "
                    "the header must name guid,description[,typology]"
                )
            reader.fieldnames = header
            # A row's first line, not `line_num` (its last): a description may span lines.
            start = reader.line_num + 1
            for row in reader:
                # DictReader's marks: extra fields under the key None, missing ones as None values. A
                # missing trailing label is fine (test files); a missing description is a broken row.
                if None in row or any(row.get(c) is None for c in REQUIRED_COLUMNS):
                    found = len(header) + len(row.get(None) or []) - sum(v is None for k, v in row.items() if k)
                    raise MuseumError(f"{path} line {start}: {found} field(s), the header has {len(header)}; "
                                      "quote any description that holds a comma (\"...\")")
                yield start, row
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise MuseumError(f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        # strict=True: an unclosed quote would otherwise swallow every following row silently.
        raise MuseumError(f"{path} line {start}: not a readable CSV row ({exc}); check the quotes from this line on") from None


def iter_competition_chunks(
    path: str | Path, chunk_size: int = 10_000, require_labels: bool = False
) -> Iterator[CompetitionTable]:
    """Stream a competition CSV in validated chunks (bounded memory for huge test files).

    Duplicate guids are detected across chunks (a set of guids is the only state kept).
    """
    path = Path(path)
    seen: dict[str, int] = {}
    chunk = CompetitionTable(path, [], [], [] if require_labels else None, [])
    any_label_column = None
    rows = _open_rows(path)
    for line, row in rows:
        if any_label_column is None:
            any_label_column = LABEL_COLUMN in row
            if require_labels and not any_label_column:
                raise MuseumError(f"{path} line 1: missing column {LABEL_COLUMN}; this command needs labelled rows")
        guid = (row.get("guid") or "").strip()
        if not guid:
            raise MuseumError(f"{path} line {line}, field guid: empty; every row needs a unique guid")
        if guid in seen:
            raise MuseumError(
                f"{path} line {line}, field guid: duplicated guid {guid!r} (first at line {seen[guid]}); remove one of the rows"
            )
        seen[guid] = line
        description = row.get("description") or ""
        chunk.guids.append(guid)
        chunk.descriptions.append(description.strip())
        chunk.lines.append(line)
        if require_labels:
            label = (row.get(LABEL_COLUMN) or "").strip()
            if not label:
                raise MuseumError(
                    f"{path} line {line}, field {LABEL_COLUMN}: empty label; this command needs every row labelled: fill it in or drop the row"
                )
            if looks_missing(label):
                _refuse_missing_labels(path, line, label, rows)
            chunk.labels.append(label)  # type: ignore[union-attr]
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = CompetitionTable(path, [], [], [] if require_labels else None, [])
    if any_label_column is None:
        raise MuseumError(f"{path}: header only, no rows; add data rows")
    if len(chunk):
        yield chunk


def _refuse_missing_labels(path: Path, line: int, label: str, rest: Iterator[tuple[int, dict[str, str]]]) -> None:
    """Raise for a label that says "no label", counting such labels in the rows not read yet (one error, all counted)."""
    more = 0
    try:
        for _, row in rest:
            more += looks_missing(row.get(LABEL_COLUMN) or "")
    except MuseumError:  # a broken row further on is reported once these labels are fixed
        pass
    raise MuseumError(
        f"{path} line {line}, field {LABEL_COLUMN}: {label!r} is not a label but a missing value "
        f"({1 + more} such row(s), the first here); this command needs every row labelled: fill them in or drop those rows"
    )


def read_competition_csv(path: str | Path, require_labels: bool = False) -> CompetitionTable:
    """Read a whole competition CSV; with `require_labels`, warn about conflicting duplicates."""
    path = Path(path)
    # One chunk as large as any file; the iterator raises on a file without rows.
    table = next(iter_competition_chunks(path, chunk_size=1 << 62, require_labels=require_labels))
    if require_labels:
        n_conflicts, n_rows = conflicting_descriptions(table)
        if n_conflicts:
            logger.warning(
                f"{path}: {n_conflicts} description(s) carry conflicting labels ({n_rows} rows); "
                "they stay in training, but no model can get them all right"
            )
    return table


def normalise_description(text: str) -> str:
    """Case- and space-insensitive key used to find duplicate descriptions."""
    return " ".join(text.lower().split())


def text_groups(texts: Sequence[str], labels: Sequence[str] | None = None) -> list[dict]:
    """Rows whose descriptions are equal after normalisation, as duplicate groups (dicts with `members`);
    `conflicting` when they carry more than one label."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        key = normalise_description(text)
        if key:
            rows_of[key].append(i)
    return [{"kind": "text", "members": rows, "similarity": 1.0,
             "conflicting": labels is not None and len({labels[i] for i in rows}) > 1}
            for rows in rows_of.values() if len(rows) > 1]


def conflicting_descriptions(table: CompetitionTable) -> tuple[int, int]:
    """(number of distinct non-empty descriptions with >1 label, rows they cover)."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    rows_of: Counter[str] = Counter()
    for text, label in zip(table.descriptions, table.labels or []):
        key = normalise_description(text)
        if key:
            labels_of[key].add(label)
            rows_of[key] += 1
    conflicting = [k for k, v in labels_of.items() if len(v) > 1]
    return len(conflicting), sum(rows_of[k] for k in conflicting)


def stratified_split(
    labels: list[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train_idx, val_idx).

    Every class keeps at least one training row; a class with >= 2 rows gets at least
    one validation row, so rare classes are both trained and measured.
    """
    if not 0.0 < val_fraction < 1.0:
        raise MuseumError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in sorted(by_class):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return np.array(sorted(train_idx)), np.array(sorted(val_idx))


def stratified_folds(labels: list[str], n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified k-fold (train_idx, test_idx) pairs, the same for every model compared."""
    from sklearn.model_selection import StratifiedKFold

    y = np.array(labels)
    counts = Counter(labels)
    if min(counts.values()) < n_folds:
        rare = [c for c, n in counts.items() if n < n_folds]
        smallest = min(counts.values())
        hint = f"pass --folds {smallest} or fewer" if smallest >= 2 else "add rows to them or drop them"
        raise MuseumError(f"{n_folds}-fold CV: classes with fewer than {n_folds} rows: {', '.join(rare[:10])}; {hint}")
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(y)), y))


def split_leaks(groups: Iterable, train_idx: Sequence[int], val_idx: Sequence[int]) -> list[list[int]]:
    """Groups (lists of row indices, or dicts with `members`) that have rows in both train and validation."""
    train, val = set(map(int, train_idx)), set(map(int, val_idx))
    leaks = []
    for g in groups:
        members = [int(i) for i in (g["members"] if isinstance(g, dict) else g)]
        if any(i in train for i in members) and any(i in val for i in members):
            leaks.append(members)
    return leaks


def leak_free_split(labels: Sequence[str], groups: Iterable, val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`stratified_split`, then each straddling group moved whole to the side most of it fell on (train on ties).

    The split stays stratified up to the few moved rows, and `split_leaks` of the result is empty."""
    train_idx, val_idx = stratified_split(list(labels), val_fraction, seed)
    side = np.zeros(len(labels), dtype=bool)  # True = validation
    side[val_idx] = True
    for members in split_leaks(groups, train_idx, val_idx):
        side[members] = side[members].sum() * 2 > len(members)
    return np.flatnonzero(~side), np.flatnonzero(side)


def count_rows(path: str | Path) -> int:
    """Data rows of a competition CSV (quoted fields may span lines), read without keeping them."""
    return sum(1 for _ in _open_rows(Path(path)))
