"""scikit-learn classifiers ("heads") on frozen, standardised backbone embeddings.

On a few hundred images a linear model on pretrained features trains in seconds where
fine-tuning takes minutes on a CPU, and is often about as good. Every head is class-balanced
and picks its hyper-parameters from a small grid by stratified cross-validated macro-F1
(on at most SEARCH_ROWS rows), then is refitted on all rows.

Fitted heads are stored as plain arrays (`head.npz`) plus their settings (`head.json`) and
rebuilt by setting the fitted attributes on a fresh estimator (or, for k-NN, by refitting
on the stored vectors): no pickles, and the rebuilt head gives identical probabilities.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC
from sklearn.utils.class_weight import compute_sample_weight

from museum.calibration import fit_temperature, softmax
from museum.config import IMAGE_HEADS
from museum.errors import MuseumError, load_failure
from museum.utils import atomic_path, read_json, write_json

HEADS = IMAGE_HEADS  # finetune, then the scikit-learn heads
HEAD_FORMAT = "museum-head/2"
MLP_HIDDEN = 128
# The MLP sees the top principal components only: on ~4,000-d stage features L-BFGS took 36–49 s
# per search on a few hundred images; on 256 components it takes a few seconds.
MLP_COMPONENTS = 256
# The grid search sees at most this many rows (a stratified subsample); the chosen setting is
# refitted on all rows. On 6,400 images × 3,904 features a full search of the SVM ran past 10 min;
# searching 2,000 rows still took 100 s, 1,000 rows 16 s (+ 22 s for the refit), at 0.0-0.02 lower macro-F1.
SEARCH_ROWS = 1000


class BalancedKNN(KNeighborsClassifier):
    """k-NN whose votes are divided by the class priors: a large class no longer wins by its mass."""

    def fit(self, X, y):
        super().fit(X, y)
        counts = np.bincount(np.searchsorted(self.classes_, y), minlength=len(self.classes_)).astype(np.float64)
        self.prior_ = counts / counts.sum()
        return self

    def predict_proba(self, X):
        p = super().predict_proba(X) / self.prior_
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine geometry for k-NN)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _search_space(kind: str, seed: int) -> tuple[Any, dict]:
    # Grids for standardised features of a few thousand dimensions: strong regularisation wins
    # (measured on the character sets' 80/20 splits; the best values sat inside these ranges).
    if kind == "logreg":
        return LogisticRegression(class_weight="balanced", max_iter=3000), {"C": [0.003, 0.01, 0.03, 0.1]}
    if kind == "svm":
        # The dual solver: on 6,400 rows × 3,904 features one fit took 22 s against 67 s for the primal.
        return (LinearSVC(class_weight="balanced", dual=True, max_iter=5000, random_state=seed),
                {"C": [0.0003, 0.001, 0.003, 0.01]})
    if kind == "mlp":
        # Balanced through sample weights (MLPClassifier has no class_weight). L-BFGS: on a few
        # thousand rows it converges in far fewer passes than Adam, and deterministically.
        return (MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), solver="lbfgs", max_iter=200, random_state=seed),
                {"alpha": [1.0, 10.0, 100.0]})
    if kind == "knn":
        return BalancedKNN(weights="distance", algorithm="brute"), {"n_neighbors": [3, 7, 15]}
    raise MuseumError(f"--head {kind}: expected one of {', '.join(HEADS)}")


def row_space(x: np.ndarray) -> np.ndarray:
    """(d, r) orthonormal basis of the span of the rows of `x` (r ≤ n rows).

    An L2-regularised linear model's weights always lie in the span of its training rows
    (representer theorem), so with fewer rows than features, logistic regression and the linear
    SVM fitted on `x @ basis` are the full-width models exactly, in r instead of d dimensions:
    on 362 images × 3,904 stage features the SVM search went from 4.3 s to well under one.
    Every cross-validation fold's rows lie in the same span, so the search is exact as well.
    """
    _, s, vt = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    rank = int((s > s[0] * max(x.shape) * np.finfo(np.float32).eps).sum()) if len(s) else 0
    return np.ascontiguousarray(vt[:max(rank, 1)].T, dtype=np.float32)


def cv_folds(y: np.ndarray, seed: int) -> StratifiedKFold | None:
    """5 stratified folds (fewer when the smallest class is smaller); None when a class has < 2 rows."""
    smallest = int(np.bincount(y).min()) if len(y) else 0
    if smallest < 2:
        return None
    return StratifiedKFold(n_splits=min(5, smallest), shuffle=True, random_state=seed)


@dataclass
class Head:
    """A fitted head; `predict_proba` has one column per class index 0..n_classes-1."""

    kind: str
    estimator: Any
    n_classes: int
    params: dict = field(default_factory=dict)
    temperature: float = 1.0  # LinearSVC margins → probabilities
    mean: np.ndarray | None = None  # standardisation fitted on the training features
    scale: np.ndarray | None = None
    projection: np.ndarray | None = None  # (d, k) principal directions, for the MLP

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """Standardised features (unit-length for k-NN, projected for the MLP): what the estimator was fitted on."""
        x = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        if self.projection is not None:
            x = x @ self.projection
        return l2_normalize(x) if self.kind == "knn" else x

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        with threadpool_limits(1):  # see `fit_head`
            return self._predict_proba(self.prepare(features))

    def _predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "svm":
            p = softmax(np.asarray(self.estimator.decision_function(x), dtype=np.float64).reshape(len(x), -1) * self.temperature)
        else:
            p = self.estimator.predict_proba(x)
        out = np.zeros((len(x), self.n_classes), dtype=np.float32)
        out[:, np.asarray(self.estimator.classes_, dtype=np.int64)] = p
        return out

    # ---------------------------------------------------------------- persistence

    def to_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        est = self.estimator
        meta = {"format": HEAD_FORMAT, "kind": self.kind, "n_classes": self.n_classes, "params": self.params,
                "temperature": self.temperature, "classes": [int(c) for c in est.classes_],
                "n_features": int(est.n_features_in_)}
        if self.kind in ("logreg", "svm"):
            arrays = {"coef": est.coef_, "intercept": np.asarray(est.intercept_)}
        elif self.kind == "mlp":
            arrays = {f"coef_{i}": c for i, c in enumerate(est.coefs_)}
            arrays |= {f"intercept_{i}": b for i, b in enumerate(est.intercepts_)}
            meta.update(activation=est.activation, out_activation=est.out_activation_, layers=len(est.coefs_))
        else:
            arrays = {"x": est._fit_X, "y": np.asarray(est.classes_)[est._y]}
        arrays |= {"feature_mean": self.mean, "feature_scale": self.scale}
        if self.projection is not None:
            arrays["projection"] = self.projection
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "Head":
        kind, classes = meta["kind"], np.array(meta["classes"], dtype=np.int64)
        est, _ = _search_space(kind, 0)
        est.set_params(**meta["params"])
        if kind == "knn":
            est.fit(arrays["x"], arrays["y"])  # k-NN's fitted state is its training vectors
        else:
            est.classes_, est.n_features_in_ = classes, meta["n_features"]
            if kind == "mlp":
                est.coefs_ = [arrays[f"coef_{i}"] for i in range(meta["layers"])]
                est.intercepts_ = [arrays[f"intercept_{i}"] for i in range(meta["layers"])]
                est.n_layers_, est.out_activation_ = meta["layers"] + 1, meta["out_activation"]
                est.n_outputs_ = est.coefs_[-1].shape[1]
            else:
                est.coef_, est.intercept_ = arrays["coef"], arrays["intercept"]
        return cls(kind, est, int(meta["n_classes"]), dict(meta["params"]), float(meta["temperature"]),
                   arrays["feature_mean"], arrays["feature_scale"], arrays.get("projection"))

    def save(self, folder: str | Path) -> None:
        meta, arrays = self.to_state()
        with atomic_path(Path(folder) / "head.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        write_json(Path(folder) / "head.json", meta)

    @classmethod
    def load(cls, folder: str | Path) -> "Head":
        folder = Path(folder)
        meta = read_json(folder / "head.json")
        if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
            raise MuseumError(f"{folder / 'head.json'}: not a head of this package; retrain with train-image --head")
        try:
            with np.load(folder / "head.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return cls.from_state(meta, arrays)
        except (OSError, KeyError, ValueError) as exc:
            raise MuseumError(f"{folder / 'head.npz'}: unreadable head ({load_failure(exc)}); retrain with train-image --head") from None


def fit_head(kind: str, features: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> tuple[Head, dict]:
    """Search the head's small grid by stratified CV macro-F1, refit the best on all rows.

    Returns the head and what the search found (best params, CV macro-F1, every grid point).
    """
    # These matrices are small (hundreds of rows): a multi-threaded BLAS spends more time
    # synchronising than computing, 50x slower on a busy 2-core machine than one thread.
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # capped iterations are part of the search
        return _fit_head(kind, features, y, n_classes, seed)


def _fit_head(kind: str, features: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> tuple[Head, dict]:
    start = time.perf_counter()
    features = np.asarray(features, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    std = features.std(axis=0)
    prepared = Head(kind, None, n_classes, mean=features.mean(axis=0), scale=np.where(std > 1e-6, std, 1.0).astype(np.float32))
    sub = search_rows(y, SEARCH_ROWS, seed)
    if kind == "mlp" and features.shape[1] > MLP_COMPONENTS:
        # With fewer rows than that, all of them span the data: nothing is lost.
        _, _, vt = np.linalg.svd(prepared.prepare(features[sub]), full_matrices=False)
        prepared.projection = np.ascontiguousarray(vt[:MLP_COMPONENTS].T, dtype=np.float32)
    x = prepared.prepare(features)
    estimator, grid = _search_space(kind, seed)
    folds = cv_folds(y[sub], seed)
    if kind == "knn":  # no more neighbours than the smallest training part has rows
        fewest = len(sub) - -(-len(sub) // folds.get_n_splits()) if folds else len(y)
        grid = {"n_neighbors": [k for k in grid["n_neighbors"] if k <= fewest] or [max(1, min(fewest, len(y)))]}
    info: dict = {"kind": kind, "folds": folds.get_n_splits() if folds else 0, "search_rows": len(sub)}
    x_all, basis = _solver_space(kind, x)
    x_sub = x_all if len(sub) == len(y) else _solver_space(kind, x[sub])[0]
    scores = None
    if folds is None or len(np.unique(y)) < 2:
        params = {k: v[0] for k, v in grid.items()}  # too few rows per class to cross-validate
        info.update(params=params, cv_macro_f1=None, grid=[])
    else:
        search = GridSearchCV(estimator, grid, scoring="f1_macro", cv=folds, n_jobs=1, refit=False)
        search.fit(x_sub, y[sub], **_fit_params(kind, y[sub]))
        params = dict(search.best_params_)
        info.update(params=params, cv_macro_f1=float(search.best_score_),
                    grid=[{"params": p, "macro_f1": float(s)}
                          for p, s in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"])])
        if kind == "svm":  # held-out margins, for the temperature below
            scores = cross_val_predict(clone(estimator).set_params(**params), x_sub, y[sub], cv=folds,
                                       method="decision_function")
    estimator.set_params(**params).fit(x_all, y, **_fit_params(kind, y))
    temperature = 1.0
    if kind == "svm":
        # Margins are not probabilities: scale them by the temperature that fits held-out rows best.
        held_out = scores is not None
        scores = np.asarray(scores if held_out else estimator.decision_function(x_all), dtype=np.float64)
        target = y[sub] if held_out else y
        temperature = fit_temperature(scores.reshape(len(target), -1), np.searchsorted(estimator.classes_, target))
        info["temperature"] = temperature
    if basis is not None:  # back to the full feature space: the stored head needs no basis
        estimator.coef_ = np.ascontiguousarray(estimator.coef_ @ basis.T)
        estimator.n_features_in_ = basis.shape[0]
    info["seconds"] = round(time.perf_counter() - start, 2)
    return Head(kind, estimator, n_classes, {k: _plain(v) for k, v in params.items()}, temperature,
                prepared.mean, prepared.scale, prepared.projection), info


def _fit_params(kind: str, y: np.ndarray) -> dict:
    # MLPClassifier has no class_weight: balance it through sample weights.
    return {"sample_weight": compute_sample_weight("balanced", y)} if kind == "mlp" else {}


def _solver_space(kind: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows as the solver sees them, basis or None): linear heads with more features than rows work in the rows' span."""
    if kind in ("logreg", "svm") and x.shape[1] > x.shape[0]:
        basis = row_space(x)
        return x @ basis, basis
    return x, None


def search_rows(y: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subsample of at most about `limit` rows (all rows when fewer).

    Every class keeps its share, and at least 2 rows when it has them, so cross-validation still sees it.
    """
    if len(y) <= limit:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        take = min(len(rows), max(2, int(round(limit * len(rows) / len(y)))))
        picked.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def describe(info: dict) -> str:
    cv = info.get("cv_macro_f1")
    return (f"{info['kind']} head: {json.dumps(info['params'])}"
            + (f", {info['folds']}-fold CV macro-F1 {cv:.4f}" if cv is not None else ", no CV (too few rows per class)")
            + f", {info['seconds']:.1f}s")
