"""Heatmap -> boxes, box rasterisation, and exact areas of unions of axis-aligned boxes.

All boxes are ``(x1, y1, x2, y2)`` half-open pixel edges (a component over columns 3..5 has
``x1 = 3, x2 = 6``); float coordinates are allowed everywhere.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from medfocus.types import Box

__all__ = ["heatmap_to_boxes", "normalize_heatmap", "boxes_to_mask", "union_area", "clean_boxes"]


def normalize_heatmap(heatmap: np.ndarray) -> np.ndarray | None:
    """Min-max normalise a heatmap to [0, 1] (float64).

    Non-finite entries (NaN, +-inf) are ignored for the range and set to 0 in the result.
    Returns ``None`` for a map without information: empty, no finite value, or constant.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    if h.size == 0:
        return None
    finite = np.isfinite(h)
    if not finite.any():
        return None
    lo, hi = float(h[finite].min()), float(h[finite].max())
    if not hi > lo:
        return None
    out = np.zeros_like(h)
    out[finite] = (h[finite] - lo) / (hi - lo)
    return out


def heatmap_to_boxes(heatmap: np.ndarray, q: float = 0.9, min_area: int = 16, max_boxes: int = 10) -> list[Box]:
    """Turn an attribution heatmap into ranked boxes.

    Steps: min-max normalise to [0, 1]; threshold at the ``q``-quantile of the strictly positive
    normalised values (pixels ``>=`` the threshold are kept); 8-connected components
    (``scipy.ndimage.label``); drop components with fewer than ``min_area`` pixels; rank the rest by
    their mean normalised heat (ties: larger area first, then top-left first); keep ``max_boxes``.

    Args:
        heatmap: ``(H, W)`` real array in image pixels; the result is invariant to ``a * h + b``
            with ``a > 0`` (min-max normalisation removes scale and offset).
        q: quantile in [0, 1] of the positive normalised values used as threshold.
        min_area: minimum component size in pixels.
        max_boxes: maximum number of boxes returned (``<= 0`` returns none).

    Returns:
        Tight half-open boxes ``(x1, y1, x2, y2)`` in the heatmap's pixels, best first.
        A map without information — empty, all-NaN, constant (all-zero included) — gives ``[]``;
        NaN/inf entries get the lowest heat (0 after normalisation). A map whose components are all
        below ``min_area`` also gives ``[]``.
    """
    h = np.asarray(heatmap)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {h.shape}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    norm = normalize_heatmap(h)
    if norm is None or max_boxes <= 0:
        return []
    positive = norm[norm > 0]
    if positive.size == 0:  # pragma: no cover - impossible after min-max of a non-constant map
        return []
    thr = float(np.quantile(positive, q))
    mask = (norm >= thr) & (norm > 0)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(norm), labels, idx)
    means = ndimage.mean(norm, labels, idx)
    slices = ndimage.find_objects(labels)
    comps = []
    for k in range(n):
        if areas[k] < min_area:
            continue
        ys, xs = slices[k]
        comps.append((-float(means[k]), -float(areas[k]), ys.start, xs.start, (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))))
    comps.sort(key=lambda c: c[:4])
    return [c[4] for c in comps[:max_boxes]]


def clean_boxes(boxes: Iterable[Sequence[float]] | None) -> np.ndarray:
    """``(N, 4)`` float64 array of the boxes with positive area (degenerate or non-finite ones dropped).

    Raises:
        ValueError: a box does not have 4 coordinates.
    """
    rows = []
    for b in boxes or []:
        b = [float(v) for v in b]
        if len(b) != 4:
            raise ValueError(f"a box must be (x1, y1, x2, y2), got {b}")
        if all(np.isfinite(b)) and b[2] > b[0] and b[3] > b[1]:
            rows.append(b)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _cell_cover(boxes: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean ``(ny-1, nx-1)`` grid: is each elementary cell of the compressed grid inside any box."""
    if len(boxes) == 0:
        return np.zeros((len(ys) - 1, len(xs) - 1), dtype=bool)
    cx = (xs[:-1] + xs[1:]) / 2.0
    cy = (ys[:-1] + ys[1:]) / 2.0
    inx = (cx[None, :] > boxes[:, 0:1]) & (cx[None, :] < boxes[:, 2:3])  # (N, nx-1)
    iny = (cy[None, :] > boxes[:, 1:2]) & (cy[None, :] < boxes[:, 3:4])  # (N, ny-1)
    return np.einsum("ny,nx->yx", iny.astype(np.int32), inx.astype(np.int32)) > 0


def union_area(boxes: Iterable[Sequence[float]]) -> float:
    """Exact area of the union of boxes (overlaps counted once), by coordinate compression."""
    b = clean_boxes(boxes)
    if len(b) == 0:
        return 0.0
    xs = np.unique(np.concatenate([b[:, 0], b[:, 2]]))
    ys = np.unique(np.concatenate([b[:, 1], b[:, 3]]))
    cover = _cell_cover(b, xs, ys)
    return float((np.diff(ys)[:, None] * np.diff(xs)[None, :])[cover].sum())


def boxes_to_mask(boxes: Iterable[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise boxes onto an ``(H, W)`` boolean mask: pixel ``(r, c)`` (covering ``[c, c+1) x [r, r+1)``)
    is inside when its centre ``(c + 0.5, r + 0.5)`` lies in a box (exact for integer boxes)."""
    H, W = int(shape[0]), int(shape[1])
    mask = np.zeros((H, W), dtype=bool)
    cx = np.arange(W) + 0.5
    cy = np.arange(H) + 0.5
    for x1, y1, x2, y2 in clean_boxes(boxes):
        cols = (cx >= x1) & (cx < x2)
        rows = (cy >= y1) & (cy < y2)
        mask |= rows[:, None] & cols[None, :]
    return mask
