"""`museum export`: ONNX / TorchScript copies of image models, checked against the models on real images."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from museum.cli import app
from museum.config import ImageConfig
from museum.errors import MuseumError
from museum.image.export import PARITY_TOLERANCE, ExportedImageModel, _decoded_batches, export_model, parity_paths
from museum.image.model import ImageModel
from museum.image.scoring import ScoringGraph
from museum.train_image import train_image_model

runner = CliRunner()
# Fine-tuned from ImageNet weights (the offline package's) for one epoch at 64 px: probabilities that differ
# from image to image, so agreement means something; two members and the mirror view, as the defaults make.
FINETUNED = ImageConfig(input_size=64, epochs=1, batch_size=8, workers=0, threads=1, members=2, tta=True)


@pytest.fixture(scope="session")
def offline_weights():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUSEUM_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def finetuned_dir(tiny_folder, tmp_path_factory, offline_weights) -> Path:
    out = tmp_path_factory.mktemp("export") / "finetuned"
    train_image_model(FINETUNED, tiny_folder, out)
    return out


@pytest.fixture(scope="session")
def head_dir(tiny_folder, tmp_path_factory, offline_weights) -> Path:
    """A logistic head on stage features, homer against the rest: a head and a decision threshold."""
    out = tmp_path_factory.mktemp("export") / "head"
    train_image_model(ImageConfig(head="logreg", positive="homer", input_size=64, workers=0, threads=1), tiny_folder, out)
    return out


@pytest.fixture(scope="session")
def real_images(characters_dir) -> Path:
    return characters_dir / "simpsons_small"


@pytest.fixture(scope="session")
def onnx_dir(finetuned_dir, real_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "finetuned-onnx"
    export_model(finetuned_dir, "onnx", out, images=real_images)
    return out


def _digests(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _both(model_dir: Path, export_dir: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(the model's probabilities, the export's) on `paths`, each loaded from its folder."""
    want, ok = ImageModel.load(model_dir, device="cpu").predict_paths(paths, batch_size=32, num_workers=0)
    got, ok2 = ExportedImageModel.load(export_dir).predict_paths(paths, batch_size=32, num_workers=0)
    assert ok.all() and ok2.all()
    return want, got


def test_onnx_export_matches_the_model_on_100_real_images(finetuned_dir, onnx_dir, real_images):
    meta = ExportedImageModel.load(onnx_dir).meta
    assert meta["parity"]["images"] == 100 and meta["parity"]["max_abs_diff"] <= PARITY_TOLERANCE
    assert meta["members"] == 2 and meta["tta"] and meta["output"] == "proba" and meta["kind"] == "finetuned"
    # Checked again here, independently of the export's own check: both loaded from disk, files decoded.
    paths = parity_paths(finetuned_dir, real_images)
    assert len(paths) == 100 and len({p.parent.name for p in paths}) == 5  # spread over every class
    want, got = _both(finetuned_dir, onnx_dir, paths)
    assert want.std(0).max() > 0.01  # the probabilities differ from image to image: agreement means something
    assert np.abs(want - got).max() <= PARITY_TOLERANCE
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)


def test_image_model_scoring_paths_match_torch_eager_on_real_images(finetuned_dir, onnx_dir, real_images):
    """ImageModel's default on a CPU (its scoring graph in ONNX Runtime), its torch path (folded, channels-last)
    and an exported graph, each against the unfolded networks in torch eager mode, on 100 real images."""
    model = ImageModel.load(finetuned_dir, device="cpu")
    eager = ScoringGraph([model.net, *model.members], *model.network_norms(), model.config.tta).eval()
    paths = parity_paths(finetuned_dir, real_images)
    images = torch.cat([batch for _, batch in _decoded_batches(paths, model.input_size, model.interpolation, 50, 0)])
    with torch.no_grad():
        want = eager(images).numpy()
    default, ok = model.predict_paths(paths, batch_size=50, num_workers=0)
    assert ok.all() and model._onnx is not None  # the default went through ONNX Runtime
    model.runtime = "torch"
    torch_path, _ = model.predict_paths(paths, batch_size=50, num_workers=0)
    exported = ExportedImageModel.load(onnx_dir).proba_uint8(images)
    assert len(images) == 100 and want.std(0).max() > 0.01
    for got in (default, torch_path, exported):
        assert np.abs(want - got).max() <= PARITY_TOLERANCE
        assert (got.argmax(1) == want.argmax(1)).all()


def test_a_network_onnx_cannot_take_is_scored_in_torch(finetuned_dir, real_images, monkeypatch, caplog):
    """An exporter failure (an op a timm backbone may use that ONNX lacks) falls back to torch, said once."""
    import museum.image.model as image_model

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX opset version 17 is not supported")

    paths = parity_paths(finetuned_dir, real_images)[:20]
    want, _ = ImageModel.load(finetuned_dir, device="cpu").predict_paths(paths, batch_size=10, num_workers=0)
    monkeypatch.setattr(image_model, "write_onnx", refuse)
    model = ImageModel.load(finetuned_dir, device="cpu")
    with caplog.at_level("WARNING", logger="museum"):
        got, ok = model.predict_paths(paths, batch_size=10, num_workers=0)
    assert ok.all() and model.runtime == "torch" and model._onnx is None
    assert np.abs(want - got).max() <= PARITY_TOLERANCE
    assert [r.getMessage() for r in caplog.records].count(
        "image model: ONNX Runtime cannot take this network (Exporting the operator 'aten::made_up' to ONNX opset "
        "version 17 is not supported); scoring in torch") == 1


def test_torchscript_export_through_the_cli_with_its_defaults(finetuned_dir):
    """Default folder MODEL_DIR-torchscript, default images: the model's validation images."""
    result = runner.invoke(app, ["export", str(finetuned_dir), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    out = finetuned_dir.parent / "finetuned-torchscript"
    assert f"model.ts written to {out}" in result.output
    meta = ExportedImageModel.load(out).meta
    validation = json.loads((finetuned_dir / "metrics.json").read_text())["val_predictions"]
    assert meta["parity"]["images"] == len(validation) > 0
    want, got = _both(finetuned_dir, out, parity_paths(finetuned_dir, None))
    assert np.abs(want - got).max() <= PARITY_TOLERANCE


def test_head_model_with_a_decision_exports(head_dir, real_images, tmp_path):
    out = tmp_path / "head-onnx"
    meta = export_model(head_dir, "onnx", out, images=real_images, n_images=40)
    assert meta["output"] == "features" and meta["head"] == "logreg" and meta["decision"]["positive"] == "homer"
    assert {"model.onnx", "head.json", "head.npz", "export.json"} == {p.name for p in out.iterdir()}
    paths = parity_paths(head_dir, real_images, 40)
    want, got = _both(head_dir, out, paths)
    assert np.abs(want - got).max() <= PARITY_TOLERANCE and want.std(0).max() > 0.01


def test_export_never_writes_over_models_and_a_failed_check_writes_nothing(finetuned_dir, head_dir, onnx_dir,
                                                                           real_images, tmp_path):
    before = _digests(finetuned_dir), _digests(head_dir)
    for out, why in [(finetuned_dir, "is also an input"), (finetuned_dir / "onnx", "lies inside the input folder"),
                     (finetuned_dir.parent, "contains the input"), (head_dir, "holds a model folder")]:
        with pytest.raises(MuseumError, match=why):
            export_model(finetuned_dir, "onnx", out, images=real_images)
    assert (_digests(finetuned_dir), _digests(head_dir)) == before
    # An export whose check cannot pass leaves the export already there as it was.
    previous = _digests(onnx_dir)
    with pytest.raises(MuseumError, match="differ from the model's.*nothing written"):
        export_model(finetuned_dir, "onnx", onnx_dir, images=real_images, tolerance=-1.0, n_images=4)
    assert _digests(onnx_dir) == previous
    # A damaged export is refused on load, in one line.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("model.onnx", "export.json"):
        (damaged / name).write_bytes((onnx_dir / name).read_bytes())
    with open(damaged / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(MuseumError, match="model.onnx is missing or differs"):
        ExportedImageModel.load(damaged)


def test_cli_refusals_are_one_line(finetuned_dir, tmp_path, monkeypatch):
    for args, message in [
        (["--format", "tflite"], "--format tflite: expected one of onnx, torchscript"),
        (["--out", str(finetuned_dir)], "is also an input"),
        (["--images", str(tmp_path)], "no images to check the export on"),
    ]:
        result = runner.invoke(app, ["export", str(finetuned_dir), *args])
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed
    result = runner.invoke(app, ["export", str(finetuned_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "pip install 'museum[export]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
