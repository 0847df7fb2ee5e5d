"""Evaluation: heatmap -> boxes, union-box metrics, pointing games, AUPRC — known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfocus.evaluation import (
    auprc,
    boxes_to_mask,
    energy_pointing_game,
    heatmap_to_boxes,
    pointing_game,
    union_area,
    union_box_metrics,
)


def _two_blobs():
    h = np.zeros((20, 20), dtype=np.float32)
    h[2:7, 3:8] = 1.0  # 25 px, heat 1.0
    h[10:14, 10:14] = 0.8  # 16 px, heat 0.8
    return h


def test_heatmap_to_boxes_threshold_and_ranking():
    h = _two_blobs()
    # q=0.9 of the positive values is 1.0: only the hot blob survives.
    assert heatmap_to_boxes(h) == [(3.0, 2.0, 8.0, 7.0)]
    # q=0: every positive pixel; ranked by mean heat, half-open edges.
    assert heatmap_to_boxes(h, q=0.0) == [(3.0, 2.0, 8.0, 7.0), (10.0, 10.0, 14.0, 14.0)]
    assert heatmap_to_boxes(h, q=0.0, min_area=17) == [(3.0, 2.0, 8.0, 7.0)]
    assert heatmap_to_boxes(h, q=0.0, max_boxes=1) == [(3.0, 2.0, 8.0, 7.0)]
    assert heatmap_to_boxes(h, q=0.0, max_boxes=0) == []


def test_heatmap_to_boxes_ranks_by_mean_heat_not_area():
    h = np.zeros((30, 30))
    h[0:10, 0:10] = 0.5  # big, cooler
    h[20:25, 20:25] = 0.9  # small, hotter
    boxes = heatmap_to_boxes(h, q=0.0)
    assert boxes == [(20.0, 20.0, 25.0, 25.0), (0.0, 0.0, 10.0, 10.0)]


def test_heatmap_to_boxes_is_scale_and_offset_invariant():
    h = _two_blobs()
    assert heatmap_to_boxes(3.0 * h - 7.0, q=0.0) == heatmap_to_boxes(h, q=0.0)


def test_eight_connectivity_joins_diagonal_neighbours():
    h = np.zeros((10, 10))
    h[0:4, 0:4] = 1.0
    h[4:8, 4:8] = 1.0  # touches the first block only at a corner
    assert heatmap_to_boxes(h, q=0.0) == [(0.0, 0.0, 8.0, 8.0)]


def test_degenerate_maps_give_no_boxes():
    assert heatmap_to_boxes(np.zeros((8, 8))) == []
    assert heatmap_to_boxes(np.full((8, 8), 3.0)) == []
    assert heatmap_to_boxes(np.full((8, 8), np.nan)) == []
    assert heatmap_to_boxes(np.zeros((0, 0))) == []
    with pytest.raises(ValueError):
        heatmap_to_boxes(np.zeros((2, 2, 2)))


def test_nan_pixels_count_as_zero_heat():
    h = _two_blobs()
    h[0, 0] = np.nan
    h[19, 19] = np.inf
    assert heatmap_to_boxes(h, q=0.0) == [(3.0, 2.0, 8.0, 7.0), (10.0, 10.0, 14.0, 14.0)]


def test_union_box_metrics_known_values():
    m = union_box_metrics([(0, 0, 10, 10)], [(5, 0, 15, 10)])
    assert m["iou"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)
    # Overlapping predicted boxes count once.
    m2 = union_box_metrics([(0, 0, 10, 10), (0, 0, 10, 10), (5, 5, 10, 10)], [(5, 0, 15, 10)])
    assert m2 == pytest.approx(m)
    # Float boxes: exact areas.
    m3 = union_box_metrics([(0.5, 0, 1.5, 1)], [(0, 0, 1, 1)])
    assert m3["iou"] == pytest.approx(0.5 / 1.5)
    # Prediction inside GT: precision 1, recall = area ratio.
    m4 = union_box_metrics([(2, 2, 4, 4)], [(0, 0, 10, 10)])
    assert m4["precision"] == 1.0 and m4["recall"] == pytest.approx(0.04)
    # Two GT boxes, one prediction covering one of them.
    m5 = union_box_metrics([(0, 0, 2, 2)], [(0, 0, 2, 2), (8, 8, 10, 10)])
    assert m5["precision"] == 1.0 and m5["recall"] == pytest.approx(0.5) and m5["iou"] == pytest.approx(0.5)


def test_empty_and_degenerate_predictions():
    zero = {"iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert union_box_metrics([], [(0, 0, 1, 1)]) == zero
    assert union_box_metrics([(3, 3, 3, 9)], [(0, 0, 10, 10)]) == zero  # zero-width box
    assert union_box_metrics([(0, 0, 1, 1)], []) == zero


def test_union_area():
    assert union_area([(0, 0, 2, 2), (1, 1, 3, 3)]) == pytest.approx(7.0)
    assert union_area([(0, 0, 1, 1), (0, 0, 1, 1)]) == pytest.approx(1.0)
    assert union_area([(0, 0, 4, 1), (0, 0, 1, 4), (3, 0, 4, 4), (0, 3, 4, 4)]) == pytest.approx(12.0)
    assert union_area([]) == 0.0


def test_boxes_to_mask():
    m = boxes_to_mask([(1, 2, 3, 5)], (6, 4))
    assert m.shape == (6, 4) and m.sum() == 6
    assert m[2:5, 1:3].all()


def test_pointing_game():
    h = np.zeros((10, 10))
    h[3, 4] = 1.0
    assert pointing_game(h, [(4, 3, 5, 4)]) == 1  # exactly the peak pixel
    assert pointing_game(h, [(5, 3, 8, 8)]) == 0
    assert pointing_game(h, [(5, 3, 8, 8)], tolerance=1) == 1
    assert pointing_game(np.zeros((5, 5)), [(0, 0, 5, 5)]) == 0  # constant map points nowhere
    assert pointing_game(np.full((5, 5), np.nan), [(0, 0, 5, 5)]) == 0
    h[0, 0] = np.nan
    assert pointing_game(h, [(4, 3, 5, 4)]) == 1


def test_energy_pointing_game():
    h = np.zeros((10, 10))
    h[0:2, 0:2] = 1.0  # 4 inside
    h[8:10, 8:10] = 1.0  # 4 outside
    h[5, 5] = -10.0  # negative heat ignored
    assert energy_pointing_game(h, [(0, 0, 2, 2)]) == pytest.approx(0.5)
    assert energy_pointing_game(h, [(0, 0, 10, 10)]) == pytest.approx(1.0)
    assert energy_pointing_game(-np.ones((3, 3)), [(0, 0, 3, 3)]) == 0.0


def test_auprc():
    h = np.zeros((4, 4))
    h[:2, :2] = 1.0
    assert auprc(h, [(0, 0, 2, 2)]) == pytest.approx(1.0)
    assert auprc(np.ones((4, 4)), [(0, 0, 2, 2)]) == pytest.approx(0.25)  # constant -> positive rate
    # Ranking neg, pos, neg, pos -> AP = 0.5 * 1/2 + 0.5 * 1/2.
    s = np.array([[0.9, 0.8, 0.7, 0.6]])
    assert auprc(s, [(1, 0, 2, 1), (3, 0, 4, 1)]) == pytest.approx(0.5)
    assert auprc(h, [(10, 10, 12, 12)]) == 0.0  # GT outside the map


def test_auprc_matches_brute_force_definition():
    rng = np.random.default_rng(3)
    h = rng.integers(0, 5, size=(12, 12)).astype(float)  # many ties
    gt = [(2, 3, 7, 9)]
    mask = boxes_to_mask(gt, h.shape).ravel()
    s = h.ravel()
    ap, prev_r = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        sel = s >= t
        p = (mask & sel).sum() / sel.sum()
        r = (mask & sel).sum() / mask.sum()
        ap += (r - prev_r) * p
        prev_r = r
    assert auprc(h, gt) == pytest.approx(ap)
    assert not math.isnan(ap)


def test_quantile_threshold_semantics_on_a_ramp():
    # Normalised heat k/99 for k = 0..99 (row-major). Positive values k = 1..99; their 0.9-quantile
    # is (1 + 0.9 * 98) / 99, so pixels k >= 89.2, i.e. k = 90..99 = the last row, are kept.
    h = np.arange(100, dtype=np.float64).reshape(10, 10)
    assert heatmap_to_boxes(h, q=0.9, min_area=10) == [(0.0, 9.0, 10.0, 10.0)]
    assert heatmap_to_boxes(h, q=0.9, min_area=11) == []  # the 10-pixel component is too small
    # q = 0.5: k >= 50 -> rows 5..9.
    assert heatmap_to_boxes(h, q=0.5) == [(0.0, 5.0, 10.0, 10.0)]
