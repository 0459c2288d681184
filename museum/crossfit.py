"""Cross-fitting: honest probabilities of both experts on labelled rows they were trained on.

`museum tune` needs each expert's probabilities on labelled rows the expert has never seen, but
the text expert was trained on museum/train.csv (where museum_multimodal's descriptions come
from) and the image expert on the labelled photos themselves. So the labelled rows are split
into k folds (stratified, seeded; rows with the same normalised description share a fold), and
for each fold each expert is retrained with the configuration saved in its model folder, on the
data its `data.json` records, minus every row of that fold (matched by guid, by normalised
description and, for images, by file content), then scores the fold.

The out-of-fold probabilities are cached beside the model folders (`crossfit/`): one file per
expert and fold, written as soon as that fold is done (an interrupted run resumes there), and
`oof-<key>.npz` for the whole result. Keys hash each expert's training record and
configuration, the labelled file's sha256, the image folder, k and seed, so a rerun with the
same inputs trains nothing, and replacing one expert retrains only that one.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from museum.config import FusionConfig, ImageConfig, TextConfig, config_from_dict, config_to_dict
from museum.data.competition import CompetitionTable, normalise_description, read_competition_csv, stratified_split
from museum.errors import MuseumError
from museum.experts import Experts, score_chunk
from museum.fusion import FusionChoice, choose_fusion, grouped_folds, union_classes
from museum.log import logger
from museum.provenance import check_training_record, folder_record, sha256_file
from museum.utils import atomic_path, read_json, resolve_device

CACHE_NAME = "crossfit"
CACHE_FORMAT = "museum-crossfit/1"
# Options that change where or how fast a model trains, not what it learns: left out of cache keys.
RUNTIME_OPTIONS = frozenset({"device", "workers", "threads", "cache_dir", "embeddings"})


# ----------------------------------------------------------------------------- folds


def description_groups(descriptions: list[str], extra_groups=()) -> np.ndarray:
    """A group id per row (its group's first row): rows with the same non-empty normalised description share
    one, and so do the members of each of `extra_groups` (lists of row indices, e.g. near-duplicate images)."""
    first: dict[str, int] = {}
    links = [(first.setdefault(key, i), i) for i, d in enumerate(descriptions) if (key := normalise_description(d))]
    for members in extra_groups:
        members = [int(m) for m in (members["members"] if isinstance(members, dict) else members)]
        links += [(members[0], j) for j in members[1:]]
    n = len(descriptions)
    edges = np.array(links, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    component = connected_components(graph, directed=False)[1]
    return np.unique(component, return_index=True)[1][component]


def crossfit_folds(labels: list[str], descriptions: list[str], n_folds: int = 5, seed: int = 0,
                   extra_groups=()) -> np.ndarray:
    """The fold (0..n_folds-1) of every labelled row: stratified by label, seeded, and grouped so that
    rows sharing a normalised description (or an `extra_groups` group) always share a fold."""
    groups = description_groups(descriptions, extra_groups)
    if n_folds < 2:
        raise MuseumError(f"--folds {n_folds}: cross-fitting needs at least 2 folds")
    if len(set(groups.tolist())) < n_folds:
        raise MuseumError(f"{len(set(groups.tolist()))} distinct descriptions among the labelled rows: too few "
                          f"for {n_folds} folds; pass fewer folds or add rows")
    y = np.unique(np.asarray(labels), return_inverse=True)[1]
    fold = np.empty(len(labels), dtype=np.int64)
    for f, (_, held) in enumerate(grouped_folds(y, n_folds, seed, groups)):
        fold[held] = f
    return fold


# ----------------------------------------------------------------------------- what each expert trained on


@dataclass
class _ExpertData:
    """An expert's saved configuration and its training rows, with the keys that match labelled rows."""

    kind: str  # "text" | "image"
    folder: Path
    config: TextConfig | ImageConfig
    labels: list[str]
    inputs: list  # descriptions (text) or image paths (image)
    guids: list[str | None]
    descriptions: list[str]  # normalised; "" when unknown
    hashes: list[str | None]  # image file sha256 (image expert only)
    unlabeled: list[str] = field(default_factory=list)  # text: Word2Vec's extra descriptions
    key: str = ""

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def left_out(self, guids: set[str], descriptions: set[str], hashes: set[str]) -> np.ndarray:
        """Mask of training rows that match a held-out row by guid, normalised description or image bytes."""
        return np.array([(g is not None and g in guids) or (d != "" and d in descriptions) or (h is not None and h in hashes)
                         for g, d, h in zip(self.guids, self.descriptions, self.hashes)], dtype=bool)


def _saved_config(kind: str, folder: Path, cls):
    path = folder / "config.json"
    if not path.is_file():
        raise MuseumError(f"--{kind}-model {folder}: no config.json, so it cannot be retrained as it was; "
                          f"retrain it with museum train-{kind}")
    return config_from_dict(cls, read_json(path))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _text_data(folder: Path, device: str | None) -> _ExpertData:
    record = check_training_record(folder)
    config = _saved_config("text", folder, TextConfig)
    if record.get("train") is None:
        raise MuseumError(f"{folder / 'data.json'}: records no training CSV; retrain the text model with museum train-text")
    table = read_competition_csv(record["train"]["path"], require_labels=True)
    table = table.subset(np.flatnonzero(table.has_text))  # as train-text: an empty description teaches nothing
    unlabeled = [d for entry in record.get("unlabeled") or [] for d in read_competition_csv(entry["path"]).descriptions]
    key = _digest({k: v for k, v in config_to_dict(config).items() if k not in RUNTIME_OPTIONS} | {"record": record})
    if device:
        config = replace(config, device=device)
    return _ExpertData("text", folder, config, list(table.labels), list(table.descriptions), list(table.guids),
                       [normalise_description(d) for d in table.descriptions], [None] * len(table), unlabeled, key=key)


def _image_data(folder: Path, device: str | None) -> _ExpertData:
    from museum.data.images import list_competition_images, list_image_folder

    record = check_training_record(folder)
    config = _saved_config("image", folder, ImageConfig)
    if config.positive is not None:
        raise MuseumError(f"--image-model {folder}: a one-vs-rest model (--positive {config.positive}) cannot be "
                          "cross-fitted with a many-class text expert; pass a many-class image model")
    if record.get("images") is None:
        raise MuseumError(f"{folder / 'data.json'}: records no images folder; retrain the image model with museum train-image")
    images = Path(record["images"]["path"])
    guids: list[str | None]
    if record.get("train") is not None:
        items = list_competition_images(record["train"]["path"], images)
        table = read_competition_csv(record["train"]["path"], require_labels=True)
        description_of = dict(zip(table.guids, table.descriptions))
        guids = [p.stem for p in items.paths]
        descriptions = [normalise_description(description_of.get(g, "")) for g in guids]
    else:
        items = list_image_folder(images)
        guids, descriptions = [None] * len(items), [""] * len(items)
    val = record.get("val")
    if val is not None and "files" in val:
        raise MuseumError(f"--image-model {folder}: trained with a separate --val folder; cross-fitting retrains on the "
                          "training images alone, so retrain it without --val first")
    config = _pin_auto_options(config, folder, items.labels)
    key = _digest({k: v for k, v in config_to_dict(config).items() if k not in RUNTIME_OPTIONS} | {"record": record})
    config = replace(config, embeddings=None, **({"device": device} if device else {}))
    return _ExpertData("image", folder, config, list(items.labels), list(items.paths), guids, descriptions,
                       [sha256_file(p) for p in items.paths], key=key)


def _pin_auto_options(config: ImageConfig, folder: Path, labels: list[str]) -> ImageConfig:
    """`config` with the options that `train-image` derives from the data size (0 = auto) fixed to the
    values the saved model got: a fold holds fewer images and would otherwise get more networks
    (4 below 500) and epochs than the model it stands for."""
    from museum.engine import load_checkpoint
    from museum.image.train import auto_epochs

    meta = load_checkpoint(folder / "best.pt")
    n_train = len(stratified_split(labels, config.val_fraction, config.seed)[0])
    input_size = config.input_size or int(meta["input_size"])
    return replace(config, members=config.members or int(meta.get("members", 1)), input_size=input_size,
                   epochs=config.epochs or auto_epochs(n_train, input_size, resolve_device(config.device)))


# ----------------------------------------------------------------------------- training one fold


def _fit_text(data: _ExpertData, keep: np.ndarray, times: dict) -> object:
    from museum.text.model import TextModel

    labels = [data.labels[i] for i in np.flatnonzero(keep)]
    texts = [data.inputs[i] for i in np.flatnonzero(keep)]
    train_idx, val_idx = stratified_split(labels, data.config.val_fraction, data.config.seed)
    if len(val_idx) == 0:
        raise MuseumError("cross-fit: the text expert's training rows outside a fold leave none for validation; "
                          "pass fewer folds")
    model = TextModel(data.config).fit([texts[i] for i in train_idx], [labels[i] for i in train_idx],
                                       [texts[i] for i in val_idx], [labels[i] for i in val_idx], data.unlabeled,
                                       progress=False)
    times["word2vec_s"] = model.stats_["word2vec"]["seconds"]
    return model


def _fit_image(data: _ExpertData, keep: np.ndarray, times: dict) -> object:
    from museum.image.train import fit_image_model

    rows = np.flatnonzero(keep)
    with tempfile.TemporaryDirectory(prefix="museum-crossfit-") as tmp:  # checkpoints written while training
        return fit_image_model(data.config, [data.inputs[i] for i in rows], [data.labels[i] for i in rows], out=tmp)


def _fold_scores(data: _ExpertData, fold_rows: CompetitionTable, images: Path | None, classes: list[str],
                 left_out: np.ndarray, saved: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(aligned probabilities, scored mask, timings) of one expert on one fold's rows."""
    times: dict = {"left_out": int(left_out.sum())}
    start = time.perf_counter()
    if left_out.any():
        model = (_fit_text if data.kind == "text" else _fit_image)(data, ~left_out, times)
        times["how"] = "retrained"
    else:  # the expert never saw these rows: the saved model is already honest on them
        if "model" not in saved:
            from museum.experts import load_experts

            loaded = load_experts(data.folder if data.kind == "text" else None, data.folder if data.kind == "image" else None,
                                  device=data.config.device)
            saved["model"] = loaded.text if data.kind == "text" else loaded.image
        model = saved["model"]
        times["how"] = "saved model"
    times["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    experts = Experts(model if data.kind == "text" else None, model if data.kind == "image" else None, None, None, classes)
    scores = score_chunk(experts, fold_rows, images if data.kind == "image" else None)
    times["predict_s"] = time.perf_counter() - start
    if data.kind == "text":
        return scores.text_p, scores.has_text, times
    return scores.image_p, scores.has_image, times


# ----------------------------------------------------------------------------- the whole cross-fit


@dataclass
class OutOfFold:
    """Both experts' out-of-fold probabilities on the labelled rows, aligned on `classes`."""

    guids: list[str]
    labels: list[str]
    classes: list[str]
    text_p: np.ndarray  # (n, C); NaN rows where the text expert had nothing (or no text model)
    image_p: np.ndarray
    has_text: np.ndarray
    has_image: np.ndarray
    fold: np.ndarray
    groups: np.ndarray  # description groups, for the fusion's inner folds
    text_classes: list[str] | None
    image_classes: list[str] | None
    path: Path  # the cache file
    timings: dict = field(default_factory=dict)  # per expert and fold: rows left out, how, train_s, predict_s
    seconds: float = 0.0
    reused: bool = False

    def targets(self) -> np.ndarray:
        """Labels as indices into `classes`, then into the sorted labels no model knows (always errors)."""
        space = self.classes + sorted(set(self.labels) - set(self.classes))
        return np.array([space.index(label) for label in self.labels], dtype=np.int64)

    def known(self, kind: str) -> list[bool] | None:
        names = self.text_classes if kind == "text" else self.image_classes
        return None if names is None else [c in names for c in self.classes]

    def choose(self, config: FusionConfig, fallback: str) -> FusionChoice:
        """`fusion.choose_fusion` on these rows, inner folds grouped by description."""
        return choose_fusion(self.text_p, self.image_p, self.has_text, self.has_image, self.targets(), self.classes,
                             fallback, config, self.known("text"), self.known("image"), self.groups)

    def summary(self) -> str:
        """What was trained and how long it took, for the command's output."""
        lines = [f"cross-fit: {len(self.guids)} labelled rows, {int(self.fold.max()) + 1} folds, "
                 f"{int(self.has_text.sum())} with text, {int(self.has_image.sum())} with an image, "
                 f"{int((self.has_text & self.has_image).sum())} with both"
                 + (f"; reused {self.path}" if self.reused else f"; {self.seconds:.0f} s, saved to {self.path}")]
        for kind in ("text", "image"):
            folds = self.timings.get(kind) or []
            if folds:
                train = sum(t.get("train_s", 0.0) for t in folds)
                how = Counter(t.get("how", "?") for t in folds)
                lines.append(f"  {kind}: {', '.join(f'{n} fold(s) {h}' for h, n in how.items())}, training {train:.0f} s, "
                             f"prediction {sum(t.get('predict_s', 0.0) for t in folds):.0f} s, "
                             f"{sum(t.get('left_out', 0) for t in folds)} training rows left out in all")
        return "\n".join(lines)


def cache_folder(text_model: Path | None, image_model: Path | None) -> Path:
    """`crossfit/` in the folder that holds the model folders (where `fusion.json` goes too)."""
    anchor = text_model or image_model
    return (Path(anchor).parent if anchor is not None else Path("models")) / CACHE_NAME


def cross_fit(labelled_csv: str | Path, images: str | Path | None, text_model: str | Path | None,
              image_model: str | Path | None, n_folds: int = 5, seed: int = 0, cache_dir: str | Path | None = None,
              device: str | None = None, extra_groups=()) -> OutOfFold:
    """Out-of-fold probabilities of both experts on `labelled_csv` (see the module doc); reused when cached.

    `images` is the folder of the labelled rows' `{guid}.jpg`; either model may be None (that
    expert is left out). `device` overrides the saved configurations' device (it does not change
    the cache key). `extra_groups` (lists of row indices) are kept in one fold, like duplicates.
    """
    if text_model is None and image_model is None:
        raise MuseumError("--text-model none and --image-model none: give at least one model to cross-fit")
    start = time.perf_counter()
    labelled_csv = Path(labelled_csv)
    images = Path(images) if images is not None else None
    if images is not None and not images.is_dir():
        raise MuseumError(f"--images {images}: not a folder; give the folder holding the labelled rows' {{guid}}.jpg")
    table = read_competition_csv(labelled_csv, require_labels=True)
    experts = [_text_data(Path(text_model), device)] if text_model is not None else []
    if image_model is not None:
        experts.append(_image_data(Path(image_model), device))
    classes = union_classes(*(d.classes for d in experts))
    fold = crossfit_folds(table.labels, table.descriptions, n_folds, seed, extra_groups)
    groups = description_groups(table.descriptions, extra_groups)
    common = {"format": CACHE_FORMAT, "labelled": sha256_file(labelled_csv), "folds": n_folds, "seed": seed,
              "classes": classes, "fold": fold.tolist(),
              "images": None if images is None else folder_record(images)}
    for data in experts:
        data.key = _digest({**common, "kind": data.kind, "expert": data.key})[:16]
    cache = Path(cache_dir) if cache_dir is not None else cache_folder(
        Path(text_model) if text_model else None, Path(image_model) if image_model else None)
    path = cache / f"oof-{_digest([d.key for d in experts])[:16]}.npz"
    if path.is_file():
        oof = load_oof(path)
        if oof.guids == table.guids and oof.labels == table.labels:
            oof.reused = True
            logger.info(f"cross-fit: reusing {path}")
            return oof
    n, k = len(table), len(classes)
    probas = {"text": np.full((n, k), np.nan), "image": np.full((n, k), np.nan)}
    masks = {"text": np.zeros(n, bool), "image": np.zeros(n, bool)}
    timings: dict = {}
    # Image bytes match a labelled row to an image expert's training copy under another guid.
    hashes = [None if images is None or image_model is None else _image_hash(images / f"{g}.jpg") for g in table.guids]
    for data in experts:
        saved: dict = {}
        timings[data.kind] = []
        for f in range(n_folds):
            rows = np.flatnonzero(fold == f)
            part = cache / f"{data.kind}-{data.key}-fold{f}.npz"
            if part.is_file():
                proba, ok, times = _load_part(part)
                times["how"] = f"cached ({times.get('how')})"
            else:
                left_out = data.left_out({table.guids[i] for i in rows},
                                         {normalise_description(table.descriptions[i]) for i in rows} - {""},
                                         {hashes[i] for i in rows} - {None})
                proba, ok, times = _fold_scores(data, table.subset(rows), images, classes, left_out, saved)
                _save_part(part, proba, ok, times)
                logger.info(f"cross-fit {data.kind} fold {f + 1}/{n_folds}: {times['how']} without "
                            f"{times['left_out']} training row(s) in {times['train_s']:.1f} s, scored {int(ok.sum())} "
                            f"of {len(rows)} row(s)")
            probas[data.kind][rows], masks[data.kind][rows] = proba, ok
            timings[data.kind].append(times)
    kinds = {d.kind: d for d in experts}
    oof = OutOfFold(list(table.guids), list(table.labels), classes, probas["text"], probas["image"], masks["text"],
                    masks["image"], fold, groups, kinds["text"].classes if "text" in kinds else None,
                    kinds["image"].classes if "image" in kinds else None, path, timings,
                    seconds=time.perf_counter() - start)
    save_oof(oof)
    return oof


def _image_hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _save_part(path: Path, proba: np.ndarray, ok: np.ndarray, times: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, proba=proba, ok=ok, times=np.array(json.dumps(times)))


def _load_part(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as z:
        return z["proba"], z["ok"], json.loads(str(z["times"]))


def save_oof(oof: OutOfFold) -> Path:
    """Write `oof.path` (plain arrays, no pickles)."""
    names = lambda v: np.array([] if v is None else v, dtype=str)  # noqa: E731
    with atomic_path(oof.path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, format=np.array(CACHE_FORMAT), guids=names(oof.guids), labels=names(oof.labels),
                     classes=names(oof.classes), text_p=oof.text_p, image_p=oof.image_p, has_text=oof.has_text,
                     has_image=oof.has_image, fold=oof.fold, groups=oof.groups,
                     text_classes=names(oof.text_classes), image_classes=names(oof.image_classes),
                     has_experts=np.array([oof.text_classes is not None, oof.image_classes is not None]),
                     timings=np.array(json.dumps(oof.timings)), seconds=np.array(oof.seconds))
    return oof.path


def load_oof(path: str | Path) -> OutOfFold:
    """Read a file written by `save_oof`; a damaged one is a one-line error."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != CACHE_FORMAT:
                raise ValueError(f"format {z['format']}")
            has_text_expert, has_image_expert = z["has_experts"].tolist()
            return OutOfFold(
                guids=z["guids"].tolist(), labels=z["labels"].tolist(), classes=z["classes"].tolist(),
                text_p=z["text_p"], image_p=z["image_p"], has_text=z["has_text"], has_image=z["has_image"],
                fold=z["fold"], groups=z["groups"],
                text_classes=z["text_classes"].tolist() if has_text_expert else None,
                image_classes=z["image_classes"].tolist() if has_image_expert else None,
                path=path, timings=json.loads(str(z["timings"])), seconds=float(z["seconds"]))
    except (OSError, KeyError, ValueError) as exc:
        raise MuseumError(f"{path}: not a readable cross-fit file ({exc}); delete it to recompute") from None
