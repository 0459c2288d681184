"""Which paths may be opened as data files: regular files only.

Opening a FIFO blocks until something writes to it (forever, in a data folder), a device may
never end, and a folder named `x.jpg` cannot be read. Every image path is checked here before
it is opened, and skipped with the reason returned (counted like "zero-byte file").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MISSING = "missing"
NOT_REGULAR = "not a regular file"
_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"))


def file_problem(path: str | Path) -> str | None:
    """None when `path` is (or links to) a regular file; else why it must not be opened, as a short reason:
    "missing", "unreadable" or "not a regular file (FIFO|socket|device|folder)". Never blocks."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links: a link to a FIFO is a FIFO
    except (FileNotFoundError, NotADirectoryError):
        return MISSING  # also a dangling symbolic link
    except (OSError, ValueError):  # a loop of links, no permission on the folder, a NUL in the name
        return "unreadable"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "special")
    return f"{NOT_REGULAR} ({kind})"


def open_regular(path: str | Path):
    """`path` opened for binary reading, or OSError(reason) when it is not a regular file.

    Checked before opening (opening some devices has side effects) and again on the open
    descriptor, which is opened non-blocking: a file swapped for a FIFO in between fails
    the second check instead of hanging."""
    problem = file_problem(path)
    if problem is not None:
        raise FileProblem(problem, path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileProblem(f"{NOT_REGULAR} (changed while opened)", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class FileProblem(OSError):
    """A path that must not be opened; `reason` (also `str(exc)`) is the short reason for counting."""

    def __init__(self, reason: str, path: str | Path | None = None):
        super().__init__(reason)
        self.reason = reason
        self.filename = str(path) if path is not None else None


def skipped_text(skipped) -> str:
    """'2 not a regular file (FIFO), 1 missing': a Counter of reasons for one log line."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
