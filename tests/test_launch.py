"""Launchers (`--launcher local|slurm`, submitit): shard tasks, identical records, kill/restart, merge, status.

The local-launcher tests start real worker processes (submitit's LocalExecutor) that load the shipped
demo model on a small synthetic world; Slurm is not available here, so the Slurm path is checked with
submitit's DebugExecutor running the same job function and with the sbatch script submitit writes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medfocus.cli import main

submitit = pytest.importorskip("submitit", reason="submitit (the [slurm] extra, in the dev extra) is not installed")

#: Record fields that legitimately differ between two runs of the same work (timings, file locations).
#: shared_pass: which methods shared a pass depends on which were still pending (a resumed item runs fewer).
VOLATILE = {"seconds", "wall_seconds", "heatmap_path", "shared_pass"}
METHODS = ["--method", "attention_head", "--method", "gradcam", "--method", "occlusion", "--param", "occlusion.grid=2"]


@pytest.fixture(autouse=True, scope="module")
def _workers_use_the_parents_thread_count():
    """Worker processes read their intra-op thread count from the environment, while this process runs
    on the one thread conftest pins; a different thread count changes floating-point summation order
    (maps then agree to ~1e-7, not bit for bit). Bit-identical records are promised for the same
    settings, so the workers get the parent's count whatever the caller's ``OMP_NUM_THREADS`` says."""
    import torch

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _invoke(args: list[str]):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    return res


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A 10-film synthetic world and the single-process attribution of its positives."""
    root = tmp_path_factory.mktemp("launch")
    data = root / "data"
    res = CliRunner().invoke(main, ["synth", "--out", str(data), "--n", "10", "--seed", "3"])
    assert res.exit_code == 0, res.output
    single = root / "single"
    res = CliRunner().invoke(main, ["attribute", "--dataset", "synthetic", "--data-root", str(data), "--model", "demo",
                                    *METHODS, "--out", str(single), "--no-progress"])
    assert res.exit_code == 0, res.output
    return {"root": root, "data": data, "single": single}


def _records(path: Path) -> dict[tuple, dict]:
    from medfocus.runner.store import load_results, record_key

    recs = load_results(path)
    keys = [record_key(r) for r in recs]
    assert len(keys) == len(set(keys)), "duplicate keys in a merged store"
    return {record_key(r): r for r in recs}


def _assert_same_records(a: Path, b: Path) -> int:
    ra, rb = _records(a), _records(b)
    assert set(ra) == set(rb)
    for k in ra:
        x, y = ra[k], rb[k]
        assert {f: v for f, v in x.items() if f not in VOLATILE} == {f: v for f, v in y.items() if f not in VOLATILE}, k
        assert x["error"] is None, x["error"]
        if x.get("heatmap_path"):
            with np.load(x["heatmap_path"]) as za, np.load(y["heatmap_path"]) as zb:
                assert sorted(za.files) == sorted(zb.files)
                for name in za.files:
                    np.testing.assert_array_equal(za[name], zb[name])
    return len(ra)


def _attribute_args(world: dict, out: Path) -> list[str]:
    return ["attribute", "--dataset", "synthetic", "--data-root", str(world["data"]), "--model", "demo", *METHODS,
            "--out", str(out), "--no-progress"]


def test_local_launcher_two_cpu_workers_reproduces_single_process(world, tmp_path):
    out = tmp_path / "launched"
    res = _invoke(_attribute_args(world, out) + ["--launcher", "local", "--devices", "cpu,cpu", "--shards", "2"])
    assert res.exit_code == 0, res.output
    assert "forward passes per sample: occlusion 5 (1 + 2x2 grid cells)" in res.output  # the cost, before any task
    man = json.loads((out / "launch" / "manifest.json").read_text())
    assert man["launcher"] == "local" and man["devices"] == ["cpu", "cpu"]
    assert len(man["tasks"]) == 2, "both shards must hold samples for this test to mean anything"
    for t in man["tasks"]:
        assert "--shard" in t["argv"] and "--launcher" not in t["argv"]
    n = _assert_same_records(world["single"] / "predictions.jsonl", out / "predictions.jsonl")
    assert n == sum(t["expected"] for t in man["tasks"])
    # status reads the outputs: every shard complete, no errors
    st = CliRunner().invoke(main, ["status", str(out)])
    assert st.exit_code == 0, st.output
    assert f"total {n}/{n} records, 0 errors; 2/2 shards complete" in st.output


def _children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(p.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc (Linux)")
def test_killed_worker_is_restarted_and_resumes_without_loss_or_duplicates(world, tmp_path):
    out = tmp_path / "killed"
    args = _attribute_args(world, out) + ["--launcher", "local", "--devices", "cpu,cpu", "--shards", "2"]
    result: dict = {}
    th = threading.Thread(target=lambda: result.setdefault("res", _invoke(args)))
    th.start()
    killed = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and th.is_alive():
            man_path = out / "launch" / "manifest.json"
            if man_path.exists():
                man = json.loads(man_path.read_text())
                store = out / man["tasks"][0]["output"]
                lines = store.read_text().count("\n") if store.exists() else 0
                if 1 <= lines < man["tasks"][0]["expected"]:
                    controller = int(man["job_ids"][0])
                    tasks = _children(controller)
                    if tasks:
                        killed = tasks[0]
                        os.kill(killed, signal.SIGKILL)  # the worker dies mid-run, its store half written
                        break
            time.sleep(0.05)
    finally:
        th.join(timeout=600)
    assert killed is not None, "the worker finished before it could be killed"
    res = result["res"]
    assert res.exit_code == 0, res.output
    assert "died without a result; restart 1/2" in res.output
    _assert_same_records(world["single"] / "predictions.jsonl", out / "predictions.jsonl")


def test_slurm_job_function_under_submitit_debug_executor(world, tmp_path):
    """The Slurm array task's job function, run by submitit's DebugExecutor, resumes and reproduces."""
    from medfocus.runner.launch import ShardJob, attribute_store_name

    out = tmp_path / "debug"
    base = _attribute_args(world, out)
    argvs = [base + ["--shard", f"{i}/2"] for i in range(2)]
    ex = submitit.DebugExecutor(folder=tmp_path / "sublogs")
    jobs = [ex.submit(ShardJob(), [argv]) for argv in argvs]
    assert [j.result() for j in jobs] == [1, 1]
    # requeue on preemption: the same command lines again, which resume (nothing recomputed)
    delayed = ShardJob().checkpoint([argvs[0]])
    assert delayed.args == ([argvs[0]],)
    assert delayed.function.__class__ is ShardJob
    before = (out / attribute_store_name(0, 2)).read_text()
    delayed.result()
    assert (out / attribute_store_name(0, 2)).read_text() == before
    res = CliRunner().invoke(main, ["merge", str(out)])
    assert res.exit_code == 0, res.output
    _assert_same_records(world["single"] / "predictions.jsonl", out / "predictions.jsonl")


def test_sbatch_script_carries_the_slurm_options(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    from medfocus.runner.launch import slurm_parameters

    params = slurm_parameters(partition="gpu", gpus_per_task=1, time="12:30:00", array_parallelism=3, account="rad",
                              extra=["mem=64G", "qos=high"])
    assert params["time"] == 750
    text = _make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path, map_count=16, **params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", "#SBATCH --time=750", "#SBATCH --account=rad",
                 "#SBATCH --mem=64G", "#SBATCH --qos=high", "#SBATCH --array=0-15%3", "#SBATCH --signal=USR2@120",
                 "#SBATCH --job-name=medfocus"):
        assert line in text, (line, text)


@pytest.mark.parametrize("spec,minutes", [("90", 90), (45, 45), ("01:30:00", 90), ("1-00:00:00", 1440), ("00:10", 10),
                                          ("00:00:30", 1)])
def test_slurm_time_formats(spec, minutes):
    from medfocus.runner.launch import parse_slurm_time

    assert parse_slurm_time(spec) == minutes


@pytest.mark.parametrize("args,message", [
    (["--launcher", "local"], "--launcher local needs --devices"),
    (["--launcher", "local", "--devices", "cuda"], "is not 'cpu' or 'cuda:<index>'"),
    (["--devices", "cpu,cpu"], "--devices need(s) --launcher local or slurm"),
    (["--launcher", "local", "--devices", "cpu", "--shard", "0/2"], "--shard and --merge are for runs without a launcher"),
    (["--launcher", "slurm", "--slurm-param", "oops"], "--slurm-param 'oops': expected KEY=VALUE"),
    (["--launcher", "slurm", "--shards", "0"], "--shards must be >= 1"),
])
def test_bad_launcher_options_fail_before_anything_starts(world, tmp_path, args, message):
    res = CliRunner().invoke(main, _attribute_args(world, tmp_path / "bad") + args)
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert not (tmp_path / "bad" / "launch").exists()


def test_slurm_launcher_off_cluster_is_a_clear_error(world, tmp_path):
    res = CliRunner().invoke(main, _attribute_args(world, tmp_path / "s") + ["--launcher", "slurm", "--shards", "2"])
    assert res.exit_code != 0
    assert "--launcher slurm" in res.output and "srun" in res.output, res.output


def test_missing_submitit_names_the_extra(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    res = CliRunner().invoke(main, _attribute_args(world, tmp_path / "m") + ["--launcher", "local", "--devices", "cpu"])
    assert res.exit_code != 0
    assert "pip install 'medfocus[slurm]'" in res.output, res.output


def test_bench_build_local_launcher_reproduces_single_process(world, tmp_path):
    common = ["bench", "build", "--model", "demo", "--dataset", "synthetic", "--data-root", str(world["data"]), "--no-progress"]
    res = CliRunner().invoke(main, common + ["--out", str(tmp_path / "b1")])
    assert res.exit_code == 0, res.output
    res = _invoke(common + ["--out", str(tmp_path / "b2"), "--launcher", "local", "--devices", "cpu,cpu", "--shards", "2"])
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "b2" / "launch" / "manifest.json").read_text())
    assert len(man["tasks"]) == 2
    split = Path("demo/synthetic")
    a = json.loads((tmp_path / "b1" / split / "direct.json").read_text())
    b = json.loads((tmp_path / "b2" / split / "direct.json").read_text())
    assert a == b
    log_a = [json.loads(x) for x in (tmp_path / "b1" / split / "direct.log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b2" / split / "direct.log.jsonl").read_text().splitlines()]
    assert sorted(log_a, key=lambda r: r["index"]) == log_b
    assert (tmp_path / "b1" / "retention.csv").read_text() == (tmp_path / "b2" / "retention.csv").read_text()
    # the shards shared one edit cache
    assert (tmp_path / "b2" / "edits").is_dir() and not (tmp_path / "b2" / "shards" / "0-of-2" / "edits").exists()


def test_manual_shards_merge_and_status_without_a_launch(world, tmp_path):
    out = tmp_path / "manual"
    for i in range(2):
        res = CliRunner().invoke(main, _attribute_args(world, out) + ["--shard", f"{i}/2"])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["merge", str(out)])
    assert res.exit_code == 0, res.output
    _assert_same_records(world["single"] / "predictions.jsonl", out / "predictions.jsonl")
    st = CliRunner().invoke(main, ["status", str(out)])
    # hand-run shards: each file with its records, expected counts unknown, the 2-way sharding complete
    assert st.exit_code == 0 and "2 shard outputs run by hand" in st.output and "Note:" not in st.output, st.output
    # the model of a hand-run shard comes from its records (its file name carries none)
    from medfocus.runner.launch import shard_status

    rows = shard_status(out)
    models = {json.loads(line)["model"] for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()}
    assert len(rows) == 2 and all(r["model"] == ", ".join(sorted(models)) for r in rows) and "*" not in models
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["merge", str(empty)])
    assert res.exit_code != 0 and "nothing to merge" in res.output


def test_argv_from_params_round_trips_every_option_kind():
    import click

    from medfocus.commands.launch import argv_from_params

    @click.command()
    @click.option("--name")
    @click.option("--n", type=int, default=3)
    @click.option("--tag", "tags", multiple=True)
    @click.option("--flag", is_flag=True)
    @click.option("--neg/--no-neg", default=True)
    @click.option("--launcher", default="none")
    def cmd(**kw):
        pass

    ctx = cmd.make_context("cmd", ["--name", "a b", "--tag", "x", "--tag", "y", "--flag", "--no-neg", "--launcher", "local"])
    argv = argv_from_params(cmd, ctx.params)
    assert argv == ["--name", "a b", "--n", "3", "--tag", "x", "--tag", "y", "--flag", "--no-neg"]
    assert cmd.make_context("cmd", argv).params == {**ctx.params, "launcher": "none"}



def test_status_names_the_models_of_a_bench_shard_run_by_hand(tmp_path):
    """A bench shard folder's model is read from its split logs' rows (the folder name carries none)."""
    from medfocus.runner.launch import shard_status

    log = tmp_path / "shards" / "0-of-2" / "demo" / "synthetic" / "direct.log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"model": "demo", "dataset": "synthetic", "index": i, "error": None}) + "\n" for i in range(3)))
    (tmp_path / "shards" / "1-of-2").mkdir()
    rows = {r["shard"]: r for r in shard_status(tmp_path)}
    assert (rows["0/2"]["model"], rows["0/2"]["done"]) == ("demo", 3)
    assert (rows["1/2"]["model"], rows["1/2"]["done"]) == ("(no records yet)", 0)  # nothing written yet: model unknown
