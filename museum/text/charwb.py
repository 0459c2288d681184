"""A fast `transform` for scikit-learn's `char_wb` TF-IDF vectorizer: the same matrix, built per word.

`char_wb` n-grams never cross a word boundary, so a text's n-gram counts are the sum of its
words' counts. scikit-learn cuts and looks up every n-gram of every text in a Python loop
(about 190 per description, most of the text model's prediction time); here each distinct word
is cut once, its vocabulary indices are cached, and a text costs a lookup per word.
"""

from __future__ import annotations

import gc
from collections import Counter
from itertools import chain

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

MAX_CACHED_WORDS = 500_000  # ~100 MB at most; catalogue text repeats a few tens of thousands of words


def word_ngrams(word: str, min_n: int, max_n: int) -> list[str]:
    """`char_wb` n-grams of one word, as scikit-learn cuts them (a word shorter than n counts once, whole)."""
    padded = f" {word} "
    grams: list[str] = []
    for n in range(min_n, max_n + 1):
        if len(padded) <= n:
            grams.append(padded)
            break
        grams.extend(padded[i:i + n] for i in range(len(padded) - n + 1))
    return grams


class CharWbTransformer:
    """`vectorizer.transform(texts)` for a fitted `TfidfVectorizer(analyzer="char_wb")`, with a word cache."""

    def __init__(self, vectorizer: TfidfVectorizer) -> None:
        if vectorizer.analyzer != "char_wb" or not vectorizer.lowercase or vectorizer.preprocessor is not None \
                or vectorizer.strip_accents is not None:
            raise ValueError("CharWbTransformer reproduces plain lower-cased char_wb vectorizers only")
        self.vectorizer = vectorizer
        self._cache: dict[str, list[int]] = {}

    def _indices(self, word: str) -> list[int]:
        found = self._cache.get(word)
        if found is None:
            vocabulary = self.vectorizer.vocabulary_
            min_n, max_n = self.vectorizer.ngram_range
            found = [j for j in map(vocabulary.get, word_ngrams(word, min_n, max_n)) if j is not None]
            if len(self._cache) < MAX_CACHED_WORDS:
                self._cache[word] = found
        return found

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        v = self.vectorizer
        indices: list[int] = []
        counts: list[int] = []
        indptr = [0]
        # No reference cycles are made here, but filling the cache allocates enough containers to set
        # off full collections that walk the whole loaded model: a process's first call took 0.22 s
        # instead of 0.07 s on test.csv's 676 descriptions until the collector was paused.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for text in texts:
                # str.split() is the whitespace rule scikit-learn's char_wb analyser applies after lower-casing.
                counted = Counter(chain.from_iterable(map(self._indices, text.lower().split())))
                indices.extend(counted.keys())
                counts.extend(counted.values())
                indptr.append(len(indices))
        finally:
            if collecting:
                gc.enable()
        x = sp.csr_matrix((np.array(counts, dtype=v.dtype), np.array(indices, dtype=np.int32),
                           np.array(indptr, dtype=np.int32)), shape=(len(texts), len(v.vocabulary_)))
        x.sort_indices()
        # scikit-learn's TfidfTransformer steps, in its order: sublinear tf, idf, l2 norm.
        if v.sublinear_tf:
            np.log(x.data, x.data)
            x.data += 1.0
        x.data *= v.idf_[x.indices]
        return normalize(x, norm=v.norm, copy=False)
