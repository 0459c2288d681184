"""`--config FILE` (YAML, TOML, a run's config.json) for train-text, train-image and tune; checks in the configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clirun import error_line, invoke
from csvrows import read_rows, write_rows
from museum.config import FusionConfig, ImageConfig, TextConfig, config_to_dict
from museum.configfile import config_from_file
from museum.errors import MuseumError


# Tiny but real: a few seconds of training (no navec: the word-vector expert is left out).
TINY_TEXT_YAML = """\
# train-text, tiny
navec: false
vectors_weight: 0
w2v_dim: 16
w2v_epochs: 1
epochs: 2
hidden: 8
lr: 1e-3        # YAML 1.1 reads this as text: taken as the number it is
blend_weight: auto
device: cpu
"""


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory, museum_train_csv) -> Path:
    """300 real labelled rows, every tenth row of train.csv (all classes with more than a handful of rows)."""
    rows = read_rows(museum_train_csv)[::10][:300]
    path = tmp_path_factory.mktemp("cfg") / "small.csv"
    return write_rows(path, ["guid", "description", "typology"], [[r["guid"], r["description"], r["typology"]] for r in rows])


# ----------------------------------------------------------------------------- loading


def test_yaml_toml_and_json_give_the_same_config(tmp_path):
    (tmp_path / "a.yaml").write_text(TINY_TEXT_YAML, encoding="utf-8")
    (tmp_path / "a.toml").write_text('navec = false\nvectors_weight = 0\nw2v_dim = 16\nw2v_epochs = 1\nepochs = 2\nhidden = 8\n'
                                     'lr = 1e-3\nblend_weight = "auto"\ndevice = "cpu"\n', encoding="utf-8")
    from_yaml = config_from_file(TextConfig, tmp_path / "a.yaml")
    assert from_yaml.lr == 0.001 and from_yaml.blend_weight is None and from_yaml.epochs == 2 and not from_yaml.navec
    (tmp_path / "a.json").write_text(json.dumps(config_to_dict(from_yaml)), encoding="utf-8")
    assert config_from_file(TextConfig, tmp_path / "a.toml") == from_yaml == config_from_file(TextConfig, tmp_path / "a.json")
    # Options from the command line replace the file's values one by one.
    assert config_from_file(TextConfig, tmp_path / "a.yaml", {"epochs": 5, "blend_weight": 0.3}) == \
        TextConfig(**{**config_to_dict(from_yaml), "epochs": 5, "blend_weight": 0.3})
    assert config_from_file(TextConfig, None, {"seed": 4}) == TextConfig(seed=4)


def test_image_auto_values_round_trip_through_config_json(tmp_path):
    """0 (auto) sizes, epochs, members, workers and None (auto) mixup stay automatic after a trip through a file."""
    config = ImageConfig(head="logreg", embeddings="e.npz", positive="homer", target_precision=0.9, cache_dir="c")
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)), encoding="utf-8")
    loaded = config_from_file(ImageConfig, tmp_path / "config.json")
    assert loaded == config and loaded.input_size == loaded.epochs == loaded.members == 0 and loaded.mixup is None
    (tmp_path / "m.yaml").write_text("mixup: auto\nepochs: 0\nlr: 0.01\n", encoding="utf-8")
    assert config_from_file(ImageConfig, tmp_path / "m.yaml") == ImageConfig(mixup=None, epochs=0, lr=0.01)


@pytest.mark.parametrize("name, content, message", [
    ("c.yaml", "epoch: 3\nhiden: 8\nsurprise: 1\n", "unknown key(s) epoch (did you mean epochs?), hiden (did you mean hidden?), surprise"),
    ("c.yaml", "epochs: [1, 2\n", "not valid YAML"),
    ("c.yaml", "- epochs\n- 3\n", "expected `name: value` pairs"),
    ("c.toml", "epochs = \n", "not valid TOML"),
    ("c.json", "{\"epochs\": 3,}", "not valid JSON"),
    ("c.ini", "epochs=3", "expected a .yaml, .yml, .toml or .json file"),
    ("c.yaml", "epochs: three\n", "--epochs 'three': expected a whole number"),
    ("c.yaml", "navec: 1\n", "--navec 1: expected true or false"),
    ("c.yaml", "lr: fast\n", "--lr 'fast': expected a number"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MuseumError) as caught:
        config_from_file(TextConfig, path)
    text = str(caught.value)
    assert text.startswith(f"--config {path}:") and message in text and "\n" not in text, text
    with pytest.raises(MuseumError, match="no such file"):
        config_from_file(TextConfig, tmp_path / "missing.yaml")


def test_a_bad_value_reads_the_same_from_a_file_the_command_line_and_the_library(tmp_path, small_csv):
    """The range checks live in the configs: one wording wherever the value came from, refused before any data is read."""
    cases = [
        ("train-text", ["--train", small_csv], "epochs: 0", ["--epochs", "0"], "--epochs 0: must be at least 1"),
        ("train-text", ["--train", small_csv], "vectors_weight: 2", ["--vectors-weight", "2"], "--vectors-weight 2.0: must be between 0 and 1"),
        ("train-text", ["--train", small_csv], "blend_weight: 0.9\nvectors_weight: 0.5", ["--blend-weight", "0.9", "--vectors-weight", "0.5"],
         "leaves TF-IDF nothing"),
        ("train-image", ["--images", tmp_path], "ema: 1.5", ["--ema", "1.5"], "--ema 1.5: must be between 0 (off) and 1"),
        ("train-image", ["--images", tmp_path], "members: 3\nhead: svm", ["--members", "3", "--head", "svm"],
         "--members 3: only fine-tuning trains several networks"),
        ("train-image", ["--images", tmp_path], "balance: magic", ["--balance", "magic"], "--balance magic: expected one of loss, sampler, none"),
        ("tune", ["--valid", small_csv], "tune_folds: 1", ["--folds", "1"], "--folds 1: must be at least 2"),
        ("tune", ["--valid", small_csv], "text_threshold: 1.5", ["--text-threshold", "1.5"], "--text-threshold 1.5: must be between 0 and 1"),
    ]
    for i, (command, needed, in_file, on_line, message) in enumerate(cases):
        config = tmp_path / f"bad{i}.yaml"
        config.write_text(in_file + "\n", encoding="utf-8")
        out = ["--out", tmp_path / f"out{i}"] if command != "tune" else ["--out", tmp_path / f"fusion{i}.json"]
        from_file = error_line(invoke(command, *needed, *out, "--config", config))
        from_line = error_line(invoke(command, *needed, *out, *on_line))
        assert message in from_file and message in from_line, (from_file, from_line)
        assert str(config) in from_file and not list(tmp_path.glob(f"out{i}*")) and not list(tmp_path.glob(f"fusion{i}*"))
    with pytest.raises(MuseumError, match="--epochs 0: must be at least 1"):
        TextConfig(epochs=0)
    with pytest.raises(MuseumError, match="--folds 1: must be at least 2"):
        FusionConfig(tune_folds=1)
    with pytest.raises(MuseumError, match=r"--mixup 2.0: must be between 0 and 1, or auto"):
        ImageConfig(mixup=2)


# ----------------------------------------------------------------------------- round trips


def proba_of(model_dir: Path, texts: list[str]) -> np.ndarray:
    from museum.text.model import TextModel

    return TextModel.load(model_dir).predict_proba(texts)


def test_text_run_config_json_reproduces_the_run(tmp_path, small_csv):
    """train-text from a YAML file with an override, then again from the run's config.json: same probabilities."""
    (tmp_path / "tiny.yaml").write_text(TINY_TEXT_YAML, encoding="utf-8")
    first, second = tmp_path / "first", tmp_path / "second"
    result = invoke("train-text", "--train", small_csv, "--config", tmp_path / "tiny.yaml", "--seed", "3", "--out", first)
    assert result.exit_code == 0, result.output
    saved = json.loads((first / "config.json").read_text(encoding="utf-8"))
    assert saved["seed"] == 3 and saved["epochs"] == 2 and saved["lr"] == 0.001 and saved["blend_weight"] is None
    assert saved["hidden"] == 8 and saved["navec"] is False  # from the file; the rest are the defaults
    result = invoke("train-text", "--train", small_csv, "--config", first / "config.json", "--out", second)
    assert result.exit_code == 0, result.output
    assert json.loads((second / "config.json").read_text(encoding="utf-8")) == saved
    texts = [r["description"] for r in read_rows(small_csv)]
    assert np.array_equal(proba_of(first, texts), proba_of(second, texts))


def test_image_run_config_json_reproduces_the_run(tmp_path, tiny_folder):
    """train-image with automatic input size and mixup from a YAML file, then from its config.json: same probabilities."""
    from museum.image.model import ImageModel

    (tmp_path / "tiny.yaml").write_text("weights: none\nepochs: 1\nmembers: 1\nbatch_size: 8\nworkers: 0\nthreads: 1\n"
                                        "device: cpu\ntta: false\n", encoding="utf-8")
    first, second = tmp_path / "first", tmp_path / "second"
    result = invoke("train-image", "--images", tiny_folder, "--config", tmp_path / "tiny.yaml", "--out", first, "--seed", "2")
    assert result.exit_code == 0, result.output
    saved = json.loads((first / "config.json").read_text(encoding="utf-8"))
    assert saved["input_size"] == 0 and saved["mixup"] is None and saved["seed"] == 2 and saved["weights"] == "none"
    result = invoke("train-image", "--images", tiny_folder, "--config", first / "config.json", "--out", second)
    assert result.exit_code == 0, result.output
    assert json.loads((second / "config.json").read_text(encoding="utf-8")) == saved
    images = sorted(p for p in Path(tiny_folder).rglob("*") if p.is_file())[:10]
    a, b = ImageModel.load(first).predict_proba(images), ImageModel.load(second).predict_proba(images)
    assert np.array_equal(a, b)


def test_tune_takes_a_config_file_and_options_override_it(tmp_path, text_model_dir, museum_train_csv):
    """tune --valid on rows the text model never saw: the file's fields and the command line's both reach fusion.json."""
    rows = read_rows(museum_train_csv)[1500:1700]  # text_model_dir trained on the first 1,500 rows
    valid = write_rows(tmp_path / "valid.csv", ["guid", "description", "typology"],
                       [[r["guid"], r["description"], r["typology"]] for r in rows])
    (tmp_path / "fusion.toml").write_text("tune_folds = 3\ntune_min_gain = 0.02\nseed = 7\nbatch_size = 16\n", encoding="utf-8")
    out = tmp_path / "fusion.json"
    result = invoke("tune", "--valid", valid, "--text-model", text_model_dir, "--image-model", "none",
                    "--config", tmp_path / "fusion.toml", "--seed", "9", "--out", out)
    assert result.exit_code == 0, result.output
    assert "optimistic" not in result.output  # held-out rows: no warning
    config = json.loads(out.read_text(encoding="utf-8"))["config"]
    assert (config["tune_folds"], config["tune_min_gain"], config["seed"], config["batch_size"]) == (3, 0.02, 9, 16)
