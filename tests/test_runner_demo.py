"""The demo pipeline end to end: plumbing on a tiny random model (always), the real thing on the
shipped demo model (skipped until its weights are in the package)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medfocus.runner.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    import torch

    from medfocus.lvlm.loading import load_lvlm
    from medfocus.lvlm.tiny import build_tiny

    return load_lvlm(str(build_tiny("qwen_vl", tmp_path_factory.mktemp("tiny") / "qwen_vl")), device="cpu", dtype=torch.float32)


def test_demo_pipeline_plumbing_tiny_model(tiny_qwen, tmp_path):
    """A random tiny model answers nothing correctly, so the causal filter keeps no sample: the demo must
    still write every output, with a retention table that shows why (all fail the correctness gate)."""
    cfg = DemoConfig(n_samples=3, per_mode=1, n_reference=2, size=128, methods=("occlusion",), max_new_tokens=6,
                     shortcut_films=0)
    logs: list[str] = []
    res = run_demo(tmp_path / "demo", cfg, adapter=tiny_qwen, progress=False, log=logs.append)
    out = tmp_path / "demo"
    for name in ("report.html", "table.md", "table.csv", "retention.md", "retention.csv", "timings.json"):
        assert (out / name).is_file(), name
    ret = pd.read_csv(out / "retention.csv")
    assert len(ret) == 4 and set(ret["mode"]) == {"direct", "cot"}
    assert (ret["errors"] + ret["failed_correct"] + ret["failed_flip"] + ret["failed_background"] + ret["kept"] == ret["n"]).all()
    assert res["n_records"] == sum(min(1, k) for k in ret[ret["editor"] == "oracle"]["kept"])  # <= per_mode kept samples, 1 method
    assert json.loads((out / "timings.json").read_text())["config"]["methods"] == ["occlusion"]
    html = (out / "report.html").read_text()
    assert "Causal filter: retention" in html and "✗ correct" in html and "No attribution records" in html
    first = json.loads((out / "timings.json").read_text())
    assert first["resume_timings"] == [] and first["timings"] == {**first["this_run"], "total": first["timings"]["total"]}
    # a rerun resumes: the data are not rewritten, and the first full step times survive it
    logs.clear()
    res2 = run_demo(out, cfg, adapter=tiny_qwen, progress=False, log=logs.append)
    assert not any(line.startswith("[data] writing") for line in logs)
    second = json.loads((out / "timings.json").read_text())
    for reused in ("data", "bench"):
        assert second["timings"][reused] == first["timings"][reused]
    assert len(second["resume_timings"]) == 1 and second["resume_timings"][0] == second["this_run"] == res2["this_run_timings"]
    assert second["timings"]["total"] == pytest.approx(sum(v for k, v in second["timings"].items() if k != "total"), abs=0.02)


def test_merge_timings_keeps_the_first_full_measurement():
    from medfocus.runner.demo import merge_timings

    full = {"data": 4.3, "model": 2.3, "bench": 18.2, "attribute": 80.7, "evaluate": 2.3, "report": 3.5, "total": 111.6}
    first = merge_timings(None, full, {k: True for k in full})
    assert first == {"timings": {**full, "total": 111.3}, "resume_timings": []}
    resumed = {"data": 0.2, "model": 2.0, "bench": 0.4, "attribute": 0.9, "evaluate": 2.1, "report": 3.0, "total": 8.6}
    did = {"data": False, "model": True, "bench": False, "attribute": False, "evaluate": True, "report": True}
    second = merge_timings(first, resumed, did)
    assert second["timings"] == {"data": 4.3, "model": 2.0, "bench": 18.2, "attribute": 80.7, "evaluate": 2.1, "report": 3.0,
                                 "total": 110.3}
    assert second["resume_timings"] == [resumed]
    # a step recomputed from scratch later (e.g. new data) replaces its stale time; older resumes stay listed
    third = merge_timings(second, {**resumed, "data": 5.0}, {**did, "data": True})
    assert third["timings"]["data"] == 5.0 and third["timings"]["bench"] == 18.2 and len(third["resume_timings"]) == 2
    # a step first measured by a resumed run (nothing earlier to keep) records what was measured
    assert merge_timings(None, resumed, did)["timings"]["bench"] == 0.4


def test_overall_progress_total_is_replaced_not_added():
    from medfocus.runner.demo import STEP_COST, _Overall

    o = _Overall(enabled=True)
    try:
        o.plan("bench", 100)
        o.plan("data", 10)
        o.plan("bench", 40)  # the real size, once known, replaces the estimate
        assert o.bar.total == pytest.approx(STEP_COST["bench"] * 40 + STEP_COST["data"] * 10)
        o.done("data", 10)
        o.done("bench", 40)
        assert o.bar.n == pytest.approx(o.bar.total)
    finally:
        o.close()


def test_demo_threads_follow_the_available_cores(tiny_qwen, tmp_path, monkeypatch, capsys):
    import os

    import torch

    from medfocus.errors import ConfigError
    from medfocus.runner import demo as rd

    before = torch.get_num_threads()
    n, prev = rd.configure_threads(None)
    try:
        assert n == len(os.sched_getaffinity(0)) == torch.get_num_threads()
    finally:
        rd.restore_threads(prev)
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        rd.configure_threads(0)
    # a process pinned to one core runs the demo with one thread and gives the caller's setting back
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    seen = {}
    import medfocus.bench

    real_build = medfocus.bench.build_benchmark

    def spy(*a, **k):
        seen["threads"] = torch.get_num_threads()
        return real_build(*a, **k)

    monkeypatch.setattr(medfocus.bench, "build_benchmark", spy)
    torch.set_num_threads(2)
    try:
        cfg = DemoConfig(n_samples=3, per_mode=1, n_reference=2, size=128, methods=("occlusion",), max_new_tokens=6,
                         modes=("direct",), editors=("oracle",), shortcut_films=4)
        res = rd.run_demo(tmp_path / "demo", cfg, adapter=tiny_qwen, progress=True, log=lambda m: None)
        # one progress line for the whole demo: no step shows a bar of its own, and it reaches 100 %
        import re

        err = capsys.readouterr().err
        bars = set(re.findall(r"([A-Za-z][\w ]*): +\d+%\|", err))
        assert bars == {"demo"}, bars
        assert "demo: 100%" in err
        assert seen["threads"] == 1  # the causal filter ran with one intra-op thread
        assert res["threads"] == 1 and json.loads((tmp_path / "demo" / "timings.json").read_text())["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_demo_pipeline_demo_model(demo_adapter, tmp_path):
    cfg = DemoConfig(n_samples=8, per_mode=1, n_reference=4, methods=("occlusion", "medfocus"), shortcut_films=8)
    logs: list[str] = []
    res = run_demo(tmp_path / "demo", cfg, adapter=demo_adapter, progress=False, log=logs.append)
    # the shortcut step: both models measured on the same cued / cue-free films, with intervals
    sc = (tmp_path / "demo" / "shortcut.md").read_text()
    assert "| demo |" in sc and "| demo-shortcut |" in sc and "cue-necessary" in sc
    assert any(m.startswith("[shortcut] demo:") for m in logs)
    ret = pd.DataFrame(res["retention"])
    kept = ret[ret["editor"] == "oracle"].set_index("mode")["kept"]
    assert kept.sum() > 0, "the demo model should keep some samples under the exact (oracle) filter"
    expected = sum(min(1, int(k)) for k in kept) * 2
    assert res["n_records"] == expected and res["n_errors"] == 0
    table = (tmp_path / "demo" / "table.md").read_text()
    assert "occlusion" in table and "medfocus" in table
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "MedFocus: concepts and tokens" in html
    from medfocus.runner.store import load_results

    cot = [r for r in load_results(tmp_path / "demo" / "predictions.jsonl") if r["mode"] == "cot"]
    # the attributed step-by-step answer is the model's whole rationale, not the parsed Yes/No
    assert cot and all(len(r["answer"].split()) > 3 for r in cot)
    assert all(len(r["extras"].get("answer_tokens", [])) > 3 for r in cot if r["method"] == "medfocus")
    # MedFocus ran with the demo segmenter, masks and the nested rule (the demo's settings)
    mf = [r for r in load_results(tmp_path / "demo" / "predictions.jsonl") if r["method"] == "medfocus"]
    assert mf and all((r["extras"]["refine"], r["extras"]["region"], r["extras"]["rule"]) == ("medsam", "mask", "nested")
                      for r in mf)


def test_demo_same_seed_same_tables(demo_adapter, tmp_path):
    """Deterministic under a seed (issue 15, "`make demo` gives the same tables for the same seed"): two
    runs into two empty folders write byte-identical tables, and the same records but for wall-clock
    times. Small but through every seeded step: synthesis, both editors of the filter, MedFocus (UOT +
    the demo segmenter), the faithfulness curves with their random reference, bootstrap intervals."""
    from medfocus.runner.store import load_results

    cfg = DemoConfig(n_samples=6, per_mode=1, n_reference=2, methods=("medfocus",), faithfulness_per_mode=1, seed=3,
                     threads=1, shortcut_films=4)
    outs = [tmp_path / "a", tmp_path / "b"]
    results = [run_demo(out, cfg, adapter=demo_adapter, progress=False, log=lambda m: None) for out in outs]
    assert results[0]["n_records"] > 0 and results[0]["n_errors"] == 0
    for name in ("table.csv", "table.md", "retention.csv", "retention.md", "shortcut.md"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name

    def untimed(out):
        recs = []
        for r in load_results(out / "predictions.jsonl"):
            r = json.loads(json.dumps(r).replace(str(out), "<out>"))  # paths into the run folder
            for k in ("seconds", "wall_seconds"):
                r.pop(k)
            r["extras"].pop("seconds_detail", None)
            recs.append(r)
        return recs

    assert untimed(outs[0]) == untimed(outs[1])
    # the README's `medfocus evaluate <demo>/predictions.jsonl` gives the demo's own table (its Del./Ins. AUC
    # columns included) and counts the file's records, not the faithfulness reference rows
    from click.testing import CliRunner

    from medfocus.cli import main

    res = CliRunner().invoke(main, ["evaluate", str(outs[0] / "predictions.jsonl"), "--out", str(tmp_path / "eval"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    table = (outs[0] / "table.md").read_text()
    assert "Del. AUC" in table and "Ins. AUC" in table and "reference: random map" in table
    assert (tmp_path / "eval" / "table.md").read_text() == table
    n_lines = len((outs[0] / "predictions.jsonl").read_text().splitlines())
    assert n_lines == results[0]["n_records"] and f"\n{n_lines} records (0 with errors) + " in "\n" + res.output


def test_demo_command_fails_loudly_when_nothing_is_attributed(tiny_model_dirs, tmp_path):
    """`medfocus demo` must not exit 0 with an empty report: a random model answers nothing correctly,
    so the filter keeps no sample and the command says where to look."""
    from click.testing import CliRunner

    from medfocus.cli import main

    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--model", str(tiny_model_dirs["qwen_vl"]),
                                    "--n-samples", "2", "--per-mode", "1", "--n-reference", "2",
                                    "--method", "occlusion", "--mode", "direct", "--no-progress"])
    assert res.exit_code != 0
    assert "no sample was attributed" in res.output and "retention.md" in res.output
    assert (out / "retention.md").is_file() and (out / "report.html").is_file()


def test_demo_command_passes_method_params(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import medfocus.runner.demo as rd
    from medfocus.cli import main

    seen = {}

    def fake_run_demo(out, cfg, progress=True):
        seen["params"] = cfg.method_params
        seen["threads"] = cfg.threads
        return {"n_records": 1, "n_errors": 0, "table": "", "report": str(out / "report.html")}

    monkeypatch.setattr(rd, "run_demo", fake_run_demo)
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--param", "medfocus.region=box",
                                    "--param", "medfocus.tau=0.8", "--param", "rise.n_masks=32"])
    assert res.exit_code == 0, res.output
    assert seen["params"] == {"medfocus": {"region": "box", "tau": 0.8}, "rise": {"n_masks": 32}}
    assert seen["threads"] is None  # default: the cores the process may use (runner.demo.available_cores)
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert seen["threads"] == 1
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--param", "oops"])
    assert res.exit_code != 0 and "METHOD.NAME=VALUE" in res.output


def test_demo_checks_the_model_and_its_indices_before_the_filter(tiny_qwen, tmp_path, monkeypatch):
    """The demo runner fails fast too: a layer index the model does not have is refused right after the
    model step, before the causal filter runs; a model that cannot be loaded before any data are written."""
    import huggingface_hub.constants as hfc

    from medfocus.errors import ConfigError, ModelError

    n = len(tiny_qwen.decoder_layers)
    cfg = DemoConfig(n_samples=3, per_mode=1, n_reference=2, size=128, methods=("gradcam", "occlusion"), shortcut_films=0,
                     method_params={"gradcam": {"layer": 99}})
    with pytest.raises(ConfigError, match=rf"method 'gradcam': parameter 'layer' = 99 is out of range .* {n} decoder layers"):
        run_demo(tmp_path / "d", cfg, adapter=tiny_qwen, progress=False, log=lambda m: None)
    assert (tmp_path / "d" / "data").is_dir() and not (tmp_path / "d" / "bench").exists()
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cfg = DemoConfig(n_samples=3, per_mode=1, n_reference=2, size=128, methods=("occlusion",), shortcut_films=0,
                     model="someone/not-cached")
    with pytest.raises(ModelError, match="not available locally"):
        run_demo(tmp_path / "d2", cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "d2" / "data").exists()


def test_demo_data_follows_the_lesion_size_rule_and_a_changed_rule_rewrites_it(monkeypatch, tmp_path):
    """`medfocus demo --lesion-size-rule` reaches the demo's config; its data stamp records the resolved
    rule, so a rerun in another world writes new films instead of reusing the old ones."""
    from click.testing import CliRunner

    import medfocus.runner.demo as rd
    from medfocus.cli import main
    from medfocus.datasets.synthetic.dataset import written_settings

    seen = {}
    monkeypatch.setattr(rd, "run_demo", lambda out, cfg, progress=True: seen.update(rule=cfg.lesion_size_rule) or
                        {"n_records": 1, "n_errors": 0, "table": "", "report": str(out / "report.html")})
    assert CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d")]).exit_code == 0 and seen["rule"] is None
    assert CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--lesion-size-rule", "fleischner"]).exit_code == 0
    assert seen["rule"] == "fleischner"

    data, ref = tmp_path / "data", tmp_path / "ref"
    cfg = rd.DemoConfig(n_samples=6, n_reference=1, size=64)
    _, wrote = rd._write_data(cfg, data, ref, lambda s: None, workers=1, progress=False)
    assert wrote and written_settings(data)["lesion_size_rule"] == "fleischner"  # the default world, resolved
    assert rd._write_data(cfg, data, ref, lambda s: None, workers=1, progress=False)[1] is False  # same settings: reused
    cfg.lesion_size_rule = "nih"
    _, wrote = rd._write_data(cfg, data, ref, lambda s: None, workers=1, progress=False)
    assert wrote and written_settings(data)["lesion_size_rule"] == "nih"


def test_a_demo_folder_with_results_of_other_settings_names_fresh(tmp_path):
    """The store's refusal (results computed with other method settings, e.g. by an older medfocus) gets the
    demo's own way out; other errors pass unchanged."""
    from medfocus.errors import ConfigError
    from medfocus.runner.demo import _fresh_hint
    from medfocus.runner.grid import StoredSettingsError

    with pytest.raises(ConfigError, match=r"(?s)already holds results computed with other settings.*medfocus demo --fresh"):
        with _fresh_hint(tmp_path):
            raise StoredSettingsError(f"{tmp_path}/predictions.jsonl already holds results computed with other settings:\n  x")
    with pytest.raises(ConfigError, match=r"^boom$"):
        with _fresh_hint(tmp_path):
            raise ConfigError("boom")
    # the causal filter's split of another demo model (an update that ships new weights) gets the same way out
    from medfocus.bench.build import check_split_settings

    done = {("demo", "synthetic", 0): {"generation": {"model_fingerprint": "old", "max_new_tokens": 16}}}
    with pytest.raises(ConfigError, match=r"(?s)other generation settings.*model_fingerprint: 'old'.*medfocus demo --fresh"):
        with _fresh_hint(tmp_path):
            check_split_settings(tmp_path / "direct.log.jsonl", done, {"model_fingerprint": "new", "max_new_tokens": 16})
