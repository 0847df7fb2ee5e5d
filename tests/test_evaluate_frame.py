"""`evaluate` scores a record in the frame of its expert boxes (original-image pixels) or not at all.

A heatmap's own shape (a 16x16 token grid, a 224x224 model canvas) is not that frame: a record with a
heatmap and no ``image_size`` is an error row naming the record and the field, never boxes and a
pointing game in the map's frame. Box-only records without ``image_size`` are scored as given
(their boxes are in the GT frame by contract) but cannot be clipped: they are flagged
(``unclipped``) and a DataWarning counts them.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medfocus.cli import main
from medfocus.errors import DataWarning
from medfocus.evaluation import evaluate_record, evaluate_records

# A 448x448 film with its finding in the bottom-right quadrant; a 16x16 map with its heat on the
# matching cells (each cell is 28x28 original pixels).
GT = [[224, 224, 448, 448]]
IOU_RESIZED = 210 ** 2 / 224 ** 2


def _grid_map() -> np.ndarray:
    hm = np.zeros((16, 16), dtype=np.float32)
    hm[8:16, 8:16] = 1.0
    return hm


def _rec(**kw):
    return dict({"model": "m", "dataset": "vindr_cxr", "index": 3, "mode": "direct", "method": "rise",
                 "gt_boxes": GT, "_where": "p.jsonl line 4"}, **kw)


def _ok(row) -> bool:
    return row["error"] is None or (isinstance(row["error"], float) and math.isnan(row["error"]))


def test_grid_map_with_image_size_is_scored_in_the_original_frame():
    row = evaluate_record(_rec(heatmap=_grid_map(), image_size=[448, 448]))
    assert _ok(row), row["error"]
    # resized bilinearly to 448x448, thresholded at the 0.9 quantile of the positive heat: the box is the
    # quadrant less the 14-pixel ramp at its inner edges, [238, 238, 448, 448] (IoU 210^2 / 224^2)
    assert row["iou"] == pytest.approx(IOU_RESIZED, abs=1e-12)
    assert row["pointing_game"] == 1.0 and row["source"] == "heatmap"
    assert row["unclipped"] is False


@pytest.mark.parametrize("shape", [(16, 16), (224, 224)])
def test_heatmap_record_without_image_size_is_an_error_naming_record_and_field(shape):
    hm = np.zeros(shape, dtype=np.float32)
    h, w = shape
    hm[h // 2:, w // 2:] = 1.0
    row = evaluate_record(_rec(heatmap=hm))
    # before: boxes in the map's own frame, a plausible row with IoU 0 and pointing game 0, no error
    assert all(math.isnan(row[m]) for m in ("iou", "f1", "pointing_game", "energy_pg", "auprc"))
    err = row["error"]
    assert "p.jsonl line 4" in err and "m/vindr_cxr#3 (rise)" in err
    assert "'image_size'" in err and "[W, H]" in err and f"{h}x{w}" in err


def _evaluate_cli(tmp_path, recs):
    """Write ``recs`` (their ``_where`` dropped: the reader sets it) as ``predictions.jsonl``, run
    ``medfocus evaluate`` on it, check it exits 0; returns the CLI result and ``records.csv``."""
    for r in recs:
        r.pop("_where")
    p = tmp_path / "predictions.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = CliRunner().invoke(main, ["evaluate", str(p), "--out", str(tmp_path / "e"), "--n-boot", "20", "--no-baselines"])
    assert res.exit_code == 0, res.output
    return res, pd.read_csv(tmp_path / "e" / "records.csv")


def test_heatmap_file_record_without_image_size_errors_in_the_cli(tmp_path):
    (tmp_path / "maps").mkdir()
    np.save(tmp_path / "maps" / "a.npy", _grid_map())
    res, per = _evaluate_cli(tmp_path, [_rec(heatmap_path="maps/a.npy"),
                                        _rec(index=4, heatmap_path="maps/a.npy", image_size=[448, 448])])
    bad, good = per[per["index"] == 3].iloc[0], per[per["index"] == 4].iloc[0]
    assert math.isnan(bad.iou) and "'image_size'" in bad.error and "predictions.jsonl line 1" in bad.error
    assert good.iou == pytest.approx(IOU_RESIZED, abs=1e-12) and not isinstance(good.error, str)
    assert "first error: m/vindr_cxr#3 rise" in res.output


def test_box_only_record_without_image_size_is_scored_unclipped_and_counted():
    recs = [_rec(method="prompting", pred_boxes=[[224, 224, 448, 336]]),
            _rec(index=4, method="prompting", pred_boxes=[[224, 224, 448, 336]]),
            _rec(index=5, method="prompting", pred_boxes=[[224, 224, 448, 336]], image_size=[448, 448])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = evaluate_records(recs)
    assert list(df["iou"]) == [0.5, 0.5, 0.5]
    assert list(df["unclipped"]) == [True, True, False]
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "2 of 3" in msg and "'image_size'" in msg and "p.jsonl line 4" in msg and "not clipped" in msg


def test_box_only_without_image_size_prints_one_warning_line(tmp_path):
    res, per = _evaluate_cli(tmp_path, [_rec(method="prompting", pred_boxes=[[224, 224, 448, 336]]),
                                        _rec(index=4, method="prompting", pred_boxes=[[224, 224, 448, 336]])])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Warning:")]
    assert len(lines) == 1 and "2 of 2" in lines[0] and "predictions.jsonl line 1" in lines[0]
    assert list(per["unclipped"]) == [True, True] and list(per["iou"]) == [0.5, 0.5]


def test_a_record_with_image_size_and_no_clipping_raises_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        df = evaluate_records([_rec(method="prompting", pred_boxes=[[224, 224, 448, 336]], image_size=[448, 448])])
    assert df["iou"].iloc[0] == 0.5
