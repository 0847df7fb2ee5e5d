"""Causally filtered benchmark building: counterfactual edits + the three-step filter
(:mod:`medfocus.bench.filter`), resumable per-split output and retention tables
(:mod:`medfocus.bench.build`), with an original-view generation cache shared across editors
(:class:`~medfocus.bench.build.GenerationCache`)."""

from medfocus.bench.build import (
    GenerationCache,
    build_benchmark,
    read_log,
    retention_markdown,
    retention_row,
    retention_table,
    split_paths,
    write_retention,
)
from medfocus.bench.filter import GATES, RECORD_FIELDS, VIEWS, FilterResult, apply_filter

__all__ = [
    "GATES",
    "RECORD_FIELDS",
    "VIEWS",
    "FilterResult",
    "GenerationCache",
    "apply_filter",
    "build_benchmark",
    "read_log",
    "retention_markdown",
    "retention_row",
    "retention_table",
    "split_paths",
    "write_retention",
]
