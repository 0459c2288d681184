"""Tokenizer for Russian museum-catalogue descriptions.

Catalogue text is short and formulaic («Монета. 2 копейки. 1789 г.», «Фото. Иванов И.И.»):
the tokenizer lower-cases, folds «ё» into «е», keeps common abbreviations with their dot
(«г.», «вв.», «худ.») as single tokens, keeps «№», and replaces numbers by their shape
(a 4-digit year carries era information; other numbers rarely do).
"""

from __future__ import annotations

import gc
import re
import threading
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Callable

import numpy as np

# Abbreviations frequent in catalogue text; kept with the dot so «г.» (year) ≠ «г» (letter).
ABBREVIATIONS = frozenset(
    "г гг в вв н э см мм кг гр ед хр худ изд им ул д т тт с стр илл ил экз инв арх кол коп руб".split()
)
YEAR_TOKEN = "<year>"
NUMBER_TOKEN = "<num>"

_TOKEN = re.compile(r"№|\d+(?:[.,]\d+)?|[^\W\d_]+(?:-[^\W\d_]+)*\.?", re.UNICODE)


def normalise(text: str) -> str:
    return text.lower().replace("ё", "е")


def tokenize(text: str) -> list[str]:
    """Split a description into tokens.

    >>> tokenize("Монета. 2 копейки. 1789 г. № 5")
    ['монета', '<num>', 'копейки', '<year>', 'г.', '№', '<num>']
    """
    # No token spans whitespace and lower-casing is per character, so a text's tokens are those of
    # its whitespace-separated chunks, each tokenized once and then looked up: 2.6 instead of 8.2 µs
    # of CPU per train.csv description (Python's regex engine is slow on Cyrillic text).
    return list(chain.from_iterable(map(_CHUNKS.__getitem__, text.split())))


class _ChunkCache(dict):
    """chunk → its tokens, filled on first lookup; cleared when full."""

    limit = 200_000  # catalogue text repeats a few tens of thousands of distinct words

    def __missing__(self, chunk: str) -> list[str]:
        if len(self) >= self.limit:
            self.clear()
        found = self[chunk] = tokenize_uncached(chunk)
        return found


_CHUNKS = _ChunkCache()


def _token_of(raw: str) -> str:
    """The token of one regex match: numbers by shape, abbreviations with their dot, other words without."""
    if raw[0].isdigit():
        digits = raw.replace(",", ".").split(".")[0]
        return YEAR_TOKEN if len(digits) == 4 and raw.isdigit() else NUMBER_TOKEN
    if raw.endswith("."):
        word = raw[:-1]
        return raw if word in ABBREVIATIONS else word
    return raw


def tokenize_uncached(text: str) -> list[str]:
    """`tokenize` without the cache (the reference it is tested against)."""
    return [_token_of(match.group()) for match in _TOKEN.finditer(normalise(text))]


def prepare_chunks(chunks: list[str], prepare: Callable[[str], str]) -> list[str]:
    """`[prepare(c) for c in chunks]` in one call: the chunks joined by newlines, prepared, split again.
    For chunks without whitespace and a `prepare` that works character by character (lower-casing,
    «ё» folding: even the final-sigma rule looks no further than whitespace)."""
    return prepare("\n".join(chunks)).split("\n") if chunks else []


def tokenize_chunks(chunks: list[str]) -> list[list[str]]:
    """`[tokenize_uncached(c) for c in chunks]` for chunks without whitespace, normalised in one call."""
    findall = _TOKEN.findall
    return [[_token_of(raw) for raw in findall(chunk)] for chunk in prepare_chunks(chunks, normalise)]


@dataclass
class Chunks:
    """Texts as their whitespace-separated chunks: `distinct` chunks (first-seen order), `where` each
    chunk occurrence is among them (text after text), `counts` how many occurrences each text has.

    The unit of the prediction caches: no token of this tokenizer or of the TF-IDF vectorizers spans
    whitespace, and lower-casing and «ё» folding work character by character. A `ChunkTable` looks
    up each distinct chunk of a call once."""

    distinct: list[str]
    where: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)


def split_chunks(texts: list[str]) -> Chunks:
    parts = list(map(str.split, texts))
    counts = np.fromiter(map(len, parts), np.int64, len(parts))
    every = list(chain.from_iterable(parts))
    place = {chunk: i for i, chunk in enumerate(dict.fromkeys(every))}
    return Chunks(list(place), np.fromiter(map(place.__getitem__, every), np.int64, len(every)), counts)


class ChunkTable:
    """Distinct chunks → a sequence of ints each, computed once per chunk: `compute(chunk)`, or
    `compute_many(chunks)` → (lengths, values end to end) for all new chunks of a call at once.

    The sequences are stored end to end (chunk c's at ``values[indptr[c]:indptr[c+1]]``, a CSR
    matrix's arrays), so a call's texts are turned into ints by numpy gathers, not a Python loop per
    token. At `limit` chunks the table starts afresh. Safe to share between threads: lookups and
    additions hold a lock, and a lookup answers from arrays that later additions never rewrite."""

    def __init__(self, compute: Callable[[str], list[int]] | None = None, limit: int = 200_000,
                 compute_many: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.compute = compute
        self.compute_many = compute_many or self._each
        self.limit = limit
        self._lock = threading.Lock()
        self.clear()

    def __getstate__(self) -> dict:  # a pickled model (joblib, a deepcopy) gets a lock of its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _each(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        sequences = [self.compute(c) for c in chunks]
        lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
        return lengths, np.fromiter(chain.from_iterable(sequences), np.int32, int(lengths.sum()))

    def clear(self) -> None:
        self._id: dict[str, int] = {}
        self._indptr = np.zeros(1024, dtype=np.int64)
        self._values = np.zeros(4096, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._id)

    def rows(self, chunks: Chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the table row of every chunk occurrence, text after text; the table's indptr and values as
        they stand, covering those rows), computing the chunks not met before."""
        distinct = chunks.distinct
        with self._lock:
            found = np.fromiter(map(self._id.get, distinct, repeat(-1)), np.int64, len(distinct))
            missing = np.flatnonzero(found < 0)
            if len(missing):
                if len(self._id) + len(missing) > self.limit:
                    self.clear()
                    missing = np.arange(len(distinct))
                self._add([distinct[i] for i in missing])
                found = np.fromiter(map(self._id.__getitem__, distinct), np.int64, len(distinct))
            n = len(self._id)
            indptr = self._indptr[:n + 1]
            return found[chunks.where], indptr, self._values[:indptr[n]]

    def lookup(self, chunks: Chunks) -> tuple[np.ndarray, np.ndarray]:
        """(the values of every chunk occurrence of `chunks`' texts end to end, how many each text has)."""
        rows, indptr, values = self.rows(chunks)
        starts = indptr[rows]
        lengths = indptr[rows + 1] - starts
        per_chunk_end = np.concatenate([[0], np.cumsum(lengths)])
        text_bounds = np.concatenate([[0], np.cumsum(chunks.counts)])
        return values[ranges(starts, lengths)], np.diff(per_chunk_end[text_bounds])

    def _add(self, chunks: list[str]) -> None:
        lengths, flat = self.compute_many(chunks)
        first, start = len(self._id), int(self._indptr[len(self._id)])
        # Grown by copying, filled past the used part only: arrays handed out stay as they were.
        self._indptr = _grown(self._indptr, first + len(chunks) + 1)
        self._values = _grown(self._values, start + len(flat))
        self._indptr[first + 1:first + len(chunks) + 1] = start + np.cumsum(lengths)
        self._values[start:start + len(flat)] = flat
        self._id.update(zip(chunks, range(first, first + len(chunks))))


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` for each pair, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Each range's first element jumps from the previous range's end; every other step is +1.
    steps = np.ones(total, dtype=np.int64)
    firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nonempty = lengths > 0
    previous_end = np.concatenate([[0], (starts + lengths)[nonempty][:-1] - 1])
    steps[firsts[nonempty]] = starts[nonempty] - previous_end
    return np.cumsum(steps)


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    """`array` with room for `size` elements (doubling, so appends cost amortised O(1))."""
    if size <= len(array):
        return array
    bigger = np.zeros(max(size, 2 * len(array)), dtype=array.dtype)
    bigger[:len(array)] = array
    return bigger


@contextmanager
def paused_gc():
    """Pause the cyclic garbage collector (if on) for the block.

    Prediction makes no reference cycles, but the many small lists of tokens it allocates set off
    full collections that walk the whole loaded model: a process's first call on test.csv's 676
    descriptions took 0.22 s instead of 0.07 s until the collector was paused."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class Lemmatizer:
    """pymorphy3 normal forms with a per-word cache (catalogue vocabularies are small)."""

    def __init__(self) -> None:
        from museum.extras import require

        self._morph = require("pymorphy3", "lemmatize").MorphAnalyzer()

    @lru_cache(maxsize=200_000)
    def lemma(self, token: str) -> str:
        if token.startswith("<") or token.endswith(".") or not token.isalpha():
            return token
        return self._morph.parse(token)[0].normal_form.replace("ё", "е")

    def __call__(self, tokens: list[str]) -> list[str]:
        return [self.lemma(t) for t in tokens]


class Tokenizer:
    """`tokenize`, optionally followed by lemmatization; picklable settings only."""

    def __init__(self, lemmatize: bool = False) -> None:
        self.lemmatize = lemmatize
        self._lemmatizer = Lemmatizer() if lemmatize else None

    def __call__(self, text: str) -> list[str]:
        tokens = tokenize(text)
        return self._lemmatizer(tokens) if self._lemmatizer else tokens

    def chunks(self, chunks: list[str]) -> list[list[str]]:
        """`[self(c) for c in chunks]` for chunks without whitespace (`split_chunks`), tokenized together."""
        token_lists = tokenize_chunks(chunks)
        return [self._lemmatizer(t) for t in token_lists] if self._lemmatizer else token_lists

    def many(self, texts: list[str]) -> list[list[str]]:
        """`[self(t) for t in texts]`, without a method call per text."""
        if self._lemmatizer:
            return [self._lemmatizer(tokenize(t)) for t in texts]
        return list(map(tokenize, texts))
