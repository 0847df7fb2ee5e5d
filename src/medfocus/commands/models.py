"""``medfocus models`` (LVLM registry), ``medfocus train-demo`` and ``medfocus train-demo-sam`` (demo models)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from medfocus.commands.progress import progress_bars


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


@click.command("models", help="List the registered LVLMs and their families.\n\n\b\nExamples:\n  medfocus models\n  medfocus models --check")
@click.option("--check", is_flag=True, help="Also say whether each model's files are available locally (no download).")
def models(check: bool) -> None:
    """Print the model registry (built-ins + user YAML entries from $MEDFOCUS_MODELS)."""
    from medfocus.lvlm.registry import list_models, registry_problem, user_registry_path

    problem = registry_problem()
    if problem:  # the built-ins still list; the broken file is named, not silently skipped
        click.echo(f"warning: user entries ignored: {problem}", err=True)
    entries = list_models()
    width = max(len(n) for n in entries)
    for name, e in entries.items():
        line = f"{name:<{width}}  {e.family or '(auto)':<8} {e.hf_id}"
        if e.gated:
            line += "  [gated]"
        if check:
            line += "  " + ("available" if _available(e.hf_id) else "not available locally")
        click.echo(line)
        if e.description:
            click.echo(f"{'':<{width}}  {e.description}")
    click.echo(f"\nuser entries: {user_registry_path()} (YAML 'models: {{name: {{hf_id, family, canvas}}}}')")


def _available(hf_id: str) -> bool:
    """Local folder with a config, or a complete snapshot in the HF cache (no network)."""
    if Path(hf_id).is_dir():
        return (Path(hf_id) / "config.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hf_id, "config.json"), str)
    except Exception:  # pragma: no cover - hub client missing or cache unreadable
        return False


# =====================================================================================================
# train-demo: owned by the DEMO-MODEL helper (add `train_demo` below this line).
# =====================================================================================================
@click.command("train-demo", epilog="""\b
Examples:
  medfocus train-demo --out runs/my-demo-model --threads 2          # retrain from scratch (seed 0)
  medfocus train-demo --seed 0 --steps 1400 --threads 1              # the shipped weights' recipe (see MODEL_CARD.md)
  medfocus demo --model runs/my-demo-model                           # use it in the demo
""")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              show_default="the package's lvlm/demo_model, the folder load_lvlm loads as demo", help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data, initialisation and sampling.")
@click.option("--steps", type=int, default=None, cls=ConfigDefault, config_field="medfocus.lvlm.demo:DemoConfig.steps",
              help="Training steps.")
@click.option("--cases", "n_cases", type=int, default=None, cls=ConfigDefault, config_field="medfocus.lvlm.demo:DemoConfig.n_train_cases",
              help="Synthetic training cases.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Quick held-out check every N steps (0: off).")
@click.option("--checkpoint-every", type=int, default=100, show_default=True,
              help="Save a checkpoint next to the output every N steps; rerunning the same command resumes from it (0: off).")
@click.option("--no-eval", is_flag=True, help="Skip the held-out evaluation (the card then has no accuracy table).")
def train_demo(out_dir: str | None, seed: int, steps: int | None, n_cases: int | None, threads: int, eval_every: int,
               checkpoint_every: int, no_eval: bool) -> None:
    """Train the demo CXR-VQA LVLM (Qwen2.5-VL architecture) on the synthetic world and write its folder + model card."""
    from medfocus.lvlm.demo import DEMO_DIR, DemoConfig
    from medfocus.lvlm.demo import train_demo as _train

    cfg = DemoConfig(seed=seed, num_threads=threads, eval_every=eval_every, checkpoint_every=checkpoint_every)
    if steps is not None:
        cfg.steps = steps
    if n_cases is not None:
        cfg.n_train_cases = n_cases
    metrics = _train(out_dir or DEMO_DIR, cfg, log=lambda s: click.echo(s, err=True), evaluate=not no_eval)
    if "heldout" in metrics:
        click.echo(f"held-out accuracy: {metrics['heldout']['overall']}")


@click.command("train-demo-sam", epilog="""\b
Examples:
  medfocus train-demo-sam --out runs/my-demo-sam                    # retrain (seed 0)
  medfocus train-demo-sam                                           # the shipped recipe (see its MODEL_CARD.md)
  medfocus attribute ... --method medfocus --refine medsam --medsam runs/my-demo-sam
""")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              show_default="the package's concepts/demo_medsam, i.e. what medsam='demo' loads", help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation and sampling.")
@click.option("--steps", type=int, default=None, cls=ConfigDefault, config_field="medfocus.concepts.demo_sam:DemoSamConfig.steps",
              help="Training steps.")
@click.option("--films", "n_train", type=int, default=None, cls=ConfigDefault, config_field="medfocus.concepts.demo_sam:DemoSamConfig.n_train",
              help="Synthetic training films.")
@click.option("--val-films", "n_val", type=int, default=None, cls=ConfigDefault, config_field="medfocus.concepts.demo_sam:DemoSamConfig.n_val",
              help="Held-out films of the model card.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--no-progress", is_flag=True, help="Disable progress bars (also the weight-loading bar).")
def train_demo_sam(out_dir: str | None, seed: int, steps: int | None, n_train: int | None, n_val: int | None,
                   threads: int, no_progress: bool) -> None:
    """Train the demo box-prompted segmenter (a tiny SamModel, the offline stand-in for MedSAM) on the synthetic world."""
    from medfocus.concepts.demo_sam import DEMO_SAM_DIR, DemoSamConfig
    from medfocus.concepts.demo_sam import train_demo_sam as _train

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
        info = _train(out_dir or DEMO_SAM_DIR, cfg, log=lambda s: click.echo(s, err=True), progress=not no_progress)
    m = info["metrics"]
    click.echo(f"held-out mean box IoU of the transferred boxes {m['box_iou_transferred']['mean']:.3f} -> refined "
               f"{m['box_iou_refined']['mean']:.3f} (mask IoU {m['mask_iou_refined']['mean']:.3f})")
