"""Property tests (hypothesis) of the localisation metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from medfocus.evaluation import (
    auprc,
    boxes_to_mask,
    energy_pointing_game,
    heatmap_to_boxes,
    pointing_game,
    union_area,
    union_box_metrics,
)


@st.composite
def box(draw, lo=0.0, hi=64.0, integer=False):
    if integer:
        x1, x2 = sorted(draw(st.lists(st.integers(int(lo), int(hi)), min_size=2, max_size=2, unique=True)))
        y1, y2 = sorted(draw(st.lists(st.integers(int(lo), int(hi)), min_size=2, max_size=2, unique=True)))
    else:
        fl = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
        x1, x2 = sorted(draw(st.lists(fl, min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(fl, min_size=2, max_size=2)))
        assume(x2 - x1 > 1e-3 and y2 - y1 > 1e-3)
    return (float(x1), float(y1), float(x2), float(y2))


box_sets = st.lists(box(), min_size=1, max_size=5)
int_box_sets = st.lists(box(integer=True), min_size=1, max_size=5)
SETTINGS = settings(max_examples=80, deadline=None)


@SETTINGS
@given(P=box_sets, G=box_sets)
def test_metrics_in_unit_interval_and_iou_symmetric(P, G):
    m = union_box_metrics(P, G)
    for v in m.values():
        assert 0.0 <= v <= 1.0
    r = union_box_metrics(G, P)
    assert m["iou"] == pytest.approx(r["iou"], abs=1e-9)
    assert m["precision"] == pytest.approx(r["recall"], abs=1e-9)
    assert m["f1"] == pytest.approx(r["f1"], abs=1e-9)
    assert m["iou"] <= min(m["precision"], m["recall"]) + 1e-9


@SETTINGS
@given(P=box_sets)
def test_identical_sets_score_one(P):
    m = union_box_metrics(P, list(reversed(P)))
    assert m == pytest.approx({"iou": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0})


@SETTINGS
@given(P=box_sets, G=box_sets)
def test_disjoint_sets_score_zero(P, G):
    shifted = [(x1 + 100.0, y1, x2 + 100.0, y2) for x1, y1, x2, y2 in G]  # all P lie in x < 64
    m = union_box_metrics(P, shifted)
    assert m == {"iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


@SETTINGS
@given(P=box_sets, G=box_sets, k=st.integers(0, 4))
def test_duplicating_a_predicted_box_changes_nothing(P, G, k):
    dup = P + [P[k % len(P)]]
    assert union_box_metrics(dup, G) == pytest.approx(union_box_metrics(P, G))


@SETTINGS
@given(B=int_box_sets)
def test_union_area_equals_raster_count_for_integer_boxes(B):
    assert union_area(B) == pytest.approx(boxes_to_mask(B, (65, 65)).sum())


@SETTINGS
@given(P=int_box_sets, G=int_box_sets)
def test_union_metrics_match_raster_for_integer_boxes(P, G):
    mp, mg = boxes_to_mask(P, (65, 65)), boxes_to_mask(G, (65, 65))
    inter, union = (mp & mg).sum(), (mp | mg).sum()
    assert union_box_metrics(P, G)["iou"] == pytest.approx(inter / union)


@settings(max_examples=40, deadline=None)
@given(
    h=st.lists(st.floats(-5, 5, allow_nan=False), min_size=64, max_size=64).map(lambda v: np.array(v).reshape(8, 8)),
    G=st.lists(box(0, 8, integer=True), min_size=1, max_size=3),
)
def test_heatmap_metrics_in_unit_interval(h, G):
    assert 0.0 <= pointing_game(h, G) <= 1.0  # fractional when the maximum is tied (tie-aware)
    assert 0.0 <= energy_pointing_game(h, G) <= 1.0
    assert 0.0 <= auprc(h, G) <= 1.0
    for b in heatmap_to_boxes(h, q=0.5, min_area=1):
        assert 0 <= b[0] < b[2] <= 8 and 0 <= b[1] < b[3] <= 8


@settings(max_examples=40, deadline=None)
@given(
    h=st.lists(st.integers(0, 3), min_size=64, max_size=64).map(lambda v: np.array(v, dtype=float).reshape(8, 8)),
    G=st.lists(box(0, 8), min_size=1, max_size=3),
    tol=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_pointing_game_is_the_expected_hit_under_random_tie_breaking(h, G, tol):
    """Few distinct values, so the maximum is usually tied: the score must be the mean of the single-maximum
    scores obtained by letting each tied pixel win the tie in turn."""
    assume(h.max() > h.min())
    top = h.max()
    outcomes = []
    for r, c in np.argwhere(h == top):
        broken = h.copy()
        broken[r, c] = top + 1  # this pixel wins the tie
        outcomes.append(pointing_game(broken, G, tol))
    assert set(outcomes) <= {0.0, 1.0}
    assert pointing_game(h, G, tol) == pytest.approx(float(np.mean(outcomes)))
