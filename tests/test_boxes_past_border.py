"""Expert boxes past the image border (issue 12, kind 4): every loader clips to the image size read
from the file header, drops boxes empty after clipping, and reports the counts (one DataWarning and
``meta["provenance"]``); ``evaluate`` clips boxes to the image and rejects inverted / non-finite GT."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from medfocus.datasets.imagenome import image_relpath, load_imagenome
from medfocus.datasets.nih_cxr8 import load_nih_cxr8
from medfocus.datasets.padchest_gr import load_padchest_gr
from medfocus.datasets.vindr_cxr import load_vindr_cxr
from medfocus.errors import DataError, DataWarning
from medfocus.evaluation import evaluate_records
from medfocus.io import write_dicom, write_png16

W, H = 1000, 800
# (box as the annotation gives it, box after clipping or None when dropped) on a 1000x800 image.
BOX_TABLE = [
    ((-40, 500, 300, 860), (0, 500, 300, 800)),    # the VinDr row
    ((100, 100, 200, 200), (100, 100, 200, 200)),  # inside: unchanged
    ((990, 790, 1010, 810), (990, 790, 1000, 800)),  # past the bottom-right corner
    ((1000, 0, 1200, 50), None),                   # wholly right of the image: empty after clipping
    ((-30, -30, -1, 20), None),                    # wholly left
]
WANT_BOXES = [tuple(float(v) for v in b) for _, b in BOX_TABLE if b is not None]
WANT_PROV = {"boxes_clipped": 2, "boxes_dropped": 2, "dataset_boxes_clipped": 2, "dataset_boxes_dropped": 2}
WARNING = r": 2 of 6 expert boxes clipped to the image border, 2 dropped as empty after clipping"
INSIDE = (10, 10, 20, 20)  # a second sample whose only box is inside


def _vindr(root):
    base = root / "vindr-cxr" / "1.0.0"
    (base / "annotations").mkdir(parents=True)
    with open(base / "annotations" / "annotations_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"))
        w.writerows(("img", f"R{k}", "Nodule/Mass", *b) for k, (b, _) in enumerate(BOX_TABLE))
        w.writerow(("img", "R9", "Pleural effusion", *INSIDE))
    write_dicom(base / "test" / "img.dicom", np.zeros((H, W), np.uint8))
    return lambda: load_vindr_cxr(root)


def _imagenome(root):
    cols = ["image_id", "bbox", "label_name", "categoryID", "relation", "coord_original", "patient_id", "study_id"]
    gold = root / "chest-imagenome" / "1.0.0" / "gold_dataset"
    gold.mkdir(parents=True)
    rows = [("img.dcm", "r", "lung opacity", "anatomicalfinding", 1, str(list(b)), 10000032, 50414267) for b, _ in BOX_TABLE]
    rows.append(("img.dcm", "r", "pneumonia", "disease", 1, str(list(INSIDE)), 10000032, 50414267))
    (gold / "gold_object_attribute_with_coordinates.txt").write_text(
        "\n".join(["\t".join(cols)] + ["\t".join(map(str, r)) for r in rows]) + "\n")
    p = root / image_relpath("10000032", "50414267", "img.dcm")
    p.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(p)
    return lambda: load_imagenome(root)


def _padchest(root):
    root.mkdir(parents=True, exist_ok=True)
    rel = [[b[0] / W, b[1] / H, b[2] / W, b[3] / H] for b, _ in BOX_TABLE]
    study = {"ImageID": "img.png", "findings": [
        {"abnormal": True, "labels": ["nodule"], "boxes": rel, "extra_boxes": []},
        {"abnormal": True, "labels": ["mass"], "boxes": [[v / s for v, s in zip(INSIDE, (W, H, W, H))]]},
    ]}
    (root / "filtered_studies.json").write_text(json.dumps([study]))
    write_png16(root / "PadChest_GR" / "img.png", np.zeros((H, W), np.uint16))
    return lambda: load_padchest_gr(root)


# BOX_TABLE's cases on NIH's 1024x1024 films (the loader refuses films of another size)
NIH_BOX_TABLE = [
    ((-40, 500, 300, 1060), (0, 500, 300, 1024)),
    ((100, 100, 200, 200), (100, 100, 200, 200)),
    ((1014, 1014, 1034, 1034), (1014, 1014, 1024, 1024)),
    ((1024, 0, 1224, 50), None),
    ((-30, -30, -1, 20), None),
]


def _nih(root):
    base = root / "nih-chestxray8"
    base.mkdir(parents=True)
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    # one box per (image, finding) as in the release: five images of one finding + one inside box
    (base / "images").mkdir()
    for k, (b, _) in enumerate(NIH_BOX_TABLE):
        lines.append(f"img{k}.png,Mass,{b[0]},{b[1]},{b[2] - b[0]},{b[3] - b[1]}")
        Image.fromarray(np.zeros((1024, 1024), np.uint8)).save(base / "images" / f"img{k}.png", compress_level=1)
    lines.append("img0.png,Nodule,10,10,10,10")
    (base / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    return lambda: load_nih_cxr8(root)


@pytest.mark.parametrize("name,build", [("vindr_cxr", _vindr), ("imagenome", _imagenome), ("padchest_gr", _padchest)])
def test_loader_clips_drops_and_counts(tmp_path, name, build):
    load = build(tmp_path)
    with pytest.warns(DataWarning, match=name + WARNING):
        samples = load()
    big = [s for s in samples if len(s.meta["provenance"]) and s.meta["provenance"]["boxes_clipped"]]
    assert len(big) == 1 and len(samples) == 2
    assert sorted(big[0].boxes) == sorted(WANT_BOXES) and big[0].image_size == (W, H)
    assert big[0].meta["provenance"] == WANT_PROV
    other = next(s for s in samples if s is not big[0])
    assert other.boxes == [tuple(float(v) for v in INSIDE)]
    assert other.meta["provenance"] == dict(WANT_PROV, boxes_clipped=0, boxes_dropped=0)


def test_nih_loader_clips_drops_and_counts(tmp_path):
    # NIH has one box per (image, finding): a sample whose only box lies outside its image is an error.
    load = _nih(tmp_path)
    with pytest.raises(DataError, match=r"line\(s\) \[5\]: every box of img3.png / Mass lies outside the 1024x1024 image"):
        load()
    csv_path = tmp_path / "nih-chestxray8" / "BBox_List_2017.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:4] + lines[6:]) + "\n")  # keep the three boxes that survive
    with pytest.warns(DataWarning, match=r"nih_cxr8: 2 of 4 expert boxes clipped to the image border, 0 dropped"):
        samples = load()
    got = {s.meta["image_index"] + "/" + s.meta["finding_label"]: s.boxes for s in samples}
    want = [tuple(float(v) for v in b) for _, b in NIH_BOX_TABLE[:3]]
    assert got == {"img0.png/Mass": [want[0]], "img1.png/Mass": [want[1]],
                   "img2.png/Mass": [want[2]], "img0.png/Nodule": [(10.0, 10.0, 20.0, 20.0)]}


def test_sample_with_every_box_outside_is_an_error_naming_it(tmp_path):
    base = tmp_path / "vindr-cxr" / "1.0.0"
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "annotations_test.csv").write_text(
        "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\nimg,R1,Nodule/Mass,1000,0,1200,50\n")
    write_dicom(base / "test" / "img.dicom", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match=r"annotations_test.csv line\(s\) \[2\]: every box of img / Nodule/Mass lies outside the 1000x800"):
        load_vindr_cxr(tmp_path)


def test_synthetic_loader_clips_to_the_film_header(tmp_path):
    from medfocus.datasets.synthetic import load_synthetic, write_dataset

    root = tmp_path / "syn"
    write_dataset(root, 2, seed=1, size=64, progress=False)
    man_path = root / "manifest.json"
    man = json.loads(man_path.read_text())
    k = next(i for i, d in enumerate(man["samples"]) if d["boxes"])
    man["samples"][k]["boxes"] = [[-4, 10, 30, 70], [64, 0, 80, 5]]
    man_path.write_text(json.dumps(man))
    with pytest.warns(DataWarning, match=r"synthetic: 1 of \d+ expert boxes clipped to the image border, 1 dropped"):
        samples = load_synthetic(root)
    assert samples[k].boxes == [(0.0, 10.0, 30.0, 64.0)]
    assert samples[k].meta["provenance"] == {"boxes_clipped": 1, "boxes_dropped": 1,
                                             "dataset_boxes_clipped": 1, "dataset_boxes_dropped": 1}
    man["samples"][k]["image_size"] = [65, 64]
    man_path.write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"sample #\d+: image_size \[65, 64\] differs from the 64x64"):
        load_synthetic(root)


# ---- evaluate ----------------------------------------------------------------------------------------

def _rec(gt, pred, size=(W, H), **kw):
    return dict({"model": "m", "dataset": "vindr_cxr", "index": 7, "mode": "direct", "method": "prompting",
                 "gt_boxes": gt, "pred_boxes": pred, "image_size": list(size), "_where": "p.jsonl line 3"}, **kw)


# (gt, pred) -> IoU after clipping both to the 1000x800 image
EVAL_TABLE = [
    ([[-40, 500, 300, 860]], [[0, 500, 300, 800]], 1.0),          # the input: was 0.735
    ([[0, 500, 300, 800]], [[-40, 500, 300, 860]], 1.0),          # a prediction past the border
    ([[0, 0, 100, 100]], [[-100, -100, 100, 100]], 1.0),
    ([[0, 0, 100, 100]], [[1000, 0, 1100, 100]], 0.0),            # wholly outside: empty prediction
    ([[0, 0, 100, 100]], [[50, 0, 150, 100], [900, 700, 1200, 900]], 50 * 100 / (100 * 150 + 100 * 100)),
]


@pytest.mark.parametrize("gt,pred,iou", EVAL_TABLE)
def test_evaluate_clips_boxes_to_the_image(gt, pred, iou):
    row = evaluate_records([_rec(gt, pred)]).iloc[0]
    assert row["error"] is None or (isinstance(row["error"], float) and math.isnan(row["error"]))
    assert row["iou"] == pytest.approx(iou, abs=1e-12)


@pytest.mark.parametrize("gt,why", [
    ([[300, 500, -40, 860]], "inverted"),
    ([[0, 0, 10, 10], [5, 9, 6, 2]], "inverted"),
    ([[0, 0, float("nan"), 10]], "non-finite"),
    ([[0, 0, float("inf"), 10]], "non-finite"),
])
def test_evaluate_rejects_bad_gt_naming_the_record(gt, why):
    row = evaluate_records([_rec(gt, [[0, 0, 10, 10]])]).iloc[0]
    assert math.isnan(row["iou"])
    assert "p.jsonl line 3" in row["error"] and "m/vindr_cxr#7" in row["error"] and "gt_boxes" in row["error"]
    assert ("x1 <= x2" in row["error"]) if why == "inverted" else ("non-finite" in row["error"])
