"""``medfocus evaluate``: score prediction records against expert boxes and write the tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import click

_EPILOG = """\b
Examples:
  medfocus evaluate runs/demo/predictions.jsonl --out runs/demo/eval
  medfocus evaluate a.jsonl b.jsonl --out eval --metrics iou,f1,pointing_game --n-boot 2000
  # faithfulness (deletion/insertion AUCs) of the stored heatmaps, re-scored by their model
  medfocus evaluate runs/demo/predictions.jsonl --out runs/demo/eval --faithfulness --model demo

\b
Each JSONL line is one record:
  {"model", "dataset", "index", "mode", "method", "gt_boxes": [[x1,y1,x2,y2],...],
   "image_size": [W,H], "pred_boxes": [[...]] | "heatmap_path": "rel/or/abs.npy|.npz",
   "unparseable": false, "error": null}
Relative heatmap paths are relative to the JSONL's folder. A key (model, dataset, index, mode, method)
counts once: within a file the last record wins; across files an identical copy is counted once (one
note says how many), different records under one key are an error naming both files. image_size is [W,H] of the original
image (the frame of gt_boxes): a record with a heatmap and no image_size is an error (the map's own
shape is not that frame); box-only records without it are scored unclipped, with one warning.
A heatmap must be in image_size's frame or a resampling of it in the same aspect ratio (a transposed
or square canvas map of a non-square film is an error, never stretched). Boxes are clipped to image_size;
inverted or non-finite gt_boxes or pred_boxes make the record an error, as do pred_boxes that all lie in
[0, 1] on a film of >= 32 px (relative coordinates);
"unparseable": true (box text the model wrote that no rule reads) is counted, not scored.
Records whose answer_parsed is not their gt_answer (an unfiltered run attributes the model's own,
possibly wrong, answer) are scored and counted in the table note; --correct-only leaves them out.

\b
Writes into --out: table.md (printed), table.csv (long format with CIs), records.csv (per record),
baselines.md/.csv (each method vs the best trivial baseline, paired bootstrap CI),
by_finding.md/.csv (per-finding means) and baseline_records.csv (the baselines' own rows). The tables carry three trivial-baseline rows
(centred Gaussian, image-blind finding prior, uniform random; --no-baselines leaves them out).
With --faithfulness also predictions.faithfulness.jsonl (the records with their curves; give it to
`medfocus report RUN --predictions ...` for the faithfulness table and mean-curve plot).
"""

ALL_METRICS = ("iou", "f1", "precision", "recall", "pointing_game", "energy_pg", "auprc", "deletion_auc", "insertion_auc")


def faithfulness_options(*, default: bool) -> Callable[[Any], Any]:
    """The ``--faithfulness`` flag and its settings, shared by ``attribute`` and ``evaluate``."""

    def deco(f: Any) -> Any:
        for opt in reversed([
            click.option("--faithfulness/--no-faithfulness", default=default, show_default=True,
                         help="Deletion/insertion curves and AUCs (RISE protocol on image-token cells) of every heatmap, "
                              "plus a random-map and an expert-box reference per sample (32 extra forward passes per "
                              "heatmap at 16 steps)."),
            click.option("--faithfulness-steps", default=16, show_default=True, type=click.IntRange(1), help="Equal fractions per curve."),
            click.option("--faithfulness-baseline", default="blur", show_default=True, type=click.Choice(["blur", "zero", "mean"]),
                         help="What a removed cell becomes."),
            click.option("--faithfulness-batch-size", default=16, show_default=True, type=click.IntRange(1), help="Variants per forward pass."),
        ]):
            f = opt(f)
        return f

    return deco


def moved_data_root_option(needs: str = "") -> Callable[[Any], Any]:
    """``--data-root``: where the records' films are now, for commands that read them back from stored records
    (``report``, ``evaluate --faithfulness``; :func:`medfocus.io.paths.films_under`). ``needs``: the option it
    only works with, said in the help."""
    return click.option(
        "--data-root", "data_root", default=None, type=click.Path(exists=True, file_okay=False),
        show_default="the films' paths stored in the records",
        help=(f"With {needs}: the" if needs else "The") + " data root the records' films are under now, when it moved "
             "since the run (another machine, a remounted disk): each film is read at DATA_ROOT/<its path relative to "
             "the run's data root> and checked against the hash stored in its record.")


def faithfulness_config(enabled: bool, steps: int, baseline: str, batch_size: int) -> Any:
    """A :class:`~medfocus.evaluation.faithfulness.FaithfulnessConfig` when ``enabled``, else ``None``."""
    if not enabled:
        return None
    from medfocus.evaluation.faithfulness import FaithfulnessConfig

    return FaithfulnessConfig(steps=steps, baseline=baseline, batch_size=batch_size)


def add_faithfulness(records: Sequence[dict[str, Any]], model: str, cfg: Any, *, load_model: Callable[[str], Any] | None = None,
                     progress: bool = True) -> tuple[int, int]:
    """Add the faithfulness fields (:func:`~medfocus.evaluation.faithfulness.record_faithfulness`) to the
    records of ``model`` that have a stored heatmap, in place, loading the model once. Records of other
    models, failed records and box-only records are left as they are.

    Returns:
        ``(n_scored, n_other_model)``.

    Raises:
        DataError: a heatmap or image named by a record cannot be read (naming the record).
    """
    from medfocus.errors import DataError
    from medfocus.evaluation import load_heatmap
    from medfocus.evaluation.faithfulness import record_faithfulness
    from medfocus.io import read_image
    from medfocus.io.paths import record_film
    from medfocus.lvlm.scoring import score_chat

    todo, other = [], 0
    for r in records:
        if r.get("error") or not r.get("heatmap_path") or not r.get("gt_boxes"):
            continue
        if str(r.get("model")) != model:
            other += 1
            continue
        todo.append(r)
    if not todo:
        return 0, other

    def where_of(r: dict[str, Any]) -> str:
        return str(r.get("_where") or f"{r.get('model')}/{r.get('dataset')}#{r.get('index')} {r.get('method')}")

    # every film found and checked to be the one its record was computed on before the model loads (a moved
    # root fails in seconds, not after the load): (record, how errors name it, its film)
    checked = []
    for r in todo:
        where = where_of(r)
        checked.append((r, where, record_film(r, where=where)))
    if load_model is None:
        from medfocus.lvlm import load_lvlm as load_model
    adapter = load_model(model)
    refs: dict[tuple, Any] = {}  # reference curves and curve ends, once per sample
    it: Any = checked
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(checked, desc="faithfulness", unit="rec")
    n = 0
    for r, where, film in it:
        hp = Path(str(r["heatmap_path"]))
        if not hp.is_absolute() and r.get("_base_dir"):
            hp = Path(r["_base_dir"]) / hp
        heat = load_heatmap(hp, required=False)
        if heat is None:  # a box-output method's arrays: no map to rank
            continue
        r["heatmap_path"] = str(hp.resolve())
        try:
            image, _ = read_image(film)  # the film the map was computed on (checked above)
        except OSError as exc:
            raise DataError(f"{where}: cannot read the record's image ({type(exc).__name__}: {exc})") from exc
        if heat.shape != image.shape:
            raise DataError(f"{where}: heatmap shape {heat.shape} differs from the image's {image.shape}")
        r.update(record_faithfulness(adapter, image, r, heat, cfg, refs, scorer=score_chat))
        n += 1
    return n, other


def _for_file(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``record`` as written to a JSONL in ``folder``: without the reader's ``_`` fields, its ``heatmap_path``
    relative to ``folder`` (the store's convention), so the run and its evaluation move together instead of
    naming maps at the old place by absolute path."""
    out = {k: v for k, v in record.items() if not k.startswith("_")}
    hp = out.get("heatmap_path")
    if hp:
        p = Path(str(hp))
        if not p.is_absolute():
            p = Path(str(record.get("_base_dir") or ".")) / p
        try:
            out["heatmap_path"] = os.path.relpath(p.resolve(), folder.resolve())
        except ValueError:  # another drive: only an absolute path can name it
            out["heatmap_path"] = str(p.resolve())
    return out


@click.command(name="evaluate", epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("predictions", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--metrics", default=None, show_default="iou,f1,precision,recall, plus deletion_auc,insertion_auc when the records carry faithfulness curves",
              help=f"Comma-separated metrics for the Markdown table; any of {', '.join(ALL_METRICS)}.")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(0), help="Bootstrap resamples for the 95% CI.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@click.option("--q", default=0.9, show_default=True, type=click.FloatRange(0, 1), help="Heatmap threshold quantile.")
@click.option("--min-area", default=16, show_default=True, type=click.IntRange(0), help="Minimum component area (pixels).")
@click.option("--max-boxes", default=10, show_default=True, type=click.IntRange(1), help="Maximum boxes per heatmap.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Add the trivial-baseline rows (centred Gaussian, image-blind finding prior, uniform random) and "
                   "compare every method with the best of them.")
@click.option("--correct-only", is_flag=True,
              help="Score only records whose attributed answer is the ground truth (answer_parsed == gt_answer). "
                   "Without it, attributions of wrong answers (e.g. a \"No\" on a film with the finding) are scored "
                   "against the expert boxes too; the table says how many.")
@faithfulness_options(default=False)
@click.option("--model", default=None, show_default="none; required with --faithfulness",
              help="With --faithfulness: the LVLM (registry name or folder) whose records are re-scored.")
@moved_data_root_option(needs="--faithfulness")
def evaluate(predictions: tuple[Path, ...], out_dir: Path, metrics: str | None, n_boot: int, seed: int, q: float, min_area: int,
             max_boxes: int, baselines: bool, correct_only: bool, faithfulness: bool, faithfulness_steps: int,
             faithfulness_baseline: str, faithfulness_batch_size: int, model: str | None, data_root: str | None) -> None:
    """Score predicted boxes / heatmaps against expert boxes; write CSV/Markdown tables.

    Boxes from heatmaps: min-max normalise, threshold at the q-quantile of the positive values,
    8-connected components >= min-area pixels, ranked by mean heat. Metrics: IoU, precision, recall,
    F1 of the union of predicted boxes vs the union of expert boxes (plus pointing game, energy
    pointing game and AUPRC when a heatmap is given). Table cells: mean x100 [95% bootstrap CI].
    """
    from medfocus.evaluation import read_prediction_files
    from medfocus.evaluation.summary import evaluate_and_tabulate
    from medfocus.io.atomic import atomic_write_text

    chosen: list[str] | None = None
    if metrics is not None:
        chosen = [m.strip() for m in metrics.split(",") if m.strip()]
        bad = [m for m in chosen if m not in ALL_METRICS]
        if bad or not chosen:
            raise click.BadParameter(f"unknown metric(s) {bad}; choose from {', '.join(ALL_METRICS)}", param_hint="--metrics")
    # settings first: no file is read for a run that cannot start
    if faithfulness and not model:
        raise click.BadParameter("--faithfulness needs --model NAME (the LVLM whose heatmaps are re-scored)", param_hint="--model")
    if model and not faithfulness:
        raise click.BadParameter("--model is only used with --faithfulness", param_hint="--model")
    if data_root and not faithfulness:
        raise click.BadParameter("--data-root is only used with --faithfulness (scoring reads no film)", param_hint="--data-root")
    # one record per key across the files too: overlapping files (a merged store and its shards, a file
    # given twice) would otherwise double n and shrink every interval
    records, dup_note = read_prediction_files(predictions)
    if dup_note:
        click.echo(f"note: {dup_note}", err=True)
    if not records:
        raise click.ClickException(f"no records in {', '.join(map(str, predictions))}")
    if correct_only:
        from medfocus.evaluation.records import correct_only as keep_correct

        n_all = len(records)
        records, n_left = keep_correct(records)  # DataError (-> one CLI error line) when correctness is unknown
        click.echo(f"--correct-only: {n_left} of {n_all} records left out (answer not the ground truth, or unreadable)",
                   err=True)
        if not records:
            raise click.ClickException(f"--correct-only: no record of {', '.join(map(str, predictions))} has a correct answer")
    if faithfulness:
        from medfocus.runner.store import to_jsonable

        # a MedfocusError here becomes a CLI error in the one place that converts them (cli.py)
        cfg = faithfulness_config(True, faithfulness_steps, faithfulness_baseline, faithfulness_batch_size)
        from medfocus.io.paths import films_under

        with films_under(data_root):
            n_done, n_other = add_faithfulness(records, str(model), cfg)
        click.echo(f"faithfulness: {n_done} heatmap records scored with {model}"
                   + (f" ({n_other} records of other models left out)" if n_other else ""), err=True)
        if chosen is not None and "deletion_auc" not in chosen:
            chosen += ["deletion_auc", "insertion_auc"]
        out_dir.mkdir(parents=True, exist_ok=True)
        import json

        lines = [json.dumps(to_jsonable(_for_file(r, out_dir))) for r in records]
        atomic_write_text(out_dir / "predictions.faithfulness.jsonl", "\n".join(lines) + "\n")
    # the demo's own table goes through the same function (same records, same seed: the same table)
    df, md, shown = evaluate_and_tabulate(records, out_dir, metrics=chosen, baselines=baselines, n_boot=n_boot, seed=seed,
                                          q=q, min_area=min_area, max_boxes=max_boxes, progress=len(records) > 200)
    chosen = list(shown)
    from medfocus.evaluation.baselines import is_baseline

    is_base = df["method"].astype(str).map(is_baseline)
    is_ref = df["source"] == "reference"  # faithfulness reference rows: per sample, not records
    atomic_write_text(out_dir / "records.csv", df[~is_base].to_csv(index=False))
    if baselines:
        atomic_write_text(out_dir / "baseline_records.csv", df[is_base].to_csv(index=False))
    click.echo(md)
    if baselines:
        from medfocus.evaluation.baselines import baselines_markdown, compare_to_baselines, finding_markdown, finding_table

        comp = compare_to_baselines(df, [m for m in chosen if m in ("iou", "f1", "precision", "recall")] or ["iou"],
                                    n_boot=n_boot, seed=seed)
        bmd = baselines_markdown(comp)
        atomic_write_text(out_dir / "baselines.csv", comp.to_csv(index=False))
        atomic_write_text(out_dir / "baselines.md", bmd)
        ft = finding_table(df, chosen[0])
        atomic_write_text(out_dir / "by_finding.csv", ft.to_csv(index=False))
        atomic_write_text(out_dir / "by_finding.md", finding_markdown(ft, metric=chosen[0]))
        click.echo(bmd)
    is_rec = ~is_base & ~is_ref
    n_err = int((df["error"].notna() & is_rec).sum())
    base_err = df["error"].where(is_base).dropna().astype(str)
    n_no_prior = int(base_err.str.startswith("no other sample").sum())
    why = [f"{n_no_prior} with no other sample of the finding to build a prior from"] if n_no_prior else []
    if len(base_err) > n_no_prior:  # any other reason is named by its rows, never folded into the prior's
        why.append(f"{len(base_err) - n_no_prior} other errors, see the error column of baseline_records.csv")
    click.echo(f"{int(is_rec.sum())} records ({n_err} with errors)"
               + (f" + {int(is_ref.sum())} faithfulness reference rows (random / expert-box map per sample)" if is_ref.any() else "")
               + (f" + {int(is_base.sum())} trivial-baseline rows ({len(base_err)} undefined"
                  + (": " + "; ".join(why) if why else "") + ")" if baselines else "")
               + f" -> {out_dir / 'table.md'}, {out_dir / 'table.csv'}, {out_dir / 'records.csv'}", err=True)
    # records left out of the tables for want of a region to find: said, with the reason, not only in records.csv
    n_no_gt = int(((df["source"] == "no_gt") & is_rec).sum())
    if n_no_gt:
        click.echo(f"{n_no_gt} of these records have no expert boxes (gt_boxes empty: a negative sample, or `medfocus "
                   "explain` without --box) and are not scored: localisation needs the region the answer is about"
                   + ("; nothing was scored" if n_no_gt + n_err == int(is_rec.sum()) else ""), err=True)
    if n_err:
        first = df[df["error"].notna() & is_rec].iloc[0]
        click.echo(f"first error: {first['model']}/{first['dataset']}#{first['index']} {first['method']}: {first['error']}", err=True)
