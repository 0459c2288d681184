"""The import contract (.importlinter): layers one way down, a one-way image wing, no circles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")  # import-linter, from the dev extra


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_import_contract():
    result = lint(ROOT, ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_or_a_circle_breaks_it(tmp_path):
    """The contract can fail: in a copy of the package, the engine imports a workflow and embed imports the
    model (which imports embed)."""
    shutil.copytree(ROOT / "museum", tmp_path / "museum", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    for module, line in (("engine.py", "from museum import dedup"), ("image/embed.py", "from museum.image import model")):
        with open(tmp_path / "museum" / module, "a", encoding="utf-8") as f:
            f.write(f"\n{line}  # noqa: E402,F401\n")
    result = lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "museum.engine is not allowed to import museum.dedup" in result.stdout
    assert "museum.image.embed is not allowed to import museum.image.model" in result.stdout
    assert "No cycles are allowed in museum.image" in result.stdout
