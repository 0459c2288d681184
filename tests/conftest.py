"""Shared test fixtures: where the shared data lives, and a rule for when it is missing.

Tests that need `../shared/data` fail loudly in CI (CI=true) when it is missing, and are
skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MUSEUM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared(*parts: str) -> Path:
    """Path under ../shared/data; fail in CI, skip elsewhere, when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data missing: {path}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def museum_train_csv() -> Path:
    return shared("museum", "train.csv")


@pytest.fixture(scope="session")
def museum_test_csv() -> Path:
    return shared("museum", "test.csv")


@pytest.fixture(scope="session")
def multimodal_dir() -> Path:
    return shared("museum_multimodal")


@pytest.fixture(scope="session")
def characters_dir() -> Path:
    return shared("characters")


@pytest.fixture(scope="session")
def tiny_folder(characters_dir, tmp_path_factory) -> Path:
    """8 real images per class of simpsons_small (jpg and bmp), 40 in all, folder per class."""
    root = tmp_path_factory.mktemp("tiny")
    for class_dir in sorted((characters_dir / "simpsons_small").iterdir()):
        (root / class_dir.name).mkdir()
        for path in sorted(class_dir.iterdir())[:8]:
            shutil.copy(path, root / class_dir.name)
    return root


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory, museum_train_csv) -> Path:
    """A tiny but real text model: 1,500 training rows, small vectors, two epochs (a few seconds)."""
    from csvrows import read_rows, write_rows
    from museum.config import TextConfig
    from museum.train_text import train_text_model

    root = tmp_path_factory.mktemp("text")
    rows = read_rows(museum_train_csv)[:1500]
    train = write_rows(root / "train.csv", ["guid", "description", "typology"],
                       [[r["guid"], r["description"], r["typology"]] for r in rows])
    config = TextConfig(navec=False, w2v_dim=32, w2v_epochs=2, epochs=2, hidden=16, device="cpu")
    train_text_model(train, root / "model", config, progress=False)
    return root / "model"


@pytest.fixture(scope="session")
def models(tmp_path_factory, museum_train_csv, multimodal_dir) -> tuple[Path, Path]:
    """(text model, image model) folders side by side for the server tests: tiny, real, a few seconds each."""
    from csvrows import read_rows, write_rows
    from museum.config import ImageConfig, TextConfig
    from museum.train_image import train_image_model
    from museum.train_text import train_text_model

    root = tmp_path_factory.mktemp("serve-models")
    text_rows = read_rows(museum_train_csv)[:1200]
    text_csv = write_rows(root / "text.csv", ["guid", "description", "typology"],
                          [[r["guid"], r["description"], r["typology"]] for r in text_rows])
    train_text_model(text_csv, root / "text", TextConfig(navec=False, w2v_dim=32, w2v_epochs=2, epochs=2, hidden=16,
                                                         device="cpu"), progress=False)
    # Rows 150+ of the multimodal set train the image model; the first ones stay unseen (`photo`).
    image_rows = read_rows(multimodal_dir / "train.csv")[150:330]
    image_csv = write_rows(root / "image.csv", ["guid", "description", "typology"],
                           [[r["guid"], r["description"], r["typology"]] for r in image_rows])
    config = ImageConfig(weights="none", input_size=32, epochs=1, batch_size=16, workers=0, threads=1, device="cpu")
    train_image_model(config, multimodal_dir / "images", root / "image", train_csv=image_csv)
    return root / "text", root / "image"


@pytest.fixture(scope="session")
def photo(multimodal_dir) -> Path:
    """A real catalogue photo the `models` image model has not seen."""
    from csvrows import read_rows

    for row in read_rows(multimodal_dir / "train.csv")[:150]:
        path = multimodal_dir / "images" / f"{row['guid']}.jpg"
        if path.is_file() and path.stat().st_size > 5000:
            return path
    pytest.fail("no usable photo among the first multimodal rows")


@pytest.fixture()
def free_port() -> str:
    """A TCP port nothing holds now, as the string torchrun and uvicorn options take."""
    from serving import unused_port

    return str(unused_port())


@pytest.fixture(autouse=True)
def _run_in_an_empty_folder(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: the default outputs of commands (models/, submissions/,
    reports/) never land in the checkout, and what an earlier run left there (which a second run with the default
    refuses to replace) never changes a test's outcome."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
