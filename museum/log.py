"""The package logger: one `museum` logger that the CLI points at stderr."""

import logging
import sys

logger = logging.getLogger("museum")


def setup_logging(verbose: bool = False) -> None:
    """Print `museum` log records as plain lines on stderr (idempotent)."""
    if not any(getattr(h, "_museum", False) for h in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname_short)s%(message)s"))
        handler.addFilter(_ShortLevel())
        handler._museum = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
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
