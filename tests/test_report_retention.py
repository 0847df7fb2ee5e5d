"""`medfocus report --retention FILE` shows a retention table only when it is one, consistent, of this run.

Unreadable files are one error line naming the file (no pandas traceback), for ``--retention`` and for the
default ``RUN_DIR/retention.csv``; missing columns are named; a ``retention_pct`` that contradicts
``kept / n`` (or counts that do not add up to ``n``) is refused; rows of models / datasets the run does
not hold are left out with a note, and a table of another run is refused.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from medfocus.cli import main
from medfocus.errors import DataError
from medfocus.report.retention import REQUIRED_COLUMNS, check_retention, read_retention, rows_of_run


def _row(**kw):
    r = {"model": "demo", "dataset": "synthetic", "mode": "direct", "editor": "oracle", "n": 10, "errors": 1,
         "failed_correct": 2, "failed_flip": 1, "failed_background": 1, "kept": 5, "retention_pct": 50.0,
         "unparseable_correct": 0, "unparseable_flip": 0, "unparseable_background": 0, "negatives": 0, "negatives_correct": 0}
    r.update(kw)
    return r


def _run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"model": "demo", "dataset": "synthetic", "index": i, "mode": "direct", "method": "gradcam", "attribute": "nodule",
             "gt_boxes": [[0, 0, 8, 8]], "image_size": [32, 32], "pred_boxes": [[0, 0, 8, 8]], "error": None} for i in range(2)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def _report(run, *extra):
    return CliRunner().invoke(main, ["report", str(run), "--gallery", "0", *extra])


@pytest.mark.parametrize("name, content, expect", [
    ("rnd.csv", b"\x8b\x1f\x00\xff\xfe" * 40, "UnicodeDecodeError"),
    ("bad2.csv", b'model,dataset\n"demo,synthetic\n', "ParserError"),
    ("empty.csv", b"", "EmptyDataError"),
])
def test_unreadable_table_is_one_line_naming_the_file(tmp_path, name, content, expect):
    run = _run(tmp_path)
    bad = tmp_path / name
    bad.write_bytes(content)
    res = _report(run, "--retention", str(bad))
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = res.output.strip()
    assert line.startswith("Error:") and f"{bad}: cannot read the retention table ({expect}" in line
    assert not (run / "report.html").exists()
    # the default RUN_DIR/retention.csv goes through the same reader
    (run / "retention.csv").write_bytes(content)
    res = _report(run)
    assert res.exit_code == 1 and f"{run / 'retention.csv'}: cannot read the retention table" in res.output
    assert "Traceback" not in res.output


def test_a_benchmark_split_is_not_a_retention_table(tmp_path):
    run = _run(tmp_path)
    split = tmp_path / "qsplit.json"
    split.write_text(json.dumps([{"model": "qwen2_5_vl_3b", "dataset": "vindr_cxr", "index": 0, "answer": "Yes",
                                  "prediction_direct": "No"}]))
    res = _report(run, "--retention", str(split))
    assert res.exit_code == 1 and "not a retention table" in res.output
    assert "'mode', 'editor', 'n', 'errors'" in res.output and str(split) in res.output


def test_retention_pct_contradicting_its_counts_is_refused(tmp_path):
    with pytest.raises(DataError) as ei:
        check_retention([_row(retention_pct=99.0)], source="ret_bad.csv")
    msg = str(ei.value)
    assert "ret_bad.csv row 1 (CSV line 2; demo / synthetic / direct / oracle)" in msg
    assert "retention_pct 99.0" in msg and "kept / n = 5 / 10 = 50.0%" in msg
    # the bench's one-decimal rounding passes: 2/3 -> 66.7
    ok = check_retention([_row(n=3, errors=0, failed_correct=1, failed_flip=0, failed_background=0, kept=2, retention_pct=66.7)])
    assert ok["kept"].tolist() == [2] and ok["retention_pct"].tolist() == [66.7]
    with pytest.raises(DataError, match="= 9, but n = 10"):
        check_retention([_row(errors=0)])
    with pytest.raises(DataError, match="'kept' must be a count"):
        check_retention([_row(kept=-5)])
    with pytest.raises(DataError, match="no rows"):
        check_retention(pd.DataFrame(columns=REQUIRED_COLUMNS))


def test_cli_refuses_inconsistent_table_and_notes_rows_of_other_runs(tmp_path):
    run = _run(tmp_path)
    bad = tmp_path / "ret_bad.csv"
    pd.DataFrame([_row(model="qwen2_5_vl_3b", retention_pct=99.0)]).to_csv(bad, index=False)
    res = _report(run, "--retention", str(bad))
    assert res.exit_code == 1 and "retention_pct 99.0 contradicts its counts" in res.output
    # a table holding this run's row and another model's: the other row is left out and named
    mixed = tmp_path / "mixed.csv"
    pd.DataFrame([_row(), _row(model="qwen2_5_vl_3b", dataset="vindr_cxr", kept=4, failed_background=2, retention_pct=40.0)]
                 ).to_csv(mixed, index=False)
    res = _report(run, "--retention", str(mixed))
    assert res.exit_code == 0, res.output
    assert "1 row(s) of the retention table" in res.output and "qwen2_5_vl_3b/vindr_cxr" in res.output
    html = (run / "report.html").read_text()
    assert "left out: qwen2_5_vl_3b/vindr_cxr" in html
    section = html[html.index("Causal filter: retention"):]
    section = section[:section.index("</table>")]
    assert "<td>qwen2_5_vl_3b</td>" not in section and "<td>demo</td>" in section
    # only other runs' rows: refused
    other = tmp_path / "other.csv"
    pd.DataFrame([_row(model="qwen2_5_vl_3b")]).to_csv(other, index=False)
    res = _report(run, "--retention", str(other))
    assert res.exit_code == 1 and "no row of this run's models / datasets (demo/synthetic)" in res.output


def test_read_retention_of_the_bench_table_round_trips(tmp_path):
    from medfocus.bench.build import RETENTION_COLUMNS

    p = tmp_path / "retention.csv"
    pd.DataFrame([_row()], columns=RETENTION_COLUMNS).to_csv(p, index=False)
    df = read_retention(p)
    assert df.iloc[0]["kept"] == 5 and df.iloc[0]["retention_pct"] == 50.0
    kept, note = rows_of_run(df, [])  # a run without records keeps every row
    assert len(kept) == 1 and note is None


def test_retention_beside_records_of_unfiltered_samples_says_they_are_not_filtered(tmp_path):
    """Records attributed on every sample (no --bench: the model's own answers) next to a retention table read
    as if the filter had chosen their samples; the overview says where the answers come from and the retention
    section says whom it does not describe."""
    run = _run(tmp_path)
    recs = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    recs[0]["answer_source"], recs[1]["answer_source"] = "split", "model"
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ret = tmp_path / "ret.csv"
    pd.DataFrame([_row()]).to_csv(ret, index=False)
    res = _report(run, "--retention", str(ret))
    assert res.exit_code == 0, res.output
    html = (run / "report.html").read_text()
    assert "1 from the model&#39;s own answer on unfiltered samples; 1 from a causally filtered split" in html
    assert "1 of 2 records were not attributed on a causally filtered split" in html
    # every record from the split: no such note
    recs[1]["answer_source"] = "split"
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert _report(run, "--retention", str(ret)).exit_code == 0
    html = (run / "report.html").read_text()
    assert "2 from a causally filtered split" in html and "were not attributed on a causally filtered split" not in html
