"""Per-record evaluation of prediction records (the JSONL that the runner writes).

Record schema (one JSON object per line)::

    {"model", "dataset", "index", "mode", "method",
     "gt_boxes": [[x1, y1, x2, y2], ...],      # original-image pixels, half-open
     "image_size": [W, H],                     # of the original image; required with a heatmap
     "pred_boxes": [[...], ...],               # optional when heatmap_path is given
     "heatmap_path": "rel/or/abs.npy|.npz",    # optional; relative to the JSONL's folder
     "unparseable": false,                     # optional; true: box text no rule could read
     "error": null | "message",
     ...extra fields, ignored}

Protocol: when ``pred_boxes`` is present it is scored as given (prompting methods, MedFocus' winning
box); otherwise the boxes come from the heatmap through :func:`heatmap_to_boxes`. The heatmap, when
there is one, also gives the pointing game (tie-aware: a maximal plateau scores the share of it inside
the GT boxes, see :func:`~medfocus.evaluation.metrics.pointing_game`), energy pointing game and AUPRC
(else those are NaN).
A heatmap whose shape differs from ``image_size`` is resized (bilinear) to ``(H, W)`` first -- only when it
can be a resampling of that frame (:func:`map_fits_frame`: the same aspect ratio up to rounding each side to
whole pixels); a transposed map or a square canvas map of a non-square film is an error row naming the record,
both shapes and the expected frame, never stretched.

Frame: ``image_size`` (``[W, H]`` of the original image, the frame of ``gt_boxes``) is what puts a
heatmap in the GT frame; a map's own shape (a 16x16 token grid, a 224x224 model canvas) says nothing
about the original image. So a record with a heatmap and no ``image_size`` is an error row naming the
record and the field -- never boxes and a pointing game in the map's frame. A box-only record
(``pred_boxes`` without a heatmap: same frame as ``gt_boxes`` by contract) without ``image_size`` is
scored as given but cannot be clipped: its row has ``unclipped = True`` and :func:`evaluate_records`
issues one :class:`~medfocus.errors.DataWarning` counting such records and naming the first.

With ``image_size``, GT and predicted boxes are clipped to the image before scoring (a predicted box
empty after clipping is dropped; the counts are the row's ``n_gt_clipped`` / ``n_pred_clipped``). GT
boxes that are inverted (``x2 < x1`` or ``y2 < y1``) or non-finite, or that all lie outside the
image, make the row an error naming the record; they are never scored. Inverted predicted boxes likewise
(malformed output, not a miss), and predicted boxes that all lie within the ``[0, 1]`` pixel square of a
film of at least :data:`RELATIVE_UNIT_MIN_SIDE` px per side (relative coordinates given as pixels).
A record with an ``error`` (or one that cannot be evaluated: missing heatmap file, malformed boxes)
yields a row with NaN metrics and the error text; tables exclude it from means and count it.
A record without GT boxes (a negative sample) has no region to localise: NaN metrics, ``source =
"no_gt"``, no error; tables leave it out. A record with ``"unparseable": true`` (the model's box text
could not be read, :mod:`medfocus.lvlm.box_text`) is not scored as an empty prediction: NaN metrics,
``source = "unparseable"``; tables leave it out of the means and count it (``n_unparseable``).
A record whose attributed answer is wrong (``answer_parsed`` != ``gt_answer``: an unfiltered run attributes
the model's own answer, e.g. a "No" on a film with the finding) is scored like any other against the expert
boxes; its row has ``answer_correct = False`` and tables count it (``n_wrong_answer``);
:func:`correct_only` keeps only correct answers (``evaluate --correct-only``).

Faithfulness: ``deletion_auc`` / ``insertion_auc`` are not computed here (they need the model; see
:mod:`medfocus.evaluation.faithfulness`): a record that carries them (runner ``--faithfulness``, or
``medfocus evaluate --faithfulness --model``) passes them through, and :func:`evaluate_records` adds
one row per sample for each reference map (method ``"reference: random map"`` / ``"reference:
expert-box map"``) so tables read a method's numbers against both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from medfocus.datasets._common import check_box, clip_boxes, parse_box_text
from medfocus.datasets.medground import check_sample_index
from medfocus.errors import DataError
from medfocus.evaluation.boxes import heatmap_to_boxes
from medfocus.evaluation.metrics import auprc, energy_pointing_game, pointing_game, union_box_metrics
from medfocus.io.jsonl import NotJSONLinesError, latest_by_key, read_jsonl_numbered
from medfocus.io.paths import record_label

__all__ = ["evaluate_records", "evaluate_record", "answer_correct", "correct_only", "read_prediction_records", "read_prediction_files", "record_key", "KEY_FIELDS",
           "load_heatmap", "map_fits_frame", "IMAGE_RELATIVE", "METRIC_COLUMNS", "KEY_COLUMNS", "RELATIVE_UNIT_MIN_SIDE"]

KEY_COLUMNS = ("model", "dataset", "mode", "method", "index")
METRIC_COLUMNS = ("iou", "f1", "precision", "recall", "pointing_game", "energy_pg", "auprc", "deletion_auc", "insertion_auc")


Key = tuple[str, str, int, str, str]
"""``(model, dataset, index, mode, method)``: one result record per key in a result file."""

KEY_FIELDS: tuple[str, ...] = ("model", "dataset", "index", "mode", "method")


def record_key(record: Mapping[str, Any], *, where: str = "result record") -> Key:
    """The key of a result record.

    ``index`` must be a non-negative integer (:func:`medfocus.datasets.medground.check_sample_index`):
    ``"0"``, ``1.7`` or ``true`` would silently name another record's sample, so they are refused.

    Raises:
        DataError: naming ``where`` and the missing or malformed field.
    """
    missing = [k for k in KEY_FIELDS if k not in record]
    if missing:
        raise DataError(f"{where} lacks key field {missing[0]!r}; expected fields {KEY_FIELDS}")
    index = check_sample_index(record["index"], where=where)
    return (str(record["model"]), str(record["dataset"]), index, str(record["mode"]), str(record["method"]))


def read_prediction_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a result file (a store or a prediction JSONL), the one rule for every reader.

    Read by :func:`medfocus.io.jsonl.read_jsonl_numbered` (an interrupted last line is ignored, a
    damaged complete line raises), then one record per key, the *last* written (a record written by
    ``--retry-errors`` replaces the error it retries), in the order keys first appear. Each record
    gets ``_base_dir`` (the file's folder, for relative heatmap paths) and ``_where`` (file and line).

    Raises:
        DataError: missing file, a damaged line (not UTF-8, not JSON, nested too deeply, not an object)
            or a record without a key field (naming file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prediction file {p} not found")
    try:
        numbered, _ = read_jsonl_numbered(p)
    except NotJSONLinesError as exc:
        # the file beside the results most often mistaken for them: a benchmark split
        raise DataError(f"{exc}: expected prediction records (the predictions.jsonl that `medfocus attribute` writes, "
                        "one record per line); a JSON list is what `medfocus bench build` writes as a split") from None
    for lineno, rec in numbered:
        rec.setdefault("_base_dir", str(p.parent))
        rec.setdefault("_where", f"{p} line {lineno}")
    latest = latest_by_key((rec for _, rec in numbered), lambda rec: record_key(rec, where=str(rec["_where"])))
    return list(latest.values())


def _content(record: Mapping[str, Any]) -> str:
    """A record's content for comparing copies across files: every field but the reader's ``_`` fields, with
    ``heatmap_path`` resolved (a merged store names the shards' ``.npz`` files by another relative path)."""
    import json

    out = {k: v for k, v in record.items() if not str(k).startswith("_")}
    hp = out.get("heatmap_path")
    if hp:
        p = Path(str(hp))
        if not p.is_absolute():
            p = Path(str(record.get("_base_dir") or ".")) / p
        out["heatmap_path"] = str(p.resolve())
    return json.dumps(out, sort_keys=True, default=str)


def read_prediction_files(paths: Iterable[str | os.PathLike]) -> tuple[list[dict[str, Any]], str | None]:
    """The records of several result files, each key (:func:`record_key`) counted once.

    Each file is read by :func:`read_prediction_records` (within a file the last record of a key wins).
    Across files a key must not be counted twice -- ``evaluate run/predictions.jsonl
    run/predictions.shard-*.jsonl`` after a merge, or one file given twice, would double ``n`` and shrink
    every interval. So a record whose key an earlier file already holds is

    * dropped when its content is the same (every field but the reader's, ``heatmap_path`` compared as the
      file it names): the returned note counts these per pair of files;
    * an error when its content differs: nothing says which of two results is the one to score (the merge,
      ``medfocus merge``, decides that per key with its documented rule; pass its output alone).

    Returns:
        ``(records, note)``: the records in file order (first appearance of each key), and one line
        counting the collapsed duplicates and naming their files (``None`` when there were none).

    Raises:
        DataError: what :func:`read_prediction_records` raises, or two files holding different records
            under one key (naming both files, the number of keys, the first keys and their differing fields).
    """
    seen: dict[Key, tuple[dict[str, Any], str]] = {}
    records: list[dict[str, Any]] = []
    dups: dict[tuple[str, str], int] = {}
    conflicts: dict[tuple[str, str], list[tuple[Key, list[str]]]] = {}
    for path in paths:
        name = str(path)
        for rec in read_prediction_records(path):
            key = record_key(rec)
            prev = seen.get(key)
            if prev is None:
                seen[key] = (rec, name)
                records.append(rec)
                continue
            pair = (prev[1], name)
            if _content(prev[0]) == _content(rec):
                dups[pair] = dups.get(pair, 0) + 1
                continue

            def one(r: Mapping[str, Any], k: str) -> str:
                return _content({k: r.get(k), "_base_dir": r.get("_base_dir")})

            fields = sorted(k for k in set(prev[0]) | set(rec) if not str(k).startswith("_") and one(prev[0], k) != one(rec, k))
            conflicts.setdefault(pair, []).append((key, fields))
    if conflicts:
        lines = []
        for (a, b), hits in conflicts.items():
            shown = "; ".join(f"{m}/{d}#{i} {mo} {me} (differs in {', '.join(f[:4])})" for (m, d, i, mo, me), f in hits[:5])
            more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
            lines.append(f"  {a} and {b}: {len(hits)} key(s) with different records: {shown}{more}")
        raise DataError("the prediction files hold different records under the same (model, dataset, index, mode, method) "
                        "key, so it is unclear which to score:\n" + "\n".join(lines) + "\nPass each result once (e.g. only "
                        "the merged predictions.jsonl, not also its shard files), or merge them first (`medfocus merge`).")
    note = None
    if dups:
        parts = [f"{n} of {b} " + ("(the same file given twice)" if Path(a).resolve() == Path(b).resolve() else f"already in {a}")
                 for (a, b), n in dups.items()]
        note = (f"{sum(dups.values())} duplicate record(s) (same key and content in more than one file) counted once: "
                + "; ".join(parts))
    return records, note


def map_fits_frame(shape: tuple[int, int], W: int, H: int) -> bool:
    """Whether a ``(h, w)`` map can be the ``W x H`` image resampled at one scale, each side rounded.

    A stored map is in the original frame (``(H, W)``) or a resampling of it that keeps the aspect ratio up
    to rounding -- the working-resolution cap (:class:`medfocus.io.letterbox.WorkFrame`) scales both sides by
    one factor ``s`` and rounds each to whole pixels. So the map fits when one ``s`` gives
    ``|W s - w| < 1`` and ``|H s - h| < 1``. A transposed map, or a square canvas / token-grid map of a
    non-square film, does not: stretched onto the image it would give a plausible, wrong score.
    """
    h, w = int(shape[0]), int(shape[1])
    lo = max((w - 1) / W, (h - 1) / H)
    hi = min((w + 1) / W, (h + 1) / H)
    return lo < hi


#: ``heatmap_frame`` of an in-memory map defined on the image-relative unit square (the trivial baselines'
#: finding prior and random grid): resized onto the image whatever its aspect ratio, since stretching *is*
#: its definition. Honoured only for an in-memory ``heatmap`` (a stored map is always checked by :func:`map_fits_frame`).
IMAGE_RELATIVE = "image-relative"


#: On a film whose shorter side has at least this many pixels, predicted boxes that all lie inside the
#: [0, 1] pixel square are almost certainly relative (0-1) coordinates, not pixels: a box of at most one
#: pixel in the image corner is no localisation any method outputs, while a relative box always lies
#: there. (Smaller films are left alone: on a 2x2 image such a box is a plausible quarter.)
RELATIVE_UNIT_MIN_SIDE = 32


def load_heatmap(path: str | os.PathLike, *, required: bool = True) -> np.ndarray | None:
    """Load an ``(H, W)`` heatmap from ``.npy`` or ``.npz`` (array ``heatmap``, or the only array).

    An ``.npz`` without a ``heatmap`` array and with several others (e.g. only per-token maps of a
    box-output method) has no heatmap: ``None`` when not ``required``, else a DataError.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"heatmap file {p} not found")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "heatmap" in z.files:
                    key = "heatmap"
                elif len(z.files) == 1:
                    key = z.files[0]
                elif required:
                    raise DataError(f"{p}: no array named 'heatmap' (has {sorted(z.files)})")
                else:
                    return None
                arr = z[key]
        else:
            arr = np.load(p, allow_pickle=False)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot load heatmap ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{p}: heatmap must be 2-D (H, W), got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def _boxes(value: Any, where: str, field: str) -> list[tuple[float, float, float, float]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field {field!r} must be a list of [x1, y1, x2, y2], got {type(value).__name__}")
    out = []
    for b in value:
        if not isinstance(b, (list, tuple)):
            raise DataError(f"{where}: field {field!r} must be a list of [x1, y1, x2, y2], got element {b!r}")
        out.append(parse_box_text(b, where=where, field=field))  # 4 finite numbers, same rule as the loaders
    return out


def _resize_to(hm: np.ndarray, W: int, H: int) -> np.ndarray:
    from medfocus.io.letterbox import _resize

    if hm.shape == (H, W):
        return hm
    return _resize(np.nan_to_num(hm.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0), W, H)


def evaluate_record(
    record: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    q: float = 0.9,
    min_area: int = 16,
    max_boxes: int = 10,
) -> dict[str, Any]:
    """Metrics of one prediction record (see module docstring). Never raises for bad records:
    the problem is returned in the ``error`` field with NaN metrics."""
    row: dict[str, Any] = {k: record.get(k) for k in KEY_COLUMNS}
    row["attribute"] = record.get("attribute")  # the finding asked about (per-finding tables)
    row.update({m: math.nan for m in METRIC_COLUMNS})
    row.update({"n_pred_boxes": 0, "n_gt_clipped": 0, "n_pred_clipped": 0, "unclipped": False,
                "unparseable": bool(record.get("unparseable")), "answer_correct": answer_correct(record), "source": None,
                "error": None})
    where = _record_where(record)
    if record.get("error"):
        row["error"] = str(record["error"])
        return row
    try:
        gt = [check_box(b, where=where, field="gt_boxes") for b in _boxes(record.get("gt_boxes"), where, "gt_boxes")]
        if not gt:
            # A negative sample (answer "No") has no region to find: localisation is undefined, so
            # the row carries NaN metrics and source "no_gt" and is left out of the tables.
            row["source"] = "no_gt"
            return row
        if row["unparseable"]:
            # The model wrote box-like text that no rule reads: not an empty prediction (IoU 0) but a
            # row the tables count separately (NaN metrics, left out of the means).
            row["source"] = "unparseable"
            return row
        heat = None
        if record.get("heatmap") is not None:  # in-memory records (the runner's, or tests)
            heat = np.asarray(record["heatmap"], dtype=np.float32)
        elif record.get("heatmap_path"):
            hp = Path(str(record["heatmap_path"]))
            base = base_dir if base_dir is not None else record.get("_base_dir")
            if not hp.is_absolute() and base is not None:
                hp = Path(base) / hp
            # A method that outputs boxes may store other arrays only: then there is no heatmap.
            heat = load_heatmap(hp, required=record.get("pred_boxes") is None)
        size = record.get("image_size")
        if size is None and heat is not None:
            # The map's shape is its own frame (token grid, model canvas), not the original image's:
            # scoring it against gt_boxes would give a plausible, wrong IoU and pointing game.
            raise DataError(f"{where}: field 'image_size' is missing; a record with a heatmap "
                            f"({heat.shape[0]}x{heat.shape[1]}) needs [W, H] of the original image (the frame of "
                            "gt_boxes) to map the heatmap onto it")
        if size is None:
            # Box-only: same frame as gt_boxes by contract, but nothing to clip to (counted, warned).
            row["unclipped"] = True
        else:
            if not isinstance(size, (list, tuple)) or len(size) != 2:
                raise DataError(f"{where}: field 'image_size' must be [W, H], got {size!r}")
            W, H = int(size[0]), int(size[1])
            if W <= 0 or H <= 0:
                raise DataError(f"{where}: field 'image_size' must be positive, got {size!r}")
            # Only the visible part of a box can be found: GT and predictions are scored inside the image.
            n_gt = len(gt)
            gt, c, d = clip_boxes(gt, (W, H))
            row["n_gt_clipped"] = c + d
            if not gt:
                raise DataError(f"{where}: every one of the {n_gt} gt_boxes lies outside the {W}x{H} image")
            if heat is not None:
                # an in-memory trivial-baseline map (evaluation.baselines) is defined on the image-relative unit
                # square: any grid of it spans the whole image, whatever the film's aspect ratio
                relative = record.get("heatmap") is not None and record.get("heatmap_frame") == IMAGE_RELATIVE
                if not relative and heat.shape != (H, W) and W != H and map_fits_frame(heat.shape, max(W, H), max(W, H)):
                    # coarse enough that rounding admits both this film's aspect and a square: a token-grid or
                    # canvas map of a letterboxed film would look the same (evaluate_records warns, counted)
                    row["_frame_ambiguous"] = True
                if not relative and not map_fits_frame(heat.shape, W, H):
                    raise DataError(
                        f"{where}: heatmap shape {heat.shape[0]}x{heat.shape[1]} (rows x columns) is not the frame of "
                        f"image_size [{W}, {H}]: expected {H}x{W}, or a resampling of it in the same aspect ratio (W/H "
                        f"{W / H:.3f}; this map's {heat.shape[1] / heat.shape[0]:.3f}). A transposed map or a map on the "
                        "model's canvas / token grid would be stretched into a plausible, wrong score; bring it to the "
                        "original image first (medfocus.io.letterbox.Letterbox.map_to_original)")
                heat = _resize_to(heat, W, H)
        if record.get("pred_boxes") is not None:
            # an inverted predicted box is malformed output, refused like an inverted GT box (clipping would
            # silently drop it and score the record as a miss)
            pred = [check_box(b, where=where, field="pred_boxes") for b in _boxes(record.get("pred_boxes"), where, "pred_boxes")]
            if size is not None and min(W, H) >= RELATIVE_UNIT_MIN_SIDE and pred \
                    and all(0.0 <= v <= 1.0 for b in pred for v in b) and any(b[2] > b[0] and b[3] > b[1] for b in pred):
                raise DataError(
                    f"{where}: every pred_boxes coordinate lies within [0, 1] on a {W}x{H} image: relative (0-1) "
                    f"coordinates, not pixels? Boxes are (x1, y1, x2, y2) pixel edges of the original image "
                    f"(multiply relative boxes by [W, H, W, H]); got {[list(b) for b in pred]}")
            if size is not None:
                pred, c, d = clip_boxes(pred, (W, H))
                row["n_pred_clipped"] = c + d
            row["source"] = "boxes"
        elif heat is not None:
            pred = heatmap_to_boxes(heat, q=q, min_area=min_area, max_boxes=max_boxes)
            row["source"] = "heatmap"
        else:
            raise DataError(f"{where}: needs 'pred_boxes' or 'heatmap_path'")
        row["n_pred_boxes"] = len(pred)
        row.update(union_box_metrics(pred, gt))
        for m in ("deletion_auc", "insertion_auc"):
            v = record.get(m)
            if v is not None:
                if not isinstance(v, (int, float)) or not math.isfinite(float(v)) or not 0 <= float(v) <= 1:
                    raise DataError(f"{where}: field {m!r} must be a number in [0, 1], got {v!r}")
                row[m] = float(v)
        if heat is not None:
            row["pointing_game"] = pointing_game(heat, gt)
            row["energy_pg"] = energy_pointing_game(heat, gt)
            row["auprc"] = auprc(heat, gt)
    except (DataError, ValueError, TypeError) as exc:
        row.update({m: math.nan for m in METRIC_COLUMNS})
        row["error"] = str(exc)
    return row


def answer_correct(record: Mapping[str, Any]) -> bool | None:
    """Whether the attributed answer states the ground truth: ``answer_parsed`` (the runner's yes/no reading
    of the answer it attributed) equals ``gt_answer`` (case-insensitive). An unreadable answer
    (``answer_parsed`` null) with a known ``gt_answer`` is not correct. ``None`` -- unknown -- when the record
    carries no ``answer_parsed`` field or no ``gt_answer`` (hand-made records).

    An unfiltered ``attribute`` run attributes the model's own answer, right or wrong: a wrong "No" is
    still scored against the expert boxes of the finding, so tables count such rows (``n_wrong_answer``)
    and ``evaluate --correct-only`` / ``report --correct-only`` score only correct answers.
    """
    if "answer_parsed" not in record or record.get("gt_answer") is None:
        return None
    parsed = record.get("answer_parsed")
    return parsed is not None and str(parsed).strip().lower() == str(record["gt_answer"]).strip().lower()


def correct_only(records: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """The records whose answer states the ground truth (:func:`answer_correct`) and how many were left out.

    Raises:
        DataError: a record whose correctness is unknown (no ``answer_parsed`` or ``gt_answer``): counted,
            the first named -- "correct only" cannot be decided for it, and dropping it silently would
            change the table as much as scoring it.
    """
    recs = list(records)
    unknown = [r for r in recs if answer_correct(r) is None]
    if unknown:
        raise DataError(f"--correct-only: {len(unknown)} of {len(recs)} records carry no 'answer_parsed' and 'gt_answer' "
                        f"(first: {_record_where(unknown[0])}), so whether their answer is correct is unknown; "
                        "score them without --correct-only")
    kept = [r for r in recs if answer_correct(r)]
    return kept, len(recs) - len(kept)


def _record_where(record: Mapping[str, Any]) -> str:
    """How messages name a record: its file and line (``_where``, when read from a file) and its key."""
    name = record_label(record)
    return f"{record['_where']}: {name}" if record.get("_where") else name


def _warn_unclipped(records: list[Mapping[str, Any]], rows: list[dict[str, Any]]) -> None:
    """One DataWarning for the scored rows of box-only records without ``image_size`` (none: silent)."""
    hit = [i for i, row in enumerate(rows) if row["unclipped"] and row["error"] is None and row["source"] == "boxes"]
    if not hit:
        return
    import warnings

    from medfocus.errors import DataWarning

    where = _record_where(records[hit[0]])
    n_scored = sum(1 for row in rows if row["error"] is None and row["source"] == "boxes")
    warnings.warn(f"{len(hit)} of {n_scored} box-only records have no 'image_size' [W, H]: their gt_boxes and pred_boxes "
                  f"were scored as given, not clipped to the image (records.csv column 'unclipped'; first: {where})",
                  DataWarning, stacklevel=3)


def _warn_ambiguous_frames(records: list[Mapping[str, Any]], rows: list[dict[str, Any]]) -> None:
    """One DataWarning for scored maps whose shape cannot tell this film's frame from a square one (none: silent)."""
    hit = [i for i, row in enumerate(rows) if row.get("_frame_ambiguous") and row["error"] is None]
    if not hit:
        return
    import warnings

    from medfocus.errors import DataWarning

    first = records[hit[0]]
    size = first.get("image_size")
    warnings.warn(f"{len(hit)} heatmaps were resized onto non-square films although their shape is also that of a "
                  f"square map (first: {_record_where(first)}, image_size {list(size) if size else size}): at that "
                  "resolution rounding cannot tell the film's aspect ratio from a square, so a token-grid or canvas map "
                  "of a letterboxed film would be stretched the same way -- store maps in the original frame "
                  "(medfocus.io.letterbox.Letterbox.map_to_original) to be sure they are scored where they point",
                  DataWarning, stacklevel=3)


def evaluate_records(
    records: Iterable[Mapping[str, Any]],
    *,
    base_dir: str | os.PathLike | None = None,
    q: float = 0.9,
    min_area: int = 16,
    max_boxes: int = 10,
    progress: bool = False,
) -> pd.DataFrame:
    """Evaluate prediction records; one row per record.

    Args:
        records: dicts in the prediction schema (from :func:`read_prediction_records` or the runner).
            ``heatmap`` (an in-memory array) may replace ``heatmap_path``.
        base_dir: folder that relative ``heatmap_path`` values are relative to (default: each
            record's ``_base_dir``, i.e. its JSONL's folder).
        q, min_area, max_boxes: :func:`heatmap_to_boxes` parameters.
        progress: show a tqdm bar.

    Returns:
        DataFrame with columns ``model, dataset, mode, method, index, attribute, iou, f1, precision, recall,
        pointing_game, energy_pg, auprc, deletion_auc, insertion_auc, n_pred_boxes, n_gt_clipped,
        n_pred_clipped, unclipped, unparseable, answer_correct, source, error`` (metrics in [0, 1], NaN when not
        applicable or on error; ``n_*_clipped``: boxes changed or dropped by clipping to ``image_size``;
        ``unclipped``: a box-only record without ``image_size``, scored as given; ``answer_correct``:
        :func:`answer_correct`, True / False / None), plus the reference
        rows of the records' faithfulness fields (``source == "reference"``).

    Warns:
        DataWarning: once, when scored box-only records lack ``image_size`` (their count and the first); once,
            when maps were resized onto non-square films although their shape also fits a square frame (a
            coarse map: 8x8 or 16x16 on a nearly square film), counting them and naming the first.
    """
    recs = list(records)
    it = recs
    if progress:
        from tqdm import tqdm

        it = tqdm(recs, desc="evaluate", unit="rec")
    rows = [evaluate_record(r, base_dir=base_dir, q=q, min_area=min_area, max_boxes=max_boxes) for r in it]
    _warn_unclipped(recs, rows)
    _warn_ambiguous_frames(recs, rows)
    from medfocus.evaluation.faithfulness import reference_rows

    rows += reference_rows(recs)
    cols = list(KEY_COLUMNS) + ["attribute"] + list(METRIC_COLUMNS) + ["n_pred_boxes", "n_gt_clipped", "n_pred_clipped", "unclipped",
                                                                       "unparseable", "answer_correct", "source", "error"]
    return pd.DataFrame(rows, columns=cols)
