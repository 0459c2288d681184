"""The cascade that turns a text and an image expert into one prediction per row.

Routing, per row (thresholds compare with a strict `>`, so 0.7 itself counts as unsure):

1. `text`     - the row has a description and the text expert's top probability > text_threshold;
2. `image`    - else the row has a readable image and the image expert's top probability > image_threshold;
3. `blend`    - else, when both exist, `w * text + (1 - w) * image` (w = blend_weight);
4. `text` / `image` - else the one modality the row has, however unsure;
5. `fallback` - else (no usable modality) the most frequent training class.

The experts may know different class sets: their probabilities are aligned on the sorted
union of class names, by name, never by position. `argmax` ties go to the first class in
that order, so a run is deterministic.

`tune_cascade` grid-searches the thresholds and the blend weight for macro-F1 and only
moves away from the defaults when a cross-validated estimate says the gain is real.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from museum.config import FusionConfig, config_from_dict
from museum.errors import MuseumError
from museum.utils import read_json, write_json

ROUTES = ("text", "image", "blend", "fallback")
TEXT, IMAGE, BLEND, FALLBACK = range(4)
SETTINGS_NAME = "fusion.json"

# The search grid: 1.0 means "never trust this expert alone", 0.0 "always, when present".
THRESHOLD_GRID = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def union_classes(*class_lists: Sequence[str] | None) -> list[str]:
    """Sorted union of the class names of the experts that are present."""
    names: set[str] = set()
    for classes in class_lists:
        if classes is None:
            continue
        if len(set(classes)) != len(classes):
            raise MuseumError(f"model classes contain duplicates: {list(classes)}; re-train the model")
        names.update(classes)
    return sorted(names)


def align(proba: np.ndarray, classes: Sequence[str], union: Sequence[str]) -> np.ndarray:
    """Re-index `proba` (n, len(classes)) onto `union` by class name; unknown classes get 0."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise MuseumError(f"model returned probabilities of shape {proba.shape} for {len(classes)} classes")
    position = {name: j for j, name in enumerate(union)}
    missing = [c for c in classes if c not in position]
    if missing:
        raise MuseumError(f"classes {missing} are not in the cascade's class list; re-run museum tune")
    out = np.zeros((proba.shape[0], len(union)), dtype=np.float64)
    out[:, [position[c] for c in classes]] = proba
    return out


def _top(proba: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, max) per row; rows that are not usable (possibly NaN) get (0, -inf)."""
    safe = np.where(usable[:, None], np.nan_to_num(proba, nan=0.0), 0.0)
    arg = np.argmax(safe, axis=1)  # first maximum wins: ties break by class order
    top = np.where(usable, safe[np.arange(len(safe)), arg], -np.inf)
    return arg, top


def route_codes(
    text_top: np.ndarray,
    image_top: np.ndarray,
    has_text: np.ndarray,
    has_image: np.ndarray,
    text_threshold: float,
    image_threshold: float,
) -> np.ndarray:
    """Route code per row (TEXT, IMAGE, BLEND or FALLBACK), following the order in the module doc."""
    sure_text = has_text & (text_top > text_threshold)
    sure_image = has_image & (image_top > image_threshold)
    return np.select(
        [sure_text, sure_image, has_text & has_image, has_text, has_image],
        [TEXT, IMAGE, BLEND, TEXT, IMAGE],
        default=FALLBACK,
    ).astype(np.int8)


@dataclass
class CascadeResult:
    """Per-row output of `Cascade.combine`: final probabilities, route codes and predicted labels."""

    proba: np.ndarray
    routes: np.ndarray
    pred: np.ndarray  # class indices into Cascade.classes

    def labels(self, classes: Sequence[str]) -> list[str]:
        return [classes[j] for j in self.pred]


@dataclass
class Cascade:
    """Routing settings plus the class list the experts' probabilities are aligned on."""

    classes: list[str]
    text_threshold: float = 0.7
    image_threshold: float = 0.7
    blend_weight: float = 0.5
    fallback: str = ""

    def __post_init__(self) -> None:
        if not self.classes:
            raise MuseumError("the cascade has no classes: give at least one model (--text-model or --image-model)")
        if self.fallback not in self.classes:
            raise MuseumError(
                f"fallback class {self.fallback!r} is not one the models know; pick one of: {', '.join(self.classes)}"
            )

    @classmethod
    def from_config(cls, classes: list[str], config: FusionConfig) -> "Cascade":
        return cls(
            classes=classes,
            text_threshold=config.text_threshold,
            image_threshold=config.image_threshold,
            blend_weight=config.blend_weight,
            fallback=config.fallback or "",
        )

    def combine(
        self, text_p: np.ndarray, image_p: np.ndarray, has_text: np.ndarray, has_image: np.ndarray
    ) -> CascadeResult:
        """Route every row and return its final probabilities (one-hot for fallback rows)."""
        has_text, has_image = np.asarray(has_text, bool), np.asarray(has_image, bool)
        t_arg, t_top = _top(text_p, has_text)
        i_arg, i_top = _top(image_p, has_image)
        routes = route_codes(t_top, i_top, has_text, has_image, self.text_threshold, self.image_threshold)
        n, k = len(routes), len(self.classes)
        text_p = np.nan_to_num(np.asarray(text_p, np.float64), nan=0.0)
        image_p = np.nan_to_num(np.asarray(image_p, np.float64), nan=0.0)
        w = self.blend_weight
        fallback = np.zeros(k)
        fallback[self.classes.index(self.fallback)] = 1.0
        r = routes[:, None]
        proba = np.where(
            r == TEXT, text_p, np.where(r == IMAGE, image_p, np.where(r == BLEND, w * text_p + (1 - w) * image_p, fallback))
        ).reshape(n, k)
        return CascadeResult(proba=proba, routes=routes, pred=np.argmax(proba, axis=1))


# ----------------------------------------------------------------------------- tuning


def fast_macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over the classes present in `y` (as `museum.metrics.macro_f1`), via one bincount."""
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    present = support > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean()) if f1.size else 0.0


@dataclass
class GridScores:
    """Predictions of every grid setting, computed once so tuning folds only re-score them."""

    settings: list[tuple[float, float, float]]
    preds: np.ndarray  # (n_settings, n_rows) class indices


def grid_predictions(
    text_p: np.ndarray,
    image_p: np.ndarray,
    has_text: np.ndarray,
    has_image: np.ndarray,
    fallback_idx: int,
    thresholds: Sequence[float] = THRESHOLD_GRID,
    weights: Sequence[float] = WEIGHT_GRID,
) -> GridScores:
    """Predicted class of every row under every (text_threshold, image_threshold, weight)."""
    has_text, has_image = np.asarray(has_text, bool), np.asarray(has_image, bool)
    t_arg, t_top = _top(text_p, has_text)
    i_arg, i_top = _top(image_p, has_image)
    tp, ip = np.nan_to_num(text_p, nan=0.0), np.nan_to_num(image_p, nan=0.0)
    blend_arg = {w: np.argmax(w * tp + (1 - w) * ip, axis=1) for w in weights}
    settings, preds = [], []
    for tt, it in itertools.product(thresholds, thresholds):
        routes = route_codes(t_top, i_top, has_text, has_image, tt, it)
        base = np.where(routes == TEXT, t_arg, np.where(routes == IMAGE, i_arg, fallback_idx))
        for w in weights:
            settings.append((float(tt), float(it), float(w)))
            preds.append(np.where(routes == BLEND, blend_arg[w], base))
    return GridScores(settings, np.array(preds))


def _best(grid: GridScores, y: np.ndarray, rows: np.ndarray, n_classes: int, default: tuple) -> tuple[int, np.ndarray]:
    """Index of the best setting on `rows`; ties go to the setting closest to the default."""
    scores = np.array([fast_macro_f1(y[rows], p[rows], n_classes) for p in grid.preds])
    distance = np.array([sum(abs(a - b) for a, b in zip(s, default)) for s in grid.settings])
    # lexsort: last key is primary -> highest score, then smallest distance, then grid order.
    order = np.lexsort((np.arange(len(scores)), distance, -np.round(scores, 12)))
    return int(order[0]), scores


@dataclass
class TuneResult:
    """What `tune_cascade` chose, and the evidence: full-set scores and the cross-validated gain."""

    chosen: tuple[float, float, float]
    default: tuple[float, float, float]
    tuned_best: tuple[float, float, float]
    default_f1: float
    best_f1: float
    cv_gain: float | None
    accepted: bool
    reason: str
    top: list[dict] = field(default_factory=list)


def _folds(y: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds when every class has >= n_folds rows, else plain shuffled folds."""
    import warnings

    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y)
    splitter = (
        StratifiedKFold(n_folds, shuffle=True, random_state=seed)
        if counts[counts > 0].min() >= 2
        else KFold(n_folds, shuffle=True, random_state=seed)
    )
    with warnings.catch_warnings():
        # Classes rarer than n_folds are fine here: the fold scores are pooled, not averaged.
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(y)), y))


def tune_cascade(
    text_p: np.ndarray,
    image_p: np.ndarray,
    has_text: np.ndarray,
    has_image: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    fallback: str,
    config: FusionConfig,
) -> TuneResult:
    """Grid-search thresholds and blend weight for macro-F1, guarded against a small validation set.

    The guard estimates what *tuning itself* gains out of sample: in each of `tune_folds`
    folds the grid's best setting is picked on the other folds and scored on this one; the
    out-of-fold predictions are pooled into one macro-F1 and compared with the defaults'.
    The full-set best is adopted only if that gain is at least `tune_min_gain`; otherwise
    the defaults stay, because a grid maximum on a few hundred rows is mostly noise.
    """
    y = np.asarray(y, dtype=np.int64)
    # y may index labels beyond `classes` (valid-set classes no model knows): they stay errors.
    n, k = len(y), max(len(classes), int(y.max()) + 1 if len(y) else 0)
    default = (config.text_threshold, config.image_threshold, config.blend_weight)
    thresholds = sorted(set(THRESHOLD_GRID) | {config.text_threshold, config.image_threshold})
    weights = sorted(set(WEIGHT_GRID) | {config.blend_weight})
    grid = grid_predictions(text_p, image_p, has_text, has_image, list(classes).index(fallback), thresholds, weights)
    default_idx = grid.settings.index(tuple(float(v) for v in default))
    everything = np.arange(n)
    best_idx, scores = _best(grid, y, everything, k, default)
    order = np.argsort(-scores, kind="stable")[:5]
    top = [dict(zip(("text_threshold", "image_threshold", "blend_weight"), grid.settings[i]), macro_f1=float(scores[i])) for i in order]
    result = dict(
        default=default, tuned_best=grid.settings[best_idx], default_f1=float(scores[default_idx]),
        best_f1=float(scores[best_idx]), top=top,
    )
    n_folds = config.tune_folds
    if n < 10 * n_folds:
        return TuneResult(
            chosen=default, cv_gain=None, accepted=False,
            reason=f"only {n} labelled rows (< {10 * n_folds}): too few to trust a tuned setting; kept the defaults",
            **result,
        )
    oof_tuned = np.empty(n, dtype=np.int64)
    for fit_rows, held_rows in _folds(y, n_folds, config.seed):
        idx, _ = _best(grid, y, fit_rows, k, default)
        oof_tuned[held_rows] = grid.preds[idx][held_rows]
    cv_gain = fast_macro_f1(y, oof_tuned, k) - fast_macro_f1(y, grid.preds[default_idx], k)
    accepted = best_idx != default_idx and cv_gain >= config.tune_min_gain
    if best_idx == default_idx:
        reason = "the defaults are already the grid's best"
    elif accepted:
        reason = f"tuning gains {cv_gain:+.4f} macro-F1 out of fold (>= {config.tune_min_gain}); adopted the grid's best"
    else:
        reason = (
            f"tuning changes macro-F1 out of fold by {cv_gain:+.4f} (a gain of {config.tune_min_gain} is needed): "
            "the full-set gain is likely noise; kept the defaults"
        )
    return TuneResult(chosen=grid.settings[best_idx] if accepted else default, cv_gain=float(cv_gain),
                      accepted=accepted, reason=reason, **result)


def format_tune(result: TuneResult) -> str:
    """The grid's best settings against the defaults, and the decision."""
    lines = ["text_thr  image_thr  blend_w  macro-F1 (validation)"]
    for row in result.top:
        lines.append(f"{row['text_threshold']:8.2f}  {row['image_threshold']:9.2f}  {row['blend_weight']:7.2f}  {row['macro_f1']:8.4f}")
    d = result.default
    lines.append(f"{d[0]:8.2f}  {d[1]:9.2f}  {d[2]:7.2f}  {result.default_f1:8.4f}  <- defaults")
    if result.cv_gain is not None:
        lines.append(f"cross-validated gain of tuning over the defaults: {result.cv_gain:+.4f}")
    c = result.chosen
    lines.append(f"chosen: text_threshold={c[0]} image_threshold={c[1]} blend_weight={c[2]} ({result.reason})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- settings file


def settings_path(text_model: Path | None, image_model: Path | None) -> Path:
    """Where tuned settings live: `fusion.json` in the folder that holds the model folders."""
    anchor = text_model or image_model
    return (anchor.parent if anchor is not None else Path("models")) / SETTINGS_NAME


def save_settings(path: Path, config: FusionConfig, **provenance) -> None:
    """Write the FusionConfig as a plain dict plus where it came from (models, tuning evidence)."""
    write_json(path, {"config": asdict(config), **provenance})


def load_settings(path: Path) -> tuple[FusionConfig, dict]:
    """Read `fusion.json` back into (FusionConfig, the whole dict); a bad file is a one-line error."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise MuseumError(f"{path}: not a museum fusion settings file; delete it or re-run museum tune")
    try:
        config = config_from_dict(FusionConfig, data["config"])
    except TypeError as exc:
        raise MuseumError(f"{path}: bad settings ({exc}); delete it or re-run museum tune") from None
    return config, data


def merge_config(base: FusionConfig, overrides: dict) -> FusionConfig:
    """`base` with every non-None override applied (explicit CLI options beat saved settings)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
