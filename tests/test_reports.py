"""Run reports: each figure on real data, the pages of a text run, a multi-network image run and
an evaluation with photos opened in Chromium (every figure there, shown at its natural size;
thumbnails of 160 px with wrapping captions; auto options with their values), TensorBoard events
of text runs, an interrupted run, reports from predictions, the CLI, and the time budget."""

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
from museum.reports.run_report import _pr_curves, _read_summary
from museum.reports.thumbs import thumbnail_tag
from museum.utils import read_json, write_json


@pytest.fixture(scope="session")
def image_run(tmp_path_factory, characters_dir) -> Path:
    """A real one-epoch train-image run folder on simpsons_small (64 px to stay quick; 4 networks, Lite2 and MobileNetV2 in turn, as auto picks for 259 images)."""
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
        assert img.width <= plots.REPORT_WIDTH * 100 + 40  # fits the page: shown unshrunk, names at 10 pt
        assert img.height > 15 * 45  # a row per class with room for a name on two lines


def test_learning_curves_and_histogram(tmp_path, image_run, museum_train_csv):
    history = read_json(image_run / "metrics.json")["history"]
    curves = plots.learning_curves(history, tmp_path / "curves.png", best_epoch=1)
    lengths = [len(t) for t in read_competition_csv(museum_train_csv).descriptions]
    hist = plots.histogram(lengths, tmp_path / "lengths.png", "Description length", "characters")
    assert curves.stat().st_size > 10_000 and hist.stat().st_size > 10_000


def _has_colour(png: Path, colour: str, tolerance: int = 12) -> bool:
    """Whether any pixel of the image is within `tolerance` of the hex colour on every channel."""
    with Image.open(png) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16).reshape(-1, 3)
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(pixels - target).max(1) <= tolerance).any())


def test_learning_curves_draw_every_network(tmp_path, image_run):
    """The three networks of the run, each from its own summary.csv, in three colours; a lone network in two."""
    saved = read_json(image_run / "metrics.json")
    histories = [saved["history"]] + [_read_summary(image_run / f"member{k}" / "summary.csv") for k in (1, 2)]
    networks = [(f"network {k + 1}", h, m["best_epoch"]) for k, (h, m) in enumerate(zip(histories, saved["members"]))]
    three = plots.learning_curves(networks, tmp_path / "three.png")
    one = plots.learning_curves(saved["history"], tmp_path / "one.png", best_epoch=1)
    assert all(_has_colour(three, c) for c in plots.NETWORK_COLOURS[:3])
    assert not _has_colour(one, plots.NETWORK_COLOURS[2])


def test_pr_curves_and_reliability_on_text_predictions(tmp_path, text_run):
    from sklearn.metrics import average_precision_score

    saved = read_json(text_run / "metrics.json")
    rows, classes = saved["val_predictions"], saved["classes"]
    assert len(classes) == 15 and all(len(r["proba"]) == 15 for r in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing Cyrillic glyph would raise here
        pr = _pr_curves(rows, classes)
        figure = plots.per_class_pr_curves(pr["curves"], tmp_path / "pr.png")
        reliability = plots.reliability_diagram([r["confidence"] for r in rows], [r["true"] == r["pred"] for r in rows],
                                                tmp_path / "reliability.png")
    aps = [c["ap"] for c in pr["curves"]]
    assert len(aps) == 15 and aps == sorted(aps)  # worst first
    worst = classes.index(pr["curves"][0]["class"])
    truth = np.array([r["true"] for r in rows])
    assert aps[0] == pytest.approx(average_precision_score(truth == classes[worst], [r["proba"][worst] for r in rows]))
    for path in (figure, reliability):
        with Image.open(path) as img:
            assert img.width <= plots.REPORT_WIDTH * 100 + 40  # fits the page's column: shown unshrunk
        assert path.stat().st_size > 20_000


def test_calibration_bins_by_hand():
    # 10 rows at 0.95 with 9 right, 10 at 0.55 with 5 right: both bins 0.05 off, so ECE 0.05
    confidence = [0.95] * 10 + [0.55] * 10
    correct = [True] * 9 + [False] + [True] * 5 + [False] * 5
    stats = plots.calibration_bins(np.array(confidence), np.array(correct), 10)
    assert stats["count"].tolist() == [0] * 5 + [10, 0, 0, 0, 10]
    assert stats["accuracy"][9] == pytest.approx(0.9) and stats["accuracy"][5] == pytest.approx(0.5)
    assert stats["ece"] == pytest.approx(0.05)


def test_thumbnails_are_160_px_and_a_broken_file_says_why(tmp_path, characters_dir):
    items = list_image_folder(characters_dir / "simpsons_mnist")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(items.paths[0].read_bytes()[:100])  # a real image cut short
    assert re.search(r'(width|height)="160"', thumbnail_tag(items.paths[0], "28 px"))  # blown up to the box
    photo = list_image_folder(characters_dir / "simpsons_small").paths[0]
    assert re.search(r'(width|height)="160"', thumbnail_tag(photo, "photo"))
    assert "<img" not in thumbnail_tag(broken, "broken")


# ----------------------------------------------------------------------------- run reports


FIGURES = ("class_distribution", "learning_curves", "per_class", "pr_curves", "reliability", "confusion_matrix")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".bmp", ".png")


def _check_figures(check, run: Path, expected: tuple[str, ...] = FIGURES) -> list[dict]:
    """Every report figure is in the page, loads, and is shown at its natural size (never shrunk, so
    class names keep their size); every thumbnail is at least 160 px on its longer side. Returns the thumbnails."""
    figures = [img for img in check.images if not img["alt"].endswith(PHOTO_SUFFIXES)]
    thumbs = [img for img in check.images if img["alt"].endswith(PHOTO_SUFFIXES)]
    assert not check.broken_images, check.broken_images
    assert sorted(img["alt"] for img in figures) == sorted(ALT[name] for name in expected)
    for name in expected:
        assert (run / f"{name}.png").stat().st_size > 5_000, name
    assert all(img["shown_width"] == img["width"] for img in figures), figures
    assert all(max(img["width"], img["height"]) >= 160 for img in thumbs), thumbs
    return thumbs


ALT = {"class_distribution": "validation class distribution", "learning_curves": "learning curves",
       "per_class": "per-class scores", "pr_curves": "precision-recall curves", "reliability": "reliability diagram",
       "confusion_matrix": "confusion matrix"}


def test_image_run_report_opens_in_chromium(tmp_path, image_run):
    page = build_run_report(image_run)
    assert _per_class_rows(page) == 5
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text  # self-contained
    check = open_in_chromium(page, tmp_path / "image_report.png", height=4000)
    thumbs = _check_figures(check, image_run)
    assert len(thumbs) == 48 + 16  # the validation sample and the highest-loss examples
    assert "Most-confused pairs" in check.dom and "Calibration" in check.dom
    assert "each of the 4 networks" in text and "validation macro-F1 alone" in text
    members = read_json(image_run / "metrics.json")["members"]  # a mixed ensemble: the report's table names each backbone
    assert [m["backbone"] for m in members] == [ImageConfig.backbone, "mobilenet_v2"] * 2
    resolved = read_json(image_run / "metrics.json")["resolved"]
    assert resolved["members"] == 4 and resolved["input_size"] == 64
    # config.json holds members 0, mixup null, threads 0, device auto: each shows what the trainer chose
    for key in ("members", "mixup", "threads", "device"):
        value = resolved[key]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        assert f"<span>{key}</span> <b>{shown}</b> <i>(auto)</i>" in text, key
    assert check.screenshot.stat().st_size > 20_000


def test_report_of_a_run_written_before_resolved_values(tmp_path, image_run):
    """An older run (no `resolved` in metrics.json, config input_size 0): the checkpoint says what it came to."""
    run = tmp_path / "older"
    shutil.copytree(image_run, run, ignore=shutil.ignore_patterns("*.png", "report.html", "tensorboard"))
    saved = read_json(run / "metrics.json")
    del saved["resolved"]
    write_json(run / "metrics.json", saved)
    write_json(run / "config.json", {**read_json(run / "config.json"), "input_size": 0})
    text = build_run_report(run).read_text(encoding="utf-8")
    assert "<span>input_size</span> <b>64</b> <i>(auto)</i>" in text
    assert "<span>members</span> <b>4</b> <i>(auto)</i>" in text
    assert "<span>threads</span> <i>auto (not recorded by this run)</i>" in text


def test_text_run_report_opens_in_chromium(tmp_path, text_run):
    page = build_run_report(text_run)
    assert _per_class_rows(page) == 15
    text = page.read_text(encoding="utf-8")
    assert "Highest-loss descriptions" in text and "предметы" in text
    assert "<span>device</span> <b>cpu</b> <i>(auto)</i>" in text
    check = open_in_chromium(page, tmp_path / "text_report.png", height=3000)
    assert not _check_figures(check, text_run)  # no thumbnails for text


def test_text_run_writes_tensorboard_events(text_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    saved = read_json(text_run / "metrics.json")
    events = EventAccumulator(str(text_run / "tensorboard"))
    events.Reload()
    for key in ("loss", "val_loss", "val_macro_f1", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in saved["history"]], key
    assert events.Scalars("blend/val_macro_f1")[0].value == pytest.approx(saved["macro_f1"], rel=1e-6)


def test_evaluation_report_with_photos_and_russian_classes(tmp_path, text_run, multimodal_dir):
    """The text run's predictions on 150 multimodal rows, their photos as examples, 7 typologies."""
    from museum.text.model import TextModel

    table = read_competition_csv(multimodal_dir / "train.csv", require_labels=True)
    photo = {g: multimodal_dir / "images" / f"{g}.jpg" for g in table.guids}
    keep = [i for i, g in enumerate(table.guids) if photo[g].is_file() and photo[g].stat().st_size > 0][:150]
    model = TextModel.load(text_run)
    proba = model.predict_proba([table.descriptions[i] for i in keep])
    y_true = [table.labels[i] for i in keep]
    y_pred = [model.classes_[j] for j in proba.argmax(1)]
    examples = [{"path": str(photo[table.guids[i]]), "text": table.descriptions[i], "guid": table.guids[i]} for i in keep]
    out = tmp_path / "evaluation"
    page = build_report_from_predictions(out, y_true, y_pred, proba, model.classes_, examples, title="Evaluation")
    assert len(read_json(out / "metrics.json")["val_predictions"][0]["proba"]) == len(model.classes_)
    check = open_in_chromium(page, tmp_path / "evaluation.png", height=5000)
    assert len(_check_figures(check, out, tuple(f for f in FIGURES if f != "learning_curves"))) == 48 + 16
    # Captions carry whole class names and wrap inside their 176-px cell rather than being cut.
    longest = "предметы прикладного искусства, быта и этнографии"
    long_captions = [c for c in check.captions if longest in c["text"]]
    assert long_captions and "…" not in "".join(c["text"] for c in check.captions)
    assert all(c["width"] <= 176 and c["lines"] >= 3 for c in long_captions), long_captions[:2]
    assert page.stat().st_size < 2_000_000  # 64 photos as small JPEGs


def test_interrupted_run_report(tmp_path, image_run):
    run = tmp_path / "interrupted"
    run.mkdir()
    for name in ("config.json", "summary.csv", "last.pt", "member1/summary.csv"):
        (run / name).parent.mkdir(exist_ok=True)
        shutil.copy(image_run / name, run / name)
    page = build_run_report(run)
    text = page.read_text(encoding="utf-8")
    assert "metrics.json is missing" in text and "--resume" in text
    assert "each of the 2 networks" in text  # the second was still training
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
                    "confidence": float(p.max()), "proba": p.tolist()} for i, p in zip(val, proba)]
    write_json(run / "metrics.json", {"history": read_json(image_run / "metrics.json")["history"],
                                      "classes": classes, "val_predictions": predictions})
    start = time.perf_counter()
    page = build_run_report(run)
    seconds = time.perf_counter() - start
    print(f"report of 1,000 validation images: {seconds:.1f}s")
    assert seconds < 20
    assert _per_class_rows(page) == 10
    assert (run / "pr_curves.png").is_file() and (run / "reliability.png").is_file()
    assert page.stat().st_size < 2_000_000  # bounded grid, small thumbnails


# ----------------------------------------------------------------------------- escaping (jinja2 autoescape)

HOSTILE = '<script>document.title="pwned"</script> & "q" \'s\' <b>bold</b>'


def test_report_helpers_escape_text_and_pass_markup():
    from museum.reports import html

    table = html.table(("name", "n", "score"), [(HOSTILE, 1234, 0.123456), ("x" * 61, None, 12345.6)], bad_rows=[True])
    assert "<script>" not in table and "&lt;script&gt;" in table and "&lt;b&gt;bold" in table
    assert '<tr class="bad"><td class="text">&lt;script' in table  # flagged; long text wraps
    assert '<td class="num">1,234</td><td class="num">0.1235</td>' in table  # numbers right-aligned, 4 decimals
    assert '<tr><td class="text">' + "x" * 61 in table and "<td>—</td>" in table and "12,345.6" in table
    section = html.section(HOSTILE, html.note(HOSTILE), "<i>plain text is escaped</i>", html.heading("h"))
    assert "<script>" not in section and "&lt;i&gt;plain" in section and "<h3>h</h3>" in section
    assert section.count("&lt;script&gt;") == 2 and '<p class="note">&lt;script' in section
    page = html.page(HOSTILE, HOSTILE, [section])
    assert "<script>" not in page and page.startswith("<!DOCTYPE html>") and "<style>" in page


def test_report_page_shows_hostile_names_as_text_in_chromium(tmp_path, multimodal_dir):
    """Class names, descriptions, file names, config values and the title are user text: Chromium must show
    them as written, run none of them, and load nothing but the page itself."""
    table = read_competition_csv(multimodal_dir / "train.csv", require_labels=True)
    from museum.data.images import ImageDecodeError, safe_open_image

    def readable(path: Path) -> bool:
        try:
            return path.is_file() and safe_open_image(path, draft=64) is not None
        except ImageDecodeError:
            return False

    keep = [i for i, g in enumerate(table.guids[:80]) if readable(multimodal_dir / "images" / f"{g}.jpg")][:24]
    named = tmp_path / f"{HOSTILE.replace('/', '_')}.jpg"  # a file name is user text too
    shutil.copy(multimodal_dir / "images" / f"{table.guids[keep[0]]}.jpg", named)
    classes = sorted({table.labels[i] for i in keep}) + [HOSTILE]
    y_true = [HOSTILE if k % 4 == 0 else table.labels[i] for k, i in enumerate(keep)]
    proba = np.random.default_rng(0).dirichlet(np.ones(len(classes)), size=len(keep))
    y_pred = [classes[j] for j in proba.argmax(1)]
    examples = [{"path": str(named if k == 0 else multimodal_dir / "images" / f"{table.guids[i]}.jpg"),
                 "text": HOSTILE if k < 3 else table.descriptions[i]} for k, i in enumerate(keep)]
    page = build_report_from_predictions(tmp_path / "out", y_true, y_pred, proba, classes, examples, title=HOSTILE,
                                         config={"note": HOSTILE, "device": "auto"})
    text = page.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>bold" not in text
    assert not re.findall(r'(?:src|href)="(?!data:)', text)  # every image inline, nothing linked
    check = open_in_chromium(page, tmp_path / "hostile.png", height=4000)
    # The title is still the text as written (the script would have set it to "pwned"); the only script is the probe.
    assert "<title>&lt;script&gt;document.title=" in check.dom and check.dom.count("<script>") == 1
    assert "<b>bold" not in check.dom and not check.broken_images
    assert any(HOSTILE in c["text"] for c in check.captions)  # the class name shown as written
    assert any(img["alt"] == named.name and img["width"] for img in check.images)
