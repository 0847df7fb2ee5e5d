"""Records in, table out: the one path behind ``medfocus evaluate`` and the demo's own table.

It sits above :mod:`~medfocus.evaluation.records` (per-record scores), :mod:`~medfocus.evaluation.baselines`
(the trivial-baseline rows) and :mod:`~medfocus.evaluation.tables` (the bootstrap table), which do not
import it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from medfocus.evaluation.baselines import trivial_baseline_records
from medfocus.evaluation.records import evaluate_records
from medfocus.evaluation.tables import build_tables, table_metrics

__all__ = ["evaluate_and_tabulate"]


def evaluate_and_tabulate(
    records: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    baselines: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    q: float = 0.9,
    min_area: int = 16,
    max_boxes: int = 10,
    progress: bool = False,
) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
    """Score prediction records and write ``table.md`` / ``table.csv`` into ``out_dir``: the one path
    behind ``medfocus evaluate`` and the demo's own table, so both give the same table for the same records.

    Args:
        records: prediction records (:func:`~medfocus.evaluation.records.read_prediction_records` or the runner).
        metrics: the table's columns; ``None``: :func:`table_metrics` (localisation, plus the faithfulness
            AUCs when the records carry them).
        baselines: add the trivial-baseline rows (:func:`~medfocus.evaluation.baselines.trivial_baseline_records`,
            seeded with ``seed``).
        n_boot, seed: bootstrap settings. q, min_area, max_boxes: heatmap -> boxes parameters.
    Returns:
        ``(per-row metrics, Markdown table, metric columns shown)``; the rows are those of
        :func:`~medfocus.evaluation.records.evaluate_records` (the records, the baseline rows, the
        faithfulness reference rows with ``source == "reference"``).
    """
    recs = list(records)
    chosen = tuple(metrics) if metrics else table_metrics(recs)
    rows = recs + (trivial_baseline_records(recs, seed=seed) if baselines else [])
    df = evaluate_records(rows, q=q, min_area=min_area, max_boxes=max_boxes, progress=progress)
    md = build_tables(df, out_dir, metrics=chosen, n_boot=n_boot, seed=seed)
    return df, md, chosen
