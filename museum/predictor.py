"""`Predictor`: the `museum submit` cascade over a pandas DataFrame, for notebooks and other Python code.

    from museum import Predictor
    predictor = Predictor.load(text_model="models/text", image_model="models/image")
    result = predictor.predict(df, images="images")  # typology, route, one probability column per class

It goes the way `museum submit` goes, so both give the same answers: `submit.prepare` loads the
experts (`experts.load_experts`), reads `fusion.json` beside them and sets up the fusion rule;
`experts.score_chunk` scores each chunk of rows; the rule combines them.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from museum.config import FusionConfig
from museum.data.competition import CompetitionTable
from museum.errors import MuseumError
from museum.experts import score_chunk

from museum.submit import RunSetup, prepare, route_names
from museum.text.model import as_texts

RESULT_COLUMNS = ("typology", "route")


class Predictor:
    """The loaded experts and fusion settings; `predict(df, images=DIR)` scores a DataFrame."""

    def __init__(self, setup: RunSetup) -> None:
        self.setup = setup

    @classmethod
    def load(cls, text_model: str | Path | None = None, image_model: str | Path | None = None,
             settings: str | Path | None = None, **overrides: Any) -> "Predictor":
        """Load the model folders (either may be None, not both) and their `fusion.json`, if any.

        `settings` names another settings file; `overrides` are FusionConfig fields (`text_threshold=0.8`,
        `fallback=...`, `device="cpu"`, `batch_size`, `workers`, ...), as the options of `museum submit`."""
        if text_model is None and image_model is None:
            raise MuseumError("Predictor.load: give text_model=FOLDER, image_model=FOLDER or both")
        known = {f.name for f in fields(FusionConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise MuseumError(f"Predictor.load: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        setup = prepare(None, None, _path(text_model), _path(image_model), overrides, _path(settings))
        return cls(setup)

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the probability columns."""
        return list(self.setup.cascade.classes)

    def predict(self, df, images: str | Path | None = None):
        """A DataFrame indexed like `df`: `typology`, `route` (text, image, blend or fallback) and one
        probability column per class.

        `df` needs columns `guid` and `description`; an empty or missing (NaN) description means the
        row has no text. `images` is the folder of `{guid}.jpg`; a row whose image is missing or
        unreadable is scored without it, as `museum submit` does."""
        import pandas as pd

        table = _table(df)
        folder = _images(images)
        setup, classes = self.setup, self.classes
        clash = sorted(set(RESULT_COLUMNS) & set(classes))
        if clash:
            raise MuseumError(f"class name(s) {', '.join(clash)} clash with the result columns {RESULT_COLUMNS}")
        size = setup.config.chunk_size
        labels, routes, probas = [], [], []
        for start in range(0, len(table), size):
            chunk = table.subset(range(start, min(start + size, len(table))))
            scores = score_chunk(setup.experts, chunk, folder, setup.config.batch_size, setup.config.workers)
            result = setup.cascade.combine(scores.text_p, scores.image_p, scores.has_text, scores.has_image)
            labels += result.labels(classes)
            routes += [route_names(setup.cascade.kind)[r] for r in result.routes]
            probas.append(np.asarray(result.proba, dtype=np.float64))
        proba = np.concatenate(probas) if probas else np.zeros((0, len(classes)))
        out = pd.DataFrame(proba, index=df.index, columns=classes)
        out.insert(0, "route", routes)
        out.insert(0, "typology", labels)
        return out


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _table(df) -> CompetitionTable:
    """The DataFrame's rows as the table `score_chunk` takes (guids as text, descriptions stripped, NaN = "")."""
    columns = getattr(df, "columns", None)
    if columns is None:
        raise MuseumError(f"predict: expected a pandas DataFrame with columns guid, description; got {type(df).__name__}")
    missing = [c for c in ("guid", "description") if c not in columns]
    if missing:
        raise MuseumError(f"predict: the DataFrame has no column {', '.join(missing)} (it has {', '.join(map(str, columns))[:120]}); "
                          "rows need a guid (their image is {guid}.jpg) and a description (NaN or empty: none)")
    guids = as_texts(df["guid"], "guid")
    empty = [label for label, guid in zip(df.index, guids) if not guid]
    if empty:
        raise MuseumError(f"predict: row {empty[0]!r}: empty guid ({len(empty)} such row(s)); every row needs one")
    return CompetitionTable(Path("<DataFrame>"), guids, as_texts(df["description"], "description"))


def _images(images: str | Path | None) -> Path | None:
    if images is None:
        return None
    folder = Path(images)
    if not folder.is_dir():
        raise MuseumError(f"predict: images={images}: not a folder; give the folder holding the {{guid}}.jpg files")
    return folder
