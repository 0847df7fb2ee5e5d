"""`medfocus evaluate PREDICTIONS.jsonl --out DIR`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from click.testing import CliRunner

from medfocus.cli import main


def _write_predictions(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "maps").mkdir()
    hm = np.zeros((32, 32), dtype=np.float32)
    hm[4:12, 4:12] = 1.0
    np.savez_compressed(folder / "maps" / "r1.npz", heatmap=hm)
    recs = [
        {"model": "demo", "dataset": "synthetic", "index": 0, "mode": "direct", "method": "rise",
         "gt_boxes": [[4, 4, 12, 12]], "image_size": [32, 32], "heatmap_path": "maps/r1.npz", "error": None},
        {"model": "demo", "dataset": "synthetic", "index": 0, "mode": "direct", "method": "prompting",
         "gt_boxes": [[4, 4, 12, 12]], "image_size": [32, 32], "pred_boxes": [[4, 4, 8, 12]], "error": None},
        {"model": "demo", "dataset": "synthetic", "index": 1, "mode": "direct", "method": "prompting",
         "gt_boxes": [[0, 0, 4, 4]], "image_size": [32, 32], "pred_boxes": None, "error": "unparseable output"},
    ]
    path = folder / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_evaluate_command_writes_tables(tmp_path):
    preds = _write_predictions(tmp_path / "run")
    out = tmp_path / "eval"
    # Run from another working directory: heatmap paths resolve against the JSONL's folder.
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(out), "--n-boot", "100"])
    assert res.exit_code == 0, res.output
    assert "### demo — direct" in res.output
    assert "| rise | 100.0 (no CI)" in res.output  # one record: no interval, never a zero-width one
    assert (out / "table.md").is_file() and (out / "table.csv").is_file()
    per = pd.read_csv(out / "records.csv")
    assert len(per) == 3
    rise = per[per.method == "rise"].iloc[0]
    assert rise.iou == 1.0 and rise.source == "heatmap" and rise.auprc == 1.0
    pr = per[(per.method == "prompting") & (per["index"] == 0)].iloc[0]
    assert pr.iou == 0.5 and pr.precision == 1.0 and pr.recall == 0.5
    table = pd.read_csv(out / "table.csv")
    row = table[(table.method == "prompting") & (table.metric == "iou")].iloc[0]
    assert row["mean"] == 50.0 and row["n"] == 1 and row["n_error"] == 1


def test_evaluate_command_errors(tmp_path):
    preds = _write_predictions(tmp_path / "run")
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "e"), "--metrics", "iou,bogus"])
    assert res.exit_code != 0 and "bogus" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    res = CliRunner().invoke(main, ["evaluate", str(bad), "--out", str(tmp_path / "e")])
    assert res.exit_code != 0 and "bad.jsonl is one JSON document (a list of 2 items)" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--help"])
    assert res.exit_code == 0 and "heatmap_path" in res.output


def test_evaluate_shows_the_faithfulness_columns_the_records_carry(tmp_path):
    """Records with deletion/insertion curves (``attribute --faithfulness``, the demo) get the Del./Ins. AUC
    columns by default, and the count is of records, not of the per-sample reference rows added for them."""
    recs = []
    for i, (d, ins) in enumerate(((0.2, 0.6), (0.4, 0.8))):
        recs.append({"model": "demo", "dataset": "synthetic", "index": i, "mode": "direct", "method": "occlusion",
                     "attribute": "nodule", "gt_boxes": [[0, 0, 8, 8]], "image_size": [32, 32], "pred_boxes": [[0, 0, 8, 8]], "error": None,
                     "deletion_auc": d, "insertion_auc": ins,
                     "faithfulness": {"random": {"deletion_auc": 0.5, "insertion_auc": 0.5},
                                      "expert_box": {"deletion_auc": 0.1, "insertion_auc": 0.9}}})
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "e"), "--n-boot", "50", "--no-baselines"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "e" / "table.md").read_text()
    assert "Synthetic (n=2) Del. AUC" in md and "Synthetic (n=2) Ins. AUC" in md
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")}
    # 2 samples: means without intervals (a percentile bootstrap "95%" interval on 2 values is their range)
    assert rows["occlusion"].endswith("| 100.0 (no CI) | 30.0 (no CI) | 70.0 (no CI) |")
    assert rows["reference: random map"].endswith("| – | 50.0 (no CI) | 50.0 (no CI) |")
    assert rows["reference: expert-box map"].endswith("| – | 10.0 (no CI) | 90.0 (no CI) |")
    assert "2 records (0 with errors) + 4 faithfulness reference rows" in res.output
    # records without curves: the localisation columns only; an explicit --metrics is kept as given
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("deletion_auc", "insertion_auc", "faithfulness")}) + "\n"
                             for r in recs))
    res = CliRunner().invoke(main, ["evaluate", str(plain), "--out", str(tmp_path / "p"), "--n-boot", "50"])
    assert res.exit_code == 0 and "Del. AUC" not in (tmp_path / "p" / "table.md").read_text()
    assert "2 records (0 with errors) + " in res.output and "reference rows" not in res.output
    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "i"), "--n-boot", "50", "--metrics", "iou"])
    assert res.exit_code == 0 and "Del. AUC" not in (tmp_path / "i" / "table.md").read_text()


def test_evaluate_refuses_a_coerced_index(tmp_path):
    """`"index": "0"` (or 1.7, true) would score a record against another record's sample: refused,
    naming the file, line and field; the same record with an integer index is scored."""
    preds = _write_predictions(tmp_path / "run")
    lines = preds.read_text().splitlines()
    for bad in ('"0"', "1.7", "true"):
        rec = json.loads(lines[1])
        lines_bad = [lines[0], json.dumps(rec).replace('"index": 0', f'"index": {bad}'), lines[2]]
        preds.write_text("\n".join(lines_bad) + "\n")
        res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "e"), "--n-boot", "10"])
        assert res.exit_code == 1, res.output
        assert f"predictions.jsonl line 2: field 'index' must be a non-negative integer, got {json.loads(bad)!r}" in res.output
        assert "Traceback" not in res.output and not (tmp_path / "e" / "table.md").exists()
    preds.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(main, ["evaluate", str(preds), "--out", str(tmp_path / "e"), "--n-boot", "10"])
    assert res.exit_code == 0 and len(pd.read_csv(tmp_path / "e" / "records.csv")) == 3, res.output


def test_evaluate_says_why_records_without_expert_boxes_are_not_scored(tmp_path):
    """`explain` without --box writes records with no gt_boxes: evaluate says they are not scored and why."""
    folder = tmp_path / "run"
    folder.mkdir()
    recs = [{"model": "demo", "dataset": "files", "index": i, "mode": "direct", "method": "prompting", "gt_boxes": [],
             "image_size": [32, 32], "pred_boxes": [[4, 4, 8, 12]], "error": None} for i in range(3)]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = CliRunner().invoke(main, ["evaluate", str(folder / "predictions.jsonl"), "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert "3 of these records have no expert boxes" in res.output and "without --box" in res.output
    assert "nothing was scored" in res.output
    # a run with scored records says how many were left out, not "nothing was scored"
    res = CliRunner().invoke(main, ["evaluate", str(_write_predictions(tmp_path / "run2")), "--out", str(tmp_path / "e2")])
    assert res.exit_code == 0 and "no expert boxes" not in res.output


def test_evaluate_on_a_benchmark_split_says_it_is_the_wrong_kind_of_file(tmp_path):
    """A split (a JSON list, pretty-printed or on one line) sits beside the prediction files: evaluate names
    what it is and what was expected, instead of 'line 1: not a valid JSON record' (which reads as corrupt data)."""
    rows = [{"model": "demo", "dataset": "synthetic", "index": i, "answer": "Yes"} for i in range(3)]
    for name, text in (("pretty.json", json.dumps(rows, indent=2)), ("flat.json", json.dumps(rows) + "\n")):
        (tmp_path / name).write_text(text)
        res = CliRunner().invoke(main, ["evaluate", str(tmp_path / name), "--out", str(tmp_path / "e")])
        assert res.exit_code == 1, res.output
        assert f"{tmp_path / name} is one JSON document (a list of 3 items), not JSON lines" in res.output
        assert "expected prediction records" in res.output and "medfocus bench build" in res.output
        assert "Traceback" not in res.output
    # a damaged JSON-lines file keeps its line-numbered message
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "e2")])
    assert res.exit_code == 1 and "bad.jsonl line 2: not a valid JSON record" in res.output, res.output
