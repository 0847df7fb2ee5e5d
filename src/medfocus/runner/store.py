"""Append-only, crash-safe result store for attribution runs.

One JSON line per result record, keyed by ``(model, dataset, index, mode, method)``. Every append is
flushed and ``fsync``-ed before :meth:`ResultStore.append` returns, so a record that was reported as
written survives a kill. A kill *during* a write can only leave a partial last line; it is detected
on the next open (no trailing newline / not valid JSON), cut off, and that key simply counts as not
done, so the resumed run recomputes it: nothing is lost and nothing is duplicated.

Heatmaps are stored next to the JSONL file as compressed ``.npz`` files written atomically
(temporary file in the same directory, ``fsync``, ``os.replace``); the record that points at a
heatmap is appended only after the file is in place, so a record never names a missing file.

Every record carries ``sample_fingerprint`` (:func:`~medfocus.io.fingerprint.sample_fingerprint`, re-exported
here): what identifies the sample's content (image path relative to the data root, the file's size and
SHA-256, finding, expert boxes, question, answer text and source). The key alone does not identify a
sample (an index shifts when a row is added to the data, another ``--data-root`` holds other films, a
film is overwritten in place), so a resumed run compares the fingerprints
(:func:`~medfocus.io.fingerprint.fingerprint_differences`) before serving a record.

Only one process may append to a store file at a time (an exclusive ``flock`` on ``<file>.lock``);
shards of a run write separate files and are combined with :func:`merge_stores`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from medfocus.errors import ConfigError, DataError
from medfocus.evaluation.records import KEY_FIELDS, Key, read_prediction_records, record_key
from medfocus.io.atomic import atomic_save_npz
from medfocus.io.fingerprint import (FINGERPRINT_FIELD, describe_sample_conflicts, file_sha256, fingerprint_differences,
                                     merge_differences, sample_fingerprint)
from medfocus.io.jsonl import append_jsonl, iter_jsonl, read_jsonl, trim_partial_tail
from medfocus.io.locks import acquire_lock, remove_orphaned_tmp
from medfocus.io.paths import safe_filename

__all__ = ["ResultStore", "load_results", "merge_stores", "record_key", "key_slug", "to_jsonable", "atomic_save_npz",
           "read_jsonl", "iter_jsonl", "KEY_FIELDS", "Key", "FINGERPRINT_FIELD", "sample_fingerprint", "file_sha256",
           "fingerprint_differences", "describe_sample_conflicts"]


def key_slug(key: Key) -> str:
    """A file-name-safe string for a key, e.g. ``demo__synthetic__12__direct__occlusion``."""
    return safe_filename("__".join(str(part) for part in key))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy / torch scalars and arrays, tuples, paths and non-finite floats into plain JSON.

    Non-finite floats become ``None`` (JSON has no NaN); arrays become nested lists.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor, without importing torch
        return to_jsonable(obj.detach().cpu().numpy())
    return str(obj)


class ResultStore:
    """Append-only JSONL store of result records (see module docstring).

    Args:
        path: the ``.jsonl`` file (created with its parent directory if needed).
        heatmap_dir: where :meth:`save_arrays` writes ``.npz`` files; default ``<path stem>_heatmaps/``
            next to the file. Record paths are stored relative to the JSONL file's directory.
        lock: take an exclusive lock so that two processes cannot append to the same file.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, *, heatmap_dir: str | Path | None = None, lock: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.heatmap_dir = Path(heatmap_dir) if heatmap_dir is not None else self.path.parent / f"{self.path.stem}_heatmaps"
        self._lock_fh = None
        if lock:
            self._acquire_lock()
        trim_partial_tail(self.path)  # cut an interrupted append so the next one starts on a fresh line
        self._records: dict[Key, dict[str, Any]] = {}
        for rec in read_jsonl(self.path)[0]:
            self._records[record_key(rec)] = rec  # later lines supersede earlier ones (retries)
        # opened at the first append: a run refused after the store is opened (a settings conflict, nothing
        # to compute) must not leave an empty results file behind that reads as "a run with no records"
        self._fh = None
        self._closed = False

    # ---- locking ------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        self._lock_fh = acquire_lock(self.path, "result store")
        # Under the lock nobody else writes this store's heatmaps: temporary files there are debris
        # of a killed write.
        remove_orphaned_tmp(self.heatmap_dir)

    # ---- reading ------------------------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: Key) -> dict[str, Any] | None:
        return self._records.get(key)

    def keys(self) -> set[Key]:
        return set(self._records)

    def records(self) -> list[dict[str, Any]]:
        """One record per key (the latest written), in key order."""
        return [self._records[k] for k in sorted(self._records)]

    def is_done(self, key: Key, *, retry_errors: bool = False) -> bool:
        """Whether ``key`` has a record (with ``retry_errors``, only a record without error counts)."""
        rec = self._records.get(key)
        if rec is None:
            return False
        return not (retry_errors and rec.get("error"))

    # ---- writing ------------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably (write + flush + fsync) and index it."""
        if self._closed:
            raise ConfigError(f"result store {self.path} is closed")
        if self._fh is None:
            self._fh = open(self.path, "ab")
        rec = to_jsonable(record)
        key = record_key(rec)
        append_jsonl(self._fh, rec, separators=(",", ":"), allow_nan=False)
        self._records[key] = rec

    def heatmap_path(self, key: Key) -> Path:
        """Where the ``.npz`` of a key goes (absolute)."""
        return self.heatmap_dir / f"{key_slug(key)}.npz"

    def save_arrays(self, key: Key, **arrays: np.ndarray) -> str:
        """Atomically write the arrays of one record; returns the path relative to the store's directory."""
        path = atomic_save_npz(self.heatmap_path(key), **arrays)
        return os.path.relpath(path, self.path.parent)

    def resolve(self, rel_path: str) -> Path:
        """Absolute path of a path stored in a record (relative to the JSONL file's directory)."""
        p = Path(rel_path)
        return p if p.is_absolute() else self.path.parent / p

    def close(self) -> None:
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def load_results(path: str | Path, *, absolute_paths: bool = True) -> list[dict[str, Any]]:
    """Read a store file without locking it: one record per key (latest wins), key-sorted.

    The same reader as ``medfocus evaluate`` (:func:`medfocus.evaluation.read_prediction_records`), so
    both see the same records. With ``absolute_paths`` every ``heatmap_path`` is made absolute
    (relative to the file's directory), so the records can be handed to the evaluation from any
    working directory.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"result file {path} does not exist; run `medfocus attribute` first")
    out = []
    for rec in sorted(read_prediction_records(path), key=record_key):
        rec = {k: v for k, v in rec.items() if k not in ("_base_dir", "_where")}
        hp = rec.get("heatmap_path")
        if absolute_paths and hp and not Path(hp).is_absolute():
            rec["heatmap_path"] = str((path.parent / hp).resolve())
        out.append(rec)
    return out


def _merge_conflict(kept: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Sample differences between two records of one key (:func:`~medfocus.io.fingerprint.merge_differences`)."""
    return merge_differences(kept.get(FINGERPRINT_FIELD), new.get(FINGERPRINT_FIELD))


def describe_merge(out: str | Path, n_records: int, n_inputs: int) -> str:
    """The one line a merge prints: the merged file and its record count, or -- when the shard files held no
    record, so that no file was created (the store writes its file at the first record) -- that nothing was
    written, instead of naming a file that does not exist."""
    out = Path(out)
    if n_records == 0 and not out.exists():
        return f"the {n_inputs} shard files hold no record: nothing written ({out} not created)"
    return f"{out} ({n_records} records from {n_inputs} shard files)"


def merge_stores(inputs: Iterable[str | Path], out: str | Path, *, prefer_success: bool = True,
                 overwrite: bool = False) -> int:
    """Merge shard result files into one store; returns the number of records in ``out``.

    Keys already in ``out`` are kept unless a merged record replaces an errored one. Between two
    inputs holding the same key, a record without error wins over one with an error
    (``prefer_success``), otherwise the later input wins. Heatmap paths are rewritten to stay valid
    relative to ``out``'s directory (the ``.npz`` files are not moved).

    Two records of one key computed on different samples (their ``sample_fingerprint`` differs, or one
    of them has none) are never combined silently: the merge raises :class:`ConfigError` naming them,
    before anything is written; with ``overwrite`` the shard record replaces the record in ``out``
    (a rerun with ``--overwrite`` recomputed it on the current sample). An error record in ``out`` of
    another sample is replaced without asking (it holds no result).
    """
    out = Path(out)
    with ResultStore(out) as store:
        chosen: dict[Key, dict[str, Any]] = {}
        conflicts: dict[tuple, list[str]] = {}

        def conflict(key: Key, diffs: list[str]) -> None:
            conflicts.setdefault((*key[:4], tuple(diffs)), []).append(key[4])

        for inp in inputs:
            inp = Path(inp)
            if inp.resolve() == out.resolve():
                continue
            for rec in load_results(inp, absolute_paths=True):
                key = record_key(rec)
                prev = chosen.get(key)
                if prev is not None and _merge_conflict(prev, rec):
                    conflict(key, [f"two shard files disagree: {d}" for d in _merge_conflict(prev, rec)])
                if prev is not None and prefer_success and not prev.get("error") and rec.get("error"):
                    continue
                chosen[key] = rec
        replace: set[Key] = set()
        for key in sorted(chosen):
            existing = store.get(key)
            if existing is not None:
                diffs = _merge_conflict(existing, chosen[key])
                if diffs and (overwrite or existing.get("error")):  # an error record of another sample is no result
                    replace.add(key)
                elif diffs:
                    conflict(key, diffs)
        if conflicts:
            raise ConfigError(f"merging into {out} would combine records of different samples under one key:\n"
                              + describe_sample_conflicts(conflicts) + "\nRerun the merge with --overwrite to let the "
                              "shard records replace those in the merged file (when the shards were recomputed on the "
                              "current data), or merge into another folder.")
        for key in sorted(chosen):
            rec = dict(chosen[key])
            existing = store.get(key)
            if existing is not None and key not in replace and (not existing.get("error") or rec.get("error")):
                continue
            hp = rec.get("heatmap_path")
            if hp:
                rec["heatmap_path"] = os.path.relpath(hp, out.parent)
            store.append(rec)
        return len(store)
