"""Append-only, crash-safe result store for attribution runs.

One JSON line per result record, keyed by ``(model, dataset, index, mode, method)``. Every append is
flushed and ``fsync``-ed before :meth:`ResultStore.append` returns, so a record that was reported as
written survives a kill. A kill *during* a write can only leave a partial last line; it is detected
on the next open (no trailing newline / not valid JSON), cut off, and that key simply counts as not
done, so the resumed run recomputes it: nothing is lost and nothing is duplicated.

Heatmaps are stored next to the JSONL file as compressed ``.npz`` files written atomically
(temporary file in the same directory, ``fsync``, ``os.replace``); the record that points at a
heatmap is appended only after the file is in place, so a record never names a missing file.

Every record carries ``sample_fingerprint`` (:func:`sample_fingerprint`): what identifies the sample's
content (image path relative to the data root, the file's size and SHA-256, finding, expert boxes,
question, answer text and source). The key alone does not identify a sample (an index shifts when a
row is added to the data, another ``--data-root`` holds other films, a film is overwritten in place),
so a resumed run compares the fingerprints (:func:`fingerprint_differences`) before serving a record.

Only one process may append to a store file at a time (an exclusive ``flock`` on ``<file>.lock``);
shards of a run write separate files and are combined with :func:`merge_stores`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medfocus.errors import ConfigError, DataError
from medfocus.evaluation.records import KEY_FIELDS, Key, read_prediction_records, record_key
from medfocus.io.atomic import atomic_save_npz
from medfocus.io.jsonl import append_jsonl, iter_jsonl, read_jsonl, trim_partial_tail
from medfocus.io.locks import acquire_lock, remove_orphaned_tmp
from medfocus.io.paths import FINGERPRINT_FIELD, file_sha256, safe_filename

__all__ = ["ResultStore", "load_results", "merge_stores", "record_key", "key_slug", "to_jsonable", "atomic_save_npz",
           "read_jsonl", "iter_jsonl", "KEY_FIELDS", "Key", "FINGERPRINT_FIELD", "sample_fingerprint", "file_sha256",
           "fingerprint_differences", "describe_sample_conflicts"]


#: What a record written before fingerprints were recorded says in a refusal.
NO_FINGERPRINT = ("carries no sample fingerprint (written before fingerprints were recorded): "
                  "cannot verify that it was computed on this sample")

def _display_path(path: str, root: str | os.PathLike[str] | None) -> str:
    """``path`` relative to ``root`` when it lies under it (so a moved data root keeps its keys), else as given."""
    if root is not None:
        try:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        except ValueError:  # another drive
            return str(path)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return rel
    return str(path)


def sample_fingerprint(image_path: str, *, finding: str | None, gt_answer: str | None, gt_boxes: Sequence[Sequence[float]],
                       question: str, answer: str | None, answer_source: str | None,
                       root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What identifies the sample behind a result record (stored as its ``sample_fingerprint``).

    Args:
        image_path: the film's file (its bytes are hashed, :func:`file_sha256`).
        finding: the finding named in the question. gt_answer: ``"Yes"`` / ``"No"`` / ``None``.
        gt_boxes: expert boxes ``(x1, y1, x2, y2)``, original pixels.
        question: the full prompt (stem + mode instruction).
        answer: the attributed answer text when it is given before the run (a split's record, the
            caller's text, the ground truth); ``None`` when the model generates it in the run.
        answer_source: where the answer comes from (``split``, ``given``, ``model``, ``ground_truth``).
        root: the data root; the image path is stored relative to it when the film lies under it.
    Returns:
        ``{"image", "image_bytes", "image_sha256", "finding", "gt_answer", "gt_boxes", "question", "answer",
        "answer_source"}`` (plain JSON; ``image_bytes``/``image_sha256`` are ``None`` for a missing file,
        whose read then fails as an error record).
    """
    h = file_sha256(image_path)
    return {
        "image": _display_path(str(image_path), root),
        "image_bytes": None if h is None else h[0],
        "image_sha256": None if h is None else h[1],
        "finding": finding,
        "gt_answer": gt_answer,
        "gt_boxes": [[float(v) for v in b] for b in gt_boxes],
        "question": question,
        "answer": answer,
        "answer_source": answer_source,
    }


def _image_desc(fp: Mapping[str, Any]) -> str:
    sha = fp.get("image_sha256")
    return f"{fp.get('image')} (" + (f"sha256 {sha[:12]}, {fp.get('image_bytes')} bytes)" if sha else "missing file)")


def fingerprint_differences(stored: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """What differs between a stored record's fingerprint and the current sample's, e.g.
    ``["image n01.jpg (sha256 ab12.., 5120 bytes) -> a00.jpg (sha256 cd34.., 4960 bytes)", "gt_boxes: [...] -> [...]"]``;
    empty when they match. A missing stored fingerprint (``None``) is one difference, :data:`NO_FINGERPRINT`."""
    if not isinstance(stored, Mapping):
        return [NO_FINGERPRINT]
    diffs = []
    if any(stored.get(k) != now.get(k) for k in ("image", "image_bytes", "image_sha256")):
        diffs.append(f"image {_image_desc(stored)} -> {_image_desc(now)}")
    for k in sorted((set(stored) | set(now)) - {"image", "image_bytes", "image_sha256"}):
        if stored.get(k) != now.get(k):
            diffs.append(f"{k}: {stored.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}")
    return diffs


def describe_sample_conflicts(conflicts: Mapping[tuple, Sequence[str]], limit: int = 20) -> str:
    """Lines ``"  model 'demo', vindr_cxr #0 direct (gradcam, occlusion): image a -> b; finding: ..."`` of
    ``{(model, dataset, index, mode, differences): [methods]}``, at most ``limit`` (then a count)."""
    def order(kv: tuple) -> tuple:
        mo, ds, idx, mode = kv[0][:4]
        return (str(mo), str(ds), int(idx), str(mode))

    lines = [f"  model {mo!r}, {ds} #{idx} {mode} ({', '.join(ms)}): {'; '.join(d)}"
             for (mo, ds, idx, mode, d), ms in sorted(conflicts.items(), key=order)]
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... and {len(lines) - limit} more samples"]
    return "\n".join(lines)


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
        self._fh = open(self.path, "ab")

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
        if self._fh is None:
            raise ConfigError(f"result store {self.path} is closed")
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
    """Sample differences between two records of one key (none when neither carries a fingerprint)."""
    a, b = kept.get(FINGERPRINT_FIELD), new.get(FINGERPRINT_FIELD)
    if a is None and b is None:
        return []
    if b is None:
        return ["the shard record " + NO_FINGERPRINT]
    return fingerprint_differences(a, b)


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
