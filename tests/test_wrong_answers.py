"""Attributions of wrong answers are scored, and the tables say how many; `--correct-only` leaves them out.

An unfiltered ``attribute`` run attributes the model's own answer: a "No" on a film with the finding is
still scored against the expert boxes. Tables state how many scored records have such an answer, and
``evaluate --correct-only`` / ``report --correct-only`` score only records whose ``answer_parsed`` is the
``gt_answer``.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from medfocus.cli import main
from medfocus.errors import DataError
from medfocus.evaluation import evaluate_records
from medfocus.evaluation.records import answer_correct, correct_only


def _records():
    """4 samples of one method: 0 and 1 answered correctly ("Yes", IoU 1), 2 answered "No" (wrong, IoU 0),
    3 unreadable (answer_parsed null, IoU 0)."""
    out = []
    for i, (parsed, pred) in enumerate((("Yes", [[0, 0, 8, 8]]), ("Yes", [[0, 0, 8, 8]]), ("No", [[16, 16, 24, 24]]),
                                        (None, [[16, 16, 24, 24]]))):
        out.append({"model": "demo", "dataset": "synthetic", "index": i, "mode": "direct", "method": "gradcam",
                    "attribute": "nodule", "answer": {"Yes": "Yes.", "No": "No.", None: "maybe"}[parsed],
                    "answer_parsed": parsed, "gt_answer": "Yes", "gt_boxes": [[0, 0, 8, 8]], "image_size": [32, 32],
                    "pred_boxes": pred, "error": None})
    return out


def test_answer_correct_known_answers():
    r = _records()
    assert [answer_correct(x) for x in r] == [True, True, False, False]
    assert answer_correct({"answer_parsed": "yes", "gt_answer": "Yes"}) is True
    assert answer_correct({"gt_answer": "Yes"}) is None and answer_correct({"answer_parsed": "Yes"}) is None
    kept, left = correct_only(r)
    assert [x["index"] for x in kept] == [0, 1] and left == 2
    with pytest.raises(DataError, match=r"--correct-only: 1 of 2 records carry no 'answer_parsed'"):
        correct_only([r[0], {k: v for k, v in r[1].items() if k != "answer_parsed"}])


def test_tables_count_the_wrong_answers_they_score(tmp_path):
    df = evaluate_records(_records())
    assert df["answer_correct"].tolist() == [True, True, False, False]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "all"), "--n-boot", "100", "--no-baselines"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "all" / "table.csv")
    row = table[table.metric == "iou"].iloc[0]
    assert row["n"] == 4 and row["mean"] == 50.0 and row["n_wrong_answer"] == 2 and row["n_answer_unknown"] == 0
    md = (tmp_path / "all" / "table.md").read_text()
    assert "wrong answers (scored)" in md and md.count("| gradcam | 50.0 (no CI)") == 1  # n=4: no interval below 10
    assert "Wrong answers: 2 of the 4 scored records attribute an answer that is not the ground truth" in md
    # --correct-only: the two correct records only
    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "ok"), "--n-boot", "100",
                                    "--no-baselines", "--correct-only"])
    assert res.exit_code == 0, res.output
    assert "--correct-only: 2 of 4 records left out" in res.output
    row = pd.read_csv(tmp_path / "ok" / "table.csv").query("metric == 'iou'").iloc[0]
    assert row["n"] == 2 and row["mean"] == 100.0 and row["n_wrong_answer"] == 0
    assert "Wrong answers: 0 of the 2 scored records" in (tmp_path / "ok" / "table.md").read_text()


def test_records_without_answers_say_correctness_is_unknown(tmp_path):
    recs = [{k: v for k, v in r.items() if k not in ("answer_parsed", "gt_answer")} for r in _records()]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "e"), "--n-boot", "50", "--no-baselines"])
    assert res.exit_code == 0, res.output
    assert "Wrong answers: unknown for all 4 scored records" in (tmp_path / "e" / "table.md").read_text()
    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "c"), "--correct-only"])
    assert res.exit_code == 1 and "4 of 4 records carry no 'answer_parsed'" in res.output and "Traceback" not in res.output


def test_report_states_wrong_answers_and_has_correct_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    res = CliRunner().invoke(main, ["report", str(run), "--gallery", "0"])
    assert res.exit_code == 0, res.output
    html = (run / "report.html").read_text()
    assert "Wrong answers scored" in html and "2 of 4 scored records attribute an answer that is not the ground truth" in html
    res = CliRunner().invoke(main, ["report", str(run), "--gallery", "0", "--correct-only", "--out", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "c.html").read_text()
    assert "0 of 2 scored records attribute" in html and "--correct-only: 2 of 4 records left out" in html
