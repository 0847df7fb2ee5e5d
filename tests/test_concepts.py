"""MedFocus concept machinery: reference pool, selection, transfer on the synthetic world (exact
concept masks), caching, MedSAM refinement, intervention masks and the fallback rule."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch

from medfocus.concepts import intervention as iv
from medfocus.concepts import transfer as T
from medfocus.concepts.reference import Reference, ReferencePool, build_pool_from_regions, default_pool, write_pool
from medfocus.errors import ConfigError, DataError
from medfocus.io.letterbox import Letterbox
from medfocus.types import BILATERAL, CONCEPTS, concept_slug

synthetic = pytest.importorskip("medfocus.datasets.synthetic")


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(x)
    H, W = x.shape
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = x[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> ReferencePool:
    return default_pool(tmp_path_factory.mktemp("cache"), n=8)


# ---- reference pool ------------------------------------------------------------------------------
def test_default_pool_is_written_once_and_reloaded(tmp_path):
    p1 = default_pool(tmp_path, n=2)
    root = tmp_path / "reference_pool" / f"synthetic_v{synthetic.GENERATOR_VERSION}_n2_s0_256"
    assert (root / ".complete").is_file() and len(p1) == 2
    for c in CONCEPTS:
        assert (root / "masks" / p1.ids[0] / f"{concept_slug(c)}.png").is_file()
    stamp = (root / "images" / f"{p1.ids[0]}.png").stat().st_mtime_ns
    p2 = default_pool(tmp_path, n=2)
    assert (root / "images" / f"{p1.ids[0]}.png").stat().st_mtime_ns == stamp  # not rewritten
    assert p2.fingerprint == p1.fingerprint


def test_pool_load_errors(tmp_path):
    with pytest.raises(DataError, match="images/"):
        ReferencePool.load(tmp_path)
    case = synthetic.generate_case(1, size=64, findings=[])
    write_pool([Reference("a", case.image, case.concept_masks)], tmp_path)
    assert ReferencePool.load(tmp_path).ids == ["a"]
    (tmp_path / "masks" / "a" / "left_clavicle.png").unlink()
    with pytest.raises(DataError, match="left_clavicle"):
        ReferencePool.load(tmp_path)


def test_pool_load_refuses_films_not_recorded_as_normal(tmp_path):
    """MedFocus' pool (``medfocus.pool=DIR``) holds normal films only, as the transplant editor's does: a
    ``medfocus synth`` dataset folder has images/ + masks/<id>/<concept>.png too, but its films carry
    findings; a folder without reference.json, or with a film the record does not list, is refused."""
    from PIL import Image

    from medfocus.datasets.synthetic import write_dataset

    data = tmp_path / "dataset"
    write_dataset(data, 3, seed=1, size=64, counterfactuals=False, imagenome=False, progress=False)
    assert (data / "images").is_dir() and any((data / "masks").iterdir())
    with pytest.raises(DataError, match="dataset manifest.*not a pool of normal X-rays"):
        ReferencePool.load(data)
    pool = tmp_path / "pool"
    case = synthetic.generate_case(1, size=64, findings=[])
    write_pool([Reference("a", case.image, case.concept_masks)], pool)
    (pool / "reference.json").unlink()
    with pytest.raises(DataError, match="no reference.json recording its films as normal"):
        ReferencePool.load(pool)
    write_pool([Reference("a", case.image, case.concept_masks)], pool)
    sick = synthetic.generate_case(2, size=64, findings=["mass"])
    Image.fromarray(sick.image).save(pool / "images" / "b.png")
    with pytest.raises(DataError, match=r"1 film\(s\) in .* are not recorded as normal"):
        ReferencePool.load(pool)


def test_build_pool_from_regions_fills_boxes_and_skips_incomplete(tmp_path):
    img = np.full((40, 50), 120, np.uint8)
    boxes = {c: (i, i, i + 10, i + 5) for i, c in enumerate(CONCEPTS)}
    partial = {c: b for c, b in boxes.items() if c != "left lung"}
    pool = build_pool_from_regions([("full", img, boxes), ("partial", img, partial),
                                    ("slug_names", img, {concept_slug(c): b for c, b in boxes.items()})], tmp_path)
    assert pool.ids == ["full", "slug_names"]
    m = pool[0].masks["mediastinum"]  # index 3: box (3, 3, 13, 8)
    assert m.sum() == 50 and m[3:8, 3:13].all()
    with pytest.raises(DataError):
        build_pool_from_regions([("p", img, partial)], tmp_path / "x")


def test_select_best_finds_the_target_itself(pool):
    # a pool member as the target: it is its own cheapest reference (batched UOT at 14x14)
    for i in (2, 5):
        ref, costs = pool.select_best(pool[i].image)
        assert ref.id == pool.ids[i] and costs.shape == (len(pool),)
        assert int(np.argmin(costs)) == i


# ---- transfer --------------------------------------------------------------------------------------
def test_transfer_matches_exact_concept_masks(pool):
    """Mean box IoU (transferred box vs the tight box of the exact mask) >= 0.5 over the 11 concepts."""
    ious = {c: [] for c in CONCEPTS}
    for seed in range(6):
        case = synthetic.generate_case(seed)
        tr = T.transfer_concepts(case.image, pool)
        for c in CONCEPTS:
            ious[c].append(iou(tr.boxes[c], box_of(case.concept_masks[c])))
    per = {c: float(np.mean(v)) for c, v in ious.items()}
    assert np.mean(list(per.values())) >= 0.5, per
    assert per["cardiac silhouette"] >= 0.5 and per["left lung"] >= 0.5 and per["right lung"] >= 0.5, per


def test_transfer_follows_a_known_shift(pool):
    """Targets shifted by (20, 24) px: the transfer beats reusing the reference's own boxes."""
    got, ident = [], []
    for seed in range(4):
        case = synthetic.generate_case(seed)
        img = shift(case.image, 20, 24)
        masks = {c: shift(m, 20, 24) for c, m in case.concept_masks.items()}
        tr = T.transfer_concepts(img, pool)
        ref = pool[pool.ids.index(tr.reference_id)]
        got.append(np.mean([iou(tr.boxes[c], box_of(masks[c])) for c in CONCEPTS]))
        ident.append(np.mean([iou(box_of(ref.masks[c]), box_of(masks[c])) for c in CONCEPTS]))
    assert np.mean(got) > np.mean(ident) + 0.05, (got, ident)


def test_transfer_outputs_in_original_pixels_non_square(pool):
    case = synthetic.generate_case(3)
    img = np.ascontiguousarray(case.image[:, 40:220])  # (256, 180) non-square crop
    tr = T.transfer_concepts(img, pool)
    H, W = img.shape
    assert tr.image_size == (W, H)
    for c in CONCEPTS:
        x1, y1, x2, y2 = tr.boxes[c]
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
        sm = tr.soft_masks[c]
        assert sm.shape == (H, W) and sm.dtype == np.float32 and 0 <= sm.min() and sm.max() <= 1
    # the heart's soft mask is high inside the heart and low in the lung fields' far corners
    heart = tr.soft_masks["cardiac silhouette"]
    m = case.concept_masks["cardiac silhouette"][:, 40:220]
    assert heart[m].mean() > 3 * heart[:40, :40].mean() + 0.1


def test_plan_mode_runs_and_is_worse_than_default(pool):
    case = synthetic.generate_case(0)
    a = T.transfer_concepts(case.image, pool, mode="plan")
    b = T.transfer_concepts(case.image, pool)
    assert a.stats["mode"] == "plan" and b.stats["mode"] == "barycentric"
    ia = np.mean([iou(a.boxes[c], box_of(case.concept_masks[c])) for c in CONCEPTS])
    ib = np.mean([iou(b.boxes[c], box_of(case.concept_masks[c])) for c in CONCEPTS])
    assert ib > ia
    with pytest.raises(ConfigError):
        T.transfer_concepts(case.image, pool, mode="warp")


def test_transfer_cache_roundtrip(pool, tmp_path):
    case = synthetic.generate_case(7)
    cache = T.TransferCache(tmp_path)
    a = T.transfer_concepts(case.image, pool, cache=cache)
    assert a.stats["cached"] is False and len(list((tmp_path / "transfers").glob("*.npz"))) == 1
    b = T.transfer_concepts(case.image, pool, cache=cache)
    assert b.stats["cached"] is True
    assert b.boxes == {c: tuple(v) for c, v in a.boxes.items()} and b.reference_id == a.reference_id
    np.testing.assert_allclose(b.soft_masks["left lung"], a.soft_masks["left lung"], atol=1e-3)
    # another setting is another entry; a corrupt entry is recomputed
    T.transfer_concepts(case.image, pool, cache=cache, core=0.8)
    files = sorted((tmp_path / "transfers").glob("*.npz"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(b"garbage")
    c = T.transfer_concepts(case.image, pool, cache=cache)
    assert c.stats["cached"] is False and c.boxes == a.boxes


def test_core_cells_and_box():
    mass = np.array([[0, 1, 0], [0, 6, 2], [1, 0, 0]], float)
    dens = mass.copy()
    core = T.core_cells(mass, dens, 0.75)  # 6 + 2 = 8 of 10 >= 7.5
    assert core.sum() == 2 and core[1, 1] and core[1, 2]
    assert T.cells_box(core, 4.0) == (4.0, 4.0, 12.0, 8.0)
    assert T.core_cells(np.zeros((2, 2)), np.zeros((2, 2))).sum() == 0
    pts = np.array([[0.5, 0.5], [2.0, 1.25]])
    sp = T.splat(pts, np.array([1.0, 2.0]), (3, 3))
    assert sp.sum() == pytest.approx(3.0) and sp[0, 0] == pytest.approx(0.25) and sp[2, 1] == pytest.approx(1.5)


# ---- MedSAM refinement -----------------------------------------------------------------------------
def _tiny_sam(tmp_path):
    from medfocus.concepts.refine import build_tiny_sam

    return build_tiny_sam(tmp_path)


class FixedDecoder(torch.nn.Module):
    """Wraps a SamModel: every prompt's low-res (16x16) logit map is +10 on rows 4..7, cols 8..11, -10 elsewhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, **kw):
        out = self.inner(**kw)
        low = torch.full_like(out.pred_masks, -10.0)
        low[..., 4:8, 8:12] = 10.0
        out.pred_masks = low
        return out


def test_medsam_refiner_loads_genuine_sam_and_maps_masks_back(tmp_path):
    from medfocus.concepts.refine import MedSAMRefiner

    ref = MedSAMRefiner.from_pretrained(str(_tiny_sam(tmp_path)), device="cpu")
    img = (np.random.default_rng(0).random((96, 128)) * 255).astype(np.uint8)
    probs = ref.segment(img, [(10, 10, 50, 60), (60, 20, 120, 90)])
    assert probs.shape == (2, 96, 128) and 0 <= probs.min() and probs.max() <= 1

    # Known answer for the coordinate chain: a decoder whose low-res (16x16 over the padded 64 canvas)
    # logit map is +10 on rows 4..7, cols 8..11 and -10 elsewhere. The 128x96 image is resized to
    # 64x48 (longest edge 64) and padded at the bottom, so low-res cell = 8 original pixels:
    # the mask is x in [64, 96), y in [32, 64).
    ref.model = FixedDecoder(ref.model)
    assert ref.refine(img, {"heart": (0, 0, 128, 96)}) == {"heart": (64.0, 32.0, 96.0, 64.0)}

    # a stray speck (one low-res cell at row 2, col 2: pixels 16..24) is dropped: only the largest component counts
    class Speck(FixedDecoder):
        def forward(self, **kw):
            out = super().forward(**kw)
            out.pred_masks[..., 2, 2] = 10.0
            return out

    ref.model = Speck(ref.model.inner)
    boxes, maps = ref.refine_with_masks(img, {"heart": (0, 0, 128, 96)})
    assert boxes == {"heart": (64.0, 32.0, 96.0, 64.0)}
    m = maps["heart"] >= 0.5
    assert m[34:62, 66:94].all() and m.sum() <= 32 * 32 and not m[:, :60].any()  # (bilinear upsampling rounds the corners)
    assert maps["heart"][16:24, 16:24].max() < 0.5  # kept as a probability, but below the threshold


def test_largest_component():
    from medfocus.concepts.refine import largest_component

    m = np.zeros((10, 10), bool)
    m[1:4, 1:4] = True  # 9 pixels
    m[6:8, 6:8] = True  # 4 pixels
    m[5, 5] = True  # touches the 4-block diagonally: 8-connected -> 5
    out = largest_component(m)
    assert out.sum() == 9 and out[1:4, 1:4].all()
    assert not largest_component(np.zeros((3, 3), bool)).any()


def test_refined_transfer_uses_the_segmenter_masks_and_keys_the_cache(pool, tmp_path):
    from medfocus.concepts.refine import MedSAMRefiner, refiner_name

    sam = MedSAMRefiner.from_pretrained(str(_tiny_sam(tmp_path / "a")), device="cpu")
    sam.model = FixedDecoder(sam.model)  # every prompt -> the same square
    case = synthetic.generate_case(0, size=128)
    cache = T.TransferCache(tmp_path / "cache")
    tr = T.transfer_concepts(case.image, pool, refine="medsam", refiner=sam, cache=cache)
    # 128 px film -> SAM canvas 64 (no padding): low-res cell = 8 px -> x in [64, 96), y in [32, 64)
    for c in CONCEPTS:
        assert tr.boxes[c] == (64.0, 32.0, 96.0, 64.0)
        m = tr.soft_masks[c] >= 0.5
        assert m[34:62, 66:94].all() and m.sum() <= 32 * 32
    # the cache key names the segmenter: another checkpoint does not reuse this entry
    other = MedSAMRefiner.from_pretrained(str(_tiny_sam(tmp_path / "b")), device="cpu")
    assert refiner_name(sam) != refiner_name(other)
    assert refiner_name("demo").split("|")[0].endswith("synthetic_sam")
    tr2 = T.transfer_concepts(case.image, pool, refine="medsam", refiner=other, cache=cache)
    assert not tr2.stats.get("cached") and tr2.boxes != tr.boxes
    assert T.transfer_concepts(case.image, pool, refine="medsam", refiner=sam, cache=cache).stats["cached"]
    # the name is the folder's content: touching it is the same refiner ...
    before = refiner_name(str(tmp_path / "a"))
    w = next((tmp_path / "a").glob("*.safetensors"))
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert refiner_name(str(tmp_path / "a")) == before == refiner_name(sam)
    # ... and other weights of the same size with the same modification time (cp -p, rsync -t, an
    # unpacked archive) are another one, so the old refined transfer is not reused
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (w.stat().st_size, w.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert refiner_name(str(tmp_path / "a")) != before
    assert refiner_name(sam) == refiner_name(str(tmp_path / "a"))  # a loaded refiner: the folder it names
    assert not T.transfer_concepts(case.image, pool, refine="medsam", refiner=sam, cache=cache).stats.get("cached")
    # the processor's canvas changes the masks too
    named = refiner_name(str(tmp_path / "a"))
    proc = tmp_path / "a" / "processor_config.json"
    proc.write_text(proc.read_text().replace("64", "65"))
    assert refiner_name(str(tmp_path / "a")) != named


def test_medsam_absent_is_skipped_with_notice(pool, tmp_path, caplog):
    case = synthetic.generate_case(0)
    with caplog.at_level(logging.WARNING, logger="medfocus.concepts.refine"):
        tr = T.transfer_concepts(case.image, pool, refine="medsam", refiner=str(tmp_path / "no_such_medsam"))
    assert tr.refine == "none"
    assert any("MedSAM refinement skipped" in r.getMessage() for r in caplog.records)
    plain = T.transfer_concepts(case.image, pool)
    assert tr.boxes == plain.boxes


def test_medsam_refinement_applied(pool, tmp_path):
    from medfocus.concepts.refine import MedSAMRefiner

    ref = MedSAMRefiner.from_pretrained(str(_tiny_sam(tmp_path)), device="cpu")
    case = synthetic.generate_case(0, size=128)
    tr = T.transfer_concepts(case.image, pool, refine="medsam", refiner=ref)
    assert tr.refine == "medsam" and set(tr.boxes) == set(CONCEPTS)
    for b in tr.boxes.values():
        assert 0 <= b[0] < b[2] <= 128 and 0 <= b[1] < b[3] <= 128


# ---- intervention -------------------------------------------------------------------------------
def test_variants_and_keep_masks():
    names = iv.variant_names()
    assert names == list(CONCEPTS) + list(BILATERAL) and len(names) == 15
    boxes = {c: (0.0, 0.0, 1.0, 1.0) for c in CONCEPTS}
    boxes["left lung"] = (10.0, 20.0, 30.0, 60.0)
    boxes["right lung"] = (50.0, 0.0, 60.0, 10.0)
    vb = iv.variant_boxes(boxes)
    assert vb["lungs"] == [boxes["left lung"], boxes["right lung"]]
    geo = Letterbox.fit((100, 50), 64)  # 100x50 -> 64x32, pad_y 16
    keep = iv.canvas_keep_masks({"left lung": vb["left lung"], "lungs": vb["lungs"]}, geo, (64, 64))
    ll = keep[0] == 0
    ys, xs = torch.nonzero(ll, as_tuple=True)
    # x: 10..30 * 0.64 = 6.4..19.2 -> 6..19 ; y: 16 + 20..60 * 0.64 = 28.8..54.4 -> 29..54
    assert (int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1) == (6, 19, 29, 54)
    assert keep[1].sum() < keep[0].sum() and (keep[1] <= keep[0]).all()


def test_mask_keep_masks_follow_the_letterbox():
    # a disc in a 100x50 image; letterboxed to 64x64 (scale 0.64, pad_y 16)
    yy, xx = np.mgrid[0:50, 0:100]
    disc = (xx - 30) ** 2 + (yy - 25) ** 2 <= 15 ** 2
    other = np.zeros_like(disc)
    geo = Letterbox.fit((100, 50), 64)
    soft = {c: other.astype(np.float32) for c in CONCEPTS}
    soft["left lung"] = disc.astype(np.float32) * 0.9  # >= 0.5: inside the region
    soft["right lung"] = disc.astype(np.float32) * 0.4  # < 0.5: nothing
    vm = iv.variant_masks(soft)
    assert vm["left lung"].sum() == disc.sum() and not vm["right lung"].any()
    assert (vm["lungs"] == disc).all()
    keep = iv.canvas_keep_from_masks({"left lung": vm["left lung"], "right lung": vm["right lung"]}, geo, (64, 64))
    hidden = (keep[0] == 0).numpy()
    assert (keep[1] == 1).all()
    # hidden canvas pixels sit on the disc mapped through the letterbox: centre (30, 25) -> (19.2, 32)
    ys, xs = np.nonzero(hidden)
    assert abs(xs.mean() + 0.5 - 19.2) < 0.5 and abs(ys.mean() + 0.5 - 32.0) < 0.5
    assert abs(hidden.sum() - math.pi * (15 * 0.64) ** 2) < 0.06 * math.pi * (15 * 0.64) ** 2


def test_decide_rule():
    names = ["a", "b"]
    assert iv.decide(names, np.array([0.1, 2.0])) == ("b", False)
    thr = -math.log(0.75)  # fallback iff max delta <= -ln(tau)
    assert iv.decide(names, np.array([thr - 1e-9, 0.0])) == (iv.WHOLE_IMAGE, True)
    assert iv.decide(names, np.array([thr + 1e-6, 0.0])) == ("a", False)
    assert iv.decide(names, np.array([0.5, 0.1]), tau=0.5) == (iv.WHOLE_IMAGE, True)
    with pytest.raises(ValueError):
        iv.decide(names, np.zeros(2), tau=0.0)


# ---- ImaGenome gold normals -> pool ------------------------------------------------------------
def _fake_imagenome(root, with_bbox_table: bool):
    from PIL import Image

    gold = root / "chest-imagenome" / "1.0.0" / "gold_dataset"
    gold.mkdir(parents=True)
    rows, brows = [], []
    images = {"a1": ("10000001", "50000001", []), "b2": ("10000002", "50000002", ["disease"]),
              "c3": ("10000003", "50000003", []), "d4": ("10000004", "50000004", [])}
    for n, (iid, (pid, sid, pos)) in enumerate(images.items()):
        case = synthetic.generate_case(40 + n, size=96, findings=[])
        d = root / "mimic-cxr-jpg" / "2.1.0" / "files" / f"p{pid[:2]}" / f"p{pid}" / f"s{sid}"
        d.mkdir(parents=True)
        Image.fromarray(case.image).save(d / f"{iid}.jpg", quality=95)
        regions = [c for c in CONCEPTS if not (iid == "c3" and c == "left clavicle")]
        for c in regions:
            x1, y1, x2, y2 = box_of(case.concept_masks[c])
            rel = 1 if (pos and c == "left lung") else 0
            rows.append(f"{pid}\t{sid}\t{iid}.dcm\t{c}\tpneumonia\t{pos[0] if pos else 'disease'}\t{rel}\t[{x1}, {y1}, {x2}, {y2}]")
            brows.append(f"{iid}.dcm,{c},{x1},{y1},{x2},{y2}")
    head = "patient_id\tstudy_id\timage_id\tbbox\tlabel_name\tcategoryID\trelation\tcoord_original"
    (gold / "gold_object_attribute_with_coordinates.txt").write_text("\n".join([head] + rows) + "\n")
    if with_bbox_table:
        (gold / "gold_bbox_coordinate_annotations_1000images.csv").write_text(
            "image_id,bbox_name,original_x1,original_y1,original_x2,original_y2\n" + "\n".join(brows) + "\n")


@pytest.mark.parametrize("with_bbox_table", [False, True])
def test_build_pool_from_imagenome_normals(tmp_path, with_bbox_table):
    from medfocus.concepts.reference import build_pool_from_imagenome

    _fake_imagenome(tmp_path / "data", with_bbox_table)
    pool = build_pool_from_imagenome(tmp_path / "data", tmp_path / "pool")
    # b2 has a positive finding, c3 lacks a concept: a1 and d4 remain
    assert pool.ids == ["a1", "d4"]
    ref = pool[0]
    case = synthetic.generate_case(40, size=96, findings=[])
    assert ref.image.shape == (96, 96)
    for c in CONCEPTS:
        x1, y1, x2, y2 = box_of(case.concept_masks[c])
        assert box_of(ref.masks[c]) == (x1, y1, x2, y2) and ref.masks[c].sum() == (x2 - x1) * (y2 - y1)


def test_default_pool_replaces_an_incomplete_directory(tmp_path):
    out = tmp_path / "reference_pool" / f"synthetic_v{synthetic.GENERATOR_VERSION}_n1_s0_256"
    (out / "images").mkdir(parents=True)
    (out / "images" / "junk.png").write_bytes(b"not a png")
    pool = default_pool(tmp_path, n=1)
    assert pool.ids == ["ref0000"] and not (out / "images" / "junk.png").exists()
