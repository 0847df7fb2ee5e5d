"""Letterbox geometry: exact forward/inverse mapping of points, boxes and maps (round trips)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfocus.io import Letterbox

sizes = st.tuples(st.integers(1, 3000), st.integers(1, 3000))


def test_fit_known_geometry():
    lb = Letterbox.fit((2000, 1000), 448)
    assert (lb.new_w, lb.new_h, lb.pad_x, lb.pad_y) == (448, 224, 0, 112)
    lb = Letterbox.fit((1000, 2000), 448)
    assert (lb.new_w, lb.new_h, lb.pad_x, lb.pad_y) == (224, 448, 112, 0)
    lb = Letterbox.fit((300, 300), (200, 100))
    assert (lb.new_w, lb.new_h, lb.pad_x, lb.pad_y) == (100, 100, 50, 0)
    with pytest.raises(ValueError):
        Letterbox.fit((0, 10), 32)


@settings(max_examples=60, deadline=None)
@given(size=sizes, out=st.integers(8, 1024), frac=st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_box_round_trip(size, out, frac):
    W, H = size
    lb = Letterbox.fit((W, H), out)
    x1, x2 = sorted([frac[0] * W, frac[1] * W])
    y1, y2 = sorted([frac[2] * H, frac[3] * H])
    fwd = lb.forward_box((x1, y1, x2, y2))
    # The forward box lies inside the content area of the canvas.
    assert lb.pad_x - 1e-9 <= fwd[0] <= fwd[2] <= lb.pad_x + lb.new_w + 1e-9
    assert lb.pad_y - 1e-9 <= fwd[1] <= fwd[3] <= lb.pad_y + lb.new_h + 1e-9
    back = lb.inverse_box(fwd)
    np.testing.assert_allclose(back, (x1, y1, x2, y2), atol=1e-6 * max(W, H))


@settings(max_examples=60, deadline=None)
@given(size=sizes, out=st.integers(8, 1024), pts=st.lists(st.tuples(st.floats(-50, 3050), st.floats(-50, 3050)), min_size=1, max_size=5))
def test_point_round_trip(size, out, pts):
    lb = Letterbox.fit(size, out)
    xy = np.array(pts, dtype=np.float64)
    np.testing.assert_allclose(lb.inverse_points(lb.forward_points(xy)), xy, atol=1e-6 * 3000)


def test_image_edges_map_to_content_edges():
    lb = Letterbox.fit((640, 480), 224)
    assert lb.forward_box((0, 0, 640, 480)) == pytest.approx((lb.pad_x, lb.pad_y, lb.pad_x + lb.new_w, lb.pad_y + lb.new_h))
    # A canvas box over the padding maps back clipped to the image.
    assert lb.inverse_box((0, 0, 224, 224)) == pytest.approx((0, 0, 640, 480))
    unclipped = lb.inverse_box((0, 0, 224, 224), clip=False)
    assert unclipped[1] < 0 and unclipped[3] > 480


def test_apply_places_content_and_pads():
    img = np.full((50, 100), 200, dtype=np.uint8)
    lb = Letterbox.fit((100, 50), 64)
    canvas = lb.apply(img, fill=7)
    assert canvas.shape == (64, 64) and canvas.dtype == np.uint8
    rs, cs = lb.content_slice()
    assert (canvas[rs, cs] == 200).all()
    mask = np.ones_like(canvas, dtype=bool)
    mask[rs, cs] = False
    assert (canvas[mask] == 7).all()
    with pytest.raises(ValueError):
        lb.apply(np.zeros((10, 10), dtype=np.uint8))


def test_heatmap_box_survives_canvas_round_trip():
    W, H = 300, 200
    lb = Letterbox.fit((W, H), 150)
    hm = np.zeros((H, W), dtype=np.float32)
    hm[40:120, 90:210] = 1.0
    canvas = lb.map_to_canvas(hm)
    assert canvas.shape == (150, 150)
    back = lb.map_to_original(canvas)
    assert back.shape == (H, W)
    ys, xs = np.nonzero(back > 0.5)
    assert abs(xs.min() - 90) <= 2 and abs(xs.max() + 1 - 210) <= 2
    assert abs(ys.min() - 40) <= 2 and abs(ys.max() + 1 - 120) <= 2


def test_coarse_grid_cells_land_in_their_place():
    # A 14x14 token grid over a 224 canvas: one lit cell must come back where its box says.
    W, H = 448, 224
    lb = Letterbox.fit((W, H), 224)
    grid = np.zeros((14, 14), dtype=np.float32)
    grid[5, 3] = 1.0  # canvas rows 80..96, cols 48..64
    back = lb.map_to_original(grid)
    expected = lb.inverse_box((48, 80, 64, 96))
    ys, xs = np.nonzero(back > 0.5)
    assert abs(xs.min() - expected[0]) <= 2 and abs(xs.max() + 1 - expected[2]) <= 2
    assert abs(ys.min() - expected[1]) <= 2 and abs(ys.max() + 1 - expected[3]) <= 2
