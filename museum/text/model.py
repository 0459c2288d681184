"""TextModel: the text expert behind `train-text`, `predict-text`, `submit` and `evaluate`.

Three experts, blended as a weighted geometric mean of their probabilities
(``proba ∝ exp(Σ w_k · log p_k)``, weights summing to 1):
- ``lstm``: a BiLSTM over Word2Vec vectors (warm-started from navec),
- ``tfidf``: TF-IDF word and character n-grams → LinearSVC, temperature-calibrated,
- ``vectors``: logistic regression over pretrained navec word vectors (see vector_expert.py).
The geometric mean lets an expert veto a class it is sure about; on 5 CV folds it beat the
arithmetic mean by ≈ 0.01 macro-F1. Columns of every probability matrix follow `classes_`.

It is a scikit-learn classifier: `TextModel(config)` only stores its settings (a `TextConfig`;
`set_params(epochs=3)` replaces single fields), `sklearn.base.clone` works, and `fit(X, y)` carves
its own seeded stratified validation split (for early stopping and calibration) unless one is given.
Inputs may be lists, arrays or pandas Series; a missing value (NaN, None) is an empty description.

The model folder holds plain, safely loadable files only:
``text_model.pt`` (tensors + plain types, `torch.load(weights_only=True)`), ``vocab.json``,
``word_vectors.npy``, ``tfidf.json`` + ``tfidf.npz``, ``vectors.json`` + ``vectors.npz``
(no pickles), ``config.json``.
"""

from __future__ import annotations

import json
import threading
import time
from itertools import chain, islice
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from museum import __version__
from museum.config import TextConfig, config_from_dict, config_to_dict
from museum.data.competition import stratified_split
from museum.errors import MuseumError, load_failure
from museum.metrics import macro_f1
from museum.text.lstm import BiLSTMClassifier, FastBiLSTM, encode, predict_logits, train_lstm, truncate_ids
from museum.calibration import fit_temperature, softmax
from museum.text.tfidf import TfidfExpert
from museum.text.tokenize import Chunks, ChunkTable, Tokenizer, paused_gc, split_chunks, tokenize_uncached
from museum.text.vector_expert import WordVectorExpert, pretrained_table
from museum.text.vectors import load_navec, train_word_vectors
from museum.utils import atomic_path, resolve_device, seed_everything, write_json

FORMAT = "museum.text/1"
BLEND_GRID = np.round(np.linspace(0.0, 0.8, 17), 2)
BLEND_RANGE = (0.1, 0.6)


CONFIG_FIELDS = tuple(f.name for f in fields(TextConfig))


class TextModel(ClassifierMixin, BaseEstimator):
    """Word2Vec + BiLSTM blended with TF-IDF and word-vector experts; `fit` returns self, `classes_` fixes column order.

    `config` (None = `TextConfig()`) is the one constructor parameter, stored as given; the
    settings a fit used are `config_`."""

    def __init__(self, config: TextConfig | None = None) -> None:
        self.config = config

    # ---------------------------------------------------------------- scikit-learn params
    def _settings(self) -> TextConfig:
        return self.config if self.config is not None else TextConfig()

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """`config`, and with `deep` its fields by name too (what `set_params` and grid searches accept)."""
        params = super().get_params(deep=False)
        if deep:
            params.update(config_to_dict(self._settings()))
        return params

    def set_params(self, **params: Any) -> "TextModel":
        """`config=TextConfig(...)` and/or TextConfig fields by name (`epochs=3`), which replace those fields only."""
        overrides = {name: params.pop(name) for name in list(params) if name in CONFIG_FIELDS}
        super().set_params(**params)  # `config`; anything else is sklearn's "invalid parameter" error
        if overrides:
            self.config = replace(self._settings(), **overrides)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.input_tags.allow_nan = True  # a missing description is an empty one
        return tags

    # ------------------------------------------------------------------------------ fit
    def fit(self, X: Iterable, y: Iterable, X_val: Iterable | None = None, y_val: Iterable | None = None,
            unlabeled: Iterable = (), progress: bool = True) -> "TextModel":
        """Fit on descriptions `X` with labels `y`; returns self.

        The BiLSTM stops early and the blend is calibrated on validation rows: `X_val`/`y_val` when
        given, else a seeded stratified split of `X` (`config.val_fraction`, `config.seed`). Rows
        with an empty description are left out (nothing to learn). `unlabeled` descriptions only
        train Word2Vec."""
        cfg = self._settings()
        texts, labels = as_texts(X, "X"), as_labels(y, "y")
        if len(texts) != len(labels):
            raise MuseumError(f"X has {len(texts)} descriptions but y {len(labels)} labels; give one label per description")
        if (X_val is None) != (y_val is None):
            raise MuseumError("X_val and y_val: give both (a validation set) or neither (a split of X)")
        keep = [i for i, t in enumerate(texts) if t]
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        if X_val is None:
            train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
            if len(val_idx) == 0:
                raise MuseumError("no row left for validation (every class has a single description); "
                                  "add rows: a class needs two to be both trained and measured")
            val_texts, val_labels = [texts[i] for i in val_idx], [labels[i] for i in val_idx]
            texts, labels = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
        else:
            val_texts, val_labels = as_texts(X_val, "X_val"), as_labels(y_val, "y_val")
            if len(val_texts) != len(val_labels):
                raise MuseumError(f"X_val has {len(val_texts)} descriptions but y_val {len(val_labels)} labels")
        if not texts or not val_texts:
            raise MuseumError("no description to train on or to validate with: every text is empty")
        return self._fit(texts, labels, val_texts, val_labels, as_texts(unlabeled, "unlabeled"), progress)

    def _fit(self, texts: list[str], labels: list, val_texts: list[str], val_labels: list,
             unlabeled_texts: list[str], progress: bool) -> "TextModel":
        self.config_ = cfg = replace(self._settings())
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.classes_ = sorted(set(labels))
        index_of = {c: i for i, c in enumerate(self.classes_)}
        unseen = sorted(set(val_labels) - set(index_of))
        if unseen:
            raise MuseumError(f"validation labels not in training: {', '.join(map(str, unseen))}")
        self._tokenizer = tokenizer = Tokenizer(cfg.lemmatize)
        train_tokens = [tokenizer(t) for t in texts]
        val_tokens = [tokenizer(t) for t in val_texts]
        extra_tokens = [tokenizer(t) for t in unlabeled_texts if t.strip()]
        self.stats_: dict = {}

        start = time.perf_counter()
        # Loaded once: it warm-starts Word2Vec and feeds the word-vector expert.
        navec = load_navec() if cfg.navec or cfg.vectors_weight > 0 else None
        self.vocab_, vectors, self.stats_["word2vec"] = train_word_vectors(
            train_tokens + val_tokens + extra_tokens, dim=cfg.w2v_dim, epochs=cfg.w2v_epochs,
            min_count=cfg.w2v_min_count, seed=cfg.seed, navec=navec if cfg.navec else None, mean_norm=cfg.embedding_norm,
        )
        self.stats_["word2vec"]["seconds"] = time.perf_counter() - start
        self._index = {w: i for i, w in enumerate(self.vocab_)}

        y_train = np.array([index_of[c] for c in labels])
        y_val = np.array([index_of[c] for c in val_labels])
        train_enc = (*encode(train_tokens, self._index, cfg.max_len), y_train)
        val_enc = (*encode(val_tokens, self._index, cfg.max_len), y_val)
        self.lstm_ = BiLSTMClassifier(vectors, len(self.classes_), cfg.hidden, cfg.dropout).to(self.device)
        result = train_lstm(
            self.lstm_, train_enc, val_enc, epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size,
            lr=cfg.lr, weight_decay=cfg.weight_decay, freeze_embeddings_epochs=cfg.freeze_embeddings_epochs,
            device=self.device, seed=cfg.seed, progress=progress,
        )
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.lstm_.cpu()
        self.device = "cpu"
        # The BiLSTM ends over-confident; scale its logits so that blending it with the
        # calibrated TF-IDF expert weighs evidence, not overconfidence.
        self.lstm_temperature_ = fit_temperature(predict_logits(self.lstm_, *val_enc[:2], "cpu"), y_val)

        # Word vectors for every word of every text, training or not: the refit below and
        # prediction on validation rows need them too.
        table = (pretrained_table(train_tokens + val_tokens + extra_tokens, navec)
                 if cfg.vectors_weight > 0 and navec is not None else None)
        self._fit_linear_experts(texts, train_tokens, labels, table)
        self.blend_weights_ = self._weights(cfg.blend_weight if cfg.blend_weight is not None else 0.0)
        self.blend_temperature_ = 1.0
        # Validation probabilities as the experts stand before any refit: for the blend
        # choice and for honest validation metrics.
        self.val_probas_ = self.expert_probas(val_texts)
        if cfg.blend_weight is None and (self.tfidf_ is not None or self.vectors_ is not None):
            self.blend_weights_ = self._weights(self._choose_blend(y_val))
        # A geometric mean of experts that spread their doubt differently comes out sharper than
        # any of them (0.999 where each said ~0.9); one temperature on validation restores
        # honest confidences (the cascade gates on them) without moving any argmax.
        self.blend_temperature_ = fit_temperature(np.log(np.clip(self.blend(self.val_probas_), 1e-12, None)), y_val)
        # The blend is chosen; the linear experts (seconds to fit, no early stopping) now also
        # learn from the validation rows.
        if cfg.linear_refit:
            self._fit_linear_experts(list(texts) + list(val_texts), train_tokens + val_tokens,
                                     list(labels) + list(val_labels), table)
        return self

    def _fit_linear_experts(self, texts: list[str], tokens: list[list[str]], labels: list[str],
                            table: tuple[list[str], np.ndarray] | None) -> None:
        """(Re)fit the TF-IDF expert (if configured) and the word-vector expert (if `table`, the navec rows, is given)."""
        cfg = self.config_
        self.tfidf_ = TfidfExpert(c=cfg.tfidf_c, seed=cfg.seed).fit(texts, labels) if cfg.tfidf else None
        self.vectors_ = WordVectorExpert(cfg.vectors_c, cfg.seed).fit(tokens, labels, *table) if table else None

    def _weights(self, lstm_weight: float) -> dict[str, float]:
        """Blend weights of the experts present, summing to 1 (the BiLSTM's is `lstm_weight`)."""
        if self.tfidf_ is None and self.vectors_ is None:
            return {"lstm": 1.0}
        weights = {"lstm": lstm_weight}
        if self.vectors_ is not None:
            weights["vectors"] = self.config_.vectors_weight
        if self.tfidf_ is not None:
            weights["tfidf"] = max(0.0, 1.0 - sum(weights.values()))
        total = sum(weights.values())
        return {k: w / total for k, w in weights.items() if w > 0}

    def _choose_blend(self, y_val: np.ndarray) -> float:
        """LSTM weight maximising the smoothed validation macro-F1 curve within BLEND_RANGE.

        A few hundred validation rows make the raw curve jagged: on 5 CV folds the raw
        argmax swung between 0.3 and 0.9 and cost 0.02 macro-F1 against a fixed 0.5, while
        every fold's test curve peaked between 0.3 and 0.6. So the curve is smoothed over
        neighbouring weights and both experts always keep a say.
        """
        raw = np.array([macro_f1(y_val.tolist(), self.blend(self.val_probas_, self._weights(w)).argmax(1).tolist())
                        for w in BLEND_GRID])
        smooth = np.convolve(np.pad(raw, 1, mode="edge"), np.ones(3) / 3, mode="valid")
        allowed = (BLEND_GRID >= BLEND_RANGE[0] - 1e-9) & (BLEND_GRID <= BLEND_RANGE[1] + 1e-9)
        self.blend_scores_ = {f"{w:.2f}": float(f) for w, f in zip(BLEND_GRID, raw)}
        return float(BLEND_GRID[allowed][int(np.argmax(smooth[allowed]))])

    # -------------------------------------------------------------------------- predict
    def expert_probas(self, X: Iterable) -> dict[str, np.ndarray]:
        """Each present expert's probabilities ("lstm", "tfidf", "vectors"), in `classes_` order."""
        self._check_fitted()
        distinct, rows = _distinct(as_texts(X, "X"))
        probas = self._distinct_expert_probas(distinct)
        return probas if rows is None else {name: p[rows] for name, p in probas.items()}

    def _distinct_expert_probas(self, texts: list[str]) -> dict[str, np.ndarray]:
        """`expert_probas` of distinct texts, through each expert's fast path (`expert_probas_reference`'s
        probabilities to float32 rounding: tests/test_text_speed.py)."""
        with paused_gc():
            chunks = split_chunks(texts)
        lstm_ids, vector_rows, counts = self._token_cache()(chunks)
        if self.device == "cpu":
            logits = self._fast_lstm().logits(*truncate_ids(lstm_ids, counts, self.config_.max_len))
        else:  # the packed nn.LSTM on the accelerator
            token_lists = self._tokenizer.many(texts)
            logits = predict_logits(self.lstm_, *encode(token_lists, self._index, self.config_.max_len), self.device)
        probas = {"lstm": softmax(logits * self.lstm_temperature_)}
        if self.tfidf_ is not None:
            probas["tfidf"] = self.tfidf_.predict_proba(texts, chunks)
        if self.vectors_ is not None:
            probas["vectors"] = self.vectors_.predict_proba_rows(vector_rows, counts)
        return probas

    def _token_cache(self) -> "_TokenCache":
        """The prediction path's token cache, made anew for another tokenizer, vocabulary or vector expert."""
        cached = getattr(self, "_token_cache_", None)
        if cached is None or cached.tokenizer is not self._tokenizer or cached.index is not self._index \
                or cached.vectors is not self.vectors_:
            cached = self._token_cache_ = _TokenCache(self._tokenizer, self._index, self.vectors_)
        return cached

    def expert_probas_reference(self, X: Iterable) -> dict[str, np.ndarray]:
        """`expert_probas` the plain way: row by row, torch's packed nn.LSTM, scikit-learn's vectorizers."""
        self._check_fitted()
        texts = as_texts(X, "X")
        tokens = [tokenize_uncached(t) for t in texts] if not self.config_.lemmatize else [self._tokenizer(t) for t in texts]
        ids, lengths = encode(tokens, self._index, self.config_.max_len)
        probas = {"lstm": softmax(predict_logits(self.lstm_, ids, lengths, self.device) * self.lstm_temperature_)}
        if self.tfidf_ is not None:
            probas["tfidf"] = self.tfidf_.predict_proba_reference(texts)
        if self.vectors_ is not None:
            probas["vectors"] = self.vectors_.predict_proba_reference(tokens)
        return probas

    def _fast_lstm(self) -> FastBiLSTM:
        """The BiLSTM's inference copy, rebuilt whenever its weights have changed (a refit, `load_state_dict`)."""
        # The tensors themselves are kept (not their ids, which a new tensor could reuse), with their
        # version counters, which every in-place change bumps.
        params = list(self.lstm_.parameters())
        versions = [p._version for p in params]
        cached = getattr(self, "_fast_lstm_cache", None)
        if cached is None or len(cached[0]) != len(params) or any(a is not b for a, b in zip(cached[0], params)) \
                or cached[1] != versions:
            cached = self._fast_lstm_cache = (params, versions, FastBiLSTM(self.lstm_))
        return cached[2]

    def _check_fitted(self) -> None:
        if not hasattr(self, "lstm_"):
            raise MuseumError("text model is not trained; call fit(X, y) or TextModel.load(folder) first")

    def predict_proba(self, X: Iterable) -> np.ndarray:
        """(n, len(classes_)) probabilities; rows sum to 1. NaN or None is an empty description.

        A description repeated within a call (catalogues repeat many) is scored once."""
        self._check_fitted()
        texts = as_texts(X, "X")
        if not texts:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        distinct, rows = _distinct(texts)
        proba = self.blend(self._distinct_expert_probas(distinct))
        return proba if rows is None else proba[rows]

    def blend(self, probas: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
        """Weighted geometric mean of the experts' probabilities, renormalised (default: `blend_weights_`)."""
        weights = self.blend_weights_ if weights is None else weights
        log_p = sum(w * np.log(np.clip(probas[k], 1e-12, None)) for k, w in weights.items())
        return softmax(log_p * self.blend_temperature_).astype(np.float32)

    def predict(self, X: Iterable) -> np.ndarray:
        """The most probable class of each description."""
        return np.asarray(self.classes_)[self.predict_proba(X).argmax(1)]

    def wants(self, items) -> np.ndarray:
        """The expert contract: rows this expert could score (those with a description)."""
        return items.has_text

    def score_rows(self, items, batch_size: int | None = None, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The expert contract (`museum.data.items.Items` → probabilities, usable rows): rows with a
        description are scored, the others get NaN. `batch_size` and `workers` serve image experts."""
        usable = items.has_text
        proba = np.full((len(items), len(self.classes_)), np.nan, dtype=np.float32)
        if usable.any():
            proba[usable] = self.predict_proba([d for d, ok in zip(items.descriptions, usable) if ok])
        return proba, usable

    # ------------------------------------------------------------------------ save/load
    def save(self, folder: str | Path) -> Path:
        """Write the model folder as a whole: the complete old folder stays until the new one is complete."""
        from museum.folders import staged_folder

        with staged_folder(folder, "text") as staging:
            self.write_files(staging)
        return Path(folder)

    def write_files(self, folder: Path) -> None:
        """The model's files in `folder` (a staging folder: `save` and `train-text` seal and move it)."""
        checkpoint = {
            "format": FORMAT,
            "version": __version__,
            "classes": list(self.classes_),
            "config": config_to_dict(self.config_),
            "blend_weights": {k: float(w) for k, w in self.blend_weights_.items()},
            "blend_temperature": float(self.blend_temperature_),
            "lstm_temperature": float(self.lstm_temperature_),
            "best_epoch": int(self.best_epoch_),
            "embedding_shape": list(self.lstm_.embedding.weight.shape),
            "state_dict": {k: v.detach().cpu() for k, v in self.lstm_.state_dict().items()},
        }
        with atomic_path(folder / "text_model.pt") as tmp:
            torch.save(checkpoint, tmp)
        write_json(folder / "vocab.json", self.vocab_)
        with atomic_path(folder / "word_vectors.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.lstm_.embedding.weight.detach().cpu().numpy())
        for name, expert in (("tfidf", self.tfidf_), ("vectors", self.vectors_)):
            if expert is not None:
                meta, arrays = expert.to_state()
                write_json(folder / f"{name}.json", meta)
                with atomic_path(folder / f"{name}.npz") as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, **arrays)
        write_json(folder / "config.json", config_to_dict(self.config_))

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "TextModel":
        from museum.folders import verify_folder

        folder = Path(folder)
        verify_folder(folder, "text")
        path = folder / "text_model.pt"
        if not path.exists():
            raise MuseumError(f"{folder}: not a text model folder (no text_model.pt); train one with `museum train-text`")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if checkpoint.get("format") != FORMAT:
                raise ValueError(f"unknown format {checkpoint.get('format')!r}")
            model = cls(config_from_dict(TextConfig, checkpoint["config"]))
            model.config_ = model.config
            model.classes_ = list(checkpoint["classes"])
            model.blend_weights_ = {str(k): float(w) for k, w in checkpoint["blend_weights"].items()}
            model.blend_temperature_ = float(checkpoint["blend_temperature"])
            model.lstm_temperature_ = float(checkpoint["lstm_temperature"])
            model.best_epoch_ = int(checkpoint["best_epoch"])
            model._tokenizer = Tokenizer(model.config_.lemmatize)
            model.vocab_ = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            model._index = {w: i for i, w in enumerate(model.vocab_)}
            rows, dim = checkpoint["embedding_shape"]
            _check_consistent(folder, len(model.vocab_), rows, len(model.classes_), checkpoint["state_dict"])
            model.lstm_ = BiLSTMClassifier(np.zeros((rows, dim), np.float32), len(model.classes_),
                                           model.config_.hidden, model.config_.dropout)
            model.lstm_.load_state_dict(checkpoint["state_dict"])
            model.lstm_.eval()
            model.tfidf_ = model.vectors_ = None
            for name, expert_class in (("tfidf", TfidfExpert), ("vectors", WordVectorExpert)):
                if name in model.blend_weights_:
                    meta = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
                    with np.load(folder / f"{name}.npz", allow_pickle=False) as arrays:
                        setattr(model, f"{name}_", expert_class.from_state(meta, dict(arrays)))
                    expert_classes = getattr(model, f"{name}_").classes_
                    if list(expert_classes) != model.classes_:
                        raise MuseumError(f"{folder}: {name}.json names other classes than text_model.pt; the folder is "
                                          "mixed: retrain it with `museum train-text`")
        except MuseumError:
            raise
        except Exception as exc:  # corrupted or foreign files: one line, not a traceback
            raise MuseumError(f"{folder}: cannot load the text model ({load_failure(exc)}); retrain it") from None
        model.device = resolve_device(device)
        model.lstm_.to(model.device)
        return model


class _TokenCache:
    """Texts → token ids, each distinct whitespace-separated chunk tokenized once (a `ChunkTable`) and
    each distinct token looked up once: `lstm_ids[number]` is its BiLSTM vocabulary id (1 = unknown),
    `vector_rows[number]` its word-vector row (-1 = unknown). A call's cost is numpy gathers, not a
    Python loop per token. Safe to share between threads (a lock; arrays are replaced, never rewritten)."""

    limit = 200_000  # distinct tokens kept; then it starts afresh

    def __init__(self, tokenizer: Tokenizer, index: dict[str, int], vectors: WordVectorExpert | None) -> None:
        self.tokenizer, self.index, self.vectors = tokenizer, index, vectors
        self._lock = threading.Lock()
        self.clear()

    __getstate__, __setstate__ = ChunkTable.__getstate__, ChunkTable.__setstate__

    def clear(self) -> None:
        self.number: dict[str, int] = {}
        self.chunks = ChunkTable(compute_many=self._numbers, limit=self.limit)
        self.lstm_ids = np.zeros(0, dtype=np.int64)
        self.vector_rows = np.zeros(0, dtype=np.int64)

    def _numbers(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(how many tokens each new chunk has, their numbers end to end), numbering tokens not met before."""
        token_lists = self.tokenizer.chunks(chunks)
        lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
        number = self.number
        numbers = [number.setdefault(t, len(number)) for t in chain.from_iterable(token_lists)]
        return lengths, np.array(numbers, dtype=np.int32)

    def __call__(self, chunks: Chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(BiLSTM ids and word-vector rows of the tokens of texts given as their `split_chunks`, end to
        end; how many tokens each text has)."""
        with self._lock, paused_gc():
            if len(self.number) > self.limit:
                self.clear()
            numbers, lengths = self.chunks.lookup(chunks)
            if len(self.number) > len(self.lstm_ids):  # tokens first met in this call
                new = list(islice(self.number, len(self.lstm_ids), None))
                get = self.index.get
                self.lstm_ids = np.concatenate([self.lstm_ids, np.array([get(t, 1) for t in new], dtype=np.int64)])
                rows = self.vectors.word_rows(new) if self.vectors is not None else np.full(len(new), -1)
                self.vector_rows = np.concatenate([self.vector_rows, rows])
            return self.lstm_ids[numbers], self.vector_rows[numbers], lengths


def _distinct(texts: list[str]) -> tuple[list[str], np.ndarray | None]:
    """(distinct texts in first-seen order, each text's place among them; None when all are distinct)."""
    place: dict[str, int] = {}
    rows = [place.setdefault(t, len(place)) for t in texts]
    if len(place) == len(texts):
        return texts, None
    return list(place), np.array(rows, dtype=np.int64)


def _check_consistent(folder: Path, vocab_rows: int, embedding_rows: int, n_classes: int, state_dict: dict) -> None:
    """Files that disagree in shape come from different runs (a folder mixed by hand or by a killed copy)."""
    mixed = None
    if vocab_rows != embedding_rows:
        mixed = f"vocab.json has {vocab_rows} words but the network's embedding has {embedding_rows} rows"
    else:
        outputs = state_dict["head.weight"].shape[0]
        if outputs != n_classes:
            mixed = f"the network has {outputs} outputs for {n_classes} classes"
    if mixed:
        raise MuseumError(f"{folder}: {mixed}; the folder is mixed: retrain it with `museum train-text`")


def _missing(value: Any) -> bool:
    """None, NaN (float or numpy), pandas' NA and NaT: what a table holds for "no description"."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return type(value).__name__ in ("NAType", "NaTType")


def _values(X: Any, name: str) -> list:
    if isinstance(X, (str, bytes)):
        raise MuseumError(f"{name}: one string; pass a list of descriptions, e.g. [text]")
    if getattr(X, "ndim", 1) == 2:  # a one-column DataFrame or (n, 1) array
        if X.shape[1] != 1:
            raise MuseumError(f"{name}: {X.shape[1]} columns; pass one column of descriptions")
        X = np.asarray(X).ravel()
    return X.tolist() if hasattr(X, "tolist") else list(X)


def as_texts(X: Any, name: str = "X") -> list[str]:
    """Descriptions as stripped strings (as the CSV reader gives them); a missing value is ""."""
    # Strings first: the common case costs one type check (checking every value for NaN was 5 % of predict_proba).
    return [v.strip() if type(v) is str else "" if _missing(v) else str(v).strip() for v in _values(X, name)]


def as_labels(y: Any, name: str = "y") -> list:
    """Labels as plain Python values; a missing one is a one-line error naming its row."""
    labels = _values(y, name)
    for i, label in enumerate(labels):
        if _missing(label) or (isinstance(label, str) and not label.strip()):
            raise MuseumError(f"{name} row {i}: missing label; every training row needs one: fill it in or drop the row")
    return labels
