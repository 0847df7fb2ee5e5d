"""``medfocus report``: the self-contained HTML report of a run folder."""

from __future__ import annotations

from pathlib import Path

import click

from medfocus.commands.config import config_option
from medfocus.errors import DataError, MedfocusError

EPILOG = """\b
Examples:
  medfocus report runs/attr                       # -> runs/attr/report.html
  medfocus report runs/attr --retention runs/bench/retention.csv --title "VinDr-CXR, Qwen2.5-VL-7B"
"""


def read_table(path: str | Path):
    """A retention table from ``.csv`` or ``.json`` (list of rows)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError(f"retention table {path} does not exist")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix in (".json", ".jsonl"):
        return pd.read_json(path, lines=path.suffix == ".jsonl")
    raise DataError(f"retention table {path}: expected .csv, .json or .jsonl")


@click.command(name="report", epilog=EPILOG)
@config_option
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--predictions", default=None, type=click.Path(dir_okay=False), help="Result file (default RUN_DIR/predictions.jsonl).")
@click.option("--retention", default=None, type=click.Path(dir_okay=False), help="Retention table (.csv/.json; default RUN_DIR/retention.csv if present).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file to write (default RUN_DIR/report.html).")
@click.option("--title", default="medfocus report", show_default=True)
@click.option("--gallery", default=4, show_default=True, help="Samples in the gallery per mode.")
@click.option("--save-figures", is_flag=True, help="Also write every figure as PNG to RUN_DIR/figures/.")
def report(run_dir, predictions, retention, out, title, gallery, save_figures) -> None:
    """Write one self-contained HTML file (images embedded) with the results tables, retention table,
    plots, sample gallery and MedFocus concept/token views of RUN_DIR."""
    from medfocus.report import build_report
    from medfocus.runner.store import load_records

    run = Path(run_dir)
    try:
        preds = load_records(Path(predictions) if predictions else run / "predictions.jsonl")
        ret_path = Path(retention) if retention else (run / "retention.csv")
        ret = read_table(ret_path) if (retention or ret_path.exists()) else None
        path = build_report(preds, Path(out) if out else run / "report.html", retention=ret, title=title, gallery=gallery,
                            figures_dir=run / "figures" if save_figures else None)
    except MedfocusError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"report: {path.resolve()}")
