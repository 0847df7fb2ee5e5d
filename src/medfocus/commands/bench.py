"""``medfocus bench``: build causally filtered benchmarks (counterfactual editing + 3-step filter)."""

from __future__ import annotations

from typing import Any

import click

from medfocus.commands.config import config_option
from medfocus.commands.progress import progress_bars
from medfocus.errors import MedfocusError

EPILOG = """\b
Examples:
  # synthetic world, shipped demo model, exact counterfactuals, both modes
  medfocus synth --out runs/data --n 200
  medfocus bench build --model demo --dataset synthetic --data-root runs/data \\
      --mode direct --mode cot --editor oracle --out runs/bench
  # a real dataset and a paper model with RadEdit (pip install 'medfocus[radedit]', GPU)
  medfocus bench build --model qwen2_5_vl_3b --dataset vindr_cxr --data-root /data \\
      --mode direct --editor radedit --out runs/bench
  # CPU alternatives: healthy-tissue transplant, or OpenCV inpainting (out of distribution)
  medfocus bench build ... --editor transplant --reference-dir runs/reference
\b
Output: <out>/<model>/<dataset>/<mode>.json (MedGround-Bench records of the kept samples),
<mode>.log.jsonl (every sample: generations, gates; makes reruns resume), retention.csv/.md.
Edits are cached in <out>/edits (or --cache-dir) and shared by every model.
"""


@click.group(name="bench")
def bench() -> None:
    """Build causally filtered benchmarks (counterfactual editing + 3-step filter)."""


def _make_editor(name: str, *, seed: int, reference_dir: str | None, radedit_dir: str | None, radedit_steps: int,
                 device: str | None) -> Any:
    from medfocus.editing import get_editor

    kw: dict[str, Any] = {"seed": seed}
    if name == "transplant":
        kw["reference_dir"] = reference_dir
    if name == "radedit":
        kw.update(weights_dir=radedit_dir, steps=radedit_steps, device=device)
    return get_editor(name, **kw)


def _load_model(name: str, device: str | None) -> Any:
    """The LVLM adapter for a registry name or path (separate so tests can substitute a model)."""
    from medfocus.lvlm.loading import load_lvlm

    return load_lvlm(name, device=device)


@bench.command(name="build", epilog=EPILOG)
@config_option
@click.option("--model", required=True, help="LVLM registry name (`medfocus models`) or model folder, e.g. demo, qwen2_5_vl_3b.")
@click.option("--model-name", default=None, show_default="--model, or the folder name when --model is a path", help="Name written in the records.")
@click.option("--dataset", required=True, help="Dataset key: synthetic, imagenome, vindr_cxr, padchest_gr.")
@click.option("--data-root", default=None, envvar="MEDFOCUS_DATA_ROOT", show_default="$MEDFOCUS_DATA_ROOT", help="Dataset root.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["direct", "cot"]), default=("direct",), show_default=True,
              help="Output mode(s); repeat for both.")
@click.option("--editor", default=None, show_default="oracle on the synthetic world, else radedit as in the paper",
              help="oracle | radedit | transplant | inpaint | inpaint_ns.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), show_default="OUT/edits", help="Edit cache.")
@click.option("--reference-dir", default=None, type=click.Path(file_okay=False), show_default="none; required by --editor transplant",
              help="Normal reference pool (transplant editor).")
@click.option("--radedit-dir", default=None, type=click.Path(file_okay=False), show_default="the Hugging Face cache",
              help="Local RadEdit weights (unet/, vae/, text_encoder/).")
@click.option("--radedit-steps", default=200, show_default=True, type=int, help="RadEdit DDIM steps (paper: 200).")
@click.option("--limit", type=int, default=None, show_default="all samples", help="Only the first N samples of the dataset.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images per generate() batch.")
@click.option("--max-new-tokens", type=int, default=None, show_default="16 direct, 256 cot", help="Generation budget.")
@click.option("--include-negatives/--no-negatives", default=False, show_default=True,
              help="Also answer the 'No' samples (separate <mode>.negatives.json; off as in the paper).")
@click.option("--retry-errors", is_flag=True, help="Redo samples that failed in a previous run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Editor seed (part of the edit-cache key).")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device.")
@click.option("--no-progress", is_flag=True, help="Disable progress bars (also the weight-loading bar).")
def build(model: str, model_name: str | None, dataset: str, data_root: str | None, modes: tuple[str, ...], editor: str | None, out_dir: str,
          cache_dir: str | None, reference_dir: str | None, radedit_dir: str | None, radedit_steps: int, limit: int | None,
          batch_size: int, max_new_tokens: int | None, include_negatives: bool, retry_errors: bool, seed: int,
          device: str | None, no_progress: bool) -> None:
    """Filter a dataset for one model: keep a positive sample iff the model answers it correctly,
    flips its answer when the finding is edited out of the boxes, and keeps its answer when the
    background is edited ("No {finding}" and "No abnormality")."""
    from pathlib import Path

    from medfocus.bench import build_benchmark, write_retention
    from medfocus.datasets import canonical_name, load_dataset

    if model_name is None:
        model_name = Path(model).name if Path(model).expanduser().exists() else model

    try:
        # cheap checks first: data, then editor weights, then the (large) model
        samples = load_dataset(dataset, data_root)
        if limit is not None:
            samples = samples[:limit]
        ds_name = samples[0].dataset if samples else canonical_name(dataset)
        editor_name = editor or ("oracle" if ds_name == "synthetic" else "radedit")
        ed = _make_editor(editor_name, seed=seed, reference_dir=reference_dir, radedit_dir=radedit_dir,
                          radedit_steps=radedit_steps, device=device)
        ed.prepare()
        with progress_bars(not no_progress):
            adapter = _load_model(model, device)
        for mode in modes:
            records, ret = build_benchmark(adapter, samples, mode=mode, editor=ed, out_dir=out_dir, model_name=model_name,
                                           cache_dir=cache_dir, include_negatives=include_negatives,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           retry_errors=retry_errors, progress=not no_progress)
            click.echo(f"{model_name} / {ds_name} / {mode}: kept {ret['kept']} of {ret['n']} positives "
                       f"({ret['retention_pct']}%), errors {ret['errors']}")
    except MedfocusError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(write_retention(out_dir))


@bench.command(name="retention")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
def retention(out_dir: str) -> None:
    """Recompute and print the retention table of a bench output folder."""
    from medfocus.bench import write_retention

    click.echo(write_retention(out_dir))
