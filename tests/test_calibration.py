"""Softmax and temperature scaling (scipy) give what the former hand-written code gave, on real margins:
held-out LinearSVC scores of char n-gram TF-IDF on train.csv, as the TF-IDF expert calibrates them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax

from csvrows import read_rows
from museum.calibration import fit_temperature, softmax


@pytest.fixture(scope="module")
def margins(museum_train_csv):
    """(held-out 15-class margins, labels, held-out one-column binary margins, binary labels) of 1,500 rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.svm import LinearSVC

    rows = read_rows(museum_train_csv)[:1500]
    labels = [r["typology"] for r in rows]
    y = np.searchsorted(sorted(set(labels)), labels)
    x = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True).fit_transform(
        [r["description"] for r in rows])
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    scores = cross_val_predict(LinearSVC(C=0.5), x, y, cv=folds, method="decision_function")
    binary = (y == np.bincount(y).argmax()).astype(int)
    margin = cross_val_predict(LinearSVC(C=0.5), x, binary, cv=folds, method="decision_function")
    return scores, y, margin.reshape(-1, 1), binary


def former_softmax(scores: np.ndarray) -> np.ndarray:
    """The hand-written softmax museum.calibration had before scipy's."""
    if scores.shape[1] == 1:
        scores = np.hstack([-scores / 2, scores / 2])
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def former_fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The golden-section search museum.calibration had before scipy's bounded Brent search."""
    def nll(t):
        p = former_softmax(scores * t)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    a, b, g = np.log(0.01), np.log(100.0), (np.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - g * (b - a), a + g * (b - a)
        if nll(np.exp(c)) < nll(np.exp(d)):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))


def nll_gradient(scores: np.ndarray, y: np.ndarray, t: float) -> float:
    """d/dT of the mean log-loss of softmax(T · scores): mean over rows of E_p[score] - score of the label."""
    if scores.shape[1] == 1:
        scores = np.hstack([-scores / 2, scores / 2])
    p = scipy_softmax(scores * t, axis=1)
    return float(((p * scores).sum(1) - scores[np.arange(len(y)), y]).mean())


def test_softmax_is_bit_for_bit_the_former_one(margins):
    scores, _, margin, _ = margins
    for x in (scores, scores.astype(np.float32), scores[:1], margin, margin.astype(np.float32)):
        got = softmax(x)
        assert got.dtype == np.float32 and np.array_equal(got, former_softmax(x))
    assert np.allclose(softmax(margin).sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["15 classes", "one margin column"])
def test_temperature_is_the_minimum_and_the_former_one(margins, binary):
    scores, y = (margins[2], margins[3]) if binary else (margins[0], margins[1])
    t = fit_temperature(scores, y)
    assert 0.1 < t < 50
    # At the minimum of a convex loss the gradient vanishes: here to float rounding of the search's tolerance.
    scale = np.abs(scores).mean()
    assert abs(nll_gradient(scores, y, t)) < 1e-5 * scale
    # The former float32 golden-section search landed within its own float32 noise of it.
    assert t == pytest.approx(former_fit_temperature(scores, y), rel=1e-3)


def test_separable_scores_push_the_temperature_to_its_bound():
    y = np.arange(40) % 4
    scores = np.eye(4)[y] * 0.05  # every row right: a sharper softmax is always better (loss still > 0 at T = 100)
    assert fit_temperature(scores, y) == pytest.approx(100.0, rel=1e-3)
    assert fit_temperature(scores, y) == pytest.approx(former_fit_temperature(scores, y), rel=1e-3)
