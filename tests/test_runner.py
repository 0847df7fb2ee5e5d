"""Runner + result store: durability, resume, errors, limit, seed, shards and merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from medfocus.errors import ConfigError, DataError
from medfocus.runner import (
    ResultStore,
    WorkItem,
    atomic_save_npz,
    items_from_benchmark,
    load_results,
    merge_stores,
    parse_shard,
    run_grid,
    select_items,
    shard_of,
)
from medfocus.runner.store import read_jsonl

sys.path.insert(0, str(Path(__file__).parent))
from test_runner_fakes import FakeAdapter, make_factory, make_samples, read_npy, simple_boxes  # noqa: E402


def _rec(i: int, method: str = "m", **kw):
    return {"model": "a", "dataset": "d", "index": i, "mode": "direct", "method": method, **kw}


def test_store_append_reopen_and_latest_wins(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultStore(p) as st:
        st.append(_rec(1, error="x"))
        st.append(_rec(2, value=np.float32(0.5), arr=np.arange(3), nan=float("nan")))
        st.append(_rec(1, error=None))  # a retry supersedes the errored record
        assert len(st) == 2
    with ResultStore(p) as st:
        assert len(st) == 2
        assert st.get(("a", "d", 1, "direct", "m"))["error"] is None
        r2 = st.get(("a", "d", 2, "direct", "m"))
        assert r2["value"] == 0.5 and r2["arr"] == [0, 1, 2] and r2["nan"] is None
        assert st.is_done(("a", "d", 1, "direct", "m"))
    assert [r["index"] for r in load_results(p)] == [1, 2]


def test_store_repairs_interrupted_tail_and_rejects_corruption(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultStore(p) as st:
        st.append(_rec(1))
    with open(p, "ab") as fh:  # what a kill in the middle of a write leaves behind
        fh.write(b'{"model":"a","dataset":"d","ind')
    with ResultStore(p) as st:
        assert len(st) == 1
        st.append(_rec(2))
    recs, valid = read_jsonl(p)
    assert [r["index"] for r in recs] == [1, 2] and valid == p.stat().st_size
    # damage in the middle of the file is not an interrupted write: refuse it
    lines = p.read_bytes().split(b"\n")
    p.write_bytes(lines[0] + b"\nnot json\n" + lines[1] + b"\n")
    with pytest.raises(DataError, match="line 2"):
        ResultStore(p)


def test_store_lock_and_missing_key(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultStore(p) as st:
        with pytest.raises(ConfigError, match="in use"):
            ResultStore(p)
        with pytest.raises(DataError, match="method"):
            st.append({"model": "a", "dataset": "d", "index": 0, "mode": "direct"})


def test_atomic_npz(tmp_path):
    p = atomic_save_npz(tmp_path / "x" / "h.npz", heatmap=np.eye(3, dtype=np.float32))
    atomic_save_npz(p, heatmap=np.ones((2, 2), np.float32))
    with np.load(p) as z:
        assert z["heatmap"].shape == (2, 2)
    assert [f.name for f in p.parent.iterdir()] == ["h.npz"]  # no temporary files left


def test_shard_and_limit():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "a/b", "1", "-1/2"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    from medfocus.types import Sample

    samples = [Sample("d", i, f"{i}.png", "nodule", "q", "Yes", [(0, 0, 1, 1)], (4, 4)) for i in range(30)]
    items = [WorkItem(m, "d", mode, s) for m in ("a", "b") for mode in ("direct", "cot") for s in reversed(samples)]
    limited = select_items(items, limit=5)
    assert len(limited) == 20 and sorted({it.index for it in limited}) == [0, 1, 2, 3, 4]
    shards = [select_items(items, limit=12, shard=(i, 3)) for i in range(3)]
    keys = [{(it.model, it.mode, it.index) for it in sh} for sh in shards]
    assert sum(len(k) for k in keys) == 2 * 2 * 12 and len(set().union(*keys)) == 48  # a partition
    assert all(len(k) > 0 for k in keys)
    assert shard_of("a", "d", 7, "direct", 3) == shard_of("a", "d", 7, "direct", 3)
    with pytest.raises(DataError, match="duplicate"):
        select_items(items + items[:1])


def _grid(tmp_path, n=6, models=("m1",), modes=("direct",)):
    samples, boxes = make_samples(tmp_path / "imgs", n)
    items = [WorkItem(m, s.dataset, mode, s, answer_source="ground_truth") for m in models for mode in modes for s in samples]
    return samples, boxes, items


def test_run_grid_refuses_a_film_whose_size_differs_from_its_record(tmp_path):
    """A film replaced by one of another size after the dataset was loaded: its expert boxes are in the
    recorded frame, so the sample is an error record naming both sizes (never scored), the others run."""
    samples, boxes, items = _grid(tmp_path, n=3)
    np.save(samples[1].image_path, np.full((32, 40), 10, np.uint8))  # W 40 x H 32, recorded 32 x 32
    with ResultStore(tmp_path / "out" / "r.jsonl") as st:
        summ = run_grid(items, ["hot"], st, load_model=lambda n: FakeAdapter(n), make_method=make_factory(boxes),
                        read_image=read_npy, heatmap_to_boxes=simple_boxes, progress=False)
    assert summ.errors == 1
    by = {r["index"]: r for r in load_results(tmp_path / "out" / "r.jsonl")}
    assert by[0]["error"] is None and by[2]["error"] is None
    assert "the film is 40x32 (WxH)" in by[1]["error"] and "records image_size [32, 32]" in by[1]["error"]
    assert by[1]["heatmap_path"] is None


def test_run_grid_records_errors_and_loads_once(tmp_path, caplog):
    samples, boxes, items = _grid(tmp_path, n=6, models=("m1", "m2"))
    loads, builds = [], []

    def loader(name):
        loads.append(name)
        return FakeAdapter(name)

    fac = make_factory(boxes)

    def factory(name, params):
        builds.append(name)
        return fac(name, params)

    # a method that cannot be built fails the run before any model loads (no error records)
    with ResultStore(tmp_path / "out" / "r.jsonl") as st:
        with pytest.raises(ConfigError, match="method 'nope' could not be built"):
            run_grid(items, ["hot", "boom", "nope"], st, load_model=loader, make_method=factory,
                     read_image=read_npy, heatmap_to_boxes=simple_boxes, progress=False)
        assert loads == [] and len(st) == 0
    # refused before any record: no empty results file is left to read as "a run with no records"
    assert not (tmp_path / "out" / "r.jsonl").exists()
    builds.clear()
    with ResultStore(tmp_path / "out" / "r.jsonl") as st, caplog.at_level("WARNING", logger="medfocus.runner.grid"):
        summ = run_grid(items, ["hot", "boom"], st, load_model=loader, make_method=factory,
                        read_image=read_npy, heatmap_to_boxes=simple_boxes, progress=False)
    # each failure said with its key and the film, so the file can be found
    said = [r.getMessage() for r in caplog.records if "synthetic failure" in r.getMessage()]
    assert len(said) == 2 and all(f"3, 'direct', 'boom') ({samples[3].image_path})" in m for m in said)
    assert loads == ["m1", "m2"] and sorted(builds) == ["boom", "hot"]
    assert summ.total == 2 * 6 * 2 and summ.done == 2 * (6 + 5)
    assert summ.errors == 2 * 1  # boom on sample 3
    recs = load_results(tmp_path / "out" / "r.jsonl")
    assert len(recs) == 24
    by = {(r["model"], r["index"], r["method"]): r for r in recs}
    for i in range(6):
        r = by[("m1", i, "hot")]
        assert r["error"] is None and r["heatmap_boxes"] == [list(map(float, boxes[i][0]))] == r["gt_boxes"]
        assert r["pred_boxes"] is None  # heatmap method: the evaluation derives boxes from the saved heatmap
        with np.load(r["heatmap_path"]) as z:
            assert z["heatmap"].shape == (32, 32) and z["heatmap"].sum() == 10 * 12
            assert "token_heatmaps" not in z and z["extra_big"].shape == (40, 40)
        assert r["extras"] == {"ranking": {"a": 1.0}}
        assert r["question"].endswith("without any explanation.") and r["answer"] == "Yes"
    assert "synthetic failure on sample 3" in by[("m2", 3, "boom")]["error"]
    assert by[("m2", 4, "boom")]["pred_boxes"] == [[0.0, 0.0, 4.0, 4.0]]


def test_model_load_failure_fails_the_run(tmp_path):
    """A model that cannot be loaded stops the run with a ModelError naming it (a non-zero exit in the CLI),
    not one error record per sample, which a rerun without --retry-errors would serve as done; the models
    before it keep their records (resumable)."""
    from medfocus.errors import ModelError

    samples, boxes, items = _grid(tmp_path, n=3, models=("m1", "bad"))

    def loader(name):
        if name == "bad":
            raise OSError("weights not found")
        return FakeAdapter(name)

    with ResultStore(tmp_path / "r.jsonl") as st:
        with pytest.raises(ModelError, match="model 'bad' could not be loaded: OSError: weights not found"):
            run_grid(items, ["hot"], st, load_model=loader, make_method=make_factory(boxes),
                     read_image=read_npy, heatmap_to_boxes=simple_boxes, progress=False)
    recs = load_results(tmp_path / "r.jsonl")
    assert sorted(r["model"] for r in recs) == ["m1"] * 3 and all(r["error"] is None for r in recs)


def test_resume_skips_done_and_retry_errors(tmp_path):
    samples, boxes, items = _grid(tmp_path, n=6)
    kw = dict(load_model=FakeAdapter, make_method=make_factory(boxes), read_image=read_npy,
              heatmap_to_boxes=simple_boxes, progress=False)
    path = tmp_path / "r.jsonl"
    with ResultStore(path) as st:
        run_grid(items[:3], ["hot", "boom"], st, **kw)
    with ResultStore(path) as st:
        s2 = run_grid(items, ["hot", "boom"], st, **kw)
    assert (s2.skipped, s2.done, s2.errors) == (6, 5, 1)
    with ResultStore(path) as st:
        s3 = run_grid(items, ["hot", "boom"], st, retry_errors=True, **kw)
    assert (s3.skipped, s3.done, s3.errors) == (11, 0, 1)  # sample 3 still fails, re-recorded
    lines = path.read_text().splitlines()
    assert len(lines) == 13 and len(load_results(path)) == 12


def test_shards_merge_to_the_unsharded_run(tmp_path):
    samples, boxes, items = _grid(tmp_path, n=10, modes=("direct", "cot"))
    kw = dict(load_model=FakeAdapter, make_method=make_factory(boxes), read_image=read_npy,
              heatmap_to_boxes=simple_boxes, progress=False, seed=7)
    with ResultStore(tmp_path / "full" / "r.jsonl") as st:
        run_grid(items, ["random", "hot"], st, **kw)
    parts = []
    for i in range(3):
        p = tmp_path / f"shard{i}" / "r.jsonl"
        with ResultStore(p) as st:
            run_grid(select_items(list(reversed(items)), shard=(i, 3)), ["random", "hot"], st, **kw)
        parts.append(p)
    n = merge_stores(parts, tmp_path / "merged" / "r.jsonl")
    assert n == 40
    full = load_results(tmp_path / "full" / "r.jsonl")
    merged = load_results(tmp_path / "merged" / "r.jsonl")
    assert [r["index"] for r in full] == [r["index"] for r in merged]
    for a, b in zip(full, merged):
        assert a["extras"] == b["extras"] and a["seed"] == b["seed"]
        with np.load(a["heatmap_path"]) as za, np.load(b["heatmap_path"]) as zb:
            np.testing.assert_array_equal(za["heatmap"], zb["heatmap"])
    assert merge_stores(parts, tmp_path / "merged" / "r.jsonl") == 40  # idempotent
    assert len((tmp_path / "merged" / "r.jsonl").read_text().splitlines()) == 40


def test_items_from_benchmark(tmp_path):
    samples, _ = make_samples(tmp_path, 4)
    recs = [
        {"model": "demo", "dataset": "synthetic", "index": 2, "answer": "Yes", "prediction_cot": " The nodule is seen. Yes. ", "editor": "oracle"},
        {"model": "other", "dataset": "synthetic", "index": 1, "answer": "Yes"},
        {"model": "demo", "dataset": "synthetic", "index": 0, "answer": "Yes"},
    ]
    items = items_from_benchmark(recs, samples, mode="cot", model="demo")
    assert [(it.index, it.answer_text, dict(it.extra)) for it in items] == [
        (2, "The nodule is seen. Yes.", {"editor": "oracle"}), (0, "Yes", {})]
    with pytest.raises(DataError, match=r"f.json record 0: index 9 is out of range for dataset 'synthetic', which has 4 "
                                         r"samples under data root /r \(indices 0..3\)"):
        items_from_benchmark([{"dataset": "synthetic", "index": 9}], samples, mode="direct", where=["f.json record 0"],
                             data_root="/r")
    # an alias names the same sample; relabelling is explicit and says whose answer it is
    alias = items_from_benchmark([{"model": "other", "dataset": "synth", "index": 1, "prediction_direct": "No"}], samples,
                                 mode="direct", model="demo", relabel=True)
    assert [(it.model, it.dataset, it.index, it.answer_text, it.answer_source, it.extra["split_model"]) for it in alias] == [
        ("demo", "synthetic", 1, "No", "split_other_model", "other")]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from medfocus.runner import ResultStore, WorkItem, run_grid
    from test_runner_fakes import FakeAdapter, make_factory, make_samples, read_npy, simple_boxes
    samples, boxes = make_samples(Path({imgs!r}), {n})
    items = [WorkItem("m1", s.dataset, mode, s, answer_source="ground_truth") for mode in ("direct", "cot") for s in samples]
    with ResultStore({out!r}) as st:
        run_grid(items, ["hot", "random"], st, load_model=FakeAdapter, make_method=make_factory(boxes, delay={delay}),
                 read_image=read_npy, heatmap_to_boxes=simple_boxes, progress=False, seed=3)
    """
)


def test_killed_subprocess_resumes_without_loss_or_duplicates(tmp_path):
    n = 30
    out = tmp_path / "run" / "r.jsonl"
    script = tmp_path / "job.py"
    code = KILL_SCRIPT.format(tests=str(Path(__file__).parent), imgs=str(tmp_path / "imgs"), n=n, out=str(out), delay=0.02)
    script.write_text(code)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if out.exists() and len(out.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial, _ = read_jsonl(out)
    assert 8 <= len(partial) < 2 * n * 2, "the run should have been killed part-way"
    # resume with the same command, to completion
    script.write_text(code.replace("delay=0.02", "delay=0.0"))
    subprocess.run([sys.executable, str(script)], env=env, check=True)
    lines = [json.loads(l) for l in out.read_text().splitlines() if l.strip()]
    keys = [(r["mode"], r["index"], r["method"]) for r in lines]
    assert len(keys) == len(set(keys)) == 2 * n * 2  # no duplicates, nothing lost
    assert all(r["error"] is None for r in lines)
    for r in lines:
        with np.load(out.parent / r["heatmap_path"]) as z:
            assert z["heatmap"].shape == (32, 32)
    # records written before the kill are unchanged by the resume
    first = {(r["mode"], r["index"], r["method"]): r for r in lines}
    for r in partial:
        assert first[(r["mode"], r["index"], r["method"])] == r


def test_demo_diverse_subset_round_robins_findings():
    from medfocus.runner.demo import diverse_subset
    from medfocus.types import Sample

    attrs = ["nodule"] * 5 + ["mass"] * 3 + ["cardiomegaly"]
    samples = [Sample("synthetic", i, f"{i}.png", a, "q", "Yes", [(0, 0, 1, 1)], (4, 4)) for i, a in enumerate(attrs)]
    items = [WorkItem("demo", "synthetic", mode, s) for mode in ("direct", "cot") for s in samples]
    sub = diverse_subset(items, 4)
    assert len(sub) == 8
    direct = [it for it in sub if it.mode == "direct"]
    # round 1: cardiomegaly 8, mass 5, nodule 0; round 2: (cardiomegaly exhausted) mass 6
    assert [it.index for it in direct] == [0, 5, 6, 8]


def test_without_saved_heatmaps_the_boxes_are_the_prediction(tmp_path):
    samples, boxes, items = _grid(tmp_path, n=2)
    with ResultStore(tmp_path / "r.jsonl") as st:
        run_grid(items, ["hot"], st, load_model=FakeAdapter, make_method=make_factory(boxes), read_image=read_npy,
                 heatmap_to_boxes=simple_boxes, progress=False, save_heatmaps=False)
    recs = load_results(tmp_path / "r.jsonl")
    assert all(r["heatmap_path"] is None and r["has_heatmap"] and r["pred_boxes"] == r["gt_boxes"] for r in recs)
    assert not (tmp_path / "r_heatmaps").exists()


def test_raw_answers_from_the_split_log(tmp_path):
    """The step-by-step rationale the model generated is what gets attributed, not the parsed Yes/No."""
    import json as _json

    from medfocus.runner import raw_answers_for_split

    samples, _ = make_samples(tmp_path / "imgs", 3)
    split = tmp_path / "demo" / "synthetic" / "cot.json"
    split.parent.mkdir(parents=True)
    split.write_text(_json.dumps([{"model": "demo", "dataset": "synthetic", "index": i, "answer": "Yes", "prediction_cot": "Yes"} for i in (0, 2)]))
    rows = [{"model": "demo", "dataset": "synthetic", "index": i, "mode": "cot",
             "raw": {"original": f"Opacity number {i}. Therefore, yes.", "foreground": "No."}} for i in (0, 1, 2)]
    split.with_name("cot.log.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    raw = raw_answers_for_split(split)
    assert raw[("demo", "synthetic", 2)] == "Opacity number 2. Therefore, yes." and len(raw) == 3
    items = items_from_benchmark(_json.loads(split.read_text()), samples, mode="cot", model="demo", raw_answers=raw)
    assert [it.answer_text for it in items] == ["Opacity number 0. Therefore, yes.", "Opacity number 2. Therefore, yes."]
    assert raw_answers_for_split(tmp_path / "nolog.json") == {}
