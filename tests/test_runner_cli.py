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
    monkeypatch.setattr(attr_cmd, "load_samples", lambda ds, root: samples if ds == "synthetic" else [])
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
    assert rm.exit_code == 0 and "(16 records)" in rm.output, rm.output
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
    assert "fake run" in html and "fake_hot" in html and "<b>100.0</b>" in html


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
