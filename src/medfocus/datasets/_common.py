"""Helpers shared by the real-dataset loaders: safe box parsing, header-only image sizes, file checks."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from medfocus.errors import DataError

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_TEXT = re.compile(r"^\s*[\[(]\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,?\s*[\])]\s*$")


def parse_box_text(text: Any, *, where: str, field: str) -> tuple[float, float, float, float]:
    """Parse ``"[x1, y1, x2, y2]"`` (or ``(…)``) into 4 floats — a regex, never ``eval``.

    Args:
        text: the cell value (a string, or already a 4-sequence of numbers).
        where: file / row description for the error message.
        field: column name for the error message.

    Raises:
        DataError: not exactly four finite numbers.
    """
    if isinstance(text, (list, tuple)):
        vals = list(text)
    else:
        m = _BOX_TEXT.match(str(text))
        if not m:
            raise DataError(f"{where}: field {field!r} must be '[x1, y1, x2, y2]' with 4 numbers, got {text!r}")
        vals = [m.group(i) for i in range(1, 5)]
    if len(vals) != 4:
        raise DataError(f"{where}: field {field!r} must hold 4 numbers, got {text!r}")
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: field {field!r} must hold 4 numbers, got {text!r}") from exc
    if not all(math.isfinite(v) for v in out):
        raise DataError(f"{where}: field {field!r} has non-finite values: {text!r}")
    return out  # type: ignore[return-value]


def check_box(box: tuple[float, float, float, float], *, where: str, field: str) -> tuple[float, float, float, float]:
    """Ensure ``x1 <= x2`` and ``y1 <= y2``; raise a DataError naming the field otherwise."""
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise DataError(f"{where}: field {field!r} is not (x1, y1, x2, y2) with x1 <= x2, y1 <= y2: {box}")
    return box


def require_file(path: Path, layout: str) -> Path:
    """Return ``path`` if it is a file, else raise a DataError naming it and the expected layout."""
    if not path.is_file():
        raise DataError(f"missing file {path}; expected layout:\n{layout}")
    return path


def image_size(path: str | os.PathLike, *, layout: str | None = None) -> tuple[int, int]:
    """Original ``(W, H)`` of an image from its header only (:func:`medfocus.io.read_image_size`).

    Raises:
        DataError: missing or unreadable file (with the expected layout when given).
    """
    p = Path(path)
    if not p.is_file():
        msg = f"missing image {p}"
        if layout:
            msg += f"; expected layout:\n{layout}"
        raise DataError(msg)
    from medfocus.io.reader import read_image_size

    return read_image_size(p)


def id_str(value: Any) -> str:
    """String form of an id read by pandas (``10000032`` not ``10000032.0``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    try:
        import numpy as np

        if isinstance(value, np.floating) and float(value).is_integer():
            return str(int(value))
        if isinstance(value, np.integer):
            return str(int(value))
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def load_json(path: Path) -> Any:
    """A JSON file's content, with a :class:`DataError` naming the file on any failure.

    Raises:
        DataError: unreadable, not UTF-8 (naming the byte offset), not valid JSON (naming line and
            column), or nested too deeply to parse (``RecursionError``, never a bare traceback).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte offset {exc.start}); expected UTF-8 JSON") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None


class SizeCache:
    """Memoise header-only image sizes within one loader call (one image has many findings)."""

    def __init__(self, layout: str | None = None) -> None:
        self._cache: dict[Path, tuple[int, int]] = {}
        self._layout = layout

    def __call__(self, path: Path) -> tuple[int, int]:
        if path not in self._cache:
            self._cache[path] = image_size(path, layout=self._layout)
        return self._cache[path]


def some(items: Sequence[Any], k: int = 5) -> str:
    """The first ``k`` items joined by ``", "``, with ``" ... and N more"`` when there are more (error messages)."""
    head = ", ".join(str(v) for v in items[:k])
    return head + (f" ... and {len(items) - k} more" if len(items) > k else "")


def missing_images_error(source: Path, missing: Sequence[str], n_films: int, folder: Path, *, layout: str,
                         note: str) -> DataError:
    """One :class:`DataError` for every film of an annotation file that is not on disk.

    Args:
        source: the annotation file; missing: one description per missing film (name and CSV lines), in
            file order; n_films: how many distinct films the file names; folder: where they were looked for;
            layout: the expected layout; note: how files are looked for and how (or whether) a run on the
            films present is possible.
    """
    if len(missing) == n_films:
        head = f"{source}: none of its {n_films} film(s) was found in {folder} (no film found)"
    else:
        head = f"{source}: {len(missing)} of its {n_films} films are missing in {folder}"
    return DataError(f"{head}: {some(missing)}.\n{note}\nexpected layout:\n{layout}")


def first_existing(candidates: Iterable[Path]) -> Path | None:
    for c in candidates:
        if c.is_file():
            return c
    return None


def clip_boxes(boxes: Iterable[tuple[float, float, float, float]], size: tuple[int, int]
               ) -> tuple[list[tuple[float, float, float, float]], int, int]:
    """Clip half-open ``(x1, y1, x2, y2)`` boxes to an image of ``size = (W, H)`` pixels.

    Returns:
        ``(kept, n_clipped, n_dropped)``: the clipped boxes that still have a positive area (input
        order), how many of those were changed by clipping, and how many became empty and were dropped.

    Raises:
        DataError: a non-finite coordinate or a non-positive image size.
    """
    W, H = float(size[0]), float(size[1])
    if not (W > 0 and H > 0):
        raise DataError(f"cannot clip boxes to an image of size {size}")
    kept, n_clipped, n_dropped = [], 0, 0
    for b in boxes:
        if not all(math.isfinite(float(v)) for v in b):
            raise DataError(f"box {tuple(b)} has a non-finite coordinate")
        x1, y1, x2, y2 = (float(v) for v in b)
        c = (min(max(x1, 0.0), W), min(max(y1, 0.0), H), min(max(x2, 0.0), W), min(max(y2, 0.0), H))
        if c[2] <= c[0] or c[3] <= c[1]:
            n_dropped += 1
            continue
        n_clipped += c != (x1, y1, x2, y2)
        kept.append(c)
    return kept, n_clipped, n_dropped


def warn_clipped(dataset: str, n_clipped: int, n_dropped: int, n_boxes: int) -> None:
    """One :class:`~medfocus.errors.DataWarning` per load when :func:`clip_boxes` changed anything
    (silent otherwise)."""
    if n_clipped or n_dropped:
        import warnings

        from medfocus.errors import DataWarning

        warnings.warn(f"{dataset}: {n_clipped} of {n_boxes} expert boxes clipped to the image border, "
                      f"{n_dropped} dropped as empty after clipping", DataWarning, stacklevel=4)


class BoxClipLog:
    """Clip every sample's expert boxes to its image and record what changed, per sample and per dataset.

    Usage in a loader: ``boxes, prov = log.clip(boxes, size, where=..., what=...)`` for each sample (``prov`` goes
    into ``meta["provenance"]``), then ``log.finish(samples)`` adds the dataset totals to every sample's
    provenance and warns once (:func:`warn_clipped`). Provenance keys: ``boxes_clipped``,
    ``boxes_dropped`` (this sample), ``dataset_boxes_clipped``, ``dataset_boxes_dropped`` (the load).
    """

    def __init__(self, dataset: str, *, frame_note: str = "") -> None:
        """``frame_note``: why a film given a ``frame_doubt`` in :meth:`clip` may not be in the boxes' pixel
        frame (e.g. VinDr's boxes are in the original DICOM's pixels, and a PNG copy may be resized)."""
        self.dataset = dataset
        self.frame_note = frame_note
        self.n_boxes = self.n_clipped = self.n_dropped = 0
        self.frame_doubts: list[str] = []

    def clip(self, boxes: list[tuple[float, float, float, float]], size: tuple[int, int] | None, *, where: str,
             what: str, frame_doubt: str | None = None) -> tuple[list[tuple[float, float, float, float]], dict[str, int]]:
        """Clipped boxes and this sample's counts; ``size=None`` (image not read) leaves boxes as they are.

        Args:
            where: the file and rows the boxes come from; what: the sample (image / finding).
            frame_doubt: the film, when its frame is in doubt (e.g. ``".../p01.png (256x256, not a DICOM)"``);
                when a box reaches past it, it is named with the ``frame_note`` in the error, and listed in one
                extra :class:`~medfocus.errors.DataWarning` by :meth:`finish` instead of only counted as clipped.

        Raises:
            DataError: every box of the sample lies outside the image (naming ``where``, ``what``, the size and
                ``frame_doubt``).
        """
        self.n_boxes += len(boxes)
        if size is None:
            return list(boxes), {"boxes_clipped": 0, "boxes_dropped": 0}
        kept, c, d = clip_boxes(boxes, size)
        if boxes and not kept:
            raise DataError(f"{where}: every box of {what} lies outside the {size[0]}x{size[1]} image: {list(boxes)}"
                            + (f"; {frame_doubt}: {self.frame_note}" if frame_doubt else ""))
        if frame_doubt and (c or d) and frame_doubt not in self.frame_doubts:
            self.frame_doubts.append(frame_doubt)
        self.n_clipped += c
        self.n_dropped += d
        return kept, {"boxes_clipped": c, "boxes_dropped": d}

    def finish(self, samples: list) -> list:
        """Add the dataset totals to each sample's ``meta["provenance"]``, warn once (and once more naming
        the films whose frame is in doubt), return ``samples``."""
        for s in samples:
            prov = s.meta.setdefault("provenance", {"boxes_clipped": 0, "boxes_dropped": 0})
            prov.update(dataset_boxes_clipped=self.n_clipped, dataset_boxes_dropped=self.n_dropped)
        if self.frame_doubts:
            import warnings

            from medfocus.errors import DataWarning

            warnings.warn(f"{self.dataset}: expert boxes reach past {len(self.frame_doubts)} film(s) whose pixel frame "
                          f"is in doubt: {some(self.frame_doubts)}. {self.frame_note}", DataWarning, stacklevel=3)
        warn_clipped(self.dataset, self.n_clipped, self.n_dropped, self.n_boxes)
        return samples
