"""The text expert's fast prediction path gives the plain path's probabilities.

Each fast piece is checked against its reference: the chunk-cached tokenizer against the regex,
`FastBiLSTM` against torch's packed nn.LSTM, the numpy TF-IDF transforms against scikit-learn's,
the projected word-vector logits against the features, and the whole `TextModel` (deduplication,
token cache, blend) against `expert_probas_reference` on real descriptions: probabilities within
1e-5 and the same argmax. Timing is scripts/bench_text.py's job (`--speed`), not the tests'.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from museum.data.competition import read_competition_csv
from museum.text import charwb
from museum.text.charwb import CharWbTransformer
from museum.text.lstm import BiLSTMClassifier, FastBiLSTM, encode, predict_logits, truncate_ids
from museum.text.model import TextModel, _TokenCache
from museum.text.tfidf import _VECTORIZERS, WordNgramTransformer
from museum.text.tokenize import (ChunkTable, normalise, prepare_chunks, ranges, split_chunks, tokenize, tokenize_chunks,
                                  tokenize_uncached)
from museum.text.vector_expert import WordVectorExpert

ODD = ["", "   ", "a", "Ab", "Ёлка  ПАЛКА\tx\xa0y", "№ 5 г.", "№№5", "x" * 10, "a\u2003b\x1cc", "1789 г. 12,5 см 1.2.3",
       "ΑΣ ΣΑ", "г.г. вв.", "монета монета монета", "2024г", "_a_ b_", "кол-во. худ.-оформ."]
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """These tests compare values, not time: one torch thread, as two spin against each other and
    everything else on a busy two-core machine (the reference path ran 7× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def descriptions(museum_train_csv, museum_test_csv) -> list[str]:
    """train.csv and test.csv descriptions: ~5,000 rows with repeats and empty ones, plus odd strings."""
    texts = read_competition_csv(museum_train_csv).descriptions + read_competition_csv(museum_test_csv).descriptions
    return texts + ODD


def test_chunk_cached_tokenizer_matches_the_regex(descriptions):
    for _ in range(2):  # cold, then from the cache
        assert [tokenize(t) for t in descriptions] == [tokenize_uncached(t) for t in descriptions]
    chunks = split_chunks(descriptions).distinct + ["ΑΣ", "ΣΑ", "Σ", "İx", "ЁЖ."]
    assert tokenize_chunks(chunks) == [tokenize_uncached(c) for c in chunks]  # normalised all at once
    assert prepare_chunks(chunks, normalise) == [normalise(c) for c in chunks]


def test_ranges_and_chunk_table():
    starts, lengths = np.array([5, 0, 10, 3, 3]), np.array([2, 0, 3, 1, 0])
    assert ranges(starts, lengths).tolist() == [5, 6, 10, 11, 12, 3]
    assert ranges(np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == []
    calls = []
    table = ChunkTable(lambda chunk: calls.append(chunk) or [ord(ch) for ch in chunk], limit=4)
    texts = ["ab c", "", "ab ab d", "e f g h i j"]
    for _ in range(2):  # the last text overflows the limit: the table starts afresh and still answers right
        flat, per_text = table.lookup(split_chunks(texts))
        assert per_text.tolist() == [sum(len(c) for c in t.split()) for t in texts]
        assert flat.tolist() == [ord(ch) for t in texts for c in t.split() for ch in c]
    assert calls.count("ab") <= 2  # computed once per table generation, not once per occurrence


def test_truncate_ids_cuts_like_encode():
    rng = np.random.default_rng(0)
    index = {f"w{i}": i + 2 for i in range(50)}
    rows = [[f"w{j}" for j in rng.integers(0, 60, rng.integers(0, 12))] for _ in range(300)] + [[], []]
    padded, lengths = encode(rows, index, 8)
    flat, cut = truncate_ids(np.array([index.get(t, 1) for r in rows for t in r]), np.array([len(r) for r in rows]), 8)
    assert cut.tolist() == lengths.tolist()
    assert flat.tolist() == [i for row, n in zip(padded, lengths) for i in row[:n]]


def test_fast_bilstm_matches_torch_lstm():
    """The shipped shape (300-d vectors, 64 hidden units), random weights, rows of 1 to 64 tokens."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = BiLSTMClassifier(rng.normal(0, 1, (400, 300)).astype(np.float32), n_classes=15, hidden=64).eval()
    with torch.no_grad():  # biases away from zero, as after training
        for name, p in model.lstm.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    lengths = np.concatenate([rng.integers(1, 65, 150), [1, 64, 64, 2]])
    ids = np.zeros((len(lengths), 64), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 400, n)
    expected = predict_logits(model, ids, lengths, "cpu")
    flat = np.concatenate([row[:n] for row, n in zip(ids, lengths)])
    for batch_size in (1024, 40):  # one packed batch, and several (rows sorted across batches)
        got = FastBiLSTM(model, batch_size=batch_size).logits(flat, lengths)
        assert np.abs(got - expected).max() < 1e-4
        assert (got.argmax(1) == expected.argmax(1)).all()
    assert FastBiLSTM(model).logits(np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0, 15)


def test_fast_bilstm_runs_on_one_thread_and_restores_the_setting():
    from museum.text.lstm import torch_threads

    torch.set_num_threads(2)  # the fixture restores the original afterwards
    seen = []
    with torch_threads(1):
        seen.append(torch.get_num_threads())
    with torch_threads(None):
        seen.append(torch.get_num_threads())
    assert seen == [1, 2] and torch.get_num_threads() == 2
    model = BiLSTMClassifier(np.random.default_rng(0).normal(0, 1, (50, 8)).astype(np.float32), 3, hidden=4).eval()
    FastBiLSTM(model).logits(np.array([2, 3, 4]), np.array([2, 1]))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("name", ["word", "char"])
def test_tfidf_transformers_match_scikit_learn(descriptions, name):
    """Exactly scikit-learn's matrix, for normalised texts, and for raw texts normalised chunk by chunk."""
    normalised = [normalise(t) for t in descriptions]
    vectorizer = TfidfVectorizer(dtype=np.float32, **_VECTORIZERS[name]).fit(normalised[:2000])
    expected = vectorizer.transform(normalised)
    plain = {"word": WordNgramTransformer, "char": CharWbTransformer}[name]
    for fast, texts in ((plain(vectorizer), normalised), (plain(vectorizer, prepare=normalise), descriptions)):
        for _ in range(2):  # cold, then from the chunk cache
            got = fast.transform(texts)
            assert got.dtype == expected.dtype and got.shape == expected.shape and (got != expected).nnz == 0


@pytest.mark.parametrize("ngram_range", [(2, 5), (4, 5)])  # (4, 5): one-letter words are shorter than min_n
def test_char_ngram_codes_match_cutting_word_by_word(descriptions, ngram_range):
    normalised = [normalise(t) for t in descriptions]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=ngram_range).fit(normalised[:1500])
    fast = CharWbTransformer(vectorizer, prepare=normalise)
    assert fast._codes.usable
    words = list(dict.fromkeys(split_chunks(descriptions).distinct + ["a", "Я", "ΣΑ", "\u2003x", "aaaaaaa", "№"]))
    lengths, flat = fast._indices_many(words)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    assert [sorted(flat[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] == [sorted(fast._indices(w)) for w in words]


def test_word_vector_logits_match_features(descriptions):
    rng = np.random.default_rng(0)
    tokens = [tokenize(t) for t in descriptions]
    words = sorted({t for row in tokens[:1000] for t in row if t.isalpha()})
    labels = [str(i % 5) for i in range(1000)]
    expert = WordVectorExpert(0.03, 0).fit(tokens[:1000], labels, words, rng.normal(0, 1, (len(words), 50)))
    expected, got = expert.predict_proba_reference(tokens), expert.predict_proba(tokens)
    assert np.abs(got - expected).max() < TOLERANCE and (got.argmax(1) == expected.argmax(1)).all()


def assert_same(reference: dict, fast: dict) -> None:
    assert reference.keys() == fast.keys()
    for name in reference:
        assert fast[name].shape == reference[name].shape
        assert np.abs(fast[name] - reference[name]).max() < TOLERANCE, name
        assert (fast[name].argmax(1) == reference[name].argmax(1)).all(), name


def test_text_model_fast_path_matches_reference(text_model_dir, descriptions, monkeypatch):
    model = TextModel.load(text_model_dir)
    reference = model.expert_probas_reference(descriptions)
    expected = model.blend(reference)
    for _ in range(2):  # cold caches, then warm ones
        assert_same(reference, model.expert_probas(descriptions))
        proba = model.predict_proba(descriptions)
        assert np.abs(proba - expected).max() < TOLERANCE and (proba.argmax(1) == expected.argmax(1)).all()
    # Calls of other sizes and orders, repeated rows, one row: each row's answer is its own.
    order = np.random.default_rng(0).permutation(len(descriptions))[:400]
    for rows in (order, np.concatenate([order, order[::-1]]), order[:1]):
        proba = model.predict_proba([descriptions[i] for i in rows])
        assert np.abs(proba - expected[rows]).max() < TOLERANCE and (proba.argmax(1) == expected[rows].argmax(1)).all()
    # Small caches start afresh mid-call and between calls; the answers stay the same.
    monkeypatch.setattr(_TokenCache, "limit", 50)
    monkeypatch.setattr(WordNgramTransformer, "cache_limit", 50)
    monkeypatch.setattr(charwb, "MAX_CACHED_WORDS", 50)
    small = TextModel.load(text_model_dir)
    for rows in (order, np.arange(len(descriptions))):
        assert_same({k: p[rows] for k, p in reference.items()}, small.expert_probas([descriptions[i] for i in rows]))


def test_threads_share_one_model(text_model_dir, descriptions, monkeypatch):
    """The caches are shared by the server's worker threads: concurrent calls, with caches small enough
    to start afresh while others read them, each get their own rows' answers."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(_TokenCache, "limit", 300)
    monkeypatch.setattr(WordNgramTransformer, "cache_limit", 300)
    monkeypatch.setattr(charwb, "MAX_CACHED_WORDS", 300)
    model = TextModel.load(text_model_dir)
    expected = model.blend(model.expert_probas_reference(descriptions))
    parts = [np.random.default_rng(seed).permutation(len(descriptions))[:600] for seed in range(12)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda rows: model.predict_proba([descriptions[i] for i in rows]), parts))
    for rows, proba in zip(parts, answers):
        assert np.abs(proba - expected[rows]).max() < TOLERANCE


def test_model_with_warm_caches_pickles(text_model_dir, descriptions):
    """joblib and deepcopy pickle estimators: the caches (and their locks) must not get in the way."""
    import copy
    import pickle

    model = TextModel.load(text_model_dir)
    expected = model.predict_proba(descriptions[:500])
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert np.abs(twin.predict_proba(descriptions[:500]) - expected).max() < TOLERANCE


def test_fast_bilstm_follows_changed_weights(text_model_dir, descriptions):
    """The precomputed tables are rebuilt when the network's weights change (a refit, `load_state_dict`)."""
    model = TextModel.load(text_model_dir)
    before = model.expert_probas(descriptions[:300])["lstm"]
    with torch.no_grad():
        model.lstm_.embedding.weight.mul_(1.5)
        model.lstm_.lstm.weight_hh_l0.mul_(0.5)
    after = model.expert_probas(descriptions[:300])["lstm"]
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(after - model.expert_probas_reference(descriptions[:300])["lstm"]).max() < TOLERANCE
