"""Probability calibration shared by the experts: softmax and temperature scaling.

Experts are blended by averaging probabilities, which only makes sense when each expert's
confidence means the same thing: a BiLSTM trained to near-zero loss says 0.99 where a
margin classifier's raw softmax says 0.3. Temperature scaling fixes the scale without
changing any argmax.
"""

from __future__ import annotations

import numpy as np


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32; a single score column is read as a binary margin."""
    if scores.shape[1] == 1:  # binary LinearSVC: one score for the second class
        scores = np.hstack([-scores / 2, scores / 2])
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The scale T minimising the log-loss of softmax(T · scores) (golden-section search)."""

    def nll(t: float) -> float:
        p = softmax(scores * t)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    lo, hi = 0.01, 100.0
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - g * (b - a), a + g * (b - a)
        if nll(np.exp(c)) < nll(np.exp(d)):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))
