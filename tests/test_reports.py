"""Run reports: each figure on real data, the page of a text and an image run opened in
Chromium, an interrupted run, reports from predictions, the CLI, and the time budget."""

from __future__ import annotations

import re
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from browser import open_in_chromium
from museum.cli import app
from museum.config import ImageConfig, TextConfig
from museum.data.competition import read_competition_csv
from museum.data.images import list_image_folder
from museum.metrics import classification_metrics
from museum.reports import build_report_from_predictions, build_run_report, plots
from museum.utils import read_json, write_json


@pytest.fixture(scope="session")
def image_run(tmp_path_factory, characters_dir) -> Path:
    """A real one-epoch train-image run folder on simpsons_small (64 px to stay quick; 3 networks, as auto picks for 259 images)."""
    from museum.train_image import train_image_model

    out = tmp_path_factory.mktemp("image_run")
    train_image_model(ImageConfig(epochs=1, input_size=64, workers=1), characters_dir / "simpsons_small", out)
    return out


@pytest.fixture(scope="session")
def text_run(tmp_path_factory, museum_train_csv) -> Path:
    """A real one-epoch train-text run folder on the competition's train.csv (small BiLSTM)."""
    from museum.train_text import train_text_model

    out = tmp_path_factory.mktemp("text_run")
    config = TextConfig(navec=False, w2v_dim=32, w2v_epochs=1, epochs=1, hidden=16, batch_size=128)
    train_text_model(museum_train_csv, out, config, progress=False)
    return out


def _per_class_rows(page: Path) -> int:
    """Rows of the per-class table in a report page."""
    text = page.read_text(encoding="utf-8")
    section = text[text.index("Per-class scores"):]
    table = section[: section.index("</table>")]
    return len(re.findall(r"<tr", table)) - 1  # minus the header row


# ----------------------------------------------------------------------------- figures


def test_font_has_cyrillic():
    from matplotlib import font_manager, ft2font

    family = plots.cyrillic_font()
    charmap = ft2font.FT2Font(font_manager.findfont(family, fallback_to_default=False)).get_charmap()
    assert all(ord(ch) in charmap for ch in "абвгдеёжзийклмнопрстуфхцчшщъыьэюя")


def test_longest_typology_fits_in_three_lines(museum_train_csv):
    longest = max(set(read_competition_csv(museum_train_csv, require_labels=True).labels), key=len)
    wrapped = plots.wrap_label(longest, 24, 3)
    assert "…" not in wrapped and wrapped.replace("\n", " ") == longest
    assert all(len(line) <= 24 for line in wrapped.split("\n"))


def test_class_distribution_on_15_typologies(tmp_path, museum_train_csv):
    counts = Counter(read_competition_csv(museum_train_csv, require_labels=True).labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)"
        path = plots.class_distribution(dict(counts), tmp_path / "classes.png")
    assert plots.imbalance_ratio(counts) > plots.LOG_SCALE_RATIO  # drawn on a log axis
    with Image.open(path) as img:
        assert img.height > 15 * 30  # the figure grows with the class count
    assert path.stat().st_size > 20_000


def test_confusion_and_per_class_on_text_predictions(tmp_path, text_run):
    saved = read_json(text_run / "metrics.json")
    rows = saved["val_predictions"]
    classes = sorted({r["true"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for r in rows:
        matrix[index[r["true"]], index[r["pred"]]] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing Cyrillic glyph would raise here
        cm = plots.confusion_matrix(matrix, classes, tmp_path / "cm.png")
        bars = plots.per_class_scores(saved["per_class"], tmp_path / "per_class.png")
    assert len(classes) == 15
    for path in (cm, bars):
        assert path.stat().st_size > 20_000
    with Image.open(cm) as img:
        assert min(img.size) > 15 * 50  # room for 15 rows and columns of names


def test_learning_curves_and_histogram(tmp_path, image_run, museum_train_csv):
    history = read_json(image_run / "metrics.json")["history"]
    curves = plots.learning_curves(history, tmp_path / "curves.png", best_epoch=1)
    lengths = [len(t) for t in read_competition_csv(museum_train_csv).descriptions]
    hist = plots.histogram(lengths, tmp_path / "lengths.png", "Description length", "characters")
    assert curves.stat().st_size > 10_000 and hist.stat().st_size > 10_000


def test_image_grid_marks_errors_and_survives_a_broken_file(tmp_path, characters_dir):
    items = list_image_folder(characters_dir / "simpsons_small")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(items.paths[0].read_bytes()[:300])  # a real JPEG cut short
    examples = [{"path": str(p), "true": t, "pred": t if i % 3 else "homer", "confidence": 0.9}
                for i, (p, t) in enumerate(zip(items.paths[::20], items.labels[::20]))]
    examples.append({"path": str(broken), "true": "bart", "pred": "bart", "confidence": 0.5})
    path = plots.image_grid(examples, tmp_path / "grid.png", "examples")
    with Image.open(path) as img:
        assert img.mode == "P"  # palette PNG: photos stay small
        assert img.width > 8 * 100
    assert 10_000 < path.stat().st_size < 400_000


# ----------------------------------------------------------------------------- run reports


def test_image_run_report_opens_in_chromium(tmp_path, image_run):
    page = build_run_report(image_run)
    for name in ("learning_curves", "class_distribution", "per_class", "confusion_matrix", "examples", "highest_loss"):
        assert (image_run / f"{name}.png").stat().st_size > 5_000, name
    assert _per_class_rows(page) == 5
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text  # self-contained
    check = open_in_chromium(page, tmp_path / "image_report.png")
    assert len(check.images) == 6 and not check.broken_images, check.images
    assert "Most-confused pairs" in check.dom
    assert "networks&#x27; validation macro-F1" in text or "networks' validation macro-F1" in text
    assert "seed 100:" in text and "first of 3 networks" in text
    assert check.screenshot.stat().st_size > 20_000


def test_text_run_report_opens_in_chromium(tmp_path, text_run):
    page = build_run_report(text_run)
    assert _per_class_rows(page) == 15
    text = page.read_text(encoding="utf-8")
    assert "Highest-loss descriptions" in text and "предметы" in text
    assert not (text_run / "examples.png").exists()  # no image grid for text
    check = open_in_chromium(page, tmp_path / "text_report.png", height=3000)
    assert len(check.images) == 4 and not check.broken_images, check.images


def test_interrupted_run_report(tmp_path, image_run):
    run = tmp_path / "interrupted"
    run.mkdir()
    for name in ("config.json", "summary.csv", "last.pt"):
        shutil.copy(image_run / name, run / name)
    page = build_run_report(run)
    text = page.read_text(encoding="utf-8")
    assert "metrics.json is missing" in text and "--resume" in text
    assert (run / "learning_curves.png").is_file()
    assert not (run / "confusion_matrix.png").exists()
    assert not (run / "metrics.json").exists()  # nothing to compute it from: not invented


def test_report_from_predictions(tmp_path, text_run):
    rows = read_json(text_run / "metrics.json")["val_predictions"][:200]
    y_true, y_pred = [r["true"] for r in rows], [r["pred"] for r in rows]
    classes = sorted(set(y_true) | set(y_pred))
    # One-hot probabilities softened by each row's saved confidence: real predictions, complete rows.
    proba = np.full((len(rows), len(classes)), 0.0)
    for i, r in enumerate(rows):
        proba[i] = (1 - r["confidence"]) / (len(classes) - 1)
        proba[i, classes.index(r["pred"])] = r["confidence"]
    out = tmp_path / "evaluation"
    page = build_report_from_predictions(out, y_true, y_pred, proba, classes,
                                         examples=[{"text": r["text"], "guid": r["guid"]} for r in rows])
    saved = read_json(out / "metrics.json")
    assert saved["macro_f1"] == pytest.approx(classification_metrics(y_true, y_pred)["macro_f1"])
    assert len(saved["val_predictions"]) == 200 and "loss" in saved["val_predictions"][0]
    assert _per_class_rows(page) == len(set(y_true))
    with pytest.raises(Exception, match="model folder"):
        build_report_from_predictions(text_run, y_true, y_pred)


def test_report_cli(image_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(image_run)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "train-text or train-image" in result.output
    (empty / "metrics.json").write_text("[]", encoding="utf-8")  # valid JSON, not what a run writes
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not as train-text/train-image write it" in result.output


def test_report_of_1000_validation_images_is_quick(tmp_path, image_run, characters_dir):
    """1,000 real 28 px thumbnails with the predictions of a nearest-centroid pixel classifier."""
    items = list_image_folder(characters_dir / "simpsons_mnist")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(items))
    val, train = order[:1000], order[1000:3000]
    pixels = lambda idx: np.stack([np.asarray(Image.open(items.paths[i]).convert("RGB"), np.float32).ravel() / 255  # noqa: E731
                                   for i in idx])
    classes = sorted(set(items.labels))
    x_train, y_train = pixels(train), np.array([classes.index(items.labels[i]) for i in train])
    centroids = np.stack([x_train[y_train == k].mean(0) for k in range(len(classes))])
    distance = ((pixels(val)[:, None, :] - centroids[None]) ** 2).sum(-1)
    proba = np.exp(-(distance - distance.min(1, keepdims=True)) / 10)
    proba /= proba.sum(1, keepdims=True)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "summary.csv"):
        shutil.copy(image_run / name, run / name)
    predictions = [{"path": str(items.paths[i]), "true": items.labels[i], "pred": classes[int(p.argmax())],
                    "confidence": float(p.max())} for i, p in zip(val, proba)]
    write_json(run / "metrics.json", {"history": read_json(image_run / "metrics.json")["history"],
                                      "val_predictions": predictions})
    start = time.perf_counter()
    page = build_run_report(run)
    seconds = time.perf_counter() - start
    print(f"report of 1,000 validation images: {seconds:.1f}s")
    assert seconds < 20
    assert _per_class_rows(page) == 10
    assert page.stat().st_size < 2_000_000  # bounded grid, small thumbnails
