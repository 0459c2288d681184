"""The package logger (one `museum` logger that the CLI points at stderr) and the progress bar of every command."""

import logging
import sys

logger = logging.getLogger("museum")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Print `museum` log records as plain lines on stderr (idempotent); `quiet`: warnings and errors only."""
    if not any(getattr(h, "_museum", False) for h in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname_short)s%(message)s"))
        handler.addFilter(_ShortLevel())
        handler._museum = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


class _ShortLevel(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.levelname_short = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return True


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (typer's CliRunner swaps it per call)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def progress_bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it", show: bool = True):
    """The progress bar of every command (a tqdm bar, used as tqdm is): on stderr, and only when stderr is a
    terminal, the `museum` logger is not set above INFO (`--quiet`, other ranks under torchrun) and `show`.

    Logs and pipes never get a bar's carriage returns; library users who set no level see bars on a terminal."""
    from tqdm import tqdm

    stream = sys.stderr
    hushed = logger.level != logging.NOTSET and logger.level > logging.INFO
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        terminal = False
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True,
                disable=not (show and terminal) or hushed)
