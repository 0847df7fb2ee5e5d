"""Localisation metrics of predicted boxes / heatmaps against expert (GT) boxes.

* :func:`union_box_metrics` — the paper's protocol: the predicted region ``P`` is the union of the
  predicted boxes and the GT region ``G`` the union of the GT boxes (overlaps counted once; exact
  areas, float boxes allowed). ``IoU = |P∩G| / |P∪G|``, ``precision = |P∩G| / |P|``,
  ``recall = |P∩G| / |G|``, ``F1 = 2PR / (P + R)``.
* :func:`pointing_game` — 1 if the heatmap's maximum falls inside ``G``.
* :func:`energy_pointing_game` — share of the positive heat that lies inside ``G``.
* :func:`auprc` — average precision of the pixel scores against the GT mask.
"""

from __future__ import annotations

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


def pointing_game(heatmap: np.ndarray, gt_boxes: Iterable[Sequence[float]], tolerance: float = 0.0) -> int:
    """1 if the heatmap's maximum lies in the GT region, else 0.

    The maximum is taken over finite values; with several maximal pixels, the first in row-major
    order is used. A pixel ``(r, c)`` is "at" ``(c + 0.5, r + 0.5)``; it is a hit when that point is
    inside a GT box grown by ``tolerance`` pixels on every side. A map without information
    (empty, all-NaN or constant) scores 0: it points nowhere.
    """
    h = _finite_map(heatmap)
    finite = np.isfinite(h)
    if h.size == 0 or not finite.any():
        return 0
    vals = np.where(finite, h, -np.inf)
    if float(vals.max()) == float(h[finite].min()):
        return 0
    r, c = np.unravel_index(int(np.argmax(vals)), h.shape)
    px, py = c + 0.5, r + 0.5
    for x1, y1, x2, y2 in clean_boxes(gt_boxes):
        if x1 - tolerance <= px < x2 + tolerance and y1 - tolerance <= py < y2 + tolerance:
            return 1
    return 0


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
        ``{"cue_hit", "finding_hit"}``: the pointing game (Zhang et al. 2018) on the cue box and on the
        finding boxes (1.0 or 0.0); ``{"cue_energy", "finding_energy"}``: the share of the map's mass
        inside each (energy-based pointing game, Wang et al. 2020, Score-CAM).
    """
    cue = [tuple(float(v) for v in cue_box)]
    fb = [tuple(float(v) for v in b) for b in finding_boxes]
    return {"cue_hit": float(pointing_game(heatmap, cue)), "finding_hit": float(pointing_game(heatmap, fb)),
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
