"""`medfocus attribute` / `report` CLI: YAML configs, shards + merge, errors; fake model and methods."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medfocus.cli import main
from medfocus.runner.store import load_results

sys.path.insert(0, str(Path(__file__).parent))
import test_runner_fakes as fakes  # noqa: E402


@pytest.fixture()
def fake_world(tmp_path, monkeypatch):
    """Fake samples (served as dataset 'synthetic'), a fake LVLM loader and two fake methods in the registry."""
    import medfocus.attribution.base as abase
    import medfocus.commands.attribute as attr_cmd
    import medfocus.lvlm.loading as loading

    samples, boxes = fakes.make_samples(tmp_path / "imgs", 8)
    # the real reader reads the images: write them as PNGs
    from PIL import Image
    import numpy as np

    for s in samples:
        png = Path(s.image_path).with_suffix(".png")
        Image.fromarray(np.load(s.image_path)).save(png)
        s.image_path = str(png)

    class Hot(fakes.HotBoxMethod):
        def __init__(self, **params):
            super().__init__(boxes)

    class Boom(fakes.BoomMethod):
        def __init__(self, **params):
            self.params = params

    monkeypatch.setitem(abase._REGISTRY, "fake_hot", f"{__name__}:_placeholder")
    real_resolve = abase._resolve
    monkeypatch.setattr(abase, "_resolve", lambda name: {"fake_hot": Hot, "fake_boom": Boom}.get(name) or real_resolve(name))
    monkeypatch.setattr(attr_cmd, "load_samples", lambda ds, root, rescale_boxes=False: samples if ds == "synthetic" else [])
    loads = []
    monkeypatch.setattr(loading, "load_lvlm", lambda name, device=None, **kw: loads.append(name) or fakes.FakeAdapter(name))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([
        {"model": "demo", "dataset": "synthetic", "index": i, "answer": "Yes", "prediction_direct": "Yes",
         "prediction_edited_direct": "No", "mode": "direct", "editor": "oracle"} for i in range(8)
    ]))
    return {"bench": bench, "samples": samples, "boxes": boxes, "loads": loads, "tmp": tmp_path}


def test_attribute_config_shards_merge_and_report(fake_world, tmp_path):
    out = tmp_path / "attr"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"bench": [str(fake_world["bench"])], "dataset": "synthetic", "method": ["fake_hot", "fake_boom"],
                                   "out": str(out), "no-progress": True, "shard": "0/2", "param": ["fake_boom.level=3"]}))
    runner = CliRunner()
    r0 = runner.invoke(main, ["attribute", "--config", str(cfg)])
    assert r0.exit_code == 0, r0.output
    r1 = runner.invoke(main, ["attribute", "--config", str(cfg), "--shard", "1/2"])  # a flag overrides the file
    assert r1.exit_code == 0, r1.output
    parts = sorted(out.glob("predictions.shard-*.jsonl"))
    assert [p.name for p in parts] == ["predictions.shard-0-of-2.jsonl", "predictions.shard-1-of-2.jsonl"]
    n0, n1 = (len(load_results(p)) for p in parts)
    assert n0 + n1 == 16 and n0 > 0 and n1 > 0
    rm = runner.invoke(main, ["attribute", "--out", str(out), "--merge"])
    assert rm.exit_code == 0 and "(16 records from 2 shard files)" in rm.output, rm.output
    recs = load_results(out / "predictions.jsonl")
    assert len(recs) == 16 and sum(1 for r in recs if r["error"]) == 1  # BoomMethod fails on sample 3
    hot = [r for r in recs if r["method"] == "fake_hot"]
    assert all(r["heatmap_boxes"] == r["gt_boxes"] and r["editor"] == "oracle" for r in hot)
    assert fake_world["loads"] == ["demo", "demo"]  # one load per shard run

    # resume: the same command again computes nothing
    r2 = runner.invoke(main, ["attribute", "--config", str(cfg)])
    assert r2.exit_code == 0 and f"0 computed, {n0} already in the store" in r2.output

    # report of that run folder (evaluation of the records through medfocus.evaluation)
    rr = runner.invoke(main, ["report", str(out), "--title", "fake run"])
    assert rr.exit_code == 0, rr.output
    html = (out / "report.html").read_text()
    assert "fake run" in html and "fake_hot" in html and "100.0" in html
    # 7 paired samples (sample 3 failed for fake_boom) are below MIN_PAIRS: no method is bolded, and the report says why
    assert "<b>100.0</b>" not in html and "Bold withheld" in html and "fewer than 10 paired samples (7)" in html


def test_a_shard_without_samples_writes_its_empty_file_so_the_run_is_complete(fake_world, tmp_path):
    """A shard that holds no sample used to print '0 samples x 1 methods -> FILE' and write nothing, so merge
    and status called the finished run incomplete; a run with no sample at all says that nothing is written."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps(json.loads(fake_world["bench"].read_text())[:1]))
    out = tmp_path / "sh"
    runner = CliRunner()
    outs = [runner.invoke(main, ["attribute", "--bench", str(one), "--method", "fake_hot", "--out", str(out),
                                 "--shard", f"{i}/2", "--no-progress"]) for i in (0, 1)]
    assert all(r.exit_code == 0 for r in outs), [r.output for r in outs]
    empty = [i for i, r in enumerate(outs) if "holds no sample" in r.output]
    assert len(empty) == 1 and f"shard {empty[0]}/2 holds no sample" in outs[empty[0]].output
    assert (out / f"predictions.shard-{empty[0]}-of-2.jsonl").read_text() == ""
    for args in (["attribute", "--out", str(out), "--merge"], ["merge", str(out)]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0 and "(1 records from 2 shard files)" in r.output and "missing" not in r.output, r.output
    r = runner.invoke(main, ["attribute", "--bench", str(one), "--method", "fake_hot", "--out", str(tmp_path / "z"),
                             "--limit", "0"])
    assert r.exit_code == 2 and "--limit" in r.output  # refused while parsing, like bench build's
    empty_split = tmp_path / "none.json"
    empty_split.write_text("[]")
    r = runner.invoke(main, ["attribute", "--bench", str(empty_split), "--dataset", "synthetic", "--method", "fake_hot",
                             "--out", str(tmp_path / "n")])
    assert r.exit_code == 1 and "no benchmark records matched" in r.output, r.output  # an empty split is refused
    assert not (tmp_path / "n" / "predictions.jsonl").exists()


def test_attribute_errors_are_clear(fake_world, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: [x]\n")
    r = runner.invoke(main, ["attribute", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown key 'methd'" in r.output and "method" in r.output
    r = runner.invoke(main, ["attribute", "--out", str(tmp_path / "o"), "--bench", str(tmp_path / "missing.json")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = runner.invoke(main, ["attribute", "--out", str(tmp_path / "o"), "--bench", str(fake_world["bench"]),
                             "--dataset", "synthetic", "--method", "fake_hot", "--param", "oops"])
    assert r.exit_code == 1 and "METHOD.NAME=VALUE" in r.output
    r = runner.invoke(main, ["attribute", "--out", str(tmp_path / "o"), "--bench", str(fake_world["bench"]), "--shard", "2/2"])
    assert r.exit_code == 1 and "shard" in r.output


def test_help_has_examples():
    runner = CliRunner()
    for cmd in ("attribute", "report", "demo"):
        r = runner.invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output and "--config" in r.output, cmd


def test_refine_shorthands():
    from medfocus.commands.attribute import apply_refine_options
    from medfocus.errors import ConfigError

    p = apply_refine_options({"rise": {"n_masks": 8}}, ["medfocus", "prompting_medsam", "rise"], "medsam", "demo")
    assert p == {"rise": {"n_masks": 8}, "medfocus": {"refine": "medsam", "medsam": "demo"}, "prompting_medsam": {"medsam": "demo"}}
    assert apply_refine_options({}, ["occlusion"], None, None) == {}
    # a consistent --param is fine, a contradicting one is an error
    assert apply_refine_options({"medfocus": {"refine": "none"}}, ["medfocus"], "none", None) == {"medfocus": {"refine": "none"}}
    with pytest.raises(ConfigError, match="conflicts"):
        apply_refine_options({"medfocus": {"refine": "none"}}, ["medfocus"], "medsam", None)
    with pytest.raises(ConfigError, match="not selected"):
        apply_refine_options({}, ["occlusion"], "medsam", None)
    with pytest.raises(ConfigError, match="neither"):
        apply_refine_options({}, ["occlusion"], None, "demo")


def test_attribute_refine_flag_needs_medfocus(fake_world, tmp_path):
    r = CliRunner().invoke(main, ["attribute", "--out", str(tmp_path / "o"), "--bench", str(fake_world["bench"]),
                                  "--method", "fake_hot", "--refine", "medsam"])
    assert r.exit_code != 0 and "--refine applies to the medfocus method" in r.output
    r = CliRunner().invoke(main, ["attribute", "--out", str(tmp_path / "o"), "--bench", str(fake_world["bench"]),
                                  "--refine", "sam2"])
    assert r.exit_code != 0 and "sam2" in r.output


def test_unimportable_command_says_why(monkeypatch):
    import medfocus.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "broken", "medfocus.no_such_module:cmd")
    r = CliRunner().invoke(main, ["broken"])
    assert r.exit_code != 0 and "command 'broken' is unavailable" in r.output and "no_such_module" in r.output


def _split(tmp_path, name, recs):
    p = tmp_path / name
    p.write_text(json.dumps(recs))
    return p


def _rec(i, **kw):
    return {"model": "demo", "dataset": "synthetic", "index": i, "answer": "Yes", "prediction_direct": "Yes", **kw}


def test_split_of_another_model_is_refused_or_relabelled_explicitly(fake_world, tmp_path):
    """A split built for qwen is not silently explained as demo's answer: an error naming the file, the
    split's model and --model, before any model loads; --relabel-split-model does it on purpose and every
    record says whose answer it is."""
    split = _split(tmp_path, "qwen_split.json", [_rec(i, model="qwen2_5_vl_3b", prediction_direct="No") for i in range(2)])
    base = ["attribute", "--bench", str(split), "--method", "fake_hot", "--no-progress"]
    r = CliRunner().invoke(main, [*base, "--model", "demo", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert f"benchmark file {split} was built for model(s) ['qwen2_5_vl_3b'], not for --model demo" in r.output
    assert "--relabel-split-model" in r.output and "Traceback" not in r.output
    assert fake_world["loads"] == [] and not (tmp_path / "o" / "predictions.jsonl").exists()
    r = CliRunner().invoke(main, [*base, "--model", "demo", "--relabel-split-model", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    recs = load_results(tmp_path / "o" / "predictions.jsonl")
    assert sorted((x["model"], x["index"], x["answer"], x["answer_source"], x["split_model"]) for x in recs) == [
        ("demo", 0, "No", "split_other_model", "qwen2_5_vl_3b"), ("demo", 1, "No", "split_other_model", "qwen2_5_vl_3b")]
    # the flag is for one --model, with a split, and never needed for a split of that model
    r = CliRunner().invoke(main, [*base, "--model", "demo", "--model", "x", "--relabel-split-model", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "one --model" in r.output
    r = CliRunner().invoke(main, ["attribute", "--dataset", "synthetic", "--model", "demo", "--relabel-split-model",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "applies with --bench" in r.output
    # two models in one split: each --model gets its own records; a --model none names is an error
    both = _split(tmp_path, "both.json", [_rec(0), _rec(1, model="qwen2_5_vl_3b")])
    r = CliRunner().invoke(main, ["attribute", "--bench", str(both), "--method", "fake_hot", "--model", "demo",
                                  "--out", str(tmp_path / "o2"), "--no-progress"])
    assert r.exit_code == 0 and "records not run: 1 of other models (--model demo)" in r.output, r.output
    assert [(x["model"], x["index"], x["answer_source"]) for x in load_results(tmp_path / "o2" / "predictions.jsonl")] == [
        ("demo", 0, "split")]


def test_bench_file_without_records_of_dataset_says_so(fake_world, tmp_path):
    """--dataset X with a split whose records are all of other datasets: the error says that (with the
    datasets it holds and their counts), not that the split names no model; nothing loads."""
    split = _split(tmp_path, "pad.json", [_rec(0, dataset="padchest_gr"), _rec(1, dataset="padchest_gr"),
                                          _rec(2, dataset="synthetic")])
    for extra in (["--model", "demo"], []):
        r = CliRunner().invoke(main, ["attribute", "--bench", str(split), "--dataset", "vindr_cxr", *extra,
                                      "--method", "fake_hot", "--out", str(tmp_path / "o")])
        assert r.exit_code == 1, r.output
        assert (f"no record of --dataset vindr_cxr in benchmark file {split}: it holds 2 record(s) of padchest_gr, "
                "1 record(s) of synthetic") in r.output
        assert "no model" not in r.output and "Traceback" not in r.output
    assert fake_world["loads"] == [] and not (tmp_path / "o" / "predictions.jsonl").exists()


def test_bench_record_matching_no_mode_is_an_error(fake_world, tmp_path):
    split = _split(tmp_path, "typo.json", [_rec(0), {k.replace("prediction", "predicton"): v for k, v in _rec(1).items()}])
    r = CliRunner().invoke(main, ["attribute", "--bench", str(split), "--method", "fake_hot", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert f"benchmark file {split} record 1: the record names no mode" in r.output
    assert "'prediction_direct'" in r.output and "'predicton_direct' -> 'prediction_direct'" in r.output
    assert fake_world["loads"] == []


def test_explicit_mode_field_wins_and_left_out_records_are_counted(fake_world, tmp_path):
    """{"mode": "cot", "prediction_direct": ...} is a step-by-step record only; records of modes not asked
    for are named in a note, not dropped silently."""
    split = _split(tmp_path, "modes.json", [_rec(0), _rec(1, mode="cot"), _rec(2, mode="cot", prediction_cot="Yes, a rationale")])
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["attribute", "--bench", str(split), "--method", "fake_hot", "--mode", "direct", "--mode", "cot",
                                  "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    got = sorted((x["index"], x["mode"], x["answer"], x["answer_source"]) for x in load_results(out / "predictions.jsonl"))
    assert got == [(0, "direct", "Yes", "split"), (1, "cot", "Yes", "ground_truth"), (2, "cot", "Yes, a rationale", "split")]
    r = CliRunner().invoke(main, ["attribute", "--bench", str(split), "--method", "fake_hot", "--mode", "direct",
                                  "--out", str(tmp_path / "o2"), "--no-progress"])
    assert r.exit_code == 0 and "records not run: 2 of mode(s) ['cot'] only (--mode direct)" in r.output, r.output
    assert [x["index"] for x in load_results(tmp_path / "o2" / "predictions.jsonl")] == [0]


def test_bench_dataset_alias_and_index_out_of_range(fake_world, tmp_path):
    """A documented alias in a record or --dataset names the registry's dataset; an index past the end
    names the file, record, index, the dataset's size and the data root."""
    split = _split(tmp_path, "alias.json", [_rec(0, dataset="synth"), _rec(1, dataset="SYNTHETIC")])
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["attribute", "--bench", str(split), "--dataset", "synth", "--method", "fake_hot",
                                  "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert sorted((x["dataset"], x["index"]) for x in load_results(out / "predictions.jsonl")) == [("synthetic", 0), ("synthetic", 1)]
    split = _split(tmp_path, "far.json", [_rec(0), _rec(8)])
    r = CliRunner().invoke(main, ["attribute", "--bench", str(split), "--data-root", str(tmp_path), "--method", "fake_hot",
                                  "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1, r.output
    assert (f"benchmark file {split} record 1: index 8 is out of range for dataset 'synthetic', which has 8 samples "
            f"under data root {tmp_path} (indices 0..7)") in r.output
    split = _split(tmp_path, "unknown.json", [_rec(0, dataset="mimic")])
    r = CliRunner().invoke(main, ["attribute", "--bench", str(split), "--method", "fake_hot", "--out", str(tmp_path / "o3")])
    assert r.exit_code == 1 and f"{split} record 0: field 'dataset': unknown dataset 'mimic'" in r.output, r.output
    assert fake_world["loads"] == ["demo"]  # only the first, good run loaded a model


def test_attribute_help_lists_every_registered_dataset():
    from medfocus.datasets import DATASET_REGISTRY

    for cmd in (["attribute"], ["bench", "build"]):
        text = " ".join(CliRunner().invoke(main, [*cmd, "--help"], terminal_width=400).output.split())
        assert "nih_cxr8" in text and all(name in text for name in DATASET_REGISTRY.names()), cmd


# ---- exit status: a run in which every record failed exits 3; one with any result exits 0 ---------------------
class _AlwaysFails:
    def __init__(self, **params):
        self.params = params

    def attribute(self, adapter, image, question, answer):
        raise RuntimeError(f"out of memory on a {image.shape[0]}x{image.shape[1]} film")


def _register(monkeypatch, name, cls):
    import medfocus.attribution.base as abase

    monkeypatch.setitem(abase._REGISTRY, name, f"{__name__}:_placeholder")
    resolve = abase._resolve
    monkeypatch.setattr(abase, "_resolve", lambda n: cls if n == name else resolve(n))


def test_attribute_run_where_every_record_failed_exits_3_naming_the_errors_file(fake_world, tmp_path, monkeypatch):
    _register(monkeypatch, "fake_always", _AlwaysFails)
    out = tmp_path / "allfail"
    args = ["attribute", "--bench", str(fake_world["bench"]), "--dataset", "synthetic", "--method", "fake_always",
            "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(err) == 1, r.stderr
    assert "all 8 records of this run failed" in err[0] and str(out / "predictions.jsonl") in err[0]
    assert "first: RuntimeError: out of memory on a 32x32 film" in err[0] and "--retry-errors" in err[0]
    recs = load_results(out / "predictions.jsonl")
    assert len(recs) == 8 and all(x["error"] for x in recs)  # every failure is recorded
    # a rerun serves the stored errors: still nothing holds a result
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3 and "8 already in the store" in r.output, r.output


def test_attribute_run_with_one_failing_sample_records_it_continues_and_exits_0(fake_world, tmp_path):
    out = tmp_path / "onefail"
    r = CliRunner().invoke(main, ["attribute", "--bench", str(fake_world["bench"]), "--dataset", "synthetic",
                                  "--method", "fake_boom", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 records carry an error" in r.output and "Error:" not in r.output
    recs = {x["index"]: x for x in load_results(out / "predictions.jsonl")}
    assert sorted(recs) == list(range(8))  # the samples after the failing one ran too
    assert [i for i, x in recs.items() if x["error"]] == [3]
    assert "synthetic failure on sample 3" in recs[3]["error"]


def test_explain_run_where_every_method_failed_exits_3(tmp_path, demo_adapter, monkeypatch):
    import medfocus.lvlm
    from medfocus.io.writers import write_png

    import test_runner_fakes as fk

    _register(monkeypatch, "fake_always", _AlwaysFails)
    _register(monkeypatch, "fake_random", fk.RandomMethod)
    monkeypatch.setattr(medfocus.lvlm, "load_lvlm", lambda name, **kw: demo_adapter)
    rng = __import__("numpy").random.default_rng(0)
    film = write_png(tmp_path / "film.png", rng.integers(40, 220, (256, 256)).astype("uint8"))
    base = ["explain", str(film), "--finding", "nodule", "--answer", "Yes", "--no-progress"]
    r = CliRunner().invoke(main, base + ["--method", "fake_always", "--out", str(tmp_path / "x")])
    assert r.exit_code == 3, r.output
    assert "all 1 records of this run failed" in r.stderr and str(tmp_path / "x" / "predictions.jsonl") in r.stderr
    assert "--overwrite" in r.stderr and (tmp_path / "x" / "explain.html").is_file()  # the viewer shows the failure
    # one method fails, the other gives a map: the failure is recorded, the run exits 0
    r = CliRunner().invoke(main, base + ["--method", "fake_always", "--method", "fake_random", "--out", str(tmp_path / "y")])
    assert r.exit_code == 0, r.output
    recs = {x["method"]: x for x in load_results(tmp_path / "y" / "predictions.jsonl")}
    assert recs["fake_always"]["error"] and not recs["fake_random"]["error"]
    assert "1 records carry an error" in r.output


def test_launched_attribute_whose_tasks_all_failed_exits_3(fake_world, tmp_path, monkeypatch):
    """The launcher itself is tested in test_launch.py; here the workers are stood in for by writing each task's
    store with error records, and the real status read of the tasks' outputs decides the exit status."""
    import medfocus.commands.launch as launch_cmd

    def fake_launch(manifest, opts, *, device, progress, errors_only):
        Path(manifest.out).mkdir(parents=True, exist_ok=True)
        for t in manifest.tasks:
            recs = [{"model": "demo", "dataset": "synthetic", "index": 100 * t.shard + k, "mode": "direct",
                     "method": "fake_hot", "error": None if (k == 0 and not errors_only) else "RuntimeError: worker"}
                    for k in range(2)]
            (Path(manifest.out) / t.output).write_text("".join(json.dumps(r) + "\n" for r in recs))
        manifest.save()

    base = ["attribute", "--bench", str(fake_world["bench"]), "--dataset", "synthetic", "--method", "fake_hot",
            "--launcher", "local", "--devices", "cpu,cpu", "--no-progress"]
    for errors_only, status in ((True, 3), (False, 0)):
        monkeypatch.setattr(launch_cmd, "run_launch", lambda m, o, **kw: fake_launch(m, o, errors_only=errors_only, **kw))
        out = tmp_path / f"launched_{errors_only}"
        r = CliRunner().invoke(main, base + ["--out", str(out)])
        assert r.exit_code == status, r.output
        assert ("all 4 records of this run failed" in r.output) == errors_only
        assert ("first: RuntimeError: worker" in r.output) == errors_only
