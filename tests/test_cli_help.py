"""The command-line help a new user reads: every option shows its default as a value (never a
Python name such as ``DemoConfig.n_samples``), ``attribute --help`` lists the method names, and
the examples keep their line breaks; ``--no-progress`` also silences the libraries' bars; a Python
call does not talk about command-line flags."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from medfocus.cli import COMMANDS, main


def _commands() -> list[tuple[list[str], click.Command]]:
    out = []
    ctx = click.Context(main)
    for name in sorted(COMMANDS):
        cmd = main.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            out += [([name, sub], cmd.commands[sub]) for sub in sorted(cmd.commands)]
        else:
            out.append(([name], cmd))
    return out


COMMAND_LIST = _commands()


def _help(path: list[str]) -> str:
    res = CliRunner().invoke(main, [*path, "--help"], env={"COLUMNS": "240"}, terminal_width=240)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("path,cmd", COMMAND_LIST, ids=[" ".join(p) for p, _ in COMMAND_LIST])
def test_every_option_shows_its_default_as_a_value(path, cmd):
    text = _help(path)
    assert not re.search(r"\b[A-Z]\w*Config\.\w+", text), f"help shows a Python name instead of a value:\n{text}"
    # One help record per option: the record of each non-flag, non-required option names its default.
    ctx = click.Context(cmd, info_name=path[-1], parent=click.Context(main, info_name="medfocus", **main.context_settings))
    for p in cmd.get_params(ctx):
        if not isinstance(p, click.Option) or p.hidden or p.is_flag or p.required or p.name in ("help", "config"):
            continue
        rec = p.get_help_record(ctx)
        assert rec and "default:" in rec[1], f"`medfocus {' '.join(path)} {p.opts[0]}` shows no default: {rec}"


def test_attribute_help_lists_every_method():
    from medfocus.attribution import list_methods

    text = _help(["attribute"])
    for name in list_methods():
        assert name in text, name


@pytest.mark.parametrize("path,cmd", [(p, c) for p, c in COMMAND_LIST if c.epilog],
                         ids=[" ".join(p) for p, c in COMMAND_LIST if c.epilog])
def test_examples_keep_their_line_breaks(path, cmd):
    text = _help(path)
    help_lines = {line.strip() for line in text.splitlines()}
    for line in cmd.epilog.splitlines():
        line = line.strip()
        if line and line != "\b":
            assert line in help_lines, f"epilog line lost its line break in `medfocus {' '.join(path)} --help`: {line!r}"
    # A continuation line that lost its newline (a lone backslash in the Python source joins it to the
    # line above) shows up as a run of indentation in the middle of the command.
    for line in cmd.epilog.splitlines():
        assert not re.search(r"\S {3,}--", line), f"example lost a line break: {line!r}"


def test_no_progress_silences_library_bars():
    from transformers.utils import logging as hf_logging

    from medfocus.lvlm.progress import progress_bars

    assert hf_logging.is_progress_bar_enabled()
    with progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()  # restored for the caller
    with progress_bars(True):
        assert hf_logging.is_progress_bar_enabled()


def test_python_errors_do_not_mention_flags(tmp_path, monkeypatch):
    from medfocus.datasets import load_dataset
    from medfocus.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_dataset("synthetic", tmp_path / "missing")
    assert "(from --data-root)" not in str(exc.value) and str(tmp_path / "missing") in str(exc.value)
    monkeypatch.setenv("MEDFOCUS_DATA_ROOT", str(tmp_path / "also-missing"))
    with pytest.raises(ConfigError, match=r"\(from \$MEDFOCUS_DATA_ROOT\)"):
        load_dataset("synthetic")
