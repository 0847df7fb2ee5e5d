"""Per-record evaluation and the bootstrap Table-1 builder."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from medfocus.errors import DataError
from medfocus.evaluation import bootstrap_ci, build_tables, evaluate_records, load_heatmap, read_prediction_records


def _rec(**kw):
    base = {"model": "m", "dataset": "vindr_cxr", "index": 0, "mode": "direct", "method": "occlusion",
            "gt_boxes": [[0, 0, 10, 10]], "image_size": [20, 20], "error": None}
    base.update(kw)
    return base


def test_evaluate_records_boxes_heatmaps_and_errors(tmp_path):
    hm = np.zeros((20, 20), dtype=np.float32)
    hm[0:5, 0:10] = 1.0  # top half of the GT box, 50 px
    np.save(tmp_path / "h.npy", hm)
    np.savez_compressed(tmp_path / "h.npz", heatmap=hm, token_heatmaps=np.zeros((2, 20, 20), np.float16))
    np.savez_compressed(tmp_path / "tok_only.npz", token_heatmaps=np.zeros((2, 20, 20)), extra_x=np.zeros(3))
    small = hm[::2, ::2].copy()  # 10x10 map, resized to image_size
    np.save(tmp_path / "small.npy", small)
    records = [
        _rec(index=0, pred_boxes=[[5, 0, 15, 10]]),
        _rec(index=1, heatmap_path="h.npy"),
        _rec(index=2, heatmap_path=str(tmp_path / "h.npz")),
        _rec(index=3, error="CUDA out of memory"),
        _rec(index=4, heatmap_path="missing.npy"),
        _rec(index=5, pred_boxes=[[0, 0, 10, 10]], heatmap_path="tok_only.npz"),
        _rec(index=6, pred_boxes=[]),
        _rec(index=7, heatmap_path="small.npy"),
        _rec(index=8, pred_boxes=[[0, 0, "x", 1]]),
    ]
    df = evaluate_records(records, base_dir=tmp_path, q=0.0, min_area=1)
    assert list(df["index"]) == list(range(9))
    r = df.set_index("index")
    assert r.loc[0, "iou"] == pytest.approx(1 / 3) and r.loc[0, "source"] == "boxes"
    assert math.isnan(r.loc[0, "pointing_game"])
    # The 10x10 map is resized (bilinear) to the 20x20 image: same place, softer edges.
    assert r.loc[7, "source"] == "heatmap" and r.loc[7, "pointing_game"] == 1.0
    assert r.loc[7, "precision"] > 0.8 and 0.4 < r.loc[7, "recall"] < 0.8
    for i in (1, 2):
        assert r.loc[i, "source"] == "heatmap"
        assert r.loc[i, "precision"] == pytest.approx(1.0) and r.loc[i, "recall"] == pytest.approx(0.5)
        assert r.loc[i, "pointing_game"] == 1.0 and r.loc[i, "energy_pg"] == pytest.approx(1.0)
        # Heat on 50 of 100 GT px: AP = 0.5 * 1 + 0.5 * (100 GT px among 400 tied px) = 0.625.
        assert r.loc[i, "auprc"] == pytest.approx(0.625)
    assert r.loc[3, "error"] == "CUDA out of memory" and math.isnan(r.loc[3, "iou"])
    assert "missing.npy" in r.loc[4, "error"]
    assert r.loc[5, "iou"] == 1.0 and math.isnan(r.loc[5, "auprc"])
    assert r.loc[6, "iou"] == 0.0 and r.loc[6, "n_pred_boxes"] == 0 and pd.isna(r.loc[6, "error"])
    assert "pred_boxes" in r.loc[8, "error"]


def test_record_without_prediction_is_an_error_and_without_gt_is_skipped(tmp_path):
    df = evaluate_records([_rec(), _rec(index=1, gt_boxes=[], pred_boxes=[[0, 0, 1, 1]]),
                           _rec(index=2, pred_boxes=[[0, 0, 10, 10]])])
    assert "pred_boxes" in df.loc[0, "error"]
    assert df.loc[1, "source"] == "no_gt" and pd.isna(df.loc[1, "error"]) and math.isnan(df.loc[1, "iou"])
    build_tables(df, tmp_path, n_boot=10)
    t = pd.read_csv(tmp_path / "table.csv")
    iou = t[t.metric == "iou"].iloc[0]
    assert iou["n"] == 1 and iou["n_error"] == 1 and iou["mean"] == 100.0  # the negative is not counted


def test_load_heatmap_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="2-D"):
        load_heatmap(tmp_path / "a.npy")
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 2)), y=np.zeros((2, 2)))
    with pytest.raises(DataError, match="heatmap"):
        load_heatmap(tmp_path / "b.npz")
    assert load_heatmap(tmp_path / "b.npz", required=False) is None


def test_read_prediction_records(tmp_path):
    p = tmp_path / "sub" / "preds.jsonl"
    p.parent.mkdir()
    p.write_text(json.dumps(_rec(pred_boxes=[[0, 0, 1, 1]])) + "\n\n" + json.dumps(_rec(index=1, pred_boxes=[])) + "\n")
    recs = read_prediction_records(p)
    assert len(recs) == 2 and recs[0]["_base_dir"] == str(p.parent)
    p.write_text("{\"a\": 1}\nnot json\n")
    with pytest.raises(DataError, match="line 2"):
        read_prediction_records(p)


def test_bootstrap_ci():
    mean, lo, hi = bootstrap_ci([0.0, 1.0] * 50, n_boot=2000, seed=1)
    assert mean == 0.5 and lo < 0.5 < hi
    # Normal approximation: half-width ~ 1.96 * 0.5 / sqrt(100) = 0.098.
    assert 0.07 < hi - mean < 0.13 and 0.07 < mean - lo < 0.13
    one = bootstrap_ci([0.3])  # one value: no interval (never a zero-width one)
    assert one[0] == 0.3 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci(list(range(12)), seed=5) == bootstrap_ci(list(range(12)), seed=5)
    assert bootstrap_ci([0.2] * 12) == pytest.approx((0.2, 0.2, 0.2))


def _table_df():
    rows = []
    for method, val in (("occlusion", 0.5), ("medfocus", 0.8), ("zzz_custom", 0.1)):
        for ds in ("padchest_gr", "imagenome"):
            for i in range(4):
                rows.append({"model": "qwen2_5_vl_3b", "dataset": ds, "mode": "direct", "method": method, "index": i,
                             "iou": val, "f1": val, "precision": 1.0, "recall": val, "error": None})
    rows.append({"model": "qwen2_5_vl_3b", "dataset": "imagenome", "mode": "direct", "method": "occlusion", "index": 9,
                 "iou": math.nan, "f1": math.nan, "precision": math.nan, "recall": math.nan, "error": "boom"})
    return pd.DataFrame(rows)


def test_build_tables_writes_csv_and_table1_markdown(tmp_path):
    md = build_tables(_table_df(), tmp_path, n_boot=200)
    csv = pd.read_csv(tmp_path / "table.csv")
    assert (tmp_path / "table.md").read_text() == md
    assert set(csv.columns) >= {"model", "mode", "method", "dataset", "metric", "mean", "ci_low", "ci_high", "n", "n_error"}
    cell = csv[(csv.method == "medfocus") & (csv.dataset == "imagenome") & (csv.metric == "iou")].iloc[0]
    # 4 samples: the mean without an interval (a percentile bootstrap interval is far too narrow below 10)
    assert cell["mean"] == pytest.approx(80.0) and math.isnan(cell["ci_low"]) and cell["n"] == 4
    occ = csv[(csv.method == "occlusion") & (csv.dataset == "imagenome") & (csv.metric == "iou")].iloc[0]
    assert occ["n"] == 4 and occ["n_error"] == 1 and occ["mean"] == pytest.approx(50.0)
    lines = md.splitlines()
    assert lines[0] == "### qwen2_5_vl_3b — direct"
    header = lines[2]
    # Datasets as column groups in the paper's order; n in the group header.
    assert header.index("ImaGenome (n=4) IoU") < header.index("PadChest-GR (n=4) IoU")
    assert "errors" in header
    rows = [l for l in lines if l.startswith("| ") and not l.startswith("| Method")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["occlusion", "medfocus", "zzz_custom"]  # methods as rows
    assert "80.0 (no CI)" in rows[1]
    assert rows[0].rstrip(" |").endswith("1")  # occlusion: one error


def test_build_tables_varied_n_and_empty(tmp_path):
    df = _table_df()
    df = df[~((df.method == "medfocus") & (df.dataset == "imagenome") & (df["index"] == 3))]
    md = build_tables(df, tmp_path, n_boot=50)
    assert "ImaGenome IoU" in md and "(n=3)" in md
    assert "No evaluated records" in build_tables(df.iloc[0:0], tmp_path / "e")
