"""Data warnings reach the CLI user as one "Warning: ..." line (naming their file), not Python's
``file:line: DataWarning: ...`` report with a source line; other warnings are left to Python's handler."""

from __future__ import annotations

import warnings

import click
from click.testing import CliRunner

from medfocus.cli import LazyGroup
from medfocus.errors import DataWarning


class _Group(LazyGroup):
    def list_commands(self, ctx):
        return ["warn"]

    def get_command(self, ctx, name):
        @click.command(name="warn")
        def warn() -> None:
            warnings.warn("/data/film.dcm: WindowWidth is 0; falling back to min-max", DataWarning, stacklevel=2)
            warnings.warn("something about the code", DeprecationWarning, stacklevel=2)
            click.echo("done")

        return warn if name == "warn" else None


def test_data_warning_is_one_line_naming_the_file_and_the_hook_is_restored():
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        res = CliRunner().invoke(_Group(name="g"), ["warn"], catch_exceptions=False)
    assert res.exit_code == 0 and "done" in res.stdout
    err = res.stderr.splitlines()
    assert "Warning: /data/film.dcm: WindowWidth is 0; falling back to min-max" in err
    assert not any("DataWarning" in line or "warnings.warn(" in line for line in err), err
    assert not any("something about the code" in line for line in err), err  # not ours: left to Python's handler
    assert warnings.showwarning is before
