"""``medfocus demo``: the whole pipeline on the embedded synthetic world with the shipped demo model."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import click

from medfocus.commands.config import config_option
from medfocus.lvlm.progress import progress_bars
from medfocus.runner.demo import DemoConfig

_DEFAULTS = DemoConfig()  # the help shows these values, and unset options keep them

EPILOG = """\b
Examples:
  medfocus demo                                  # -> runs/demo/report.html (< 10 min on 2 CPU cores)
  medfocus demo --n-samples 200 --per-mode 60    # bigger run (default: 96 films, 24 per mode)
  medfocus demo --method occlusion --method medfocus --out runs/demo-small
  medfocus demo --fresh                          # start over instead of resuming
  medfocus demo --param medfocus.refine=none --param medfocus.region=box --param medfocus.rule=argmax
                                                 # MedFocus as in the paper (no segmenter, boxes, argmax)
"""


@click.command(name="demo", epilog=EPILOG)
@config_option
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--n-samples", default=_DEFAULTS.n_samples, show_default=True, type=click.IntRange(1), help="Synthetic cases to generate.")
@click.option("--per-mode", default=_DEFAULTS.per_mode, show_default=True, type=click.IntRange(1),
              help="At most this many filtered samples attributed per mode.")
@click.option("--n-reference", default=_DEFAULTS.n_reference, show_default=True, type=click.IntRange(1),
              help="Normal reference phantoms for MedFocus.")
@click.option("--seed", default=_DEFAULTS.seed, show_default=True, type=int, help="Seed of data, filter and attribution.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["direct", "cot"]), default=_DEFAULTS.modes, show_default=True,
              help="Output mode(s). Repeatable.")
@click.option("--editor", "editors", multiple=True, default=_DEFAULTS.editors, show_default=True,
              help="Counterfactual editors of the filter (the first, or oracle when given, feeds the attribution). Repeatable.")
@click.option("--method", "methods", multiple=True, show_default="all registered", help="Attribution methods. Repeatable.")
@click.option("--model", default="demo", show_default=True, help="LVLM registry name or folder (the shipped demo model by default).")
@click.option("--param", "params", multiple=True, show_default="the demo's settings, README section 'The demo'",
              help="Method parameter METHOD.NAME=VALUE (as for `medfocus attribute`), e.g. medfocus.region=box. Repeatable.")
@click.option("--shortcut-films", type=click.IntRange(0), default=_DEFAULTS.shortcut_films, show_default=True,
              help="Films (each rendered with and without its cues) on which the model is compared with its shortcut twin "
                   "demo-shortcut: cue reliance and the causal filter's effect, written to shortcut.md (0: skip).")
@click.option("--lesion-size-rule", type=click.Choice(["nih", "fleischner"]), default=None, show_default="medfocus synth's",
              help="How the synthetic world draws nodule and mass sizes (medfocus synth --lesion-size-rule), for the data "
                   "and the shortcut step's films: a model trained in the fleischner world is measured on its films.")
@click.option("--fresh", is_flag=True, help="Delete the output folder first (otherwise a rerun resumes).")
@click.option("--threads", type=click.IntRange(1), default=None, show_default="the cores this process may run on",
              help="torch / OpenCV intra-op threads.")
@click.option("--no-progress", is_flag=True, help="Disable the progress line (also the weight-loading bar).")
def demo(out_dir, n_samples, per_mode, n_reference, seed, modes, editors, methods, model, params, shortcut_films,
         lesion_size_rule, fresh, threads, no_progress) -> None:
    """Generate the synthetic benchmark, load the shipped demo LVLM, build the causally filtered
    benchmark (oracle and inpaint editors) in direct and step-by-step mode, run every attribution
    method, evaluate, and write report.html, table.md, table.csv, retention.md and shortcut.md (the model
    against its shortcut twin)."""
    # OpenMP workers that spin while waiting burn the cores other processes need (the demo's CPU time
    # under load was several times its wall time x cores); passive waiting must be set before torch
    # (and its OpenMP runtime) is loaded, which the CLI defers until here. A user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from medfocus.runner.demo import run_demo

    t0 = time.perf_counter()
    out = Path(out_dir)
    if fresh and out.exists():
        shutil.rmtree(out)
    cfg = DemoConfig(seed=seed, model=model, n_samples=n_samples, per_mode=per_mode, n_reference=n_reference, threads=threads,
                     shortcut_films=shortcut_films, lesion_size_rule=lesion_size_rule)
    if modes:
        cfg.modes = tuple(modes)
    if editors:
        cfg.editors = tuple(editors)
        if cfg.attribute_editor not in cfg.editors:
            cfg.attribute_editor = cfg.editors[0]
    if methods:
        cfg.methods = tuple(methods)
    if params:
        from medfocus.commands.attribute import parse_params

        cfg.method_params = parse_params(params)
    with progress_bars(not no_progress):
        res = run_demo(out, cfg, progress=not no_progress)
    elapsed = time.perf_counter() - t0
    if res["n_records"] == 0:
        # An empty report is not a result: say why instead of exiting 0 (e.g. every sample failed the filter).
        raise click.ClickException(f"no sample was attributed; see {out / 'retention.md'} and the split logs under "
                                   f"{out / 'bench'} for the filter's outcome and per-sample errors")
    click.echo("")
    click.echo(res["table"])
    click.echo(f"retention: {out / 'retention.md'}")
    click.echo(f"records: {res['n_records']} ({res['n_errors']} with errors)")
    if res.get("prompting_medsam_detector") == "anatomy":
        click.echo("prompting_medsam: offline anatomy-grounded detector (a stand-in for the paper's OWL-ViT)")
    click.echo(f"elapsed: {elapsed:.1f} s ({elapsed / 60:.1f} min)")
    click.echo(f"report: {res['report']}")
