"""Load the text and image experts and score rows of a competition CSV with them.

This is the glue shared by `submit`, `tune` and `evaluate`: which rows have a usable
description or image, and both experts' probabilities aligned on one class list.
"""

from __future__ import annotations

import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from museum.data.competition import CompetitionTable
from museum.data.items import Items
from museum.errors import MuseumError
from museum.fusion import align, union_classes
from museum.log import logger



@dataclass
class Experts:
    """The loaded experts (either may be None) and the union of their class names."""

    text: Any | None
    image: Any | None
    text_dir: Path | None
    image_dir: Path | None
    classes: list[str]

    def roles(self) -> dict[str, Any]:
        """The loaded experts by the role they play in the fusion ("text", "image")."""
        return {role: model for role, model in (("text", self.text), ("image", self.image)) if model is not None}

    @property
    def names(self) -> str:
        return " + ".join(n for n, m in (("text", self.text), ("image", self.image)) if m is not None)


def _not_a_model(kind: str, folder: Path, why: str) -> MuseumError:
    return MuseumError(
        f"--{kind}-model {folder}: {why}; train one with `museum train-{kind}` "
        f"(default folder models/{kind}) or pass --{kind}-model none"
    )


def load_experts(text_dir: Path | None, image_dir: Path | None, device: str = "auto") -> Experts:
    """Load the experts from their folders; None skips one. A folder that is not a model is a one-line error."""
    if text_dir is None and image_dir is None:
        raise MuseumError("--text-model none and --image-model none: give at least one model")
    text = image = None
    if text_dir is not None:
        text_dir = _check_folder("text", text_dir)
        from museum.text.model import TextModel

        text = _load("text", text_dir, lambda: TextModel.load(text_dir))
    if image_dir is not None:
        image_dir = _check_folder("image", image_dir)
        from museum.image.model import ImageModel

        image = _load("image", image_dir, lambda: ImageModel.load(image_dir, device=device))
    if text is not None and image is not None:
        check_shared_classes(list(text.classes_), list(image.classes_), text_dir, image_dir)
    classes = union_classes(
        None if text is None else list(text.classes_), None if image is None else list(image.classes_)
    )
    return Experts(text, image, text_dir, image_dir, classes)


def _listed(classes: list[str], most: int = 6) -> str:
    shown = ", ".join(classes[:most])
    return shown + (f", … ({len(classes)} in all)" if len(classes) > most else "")


def check_shared_classes(text_classes: list[str], image_classes: list[str], text_dir, image_dir) -> None:
    """Experts of different tasks must not be fused: no shared class is an error, a partial overlap a warning."""
    shared = set(text_classes) & set(image_classes)
    if not shared:
        raise MuseumError(
            f"--text-model {text_dir} and --image-model {image_dir} share no class (text: {_listed(text_classes)}; "
            f"image: {_listed(image_classes)}); they were trained for different tasks: pass models of the same task"
        )
    for kind, own, other in (("text", text_classes, image_classes), ("image", image_classes, text_classes)):
        alone = sorted(set(own) - set(other))
        if alone:
            logger.warning(f"only the {kind} model knows {len(alone)} class(es): {_listed(alone)}; "
                           f"rows decided by the other model never get them")


def _check_folder(kind: str, folder: Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise _not_a_model(kind, folder, "not found")
    if not folder.is_dir():
        raise _not_a_model(kind, folder, "is a file, not a model folder")
    if not any(folder.iterdir()):
        raise _not_a_model(kind, folder, "empty folder")
    return folder


def _load(kind: str, folder: Path, loader) -> Any:
    try:
        return loader()
    except MuseumError as exc:
        # The expert's own message can quote a multi-line library error: keep one line, add our way out.
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        if len(first_line) > 200:
            first_line = first_line[:200] + "..."
        raise MuseumError(f"{first_line} (or pass --{kind}-model none)") from None
    except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, RuntimeError) as exc:
        # Whatever the expert's own loader trips over, the user's fix is the same: point at a real model.
        first_line = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise _not_a_model(kind, folder, f"not a {kind} model folder ({first_line})") from None


@dataclass
class ChunkScores:
    """Both experts' aligned probabilities for one chunk, with what each row had to offer."""

    guids: list[str]
    text_p: np.ndarray  # (n, C) aligned on Experts.classes; NaN rows where no text was scored
    image_p: np.ndarray  # (n, C); NaN rows where no image was scored
    has_text: np.ndarray  # the text expert scored the row (non-empty description, model given)
    has_image: np.ndarray  # the image expert scored the row (its image decoded)
    text_present: np.ndarray  # non-empty description, whether or not a text model is used
    image_status: list[str]  # one of museum.data.items.IMAGE_STATUSES per row


def score_items(experts: Experts, items: Items, batch_size: int | None = None, workers: int = 2) -> ChunkScores:
    """Every loaded expert scores the items through the one expert contract (`wants(items)`: the rows it could score,
    from the inputs alone; `score_rows(items) -> (proba, usable)`);
    each expert's probabilities are aligned by class name on the union, NaN where it could not score a row."""
    n, k = len(items), len(experts.classes)
    scored = {}
    for role, expert in experts.roles().items():
        aligned, usable = np.full((n, k), np.nan), np.zeros(n, dtype=bool)
        # `wants` reads the inputs only: an expert with nothing to score is not called (nor its lock taken)
        if expert.wants(items).any():
            proba, usable = expert.score_rows(items, batch_size=batch_size, workers=workers)
            usable = np.asarray(usable, dtype=bool)
            aligned[usable] = align(np.asarray(proba)[usable], list(expert.classes_), experts.classes)
        scored[role] = aligned, usable
    empty = (np.full((n, k), np.nan), np.zeros(n, dtype=bool))
    text_p, has_text = scored.get("text", empty)
    image_p, has_image = scored.get("image", empty)
    if "image" in scored:  # an image handed over that the expert could not decode was broken
        status = ["broken" if s == "ok" and not ok else s for s, ok in zip(items.image_status, has_image)]
    else:
        status = ["no image model"] * n
    return ChunkScores(list(items.guids), text_p, image_p, has_text, has_image, items.has_text, status)


def score_chunk(
    experts: Experts, chunk: CompetitionTable, images_dir: Path | None, batch_size: int | None = None, workers: int = 2
) -> ChunkScores:
    """Score one chunk of a competition CSV, with images at `images_dir/{guid}.jpg`."""
    return score_items(experts, Items.from_table(chunk, images_dir), batch_size, workers)


def concat_scores(parts: list[ChunkScores]) -> ChunkScores:
    """Join chunk scores (for labelled files, which are small enough to hold whole)."""
    return ChunkScores(
        guids=[g for p in parts for g in p.guids],
        text_p=np.concatenate([p.text_p for p in parts]),
        image_p=np.concatenate([p.image_p for p in parts]),
        has_text=np.concatenate([p.has_text for p in parts]),
        has_image=np.concatenate([p.has_image for p in parts]),
        text_present=np.concatenate([p.text_present for p in parts]),
        image_status=[s for p in parts for s in p.image_status],
    )


def availability_counts(scores: ChunkScores) -> Counter:
    """Counts of 'text present/empty' and 'image <status>' for the summary table."""
    counts: Counter = Counter()
    counts["text present"] += int(scores.text_present.sum())
    counts["text empty"] += int((~scores.text_present).sum())
    for status in scores.image_status:
        counts[f"image {status}"] += 1
    return counts


def log_experts(experts: Experts) -> None:
    for kind, folder, model in (("text", experts.text_dir, experts.text), ("image", experts.image_dir, experts.image)):
        if model is not None:
            logger.info(f"{kind} model: {folder} ({len(model.classes_)} classes)")
        else:
            logger.info(f"{kind} model: none")
