"""PadChest-GR loader: study/finding order, skip rules, relative boxes -> pixels, 16-bit PNG sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medfocus.datasets import load_dataset
from medfocus.datasets.padchest_gr import N_TEST_STUDIES, load_padchest_gr
from medfocus.errors import DataError
from medfocus.io import read_image, write_png16


def _finding(labels, boxes=(), extra=(), abnormal=True):
    return {"abnormal": abnormal, "labels": list(labels), "boxes": [list(b) for b in boxes],
            "extra_boxes": [list(b) for b in extra], "locations": ["loc"]}


def _write(root, studies, sizes):
    root.mkdir(parents=True, exist_ok=True)
    (root / "filtered_studies.json").write_text(json.dumps(studies))
    for image_id, (W, H) in sizes.items():
        arr = (np.arange(W * H).reshape(H, W) * 7 % 65535).astype(np.uint16)
        write_png16(root / "PadChest_GR" / image_id, arr)


def test_order_skips_and_pixel_boxes(tmp_path):
    studies = [
        {"ImageID": "z_last.png", "StudyID": "S1", "findings": [
            _finding(["pleural effusion"], boxes=[(0.5, 0.25, 0.75, 0.5)]),
            _finding(["normal"], boxes=[(0, 0, 1, 1)], abnormal=False),  # skipped: not abnormal
            _finding(["cardiomegaly", "aortic elongation"], extra=[(0.1, 0.1, 0.2, 0.2)]),
        ]},
        {"ImageID": "a_first.png", "StudyID": "S2", "findings": [
            _finding(["nodule"]),  # skipped: no boxes at all
            _finding(["nodule"], boxes=[(0.0, 0.0, 0.5, 0.5)], extra=[(0.5, 0.5, 1.0, 1.0)]),
        ]},
    ]
    _write(tmp_path, studies, {"z_last.png": (200, 100), "a_first.png": (64, 32)})
    samples = load_padchest_gr(tmp_path)
    # File order of studies, then findings in order — not sorted by name.
    assert [s.attribute for s in samples] == ["pleural effusion", "cardiomegaly or aortic elongation", "nodule"]
    assert [(s.meta["study_position"], s.meta["finding_position"]) for s in samples] == [(0, 0), (0, 2), (1, 1)]
    assert samples[0].boxes == [(100.0, 25.0, 150.0, 50.0)] and samples[0].image_size == (200, 100)
    assert samples[1].boxes == [(20.0, 10.0, 40.0, 20.0)]
    assert samples[2].boxes == [(0.0, 0.0, 32.0, 16.0), (32.0, 16.0, 64.0, 32.0)]
    assert samples[1].question == "Is there evidence of cardiomegaly or aortic elongation in the image?"
    assert samples[0].meta["StudyID"] == "S1"
    img, size = read_image(samples[2].image_path)
    assert size == (64, 32) and img.dtype == np.uint8


def test_rounding_is_python_round(tmp_path):
    # 0.125 * 20 = 2.5 -> 2 (half to even), 0.175 * 20 = 3.5 -> 4.
    studies = [{"ImageID": "r.png", "findings": [_finding(["mass"], boxes=[(0.125, 0.125, 0.175, 0.175)])]}]
    _write(tmp_path, studies, {"r.png": (20, 20)})
    s = load_padchest_gr(tmp_path)[0]
    assert s.boxes == [(2.0, 2.0, 4.0, 4.0)]
    assert s.meta["boxes_px"][0] == pytest.approx([2.5, 2.5, 3.5, 3.5])


def test_only_first_2000_studies_in_test_split(tmp_path):
    studies = [{"ImageID": f"i{k}.png", "findings": [_finding([f"f{k}"], boxes=[(0, 0, 1, 1)])]} for k in range(N_TEST_STUDIES + 3)]
    _write(tmp_path, studies, {})
    test = load_padchest_gr(tmp_path, read_sizes=False)
    assert len(test) == N_TEST_STUDIES and test[-1].attribute == f"f{N_TEST_STUDIES - 1}"
    train = load_padchest_gr(tmp_path, split="train", read_sizes=False)
    assert len(train) == 100 and train[0].attribute == f"f{N_TEST_STUDIES + 2}"
    assert train[0].boxes == [(0.0, 0.0, 1.0, 1.0)]  # relative boxes kept without sizes


def test_errors_name_file_and_field(tmp_path):
    with pytest.raises(DataError, match="filtered_studies.json"):
        load_padchest_gr(tmp_path)
    studies = [{"ImageID": "x.png", "findings": [_finding(["a"], boxes=[(0, 0, 1, 1)]), _finding(["b"], boxes=[(0, 0, 1)])]}]
    _write(tmp_path, studies, {"x.png": (8, 8)})
    with pytest.raises(DataError, match=r"study #0 finding #1: field 'boxes'"):
        load_padchest_gr(tmp_path)
    _write(tmp_path, [{"ImageID": "missing.png", "findings": [_finding(["a"], boxes=[(0, 0, 1, 1)])]}], {})
    with pytest.raises(DataError, match="missing.png"):
        load_dataset("padchest-gr", tmp_path)
    with pytest.raises(DataError, match="split"):
        load_padchest_gr(tmp_path, split="val")
