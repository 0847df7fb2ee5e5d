"""Synthetic chest X-ray world: masks, left/right, findings, counterfactual oracles, box priors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from medfocus.datasets.synthetic import FINDINGS, generate_case
from medfocus.datasets.synthetic.priors import load_priors, sample_boxes
from medfocus.errors import ConfigError
from medfocus.types import CONCEPTS

S = 128


def _centroid_x(m: np.ndarray) -> float:
    return float(np.nonzero(m)[1].mean())


def _in_dilated_box(diff: np.ndarray, box, pad: int) -> bool:
    x1, y1, x2, y2 = (int(v) for v in box)
    inside = np.zeros_like(diff, bool)
    inside[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad] = True
    return not (diff & ~inside).any()


def test_deterministic_and_seed_dependent():
    a = generate_case(11, size=S, cue_rate=1.0)
    b = generate_case(11, size=S, cue_rate=1.0)
    assert a.image.dtype == np.uint8 and a.image.shape == (S, S)
    assert a.image.tobytes() == b.image.tobytes()
    assert [f.box for f in a.findings] == [f.box for f in b.findings] and a.cues == b.cues
    assert not np.array_equal(a.image, generate_case(12, size=S).image)
    # Counterfactuals are deterministic too.
    if a.findings:
        n = a.findings[0].name
        assert np.array_equal(a.background(n), b.background(n))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_concept_masks_anatomy(seed):
    m = generate_case(seed, size=S, findings=[]).concept_masks
    assert set(m) == set(CONCEPTS)
    for c in CONCEPTS:
        assert m[c].dtype == bool and m[c].shape == (S, S) and m[c].sum() > 5, c
    # Disjointness that anatomy demands.
    for a, b in [("left lung", "right lung"), ("left clavicle", "right clavicle"),
                 ("left hilar structures", "right hilar structures"),
                 ("left costophrenic angle", "right costophrenic angle"),
                 ("left lung", "cardiac silhouette"), ("right lung", "cardiac silhouette"),
                 ("left lung", "mediastinum"), ("right lung", "mediastinum"),
                 ("upper mediastinum", "cardiac silhouette")]:
        assert not (m[a] & m[b]).any(), (a, b)
    # Containment.
    for part, whole in [("left hilar structures", "left lung"), ("right hilar structures", "right lung"),
                        ("left costophrenic angle", "left lung"), ("right costophrenic angle", "right lung"),
                        ("cardiac silhouette", "mediastinum"), ("upper mediastinum", "mediastinum")]:
        assert not (m[part] & ~m[whole]).any(), (part, whole)
    # Radiological convention: the patient's left is on the image right.
    for c in ("lung", "clavicle", "hilar structures", "costophrenic angle"):
        assert _centroid_x(m[f"left {c}"]) > S / 2 > _centroid_x(m[f"right {c}"]), c
    assert _centroid_x(m["cardiac silhouette"]) > S / 2  # heart mostly in the left hemithorax
    # Costophrenic angles are the lowest part of each lung; clavicles are at the top.
    ys = lambda k: np.nonzero(m[k])[0].mean()  # noqa: E731
    assert ys("left costophrenic angle") > ys("left lung") and ys("left clavicle") < ys("left lung")


def test_masks_agree_with_drawing():
    c = generate_case(5, size=S, findings=[])
    img = c.image.astype(float)
    m = c.concept_masks
    lungs = m["left lung"] | m["right lung"]
    # Air-filled lungs are dark, the heart/mediastinum dense, and the boundary is where the masks say:
    # the darkest quartile of the thorax lies almost entirely inside the lung masks.
    assert img[lungs].mean() + 40 < img[m["cardiac silhouette"]].mean()
    assert img[lungs].mean() + 30 < img[m["mediastinum"]].mean()
    for side in ("left", "right"):  # clavicles are brighter than their immediate surroundings
        cl = m[f"{side} clavicle"]
        ring = binary_dilation(cl, iterations=3) & ~binary_dilation(cl, iterations=1)
        assert img[cl].mean() > img[ring].mean() + 10
    body = img > 25
    thr = np.quantile(img[body], 0.25)
    dark = (img < thr) & body
    dark[:, :] &= np.arange(S)[:, None] < S * 0.8  # the thorax, not the flanks below the domes
    assert (dark & lungs).sum() / dark.sum() > 0.85


@pytest.mark.parametrize("name", FINDINGS)
def test_finding_visible_even_when_mild(name):
    c = generate_case(21, size=S, findings=[name], severity=0.0)
    f = c.finding(name)
    assert f.mask.any() and f.box == tuple(float(v) for v in _box(f.mask))
    diff = np.abs(c.image.astype(int) - c.foreground(name).astype(int))
    # A mild finding still changes its own pixels by >= 10 grey levels on average.
    assert diff[f.mask].mean() >= 10, diff[f.mask].mean()
    if name in ("nodule", "mass", "consolidation", "atelectasis", "pleural effusion"):
        assert c.image[f.mask].mean() > c.foreground(name)[f.mask].mean()  # opacities are brighter
    if name == "pneumothorax":
        rim = f.mask & (c.image < c.foreground(name))
        assert rim.sum() > 0.3 * f.mask.sum()  # the rim is more lucent


def _box(mask):
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_findings_anatomically_placed(seed):
    c = generate_case(seed, size=S, findings=list(FINDINGS), severity=0.5)
    m = c.concept_masks
    lungs = m["left lung"] | m["right lung"]
    for f in c.findings:
        if f.name == "cardiomegaly":
            assert np.array_equal(f.mask, m["cardiac silhouette"])
            heart_w = f.box[2] - f.box[0]
            assert heart_w / (2 * (c.anatomy.lung_off + c.anatomy.lung_a) * S) > 0.5  # CTR > 0.5
        elif f.name == "pneumothorax":
            assert (f.mask & ~lungs).sum() <= 0.02 * f.mask.sum()
        else:
            assert not (f.mask & ~lungs).any(), f.name
        if f.name == "pleural effusion":
            assert (f.mask & m[f"{f.side} costophrenic angle"]).any()


@pytest.mark.parametrize("seed", [40, 41, 42])
def test_foreground_counterfactual_is_local(seed):
    c = generate_case(seed, size=S, findings=["cardiomegaly", "nodule", "pleural effusion", "consolidation"],
                      cue_rate=1.0)
    pad = 4  # PSF (sigma 0.3 px at 128 px) + one-pixel soft edges
    for f in c.findings:
        fg = c.foreground(f.name)
        diff = fg != c.image
        assert diff[f.mask].any(), f.name
        assert _in_dilated_box(diff, f.box, pad), f.name
        # Other findings are untouched.
        for g in c.findings:
            if g.name != f.name:
                other = g.mask & ~_boxmask(f.box, pad)
                assert np.array_equal(fg[other], c.image[other])


def _boxmask(box, pad):
    m = np.zeros((S, S), bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad] = True
    return m


@pytest.mark.parametrize("seed", [50, 51])
def test_background_counterfactuals(seed):
    c = generate_case(seed, size=S, findings=["nodule", "mass", "atelectasis"], severity=1.0, cue_rate=1.0)
    assert c.cues, "cue_rate=1 must draw the correlated cues"
    for f in c.findings:
        x1, y1, x2, y2 = (int(v) for v in f.box)
        for kind in ("background", "background_normal"):
            bg = getattr(c, kind)(f.name)
            assert np.array_equal(bg[y1:y2, x1:x2], c.image[y1:y2, x1:x2]), kind
            outside = ~_boxmask(f.box, 3)
            assert np.abs(bg.astype(int) - c.image.astype(int))[outside].mean() > 2  # re-drawn
            for cue in c.cues:  # shortcut cues removed
                cx1, cy1, cx2, cy2 = (int(v) for v in cue["box"])
                assert bg[cy1:cy2, cx1:cx2].max() < c.image[cy1:cy2, cx1:cx2].max() - 30, (kind, cue)
        # background keeps the other findings (re-drawn), background_normal removes them.
        bn = c.background_normal(f.name).astype(float)
        bk = c.background(f.name).astype(float)
        for g in c.findings:
            if g.name == f.name:
                continue
            sel = g.mask & ~_boxmask(f.box, 3)
            if sel.sum() > 10:
                assert c.image[sel].mean() > bn[sel].mean() + 10, (f.name, g.name)
                assert bk[sel].mean() > bn[sel].mean() + 5, (f.name, g.name)


def test_cues_correlate_and_avoid_findings():
    with_cue = [generate_case(s, size=S, findings=["nodule"], cue_rate=1.0) for s in range(60, 66)]
    for c in with_cue:
        assert [q["type"] for q in c.cues] == ["marker"] and c.cues[0]["finding"] == "nodule"
        b, q = c.findings[0].box, c.cues[0]["box"]
        assert q[2] <= b[0] or b[2] <= q[0] or q[3] <= b[1] or b[3] <= q[1]
        x1, y1, x2, y2 = (int(v) for v in q)
        assert c.image[y1:y2, x1:x2].max() > 220  # burned-in, radiopaque
    assert all(not generate_case(s, size=S, findings=["nodule"], cue_rate=0.0).cues for s in range(60, 66))
    # Same seed with/without cues: identical anatomy and finding.
    a, b = generate_case(70, size=S, findings=["pneumothorax"], cue_rate=1.0), generate_case(70, size=S, findings=["pneumothorax"])
    assert a.findings[0].box == b.findings[0].box and a.cues and a.cues[0]["type"] == "tube"
    assert (a.image != b.image).sum() < 0.1 * S * S


def _in_boxes(shape, boxes) -> np.ndarray:
    m = np.zeros(shape, bool)
    for x1, y1, x2, y2 in boxes:
        m[int(y1) : int(y2), int(x1) : int(x2)] = True
    return m


@pytest.mark.parametrize("size", [128, 256])
def test_cue_box_holds_every_pixel_the_cue_changes(size):
    """A film with its cues differs from the same film rendered without them (cue_rate=0: same anatomy,
    findings and noise) only inside the recorded cue boxes -- anti-aliased fringe and detector blur
    included. The stroke's core box (the former record) misses some of those pixels."""
    from medfocus.datasets.synthetic.phantom import detector_reach

    r = detector_reach(size)
    assert r == {128: 1, 256: 3}[size]  # the blur's kernel half-width: cvRound(8 sigma + 1) | 1, sigma = 0.6 size / 256
    types, outside_core = set(), 0
    for seed in range(40):
        cued = generate_case(seed, size=size, cue_rate=1.0, cue_base_rate=1.0)
        free = generate_case(seed, size=size, cue_rate=0.0, cue_base_rate=0.0)
        assert cued.cues and not free.cues
        diff = cued.image != free.image
        assert diff.any()
        assert not (diff & ~_in_boxes(diff.shape, [q["box"] for q in cued.cues])).any(), seed
        outside_core += int((diff & ~_in_boxes(diff.shape, [q["core_box"] for q in cued.cues])).sum())
        for q in cued.cues:
            types.add(q["type"])
            x1, y1, x2, y2 = q["box"]
            c1, d1, c2, d2 = q["core_box"]
            assert 0 <= x1 <= c1 < c2 <= x2 <= size and 0 <= y1 <= d1 < d2 <= y2 <= size
            # no wider than the core, its one-pixel anti-aliased fringe and the blur's reach
            assert x1 >= c1 - r - 1 and y1 >= d1 - r - 1 and x2 <= c2 + r + 1 and y2 <= d2 + r + 1, q
            for f in cued.findings:  # the whole cue stays clear of every finding box
                b = f.box
                assert x2 <= b[0] or b[2] <= x1 or y2 <= b[1] or b[3] <= y1, (seed, q, f.name)
    assert types == {"marker", "portable", "tube"}
    assert outside_core > 0  # the old record (the core) did not hold the whole cue


def test_cue_placement_is_unchanged():
    """Placements recorded before ``box`` covered the whole cue (the films' pixels depend on them, and the
    shipped shortcut twin was trained on those films, in the ``"nih"`` world): earlier cues are avoided by
    their core boxes."""
    known = {  # seed -> [(type, core box)] at 256 px, cue_rate=1, cue_base_rate=1
        65: [("marker", [7, 5, 25, 25]), ("portable", [186, 11, 244, 20]), ("tube", [1, 57, 72, 221])],
        158: [("portable", [12, 11, 70, 20]), ("marker", [231, 5, 248, 25]), ("tube", [7, 50, 79, 210])],
        328: [("marker", [231, 5, 248, 25]), ("tube", [183, 44, 253, 214]), ("portable", [186, 237, 244, 246])],
    }
    for seed, cues in known.items():
        c = generate_case(seed, size=256, cue_rate=1.0, cue_base_rate=1.0, lesion_size_rule="nih")
        assert [(q["type"], q["core_box"]) for q in c.cues] == cues, seed


def test_bad_arguments():
    with pytest.raises(ConfigError):
        generate_case(0, findings=["fracture"])
    with pytest.raises(ConfigError):
        generate_case(0, size=16)
    with pytest.raises(ConfigError):
        generate_case(0, size=S, findings=["nodule"]).foreground("mass")


# --- box statistics vs the NIH-derived priors ------------------------------------------------------
# Findings whose box size is set by the prior (the others are shaped by anatomy: an effusion cannot be
# wider than the costophrenic recess, a pneumothorax rim spans the apex) — see findings.py.
PRIOR_CONTROLLED = {
    "nodule": ("w", "h", "cx", "cy"),
    "mass": ("w", "h", "cx", "cy"),
    "consolidation": ("w", "h", "cx"),
    "atelectasis": ("w", "h", "cx", "cy"),
    "cardiomegaly": ("w",),
    "pleural effusion": ("h",),
    "pneumothorax": ("h",),
}


@pytest.mark.parametrize("name", FINDINGS)
def test_box_statistics_match_nih_priors(name):
    from scipy.stats import ks_2samp

    n = 100
    vals = {"cx": [], "cy": [], "w": [], "h": []}
    for s in range(n):
        f = generate_case(5000 + s, size=S, findings=[name], lesion_size_rule="nih").findings[0]
        x1, y1, x2, y2 = f.box
        vals["cx"].append((x1 + x2) / 2 / S)
        vals["cy"].append((y1 + y2) / 2 / S)
        vals["w"].append((x2 - x1) / S)
        vals["h"].append((y2 - y1) / S)
    prior = sample_boxes(name, np.random.default_rng(0), 5000)
    col = {"cx": 0, "cy": 1, "w": 2, "h": 3}
    for var in PRIOR_CONTROLLED[name]:
        ks = ks_2samp(vals[var], prior[:, col[var]]).statistic
        med_gen, med_pri = np.median(vals[var]), np.median(prior[:, col[var]])
        assert ks < 0.3, (name, var, ks)
        if var in ("w", "h"):  # (centres are bimodal — one mode per lung — so only sizes get a median check)
            assert abs(med_gen - med_pri) < 0.2 * med_pri + 1.5 / S, (name, var, med_gen, med_pri)


def test_prior_sampler_reproduces_table():
    q = load_priors()["findings"]["nodule"]["quantiles"]
    x = sample_boxes("nodule", np.random.default_rng(1), 20000)
    assert abs(np.median(x[:, 2]) - q["w"][10]) < 0.003
    assert abs(np.quantile(x[:, 3], 0.25) - q["h"][5]) < 0.003


def test_priors_table_derived_from_nih_list(shared_data):
    from medfocus.datasets.synthetic.priors import derive_priors

    derived = derive_priors(shared_data / "nih_bbox_list_2017.csv.gz")
    committed = load_priors()
    assert derived["findings"] == committed["findings"]
    assert committed["findings"]["consolidation"]["nih_labels"] == ["Infiltrate", "Pneumonia"]
    assert committed["findings"]["nodule"]["n"] == 79


# --- lesion size rule (nodule vs mass) ---------------------------------------------------------------
def test_fleischner_rule_separates_nodule_from_mass_by_size_and_changes_nothing_else():
    """``lesion_size_rule="fleischner"``: every nodule's long axis is <= 3 cm and every mass's is > 3 cm on the
    35 cm field (Fleischner glossary; the default world), while under the "nih" rule the two overlap; other findings
    drawn before the lesion are identical and those after keep their random draws (the rule only skips
    candidate boxes already drawn)."""
    from medfocus.datasets.synthetic.findings import FIELD_OF_VIEW_CM, NODULE_MAX_DIAMETER_CM, lesion_diameter_cm

    size = 256
    assert lesion_diameter_cm((10, 20, 32, 30), size) == pytest.approx(22 / size * FIELD_OF_VIEW_CM)
    diam = {}
    for rule in ("nih", "fleischner"):
        for name in ("nodule", "mass"):
            diam[rule, name] = [lesion_diameter_cm(generate_case(7000 + s, size=size, findings=[name], lesion_size_rule=rule)
                                                   .finding(name).box, size) for s in range(40)]
    assert max(diam["fleischner", "nodule"]) <= NODULE_MAX_DIAMETER_CM < min(diam["fleischner", "mass"])
    # the NIH priors overlap: some nodules are larger than 3 cm, some masses smaller (what the rule removes)
    assert max(diam["nih", "nodule"]) > NODULE_MAX_DIAMETER_CM and min(diam["nih", "mass"]) <= NODULE_MAX_DIAMETER_CM
    # a drawn lesion that already obeys the rule is the same lesion in both worlds
    same = [s for s in range(40) if diam["nih", "nodule"][s] <= NODULE_MAX_DIAMETER_CM]
    assert same and all(diam["fleischner", "nodule"][s] == diam["nih", "nodule"][s] for s in same)
    a = generate_case(7003, size=size, findings=["mass", "pneumothorax", "cardiomegaly"], lesion_size_rule="nih")
    b = generate_case(7003, size=size, findings=["mass", "pneumothorax", "cardiomegaly"], lesion_size_rule="fleischner")
    assert a.finding("mass").box != b.finding("mass").box  # this seed's first mass is under 3 cm
    assert a.finding("cardiomegaly").box == b.finding("cardiomegaly").box
    pa, pb = a.finding("pneumothorax").spec, b.finding("pneumothorax").spec
    assert (pa.seed, pa.severity) == (pb.seed, pb.severity)
    # the default is "fleischner", byte for byte
    assert generate_case(7003, size=128).image.tobytes() == generate_case(7003, size=128, lesion_size_rule="fleischner").image.tobytes()


def test_unknown_lesion_size_rule_refused():
    with pytest.raises(ConfigError, match="lesion_size_rule"):
        generate_case(0, size=S, lesion_size_rule="who")
