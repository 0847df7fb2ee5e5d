"""Launcher options shared by ``attribute`` and ``bench build``, and the ``status`` / ``merge`` commands.

See :mod:`medfocus.runner.launch` for what the launchers do. The launched workers run the very
command the user typed, rebuilt from the parsed options (so a ``--config`` file's values travel too),
with ``--shard i/n`` and ``--device`` added per worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import click

from medfocus.errors import ConfigError, DataError

F = TypeVar("F", bound=Callable[..., Any])

#: Parameter names the launcher options add (never passed on to the workers).
LAUNCH_PARAMS = ("launcher", "shards", "devices", "no_wait", "max_restarts", "slurm_partition", "slurm_gpus_per_task",
                 "slurm_time", "slurm_array_parallelism", "slurm_account", "slurm_params")


def launcher_options(f: F) -> F:
    """Decorator adding ``--launcher``, ``--shards``, ``--devices``, ``--no-wait`` and the Slurm options."""
    opts = [
        click.option("--launcher", type=click.Choice(["none", "local", "slurm"]), default="none", show_default=True,
                     help="Run the shards as local worker processes (one per --devices entry) or as a Slurm job "
                          "array (submitit; pip install 'medfocus[slurm]'). none: this process does everything."),
        click.option("--shards", type=int, default=None, show_default="one per device (local), 8 (slurm)",
                     help="Number of shards for --launcher local|slurm. Default: one per device (local), 8 (slurm)."),
        click.option("--devices", default=None, show_default="none; required by --launcher local",
                     help="--launcher local: one worker per device, e.g. cuda:0,cuda:1 or cpu,cpu."),
        click.option("--no-wait", is_flag=True,
                     help="Return once the workers are started (then `medfocus status OUT`, `medfocus merge OUT`)."),
        click.option("--max-restarts", type=int, default=2, show_default=True,
                     help="--launcher local: restarts of a worker that died without a result (it resumes)."),
        click.option("--slurm-partition", default=None, show_default="the cluster's default", help="Slurm partition."),
        click.option("--slurm-gpus-per-task", type=int, default=None, show_default="none requested", help="GPUs per Slurm task (e.g. 1)."),
        click.option("--slurm-time", default="24:00:00", show_default=True,
                     help="Time limit per Slurm task (minutes, HH:MM:SS or D-HH:MM:SS); a task past it is requeued and resumes."),
        click.option("--slurm-array-parallelism", type=int, default=None, show_default="no cap", help="At most this many array tasks at once."),
        click.option("--slurm-account", default=None, show_default="the user's default", help="Slurm account."),
        click.option("--slurm-param", "slurm_params", multiple=True, show_default="none",
                     help="Extra sbatch option KEY=VALUE (e.g. mem=64G, qos=high). Repeatable."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def threads_option(f: F) -> F:
    """Decorator adding ``--threads`` (torch / OpenCV intra-op threads of this process; with a launcher, of each
    worker, since the workers get the option back from :func:`argv_from_params`). Apply it with
    :func:`medfocus.runner.threads.intra_op_threads` around the work."""
    return click.option("--threads", type=click.IntRange(1), default=None, show_default="torch's default",
                        help="torch / OpenCV intra-op threads (e.g. the cores you may use on a shared machine; "
                             "with --launcher local: per worker).")(f)


def argv_from_params(command: click.Command, params: dict[str, Any], drop: Sequence[str] = ()) -> list[str]:
    """Rebuild a command line for ``command`` from its parsed ``params`` (options only).

    Every option with a value is written explicitly (defaults included, so a worker never depends on
    a config file or an environment variable it may not see); ``drop`` names parameters left out."""
    argv: list[str] = []
    skip = set(drop) | set(LAUNCH_PARAMS) | {"config"}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in skip or p.name not in params:
            continue
        value = params[p.name]
        flag = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        if p.is_flag and not p.secondary_opts:
            if value:
                argv.append(flag)
            continue
        if p.is_flag:  # --x/--no-x
            argv.append(flag if value else next(o for o in p.secondary_opts if o.startswith("--")))
            continue
        if value is None:
            continue
        values = list(value) if p.multiple else [value]
        for v in values:
            argv += [flag, str(v)]
    return argv


def default_shards(launcher: str, shards: int | None, devices: Sequence[str]) -> int:
    if shards is None:
        return len(devices) if launcher == "local" else 8
    if shards < 1:
        raise ConfigError(f"--shards must be >= 1, got {shards}")
    return shards


def run_launch(manifest: Any, opts: dict[str, Any], *, device: str | None, progress: bool) -> None:
    """Start ``manifest`` with the launcher options ``opts`` (the :data:`LAUNCH_PARAMS` values)."""
    from medfocus.runner.launch import launch, parse_devices, slurm_parameters

    devices = parse_devices(opts["devices"]) if opts["launcher"] == "local" else []
    slurm = None
    if opts["launcher"] == "slurm":
        slurm = slurm_parameters(partition=opts["slurm_partition"], gpus_per_task=opts["slurm_gpus_per_task"],
                                 time=opts["slurm_time"], array_parallelism=opts["slurm_array_parallelism"],
                                 account=opts["slurm_account"], extra=opts["slurm_params"])
    if opts["max_restarts"] < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {opts['max_restarts']}")
    launch(manifest, devices=devices, device=device, slurm=slurm, wait=not opts["no_wait"], progress=progress,
           max_restarts=opts["max_restarts"], echo=click.echo)


def check_launch_options(opts: dict[str, Any]) -> None:
    """Launcher options given without a launcher are a mistake, not something to ignore."""
    if opts["launcher"] != "none":
        return
    given = [name for name in ("shards", "devices", "slurm_partition", "slurm_gpus_per_task", "slurm_array_parallelism",
                               "slurm_account") if opts.get(name) is not None]
    if opts.get("no_wait"):
        given.append("no_wait")
    if opts.get("slurm_params"):
        given.append("slurm_params")
    if given:
        raise ConfigError(f"{', '.join('--' + g.replace('_', '-') for g in given)} need(s) --launcher local or slurm")


@click.command(name="status")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
def status(out_dir: str) -> None:
    """Per-shard progress and errors of a run started with --launcher local|slurm, or of shards run by
    hand with --shard i/n (records and errors per shard file; the expected counts are then unknown)."""
    from medfocus.runner.launch import check_one_sharding, manual_shard_outputs, shard_status

    rows = shard_status(out_dir)
    width = max(len(r["output"]) for r in rows) if rows else 6
    click.echo(f"{'shard':>7}  {'model':<20} {'output':<{width}}  {'done':>11}  errors")
    for r in rows:
        expected = "?" if r["expected"] is None else r["expected"]
        click.echo(f"{r['shard']:>7}  {str(r['model'])[:20]:<20} {r['output']:<{width}}  "
                   f"{r['done']:>5}/{expected:<5}  {r['errors']}")
    done = sum(r["done"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    if any(r["expected"] is None for r in rows):  # shards run by hand: no manifest says what each will hold
        outputs = f"{len(rows)} shard output" + ("" if len(rows) == 1 else "s")
        click.echo(f"total {done} records, {errors} errors in {outputs} run by hand (no launch manifest, "
                   "so the expected counts are unknown)")
        out = Path(out_dir)
        for group in manual_shard_outputs(out):
            try:
                for note in check_one_sharding(group, out):
                    click.echo(f"Note: {note}")
            except DataError as exc:  # mixed shardings: status shows them, merge refuses them
                click.echo(f"Warning: {exc}")
        return
    expected = sum(r["expected"] for r in rows)
    click.echo(f"total {done}/{expected} records, {errors} errors; "
               f"{sum(r['done'] >= r['expected'] for r in rows)}/{len(rows)} shards complete")


@click.command(name="merge")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--overwrite", is_flag=True,
              help="Let shard records (bench split-log rows) replace those of the same key computed on another sample "
                   "(default: refused; a launched run started with --overwrite does this itself).")
def merge(out_dir: str, overwrite: bool) -> None:
    """Merge the shard outputs of OUT_DIR into its normal outputs (predictions.jsonl, or the bench
    splits and retention table). Safe to rerun; the launchers do it themselves when all shards finish."""
    from medfocus.runner.launch import merge_outputs

    notes: list[str] = []
    for line in merge_outputs(Path(out_dir), overwrite=overwrite or None, notes=notes):
        click.echo(f"merged: {line}")
    for note in notes:
        click.echo(f"Note: {note}")
