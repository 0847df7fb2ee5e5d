"""NIH ChestX-ray8 box loader: every row of the real shared box list, order, boxes, clipping, errors."""

from __future__ import annotations

import gzip
import io
import re
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
        "a.png,Nodule,1014,1014,20,20,,",  # past the 1024 x 1024 border: clipped to (1014, 1014, 1024, 1024)
        "a.png,Nodule,5,5,10,10,,",        # same (image, finding): one sample with both boxes
        "a.png,Mass,1100,10,5,5,,",        # wholly outside with another Mass box: dropped
        "a.png,Mass,1,1,2,2,,",
        "b.png,Infiltrate,0,0,8,8,,",
    ])
    _blank_png(base / "images" / "a.png")
    _blank_png(base / "images" / "b.png")
    with pytest.warns(UserWarning, match="1 of 6 expert boxes clipped.*1 dropped"):
        samples = load_dataset("nih", tmp_path)
    got = [(s.meta["image_index"], s.attribute, s.boxes) for s in samples]
    assert got == [
        ("a.png", "mass", [(1.0, 1.0, 3.0, 3.0)]),
        ("a.png", "nodule", [(1014.0, 1014.0, 1024.0, 1024.0), (5.0, 5.0, 15.0, 15.0)]),
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
    # a negative or zero extent is reported as the list gives it, not as a converted (x1, y1, x2, y2) box
    ("a.png,Mass,300,300,-100,300", "line 2: w must be > 0 (the box's width in pixels), got w=-100 (x, y, w, h = 300, 300, -100, 300)"),
    ("a.png,Mass,300,300,100,0", "line 2: h must be > 0 (the box's height in pixels), got h=0"),
    ("a.png,Mass,1,x,2,2", "line 2: columns x, y, w, h must be numbers"),
    ("a.png,Mass,1,,2,2", "line 2: columns x, y, w, h must be finite"),
    ("a.png,Mass,1300,300,2,2", "every box of a.png / Mass lies outside"),
])
def test_malformed_rows_are_errors_naming_the_line(tmp_path, row, message):
    base = tmp_path / "nih-chestxray8"
    _write_list(base / "BBox_List_2017.csv", [row])
    _blank_png(base / "images" / "a.png")
    with pytest.raises(DataError, match=re.escape(message)):
        load_nih_cxr8(tmp_path)


def test_missing_files_name_the_layout_and_the_source(tmp_path):
    with pytest.raises(DataError, match="BBox_List_2017.csv(.|\n)*nihcc.app.box.com"):
        load_nih_cxr8(tmp_path)
    _write_list(tmp_path / "nih-chestxray8" / "BBox_List_2017.csv", ["a.png,Mass,1,1,2,2"])
    with pytest.raises(DataError, match=r"BBox_List_2017.csv: none of its 1 film\(s\) was found in .*images \(no film found\): a.png \(line\(s\) \[2\]\)"):
        load_nih_cxr8(tmp_path)
    assert load_nih_cxr8(tmp_path, read_sizes=False)[0].image_size == (0, 0)


# ---- the 1024x1024 frame (new-user report 2, item 3) ----------------------------------------------

TRIAL_ROWS = ["00000000_000.png,Infiltrate,100,150,200,150,,",   # (100, 150, 300, 300) on the original
              "00000002_000.png,Cardiomegaly,120,140,280,160,,"]  # (120, 140, 400, 300)


def _nih_root(tmp_path: Path, size: tuple[int, int], rows=TRIAL_ROWS) -> Path:
    base = tmp_path / "nih-chestxray8"
    _write_list(base / "BBox_List_2017.csv", rows)
    for name in ("00000000_000.png", "00000002_000.png"):
        _blank_png(base / "images" / name, size)
    return base


def test_resized_film_is_refused_naming_file_size_and_the_original_frame(tmp_path):
    """On the 256x256 copies the old loader clipped (100, 150, 300, 300) to (100, 150, 256, 256) with only
    a "clipped" warning: every IoU then compares against a box in the wrong frame."""
    base = _nih_root(tmp_path, (256, 256))
    with pytest.raises(DataError) as ei:
        load_dataset("nih_cxr8", tmp_path)
    msg = str(ei.value)
    assert "boxes are in the pixels of the 1024x1024 original films, but 2 of 2 films are not 1024x1024" in msg
    assert f"{base / 'images' / '00000000_000.png'} is 256x256" in msg
    assert f"{base / 'images' / '00000002_000.png'} is 256x256" in msg
    assert "rescale_boxes=True" in msg and "--rescale-boxes on the command line" in msg


def test_the_command_line_opts_in_with_rescale_boxes(tmp_path):
    """attribute and bench build take --rescale-boxes to the NIH loader; it is refused for other datasets."""
    from click.testing import CliRunner

    from medfocus.cli import main
    from medfocus.commands.attribute import build_items

    _nih_root(tmp_path, (256, 256))
    with pytest.raises(DataError, match="--rescale-boxes"):
        build_items(bench=(), dataset="nih_cxr8", data_root=str(tmp_path), models=["demo"], modes=["direct"])
    with pytest.warns(UserWarning, match="rescaled"):
        items = build_items(bench=(), dataset="nih_cxr8", data_root=str(tmp_path), models=["demo"], modes=["direct"],
                            rescale_boxes=True)
    assert sorted(tuple(it.sample.boxes) for it in items) == [((25.0, 37.5, 75.0, 75.0),), ((30.0, 35.0, 100.0, 75.0),)]
    for cmd in (["attribute", "--dataset", "synthetic", "--model", "demo", "--out", str(tmp_path / "o")],
                ["bench", "build", "--dataset", "synthetic", "--model", "demo", "--out", str(tmp_path / "b")]):
        res = CliRunner().invoke(main, [*cmd, "--data-root", str(tmp_path), "--rescale-boxes"])
        assert res.exit_code != 0 and "--rescale-boxes applies to nih_cxr8 films only" in res.output, res.output


def test_rescale_boxes_opt_in_scales_to_the_film(tmp_path):
    _nih_root(tmp_path, (256, 256))
    with pytest.warns(UserWarning, match=r"boxes of 2 of 2 films rescaled from the 1024x1024 originals"):
        samples = load_dataset("nih_cxr8", tmp_path, rescale_boxes=True)
    # the trial's expected boxes: (100, 150, 300, 300) / 4 and (120, 140, 400, 300) / 4
    assert [s.boxes for s in samples] == [[(25.0, 37.5, 75.0, 75.0)], [(30.0, 35.0, 100.0, 75.0)]]
    assert [s.image_size for s in samples] == [(256, 256), (256, 256)]
    assert [s.meta["box_scale"] for s in samples] == [0.25, 0.25]
    assert samples[0].meta["boxes_xywh"] == [[100.0, 150.0, 200.0, 150.0]]  # the list's values, untouched
    assert samples[0].meta["provenance"]["boxes_clipped"] == 0


def test_rescale_boxes_on_originals_changes_nothing_and_refuses_non_square_films(tmp_path):
    _nih_root(tmp_path / "orig", (1024, 1024))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rescale warning, no clip warning
        samples = load_nih_cxr8(tmp_path / "orig", rescale_boxes=True)
    assert [s.boxes for s in samples] == [[(100.0, 150.0, 300.0, 300.0)], [(120.0, 140.0, 400.0, 300.0)]]
    assert [s.meta["box_scale"] for s in samples] == [1.0, 1.0]
    _nih_root(tmp_path / "crop", (512, 400))
    with pytest.raises(DataError, match=r"00000000_000.png is 512x400.*non-square film is not a uniformly resized"):
        load_nih_cxr8(tmp_path / "crop", rescale_boxes=True)


# ---- empty lists, missing films (items 9, 14) -----------------------------------------------------

def test_header_only_list_is_an_error_naming_it(tmp_path):
    base = tmp_path / "nih-chestxray8"
    _write_list(base / "BBox_List_2017.csv", [])
    with pytest.raises(DataError, match=r"BBox_List_2017.csv: the box list holds no box rows \(only a header, or nothing\)"):
        load_dataset("nih_cxr8", tmp_path)


def test_missing_films_are_counted_and_listed(tmp_path):
    base = tmp_path / "nih-chestxray8"
    names = [f"0000000{i}_000.png" for i in range(7)]
    _write_list(base / "BBox_List_2017.csv", [f"{n},Mass,10,10,20,20,," for n in names])
    for n in names[:2]:
        _blank_png(base / "images" / n)
    with pytest.raises(DataError) as ei:
        load_nih_cxr8(tmp_path)
    msg = str(ei.value)
    assert "BBox_List_2017.csv: 5 of its 7 films are missing in " in msg
    # the first five missing, in list order, with their lines; the rest counted
    assert "00000002_000.png (line(s) [4]), 00000003_000.png (line(s) [5]), 00000004_000.png (line(s) [6]), " \
           "00000005_000.png (line(s) [7]), 00000006_000.png (line(s) [8])." in msg
    assert "00000000_000.png" not in msg and "no option to skip missing films" in msg


def test_real_list_with_one_archive_worth_of_films_counts_the_missing(shared_data, real_list, tmp_path):
    """The trial's case: the redistributed list and only some films (here the first 3 in sorted order)."""
    images = tmp_path / "nih-chestxray8" / "images"
    present = sorted(real_list["image"].unique())[:3]
    for name in present:
        _blank_png(images / name)
    with pytest.raises(DataError) as ei:
        load_nih_cxr8(tmp_path, annotations=shared_data / "nih_bbox_list_2017.csv.gz")
    msg = str(ei.value)
    assert f"nih_bbox_list_2017.csv.gz: {880 - 3} of its 880 films are missing in {images}: " in msg
    first_missing = sorted(real_list["image"].unique())[3]
    lines = [i + 2 for i in real_list.index[real_list["image"] == first_missing]]
    assert f": {first_missing} (line(s) {lines})," in msg and f"... and {877 - 5} more." in msg


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


class _BlobReader:
    """A model with known evidence: "Yes" iff the film holds a saturated blob (>= 40 pixels at 255)."""

    name = family = "blob"

    def generate(self, images, questions, *, max_new_tokens=64, batch_size=8):
        return ["Yes" if int((np.asarray(im) == 255).sum()) >= 40 else "No" for im in images]


def test_bench_build_on_nih_with_transplant_and_inpaint(tmp_path, monkeypatch):
    """`medfocus bench build --dataset nih_cxr8` runs the causal filter on NIH-layout films with the
    CPU editors; a blob inside the expert box is edited out (answer flips), the background edit keeps it."""
    import json

    from click.testing import CliRunner

    import medfocus.commands.bench as bench_cmd
    from medfocus.cli import main
    from medfocus.datasets.synthetic import write_reference_pool
    from medfocus.io import read_image

    pool = write_reference_pool(tmp_path / "pool", n=3, seed=5, size=128)
    films = sorted((pool / "images").glob("*.png"))
    base = tmp_path / "data" / "nih-chestxray8"
    rows = []
    k = 8  # NIH films are 1024x1024 (the loader refuses other sizes): the 128-px pool films, 8x larger
    for i, (p, label) in enumerate(zip(films[:2], ("Nodule", "Effusion"))):
        img, _ = read_image(p)
        img = np.kron(np.minimum(img, 200).astype(np.uint8), np.ones((k, k), np.uint8))
        x, y = (30 + 20 * i) * k, 40 * k
        img[y : y + 12 * k, x : x + 12 * k] = 255
        name = f"0000000{i}_000.png"
        (base / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(base / "images" / name, compress_level=1)
        rows.append(f"{name},{label},{x - 4 * k},{y - 4 * k},{20 * k},{20 * k},,")
    _write_list(base / "BBox_List_2017.csv", rows)
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: _BlobReader())
    for editor, extra in (("inpaint", []), ("transplant", ["--reference-dir", str(pool)])):
        out = tmp_path / f"out_{editor}"
        res = CliRunner().invoke(main, ["bench", "build", "--model", "blob", "--dataset", "nih_cxr8", "--data-root", str(tmp_path / "data"),
                                        "--editor", editor, "--out", str(out), "--no-progress", *extra])
        assert res.exit_code == 0, res.output
        assert "blob / nih_cxr8 / direct: kept 2 of 2 positives (100.0%)" in res.output, res.output
        recs = json.loads((out / "blob" / "nih_cxr8" / "direct.json").read_text())
        assert [(r["attribute"], r["editor"].split("-")[0]) for r in recs] == [("nodule", editor), ("pleural effusion", editor)]
        assert recs[0]["boxes"] == [[208.0, 288.0, 368.0, 448.0]]
