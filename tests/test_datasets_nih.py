"""NIH ChestX-ray8 box loader: every row of the real shared box list, order, boxes, clipping, errors."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfocus.datasets import canonical_name, load_dataset
from medfocus.datasets._common import clip_boxes
from medfocus.datasets.nih_cxr8 import NIH_FINDINGS, load_nih_cxr8
from medfocus.errors import DataError

HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


def _blank_png(path: Path, size: tuple[int, int] = (1024, 1024)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(path, compress_level=1)


@pytest.fixture(scope="module")
def real_list(shared_data) -> pd.DataFrame:
    p = shared_data / "nih_bbox_list_2017.csv.gz"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    with gzip.open(p, "rt") as fh:
        df = pd.read_csv(fh, header=None, skiprows=1, usecols=range(6))
    df.columns = ["image", "label", "x", "y", "w", "h"]
    return df


def test_every_row_of_the_real_box_list_becomes_a_sample(shared_data, real_list, tmp_path):
    images = tmp_path / "nih-chestxray8" / "images"
    for name in real_list["image"].unique():
        _blank_png(images / name)
    samples = load_nih_cxr8(tmp_path, annotations=shared_data / "nih_bbox_list_2017.csv.gz")
    assert len(real_list) == 984 and real_list["image"].nunique() == 880
    # every line 2..985 is accounted for exactly once (each (image, finding) has one row in 2017)
    lines = sorted(ln for s in samples for ln in s.meta["lines"])
    assert lines == list(range(2, 986))
    assert len(samples) == 984 and [s.index for s in samples] == list(range(984))
    # the documented order: sorted by (Image Index, Finding Label)
    keys = [(s.meta["image_index"], s.meta["finding_label"]) for s in samples]
    assert keys == sorted(keys)
    # boxes: (x, y, x + w, y + h) of the row, on 1024 x 1024 films (none past the border in 2017)
    for s in samples:
        row = real_list.iloc[s.meta["lines"][0] - 2]
        assert (row["image"], row["label"]) == (s.meta["image_index"], s.meta["finding_label"])
        assert s.boxes == [(row["x"], row["y"], row["x"] + row["w"], row["y"] + row["h"])]
        assert s.image_size == (1024, 1024) and s.answer == "Yes"
        assert s.attribute == NIH_FINDINGS[row["label"]]
        assert s.question == f"Is there evidence of {s.attribute} in the image?"
        assert Path(s.image_path) == images / row["image"]
        assert s.meta["provenance"] == {"boxes_clipped": 0, "boxes_dropped": 0, "dataset_boxes_clipped": 0, "dataset_boxes_dropped": 0}
    counts = pd.Series([s.attribute for s in samples]).value_counts().to_dict()
    assert counts == {"atelectasis": 180, "pleural effusion": 153, "cardiomegaly": 146, "infiltration": 123, "pneumonia": 120,
                      "pneumothorax": 98, "mass": 85, "nodule": 79}


def _write_list(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def test_layout_search_grouping_and_clipping_to_the_image(tmp_path):
    base = tmp_path / "nih-chestxray8"
    _write_list(base / "BBox_List_2017.csv", [
        "b.png,Effusion,10,20,30,40,,",
        "a.png,Nodule,90,90,20,20,,",   # past the 100 x 100 border: clipped to (90, 90, 100, 100)
        "a.png,Nodule,5,5,10,10,,",     # same (image, finding): one sample with both boxes
        "a.png,Mass,120,10,5,5,,",      # wholly outside with another Mass box: dropped
        "a.png,Mass,1,1,2,2,,",
        "b.png,Infiltrate,0,0,8,8,,",
    ])
    _blank_png(base / "images" / "a.png", (100, 100))
    _blank_png(base / "images" / "b.png", (64, 80))
    with pytest.warns(UserWarning, match="1 of 6 expert boxes clipped.*1 dropped"):
        samples = load_dataset("nih", tmp_path)
    got = [(s.meta["image_index"], s.attribute, s.boxes) for s in samples]
    assert got == [
        ("a.png", "mass", [(1.0, 1.0, 3.0, 3.0)]),
        ("a.png", "nodule", [(90.0, 90.0, 100.0, 100.0), (5.0, 5.0, 15.0, 15.0)]),
        ("b.png", "pleural effusion", [(10.0, 20.0, 40.0, 60.0)]),
        ("b.png", "infiltration", [(0.0, 0.0, 8.0, 8.0)]),
    ]
    prov = {s.attribute: s.meta["provenance"] for s in samples}
    assert prov["nodule"]["boxes_clipped"] == 1 and prov["mass"]["boxes_dropped"] == 1
    assert prov["pleural effusion"]["dataset_boxes_clipped"] == 1 and prov["infiltration"]["boxes_clipped"] == 0
    assert samples[1].meta["lines"] == [3, 4]
    # the root may also point at nih-chestxray8 itself
    with pytest.warns(UserWarning):
        assert len(load_nih_cxr8(base)) == 4
    assert canonical_name("ChestX-ray8") == "nih_cxr8"


@pytest.mark.parametrize("row, message", [
    ("a.png,Hernia,1,1,2,2", "line 2: unknown Finding Label 'Hernia'"),
    ("a.png,Mass,1,1,-2,2", "line 2: field 'x,y,w,h'"),
    ("a.png,Mass,1,x,2,2", "line 2: columns x, y, w, h must be numbers"),
    ("a.png,Mass,1,,2,2", "line 2: columns x, y, w, h must be finite"),
    ("a.png,Mass,300,300,2,2", "every box of a.png / Mass lies outside"),
])
def test_malformed_rows_are_errors_naming_the_line(tmp_path, row, message):
    base = tmp_path / "nih-chestxray8"
    _write_list(base / "BBox_List_2017.csv", [row])
    _blank_png(base / "images" / "a.png", (100, 100))
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        load_nih_cxr8(tmp_path)


def test_missing_files_name_the_layout_and_the_source(tmp_path):
    with pytest.raises(DataError, match="BBox_List_2017.csv(.|\n)*nihcc.app.box.com"):
        load_nih_cxr8(tmp_path)
    _write_list(tmp_path / "nih-chestxray8" / "BBox_List_2017.csv", ["a.png,Mass,1,1,2,2"])
    with pytest.raises(DataError, match="missing image .*a.png"):
        load_nih_cxr8(tmp_path)
    assert load_nih_cxr8(tmp_path, read_sizes=False)[0].image_size == (0, 0)


def test_gzipped_list_is_read(tmp_path):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        gz.write((HEADER + "a.png,Pneumothorax,1,2,3,4,,\n").encode())
    (tmp_path / "nih-chestxray8").mkdir()
    (tmp_path / "nih-chestxray8" / "BBox_List_2017.csv.gz").write_bytes(buf.getvalue())
    s = load_nih_cxr8(tmp_path, read_sizes=False)
    assert [(x.attribute, x.boxes) for x in s] == [("pneumothorax", [(1.0, 2.0, 4.0, 6.0)])]


def test_clip_boxes_counts():
    kept, c, d = clip_boxes([(-40, 500, 300, 860), (0, 0, 10, 10), (1000, 0, 1200, 5)], (1000, 800))
    assert kept == [(0.0, 500.0, 300.0, 800.0), (0.0, 0.0, 10.0, 10.0)] and (c, d) == (1, 1)
    with pytest.raises(DataError, match="non-finite"):
        clip_boxes([(0, 0, float("nan"), 1)], (10, 10))
