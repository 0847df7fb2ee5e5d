"""Counterfactual editors: mask contract, known-answer behaviour, cache, registry, errors."""

from __future__ import annotations

import numpy as np
import pytest

from medfocus.editing import (
    EditCache,
    Editor,
    boxes_mask,
    edit_mask,
    edit_prompt,
    feather_alpha,
    get_editor,
    list_editors,
)
from medfocus.editing.oracle import OracleEditor
from medfocus.editing.transplant import Reference, TransplantEditor, estimate_lung_fields, fit_affine, lung_landmarks
from medfocus.errors import ConfigError, DataError
from medfocus.types import Sample, question_stem


def phantom(size: int = 96, shift: tuple[float, float] = (0, 0), scale: float = 1.0, seed: int = 0,
            blob: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A tiny frontal 'chest X-ray': dark air around a bright body with two dark lung ellipses and
    a little texture. Returns (image uint8, lungs bool)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + shift[0], size / 2 + shift[1]
    body = ((xx - cx) / (0.42 * size * scale)) ** 2 + ((yy - cy) / (0.46 * size * scale)) ** 2 < 1
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        lx = cx + side * 0.18 * size * scale
        lungs |= ((xx - lx) / (0.12 * size * scale)) ** 2 + ((yy - cy + 0.03 * size) / (0.3 * size * scale)) ** 2 < 1
    img = np.where(body, 170.0, 20.0)
    img = np.where(lungs, 70.0, img)
    img += 6 * np.sin(xx / 3.0 + seed) * np.cos(yy / 5.0)  # ribs-like texture
    img += rng.normal(0, 2, img.shape)
    if blob is not None:
        bx, by, r = blob
        img = np.where((xx - bx) ** 2 + (yy - by) ** 2 < r * r, 235.0, img)
    return np.clip(img, 0, 255).astype(np.uint8), lungs


def _sample(boxes, size=96, meta=None, attribute="nodule") -> Sample:
    return Sample("synthetic", 0, "/nonexistent.png", attribute, question_stem(attribute), "Yes", boxes, (size, size),
                  meta=meta or {})


# ---- masks -------------------------------------------------------------------------------------
def test_boxes_mask_half_open_and_fractional():
    m = boxes_mask([(3, 1, 6, 2)], (8, 4))
    assert m.sum() == 3 and m[1, 3:6].all() and not m[1, 6] and not m[1, 2]
    m2 = boxes_mask([(2.5, 0.2, 3.1, 1.0)], (8, 4))  # outward rounding: columns 2..3, row 0
    assert np.argwhere(m2).tolist() == [[0, 2], [0, 3]]
    assert boxes_mask([(-5, -5, 100, 100)], (8, 4)).all()
    assert (edit_mask("background", [(3, 1, 6, 2)], (8, 4)) == ~m).all()
    assert edit_prompt("foreground", "mass") == "No mass" and edit_prompt("background_normal", "mass") == "No abnormality"
    with pytest.raises(ConfigError):
        edit_mask("sideways", [], (8, 4))


def test_feather_alpha_zero_outside_ramp_inside():
    m = np.zeros((40, 40), bool)
    m[10:30, 10:30] = True
    a = feather_alpha(m, 5)
    assert (a[~m] == 0).all()
    assert a[20, 20] == 1.0 and 0 < a[10, 20] < 0.5
    assert (feather_alpha(m, 0) == m).all()


# ---- every editor changes pixels only inside its mask --------------------------------------------
def _check_contract(editor: Editor, img: np.ndarray, mask: np.ndarray, sample: Sample | None = None,
                    kind: str | None = None) -> np.ndarray:
    out = editor.edit(img, mask, "No nodule", sample=sample, kind=kind)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out[~mask], img[~mask]), f"{editor.name} changed pixels outside its mask"
    assert (out[mask] != img[mask]).any(), f"{editor.name} changed nothing inside its mask"
    return out


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpaint_removes_blob_only_inside_mask(method):
    img, _ = phantom(blob=(30, 48, 5))
    box = (22, 40, 39, 57)
    mask = boxes_mask([box], (96, 96))
    out = _check_contract(get_editor("inpaint", method=method), img, mask)
    # the bright blob (235) is gone: the box is filled from its (lung / body) border
    assert out[48, 30] < 200 and img[48, 30] > 220
    bg = _check_contract(get_editor(f"inpaint_{method}"), img, ~mask)
    assert np.array_equal(bg[mask], img[mask])


def test_transplant_affine_fit_recovers_known_transform():
    _, lungs = phantom(size=128)
    _, moved = phantom(size=128, shift=(6, -4), scale=0.9)
    M = fit_affine(lung_landmarks(lungs), lung_landmarks(moved))
    # expected: x' = 0.9 (x - 64) + 64 + 6; y' = 0.9 (y - 64) + 64 - 4  (up to rasterisation)
    assert M[0, 0] == pytest.approx(0.9, abs=0.04) and M[1, 1] == pytest.approx(0.9, abs=0.04)
    assert abs(M[0, 1]) < 0.03 and abs(M[1, 0]) < 0.03
    assert M[0, 2] == pytest.approx(0.1 * 64 + 6, abs=2.0) and M[1, 2] == pytest.approx(0.1 * 64 - 4, abs=2.0)
    est = estimate_lung_fields(phantom(size=128)[0])
    assert (est & lungs).sum() / (est | lungs).sum() > 0.8


def test_transplant_picks_best_reference_and_removes_finding():
    target, _ = phantom(seed=3, blob=(30, 48, 5))
    refs = []
    for i, (sh, sc, sd) in enumerate([((8, 5), 0.85, 11), ((0, 0), 1.0, 3), ((-6, 3), 1.1, 12)]):
        im, lu = phantom(shift=sh, scale=sc, seed=sd)
        refs.append(Reference(f"r{i}", im, lu))
    editor = TransplantEditor(references=refs, feather=3, aligner="affine")
    mask = boxes_mask([(22, 40, 39, 57)], (96, 96))
    out = _check_contract(editor, target, mask)
    assert editor.last_choice == "r1"  # same anatomy and texture as the target: best match outside the box
    assert out[48, 30] < 150  # the bright blob was replaced by healthy lung from r1
    clean, _ = phantom(seed=3)
    inner = mask.copy()
    inner[:43, :] = False
    inner[54:, :] = False
    inner[:, :25] = False
    inner[:, 36:] = False
    assert np.abs(out[inner].astype(float) - clean[inner]).mean() < 12
    with pytest.raises(ConfigError):
        TransplantEditor()


def test_transplant_reads_reference_pool_dir(tmp_path):
    import cv2

    for i in range(2):
        im, lu = phantom(seed=i)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks" / f"n{i}").mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "images" / f"n{i}.png"), im)
        left = lu.copy()
        left[:, 48:] = False
        cv2.imwrite(str(tmp_path / "masks" / f"n{i}" / "left_lung.png"), left.astype(np.uint8) * 255)
        cv2.imwrite(str(tmp_path / "masks" / f"n{i}" / "right_lung.png"), (lu & ~left).astype(np.uint8) * 255)
    (tmp_path / "reference.json").write_text('{"ids": ["n0", "n1"]}')
    ed = get_editor("transplant", reference_dir=tmp_path)
    assert [r.id for r in ed.references] == ["n0", "n1"]
    assert np.array_equal(ed.references[0].lungs, phantom(seed=0)[1])
    target, _ = phantom(seed=5, blob=(60, 40, 4))
    _check_contract(ed, target, ~boxes_mask([(55, 35, 66, 46)], (96, 96)))
    with pytest.raises(DataError, match="images/"):
        get_editor("transplant", reference_dir=tmp_path / "missing").prepare()


def test_oracle_uses_exact_counterfactuals(tmp_path):
    import cv2

    img, _ = phantom(blob=(30, 48, 5))
    fg_cf, _ = phantom()  # finding absent
    bg_cf = np.full_like(img, 99)
    bgn_cf = np.full_like(img, 77)
    paths = {}
    for k, a in {"foreground": fg_cf, "background": bg_cf, "background_normal": bgn_cf}.items():
        cv2.imwrite(str(tmp_path / f"{k}.png"), a)
        paths[k] = f"{k}.png"  # relative to the image's folder
    box = (22, 40, 39, 57)
    s = _sample([box], meta={"counterfactuals": paths})
    s.image_path = str(tmp_path / "img.png")
    fg = boxes_mask([box], (96, 96))
    ed = OracleEditor()
    out = _check_contract(ed, img, fg, s)  # kind inferred: mask == box union -> foreground
    assert np.array_equal(out[fg], fg_cf[fg])
    out_bg = _check_contract(ed, img, ~fg, s)
    assert (out_bg[~fg] == 99).all()
    ed2 = ed.edit(img, ~fg, "No abnormality", sample=s)
    assert (ed2[~fg] == 77).all() and np.array_equal(ed2[fg], img[fg])
    assert (ed.edit(img, ~fg, "No nodule", sample=s, kind="background_normal")[~fg] == 77).all()
    with pytest.raises(DataError, match="counterfactuals"):
        ed.edit(img, fg, "No nodule", sample=_sample([box]))
    # its per-sample inputs (part of the edit-cache key): the renders' sha256, which follow their content
    import hashlib

    sha = {k: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for k, p in paths.items()}
    assert ed.sample_inputs(s) == {f"counterfactual_{k}": v for k, v in sha.items()}
    cv2.imwrite(str(tmp_path / paths["foreground"]), np.full((96, 96), 5, np.uint8))
    changed = ed.sample_inputs(s)
    assert changed["counterfactual_foreground"] != sha["foreground"]
    assert changed["counterfactual_background"] == sha["background"]
    assert ed.sample_inputs(_sample([box])) == {}


# ---- cache and registry -------------------------------------------------------------------------
class _CountingEditor(Editor):
    name = "counting"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.calls = 0

    def _edit(self, image, mask, prompt, *, sample, kind):
        self.calls += 1
        return np.where(mask, 255 - image, image)


def test_cache_reuses_edits_and_keys_on_prompt_and_seed(tmp_path):
    img, _ = phantom()
    mask = boxes_mask([(10, 10, 30, 30)], (96, 96))
    s = _sample([(10, 10, 30, 30)])
    cache = EditCache(tmp_path)
    ed = _CountingEditor()
    film = "a" * 64
    a = cache.get_or_edit(ed, img, mask, sample=s, kind="foreground", prompt="No nodule", film_sha256=film)
    b = cache.get_or_edit(ed, img, mask, sample=s, kind="foreground", prompt="No nodule", film_sha256=film)
    assert ed.calls == 1 and np.array_equal(a, b) and np.array_equal(a[mask], 255 - img[mask])
    cache.get_or_edit(ed, img, mask, sample=s, kind="foreground", prompt="No abnormality", film_sha256=film)
    cache.get_or_edit(_CountingEditor(seed=1), img, mask, sample=s, kind="foreground", prompt="No nodule", film_sha256=film)
    assert ed.calls == 2
    assert len(list(tmp_path.rglob("*.png"))) == 3
    # a second cache object on the same folder (another model, a rerun) reuses the files
    ed2 = _CountingEditor()
    EditCache(tmp_path).get_or_edit(ed2, img, mask, sample=s, kind="foreground", prompt="No nodule", film_sha256=film)
    assert ed2.calls == 0


def test_cache_keys_on_the_film_mask_and_finding(tmp_path):
    """The same (dataset, index) with another film, other boxes or another finding is another edit."""
    img, _ = phantom()
    mask = boxes_mask([(10, 10, 30, 30)], (96, 96))
    s = _sample([(10, 10, 30, 30)])
    cache, ed = EditCache(tmp_path), _CountingEditor()

    def edit(sample=s, m=mask, film="a" * 64):
        return cache.get_or_edit(ed, img, m, sample=sample, kind="foreground", prompt="No nodule", film_sha256=film)

    edit()
    assert ed.calls == 1
    edit(film="b" * 64)  # the film was overwritten / another data root / a shifted index
    assert ed.calls == 2
    other = boxes_mask([(40, 40, 60, 60)], (96, 96))
    out = edit(sample=_sample([(40, 40, 60, 60)]), m=other)
    assert ed.calls == 3 and np.array_equal(out[other], 255 - img[other])  # the edit of the new box, not the old one
    edit(sample=_sample([(10, 10, 30, 30)], attribute="mass"))
    assert ed.calls == 4
    edit()  # the first entry is still served
    assert ed.calls == 4
    with pytest.raises(ConfigError, match="sha256"):
        edit(film="")


def test_registry():
    assert {"oracle", "inpaint", "transplant", "radedit"} <= set(list_editors())
    with pytest.raises(ConfigError, match="unknown editor"):
        get_editor("photoshop")
    assert get_editor("inpaint", method="ns").cache_id != get_editor("inpaint").cache_id
    with pytest.raises(DataError, match="shape"):
        get_editor("inpaint").edit(np.zeros((4, 4), np.uint8), np.zeros((4, 5), bool), "No x")


def test_transplant_uot_alignment_improves_on_unaligned_and_competes_in_auto():
    from medfocus.editing.transplant import _ncc, uot_warps

    target, _ = phantom(seed=1)
    ref, rl = phantom(seed=1, shift=(6, -5), scale=0.88)
    (self_warp,) = uot_warps([target], target)
    assert _ncc(self_warp.astype(float), target.astype(float)) > 0.93  # a target maps (almost) onto itself
    (w,) = uot_warps([ref], target)
    assert _ncc(w.astype(float), target.astype(float)) > _ncc(ref.astype(float), target.astype(float)) + 0.15
    mask = boxes_mask([(22, 40, 39, 57)], (96, 96))
    ed = TransplantEditor(references=[Reference("r", ref, rl)], aligner="uot", feather=2)
    _check_contract(ed, target, mask)
    assert ed.last_aligner == "uot"
    auto = TransplantEditor(references=[Reference("r", ref, rl)], aligner="auto", feather=2)
    _check_contract(auto, target, mask)
    assert auto.last_aligner == "affine"  # measured: the lung-field fit aligns this pair better


def _write_pool(root, seeds, record=True):
    """Phantom normals n0, n1, ... in ``root/images``, recorded as normal in ``reference.json`` (unless not ``record``)."""
    import cv2
    import json

    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, sd in enumerate(seeds):
        im, _ = phantom(seed=sd)
        cv2.imwrite(str(root / "images" / f"n{i}.png"), im)
    if record:
        (root / "reference.json").write_text(json.dumps({"ids": [f"n{i}" for i in range(len(seeds))]}))


def test_transplant_edits_are_keyed_on_the_reference_pools_content(tmp_path):
    """A pool overwritten in place (same folder, same ids, same settings) is another edit: the cache
    must not serve the edit made from the old films; an unchanged pool is still a hit."""
    pool = tmp_path / "pool"
    _write_pool(pool, [1])
    target, _ = phantom(seed=5, blob=(40, 40, 5))
    mask = boxes_mask([(30, 30, 50, 50)], (96, 96))
    s = _sample([(30, 30, 50, 50)])
    cache = EditCache(tmp_path / "cache")

    def edit(ed):
        return cache.get_or_edit(ed, target, mask, sample=s, kind="foreground", prompt="No nodule", film_sha256="a" * 64)

    first = get_editor("transplant", reference_dir=pool, aligner="affine", feather=2)
    a = edit(first)
    again = get_editor("transplant", reference_dir=pool, aligner="affine", feather=2)
    assert np.array_equal(edit(again), a) and again.last_choice is None  # unchanged pool: a cache hit
    assert again.sample_inputs(s) == first.sample_inputs(s)
    _write_pool(pool, [7])  # same folder, same file name, other film
    fresh = get_editor("transplant", reference_dir=pool, aligner="affine", feather=2)
    assert fresh.cache_id == first.cache_id  # the settings alone cannot tell the pools apart
    b = edit(fresh)
    assert fresh.last_choice == "n0"  # made again, not served from the cache
    uncached = get_editor("transplant", reference_dir=pool, aligner="affine", feather=2).edit(target, mask, "No nodule")
    assert np.array_equal(b, uncached) and not np.array_equal(a, b)


def test_transplant_pool_must_be_recorded_as_normal(tmp_path):
    """Was: any folder with images/ was taken as the pool of normal films, a `medfocus synth` dataset (films
    with findings, stale films of other sizes) included. A pool is now films recorded as normal in
    reference.json; anything else is refused naming the folder and what is expected."""
    import json

    from medfocus.concepts.reference import Reference, write_pool
    from medfocus.datasets import synthetic
    from medfocus.editing.transplant import load_reference_pool

    data = tmp_path / "dataset"
    synthetic.write_dataset(data, n=4, seed=0, size=64, progress=False)
    with pytest.raises(DataError) as ei:
        get_editor("transplant", reference_dir=data).prepare()
    msg = str(ei.value)
    for w in (f"reference pool {data} refused", f"dataset manifest ({data / 'manifest.json'})", "carry findings",
              "reference.json", "medfocus synth-reference"):
        assert w in msg, (w, msg)
    pool = tmp_path / "pool"
    _write_pool(pool, [1, 2], record=False)  # films without a record: not known to be normal
    with pytest.raises(DataError, match=rf"reference pool {pool} refused: it has no reference.json recording its films as normal"):
        load_reference_pool(pool)
    (pool / "reference.json").write_text(json.dumps({"ids": ["n0"]}))  # n1 is not recorded
    with pytest.raises(DataError, match=r"1 film\(s\) in .*images are not recorded as normal in .*reference.json \(e.g. \['n1'\]\)"):
        load_reference_pool(pool)
    (pool / "reference.json").write_text(json.dumps({"ids": ["n0", "n1", "n9"]}))
    with pytest.raises(DataError, match=r"lists 1 film\(s\) with no image .* \(e.g. \['n9'\]\)"):
        load_reference_pool(pool)
    (pool / "reference.json").write_text("{not json")
    with pytest.raises(DataError, match="reference.json: not readable JSON"):
        load_reference_pool(pool)
    (pool / "reference.json").write_text(json.dumps({"ids": "n0"}))
    with pytest.raises(DataError, match=r"expected an object with \"ids\": a non-empty list of image stems, got str"):
        load_reference_pool(pool)
    (pool / "reference.json").write_text(json.dumps({"ids": ["n0", "n1"]}))
    assert [r.id for r in load_reference_pool(pool)] == ["n0", "n1"]
    # what the pool writers write is accepted: synth-reference's and MedFocus' write_pool
    ref = synthetic.write_reference_pool(tmp_path / "synthref", n=2, seed=0, size=64)
    assert [r.id for r in load_reference_pool(ref)] == ["ref0000", "ref0001"]
    case = synthetic.generate_case(3, size=64, findings=[])
    write_pool([Reference("a", case.image, case.concept_masks)], tmp_path / "mf")
    assert [r.id for r in load_reference_pool(tmp_path / "mf")] == ["a"]
