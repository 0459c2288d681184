"""CLI helpers shared by the tests (imported as `from clirun import ...`, like csvrows.py): run a command
through typer's CliRunner and read its one-line error."""

from __future__ import annotations

from typer.testing import CliRunner

from museum.cli import app

runner = CliRunner()


def invoke(*args, **kwargs):
    """Run `museum ARGS` in-process; a traceback in the output always fails the test."""
    result = runner.invoke(app, [str(a) for a in args], **kwargs)
    assert "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    """The single `error:` line of a command that exited with status 2."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]
