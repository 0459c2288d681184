"""What the web server does with one item: score a description and/or a photo through the cascade.

Thread safety: every expert is wrapped in `LockedModel`, one lock per expert. Requests run
in the server's thread pool; a text request and an image request can run side by side,
two requests for the same expert take turns. We lock instead of keeping per-thread copies
because torch already spreads one forward pass over all cores (parallel copies would only
fight over them and multiply memory), and because a lock makes no assumption about the
thread safety of the tokenizer, scikit-learn or torch modules inside an expert.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from museum import __version__
from museum.data.files import file_problem, open_regular
from museum.data.images import ImageDecodeError, decode_bytes
from museum.errors import MuseumError
from museum.data.items import Items
from museum.experts import score_items
from museum.submit import RunSetup, prepare, route_names
from museum.utils import sha256_stream

# Descriptions in the catalogue are at most a few thousand characters; anything much longer is a paste accident.
MAX_DESCRIPTION_CHARS = 20_000
# A 5000 x 5000 photo; larger uploads cost hundreds of MB to decode and are not item photos.
MAX_UPLOAD_PIXELS = 25_000_000
TOP_K = 5


class LockedModel:
    """An expert whose predictions are serialised by its own lock; `classes_` passes through."""

    def __init__(self, model: Any):
        self.model = model
        self.classes_ = list(model.classes_)
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        # Plain attributes (input_size, config, ...) are read-only after loading: no lock needed.
        return getattr(self.model, name)

    def predict_proba(self, items: list, **kwargs) -> np.ndarray:
        with self.lock:
            return self.model.predict_proba(items, **kwargs)

    def predict_paths(self, paths: list, **kwargs):
        with self.lock:
            return self.model.predict_paths(paths, **kwargs)

    def score_rows(self, items, **kwargs):
        with self.lock:
            return self.model.score_rows(items, **kwargs)


class InputError(MuseumError):
    """A request the server cannot score (no usable input, broken image, too long a text)."""


@dataclass
class Prediction:
    """One item's result: the typology, the route that decided it, all classes by probability."""

    typology: str
    route: str
    classes: list[str]
    probabilities: list[float]
    experts: dict[str, dict | None]
    warnings: list[str] = field(default_factory=list)

    def top(self, k: int = TOP_K) -> list[tuple[str, float]]:
        return list(zip(self.classes[:k], self.probabilities[:k]))


def file_version(path: Path) -> dict:
    """A model file's identity: the first 12 hex digits of its SHA-256 and its modification time."""
    with open_regular(path) as f:  # a FIFO or device in its place is refused, never read (it could block)
        digest = sha256_stream(f)
    modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return {"sha256": digest[:12], "file": path.name, "modified": modified}


class Predictor:
    """The loaded experts and cascade, shared by all requests and submission jobs."""

    def __init__(self, text_dir: Path | None, image_dir: Path | None, device: str = "auto",
                 settings_file: Path | None = None, workdir: Path | None = None):
        # `prepare` is the same setup `museum submit` uses (fusion.json, fallback class); the CSV
        # path only serves to look for an images/ folder beside it, and the fresh workdir has none.
        anchor = (workdir or Path(".")) / "upload.csv"
        setup = prepare(anchor, None, text_dir, image_dir, {"device": device, "workers": 0}, settings_file)
        experts = setup.experts
        experts.text = LockedModel(experts.text) if experts.text is not None else None
        experts.image = LockedModel(experts.image) if experts.image is not None else None
        # Uploaded CSVs come without images; chunks of 500 rows give steady progress.
        self.setup: RunSetup = replace(setup, images=None, config=replace(setup.config, chunk_size=500))
        self.versions = {
            kind: file_version(folder / name)
            for kind, folder, name in (("text", experts.text_dir, "text_model.pt"), ("image", experts.image_dir, "best.pt"))
            if folder is not None and file_problem(folder / name) is None
        }

    @property
    def experts(self):
        return self.setup.experts

    def decode(self, data: bytes) -> Image.Image:
        """Upload bytes → RGB image through the training decoder; bombs and broken files → `InputError`."""
        size = getattr(self.experts.image, "input_size", None)
        try:
            return decode_bytes(data, "uploaded image", draft=size, max_pixels=MAX_UPLOAD_PIXELS)
        except ImageDecodeError as exc:
            raise InputError(str(exc).replace("; replace or remove the file", "; upload a JPEG, PNG or WebP photo")) from None

    def predict(self, description: str | None, image: bytes | None) -> Prediction:
        """Score one item; an input whose expert is not loaded is ignored with a warning."""
        description = (description or "").strip()
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InputError(f"description: {len(description)} characters, limit {MAX_DESCRIPTION_CHARS}; shorten it")
        experts, cascade, warnings = self.experts, self.setup.cascade, []
        if description and experts.text is None:
            warnings.append("no text model loaded: the description was not used")
            description = ""
        if image is not None and experts.image is None:
            warnings.append("no image model loaded: the image was not used")
            image = None
        if not description and image is None:
            raise InputError(f"nothing to score: give {_what_can_be_scored(experts)} "
                             "(multipart/form-data fields `description` and `image`)")
        # The same path as `museum submit`: the experts' contract, then the fusion rule.
        scores = score_items(experts, Items.one(description, self.decode(image) if image is not None else None))
        text_p, image_p = scores.text_p, scores.image_p
        result = cascade.combine(text_p, image_p, scores.has_text, scores.has_image)
        proba = result.proba[0]
        order = np.argsort(-proba, kind="stable")
        return Prediction(
            typology=cascade.classes[result.pred[0]],
            route=route_names(cascade.kind)[result.routes[0]],
            classes=[experts.classes[j] for j in order],
            probabilities=[round(float(proba[j]), 6) for j in order],
            experts={"text": _best(text_p[0], experts.classes) if description else None,
                     "image": _best(image_p[0], experts.classes) if image is not None else None},
            warnings=warnings,
        )

    def models(self) -> dict:
        """Class names, model versions and routing settings, for `GET /models`."""
        experts, config = self.experts, self.setup.config
        info: dict[str, Any] = {"package_version": __version__, "classes": list(experts.classes)}
        for kind, model in (("text", experts.text), ("image", experts.image)):
            info[kind] = None if model is None else {"classes": list(model.classes_), **self.versions.get(kind, {})}
        info["routing"] = {
            "text_threshold": config.text_threshold, "image_threshold": config.image_threshold,
            "blend_weight": config.blend_weight, "fallback": config.fallback,
            "settings": self.setup.settings_file.name if self.setup.settings_file else "defaults",
        }
        return info


def _best(proba: np.ndarray, classes: list[str]) -> dict:
    j = int(np.argmax(proba))
    return {"typology": classes[j], "probability": round(float(proba[j]), 6)}


def _what_can_be_scored(experts) -> str:
    if experts.text is not None and experts.image is not None:
        return "a description, an image, or both"
    return "a description" if experts.text is not None else "an image"
