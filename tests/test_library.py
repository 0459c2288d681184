"""museum inside someone else's stack: dependency ranges and the lock, optional extras, `museum doctor`,
the Python API (`Predictor`, the scikit-learn `TextModel`, `ImageModel.predict_proba` inputs) and the
README's Python examples, run against small models trained here."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from museum.cli import app
from museum.config import TextConfig
from museum.errors import MuseumError

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"


# ----------------------------------------------------------------------------- dependencies


def project_requirements():
    """Every requirement pyproject.toml declares, core and extras, as packaging Requirements."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(line) for line in lines]


def locked_versions() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_metadata_admits_other_torch_2x_and_pins_nothing():
    from packaging.utils import canonicalize_name

    requirements = {canonicalize_name(r.name): r for r in project_requirements() if r.name != "museum"}
    # A notebook's torch 2.x (and its torchvision) stays as it is; torch 3 is not promised.
    for name, admitted, refused in (("torch", ("2.4.0", "2.5.1", "2.14.1"), ("1.13.1", "3.0.0")),
                                    ("torchvision", ("0.20.1", "0.29.1"), ("1.0.0",))):
        spec = requirements[name].specifier
        assert all(spec.contains(v) for v in admitted), (name, str(spec))
        assert not any(spec.contains(v) for v in refused), (name, str(spec))
    pinned = [str(r) for r in requirements.values() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert pinned == [], "exact pins belong in requirements/constraints.txt"
    # The lock is one environment the ranges admit: every locked version of a declared package fits.
    locked = locked_versions()
    assert {"torch", "torchvision", "scikit-learn", "pandas", "cleanlab", "fastapi", "natasha"} <= set(locked)
    outside = [f"{name}=={locked[name]} vs {r.specifier}" for name, r in requirements.items()
               if name in locked and not r.specifier.contains(locked[name], prereleases=True)]
    assert outside == []


def test_setup_installs_from_the_lock_torch_first():
    script = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8").replace("\\\n", " ")
    installs = [line for line in script.splitlines() if "$PIP install" in line]
    assert len(installs) == 3 and all('-c "$LOCK"' in line for line in installs)
    assert installs[0].endswith("torch torchvision") and installs[1].endswith("-e '.[dev]'")
    # Every package setup.sh names has its version in the lock.
    named = [word for line in installs for word in line.split('"$LOCK"', 1)[1].split() if not word.startswith(("-", "'"))]
    assert "natasha" in named and [n for n in named if n not in locked_versions()] == []


def test_a_missing_optional_package_names_its_extra():
    from museum.extras import require

    assert require("json", "clean").dumps([]) == "[]"
    with pytest.raises(MuseumError, match=r"museum clean \(cleanlab\) needs museum_no_such_module.*museum\[clean\]"):
        require("museum_no_such_module", "clean")


# ----------------------------------------------------------------------------- doctor and warnings


def test_doctor_reports_what_is_installed_and_found(monkeypatch):
    import torch

    import museum.doctor as doctor
    from museum.text import vectors

    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(rf"torch +ok +{re.escape(torch.__version__.split('+')[0])} \(", out)
    for needle in ("navec vectors", "mobilenet_v2 weights", "tf_efficientnet_lite0 weights", "CUDA", "chromium",
                   "extra serve", "extra clean", "extra lemmatize", "extra export"):
        assert needle in out, needle
    # Without the navec file and with a required package missing: how to get each, and a failing status.
    monkeypatch.setattr(vectors, "find_navec", lambda: None)
    real_requires = doctor.metadata.requires
    monkeypatch.setattr(doctor.metadata, "requires",
                        lambda name: real_requires(name) + ["museum-no-such-package>=1"])
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    navec = lines.index(next(line for line in lines if "navec vectors" in line))
    assert "WARNING" in lines[navec] and "pip install --no-deps natasha" in lines[navec + 1]
    assert re.search(r"museum-no-such-package +ERROR +missing", result.output)
    assert "1 error(s)" in result.output


def test_training_without_navec_warns(monkeypatch, caplog):
    from museum.log import logger
    from museum.text import vectors

    monkeypatch.setattr(vectors, "find_navec", lambda: None)
    logger.addHandler(caplog.handler)  # the CLI's logging setup stops propagation to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="museum"):
            assert vectors.load_navec() is None
    finally:
        logger.removeHandler(caplog.handler)
    warned = [r for r in caplog.records if "navec" in r.getMessage()]
    assert warned and warned[0].levelno == logging.WARNING and "random vectors" in warned[0].getMessage()


# ----------------------------------------------------------------------------- the experts as library objects


TINY = TextConfig(navec=False, vectors_weight=0.0, w2v_dim=16, w2v_epochs=1, epochs=2, hidden=8, device="cpu")


def test_text_model_is_a_scikit_learn_classifier(museum_train_csv):
    from sklearn.base import clone, is_classifier

    from museum.text.model import TextModel

    assert repr(clone(TextModel())) == "TextModel()" and is_classifier(TextModel())
    model = TextModel(TINY)
    model.set_params(epochs=1, tfidf_c=0.3)
    assert (model.config.epochs, model.config.tfidf_c, TINY.epochs) == (1, 0.3, 2)  # TINY itself untouched
    assert model.get_params()["tfidf_c"] == 0.3 and set(model.get_params(deep=False)) == {"config"}
    with pytest.raises(ValueError, match="Invalid parameter"):
        model.set_params(no_such_field=1)
    copy = clone(model)
    assert copy.config == model.config and copy.config is not model.config

    data = pd.read_csv(museum_train_csv).head(400)
    data.loc[data.index[:10], "description"] = np.nan  # left out of training: nothing to learn
    model.fit(data["description"], data["typology"], progress=False)
    assert model.classes_ == sorted(data["typology"][10:].unique())
    assert not hasattr(clone(model), "classes_")
    texts = pd.Series([np.nan, None, "", "Монета. Две копейки. 1789 г."], index=[7, 3, 5, 1])
    proba = model.predict_proba(texts)
    assert proba.shape == (4, len(model.classes_)) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert np.allclose(proba[0], proba[2]) and np.allclose(proba[1], proba[2])  # NaN and None are ""
    assert list(model.predict(np.array(["Монета. Две копейки. 1789 г."]))) == [model.predict(list(texts))[3]]
    assert 0.0 <= model.score(data["description"][10:], data["typology"][10:]) <= 1.0
    with pytest.raises(MuseumError, match="one string"):
        model.predict_proba("Монета")
    with pytest.raises(MuseumError, match="y row 2: missing label"):
        TextModel(TINY).fit(["a", "b", "c"], ["x", "y", None])


def test_loaded_text_model_takes_a_series_with_nan(text_model_dir):
    from museum.text.model import TextModel

    model = TextModel.load(text_model_dir)
    proba = model.predict_proba(pd.Series(["Фотография. Группа рабочих", np.nan, pd.NA]))
    assert np.allclose(proba[1], model.predict_proba([""])[0]) and np.allclose(proba[1], proba[2])


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory, multimodal_dir) -> Path:
    """A tiny but real image model: 120 multimodal photos, 32 px, one epoch, no pretrained weights."""
    from museum.config import ImageConfig
    from museum.train_image import train_image_model

    root = tmp_path_factory.mktemp("image")
    rows = pd.read_csv(multimodal_dir / "train.csv").iloc[100:220]
    rows.to_csv(root / "train.csv", index=False)
    config = ImageConfig(weights="none", input_size=32, epochs=1, batch_size=16, workers=0, threads=1, freeze_epochs=0)
    train_image_model(config, multimodal_dir / "images", root / "model", train_csv=root / "train.csv")
    return root / "model"


def test_image_model_takes_paths_pil_images_and_arrays(image_model_dir, multimodal_dir):
    from museum.image.model import ImageModel

    model = ImageModel.load(image_model_dir, device="cpu")
    photos = sorted(p for p in (multimodal_dir / "images").glob("*.jpg") if p.stat().st_size > 1000)[:3]
    from_paths = model.predict_proba([str(photos[0]), photos[1]])
    decoded, ok = model.predict_paths([photos[0], photos[1]], num_workers=0)
    assert ok.all() and np.allclose(from_paths, decoded, atol=1e-6)  # the same safe decoder
    pil = Image.open(photos[2])
    rgb = np.asarray(pil.convert("RGB"))
    both = model.predict_proba([pil, rgb, np.asarray(pil.convert("L"))])
    assert both.shape == (3, len(model.classes_)) and np.allclose(both[0], both[1], atol=1e-6)
    with pytest.raises(MuseumError, match="one image"):
        model.predict_proba(rgb)
    with pytest.raises(MuseumError, match=r"image 0: array .* float32"):
        model.predict_proba([rgb.astype(np.float32)])
    broken = multimodal_dir / "images" / "f0f69b82-ab6d-4b75-8bb0-818665ebd3c4.jpg"  # zero bytes in the data set
    with pytest.raises(MuseumError, match="zero-byte"):
        model.predict_proba([broken])


# ----------------------------------------------------------------------------- Predictor


def test_predictor_matches_museum_submit(tmp_path, text_model_dir, image_model_dir, multimodal_dir):
    from museum import Predictor
    from museum.submit import submit

    rows = pd.read_csv(multimodal_dir / "train.csv").iloc[:30].reset_index(drop=True)
    rows.index = [f"item{i}" for i in range(30)]  # the result keeps the caller's index
    images = tmp_path / "images"
    images.mkdir()
    for guid in rows["guid"][:20]:  # the last ten rows have no image at all
        source = multimodal_dir / "images" / f"{guid}.jpg"
        if source.exists():
            (images / source.name).write_bytes(source.read_bytes())
    rows.loc[rows.index[:5], "description"] = np.nan  # photo only
    rows.loc[rows.index[20:25], "description"] = ""  # neither text nor photo
    predictor = Predictor.load(text_model=text_model_dir, image_model=image_model_dir)
    result = predictor.predict(rows, images=images)

    assert list(result.index) == list(rows.index)
    assert list(result.columns) == ["typology", "route", *predictor.classes]
    assert np.allclose(result[predictor.classes].sum(axis=1), 1, atol=1e-5)
    assert set(result["route"][20:25]) == {"fallback"}
    photo_only = list(result["route"][:5])  # by the photo, or the fallback class where it is missing or unreadable
    assert set(photo_only) <= {"image", "fallback"} and "image" in photo_only, photo_only

    # The same rows through `museum submit`'s own function: the same classes, routes and probabilities.
    csv = tmp_path / "rows.csv"
    rows.fillna({"description": ""}).to_csv(csv, index=False)
    submit(csv, tmp_path / "sub.csv", images, text_model_dir, image_model_dir, proba_out=tmp_path / "proba.csv")
    expected = pd.read_csv(tmp_path / "proba.csv")
    assert list(result["typology"]) == list(expected["typology"]) and list(result["route"]) == list(expected["route"])
    assert np.allclose(result[predictor.classes].to_numpy(), expected[predictor.classes].to_numpy(), atol=2e-6)

    with pytest.raises(MuseumError, match="no column description"):
        predictor.predict(rows.drop(columns="description"))
    with pytest.raises(MuseumError, match="images=.*not a folder"):
        predictor.predict(rows, images=tmp_path / "nowhere")
    with pytest.raises(MuseumError, match="give text_model"):
        Predictor.load()
    with pytest.raises(MuseumError, match="unknown setting.*text_treshold"):
        Predictor.load(text_model=text_model_dir, text_treshold=0.5)


# ----------------------------------------------------------------------------- README


def readme_python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_readme_python_api_examples_run(tmp_path, monkeypatch, text_model_dir, image_model_dir, multimodal_dir):
    """The README's Python API blocks, run as written from a folder with models/ and ../shared/data."""
    from conftest import SHARED_DATA

    blocks = readme_python_blocks("Python API")
    assert len(blocks) == 2
    work = tmp_path / "repo"
    (work / "models").mkdir(parents=True)
    (work / "models" / "text").symlink_to(text_model_dir)
    (work / "models" / "image").symlink_to(image_model_dir)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    monkeypatch.chdir(work)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    result, items = namespace["result"], namespace["items"]
    assert list(result.index) == list(items.index) and {"typology", "route"} <= set(result.columns)
    assert namespace["proba"].shape == (40, len(namespace["text"].classes_))
    assert namespace["p"].shape == (2, len(namespace["image"].classes_))
    assert namespace["fresh"].config_.epochs == 3 and set(namespace["fresh"].classes_) <= set(namespace["text"].classes_)
