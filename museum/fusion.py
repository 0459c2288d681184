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

Learned rules (fitted on out-of-fold probabilities, see `museum.crossfit`) share the cascade's
interface (`classes`, `fallback`, `combine` → `CascadeResult`) and routes: a row with one
modality is decided by that expert (`text` / `image`), a row with both by the rule (`blend`),
a row with neither by the fallback. `choose_fusion` picks the default cascade, a tuned
cascade, `WeightedRule` or `StackerRule` by an inner cross-validation; `rule_from_settings`
rebuilds the saved choice (a `fusion.json` without a rule gives the cascade, as before).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Sequence

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
    rule: str = "cascade"  # the rule that routed these rows (`kind` of the rule object)

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
    kind: ClassVar[str] = "cascade"

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


# ----------------------------------------------------------------------------- learned rules

# Probabilities are floored before the log: an aligned 0 (a class the fold's expert never saw)
# stays a strong vote against, not an infinite one.
LOG_FLOOR = 1e-6


def _availability_routes(has_text: np.ndarray, has_image: np.ndarray) -> np.ndarray:
    """Route per row for a learned rule: BLEND with both modalities, else the one it has, else FALLBACK."""
    return np.select([has_text & has_image, has_text, has_image], [BLEND, TEXT, IMAGE], default=FALLBACK).astype(np.int8)


def _log_proba(proba: np.ndarray, usable: np.ndarray, known: np.ndarray | None) -> np.ndarray:
    """log p with rows that are not usable set to 0; columns of classes the expert does not know
    (`known` False) get log(1 / number it knows): it has no say about them, for or against."""
    logp = np.log(np.clip(np.nan_to_num(np.asarray(proba, np.float64), nan=1.0), LOG_FLOOR, None))
    if known is not None and not np.all(known):
        logp[:, ~known] = -np.log(max(int(np.sum(known)), 1))
    return np.where(usable[:, None], logp, 0.0)


def _softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _result(rule, routes: np.ndarray, sources: dict[int, np.ndarray]) -> CascadeResult:
    """Each row's probabilities from `sources[its route]` (NaN read as 0); FALLBACK rows one-hot."""
    proba = np.zeros((len(routes), len(rule.classes)))
    proba[:, rule.classes.index(rule.fallback)] = 1.0
    for code, source in sources.items():
        rows = routes == code
        proba[rows] = np.nan_to_num(np.asarray(source, np.float64)[rows], nan=0.0)
    return CascadeResult(proba=proba, routes=routes, pred=np.argmax(proba, axis=1), rule=rule.kind)


def _check_rule(classes: list[str], fallback: str) -> None:
    Cascade(classes, fallback=fallback)  # the same one-line errors as the cascade's


@dataclass
class WeightedRule:
    """A weighted geometric mean of the experts on rows with both: softmax(w_t · log p_text + w_i · log p_image).

    The two weights are each expert's weight and inverse temperature at once, fitted by log-loss
    on out-of-fold rows; they work for every class, including classes absent from those rows.
    """

    classes: list[str]
    text_weight: float
    image_weight: float
    fallback: str
    text_known: list[bool] | None = None  # per class: the text expert knows it (None: all)
    image_known: list[bool] | None = None
    kind: ClassVar[str] = "weighted"

    def __post_init__(self) -> None:
        _check_rule(self.classes, self.fallback)

    def log_views(self, text_p, image_p, has_text, has_image) -> tuple[np.ndarray, np.ndarray]:
        """(log p_text, log p_image) as the rule weighs them (see `_log_proba`)."""
        known = lambda mask: None if mask is None else np.asarray(mask, bool)  # noqa: E731
        return (_log_proba(text_p, np.asarray(has_text, bool), known(self.text_known)),
                _log_proba(image_p, np.asarray(has_image, bool), known(self.image_known)))

    def combine(self, text_p, image_p, has_text, has_image) -> CascadeResult:
        lt, li = self.log_views(text_p, image_p, has_text, has_image)
        fused = _softmax64(self.text_weight * lt + self.image_weight * li)
        routes = _availability_routes(np.asarray(has_text, bool), np.asarray(has_image, bool))
        return _result(self, routes, {TEXT: text_p, IMAGE: image_p, BLEND: fused})

    def to_dict(self) -> dict:
        return {"kind": self.kind, "text_weight": self.text_weight, "image_weight": self.image_weight,
                "text_known": self.text_known, "image_known": self.image_known}


def fit_weighted(text_p, image_p, has_text, has_image, y, classes, fallback,
                 text_known=None, image_known=None) -> WeightedRule:
    """The weights minimising log-loss on the rows with both modalities whose label a model knows."""
    from scipy.optimize import minimize

    rule = WeightedRule(list(classes), 1.0, 1.0, fallback, text_known, image_known)
    rows = np.asarray(has_text, bool) & np.asarray(has_image, bool) & (np.asarray(y) < len(classes))
    if not rows.any():
        return rule
    everywhere = np.ones(int(rows.sum()), bool)
    lt, li = rule.log_views(text_p[rows], image_p[rows], everywhere, everywhere)
    target = np.asarray(y)[rows]

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        p = _softmax64(w[0] * lt + w[1] * li)
        picked = np.arange(len(target)), target
        loss = -np.log(np.clip(p[picked], 1e-300, None)).mean()
        # d loss / d w_e = mean over rows of (E_p[log p_e] - log p_e[y])
        grad = [((p * s).sum(1) - s[picked]).mean() for s in (lt, li)]
        return float(loss), np.array(grad)

    best = minimize(nll, np.array([1.0, 1.0]), jac=True, method="L-BFGS-B", bounds=[(0.0, 10.0)] * 2)
    rule.text_weight, rule.image_weight = (round(float(v), 6) for v in best.x)
    return rule


@dataclass
class StackerRule:
    """Multinomial logistic regression on [log p_text, log p_image, has_text, has_image] (balanced classes).

    Learns per-class trust in each expert and class priors. It can only rank the classes its
    training rows held (`seen`); when the experts know more, the `base` rule (a `WeightedRule`)
    decides how much probability those others get, and the regression shares out the rest.
    Single-modality rows see zeros for the other expert's block, so they use that one alone.
    """

    classes: list[str]
    coef: list[list[float]]  # (classes, 2 * classes + 2); rows of unseen classes are 0
    intercept: list[float]
    fallback: str
    seen: list[bool] | None = None  # per class: the regression was fitted on it (None: all)
    base: dict | None = None  # `WeightedRule.to_dict()` for the classes not seen
    kind: ClassVar[str] = "stacker"

    def __post_init__(self) -> None:
        _check_rule(self.classes, self.fallback)
        k = len(self.classes)
        if np.shape(self.coef) != (k, 2 * k + 2) or len(self.intercept) != k or (self.seen is not None and len(self.seen) != k):
            raise MuseumError(f"stacker weights of shape {np.shape(self.coef)} do not fit {k} classes; re-run museum tune")
        if self.seen is not None and not all(self.seen) and self.base is None:
            raise MuseumError("stacker fitted on some classes only but without a base rule for the others; re-run museum tune")

    def combine(self, text_p, image_p, has_text, has_image) -> CascadeResult:
        has_text, has_image = np.asarray(has_text, bool), np.asarray(has_image, bool)
        seen = np.ones(len(self.classes), bool) if self.seen is None else np.asarray(self.seen, bool)
        scores = stacker_features(text_p, image_p, has_text, has_image) @ np.asarray(self.coef).T + np.asarray(self.intercept)
        fused = np.zeros_like(scores)
        if len(scores):
            fused[:, seen] = _softmax64(scores[:, seen])  # single-modality rows too: priors and trust re-weighed
        if not seen.all():
            base = rule_from_dict(self.base, self.classes, self.fallback).combine(text_p, image_p, has_text, has_image).proba
            fused = base[:, seen].sum(1, keepdims=True) * fused + np.where(seen, 0.0, base)
        return _result(self, _availability_routes(has_text, has_image), {TEXT: fused, IMAGE: fused, BLEND: fused})

    def to_dict(self) -> dict:
        return {"kind": self.kind, "coef": self.coef, "intercept": self.intercept, "seen": self.seen, "base": self.base}


def stacker_features(text_p, image_p, has_text, has_image) -> np.ndarray:
    has_text, has_image = np.asarray(has_text, bool), np.asarray(has_image, bool)
    return np.hstack([_log_proba(text_p, has_text, None), _log_proba(image_p, has_image, None),
                      has_text[:, None].astype(float), has_image[:, None].astype(float)])


STACKER_C = 0.1  # L2 strength: ~16 features per class on a few hundred rows


def fit_stacker(text_p, image_p, has_text, has_image, y, classes, fallback, text_known=None, image_known=None,
                seed: int = 0) -> StackerRule:
    """Fit the regression on rows with at least one modality and a label a model knows; when those rows
    miss some of `classes`, also the weighted base rule that gives those classes their share."""
    from sklearn.linear_model import LogisticRegression

    k = len(classes)
    y = np.asarray(y)
    rows = (np.asarray(has_text, bool) | np.asarray(has_image, bool)) & (y < k)
    coef, intercept = np.zeros((k, 2 * k + 2)), np.zeros(k)
    seen = np.zeros(k, bool)
    seen[np.unique(y[rows])] = True
    if seen.sum() > 1:
        model = LogisticRegression(C=STACKER_C, class_weight="balanced", max_iter=2000, random_state=seed)
        model.fit(stacker_features(text_p, image_p, has_text, has_image)[rows], y[rows])
        w, b = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # sklearn's binary form: one row for the second class
            w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
        coef[model.classes_], intercept[model.classes_] = w, b
    base = None
    if not seen.all():
        base = fit_weighted(text_p, image_p, has_text, has_image, y, classes, fallback, text_known, image_known).to_dict()
    return StackerRule(list(classes), coef.round(8).tolist(), intercept.round(8).tolist(), fallback,
                       None if seen.all() else seen.tolist(), base)


FusionRule = Cascade | WeightedRule | StackerRule


def rule_to_dict(rule: FusionRule) -> dict:
    if isinstance(rule, Cascade):
        return {"kind": "cascade", "text_threshold": rule.text_threshold, "image_threshold": rule.image_threshold,
                "blend_weight": rule.blend_weight}
    return rule.to_dict()


def rule_from_dict(data: dict, classes: list[str], fallback: str) -> FusionRule:
    kind = data.get("kind")
    if kind == "cascade":
        return Cascade(list(classes), data["text_threshold"], data["image_threshold"], data["blend_weight"], fallback)
    if kind == "weighted":
        return WeightedRule(list(classes), float(data["text_weight"]), float(data["image_weight"]), fallback,
                            data.get("text_known"), data.get("image_known"))
    if kind == "stacker":
        return StackerRule(list(classes), data["coef"], data["intercept"], fallback, data.get("seen"), data.get("base"))
    raise MuseumError(f"unknown fusion rule {kind!r}; re-run museum tune")


# ----------------------------------------------------------------------------- choosing a rule

CANDIDATES = ("default", "cascade", "weighted", "stacker")
INNER_REPEATS = 3  # the inner cross-validation is repeated over seeds seed, seed+1, ... and averaged


def grouped_folds(y: np.ndarray, n_folds: int, seed: int, groups: Sequence | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified folds; with `groups`, rows of one group always share a fold (StratifiedGroupKFold)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    if groups is None:
        return _folds(np.asarray(y), n_folds, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes rarer than n_folds: fine, scores are pooled
        splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), np.asarray(y), np.asarray(groups)))


@dataclass
class FusionChoice:
    """The chosen rule (fitted on every row) and the inner cross-validation that chose it."""

    rule: FusionRule
    name: str  # one of CANDIDATES
    # candidate -> {"all": macro-F1, "both": macro-F1} pooled out of fold, mean over repeats; fitted candidates
    # also "worst_gain": their smallest all-rows gain over the default in any repeat
    estimates: dict
    default_f1: float
    chosen_f1: float
    reason: str
    skipped: dict = field(default_factory=dict)  # candidate -> why it was not tried
    rows: int = 0
    both_rows: int = 0
    candidates: dict = field(default_factory=dict, repr=False)  # every tried rule, fitted on all rows (benchmarks)

    def to_dict(self) -> dict:
        return {"name": self.name, "estimates": self.estimates,
                "default_f1": self.default_f1, "chosen_f1": self.chosen_f1, "reason": self.reason,
                "skipped": self.skipped, "rows": self.rows, "both_rows": self.both_rows}


def choose_fusion(
    text_p: np.ndarray,
    image_p: np.ndarray,
    has_text: np.ndarray,
    has_image: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    fallback: str,
    config: FusionConfig,
    text_known: Sequence[bool] | None = None,
    image_known: Sequence[bool] | None = None,
    groups: Sequence | None = None,
) -> FusionChoice:
    """Pick the fusion rule for out-of-fold probabilities: the default cascade (config's thresholds),
    a tuned cascade, `WeightedRule` or `StackerRule`.

    Each candidate is fitted on the other folds and scored on the held one (`config.tune_folds`
    folds, grouped by `groups` when given, repeated `INNER_REPEATS` times with other fold seeds); the
    pooled macro-F1 on all rows decides. A candidate replaces the default only if it gains at least
    `config.tune_min_gain` in every repeat; the best such one (mean over repeats), refitted on every
    row, is chosen. `y` indexes `classes`; values beyond them are labels no model knows (always errors).
    """
    classes = list(classes)
    y = np.asarray(y, dtype=np.int64)
    has_text, has_image = np.asarray(has_text, bool), np.asarray(has_image, bool)
    n, k = len(y), max(len(classes), int(y.max()) + 1 if len(y) else 0)
    both = has_text & has_image
    default = Cascade(classes, config.text_threshold, config.image_threshold, config.blend_weight, fallback)
    default_pred = default.combine(text_p, image_p, has_text, has_image).pred
    scores = lambda pred: {"all": fast_macro_f1(y, pred, k),  # noqa: E731
                           "both": fast_macro_f1(y[both], pred[both], k) if both.any() else float("nan")}
    estimates = {"default": scores(default_pred)}
    skipped: dict[str, str] = {}
    if not both.any():
        skipped.update(weighted="no row has both modalities", stacker="no row has both modalities")
    elif len(set(y.tolist()) & set(range(len(classes)))) < 2:
        skipped["stacker"] = "the labelled rows hold fewer than two of the classes the experts know"
    if n < 10 * config.tune_folds:
        reason = f"only {n} labelled rows (< {10 * config.tune_folds}): too few to trust a fitted rule; kept the default cascade"
        return FusionChoice(default, "default", estimates, estimates["default"]["all"], estimates["default"]["all"],
                            reason, skipped, n, int(both.sum()))

    grid = grid_predictions(text_p, image_p, has_text, has_image, classes.index(fallback),
                            sorted(set(THRESHOLD_GRID) | {config.text_threshold, config.image_threshold}),
                            sorted(set(WEIGHT_GRID) | {config.blend_weight}))
    default_setting = (config.text_threshold, config.image_threshold, config.blend_weight)

    def fit(name: str, rows: np.ndarray) -> FusionRule:
        if name == "cascade":
            tt, it, w = grid.settings[_best(grid, y, rows, k, default_setting)[0]]
            return Cascade(classes, tt, it, w, fallback)
        args = (text_p[rows], image_p[rows], has_text[rows], has_image[rows], y[rows], classes, fallback)
        if name == "weighted":
            return fit_weighted(*args, text_known, image_known)
        return fit_stacker(*args, text_known, image_known, seed=config.seed)

    tried = [c for c in CANDIDATES[1:] if c not in skipped]
    base = estimates["default"]["all"]
    for name in tried:
        runs = []
        for repeat in range(INNER_REPEATS):
            pred = np.empty(n, dtype=np.int64)
            for fit_rows, held in grouped_folds(y, config.tune_folds, config.seed + repeat, groups):
                rule = fit(name, fit_rows)
                pred[held] = rule.combine(text_p[held], image_p[held], has_text[held], has_image[held]).pred
            runs.append(scores(pred))
        estimates[name] = {key: float(np.mean([r[key] for r in runs])) for key in ("all", "both")}
        estimates[name]["worst_gain"] = float(min(r["all"] for r in runs) - base)
    fitted = {"default": default, **{name: fit(name, np.arange(n)) for name in tried}}
    # A candidate must gain in every repeat, not on average only: with a few hundred rows one lucky
    # fold assignment is enough to make a flexible rule look better than it is.
    eligible = [c for c in tried if estimates[c]["worst_gain"] >= config.tune_min_gain]
    best = max(eligible, key=lambda c: estimates[c]["all"], default=None)  # ties: the simpler (earlier) rule
    if best is not None:
        gain = estimates[best]["all"] - base
        reason = (f"{best} gains {gain:+.4f} macro-F1 out of fold over the default (at least "
                  f"{estimates[best]['worst_gain']:+.4f} in each of {INNER_REPEATS} repeats, >= {config.tune_min_gain}); adopted")
        return FusionChoice(fitted[best], best, estimates, base, estimates[best]["all"], reason, skipped,
                            n, int(both.sum()), fitted)
    top = max(tried, key=lambda c: estimates[c]["all"], default=None)
    reason = ("no candidate was tried" if top is None else
              f"no candidate gains {config.tune_min_gain} in every repeat (best, {top}: {estimates[top]['all'] - base:+.4f} "
              f"on average, {estimates[top]['worst_gain']:+.4f} at worst); kept the default cascade")
    return FusionChoice(default, "default", estimates, base, base, reason, skipped, n, int(both.sum()), fitted)


def format_choice(choice: FusionChoice) -> str:
    """The candidates' inner cross-validated macro-F1 and the decision, as `tune --cross-fit` prints it."""
    lines = [f"fusion rule    macro-F1 all rows (n={choice.rows})  rows with both (n={choice.both_rows})  "
             "worst gain   [inner CV]"]
    for name, est in choice.estimates.items():
        mark = "  <- chosen" if name == choice.name else ""
        worst = f"{est['worst_gain']:+11.4f}" if "worst_gain" in est else " " * 11
        lines.append(f"{name:<14} {est['all']:>26.4f}  {est['both']:>22.4f}  {worst}{mark}")
    for name, why in choice.skipped.items():
        lines.append(f"{name:<14} skipped: {why}")
    lines.append(f"chosen: {choice.name}, {describe_rule(choice.rule)} ({choice.reason})")
    return "\n".join(lines)


def describe_rule(rule: FusionRule) -> str:
    """One line for logs: the rule's settings."""
    if isinstance(rule, Cascade):
        return f"text > {rule.text_threshold}, image > {rule.image_threshold}, blend weight {rule.blend_weight}"
    if isinstance(rule, WeightedRule):
        return f"rows with both: softmax({rule.text_weight:.3f} log p_text + {rule.image_weight:.3f} log p_image)"
    return "logistic regression on both experts' log-probabilities and availability"


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


def save_fusion(path: Path, choice: FusionChoice, config: FusionConfig, **provenance) -> None:
    """`fusion.json` for a chosen rule: `rule` (what `rule_from_settings` rebuilds), `classes` (its column
    order), `fusion` (the inner cross-validation) and `config`, whose thresholds are the chosen cascade's
    (else `config`'s), so that a reader that knows only `config` still routes with a cascade."""
    rule = choice.rule
    if isinstance(rule, Cascade):
        config = replace(config, text_threshold=rule.text_threshold, image_threshold=rule.image_threshold,
                         blend_weight=rule.blend_weight)
    save_settings(path, config, **{"classes": list(rule.classes), **provenance, "rule": rule_to_dict(rule),
                                   "fusion": choice.to_dict()})


def rule_from_settings(settings: dict | None, classes: Sequence[str], config: FusionConfig) -> FusionRule:
    """The rule a loaded `fusion.json` names, over `classes` (the experts' union) with `config.fallback`.

    No file, a file without a rule (older ones, plain `museum tune`) or a cascade rule: the cascade of
    `config`, so explicit threshold options still apply. A learned rule needs the same class list."""
    rule = (settings or {}).get("rule")
    if not isinstance(rule, dict) or rule.get("kind") == "cascade":
        return Cascade.from_config(list(classes), config)
    saved = settings.get("classes")
    if saved is not None and list(saved) != list(classes):
        raise MuseumError(f"the saved {rule.get('kind')} fusion was fitted for classes {list(saved)}, the models now "
                          f"know {list(classes)}; re-run museum tune --cross-fit")
    try:
        return rule_from_dict(rule, list(classes), config.fallback or "")
    except (KeyError, TypeError, ValueError) as exc:
        raise MuseumError(f"bad fusion rule in the settings ({type(exc).__name__}: {exc}); re-run museum tune") from None


def merge_config(base: FusionConfig, overrides: dict) -> FusionConfig:
    """`base` with every non-None override applied (explicit CLI options beat saved settings)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
