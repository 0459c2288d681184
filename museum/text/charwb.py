"""A fast `transform` for scikit-learn's `char_wb` TF-IDF vectorizer: the same matrix, built per word.

`char_wb` n-grams never cross a word boundary, so a text's n-gram counts are the sum of its
words' counts. scikit-learn cuts and looks up every n-gram of every text in a Python loop
(about 190 per description, most of the text model's prediction time); here each distinct word
is cut once (all new words of a call together, with numpy: `NgramCodes`), its vocabulary indices
are cached (a `ChunkTable`), and the counts of a call's texts are one sparse product.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from museum.text.tokenize import Chunks, ChunkTable, paused_gc, prepare_chunks, split_chunks

MAX_CACHED_WORDS = 500_000  # ~100 MB at most; catalogue text repeats a few tens of thousands of words


def word_ngrams(word: str, min_n: int, max_n: int) -> list[str]:
    """`char_wb` n-grams of one word, as scikit-learn cuts them (a word shorter than n counts once, whole)."""
    padded = f" {word} "
    size = len(padded)
    grams = [padded[i:i + n] for n in range(min_n, min(max_n + 1, size)) for i in range(size - n + 1)]
    if size <= max_n:  # scikit-learn's n = size (or the first n past it) takes the whole padded word once, then stops
        grams.append(padded)
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
        self._codes = NgramCodes(vectorizer.vocabulary_, vectorizer.ngram_range[1])
        compute_many = self._indices_many if self._codes.usable else None
        self._words = ChunkTable(self._indices, limit=MAX_CACHED_WORDS, compute_many=compute_many)
        self._ones = np.ones(0, dtype=np.float32)

    def _word(self, chunk: str) -> str:
        return (self.prepare(chunk) if self.prepare else chunk).lower()

    def _indices(self, chunk: str) -> list[int]:
        vocabulary = self.vectorizer.vocabulary_
        min_n, max_n = self.vectorizer.ngram_range
        return [j for j in map(vocabulary.get, word_ngrams(self._word(chunk), min_n, max_n)) if j is not None]

    def _indices_many(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`_indices` of many words at once, with numpy: every window of every padded word encoded as
        an integer and looked up among the vocabulary's (4 instead of 14 µs of CPU a word on train.csv)."""
        padded = [f" {word} " for word in prepare_chunks(chunks, self._word)]
        sizes = np.fromiter(map(len, padded), np.int64, len(padded))
        digits = self._codes.digits("".join(padded))
        ends = np.cumsum(sizes)
        word_of = np.repeat(np.arange(len(padded)), sizes)
        end_of = np.repeat(ends, sizes)
        min_n, max_n = self.vectorizer.ngram_range
        words, keys = [], []
        for n in range(min_n, max_n + 1):
            starts = np.flatnonzero(np.arange(len(digits)) + n <= end_of)
            key, known = self._codes.keys(digits, starts, n)
            words.append(word_of[starts[known]])
            keys.append(key[known])
        # scikit-learn counts a padded word shorter than min_n once, whole (longer ones are covered:
        # the window n = size is the whole word, and no longer window fits).
        short = np.flatnonzero(sizes < min_n)
        for size in np.unique(sizes[short]):
            of_size = short[sizes[short] == size]
            key, known = self._codes.keys(digits, ends[of_size] - size, int(size))
            words.append(of_size[known])
            keys.append(key[known])
        words, columns = self._codes.columns(np.concatenate(words), np.concatenate(keys))
        order = np.argsort(words, kind="stable")
        return np.bincount(words, minlength=len(chunks)), columns[order].astype(np.int32)

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        return self.transform_chunks(split_chunks(texts))

    def transform_chunks(self, chunks: Chunks) -> sp.csr_matrix:
        """`transform` of texts given as their `split_chunks` (str.split() is the whitespace rule
        scikit-learn's char_wb analyser applies, after lower-casing, which keeps whitespace as it is)."""
        with paused_gc():
            rows, indptr, values = self._words.rows(chunks)
        ones = self._ones
        if len(ones) < len(values):
            ones = self._ones = np.ones(2 * len(values), dtype=np.float32)
        # int32 indices throughout: scipy would copy the whole table to widen them.
        words = sp.csr_matrix((ones[:len(values)], values, indptr.astype(np.int32)),
                              shape=(len(indptr) - 1, len(self.vectorizer.vocabulary_)))
        per_text = counts_matrix(rows, len(indptr) - 1, chunks.counts)
        # Integer counts, exact in float32. Indices come out unsorted: only float32 summation order
        # could tell, and normalize sums squares in float64.
        return tfidf_weigh(per_text @ words, self.vectorizer)


class NgramCodes:
    """Character n-grams (up to `max_n` characters) as integers: each character becomes its rank in the
    vocabulary's alphabet plus one (0: a character no vocabulary n-gram has), an n-gram the base-B number
    of its characters, first character lowest. Unequal strings get unequal codes, so a window's code
    finds its vocabulary column by binary search. `usable` is False when B**max_n overflows int64."""

    def __init__(self, vocabulary: dict[str, int], max_n: int) -> None:
        terms = list(vocabulary)
        joined = "".join(terms)
        self.alphabet = np.unique(_code_points(joined))
        self.base = len(self.alphabet) + 1
        self.usable = bool(terms) and self.base ** max_n < 2 ** 62 and max(map(len, terms)) <= max_n
        if not self.usable:
            return
        lengths = np.fromiter(map(len, terms), np.int64, len(terms))
        keys = np.zeros(len(terms), dtype=np.int64)
        digits = self.digits(joined)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for k in range(int(lengths.max())):
            has = lengths > k
            keys[has] += digits[starts[has] + k] * self.base ** k
        order = np.argsort(keys)
        self.sorted_keys = keys[order]
        self.sorted_columns = np.fromiter(vocabulary.values(), np.int64, len(terms))[order]

    def digits(self, text: str) -> np.ndarray:
        points = _code_points(text)
        at = np.minimum(np.searchsorted(self.alphabet, points), len(self.alphabet) - 1)
        return np.where(self.alphabet[at] == points, at + 1, 0).astype(np.int64)

    def keys(self, digits: np.ndarray, starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes of the n-character windows at `starts`, whether each has only alphabet characters)."""
        key = np.zeros(len(starts), dtype=np.int64)
        known = np.ones(len(starts), dtype=bool)
        for k in range(n):
            d = digits[starts + k]
            known &= d > 0
            key += d * self.base ** k
        return key, known

    def columns(self, rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(`rows` of the `keys` that are vocabulary n-grams, their vocabulary columns)."""
        at = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        hit = self.sorted_keys[at] == keys
        return rows[hit], self.sorted_columns[at[hit]]


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)


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
