"""A fast `transform` for scikit-learn's `char_wb` TF-IDF vectorizer: the same matrix, built per word.

`char_wb` n-grams never cross a word boundary, so a text's n-gram counts are the sum of its
words' counts. scikit-learn cuts and looks up every n-gram of every text in a Python loop
(about 190 per description, most of the text model's prediction time); here each distinct word
is cut once, its vocabulary indices are cached, and a text costs a lookup per word.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from museum.text.tokenize import Chunks, ChunkTable, paused_gc, split_chunks

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
    """`vectorizer.transform(texts)` for a fitted `TfidfVectorizer(analyzer="char_wb")`, with a word cache.

    The cache is a `ChunkTable`: a row of n-gram indices per whitespace-separated word met so far,
    i.e. a sparse (words × n-grams) matrix; a call builds the (texts × words) counts and multiplies,
    both in C. `prepare` (e.g. `normalise`) is applied to each word first, as if to the whole text:
    it must work character by character."""

    def __init__(self, vectorizer: TfidfVectorizer, prepare: Callable[[str], str] | None = None) -> None:
        if vectorizer.analyzer != "char_wb" or not vectorizer.lowercase or vectorizer.preprocessor is not None \
                or vectorizer.strip_accents is not None:
            raise ValueError("CharWbTransformer reproduces plain lower-cased char_wb vectorizers only")
        self.vectorizer = vectorizer
        self.prepare = prepare
        self._words = ChunkTable(self._indices, limit=MAX_CACHED_WORDS)
        self._ones = np.ones(0, dtype=np.float32)

    def _indices(self, word: str) -> list[int]:
        vocabulary = self.vectorizer.vocabulary_
        min_n, max_n = self.vectorizer.ngram_range
        word = (self.prepare(word) if self.prepare else word).lower()
        return [j for j in map(vocabulary.get, word_ngrams(word, min_n, max_n)) if j is not None]

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        return self.transform_chunks(split_chunks(texts))

    def transform_chunks(self, chunks: Chunks) -> sp.csr_matrix:
        """`transform` of texts given as their `split_chunks` (str.split() is the whitespace rule
        scikit-learn's char_wb analyser applies, after lower-casing, which keeps whitespace as it is)."""
        with paused_gc():
            rows = self._words.ids(chunks.distinct)[chunks.where]
        table = self._words
        if len(self._ones) < len(table.values):
            self._ones = np.ones(2 * len(table.values), dtype=np.float32)
        # int32 indices throughout: scipy would copy the whole table to widen them.
        words = sp.csr_matrix((self._ones[:len(table.values)], table.values, table.indptr.astype(np.int32)),
                              shape=(len(table), len(self.vectorizer.vocabulary_)))
        per_text = counts_matrix(rows, len(table), chunks.counts)
        # Integer counts, exact in float32. Indices come out unsorted: only float32 summation order
        # could tell, and normalize sums squares in float64.
        return tfidf_weigh(per_text @ words, self.vectorizer)


def counts_matrix(indices: np.ndarray, n_columns: int, lengths: np.ndarray) -> sp.csr_matrix:
    """CSR counts: row i holds the next `lengths[i]` column `indices`, each a 1. A column listed twice in a
    row is stored twice (products count it twice; `sum_duplicates` would merge it)."""
    indptr = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=indptr[1:])
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), np.asarray(indices, dtype=np.int32), indptr),
                         shape=(len(lengths), n_columns))


def tfidf_weigh(counts: sp.csr_matrix, v: TfidfVectorizer) -> sp.csr_matrix:
    """scikit-learn's TfidfTransformer steps on a count matrix, in its order: sublinear tf, idf, l2 norm."""
    x = counts
    if x.shape[0] == 0:  # normalize refuses an empty matrix
        return x
    if v.sublinear_tf:
        np.log(x.data, x.data)
        x.data += 1.0
    x.data *= v.idf_[x.indices]
    return normalize(x, norm=v.norm, copy=False)
