"""Small helpers shared by every module: seeding, devices, atomic writes, JSON and CSV."""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

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


def default_report_folder(kind: str, source: str | Path) -> Path:
    """`reports/KIND-NAME`: where a report command (eda, clean, dedup) writes when not told."""
    source = Path(source)
    return Path("reports") / f"{kind}-{source.stem or source.name}"


def output_folder(out: str | Path | None, kind: str, source: str | Path) -> Path:
    """The folder a report command writes to (default `reports/KIND-NAME`), created; a file there is an error."""
    folder = check_out_folder(out if out is not None else default_report_folder(kind, source))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash half-way never leaves a truncated file, and never destroys the previous one; a full
    disk or an unwritable place is a one-line error naming `path`. The temporary name carries the
    writer's process id, so the leftovers of a killed writer are removed by the next one.
    """
    path = check_out_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
            os.replace(tmp_path, path)
        except OSError as exc:
            raise cannot_write(path, exc) from None
        except RuntimeError as exc:
            if not _is_write_failure(exc):
                raise
            raise cannot_write(path, OSError(errno.EIO, "write failed, the disk may be full")) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _is_write_failure(exc: BaseException) -> bool:
    """torch.save reports a failed write (e.g. a full disk) as a RuntimeError from its zip writer."""
    text = str(exc)
    return "inline_container" in text or "file write failed" in text or "unexpected pos" in text


def _remove_stale_temps(path: Path) -> None:
    """Delete `.NAME.PID.*.tmp` files beside `path` whose writer process is gone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def sha256_stream(f) -> str:
    """Hex sha256 of what a binary file object has left, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (a file the program wrote; untrusted paths go through
    `museum.data.files.open_regular` and `sha256_stream`)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def check_classes(labels, source: str, what: str = "a classifier") -> list[str]:
    """The sorted classes of `labels`; a one-line error unless there are at least two to tell apart.

    `source` names what holds the labels ("training images", "FILE: rows with a description")."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "no labels"
        raise MuseumError(f"{source} have {found}; {what} needs at least two classes: add rows (or a folder) of another class")
    return classes


def cannot_write(path: Path, exc: OSError) -> MuseumError:
    """The one-line error for a write that failed: where, why, and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += ", the disk is full"
    return MuseumError(f"{path}: cannot write there ({reason}); free some space or pick another place")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (the owner of a temporary file or folder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A UTF-8 CSV written atomically: `header`, then `rows`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return path


def write_csv_copy(source: Path, target: Path, overwrite_error: str,
                   select: Callable[[list[str], list[list[str]]], Iterable[Sequence]]) -> Path:
    """`target`: the header of the CSV `source` and the rows `select(header, rows)` makes of its data rows.

    The original rows are re-read so that any extra columns and their order survive unchanged (blank
    lines skipped, as the competition reader does). Refuses, with `overwrite_error`, to write over `source`."""
    if target.resolve() == source.resolve():
        raise MuseumError(overwrite_error)
    with open(source, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        rows = [r for r in reader if any(cell.strip() for cell in r)]
    return write_csv(target, header, select(header, rows))


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
