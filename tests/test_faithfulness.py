"""Deletion / insertion faithfulness: known answers on the toy LVLM that reads one known patch."""

from __future__ import annotations

import numpy as np
import pytest

from medfocus.attribution.testing import ToyAdapter, cell_box, toy_image
from medfocus.errors import ConfigError
from medfocus.evaluation.faithfulness import (FaithfulnessConfig, cell_index, cell_order, curve_auc, faithfulness_curves,
                                              plan_curves)
from medfocus.io.letterbox import Letterbox
from medfocus.lvlm.scoring import score_chat

TARGET = (2, 5)
Q = "Is there evidence of nodule in the image?"


@pytest.fixture(scope="module")
def toy():
    return ToyAdapter(target_cell=TARGET)


def _maps(size: int = 64) -> dict[str, np.ndarray]:
    x1, y1, x2, y2 = cell_box(TARGET, size)
    right = np.zeros((size, size), np.float32)
    right[y1:y2, x1:x2] = 1.0
    # a graded map: the target first, then a smooth ramp (no ties among the other cells)
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.float32) / (4 * size)
    return {"right": right, "inverted": 1.0 - right, "graded": ramp + 2 * right, "constant": np.full((size, size), 0.3, np.float32)}


@pytest.fixture(scope="module")
def zero_curves(toy):
    img = toy_image(TARGET, size=64, seed=3)
    cfg = FaithfulnessConfig(steps=16, baseline="zero", seed=7)
    curves, errors = faithfulness_curves(toy, img, Q, "Yes", _maps(), boxes=[cell_box(TARGET, 64)], config=cfg,
                                         scorer=score_chat)
    assert errors == {}
    return curves


def test_known_answers_with_the_zero_baseline(zero_curves):
    c = zero_curves
    top, floor = c["right"].deletion[0], c["right"].deletion[-1]
    assert top > 0.4 and floor < 0.01  # the toy's answer lives in the target patch
    # 64 cells, 16 steps: 4 cells a step. Ranked first, the target goes at step 1 ...
    assert np.allclose(c["right"].deletion[1:], floor, atol=1e-3)
    assert c["right"].deletion_auc == pytest.approx(floor + (top - floor) / 32, abs=1e-3)  # near the floor
    assert np.allclose(c["right"].insertion[1:], top, atol=1e-3)
    assert c["right"].insertion_auc == pytest.approx(top - (top - floor) / 32, abs=1e-3)  # near the top
    # ... ranked last (inverted map), it goes at the last step: the worst possible areas
    assert c["inverted"].deletion_auc == pytest.approx(top - (top - floor) / 32, abs=1e-3)
    assert c["inverted"].insertion_auc == pytest.approx(floor + (top - floor) / 32, abs=1e-3)
    # the graded map also ranks the target first
    assert c["graded"].deletion_auc == pytest.approx(c["right"].deletion_auc, abs=1e-4)
    # the expert box is the target cell: same curves as the right map
    assert np.allclose(c["expert_box"].deletion, c["right"].deletion) and np.allclose(c["expert_box"].insertion, c["right"].insertion)
    # a constant map is scored as the random reference (same seeded tie order)
    assert np.array_equal(c["constant"].deletion, c["random"].deletion)
    # random sits between right and inverted
    for name in ("random",):
        assert c["right"].deletion_auc < c[name].deletion_auc < c["inverted"].deletion_auc
        assert c["inverted"].insertion_auc < c[name].insertion_auc < c["right"].insertion_auc


def test_random_reference_matches_its_seeded_order(zero_curves):
    """The random curve drops exactly at the step whose cells include the target, per the seeded order."""
    c = zero_curves["random"]
    top, floor = c.deletion[0], c.deletion[-1]
    order = cell_order(np.zeros(64), seed=7)
    pos = int(np.flatnonzero(order == TARGET[0] * 8 + TARGET[1])[0])
    k_star = pos // 4 + 1  # the first step that removes the target (4 cells a step)
    expected = np.where(np.arange(17) < k_star, top, floor)
    assert np.allclose(c.deletion, expected, atol=1e-3)
    assert c.deletion_auc == pytest.approx(curve_auc(c.fractions, expected), abs=1e-3)


def test_curves_are_monotone_where_the_toy_is(zero_curves):
    for name, c in zero_curves.items():
        assert np.all(np.diff(c.deletion) <= 1e-4), name
        assert np.all(np.diff(c.insertion) >= -1e-4), name
        assert c.fractions[0] == 0 and c.fractions[-1] == 1 and np.allclose(c.fractions, np.arange(17) / 16)


def test_blur_baseline_keeps_the_ordering(toy):
    img = toy_image(TARGET, size=64, seed=5)
    curves, _ = faithfulness_curves(toy, img, Q, "Yes", _maps(), config=FaithfulnessConfig(steps=8, baseline="blur", seed=1),
                                    scorer=score_chat)
    r, inv, rnd = curves["right"], curves["inverted"], curves["random"]
    assert r.deletion[-1] < r.deletion[0] - 0.2  # blurring the patch darkens it: the answer weakens
    assert r.deletion_auc <= rnd.deletion_auc <= inv.deletion_auc and r.insertion_auc >= rnd.insertion_auc >= inv.insertion_auc
    assert r.deletion_auc < inv.deletion_auc - 0.1 and r.insertion_auc > inv.insertion_auc + 0.1
    assert "expert_box" not in curves  # no boxes given


def test_letterbox_padding_cells_are_never_moved(toy):
    img = toy_image(TARGET, size=64, seed=0)[:, 16:48]  # 64 x 32 -> pillarboxed on the 32 x 32 canvas
    geo = Letterbox.fit((32, 64), 32)
    cells = cell_index(geo, (32, 32), (8, 8))
    assert (cells[:, :8] == -1).all() and (cells[:, 24:] == -1).all()
    image_cells = np.unique(cells[cells >= 0])
    assert image_cells.size == 32
    seen = []

    def spy(adapter, chat, pv, batch_size=16):
        seen.append(adapter.pixel_values_to_images(pv, chat))
        return score_chat(adapter, chat, pv, batch_size=batch_size)

    hm = np.random.default_rng(0).random((64, 32)).astype(np.float32)
    curves, _ = faithfulness_curves(toy, img, Q, "Yes", {"m": hm}, config=FaithfulnessConfig(steps=4, baseline="zero"), scorer=spy)
    allv = np.concatenate([s.numpy() for s in seen])
    assert np.all(allv[:, :, :, :8] == -1) and np.all(allv[:, :, :, 24:] == -1)  # padding stays black: never "removed"
    assert np.allclose(curves["m"].fractions, [0, 0.25, 0.5, 0.75, 1])
    # 32 image cells in 4 steps: 8 more cells move at each step, in every deletion row of the plan
    plan = plan_curves({"m": hm}, geo, cells, 64, FaithfulnessConfig(steps=4))
    d_rows, i_rows = plan.rows["m"]
    assert [int((plan.keep[r][image_cells] == 0).sum()) for r in d_rows] == [0, 8, 16, 24, 32]
    assert [int((plan.keep[r][image_cells] == 1).sum()) for r in i_rows] == [0, 8, 16, 24, 32]


def test_bad_maps_and_settings_are_named(toy):
    img = toy_image(TARGET, size=64)
    bad = np.zeros((64, 64), np.float32)
    bad[0, 0] = np.nan
    curves, errors = faithfulness_curves(toy, img, Q, "Yes", {"bad": bad, "small": np.zeros((8, 8)), "none": None},
                                         config=FaithfulnessConfig(steps=2, baseline="zero"), scorer=score_chat)
    assert set(curves) == {"random"}
    assert "non-finite" in errors["bad"] and "shape (8, 8)" in errors["small"]
    with pytest.raises(ConfigError, match="baseline"):
        FaithfulnessConfig(baseline="noise")
    with pytest.raises(ConfigError, match="steps"):
        FaithfulnessConfig(steps=0)
    with pytest.raises(ConfigError, match="answer text"):
        faithfulness_curves(toy, img, Q, "", {}, scorer=score_chat)


def test_curve_auc_trapezoid():
    assert curve_auc([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)
    assert curve_auc([0, 1], [0.2, 0.2]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        curve_auc([0], [1])


def test_mean_curves_and_reference_rows_count_each_sample_once():
    from medfocus.evaluation.faithfulness import mean_curves, reference_rows

    def rec(index, method, d, i, ref_d):
        ref = {"deletion_auc": 0.5, "insertion_auc": 0.4, "deletion": ref_d, "insertion": [0.0, 1.0]}
        return {"model": "m", "dataset": "d", "mode": "direct", "index": index, "method": method,
                "faithfulness": {"deletion": d, "insertion": i, "random": ref}}

    recs = [rec(0, "a", [1.0, 0.0], [0.0, 1.0], [1.0, 0.6]), rec(0, "b", [1.0, 0.5], [0.5, 1.0], [1.0, 0.6]),
            rec(1, "a", [0.8, 0.2], [0.2, 0.8], [1.0, 0.2])]
    mc = mean_curves(recs)
    assert mc["a"]["deletion"] == pytest.approx([0.9, 0.1]) and mc["a"]["n"] == 2 and mc["b"]["n"] == 1
    assert mc["reference: random map"]["deletion"] == pytest.approx([1.0, 0.4]) and mc["reference: random map"]["n"] == 2
    rows = reference_rows(recs + [dict(recs[0], error="boom", index=5)])
    assert [(r["index"], r["method"]) for r in rows] == [(0, "reference: random map"), (1, "reference: random map")]


def test_the_curve_ends_are_scored_once_per_sample_and_equal_a_fresh_computation(toy):
    from medfocus.evaluation.faithfulness import record_faithfulness

    img = toy_image(TARGET, size=64, seed=4)
    maps = _maps()
    cfg = FaithfulnessConfig(steps=8, baseline="zero", seed=5)
    rec = {"model": "toy", "dataset": "toy", "index": 0, "mode": "direct", "question": Q, "answer": "Yes",
           "gt_boxes": [list(cell_box(TARGET, 64))]}
    scored: list[int] = []

    def counting(adapter, chat, pv, batch_size=16):
        scored.append(int(pv.shape[0]))
        return score_chat(adapter, chat, pv, batch_size=batch_size)

    shared: dict = {}
    first = record_faithfulness(toy, img, rec, maps["graded"], cfg, shared, scorer=counting)
    n_first, scored[:] = sum(scored), []
    second = record_faithfulness(toy, img, rec, maps["inverted"], cfg, shared, scorer=counting)
    # the first map pays the references and both ends; the second only its own 2 (steps - 1) variants
    assert n_first == 3 * 2 * (8 - 1) + 2 and sum(scored) == 2 * (8 - 1)
    alone = record_faithfulness(toy, img, rec, maps["inverted"], cfg, {}, scorer=score_chat)
    for k in ("deletion", "insertion"):
        assert np.allclose(second["faithfulness"][k], alone["faithfulness"][k], atol=1e-6)
    assert second["deletion_auc"] == pytest.approx(alone["deletion_auc"], abs=1e-6)
    assert second["faithfulness"]["deletion"][0] == first["faithfulness"]["deletion"][0]
    # another answer of the same sample is another score: its ends are not reused
    scored[:] = []
    record_faithfulness(toy, img, {**rec, "answer": "No"}, maps["graded"], cfg, shared, scorer=counting)
    assert sum(scored) == 2 * (8 - 1) + 2
