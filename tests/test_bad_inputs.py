"""Every bad input gets a named error, never a bare library traceback (issue 13, item 8): infinite
boxes, empty finding names, non-integer benchmark indices, non-UTF-8 files, deeply nested JSON; no
silent coercion (``index: 1.7`` is not sample 1)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from medfocus.attribution.prompting import parse_phrases
from medfocus.cli import main
from medfocus.datasets.medground import load_record_dicts
from medfocus.datasets.vindr_cxr import load_vindr_cxr
from medfocus.errors import DataError
from medfocus.evaluation.records import read_prediction_records
from medfocus.io import write_dicom

DEEP = "[" * 100_000 + "]" * 100_000


def _vindr(tmp_path, rows):
    base = tmp_path / "vindr-cxr" / "1.0.0"
    (base / "annotations").mkdir(parents=True)
    with open(base / "annotations" / "annotations_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("image_id", "rad_ID", "class_name", "x_min", "y_min", "x_max", "y_max"))
        w.writerows(rows)
    write_dicom(base / "test" / "a.dicom", np.ones((16, 16), np.uint16))
    return tmp_path


@pytest.mark.parametrize("rows, words", [
    ([("a", "R1", "Nodule/Mass", "inf", 1, 5, 5)], ["line 2", "finite numbers"]),
    ([("a", "R1", "Nodule/Mass", 1, 1, 5, 5), ("a", "R2", "Nodule/Mass", 1, "-inf", 5, 5)], ["line 3", "finite"]),
    ([("a", "R1", "Nodule/Mass", 1, 1, 5, 5), ("a", "R2", "", 1, 1, 5, 5)], ["line 3", "empty 'class_name'"]),
    ([("a", "R1", "Nodule/Mass", "x", 1, 5, 5)], ["line 2", "must be numbers"]),
])
def test_vindr_bad_rows(tmp_path, rows, words):
    with pytest.raises(DataError) as ei:
        load_vindr_cxr(_vindr(tmp_path, rows))
    for w in words:
        assert w in str(ei.value)


@pytest.mark.parametrize("index", [1.7, "3", True, -1, None, [1]])
def test_bench_index_must_be_an_integer(tmp_path, index):
    p = tmp_path / "b.json"
    p.write_text(json.dumps([{"dataset": "synthetic", "index": 0}, {"dataset": "synthetic", "index": index}]))
    with pytest.raises(DataError, match=r"record 1: field 'index' must be a non-negative integer"):
        load_record_dicts(p)


@pytest.mark.parametrize("content, words", [
    (b'[{"dataset": "synthetic", "index": 0}]\xff\xfe', ["not UTF-8"]),
    (DEEP.encode(), ["nested too deeply"]),
    (b"{not json", ["not valid JSON"]),
])
def test_bench_file_bad_bytes(tmp_path, content, words):
    p = tmp_path / "b.json"
    p.write_bytes(content)
    with pytest.raises(DataError) as ei:
        load_record_dicts(p)
    for w in words:
        assert w in str(ei.value)


def test_prediction_file_not_utf8_or_too_deep(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"model": "m"}\n{"model": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"p.jsonl line 2: not UTF-8"):
        read_prediction_records(p)
    r = CliRunner().invoke(main, ["evaluate", str(p), "--out", str(tmp_path / "ev")])
    assert r.exit_code != 0 and "line 2: not UTF-8" in r.output and "Traceback" not in r.output
    p.write_text('{"model": "m"}\n' + DEEP + "\n")
    with pytest.raises(DataError, match="line 2: JSON nested too deeply"):
        read_prediction_records(p)


def test_deeply_nested_phrase_list_is_not_a_crash():
    assert parse_phrases(DEEP) == []  # RecursionError before the fix
    assert parse_phrases("Findings: " + DEEP) == ["Findings:"]  # the brackets are no phrase
    assert parse_phrases('["left lung", "heart"]') == ["left lung", "heart"]
