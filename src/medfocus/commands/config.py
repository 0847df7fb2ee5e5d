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

Unknown keys are an error naming the key and the valid ones (a typo must not be silently ignored).
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
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{path}: cannot read YAML ({exc})", param_hint="--config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option names to values, got {type(data).__name__}", param_hint="--config")
    return data


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
        if getattr(p, "multiple", False) and not isinstance(val, (list, tuple)):
            val = [val]
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
