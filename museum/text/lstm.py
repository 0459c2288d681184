"""The BiLSTM classifier over word vectors, and its training loop.

Descriptions are short (median 48 characters), so batches are built from length-sorted
buckets and packed: almost no compute is spent on padding.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from museum.log import progress_bar
from museum.metrics import macro_f1


class BiLSTMClassifier(nn.Module):
    """Embedding → BiLSTM → [masked max-pool ; mean-pool] → dropout → linear."""

    def __init__(self, vectors: np.ndarray, n_classes: int, hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(torch.from_numpy(vectors), freeze=False, padding_idx=0)
        self.embedding_dropout = nn.Dropout(dropout / 2)
        self.lstm = nn.LSTM(vectors.shape[1], hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * hidden, n_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding_dropout(self.embedding(ids))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        max_pool = out.masked_fill(~mask, -1e4).max(dim=1).values
        mean_pool = (out * mask).sum(dim=1) / lengths[:, None].clamp(min=1)
        return self.head(self.dropout(torch.cat([max_pool, mean_pool], dim=1)))


def encode(token_lists: list[list[str]], index: dict[str, int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (ids [n, max_len] int64, lengths [n]); unknown words → 1 (UNK), empty → one UNK."""
    ids = np.zeros((len(token_lists), max_len), dtype=np.int64)
    lengths = np.ones(len(token_lists), dtype=np.int64)
    for i, tokens in enumerate(token_lists):
        row = [index.get(t, 1) for t in tokens[:max_len]] or [1]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """Index batches of similar length; shuffled buckets when `rng` is given."""
    order = np.argsort(lengths, kind="stable")
    if rng is not None:  # shuffle within coarse buckets, then shuffle the batches
        order = order[np.argsort(lengths[order] // 4 * 10_000 + rng.random(len(order)), kind="stable")]
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    return chunks


@torch.no_grad()
def predict_logits(model: BiLSTMClassifier, ids: np.ndarray, lengths: np.ndarray, device: str, batch_size: int = 128) -> np.ndarray:
    """Logits of rows in batches of similar length.

    Small batches keep padding low: the median description has 7 tokens, the longest 64, and
    every row of a batch is embedded at the batch's longest length. On a 758-row call, batches
    of 128 instead of 1024 halved the BiLSTM's time (0.061 → 0.029 s, best of 3)."""
    model.eval()
    out = np.zeros((len(ids), model.head.out_features), dtype=np.float32)
    for idx in batches(lengths, batch_size, None):
        width = int(lengths[idx].max())
        logits = model(torch.from_numpy(ids[idx, :width]).to(device), torch.from_numpy(lengths[idx]).to(device))
        out[idx] = logits.float().cpu().numpy()
    return out


def truncate_ids(ids: np.ndarray, lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token `ids` end to end (`lengths[i]` for row i) as `encode` cuts them: the first `max_len`
    of each row, one UNK (1) for an empty row. Returns (ids end to end, lengths), what `FastBiLSTM` takes."""
    ids, lengths = np.asarray(ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    position = np.arange(len(ids)) - np.repeat(starts, lengths)
    kept = np.minimum(lengths, max_len)
    ids = ids[position < max_len]
    empty = np.flatnonzero(kept == 0)
    if len(empty):  # the UNK goes where the empty row's ids would start
        ids = np.insert(ids, np.cumsum(kept)[empty], 1)
    return ids, np.maximum(kept, 1)


class FastBiLSTM:
    """Inference for a trained `BiLSTMClassifier`: the same logits (to float32 rounding), several times faster.

    - The input side of every LSTM step, ``W_ih · embedding(word) + b_ih + b_hh``, depends on the word
      alone: it is computed once per vocabulary word (a vocabulary × 4·hidden table per direction) and
      a step only adds the recurrent ``W_hh · h``. With 300-d vectors and 64 hidden units the input
      projection was four fifths of the multiply-adds.
    - Rows are sorted by length, longest first, and run as one packed batch: step s computes only the
      rows longer than s (a prefix), both directions in one batched matmul (the backward one reads each
      row reversed), so no work goes to padding and a call has at most max_len steps of overhead.
    - Max- and mean-pooling are a running maximum and sum: no output sequence is kept.
    - tanh is computed as 2·sigmoid(2x) − 1: this torch build's CPU tanh took 5× sigmoid's time per
      element. The factors 2 are folded into the g-gate weights, a doubled cell state and a halved
      hidden state (exact: powers of two), so one sigmoid covers all four gates and few passes remain.
    - It runs on `threads` torch threads (1; None: torch's setting). A step's operations take tens to
      hundreds of microseconds, too short to share: on the 2-core development machine, busy with other
      jobs, two threads made a 3,788-row call 3-15× slower than one (thread barriers waiting for a
      core); one thread was faster in every measurement.
    The network must not change after construction (`TextModel` rebuilds this when its weights do).
    """

    threads: int | None = 1

    def __init__(self, model: BiLSTMClassifier, batch_size: int = 1024) -> None:
        lstm = model.lstm
        if lstm.num_layers != 1 or not lstm.bidirectional or lstm.proj_size or not lstm.bias:
            raise ValueError("FastBiLSTM reproduces the one-layer bidirectional BiLSTMClassifier only")
        hidden = self.hidden = lstm.hidden_size
        # Gates i, f, g, o (PyTorch's order); the g rows doubled: sigmoid(2x) gives tanh(x) = 2·sigmoid(2x) − 1.
        scale = torch.ones(4 * hidden)
        scale[2 * hidden:3 * hidden] = 2.0
        with torch.no_grad():
            vectors = model.embedding.weight.detach().float()
            tables, recurrent = [], []
            for suffix in ("", "_reverse"):
                # In float32, as nn.LSTM computes it: float64 took 0.2-0.4 s more and came out no closer.
                w_ih = getattr(lstm, f"weight_ih_l0{suffix}").detach().float() * scale[:, None]
                bias = (getattr(lstm, f"bias_ih_l0{suffix}").double() + getattr(lstm, f"bias_hh_l0{suffix}").double()) * scale
                tables.append(torch.addmm(bias.float(), vectors, w_ih.T))
                w_hh = getattr(lstm, f"weight_hh_l0{suffix}").detach().float() * scale[:, None]
                recurrent.append(2.0 * w_hh.T)  # the loop keeps h/2
            self.vocab_size = vectors.shape[0]
            self.table = torch.cat(tables).contiguous()  # forward rows, then backward rows
            self.recurrent = torch.stack(recurrent).contiguous()  # (2, hidden, 4·hidden): h @ W_hh^T
            self.head_weight = 2.0 * model.head.weight.detach().float().T.contiguous()  # pools of h/2
            self.head_bias = model.head.bias.detach().float().clone()
        self.batch_size = batch_size

    @torch.inference_mode()
    def logits(self, flat_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits [n, classes] of rows given as `truncate_ids` returns them (ids end to end, lengths >= 1)."""
        n = len(lengths)
        out = np.zeros((n, self.head_bias.shape[0]), dtype=np.float32)
        if n == 0:
            return out
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        order = np.argsort(-lengths, kind="stable")
        with torch_threads(self.threads):
            for first in range(0, n, self.batch_size):
                rows = order[first:first + self.batch_size]
                out[rows] = self._batch(flat_ids, starts[rows], lengths[rows])
        return out

    def _batch(self, flat_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Rows sorted longest first (`starts`/`lengths` into `flat_ids`)."""
        n, width, hidden = len(lengths), int(lengths[0]), self.hidden
        steps = np.arange(width)
        # Step s reads position s of each row forward and position length-1-s backward (clipped where the
        # row has ended: such rows are past the active prefix and never read).
        last = lengths[:, None] - 1
        index = np.empty((width, 2, n), dtype=np.int64)
        index[:, 0] = flat_ids[starts[:, None] + np.minimum(steps[None, :], last)].T
        index[:, 1] = flat_ids[starts[:, None] + np.maximum(last - steps[None, :], 0)].T + self.vocab_size
        index = torch.from_numpy(index)
        active = (steps[:, None] < lengths[None, :]).sum(axis=1).tolist()  # rows longer than s: a prefix
        h = torch.zeros(2, n, hidden)
        cell = torch.zeros(2, n, hidden)  # twice the LSTM's cell state
        h_max = torch.full((2, n, hidden), -torch.inf)
        h_sum = torch.zeros(2, n, hidden)
        # A step costs ~40 µs of Python and dispatch whatever its size, so views change only with m.
        m, max_now, sum_now, table, recurrent = n, h_max, h_sum, self.table, self.recurrent
        for s in range(width):
            if active[s] < m:  # rows that ended drop out; their pooled values are final
                m = active[s]
                h, cell = h[:, :m].contiguous(), cell[:, :m].contiguous()
                max_now, sum_now = h_max[:, :m], h_sum[:, :m]
            gates = torch.nn.functional.embedding(index[s, :, :m], table).baddbmm_(h, recurrent).sigmoid_()
            i, f, g, o = gates.split(hidden, dim=2)
            cell.mul_(f).addcmul_(i, g, value=4.0).sub_(i, alpha=2.0)  # 2c ← f·2c + i·2·tanh(x), 2·tanh(x) = 4·sigmoid(2x) − 2
            h = torch.sigmoid(cell).sub_(0.5).mul_(o)  # h/2 = o·tanh(c)/2 = o·(sigmoid(2c) − ½)
            sum_now.add_(h)
            torch.maximum(max_now, h, out=max_now)
        mean = h_sum / torch.from_numpy(lengths).float()[None, :, None]
        # [max forward, max backward, mean forward, mean backward]: the reference's feature order
        features = torch.cat([h_max[0], h_max[1], mean[0], mean[1]], dim=1)
        return torch.addmm(self.head_bias, features, self.head_weight).numpy()


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` (if given and fewer) for the block, then restored.
    The setting is per calling thread (OpenMP's), so other threads' work is not slowed."""
    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LSTMTrainResult:
    best_epoch: int
    best_f1: float
    history: list[dict] = field(default_factory=list)


def train_lstm(
    model: BiLSTMClassifier,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    epochs: int,
    patience: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    freeze_embeddings_epochs: int,
    device: str,
    seed: int,
    progress: bool = True,
) -> LSTMTrainResult:
    """Train with class-weighted cross-entropy; early-stop on validation macro-F1 and keep the best epoch.

    `train` and `val` are (ids, lengths, class indices). The model is left at its best epoch.
    """
    ids, lengths, y = train
    n_classes = model.head.out_features
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    # sqrt-inverse-frequency weights: rare typologies matter as much as common ones in macro-F1,
    # but full inverse weights over-predict the tiny classes.
    weights = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** 0.5, 0.0)
    weights = weights / weights[counts > 0].mean()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = int(np.ceil(len(y) / batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    rng = np.random.default_rng(seed)
    result = LSTMTrainResult(best_epoch=0, best_f1=-1.0)
    best_state = copy.deepcopy(model.state_dict())
    bar = progress_bar(total=epochs * steps_per_epoch, desc="BiLSTM", unit="batch", show=progress)
    stale = 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        model.embedding.weight.requires_grad_(epoch > freeze_embeddings_epochs)
        total, seen = 0.0, 0
        for idx in batches(lengths, batch_size, rng):
            width = int(lengths[idx].max())
            batch_ids = torch.from_numpy(ids[idx, :width]).to(device)
            batch_len = torch.from_numpy(lengths[idx]).to(device)
            target = torch.from_numpy(y[idx]).to(device)
            loss = loss_fn(model(batch_ids, batch_len), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.update(1)
        val_logits = predict_logits(model, val[0], val[1], device)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val[2])))
        f1 = macro_f1(val[2].tolist(), val_logits.argmax(1).tolist())
        row = {"epoch": epoch, "loss": total / max(seen, 1), "val_loss": val_loss, "val_macro_f1": f1,
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start}
        result.history.append(row)
        bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.3f}", val_f1=f"{f1:.3f}")
        if f1 > result.best_f1:
            result.best_f1, result.best_epoch, stale = f1, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    return result
