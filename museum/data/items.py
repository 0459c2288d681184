"""The rows every expert scores: what each item offers (a description, an image) and why an image is absent.

`Items` is the one input of the expert contract (`wants(items)`, `score_rows(items) -> (proba, usable)`): a CSV chunk
with `{guid}.jpg` paths, a DataFrame, or one uploaded item whose photo is already decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from museum.data.competition import CompetitionTable, is_safe_id
from museum.data.files import MISSING, file_problem

# Why a row has no image; "ok" is the only status the image expert scores.
IMAGE_STATUSES = ("ok", "missing", "zero-byte", "not a file", "broken", "unsafe guid", "no image folder", "no image model")


@dataclass
class Items:
    """Items to score. `images` holds a path or a decoded PIL image per row, or None (with its reason in
    `image_status`, "ok" where an image is given: the decoder may still find it broken)."""

    guids: list[str]
    descriptions: list[str]  # stripped; "" means no text
    images: list[Any]
    image_status: list[str]

    def __len__(self) -> int:
        return len(self.guids)

    @property
    def has_text(self) -> np.ndarray:
        return np.array([bool(d) for d in self.descriptions], dtype=bool)

    @classmethod
    def from_table(cls, table: CompetitionTable, images_dir: Path | None) -> "Items":
        paths, status = image_paths(table.guids, images_dir)
        return cls(list(table.guids), list(table.descriptions), paths, status)

    @classmethod
    def one(cls, description: str, image: Any | None) -> "Items":
        """One uploaded item (its photo decoded already, or None)."""
        return cls(["item"], [(description or "").strip()], [image], ["ok" if image is not None else "missing"])


def image_paths(guids: Sequence[str], images_dir: Path | None) -> tuple[list[Path | None], list[str]]:
    """`images_dir/{guid}.jpg` per row, or None with the reason it cannot be an image.

    Unsafe guids (path separators, `..`) never become paths; zero-byte files and anything that is
    not a regular file (a FIFO, a folder named like the image) are not handed to the decoder at all.
    Broken files are found later, by the decoder.
    """
    if images_dir is None:
        return [None] * len(guids), ["no image folder"] * len(guids)
    paths: list[Path | None] = []
    status: list[str] = []
    for guid in guids:
        if not is_safe_id(guid):
            paths.append(None)
            status.append("unsafe guid")
            continue
        path = images_dir / f"{guid}.jpg"
        problem = file_problem(path)
        if problem is not None:
            paths.append(None)
            status.append("missing" if problem == MISSING else "not a file")
            continue
        if path.stat().st_size == 0:
            paths.append(None)
            status.append("zero-byte")
        else:
            paths.append(path)
            status.append("ok")  # provisional: the decoder may still call it broken
    return paths, status
