"""Working-resolution cap (issue 13, item 5): methods that build image-sized arrays (heatmaps upsampled from
the token grid / canvas, MedFocus' concept masks, box indicators) do it on the image scaled to a longer side of
at most ``$MEDFOCUS_WORK_SIDE`` (default 2048) px and upsample the result once, so their memory no longer grows
with the film up to the 60 MP pixel limit. The model input is unchanged (letterboxed from the original), boxes
stay in original pixels, and images within the cap give exactly today's results.

Known answers: the capped map is the work-frame map of the same model output upsampled once (exact); MedFocus'
concept boxes are those of the concept transfer on the work-frame copy, scaled (exact); images at the cap are
bit-identical to the uncapped run; a 6000 x 6000 film's peak traced memory is its returned full-size arrays
plus a bounded rest.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from medfocus.attribution import attribute_many, get_method
from medfocus.attribution.prompting import boxes_heatmap
from medfocus.concepts.intervention import variant_boxes
from medfocus.concepts.reference import cached_pool
from medfocus.concepts.transfer import transfer_concepts
from medfocus.errors import ConfigError
from medfocus.io.letterbox import DEFAULT_WORK_SIDE, Letterbox, WorkFrame, work_side
from medfocus.types import BILATERAL, SUFFIXES

synthetic = pytest.importorskip("medfocus.datasets.synthetic")

Q = "Is there evidence of cardiomegaly in the image?" + SUFFIXES["direct"]


def _film(w: int, h: int) -> np.ndarray:
    """A synthetic film with severe cardiomegaly (256 x 256, a held-out seed) resized to ``min(w, h)`` square
    and centred on an ``h x w`` black frame: cheap to make at any size, and the demo model reads the heart."""
    from PIL import Image

    base = synthetic.generate_case(100, findings=["cardiomegaly"], severity=1.0).image
    s = min(w, h)
    out = np.zeros((h, w), np.uint8)
    y, x = (h - s) // 2, (w - s) // 2
    out[y:y + s, x:x + s] = np.asarray(Image.fromarray(base).resize((s, s), Image.BILINEAR))
    return out


def _run(adapter, image, names, side, monkeypatch, **params):
    monkeypatch.setenv("MEDFOCUS_WORK_SIDE", str(side))
    answer = adapter.generate([image], [Q])[0]
    return attribute_many(adapter, image, Q, answer, {n: get_method(n, **params.get(n, {})) for n in names})


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ---- the setting ------------------------------------------------------------------------------------------
def test_cap_is_documented_and_overridable(monkeypatch):
    monkeypatch.delenv("MEDFOCUS_WORK_SIDE", raising=False)
    assert DEFAULT_WORK_SIDE == 2048 and work_side() == 2048
    monkeypatch.setenv("MEDFOCUS_WORK_SIDE", "1024")
    assert work_side() == 1024
    monkeypatch.setenv("MEDFOCUS_WORK_SIDE", "0")
    assert work_side() is None and WorkFrame.of((50000, 40000)).identity  # 0 = no cap
    for bad, msg in (("big", r"MEDFOCUS_WORK_SIDE must be an integer.*'big'"), ("-5", r"must be >= 0.*-5")):
        monkeypatch.setenv("MEDFOCUS_WORK_SIDE", bad)
        with pytest.raises(ConfigError, match=msg):
            work_side()
        with pytest.raises(ConfigError, match="MEDFOCUS_WORK_SIDE"):  # before any pass or model call
            attribute_many(object(), np.zeros((8, 8), np.uint8), Q, "yes", {"occlusion": get_method("occlusion")})


def test_settings_carry_a_non_default_cap(monkeypatch):
    """A store keeps one setting per method: a run with another cap is a different setting (the maps of
    films above the cap change); the default adds nothing, so existing stores stay comparable."""
    monkeypatch.delenv("MEDFOCUS_WORK_SIDE", raising=False)
    assert "work_side" not in get_method("occlusion").settings()
    monkeypatch.setenv("MEDFOCUS_WORK_SIDE", "1024")
    assert get_method("occlusion").settings()["work_side"] == 1024
    monkeypatch.setenv("MEDFOCUS_WORK_SIDE", "0")
    assert get_method("gradcam").settings()["work_side"] == 0


def test_work_frame_geometry():
    f = WorkFrame.of((6000, 3000), 2048)
    assert (f.work_w, f.work_h) == (2048, 1024) and not f.identity
    assert WorkFrame.of((2048, 100), 2048).identity and WorkFrame.of((300, 225), 300).identity
    g = WorkFrame.of((3001, 1999), 1000)
    assert (g.work_w, g.work_h) == (1000, 666)
    # the whole work frame is the whole image; edges scale exactly
    assert g.box_to_original((0, 0, 1000, 666)) == (0.0, 0.0, 3001.0, 1999.0)
    assert g.box_to_original((100, 66.6, 500, 333)) == pytest.approx((300.1, 66.6 * 1999 / 666, 1500.5, 999.5))
    # the work letterbox places work pixels on the canvas where the matching original pixels are
    geo = Letterbox.fit((3001, 1999), 448)
    wg = g.geometry(geo)
    assert (wg.new_w, wg.new_h, wg.pad_x, wg.pad_y) == (geo.new_w, geo.new_h, geo.pad_x, geo.pad_y)
    b = (123.0, 45.5, 876.0, 600.25)
    assert wg.forward_box(b) == pytest.approx(geo.forward_box(g.box_to_original(b)), abs=1e-9)
    assert wg.map_to_original(np.ones((14, 14), np.float32)).shape == (666, 1000)
    with pytest.raises(ValueError, match="letterbox source"):
        g.geometry(Letterbox.fit((100, 100), 448))
    # one bilinear upsampling: a constant stays constant, the result has the original's shape
    up = g.upsample(np.full((666, 1000), 0.25, np.float32))
    assert up.shape == (1999, 3001) and up.dtype == np.float32 and np.all(up == np.float32(0.25))
    small = g.downsample(np.full((1999, 3001), 77, np.uint8))
    assert small.shape == (666, 1000) and small.dtype == np.uint8 and np.all(small == 77)


# ---- known answers on the demo model -------------------------------------------------------------------------
def test_heatmap_is_the_work_frame_map_upsampled_once(demo_adapter, monkeypatch):
    img = _film(1024, 768)
    cap = _run(demo_adapter, img, ["gradcam"], 300, monkeypatch)["gradcam"]
    full = _run(demo_adapter, img, ["gradcam"], 0, monkeypatch)["gradcam"]
    frame = WorkFrame.of((1024, 768), 300)
    assert (frame.work_w, frame.work_h) == (300, 225) and cap.extras["work_size"] == [300, 225]
    assert "work_size" not in full.extras
    # the model input is the original's: the same token-grid map
    np.testing.assert_array_equal(cap.extras["grid_map"], full.extras["grid_map"])
    # known answer: the grid map brought to the 300 x 225 work frame, then upsampled once to 1024 x 768
    wgeo = frame.geometry(demo_adapter.prepare(img, Q, "No").geometry)
    expected = frame.upsample(wgeo.map_to_original(cap.extras["grid_map"]))
    assert cap.heatmap.shape == (768, 1024) and cap.heatmap.dtype == np.float32
    np.testing.assert_allclose(cap.heatmap, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))
    # and it is the uncapped map up to the blur of one work pixel at the token-cell edges
    err = np.abs(cap.heatmap - full.heatmap).mean() / float(np.abs(full.heatmap).max())
    assert err < 0.02
    fth = cap.extras["final_token_heatmap"]
    assert fth is not None and fth.shape == (768, 1024)


def test_medfocus_works_on_the_work_frame_and_answers_in_original_pixels(demo_adapter, monkeypatch):
    img = _film(1024, 768)
    res = _run(demo_adapter, img, ["medfocus"], 300, monkeypatch)["medfocus"]
    frame = WorkFrame.of((1024, 768), 300)
    ex = res.extras
    assert ex["work_size"] == [300, 225]
    # known answer: the concept transfer of the work-frame copy, its boxes scaled to original pixels
    tr = transfer_concepts(frame.downsample(img), cached_pool(None), cache=None)
    for c, b in tr.boxes.items():
        assert ex["concept_boxes"][c] == pytest.approx(list(frame.box_to_original(b)), abs=1e-9)
    if ex["fallback"]:
        assert res.boxes == [(0.0, 0.0, 1024.0, 768.0)]
    else:
        want = [frame.box_to_original(b) for b in variant_boxes(tr.boxes)[ex["concept"]]]
        np.testing.assert_allclose(np.array(res.boxes), np.array(want), rtol=0, atol=1e-9)
    assert list(ex["box"]) == pytest.approx([min(b[0] for b in res.boxes), min(b[1] for b in res.boxes),
                                             max(b[2] for b in res.boxes), max(b[3] for b in res.boxes)])
    # known answer: sum_c delta_c * soft_mask_c on the work frame (nats, not normalised), upsampled once
    hm = np.zeros((225, 300), np.float32)
    for n, d in ex["deltas"].items():
        if d > 0:
            m = np.maximum(tr.soft_masks[BILATERAL[n][0]], tr.soft_masks[BILATERAL[n][1]]) if n in BILATERAL else tr.soft_masks[n]
            hm += np.float32(d) * m
    np.testing.assert_allclose(res.heatmap, frame.upsample(hm), rtol=1e-5, atol=1e-6)
    assert res.heatmap.shape == (768, 1024)
    assert ex["concept_masks"].shape == (11, 225, 300)  # display masks stay in the (recorded) work frame
    if res.token_heatmaps is not None:
        assert res.token_heatmaps.shape[1:] == (768, 1024)
    # the boxes are where the uncapped run puts them (the transfer of the original, up to resampling)
    full = _run(demo_adapter, img, ["medfocus"], 0, monkeypatch)["medfocus"]
    ious = [_iou(ex["concept_boxes"][c], full.extras["concept_boxes"][c]) for c in tr.boxes]
    assert min(ious) > 0.8 and np.mean(ious) > 0.9
    assert not ex["fallback"] and ex["concept"] == full.extras["concept"]  # this film: the model reads the heart
    assert full.extras["concept_masks"].shape == (11, 768, 1024)


def test_suite_equals_methods_alone_above_the_cap(demo_adapter, monkeypatch):
    img = _film(1024, 768)
    names = ["gradcam", "occlusion", "medfocus", "prompting"]
    params = {"occlusion": {"grid": 2}}
    suite = _run(demo_adapter, img, names, 300, monkeypatch, **params)
    answer = demo_adapter.generate([img], [Q])[0]
    for n in names:
        alone = get_method(n, **params.get(n, {})).attribute(demo_adapter, img, Q, answer)
        a, b = suite[n], alone
        assert a.extras["work_size"] == b.extras["work_size"] == [300, 225]
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        assert a.boxes == b.boxes
        assert a.heatmap.shape == (768, 1024)


def test_prompting_boxes_and_box_map_in_original_pixels(demo_adapter, monkeypatch):
    img = _film(1024, 768)
    cap = _run(demo_adapter, img, ["prompting"], 300, monkeypatch)["prompting"]
    full = _run(demo_adapter, img, ["prompting"], 0, monkeypatch)["prompting"]
    assert cap.extras["generated_text"] == full.extras["generated_text"]  # the model saw the original image
    assert len(cap.boxes) == len(full.boxes)
    np.testing.assert_allclose(np.array(cap.boxes).reshape(-1, 4), np.array(full.boxes).reshape(-1, 4), rtol=0, atol=1e-6)
    # the box map is redrawn at the original size from the boxes: exact edges, no blur
    np.testing.assert_array_equal(cap.heatmap, boxes_heatmap(cap.boxes, (768, 1024)))


def test_images_within_the_cap_are_unchanged(demo_adapter, monkeypatch):
    """At the cap (longer side == cap) nothing is resampled: bit-identical to running without a cap."""
    img = _film(300, 225)
    names = ["gradcam", "occlusion", "medfocus", "prompting"]
    capped = _run(demo_adapter, img, names, 300, monkeypatch, occlusion={"grid": 2})
    free = _run(demo_adapter, img, names, 0, monkeypatch, occlusion={"grid": 2})
    for n in names:
        a, b = capped[n], free[n]
        assert "work_size" not in a.extras
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        assert a.boxes == b.boxes
        if a.token_heatmaps is not None:
            np.testing.assert_array_equal(a.token_heatmaps, b.token_heatmaps)
    assert capped["medfocus"].extras["concept_boxes"] == free["medfocus"].extras["concept_boxes"]


def test_big_film_memory_is_its_outputs_plus_a_bounded_rest(demo_adapter, monkeypatch):
    """A 6000 x 6000 film (36 MP, within the 60 MP pixel limit) through Grad-CAM and MedFocus: everything but
    the returned full-size maps is built at the cap, so the peak traced (numpy) memory is those maps plus a
    rest that does not grow with the film. Without the cap MedFocus alone holds 11 full-size float32 masks
    (1.6 GB here) besides its outputs."""
    img = _film(6000, 6000)
    monkeypatch.setenv("MEDFOCUS_WORK_SIDE", "512")
    answer = demo_adapter.generate([img], [Q])[0]
    methods = {"gradcam": get_method("gradcam"), "medfocus": get_method("medfocus")}
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        res = attribute_many(demo_adapter, img, Q, answer, methods)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    owners: dict[int, np.ndarray] = {}  # the returned full-size arrays, each memory block once (views share)
    for r in res.values():
        assert r.heatmap.shape == (6000, 6000) and r.extras["work_size"] == [512, 512]
        for a in (r.heatmap, r.token_heatmaps, r.extras.get("final_token_heatmap")):
            while isinstance(a, np.ndarray) and isinstance(a.base, np.ndarray):
                a = a.base
            if isinstance(a, np.ndarray):
                owners[id(a)] = a
        for b in r.boxes or []:
            assert 0 <= b[0] < b[2] <= 6000 and 0 <= b[1] < b[3] <= 6000
    outputs = sum(a.nbytes for a in owners.values())
    for b in res["medfocus"].extras["concept_boxes"].values():
        assert 0 <= b[0] < b[2] <= 6000 and 0 <= b[1] < b[3] <= 6000
    full_map = 4 * 6000 * 6000
    assert outputs >= 2 * full_map  # the two heatmaps at least (what the user receives)
    assert peak <= outputs + 64 * 2**20, f"peak {peak / 2**20:.0f} MB, outputs {outputs / 2**20:.0f} MB"


def test_to_original_frame_converts_every_declared_extra():
    """The conversion itself, on a hand-made result: boxes of every declared kind scaled, maps upsampled, per-token
    maps too large at the original size handed over on the canvas (the runner's low-resolution path)."""
    from medfocus.attribution.base import Attribution
    from medfocus.concepts.method import MedFocusMethod

    frame = WorkFrame.of((6000, 4500), 400)
    assert (frame.work_w, frame.work_h) == (400, 300) and frame.sx == frame.sy == 15.0
    geo = frame.geometry(Letterbox.fit((6000, 4500), 64))
    work_map = np.tile(np.linspace(0, 1, 400, dtype=np.float32), (300, 1))
    tok = np.stack([work_map, 1 - work_map, work_map * 0.5])  # 3 x 6000 x 4500 floats > MAX_TOKEN_MAP_FLOATS
    res = Attribution(heatmap=work_map, boxes=[(10.0, 20.0, 30.0, 40.0)], token_heatmaps=tok,
                      extras={"box": [10.0, 20.0, 30.0, 40.0], "concept_boxes": {"heart": [0.0, 0.0, 400.0, 300.0]},
                              "final_token_heatmap": tok[1], "grid_map": np.ones((8, 8))})
    out = MedFocusMethod().to_original_frame(res, frame, geo)
    assert out.boxes == [(150.0, 300.0, 450.0, 600.0)] and out.extras["box"] == [150.0, 300.0, 450.0, 600.0]
    assert out.extras["concept_boxes"] == {"heart": [0.0, 0.0, 6000.0, 4500.0]}
    assert out.heatmap.shape == (4500, 6000)
    # bilinear with pixel centres at half integers: at the centre of every work pixel (original pixel 15 j + 7) the
    # map is the work value, and a linear ramp stays linear between centres
    np.testing.assert_allclose(out.heatmap[7::15, 7::15], work_map, atol=1e-6)
    x = np.arange(7, 5993)
    np.testing.assert_allclose(out.heatmap[100, 7:5993], np.interp((x + 0.5) / 15, np.arange(400) + 0.5, work_map[0]), atol=1e-6)
    np.testing.assert_allclose(out.extras["final_token_heatmap"], 1 - out.heatmap, atol=1e-6)
    assert out.token_heatmaps is None and out.extras["token_maps_lowres"].shape == (3, 64, 64)
    np.testing.assert_array_equal(out.extras["grid_map"], np.ones((8, 8)))  # token-grid extras are frame-free
    assert out.extras["work_size"] == [400, 300]
