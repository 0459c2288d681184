"""Small helpers shared by every module: seeding, devices, atomic writes, JSON."""

from __future__ import annotations

import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from museum.errors import MuseumError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that one seed fixes a whole run."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def resolve_device(name: str) -> str:
    """Map `auto|cpu|cuda` (or `cuda:N`) to a torch device string, checking that it exists."""
    import torch

    name = name.lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MuseumError(f"--device {name}: no CUDA device is visible; use --device cpu or auto")
        return name
    raise MuseumError(f"--device {name}: expected auto, cpu or cuda")


def check_out_folder(folder: str | Path, option: str = "--out") -> Path:
    """`folder` as a Path, or a one-line error when a file stands there (checked before any work is done)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MuseumError(f"{option} {folder}: is a file; give a folder")
    return folder


def output_folder(out: str | Path | None, kind: str, source: str | Path) -> Path:
    """The folder a report command writes to (default `reports/KIND-NAME`), created; a file there is an error."""
    source = Path(source)
    folder = check_out_folder(out if out is not None else Path("reports") / f"{kind}-{source.stem or source.name}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash half-way never leaves a truncated file, and never destroys the previous one.
    """
    path = check_out_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        try:
            os.replace(tmp_path, path)
        except OSError as exc:
            raise _cannot_write(path, exc) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_classes(labels, source: str, what: str = "a classifier") -> list[str]:
    """The sorted classes of `labels`; a one-line error unless there are at least two to tell apart.

    `source` names what holds the labels ("training images", "FILE: rows with a description")."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "no labels"
        raise MuseumError(f"{source} have {found}; {what} needs at least two classes: add rows (or a folder) of another class")
    return classes


def _cannot_write(path: Path, exc: OSError) -> MuseumError:
    return MuseumError(f"{path}: cannot write there ({exc.strerror}); pick another place")


def check_out_file(path: str | Path, option: str = "") -> Path:
    """`path` as a Path, or a one-line error when a folder stands there (checked before any work is done)."""
    path = Path(path)
    if path.is_dir():
        raise MuseumError(f"{option + ' ' if option else ''}{path}: is a folder; give a file name")
    return path


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as pretty UTF-8 JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=_json_default), encoding="utf-8")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MuseumError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MuseumError(f"{path}: not valid JSON ({exc}); re-create the file") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
