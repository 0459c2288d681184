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


@pytest.fixture()
def free_port() -> str:
    """A TCP port nothing holds now (a fixed one can collide with another job's)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture(autouse=True)
def _run_in_an_empty_folder(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: the default outputs of commands (models/, submissions/,
    reports/) never land in the checkout, and what an earlier run left there (which a second run with the default
    refuses to replace) never changes a test's outcome."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
