"""The tie-aware pointing game (Zhang et al., ECCV 2016 / IJCV 2018) — known answers.

A maximum shared by several pixels (a plateau: a token cell or a predicted box upsampled to the image)
scores the share of its pixels whose centres lie in the GT boxes, the expected hit under uniform random
tie-breaking. Each case below notes what the former rule (the first maximal pixel in row-major order,
i.e. the plateau's top-left pixel) gave, where that differs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from medfocus.evaluation import pointing_game
from medfocus.evaluation.metrics import cue_pointing
from medfocus.evaluation.records import evaluate_record
from medfocus.io.letterbox import Letterbox

ROOT = Path(__file__).resolve().parents[1]


def _plateau(shape=(20, 20), rows=slice(4, 8), cols=slice(4, 8), value=1.0) -> np.ndarray:
    h = np.zeros(shape, dtype=np.float32)
    h[rows, cols] = value
    return h


def test_plateau_half_inside_scores_one_half():
    # 4x4 plateau at x, y in [4, 8); the GT holds its columns 6, 7 (8 of 16 pixels). Former rule: 0
    # (the top-left pixel's centre 4.5 is left of the box).
    assert pointing_game(_plateau(), [(6, 0, 20, 20)]) == 0.5
    # the mirror case: the GT holds columns 4, 5 -- the top-left pixel is inside, still one half (was 1)
    assert pointing_game(_plateau(), [(0, 0, 6, 20)]) == 0.5


def test_plateau_inside_but_for_its_top_left_pixel():
    # An L of two GT boxes holds 15 of the 16 plateau pixels, all but the top-left one (4, 4).
    # Former rule: 0. (A plateau wholly inside G always scored 1: its first pixel is one of its own.)
    gt = [(5, 4, 8, 8), (4, 5, 5, 8)]
    assert pointing_game(_plateau(), gt) == pytest.approx(15 / 16)
    assert pointing_game(_plateau(), gt + [(4, 4, 5, 5)]) == 1.0
    # only the top-left pixel inside: 1/16 (former rule: 1)
    assert pointing_game(_plateau(), [(4, 4, 5, 5)]) == pytest.approx(1 / 16)


def test_box_shaped_map():
    # A map that is 1 on a predicted box (x 10..30, y 10..20: 200 px) and 0 elsewhere.
    h = _plateau((40, 40), rows=slice(10, 20), cols=slice(10, 30))
    assert pointing_game(h, [(20, 0, 40, 40)]) == 0.5  # right half of the box (former rule: 0)
    assert pointing_game(h, [(0, 0, 12, 12)]) == pytest.approx(4 / 200)  # its top-left 2x2 (former rule: 1)
    assert pointing_game(h, [(10, 10, 30, 20)]) == 1.0  # the box itself
    assert pointing_game(h, [(31, 21, 40, 40)]) == 0.0  # beside it


def test_tolerance_grows_the_boxes_for_every_maximal_pixel():
    gt = [(8, 4, 10, 8)]  # right next to the plateau's columns 4..7
    assert pointing_game(_plateau(), gt) == 0.0
    assert pointing_game(_plateau(), gt, tolerance=1) == 0.25  # column 7 (centre 7.5 >= 7)
    assert pointing_game(_plateau(), gt, tolerance=2) == 0.5  # columns 6, 7
    assert pointing_game(_plateau(), gt, tolerance=0.5) == 0.25  # centre 7.5 >= 7.5 (closed left edge)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance"):
            pointing_game(_plateau(), gt, tolerance=bad)


def test_ties_across_two_disjoint_regions():
    h = np.zeros((20, 20))
    h[1:3, 1:3] = 5.0  # 4 px, inside the GT
    h[10:13, 10:13] = 5.0  # 9 px, outside
    h[15, 15] = 4.0  # lower: not part of the maximum
    assert pointing_game(h, [(0, 0, 5, 5)]) == pytest.approx(4 / 13)
    assert pointing_game(h, [(9, 9, 14, 14)]) == pytest.approx(9 / 13)
    assert pointing_game(h, [(0, 0, 5, 5), (9, 9, 14, 14)]) == 1.0
    assert pointing_game(h, [(14, 14, 20, 20)]) == 0.0


def test_nan_and_inf_are_ignored_and_uninformative_maps_score_zero():
    h = _plateau().astype(np.float64)
    h[4, 4] = np.nan  # a NaN pixel of the plateau is not one of the maximal pixels
    h[0, 0] = np.inf  # nor is an infinite one
    h[19, 19] = -np.inf
    assert pointing_game(h, [(6, 0, 20, 20)]) == pytest.approx(8 / 15)
    assert pointing_game(np.full((5, 5), np.nan), [(0, 0, 5, 5)]) == 0.0
    const = np.full((5, 5), 2.0)
    const[0, 0] = np.nan
    assert pointing_game(const, [(0, 0, 5, 5)]) == 0.0  # constant over its finite pixels
    assert pointing_game(np.zeros((0, 0)), [(0, 0, 5, 5)]) == 0.0
    assert pointing_game(np.zeros((5, 5)), [(0, 0, 5, 5)]) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        pointing_game(np.zeros(5), [(0, 0, 5, 5)])


def test_single_maximum_scores_zero_or_one_as_before():
    h = np.full((10, 10), 0.5)
    h[3, 4] = 0.9
    h[7, 7] = 0.8999999  # close, but not tied: the maximum is one pixel
    for gt, want in (([(4, 3, 5, 4)], 1.0), ([(7, 7, 8, 8)], 0.0), ([(0, 0, 4, 10)], 0.0)):
        got = pointing_game(h, gt)
        assert type(got) is float and got == want


def test_cue_pointing_reports_the_fractional_hit():
    hm = np.zeros((100, 100), np.float32)
    hm[8:16, 8:16] = 1.0  # an 8x8 cell, its right half on the cue box
    r = cue_pointing(hm, (12, 0, 40, 40), [(60, 60, 70, 70)])
    assert r["cue_hit"] == 0.5 and r["finding_hit"] == 0.0  # former rule: 0 on the cue


@pytest.mark.parametrize("gt, want, first_pixel", [
    ([(308, 168, 336, 224)], 0.5, 0.0),  # right half of the max token cell
    ([(308, 196, 336, 224)], 0.25, 0.0),  # its bottom-right quadrant (a small finding in the cell)
    ([(280, 168, 308, 196)], 0.25, 1.0),  # its top-left quadrant
    ([(280, 168, 336, 224)], 1.0, 1.0),  # the whole cell
])
def test_token_grid_map_through_the_record_path(gt, want, first_pixel):
    """An 8x8 token grid (the demo model: 224 canvas, 28 px per token) mapped to a 448x448 film with
    Letterbox.map_to_original (nearest to the canvas, bilinear to the film) and scored by evaluate_record.
    The maximal cell (row 3, column 5) covers x 280..336, y 168..224 of the film; its plateau of exactly
    equal pixels is symmetric about the cell's centre (308, 196), so a box edge through the centre splits
    it in half whatever the plateau's size."""
    grid = np.linspace(0.0, 0.5, 64, dtype=np.float32).reshape(8, 8)
    grid[3, 5] = 0.9
    heat = Letterbox.fit((448, 448), 224).map_to_original(grid)
    rows, cols = np.nonzero(heat == heat.max())
    assert rows.size > 1  # a plateau, not a single pixel
    assert (rows.min() + rows.max() + 1) / 2 == 196 and (cols.min() + cols.max() + 1) / 2 == 308
    row = evaluate_record({"model": "m", "dataset": "d", "index": 0, "mode": "direct", "method": "attention",
                           "gt_boxes": gt, "image_size": [448, 448], "heatmap": heat})
    assert row["error"] is None or row["error"] != row["error"], row["error"]
    assert row["pointing_game"] == pytest.approx(want)
    # what the former rule (the first maximal pixel in row-major order) gave: the plateau's top-left corner
    r0, c0 = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x1, y1, x2, y2 = gt[0]
    assert float(x1 <= c0 + 0.5 < x2 and y1 <= r0 + 0.5 < y2) == first_pixel


def _shortcut_benchmark():
    spec = importlib.util.spec_from_file_location("shortcut_benchmark", ROOT / "benchmarks" / "shortcut.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shortcut_benchmark_reports_fractional_hits_as_a_bootstrap_mean():
    hit_share = _shortcut_benchmark()._hit_share
    # 0/1 scores are Bernoulli trials: Wilson interval of the count, as before
    assert hit_share([1.0, 0.0, 1.0, 1.0]).endswith("(3/4)")
    assert hit_share([1.0, 0.0, 1.0, 1.0]).startswith("75.0% [")
    # any fractional score: the mean (not a rounded count) with a bootstrap interval
    s = hit_share([0.5, 0.25, 1.0, 0.0] * 3)
    assert s.startswith("43.8% [") and s.endswith("(mean of 12, bootstrap)")
    lo, hi = (float(v) for v in s.split("[")[1].split("]")[0].split(","))
    assert 0.0 <= lo <= 43.75 <= hi <= 100.0
    # below 10 samples the percentile interval is far too narrow: the mean alone
    assert hit_share([0.5, 0.25, 1.0, 0.0]) == "43.8% (no CI) (mean of 4)"
