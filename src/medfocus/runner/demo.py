"""The end-to-end demo on the embedded default (what ``medfocus demo`` / ``make demo`` run).

Steps, each resumable (a rerun with the same folder reuses what is already there):

1. **data** — write a synthetic chest X-ray dataset (VinDr-CXR layout, exact counterfactuals) and a
   reference pool of normal phantoms with the 11 concept masks (MedFocus' references);
2. **model** — load the shipped demo LVLM (``load_lvlm("demo")``), once for everything below;
3. **bench** — the three-step causal filter in direct and step-by-step mode with the ``oracle``
   (exact) and ``inpaint`` (classical, out-of-distribution) editors; retention tables;
   **shortcut** — the demo model against its shortcut twin ``demo-shortcut`` on
   :attr:`DemoConfig.shortcut_films` films rendered with and without their cues
   (:mod:`medfocus.runner.shortcut`): which "yes" answers the cue decided, and how many of those the
   causal filter keeps (``shortcut.md``, Wilson intervals);
4. **attribute** — every registered method (10 baselines + MedFocus) on the oracle-filtered split of
   each mode, through the resumable grid runner (``prompting_medsam`` with the offline anatomy-grounded
   detector, :data:`DEMO_PROMPTING_DETECTOR`, since OWL-ViT weights cannot be downloaded here; MedSAM
   refinement in both ``prompting_medsam`` and MedFocus by the shipped demo segmenter,
   :data:`DEMO_SEGMENTER`);
   The first :attr:`DemoConfig.faithfulness_per_mode` samples of each mode also get deletion /
   insertion curves for every heatmap (:mod:`medfocus.evaluation.faithfulness`);
5. **evaluate** — per-record metrics, ``table.csv`` / ``table.md`` (Table-1 layout, with the
   deletion / insertion AUC columns);
6. **report** — ``report.html`` (self-contained).

Outputs in ``out_dir``: ``report.html``, ``table.md``, ``table.csv``, ``retention.md``,
``retention.csv``, ``shortcut.md``, ``predictions.jsonl`` (+ heatmaps), ``timings.json``, and the ``data/``,
``reference/``, ``bench/`` folders.

Threads: the demo sets torch's (and OpenCV's) intra-op threads to the cores this process may run on
(``os.sched_getaffinity``; :func:`available_cores`), restoring them afterwards, and writes the synthetic
films with at most that many worker processes: more threads than cores only adds contention, and
under load the OpenMP workers' spin-waiting burns the CPU the other processes need.

Progress: one overall bar (``progress=True``) across the steps, advanced by work done and weighted by
each step's measured cost per unit (:data:`STEP_COST`), so its ETA spans the whole run; the steps'
own bars are off meanwhile.

Timings: ``timings.json`` keeps, per step, the first full measurement (``timings``) and records a
resumed run's own times separately (``resume_timings``, a list), so a rerun that reuses finished work
never replaces the real step times with near-zero ones (:func:`merge_timings`).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TYPE_CHECKING

from medfocus.errors import ConfigError, DataError
from medfocus.io.atomic import atomic_write_text
from medfocus.runner.threads import available_cores, configure_threads, restore_threads

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import LVLMAdapter

#: The detector ``prompting_medsam`` uses in the demo: the offline anatomy-grounded stand-in (the paper's
#: OWL-ViT needs weights that cannot be downloaded here; see :class:`medfocus.attribution.prompting.PromptingMedSAM`).
DEMO_PROMPTING_DETECTOR = "anatomy"

#: The box-prompted segmenter of the demo: the shipped demo SamModel trained on the synthetic world
#: (``concepts/synthetic_sam``, trained by :mod:`medfocus.training.demo_segmenter`), standing in for MedSAM whose weights cannot be fetched here.
DEMO_SEGMENTER = "demo"

#: MedFocus settings of the demo: refined concept masks hidden as masks, nested rule: the setting that separates
#: the heart from the lungs and mediastinum (the cardiac silhouette on every cardiomegaly film of
#: ``benchmarks/medfocus_concepts.md``); on the 16x16 demo the transferred boxes name the right concept more often
#: over all findings (pneumothorax lies outside every concept mask), as the README's "Which concept?" says.
DEMO_MEDFOCUS: dict[str, Any] = {"refine": "medsam", "medsam": DEMO_SEGMENTER, "region": "mask", "rule": "nested"}


@dataclass
class DemoConfig:
    """Sizes of the demo. Defaults are chosen so the whole run stays within 5 minutes on a quiet 2-core machine
    (measured by ``benchmarks/demo_time.py``: 271 s; the first defaults, 96 films and 24 samples per mode with
    curves for 8 of 16 steps, took 529 s there with the 16x16 demo model)."""

    n_samples: int = 64
    """synthetic cases written (positives + balanced negatives per the synthetic writer)."""
    per_mode: int = 12
    """at most this many filtered samples attributed per mode."""
    n_reference: int = 8
    """normal reference phantoms for MedFocus."""
    seed: int = 0
    size: int = 256
    threads: int | None = None
    """torch / OpenCV intra-op threads (None = the cores this process may run on, :func:`available_cores`)."""
    modes: tuple[str, ...] = ("direct", "cot")
    editors: tuple[str, ...] = ("oracle", "inpaint")
    attribute_editor: str = "oracle"
    methods: tuple[str, ...] = ()
    """empty = every registered method."""
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str = "demo"
    cue_rate: float | None = None
    """shortcut-cue rate of the synthetic data (None = the writer's default)."""
    lesion_size_rule: str | None = None
    """how the synthetic world draws nodule and mass sizes, for the data and the shortcut step's films
    (``medfocus synth --lesion-size-rule``; None = the writer's default): a model trained in the
    ``fleischner`` world is measured on that world's films."""
    max_new_tokens: int | None = None
    """generation budget of the causal filter (None = the bench defaults per mode)."""
    faithfulness_per_mode: int = 4
    """attributed samples per mode (the first of the diverse subset) that also get deletion/insertion
    curves for every heatmap (0 = none); sized so the demo stays under its time target
    (``benchmarks/demo_time.md``)."""
    faithfulness_steps: int = 8
    """steps of the deletion/insertion curves."""
    shortcut_films: int = 24
    """films of the shortcut step (each rendered with and without its cues; 0 = skip the step)."""
    shortcut_model: str = "demo-shortcut"
    """the model compared with ``model`` in the shortcut step (the shipped shortcut twin)."""


#: Measured seconds per work unit of each step on a quiet 2-core machine (``benchmarks/demo_time.md``: 64 + 8 films,
#: 2 editors x 2 modes x 65 positives, 24 shortcut films, 24 samples x 14 methods, the 16x16 demo model): the overall
#: progress bar's weights, so its ETA is right when the steps keep their relative speed (it scales with the machine's
#: actual speed).
STEP_COST: dict[str, float] = {"data": 0.136, "model": 3.2, "bench": 0.157, "shortcut": 0.80, "attribute": 0.44, "evaluate": 0.010,
                               "report": 38.0}


def merge_timings(previous: dict[str, Any] | None, current: dict[str, float], did_work: dict[str, bool]) -> dict[str, Any]:
    """The ``timings.json`` content after a run: real step times survive resumed runs.

    Args:
        previous: the file's earlier content (None when absent or unreadable).
        current: this run's seconds per step (and ``total``).
        did_work: per step, whether this run computed it from scratch (False: it reused finished work).
    Returns:
        ``{"timings": {step: s}, "resume_timings": [{step: s}, ...]}``: ``timings`` keeps, per step, the
        first full measurement (a step measured now from scratch replaces a stale one, a reused step
        keeps the old value); ``total`` is the sum of the kept step times. A run that reused any step is
        appended to ``resume_timings`` as measured.
    """
    prev_t = dict((previous or {}).get("timings") or {})
    prev_t.pop("total", None)
    resumes = list((previous or {}).get("resume_timings") or [])
    kept: dict[str, float] = {}
    for step, sec in current.items():
        if step == "total":
            continue
        kept[step] = sec if did_work.get(step, True) or step not in prev_t else float(prev_t[step])
    kept["total"] = round(sum(kept.values()), 2)
    if not all(did_work.get(k, True) for k in current if k != "total"):
        resumes.append(dict(current))
    return {"timings": kept, "resume_timings": resumes}


class _Overall:
    """The demo's one progress line: a tqdm bar over weighted work units (:data:`STEP_COST`)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.planned: dict[str, float] = {}
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0.0, desc="demo", unit="work", dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")

    def plan(self, step: str, units: float) -> None:
        """Set the expected size of ``step`` to ``units`` (a first estimate, replaced as soon as the
        step's size is known); the bar's total is the weighted sum over the steps."""
        self.planned[step] = STEP_COST[step] * units
        if self.bar is not None:
            self.bar.total = sum(self.planned.values())
            self.bar.refresh()

    def done(self, step: str, units: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(step)
            self.bar.update(STEP_COST[step] * units)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def round_robin(items: Sequence[Any], finding: Callable[[Any], str], k: int) -> list[Any]:
    """At most ``k`` of ``items``, taken in turn from each finding (findings in name order, each finding's
    items in the given order), in the order taken: a small subset that still shows every finding."""
    queues: dict[str, list[Any]] = {}
    for it in items:
        queues.setdefault(finding(it), []).append(it)
    ordered = [queues[f] for f in sorted(queues)]
    chosen: list[Any] = []
    while len(chosen) < k and any(ordered):
        for q in ordered:
            if q and len(chosen) < k:
                chosen.append(q.pop(0))
    return chosen


def diverse_subset(items: Sequence[Any], per_cell: int) -> list[Any]:
    """At most ``per_cell`` work items per (model, dataset, mode), taken round-robin over findings
    (lowest index first within a finding, :func:`round_robin`) so a small demo still shows every finding it kept."""
    cells: dict[tuple, list] = {}
    for it in items:
        cells.setdefault((it.model, it.dataset, it.mode), []).append(it)
    out: list[Any] = []
    for cell in cells.values():
        chosen = round_robin(sorted(cell, key=lambda it: it.index), lambda it: it.sample.attribute, per_cell)
        out.extend(sorted(chosen, key=lambda it: it.index))
    return out


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def _write_data(cfg: DemoConfig, data_dir: Path, ref_dir: Path, log: Callable[[str], None], *, workers: int = 2,
                progress: bool = True) -> tuple[list, bool]:
    from medfocus.datasets.synthetic import load_synthetic, write_dataset, write_reference_pool
    from medfocus.datasets.synthetic.findings import DEFAULT_LESION_SIZE_RULE

    stamp = data_dir / ".demo_params.json"
    rule = cfg.lesion_size_rule or DEFAULT_LESION_SIZE_RULE  # resolved: a changed default must not match an old stamp
    params = {"n": cfg.n_samples, "seed": cfg.seed, "size": cfg.size, "cue_rate": cfg.cue_rate, "lesion_size_rule": rule}
    wrote = False
    if not (stamp.exists() and json.loads(stamp.read_text()) == params):
        wrote = True
        # overwrite: a dataset of other demo settings is replaced as a whole (no film of it stays behind)
        kw: dict[str, Any] = {"size": cfg.size, "workers": workers, "progress": progress, "overwrite": True,
                              "lesion_size_rule": rule}
        if cfg.cue_rate is not None:
            kw["cue_rate"] = cfg.cue_rate
        log(f"[data] writing {cfg.n_samples} synthetic cases to {data_dir}")
        write_dataset(data_dir, cfg.n_samples, cfg.seed, **kw)
        atomic_write_text(stamp, json.dumps(params))
    ref_stamp = ref_dir / ".demo_params.json"
    ref_params = {"n": cfg.n_reference, "seed": cfg.seed + 1, "size": cfg.size}
    if not (ref_stamp.exists() and json.loads(ref_stamp.read_text()) == ref_params):
        wrote = True
        log(f"[data] writing {cfg.n_reference} normal reference phantoms to {ref_dir}")
        write_reference_pool(ref_dir, n=cfg.n_reference, seed=cfg.seed + 1, size=cfg.size)
        atomic_write_text(ref_stamp, json.dumps(ref_params))
    samples = load_synthetic(data_dir)
    if not samples:
        raise DataError(f"the synthetic dataset in {data_dir} has no samples")
    return samples, wrote


def _segmenter_phrase(medsam: Any) -> str:
    """How the report names a MedSAM setting."""
    if medsam == DEMO_SEGMENTER:
        return "the demo segmenter (a tiny SamModel trained on the synthetic world, standing in for MedSAM)"
    if medsam in (None, "none"):
        return "nothing (no segmenter)" if medsam == "none" else "MedSAM when its weights are present"
    return f"the segmenter {medsam} when its weights are present"


def _method_params(cfg: DemoConfig, methods: Sequence[str], ref_dir: Path) -> dict[str, dict[str, Any]]:
    params = {m: dict(cfg.method_params.get(m, {})) for m in methods}
    if "medfocus" in params:
        params["medfocus"].setdefault("pool", str(ref_dir))  # MedFocusMethod's reference-pool parameter
        # MedSAM cannot be fetched offline: the demo refines the transferred concepts with the shipped
        # demo segmenter (same SamModel code path) and uses masks + the nested rule, unless the caller
        # chose otherwise.
        for k, v in DEMO_MEDFOCUS.items():
            params["medfocus"].setdefault(k, v)
    if "prompting_medsam" in params:
        # OWL-ViT / MedSAM weights cannot be fetched offline: the demo uses the anatomy-grounded stand-in
        # detector (phrases -> MedFocus' transferred concept boxes on the demo's reference pool) unless
        # the caller chose a detector.
        pm = params["prompting_medsam"]
        if "detector" not in pm:
            pm["detector"] = DEMO_PROMPTING_DETECTOR
        if pm["detector"] == "anatomy":
            pm.setdefault("pool", str(ref_dir))
            pm.setdefault("medsam", DEMO_SEGMENTER)
    return params


def _shortcut_step(out: Path, cfg: DemoConfig, adapter: Any, log: Callable[[str], None], progress: bool) -> str:
    """Cue reliance and the causal filter for ``cfg.model`` and its shortcut twin (:mod:`medfocus.runner.shortcut`)
    on ``cfg.shortcut_films`` films (master seed ``cfg.seed + 2``); writes ``shortcut.md``; returns a one-line summary."""
    from medfocus.lvlm import load_lvlm
    from medfocus.lvlm.progress import progress_bars
    from medfocus.runner.shortcut import measure_shortcut, shortcut_markdown, write_cue_twins

    root = out / "shortcut"
    cued, free = write_cue_twins(root / "data", cfg.shortcut_films, cfg.seed + 2, size=cfg.size,
                                 lesion_size_rule=cfg.lesion_size_rule, workers=min(2, available_cores()))
    with progress_bars(not progress):  # the demo's one overall line: no loading bar of the twin's own
        twin = load_lvlm(cfg.shortcut_model)
    results = [measure_shortcut(adapter, cfg.model, cued, free, root / "bench" / "model"),
               measure_shortcut(twin, cfg.shortcut_model, cued, free, root / "bench" / "twin")]
    atomic_write_text(out / "shortcut.md", f"# {cfg.model} and its shortcut twin {cfg.shortcut_model}\n\n"
                      f"{cfg.shortcut_films} synthetic films (seed {cfg.seed + 2}), each rendered with every finding's "
                      "correlated cue and without cues.\n\n" + shortcut_markdown(results))
    parts = []
    for r in results:
        nec, yes = r.cue_necessary_share
        kept, n = r.retention["cue_necessary"]
        parts.append(f"{r.model}: {nec}/{yes} cued 'yes' answers need the cue, the filter keeps {kept}/{n} of them")
    summary = "; ".join(parts) + " (shortcut.md: intervals, clean retention)"
    log(f"[shortcut] {summary}")
    return summary


def run_demo(
    out_dir: str | Path = "runs/demo",
    cfg: DemoConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = _log_default,
    adapter: LVLMAdapter | None = None,
) -> dict[str, Any]:
    """Run the whole demo pipeline (module docstring) and return a summary dict with the output paths,
    per-step seconds, retention rows and the number of records/errors.

    Args:
        out_dir: output folder (created; reused on reruns).
        cfg: sizes and choices (:class:`DemoConfig`).
        adapter: an already-loaded LVLM adapter to use instead of ``load_lvlm(cfg.model)``.
        progress: one overall progress line with an ETA across the steps (module docstring).

    The summary's ``timings`` are the kept step times of ``timings.json`` (first full measurement per
    step, :func:`merge_timings`); ``this_run_timings`` are this call's own; ``threads`` the intra-op
    threads used.
    """
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads, previous_threads = configure_threads(cfg.threads, "DemoConfig.threads")
    overall = _Overall(progress)
    try:
        return _run_demo(out, cfg, threads, overall, log, adapter)
    finally:
        overall.close()
        restore_threads(previous_threads)


def _run_demo(out: Path, cfg: DemoConfig, threads: int, overall: _Overall, log: Callable[[str], None],
              adapter: Any | None) -> dict[str, Any]:
    import pandas as pd

    timings: dict[str, float] = {}
    did_work: dict[str, bool] = {}
    t_all = time.perf_counter()
    n_methods = len(cfg.methods) if cfg.methods else None
    if n_methods is None:
        from medfocus.attribution import list_methods

        n_methods = len(list_methods())
    # first estimates (refined as soon as each step's size is known): ~1 positive per film
    n_items_est = cfg.per_mode * len(cfg.modes)
    for name, units in (("data", cfg.n_samples + cfg.n_reference), ("model", 1),
                        ("bench", len(cfg.editors) * len(cfg.modes) * cfg.n_samples), ("shortcut", cfg.shortcut_films),
                        ("attribute", n_items_est * n_methods), ("evaluate", n_items_est * (n_methods + 3)), ("report", 1)):
        overall.plan(name, units)
    log(f"[threads] torch/OpenCV intra-op threads: {threads} (cores available to this process: {available_cores()})")

    def step(name: str, t0: float, units: float | None = None) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)
        did_work.setdefault(name, True)
        if units is not None:
            overall.done(name, units)
        log(f"[{name}] {timings[name]:.1f}s")

    # fail fast, before the data are written: a model that cannot be loaded (without the network)
    from medfocus.lvlm.loading import check_model

    for name in ([cfg.model] if adapter is None else []) + ([cfg.shortcut_model] if cfg.shortcut_films > 0 else []):
        check_model(name)

    # 1. data
    t0 = time.perf_counter()
    samples, did_work["data"] = _write_data(cfg, out / "data", out / "reference", log,
                                            workers=min(2, available_cores()), progress=False)
    positives = [s for s in samples if s.answer == "Yes"]
    step("data", t0, cfg.n_samples + cfg.n_reference)
    overall.plan("bench", len(cfg.editors) * len(cfg.modes) * len(positives))

    # 2. model, and the methods' settings checked against it (types and ranges, then layer / head indices)
    # before the long filter step
    from medfocus.attribution import get_method, list_methods
    from medfocus.runner.grid import load_checked

    t0 = time.perf_counter()
    methods = list(cfg.methods) if cfg.methods else list(list_methods())
    method_params = _method_params(cfg, methods, out / "reference")
    method_objs = {m: get_method(m, **p) for m, p in method_params.items()}
    given = adapter

    def load(name: str) -> Any:
        from medfocus.lvlm import load_lvlm

        return given if given is not None else load_lvlm(name)

    adapter = load_checked(load, cfg.model, method_objs.values())
    step("model", t0, 1)

    # 3. bench: the causal filter per editor and mode
    from medfocus.bench import build_benchmark, retention_markdown, retention_table, split_paths
    from medfocus.editing import get_editor

    t0 = time.perf_counter()
    # from scratch when no split of this run existed before (else resumed: timings.json keeps the old time)
    did_work["bench"] = not any(split_paths(out / "bench" / e, cfg.model, "synthetic", m)["records"].exists()
                                for e in cfg.editors for m in cfg.modes)
    splits: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if cfg.attribute_editor not in cfg.editors:
        raise ConfigError(f"attribute_editor {cfg.attribute_editor!r} must be one of the editors {cfg.editors}")
    for editor_name in cfg.editors:
        editor = get_editor(editor_name)
        for mode in cfg.modes:
            log(f"[bench] {cfg.model} / {mode} / editor={editor_name}: {len(positives)} positive samples")
            with _fresh_hint(out):  # splits of another demo model (an update that ships new weights)
                records, _ = build_benchmark(adapter, samples, mode=mode, editor=editor, out_dir=out / "bench" / editor_name,
                                             model_name=cfg.model, cache_dir=out / "bench" / "edits", progress=False,
                                             max_new_tokens=cfg.max_new_tokens)
            splits[(editor_name, mode)] = records
            overall.done("bench", len(positives))
    retention = pd.concat([retention_table(out / "bench" / e) for e in cfg.editors], ignore_index=True)
    atomic_write_text(out / "retention.csv", retention.to_csv(index=False))
    atomic_write_text(out / "retention.md", retention_markdown(retention))
    step("bench", t0)

    # 3b. shortcut: the demo model against its shortcut twin on films with and without their cues
    shortcut_summary = None
    if cfg.shortcut_films > 0:
        t0 = time.perf_counter()
        shortcut_summary = _shortcut_step(out, cfg, adapter, log, overall.bar is not None)
        step("shortcut", t0, cfg.shortcut_films)

    # 4. attribute
    from medfocus.runner.grid import items_from_benchmark, raw_answers_for_split, run_grid
    from medfocus.runner.store import ResultStore, load_results

    t0 = time.perf_counter()
    items = []
    for mode in cfg.modes:
        split_file = split_paths(out / "bench" / cfg.attribute_editor, cfg.model, "synthetic", mode)["records"]
        items += items_from_benchmark(splits[(cfg.attribute_editor, mode)], samples, mode=mode, model=cfg.model,
                                      extra={"editor": cfg.attribute_editor}, raw_answers=raw_answers_for_split(split_file))
    items = diverse_subset(items, cfg.per_mode)
    for mode in cfg.modes:
        kept = len(splits[(cfg.attribute_editor, mode)])
        if kept == 0:
            log(f"[attribute] warning: the {cfg.attribute_editor} filter kept no sample in {mode} mode "
                "(see retention.md); nothing to attribute there")
    log(f"[attribute] {len(items)} filtered samples x {len(methods)} methods")
    overall.plan("attribute", len(items) * len(methods))
    overall.plan("evaluate", len(items) * (len(methods) + 3))
    pm_detector = method_params.get("prompting_medsam", {}).get("detector")
    pm_segmenter = _segmenter_phrase(method_params.get("prompting_medsam", {}).get("medsam"))
    if pm_detector == "anatomy":
        log("[attribute] prompting_medsam uses the offline anatomy-grounded detector (phrases -> transferred "
            f"concept boxes), a stand-in for the paper's OWL-ViT; boxes refined by {pm_segmenter}")
    faith_items = diverse_subset(items, cfg.faithfulness_per_mode) if cfg.faithfulness_per_mode > 0 else []
    skipped = 0
    with ResultStore(out / "predictions.jsonl") as store, _fresh_hint(out):
        # one grid call per mode so the overall progress line moves during the longest step
        for mode in cfg.modes:
            mode_items = [it for it in items if it.mode == mode]
            if not mode_items:
                continue
            mode_faith = [it for it in faith_items if it.mode == mode]
            fresh = 0
            if mode_faith:
                from medfocus.evaluation.faithfulness import FaithfulnessConfig

                # the faithfulness subset first (its records carry the curves), then the rest (skipped if done)
                fs = run_grid(mode_faith, method_params, store, load_model=lambda _name: adapter,
                              make_method=lambda name, _params: method_objs[name], seed=cfg.seed, progress=False,
                              faithfulness=FaithfulnessConfig(steps=cfg.faithfulness_steps, seed=cfg.seed))
                fresh = fs.done + fs.errors
                log(f"[attribute] {mode}: {len(mode_faith)} samples with deletion/insertion curves "
                    f"({cfg.faithfulness_steps} steps): {fs}")
            summary = run_grid(mode_items, method_params, store, load_model=lambda _name: adapter,
                               make_method=lambda name, _params: method_objs[name], seed=cfg.seed, progress=False)
            skipped += summary.skipped - fresh
            log(f"[attribute] {mode}: {summary}")
            overall.done("attribute", len(mode_items) * len(methods))
    did_work["attribute"] = skipped == 0
    step("attribute", t0)

    # 5. evaluate
    from medfocus.evaluation.summary import evaluate_and_tabulate

    t0 = time.perf_counter()
    item_keys = {(it.model, it.dataset, it.index, it.mode) for it in items}
    # the store's file exists once a record was written (none when the filter kept no sample)
    stored = load_results(out / "predictions.jsonl") if (out / "predictions.jsonl").exists() else []
    preds = [r for r in stored if (r["model"], r["dataset"], int(r["index"]), r["mode"]) in item_keys and r["method"] in methods]
    # the path of `medfocus evaluate` (same table for the same records): the trivial baselines are rows of
    # every localisation table, the Del./Ins. AUC columns appear when the records carry faithfulness curves
    metrics, table_md, _ = evaluate_and_tabulate(preds, out, seed=cfg.seed)
    step("evaluate", t0, len(items) * (len(methods) + 3))

    # 6. report
    from medfocus.datasets.synthetic.findings import DEFAULT_LESION_SIZE_RULE
    from medfocus.report import build_report

    t0 = time.perf_counter()
    elapsed_before_report = time.perf_counter() - t_all
    run_info = {
        "Pipeline": f"synthetic world ({cfg.n_samples} cases, seed {cfg.seed}, lesion size rule "
                    f"{cfg.lesion_size_rule or DEFAULT_LESION_SIZE_RULE}) -> causal filter "
                    f"({' + '.join(cfg.editors)} editors) -> attribution on the {cfg.attribute_editor}-filtered split "
                    f"(<= {cfg.per_mode} samples per mode)",
        "Attributed samples": ", ".join(f"{mode}: {sum(1 for it in items if it.mode == mode)} of "
                                        f"{len(splits[(cfg.attribute_editor, mode)])} kept" for mode in cfg.modes),
        "Step seconds": ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    }
    if shortcut_summary:
        run_info["Shortcut twin"] = shortcut_summary
    if faith_items:
        run_info["Faithfulness"] = (f"deletion/insertion curves ({cfg.faithfulness_steps} steps, blur baseline) on "
                                    f"{len(faith_items)} of the attributed samples (<= {cfg.faithfulness_per_mode} per mode)")
    if pm_detector == "anatomy":
        run_info["prompting_medsam detector"] = ("anatomy (offline stand-in, not the paper's OWL-ViT): each phrase is "
                                                 "grounded to one of the 11 anatomical concepts and boxed by MedFocus' "
                                                 f"concept transfer, refined by {pm_segmenter}")
    if "medfocus" in method_params:
        mp = method_params["medfocus"]
        refined = f"refined by {_segmenter_phrase(mp.get('medsam'))}" if mp.get("refine") == "medsam" else "not refined"
        run_info["MedFocus"] = (f"concepts transferred by UOT, {refined}; region={mp.get('region', 'box')}, "
                                f"rule={mp.get('rule', 'argmax')} (see benchmarks/medfocus_concepts.md)")
    report_path = build_report(preds, out / "report.html", metrics=metrics, retention=retention,
                               title="medfocus demo: synthetic chest X-rays, demo LVLM", run_info=run_info,
                               method_order=methods, seed=cfg.seed)
    step("report", t0, 1)
    timings["total"] = round(time.perf_counter() - t_all, 2)
    result = {
        "out_dir": str(out.resolve()),
        "report": str(report_path.resolve()),
        "table_md": str((out / "table.md").resolve()),
        "timings": timings,
        "elapsed_before_report": round(elapsed_before_report, 2),
        "n_records": len(preds),
        "n_errors": sum(1 for r in preds if r.get("error")),
        "retention": retention.to_dict(orient="records"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "prompting_medsam_detector": pm_detector,
        "table": table_md,
    }
    tpath = out / "timings.json"
    try:
        previous = json.loads(tpath.read_text()) if tpath.exists() else None
    except (OSError, ValueError):
        previous = None  # an unreadable old file holds no measurement worth keeping
    merged = merge_timings(previous, timings, did_work)
    result["timings"], result["resume_timings"] = merged["timings"], merged["resume_timings"]
    result["this_run_timings"] = timings
    result["threads"] = threads
    payload = {**merged, "this_run": timings, "threads": threads, "n_records": result["n_records"],
               "n_errors": result["n_errors"], "config": result["config"]}
    atomic_write_text(tpath, json.dumps(payload, indent=1))
    return result


@contextlib.contextmanager
def _fresh_hint(out: Path):
    """A demo folder whose stored results were computed with other settings (an older medfocus, another demo model)
    is refused by the store and by the causal filter's split checks, as every run is; the demo's own way out is
    ``--fresh``: say so."""
    from medfocus.bench.build import SplitSettingsError
    from medfocus.runner.grid import StoredSettingsError

    try:
        yield
    except (StoredSettingsError, SplitSettingsError) as exc:
        raise ConfigError(f"{exc}\nFor the demo: rerun with `medfocus demo --fresh` (or another --out) to recompute "
                          f"{out} with the current settings.") from exc
