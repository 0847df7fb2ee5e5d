"""Fail fast (issue 13, item 7): unknown methods/models, models without weights, method settings of the
wrong type or range, wrong types in --config YAML and $MEDFOCUS_MODELS entries are refused before any
model loads, with an error naming the parameter/file/field and the expected type, a non-zero exit
status and no traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from medfocus.attribution import get_method, list_methods
from medfocus.attribution.base import _resolve
from medfocus.cli import main
from medfocus.errors import ConfigError, ModelError

sys.path.insert(0, str(Path(__file__).parent))
import test_runner_fakes as fakes  # noqa: E402


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """Fake samples as dataset 'synthetic' and a model loader that records every load."""
    import medfocus.commands.attribute as attr_cmd
    import medfocus.lvlm.loading as loading
    from PIL import Image
    import numpy as np

    samples, _ = fakes.make_samples(tmp_path / "imgs", 3)
    for s in samples:
        png = Path(s.image_path).with_suffix(".png")
        Image.fromarray(np.load(s.image_path)).save(png)
        s.image_path = str(png)
    monkeypatch.setattr(attr_cmd, "load_samples", lambda ds, root, rescale_boxes=False: samples)
    loads: list[str] = []
    monkeypatch.setattr(loading, "load_lvlm", lambda name, device=None, **kw: loads.append(name) or fakes.FakeAdapter(name))
    monkeypatch.delenv("MEDFOCUS_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.config/medfocus/models.yaml
    return {"tmp": tmp_path, "loads": loads}


def _run(world, *args):
    out = world["tmp"] / "out"
    res = CliRunner().invoke(main, ["attribute", "--dataset", "synthetic", "--out", str(out), "--no-progress", *args])
    return res, out


@pytest.mark.parametrize("args, words", [
    (["--model", "demo", "--method", "nope"], ["unknown attribution method 'nope'", "occlusion"]),
    (["--model", "demo", "--method", "occlusion", "--param", "occlusion.grid=0"], ["'grid'", "an integer >= 1", "0 (int)", "occlusion.grid=0"]),
    (["--model", "demo", "--method", "occlusion", "--param", "occlusion.grid=abc"], ["'grid'", "an integer >= 1", "'abc' (str)"]),
    (["--model", "demo", "--method", "occlusion", "--param", "occlusion.grid=2.5"], ["'grid'", "an integer", "2.5 (float)"]),
    (["--model", "demo", "--method", "rise", "--param", "rise.p_keep=2"], ["'p_keep'", "a number in (0, 1)", "2 (int)"]),
    (["--model", "demo", "--method", "occlusion", "--param", "occlusion.gird=4"], ["unknown parameter", "gird", "grid"]),
    (["--model", "demo", "--method", "gradcam", "--param", "gradcam.final_token=1"], ["'final_token'", "true or false"]),
    (["--model", "demo", "--method", "medfocus", "--param", "medfocus.tau=0"], ["'tau'", "(0, 1]"]),
    (["--model", "no_such_model", "--method", "occlusion"], ["unknown model 'no_such_model'"]),
])
def test_bad_settings_fail_before_any_model_loads(world, args, words):
    res, out = _run(world, *args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (KeyError, TypeError, ValueError))
    for w in words:
        assert w in res.output, (w, res.output)
    assert world["loads"] == [] and not (out / "predictions.jsonl").exists()


def test_model_without_weights_fails_fast(world, tmp_path):
    empty = tmp_path / "weights_missing"
    empty.mkdir()
    res, _ = _run(world, "--model", str(empty), "--method", "occlusion")
    assert res.exit_code == 1 and "has no config.json" in res.output and world["loads"] == []
    (empty / "config.json").write_text("{}")
    res, _ = _run(world, "--model", str(empty), "--method", "occlusion")
    assert res.exit_code == 1 and "no weight files" in res.output and world["loads"] == []
    # a hub id absent from the local cache while downloads are off (conftest sets HF_HUB_OFFLINE=1)
    res, _ = _run(world, "--model", "someone/not-cached-model", "--method", "occlusion")
    assert res.exit_code == 1 and "someone/not-cached-model" in res.output and world["loads"] == []


def test_good_settings_run(world):
    res, out = _run(world, "--model", "demo", "--method", "occlusion", "--param", "occlusion.grid=2", "--limit", "1")
    if "no weights" in res.output:
        pytest.skip("the demo model's weights are not built in this checkout")
    assert world["loads"] == ["demo"]  # validation passed; the (fake) model was loaded once


@pytest.mark.parametrize("yaml_text, words", [
    ("limit: 2.5\n", ["key 'limit'", "an integer", "2.5 (float)"]),
    ("limit: abc\n", ["key 'limit'", "an integer", "'abc' (str)"]),
    ("method: [occlusion, {a: 1}]\n", ["key 'method'", "a string"]),
    ("no-progress: 'yes'\n", ["key 'no-progress'", "true or false"]),
    ("mode: [sideways]\n", ["key 'mode'", "'direct'"]),
    ("- limit\n- 2\n", ["expected a mapping", "list"]),
])
def test_config_types_are_checked(world, yaml_text, words):
    cfg = world["tmp"] / "run.yaml"
    cfg.write_text(yaml_text)
    res, _ = _run(world, "--config", str(cfg), "--model", "demo", "--method", "occlusion")
    assert res.exit_code == 2, res.output
    assert str(cfg.name) in res.output and "Traceback" not in res.output
    for w in words:
        assert w in res.output, (w, res.output)
    assert world["loads"] == []


def test_config_not_utf8(world):
    cfg = world["tmp"] / "run.yaml"
    cfg.write_bytes(b"limit: \xff\xfe\n")
    res, _ = _run(world, "--config", str(cfg))
    assert res.exit_code == 2 and "cannot read YAML" in res.output


def test_user_registry(world, monkeypatch, tmp_path):
    from medfocus.lvlm.loading import check_model
    from medfocus.lvlm.registry import load_user_entries

    y = tmp_path / "models.yaml"
    for text, words in [
        ("models:\n  mine:\n    hf_id: /x\n    canvas: abc\n", ["'mine'", "'canvas'", "a positive integer", "'abc' (str)"]),
        ("models:\n  mine:\n    hf_id: /x\n    canvas: 2.5\n", ["'canvas'", "2.5 (float)"]),
        ("models:\n  mine:\n    hf_id: /x\n    gated: 'no'\n", ["'gated'", "true or false"]),
        ("models:\n  mine:\n    hf_id: 12\n", ["'hf_id'", "12 (int)"]),
        ("models: [a, b]\n", ["expected a mapping", "list"]),
        ("models:\n  mine: /x\n", ["'mine'", "must be a mapping"]),
    ]:
        y.write_text(text)
        with pytest.raises(ConfigError) as ei:
            load_user_entries(y)
        for w in words + [str(y)]:
            assert w in str(ei.value), (w, str(ei.value))
    # a broken file does not take the built-in models down ...
    monkeypatch.setenv("MEDFOCUS_MODELS", str(y))
    check_model("demo") if (Path(_demo_dir()) / "config.json").is_file() else None
    from medfocus.lvlm.registry import list_models

    assert "demo" in list_models() and "mine" not in list_models()
    # ... but a name that only the broken file could define is an error naming the file
    with pytest.raises(ConfigError, match="user model registry cannot be used"):
        check_model("mine")
    res, _ = _run(world, "--model", "mine", "--method", "occlusion")
    assert res.exit_code == 1 and str(y) in res.output and world["loads"] == []
    # a $MEDFOCUS_MODELS path that does not exist is an error, not silently ignored
    monkeypatch.setenv("MEDFOCUS_MODELS", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        check_model("mine")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        check_model("demo")  # a built-in name too: the user named a registry, running without it is wrong
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 1 and "missing.yaml does not exist" in res.output


def _demo_dir() -> str:
    from medfocus.lvlm.registry import get_entry

    return get_entry("demo").hf_id


def test_every_method_validates_every_setting_in_init():
    """Each built-in method has a spec for every default, accepts its defaults, and refuses a value of
    the wrong type for each setting at construction time (not inside ``attribute``)."""
    wrong = {int: "abc", float: "abc", bool: 1, str: 3.5, type(None): [[1]], list: {"a": 1}}
    for name, defaults in list_methods().items():
        cls = _resolve(name)
        assert set(cls.spec) == set(defaults), name
        m = get_method(name, **defaults)
        assert m.params == {**cls.defaults, **defaults}
        for key, value in defaults.items():
            bad = wrong[type(value)] if type(value) in wrong else [[1]]
            with pytest.raises(ConfigError, match=f"parameter '{key}' expects"):
                get_method(name, **{key: bad})
    with pytest.raises(ModelError):
        from medfocus.lvlm.loading import check_model

        check_model("no/such-model-anywhere")


def test_bench_build_unknown_model_is_one_clear_error(tmp_path):
    data = tmp_path / "data"
    r0 = CliRunner().invoke(main, ["synth", "--out", str(data), "--n", "2", "--size", "64"])
    assert r0.exit_code == 0, r0.output
    res = CliRunner().invoke(main, ["bench", "build", "--model", "no_such_model", "--dataset", "synthetic", "--data-root",
                                    str(data), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 1 and "unknown model 'no_such_model'" in res.output and "Traceback" not in res.output


# ---- model-dependent settings and models that cannot be loaded (new-user report items 4, 6, 11) ----------
def _records(out):
    p = out / "predictions.jsonl"
    return [line for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


@pytest.fixture()
def toy_world(world, monkeypatch):
    """``world`` whose model loader gives the toy LVLM (real decoder layers and attention heads)."""
    import medfocus.lvlm.loading as loading
    from medfocus.attribution.testing import ToyAdapter

    monkeypatch.setattr(loading, "load_lvlm", lambda name, device=None, **kw: world["loads"].append(name) or ToyAdapter())
    toy = ToyAdapter()
    world["n_layers"], world["n_heads"] = len(toy.decoder_layers), toy.decoder_layers[0].self_attn.n_heads
    return world


@pytest.mark.parametrize("param, words", [
    ("attention_head.layer=50", ["method 'attention_head'", "'layer' = 50", "out of range for model 'toy'", "{n} decoder layers",
                                 "valid: 0..{n1} or -{n}..-1"]),
    ("attention_head.heads=7", ["method 'attention_head'", "'heads' = 7", "{h} attention heads", "valid: 'mean' or 0..{h1}"]),
    ("attention_rollout.layers=[0, 9]", ["method 'attention_rollout'", "'layers' = [0, 9]", "layer 9 is out of range", "{n} decoder layers"]),
    ("gradcam.layer=99", ["method 'gradcam'", "'layer' = 99", "{n} decoder layers", "valid: 'input', 'middle', 0..{n2} or -{n}..-2"]),
    ("gradcam.layer=-1", ["method 'gradcam'", "'layer' = -1", "decoder layers of model 'toy'", "{n} decoder layers", "exactly zero"]),
    ("gradcampp.layer={n1}", ["method 'gradcampp'", "'layer' = {n1}", "decoder layers of model 'toy'", "exactly zero"]),
])
def test_model_dependent_indices_fail_after_load_before_the_run(toy_world, param, words):
    """An index the model does not have (or Grad-CAM's last layer, whose gradient is exactly zero) is one
    error right after the model loads: exit 1, the setting, the value and the valid range named, no record."""
    n, h = toy_world["n_layers"], toy_world["n_heads"]
    fill = dict(n=n, n1=n - 1, n2=n - 2, h=h, h1=h - 1)
    method = param.split(".")[0]
    res, out = _run(toy_world, "--model", "demo", "--method", method, "--method", "occlusion", "--param", param.format(**fill))
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w.format(**fill) in res.output, (w.format(**fill), res.output)
    assert toy_world["loads"] == ["demo"]  # checked right after the one load
    assert _records(out) == []  # nothing ran, not even the valid method
    res, out = _run(toy_world, "--model", "demo", "--method", method, "--limit", "1")  # in range: runs
    assert res.exit_code == 0 and len(_records(out)) == 1, res.output


def test_a_model_that_fails_to_load_fails_the_run(world, monkeypatch):
    """A load failure inside the run is a non-zero exit naming the model, not one error record per sample
    (which a rerun would serve as 'already in the store')."""
    import medfocus.lvlm.loading as loading

    def broken(name, device=None, **kw):
        world["loads"].append(name)
        raise OSError("safetensors header is damaged")

    monkeypatch.setattr(loading, "load_lvlm", broken)
    res, out = _run(world, "--model", "demo", "--method", "occlusion")
    assert res.exit_code == 1, res.output
    assert "model 'demo' could not be loaded" in res.output and "safetensors header is damaged" in res.output
    assert world["loads"] == ["demo"] and _records(out) == []


def _fake_snapshot(cache: Path, hf_id: str, files: dict[str, str]) -> Path:
    """A Hugging Face cache entry for ``hf_id`` in the hub's layout (refs/main -> snapshots/<rev>/...)."""
    repo = cache / ("models--" + hf_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_hub_model_without_local_copy_is_refused_unless_downloads_are_allowed(world, monkeypatch, tmp_path):
    """A hub id is loaded only from a complete local snapshot unless HF_HUB_OFFLINE=0 allows downloading:
    otherwise one error before the run (no network retries), naming the model, the cache looked in and the
    three ways to provide it; `medfocus models --check` agrees."""
    import huggingface_hub.constants as hfc

    from medfocus.lvlm.loading import available_locally, check_model, downloads_allowed

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not downloads_allowed()
    hf_id = "Qwen/Qwen2.5-VL-3B-Instruct"
    with pytest.raises(ModelError) as ei:
        check_model("qwen2_5_vl_3b")
    for w in ("'qwen2_5_vl_3b'", hf_id, "not available locally", str(cache), "--local-dir", "HF_HUB_OFFLINE=0"):
        assert w in str(ei.value), (w, str(ei.value))
    res, out = _run(world, "--model", "qwen2_5_vl_3b", "--method", "occlusion")
    assert res.exit_code == 1 and "not available locally" in res.output and world["loads"] == [] and not out.exists()
    listing = CliRunner().invoke(main, ["models", "--check"]).output
    assert [ln for ln in listing.splitlines() if ln.startswith("qwen2_5_vl_3b ")][0].endswith("not available locally")
    # explicitly allowed: the hub id passes the check (transformers may then download it)
    for hub, tf, allowed in (("0", None, True), ("false", None, True), ("0", "1", False), ("1", None, False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", hub)
        if tf is None:
            monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("TRANSFORMERS_OFFLINE", tf)
        assert downloads_allowed() is allowed, (hub, tf)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert check_model("qwen2_5_vl_3b") == hf_id
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # a snapshot with a config but no weights is not a local copy; with its weights it is
    snap = _fake_snapshot(cache, hf_id, {"config.json": "{}"})
    with pytest.raises(ModelError, match="not available locally"):
        check_model("qwen2_5_vl_3b")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    (snap / "model-1.safetensors").write_text("")
    assert not available_locally(hf_id)  # a shard named by the index is missing
    with pytest.raises(ModelError, match="not available locally"):
        check_model("qwen2_5_vl_3b")
    (snap / "model-2.safetensors").write_text("")
    assert available_locally(hf_id) and check_model("qwen2_5_vl_3b") == hf_id
    listing = CliRunner().invoke(main, ["models", "--check"]).output
    assert [ln for ln in listing.splitlines() if ln.startswith("qwen2_5_vl_3b ")][0].endswith("available")


def test_load_lvlm_refuses_an_uncached_hub_id_without_the_network(monkeypatch, tmp_path):
    import huggingface_hub.constants as hfc

    from medfocus.lvlm.loading import load_lvlm

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelError, match=r"'someone/not-cached' \(someone/not-cached\) is not available locally"):
        load_lvlm("someone/not-cached")


@pytest.mark.parametrize("param, passes", [("occlusion.grid=33", "occlusion 1,090 (1 + 33x33 grid cells)"),
                                           ("rise.grid=33", "rise 64 (n_masks)")])
def test_a_grid_finer_than_the_films_content_fails_after_load_with_the_cost_shown(toy_world, param, passes):
    """The toy canvas is 32x32 and the films 32x32 px: a 33-cell grid would leave empty cells (identical
    variants), so it is refused right after the one load, naming the limit 32, before any record; the
    forward passes per sample are printed before the model loads."""
    method = param.split(".")[0]
    res, out = _run(toy_world, "--model", "demo", "--method", method, "--param", param)
    assert res.exit_code == 1, res.output
    assert f"forward passes per sample: {passes}" in res.output
    assert (f"method '{method}': parameter 'grid' = 33 is finer than the image content on model 'toy''s 32x32 canvas"
            in res.output) and "covers 32x32 canvas pixels, so grid can be at most 32 there" in res.output, res.output
    assert f"Give --param {method}.grid=32 or less." in res.output and "Traceback" not in res.output
    assert toy_world["loads"] == ["demo"] and _records(out) == []


def test_grid_limit_is_the_content_side_on_the_canvas():
    """Known answers on the toy's 32x32 canvas: a 64x16 film letterboxes to 32x8 content pixels, so grid 8
    is the finest; the smallest limit among the films is named, and a direct call refuses the same grid."""
    import numpy as np

    from medfocus.attribution.perturbation import RISE, Occlusion, check_grid_fits
    from medfocus.attribution.testing import ToyAdapter

    toy = ToyAdapter()
    films = {"/d/square.png": (100, 100), "/d/wide.png": (64, 16), "/d/tall.png": (10, 40)}  # content 32x32, 32x8, 8x32
    check_grid_fits("occlusion", 8, toy, films)
    with pytest.raises(ConfigError) as e:
        check_grid_fits("occlusion", 9, toy, films)
    msg = str(e.value)
    assert "the film /d/wide.png (64x16 px) covers 32x8 canvas pixels, so grid can be at most 8 there" in msg
    assert "2 of 3 films are below grid=9" in msg
    Occlusion(grid=8).check_images(toy, films)
    # a strip under one image token is refused per film by check_film_content, not by the grid check
    check_grid_fits("occlusion", 8, toy, {"/d/strip.png": (7744, 10)})
    # before loading only the canvas is known: the largest content any film can have
    from types import SimpleNamespace

    unloaded = SimpleNamespace(name="m", canvas_size=(32, 32))
    check_grid_fits("occlusion", 32, unloaded, films)
    with pytest.raises(ConfigError, match=r"a film's content covers at most 32x32 canvas pixels, so grid can be at most 32"):
        check_grid_fits("occlusion", 33, unloaded, films)
    with pytest.raises(ConfigError, match="at most 8"):
        RISE(grid=9).check_images(toy, films)
    wide = np.full((16, 64), 90, np.uint8)
    for m in (Occlusion(grid=9), RISE(grid=9, n_masks=2)):
        with pytest.raises(ConfigError, match=r"\(32x8 canvas pixels\): at most 8"):
            m.attribute(toy, wide, "Is there a nodule?", "Yes")
    assert Occlusion(grid=8).attribute(toy, wide, "Is there a nodule?", "Yes").n_forward == 65
    assert (Occlusion(grid=8).forward_passes(), RISE(n_masks=100).forward_passes()) == ((65, "1 + 8x8 grid cells"), (100, "n_masks"))


def test_a_grid_finer_than_the_content_is_refused_before_loading_where_the_canvas_is_known(world):
    """The demo's canvas (224, from its medfocus.json) is known without loading it: no film's content exceeds
    224 canvas pixels a side, so grid 225 is refused before any model loads."""
    res, out = _run(world, "--model", "demo", "--method", "occlusion", "--param", "occlusion.grid=225")
    assert res.exit_code == 1, res.output
    assert ("parameter 'grid' = 225 is finer than the image content can be on model 'demo''s 224x224 canvas"
            in res.output) and "so grid can be at most 224 (less for films of another aspect ratio)" in res.output
    assert world["loads"] == [] and _records(out) == []


def test_attribute_threads_option_sets_torch_threads_for_the_run_and_reaches_launched_workers(world, monkeypatch):
    import torch

    import medfocus.runner.grid as grid
    from medfocus.commands.attribute import attribute
    from medfocus.commands.launch import argv_from_params

    seen = []

    def fake_run_grid(*a, **k):
        seen.append(torch.get_num_threads())
        raise ConfigError("stop here")

    monkeypatch.setattr(grid, "run_grid", fake_run_grid)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    res, _ = _run(world, "--model", "demo", "--method", "occlusion", "--threads", str(want))
    assert res.exit_code == 1 and "stop here" in res.output and "Traceback" not in res.output
    assert seen == [want] and torch.get_num_threads() == before  # set for the run, given back also when it fails
    res, _ = _run(world, "--model", "demo", "--method", "occlusion")
    assert seen[-1] == before  # no --threads: torch's own setting
    res, _ = _run(world, "--model", "demo", "--method", "occlusion", "--threads", "0")
    assert res.exit_code == 2 and "--threads" in res.output and len(seen) == 2
    # a launched worker runs the command rebuilt from the parsed options: it gets the same --threads
    argv = argv_from_params(attribute, {"threads": 3, "models": ("demo",), "no_progress": True})
    assert argv[argv.index("--threads") + 1] == "3"
