"""``medfocus attribute``: run attribution methods over models x datasets x modes on a benchmark split."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

from medfocus.attribution.base import BASELINES, forward_pass_note
from medfocus.commands.config import config_option
from medfocus.commands.dataset_options import check_rescale_boxes, loader_options, rescale_boxes_option
from medfocus.commands.evaluate import faithfulness_config, faithfulness_options
from medfocus.commands.launch import LAUNCH_PARAMS, check_launch_options, launcher_options, threads_option
from medfocus.datasets import DATASET_REGISTRY
from medfocus.lvlm.progress import progress_bars
from medfocus.errors import ConfigError, DataError
from medfocus.io.paths import allow_outside_root as _allow_outside

#: The registered method names, for the help text (the registry module imports no model code).
METHOD_NAMES: tuple[str, ...] = (*BASELINES, "medfocus")
#: The registered dataset names, for the help text (from the registry, so a new dataset is listed).
DATASET_NAMES: str = ", ".join(DATASET_REGISTRY.names())

EPILOG = """\b
Examples:
  # all methods on a causally filtered split built by `medfocus bench build`
  medfocus attribute --bench runs/bench/demo/synthetic/direct.json \\
      --dataset synthetic --data-root runs/data --model demo --mode direct --out runs/attr
  # a Slurm array of 8 tasks, then merge
  medfocus attribute --config run.yaml --shard $SLURM_ARRAY_TASK_ID/8
  medfocus attribute --out runs/attr --merge
  # the same split on two local GPUs (one worker each), or as a Slurm array (submitit)
  medfocus attribute --config run.yaml --launcher local --devices cuda:0,cuda:1
  medfocus attribute --config run.yaml --launcher slurm --shards 16 --slurm-partition gpu \\
      --slurm-gpus-per-task 1 --slurm-time 12:00:00
  # unfiltered positives of a real dataset, two methods, a parameter override
  medfocus attribute --dataset vindr_cxr --data-root /data/vindr --model qwen2_5_vl_7b \\
      --mode cot --method occlusion --method rise --param rise.n_masks=128 --limit 100 --out runs/vindr
  # MedFocus with MedSAM refinement, mask regions and the nested rule (local MedSAM copy)
  medfocus attribute --bench runs/bench/demo/synthetic/direct.json --dataset synthetic --data-root runs/data \\
      --method medfocus --refine medsam --medsam /models/medsam-vit-base \\
      --param medfocus.region=mask --param medfocus.rule=nested --out runs/medfocus
  # faithfulness beside plausibility: deletion/insertion AUCs of every heatmap (+ random / expert-box references)
  medfocus attribute --bench runs/bench/demo/synthetic/direct.json --dataset synthetic --data-root runs/data \\
      --method occlusion --method gradcam --faithfulness --out runs/faith
"""


def parse_params(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["rise.n_masks=128", "occlusion.grid=16"]`` -> ``{"rise": {"n_masks": 128}, ...}`` (values parsed as YAML scalars).

    Raises:
        ConfigError: a spec not of the form ``METHOD.NAME=VALUE``; one ``METHOD.NAME`` given twice with
            different values (ambiguous: neither is silently taken; the same value twice is accepted).
    """
    import yaml

    out: dict[str, dict[str, Any]] = {}
    given: dict[tuple[str, str], str] = {}
    for spec in specs:
        left, eq, value = spec.partition("=")
        method, dot, key = left.partition(".")
        if not eq or not dot or not method or not key:
            raise ConfigError(f"--param {spec!r}: expected METHOD.NAME=VALUE, e.g. rise.n_masks=128")
        method, key, parsed = method.strip(), key.strip(), yaml.safe_load(value)
        cur = out.setdefault(method, {})
        if key in cur and (type(cur[key]) is not type(parsed) or cur[key] != parsed):
            raise ConfigError(f"--param {method}.{key} is given twice with different values: {given[method, key]!r} "
                              f"and {spec!r}; give it once")
        cur[key] = parsed
        given[method, key] = spec
    return out


def apply_refine_options(pmap: dict[str, dict[str, Any]], methods: Sequence[str], refine: str | None,
                         medsam: str | None) -> dict[str, dict[str, Any]]:
    """Fold the ``--refine`` / ``--medsam`` shorthands into the per-method parameters.

    ``--refine none|medsam`` sets ``medfocus.refine``; ``--medsam NAME`` (hub id, folder, or ``demo``)
    sets the segmenter of ``medfocus`` and ``prompting_medsam``, whichever are selected. A ``--param``
    saying otherwise is a conflict, not silently overridden."""
    out = {m: dict(v) for m, v in pmap.items()}

    def put(method: str, key: str, value: str, flag: str) -> None:
        cur = out.setdefault(method, {})
        if key in cur and cur[key] != value:
            raise ConfigError(f"{flag} {value} conflicts with --param {method}.{key}={cur[key]}")
        cur[key] = value

    if refine is not None:
        if "medfocus" not in methods:
            raise ConfigError("--refine applies to the medfocus method, which is not selected (--method medfocus)")
        put("medfocus", "refine", refine, "--refine")
    if medsam is not None:
        targets = [m for m in ("medfocus", "prompting_medsam") if m in methods]
        if not targets:
            raise ConfigError("--medsam applies to medfocus and prompting_medsam; neither is selected")
        for m in targets:
            put(m, "medsam", medsam, "--medsam")
    return out


def build_methods(methods: Sequence[str], params: Sequence[str], refine: str | None, medsam: str | None) -> dict[str, Any]:
    """The selected methods (default: all registered), built with their ``--param`` settings.

    Building a method validates its settings (``Method.__init__``), so an unknown method, an unknown
    parameter or a value of the wrong type or range is a :class:`ConfigError` naming the ``--param``
    before anything is loaded.
    """
    from medfocus.attribution import get_method, list_methods

    if not methods:
        methods = tuple(list_methods())
    pmap = apply_refine_options(parse_params(params), methods, refine, medsam)
    unknown = sorted(set(pmap) - set(methods))
    if unknown:
        raise ConfigError(f"--param given for method(s) not selected: {unknown}")
    out: dict[str, Any] = {}
    for m in dict.fromkeys(methods):
        try:
            out[m] = get_method(m, **pmap.get(m, {}))
        except ConfigError as exc:
            given = ", ".join(f"{m}.{k}={v!r}" for k, v in pmap.get(m, {}).items())
            raise ConfigError(f"{exc}" + (f" (from --param {given})" if given else "")) from None
    return out


def check_models(names: Sequence[str]) -> None:
    """Every model name is loadable (registry entry, local folder with weights, or a cached hub id),
    checked without loading anything; raises :class:`ModelError` / :class:`ConfigError` naming it."""
    from medfocus.lvlm.loading import check_model

    for name in names:
        check_model(name)


def check_films(items: Sequence[Any], method_objs: dict[str, Any]) -> None:
    """The settings that depend on the films and the model's canvas (a perturbation grid finer than a film's
    content), per model, before it loads where its canvas is known then (:func:`medfocus.runner.grid.
    check_films_before_load`; otherwise right after the load); raises :class:`ConfigError` naming the limit."""
    from medfocus.runner.grid import check_films_before_load

    for model in dict.fromkeys(it.model for it in items):
        check_films_before_load(model, method_objs.values(),
                                {it.sample.image_path: tuple(it.sample.image_size) for it in items if it.model == model})


def exit_if_nothing_succeeded(n_records: int, n_failed: int, store_path: Path, rerun: str,
                              error_keys: Sequence[Any] = (), read_from: Sequence[Path] | None = None) -> None:
    """End the command with exit status :data:`~medfocus.runner.grid.EXIT_ALL_FAILED` (3) and one line on
    stderr naming the file that holds the errors (``store_path``) when all ``n_records`` records of the run
    failed (``n_failed == n_records > 0``); otherwise do nothing (a run with any result exits 0, its failures
    recorded). The line quotes the first error (of ``error_keys`` when given; read from ``read_from``,
    default ``store_path``) and how to rerun."""
    from medfocus.runner.grid import EXIT_ALL_FAILED
    from medfocus.runner.store import load_results, record_key

    if n_records == 0 or n_failed < n_records:
        return
    keys = set(error_keys)
    first = next((r["error"] for p in (read_from or [store_path]) if p.is_file() for r in load_results(p)
                  if r.get("error") and (not keys or record_key(r) in keys)), None)
    click.echo(f"Error: all {n_records} records of this run failed, none holds a result (errors in {store_path}, "
               f"field 'error'; first: {first}); fix the cause, then {rerun}", err=True)
    click.get_current_context().exit(EXIT_ALL_FAILED)


def load_samples(dataset: str, data_root: str | None, rescale_boxes: bool = False) -> list:
    """Samples of a dataset through the dataset registry (``medfocus.datasets.load_dataset``)."""
    from medfocus.datasets import load_dataset

    return load_dataset(dataset, data_root, **loader_options(dataset, rescale_boxes))


def build_items(
    *,
    bench: Sequence[str],
    dataset: str | None,
    data_root: str | None,
    models: Sequence[str],
    modes: Sequence[str],
    include_negatives: bool = False,
    answer_source: str = "model",
    relabel_split_model: bool = False,
    rescale_boxes: bool = False,
) -> list:
    """Work items from benchmark files (filtered splits) or, without them, from a dataset's samples.

    With a split, the answer attributed is the model's own as the split recorded it: a record is run
    for the ``--model`` it names (all the models it names without ``--model``), in the modes of
    :func:`~medfocus.datasets.medground.record_modes` (an explicit ``mode`` field first) that are in
    ``modes``. A split none of whose records names a given model is an error, not relabelled: its
    answers are another model's. ``relabel_split_model`` (one model only) attributes such a split's
    records under that model on purpose; they carry ``answer_source="split_other_model"`` and
    ``split_model``. Records left out (other datasets than ``dataset``, other modes, other models) are
    counted in a note per file. Without a split, ``answer_source="model"`` (default) generates the
    model's greedy answer on each film in the run and attributes that; ``"ground_truth"`` attributes
    the dataset's answer whatever the model says. ``rescale_boxes``: NIH ChestX-ray8 films are square
    resized copies, their boxes scaled to them (:func:`loader_options`).

    Raises:
        ConfigError: an unknown ``dataset`` (or a record's); a split built for other models than ``models`` (naming
            the file, its models and ``--model``); a ``--model`` no split record names; nothing to run;
            ``rescale_boxes`` in a run without NIH ChestX-ray8 samples.
        DataError: an unreadable split, a record naming no mode, or an index out of range (naming the
            file, record, index, dataset size and data root).
    """
    from medfocus.datasets import canonical_name, resolve_data_root
    from medfocus.datasets.medground import load_record_dicts_located, record_modes
    from medfocus.runner.grid import WorkItem, items_from_benchmark, raw_answers_for_split

    items: list = []
    samples_cache: dict[tuple[str, str | None], list] = {}

    def samples_for(ds: str) -> list:
        key = (ds, data_root)
        if key not in samples_cache:
            samples_cache[key] = load_samples(ds, data_root, rescale_boxes)
        return samples_cache[key]

    if dataset:
        try:
            dataset = canonical_name(dataset)
        except ConfigError as exc:
            raise ConfigError(f"--dataset: {exc}") from None
    if bench:
        if relabel_split_model and len(models) != 1:
            raise ConfigError(f"--relabel-split-model attributes a split under one --model; got {list(models) or 'none'}")
        root = resolve_data_root(data_root, required=False)
        for path in bench:
            located = load_record_dicts_located(path)
            raw = raw_answers_for_split(path)  # the full generated answers, when the split log is there
            left_out: list[str] = []
            if dataset:
                other = sorted({r["dataset"] for _, r in located if r["dataset"] != dataset})
                if located and not any(r["dataset"] == dataset for _, r in located):
                    # say what is true before the model checks below see an empty file
                    held = {d: sum(1 for _, r in located if r["dataset"] == d) for d in other}
                    raise ConfigError(f"no record of --dataset {dataset} in benchmark file {path}: it holds "
                                      + ", ".join(f"{n} record(s) of {d}" for d, n in held.items())
                                      + " (give the --dataset its records are of, or another --bench file)")
                if other:
                    n_other = sum(1 for _, r in located if r["dataset"] != dataset)
                    left_out.append(f"{n_other} of dataset(s) {other} (--dataset {dataset})")
                located = [(w, r) for w, r in located if r["dataset"] == dataset]
            for w, r in located:  # the reader resolved every alias; what is left must be loadable
                if r["dataset"] not in DATASET_REGISTRY:
                    raise ConfigError(f"{w}: field 'dataset': unknown dataset {r['dataset']!r}; expected one of "
                                      f"{DATASET_REGISTRY.names()} or an alias of one")
            rec_models = sorted({str(r["model"]) for _, r in located if r.get("model") is not None})
            n_unnamed = sum(1 for _, r in located if r.get("model") is None)
            named = f"model(s) {rec_models}" + (f" and {n_unnamed} record(s) naming no model" if n_unnamed else "") \
                if rec_models else "no model (its records have no 'model' field)"
            relabel = False
            if not models:
                targets = rec_models
            elif any(m in rec_models for m in models):
                targets = [m for m in models if m in rec_models]
            elif relabel_split_model:
                if len(rec_models) + (n_unnamed > 0) > 1:
                    raise ConfigError(f"--relabel-split-model: benchmark file {path} names {named}; relabelling them all "
                                      f"as {models[0]} would mix several models' answers (split the file per model)")
                targets, relabel = [models[0]], True
            else:
                raise ConfigError(
                    f"benchmark file {path} was built for {named}, not for --model {', '.join(models)}: its answers are "
                    f"that model's own, and attributing them under another model would read as that model's answer. "
                    f"Give --model {rec_models[0] if rec_models else 'NAME'}"
                    + (", or --relabel-split-model to attribute them under --model on purpose (e.g. the same weights "
                       "under another name; records then say answer_source 'split_other_model')" if len(models) == 1 else ""))
            if not relabel:
                n_other_model = sum(1 for _, r in located if r.get("model") is not None and r["model"] not in targets)
                if n_other_model:
                    left_out.append(f"{n_other_model} of other models (--model {', '.join(models)})")
                if n_unnamed:
                    left_out.append(f"{n_unnamed} naming no model (a split's answers are its model's own; see "
                                    "--relabel-split-model)")
            n_other_mode = sum(1 for _, r in located if not set(record_modes(r)) & set(modes))
            if n_other_mode:
                other_modes = sorted({m for _, r in located for m in record_modes(r)} - set(modes))
                left_out.append(f"{n_other_mode} of mode(s) {other_modes} only (--mode {', '.join(modes)})")
            if left_out:
                click.echo(f"note: {path}: records not run: " + "; ".join(left_out), err=True)
            for mode in modes:
                mode_recs = [(w, r) for w, r in located if mode in record_modes(r)]
                for ds in sorted({r["dataset"] for _, r in mode_recs}):
                    ds_recs = [(w, r) for w, r in mode_recs if r["dataset"] == ds]
                    samples = samples_for(ds)
                    for m in targets:
                        sel = ds_recs if relabel else [(w, r) for w, r in ds_recs if r.get("model") == m]
                        items += items_from_benchmark([r for _, r in sel], samples, mode=mode, model=m,
                                                      extra={"bench_file": str(path)}, raw_answers=raw, relabel=relabel,
                                                      where=[w for w, _ in sel], data_root=str(root) if root else None)
        missing = [m for m in models if not any(it.model == m for it in items)]
        if missing and items:
            raise ConfigError(f"--model {', '.join(missing)}: no record of {list(bench)} in modes {list(modes)} names it")
        if not items:
            raise ConfigError(f"no benchmark records matched models={list(models) or 'any'} modes={list(modes)} in {list(bench)}")
        check_rescale_boxes(rescale_boxes, [it.dataset for it in items])
        return items
    if not dataset:
        raise ConfigError("give --bench FILE (a filtered split) or --dataset NAME (all samples of a dataset)")
    check_rescale_boxes(rescale_boxes, [dataset])
    if not models:
        raise ConfigError("--model is required without --bench")
    samples = samples_for(dataset)
    samples = [s for s in samples if include_negatives or s.answer == "Yes"]
    for m in models:
        for mode in modes:
            items += [WorkItem(m, s.dataset, mode, s, answer_source=answer_source) for s in samples]
    return items


@click.command(name="attribute", epilog=EPILOG)
@config_option
@click.option("--bench", "bench", multiple=True, type=click.Path(dir_okay=False), show_default="none: every positive sample of --dataset",
              help="Benchmark split file(s) (.json/.jsonl) from `medfocus bench build`, or public MedGround-Bench "
                   "records. Repeatable. A record whose sample is not the one now at its (dataset, index) (film "
                   "content, finding, answer, boxes, question) is refused before any model loads.")
@click.option("--dataset", default=None, show_default="the datasets named in --bench; required without --bench",
              help=f"Dataset key ({DATASET_NAMES}; aliases such as vindr-cxr accepted). With --bench: run only its records.")
@click.option("--data-root", default=None, envvar="MEDFOCUS_DATA_ROOT", show_default="$MEDFOCUS_DATA_ROOT", help="Dataset root.")
@rescale_boxes_option
@click.option("--model", "models", multiple=True, show_default="the models named in --bench; required without --bench",
              help="LVLM registry name or path. Repeatable.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["direct", "cot"]), default=("direct",), show_default=True, help="Output mode(s). Repeatable.")
@click.option("--method", "methods", multiple=True, show_default=f"all {len(METHOD_NAMES)}",
              help=f"Attribution method, repeatable: {', '.join(METHOD_NAMES)}.")
@click.option("--param", "params", multiple=True, show_default="each method's own, listed in the README",
              help="Parameter of a selected method, METHOD.NAME=VALUE, e.g. rise.n_masks=128. Repeatable.")
@click.option("--refine", type=click.Choice(["none", "medsam"]), default=None, show_default="medfocus' own, none",
              help="MedFocus concept refinement (shorthand for --param medfocus.refine=...); skipped with a notice when the MedSAM weights are absent.")
@click.option("--medsam", default=None, show_default="flaviagiammarino/medsam-vit-base with --refine medsam",
              help="Box-prompted segmenter for medfocus and prompting_medsam: a hub id, a local folder, or 'demo' (the demo segmenter, synthetic world only).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (predictions.jsonl + heatmaps).")
@click.option("--limit", type=click.IntRange(min=1), default=None, show_default="no limit", help="At most this many samples per (model, dataset, mode).")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed (per-sample seeds derive from it).")
@click.option("--shard", default=None, show_default="0/1, everything", help="Run only shard i of n (i/n, 0-based); merge the shard files with --merge.")
@click.option("--merge", is_flag=True, help="Merge predictions.shard-*.jsonl in --out into predictions.jsonl and exit.")
@click.option("--retry-errors", is_flag=True, help="Recompute records that failed in a previous run.")
@click.option("--overwrite", is_flag=True,
              help="Recompute stored records whose sample changed since they were written (image file or content, "
                   "finding, expert boxes, question, answer) or that carry no sample fingerprint; default: refused. "
                   "Records of unchanged samples are kept (unlike `explain --overwrite`, which recomputes its whole run). "
                   "With --merge: shard records replace such records.")
@click.option("--save-token-maps", is_flag=True, help="Also store per-answer-token heatmaps (float16).")
@click.option("--answer-source", type=click.Choice(["model", "ground-truth"]), default="model", show_default=True,
              help="Without --bench: attribute the model's own greedy answer (generated in this run; the whole "
                   "rationale in cot mode) or the dataset's ground-truth answer. Records keep both.")
@click.option("--relabel-split-model", is_flag=True,
              help="With --bench and one --model: attribute a split built for another model (or naming none) under "
                   "--model on purpose, e.g. the same weights under another name. Off: such a split is an error. The "
                   "records say answer_source 'split_other_model' and keep the split's model in 'split_model'.")
@click.option("--include-negatives", is_flag=True, help="Without --bench: also attribute samples whose answer is No.")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device for the models.")
@click.option("--allow-outside-root", is_flag=True,
              help="Read image paths from the data files even when they lead outside the data root (warns); refused by default.")
@threads_option
@click.option("--no-progress", is_flag=True, help="Disable progress bars (also the weight-loading bar).")
@click.option("--store-name", default=None, hidden=True,
              help="File name of the result store in --out (set by the launchers for per-model shards).")
@faithfulness_options(default=False)
@launcher_options
@click.pass_context
def attribute(ctx, bench, dataset, data_root, rescale_boxes, models, modes, methods, params, refine, medsam, out_dir, limit, seed, shard, merge,
              retry_errors, overwrite, save_token_maps, answer_source, relabel_split_model, include_negatives, device,
              allow_outside_root, threads, no_progress, store_name,
              faithfulness, faithfulness_steps, faithfulness_baseline, faithfulness_batch_size, **launch_opts) -> None:
    """Run attribution methods on a benchmark split and store one record per
    (model, dataset, index, mode, method) in OUT/predictions.jsonl (resumable: rerun the same
    command after an interruption). A failing sample is recorded with its error and the run goes on;
    exit status 3 when every record of the run failed."""
    from medfocus.runner.grid import check_split_items, parse_shard, run_grid, select_items
    from medfocus.runner.store import ResultStore, describe_merge, merge_stores
    from medfocus.runner.threads import intra_op_threads

    out = Path(out_dir)
    faith_cfg = faithfulness_config(faithfulness, faithfulness_steps, faithfulness_baseline, faithfulness_batch_size)
    check_launch_options(launch_opts)
    if bench and answer_source != "model":
        raise ConfigError("--answer-source applies without --bench (a split attributes the answer it recorded)")
    if relabel_split_model and not bench:
        raise ConfigError("--relabel-split-model applies with --bench (it relabels a split's recorded answers)")
    if launch_opts["launcher"] != "none":
        if shard or merge:
            raise ConfigError("--shard and --merge are for runs without a launcher (the launcher shards and merges itself)")
        _launch_attribute(ctx, launch_opts, bench=bench, dataset=dataset, data_root=data_root, rescale_boxes=rescale_boxes, models=models,
                          modes=modes, methods=methods, params=params, refine=refine, medsam=medsam, out=out,
                          limit=limit, include_negatives=include_negatives, device=device, no_progress=no_progress,
                          allow_outside_root=allow_outside_root, overwrite=overwrite, relabel_split_model=relabel_split_model)
        return
    if merge:
        from medfocus.runner.launch import check_one_sharding

        parts = sorted(out.glob("predictions.shard-*.jsonl"))
        if not parts:
            raise DataError(f"no predictions.shard-*.jsonl files in {out}")
        notes = check_one_sharding(parts, out)  # shards of two shardings are refused before anything is written
        n = merge_stores(parts, out / "predictions.jsonl", overwrite=overwrite)
        click.echo(f"merged: {describe_merge(out / 'predictions.jsonl', n, len(parts))}")
        for note in notes:
            click.echo(f"Note: {note}")
        return
    i, n = parse_shard(shard)
    # Fail fast: every setting is validated before any data or model is loaded (method names and
    # parameters here; the models right after the work items name them).
    method_objs = build_methods(methods, params, refine, medsam)
    with _allow_outside(allow_outside_root):
        items = build_items(bench=bench, dataset=dataset, data_root=data_root, models=models, modes=modes,
                            include_negatives=include_negatives, answer_source=answer_source.replace("-", "_"),
                            relabel_split_model=relabel_split_model, rescale_boxes=rescale_boxes)
    items = select_items(items, limit=limit, shard=(i, n))
    check_models(sorted({it.model for it in items}))
    check_films(items, method_objs)
    # a split's records name the samples their answers were given to: checked before any model loads
    # (the films hashed here are not read again by the run)
    check_split_items(items, data_root=data_root)
    if store_name is not None and (Path(store_name).name != store_name or not store_name.endswith(".jsonl")):
        raise ConfigError(f"--store-name {store_name!r}: expected a plain file name ending in .jsonl")
    store_path = out / (store_name or ("predictions.jsonl" if n == 1 else f"predictions.shard-{i}-of-{n}.jsonl"))

    if not items:
        if n > 1:  # a shard that holds no sample is complete: its (empty) file tells merge and status so
            from medfocus.io.atomic import atomic_write_text

            if not store_path.exists():
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(store_path, "")
            click.echo(f"shard {i}/{n} holds no sample: {store_path} is empty (this shard is complete)")
        else:
            click.echo(f"no sample to attribute: nothing written ({store_path} not created)")
        return

    def loader(name: str):
        from medfocus.lvlm import load_lvlm

        return load_lvlm(name, device=device)

    click.echo(f"{len(items)} samples x {len(method_objs)} methods -> {store_path}")
    cost = forward_pass_note(method_objs)
    if cost is not None:  # before any model loads: a costly setting shows before the wait
        click.echo(cost)
    with progress_bars(not no_progress), intra_op_threads(threads), ResultStore(store_path) as store:
        summary = run_grid(items, {m: getattr(obj, "params", {}) for m, obj in method_objs.items()}, store, load_model=loader,
                           make_method=lambda name, _params: method_objs[name], seed=seed, retry_errors=retry_errors,
                           save_token_maps=save_token_maps, progress=not no_progress, faithfulness=faith_cfg,
                           data_root=data_root, overwrite=overwrite)
    click.echo(f"done: {summary}")
    if summary.errors:
        click.echo(f"{summary.errors} records carry an error (see the 'error' field); rerun with --retry-errors to recompute them")
    exit_if_nothing_succeeded(summary.total, summary.total - summary.succeeded, store_path,
                              "rerun the same command with --retry-errors", summary.error_keys)


def _launch_attribute(ctx: click.Context, launch_opts: dict[str, Any], *, bench, dataset, data_root, models, modes, methods,
                      rescale_boxes: bool = False,
                      params, refine, medsam, out: Path, limit, include_negatives, device, no_progress,
                      allow_outside_root: bool = False, overwrite: bool = False, relabel_split_model: bool = False) -> None:
    """Validate the run, split it into (model, shard) tasks and start them (``--launcher local|slurm``)."""
    from medfocus.commands.launch import argv_from_params, default_shards, run_launch
    from medfocus.runner.grid import check_split_items, check_stored_samples, select_items, shard_of
    from medfocus.runner.launch import Manifest, ShardTask, attribute_store_name, parse_devices

    opts = {k: launch_opts[k] for k in LAUNCH_PARAMS}
    devices = parse_devices(opts["devices"]) if opts["launcher"] == "local" else []
    n = default_shards(opts["launcher"], opts["shards"], devices)
    # the same checks as a single-process run, before anything starts
    method_objs = build_methods(methods, params, refine, medsam)  # settings validated before anything starts
    methods = tuple(method_objs)
    with _allow_outside(allow_outside_root):
        items = select_items(build_items(bench=bench, dataset=dataset, data_root=data_root, models=models, modes=modes,
                                         include_negatives=include_negatives, relabel_split_model=relabel_split_model,
                                         rescale_boxes=rescale_boxes),
                              limit=limit)
    check_models(sorted({it.model for it in items}))
    check_films(items, method_objs)
    check_split_items(items, data_root=data_root)  # a split built on other samples: refused before any task starts
    run_models = list(dict.fromkeys(it.model for it in items))
    per_model = len(run_models) > 1  # one task per (model, shard): each loads only its model
    base = ["attribute"] + argv_from_params(ctx.command, ctx.params,
                                            drop=["shard", "merge", "device", "no_progress", "store_name"]
                                            + (["models"] if per_model else []))
    tasks = []
    for m in (run_models if per_model else [None]):
        for i in range(n):
            sel = [it for it in items if (m is None or it.model == m) and shard_of(it.model, it.dataset, it.index, it.mode, n) == i]
            if not sel:
                continue
            name = attribute_store_name(i, n, m)
            argv = base + (["--model", m, "--store-name", name] if per_model else []) + ["--shard", f"{i}/{n}", "--no-progress"]
            tasks.append(ShardTask(shard=i, n=n, model=m, argv=argv, output=name, expected=len(sel) * len(methods)))
    if not tasks:
        raise ConfigError("nothing to run: no samples selected")
    if not overwrite:  # records of changed samples refused before any worker starts (each worker checks its own too)
        check_stored_samples(items, methods, [out / "predictions.jsonl", *(out / t.output for t in tasks)],
                             data_root=data_root)
    manifest = Manifest(command="attribute", launcher=opts["launcher"], out=str(out), tasks=tasks, overwrite=overwrite)
    click.echo(f"{len(items)} samples x {len(methods)} methods in {len(tasks)} tasks ({n} shards"
               f"{' per model' if per_model else ''}) -> {out}")
    cost = forward_pass_note(method_objs)
    if cost is not None:  # before any task starts
        click.echo(cost)
    run_launch(manifest, opts, device=device, progress=not no_progress)
    if not opts["no_wait"]:  # the tasks' own outputs (the merged file may hold other runs' records too)
        from medfocus.runner.launch import shard_status

        rows = shard_status(out)
        exit_if_nothing_succeeded(sum(r["done"] for r in rows), sum(r["errors"] for r in rows), out / "predictions.jsonl",
                                  "rerun the same command with --retry-errors", read_from=[out / t.output for t in tasks])
