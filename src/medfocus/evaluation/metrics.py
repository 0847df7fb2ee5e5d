"""Localisation metrics of predicted boxes / heatmaps against expert (GT) boxes.

* :func:`union_box_metrics` — the paper's protocol: the predicted region ``P`` is the union of the
  predicted boxes and the GT region ``G`` the union of the GT boxes (overlaps counted once; exact
  areas, float boxes allowed). ``IoU = |P∩G| / |P∪G|``, ``precision = |P∩G| / |P|``,
  ``recall = |P∩G| / |G|``, ``F1 = 2PR / (P + R)``.
* :func:`pointing_game` — 1 if the heatmap's maximum falls inside ``G``; a maximum shared by several
  pixels (a plateau) scores the share of them inside ``G`` (expected hit under random tie-breaking).
* :func:`energy_pointing_game` — share of the positive heat that lies inside ``G``.
* :func:`auprc` — average precision of the pixel scores against the GT mask.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from medfocus.evaluation.boxes import _cell_cover, boxes_to_mask, clean_boxes

__all__ = ["union_box_metrics", "pointing_game", "energy_pointing_game", "cue_pointing", "auprc"]

_ZERO = {"iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def union_box_metrics(pred_boxes: Iterable[Sequence[float]], gt_boxes: Iterable[Sequence[float]]) -> dict[str, float]:
    """IoU, precision, recall and F1 between the union of predicted and the union of GT boxes.

    Args:
        pred_boxes: predicted boxes ``(x1, y1, x2, y2)`` (half-open edges, floats allowed).
        gt_boxes: expert boxes in the same pixel frame.

    Returns:
        ``{"iou", "precision", "recall", "f1"}``, each in [0, 1]. Boxes with zero area are ignored;
        an empty prediction (or empty GT) gives all zeros.
    """
    P = clean_boxes(pred_boxes)
    G = clean_boxes(gt_boxes)
    if len(P) == 0 or len(G) == 0:
        return dict(_ZERO)
    both = np.concatenate([P, G])
    xs = np.unique(np.concatenate([both[:, 0], both[:, 2]]))
    ys = np.unique(np.concatenate([both[:, 1], both[:, 3]]))
    cell = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    in_p = _cell_cover(P, xs, ys)
    in_g = _cell_cover(G, xs, ys)
    a_p = float(cell[in_p].sum())
    a_g = float(cell[in_g].sum())
    inter = float(cell[in_p & in_g].sum())
    union = a_p + a_g - inter
    iou = inter / union if union > 0 else 0.0
    prec = inter / a_p if a_p > 0 else 0.0
    rec = inter / a_g if a_g > 0 else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    clip = lambda v: float(min(max(v, 0.0), 1.0))  # noqa: E731 - guards float rounding only
    return {"iou": clip(iou), "precision": clip(prec), "recall": clip(rec), "f1": clip(f1)}


def _finite_map(heatmap: np.ndarray) -> np.ndarray:
    h = np.asarray(heatmap, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {h.shape}")
    return h


def pointing_game(heatmap: np.ndarray, gt_boxes: Iterable[Sequence[float]], tolerance: float = 0.0) -> float:
    """Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 /
    IJCV 2018): does the heatmap's maximum lie in the GT region? Tie-aware: the expected hit when
    ties among maximal pixels are broken uniformly at random.

    A pixel ``(r, c)`` is "at" ``(c + 0.5, r + 0.5)`` (original-image pixels); it hits when that point
    is inside a GT box ``(x1, y1, x2, y2)`` (half-open) grown by ``tolerance`` pixels on every side.
    The score is the share of the maximal finite pixels that hit: with a single maximum, 1 or 0 as
    in the paper; when the maximum is a plateau, the fraction of the plateau inside the GT region.
    Why: token-level maps (attention, rollout, AttnLRP, box- or region-shaped maps) reach the image
    by nearest-neighbour upsampling of their grid and a bilinear resize
    (:meth:`medfocus.io.letterbox.Letterbox.map_to_original`), so their maximum is a whole cell or a
    whole box of pixels with the very same value. Taking one of them (say the first in row-major
    order) would score the plateau's corner, not where the plateau is.

    Only exact ties (``== max`` over the finite values) count as maximal: resampling a constant
    region (nearest copies, bilinear weights that sum to one; float32 PIL resampling as used there,
    checked by ``tests/test_pointing_game.py``) reproduces its value exactly, so a plateau stays
    exactly tied, while a tolerance on values would make the score depend on the
    map's scale.

    Args:
        heatmap: ``(H, W)`` map in original-image pixels; NaN/inf pixels are ignored.
        gt_boxes: GT boxes ``(x1, y1, x2, y2)`` in the same frame.
        tolerance: pixels each box grows by on every side (finite, >= 0).

    Returns:
        The expected hit in [0, 1]. A map without information (empty, all-NaN or constant over its
        finite pixels) scores 0: it points nowhere.

    Raises:
        ValueError: the heatmap is not 2-D, or ``tolerance`` is negative or not finite.
    """
    tol = float(tolerance)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tolerance must be a finite number of pixels >= 0, got {tolerance!r}")
    h = _finite_map(heatmap)
    finite = np.isfinite(h)
    if h.size == 0 or not finite.any():
        return 0.0
    top = float(h[finite].max())
    if top == float(h[finite].min()):
        return 0.0
    rows, cols = np.nonzero(finite & (h == top))
    px, py = cols + 0.5, rows + 0.5
    hit = np.zeros(px.shape, dtype=bool)
    for x1, y1, x2, y2 in clean_boxes(gt_boxes):
        hit |= (x1 - tol <= px) & (px < x2 + tol) & (y1 - tol <= py) & (py < y2 + tol)
    return float(hit.mean())


def energy_pointing_game(heatmap: np.ndarray, gt_boxes: Iterable[Sequence[float]]) -> float:
    """Share of the positive heat inside the GT region: ``sum(h+ * mask_G) / sum(h+)`` in [0, 1].

    ``h+`` is the positive part of the raw map (NaN/inf count as 0); a map with no positive heat
    scores 0.
    """
    h = _finite_map(heatmap)
    pos = np.where(np.isfinite(h) & (h > 0), h, 0.0)
    total = float(pos.sum())
    if total <= 0:
        return 0.0
    mask = boxes_to_mask(gt_boxes, h.shape)
    return float(min(max(pos[mask].sum() / total, 0.0), 1.0))



def cue_pointing(heatmap: np.ndarray, cue_box: Sequence[float], finding_boxes: Sequence[Sequence[float]]) -> dict[str, float]:
    """Where an attribution map points, relative to a shortcut cue and the finding (both known by construction
    on the synthetic world; :mod:`medfocus.bench.cue_reliance` says which answers the cue decided).

    Args:
        heatmap: ``(H, W)`` non-negative map in original-image pixels.
        cue_box: the cue's box ``(x1, y1, x2, y2)``, half-open pixel edges.
        finding_boxes: the finding's boxes, same frame.

    Returns:
        ``{"cue_hit", "finding_hit"}``: the tie-aware pointing game (:func:`pointing_game`, Zhang et
        al. 2018) on the cue box and on the finding boxes, in [0, 1] (fractional when the maximum is a
        plateau that straddles the box); ``{"cue_energy", "finding_energy"}``: the share of the map's mass
        inside each (energy-based pointing game, Wang et al. 2020, Score-CAM).
    """
    cue = [tuple(float(v) for v in cue_box)]
    fb = [tuple(float(v) for v in b) for b in finding_boxes]
    return {"cue_hit": pointing_game(heatmap, cue), "finding_hit": pointing_game(heatmap, fb),
            "cue_energy": float(energy_pointing_game(heatmap, cue)), "finding_energy": float(energy_pointing_game(heatmap, fb))}


def auprc(heatmap: np.ndarray, gt_boxes: Iterable[Sequence[float]]) -> float:
    """Area under the precision-recall curve of pixel scores vs the GT mask (average precision).

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, highest first (tied
    pixels enter together), i.e. the step-wise definition of scikit-learn's
    ``average_precision_score``. NaN/inf pixels get the lowest score. A constant map gives the
    positive rate; a GT region that covers no pixel gives 0.
    """
    h = _finite_map(heatmap)
    mask = boxes_to_mask(gt_boxes, h.shape).ravel()
    n_pos = int(mask.sum())
    if n_pos == 0 or h.size == 0:
        return 0.0
    s = h.ravel()
    finite = np.isfinite(s)
    if not finite.any():
        s = np.zeros_like(s)
    else:
        s = np.where(finite, s, float(s[finite].min()) - 1.0)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y = mask[order].astype(np.float64)
    tp = np.cumsum(y)
    # Last index of each run of tied scores = one threshold.
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]
    tp_t = tp[last]
    n_t = last + 1.0
    precision = tp_t / n_t
    recall = tp_t / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float(min(max((d_recall * precision).sum(), 0.0), 1.0))
