"""Sample fingerprints: what identifies the sample behind a stored result, a split-log row or a cache entry.

A key such as ``(model, dataset, index, mode)`` does not identify a sample: an index shifts when a row
is added to the annotations, another ``--data-root`` holds other films, a film is overwritten in place.
:func:`sample_fingerprint` records what does (the film's path relative to the data root, its size and
SHA-256, finding, expert boxes, question, answer); :func:`fingerprint_differences` names what changed
between a stored fingerprint and the current sample. One home for the result store of
``medfocus attribute`` (:mod:`medfocus.runner.store`), ``medfocus explain`` and the benchmark builder's
split logs, edit cache and generation cache (:mod:`medfocus.bench.build`). :func:`file_sha256` hashes
each film once per process (cached by path, size, modification/change time and inode).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Mapping, Sequence

from medfocus.errors import ConfigError

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

# sha256 per (path, size, mtime, ctime, inode): a film shared by several models, modes and methods of a
# run is hashed once; any rewrite of the file changes its ctime and so misses the cache. File times
# tick coarsely (a kernel jiffy), so a rewrite right after hashing could keep the same times: a file
# changed less than _SETTLE_NS before it was hashed is not cached (hashed again on the next call),
# the "racily clean" rule of git's index.
_HASHES: dict[tuple, str] = {}
_SETTLE_NS = 2_000_000_000


def file_sha256(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """``(size in bytes, sha256 hex digest)`` of a file's bytes; ``None`` when it is not a readable file.

    Cached within the process per path, size, modification and change time and inode, so the
    same film is read once per run however many methods use it (a file written in the last two
    seconds is hashed on every call: its times may not change on a rewrite within the same tick)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    ck = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    digest = _HASHES.get(ck)
    if digest is None:
        try:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError:
            return None
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLE_NS:
            _HASHES[ck] = digest
    return st.st_size, digest


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
