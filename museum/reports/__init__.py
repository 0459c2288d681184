"""Training reports, figures and dataset analysis (`museum report`, `museum eda`)."""

from __future__ import annotations

from pathlib import Path

from museum.log import logger
from museum.reports.run_report import build_report_from_predictions, build_run_report

__all__ = ["build_run_report", "build_report_from_predictions", "write_report_safely"]


def write_report_safely(run_dir: str | Path, shown_as: str | Path | None = None) -> Path | None:
    """Build `run_dir/report.html` after training; a failure is a warning, since the model is already saved.

    `shown_as`: the folder the user knows `run_dir` by (a staging folder is moved there afterwards);
    when given, the caller announces the report once it is in place."""
    name = shown_as or run_dir
    try:
        path = build_run_report(run_dir)
    except Exception as exc:  # a plotting problem must never cost the user a trained model
        logger.warning(f"{name}: report not written ({type(exc).__name__}: {exc}); retry with `museum report {name}`")
        return None
    if shown_as is None:
        logger.info(f"report: {path}")
    return path
