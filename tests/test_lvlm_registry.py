"""Registry, YAML user entries, load_lvlm dispatch and its error messages; the `models` command."""

from __future__ import annotations

import shutil

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
    monkeypatch.setenv("MEDFOCUS_MODELS", str(tmp_path / "none.yaml"))


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
