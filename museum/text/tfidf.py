"""The linear n-gram expert: TF-IDF word (1–2) and char_wb (2–5) n-grams → LinearSVC,
calibrated into probabilities by temperature scaling fitted on out-of-fold SVC scores
(a single scale keeps the SVC's argmax, which a full logistic re-fit was measured to hurt).

Everything it needs to predict is stored as arrays and a vocabulary (`to_state` /
`from_state`), never as a pickle, so a model folder can be loaded without trusting it.

Features are built by `WordNgramTransformer` and `CharWbTransformer` (charwb.py): scikit-learn's
matrices exactly (tests/test_text_speed.py), from caches of whitespace-separated chunks;
`predict_proba_reference` goes through scikit-learn's own `transform`.
"""

from __future__ import annotations

import warnings
from itertools import chain, repeat
from typing import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.svm import LinearSVC

from museum.calibration import fit_temperature, softmax
from museum.text.charwb import CharWbTransformer, tfidf_weigh
from museum.text.tokenize import Chunks, ChunkTable, normalise, paused_gc, prepare_chunks, split_chunks

_VECTORIZERS = {
    "word": dict(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b|№"),
    "char": dict(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
}


class WordNgramTransformer:
    """`vectorizer.transform(texts)` for a fitted word (1–2)-gram `TfidfVectorizer`, counted with numpy.

    scikit-learn tokenizes every text with a regex, joins every adjacent token pair into a string
    and looks it up. Here each whitespace-separated chunk is tokenized once into integer token ids
    (a `ChunkTable`; no token pattern here spans whitespace), and a bigram is found by binary search
    among the vocabulary's bigrams, encoded as pairs of token ids. Same matrix, several times faster.
    `prepare` (e.g. `normalise`) is applied to each chunk first, as if to the whole text: it must work
    character by character.
    """

    cache_limit = 200_000  # distinct chunks kept; then the cache starts afresh

    def __init__(self, vectorizer: TfidfVectorizer, prepare: Callable[[str], str] | None = None) -> None:
        if vectorizer.analyzer != "word" or vectorizer.ngram_range != (1, 2) or vectorizer.stop_words is not None \
                or vectorizer.binary or vectorizer.input != "content" or vectorizer.tokenizer is not None \
                or vectorizer.preprocessor is not None or vectorizer.strip_accents is not None:
            raise ValueError("WordNgramTransformer reproduces plain word (1, 2)-gram vectorizers only")
        self.vectorizer = vectorizer
        self.prepare = prepare
        self._analyse = (vectorizer.build_preprocessor(), vectorizer.build_tokenizer())
        vocabulary = vectorizer.vocabulary_
        pairs = [(term.split(" "), j) for term, j in vocabulary.items() if " " in term]
        # Token ids: unigram terms, then tokens seen only inside bigrams (possible in a hand-made vocabulary).
        self._token_id = {term: i for i, term in enumerate(t for t in vocabulary if " " not in t)}
        for (a, b), _ in pairs:
            for token in (a, b):
                self._token_id.setdefault(token, len(self._token_id))
        self._unigram_column = np.full(len(self._token_id) + 1, -1, dtype=np.int64)  # [-1]: unknown token
        for term, i in self._token_id.items():
            self._unigram_column[i] = vocabulary.get(term, -1)
        n_tokens = len(self._token_id)
        keys = np.array([self._token_id[a] * n_tokens + self._token_id[b] for (a, b), _ in pairs], dtype=np.int64)
        order = np.argsort(keys)
        self._bigram_keys = keys[order]
        self._bigram_column = np.array([j for _, j in pairs], dtype=np.int64)[order]
        self._chunks = ChunkTable(compute_many=self._token_ids, limit=self.cache_limit)

    def _token_ids(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(how many tokens each new chunk has, their token ids end to end, -1 for a token not in the vocabulary)."""
        preprocess, tokenize = self._analyse
        prepare = self.prepare
        token_lists = list(map(tokenize, prepare_chunks(chunks, lambda s: preprocess(prepare(s) if prepare else s))))
        lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
        ids = np.fromiter(map(self._token_id.get, chain.from_iterable(token_lists), repeat(-1)), np.int32, int(lengths.sum()))
        return lengths, ids

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        return self.transform_chunks(split_chunks(texts))

    def transform_chunks(self, chunks: Chunks) -> sp.csr_matrix:
        """`transform` of texts given as their `split_chunks`."""
        with paused_gc():
            ids, lengths = self._chunks.lookup(chunks)
        n = len(chunks)
        ids = ids.astype(np.int64)
        row = np.repeat(np.arange(n), lengths)
        unigram = self._unigram_column[ids]
        # Adjacent pairs within a text; a pair with an unknown token is no vocabulary bigram.
        first, second = ids[:-1], ids[1:]
        known = (row[1:] == row[:-1]) & (first >= 0) & (second >= 0)
        keys = first[known] * len(self._token_id) + second[known]
        at = np.minimum(np.searchsorted(self._bigram_keys, keys), max(len(self._bigram_keys) - 1, 0))
        found = self._bigram_keys[at] == keys if len(self._bigram_keys) else np.zeros(len(keys), dtype=bool)
        columns = np.concatenate([unigram[unigram >= 0], self._bigram_column[at[found]]])
        rows = np.concatenate([row[unigram >= 0], row[1:][known][found]])
        v = self.vectorizer
        matrix = sp.csr_matrix((np.ones(len(columns), dtype=v.dtype), (rows, columns)), shape=(n, len(v.vocabulary_)))
        matrix.sum_duplicates()
        return tfidf_weigh(matrix, v)


class TfidfExpert:
    """TF-IDF n-grams + class-balanced LinearSVC with calibrated probabilities."""

    def __init__(self, c: float = 0.2, seed: int = 0) -> None:
        self.c = c
        self.seed = seed

    def _blocks(self, texts: list[str], reference: bool = False, chunks: Chunks | None = None) -> list[sp.csr_matrix]:
        """Each vectorizer's TF-IDF matrix: through `WordNgramTransformer` / `CharWbTransformer` (the same
        values, the char_wb rows' indices unsorted), or with `reference` through scikit-learn's `transform`.
        `chunks`: `split_chunks(texts)`, when the caller has it already."""
        if reference:
            texts = [normalise(t) for t in texts]
            return [v.transform(texts) for v in self.vectorizers_.values()]
        if chunks is None:
            chunks = split_chunks(texts)  # normalised chunk by chunk, in the transformers' caches
        return [self._fast[name].transform_chunks(chunks) for name in self.vectorizers_]

    def _features(self, texts: list[str], reference: bool = False) -> sp.csr_matrix:
        x = sp.hstack(self._blocks(texts, reference)).tocsr()
        x.sort_indices()  # what the SVC is fitted on: scikit-learn's canonical matrix
        return x

    def _set_vectorizers(self, vectorizers: dict[str, TfidfVectorizer]) -> None:
        """Fitted vectorizers; their fast transformers (with empty caches) are made on first use."""
        self.vectorizers_ = vectorizers
        self._fast_transformers = None

    @property
    def _fast(self) -> dict:
        if getattr(self, "_fast_transformers", None) is None:
            kinds = {"char_wb": CharWbTransformer, "word": WordNgramTransformer}
            with paused_gc():  # tens of thousands of small lists: collections walking the model took 0.14 s
                self._fast_transformers = {n: kinds[v.analyzer](v, prepare=normalise) for n, v in self.vectorizers_.items()}
        return self._fast_transformers

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

    def decision_function(self, texts: list[str], chunks: Chunks | None = None) -> np.ndarray:
        # Block by block: the same sum as the stacked matrix's, without stacking it.
        scores = np.tile(self.intercept_, (len(texts), 1))
        for block, coef in zip(self._blocks(texts, chunks=chunks), self._coef_blocks()):
            scores += block @ coef
        return scores.reshape(len(texts), -1)

    def _coef_blocks(self) -> list[np.ndarray]:
        """`coef_.T` cut at the vectorizers' boundaries, C-ordered (scipy copies any other layout every call)."""
        cached = getattr(self, "_coef_cache", None)
        if cached is None or cached[0] is not self.coef_:
            bounds = np.cumsum([0] + [len(v.vocabulary_) for v in self.vectorizers_.values()])
            cached = self._coef_cache = (self.coef_, [np.ascontiguousarray(self.coef_[:, a:b].T)
                                                      for a, b in zip(bounds[:-1], bounds[1:])])
        return cached[1]

    def predict_proba(self, texts: list[str], chunks: Chunks | None = None) -> np.ndarray:
        """Probabilities with columns in `classes_` order (`chunks`: `split_chunks(texts)`, if at hand)."""
        return softmax(self.decision_function(texts, chunks) * self.temperature_)

    def predict_proba_reference(self, texts: list[str]) -> np.ndarray:
        """`predict_proba` through scikit-learn's vectorizers and the stacked matrix (the fast path's reference)."""
        scores = (self._features(texts, reference=True) @ self.coef_.T + self.intercept_).reshape(len(texts), -1)
        return softmax(scores * self.temperature_)

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

