"""``medfocus evaluate``: score prediction records against expert boxes and write the tables."""

from __future__ import annotations

from pathlib import Path

import click

_EPILOG = """\b
Examples:
  medfocus evaluate runs/demo/predictions.jsonl --out runs/demo/eval
  medfocus evaluate a.jsonl b.jsonl --out eval --metrics iou,f1,pointing_game --n-boot 2000

\b
Each JSONL line is one record:
  {"model", "dataset", "index", "mode", "method", "gt_boxes": [[x1,y1,x2,y2],...],
   "image_size": [W,H], "pred_boxes": [[...]] | "heatmap_path": "rel/or/abs.npy|.npz",
   "unparseable": false, "error": null}
Relative heatmap paths are relative to the JSONL's folder. Boxes are clipped to image_size;
inverted or non-finite gt_boxes make the record an error; "unparseable": true (box text the
model wrote that no rule reads) is counted, not scored.

\b
Writes into --out: table.md (printed), table.csv (long format with CIs), records.csv (per record),
baselines.md/.csv (each method vs the best trivial baseline, paired bootstrap CI),
by_finding.md/.csv (per-finding means) and baseline_records.csv (the baselines' own rows). The tables carry three trivial-baseline rows
(centred Gaussian, image-blind finding prior, uniform random; --no-baselines leaves them out).
"""

ALL_METRICS = ("iou", "f1", "precision", "recall", "pointing_game", "energy_pg", "auprc")


@click.command(name="evaluate", epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("predictions", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--metrics", default="iou,f1,precision,recall", show_default=True,
              help=f"Comma-separated metrics for the Markdown table; any of {', '.join(ALL_METRICS)}.")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(0), help="Bootstrap resamples for the 95% CI.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@click.option("--q", default=0.9, show_default=True, type=click.FloatRange(0, 1), help="Heatmap threshold quantile.")
@click.option("--min-area", default=16, show_default=True, type=click.IntRange(0), help="Minimum component area (pixels).")
@click.option("--max-boxes", default=10, show_default=True, type=click.IntRange(1), help="Maximum boxes per heatmap.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Add the trivial-baseline rows (centred Gaussian, image-blind finding prior, uniform random) and "
                   "compare every method with the best of them.")
def evaluate(predictions: tuple[Path, ...], out_dir: Path, metrics: str, n_boot: int, seed: int, q: float, min_area: int,
             max_boxes: int, baselines: bool) -> None:
    """Score predicted boxes / heatmaps against expert boxes; write CSV/Markdown tables.

    Boxes from heatmaps: min-max normalise, threshold at the q-quantile of the positive values,
    8-connected components >= min-area pixels, ranked by mean heat. Metrics: IoU, precision, recall,
    F1 of the union of predicted boxes vs the union of expert boxes (plus pointing game, energy
    pointing game and AUPRC when a heatmap is given). Table cells: mean x100 [95% bootstrap CI].
    """
    from medfocus.evaluation import build_tables, evaluate_records, read_prediction_records
    from medfocus.io.atomic import atomic_write_text

    chosen = [m.strip() for m in metrics.split(",") if m.strip()]
    bad = [m for m in chosen if m not in ALL_METRICS]
    if bad or not chosen:
        raise click.BadParameter(f"unknown metric(s) {bad}; choose from {', '.join(ALL_METRICS)}", param_hint="--metrics")
    records = [r for p in predictions for r in read_prediction_records(p)]
    if not records:
        raise click.ClickException(f"no records in {', '.join(map(str, predictions))}")
    if baselines:
        from medfocus.evaluation.baselines import trivial_baseline_records

        records = records + trivial_baseline_records(records, seed=seed)
    df = evaluate_records(records, q=q, min_area=min_area, max_boxes=max_boxes, progress=len(records) > 200)
    out_dir.mkdir(parents=True, exist_ok=True)
    from medfocus.evaluation.baselines import is_baseline

    is_base = df["method"].astype(str).map(is_baseline)
    atomic_write_text(out_dir / "records.csv", df[~is_base].to_csv(index=False))
    if baselines:
        atomic_write_text(out_dir / "baseline_records.csv", df[is_base].to_csv(index=False))
    md = build_tables(df, out_dir, metrics=chosen, n_boot=n_boot, seed=seed)
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
        atomic_write_text(out_dir / "by_finding.md", finding_markdown(ft))
        click.echo(bmd)
    n_err = int((df["error"].notna() & ~is_base).sum())
    n_base_err = int((df["error"].notna() & is_base).sum())
    click.echo(f"{int((~is_base).sum())} records ({n_err} with errors)"
               + (f" + {int(is_base.sum())} trivial-baseline rows ({n_base_err} undefined: a finding with no other sample "
                  "has no prior)" if baselines else "")
               + f" -> {out_dir / 'table.md'}, {out_dir / 'table.csv'}, {out_dir / 'records.csv'}", err=True)
    if n_err:
        first = df[df["error"].notna() & ~is_base].iloc[0]
        click.echo(f"first error: {first['model']}/{first['dataset']}#{first['index']} {first['method']}: {first['error']}", err=True)
