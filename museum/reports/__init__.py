"""Training reports, figures and dataset analysis (`museum report`, `museum eda`)."""

from __future__ import annotations

from pathlib import Path

from museum.log import logger
from museum.reports.run_report import build_report_from_predictions, build_run_report

__all__ = ["build_run_report", "build_report_from_predictions", "write_report_safely"]


def write_report_safely(run_dir: str | Path) -> Path | None:
    """Build `run_dir/report.html` after training; a failure is a warning, since the model is already saved."""
    try:
        path = build_run_report(run_dir)
    except Exception as exc:  # a plotting problem must never cost the user a trained model
        logger.warning(f"{run_dir}: report not written ({type(exc).__name__}: {exc}); retry with `museum report {run_dir}`")
        return None
    logger.info(f"report: {path}")
    return path
