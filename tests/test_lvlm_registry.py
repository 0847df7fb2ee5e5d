"""Registry, YAML user entries, load_lvlm dispatch and its error messages; the `models` command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medfocus.errors import ConfigError, ModelError
from medfocus.lvlm.loading import load_lvlm
from medfocus.lvlm.registry import get_entry, list_models, load_user_entries

PAPER = {
    "qwen2_5_vl_3b": ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen_vl"),
    "qwen2_5_vl_7b": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen_vl"),
    "gemma3_4b": ("google/gemma-3-4b-it", "gemma3"),
    "gemma3_12b": ("google/gemma-3-12b-it", "gemma3"),
    "medgemma_4b": ("google/medgemma-4b-it", "gemma3"),
    "medgemma1_5_4b": ("google/medgemma-1.5-4b-it", "gemma3"),
    "llava1_5_7b": ("llava-hf/llava-1.5-7b-hf", "llava"),
}


@pytest.fixture(autouse=True)
def _no_user_registry(monkeypatch, tmp_path):
    empty = tmp_path / "none.yaml"  # an existing, empty registry: no user entries (a missing one is an error)
    empty.write_text("")
    monkeypatch.setenv("MEDFOCUS_MODELS", str(empty))


def test_builtin_entries_exact_ids():
    models = list_models()
    for name, (hf_id, fam) in PAPER.items():
        assert models[name].hf_id == hf_id and models[name].family == fam
    assert models["demo"].hf_id.endswith("lvlm/demo_model")


def test_missing_weights_one_clear_error():
    with pytest.raises(ModelError) as ei:
        load_lvlm("gemma3_4b", device="cpu")
    msg = str(ei.value)
    assert "google/gemma-3-4b-it" in msg and "local" in msg and "load_lvlm('/path/to/" in msg
    with pytest.raises(ModelError, match="unknown model"):
        load_lvlm("no_such_model")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_names_load_through_registry(tiny_model_dirs, tmp_path, monkeypatch, name):
    """Each paper model's registry path runs on a same-architecture tiny model (user YAML override)."""
    fam = PAPER[name][1]
    y = tmp_path / "models.yaml"
    canvas = "    canvas: 168\n" if fam == "qwen_vl" else ""
    y.write_text(f"models:\n  {name}:\n    hf_id: {tiny_model_dirs[fam]}\n    family: {fam}\n{canvas}")
    monkeypatch.setenv("MEDFOCUS_MODELS", str(y))
    a = load_lvlm(name, device="cpu")
    assert a.family == fam and a.name == name and a.model.dtype == torch.float32 and a.device.type == "cpu"
    if fam == "qwen_vl":
        assert a.canvas_size == (168, 168)


def test_family_from_model_type_and_qwen_default_canvas(tiny_model_dirs, tmp_path):
    for fam, src in tiny_model_dirs.items():
        dst = tmp_path / fam
        shutil.copytree(src, dst)
        (dst / "medfocus.json").unlink()  # no hints: family from config.json model_type
        a = load_lvlm(str(dst), device="cpu")
        assert a.family == fam
        if fam == "qwen_vl":
            assert a.canvas_size == (448, 448)
        else:
            s = a.model.config.vision_config.image_size
            assert a.canvas_size == (s, s)
    a = load_lvlm(str(tmp_path / "qwen_vl"), device="cpu", canvas=(168, 112), attn_implementation="eager")
    assert a.canvas_size == (168, 112) and a.model.config._attn_implementation == "eager"


def test_eager_switch_restores(tiny_adapters):
    a = tiny_adapters["qwen_vl"]
    before = a.model.config._attn_implementation
    with a.eager_attention():
        assert a.model.config._attn_implementation == "eager"
    assert a.model.config._attn_implementation == before


def test_yaml_entries_validated(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text("models:\n  mine:\n    hf_id: /x/y\n    canvas: 336\n    description: my copy\n")
    e = load_user_entries(y)["mine"]
    assert e.hf_id == "/x/y" and e.canvas == 336 and e.family == ""
    y.write_text("models:\n  bad:\n    family: qwen_vl\n")
    with pytest.raises(ConfigError, match="hf_id"):
        load_user_entries(y)
    y.write_text("models:\n  bad:\n    hf_id: a/b\n    family: blip\n")
    with pytest.raises(ConfigError, match="family"):
        load_user_entries(y)


def test_demo_missing_is_clear_or_loads():
    e = get_entry("demo")
    from pathlib import Path

    if (Path(e.hf_id) / "config.json").is_file():
        assert load_lvlm("demo", device="cpu").family == "qwen_vl"
    else:
        with pytest.raises(ModelError, match="train-demo"):
            load_lvlm("demo")


def test_models_command(tmp_path, monkeypatch):
    from medfocus.cli import main

    y = tmp_path / "m.yaml"
    y.write_text("models:\n  my_local:\n    hf_id: /data/qwen\n    family: qwen_vl\n")
    monkeypatch.setenv("MEDFOCUS_MODELS", str(y))
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    for name, (hf_id, _) in PAPER.items():
        assert name in res.output and hf_id in res.output
    assert "my_local" in res.output and "demo" in res.output


def test_hub_layout_qwen_folder_loads_without_torchvision(tiny_model_dirs, tmp_path):
    """Hub / transformers-4.x layout: preprocessor_config.json + chat_template.json + a video processor
    config, processor_class "Qwen2_5_VLProcessor" (whose video half needs torchvision)."""
    import json

    import numpy as np

    from medfocus.lvlm.families.qwen_vl import QwenVLImageProcessor
    from medfocus.lvlm.scoring import score_chat

    src, dst = tiny_model_dirs["qwen_vl"], tmp_path / "hub_qwen"
    shutil.copytree(src, dst)
    pc = json.loads((dst / "processor_config.json").read_text())
    ip = dict(pc["image_processor"], processor_class="Qwen2_5_VLProcessor", image_processor_type="Qwen2VLImageProcessor",
              min_pixels=pc["image_processor"]["size"]["shortest_edge"], max_pixels=pc["image_processor"]["size"]["longest_edge"])
    (dst / "preprocessor_config.json").write_text(json.dumps(ip))
    (dst / "processor_config.json").unlink()
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": (dst / "chat_template.jinja").read_text()}))
    (dst / "chat_template.jinja").unlink()
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps(dict(tc, processor_class="Qwen2_5_VLProcessor")))
    (dst / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type": "Qwen2VLVideoProcessor",
                                                                    "processor_class": "Qwen2_5_VLProcessor"}))
    a, b = load_lvlm(str(dst), device="cpu"), load_lvlm(str(src), device="cpu")
    assert isinstance(a.processor, QwenVLImageProcessor)
    img = (np.random.RandomState(0).rand(90, 80) * 255).astype(np.uint8)
    ca, cb = a.prepare(img, "Is there evidence of nodule in the image?", "Yes"), b.prepare(img, "Is there evidence of nodule in the image?", "Yes")
    assert torch.equal(ca.inputs["input_ids"], cb.inputs["input_ids"]) and torch.equal(ca.inputs["pixel_values"], cb.inputs["pixel_values"])
    assert torch.equal(score_chat(a, ca), score_chat(b, cb))


def test_unknown_entry_field_is_refused_naming_file_entry_field_and_allowed(tmp_path, monkeypatch):
    """A misspelled field (``canvs``) would leave the canvas at its default without a word: it is an error
    naming the file, the entry, the field, the close match and the allowed fields; `models` exits 1."""
    from medfocus.cli import main
    from medfocus.lvlm.loading import check_model

    y = tmp_path / "typo.yaml"
    y.write_text(f"models:\n  x:\n    hf_id: {tmp_path}\n    canvs: 448\n")
    with pytest.raises(ConfigError) as ei:
        load_user_entries(y)
    msg = str(ei.value)
    for w in (str(y), "entry 'x'", "unknown field 'canvs'", "did you mean 'canvas'?",
              "allowed fields: hf_id, family, canvas, description, gated"):
        assert w in msg, (w, msg)
    y.write_text("models:\n  x:\n    hf_id: a/b\n    zzz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown field 'zzz'; allowed fields: hf_id, family, canvas, description, gated$"):
        load_user_entries(y)
    monkeypatch.setenv("MEDFOCUS_MODELS", str(y))
    with pytest.raises(ConfigError, match="unknown field 'zzz'"):
        check_model("x")
    y.write_text("models:\n  x: {hf_id: a/b\n")  # broken YAML: one line naming the file, and `models` exits 1
    with pytest.raises(ConfigError) as ei:
        load_user_entries(y)
    assert "\n" not in str(ei.value) and str(y) in str(ei.value) and "cannot read YAML" in str(ei.value)
    res = CliRunner().invoke(main, ["models", "--check"])
    assert res.exit_code == 1 and f"user entries ignored: model registry {y}: cannot read YAML" in res.output
    y.write_text("models:\n  x:\n    hf_id: a/b\n    zzz: 1\n")
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 1 and "unknown field 'zzz'" in res.output and str(y) in res.output
    assert "gemma3_4b" in res.output  # the built-ins are still listed


def test_missing_registry_file_is_an_error_everywhere(tmp_path, monkeypatch):
    """A $MEDFOCUS_MODELS naming a missing file is an error (not a warning and a run on the built-ins): model
    look-ups raise, `models` and `models --check` exit 1 naming the file. Unset, the default path may be absent."""
    from medfocus.cli import main

    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv("MEDFOCUS_MODELS", str(missing))
    for call in (list_models, lambda: get_entry("demo")):
        with pytest.raises(ConfigError) as ei:
            call()
        assert f"model registry {missing} does not exist (set by $MEDFOCUS_MODELS)" in str(ei.value)
    for args in (["models"], ["models", "--check"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and f"{missing} does not exist" in res.output, (args, res.output)
    monkeypatch.delenv("MEDFOCUS_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0 and "demo" in res.output
    assert f"{tmp_path / 'home' / '.config' / 'medfocus' / 'models.yaml'} (no such file: built-in models only)" in res.output


def test_models_check_exit_status_and_folder_reasons(tmp_path, monkeypatch):
    """`models --check` says what a local folder lacks, and exits 1 when one of the user's own entries cannot
    load; built-in hub models that are not downloaded are listed but do not fail it."""
    import huggingface_hub.constants as hfc

    from medfocus.cli import main

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    res = CliRunner().invoke(main, ["models", "--check"])
    demo_ok = (Path(get_entry("demo").hf_id) / "config.json").is_file() and (
        Path(get_entry("demo-shortcut").hf_id) / "config.json").is_file()
    assert [ln for ln in res.output.splitlines() if ln.startswith("gemma3_4b ")][0].endswith("not available locally")
    if demo_ok:
        assert res.exit_code == 0, res.output
    (tmp_path / "notmodel").mkdir()
    y = tmp_path / "m.yaml"
    y.write_text(f"models:\n  nm:\n    hf_id: {tmp_path / 'notmodel'}\n  gone:\n    hf_id: {tmp_path / 'gone'}\n")
    monkeypatch.setenv("MEDFOCUS_MODELS", str(y))
    res = CliRunner().invoke(main, ["models", "--check"])
    lines = {ln.split()[0]: ln for ln in res.output.splitlines() if ln and not ln.startswith(" ")}
    assert lines["nm"].endswith("folder has no config.json (not a transformers model folder)")
    assert lines["gone"].endswith("folder does not exist")
    assert res.exit_code == 1
    assert "2 of your own model entries cannot be loaded locally: nm (folder has no config.json" in res.output
    assert CliRunner().invoke(main, ["models"]).exit_code == 0  # without --check nothing is checked


def test_demo_overridden_by_a_user_entry_names_the_entry_not_train_demo(tmp_path, monkeypatch):
    """A registry entry reusing the name `demo` for a folder that is not a model: the error names the file, the
    entry and what the folder lacks; it does not advise training the demo into the user's folder."""
    from medfocus.lvlm.loading import check_model

    (tmp_path / "notmodel").mkdir()
    y = tmp_path / "override.yaml"
    y.write_text(f"models:\n  demo:\n    hf_id: {tmp_path / 'notmodel'}\n    family: qwen_vl\n")
    monkeypatch.setenv("MEDFOCUS_MODELS", str(y))
    for call in (check_model, lambda n: load_lvlm(n, device="cpu")):
        with pytest.raises(ModelError) as ei:
            call("demo")
        msg = str(ei.value)
        assert msg == (f"model 'demo' (entry 'demo' of the user model registry {y}): folder {tmp_path / 'notmodel'} "
                       f"has no config.json (not a transformers model folder)"), msg
    y.write_text(f"models:\n  demo:\n    hf_id: {tmp_path / 'nothere'}\n")
    with pytest.raises(ModelError) as ei:
        check_model("demo")
    assert f"(entry 'demo' of the user model registry {y}): hf_id {tmp_path / 'nothere'} is not an existing folder" in str(ei.value)
    assert "train-demo" not in str(ei.value)
