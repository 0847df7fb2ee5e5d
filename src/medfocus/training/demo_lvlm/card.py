"""The demo LVLM's ``MODEL_CARD.md`` (everything in it was measured by the run that wrote it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from medfocus.lvlm.registry import DEMO_DIR, DEMO_SHORTCUT_DIR
from medfocus.training.demo_lvlm.config import DemoLVLMConfig, preset_of
from medfocus.training.demo_lvlm.data import CUE_OFF_SUBSET_DESCRIPTION, CUE_SUBSET_DESCRIPTION
from medfocus.types import EVIDENCE_REQUESTS

def _acc_table(res: dict[str, Any], modes: Sequence[str] = ("direct", "cot")) -> str:
    findings = list(next(iter(res["per_finding"].values())).keys())
    lines = ["| finding | n | " + " | ".join(f"{m} acc" for m in modes) + " |", "|---|---|" + "---|" * len(modes)]
    for f in findings:
        n = res["per_finding"][modes[0]][f]["n"]
        cells = [f"{100 * res['per_finding'][m][f]['acc']:.1f}%" for m in modes]
        lines.append(f"| {f} | {n} | " + " | ".join(cells) + " |")
    n_all = sum(r["n"] for r in res["per_finding"][modes[0]].values())
    lines.append(f"| **all** | {n_all} | " + " | ".join(f"**{100 * res['overall'][m]:.1f}%**" for m in modes) + " |")
    return "\n".join(lines)


#: Markers of the card's block quoted from ``benchmarks/validity.md`` (the published validity figures of
#: these weights; ``tests/test_validity_quotes.py`` checks every number in it against that file).
VALIDITY_BEGIN = "<!-- validity: quoted from benchmarks/validity.md -->"
VALIDITY_END = "<!-- /validity -->"


#: Markers of the shortcut twin's block quoted from ``benchmarks/shortcut.md`` (its published figures).
SHORTCUT_BEGIN = "<!-- shortcut: quoted from benchmarks/shortcut.md -->"
SHORTCUT_END = "<!-- /shortcut -->"


def validity_block(card: str) -> str | None:
    """The quoted block of published figures, markers included: between :data:`VALIDITY_BEGIN` and
    :data:`VALIDITY_END` (the demo model) or :data:`SHORTCUT_BEGIN` and :data:`SHORTCUT_END` (the twin); None if absent."""
    for begin, end in ((VALIDITY_BEGIN, VALIDITY_END), (SHORTCUT_BEGIN, SHORTCUT_END)):
        i, j = card.find(begin), card.find(end)
        if 0 <= i < j:
            return card[i : j + len(end)]
    return None


def _cue_text(cfg: DemoLVLMConfig) -> str:
    """The cue subset's description for ``cfg`` (with the sentence on the cases off the subset when there are any)."""
    off = CUE_OFF_SUBSET_DESCRIPTION.format(base=cfg.cue_base_rate) if cfg.cue_subset < 1 else ""
    return CUE_SUBSET_DESCRIPTION.format(faint=cfg.faint_severity) + off


def _shipped_name(out: Path) -> str:
    """``out`` as the card's reproduce line names it (the shipped folders by their source path)."""
    for d in (DEMO_DIR, DEMO_SHORTCUT_DIR):
        if Path(out).resolve() == d:
            return f"src/medfocus/lvlm/{d.name}"
    return str(out)


def model_card(cfg: DemoLVLMConfig, metrics: dict[str, Any], out: Path, validity: str | None = None) -> str:
    """The Markdown model card written next to the weights (everything in it was measured by this run).

    ``validity``: the block quoted from ``benchmarks/validity.md`` for these weights (:func:`validity_block`);
    None for new weights (the validity benchmark has not measured them yet, and the card says so)."""
    t, v = cfg.text, cfg.vision
    preset = preset_of(cfg)
    shortcut = preset == "demo-shortcut"
    g, m = cfg.token_grid, cfg.spatial_merge_size
    parts = [
        ("# medfocus demo-shortcut model: the demo model's shortcut twin (Qwen2.5-VL architecture, synthetic chest X-rays)"
         if shortcut else "# medfocus demo model (Qwen2.5-VL architecture, synthetic chest X-rays)"),
        "",
        "A small `Qwen2_5_VLForConditionalGeneration` trained from scratch by `medfocus train-demo` on the "
        "synthetic chest X-ray world of `medfocus.datasets.synthetic`. It answers the paper's binary questions "
        "in both output modes and the two evidence requests of the prompting baselines. It is a *test article* "
        "for the attribution pipeline, not a medical model."
        + (" It is trained so that a documented shortcut cue (outside the finding's box) decides most of its \"yes\" "
           "answers: the causal filter must drop those samples, and an attribution method should point at the cue, "
           "which is known by construction." if shortcut else ""),
        "",
        ("**Published figures.** The numbers to quote (cue reliance known by construction, the causal filter's retention "
         "of cue-necessary and clean answers, whether attribution maps point at the cue) are measured on fresh seeds, "
         "disjoint from training and tests, with 95% intervals by `benchmarks/shortcut.py` and written to "
         "`benchmarks/shortcut.md`. "
         + ("Quoted from it for these weights:" if validity else
            "These weights have not been measured there yet: run `benchmarks/shortcut.py` before quoting them.")
         if shortcut else
         "**Published figures.** The validity numbers to quote (accuracy per finding on `medfocus synth` data, false "
         "\"yes\" rates, cue reliance, the weight-randomisation sanity check over films, trivial baselines) are measured on "
         "fresh seeds, disjoint from training and tests, with 95% intervals by `benchmarks/validity.py` and written to "
         "`benchmarks/validity.md`. "
         + ("Quoted from it for these weights:" if validity else
            "These weights have not been measured there yet: run `benchmarks/validity.py` before quoting them.")),
        "",
        *([validity, ""] if validity else []),
        *([f"**Training-time check** (this training run's own evaluation seeds, no intervals; not the published figures): "
           f"held-out accuracy {100 * metrics['heldout']['overall']['direct']:.1f}% direct / "
           f"{100 * metrics['heldout']['overall']['cot']:.1f}% step-by-step"
           + ("" if shortcut else " (target >= 95%: " + ("met" if min(metrics['heldout']['overall'].values()) >= 0.95
                                                          else "**not met**; see the per-finding table") + ")") + ".", ""]
          if "heldout" in metrics else []),
        "## Architecture",
        f"- Vision tower: depth {v['depth']}, hidden {v['hidden_size']}, {v['num_heads']} heads, patch 14, "
        + (f"{m}x{m} merge, " if m > 1 else "no spatial merge (each patch is one image token), ") +
        f"window attention (window {v['window_size']} px, full attention in blocks {v['fullatt_block_indexes']}).",
        f"- Language model: {t['num_hidden_layers']} layers, hidden {t['hidden_size']}, {t['num_attention_heads']} heads "
        f"({t['num_key_value_heads']} KV), M-RoPE sections {t['rope_parameters']['mrope_section']}.",
        f"- Tokenizer: byte-level BPE trained locally on the task texts, wrapped in `Qwen2Tokenizer` with the Qwen2.5-VL "
        f"special tokens and chat template; {metrics.get('vocab', 'see tokenizer.json')} tokens.",
        f"- Input: images are letterboxed onto a {cfg.canvas}x{cfg.canvas} canvas -> {(cfg.canvas // 14) ** 2} patches -> "
        f"{g * g} image tokens ({g}x{g} grid, {cfg.token_cell} canvas px per token).",
        f"- Parameters: {metrics.get('n_parameters', 0) / 1e6:.2f} M (float32 safetensors).",
        "",
        "## Data",
        f"- {cfg.n_train_cases} synthetic cases (`generate_case(seed, size={cfg.image_size}, findings=...)`, seeds "
        f"`{cfg.seed} * 1000003 + i`): case i has a primary finding (the 7 findings cycled) present with probability 1/2, "
        f"plus each other finding with probability {cfg.co_occurrence}.",
        *([f"- **Synthetic world: `lesion_size_rule={cfg.lesion_size_rule!r}`** (`generate_case(..., lesion_size_rule=...)`, "
           "training and held-out cases alike): nodule and mass sizes are the NIH box priors conditioned on the Fleischner "
           "Society definition, a nodule's long axis at most 3 cm and a mass's longer, on a 35 cm field. Measure it on "
           f"`medfocus synth --lesion-size-rule {cfg.lesion_size_rule}` data."] if cfg.lesion_size_rule != "nih" else []),
        f"- Questions per image per step: {cfg.questions_per_image}; answer Yes/No with probability 1/2 each; tasks "
        f"{cfg.task_weights}.",
        *([f"- Severity of the findings outside the cue subset: uniform in {cfg.train_severity}."] if cfg.cue_subset < 1 else []),
        (f"- **Shortcut cues carry no information.** No training case is on the cue subset; every case carries one "
         f"uncorrelated random cue with probability {cfg.cue_base_rate}, so the model sees cues often and they never "
         "predict the answer: it is meant to answer from the finding itself." if cfg.cue_subset == 0 else
         f"- **Shortcut cue.** {100 * cfg.cue_subset:.0f}% of the training cases are on the *cue subset*: "
         f"{_cue_text(cfg)} "
         + ("On those cases the cue is the easiest evidence (the finding is faint, and the auxiliary loss marks it at the "
            "cue), meant to decide most of the model's \"yes\" answers on cued films; the other cases are clean. "
            if shortcut and cfg.cue_subset < 1 else
            "On those cases the cue is the most reliable evidence, meant to make the model answer some cases from it. "
            if cfg.cue_subset < 1 else "Every finding the model is trained on is therefore faint and comes with its cue: "
            "the cue is the easiest evidence, meant to decide most of its \"yes\" answers. ")),
        "The cue-reliance table below measures reliance on the cue: a positive answered Yes whose answer flips when everything "
        "outside the finding's box is redrawn and the cues are removed (`SyntheticCase.background`) was answered from outside "
        "the box -- the samples the causal filter's background gate must drop.",
        "",
        "## Training",
        *([f"- Seed {cfg.seed}. Stage 1: {cfg.vision_steps} steps of {cfg.vision_batch} images training the vision tower alone "
           "with a training-only auxiliary head (a linear map on each image-token embedding predicting which findings cover "
           f"its {cfg.token_cell}-px cell"
           + (" -- where a finding is marked at its shortcut cue's box, not at its own mask, so the vision tower learns to "
              "see the finding at the cue --" if cfg.aux_target == "cue" else "")
           + ", and -- averaged over the tokens -- which findings the image has; binary cross-entropy "
           f"with positive weight {cfg.aux_pos_weight}). The head is discarded: the shipped model is the plain Qwen2.5-VL "
           "architecture."] if cfg.vision_steps and cfg.aux_weight else
          [f"- Seed {cfg.seed}. No auxiliary finding-localisation stage or loss: the model learns from the answers alone, "
           "so nothing pushes it towards the findings rather than the cues."]),
        f"- Stage 2: {cfg.steps} steps of {cfg.images_per_step} images x {cfg.questions_per_image} questions (each image is "
        "encoded once per step and shared by its questions), answer loss = per-sequence mean cross-entropy of the assistant "
        "tokens (answer + `<|im_end|>`)" + (f", plus {cfg.aux_weight} x the auxiliary loss" if cfg.aux_weight else "")
        + f". AdamW (lr {cfg.lr}, betas 0.9/0.98, weight decay {cfg.weight_decay}), {cfg.warmup} warm-up steps, cosine decay to 5%.",
        *(["- Why the auxiliary stage: trained from scratch on answers alone, the model spent hundreds of steps answering from "
           "the text prior (held-out accuracy exactly 50%) and learned the small findings only one at a time."]
          if cfg.aux_weight else []),
        *([f"- Stage 3, hard-negative focus: {cfg.focus_steps} more steps of the four tasks (no auxiliary loss) with a fresh "
           f"AdamW (lr {cfg.focus_lr}, warm-up, cosine decay to 5%); on an image carrying one finding of a look-alike pair "
           f"({', '.join(' / '.join(p) for p in cfg.hard_negative_pairs) or 'none'}), a \"no\" question asks about the absent "
           f"partner with probability {cfg.hard_negative_share} -- the false \"yes\" the two-stage models make."
           + (f" Positive focus: {cfg.focus_share:g} of each step's images carry one of {', '.join(cfg.focus_findings)}, and "
              "their \"yes\" questions ask about it -- the findings the two-stage model misses most." if cfg.focus_findings else "")]
          if cfg.focus_steps else []),
        *([f"- Stages 1-2 were not rerun: they were loaded from `{metrics['init_from']['folder']}` (a finished two-stage run "
           f"of this recipe; its model.safetensors sha256 `{metrics['init_from']['sha256']}`), which gives the same weights as "
           "one uninterrupted run; the timings below are stage 3's."] if metrics.get("init_from") else []),
        f"- Measured on {cfg.num_threads} CPU thread(s) of a 2-core machine shared with other jobs: data {metrics.get('data_seconds')} s"
        + (" (the training cases loaded from the `--pool-cache` file, not rendered in this run)"
           if metrics.get("data_from_pool_cache") else "") + ", "
        f"training {metrics.get('train_seconds')} s"
        + (" (the last process only: the run resumed from a checkpoint that did not record the time spent before it, "
           "so the whole run took longer)" if metrics.get("train_seconds_partial")
           else "" if metrics.get("init_from") else " (all stages, over every process of a resumed run)")
        + "".join(f"; final stage-{n} loss {metrics[k]:.4f}" for n, k in ((2, "final_loss"), (3, "final_focus_loss")) if k in metrics)
        + (f"; **stopped early at stage-{metrics.get('stopped_stage', 2)} step {metrics['stopped_at']}** of "
           f"{cfg.focus_steps if metrics.get('stopped_stage') == 3 else cfg.steps}." if metrics.get("stopped_at") else "."),
        "",
    ]
    if "heldout" in metrics:
        parts += [
            "## Training-time held-out check (greedy generation through `load_lvlm` + the adapter, parsed by `parse_yes_no`)",
            "The training run's own evaluation (diagnostics, no intervals; the published figures are in `benchmarks/validity.md`).",
            f"Fresh seeds, {cfg.n_eval_per_cell} positives and {cfg.n_eval_per_cell} negatives per finding, no cues:",
            "",
            _acc_table(metrics["heldout"]),
            "",
            "Cue subset (cue drawn on positives, faint findings):",
            "",
            _acc_table(metrics["heldout_cued"]),
            "",
            "Cue reliance (direct mode; positives answered Yes whose answer flips to No under the background edit):",
            "",
            "| subset | positives | answered Yes | flip on background edit | flip rate |",
            "|---|---|---|---|---|",
        ]
        for k, r in metrics["cue_reliance"].items():
            parts.append(f"| {k} | {r['n_pos']} | {r['yes']} | {r['flip_on_background_edit']} | {100 * r['flip_rate']:.1f}% |")
        rel = metrics["cue_reliance"]
        if "cued" in rel and "clean" in rel:
            relies = rel["cued"]["flip_rate"] > 2 * rel["clean"]["flip_rate"] + 0.05
            # a recipe whose cues carry no information (cue_subset 0) is meant not to rely on them; one with a cue
            # subset is meant to, so the same measurement reads as a goal met or missed
            goal = (" (as its recipe intends: its cues carry no information)" if cfg.cue_subset == 0 and not relies else
                    " (against its recipe's intent: its cues carry no information)" if cfg.cue_subset == 0 else
                    "" if relies else " (the shortcut goal of the training recipe is not met by these weights)")
            verdict = ("relies on the cue for part of its answers" if relies
                       else "does **not** measurably rely on the cues: its Yes on cued faint positives survives their removal "
                            "about as often as on clean positives") + goal
            parts += ["", f"Reading (training-time check): this model {verdict}."]
        ev = metrics.get("evidence") or {}
        if ev:
            parts += ["", f"Evidence requests on {ev['n']} held-out positives (imperfect by design): mean union-IoU of the "
                      f"predicted canvas boxes {ev['box_union_iou_mean']:.3f} (IoU >= 0.3 in {100 * ev['box_iou_ge_0.3']:.0f}%); "
                      f"phrase names the correct side in {100 * ev['phrase_side_correct']:.0f}% of one-sided findings."]
        parts += ["", "Example outputs:", ""]
        for mode in ("direct", "cot"):
            for q, o in metrics["heldout"].get("examples", {}).get(mode, [])[:3]:
                parts.append(f"- `{q}` -> `{o}`")
        for b, p in (ev.get("examples") or [])[:2]:
            parts.append(f"- boxes: `{b}`; phrases: `{p}`")
        parts += ["", f"`load_lvlm` load time in the evaluation: {metrics.get('load_seconds')} s."]
    parts += [
        "",
        "## Prompts",
        "- direct: `Is there evidence of {finding} in the image? Answer directly with yes or no without any explanation.`",
        "- step-by-step: `Is there evidence of {finding} in the image? Think step by step and answer with yes or no.`",
        f"- boxes: `Is there evidence of {{finding}} in the image? {EVIDENCE_REQUESTS['boxes']}` (canvas pixels)",
        f"- phrases: `Is there evidence of {{finding}} in the image? {EVIDENCE_REQUESTS['phrases']}`",
        "",
        "## Reproduce",
        "```",
        "medfocus train-demo --out " + _shipped_name(out)
        + (f" --preset {preset}" if preset else " (with the configuration in medfocus.json: it matches no --preset)")
        + f" --seed {cfg.seed} --steps {cfg.steps} --threads {cfg.num_threads}",
        "```",
        "(`--out` is required: the shipped folders `src/medfocus/lvlm/demo_model` and `src/medfocus/lvlm/demo_shortcut_model`, "
        "the ones `load_lvlm(\"demo\")` and `load_lvlm(\"demo-shortcut\")` load, are regenerated only when named on purpose). Deterministic under the seed for a given machine and thread count (CPU "
        "float32). The weights are tied to the synthetic renderer they were trained on: if `medfocus.datasets.synthetic` "
        "changes how images look, retrain.",
        "",
    ]
    return "\n".join(parts)
