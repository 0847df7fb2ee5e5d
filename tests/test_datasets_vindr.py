"""VinDr-CXR loader: both schemas, benchmark index order, DICOM sizes, errors, registry + data root."""

from __future__ import annotations

import csv
import re
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


def _write_annotations(root: Path, header, rows) -> Path:
    """``<root>/vindr-cxr/1.0.0/annotations/annotations_test.csv`` with ``header`` and ``rows``; returns the
    layout's base folder."""
    base = root / "vindr-cxr" / "1.0.0"
    (base / "annotations").mkdir(parents=True)
    with open(base / "annotations" / "annotations_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return base


def _write_physionet(root: Path, rows=PHYSIONET_ROWS, header=("image_id", "rad_ID", "class_name", "x_min", "y_min", "x_max", "y_max")):
    base = _write_annotations(root, header, rows)
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


# ---- new-user report 2: empty CSVs (item 9), zero-area boxes and case variants (12), missing films (14),
# ---- downsampled PNG/JPEG copies (3) ----------------------------------------------------------------

HEADER = ("image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max")


def _vindr_png_root(root: Path, rows, films: dict[str, tuple[int, int]]) -> Path:
    """PhysioNet layout with 8-bit PNG films of the given (W, H) instead of DICOMs."""
    from PIL import Image

    base = _write_annotations(root, HEADER, rows)
    (base / "test").mkdir()
    for image_id, (W, H) in films.items():
        Image.fromarray(np.zeros((H, W), np.uint8)).save(base / "test" / f"{image_id}.png")
    return base / "annotations" / "annotations_test.csv"


@pytest.mark.parametrize("rows, why", [
    ([], r"no positive finding rows \(only a header, no rows\)"),
    ([("p01", "R1", "No finding", "", "", "", ""), ("p02", "R2", " no Finding ", "", "", "", "")],
     r"no positive finding rows \(all 2 rows are 'No finding'\)"),
])
def test_csv_without_positive_rows_is_an_error_naming_it(tmp_path, rows, why):
    annotations = _vindr_png_root(tmp_path, rows, {"p01": (64, 64), "p02": (64, 64)})
    with pytest.raises(DataError, match=re.escape(str(annotations)) + ": " + why):
        load_dataset("vindr_cxr", tmp_path)


def test_attribute_on_an_empty_csv_fails_before_any_model(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import medfocus.commands.attribute as attribute_cmd
    from medfocus.cli import main

    annotations = _vindr_png_root(tmp_path / "data", [], {})

    def no_model(names):
        raise AssertionError(f"model checked/loaded: {names}")

    monkeypatch.setattr(attribute_cmd, "check_models", no_model)
    res = CliRunner().invoke(main, ["attribute", "--dataset", "vindr_cxr", "--data-root", str(tmp_path / "data"),
                                    "--model", "demo", "--method", "gradcam", "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert f"{annotations}: no positive finding rows (only a header, no rows)" in res.output, res.output
    assert "samples x" not in res.output and not (tmp_path / "out" / "predictions.jsonl").exists()


def test_zero_area_box_is_reported_as_such_naming_the_line(tmp_path):
    # the trial's row: inside the 1072x712 film, zero width -- was "lies outside the 1072x712 image"
    _vindr_png_root(tmp_path, [("p02", "R1", "Consolidation", 100, 100, 100, 200)], {"p02": (1072, 712)})
    with pytest.raises(DataError) as ei:
        load_vindr_cxr(tmp_path)
    msg = str(ei.value)
    assert "annotations_test.csv line(s) [2]: every box of p02 / Consolidation has zero area: " \
           "zero width (x_min == x_max == 100)" in msg
    assert "outside" not in msg


def test_zero_area_box_beside_real_boxes_is_dropped_with_a_warning_naming_it(tmp_path):
    rows = [("p02", "R1", "Consolidation", 10, 10, 50, 60),
            ("p02", "R2", "Consolidation", 100.2, 30, 100.4, 90),   # zero width once rounded to whole pixels
            ("p02", "R3", "Consolidation", 20, 70, 40, 70)]         # zero height
    _vindr_png_root(tmp_path, rows, {"p02": (1072, 712)})
    with pytest.warns(UserWarning, match=r"2 zero-area box\(es\) dropped \(they cover no pixel\): line 3 \(p02 / Consolidation\): "
                                         r"zero width after rounding to whole pixels \(x_min 100.2, x_max 100.4 -> 100\), "
                                         r"line 4 \(p02 / Consolidation\): zero height \(y_min == y_max == 70\)"):
        (s,) = load_vindr_cxr(tmp_path)
    assert s.boxes == [(10.0, 10.0, 50.0, 60.0)] and s.meta["zero_area_lines"] == [3, 4]
    assert s.meta["provenance"]["boxes_dropped"] == 0  # not counted as clipped away: they are inside


def test_class_names_differing_in_case_or_spaces_are_one_sample(tmp_path):
    rows = [("p01", "R1", "Consolidation", 10, 10, 50, 60),
            ("p01", "R2", "Effusion", 5, 5, 9, 9),
            ("p01", "R3", "consolidation ", 20, 20, 70, 80),
            ("p01", "R4", "CONSOLIDATION", 30, 30, 40, 40)]
    _vindr_png_root(tmp_path, rows, {"p01": (128, 128)})
    with pytest.warns(UserWarning, match=r"class names differing only in case or spaces are one finding.*"
                                         r"p01: 'CONSOLIDATION' \+ 'Consolidation' \+ 'consolidation ' \(lines \[2, 4, 5\]\)"):
        samples = load_vindr_cxr(tmp_path)
    assert [s.attribute for s in samples] == ["consolidation", "effusion"]
    # every radiologist's box in one sample, in CSV order; the order is the benchmark's (by first spelling)
    assert samples[0].boxes == [(10.0, 10.0, 50.0, 60.0), (20.0, 20.0, 70.0, 80.0), (30.0, 30.0, 40.0, 40.0)]
    assert samples[0].meta["rad_ids"] == ["R1", "R3", "R4"]
    assert samples[0].question == "Is there evidence of consolidation in the image?"


def test_missing_film_names_the_csv_lines_and_the_suffixes_tried(tmp_path):
    rows = [("p01", "R1", "Nodule/Mass", 1, 1, 5, 5), ("zz9", "R1", "Nodule/Mass", 1, 1, 5, 5),
            ("zz9", "R2", "Pleural effusion", 1, 1, 5, 5)]
    annotations = _vindr_png_root(tmp_path, rows, {"p01": (64, 64)})
    with pytest.raises(DataError) as ei:
        load_vindr_cxr(tmp_path)
    msg = str(ei.value)
    assert f"{annotations}: 1 of its 2 films are missing in {tmp_path / 'vindr-cxr' / '1.0.0' / 'test'}: " \
           "zz9.dicom/.dcm/.png/.jpg/.jpeg (line(s) [3, 4])." in msg
    assert "no option to skip missing films" in msg


def test_boxes_past_a_png_film_say_it_may_be_a_resized_copy(tmp_path):
    # boxes of the original DICOM frame (~3000 px) on a 256x256 PNG copy
    rows = [("p01", "R1", "Cardiomegaly", 100, 150, 300, 300), ("p02", "R1", "Nodule/Mass", 900, 900, 950, 950)]
    _vindr_png_root(tmp_path, rows[:1], {"p01": (256, 256)})
    with pytest.warns(UserWarning, match=r"vindr_cxr: expert boxes reach past 1 film\(s\) whose pixel frame is in doubt: "
                                         r"\S*test/p01.png \(256x256, not a DICOM\)\. VinDr-CXR boxes are in the original "
                                         r"DICOM's pixel frame, so a film that is not a DICOM .* may be a resized copy"):
        load_vindr_cxr(tmp_path)
    _vindr_png_root(tmp_path / "b", rows[1:], {"p02": (256, 256)})
    with pytest.raises(DataError, match=r"every box of p02 / Nodule/Mass lies outside the 256x256 image: .*; \S*test/p02.png "
                                        r"\(256x256, not a DICOM\): VinDr-CXR boxes .* may be a resized copy"):
        load_vindr_cxr(tmp_path / "b")


def test_boxes_past_a_dicom_film_do_not_doubt_its_frame(tmp_path):
    import warnings

    _write_physionet(tmp_path)  # aaa's Cardiomegaly box reaches past the 48-px-high DICOM
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        load_vindr_cxr(tmp_path)
    texts = [str(w.message) for w in got]
    assert any("expert boxes clipped to the image border" in t for t in texts)
    assert not any("resized copy" in t for t in texts)
