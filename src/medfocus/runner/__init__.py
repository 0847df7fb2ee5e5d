"""medfocus.runner: the experiment grid (models x datasets x modes x methods), the resumable
result store, sharding, and the end-to-end demo pipeline."""

from medfocus.runner.grid import (
    RunSummary,
    WorkItem,
    check_split_items,
    item_seed,
    items_from_benchmark,
    parse_shard,
    raw_answers_for_split,
    run_grid,
    select_items,
    shard_of,
)
from medfocus.runner.store import ResultStore, atomic_save_npz, load_results, merge_stores, record_key

__all__ = [
    "ResultStore",
    "RunSummary",
    "WorkItem",
    "atomic_save_npz",
    "check_split_items",
    "item_seed",
    "items_from_benchmark",
    "load_results",
    "merge_stores",
    "parse_shard",
    "raw_answers_for_split",
    "record_key",
    "run_grid",
    "select_items",
    "shard_of",
]
