"""Evaluation: heatmap -> boxes, localisation metrics against expert boxes, bootstrap tables.

See :mod:`medfocus.evaluation.metrics` for the protocol (union of predicted boxes vs union of
expert boxes), :mod:`medfocus.evaluation.records` for the prediction-record schema, and
:mod:`medfocus.evaluation.tables` for the Table-1-shaped outputs. Faithfulness (deletion / insertion
curves, which need the model) lives in :mod:`medfocus.evaluation.faithfulness`, imported on demand.
"""

from medfocus.evaluation.baselines import (
    TRIVIAL_BASELINES,
    compare_to_baselines,
    finding_table,
    trivial_baseline_records,
)
from medfocus.evaluation.boxes import boxes_to_mask, heatmap_to_boxes, normalize_heatmap, union_area
from medfocus.evaluation.metrics import auprc, energy_pointing_game, pointing_game, union_box_metrics
from medfocus.evaluation.records import KEY_FIELDS, evaluate_record, evaluate_records, load_heatmap, read_prediction_files, read_prediction_records, record_key
from medfocus.evaluation.significance import best_methods, format_proportion, paired_bootstrap_diff, wilson_interval
from medfocus.evaluation.tables import bootstrap_ci, build_tables, summarize, to_markdown

__all__ = [
    "heatmap_to_boxes",
    "normalize_heatmap",
    "boxes_to_mask",
    "union_area",
    "union_box_metrics",
    "pointing_game",
    "energy_pointing_game",
    "auprc",
    "evaluate_record",
    "evaluate_records",
    "read_prediction_records",
    "read_prediction_files",
    "record_key",
    "KEY_FIELDS",
    "load_heatmap",
    "bootstrap_ci",
    "summarize",
    "to_markdown",
    "build_tables",
    "best_methods",
    "paired_bootstrap_diff",
    "wilson_interval",
    "format_proportion",
    "TRIVIAL_BASELINES",
    "trivial_baseline_records",
    "compare_to_baselines",
    "finding_table",
]
