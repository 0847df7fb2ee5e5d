"""``medfocus train-demo`` and ``medfocus train-demo-sam``: train the two shipped demo models.

Registered in :data:`medfocus.cli.COMMANDS` by name only, so the runtime package never imports
:mod:`medfocus.training`; both commands require ``--out`` (the shipped folders are regenerated only
when named on purpose).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from medfocus.lvlm.progress import progress_bars


class ConfigDefault(click.Option):
    """An option whose default lives in a training-config dataclass (``"module:Class.field"``): the help
    shows the value, read only when the help is shown (the trainer modules import torch)."""

    def __init__(self, *args: Any, config_field: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_field = config_field

    def default_value(self) -> Any:
        module, _, attr = self.config_field.partition(":")
        cls, _, name = attr.partition(".")
        return getattr(getattr(importlib.import_module(module), cls)(), name)

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        extra["default"] = str(self.default_value())
        return extra


@click.command("train-demo", epilog="""\b
Examples:
  medfocus train-demo --out runs/my-demo-model --threads 2          # the shipped demo's recipe (about 3.6 h on 2 threads; resumable)
  medfocus train-demo --out runs/demo8 --preset demo-8x8 --threads 1 # the first demo (8x8 token grid, about 27 min)
  medfocus train-demo --out runs/shortcut --preset demo-shortcut --threads 1     # the shipped shortcut twin's recipe
  medfocus train-demo --out runs/demo16 --preset demo-16x16 --threads 2          # candidate at a 16x16 token grid
  medfocus train-demo --out runs/demo12 --preset demo-12x12 --threads 1          # candidate at a 12x12 token grid
  medfocus train-demo --out runs/demo12r --preset demo-12x12-fleischner          # the same in the Fleischner-size world
  medfocus train-demo --out runs/demo12l --preset demo-12x12-fleischner-long     # longer stage 1, more crowded films (demo: it on a 16x16 grid)
  medfocus train-demo --out runs/demo12f --preset demo-12x12-focus --init-from candidates/demo-12x12   # its stage 3 only
  medfocus train-demo --out runs/a --preset demo-12x12 --pool-cache runs/pools  # keep the rendered cases for later runs
  medfocus demo --model runs/my-demo-model                           # use it in the demo
""")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output folder (required; the shipped lvlm/demo_model, what load_lvlm('demo') loads, is "
                   "regenerated only when named here on purpose).")
# the names of PRESETS, written out: this module must not import the trainers (torch) to build its help;
# tests/test_demo_model.py checks that the two lists agree
@click.option("--preset", type=click.Choice(["demo", "demo-8x8", "demo-12x12", "demo-12x12-fleischner", "demo-12x12-fleischner-focus", "demo-12x12-fleischner-long", "demo-12x12-focus", "demo-16x16", "demo-shortcut"]), default="demo", show_default=True,
              help="Recipe: 'demo' (the shipped demo model's: 16x16 token grid), 'demo-8x8' (the first demo's), "
                   "'demo-16x16' / 'demo-12x12' (candidates at finer token "
                   "grids, cues uninformative; 'demo-12x12-focus': the latter with a hard-negative stage 3; 'demo-12x12-fleischner' (-focus): it in the world where nodule <= 3 cm < mass) or 'demo-shortcut' (the shipped shortcut twin: every training finding brings "
                   "its correlated cue); see PRESETS in medfocus.training.demo_lvlm.config.")
# ranges checked while parsing, before any work; DemoLVLMConfig.validate checks the whole config
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of data, initialisation and sampling.")
# --steps / --cases: the preset's values unless given (the recipes differ: 2000 / 20000 for demo, 1400 / 3000 for demo-8x8)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Stage-2 training steps  [default: the preset's]")
@click.option("--cases", "n_cases", type=click.IntRange(min=1), default=None, help="Synthetic training cases  [default: the preset's]")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True, help="Quick held-out check every N steps (0: off).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Save a checkpoint under --out every N steps; rerunning the same command resumes from it (0: off).")
@click.option("--no-eval", is_flag=True, help="Skip the held-out evaluation (the card then has no accuracy table).")
@click.option("--focus-steps", type=click.IntRange(min=0), default=None,
              help="Stage-3 (hard-negative focus) steps; default: the preset's (0: no stage 3).")
@click.option("--init-from", "init_from", type=click.Path(exists=True, file_okay=False), default=None,
              show_default="none: every stage is trained",
              help="Load stages 1-2 from this finished train-demo folder of the same recipe and train stage 3 only "
                   "(the same weights as one uninterrupted run).")
@click.option("--pool-cache", "pool_cache", type=click.Path(file_okay=False), default=None, show_default="none: rendered each run",
              help="Keep the rendered training cases in this folder and reuse them when a later run (a resumed one, an "
                   "--init-from stage 3, another recipe) draws the same cases from the same code.")
def train_demo(out_dir: str, preset: str, seed: int, steps: int | None, n_cases: int | None, threads: int, eval_every: int,
               checkpoint_every: int, no_eval: bool, focus_steps: int | None, init_from: str | None,
               pool_cache: str | None) -> None:
    """Train the demo CXR-VQA LVLM (Qwen2.5-VL architecture) on the synthetic world and write its folder + model card."""
    from medfocus.training.demo_lvlm import train_demo as _train
    from medfocus.training.demo_lvlm.config import preset_config

    cfg = preset_config(preset, seed=seed, num_threads=threads, eval_every=eval_every, checkpoint_every=checkpoint_every)
    if steps is not None:
        cfg.steps = steps
    if n_cases is not None:
        cfg.n_train_cases = n_cases
    if focus_steps is not None:
        cfg.focus_steps = focus_steps
    cfg.validate()  # the preset with these overrides, before any work (train_demo checks again)
    metrics = _train(out_dir, cfg, log=lambda s: click.echo(s, err=True), evaluate=not no_eval, init_from=init_from,
                     pool_cache=pool_cache)
    if "heldout" in metrics:
        click.echo(f"held-out accuracy: {metrics['heldout']['overall']}")


@click.command("train-demo-sam", epilog="""\b
Examples:
  medfocus train-demo-sam --out runs/my-demo-sam                    # retrain (seed 0)
  medfocus train-demo-sam --out runs/demo-sam --seed 0             # the shipped recipe (see its MODEL_CARD.md)
  medfocus attribute ... --method medfocus --refine medsam --medsam runs/my-demo-sam
""")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output folder (required; the shipped concepts/synthetic_sam, what medsam='demo' loads, is "
                   "regenerated only when named here on purpose).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation and sampling.")
@click.option("--steps", type=int, default=None, cls=ConfigDefault, config_field="medfocus.training.demo_segmenter:DemoSamConfig.steps",
              help="Training steps.")
@click.option("--films", "n_train", type=int, default=None, cls=ConfigDefault, config_field="medfocus.training.demo_segmenter:DemoSamConfig.n_train",
              help="Synthetic training films.")
@click.option("--val-films", "n_val", type=int, default=None, cls=ConfigDefault, config_field="medfocus.training.demo_segmenter:DemoSamConfig.n_val",
              help="Held-out films of the model card.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--no-progress", is_flag=True, help="Disable progress bars (also the weight-loading bar).")
def train_demo_sam(out_dir: str, seed: int, steps: int | None, n_train: int | None, n_val: int | None,
                   threads: int, no_progress: bool) -> None:
    """Train the demo box-prompted segmenter (a tiny SamModel, the offline stand-in for MedSAM) on the synthetic world."""
    from medfocus.training.demo_segmenter import DemoSamConfig
    from medfocus.training.demo_segmenter import train_demo_sam as _train

    cfg = DemoSamConfig(seed=seed, num_threads=threads)
    if steps is not None:
        cfg.steps = steps
    if n_train is not None:
        cfg.n_train = n_train
    if n_val is not None:
        cfg.n_val = n_val
    for name, v in (("--steps", cfg.steps), ("--films", cfg.n_train), ("--val-films", cfg.n_val)):
        if v < 1:
            raise click.BadParameter(f"must be >= 1, got {v}", param_hint=name)
    if cfg.n_train < cfg.batch:
        cfg.batch = cfg.n_train  # a batch samples films without replacement
    with progress_bars(not no_progress):
        info = _train(out_dir, cfg, log=lambda s: click.echo(s, err=True), progress=not no_progress)
    m = info["metrics"]
    click.echo(f"held-out mean box IoU of the transferred boxes {m['box_iou_transferred']['mean']:.3f} -> refined "
               f"{m['box_iou_refined']['mean']:.3f} (mask IoU {m['mask_iou_refined']['mean']:.3f})")
