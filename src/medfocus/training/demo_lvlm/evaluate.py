"""Held-out evaluation of the demo LVLM by greedy generation (the real inference path), and the card
rewrite that records it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medfocus.io.atomic import atomic_write_text
from medfocus.lvlm.answers import parse_yes_no
from medfocus.lvlm.box_text import parse_boxes
from medfocus.training.demo_lvlm.card import model_card
from medfocus.training.demo_lvlm.config import DemoLVLMConfig, config_from_dict
from medfocus.training.demo_lvlm.data import DemoCase, build_eval_pool, canvases_to_pixel_values, to_canvas
from medfocus.training.demo_lvlm.model import Encoder
from medfocus.training.demo_lvlm.tasks import task_question

@torch.inference_mode()
def direct_margin(model, enc: Encoder, cases: Sequence[DemoCase], findings: Sequence[str], grid: int, batch: int = 32) -> np.ndarray:
    """Teacher-forced ``log p(Yes) - log p(No)`` of the direct answer, one per (case, finding) pair (fast check)."""
    yes, no = enc.answer_ids("Yes")[0], enc.answer_ids("No")[0]
    out = []
    for s in range(0, len(cases), batch):
        cs, fs = cases[s : s + batch], findings[s : s + batch]
        can = torch.from_numpy(np.stack([c.canvas for c in cs]))
        items = [(i, task_question(f, "direct"), "Yes") for i, f in enumerate(fs)]
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pv = canvases_to_pixel_values(can, model.config.vision_config.spatial_merge_size)
        thw = torch.tensor([[1, grid, grid]] * len(cs))
        feats = list(model.model.get_image_features(pv, thw).pooler_output)
        ids, att, mm, loss_mask = enc.batch([(q, a) for _, q, a in items])
        h = model.model(input_ids=ids, attention_mask=att, mm_token_type_ids=mm, image_grid_thw=thw,
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)}).last_hidden_state
        first = loss_mask.float().argmax(dim=1) - 1  # position predicting the first answer token
        lp = torch.log_softmax(model.lm_head(h[torch.arange(len(cs)), first]).float(), -1)
        out.append((lp[:, yes] - lp[:, no]).numpy())
    return np.concatenate(out) if out else np.zeros(0)


GenerateFn = Callable[[Sequence[np.ndarray], Sequence[str]], list[str]]


def evaluate_generation(gen: GenerateFn, cases: Sequence[tuple[DemoCase, str, bool]], modes: Sequence[str] = ("direct", "cot"),
                        ) -> dict[str, Any]:
    """Greedy answers for held-out ``(case, finding, present)`` triples in each mode.

    Returns ``{"per_finding": {mode: {finding: {"n", "correct", "acc", "unparsed"}}}, "overall": {mode: acc},
    "examples": {mode: [first few (question, output)]}}``.
    """
    res: dict[str, Any] = {"per_finding": {}, "overall": {}, "examples": {}}
    images = [c.image if c.image is not None else c.canvas for c, _, _ in cases]
    for mode in modes:
        qs = [task_question(f, mode) for _, f, _ in cases]
        outs = gen(images, qs)
        table: dict[str, dict[str, float]] = {}
        for (c, f, present), out in zip(cases, outs):
            a = parse_yes_no(out)
            row = table.setdefault(f, {"n": 0, "correct": 0, "unparsed": 0})
            row["n"] += 1
            row["correct"] += int(a == ("Yes" if present else "No"))
            row["unparsed"] += int(a is None)
        for row in table.values():
            row["acc"] = row["correct"] / max(1, row["n"])
        res["per_finding"][mode] = table
        res["overall"][mode] = sum(r["correct"] for r in table.values()) / max(1, sum(r["n"] for r in table.values()))
        res["examples"][mode] = [(q, o) for q, o in list(zip(qs, outs))[:: max(1, len(qs) // 6)]][:6]
    return res


def evaluate_cue_reliance(gen: GenerateFn, cued_cases: Sequence[tuple[DemoCase, str, bool]], clean_cases: Sequence[tuple[DemoCase, str, bool]],
                          mode: str = "direct") -> dict[str, Any]:
    """How often a positive answered "Yes" flips to "No" when everything outside the finding's box is
    redrawn and the cues are removed (``SyntheticCase.background``): high on the cue subset, low elsewhere.
    """
    out: dict[str, Any] = {}
    for name, cases in (("cued", cued_cases), ("clean", clean_cases)):
        pos = [(c, f) for c, f, p in cases if p and c.source is not None]
        if not pos:
            continue
        orig = gen([c.image for c, _ in pos], [task_question(f, mode) for _, f in pos])
        bg = gen([np.asarray(c.source.background(f)) for c, f in pos], [task_question(f, mode) for _, f in pos])
        yes = [parse_yes_no(o) == "Yes" for o in orig]
        flips = [y and parse_yes_no(b) == "No" for y, b in zip(yes, bg)]
        out[name] = {"n_pos": len(pos), "yes": int(sum(yes)), "flip_on_background_edit": int(sum(flips)),
                     "flip_rate": (sum(flips) / max(1, sum(yes)))}
    return out


def hf_generate_fn(model, enc: Encoder, canvas: int, max_new_tokens: int = 48, batch: int = 32) -> GenerateFn:
    """Greedy generation straight on the HF model (used during training, before a folder exists).
    Images are letterboxed like the adapter does; prompts of equal length are batched (no padding)."""
    grid = canvas // 14

    @torch.inference_mode()
    def gen(images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        outs: list[str] = [""] * len(images)
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(questions):
            groups.setdefault(len(enc.prompt_ids(q)), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), batch):
                part = idx[s : s + batch]
                cans = torch.from_numpy(np.stack([to_canvas(np.asarray(images[i]), canvas)[0] for i in part]))
                ids = torch.tensor([enc.prompt_ids(questions[i]) for i in part])
                g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=canvases_to_pixel_values(cans, model.config.vision_config.spatial_merge_size),
                                   image_grid_thw=torch.tensor([[1, grid, grid]] * len(part)),
                                   mm_token_type_ids=(ids == enc.image_pad).long(), max_new_tokens=max_new_tokens, do_sample=False)
                for j, i in enumerate(part):
                    outs[i] = enc.tok.decode(g[j, ids.shape[1]:], skip_special_tokens=True).strip()
        return outs

    return gen


def adapter_generate_fn(adapter, max_new_tokens: int = 48, batch: int = 16) -> GenerateFn:
    """Greedy generation through :meth:`LVLMAdapter.generate` (the path every other module uses)."""

    def gen(images: Sequence[np.ndarray], questions: Sequence[str]) -> list[str]:
        return adapter.generate(list(images), list(questions), max_new_tokens=max_new_tokens, batch_size=batch)

    return gen


def _union_iou(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], size: int) -> float:
    ma = np.zeros((size, size), bool)
    mb = np.zeros((size, size), bool)
    for m, boxes in ((ma, a), (mb, b)):
        for box in boxes:
            x1, y1, x2, y2 = (int(round(v)) for v in box)  # canvas pixel edges
            m[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = True
    u = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / u) if u else 1.0


def evaluate_evidence(gen: GenerateFn, cases: Sequence[tuple[DemoCase, str, bool]], canvas: int) -> dict[str, Any]:
    """Evidence requests on held-out positives: mean union-IoU of the predicted canvas boxes with the true
    ones, and how often the phrase list names the right side (where the finding has one)."""
    pos = [(c, f) for c, f, p in cases if p]
    if not pos:
        return {}
    imgs = [c.image if c.image is not None else c.canvas for c, _ in pos]
    box_out = gen(imgs, [task_question(f, "boxes") for _, f in pos])
    ph_out = gen(imgs, [task_question(f, "phrases") for _, f in pos])
    # The demo model answers in canvas pixels (the qwen_vl family's default frame).
    ious = [_union_iou(parse_boxes(o, canvas, canvas, "canvas").boxes, [v.box for v in c.views[f]], canvas)
            for (c, f), o in zip(pos, box_out)]
    side_ok, side_n = 0, 0
    for (c, f), o in zip(pos, ph_out):
        sides = {v.side for v in c.views[f] if v.side}
        if len(sides) == 1:
            side_n += 1
            side_ok += int(next(iter(sides)) in o and ({"left", "right"} - sides).pop() not in o)
    return {"n": len(pos), "box_union_iou_mean": float(np.mean(ious)), "box_iou_ge_0.3": float(np.mean([i >= 0.3 for i in ious])),
            "phrase_side_correct": side_ok / max(1, side_n), "examples": list(zip(box_out[:3], ph_out[:3]))}


def evaluate_folder(path: str | Path, cfg: DemoLVLMConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Held-out evaluation of a saved folder through ``load_lvlm`` + the adapter's greedy generation."""
    from medfocus.lvlm.loading import load_lvlm

    t0 = time.time()
    adapter = load_lvlm(str(path), device="cpu")
    load_s = time.time() - t0
    gen = adapter_generate_fn(adapter)
    clean = build_eval_pool(cfg, progress=progress)
    cued = build_eval_pool(cfg, n_per_cell=max(4, cfg.n_eval_per_cell // 2), progress=progress, cued=True, seed_offset=700_000)
    t0 = time.time()
    res = evaluate_generation(gen, clean)
    res_cued = evaluate_generation(gen, cued)
    ev = evaluate_evidence(gen, clean, cfg.canvas)
    rel = evaluate_cue_reliance(gen, cued, clean)
    log(f"held-out accuracy: {res['overall']}; cue subset: {res_cued['overall']}; cue reliance: {rel}; "
        f"evidence: iou {ev.get('box_union_iou_mean')} side {ev.get('phrase_side_correct')} ({time.time() - t0:.0f}s)")
    return {"load_seconds": round(load_s, 2), "heldout": res, "heldout_cued": res_cued, "evidence": ev, "cue_reliance": rel,
            "eval_seconds": round(time.time() - t0, 1)}


def evaluate_and_write_card(path: str | Path, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Evaluate a trained demo folder on held-out cases and (re)write its ``MODEL_CARD.md`` and the
    metrics in ``medfocus.json``. The config is read back from ``medfocus.json``."""
    path = Path(path)
    hints = json.loads((path / "medfocus.json").read_text())
    d = hints["demo"]
    cfg = config_from_dict(d["config"])
    extra = {k: v for k, v in d.items() if k not in ("config", "metrics")}
    metrics = {**extra, **evaluate_folder(path, cfg, log=log, progress=progress)}
    from transformers import AutoTokenizer

    metrics["vocab"] = len(AutoTokenizer.from_pretrained(path))
    hints["demo"]["metrics"] = metrics
    atomic_write_text(path / "medfocus.json", json.dumps(hints, indent=1, default=str))
    atomic_write_text(path / "MODEL_CARD.md", model_card(cfg, metrics, path))
    return metrics


def rewrite_card(path: str | Path) -> None:
    """Regenerate ``MODEL_CARD.md`` from the config and metrics stored in ``medfocus.json`` (no evaluation).
    The same weights: the block quoted from ``benchmarks/validity.md`` is carried over."""
    from medfocus.training.demo_lvlm.card import validity_block

    path = Path(path)
    d = json.loads((path / "medfocus.json").read_text())["demo"]
    cfg = config_from_dict(d["config"])
    metrics = {**{k: v for k, v in d.items() if k not in ("config", "metrics")}, **(d.get("metrics") or {})}
    card = path / "MODEL_CARD.md"
    block = validity_block(card.read_text(encoding="utf-8")) if card.exists() else None
    atomic_write_text(card, model_card(cfg, metrics, path, validity=block))
