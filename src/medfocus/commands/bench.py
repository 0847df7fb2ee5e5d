"""``medfocus bench``: build causally filtered benchmarks (counterfactual editing + 3-step filter)."""

from __future__ import annotations

from typing import Any

import click

from medfocus.commands.config import config_option
from medfocus.commands.dataset_options import check_rescale_boxes, loader_options, rescale_boxes_option
from medfocus.commands.launch import LAUNCH_PARAMS, check_launch_options, launcher_options, threads_option
from medfocus.datasets import DATASET_REGISTRY
from medfocus.lvlm.progress import progress_bars
from medfocus.errors import ConfigError, DataError
from medfocus.io.paths import allow_outside_root as _allow_outside

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
  # four local CPU workers (or GPUs: --devices cuda:0,cuda:1), or a Slurm array; merged at the end
  medfocus bench build ... --launcher local --devices cpu,cpu,cpu,cpu
  medfocus bench build ... --launcher slurm --shards 16 --slurm-partition gpu --slurm-gpus-per-task 1
\b
Output: <out>/<model>/<dataset>/<mode>.json (MedGround-Bench records of the kept samples),
<mode>.log.jsonl (every sample: generations, gates; makes reruns resume), retention.csv/.md.
Edits are cached in <out>/edits (or --cache-dir) and shared by every model; the caches and the log
are tied to each film's content: a rerun whose data changed under a logged index (film overwritten,
row inserted, other --data-root) is refused before the model loads; --overwrite recomputes those rows.
A rerun with another --editor or --max-new-tokens (or other weights) is refused before the model loads
too, naming the setting: use another --out.
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
    """The LVLM adapter for a registry name or path (separate so tests can substitute a model).
    The name and its weights are checked first (:func:`medfocus.lvlm.loading.check_model`), so an
    unknown model or one without weights is one clear error, not a loader traceback."""
    from medfocus.lvlm.loading import check_model, load_lvlm

    check_model(name)
    return load_lvlm(name, device=device)


def _model_identity(model: str) -> dict[str, Any]:
    """The identity (source, weight fingerprint) of ``--model`` as given -- a registry name or a folder -- that
    every split log row records (:func:`medfocus.lvlm.loading.model_identity`), computed without loading it.

    Raises:
        ModelError: a weight file cannot be read; ConfigError: the user model registry cannot be used.
    """
    from medfocus.lvlm.loading import model_identity

    return model_identity(model)


@bench.command(name="build", epilog=EPILOG)
@config_option
@click.option("--model", required=True, help="LVLM registry name (`medfocus models`) or model folder, e.g. demo, qwen2_5_vl_3b.")
@click.option("--model-name", default=None, show_default="--model, or the folder name when --model is a path", help="Name written in the records.")
@click.option("--dataset", required=True,
              help=f"Dataset key: {', '.join(DATASET_REGISTRY.names())} (synthetic and nih_cxr8 need no credentials).")
@click.option("--data-root", default=None, envvar="MEDFOCUS_DATA_ROOT", show_default="$MEDFOCUS_DATA_ROOT", help="Dataset root.")
@rescale_boxes_option
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
# ranges checked by click while parsing (flags and --config alike), so a bad value is refused before anything loads
@click.option("--limit", type=click.IntRange(min=1), default=None, show_default="all samples", help="Only the first N samples of the dataset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per generate() batch.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, show_default="16 direct, 256 cot", help="Generation budget.")
@click.option("--include-negatives/--no-negatives", default=False, show_default=True,
              help="Also answer the 'No' samples (separate <mode>.negatives.json; off as in the paper).")
@click.option("--retry-errors", is_flag=True, help="Redo samples that failed in a previous run.")
@click.option("--overwrite", is_flag=True,
              help="Recompute logged rows whose sample changed since they were written (film file or content, finding, "
                   "expert boxes, answer, question, the editor's per-sample inputs) or that carry no sample fingerprint; "
                   "default: refused before the model loads.")
@click.option("--seed", type=int, default=0, show_default=True, help="Editor seed (part of the edit-cache key).")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device.")
@click.option("--allow-outside-root", is_flag=True,
              help="Read image paths from the data files even when they lead outside the data root (warns); refused by default.")
@threads_option
@click.option("--no-progress", is_flag=True, help="Disable progress bars (also the weight-loading bar).")
@click.option("--shard", default=None, show_default="all samples",
              help="Filter only shard i of n (i/n, 0-based) of the samples; give each shard its own --out and combine "
                   "them with `medfocus merge` (the launchers do both).")
@launcher_options
@click.pass_context
def build(ctx: click.Context, model: str, model_name: str | None, dataset: str, data_root: str | None, rescale_boxes: bool, modes: tuple[str, ...], editor: str | None, out_dir: str,
          cache_dir: str | None, reference_dir: str | None, radedit_dir: str | None, radedit_steps: int, limit: int | None,
          batch_size: int, max_new_tokens: int | None, include_negatives: bool, retry_errors: bool, overwrite: bool, seed: int,
          device: str | None, allow_outside_root: bool, threads: int | None, no_progress: bool, shard: str | None,
          **launch_opts: Any) -> None:
    """Filter a dataset for one model: keep a positive sample iff the model answers it correctly,
    flips its answer when the finding is edited out of the boxes, and keeps its answer when the
    background is edited ("No {finding}" and "No abnormality")."""
    from pathlib import Path

    from medfocus.bench import build_benchmark, write_retention
    from medfocus.bench.build import check_split_samples
    from medfocus.runner.threads import intra_op_threads
    from medfocus.datasets import canonical_name, load_dataset

    if model_name is None:
        model_name = Path(model).name if Path(model).expanduser().exists() else model

    check_launch_options(launch_opts)
    if launch_opts["launcher"] != "none" and shard:
        raise ConfigError("--shard is for runs without a launcher (the launcher shards and merges itself)")
    # cheap checks first: data, then editor weights, then the (large) model
    check_rescale_boxes(rescale_boxes, [dataset])
    with _allow_outside(allow_outside_root):
        samples = load_dataset(dataset, data_root, **loader_options(dataset, rescale_boxes))
    whole = samples  # the log's rows outside --limit / --shard are judged against the whole dataset too
    if limit is not None:
        samples = samples[:limit]
    ds_name = samples[0].dataset if samples else canonical_name(dataset)
    if shard is not None:
        samples = _shard_samples(samples, model_name, shard)
    editor_name = editor or ("oracle" if ds_name == "synthetic" else "radedit")
    ed = _make_editor(editor_name, seed=seed, reference_dir=reference_dir, radedit_dir=radedit_dir,
                      radedit_steps=radedit_steps, device=device)
    ed.prepare()
    if not samples:
        raise DataError(f"no samples to filter: {dataset} at {data_root} gives none" + (f" in shard {shard}" if shard else ""))
    identity = _model_identity(model)
    if launch_opts["launcher"] != "none":
        _launch_build(ctx, launch_opts, samples=samples, model_name=model_name, modes=modes, out_dir=out_dir,
                      cache_dir=cache_dir, include_negatives=include_negatives, device=device, progress=not no_progress,
                      editor=ed, data_root=data_root, overwrite=overwrite, dataset_samples=whole,
                      max_new_tokens=max_new_tokens, model_identity=identity)
        return
    # what build_benchmark would refuse on an existing split (another editor, other generation settings,
    # logged rows of changed samples unless --overwrite): refused now, before the (large) model loads
    check_split_samples(samples, [out_dir], model_name=model_name, modes=modes, editor=ed, data_root=data_root,
                        dataset_samples=whole, max_new_tokens=max_new_tokens, model_identity=identity, overwrite=overwrite)
    with progress_bars(not no_progress):
        adapter = _load_model(model, device)
    with intra_op_threads(threads):
        for mode in modes:
            records, ret = build_benchmark(adapter, samples, mode=mode, editor=ed, out_dir=out_dir, model_name=model_name,
                                           cache_dir=cache_dir, include_negatives=include_negatives,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           retry_errors=retry_errors, progress=not no_progress, data_root=data_root,
                                           overwrite=overwrite, dataset_samples=whole, model_identity=identity)
            click.echo(f"{model_name} / {ds_name} / {mode}: kept {ret['kept']} of {ret['n']} positives "
                       f"({ret['retention_pct']}%), errors {ret['errors']}")
    click.echo(write_retention(out_dir))


def _shard_samples(samples: list, model_name: str, spec: str) -> list:
    """The samples of shard ``i/n``: all modes of a sample land in one shard (they share its edits)."""
    from medfocus.runner.grid import parse_shard, shard_of

    i, n = parse_shard(spec)
    return [s for s in samples if shard_of(model_name, s.dataset, int(s.index), "bench", n) == i]


def _launch_build(ctx: click.Context, launch_opts: dict[str, Any], *, samples: list, model_name: str, modes: tuple[str, ...],
                  out_dir: str, cache_dir: str | None, include_negatives: bool, device: str | None, progress: bool,
                  editor: Any, data_root: str | None, overwrite: bool, dataset_samples: list,
                  max_new_tokens: int | None, model_identity: dict[str, Any]) -> None:
    """One ``bench build --shard i/n`` task per shard, each into ``<out>/shards/i-of-n`` with the edit
    cache shared; merged into ``<out>`` when all finish (``--launcher local|slurm``). Logged rows of
    changed samples (in ``<out>`` and the shard folders) are refused before any task starts, unless
    ``overwrite`` (passed on to the tasks, and the merge lets their rows replace those in ``<out>``); rows
    outside the selection are judged against ``dataset_samples`` (the whole dataset as loaded)."""
    from pathlib import Path

    from medfocus.commands.launch import argv_from_params, default_shards, run_launch
    from medfocus.runner.launch import Manifest, ShardTask, bench_shard_dir, parse_devices

    opts = {k: launch_opts[k] for k in LAUNCH_PARAMS}
    devices = parse_devices(opts["devices"]) if opts["launcher"] == "local" else []
    n = default_shards(opts["launcher"], opts["shards"], devices)
    out = Path(out_dir)
    cache = str(Path(cache_dir) if cache_dir is not None else out / "edits")
    base = ["bench", "build"] + argv_from_params(ctx.command, ctx.params,
                                                 drop=["shard", "device", "no_progress", "out_dir", "cache_dir", "model_name"])
    tasks = []
    for i in range(n):
        sel = [s for s in _shard_samples(samples, model_name, f"{i}/{n}") if s.answer == "Yes" or include_negatives]
        if not sel:
            continue
        rel = bench_shard_dir(i, n)
        argv = base + ["--out", str(out / rel), "--cache-dir", cache, "--model-name", model_name,
                       "--shard", f"{i}/{n}", "--no-progress"]
        tasks.append(ShardTask(shard=i, n=n, model=model_name, argv=argv, output=rel, expected=len(sel) * len(modes)))
    if not tasks:
        raise ConfigError("nothing to filter: no samples selected")
    # another editor, other settings, rows of changed samples: refused before any task starts (each task checks its own too)
    from medfocus.bench.build import check_split_samples

    check_split_samples(samples, [out, *(out / t.output for t in tasks)], model_name=model_name, modes=modes,
                        editor=editor, data_root=data_root, dataset_samples=dataset_samples,
                        max_new_tokens=max_new_tokens, model_identity=model_identity, overwrite=overwrite)
    manifest = Manifest(command="bench build", launcher=opts["launcher"], out=str(out), tasks=tasks, overwrite=overwrite)
    click.echo(f"{sum(t.expected for t in tasks)} (sample, mode) pairs in {len(tasks)} tasks -> {out}")
    run_launch(manifest, opts, device=device, progress=progress)


@bench.command(name="retention")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
def retention(out_dir: str) -> None:
    """Recompute and print the retention table of a bench output folder."""
    from medfocus.bench import write_retention

    click.echo(write_retention(out_dir))
