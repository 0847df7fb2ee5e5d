"""prompting_medsam's offline anatomy-grounded detector (phrase -> concept -> transferred concept box), and
the consistent OWL-ViT missing-weights error."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from medfocus.attribution import get_method
from medfocus.attribution.testing import ToyAdapter
from medfocus.concepts.grounding import AnatomyDetector, ground_phrase, variant_concepts
from medfocus.concepts.reference import ReferencePool
from medfocus.concepts.transfer import transfer_concepts
from medfocus.datasets.synthetic import generate_case, write_reference_pool
from medfocus.errors import ModelError
from medfocus.types import BILATERAL, CONCEPTS

Q = "Is there evidence of pleural effusion in the image? Answer directly with yes or no without any explanation."

GROUNDING = [
    ("enlarged cardiac silhouette", "cardiac silhouette"),
    ("enlarged heart", "cardiac silhouette"),
    ("left heart border", "cardiac silhouette"),  # a side word does not split a side-less concept
    ("pericardial effusion", "cardiac silhouette"),  # not a pleural effusion
    ("blunted left costophrenic angle", "left costophrenic angle"),
    ("Right CP angle.", "right costophrenic angle"),
    ("right pleural effusion", "right costophrenic angle"),
    ("costophrenic angles", "costophrenic angles"),
    ("left hilum", "left hilar structures"),
    ("right hilar region of the lung", "right hilar structures"),  # more specific than "lung"
    ("bilateral hilar adenopathy", "hilar structures"),
    ("left clavicle", "left clavicle"),
    ("right apical opacity", "right lung"),
    ("left upper zone", "left lung"),
    ("small nodule in the right upper lung", "right lung"),
    ("right lung base", "right lung"),
    ("left basal atelectasis", "left lung"),
    ("left-sided lower zone", "left lung"),
    ("lt lower lobe", "left lung"),
    ("absent lung markings at the right lung edge", "right lung"),
    ("both lungs", "lungs"),
    ("lungs", "lungs"),
    ("left and right lower zones", "lungs"),
    ("bibasilar opacities", "lungs"),
    ("nodule in the lung", "lungs"),  # no side -> both
    ("lingula", "left lung"),
    ("widened superior mediastinum", "upper mediastinum"),
    ("tracheal deviation", "upper mediastinum"),
    ("mediastinal shift", "mediastinum"),
    ("opacity in the left lung on the right side of the image", "left lung"),  # image right = patient left: consistent
    ("opacity in the left lung on the left side of the image", "lungs"),  # contradictory sides -> both
    ("image-left lower zone", "right lung"),  # the image's left is the patient's right
    ("rib fracture", None),
    ("free air under the diaphragm", None),
    ("", None),
]


@pytest.mark.parametrize("phrase, expected", GROUNDING)
def test_grounding_table(phrase: str, expected: str | None) -> None:
    assert ground_phrase(phrase) == expected


def test_grounding_covers_every_concept_and_union() -> None:
    got = {ground_phrase(p) for p, _ in GROUNDING} - {None}
    assert set(CONCEPTS) - got == {"right clavicle"}  # every other concept occurs in the table above
    assert ground_phrase("fractured right collarbone") == "right clavicle"
    assert ground_phrase("both clavicles") == "clavicles" and set(BILATERAL) <= got | {"clavicles"}
    assert variant_concepts("lungs") == ("left lung", "right lung")
    assert variant_concepts("mediastinum") == ("mediastinum",)
    with pytest.raises(KeyError):
        variant_concepts("rib")


def test_demo_model_phrase_templates_are_all_grounded() -> None:
    """Every phrase the demo model is trained to output names the region its finding lies in."""
    from medfocus.training.demo_lvlm.tasks import _PHRASE as templates

    assert isinstance(templates, dict) and templates
    for finding, tpl in templates.items():
        for side in ("left", "right"):
            for zone in ("upper", "middle", "lower"):
                got = ground_phrase(tpl.format(side=side, zone=zone))
                assert got is not None, (finding, tpl)
                if "{side}" in tpl:
                    assert got.startswith(side), (tpl, side, got)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> ReferencePool:
    root = tmp_path_factory.mktemp("pool")
    write_reference_pool(root, n=2, seed=0, size=128)
    return ReferencePool.load(root)


@pytest.fixture(scope="module")
def padded_case():
    """A normal 128 x 128 phantom placed at columns 32..159 of a 128 x 160 film (so original pixels differ
    from the square canvas), with its true concept masks on the same film."""
    case = generate_case(11, size=128, findings=[])
    img = np.zeros((128, 160), np.uint8)
    img[:, 32:] = case.image
    masks = {}
    for c in CONCEPTS:
        m = np.zeros((128, 160), bool)
        m[:, 32:] = case.concept_masks[c]
        masks[c] = m
    return img, masks


def _box_of(m: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(m)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_anatomy_detector_returns_the_transferred_box_in_original_pixels(pool, padded_case, tmp_path) -> None:
    img, masks = padded_case
    det = AnatomyDetector(pool, cache=tmp_path)
    found = det.detect(img, ["small nodule in the left lower lung", "rib fracture", "left lung", "both costophrenic angles"])
    tr = transfer_concepts(img, pool)
    assert found.box_concepts == ["left lung", "left costophrenic angle", "right costophrenic angle"]
    assert found.boxes == [tuple(tr.boxes[c]) for c in found.box_concepts]
    assert found.box_phrases == ["small nodule in the left lower lung", "both costophrenic angles", "both costophrenic angles"]
    assert found.unmatched == ["rib fracture"] and found.groundings["left lung"] == "left lung"
    assert found.reference_id in pool.ids
    # original pixels of the 160-wide film: the patient's left lung is on the image's right, where the truth is
    x1, y1, x2, y2 = found.boxes[0]
    assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 128 and (x1 + x2) / 2 > 80
    assert _iou(found.boxes[0], _box_of(masks["left lung"])) > 0.6
    # nothing grounded -> no transfer at all
    none = AnatomyDetector(pool, cache=tmp_path / "other").detect(img, ["rib fracture"])
    assert none.boxes == [] and none.reference_id is None and not (tmp_path / "other").exists()


def test_prompting_medsam_anatomy_end_to_end(pool, padded_case, tmp_path, caplog) -> None:
    img, masks = padded_case
    toy = ToyAdapter()
    toy.scripted_generation = ['["enlarged heart", "rib fracture", "bilateral lungs", "cardiac silhouette"]']
    method = get_method("prompting_medsam", detector="anatomy", pool=str(pool.root), cache=str(tmp_path),
                        medsam=str(tmp_path / "no_such_medsam"))
    with caplog.at_level(logging.WARNING, logger="medfocus.concepts.refine"):
        res = method.attribute(toy, img, Q, "Yes")
    tr = transfer_concepts(img, pool)
    assert res.extras["detector"] == "anatomy" and res.extras["refine"] == "none"
    assert any("MedSAM refinement skipped" in r.getMessage() for r in caplog.records)
    assert res.extras["detected_concepts"] == ["cardiac silhouette", "left lung", "right lung"]
    assert res.boxes == [tr.boxes["cardiac silhouette"], tr.boxes["left lung"], tr.boxes["right lung"]]
    assert res.extras["unmatched_phrases"] == ["rib fracture"]
    assert res.extras["groundings"]["bilateral lungs"] == "lungs"
    assert res.n_forward == 1  # the generate call; the OT transfer is no network pass
    # heatmap = box indicators, in original pixels
    assert res.heatmap.shape == (128, 160) and res.heatmap.dtype == np.float32
    x1, y1, x2, y2 = (int(np.ceil(v - 0.5)) for v in tr.boxes["left lung"])
    assert res.heatmap[y1:y2, x1:x2].min() >= 1.0
    # the model outputs "[]": an empty result, no error
    toy.scripted_generation = ["[]"]
    empty = method.attribute(toy, img, Q, "No")
    assert empty.boxes == [] and empty.heatmap.sum() == 0 and empty.n_forward == 1


def test_prompting_medsam_anatomy_with_medsam_weights(pool, padded_case, tmp_path) -> None:
    from medfocus.concepts.refine import build_tiny_sam

    img, _ = padded_case
    sam = build_tiny_sam(tmp_path / "sam")
    toy = ToyAdapter()
    toy.scripted_generation = ['["right hilum", "left clavicle"]']
    res = get_method("prompting_medsam", detector="anatomy", pool=str(pool.root), cache=False, medsam=str(sam)).attribute(toy, img, Q, "Yes")
    assert res.extras["refine"] == "medsam" and res.n_forward == 2  # generate + MedSAM
    assert res.extras["detected_concepts"] == ["right hilar structures", "left clavicle"] and len(res.boxes) == 2
    for x1, y1, x2, y2 in res.boxes:
        assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 128
    assert res.heatmap.shape == (128, 160) and 0 <= res.heatmap.min() and res.heatmap.max() <= 2


class _CountingToy(ToyAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.n_generate = 0

    def generate(self, *args, **kw):  # type: ignore[override]
        self.n_generate += 1
        return super().generate(*args, **kw)


@pytest.mark.parametrize("output", ["[]", '["enlarged heart"]', ""])
def test_owlvit_without_weights_fails_the_same_way_on_every_sample(output: str) -> None:
    toy = _CountingToy()
    toy.scripted_generation = [output]
    method = get_method("prompting_medsam", detector="/nonexistent/owlvit")
    for _ in range(2):
        with pytest.raises(ModelError, match=r"not available locally.*--param prompting_medsam\.detector="):
            method.attribute(toy, np.zeros((32, 32), np.uint8), Q, "Yes")
    assert toy.n_generate == 0  # the check comes before generating


def test_owlvit_missing_medsam_fails_before_generating() -> None:
    from medfocus.attribution.prompting import OwlDetector

    toy = _CountingToy()
    toy.scripted_generation = ["[]"]
    det = OwlDetector(torch.nn.Linear(1, 1), processor=None, device="cpu")  # never called: the check comes first
    with pytest.raises(ModelError, match=r"MedSAM.*--param prompting_medsam\.medsam="):
        get_method("prompting_medsam", detector=det, medsam="/nonexistent/medsam").attribute(toy, np.zeros((32, 32), np.uint8), Q, "Yes")
    assert toy.n_generate == 0


def test_demo_uses_the_anatomy_detector(tmp_path) -> None:
    from medfocus.runner.demo import DemoConfig, _method_params

    ref = tmp_path / "reference"
    params = _method_params(DemoConfig(), ["prompting_medsam", "medfocus", "occlusion"], ref)
    assert params["prompting_medsam"] == {"detector": "anatomy", "pool": str(ref), "medsam": "demo"}
    assert params["medfocus"]["pool"] == str(ref) and params["occlusion"] == {}
    assert {k: params["medfocus"][k] for k in ("refine", "medsam", "region", "rule")} == {
        "refine": "medsam", "medsam": "demo", "region": "mask", "rule": "nested"}
    # the caller's MedFocus settings win
    cfg = DemoConfig(method_params={"medfocus": {"refine": "none"}})
    assert _method_params(cfg, ["medfocus"], ref)["medfocus"]["refine"] == "none"
    # a detector chosen by the caller is kept (and then no pool is imposed)
    cfg = DemoConfig(method_params={"prompting_medsam": {"detector": "/models/owlvit"}})
    assert _method_params(cfg, ["prompting_medsam"], ref)["prompting_medsam"] == {"detector": "/models/owlvit"}
