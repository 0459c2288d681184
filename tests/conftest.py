"""Shared test fixtures: where the shared data lives, and a rule for when it is missing.

Tests that need `../shared/data` fail loudly in CI (CI=true) when it is missing, and are
skipped elsewhere.
"""

from __future__ import annotations

import os
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
