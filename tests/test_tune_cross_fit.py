"""The #19 workflow end to end on a small real slice: train both experts, `tune --cross-fit`, then submit,
evaluate and the Predictor use the fusion it saved (and say which rule decided each row)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from csvrows import read_rows, write_rows
from museum.cli import app

runner = CliRunner()


def ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, museum_train_csv, multimodal_dir):
    root = tmp_path_factory.mktemp("wf")
    header = ["guid", "description", "typology"]
    text_rows = read_rows(museum_train_csv)[:600]
    train = write_rows(root / "train.csv", header, [[r[h] for h in header] for r in text_rows])
    mm = read_rows(multimodal_dir / "train.csv")
    rng = np.random.default_rng(0)
    labelled = write_rows(root / "labelled.csv", header, [[mm[i][h] for h in header] for i in rng.permutation(len(mm))[:90]])
    images = multimodal_dir / "images"
    ok("train-text", "--train", train, "--out", root / "models" / "text", "--epochs", "1", "--hidden", "8", "--no-navec",
       "--vectors-weight", "0")
    ok("train-image", "--train", labelled, "--images", images, "--out", root / "models" / "image", "--epochs", "1",
       "--input-size", "32", "--members", "1", "--weights", "none", "--workers", "0")
    return root, labelled, images


def test_tune_cross_fit_then_submit_uses_the_saved_rule(workflow):
    root, labelled, images = workflow
    models = ["--text-model", root / "models" / "text", "--image-model", root / "models" / "image"]
    out = ok("tune", "--cross-fit", labelled, "--images", images, *models, "--cross-fit-folds", "2", "--folds", "2")
    assert "text expert alone" in out and "image expert alone" in out and "fused:" in out
    settings = json.loads((root / "models" / "fusion.json").read_text(encoding="utf-8"))
    assert settings["rule"]["kind"] in ("cascade", "weighted", "stacker")
    assert settings["tuned_on"]["cross_fit"]["folds"] == 2
    cache = list((root / "models" / "crossfit").glob("oof-*.npz"))
    assert cache
    again = ok("tune", "--cross-fit", labelled, "--images", images, *models, "--cross-fit-folds", "2", "--folds", "2")
    assert "reused" in again  # the out-of-fold probabilities are not computed twice
    sub = ok("submit", labelled, "--images", images, *models, "--out", root / "s.csv", "--proba", root / "p.csv")
    kind = settings["rule"]["kind"]
    assert [line.split()[-1] for line in sub.splitlines() if line.startswith("fusion rule")] == [kind]
    routes = {r["route"] for r in read_rows(root / "p.csv")}
    assert routes <= {"text", "image", "fallback", "blend" if kind == "cascade" else kind}
    ev = ok("evaluate", labelled, "--images", images, *models)
    assert "cascade" in ev


def test_tune_needs_one_source_and_refuses_changed_training_data(workflow, tmp_path):
    root, labelled, images = workflow
    result = runner.invoke(app, ["tune", "--text-model", str(root / "models" / "text"), "--image-model", "none"])
    assert result.exit_code == 2 and "give one of --valid" in result.output
    import shutil

    moved = tmp_path / "models"
    shutil.copytree(root / "models", moved)
    data = json.loads((moved / "text" / "data.json").read_text(encoding="utf-8"))
    data["train"]["sha256"] = "0" * 64  # as if train.csv had changed since training
    (moved / "text" / "data.json").write_text(json.dumps(data), encoding="utf-8")
    (moved / "text" / "manifest.json").unlink()  # a hand-edited folder would be refused first: test the record check
    result = runner.invoke(app, ["tune", "--cross-fit", str(labelled), "--images", str(images), "--text-model",
                                 str(moved / "text"), "--image-model", "none", "--cross-fit-folds", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "changed" in result.output or "sha256" in result.output, result.output
