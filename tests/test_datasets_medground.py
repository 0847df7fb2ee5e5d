"""MedGround-Bench records: the real public records, schema validation, round trip, join by (dataset, index)."""

from __future__ import annotations

import collections
import json

import pytest

from medfocus.datasets.medground import (join_records, load_record_dicts, load_records, normalize_yes_no, parse_record,
                                         write_records)
from medfocus.errors import DataError
from medfocus.types import Sample, question_stem


def _sample(dataset, index, answer="Yes"):
    return Sample(dataset=dataset, index=index, image_path=f"/x/{dataset}/{index}.png", attribute="a",
                  question=question_stem("a"), answer=answer, boxes=[(0, 0, 1, 1)], image_size=(2, 2))


def _rec(dataset="vindr_cxr", index=0, mode="direct", **extra):
    d = {"model": "m", "dataset": dataset, "index": index, "answer": "Yes", f"prediction_{mode}": "Yes.",
         f"prediction_edited_{mode}": "No\n", f"prediction_edited_kept_{mode}": "Yes", f"prediction_edited_kept_normal_{mode}": "yes"}
    d.update(extra)
    return d


def test_real_public_records(shared_data):
    records = load_records(shared_data / "medground_bench_direct.json")
    assert len(records) == 1880
    assert {r.modes[0] for r in records} == {"direct"} and all(len(r.modes) == 1 for r in records)
    combos = collections.Counter((r.model, r.dataset) for r in records)
    assert len(combos) == 18  # six models x three datasets
    assert {m for m, _ in combos} == {"qwen2_5_vl_3b", "qwen2_5_vl_7b", "gemma3_4b", "gemma3_12b", "medgemma_4b", "medgemma1_5_4b"}
    assert {d for _, d in combos} == {"imagenome", "vindr_cxr", "padchest_gr"}
    # The public benchmark is the causally filtered set: every record passes all three gates.
    assert all(r.passes_filter("direct") for r in records)
    first = records[0]
    assert first.key == ("qwen2_5_vl_3b", "imagenome", 43) and first.predictions["direct"]["edited"] == "No"


def test_real_records_join_by_dataset_and_index(shared_data):
    records = load_records(shared_data / "medground_bench_direct.json")
    n = collections.defaultdict(int)
    for r in records:
        n[r.dataset] = max(n[r.dataset], r.index + 1)
    # Stand-in samples in loader order (index = position); the join must pick exactly sample #index.
    samples = {ds: [_sample(ds, i) for i in range(k)] for ds, k in n.items()}
    joined = join_records(records, samples)
    assert len(joined) == len(records)
    assert all(s.dataset == r.dataset and s.index == r.index and s is samples[r.dataset][r.index] for r, s in joined)
    short = {ds: lst[:100] for ds, lst in samples.items()}
    with pytest.raises(DataError, match="no such sample"):
        join_records(records, short)
    kept = join_records(records, short, on_missing="skip")
    assert 0 < len(kept) < len(records) and all(r.index < 100 for r, _ in kept)


def test_join_with_a_loader_and_answer_check(tmp_path):
    samples = [_sample("vindr_cxr", i) for i in range(3)] + [_sample("imagenome", 0, answer="No")]
    recs = [parse_record(_rec(index=2)), parse_record(_rec(index=0))]
    joined = join_records(recs, samples)
    assert [s.index for _, s in joined] == [2, 0]
    bad = parse_record(_rec(dataset="imagenome", index=0))
    with pytest.raises(DataError, match="answer"):
        join_records([bad], samples)
    assert len(join_records([bad], samples, check_answer=False)) == 1


def test_parse_record_modes_extras_and_errors():
    r = parse_record({**_rec(), **{k.replace("direct", "cot"): v for k, v in _rec().items() if k.startswith("prediction_")}, "editor": "oracle"})
    assert r.modes == ["cot", "direct"] and r.extra == {"editor": "oracle"}
    assert r.passes_filter("cot")
    assert r.to_dict()["prediction_edited_kept_normal_cot"] == "yes" and r.to_dict()["editor"] == "oracle"
    d = _rec()
    del d["prediction_edited_kept_direct"]
    with pytest.raises(DataError, match="prediction_edited_kept_direct"):
        parse_record(d, where="f.json record #3")
    with pytest.raises(DataError, match="'index'"):
        parse_record({**_rec(), "index": "x"})
    with pytest.raises(DataError, match="'model'"):
        parse_record({k: v for k, v in _rec().items() if k != "model"})
    with pytest.raises(DataError, match="prediction_"):
        parse_record({"model": "m", "dataset": "d", "index": 1, "answer": "Yes"})
    failing = parse_record(_rec(prediction_edited_kept_normal_direct="No"))
    assert not failing.passes_filter("direct")


def test_round_trip_json_and_jsonl(tmp_path):
    recs = [parse_record(_rec(index=i, note=f"n{i}")) for i in range(3)]
    for name in ("b.json", "b.jsonl"):
        p = write_records(recs, tmp_path / name)
        assert load_records(p) == recs
    assert isinstance(json.loads((tmp_path / "b.json").read_text()), list)


def test_load_records_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "none.json")
    p = tmp_path / "dup.json"
    p.write_text(json.dumps([_rec(), _rec()]))
    with pytest.raises(DataError, match="duplicate"):
        load_records(p)
    p.write_text(json.dumps([_rec(), {"model": "m"}]))
    with pytest.raises(DataError, match=r"record 1: missing field 'dataset'"):
        load_records(p)
    p.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(p)


def test_one_reader_two_views(tmp_path):
    """`load_record_dicts` (what `attribute --bench` reads) and `load_records` read a file the same way:
    the dicts view keeps records verbatim and needs only their key; the typed view adds the schema."""
    partial = {"model": "m", "dataset": "synthetic", "index": 4, "prediction_direct": "Yes", "mode": "direct", "editor": "oracle"}
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"records": [_rec(index=3), partial]}))
    assert load_record_dicts(p) == [_rec(index=3), partial]
    with pytest.raises(DataError, match=r"b.json record 1: missing field 'answer'"):
        load_records(p)
    # a JSON-lines file: the interrupted last line of a killed writer is ignored by both views,
    # and errors name the line (blank lines count)
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps(_rec(index=1)) + "\n\n" + json.dumps(_rec(index=2)) + "\n" + '{"model": "m", "dat')
    assert [r["index"] for r in load_record_dicts(j)] == [1, 2]
    assert [r.index for r in load_records(j)] == [1, 2]
    j.write_text(json.dumps(_rec(index=1)) + "\n\n" + json.dumps(_rec(index=1.5)) + "\n")
    for read in (load_record_dicts, load_records):
        with pytest.raises(DataError, match=r"b.jsonl line 3: field 'index' must be a non-negative integer, got 1.5"):
            read(j)


@pytest.mark.parametrize("index", [1.7, "3", True, -1, None])
def test_no_silent_index_coercion_in_any_view(tmp_path, index):
    p = tmp_path / "b.json"
    p.write_text(json.dumps([_rec(index=0), _rec(index=index)]))
    for read in (load_record_dicts, load_records):
        with pytest.raises(DataError, match=r"b.json record 1: field 'index' must be a non-negative integer"):
            read(p)
    with pytest.raises(DataError, match=r"f.json record 7: field 'index' must be a non-negative integer"):
        parse_record(_rec(index=index), where="f.json record 7")


def test_duplicates_refused_in_both_views(tmp_path):
    p = tmp_path / "b.json"
    # the same sample twice in one mode (named by the prediction field or by a 'mode' field)
    for second in (_rec(index=5, note="again"), {"model": "m", "dataset": "vindr_cxr", "index": 5, "mode": "direct"}):
        p.write_text(json.dumps([_rec(index=5), second]))
        for read in (load_record_dicts, load_records):
            with pytest.raises(DataError, match=r"b.json record 1: duplicate record .*'direct'.*first at .*record 0"):
                read(p)
    # the same sample in another mode, or for another model, is not a duplicate
    p.write_text(json.dumps([_rec(index=5), _rec(index=5, mode="cot"), _rec(index=5, model="other")]))
    assert len(load_record_dicts(p)) == 3 and len(load_records(p)) == 3


def test_attribute_reads_bench_files_with_the_one_reader(tmp_path):
    """`medfocus attribute --bench` rejects a bad split with the reader's named error, before loading anything."""
    from click.testing import CliRunner

    from medfocus.cli import main

    p = tmp_path / "split.json"
    p.write_text(json.dumps([_rec(dataset="synthetic", index=0), _rec(dataset="synthetic", index="2")]))
    r = CliRunner().invoke(main, ["attribute", "--bench", str(p), "--model", "demo", "--method", "occlusion",
                                  "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 1, r.output
    assert "split.json record 1: field 'index' must be a non-negative integer, got '2' (str)" in r.output
    assert "Traceback" not in r.output


def test_normalize_yes_no():
    assert [normalize_yes_no(t) for t in ("Yes", "Yes.\n", " no,", "NO", "Yesterday", "Maybe", None, "")] == [
        "Yes", "Yes", "No", "No", None, None, None, None]


def test_reader_resolves_dataset_aliases(tmp_path):
    """Both views give the registry key for an alias; an alias and its key are one sample for the
    duplicate check; an unregistered name (a dataset built in Python) is kept as written."""
    p = tmp_path / "b.json"
    p.write_text(json.dumps([_rec(dataset="vindr-cxr", index=0), _rec(dataset="VinDr-CXR-Attr", index=1)]))
    assert [r["dataset"] for r in load_record_dicts(p)] == ["vindr_cxr", "vindr_cxr"]
    assert [r.dataset for r in load_records(p)] == ["vindr_cxr", "vindr_cxr"]
    p.write_text(json.dumps([_rec(dataset="vindr_cxr", index=0), _rec(dataset="vindr", index=0)]))
    with pytest.raises(DataError, match=r"b.json record 1: duplicate record .*'vindr_cxr', 0, 'direct'"):
        load_record_dicts(p)
    p.write_text(json.dumps([_rec(dataset="vindr_cxr", index=0), _rec(dataset="Toy-World", index=0)]))
    assert [r["dataset"] for r in load_record_dicts(p)] == ["vindr_cxr", "Toy-World"]
    assert [r.dataset for r in load_records(p)] == ["vindr_cxr", "Toy-World"]


def test_reader_refuses_a_record_that_names_no_mode(tmp_path):
    """A misspelled prediction field would drop the record from every mode: an error naming the file,
    record, the fields expected and the likely misspelling (JSON lines: the line)."""
    typo = {k.replace("prediction_direct", "predicton_direct"): v for k, v in _rec(index=1).items()}
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps(_rec(index=0)) + "\n" + json.dumps(typo) + "\n")
    with pytest.raises(DataError) as ei:
        load_record_dicts(p)
    msg = str(ei.value)
    assert msg.startswith(f"benchmark file {p} line 2: the record names no mode: expected a 'prediction_<mode>' field")
    assert "'predicton_direct' -> 'prediction_direct'" in msg and "or a 'mode' field" in msg
    p.write_text(json.dumps({"model": "m", "dataset": "synthetic", "index": 0, "mode": ""}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'mode' must be a non-empty string"):
        load_record_dicts(p)


def test_explicit_mode_takes_priority():
    from medfocus.datasets.medground import record_modes

    assert record_modes(_rec()) == ["direct"]
    assert record_modes(_rec(mode="cot")) == ["cot"]  # prediction_direct present, but the record says cot
    assert record_modes({"mode": "direct"}) == ["direct"] and record_modes({"dataset": "x", "index": 0}) == []
