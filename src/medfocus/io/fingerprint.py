"""Sample fingerprints: what identifies the sample behind a stored result, a split-log row or a cache entry.

A key such as ``(model, dataset, index, mode)`` does not identify a sample: an index shifts when a row
is added to the annotations, another ``--data-root`` holds other films, a film is overwritten in place.
:func:`sample_fingerprint` records what does (the film's path relative to the data root, its size and
SHA-256, finding, expert boxes, question, answer); :func:`fingerprint_differences` names what changed
between a stored fingerprint and the current sample. One home for the result store of
``medfocus attribute`` (:mod:`medfocus.runner.store`), ``medfocus explain`` and the benchmark builder's
split logs, edit cache and generation cache (:mod:`medfocus.bench.build`). :func:`file_sha256` hashes
each file once per process (memoized by path, size, modification/change time, inode and device), and
once per change across processes for multi-GB model weights (``persist=True``: a JSON memo in the cache
directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from medfocus.errors import ConfigError, DataWarning
from medfocus.io.atomic import atomic_write_json
from medfocus.io.env import cache_root

__all__ = ["FINGERPRINT_FIELD", "NO_FINGERPRINT", "IDENTITY_FIELDS", "file_sha256", "sample_fingerprint", "sample_identity",
           "fingerprint_differences", "merge_differences", "describe_sample_conflicts", "changed_samples_error"]

#: Record field holding :func:`sample_fingerprint` (also the entries of ``explain.json``'s ``samples``).
FINGERPRINT_FIELD = "sample_fingerprint"

#: What a record written before fingerprints were recorded says in a refusal.
NO_FINGERPRINT = ("carries no sample fingerprint (written before fingerprints were recorded): "
                  "cannot verify that it was computed on this sample")

#: The fields of a :func:`sample_fingerprint` that identify the sample itself, whatever was attributed on it:
#: the film (its path for messages; its size and SHA-256 for the comparison) and the annotations. A benchmark
#: split's records carry them (:func:`sample_identity`), so ``attribute --bench`` can check that the film now
#: at a record's ``(dataset, index)`` is the one the split's answers were given to.
IDENTITY_FIELDS = ("image", "image_bytes", "image_sha256", "finding", "gt_answer", "gt_boxes", "question")

# sha256 per (resolved path, size, mtime, ctime, inode, device): a film shared by several models, modes
# and methods of a run is hashed once; any rewrite of the file changes its ctime (which, unlike mtime,
# no `touch`, `cp -p` or `rsync -t` can set back) and so misses the memo. File times tick coarsely (a
# kernel jiffy), so a rewrite right after hashing could keep the same times: a file changed less than
# _SETTLE_NS before it was hashed is not memoized (hashed again on the next call), the "racily clean"
# rule of git's index; nor is one whose times changed while it was read.
_HASHES: dict[tuple[str, int, int, int, int, int], str] = {}
_SETTLE_NS = 2_000_000_000
#: A file at least this large shows a progress bar while it is hashed (a multi-GB checkpoint takes
#: about as long as reading it from disk once).
PROGRESS_BYTES = 256 * 2**20
_CHUNK = 2**20
#: The persistent memo of :func:`file_sha256` (``persist=True``), in :func:`~medfocus.io.env.cache_root`.
MEMO_NAME = "file_sha256.json"
_MEMO_FORMAT = "medfocus file sha256 memo"
_MEMO_VERSION = 1
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _stat_key(path: str | os.PathLike[str]) -> tuple[str, int, int, int, int, int] | None:
    """``(resolved path, size, mtime_ns, ctime_ns, inode, device)`` of a regular file, ``None`` for anything
    else; raises ``OSError`` when it cannot be stat-ed."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return None
    return os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def _read_sha256(path: str | os.PathLike[str], size: int) -> str:
    """SHA-256 hex digest of the file's bytes, streamed in 1 MiB chunks (a multi-GB checkpoint is never
    held in memory), with a tqdm bar on stderr for a file of :data:`PROGRESS_BYTES` or more."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    bar = None
    if size >= PROGRESS_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                   desc=f"hashing {os.path.basename(path)} (once per file change)")
    try:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
                if bar is not None:
                    bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return h.hexdigest()


def _memo_problem(doc: Any) -> str | None:
    """What makes ``doc`` something other than a memo this version wrote; ``None`` when it is one."""
    if not isinstance(doc, dict) or doc.get("format") != _MEMO_FORMAT or doc.get("version") != _MEMO_VERSION:
        return f"not a version-{_MEMO_VERSION} {_MEMO_FORMAT!r}"
    files = doc.get("files")
    if not isinstance(files, dict):
        return "'files' is not a mapping"
    for name, e in files.items():
        if not (isinstance(e, dict) and set(e) == {*_STAT_FIELDS, "sha256"}
                and all(type(e[k]) is int for k in _STAT_FIELDS)
                and isinstance(e["sha256"], str) and _SHA256_HEX.fullmatch(e["sha256"])):
            return f"entry {name!r} is not {{{', '.join(_STAT_FIELDS)}: int, sha256: 64 hex digits}}"
    return None


def _read_memo(path: Path, *, warn: bool) -> dict[str, dict[str, Any]]:
    """The persistent memo's entries (resolved path -> stat fields and ``sha256``): ``{}`` when there is
    none yet, and ``{}`` with a :class:`~medfocus.errors.DataWarning` naming the file and its defect when
    it cannot be read or is not a memo this version wrote (never trusted in part: it is rebuilt)."""
    problem = None
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        problem = f"unreadable: {exc}"
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        problem = f"not JSON: {exc}"
    else:
        problem = _memo_problem(doc)
    if problem is None:
        return doc["files"]
    if warn:
        warnings.warn(f"{path}: file-digest memo ignored ({problem}); the files are hashed again and the memo "
                      "rewritten", DataWarning, stacklevel=4)
    return {}


def _memo_lookup(key: tuple[str, int, int, int, int, int]) -> str | None:
    """The persisted digest of the file ``key`` describes, when its entry has exactly these stat fields."""
    e = _read_memo(cache_root() / MEMO_NAME, warn=True).get(key[0])
    return e["sha256"] if e is not None and tuple(e[k] for k in _STAT_FIELDS) == key[1:] else None


def _memo_store(key: tuple[str, int, int, int, int, int], digest: str) -> None:
    """Persist ``digest`` under ``key`` (one entry per path; entries of files that no longer exist are
    dropped), written atomically. Concurrent writers may drop each other's new entry: that costs a
    re-hash, never a wrong digest. A memo that cannot be written is a warning, not an error."""
    path = cache_root() / MEMO_NAME
    files = {p: e for p, e in _read_memo(path, warn=False).items() if p != key[0] and os.path.exists(p)}
    files[key[0]] = {**dict(zip(_STAT_FIELDS, key[1:])), "sha256": digest}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": _MEMO_FORMAT, "version": _MEMO_VERSION, "files": files})
    except OSError as exc:
        warnings.warn(f"{path}: cannot write the file-digest memo ({exc}); large files are hashed again "
                      "in the next process", DataWarning, stacklevel=3)


def file_sha256(path: str | os.PathLike[str], *, persist: bool = False) -> tuple[int, str] | None:
    """``(size in bytes, sha256 hex digest)`` of a file's bytes -- all of them, streamed in chunks;
    ``None`` when it is not a readable regular file.

    Memoized within the process per resolved path, size, modification and change time, inode and
    device, so the same film is read once per run however many methods use it. With ``persist`` the
    digest is also kept in ``<cache_root()>/file_sha256.json`` (:func:`~medfocus.io.env.cache_root`:
    ``$MEDFOCUS_CACHE`` or ``~/.cache/medfocus``) for later processes: multi-GB checkpoints are read
    once per change, not once per run. The change time (ctime) is what makes this sound: every write
    and every ``utime`` sets it to the current time, and nothing short of changing the system clock
    sets it back, so a same-size rewrite with its modification time restored (``cp -p``, ``rsync -t``,
    an unpacked archive, ``os.utime``) misses the memo. A file changed within two seconds of the call,
    or while it was read, is not memoized (file times tick coarsely: a rewrite within the same tick
    could keep them). The memo is JSON, written atomically; one that cannot be read or is not one this
    version wrote is ignored with a :class:`~medfocus.errors.DataWarning` and rewritten.
    """
    now = time.time_ns()
    try:
        key = _stat_key(path)
    except OSError:
        return None
    if key is None:
        return None
    digest = _HASHES.get(key)
    if digest is None and persist:
        digest = _memo_lookup(key)
        if digest is not None:
            _HASHES[key] = digest
    if digest is None:
        try:
            digest = _read_sha256(path, key[1])
            after = _stat_key(path)
        except OSError:
            return None
        if after == key and now - max(key[2], key[3]) > _SETTLE_NS:
            _HASHES[key] = digest
            if persist:
                _memo_store(key, digest)
    return key[1], digest


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


def sample_identity(fingerprint: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The :data:`IDENTITY_FIELDS` of a :func:`sample_fingerprint` (``None`` for ``None``): what a benchmark
    split's record stores about its sample (``bench build``'s ``make_record``), without what the split's
    generation and editing depended on (answer source, editor inputs)."""
    if not isinstance(fingerprint, Mapping):
        return None
    return {k: fingerprint.get(k) for k in IDENTITY_FIELDS}


def _image_desc(fp: Mapping[str, Any]) -> str:
    sha = fp.get("image_sha256")
    return f"{fp.get('image')} (" + (f"sha256 {sha[:12]}, {fp.get('image_bytes')} bytes)" if sha else "missing file)")


def fingerprint_differences(stored: Mapping[str, Any] | None, now: Mapping[str, Any], *,
                            fields: Sequence[str] | None = None) -> list[str]:
    """What differs between a stored record's fingerprint and the current sample's, e.g.
    ``["image n01.jpg (sha256 ab12.., 5120 bytes) -> a00.jpg (sha256 cd34.., 4960 bytes)", "gt_boxes: [...] -> [...]"]``;
    empty when they match. A missing stored fingerprint (``None``) is one difference, :data:`NO_FINGERPRINT`.

    ``fields``: compare only these (default: every field either side has). Without ``"image"`` among them
    the film is judged by its content alone (``image_bytes``/``image_sha256``: the same bytes under another
    path or data root are the same film), and a changed film reads
    ``"image_sha256: n01.jpg (sha256 ab12.., 5120 bytes) -> n01.jpg (sha256 cd34.., 4960 bytes)"``."""
    if not isinstance(stored, Mapping):
        return [NO_FINGERPRINT]
    film = ("image", "image_bytes", "image_sha256")
    keys = set(stored) | set(now) if fields is None else set(fields)
    diffs = []
    changed = [k for k in film if k in keys and stored.get(k) != now.get(k)]
    if changed:
        label = "image " if "image" in keys else ("image_sha256: " if "image_sha256" in changed else "image_bytes: ")
        diffs.append(f"{label}{_image_desc(stored)} -> {_image_desc(now)}")
    for k in sorted(keys - set(film)):
        if stored.get(k) != now.get(k):
            diffs.append(f"{k}: {stored.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}")
    return diffs


def merge_differences(kept: Mapping[str, Any] | None, new: Mapping[str, Any] | None, *,
                      new_name: str = "the shard record") -> list[str]:
    """Sample differences between two stored fingerprints of one key met while merging files (a merged
    file's and a shard's): none when neither has one (both written before fingerprints were recorded,
    nothing to compare); ``new_name`` + :data:`NO_FINGERPRINT` when only the new one lacks it; else
    :func:`fingerprint_differences`."""
    if kept is None and new is None:
        return []
    if new is None:
        return [f"{new_name} {NO_FINGERPRINT}"]
    return fingerprint_differences(kept, new)


def describe_sample_conflicts(conflicts: Mapping[tuple, Sequence[str]], limit: int = 20) -> str:
    """Lines ``"  model 'demo', vindr_cxr #0 direct (gradcam, occlusion): image a -> b; finding: ..."`` of
    ``{(model, dataset, index, mode, differences): [methods]}``, at most ``limit`` (then a count). An empty
    method list (a benchmark split's row, which has no method) leaves the parenthesis out."""
    def order(kv: tuple) -> tuple:
        mo, ds, idx, mode = kv[0][:4]
        return (str(mo), str(ds), int(idx), str(mode))

    lines = []
    for (mo, ds, idx, mode, d), ms in sorted(conflicts.items(), key=order):
        which = f" ({', '.join(ms)})" if ms else ""
        lines.append(f"  model {mo!r}, {ds} #{idx} {mode}{which}: {'; '.join(d)}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... and {len(lines) - limit} more samples"]
    return "\n".join(lines)


def changed_samples_error(path: str | os.PathLike[str], conflicts: Mapping[tuple, Sequence[str]], *, held: str,
                          note: str = "") -> ConfigError:
    """The refusal of a resumed run whose stored entries (``held``, e.g. ``"results computed"``) were made on
    other samples than its own under the same keys: names the file, each sample and what changed
    (:func:`describe_sample_conflicts`), and the remedies (another ``--out``, or ``--overwrite``; ``note``
    adds a command's own)."""
    return ConfigError(f"{path} holds {held} on other samples under this run's keys (stored -> now):\n"
                       + describe_sample_conflicts(conflicts) + "\nThey are not served. Write this run to another "
                       f"--out, or rerun with --overwrite to recompute them on the current samples{note}.")
