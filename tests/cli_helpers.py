"""Running the CLI in-process and checking its failures: exit code 2, a message naming the input."""

from __future__ import annotations

from typer.testing import CliRunner

from engine.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *expected: str) -> None:
    """Exit code 2, a message naming the input, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "error:" in result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in {result.output!r}"
