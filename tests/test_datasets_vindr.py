"""VinDr-CXR loader: both schemas, benchmark index order, DICOM sizes, errors, registry + data root."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfocus.datasets import canonical_name, list_datasets, load_dataset, resolve_data_root
from medfocus.datasets.vindr_cxr import load_vindr_cxr
from medfocus.errors import ConfigError, DataError
from medfocus.io import read_image, write_dicom

# Deliberately out of order: image "b" before "a", classes unsorted, a "No finding" row,
# two radiologists boxing the same finding, and a half-integer coordinate (Python rounds half to even).
PHYSIONET_ROWS = [
    ("bbb", "R1", "Pleural effusion", 10.0, 20.0, 30.5, 40.0),
    ("aaa", "R2", "No finding", "", "", "", ""),
    ("aaa", "R3", "Cardiomegaly", 5.0, 6.0, 50.0, 60.0),
    ("bbb", "R1", "Aortic enlargement", 1.4, 2.6, 3.5, 4.5),
    ("aaa", "R1", "Aortic enlargement", 7.0, 8.0, 9.0, 10.0),
    ("bbb", "R2", "Pleural effusion", 12.0, 22.0, 32.0, 42.0),
    ("ccc", "R3", "No finding", "", "", "", ""),
]


def _write_physionet(root: Path, rows=PHYSIONET_ROWS, header=("image_id", "rad_ID", "class_name", "x_min", "y_min", "x_max", "y_max")):
    base = root / "vindr-cxr" / "1.0.0"
    (base / "annotations").mkdir(parents=True)
    with open(base / "annotations" / "annotations_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    sizes = {"aaa": (64, 48), "bbb": (40, 70), "ccc": (16, 16)}
    for image_id, (W, H) in sizes.items():
        arr = (np.arange(W * H).reshape(H, W) % 4096).astype(np.uint16)
        write_dicom(base / "test" / f"{image_id}.dicom", arr, BitsStored=12, WindowCenter=2048, WindowWidth=4096)
    return base


def test_physionet_schema_order_boxes_and_sizes(tmp_path):
    _write_physionet(tmp_path)
    samples = load_vindr_cxr(tmp_path)
    keys = [(s.meta["image_id"], s.meta["class_name"]) for s in samples]
    assert keys == [
        ("aaa", "Aortic enlargement"),
        ("aaa", "Cardiomegaly"),
        ("bbb", "Aortic enlargement"),
        ("bbb", "Pleural effusion"),
    ]
    assert [s.index for s in samples] == [0, 1, 2, 3]
    eff = samples[3]
    assert eff.attribute == "pleural effusion"
    assert eff.question == "Is there evidence of pleural effusion in the image?"
    assert eff.answer == "Yes" and eff.dataset == "vindr_cxr"
    # round(30.5) == 30 (half to even), as the benchmark's builder stored it.
    assert eff.boxes == [(10.0, 20.0, 30.0, 40.0), (12.0, 22.0, 32.0, 42.0)]
    assert eff.meta["rad_ids"] == ["R1", "R2"]
    assert samples[2].boxes == [(1.0, 3.0, 4.0, 4.0)]
    assert samples[2].meta["boxes_raw"] == [[1.4, 2.6, 3.5, 4.5]]
    assert eff.image_size == (40, 70) and samples[0].image_size == (64, 48)
    img, size = read_image(eff.image_path)
    assert size == (40, 70) and img.shape == (70, 40)
    # "ccc" has only "No finding": no sample.
    assert all(s.meta["image_id"] != "ccc" for s in samples)


def test_original_case_option(tmp_path):
    _write_physionet(tmp_path)
    samples = load_vindr_cxr(tmp_path / "vindr-cxr" / "1.0.0", lowercase=False)
    assert samples[0].attribute == "Aortic enlargement"
    assert samples[0].question == "Is there evidence of Aortic enlargement in the image?"


def test_kaggle_schema_from_real_excerpt(tmp_path, shared_data):
    excerpt = shared_data / "vindr_cxr_annotations_excerpt.csv"
    df = pd.read_csv(excerpt)
    (tmp_path / "train").mkdir()
    (tmp_path / "train.csv").write_bytes(excerpt.read_bytes())  # a temp copy in the Kaggle layout
    samples = load_vindr_cxr(tmp_path, split="train", read_sizes=False)
    # Reference: the benchmark's grouping rule computed independently with pandas.
    kept = df[df["class_name"] != "No finding"]
    groups = list(kept.groupby(["image_id", "class_name"], sort=True).groups)
    assert [(s.meta["image_id"], s.meta["class_name"]) for s in samples] == groups
    counts = kept.groupby(["image_id", "class_name"], sort=True).size().tolist()
    assert [len(s.boxes) for s in samples] == counts
    assert sum(counts) == len(kept)
    s = samples[0]
    row = kept[(kept.image_id == s.meta["image_id"]) & (kept.class_name == s.meta["class_name"])].iloc[0]
    assert s.boxes[0] == tuple(float(round(row[c])) for c in ("x_min", "y_min", "x_max", "y_max"))
    assert s.meta["class_id"] == int(row["class_id"])
    assert s.image_path.endswith(f"train/{s.meta['image_id']}.dicom")
    assert all(s.image_size == (0, 0) for s in samples)


def test_missing_annotations_and_images_name_the_file(tmp_path):
    with pytest.raises(DataError, match="annotations_test.csv") as ei:
        load_vindr_cxr(tmp_path)
    assert "expected layout" in str(ei.value)
    base = _write_physionet(tmp_path)
    (base / "test" / "bbb.dicom").unlink()
    with pytest.raises(DataError, match="bbb.dicom"):
        load_vindr_cxr(tmp_path)


def test_bad_rows_are_reported_with_line(tmp_path):
    rows = list(PHYSIONET_ROWS)
    rows[2] = ("aaa", "R3", "Cardiomegaly", "", "", "", "")
    _write_physionet(tmp_path, rows=rows)
    with pytest.raises(DataError, match="line 4"):
        load_vindr_cxr(tmp_path)


def test_missing_column_is_named(tmp_path):
    _write_physionet(tmp_path, rows=[r[:6] for r in PHYSIONET_ROWS], header=("image_id", "rad_ID", "class_name", "x_min", "y_min", "x_max"))
    with pytest.raises(DataError, match="y_max"):
        load_vindr_cxr(tmp_path)


def test_registry_and_data_root(tmp_path, monkeypatch):
    assert set(list_datasets()) >= {"imagenome", "vindr_cxr", "padchest_gr", "synthetic"}
    assert canonical_name("VinDR-CXR-Attr") == "vindr_cxr"
    with pytest.raises(ConfigError, match="unknown dataset"):
        canonical_name("mnist")
    _write_physionet(tmp_path)
    monkeypatch.delenv("MEDFOCUS_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match="MEDFOCUS_DATA_ROOT"):
        resolve_data_root(None)
    assert resolve_data_root(None, required=False) is None
    monkeypatch.setenv("MEDFOCUS_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root(tmp_path / "vindr-cxr") == tmp_path / "vindr-cxr"  # explicit wins
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_data_root(tmp_path / "nope")
    samples = load_dataset("vindr-cxr")
    assert len(samples) == 4 and samples[3].attribute == "pleural effusion"
