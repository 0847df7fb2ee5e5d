"""The candidate demo weights kept under ``candidates/`` (not shipped): their recipe is the preset their
README names, they load through ``load_lvlm`` at the 12x12 token grid, and a stage-3 run can start from them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from medfocus.training import demo_lvlm as D
from medfocus.training.demo_lvlm.config import preset_config, preset_of

ROOT = Path(__file__).resolve().parents[1] / "candidates"
CAND = ROOT / "demo-12x12"
#: candidate folder -> the preset its README says made it
CANDIDATES = {"demo-12x12": "demo-12x12", "demo-12x12-fleischner": "demo-12x12-fleischner",
              "demo-12x12-fleischner-long": "demo-12x12-fleischner-long"}


@pytest.mark.parametrize("folder,preset", CANDIDATES.items())
def test_candidate_is_its_recipe_small_and_documented(folder: str, preset: str) -> None:
    meta = json.loads((ROOT / folder / "medfocus.json").read_text())
    cfg = D.config_from_dict(meta["demo"]["config"])
    assert preset_of(cfg) == preset and cfg.token_grid == 12 and cfg.focus_steps == 0
    assert D.folder_size(ROOT / folder) < 8e6  # what the README says it costs the repository (6.5 MB of weights)
    assert f"--out candidates/{folder} --preset {preset} --threads 2" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("folder", CANDIDATES)
def test_candidate_loads_at_a_12x12_grid_and_answers(folder: str) -> None:
    from medfocus.lvlm.loading import load_lvlm

    adapter = load_lvlm(str(ROOT / folder), device="cpu")
    img = np.zeros((200, 180), np.uint8)
    chat = adapter.prepare(img, D.task_question("nodule", "direct"))
    assert adapter._grid_hw(chat.inputs) == (12, 12)
    (out,) = adapter.generate([img], [D.task_question("nodule", "direct")], max_new_tokens=4)
    assert out.strip().rstrip(".") in ("Yes", "No")


def test_stage3_can_start_from_the_candidate() -> None:
    state, sha = D.stage2_weights(CAND, preset_config("demo-12x12-focus", num_threads=1))
    assert sha == hashlib.sha256((CAND / "model.safetensors").read_bytes()).hexdigest()
    tok = D.build_tokenizer(D.train._findings(), 168, preset_config("demo-12x12").tokenizer_vocab)
    model = D.build_model(preset_config("demo-12x12-focus"), tok)
    model.load_state_dict(state)  # strict: every tensor of the architecture, nothing else
