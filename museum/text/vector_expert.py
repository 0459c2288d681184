"""The word-vector expert: logistic regression over pretrained (navec) word vectors.

TF-IDF only knows the n-grams it was trained on; a mineral, a weapon or a tool named by a word
that never occurs in the training rows is lost to it. Pretrained vectors place such words near
their kin, so this expert sees each description as [vector of its first known word ; mean of
its known words' vectors] (the first word usually names the object: «Монета», «Песчаник»,
«Фотография»). Alone it is weak (5-fold CV macro-F1 ≈ 0.54), but blended with TF-IDF it added
≈ +0.02 on every fold (see scripts/bench_text.py).

The vectors it needs (navec rows for every word of the training and unlabelled texts) are
stored with the model, so predicting never needs navec installed; words first met at predict
time count as unknown, as they do for the BiLSTM.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from museum.calibration import softmax


class WordVectorExpert:
    """[first known word ; mean of known words] pretrained vectors → balanced logistic regression."""

    def __init__(self, c: float = 0.03, seed: int = 0) -> None:
        self.c = c
        self.seed = seed

    def _raw_features(self, token_lists: list[list[str]]) -> np.ndarray:
        dim = self.vectors_.shape[1]
        out = np.zeros((len(token_lists), 2 * dim), dtype=np.float32)
        for i, tokens in enumerate(token_lists):
            rows = [self.index_[t] for t in tokens if t in self.index_]
            if rows:
                out[i, :dim] = self.vectors_[rows[0]]
                out[i, dim:] = self.vectors_[rows].mean(axis=0)
        return out

    def _features(self, token_lists: list[list[str]]) -> np.ndarray:
        return (self._raw_features(token_lists) - self.mean_) / self.scale_

    def fit(self, token_lists: list[list[str]], labels: list[str], words: list[str], vectors: np.ndarray) -> "WordVectorExpert":
        """`words`/`vectors`: the pretrained table (only words that occur in the texts need be there)."""
        self.classes_ = sorted(set(labels))
        self.words_ = list(words)
        self.index_ = {w: i for i, w in enumerate(self.words_)}
        # Stored as float16: fit on the rounded values so a loaded model predicts exactly the same.
        self.vectors_ = np.asarray(vectors, dtype=np.float16).astype(np.float32)
        raw = self._raw_features(token_lists)
        self.mean_ = raw.mean(axis=0)
        self.scale_ = np.where(raw.std(axis=0) > 1e-6, raw.std(axis=0), 1.0).astype(np.float32)
        head = LogisticRegression(C=self.c, max_iter=3000, class_weight="balanced", random_state=self.seed)
        head.fit((raw - self.mean_) / self.scale_, np.searchsorted(self.classes_, labels))
        self.coef_ = head.coef_.astype(np.float32)
        self.intercept_ = head.intercept_.astype(np.float32)
        self._projected = None  # `_logits` projects the vectors on first use
        return self

    def predict_proba(self, token_lists: list[list[str]]) -> np.ndarray:
        """Probabilities with columns in `classes_` order."""
        lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
        return self.predict_proba_rows(self.word_rows([t for tokens in token_lists for t in tokens]), lengths)

    def word_rows(self, tokens: list[str]) -> np.ndarray:
        """Each token's row in the vector table, -1 for a word it does not know."""
        get = self.index_.get
        return np.array([get(t, -1) for t in tokens], dtype=np.int64)

    def predict_proba_rows(self, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """`predict_proba` of texts given as their tokens' `word_rows`, end to end, `lengths[i]` for text i."""
        return self._softmax(self._logits(rows, lengths))

    def predict_proba_reference(self, token_lists: list[list[str]]) -> np.ndarray:
        """`predict_proba` computed feature by feature, as the model was fitted (the fast path's reference)."""
        return self._softmax(self._features(token_lists) @ self.coef_.T + self.intercept_)

    @staticmethod
    def _softmax(logits: np.ndarray) -> np.ndarray:
        if logits.shape[1] == 1:  # scikit-learn's binary form: one logit for the second class
            logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        return softmax(logits)

    def _logits(self, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The logits without building features: the model is linear in them, so each word's vector is
        projected onto the classes once (in float64) and a text sums its first known word's projection
        and the mean of its known words' projections."""
        if getattr(self, "_projected", None) is None:
            dim = self.vectors_.shape[1]
            weights = self.coef_.astype(np.float64) / self.scale_.astype(np.float64)
            vectors = self.vectors_.astype(np.float64)
            self._projected = (vectors @ weights[:, :dim].T, vectors @ weights[:, dim:].T)
            self._zero_logit = self.intercept_.astype(np.float64) - weights @ self.mean_.astype(np.float64)
        first_part, mean_part = self._projected
        text = np.repeat(np.arange(len(lengths)), lengths)
        known = rows >= 0
        rows, text = rows[known], text[known]
        logits = np.tile(self._zero_logit, (len(lengths), 1))
        if len(rows):
            counts = np.bincount(text, minlength=len(lengths))
            has = counts > 0
            starts = np.searchsorted(text, np.flatnonzero(has))  # each text's first known word
            logits[has] += first_part[rows[starts]] + np.add.reduceat(mean_part[rows], starts, axis=0) / counts[has, None]
        return logits.astype(np.float32)

    # -- plain-type state -------------------------------------------------------------------
    def to_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"c": self.c, "classes": self.classes_, "words": self.words_}
        arrays = {"vectors": self.vectors_.astype(np.float16), "mean": self.mean_, "scale": self.scale_,
                  "coef": self.coef_, "intercept": self.intercept_}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "WordVectorExpert":
        expert = cls(c=meta["c"])
        expert.classes_ = list(meta["classes"])
        expert.words_ = list(meta["words"])
        expert.index_ = {w: i for i, w in enumerate(expert.words_)}
        expert.vectors_ = arrays["vectors"].astype(np.float32)
        expert.mean_, expert.scale_ = arrays["mean"], arrays["scale"]
        expert.coef_, expert.intercept_ = arrays["coef"], arrays["intercept"]
        return expert


def pretrained_table(token_lists: list[list[str]], navec) -> tuple[list[str], np.ndarray]:
    """navec rows for the alphabetic words of `token_lists` that navec knows."""
    words = sorted({t for tokens in token_lists for t in tokens if t.isalpha() and t in navec})
    vectors = np.stack([navec[w] for w in words]).astype(np.float32) if words else np.zeros((0, navec.pq.dim), np.float32)
    return words, vectors
