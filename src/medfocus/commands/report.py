"""``medfocus report``: the self-contained HTML report of a run folder."""

from __future__ import annotations

from pathlib import Path

import click

from medfocus.commands.config import config_option
from medfocus.commands.evaluate import moved_data_root_option
from medfocus.errors import DataError

EPILOG = """\b
Examples:
  medfocus report runs/attr                       # -> runs/attr/report.html
  medfocus report runs/attr --retention runs/bench/retention.csv --title "VinDr-CXR, Qwen2.5-VL-7B"
  medfocus report runs/attr --save-figures --format pdf --dpi 300   # + runs/attr/figures/*.pdf for a paper
  medfocus report runs/attr --data-root /mnt/vindr   # the films moved since the run (checked by their hashes)
"""


def read_table(path: str | Path):
    """A checked retention table from ``.csv``, ``.json`` or ``.jsonl`` (:func:`medfocus.report.retention.read_retention`)."""
    from medfocus.report.retention import read_retention

    return read_retention(path)


@click.command(name="report", epilog=EPILOG)
@config_option
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--predictions", default=None, type=click.Path(dir_okay=False), show_default="RUN_DIR/predictions.jsonl", help="Result file.")
@click.option("--retention", default=None, type=click.Path(dir_okay=False), show_default="RUN_DIR/retention.csv if present",
              help="Retention table (.csv/.json) of `medfocus bench build`: checked (required columns, counts, "
                   "retention_pct = kept/n) and refused when it is not one; rows of models/datasets not in the run are "
                   "left out with a note.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), show_default="RUN_DIR/report.html", help="HTML file to write.")
@click.option("--correct-only", is_flag=True,
              help="Report only records whose attributed answer is the ground truth (answer_parsed == gt_answer), as "
                   "`evaluate --correct-only`; without it the report says how many scored records have a wrong answer.")
@click.option("--title", default="medfocus report", show_default=True, help="Report title.")
@click.option("--gallery", default=1, show_default=True, type=click.IntRange(0),
              help="Gallery samples per finding and mode (the gallery is stratified by finding).")
@click.option("--save-figures", is_flag=True, help="Also write every figure to RUN_DIR/figures/ (in --format).")
@click.option("--format", "fig_format", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True,
              help="Format of the saved figures: svg and pdf are vector (heatmaps embedded at --dpi).")
@click.option("--dpi", default=150, show_default=True, type=click.IntRange(30, 1200),
              help="Resolution of raster figures and of the heatmaps inside vector ones (the HTML embeds PNGs at this dpi).")
@moved_data_root_option()
def report(run_dir, predictions, retention, out, correct_only, title, gallery, save_figures, fig_format, dpi, data_root) -> None:
    """Write one self-contained HTML file (images embedded) with the results tables, retention table,
    plots, sample gallery and MedFocus concept/token views of RUN_DIR."""
    from medfocus.report import build_report
    from medfocus.runner.store import load_results

    run = Path(run_dir)
    preds = load_results(Path(predictions) if predictions else run / "predictions.jsonl")
    run_info = {}
    if correct_only:
        from medfocus.evaluation.records import correct_only as keep_correct

        n_all = len(preds)
        preds, n_left = keep_correct(preds)  # DataError (one CLI error line) when correctness is unknown
        run_info["Correct answers only"] = (f"--correct-only: {n_left} of {n_all} records left out (answer not the "
                                            "ground truth, or unreadable)")
        click.echo(f"--correct-only: {n_left} of {n_all} records left out", err=True)
    ret_path = Path(retention) if retention else (run / "retention.csv")
    ret = read_table(ret_path) if (retention or ret_path.exists()) else None
    if ret is not None:
        from medfocus.report.retention import rows_of_run

        # the same check build_report makes, here to say it on the terminal too
        _, note = rows_of_run(ret, [(r["model"], r["dataset"]) for r in preds], source=str(ret_path))
        if note:
            click.echo(f"note: {note}", err=True)
    from medfocus.io.paths import films_under

    if data_root:
        run_info["Films read from"] = f"--data-root {data_root} (each film checked against the hash in its record)"
    with films_under(data_root):  # the gallery and its viewers read the films back
        path = build_report(preds, Path(out) if out else run / "report.html", retention=ret, title=title, gallery=gallery,
                            figures_dir=run / "figures" if save_figures else None, fig_format=fig_format, dpi=dpi,
                            run_info=run_info, retention_source=str(ret_path))
    click.echo(f"report: {path.resolve()}")
