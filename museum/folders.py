"""Model folders written as a whole and verified on load.

A model folder is built in a staging folder beside its destination, sealed with a
`manifest.json` (size and sha256 of every file, format version) and only then moved into
place: on Linux with one `renameat2(RENAME_EXCHANGE)` (the old and the new folder swap in one
step), elsewhere with two renames and a recovery of the old folder on the next load. So a
run killed at any moment, or a disk that fills, leaves the complete old folder or the complete
new one, and loading refuses (in one line) a folder whose files were mixed, cut short or edited.

Names beside a folder `X` (all removed once they are stale):
- `.X.staging-PID`  a folder being written by process PID,
- `.X.old-PID`      the previous folder while PID swaps the new one in,
- `X.partial`       an image training run in progress (`--resume` continues it).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from museum import __version__
from museum.errors import MuseumError
from museum.log import logger
from museum.utils import cannot_write, pid_alive, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "museum-folder/1"
# Files a folder holds for people (reports, logs, resume state), not for prediction: listed in the
# manifest like the rest, but a hand-edited report must not make a model unusable.
INFORMATIONAL = ("report.html", "metrics.json", "summary.csv", "last.pt")
INFORMATIONAL_SUFFIXES = (".png",)
INFORMATIONAL_DIRS = ("tensorboard",)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST)


def _informational(rel: str) -> bool:
    parts = rel.split("/")
    return (parts[-1] in INFORMATIONAL or parts[-1].endswith(INFORMATIONAL_SUFFIXES)
            or parts[0] in INFORMATIONAL_DIRS or (len(parts) > 1 and parts[0].startswith("member")))


def write_manifest(folder: Path, kind: str) -> dict:
    """Seal `folder`: record every file's size and sha256 in `manifest.json` (written last)."""
    files = {}
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "package_version": __version__,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    data = json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8")
    try:
        with open(folder / MANIFEST, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise cannot_write(folder / MANIFEST, exc) from None
    return manifest


def verify_folder(folder: str | Path, kind: str) -> dict | None:
    """Check `folder` against its manifest before a model is loaded from it; returns the manifest.

    A folder from before manifests (no `manifest.json`) loads with a warning. Anything else
    that does not match — a file missing, cut short, replaced or edited — is a one-line error.
    """
    folder = Path(folder)
    recover(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if folder.is_dir():
            logger.warning(f"{folder}: no {MANIFEST} (written by an older museum), so its files cannot be checked; "
                           "retrain to get a verified folder")
        return None
    refuse = lambda why: MuseumError(  # noqa: E731
        f"{folder}: {why}; the folder is mixed or damaged: retrain it with `museum train-{kind}` (or restore a backup)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(manifest.get("format"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise refuse(f"{MANIFEST} is unreadable or of an unknown format") from None
    if manifest.get("kind") != kind:
        raise MuseumError(f"{folder}: holds a {manifest.get('kind')} model, not a {kind} model; "
                          f"pass the folder written by `museum train-{kind}`")
    for rel, entry in files.items():
        if _informational(rel):
            continue
        file = folder / rel
        if not file.is_file():
            raise refuse(f"{rel} is missing")
        if file.stat().st_size != entry.get("size"):
            raise refuse(f"{rel} has {file.stat().st_size} bytes where the manifest says {entry.get('size')}")
        if sha256_file(file) != entry.get("sha256"):
            raise refuse(f"{rel} differs from the file this folder was written with (sha256)")
    return manifest


def is_model_folder(folder: Path) -> bool:
    """A folder this package wrote (sealed, or from before manifests)."""
    return any((folder / name).is_file() for name in (MANIFEST, "text_model.pt", "best.pt", "last.pt"))


def check_destination(out: str | Path, option: str = "--out") -> Path:
    """`out` as a Path if a model folder may be written there: new, empty, or a model folder of ours.

    Writing replaces the whole folder, so a folder holding anything else is refused rather than lost."""
    out = Path(out)
    recover(out)
    if out.exists() and not out.is_dir():
        raise MuseumError(f"{option} {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not is_model_folder(out):
        raise MuseumError(f"{option} {out}: holds files that are not a museum model, and writing replaces the whole "
                          "folder; pick a new or empty folder")
    return out


# ----------------------------------------------------------------------------- staging and swapping


def _stale(path: Path, marker: str) -> bool:
    """`path` is `.X.<marker>-PID` of a process that no longer runs."""
    try:
        pid = int(path.name.rsplit(f".{marker}-", 1)[1])
    except (IndexError, ValueError):
        return False
    return not pid_alive(pid)


def _siblings(out: Path, marker: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{marker}-*")) if out.parent.is_dir() else []


def recover(out: Path) -> None:
    """Finish what a killed swap left: put the old folder back if `out` went missing, drop stale leftovers."""
    olds = [p for p in _siblings(out, "old") if _stale(p, "old")]
    if olds and not out.exists():
        os.rename(olds[-1], out)
        logger.warning(f"{out}: restored the previous folder, which a killed write had moved aside")
        olds = olds[:-1]
    for stale in olds + [p for p in _siblings(out, "staging") if _stale(p, "staging")]:
        shutil.rmtree(stale, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staging: Path, out: Path, kind: str) -> None:
    """Seal `staging` and move it to `out`, replacing whatever folder stood there, in one step."""
    write_manifest(staging, kind)
    try:
        if not out.exists():
            os.rename(staging, out)
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if _exchange(staging, out):
                os.rename(staging, old)  # `staging` now holds the previous folder
            else:  # two renames; `recover` puts the old folder back if we die in between
                os.rename(out, old)
                os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise cannot_write(out, exc) from None
    _fsync_dir(out.parent)


@contextmanager
def staged_folder(out: str | Path, kind: str) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out` as a whole.

    On any failure the staging folder is removed and `out` is left as it was."""
    out = check_destination(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise cannot_write(out, exc) from None
    try:
        yield staging
        publish(staging, out, kind)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def partial_folder(out: Path) -> Path:
    """Where an image training run for `out` works until it is published (kept for `--resume`)."""
    return out.parent / f"{out.name}.partial"


# ----------------------------------------------------------------------------- inputs


def model_files(folder: str | Path | None) -> list[Path]:
    """The files of a model folder (inputs a command must not write over); none for None."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [p for p in Path(folder).rglob("*") if p.is_file()]


def check_not_input(output: str | Path | None, inputs, option: str = "--out", folder: bool = False) -> None:
    """A one-line error when writing `output` would overwrite, or (for a `folder` output) swallow or sit
    inside, one of `inputs`."""
    if output is None:
        return
    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        same = out == source
        if not same and out.exists() and source.exists():
            try:
                same = os.path.samefile(out, source)
            except OSError:
                same = False
        if same:
            raise MuseumError(f"{option} {output}: is also an input ({given}); writing would destroy it: pick another path")
        if source.is_relative_to(out):
            raise MuseumError(f"{option} {output}: contains the input {given}, which writing there could replace: pick another folder")
        if folder and source.is_dir() and out.is_relative_to(source):
            raise MuseumError(f"{option} {output}: lies inside the input folder {given}; pick a folder outside it")
