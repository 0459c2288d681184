"""Command-line conventions shared by every command: completion, --quiet, progress bars, descriptions on standard
input, --device checked first, default outputs never replaced silently, `museum split`, training rows in evaluate."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clirun import error_line, invoke
from csvrows import read_rows, write_rows
from museum.data.competition import normalise_description

ROOT = Path(__file__).resolve().parents[1]
MUSEUM = Path(sys.executable).with_name("museum")  # the installed entry point, as a shell runs it
runner = CliRunner()


def labelled(path: Path, rows: list[dict]) -> Path:
    return write_rows(path, ["guid", "description", "typology"], [[r["guid"], r["description"], r["typology"]] for r in rows])


@pytest.fixture(scope="module")
def train_rows(museum_train_csv) -> list[dict]:
    return read_rows(museum_train_csv)


# ----------------------------------------------------------------------------- completion, --quiet, progress bars


def test_shell_completion_for_bash(tmp_path):
    # Typer's own switch for tests: the shell comes from the argument, not from shellingham's look at the parent
    # processes, which finds none when pytest runs under a non-shell parent (CI runners, `time bash -c …`).
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash", "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    run = lambda *args, **extra: subprocess.run([str(MUSEUM), *args], capture_output=True, text=True, timeout=60,  # noqa: E731
                                                env={**env, **extra})
    assert "--install-completion" in run("--help").stdout and "--show-completion" in run("--help").stdout
    script = run("--show-completion", "bash")
    assert script.returncode == 0 and "complete -o default -F _museum_completion museum" in script.stdout
    # What bash asks when <TAB> follows `museum tr` and `museum train-text --con`.
    words = run(_MUSEUM_COMPLETE="complete_bash", COMP_WORDS="museum tr", COMP_CWORD="1").stdout.split()
    assert words == ["train-text", "train-image"]
    assert run(_MUSEUM_COMPLETE="complete_bash", COMP_WORDS="museum train-text --con", COMP_CWORD="2").stdout.split() == ["--config"]
    installed = run("--install-completion", "bash")
    assert installed.returncode == 0, installed.stderr
    assert "_museum_completion" in (tmp_path / ".bash_completions" / "museum.sh").read_text()
    assert ".bash_completions/museum.sh" in (tmp_path / ".bashrc").read_text()


def test_quiet_keeps_results_and_warnings_only(tmp_path, text_model_dir, museum_test_csv):
    rows = read_rows(museum_test_csv)[:30]
    test_csv = write_rows(tmp_path / "test.csv", ["guid", "description"], [[r["guid"], r["description"]] for r in rows])
    args = ["submit", test_csv, "--text-model", text_model_dir, "--image-model", "none", "--device", "cpu"]
    loud = invoke(*args, "--out", tmp_path / "a.csv")
    quiet = invoke("--quiet", *args, "--out", tmp_path / "b.csv")
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "fusion: cascade" in loud.output and "fusion:" not in quiet.output  # INFO lines
    assert "rows" in quiet.output and (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert "choose one" in error_line(invoke("-q", "-v", "doctor"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_on_a_terminal_only_and_never_under_quiet(monkeypatch):
    from museum.log import logger, progress_bar, setup_logging

    level = logger.level
    try:
        setup_logging()
        assert progress_bar(range(3)).disable  # stderr is no terminal under pytest
        monkeypatch.setattr(sys, "stderr", _Terminal())
        bar = progress_bar(range(3), desc="x")
        assert not bar.disable and list(bar) == [0, 1, 2] and "x" in sys.stderr.getvalue()
        assert progress_bar(range(3), show=False).disable  # e.g. ranks other than 0
        setup_logging(quiet=True)
        assert progress_bar(range(3)).disable
    finally:
        logger.setLevel(level)
    # Every bar of every command is this one: no module draws its own.
    direct = [str(p.relative_to(ROOT)) for p in (ROOT / "museum").rglob("*.py")
              if p.name != "log.py" and "tqdm" in p.read_text(encoding="utf-8")]
    assert direct == []


# ----------------------------------------------------------------------------- predict-text - and --file


def test_predict_text_reads_standard_input_and_files(tmp_path, text_model_dir):
    coin, painting = "Монета. Две копейки. 1789 г.", "Картина. Холст, масло. Пейзаж"
    result = invoke("predict-text", "-", "--model", text_model_dir, "--top", "2", input=f"{coin}\n\n  \n{painting}\n")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == coin and lines[3] == painting and len(lines) == 6  # blank lines are no descriptions
    assert "предметы нумизматики" in lines[1]
    listed = tmp_path / "descriptions.txt"
    listed.write_text(f"{painting}\n{coin}\n", encoding="utf-8")
    result = invoke("predict-text", coin, "--file", listed, "--model", text_model_dir, "--top", "1")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[::2] == [coin, painting, coin]
    assert "no descriptions" in error_line(invoke("predict-text", "-", "--model", text_model_dir, input=""))
    assert "--file" in error_line(invoke("predict-text", "--file", tmp_path / "none.txt", "--model", text_model_dir))


# ----------------------------------------------------------------------------- --device


def test_device_cuda_is_refused_before_any_data_is_read(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    missing = tmp_path / "nowhere.csv"  # every command would stop on it, were it read first
    (tmp_path / "cuda.yaml").write_text("device: cuda\n", encoding="utf-8")
    commands = [
        ["train-text", "--train", missing, "--device", "cuda"],
        ["train-text", "--train", missing, "--config", tmp_path / "cuda.yaml"],
        ["train-image", "--images", tmp_path / "nowhere", "--device", "cuda", "--out", tmp_path / "m"],
        ["submit", missing, "--device", "cuda", "--out", tmp_path / "s.csv"],
        ["evaluate", missing, "--device", "cuda"],
        ["tune", "--valid", missing, "--device", "cuda"],
        ["tune", "--cross-fit", missing, "--config", tmp_path / "cuda.yaml"],
        ["embed", tmp_path / "nowhere", "--device", "cuda", "--out", tmp_path / "e.npz"],
        ["predict-image", tmp_path / "a.jpg", "--model", tmp_path / "nowhere", "--device", "cuda:1"],
        ["dedup", missing, "--device", "cuda", "--out", tmp_path / "d"],
        ["split", missing, "--device", "cuda", "--out", tmp_path / "split"],
        ["serve", "--device", "cuda"],
    ]
    for args in commands:
        line = error_line(invoke(*args))
        assert "no CUDA device is visible" in line and "nowhere" not in line, (args, line)
    assert not any(p.name in ("m", "s.csv", "e.npz", "d", "split") for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------- default outputs


def test_default_outputs_are_never_replaced_silently(tmp_path, monkeypatch, text_model_dir, train_rows, museum_test_csv):
    monkeypatch.chdir(tmp_path)
    small = labelled(tmp_path / "small.csv", train_rows[::40])
    tests = read_rows(museum_test_csv)[:20]
    test_csv = write_rows(tmp_path / "test.csv", ["guid", "description"], [[r["guid"], r["description"]] for r in tests])
    submit = ["submit", test_csv, "--text-model", text_model_dir, "--image-model", "none", "--device", "cpu"]
    # The first run with the default writes there (a fresh clone, CI); the second is refused, nothing replaced.
    assert invoke(*submit).exit_code == 0
    written = Path("submissions/submission.csv")
    before = written.read_bytes()
    written.write_bytes(before + b"edited by hand\r\n")
    line = error_line(invoke(*submit))
    assert "submissions/submission.csv: holds an earlier submission" in line and "--force" in line and "--out" in line
    assert written.read_bytes().endswith(b"edited by hand\r\n")
    assert invoke(*submit, "--force").exit_code == 0 and written.read_bytes() == before
    assert invoke(*submit, "--out", written).exit_code == 0  # an --out given is the user's choice
    # Trainers: an earlier model in the default folder stays as it is.
    shutil.copytree(text_model_dir, "models/text")
    manifest = Path("models/text/manifest.json").read_bytes()
    line = error_line(invoke("train-text", "--train", small))
    assert "models/text: holds an earlier text model" in line and "--force" in line
    assert Path("models/text/manifest.json").read_bytes() == manifest
    Path("models/image").mkdir(parents=True)
    Path("models/image/best.pt").write_bytes(b"an earlier run")
    assert "models/image: holds an earlier image model" in error_line(invoke("train-image", "--images", tmp_path))
    # Report commands: reports/KIND-NAME.
    assert invoke("eda", small).exit_code == 0 and Path("reports/eda-small/eda.json").is_file()
    assert "reports/eda-small: holds an earlier analysis" in error_line(invoke("eda", small))
    assert invoke("eda", small, "--force").exit_code == 0
    for kind in ("clean", "dedup"):
        Path(f"reports/{kind}-small").mkdir(parents=True)
        Path(f"reports/{kind}-small/x.html").write_text("earlier", encoding="utf-8")
        assert f"reports/{kind}-small: holds an earlier" in error_line(invoke(kind, small))
    # clean --reuse reads the earlier audit there: not refused (here it has no probabilities to reuse).
    assert "run once without --reuse" in error_line(invoke("clean", small, "--reuse"))


# ----------------------------------------------------------------------------- museum split


def split_rows(folder: Path) -> tuple[list[dict], list[dict]]:
    return read_rows(folder / "train.csv"), read_rows(folder / "valid.csv")


def test_split_is_stratified_seeded_and_keeps_descriptions_on_one_side(tmp_path, museum_train_csv, train_rows):
    out = tmp_path / "split"
    result = invoke("split", museum_train_csv, "--out", out, "--seed", "0")
    assert result.exit_code == 0, result.output
    train, valid = split_rows(out)
    # Every row once, with its columns as they were.
    assert sorted(r["guid"] for r in train + valid) == sorted(r["guid"] for r in train_rows)
    assert list(train[0]) == list(valid[0]) == list(train_rows[0])
    by_guid = {r["guid"]: r for r in train_rows}
    assert all(r == by_guid[r["guid"]] for r in train + valid)
    # No description (case and spacing ignored) on both sides, though the file repeats some (155 groups).
    train_texts = {normalise_description(r["description"]) for r in train} - {""}
    assert not train_texts & {normalise_description(r["description"]) for r in valid}
    repeated = Counter(normalise_description(r["description"]) for r in train_rows)
    assert sum(1 for text, n in repeated.items() if text and n > 1) > 100
    # Stratified: a fifth of every class, as far as the groups kept whole allow.
    total, held = Counter(r["typology"] for r in train_rows), Counter(r["typology"] for r in valid)
    assert 0.19 < len(valid) / len(train_rows) < 0.21
    assert all(abs(held[c] - round(0.2 * n)) <= 2 for c, n in total.items()), held
    assert all(held[c] >= 1 for c in total)
    # The counts per class are printed.
    for c in total:
        assert any(line.startswith(c) and line.split()[-2:] == [str(total[c] - held[c]), str(held[c])]
                   for line in result.output.splitlines()), c
    # Seeded: the same seed writes the same files, another seed another split.
    first = (out / "valid.csv").read_bytes()
    assert invoke("split", museum_train_csv, "--out", out, "--seed", "0").exit_code == 0
    assert (out / "valid.csv").read_bytes() == first
    assert invoke("split", museum_train_csv, "--out", tmp_path / "other", "--seed", "1").exit_code == 0
    assert (tmp_path / "other" / "valid.csv").read_bytes() != first


def test_grouped_split_places_whole_groups_and_meets_each_class_target():
    import numpy as np

    from museum.split import grouped_split, join_groups

    rng = np.random.default_rng(0)
    labels = list(rng.choice(["a", "b", "c"], size=300, p=[0.6, 0.3, 0.1]))
    groups = join_groups([list(rng.choice(300, size=int(rng.integers(2, 6)), replace=False)) for _ in range(40)], 300)
    train, valid = grouped_split(labels, groups, 0.25, seed=1)
    assert sorted([*train, *valid]) == list(range(300))
    side = np.zeros(300, dtype=bool)
    side[valid] = True
    assert all(len(set(side[g])) == 1 for g in groups)
    for c in "abc":
        n = labels.count(c)
        assert abs(sum(labels[i] == c for i in valid) - round(0.25 * n)) <= 1, c
    assert np.array_equal(grouped_split(labels, groups, 0.25, seed=1)[1], valid)
    assert not np.array_equal(grouped_split(labels, groups, 0.25, seed=2)[1], valid)


def test_split_keeps_near_duplicate_images_on_one_side(tmp_path, multimodal_dir, monkeypatch):
    """Real photos plus copies under other guids and descriptions: exact copies and 4 %-cropped ones."""
    from museum.data.images import ImageDecodeError, safe_open_image

    rows = []
    for r in read_rows(multimodal_dir / "train.csv"):
        try:
            safe_open_image(multimodal_dir / "images" / f"{r['guid']}.jpg")
        except (ImageDecodeError, OSError):
            continue
        rows.append(r)
        if len(rows) == 40:
            break
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    pairs = []
    for r in rows:
        shutil.copy(multimodal_dir / "images" / f"{r['guid']}.jpg", data / "images")
    for k, r in enumerate(rows[:10]):
        copy = {"guid": f"copy-{k}", "description": f"другое описание {k}", "typology": r["typology"]}
        source = data / "images" / f"{r['guid']}.jpg"
        if k % 2:
            shutil.copy(source, data / "images" / f"{copy['guid']}.jpg")
        else:
            img = Image.open(source).convert("RGB")
            w, h = img.size
            img.crop((w * 0.04, h * 0.04, w * 0.96, h * 0.96)).save(data / "images" / f"{copy['guid']}.jpg", quality=90)
        pairs.append((r["guid"], copy["guid"]))
        rows.append(copy)
    labelled(data / "train.csv", rows)
    monkeypatch.chdir(tmp_path)
    result = invoke("split", data / "train.csv", "--val-fraction", "0.5", "--device", "cpu")  # images/ beside it
    assert result.exit_code == 0, result.output
    out = Path("splits/data-train")  # the default folder
    train, valid = split_rows(out)
    side = {r["guid"]: "train" for r in train} | {r["guid"]: "valid" for r in valid}
    assert len(side) == len(rows) and all(side[a] == side[b] for a, b in pairs)
    assert 0.4 < len(valid) / len(rows) < 0.6
    assert (out / "images").resolve() == (data / "images").resolve()  # the competition layout
    assert "holds an earlier split" in error_line(invoke("split", data / "train.csv"))


# ----------------------------------------------------------------------------- evaluate: rows a model was trained on


def test_evaluate_warns_about_rows_a_model_was_trained_on(tmp_path, text_model_dir, train_rows):
    """text_model_dir was trained on the first 1,500 rows of train.csv (its data.json says which file)."""
    mixed = labelled(tmp_path / "mixed.csv", train_rows[:20] + train_rows[2000:2020])
    result = invoke("evaluate", mixed, "--text-model", text_model_dir, "--image-model", "none", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "20 of 40 rows were in the training data of the text model" in result.output and "museum split" in result.output
    held_out = labelled(tmp_path / "held_out.csv", train_rows[2000:2040])
    result = invoke("evaluate", held_out, "--text-model", text_model_dir, "--image-model", "none", "--device", "cpu")
    assert result.exit_code == 0 and "training data" not in result.output, result.output
