"""The shipped demo model (medfocus.training.demo_lvlm + lvlm/demo_model): loads offline, answers fresh synthetic
cases correctly in both modes, stays small; the training code's pieces agree with the adapter path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medfocus.lvlm.box_text import parse_boxes
from medfocus.lvlm.registry import DEMO_DIR
from medfocus.training import demo_lvlm as D

FINDINGS = ("cardiomegaly", "pleural effusion", "nodule", "mass", "pneumothorax", "consolidation", "atelectasis")


def _shipped() -> bool:
    return (DEMO_DIR / "model.safetensors").is_file() and (DEMO_DIR / "config.json").is_file()


needs_shipped = pytest.mark.skipif(not _shipped(), reason="demo weights not built yet (medfocus train-demo)")


# ---- templates --------------------------------------------------------------------------------------
@pytest.mark.parametrize("finding", FINDINGS)
def test_cot_targets_parse_to_the_right_answer(finding: str) -> None:
    from medfocus.lvlm.answers import parse_yes_no

    v = D.FindingView(finding, (10, 20, 40, 60), "left", "lower", "left lung")
    assert parse_yes_no(D.rationale(finding, [v])) == "Yes"
    assert parse_yes_no(D.rationale(finding, [])) == "No"
    assert parse_yes_no(D.target_text(finding, "direct", [v])) == "Yes"
    assert parse_yes_no(D.target_text(finding, "direct", [])) == "No"
    if finding != "cardiomegaly":
        assert "left" in D.rationale(finding, [v]) and "right" not in D.rationale(finding, [v])


def test_evidence_targets_round_trip() -> None:
    views = [D.FindingView("nodule", (3, 40, 17, 58), "right", "upper", None), D.FindingView("nodule", (150, 9, 171, 30), "left", "lower", None)]
    read = parse_boxes(D.boxes_answer(views), 224, 224, "canvas")
    assert read.boxes == [(3, 40, 17, 58), (150, 9, 171, 30)] and read.status == "boxes"
    assert D.boxes_answer([]) == "[]" and parse_boxes("[]", 224, 224, "canvas").status == "empty"
    ph = json.loads(D.phrases_answer("nodule", views))
    assert ph == ["small nodule in the right upper lung", "small nodule in the left lower lung"]
    assert D.task_question("mass", "boxes").startswith("Is there evidence of mass in the image? ")
    assert D.task_question("mass", "cot").endswith(" Think step by step and answer with yes or no.")


# ---- inputs match the adapter / processor --------------------------------------------------------------
@pytest.mark.parametrize("merge", [2, 1])
def test_pixel_values_match_the_qwen_image_processor(merge) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    cans = rng.integers(0, 256, (2, 56, 56), dtype=np.uint8)
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, merge_size=merge)
    ref = ip(images=[np.repeat(c[..., None], 3, axis=2) for c in cans], return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    mine = D.canvases_to_pixel_values(torch.from_numpy(cans), merge)
    assert mine.shape == ref["pixel_values"].shape
    assert torch.allclose(mine, ref["pixel_values"].float(), atol=1e-5)


def _micro(tmp_path_factory, merge: int = 2):
    """A micro demo model (random weights, tiny sizes) saved and loaded through load_lvlm."""
    from medfocus.lvlm.loading import load_lvlm

    cfg = D.DemoLVLMConfig(canvas=56, spatial_merge_size=merge, n_train_cases=6, steps=2, images_per_step=2, questions_per_image=2, warmup=1, vision_steps=2, vision_batch=3,
                       text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                                 max_position_embeddings=512),
                       vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, window_size=56, fullatt_block_indexes=[0]),
                       image_size=64)
    torch.set_num_threads(2)
    tok = D.build_tokenizer(FINDINGS, cfg.canvas, 600)
    model = D.build_model(cfg, tok)
    out = tmp_path_factory.mktemp("micro_demo")
    D.save_folder(model, tok, cfg, out, {})
    return cfg, tok, model, out, load_lvlm(str(out), device="cpu")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return _micro(tmp_path_factory)


@pytest.fixture(scope="module")
def micro_no_merge(tmp_path_factory):
    """As ``micro`` without the spatial merge (each 14-px patch one image token: the demo-16x16 recipe)."""
    return _micro(tmp_path_factory, merge=1)


@pytest.mark.parametrize("which", ["micro", "micro_no_merge"])
def test_training_sequences_equal_the_adapter_teacher_forcing(which, request) -> None:
    cfg, tok, model, _, adapter = request.getfixturevalue(which)
    assert adapter._grid_hw(adapter.prepare(np.zeros((56, 56), np.uint8), "q").inputs) == (cfg.token_grid, cfg.token_grid)
    enc = D.Encoder(tok, cfg.token_grid ** 2)
    img = np.random.default_rng(1).integers(0, 256, (80, 64), dtype=np.uint8)  # non-square: letterboxed
    q = D.task_question("pleural effusion", "cot")
    a = "The right costophrenic angle is blunted with a meniscus. Therefore, yes."
    chat = adapter.prepare(img, q, a)
    ids, att, mm, loss_mask = enc.batch([(q, a)])
    theirs = chat.inputs["input_ids"][0].tolist()
    assert theirs[: ids.shape[1]] == ids[0].tolist()
    s, e = chat.answer_span
    assert loss_mask[0].nonzero()[:, 0].tolist() == list(range(s, e + 1))  # answer tokens + <|im_end|>
    can, _ = D.to_canvas(img, cfg.canvas)
    pv = D.canvases_to_pixel_values(torch.from_numpy(can)[None], cfg.spatial_merge_size)
    assert torch.equal(pv, chat.inputs["pixel_values"].cpu())
    # the shared-image-embedding loss equals the model's own teacher-forced loss (answer + <|im_end|>)
    with torch.no_grad():
        mine = D.sequence_loss(model.eval(), enc, torch.from_numpy(can)[None], [(0, q, a)], cfg.canvas // 14)
        lp = torch.log_softmax(model(**chat.inputs).logits[0].float(), -1)
        tgt = chat.inputs["input_ids"][0]
        ref = -lp[s - 1 : e].gather(1, tgt[s : e + 1, None]).mean()
    assert abs(float(mine) - float(ref)) < 1e-4


def test_train_loop_two_steps_changes_weights_deterministically(micro) -> None:
    cfg, tok, _, _, _ = micro
    pool = D.build_train_pool(cfg, progress=False)
    assert len(pool) == cfg.n_train_cases and pool[0].canvas.shape == (cfg.canvas, cfg.canvas)
    results = []
    for _ in range(2):
        model = D.build_model(cfg, tok)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = D.train_loop(model, D.Encoder(tok, cfg.token_grid ** 2), pool, cfg, log=lambda s: None)
        assert len(losses) == 2 and all(np.isfinite(losses))
        changed = sum(int(not torch.equal(before[n], p)) for n, p in model.named_parameters())
        assert changed > len(before) // 2
        results.append(losses)
    assert results[0] == results[1]


def test_stage2_vision_lr_scale_zero_freezes_the_vision_tower_and_stage1_check_runs(micro) -> None:
    """``stage2_vision_lr_scale=0``: stage 2 leaves every vision-tower weight exactly as stage 1 left it
    (the LM still learns); the stage-1 held-out check is called on its cadence with the auxiliary head."""
    from dataclasses import replace

    cfg0, tok, _, _, _ = micro
    cfg = replace(cfg0, stage2_vision_lr_scale=0.0, vision_steps=2, eval_every=1, steps=2)
    pool = D.build_train_pool(cfg, progress=False)
    model = D.build_model(cfg, tok)
    after_stage1: dict = {}
    calls: list[int] = []

    def vision_eval(step, head):
        calls.append(step)
        acc = D.presence_accuracy(model, head, [c for c in pool[:4]], ["nodule", "mass", "nodule", "mass"],
                                  [True, False, False, True], cfg)
        assert set(acc) == {"all", "nodule", "mass"} and 0.0 <= acc["all"] <= 1.0
        if step == cfg.vision_steps:
            after_stage1.update({n: p.detach().clone() for n, p in model.named_parameters()})

    D.train_loop(model, D.Encoder(tok, cfg.token_grid ** 2), pool, cfg, log=lambda s: None, vision_eval_fn=vision_eval)
    assert calls == [1, 2]
    vis = [n for n in after_stage1 if ".visual." in f".{n}"]
    lm = [n for n in after_stage1 if ".visual." not in f".{n}"]
    params = dict(model.named_parameters())
    assert vis and all(torch.equal(after_stage1[n], params[n]) for n in vis)
    assert sum(int(not torch.equal(after_stage1[n], params[n])) for n in lm) > len(lm) // 2


def test_presence_accuracy_scores_the_heads_calls() -> None:
    """Known answer: a head whose global logit for finding k is +1 (says present) scores present cases right."""
    cfg = D.DemoLVLMConfig(canvas=28, spatial_merge_size=1)

    class Visual:
        def get_image_features(self, pv, thw):
            from types import SimpleNamespace
            return SimpleNamespace(pooler_output=[torch.zeros(4, 3) for _ in range(len(thw))])

    class Model:
        model = Visual()

    head = torch.nn.Linear(3, 2 * len(FINDINGS))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0] * len(FINDINGS) + [1.0 if f == "nodule" else -1.0 for f in FINDINGS]))
    case = D.DemoCase(seed=0, canvas=np.zeros((28, 28), np.uint8), views={}, cued=False, severity={})
    acc = D.presence_accuracy(Model(), head, [case] * 4, ["nodule", "nodule", "mass", "mass"], [True, True, False, True], cfg)
    assert acc == {"all": 0.75, "nodule": 1.0, "mass": 0.5}


# ---- the shipped model -------------------------------------------------------------------------------
@needs_shipped
def test_shipped_folder_is_small_and_documented() -> None:
    assert D.folder_size(DEMO_DIR) <= 20 * 1024 * 1024
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    for needle in ("## Data", "Seed", "steps", "Training-time held-out check", "benchmarks/validity.md", "medfocus train-demo", "Cue reliance"):
        assert needle in card
    hints = json.loads((DEMO_DIR / "medfocus.json").read_text())
    assert hints["family"] == "qwen_vl" and hints["canvas"] == 224


@pytest.fixture(scope="module")
def shipped():
    if not _shipped():
        pytest.skip("demo weights not built yet (medfocus train-demo)")
    from medfocus.lvlm.loading import load_lvlm

    torch.set_num_threads(2)
    return load_lvlm("demo", device="cpu")


@needs_shipped
def test_shipped_model_answers_fresh_cases_in_both_modes(shipped) -> None:
    """Fresh synthetic cases (seeds used neither in training nor in the card's evaluation): the model is
    right in both modes as often as its card says -- overall, and on every finding the card lists at
    >= 90% -- and step-by-step answers are a rationale ending in yes/no."""
    from medfocus.lvlm.answers import parse_yes_no

    hints = json.loads((DEMO_DIR / "medfocus.json").read_text())
    cfg = D.config_from_dict(hints["demo"]["config"])
    card = hints["demo"]["metrics"]["heldout"]
    cases = D.build_eval_pool(cfg, n_per_cell=3, progress=False, seed_offset=321_000)
    assert len(cases) == 2 * 3 * len(FINDINGS)
    images = [c.image for c, _, _ in cases]
    truth = ["Yes" if p else "No" for _, _, p in cases]
    for mode in ("direct", "cot"):
        good = [f for f, r in card["per_finding"][mode].items() if r["acc"] >= 0.9]
        assert len(good) >= 3, (mode, card["per_finding"][mode])
        outs = shipped.generate(images, [D.task_question(f, mode) for _, f, _ in cases], max_new_tokens=48, batch_size=16)
        ok = np.array([parse_yes_no(o) == t for o, t in zip(outs, truth)])
        assert ok.mean() >= min(0.9, card["overall"][mode]) - 0.1, (mode, ok.mean(), list(zip(outs, truth)))
        on_good = ok[[f in good for _, f, _ in cases]]
        # ~24 answers on findings the card lists at >= 90%: 0.75 is below the binomial 1% quantile of a
        # 90%-accurate model there, and far above what a model answering from the text prior (50%) reaches
        assert on_good.mean() >= 0.75, (mode, good, on_good.mean())
        if mode == "cot":
            assert all(o.rstrip(".").split()[-1].lower() in ("yes", "no") for o in outs)
            assert np.mean([len(o.split()) >= 6 for o in outs]) > 0.9  # a rationale, not a bare answer


@needs_shipped
def test_shipped_model_answers_evidence_requests(shipped) -> None:
    """Evidence requests give well-formed lists: boxes in the canvas frame, phrases as a quoted list; for
    cardiomegaly and pleural effusion (findings the card shows are learned) the boxes are non-empty."""
    cfg = D.config_from_dict(json.loads((DEMO_DIR / "medfocus.json").read_text())["demo"]["config"])
    keep = ("cardiomegaly", "pleural effusion", "nodule")
    cases = [c for c in D.build_eval_pool(cfg, n_per_cell=2, progress=False, seed_offset=322_000) if c[2] and c[1] in keep]
    imgs = [c.image for c, _, _ in cases]
    boxes = shipped.generate(imgs, [D.task_question(f, "boxes") for _, f, _ in cases], max_new_tokens=48)
    phrases = shipped.generate(imgs, [D.task_question(f, "phrases") for _, f, _ in cases], max_new_tokens=48)
    assert all(b.startswith("[") and b.endswith("]") for b in boxes), boxes
    assert all(p.startswith("[") and p.endswith("]") for p in phrases), phrases
    parsed = [parse_boxes(b, cfg.canvas, cfg.canvas, "canvas").boxes for b in boxes]
    assert all(0 <= v <= cfg.canvas for p in parsed for b in p for v in b)
    learned = [p for p, (_, f, _) in zip(parsed, cases) if f in ("cardiomegaly", "pleural effusion")]
    assert len(learned) == 4 and sum(len(p) >= 1 for p in learned) >= 3
    heart = [p for p, (_, f, _) in zip(parsed, cases) if f == "cardiomegaly"]
    assert any(p and p[0][0] < cfg.canvas / 2 < p[0][2] for p in heart)  # the heart box straddles the midline


def test_direct_margin_matches_the_model_forward(micro) -> None:
    cfg, tok, model, _, adapter = micro
    from medfocus.datasets.synthetic import generate_case

    enc = D.Encoder(tok, (cfg.canvas // 28) ** 2)
    cases = [D.render_case(generate_case(s, size=64, findings=fl), cfg.canvas) for s, fl in ((3, ["nodule"]), (4, []))]
    imgs = [generate_case(s, size=64, findings=fl).image for s, fl in ((3, ["nodule"]), (4, []))]
    m = D.direct_margin(model.eval(), enc, cases, ["nodule", "mass"], cfg.canvas // 14)
    yes, no = enc.answer_ids("Yes")[0], enc.answer_ids("No")[0]
    for i, (img, f) in enumerate(zip(imgs, ["nodule", "mass"])):
        chat = adapter.prepare(img, D.task_question(f, "direct"))
        with torch.no_grad():
            lp = torch.log_softmax(model(**chat.inputs).logits[0, -1].float(), -1)
        assert abs(float(lp[yes] - lp[no]) - float(m[i])) < 1e-4
    assert cases[0].grid_labels.shape == (7, 2, 2) and cases[0].grid_labels[2].max() > 0 and cases[1].grid_labels.max() == 0


def _killed_at_the_first_check(cfg, tok, enc, pool, ck, **kw):
    """Run stage 2 with a checkpoint at ``ck`` and kill it at its first held-out check (``eval_every``); ``ck``."""

    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        raise Killed(step)

    with pytest.raises(Killed):
        D.train_loop(D.build_model(cfg, tok), enc, pool, cfg, log=lambda s: None, eval_fn=kill, checkpoint=ck, **kw)
    return ck


def test_killed_run_resumes_to_the_same_result(micro, tmp_path) -> None:
    import dataclasses

    cfg0, tok, _, _, _ = micro
    cfg = dataclasses.replace(cfg0, steps=4, checkpoint_every=2, eval_every=3)
    pool = D.build_train_pool(cfg, progress=False)
    enc = D.Encoder(tok, (cfg.canvas // 28) ** 2)
    ref = D.train_loop(D.build_model(cfg, tok), enc, pool, cfg, log=lambda s: None)
    ck = _killed_at_the_first_check(cfg, tok, enc, pool, tmp_path / "ck.pt")
    assert ck.is_file()
    logs: list[str] = []
    resumed = D.train_loop(D.build_model(cfg, tok), enc, pool, cfg, log=logs.append, checkpoint=ck)
    assert any("resumed" in s and "step 2" in s for s in logs)
    assert resumed == ref


def test_run_killed_in_stage1_resumes_there_to_the_same_weights(micro, tmp_path) -> None:
    """Stage 1 (the vision tower alone) is most of a 12x12 recipe's time: a kill there loses at most
    checkpoint_every steps, and the resumed run ends with the weights of one uninterrupted run."""
    import dataclasses

    from medfocus.errors import ModelError

    cfg0, tok, _, _, _ = micro
    cfg = dataclasses.replace(cfg0, vision_steps=5, steps=2, checkpoint_every=2, eval_every=3)
    pool = D.build_train_pool(cfg, progress=False)
    enc = D.Encoder(tok, cfg.token_grid ** 2)
    ref_model = D.build_model(cfg, tok)
    ref = D.train_loop(ref_model, enc, pool, cfg, log=lambda s: None)

    class Killed(Exception):
        pass

    def kill(step: int, head) -> None:
        raise Killed(step)

    ck = tmp_path / "ck.pt"
    with pytest.raises(Killed):  # killed at vision step 3, after the stage-1 save at step 2
        D.train_loop(D.build_model(cfg, tok), enc, pool, cfg, log=lambda s: None, checkpoint=ck, vision_eval_fn=kill)
    assert torch.load(ck, weights_only=True)["stage"] == 1
    with pytest.raises(ModelError, match="saved in stage 1 .*step 2 of 5.*rerun the same train-demo command"):
        D.save_from_checkpoint(ck, tmp_path / "saved", log=lambda s: None, evaluate=False)
    assert not (tmp_path / "saved").exists()
    logs: list[str] = []
    model = D.build_model(cfg, tok)
    resumed = D.train_loop(model, enc, pool, cfg, log=logs.append, checkpoint=ck)
    assert any("resumed" in s and "step 2" in s for s in logs)
    assert not any("another configuration" in s for s in logs)  # stage 2 found stage 1's file: not a stale one
    assert resumed == ref
    a, b = ref_model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_lives_under_the_chosen_out_folder(tmp_path) -> None:
    import tempfile
    from pathlib import Path

    out = tmp_path / "run"
    ck = D.checkpoint_path(out)
    assert out in ck.parents and ck == D.checkpoint_path(str(out))
    # never a predictable name in the shared temp folder (where another local user could plant a file)
    assert ck.parent != Path(tempfile.gettempdir()) and ck.parent.parent == out


class _Planted:
    """A pickle that runs code when loaded with weights_only=False (here: creates a folder)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_planted_or_corrupt_checkpoint_is_refused_naming_it(micro, tmp_path) -> None:
    from medfocus.errors import ModelError

    cfg0, tok, _, _, _ = micro
    marker = tmp_path / "code_ran"
    ck = D.checkpoint_path(tmp_path / "run")
    ck.parent.mkdir(parents=True)
    torch.save({"config": {}, "model": _Planted(marker)}, ck)
    pool = D.build_train_pool(cfg0, progress=False)
    enc = D.Encoder(tok, (cfg0.canvas // 28) ** 2)
    with pytest.raises(ModelError, match=f"checkpoint {ck} holds objects other than tensors"):
        D.train_loop(D.build_model(cfg0, tok), enc, pool, cfg0, log=lambda s: None, checkpoint=ck)
    assert not marker.exists()  # refused before anything was executed
    with pytest.raises(ModelError, match=f"checkpoint {ck}"):
        D.save_from_checkpoint(ck, tmp_path / "saved", log=lambda s: None, evaluate=False)
    assert not marker.exists() and not (tmp_path / "saved").exists()
    ck.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match=f"checkpoint {ck} is not a readable train-demo checkpoint"):
        D.load_checkpoint(ck)
    torch.save({"step": 3}, ck)
    with pytest.raises(ModelError, match=f"checkpoint {ck} is not a train-demo checkpoint"):
        D.load_checkpoint(ck)


def test_train_commands_require_out() -> None:
    from click.testing import CliRunner

    from medfocus.cli import main

    for cmd in ("train-demo", "train-demo-sam"):
        r = CliRunner().invoke(main, [cmd, "--steps", "1"])
        assert r.exit_code == 2 and "Missing option '--out'" in r.output, (cmd, r.output)


def test_no_torch_load_of_untrusted_paths_anywhere() -> None:
    """Every ``torch.load`` in the package and the benchmarks passes ``weights_only=True`` (a pickle can
    run code; ``weights_only`` refuses anything but tensors and plain data)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = []
    for f in list((root / "src").rglob("*.py")) + list((root / "benchmarks").rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((f.relative_to(root), text[m.start():i]))
    assert calls, "the checkpoint loader itself must be found by this scan"
    bad = [(str(f), c) for f, c in calls if "weights_only=True" not in c]
    assert bad == []
    for f in list((root / "src").rglob("*.py")):
        assert "weights_only=False" not in f.read_text(), f
        assert not re.search(r"pickle\.loads?\(", f.read_text()), f


# ---- recipes (train-demo --preset) -----------------------------------------------------------------
def test_presets_resolve_and_are_recognised() -> None:
    from medfocus.errors import ConfigError
    from medfocus.training.demo_lvlm.config import PRESETS, preset_config, preset_of

    for name in PRESETS:
        assert preset_of(preset_config(name, seed=5, steps=3, num_threads=1)) == name
    assert preset_config("demo-8x8") == D.DemoLVLMConfig()  # the first demo's recipe is the field defaults
    assert preset_config("demo-16x16").token_grid == 16 and preset_config("demo-8x8").token_grid == 8
    assert preset_config("demo").token_grid == 16 and preset_config("demo").canvas == 224  # the shipped recipe (the paper's grid)
    assert preset_config("demo-12x12").token_grid == 12 and preset_config("demo-12x12").canvas == 168
    from medfocus.training.commands import train_demo as cmd

    choices = next(o for o in cmd.params if o.name == "preset").type.choices
    assert sorted(choices) == sorted(PRESETS)  # the CLI's written-out list follows the registry
    odd = preset_config("demo")
    odd.lr = 0.5
    assert preset_of(odd) is None
    with pytest.raises(ConfigError, match="unknown train-demo preset"):
        preset_config("demo-xl")
    with pytest.raises(ConfigError, match="unknown DemoLVLMConfig field"):
        preset_config("demo", hidden=3)


def test_cue_aux_target_marks_the_cue_cells() -> None:
    """The twin's auxiliary labels mark a finding at its shortcut cue's core box (known by construction), and
    at its own mask on a case without correlated cues."""
    from medfocus.datasets.synthetic import generate_case
    from medfocus.io.letterbox import Letterbox

    case = generate_case(123, size=256, findings=["nodule"], cue_rate=1.0)
    cue = next(c for c in case.cues if c["finding"] == "nodule")
    k = list(FINDINGS).index("nodule")
    by_cue = D.render_case(case, 224, 28, aux_target="cue").grid_labels[k]
    by_mask = D.render_case(case, 224, 28, aux_target="finding").grid_labels[k]
    lb = Letterbox.fit((256, 256), 224)
    x1, y1, x2, y2 = lb.forward_box(tuple(cue["core_box"]))
    cy, cx = int((y1 + y2) / 2) // 28, int((x1 + x2) / 2) // 28
    assert by_cue[cy, cx] > 0 and by_mask[cy, cx] == 0
    assert (by_cue > 0).sum() <= 4 and not np.array_equal(by_cue > 0, by_mask > 0)
    clean = generate_case(123, size=256, findings=["nodule"], cue_rate=0.0)
    assert np.array_equal(D.render_case(clean, 224, 28, aux_target="cue").grid_labels,
                          D.render_case(clean, 224, 28).grid_labels)


def test_shipped_shortcut_twin_is_small_documented_and_reproducible_by_its_preset() -> None:
    from medfocus.lvlm.registry import DEMO_SHORTCUT_DIR
    from medfocus.training.demo_lvlm.config import preset_of

    if not (DEMO_SHORTCUT_DIR / "config.json").is_file():
        pytest.skip("shortcut twin weights not built yet (medfocus train-demo --preset demo-shortcut)")
    assert D.folder_size(DEMO_SHORTCUT_DIR) <= 20 * 1024 * 1024
    cfg = D.config_from_dict(json.loads((DEMO_SHORTCUT_DIR / "medfocus.json").read_text())["demo"]["config"])
    assert preset_of(cfg) == "demo-shortcut"
    card = (DEMO_SHORTCUT_DIR / "MODEL_CARD.md").read_text()
    for needle in ("shortcut twin", "benchmarks/shortcut.md", "--preset demo-shortcut", "Cue reliance", "cue's box"):
        assert needle in card, needle


# ---- train-demo refuses bad numbers before any work ------------------------------------------------
@pytest.mark.parametrize("option,value,expected", [("--steps", "0", "x>=1"), ("--steps", "-1", "x>=1"), ("--cases", "0", "x>=1"),
                                                   ("--cases", "-5", "x>=1"), ("--eval-every", "-1", "x>=0"),
                                                   ("--checkpoint-every", "-5", "x>=0"), ("--seed", "-1", "x>=0"),
                                                   ("--threads", "0", "x>=1"), ("--threads", "-2", "x>=1")])
def test_train_demo_cli_refuses_out_of_range_numbers(tmp_path, monkeypatch, option, value, expected) -> None:
    from click.testing import CliRunner

    import medfocus.training.demo_lvlm as pkg
    from medfocus.cli import main

    calls = []
    monkeypatch.setattr(pkg, "train_demo", lambda *a, **k: calls.append(a) or {})
    res = CliRunner().invoke(main, ["train-demo", "--out", str(tmp_path / "td"), "--no-eval", option, value])
    assert res.exit_code == 2, res.output
    assert option in res.output and value in res.output and expected in res.output and "Traceback" not in res.output
    assert calls == [] and not (tmp_path / "td").exists()


def test_train_demo_cli_passes_the_pool_cache_folder(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    import medfocus.training.demo_lvlm as pkg
    from medfocus.cli import main

    calls = []
    monkeypatch.setattr(pkg, "train_demo", lambda *a, **k: calls.append(k) or {})
    res = CliRunner().invoke(main, ["train-demo", "--out", str(tmp_path / "td"), "--no-eval", "--pool-cache", str(tmp_path / "pools")])
    assert res.exit_code == 0, res.output
    assert [k["pool_cache"] for k in calls] == [str(tmp_path / "pools")]
    res = CliRunner().invoke(main, ["train-demo", "--out", str(tmp_path / "td"), "--no-eval"])
    assert res.exit_code == 0 and calls[-1]["pool_cache"] is None


@pytest.mark.parametrize("field,value,message", [("num_threads", 0, "num_threads: expected an integer >= 1, got 0"),
                                                 ("steps", -1, "steps: expected an integer >= 1, got -1"),
                                                 ("seed", -1, "seed: expected an integer >= 0, got -1"),
                                                 ("n_train_cases", 2.5, "n_train_cases: expected an integer >= 1, got 2.5"),
                                                 ("eval_every", True, "eval_every: expected an integer >= 0, got True"),
                                                 ("lr", 0.0, r"lr: expected a number > 0, got 0.0"),
                                                 ("cue_subset", 1.5, r"cue_subset: expected a number in \[0, 1\], got 1.5"),
                                                 ("train_severity", (0.9, 0.1), "train_severity: expected a pair"),
                                                 ("canvas", 200, "canvas: expected a multiple of 14 x spatial_merge_size = 28"),
                                                 ("task_weights", {"direct": -1.0}, "task_weights: expected non-negative"),
                                                 ("aux_target", "mask", "aux_target: expected 'finding' or 'cue'"),
                                                 ("focus_steps", -1, "focus_steps: expected an integer >= 0, got -1"),
                                                 ("focus_lr", 0.0, r"focus_lr: expected a number > 0, got 0.0"),
                                                 ("hard_negative_share", 1.5, r"hard_negative_share: expected a number in \[0, 1\]"),
                                                 ("hard_negative_pairs", [["nodule", "nodule"]], "hard_negative_pairs: expected a list of pairs"),
                                                 ("hard_negative_pairs", [["nodule", "tumour"]], "hard_negative_pairs: expected a list of pairs"),
                                                 ("hard_negative_pairs", [["nodule"]], "hard_negative_pairs: expected a list of pairs"),
                                                 ("focus_share", -0.1, r"focus_share: expected a number in \[0, 1\]"),
                                                 ("focus_findings", ["nodule", "nodule"], "focus_findings: expected a list of distinct"),
                                                 ("focus_findings", ["tumour"], "focus_findings: expected a list of distinct"),
                                                 ("lesion_size_rule", "radiological", r"lesion_size_rule: expected one of \['nih', 'fleischner'\]")])
def test_train_demo_validates_the_config_before_any_work(tmp_path, monkeypatch, field, value, message) -> None:
    # a config from a preset, JSON or the API is checked in train_demo itself (--threads 0 used to end in
    # torch's bare "set_num_threads expects a positive integer" after nothing else was checked)
    import medfocus.training.demo_lvlm.train as T
    from medfocus.errors import ConfigError

    work = []
    monkeypatch.setattr(T, "build_tokenizer", lambda *a, **k: work.append("tokenizer"))
    monkeypatch.setattr(T.torch, "set_num_threads", lambda n: work.append("threads"))
    cfg = D.DemoLVLMConfig()
    assert cfg.validate() is cfg  # the defaults (the shipped recipe) pass
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=f"DemoLVLMConfig.{message}"):
        T.train_demo(tmp_path / "td", cfg, log=lambda s: None)
    assert work == [] and not (tmp_path / "td").exists()


def test_hard_negative_questions_ask_the_absent_look_alike(micro) -> None:
    import dataclasses
    import random

    cfg0 = micro[0]
    nodule_only = D.make_case(11, ["nodule"], cued=False, cfg=cfg0)
    heart_only = D.make_case(12, ["cardiomegaly"], cued=False, cfg=cfg0)
    assert set(nodule_only.views) == {"nodule"} and set(heart_only.views) == {"cardiomegaly"}
    partners = D.hard_negative_partners([["nodule", "mass"], ["atelectasis", "consolidation"]])
    assert partners == {"atelectasis": ("consolidation",), "consolidation": ("atelectasis",), "mass": ("nodule",), "nodule": ("mass",)}

    def asked(cfg, case, partners, seed=0):
        return D.train._sample_items(random.Random(seed), [0] * 200, [case], FINDINGS, cfg, partners)

    always = dataclasses.replace(cfg0, hard_negative_share=1.0, questions_per_image=1)
    items = asked(always, nodule_only, partners)
    no_qs = [q for _, q, a in items if "nodule" not in q]  # every question not about the nodule is a "no"
    assert len(no_qs) > 60 and all("mass" in q for q in no_qs)
    never = dataclasses.replace(always, hard_negative_share=0.0)
    others = {f for f in FINDINGS if any(f in q for _, q, _ in asked(never, nodule_only, partners))}
    assert others == set(FINDINGS)  # share 0: "no" questions about every absent finding
    # half the share: about half the "no" questions ask about the mass (binomial, n > 60: loose bounds)
    half = [q for _, q, a in asked(dataclasses.replace(always, hard_negative_share=0.5), nodule_only, partners) if "nodule" not in q]
    assert 0.45 < np.mean(["mass" in q for q in half]) < 0.8
    # stage 2 (no partners) and images without a paired finding draw exactly as before
    assert asked(cfg0, nodule_only, None) == asked(cfg0, nodule_only, {})
    assert asked(always, heart_only, partners) == asked(always, heart_only, None)


def test_positive_focus_draws_focus_images_and_asks_about_their_finding(micro, tmp_path) -> None:
    import dataclasses
    import random

    import medfocus.training.demo_lvlm.train as T

    cfg0 = micro[0]
    both = D.make_case(13, ["nodule", "cardiomegaly"], cued=False, cfg=cfg0)
    heart = D.make_case(14, ["cardiomegaly"], cued=False, cfg=cfg0)
    assert set(both.views) == {"nodule", "cardiomegaly"}
    cfg = dataclasses.replace(cfg0, focus_findings=["nodule", "mass"], questions_per_image=1)
    from medfocus.training.demo_lvlm.tasks import question_stem

    def asked_present(items):  # the present findings the questions ask about
        return {f for _, q, _ in items for f in ("nodule", "cardiomegaly") if question_stem(f) in q}

    # on focus slots every "yes" question is about the nodule; without focus, about either finding
    focused = T._sample_items(random.Random(0), [0] * 300, [both], FINDINGS, cfg, None, focus_slots=300)
    plain = T._sample_items(random.Random(0), [0] * 300, [both], FINDINGS, cfg, None)
    assert asked_present(focused) == {"nodule"} and asked_present(plain) == {"nodule", "cardiomegaly"}
    assert sum(question_stem("nodule") in q for _, q, _ in focused) > 120  # about half the questions are "yes"
    # the same draws as stage 2 when the focus findings are absent from the image or focus_slots is 0
    assert T._sample_items(random.Random(0), [0] * 50, [heart], FINDINGS, cfg, None, focus_slots=50) == \
        T._sample_items(random.Random(0), [0] * 50, [heart], FINDINGS, cfg, None)
    assert plain == T._sample_items(random.Random(0), [0] * 300, [both], FINDINGS, dataclasses.replace(cfg, focus_findings=[]), None)

    # focus_loop: focus_share of each step's images carry a focus finding, no image twice in a step
    seen: list[list[int]] = []
    real = T._sample_items

    def spy(rng, ids, pool, findings, c, partners=None, focus_slots=0):
        seen.append((list(ids), focus_slots))
        return real(rng, ids, pool, findings, c, partners, focus_slots)

    pool = [heart] * 30 + [both] * 3
    st = dataclasses.replace(cfg0, focus_steps=3, focus_findings=["nodule"], focus_share=0.5, images_per_step=4)
    import unittest.mock as um
    with um.patch.object(T, "_sample_items", spy):
        D.focus_loop(D.build_model(st, micro[1]), D.Encoder(micro[1], st.token_grid ** 2), pool, st, log=lambda s: None)
    assert len(seen) == 3
    for ids, k in seen:
        assert k == 2 and len(ids) == 4 and len(set(ids)) == 4 and all(i >= 30 for i in ids[:2])
    from medfocus.errors import ConfigError

    card = D.model_card(st, {"vocab": len(micro[1])}, tmp_path)
    assert "Positive focus: 0.5 of each step's images carry one of nodule" in card
    assert "Positive focus" not in D.model_card(dataclasses.replace(st, focus_findings=[]), {"vocab": len(micro[1])}, tmp_path)
    with pytest.raises(ConfigError, match="no training case carries any of \\['mass'\\]"):
        D.focus_loop(D.build_model(st, micro[1]), D.Encoder(micro[1], st.token_grid ** 2), [heart] * 5,
                     dataclasses.replace(st, focus_findings=["mass"]), log=lambda s: None)


def _stage3_cfg(micro, **kw):
    import dataclasses

    return dataclasses.replace(micro[0], focus_steps=2, focus_lr=1e-3, hard_negative_pairs=[["nodule", "mass"]], **kw)


def test_stage3_from_a_stage2_folder_equals_one_uninterrupted_run(micro, tmp_path) -> None:
    import dataclasses
    from pathlib import Path

    from safetensors.torch import load_file

    from medfocus.errors import ConfigError

    cfg = _stage3_cfg(micro)
    quiet = dict(log=lambda s: None, progress=False, evaluate=False)
    D.train_demo(tmp_path / "whole", cfg, **quiet)
    # stages 2 and 3 through a pool cache: stage 3 reads the cases stage 2 rendered (the same weights as without it)
    D.train_demo(tmp_path / "stage2", dataclasses.replace(cfg, focus_steps=0), pool_cache=tmp_path / "pools", **quiet)
    logs: list[str] = []
    D.train_demo(tmp_path / "stage3", cfg, init_from=tmp_path / "stage2", pool_cache=tmp_path / "pools",
                 **{**quiet, "log": logs.append})
    assert any(m.startswith("training pool loaded from") for m in logs)
    whole, two, three = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "stage2", "stage3"))
    assert whole.keys() == three.keys() and all(torch.equal(whole[k], three[k]) for k in whole)
    assert any(not torch.equal(two[k], three[k]) for k in two)  # stage 3 did train
    meta = json.loads((tmp_path / "stage3" / "medfocus.json").read_text())["demo"]
    import hashlib

    sha = hashlib.sha256((tmp_path / "stage2" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["init_from"] == {"folder": str((tmp_path / "stage2").resolve()), "sha256": sha}
    card = (tmp_path / "stage3" / "MODEL_CARD.md").read_text()
    assert "Stage 3, hard-negative focus: 2 more steps" in card and "nodule / mass" in card and sha in card
    assert "final stage-3 loss" in card and "Stage 3" not in (tmp_path / "stage2" / "MODEL_CARD.md").read_text()
    # the card says when the data time is a cache load, not the rendering (stage 2 rendered and cached the cases)
    assert meta["data_from_pool_cache"] is True and "loaded from the `--pool-cache` file" in card
    assert "data_from_pool_cache" not in json.loads((tmp_path / "stage2" / "medfocus.json").read_text())["demo"]
    # refusals, each before any work, naming the folder and what was expected
    with pytest.raises(ConfigError, match="already a stage-3 result"):
        D.train_demo(tmp_path / "x", cfg, init_from=tmp_path / "whole", **quiet)
    with pytest.raises(ConfigError, match=r"another recipe \(seed: 0 there, 1 here\)"):
        D.train_demo(tmp_path / "x", dataclasses.replace(cfg, seed=1), init_from=tmp_path / "stage2", **quiet)
    with pytest.raises(ConfigError, match="focus_steps is 0"):
        D.train_demo(tmp_path / "x", dataclasses.replace(cfg, focus_steps=0), init_from=tmp_path / "stage2", **quiet)
    with pytest.raises(ConfigError, match="is the --init-from folder"):
        D.train_demo(tmp_path / "stage2", cfg, init_from=tmp_path / "stage2", **quiet)
    (tmp_path / "films").mkdir()
    with pytest.raises(ConfigError, match="not a train-demo output folder"):
        D.train_demo(tmp_path / "x", cfg, init_from=tmp_path / "films", **quiet)
    assert not Path(tmp_path / "x").exists()


def test_killed_stage3_resumes_to_the_same_result(micro, tmp_path, monkeypatch) -> None:
    import medfocus.training.demo_lvlm.train as T

    cfg = _stage3_cfg(micro, checkpoint_every=1)
    cfg.focus_steps = 3
    tok = micro[1]
    pool = D.build_train_pool(cfg, progress=False)
    enc = D.Encoder(tok, cfg.token_grid ** 2)
    ref = D.focus_loop(D.build_model(cfg, tok), enc, pool, cfg, log=lambda s: None)
    real, calls = T.sequence_loss, []

    def dies_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    ck = D.checkpoint_path(tmp_path, stage=3)
    monkeypatch.setattr(T, "sequence_loss", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        D.focus_loop(D.build_model(cfg, tok), enc, pool, cfg, log=lambda s: None, checkpoint=ck)
    monkeypatch.setattr(T, "sequence_loss", real)
    logs: list[str] = []
    resumed = D.focus_loop(D.build_model(cfg, tok), enc, pool, cfg, log=logs.append, checkpoint=ck)
    assert any("resumed" in s and "step 2" in s for s in logs) and resumed == ref
    assert ck != D.checkpoint_path(tmp_path) and torch.load(ck, weights_only=True)["stage"] == 3


def test_train_demo_cli_passes_stage3_options(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    import medfocus.training.demo_lvlm as pkg
    from medfocus.cli import main

    calls = []
    monkeypatch.setattr(pkg, "train_demo", lambda out, cfg, **k: calls.append((cfg, k)) or {})
    (tmp_path / "s2").mkdir()
    res = CliRunner().invoke(main, ["train-demo", "--out", str(tmp_path / "td"), "--no-eval", "--preset", "demo-12x12",
                                    "--focus-steps", "7", "--init-from", str(tmp_path / "s2")])
    assert res.exit_code == 0, res.output
    (cfg, kw), = calls
    assert cfg.focus_steps == 7 and cfg.canvas == 168 and kw["init_from"] == str(tmp_path / "s2")
    res = CliRunner().invoke(main, ["train-demo", "--out", str(tmp_path / "td"), "--init-from", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output and len(calls) == 1


def test_training_cases_follow_the_recipes_lesion_size_rule(micro) -> None:
    """``lesion_size_rule`` reaches the training and held-out cases (make_case), so a recipe trained in the
    Fleischner world sees nodules <= 3 cm and masses > 3 cm; preset demo-12x12-fleischner is demo-12x12 in it."""
    import dataclasses

    from medfocus.datasets.synthetic.findings import NODULE_MAX_DIAMETER_CM, lesion_diameter_cm

    fl = dataclasses.replace(micro[0], lesion_size_rule="fleischner")
    for seed in range(6):
        case = D.make_case(100 + seed, ["mass"], cued=False, cfg=fl, keep=True).source
        assert lesion_diameter_cm(case.finding("mass").box, fl.image_size) > NODULE_MAX_DIAMETER_CM
    nih = [D.make_case(100 + s, ["mass"], cued=False, cfg=micro[0], keep=True).source for s in range(6)]
    assert min(lesion_diameter_cm(c.finding("mass").box, micro[0].image_size) for c in nih) <= NODULE_MAX_DIAMETER_CM
    from medfocus.training.demo_lvlm.config import preset_config

    a, b = preset_config("demo-12x12"), preset_config("demo-12x12-fleischner")
    assert b.lesion_size_rule == "fleischner" and dataclasses.replace(b, lesion_size_rule="nih") == a
    from medfocus.datasets.synthetic.findings import DEFAULT_LESION_SIZE_RULE

    # the shipped recipe's world is the synth default; the field defaults (the first demo, the twin) keep "nih"
    assert preset_config("demo").lesion_size_rule == DEFAULT_LESION_SIZE_RULE == "fleischner"
    assert D.DemoLVLMConfig().lesion_size_rule == preset_config("demo-shortcut").lesion_size_rule == "nih"
    # presets share dicts and lists; a config made from one must not change the preset when edited
    c = preset_config("demo-12x12-fleischner-focus")
    c.vision["depth"] = 1
    c.hard_negative_pairs.append(["atelectasis", "consolidation"])
    assert preset_config("demo-12x12-focus").vision["depth"] == 4
    assert preset_config("demo-12x12-fleischner-focus").hard_negative_pairs == [["nodule", "mass"]]


def test_train_demo_killed_in_stage3_resumes_to_the_same_weights(micro, tmp_path, monkeypatch) -> None:
    """End to end through train_demo: a run killed during stage 3 and rerun unchanged resumes stage 2 at its
    final checkpoint and stage 3 at its own, and ends with the weights of one uninterrupted run."""
    from safetensors.torch import load_file

    import medfocus.training.demo_lvlm.train as T

    cfg = _stage3_cfg(micro, checkpoint_every=1)
    quiet = dict(progress=False, evaluate=False)
    D.train_demo(tmp_path / "whole", cfg, log=lambda s: None, **quiet)
    out = tmp_path / "killed"
    stage3_ck = D.checkpoint_path(out, stage=3)
    real = T.sequence_loss

    def dies_after_a_stage3_checkpoint(*a, **k):
        if stage3_ck.is_file():  # stage 3 has saved step 1: die in step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "sequence_loss", dies_after_a_stage3_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        D.train_demo(out, cfg, log=lambda s: None, **quiet)
    assert D.checkpoint_path(out).is_file() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(T, "sequence_loss", real)
    logs: list[str] = []
    D.train_demo(out, cfg, log=logs.append, **quiet)
    assert sum("resumed" in s for s in logs) == 2, logs  # stage 2 at its end, stage 3 at step 1
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_resumed_run_counts_the_training_time_of_every_process(micro, tmp_path) -> None:
    """The card's training time is the whole run's: each checkpoint records the seconds spent up to it and a
    resumed run continues from that count; a checkpoint that recorded none makes the time partial, said so."""
    import dataclasses

    cfg0, tok, _, _, _ = micro
    cfg = dataclasses.replace(cfg0, steps=4, checkpoint_every=2, eval_every=3)
    pool = D.build_train_pool(cfg, progress=False)
    enc = D.Encoder(tok, (cfg.canvas // 28) ** 2)
    ck = _killed_at_the_first_check(cfg, tok, enc, pool, tmp_path / "ck.pt", clock=D.TrainClock())
    state = torch.load(ck, weights_only=True)
    assert state["step"] == 2 and state["seconds"] > 0
    # pretend the first process ran for an hour: the resumed run's total starts from the checkpoint's count
    state["seconds"] = 3600.0
    torch.save(state, ck)
    clock = D.TrainClock()
    D.train_loop(D.build_model(cfg, tok), enc, pool, cfg, log=lambda s: None, checkpoint=ck, clock=clock)
    assert 3600.0 < clock.total() < 3600.0 + 600 and not clock.partial
    # a checkpoint from before the count existed: this process's time only, flagged partial, and the card says so
    del state["seconds"]
    torch.save(state, ck)
    clock = D.TrainClock()
    D.train_loop(D.build_model(cfg, tok), enc, pool, cfg, log=lambda s: None, checkpoint=ck, clock=clock)
    assert clock.partial and clock.total() < 600
    from medfocus.training.demo_lvlm.card import model_card

    card = model_card(cfg, {"train_seconds": 12.0, "train_seconds_partial": True, "data_seconds": 1.0, "vocab": len(tok)},
                      tmp_path / "m")
    assert "training 12.0 s (the last process only" in card
    card = model_card(cfg, {"train_seconds": 12.0, "data_seconds": 1.0, "vocab": len(tok)}, tmp_path / "m")
    assert "training 12.0 s (all stages, over every process of a resumed run)" in card
