"""ImaGenome gold loader: row filters, benchmark index order (numeric id sort), paths, boxes, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medfocus.datasets import load_dataset
from medfocus.datasets.imagenome import image_relpath, load_imagenome
from medfocus.errors import DataError, DataWarning

COLUMNS = ["image_id", "bbox", "label_name", "categoryID", "relation", "coord_original", "patient_id", "study_id", "sentence"]
# Deliberately out of order; patient 9000001 has fewer digits than 10000032: numeric order puts it
# first, string order would not. Rows with relation 0 or other categories are filtered out.
ROWS = [
    ("img_b.dcm", "left lung", "lung opacity", "anatomicalfinding", 1, "[10, 20, 30, 40]", 10000032, 50414267, "s1"),
    ("img_a.dcm", "right lung", "pneumonia", "disease", 1, "[1, 2, 3, 4]", 10000032, 50414267, "s2"),
    ("img_c.dcm", "cardiac silhouette", "enlarged cardiac silhouette", "anatomicalfinding", 1, "[5.5, 6, 70, 80]", 9000001, 59999999, "s3"),
    ("img_b.dcm", "right lung", "lung opacity", "anatomicalfinding", 1, "[50, 20, 70, 40]", 10000032, 50414267, "s4"),
    ("img_b.dcm", "left lung", "atelectasis", "anatomicalfinding", 0, "[0, 0, 9, 9]", 10000032, 50414267, "s5"),
    ("img_b.dcm", "left lung", "low lung volumes", "technicalassessment", 1, "[0, 0, 9, 9]", 10000032, 50414267, "s6"),
    ("img_a.dcm", "right lung", "lung opacity", "anatomicalfinding", 1, "[11, 12, 13, 14]", 10000032, 50414267, "s7"),
]
SIZES = {("10000032", "50414267", "img_a"): (64, 80), ("10000032", "50414267", "img_b"): (90, 60), ("9000001", "59999999", "img_c"): (50, 50)}


def _write(root, rows=ROWS):
    gold = root / "chest-imagenome" / "1.0.0" / "gold_dataset"
    gold.mkdir(parents=True)
    lines = ["\t".join(COLUMNS)] + ["\t".join(str(v) for v in r) for r in rows]
    (gold / "gold_object_attribute_with_coordinates.txt").write_text("\n".join(lines) + "\n")
    for (pid, sid, stem), (W, H) in SIZES.items():
        p = root / image_relpath(pid, sid, stem + ".dcm")
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W), 128, dtype=np.uint8)).save(p)


def test_order_filters_boxes_and_paths(tmp_path):
    _write(tmp_path)
    with pytest.warns(DataWarning, match="imagenome: 1 of 5 expert boxes clipped to the image border, 0 dropped"):
        samples = load_imagenome(tmp_path)
    keys = [(s.meta["patient_id"], s.meta["image_id"], s.attribute) for s in samples]
    assert keys == [
        ("9000001", "img_c.dcm", "enlarged cardiac silhouette"),
        ("10000032", "img_a.dcm", "lung opacity"),
        ("10000032", "img_a.dcm", "pneumonia"),
        ("10000032", "img_b.dcm", "lung opacity"),
    ]
    assert [s.index for s in samples] == [0, 1, 2, 3]
    c = samples[0]
    # [5.5, 6, 70, 80] on a 50x50 film: clipped to the image, and counted
    assert c.boxes == [(5.5, 6.0, 50.0, 50.0)] and c.concept == "cardiac silhouette"
    assert c.meta["provenance"] == {"boxes_clipped": 1, "boxes_dropped": 0, "dataset_boxes_clipped": 1, "dataset_boxes_dropped": 0}
    assert c.image_path.endswith("mimic-cxr-jpg/2.1.0/files/p90/p9000001/s59999999/img_c.jpg")
    assert c.image_size == (50, 50)
    b = samples[3]
    assert b.boxes == [(10.0, 20.0, 30.0, 40.0), (50.0, 20.0, 70.0, 40.0)]
    assert b.meta["regions"] == ["left lung", "right lung"] and b.concept is None
    assert b.image_size == (90, 60) and b.question == "Is there evidence of lung opacity in the image?"
    assert samples[2].meta["categoryID"] == "disease"
    assert image_relpath("10000032", "50414267", "abc.dcm") == "mimic-cxr-jpg/2.1.0/files/p10/p10000032/s50414267/abc.jpg"


def test_registry_dispatch(tmp_path):
    _write(tmp_path)
    assert [s.attribute for s in load_dataset("imagenome", tmp_path)][:1] == ["enlarged cardiac silhouette"]


def test_coordinates_are_parsed_without_eval(tmp_path):
    rows = list(ROWS)
    rows[3] = rows[3][:5] + ("__import__('os').getcwd()",) + rows[3][6:]
    _write(tmp_path, rows)
    with pytest.raises(DataError, match=r"line 5: field 'coord_original'"):
        load_imagenome(tmp_path)


def test_wrong_number_of_coordinates(tmp_path):
    rows = list(ROWS)
    rows[0] = rows[0][:5] + ("[1, 2, 3]",) + rows[0][6:]
    _write(tmp_path, rows)
    with pytest.raises(DataError, match="line 2"):
        load_imagenome(tmp_path)


def test_missing_table_and_image(tmp_path):
    with pytest.raises(DataError, match="gold_object_attribute_with_coordinates.txt") as ei:
        load_imagenome(tmp_path)
    assert "mimic-cxr-jpg" in str(ei.value)  # the expected layout is shown
    _write(tmp_path)
    (tmp_path / image_relpath("10000032", "50414267", "img_b.dcm")).unlink()
    with pytest.raises(DataError, match="img_b.jpg"):
        load_imagenome(tmp_path)
    assert len(load_imagenome(tmp_path, read_sizes=False)) == 4
