"""Nothing lost: model folders are replaced as a whole and verified on load; no command writes over
its own input; full disks and unwritable places are one line; --resume refuses other data; experts
of different tasks are not fused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clirun import error_line
from csvrows import read_rows, write_rows
from museum import engine, folders
from museum.cli import app
from museum.config import ImageConfig, TextConfig
from museum.errors import MuseumError
from museum.image.model import ImageModel
from museum.train_image import train_image_model
from museum.text.model import TextModel
from museum.utils import write_json

TINY_TEXT = TextConfig(navec=False, vectors_weight=0.0, w2v_dim=16, w2v_epochs=1, epochs=1, hidden=8, device="cpu")
TINY_IMAGE = ImageConfig(weights="none", input_size=32, epochs=1, batch_size=8, workers=0, threads=1, members=1)
PROBE = ["Монета. Две копейки. 1789 г.", "Фотография. Группа рабочих у станка", "Картина маслом", "Письмо"]
runner = CliRunner()


@pytest.fixture(scope="module")
def text_rows(museum_train_csv) -> list[dict]:
    return read_rows(museum_train_csv)[:400]


@pytest.fixture(scope="module")
def two_text_models(text_rows) -> tuple[TextModel, TextModel]:
    """Two small real text models that predict differently (other seeds)."""
    from museum.data.competition import stratified_split

    labels = [r["typology"] for r in text_rows]
    tr, va = stratified_split(labels, 0.25, seed=0)
    texts = [r["description"] for r in text_rows]
    fit = lambda seed: TextModel(replace(TINY_TEXT, seed=seed)).fit(  # noqa: E731
        [texts[i] for i in tr], [labels[i] for i in tr], [texts[i] for i in va], [labels[i] for i in va], progress=False)
    return fit(1), fit(2)


def one_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    return error_line(result)


class Boundaries:
    """Counts the steps at which a folder write becomes visible (file renames, folder swaps) and fails at one."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at
        for module, name in ((os, "replace"), (os, "rename"), (folders, "_exchange")):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(real))

    def _wrap(self, real):
        def step(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return step


# ----------------------------------------------------------------------------- whole-folder writes


def test_text_folder_is_old_or_new_whatever_step_fails(two_text_models, tmp_path, monkeypatch):
    old, new = two_text_models
    p_old, p_new = old.predict_proba(PROBE), new.predict_proba(PROBE)
    assert not np.array_equal(p_old, p_new)
    old.save(tmp_path / "sealed")
    shutil.copytree(tmp_path / "sealed", tmp_path / "probe")
    with monkeypatch.context() as m:
        counter = Boundaries(m)
        new.save(tmp_path / "probe")
        steps = counter.calls
    assert steps >= 8  # every file, the manifest's folder and the swap
    for exchange in (True, False):  # renameat2's one-step swap, and the two-rename fallback
        for k in range(1, steps + 1):
            dest = tmp_path / f"m-{exchange}-{k}"
            shutil.copytree(tmp_path / "sealed", dest)
            with monkeypatch.context() as m:
                if not exchange:
                    m.setattr(folders, "_exchange", lambda a, b: False)
                Boundaries(m, fail_at=k)
                with pytest.raises(MuseumError, match="cannot write there .*disk is full"):
                    new.save(dest)
            proba = TextModel.load(dest).predict_proba(PROBE)
            assert np.array_equal(proba, p_old) or np.array_equal(proba, p_new), (exchange, k)
            assert not list(tmp_path.glob(f".{dest.name}.*")), "temporary folders left behind"
    new.save(tmp_path / "sealed")
    assert np.array_equal(TextModel.load(tmp_path / "sealed").predict_proba(PROBE), p_new)


def test_killed_train_text_leaves_the_old_model(two_text_models, text_rows, tmp_path):
    """A real `kill -9` while train-text writes its folder over an existing model."""
    old, _ = two_text_models
    out = tmp_path / "model"
    old.save(out)
    train = write_rows(tmp_path / "train.csv", ["guid", "description", "typology"],
                       [[r["guid"], r["description"], r["typology"]] for r in text_rows])
    proc = subprocess.Popen([sys.executable, "-m", "museum", "train-text", "--train", str(train), "--out", str(out),
                             "--epochs", "1", "--hidden", "8", "--no-navec", "--vectors-weight", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(tmp_path.glob(".model.staging-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert np.array_equal(TextModel.load(out).predict_proba(PROBE), old.predict_proba(PROBE))
    folders.check_destination(out)  # the next writer removes what the killed one left
    assert not list(tmp_path.glob(".model.*"))


def test_edited_or_mixed_folder_is_refused(two_text_models, tmp_path):
    old, new = two_text_models
    old.save(tmp_path / "a")
    new.save(tmp_path / "b")
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    write_json(tmp_path / "a" / "vocab.json", vocab[::-1])  # same size, words shuffled
    with pytest.raises(MuseumError, match="vocab.json differs .* retrain it"):
        TextModel.load(tmp_path / "a")
    # Mixed by hand and the manifest dropped: the shapes still give it away.
    shutil.copy(tmp_path / "b" / "text_model.pt", tmp_path / "a" / "text_model.pt")
    (tmp_path / "a" / "manifest.json").unlink()
    write_json(tmp_path / "a" / "vocab.json", vocab[:-3])
    with pytest.raises(MuseumError, match="vocab.json has .* words but the network's embedding has"):
        TextModel.load(tmp_path / "a")
    with open(tmp_path / "b" / "tfidf.npz", "r+b") as f:  # cut short
        f.truncate(100)
    result = runner.invoke(app, ["predict-text", "x", "--model", str(tmp_path / "b")])
    assert "tfidf.npz has 100 bytes" in one_line(result)


def test_swap_interrupted_between_renames_is_recovered(two_text_models, tmp_path):
    old, _ = two_text_models
    old.save(tmp_path / "m")
    os.rename(tmp_path / "m", tmp_path / ".m.old-999999999")  # what a kill between the two renames leaves
    assert np.array_equal(TextModel.load(tmp_path / "m").predict_proba(PROBE), old.predict_proba(PROBE))


def test_real_full_disk_is_one_line_and_keeps_the_old_model(two_text_models, tmp_path):
    old, new = two_text_models
    disk = tmp_path / "disk"
    disk.mkdir()
    old.save(tmp_path / "ref")
    size = sum(p.stat().st_size for p in (tmp_path / "ref").rglob("*") if p.is_file())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096}", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (not root?); the injected ENOSPC test covers each step")
    try:
        old.save(disk / "m")
        with pytest.raises(MuseumError, match=r"cannot write there \(No space left on device, the disk is full\)"):
            new.save(disk / "m")
        assert np.array_equal(TextModel.load(disk / "m").predict_proba(PROBE), old.predict_proba(PROBE))
        assert sorted(p.name for p in disk.iterdir()) == ["m"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_stale_temporary_files_are_removed(tmp_path):
    stale = tmp_path / ".x.json.999999999.abc.tmp"
    stale.write_text("half")
    live = tmp_path / f".x.json.{os.getpid()}.def.tmp"
    live.write_text("being written")
    write_json(tmp_path / "x.json", {"a": 1})
    assert not stale.exists() and live.exists()


def test_destination_holding_other_files_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(MuseumError, match="not a museum model"):
        folders.check_destination(tmp_path / "mine")


# ----------------------------------------------------------------------------- image runs


def test_image_run_failing_at_publish_keeps_old_model_and_resumes(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "img"
    first = train_image_model(TINY_IMAGE, tiny_folder, out)
    images = [Image.open(p) for p in sorted(tiny_folder.rglob("*.jpg"))[:5]]
    p_first = first.predict_proba(images)
    with monkeypatch.context() as m:
        real = folders.publish

        def full_disk(*args, **kwargs):
            raise MuseumError(f"{out}: cannot write there (No space left on device, the disk is full); free some space")
        m.setattr("museum.train_image.publish", full_disk)
        with pytest.raises(MuseumError, match="disk is full"):
            train_image_model(replace(TINY_IMAGE, seed=5), tiny_folder, out)
        assert real is folders.publish
    np.testing.assert_allclose(ImageModel.load(out, device="cpu").predict_proba(images), p_first, atol=1e-6)
    assert (tmp_path / "img.partial" / "last.pt").is_file()
    resumed = train_image_model(replace(TINY_IMAGE, seed=5), tiny_folder, out, resume=True)
    p_resumed = ImageModel.load(out, device="cpu").predict_proba(images)
    np.testing.assert_allclose(p_resumed, resumed.predict_proba(images), atol=1e-6)
    assert np.abs(p_resumed - p_first).max() > 1e-3  # the new model, not the old one


def test_resume_on_other_data_says_what_differs(tiny_folder, tmp_path, monkeypatch):
    real = engine.train_one_epoch

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    config = replace(TINY_IMAGE, epochs=2)
    calls = {"n": 0}

    def killed_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        return killed() if calls["n"] == 2 else real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_image_model(config, tiny_folder, tmp_path / "run")
    monkeypatch.setattr(engine, "train_one_epoch", real)
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    shutil.rmtree(other / "bart")
    result = runner.invoke(app, ["train-image", "--images", str(other), "--out", str(tmp_path / "run"), "--weights", "none",
                                 "--input-size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "0",
                                 "--threads", "1", "--members", "1", "--resume"])
    assert "the images folder is not the one the interrupted run trained on" in one_line(result)
    result = runner.invoke(app, ["train-image", "--images", str(tiny_folder), "--out", str(tmp_path / "run"),
                                 "--weights", "none", "--backbone", "resnet18", "--input-size", "32", "--epochs", "2",
                                 "--batch-size", "8", "--workers", "0", "--threads", "1", "--members", "1", "--resume"])
    assert "options differ" in one_line(result) and "backbone" in result.output


def test_model_folder_inside_the_images_is_refused(tiny_folder, tmp_path):
    result = runner.invoke(app, ["train-image", "--images", str(tiny_folder), "--out", str(tiny_folder / "model"),
                                 "--weights", "none"])
    assert "lies inside the input folder" in one_line(result)
    result = runner.invoke(app, ["train-image", "--images", str(tiny_folder / "bart"), "--out", str(tiny_folder)])
    assert "contains the input" in one_line(result)


# ----------------------------------------------------------------------------- inputs and tasks


def test_no_command_writes_over_its_input(text_model_dir, museum_train_csv, tmp_path):
    rows = read_rows(museum_train_csv)[:60]
    data = write_rows(tmp_path / "x.csv", ["guid", "description", "typology"],
                      [[r["guid"], r["description"], r["typology"]] for r in rows])
    before = data.read_bytes()
    models = ["--text-model", text_model_dir, "--image-model", "none"]
    for args in (["submit", data, "--out", data, *models], ["submit", data, "--proba", data, *models],
                 ["submit", data, "--out", text_model_dir / "vocab.json", *models],
                 ["evaluate", data, "--json", data, *models], ["tune", "--valid", data, "--out", data, *models],
                 ["train-text", "--train", data, "--out", tmp_path]):
        line = one_line(runner.invoke(app, [str(a) for a in args]))
        assert "is also an input" in line or "contains the input" in line, line
    assert data.read_bytes() == before


def test_experts_of_different_tasks_are_refused(text_model_dir, tiny_folder, tmp_path, museum_test_csv):
    characters = train_image_model(TINY_IMAGE, tiny_folder, tmp_path / "characters")
    assert characters.classes_ == ["bart", "homer", "lisa", "maggie", "marge"]
    result = runner.invoke(app, ["submit", str(museum_test_csv), "--text-model", str(text_model_dir),
                                 "--image-model", str(tmp_path / "characters"), "--out", str(tmp_path / "s.csv")])
    line = one_line(result)
    assert "share no class" in line and "bart" in line and "живопись" in line
    assert not (tmp_path / "s.csv").exists()
    # A partial overlap is allowed, with a warning naming what only one expert knows.
    mixed = tmp_path / "mixed"
    for i, name in enumerate(["живопись", "графика", "нечто"]):
        shutil.copytree(tiny_folder / sorted(os.listdir(tiny_folder))[i], mixed / name)
    train_image_model(TINY_IMAGE, mixed, tmp_path / "mixed-model")
    result = runner.invoke(app, ["submit", str(museum_test_csv), "--text-model", str(text_model_dir),
                                 "--image-model", str(tmp_path / "mixed-model"), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    assert "only the image model knows 1 class(es): нечто" in result.output


def test_unwritable_output_is_one_line(text_model_dir, museum_test_csv):
    result = runner.invoke(app, ["submit", str(museum_test_csv), "--text-model", str(text_model_dir), "--image-model", "none",
                                 "--out", "/proc/museum/s.csv"])
    assert "/proc/museum/s.csv: cannot write there" in one_line(result)


def test_submit_on_a_full_disk_is_one_line_and_keeps_the_earlier_submission(text_model_dir, museum_test_csv, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        (disk / "s.csv").write_text("earlier submission\n")
        result = runner.invoke(app, ["submit", str(museum_test_csv), "--text-model", str(text_model_dir),
                                     "--image-model", "none", "--out", str(disk / "s.csv")])
        assert "s.csv: cannot write there (No space left on device, the disk is full)" in one_line(result)
        assert (disk / "s.csv").read_text() == "earlier submission\n"
        assert sorted(p.name for p in disk.iterdir()) == ["s.csv"]  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(disk)], check=False)
