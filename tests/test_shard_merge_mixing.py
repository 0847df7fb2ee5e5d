"""Shards run by hand (`--shard i/n`): `attribute --merge` and `medfocus merge` refuse the outputs of two
shardings mixed in one folder, naming each file and its spec, and say which shards are still missing;
`medfocus status` reports hand-run shard files (new-user report 3, item 15). Hand-written store files, no model."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from medfocus.cli import main
from medfocus.runner.store import load_results


def _store(path: Path, indices: list[int], errors: tuple[int, ...] = ()) -> None:
    recs = [{"model": "demo", "dataset": "synthetic", "index": i, "mode": "direct", "method": "gradcam",
             "error": "RuntimeError: boom" if i in errors else None} for i in indices]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_two_shardings_in_one_folder_are_refused_by_both_merges_and_shown_by_status(tmp_path):
    sh = tmp_path / "sh"
    _store(sh / "predictions.shard-0-of-2.jsonl", [0, 2])
    _store(sh / "predictions.shard-1-of-2.jsonl", [1, 3], errors=(3,))
    _store(sh / "predictions.shard-0-of-3.jsonl", [0, 3, 5])
    for args in (["attribute", "--out", str(sh), "--merge"], ["merge", str(sh)]):
        r = _run(*args)
        assert r.exit_code == 1, r.output
        assert "2 different shardings" in r.output
        for name, spec in (("predictions.shard-0-of-2.jsonl", "0/2"), ("predictions.shard-1-of-2.jsonl", "1/2"),
                           ("predictions.shard-0-of-3.jsonl", "0/3")):
            assert f"{name} ({spec})" in r.output, (name, r.output)
        assert not (sh / "predictions.jsonl").exists()  # refused before anything was written
    st = _run("status", str(sh))
    assert st.exit_code == 0, st.output
    rows = {line.split()[0]: line.split() for line in st.output.splitlines() if ".jsonl" in line and "/" in line.split()[0]}
    assert rows["0/2"][3:] == ["2/?", "0"] and rows["1/2"][3:] == ["2/?", "1"] and rows["0/3"][3:] == ["3/?", "0"]
    assert "total 7 records, 1 errors in 3 shard outputs run by hand" in st.output
    assert "Warning:" in st.output and "2 different shardings" in st.output

    # without the stray 3-way file: the 2-way run merges, complete, without a note
    (sh / "predictions.shard-0-of-3.jsonl").unlink()
    r = _run("attribute", "--out", str(sh), "--merge")
    assert r.exit_code == 0, r.output
    assert f"merged: {sh / 'predictions.jsonl'} (4 records from 2 shard files)" in r.output and "Note:" not in r.output
    assert [x["index"] for x in load_results(sh / "predictions.jsonl")] == [0, 1, 2, 3]


def test_merging_shards_without_records_says_nothing_was_written(tmp_path):
    """Shards that attributed nothing (every one empty) create no merged file: the merge says so instead of
    naming a predictions.jsonl with 0 records that does not exist."""
    out = tmp_path / "empty"
    _store(out / "predictions.shard-0-of-2.jsonl", [])
    _store(out / "predictions.shard-1-of-2.jsonl", [])
    r = _run("attribute", "--out", str(out), "--merge")
    assert r.exit_code == 0, r.output
    assert f"the 2 shard files hold no record: nothing written ({out / 'predictions.jsonl'} not created)" in r.output
    r = _run("merge", str(out))
    assert r.exit_code == 0 and "nothing written" in r.output and "(0 records" not in r.output, r.output
    assert not (out / "predictions.jsonl").exists()


def test_an_incomplete_sharding_merges_with_a_note_naming_the_missing_shards(tmp_path):
    out = tmp_path / "part"
    _store(out / "predictions.shard-0-of-3.jsonl", [0, 3])
    for args in (["attribute", "--out", str(out), "--merge"], ["merge", str(out)]):
        r = _run(*args)
        assert r.exit_code == 0, r.output
        assert "Note: 1 of 3 shards present (missing 1/3, 2/3)" in r.output
    st = _run("status", str(out))
    assert st.exit_code == 0 and "Note: 1 of 3 shards present (missing 1/3, 2/3)" in st.output, st.output


def test_status_of_a_folder_without_manifest_or_shards_is_one_error(tmp_path):
    r = _run("status", str(tmp_path))
    assert r.exit_code == 1
    assert "no launch manifest" in r.output and "no shard outputs" in r.output and "Traceback" not in r.output


def test_a_damaged_launch_manifest_is_named_not_taken_for_hand_run_shards(tmp_path):
    _store(tmp_path / "predictions.shard-0-of-1.jsonl", [0])
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "manifest.json").write_text("{not json")
    for args in (["status", str(tmp_path)], ["merge", str(tmp_path)]):
        r = _run(*args)
        assert r.exit_code == 1 and "not a medfocus launch manifest" in r.output, r.output
    assert not (tmp_path / "predictions.jsonl").exists()
