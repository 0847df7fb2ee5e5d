"""`evaluate` never counts a record twice and never scores a map or a box in another frame.

* Overlapping prediction files (a merged store and its shards, one file given twice): a key counts once;
  identical copies collapse with one note naming the files and the count, different records under one
  key are an error naming both files and the key.
* A heatmap whose aspect ratio cannot be that of ``image_size`` (transposed, a square canvas map of a
  non-square film) is an error row; a downsampled map in the original aspect ratio is scored.
* Inverted predicted boxes and relative (0-1) predicted boxes on a real-sized film are error rows.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medfocus.cli import main
from medfocus.errors import DataError
from medfocus.evaluation import evaluate_record, evaluate_records, read_prediction_files
from medfocus.evaluation.records import map_fits_frame
from medfocus.io.letterbox import Letterbox, WorkFrame

# A 968x592 film (W x H) with one finding box; the exact map is 1 inside the box.
W, H = 968, 592
GT = [[100, 100, 400, 300]]


def _exact_map() -> np.ndarray:
    hm = np.zeros((H, W), dtype=np.float32)
    hm[100:300, 100:400] = 1.0
    return hm


def _rec(**kw):
    return dict({"model": "m", "dataset": "vindr_cxr", "index": 0, "mode": "direct", "method": "gradcam",
                 "gt_boxes": GT, "image_size": [W, H], "_where": "p.jsonl line 1"}, **kw)


def _ok(row) -> bool:
    return row["error"] is None


# ---- overlapping files ---------------------------------------------------------------------------
def _box_records(n: int, iou_half: bool = False):
    """``n`` box-only records on 32x32 films: GT [0,0,8,8], prediction [0,0,8,8] (IoU 1) on even indices
    and [0,0,4,8] (IoU 0.5) on odd ones."""
    out = []
    for i in range(n):
        pred = [[0, 0, 4, 8]] if i % 2 else [[0, 0, 8, 8]]
        out.append({"model": "demo", "dataset": "synthetic", "index": i, "mode": "direct", "method": "prompting",
                    "gt_boxes": [[0, 0, 8, 8]], "image_size": [32, 32], "pred_boxes": pred, "error": None})
    return out


def _write(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_the_same_file_twice_counts_each_record_once(tmp_path):
    p = _write(tmp_path / "run" / "predictions.jsonl", _box_records(4))
    out = tmp_path / "ev"
    res = CliRunner().invoke(main, ["evaluate", str(p), str(p), "--out", str(out), "--no-baselines",
                                                    "--n-boot", "200"])
    assert res.exit_code == 0, res.output + res.stderr
    table = pd.read_csv(out / "table.csv")
    row = table[table.metric == "iou"].iloc[0]
    assert row["n"] == 4 and row["mean"] == pytest.approx(75.0)
    assert len(pd.read_csv(out / "records.csv")) == 4
    assert "4 duplicate record(s)" in res.stderr and "(the same file given twice)" in res.stderr
    assert "4 records (0 with errors)" in res.stderr


def test_merged_store_and_its_shards_collapse_when_identical(tmp_path):
    # shard files hold relative heatmap paths; the merged store, in another folder, names the same .npz
    # files by another relative path: the same record
    run = tmp_path / "run"
    (run / "maps").mkdir(parents=True)
    hm = np.zeros((32, 32), np.float32)
    hm[0:8, 0:8] = 1.0
    np.savez_compressed(run / "maps" / "a.npz", heatmap=hm)
    rec = {"model": "demo", "dataset": "synthetic", "index": 0, "mode": "direct", "method": "rise",
           "gt_boxes": [[0, 0, 8, 8]], "image_size": [32, 32], "heatmap_path": "maps/a.npz", "error": None}
    shard0 = _write(run / "predictions.shard-0.jsonl", [rec])
    shard1 = _write(run / "predictions.shard-1.jsonl", _box_records(3)[1:])
    merged = _write(tmp_path / "merged" / "predictions.jsonl", [dict(rec, heatmap_path="../run/maps/a.npz"), *_box_records(3)[1:]])
    recs, note = read_prediction_files([merged, shard0, shard1])
    assert len(recs) == 3
    assert note is not None and note.startswith("3 duplicate record(s)")
    assert f"1 of {shard0} already in {merged}" in note and f"2 of {shard1} already in {merged}" in note
    # no overlap: no note
    recs, note = read_prediction_files([shard0, shard1])
    assert len(recs) == 3 and note is None


def test_different_records_under_one_key_are_an_error_naming_files_and_key(tmp_path):
    a = _write(tmp_path / "a" / "predictions.jsonl", _box_records(2))
    changed = _box_records(2)
    changed[1]["pred_boxes"] = [[0, 0, 8, 8]]
    b = _write(tmp_path / "b" / "predictions.jsonl", changed)
    with pytest.raises(DataError) as ei:
        read_prediction_files([a, b])
    msg = str(ei.value)
    assert str(a) in msg and str(b) in msg and "1 key(s)" in msg
    assert "demo/synthetic#1 direct prompting (differs in pred_boxes)" in msg
    res = CliRunner().invoke(main, ["evaluate", str(a), str(b), "--out", str(tmp_path / "ev")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "demo/synthetic#1 direct prompting" in res.output and not (tmp_path / "ev" / "table.csv").exists()


# ---- heatmap frame ---------------------------------------------------------------------------------
def test_exact_and_downsampled_maps_are_scored():
    row = evaluate_record(_rec(heatmap=_exact_map()))
    assert _ok(row) and row["iou"] == 1.0 and row["pointing_game"] == 1.0
    # half resolution in the same aspect ratio (a legitimate stored resampling): same box, same score
    half = _exact_map()[::2, ::2]
    assert half.shape == (296, 484)
    row = evaluate_record(_rec(heatmap=half))
    assert _ok(row), row["error"]
    assert row["iou"] == pytest.approx(1.0, abs=0.02) and row["pointing_game"] == 1.0


def test_coarse_map_of_a_nearly_square_film_is_scored_with_one_warning_naming_it():
    """An 8x8 or 16x16 map of a 1841x1955 film is a legitimate rounding of its frame and of a square one alike:
    scored, but said (once, counted); a map in the film's own frame or of a square film is not warned about."""
    import warnings

    from medfocus.errors import DataWarning

    size = [1841, 1955]
    recs = [_rec(index=i, image_size=size, gt_boxes=[[100, 100, 900, 900]], heatmap=np.random.default_rng(i).random((g, g)),
                 _where=f"p.jsonl line {i + 1}") for i, g in enumerate((8, 16))]
    recs.append(_rec(index=2, image_size=size, gt_boxes=[[100, 100, 900, 900]], heatmap=np.ones((1955, 1841), np.float32)))
    recs.append(_rec(index=3, image_size=[448, 448], gt_boxes=[[10, 10, 90, 90]], heatmap=np.ones((16, 16), np.float32)))
    with pytest.warns(DataWarning, match=r"^2 heatmaps were resized onto non-square films .*first: p\.jsonl line 1: .*image_size \[1841, 1955\]"):
        df = evaluate_records(recs)
    assert df["error"].isna().all() and list(df.columns) == list(evaluate_records(recs[2:]).columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        evaluate_records(recs[2:])  # nothing ambiguous: silent
    row = evaluate_record(_rec(heatmap=np.ones((16, 16), np.float32)))  # the 968x592 film: refused, as before
    assert row["error"] is not None and "is not the frame of image_size [968, 592]" in row["error"]


@pytest.mark.parametrize("which", ["transposed", "canvas"])
def test_map_in_another_frame_is_an_error_row(which):
    if which == "transposed":
        hm = _exact_map().T.copy()  # (968, 592): today's code scored it IoU 0.398
    else:  # the exact map letterboxed onto the model's 224x224 canvas: today's code scored it IoU 0.58
        hm = Letterbox.fit((W, H), 224).map_to_canvas(_exact_map())
    row = evaluate_record(_rec(heatmap=hm))
    assert row["error"] is not None and math.isnan(row["iou"]) and math.isnan(row["pointing_game"])
    h, w = hm.shape
    assert f"heatmap shape {h}x{w}" in row["error"] and f"image_size [{W}, {H}]" in row["error"]
    assert f"expected {H}x{W}" in row["error"] and "record m/vindr_cxr#0 (gradcam)" in row["error"]


def test_map_fits_frame_accepts_every_work_frame_rounding_and_rejects_other_aspects():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w0, h0 = (int(v) for v in rng.integers(1, 6000, size=2))
        side = int(rng.integers(1, 3000))
        f = WorkFrame.of((w0, h0), side)
        assert map_fits_frame((f.work_h, f.work_w), w0, h0), (w0, h0, side, f)
    assert map_fits_frame((592, 968), 968, 592) and map_fits_frame((593, 968), 968, 592)
    assert not map_fits_frame((593, 967), 968, 592)  # one pixel off each way: no single scale gives it
    assert not map_fits_frame((968, 592), 968, 592)
    assert not map_fits_frame((224, 224), 968, 592) and not map_fits_frame((16, 16), 968, 592)
    assert map_fits_frame((16, 16), 448, 448)  # a token grid of a square film is its frame resampled
    assert not map_fits_frame((296, 490), 968, 592)  # 6 columns off at half scale: another aspect ratio


# ---- predicted boxes ---------------------------------------------------------------------------------
def test_inverted_predicted_box_is_an_error_not_a_miss():
    row = evaluate_record(_rec(pred_boxes=[[400, 300, 100, 100]]))
    assert row["error"] is not None and "pred_boxes" in row["error"] and "x1 <= x2" in row["error"]
    assert math.isnan(row["iou"])


def test_relative_predicted_boxes_on_a_real_film_are_an_error():
    row = evaluate_record(_rec(pred_boxes=[[0.1, 0.17, 0.41, 0.5]]))
    assert row["error"] is not None and "within [0, 1]" in row["error"] and f"{W}x{H}" in row["error"]
    assert "record m/vindr_cxr#0" in row["error"] and math.isnan(row["iou"])
    # the same box in pixels is scored
    row = evaluate_record(_rec(pred_boxes=[[0.1 * W, 0.17 * H, 0.41 * W, 0.5 * H]]))
    assert _ok(row) and 0 < row["iou"] < 1
    # a degenerate "no box" output [0, 0, 0, 0] is a miss (IoU 0), not a unit error
    row = evaluate_record(_rec(pred_boxes=[[0, 0, 0, 0]]))
    assert _ok(row) and row["iou"] == 0.0
    # on a tiny film a box inside [0, 1] is a plausible pixel box
    row = evaluate_record(_rec(gt_boxes=[[0, 0, 1, 1]], image_size=[2, 2], pred_boxes=[[0, 0, 1, 1]]))
    assert _ok(row) and row["iou"] == 1.0
