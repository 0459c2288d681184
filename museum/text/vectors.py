"""Word vectors: Word2Vec (gensim) trained on every description, warm-started from navec.

navec (250k Russian words × 300, shipped inside the `natasha` wheel) knows general
Russian; Word2Vec trained on the catalogue itself learns its jargon. Warm-starting
puts the two in one space: known words start from navec, the rest from gensim's init.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np

from museum.log import logger

NAVEC_FILE = "navec_news_v1_1B_250K_300d_100q.tar"
PAD, UNK = "<pad>", "<unk>"


def find_navec() -> Path | None:
    """Path of the navec vectors inside the installed `natasha` package, if any (not imported)."""
    spec = importlib.util.find_spec("natasha")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "emb" / NAVEC_FILE
    return path if path.exists() else None


NAVEC_INSTALL = "pip install --no-deps natasha==1.6.0 (scripts/setup.sh does; `museum doctor` checks)"


def load_navec():
    """The navec model, or None (with a warning saying how to get it) when unavailable.

    A warning, not an info line: without navec Word2Vec starts from random vectors and the
    word-vector expert is left out, which costs about 0.02 macro-F1 (see bench_text)."""
    path = find_navec()
    if path is None:
        logger.warning(f"navec vectors not found: Word2Vec starts from random vectors and the word-vector expert "
                       f"is left out; to get them: {NAVEC_INSTALL}")
        return None
    try:
        from navec import Navec
    except ImportError:
        logger.warning("the navec package is not installed: Word2Vec starts from random vectors and the word-vector "
                       "expert is left out; to get it: pip install navec")
        return None
    return Navec.load(str(path))


def _stable_hash(text: str) -> int:
    # gensim seeds each word's initial vector with hashfxn(word + seed); Python's hash() is
    # salted per process, which would make runs irreproducible.
    return zlib.crc32(text.encode("utf-8"))


def train_word_vectors(
    sentences: list[list[str]],
    dim: int = 300,
    epochs: int = 10,
    min_count: int = 1,
    seed: int = 0,
    navec=None,
    mean_norm: float = 16.0,
) -> tuple[list[str], np.ndarray, dict]:
    """Train Word2Vec on tokenized sentences; return (vocabulary, vectors, stats).

    `navec` (from `load_navec`, or None for random starts) warm-starts the words it knows.
    The vocabulary starts with PAD (zeros) and UNK (mean vector); stats count navec hits.
    Vectors are rescaled so that their mean norm is `mean_norm`: the BiLSTM on top was
    measured to learn far better from large-norm inputs (CV macro-F1 ≈ 0.53 at norm ≈ 1,
    ≈ 0.63 at norm ≈ 16).
    """
    from gensim.models import Word2Vec

    if navec is not None and dim != navec.pq.dim:
        logger.info(f"navec vectors are {navec.pq.dim}-d; using dim={navec.pq.dim} instead of {dim}")
        dim = navec.pq.dim
    sentences = [s for s in sentences if s]
    model = Word2Vec(
        vector_size=dim, window=5, min_count=min_count, sg=1, negative=5, seed=seed, workers=1, hashfxn=_stable_hash
    )
    model.build_vocab(sentences)
    hits = 0
    if navec is not None:
        for word, index in model.wv.key_to_index.items():
            if word in navec:
                # navec vectors have norms around 5; gensim's init is tiny, so match scales.
                model.wv.vectors[index] = navec[word] / 10.0
                hits += 1
    model.train(sentences, total_examples=len(sentences), epochs=epochs)
    words = list(model.wv.index_to_key)
    vectors = np.asarray(model.wv.vectors, dtype=np.float32)
    unk = vectors.mean(axis=0, keepdims=True) if len(vectors) else np.zeros((1, dim), np.float32)
    matrix = np.concatenate([np.zeros((1, dim), np.float32), unk, vectors]).astype(np.float32)
    norms = np.linalg.norm(matrix[2:], axis=1)
    if len(norms) and norms.mean() > 0:
        matrix *= mean_norm / norms.mean()
    stats = {"vocabulary": len(words), "navec": navec is not None, "navec_hits": hits}
    if navec is not None:
        logger.info(f"Word2Vec: {len(words)} words, {hits} warm-started from navec")
    return [PAD, UNK, *words], matrix, stats
