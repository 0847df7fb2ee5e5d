"""YAML configuration files for commands: ``--config run.yaml`` supplies option values.

Keys are option names with dashes or underscores (``data-root`` or ``data_root``); values have the
option's type (a list for repeatable options such as ``method``). A flag given on the command line
wins over the same key in the file, so a config can hold a whole experiment and a flag can tweak it::

    # run.yaml
    bench: [runs/bench/demo_synthetic_direct_oracle.jsonl]
    dataset: synthetic
    data-root: runs/demo/data
    method: [occlusion, rise, medfocus]
    limit: 50
    shard: 0/4

    medfocus attribute --config run.yaml --shard 1/4

Unknown keys are an error naming the key and the valid ones (a typo must not be silently ignored), and
so is a value of the wrong type (``limit: 2.5``, ``limit: abc``, ``method: {a: 1}``): the error names the
file, the key and the expected type; nothing is coerced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; raises :class:`click.BadParameter` naming the file on bad content."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{path}: cannot read YAML ({exc})", param_hint="--config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option names to values, got {type(data).__name__}", param_hint="--config")
    return data


def _expected(p: click.Parameter) -> tuple[str, Callable[[Any], bool]]:
    """What a config value for option ``p`` must be (no coercion: ``limit: 2.5`` is not 2)."""
    t = p.type
    if getattr(p, "is_flag", False) or isinstance(t, click.types.BoolParamType):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(t, click.Choice):
        return "one of " + ", ".join(map(repr, t.choices)), lambda v: isinstance(v, str) and v in t.choices
    if isinstance(t, (click.types.IntParamType, click.IntRange)):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(t, (click.types.FloatParamType, click.FloatRange)):
        return "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return "a string", lambda v: isinstance(v, str)


def _apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    data = load_config(value)
    # A key may be the flag as typed (``method`` for ``--method``) or the parameter name (``methods``).
    names: dict[str, click.Parameter] = {}
    flags: list[str] = []
    for p in ctx.command.params:
        if not p.name or p.name == "config" or getattr(p, "hidden", False):
            continue
        names[p.name] = p
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = p
                flags.append(opt[2:])
        if isinstance(p, click.Argument):
            flags.append(p.name.replace("_", "-"))
    mapped: dict[str, Any] = {}
    for key, val in data.items():
        p = names.get(str(key).replace("-", "_"))
        if p is None:
            raise click.BadParameter(f"{value}: unknown key {key!r}; valid keys: {', '.join(sorted(flags))}", param_hint="--config")
        what, ok = _expected(p)
        if getattr(p, "multiple", False):
            if not isinstance(val, (list, tuple)):
                val = [val]
            bad = [v for v in val if not ok(v)]
            if bad:
                raise click.BadParameter(f"{value}: key {key!r}: every item must be {what}, got {bad[0]!r} "
                                         f"({type(bad[0]).__name__})", param_hint="--config")
        elif not ok(val) and not (val is None and not p.required):
            raise click.BadParameter(f"{value}: key {key!r}: expected {what}, got {val!r} ({type(val).__name__})",
                                     param_hint="--config")
        mapped[p.name] = val
    ctx.default_map = {**(ctx.default_map or {}), **mapped}


def config_option(f: F) -> F:
    """Decorator adding ``--config FILE`` (YAML) to a click command; see the module docstring."""
    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_apply_config,
        help="YAML file of option values (keys = option names); command-line flags override it.",
    )(f)
