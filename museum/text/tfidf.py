"""The linear n-gram expert: TF-IDF word (1–2) and char_wb (2–5) n-grams → LinearSVC,
calibrated into probabilities by temperature scaling fitted on out-of-fold SVC scores
(a single scale keeps the SVC's argmax, which a full logistic re-fit was measured to hurt).

Everything it needs to predict is stored as arrays and a vocabulary (`to_state` /
`from_state`), never as a pickle, so a model folder can be loaded without trusting it.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.svm import LinearSVC

from museum.calibration import fit_temperature, softmax
from museum.text.charwb import CharWbTransformer
from museum.text.tokenize import normalise

_VECTORIZERS = {
    "word": dict(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b|№"),
    "char": dict(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
}


class TfidfExpert:
    """TF-IDF n-grams + class-balanced LinearSVC with calibrated probabilities."""

    def __init__(self, c: float = 0.2, seed: int = 0) -> None:
        self.c = c
        self.seed = seed

    def _features(self, texts: list[str]) -> sp.csr_matrix:
        texts = [normalise(t) for t in texts]
        return sp.hstack([self._transform(name, v, texts) for name, v in self.vectorizers_.items()]).tocsr()

    def _transform(self, name: str, vectorizer: TfidfVectorizer, texts: list[str]) -> sp.csr_matrix:
        """`vectorizer.transform`, through the word-cached `CharWbTransformer` for char_wb n-grams (same matrix)."""
        fast = self._char_wb.get(name)
        return fast.transform(texts) if fast is not None else vectorizer.transform(texts)

    def _set_vectorizers(self, vectorizers: dict[str, TfidfVectorizer]) -> None:
        """Fitted vectorizers, and a fresh word cache for each char_wb one."""
        self.vectorizers_ = vectorizers
        self._char_wb = {n: CharWbTransformer(v) for n, v in vectorizers.items() if v.analyzer == "char_wb"}

    def fit(self, texts: list[str], labels: list[str]) -> "TfidfExpert":
        self.classes_ = sorted(set(labels))
        y = np.searchsorted(self.classes_, labels)
        self._set_vectorizers({
            name: TfidfVectorizer(dtype=np.float32, **params).fit([normalise(t) for t in texts])
            for name, params in _VECTORIZERS.items()
        })
        x = self._features(texts)
        svc = LinearSVC(C=self.c, class_weight="balanced")
        n_splits = int(min(3, max(2, np.bincount(y).min())))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rare classes smaller than the fold count
            folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.seed)
            scores = cross_val_predict(svc, x, y, cv=folds, method="decision_function")
        svc.fit(x, y)
        self.coef_ = svc.coef_.astype(np.float32)
        self.intercept_ = svc.intercept_.astype(np.float32)
        scores = scores.reshape(len(y), -1)
        # cross_val_predict scores a class absent from a fold's training part with the
        # lowest float; give it the lowest real score instead so the calibration stays finite.
        absent = scores < -1e100
        if absent.any():
            scores[absent] = scores[~absent].min()
        self.temperature_ = fit_temperature(scores, y)
        return self

    def decision_function(self, texts: list[str]) -> np.ndarray:
        return (self._features(texts) @ self.coef_.T + self.intercept_).reshape(len(texts), -1)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Probabilities with columns in `classes_` order."""
        return softmax(self.decision_function(texts) * self.temperature_)

    # -- plain-type state -------------------------------------------------------------------
    def to_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able metadata, named arrays) that fully describe the fitted expert."""
        meta = {
            "c": self.c,
            "classes": self.classes_,
            "temperature": self.temperature_,
            "vocabularies": {n: {k: int(i) for k, i in v.vocabulary_.items()} for n, v in self.vectorizers_.items()},
        }
        arrays = {
            "coef": self.coef_,
            "intercept": self.intercept_,
        }
        arrays.update({f"idf_{n}": v.idf_.astype(np.float64) for n, v in self.vectorizers_.items()})
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "TfidfExpert":
        expert = cls(c=meta["c"])
        expert.classes_ = list(meta["classes"])
        vectorizers = {}
        for name, params in _VECTORIZERS.items():
            vectorizer = TfidfVectorizer(dtype=np.float32, **params)
            vectorizer.vocabulary_ = dict(meta["vocabularies"][name])
            vectorizer.idf_ = arrays[f"idf_{name}"]
            vectorizers[name] = vectorizer
        expert._set_vectorizers(vectorizers)
        expert.coef_ = arrays["coef"]
        expert.intercept_ = arrays["intercept"]
        expert.temperature_ = float(meta["temperature"])
        return expert

