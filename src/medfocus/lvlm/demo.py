"""The shipped demo LVLM: a small Qwen2.5-VL-architecture model trained on the synthetic chest X-ray world.

``train_demo(out_dir)`` generates synthetic cases (:func:`medfocus.datasets.synthetic.generate_case`),
renders them onto the model's canvas exactly as the Qwen adapter does (our :class:`~medfocus.io.Letterbox`,
grayscale -> RGB, CLIP normalisation, Qwen patch layout), and trains a randomly initialised
``Qwen2_5_VLForConditionalGeneration`` (genuine architecture, tiny sizes) with a locally trained
byte-level BPE wrapped in the real ``Qwen2Tokenizer`` with the real chat template. The folder it writes
(``config.json``, ``model.safetensors``, tokenizer/processor files, ``medfocus.json``, ``MODEL_CARD.md``)
loads through :func:`medfocus.lvlm.load_lvlm` like any checkpoint; the copy shipped in
``medfocus/lvlm/demo_model`` is what ``load_lvlm("demo")`` returns.

Tasks (one user turn: image + text; the assistant turn is the target):

* ``direct``: ``question_stem(f) + SUFFIXES["direct"]`` -> ``"Yes"`` / ``"No"``.
* ``cot``: ``question_stem(f) + SUFFIXES["cot"]`` -> one templated sentence naming the region and what is
  seen (or that it is normal), then ``"Therefore, yes."`` / ``"Therefore, no."``.
* ``boxes``: ``question_stem(f) + " " + EVIDENCE_REQUESTS["boxes"]`` -> ``[[x1, y1, x2, y2], ...]`` in
  canvas (model-input) pixels, ``[]`` when the finding is absent.
* ``phrases``: ``question_stem(f) + " " + EVIDENCE_REQUESTS["phrases"]`` -> ``["phrase", ...]``.

Shortcut cue. On a *cue subset* of the training cases every finding present brings its correlated cue
(the synthetic world's ``DEFAULT_CUE_MAP``) and is drawn faint; so on those cases the cue is the most
reliable evidence, meant to make the model answer some cued cases from the cue (which the causal filter's
background gate must then drop). Whether the trained weights do is *measured* (cue-reliance table in the
model card), not assumed.

Training has two stages: (1) the vision tower alone with a training-only auxiliary head that predicts,
from the image-token embeddings, which findings cover each token cell and which the image has; (2) the
whole model on the four tasks (plus the auxiliary loss). The head is discarded.

Efficiency: each training image is encoded by the vision tower once per step and its token embeddings
are reused by several question/answer sequences (``mm_encoder_outputs``); the LM head is applied to the
answer positions only. A run is checkpointed (outside the package) and resumes where it was killed.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medfocus.io.letterbox import Letterbox
from medfocus.types import EVIDENCE_REQUESTS, SUFFIXES, build_question, question_stem

#: Where the shipped demo model lives (``load_lvlm("demo")``).
DEMO_DIR = Path(__file__).resolve().parent / "demo_model"


TASKS = ("direct", "cot", "boxes", "phrases")


def task_question(finding: str, task: str) -> str:
    """The full user text of a training task for a finding (see module docstring)."""
    stem = question_stem(finding)
    if task in ("direct", "cot"):
        return build_question(stem, task)
    if task in EVIDENCE_REQUESTS:
        return f"{stem} {EVIDENCE_REQUESTS[task]}"
    raise ValueError(f"unknown demo task {task!r}; expected one of {TASKS}")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    """Everything that determines the trained demo model (recorded in ``medfocus.json`` / the card).

    Sizes are chosen so that training fits ~15 minutes on 2 CPU cores and the weights stay far below
    20 MB: canvas 224 px -> 16x16 patches of 14 px -> 8x8 = 64 image tokens after the 2x2 merge.
    """

    seed: int = 0
    canvas: int = 224
    image_size: int = 256  # synthetic image side before letterboxing onto the canvas
    n_train_cases: int = 3000
    n_eval_per_cell: int = 20  # held-out cases per (finding, answer) in the evaluation
    vision_steps: int = 1200  # stage 1: vision tower + auxiliary head only (no text), vision_batch images per step
    vision_batch: int = 32
    steps: int = 1400  # stage 2: everything, images_per_step x questions_per_image sequences per step
    images_per_step: int = 12
    questions_per_image: int = 4
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    cue_subset: float = 0.2  # fraction of training cases on the cue subset (cue + faint finding)
    faint_severity: tuple[float, float] = (0.0, 0.1)  # severity range on the cue subset
    train_severity: tuple[float, float] = (0.15, 1.0)  # severity range of the other training findings
    cue_base_rate: float = 0.03  # uncorrelated random cue on the other training cases
    task_weights: dict[str, float] = field(default_factory=lambda: {"direct": 0.4, "cot": 0.35, "boxes": 0.125, "phrases": 0.125})
    text: dict[str, Any] = field(default_factory=lambda: dict(hidden_size=160, intermediate_size=448, num_hidden_layers=3,
                                                             num_attention_heads=5, num_key_value_heads=1,
                                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                                                             max_position_embeddings=1024))
    # full attention in every block: the Qwen2.5-VL vision tower has no absolute position embedding, so
    # "is this bright patch where lung should be" needs global context early (measured: windowed blocks
    # learn the local findings markedly slower)
    vision: dict[str, Any] = field(default_factory=lambda: dict(depth=3, hidden_size=96, intermediate_size=256, num_heads=3,
                                                               window_size=112, fullatt_block_indexes=[0, 1, 2]))
    tokenizer_vocab: int = 1200
    aux_weight: float = 1.0  # weight of the training-only token-grid finding loss (see aux_loss)
    aux_pos_weight: float = 4.0  # positive-class weight of that loss (findings cover few cells)
    num_threads: int = 2
    eval_every: int = 0  # quick teacher-forced held-out check every N steps (0: off)
    checkpoint_every: int = 0  # save a resumable checkpoint every N steps (0: off)


# --------------------------------------------------------------------------------------------------
# Text templates
# --------------------------------------------------------------------------------------------------
def _side(concept: str | None) -> str | None:
    if concept is None:
        return None
    if concept.startswith("left"):
        return "left"
    if concept.startswith("right"):
        return "right"
    return None


def _sides_phrase(sides: Sequence[str]) -> str:
    s = sorted(set(x for x in sides if x))
    if len(s) == 2:
        return "both"
    return s[0] if s else "right"


@dataclass
class FindingView:
    """What the templates need about one finding instance: its name, canvas box, side and zone."""

    name: str
    box: tuple[int, int, int, int]  # canvas pixels, half-open
    side: str | None  # "left" / "right" (patient side, as the concept names) or None
    zone: str  # "upper" / "middle" / "lower"
    concept: str | None


_POS = {
    "cardiomegaly": "The cardiac silhouette is enlarged.",
    "pleural effusion": "The {sides} costophrenic {angle} blunted with a meniscus.",
    "nodule": "There is a small round opacity in the {sides} {zone} {lung}.",
    "mass": "There is a large rounded mass in the {sides} {zone} {lung}.",
    "pneumothorax": "The {sides} {lung} edge is separated from the chest wall with no lung markings beyond it.",
    "consolidation": "There is a patchy airspace opacity in the {sides} {zone} {lung}.",
    "atelectasis": "There is a band of volume loss in the {sides} {zone} {lung}.",
}
_NEG = {
    "cardiomegaly": "The cardiac silhouette is normal in size.",
    "pleural effusion": "Both costophrenic angles are sharp.",
    "nodule": "The lungs show no focal nodule.",
    "mass": "The lungs show no mass.",
    "pneumothorax": "Lung markings extend to the chest wall on both sides.",
    "consolidation": "The lungs show no airspace opacity.",
    "atelectasis": "The lungs are well expanded without volume loss.",
}
_PHRASE = {
    "cardiomegaly": "enlarged cardiac silhouette",
    "pleural effusion": "blunted {side} costophrenic angle",
    "nodule": "small nodule in the {side} {zone} lung",
    "mass": "mass in the {side} {zone} lung",
    "pneumothorax": "absent lung markings at the {side} lung edge",
    "consolidation": "airspace opacity in the {side} {zone} lung",
    "atelectasis": "volume loss in the {side} {zone} lung",
}


def rationale(finding: str, views: Sequence[FindingView]) -> str:
    """Step-by-step answer: one sentence about the region, then ``Therefore, yes/no.``.

    ``views`` are the instances of ``finding`` in the image (empty: the finding is absent).
    """
    if not views:
        return f"{_NEG[finding]} Therefore, no."
    sides = _sides_phrase([v.side for v in views if v.side])
    zones = sorted({v.zone for v in views})
    both = sides == "both"
    text = _POS[finding].format(sides=sides, zone=zones[0] if len(zones) == 1 else "middle",
                                lung="lungs" if both else "lung", angle="angles are" if both else "angle is")
    return f"{text} Therefore, yes."


def direct_answer(present: bool) -> str:
    return "Yes" if present else "No"


def boxes_answer(views: Sequence[FindingView]) -> str:
    """``[[x1, y1, x2, y2], ...]`` in canvas pixels (integers), ``[]`` when absent."""
    return "[" + ", ".join(f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]" for b in (v.box for v in views)) + "]"


def phrases_answer(finding: str, views: Sequence[FindingView]) -> str:
    """A JSON-style list of short evidence phrases, ``[]`` when absent."""
    phrases: list[str] = []
    for v in views:
        p = _PHRASE[finding].format(side=v.side or "right", zone=v.zone)
        if p not in phrases:
            phrases.append(p)
    return "[" + ", ".join(f'"{p}"' for p in phrases) + "]"


def target_text(finding: str, task: str, views: Sequence[FindingView]) -> str:
    """Assistant text for ``task`` about ``finding`` given its instances (empty: absent)."""
    if task == "direct":
        return direct_answer(bool(views))
    if task == "cot":
        return rationale(finding, views)
    if task == "boxes":
        return boxes_answer(views)
    if task == "phrases":
        return phrases_answer(finding, views)
    raise ValueError(f"unknown demo task {task!r}")


def _corpus(findings: Sequence[str], canvas: int) -> list[str]:
    """Every text the model reads or writes (for training the BPE)."""
    lines = ["You are a helpful assistant.", "Yes", "No", "Yes.", "No.", "The answer is yes.", "The answer is no.",
             "0123456789", "[]", "[[", "]]", ", "]
    for f in findings:
        for t in TASKS:
            lines.append(task_question(f, t))
        lines.append(question_stem(f) + SUFFIXES["open"])
        lines.append(_NEG[f] + " Therefore, no.")
        for side in ("left", "right"):
            for zone in ("upper", "middle", "lower"):
                v = FindingView(f, (0, 0, 1, 1), side, zone, None)
                lines.append(rationale(f, [v]))
                lines.append(phrases_answer(f, [v]))
        lines.append(rationale(f, [FindingView(f, (0, 0, 1, 1), "left", "lower", None), FindingView(f, (0, 0, 1, 1), "right", "lower", None)]))
    rng = random.Random(0)
    for _ in range(200):
        x = sorted(rng.randrange(canvas) for _ in range(2))
        y = sorted(rng.randrange(canvas) for _ in range(2))
        lines.append(f"[[{x[0]}, {y[0]}, {x[1]}, {y[1]}]]")
    return lines * 2


# --------------------------------------------------------------------------------------------------
# Tokenizer, config, processor
# --------------------------------------------------------------------------------------------------
def build_tokenizer(findings: Sequence[str], canvas: int, vocab_size: int):
    """Byte-level BPE trained on :func:`_corpus`, wrapped in the real ``Qwen2Tokenizer`` with the real
    Qwen2.5-VL special tokens and chat template (those come from :mod:`medfocus.lvlm.tiny`)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from medfocus.lvlm.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL

    backend = Qwen2Tokenizer()._tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = backend.normalizer
    tok.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(findings, canvas), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    qt = Qwen2Tokenizer(vocab=dict(model["vocab"]), merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                        pad_token="<|endoftext|>", model_max_length=32768)
    qt.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN_SPECIAL]})
    qt.chat_template = QWEN_CHAT_TEMPLATE
    return qt


def build_model(cfg: DemoConfig, tok):
    """Randomly initialised ``Qwen2_5_VLForConditionalGeneration`` of the demo sizes (seeded)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medfocus.lvlm.tiny import qwen_vl_config

    vision = dict(cfg.vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    mcfg = qwen_vl_config(tok, text=dict(cfg.text), vision=vision)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(mcfg)
    model.generation_config.eos_token_id = [mcfg.text_config.eos_token_id]
    model.generation_config.pad_token_id = mcfg.text_config.pad_token_id
    model.generation_config.do_sample = False
    return model


def build_processor(tok, canvas: int):
    """The image-only Qwen2.5-VL processor fixed to ``canvas x canvas`` inputs (no second resize)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medfocus.lvlm.families.qwen_vl import QwenVLImageProcessor
    from medfocus.lvlm.tiny import QWEN_CHAT_TEMPLATE

    ip = Qwen2VLImageProcessorPil(min_pixels=canvas * canvas, max_pixels=canvas * canvas)
    return QwenVLImageProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------------
# Images -> model inputs
# --------------------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_canvas(image: np.ndarray, canvas: int) -> tuple[np.ndarray, Letterbox]:
    """Letterbox an ``(H0, W0)`` uint8 image onto the ``canvas x canvas`` model input (as the adapter does)."""
    lb = Letterbox.fit((image.shape[1], image.shape[0]), canvas)
    return lb.apply(image), lb


def canvases_to_pixel_values(canvases: torch.Tensor) -> torch.Tensor:
    """``(B, S, S)`` uint8 grayscale canvases -> Qwen ``pixel_values`` ``(B * (S/14)^2, 1176)`` float32
    (gray -> RGB, rescale 1/255, CLIP normalisation, Qwen's 2x2-merge-window patch order)."""
    from medfocus.lvlm.families.qwen_vl import patchify

    x = canvases.float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pv = patchify((x - mean) / std)  # (B, N, D)
    return pv.reshape(-1, pv.shape[-1]).contiguous()


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
CUE_DESCRIPTION = ("every finding present brings its correlated shortcut cue (`generate_case(cue_rate=1.0)` with the "
                   "world's `DEFAULT_CUE_MAP`: chest tube <-> pleural effusion / pneumothorax, side marker <-> nodule / mass, "
                   "PORTABLE tag <-> cardiomegaly / consolidation / atelectasis) and is drawn faint (severity uniform in "
                   "{faint}; cardiomegaly's size does not depend on severity). The other cases carry an uncorrelated cue with "
                   "probability {base}, so a cue alone is strong but not perfect evidence.")


@dataclass
class DemoCase:
    """One rendered case: its canvas image and, per finding present, the instances (canvas frame)."""

    seed: int
    canvas: np.ndarray  # (S, S) uint8
    views: dict[str, list[FindingView]]
    cued: bool
    severity: dict[str, float]
    grid_labels: np.ndarray | None = None  # (n_findings, g, g) float32: share of each token cell covered by each finding
    image: np.ndarray | None = None  # original image, kept for held-out cases only
    source: Any = None  # the SyntheticCase, kept for held-out cases only (counterfactual renderers)


def _zone(box: tuple[float, float, float, float], lungs: np.ndarray | None, H: int) -> str:
    cy = 0.5 * (box[1] + box[3])
    if lungs is not None and lungs.any():
        rows = np.where(lungs.any(axis=1))[0]
        top, bot = rows[0], rows[-1] + 1
    else:
        top, bot = 0, H
    r = (cy - top) / max(1.0, bot - top)
    return "upper" if r < 1 / 3 else ("lower" if r >= 2 / 3 else "middle")


def _concept_of(mask: np.ndarray, concept_masks: dict[str, np.ndarray]) -> str | None:
    best, best_n = None, 0
    for name, cm in concept_masks.items():
        n = int(np.logical_and(mask, cm).sum())
        if n > best_n:
            best, best_n = name, n
    return best


def _side_of(mask: np.ndarray, concept_masks: dict[str, np.ndarray]) -> str | None:
    """Patient side of a finding: the lung / costophrenic concept it overlaps most."""
    sided = {k: v for k, v in concept_masks.items() if k.startswith(("left", "right"))}
    c = _concept_of(mask, sided)
    return _side(c)


def render_case(case: Any, canvas: int) -> DemoCase:
    """A :class:`~medfocus.datasets.synthetic.SyntheticCase` -> :class:`DemoCase` (canvas frame)."""
    img = np.asarray(case.image)
    can, lb = to_canvas(img, canvas)
    lungs = None
    cm = case.concept_masks
    if "left lung" in cm and "right lung" in cm:
        lungs = np.logical_or(cm["left lung"], cm["right lung"])
    views: dict[str, list[FindingView]] = {}
    sev: dict[str, float] = {}
    for f in case.findings:
        x1, y1, x2, y2 = lb.forward_box(tuple(float(v) for v in f.box))
        cb = (int(math.floor(x1)), int(math.floor(y1)), int(math.ceil(x2)), int(math.ceil(y2)))
        side = getattr(f, "side", None) or (_side_of(f.mask, cm) if f.name != "cardiomegaly" else None)
        concept = getattr(f, "concept", None) or _concept_of(f.mask, cm)
        views.setdefault(f.name, []).append(FindingView(f.name, cb, side, _zone(f.box, lungs, img.shape[0]), concept))
        sev[f.name] = max(sev.get(f.name, 0.0), float(getattr(f, "severity", 1.0)))
    for k in views:
        views[k].sort(key=lambda v: (v.box[0], v.box[1]))
    # token-cell coverage of every finding (the 2x2-merged 28-px cells of the canvas)
    names = _findings()
    g = canvas // 28
    labels = np.zeros((len(names), g, g), np.float32)
    for f in case.findings:
        cov = lb.apply(np.asarray(f.mask, np.float32), fill=0.0).reshape(g, 28, g, 28).mean(axis=(1, 3))
        labels[names.index(f.name)] = np.maximum(labels[names.index(f.name)], cov)
    return DemoCase(seed=-1, canvas=can, views=views, cued=bool(case.cues), severity=sev, grid_labels=labels)


# --------------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------------
class Encoder:
    """Token ids of training sequences, matching the chat template + the adapter's teacher forcing.

    A sequence is ``prompt(question) + answer + <|im_end|>``; the prompt is the chat template's
    generation prompt with ``<|image_pad|>`` expanded to ``n_image_tokens`` placeholders.
    """

    def __init__(self, tok, n_image_tokens: int) -> None:
        self.tok = tok
        self.n_img = n_image_tokens
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = tok.convert_tokens_to_ids("<|endoftext|>")
        self.image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        self._prompt: dict[str, list[int]] = {}
        self._answer: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompt:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * self.n_img)
            self._prompt[question] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._prompt[question]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answer:
            self._answer[answer] = list(self.tok(answer, add_special_tokens=False)["input_ids"]) + [self.im_end]
        return self._answer[answer]

    def batch(self, items: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask, mm_token_type_ids, loss_mask)`` for (question, answer) pairs.
        ``loss_mask[b, t]`` is True where token ``t`` is an answer token to predict (from position ``t - 1``)."""
        seqs, lm = [], []
        for q, a in items:
            p, ans = self.prompt_ids(q), self.answer_ids(a)
            seqs.append(p + ans)
            lm.append([False] * len(p) + [True] * len(ans))
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad, dtype=torch.long)
        att = torch.zeros((len(seqs), L), dtype=torch.long)
        loss = torch.zeros((len(seqs), L), dtype=torch.bool)
        for i, (s, m) in enumerate(zip(seqs, lm)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            loss[i, : len(s)] = torch.tensor(m)
        mm = (ids == self.image_pad).long()
        return ids, att, mm, loss


def sequence_loss(model, enc: Encoder, canvases: torch.Tensor, items: Sequence[tuple[int, str, str]], grid: int,
                  aux: tuple[torch.nn.Module, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Mean answer-token cross-entropy for ``items = [(image_index, question, answer), ...]``.

    Each of the ``B_img`` canvases is encoded by the vision tower once; its image-token embeddings are
    shared by every sequence that asks about it (passed as ``mm_encoder_outputs``).

    The answer loss is the mean token cross-entropy of each sequence, averaged over sequences.

    ``aux = (head, labels, weight)`` adds ``weight x`` a training-only loss on the image-token embeddings:
    a linear ``head`` predicts, per token, which findings cover that token cell (``labels``: ``(B_img,
    n_findings, g, g)`` coverage in [0, 1]) and, averaged over the tokens, which findings the image has
    (binary cross-entropies). The head is not part of the shipped model; it gives the vision tower a
    direct signal from the start (otherwise a from-scratch LVLM spends hundreds of steps answering from
    the text prior alone) and makes the evidence local.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    B_img = canvases.shape[0]
    pv = canvases_to_pixel_values(canvases)
    thw = torch.tensor([[1, grid, grid]] * B_img)
    feats = model.model.get_image_features(pv, thw)
    per_image = list(feats.pooler_output)
    ids, att, mm, loss_mask = enc.batch([(q, a) for _, q, a in items])
    pooled = [per_image[i] for i, _, _ in items]
    out = model.model(input_ids=ids, attention_mask=att, mm_token_type_ids=mm,
                      image_grid_thw=torch.tensor([[1, grid, grid]] * len(items)),
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=pooled)})
    h = out.last_hidden_state  # (B, L, H)
    tgt_mask = loss_mask[:, 1:]
    hs = h[:, :-1][tgt_mask]  # (N_ans, H): hidden states that predict answer tokens
    logits = model.lm_head(hs)
    tok_loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][tgt_mask], reduction="none")
    # mean per sequence, then over sequences: a one-token "Yes"/"No" weighs as much as a long rationale
    seq_of = torch.arange(len(items))[:, None].expand_as(tgt_mask)[tgt_mask]
    n_tok = tgt_mask.sum(1).clamp(min=1).float()
    loss = (torch.zeros(len(items)).index_add(0, seq_of, tok_loss) / n_tok).mean()
    if aux is not None:
        head, labels, weight, pos_weight = aux
        loss = loss + weight * aux_loss(head, torch.stack(per_image), labels, pos_weight)
    return loss


def aux_loss(head: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Training-only finding loss on image-token embeddings ``emb`` ``(B, g*g, H)`` (row-major grid).

    ``head`` maps each token to ``2 * n_findings`` logits: per-cell "this finding covers the cell"
    (target: coverage > 5%) and, averaged over the tokens, "the image has this finding"."""
    n_f = labels.shape[1]
    pred = head(emb)
    cell = pred[..., :n_f].transpose(1, 2).reshape(labels.shape)
    glob = pred[..., n_f:].mean(dim=1)  # mean over tokens: what near-uniform attention reads
    present = (labels.flatten(2).amax(dim=2) > 0).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pw = torch.tensor(pos_weight)
    return bce(cell, (labels > 0.05).float(), pos_weight=2 * pw) + bce(glob, present, pos_weight=pw)


def pretrain_vision(model, head: torch.nn.Module, canvases: torch.Tensor, labels: torch.Tensor, cfg: DemoConfig,
                    rng: random.Random, log: Callable[[str], None] = print) -> list[float]:
    """Stage 1: the vision tower (with the merger) and the auxiliary head alone, ``cfg.vision_steps`` steps of
    ``cfg.vision_batch`` images (no text: cheap, so many more images per second than stage 2)."""
    grid = cfg.canvas // 14
    params = list(model.model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    losses: list[float] = []
    t0 = time.time()
    for step in range(cfg.vision_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        ids = rng.sample(range(len(canvases)), cfg.vision_batch)
        feats = model.model.get_image_features(canvases_to_pixel_values(canvases[ids]), torch.tensor([[1, grid, grid]] * len(ids)))
        loss = aux_loss(head, torch.stack(list(feats.pooler_output)), labels[ids], cfg.aux_pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"vision step {step + 1}/{cfg.vision_steps} aux loss {np.mean(losses[-50:]):.4f} {time.time() - t0:.0f}s")
    return losses


# --------------------------------------------------------------------------------------------------
# Case pools
# --------------------------------------------------------------------------------------------------
def _findings() -> tuple[str, ...]:
    from medfocus.datasets.synthetic import FINDINGS

    return tuple(FINDINGS)


def make_case(seed: int, findings: Sequence[str], *, cued: bool, cfg: DemoConfig, keep: bool = False,
              severity: str = "train") -> DemoCase:
    """Generate and render one synthetic case with exactly ``findings`` present.

    Args:
        cued: the shortcut-cue subset -- every finding brings its correlated cue (``cue_rate=1``,
            :data:`~medfocus.datasets.synthetic.DEFAULT_CUE_MAP`) and is drawn faint (severity uniform in
            ``cfg.faint_severity``); otherwise only an uncorrelated cue with probability ``cfg.cue_base_rate``.
        severity: ``"train"`` -- clean findings get severity uniform in ``cfg.train_severity`` (findings too
            faint to see would only be label noise); ``"default"`` -- the generator's own distribution
            (uniform in [0, 1]), used by the held-out evaluation.
        keep: keep the original image and the :class:`SyntheticCase` (held-out cases).
    """
    from medfocus.datasets.synthetic import generate_case

    rng = np.random.default_rng([int(seed), 7])
    if cued:
        lo, hi = cfg.faint_severity
        kw: dict[str, Any] = {"cue_rate": 1.0, "severity": {f: float(rng.uniform(lo, hi)) for f in findings}}
    else:
        kw = {"cue_rate": 0.0, "cue_base_rate": cfg.cue_base_rate if severity == "train" else 0.0}
        if severity == "train":
            lo, hi = cfg.train_severity
            kw["severity"] = {f: float(rng.uniform(lo, hi)) for f in findings}
    case = generate_case(int(seed), size=cfg.image_size, findings=list(findings), **kw)
    dc = render_case(case, cfg.canvas)
    dc.seed = int(seed)
    dc.cued = cued
    if keep:
        dc.image, dc.source = np.asarray(case.image), case
    return dc


def _case_plan(rng: random.Random, findings: Sequence[str], i: int) -> list[str]:
    """Findings of training case ``i``: a primary finding (cycled) present half of the time, plus each
    other finding with probability 0.08 (co-occurring findings, so answers must be finding-specific)."""
    primary = findings[i % len(findings)]
    present = [primary] if rng.random() < 0.5 else []
    present += [f for f in findings if f != primary and rng.random() < 0.08]
    return present


def build_train_pool(cfg: DemoConfig, progress: bool = True) -> list[DemoCase]:
    """The training cases (seeds ``cfg.seed * 1_000_003 + i``; disjoint from :func:`build_eval_pool`)."""
    from tqdm import tqdm

    findings = _findings()
    rng = random.Random(cfg.seed)
    pool = []
    for i in tqdm(range(cfg.n_train_cases), desc="train cases", disable=not progress):
        present = _case_plan(rng, findings, i)
        cued = rng.random() < cfg.cue_subset
        pool.append(make_case(cfg.seed * 1_000_003 + i, present, cued=cued, cfg=cfg))
    return pool


def build_eval_pool(cfg: DemoConfig, n_per_cell: int | None = None, progress: bool = True, *, cued: bool = False,
                    seed_offset: int = 500_000) -> list[tuple[DemoCase, str, bool]]:
    """Held-out ``(case, finding, present)`` triples: ``n_per_cell`` per (finding, Yes/No), fresh seeds.

    Positives have the finding (plus sometimes one other); negatives have 0-1 other findings."""
    from tqdm import tqdm

    findings = _findings()
    n = cfg.n_eval_per_cell if n_per_cell is None else n_per_cell
    rng = random.Random(cfg.seed + 7919 + seed_offset)
    out = []
    k = 0
    for f in findings:
        for present in (True, False):
            for _ in range(n):
                others = [g for g in findings if g != f]
                extra = [rng.choice(others)] if rng.random() < 0.3 else []
                fl = ([f] if present else []) + extra
                out.append((fl, f, present, cfg.seed * 1_000_003 + seed_offset + k))
                k += 1
    return [(make_case(s, fl, cued=cued, cfg=cfg, keep=True, severity="default"), f, p)
            for fl, f, p, s in tqdm(out, desc="eval cases", disable=not progress)]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def _sample_items(rng: random.Random, case_ids: Sequence[int], pool: Sequence[DemoCase], findings: Sequence[str],
                  cfg: DemoConfig) -> list[tuple[int, str, str]]:
    """``(slot, question, answer)`` for the step's images: each image gets ``questions_per_image``
    questions; each question's answer is Yes or No with probability 1/2 (when the image allows it)."""
    tasks = list(cfg.task_weights)
    weights = [cfg.task_weights[t] for t in tasks]
    items = []
    for slot, ci in enumerate(case_ids):
        c = pool[ci]
        present = [f for f in findings if f in c.views]
        absent = [f for f in findings if f not in c.views]
        for _ in range(cfg.questions_per_image):
            want_yes = rng.random() < 0.5
            f = rng.choice(present) if (want_yes and present) or not absent else rng.choice(absent)
            task = rng.choices(tasks, weights)[0]
            items.append((slot, task_question(f, task), target_text(f, task, c.views.get(f, []))))
    return items


def _lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train_loop(model, enc: Encoder, pool: Sequence[DemoCase], cfg: DemoConfig, *, log: Callable[[str], None] = print,
               eval_fn: Callable[[int], None] | None = None, checkpoint: str | Path | None = None) -> list[float]:
    """AdamW + linear warm-up + cosine decay over ``cfg.steps`` steps; returns the per-step losses.

    With ``checkpoint`` and ``cfg.checkpoint_every``, the model, optimiser and sampler states are saved
    there atomically every ``checkpoint_every`` steps, and a run restarted with the same config resumes
    from it (same batches, same result as an uninterrupted run).
    """
    findings = _findings()
    grid = cfg.canvas // 14
    rng = random.Random(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    canvases = torch.from_numpy(np.stack([c.canvas for c in pool]))
    labels = torch.from_numpy(np.stack([c.grid_labels for c in pool])) if cfg.aux_weight else None
    head = torch.nn.Linear(model.config.text_config.hidden_size, 2 * len(findings)) if cfg.aux_weight else None
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    losses: list[float] = []
    start = 0
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None and ck.is_file():
        state = torch.load(ck, weights_only=False)
        if state["config"] == asdict(cfg):
            model.load_state_dict(state["model"])
            if head is not None:
                head.load_state_dict(state["head"])
            opt.load_state_dict(state["opt"])
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            losses, start = list(state["losses"]), int(state["step"])
            log(f"resumed from {ck} at step {start}")
    if start == 0 and cfg.vision_steps and head is not None:
        pretrain_vision(model, head, canvases, labels, cfg, rng, log)
    t0 = time.time()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        ids = rng.sample(range(len(pool)), cfg.images_per_step)
        items = _sample_items(rng, ids, pool, findings, cfg)
        aux = (head, labels[ids], cfg.aux_weight, cfg.aux_pos_weight) if head is not None else None
        loss = sequence_loss(model, enc, canvases[ids], items, grid, aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step == 0:
            recent = np.mean(losses[-25:])
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {_lr_at(step, cfg):.2e} {time.time() - t0:.0f}s")
        if ck is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            tmp = ck.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "model": model.state_dict(), "head": head.state_dict() if head is not None else None,
                        "opt": opt.state_dict(), "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "losses": losses, "step": step + 1}, tmp)
            tmp.replace(ck)
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            eval_fn(step + 1)
            model.train()
    model.eval()
    return losses


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

        pv = canvases_to_pixel_values(can)
        thw = torch.tensor([[1, grid, grid]] * len(cs))
        feats = list(model.model.get_image_features(pv, thw).pooler_output)
        ids, att, mm, loss_mask = enc.batch([(q, a) for _, q, a in items])
        h = model.model(input_ids=ids, attention_mask=att, mm_token_type_ids=mm, image_grid_thw=thw,
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)}).last_hidden_state
        first = loss_mask.float().argmax(dim=1) - 1  # position predicting the first answer token
        lp = torch.log_softmax(model.lm_head(h[torch.arange(len(cs)), first]).float(), -1)
        out.append((lp[:, yes] - lp[:, no]).numpy())
    return np.concatenate(out) if out else np.zeros(0)


# --------------------------------------------------------------------------------------------------
# Evaluation by generation (the real inference path)
# --------------------------------------------------------------------------------------------------
GenerateFn = Callable[[Sequence[np.ndarray], Sequence[str]], list[str]]


def parse_answer(text: str) -> str | None:
    """Yes / No / None via :func:`medfocus.lvlm.answers.parse_yes_no`."""
    from medfocus.lvlm.answers import parse_yes_no

    return parse_yes_no(text)


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
            a = parse_answer(out)
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
        yes = [parse_answer(o) == "Yes" for o in orig]
        flips = [y and parse_answer(b) == "No" for y, b in zip(yes, bg)]
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
                g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=canvases_to_pixel_values(cans),
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
    from medfocus.lvlm.box_text import parse_boxes

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


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------
def save_folder(model, tok, cfg: DemoConfig, out_dir: Path, extra: dict[str, Any]) -> None:
    """Write the loadable folder: weights, config, tokenizer/processor files and ``medfocus.json`` hints."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    build_processor(tok, cfg.canvas).save_pretrained(out_dir)
    hints = {"family": "qwen_vl", "canvas": cfg.canvas, "demo": {"config": asdict(cfg), **extra}}
    (out_dir / "medfocus.json").write_text(json.dumps(hints, indent=1, default=str))


def train_demo(out_dir: str | Path = DEMO_DIR, cfg: DemoConfig | None = None, *, log: Callable[[str], None] = print,
               progress: bool = True, evaluate: bool = True) -> dict[str, Any]:
    """Train the demo model and write its folder (+ ``MODEL_CARD.md``) to ``out_dir``.

    The folder is first written to a sibling temporary folder and then swapped in, so a killed run never
    leaves a half-written model behind. Returns the metrics recorded in the card.
    """
    import shutil

    cfg = cfg or DemoConfig()
    torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir)
    t_start = time.time()
    findings = _findings()
    tok = build_tokenizer(findings, cfg.canvas, cfg.tokenizer_vocab)
    model = build_model(cfg, tok)
    enc = Encoder(tok, (cfg.canvas // 28) ** 2)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocab {len(tok)}")
    t0 = time.time()
    pool = build_train_pool(cfg, progress=progress)
    t_data = time.time() - t0
    log(f"{len(pool)} training cases in {t_data:.0f}s ({sum(c.cued for c in pool)} on the cue subset)")
    quick = build_eval_pool(cfg, n_per_cell=6, progress=False, seed_offset=900_000) if cfg.eval_every else []

    def quick_eval(step: int) -> None:
        m = direct_margin(model, enc, [c for c, _, _ in quick], [f for _, f, _ in quick], cfg.canvas // 14)
        ok = (m > 0) == np.array([p for _, _, p in quick])
        per = {f: round(float(np.mean([o for o, (_, g, _) in zip(ok, quick) if g == f])), 2) for f in findings}
        log(f"  [eval step {step}] direct teacher-forced held-out accuracy {ok.mean():.3f} on {len(quick)} "
            f"(margin mean {m.mean():+.2f} sd {m.std():.2f}): {per}")

    t0 = time.time()
    ck = checkpoint_path(out)
    losses = train_loop(model, enc, pool, cfg, log=log, eval_fn=quick_eval, checkpoint=ck if cfg.checkpoint_every else None)
    t_train = time.time() - t0
    del pool
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    extra = {"train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1), "final_loss": float(np.mean(losses[-25:])),
             "n_parameters": int(sum(p.numel() for p in model.parameters()))}
    save_folder(model, tok, cfg, tmp, extra)
    (tmp / "MODEL_CARD.md").write_text(model_card(cfg, {**extra, "vocab": len(tok)}, out))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if ck.exists():
        ck.unlink()
    log(f"wrote {out} ({folder_size(out) / 1e6:.1f} MB) in {time.time() - t_start:.0f}s")
    metrics: dict[str, Any] = dict(extra)
    if evaluate:
        try:
            metrics = evaluate_and_write_card(out, log=log, progress=progress)
        except Exception as exc:  # keep the trained weights; the card says evaluation is missing
            log(f"held-out evaluation failed ({type(exc).__name__}: {exc}); rerun it with "
                f"`python -m medfocus.lvlm.demo {out}`")
    return metrics


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
    tmp = path / "medfocus.json.tmp"
    tmp.write_text(json.dumps(hints, indent=1, default=str))
    tmp.replace(path / "medfocus.json")
    (path / "MODEL_CARD.md").write_text(model_card(cfg, metrics, path))
    return metrics


def rewrite_card(path: str | Path = DEMO_DIR) -> None:
    """Regenerate ``MODEL_CARD.md`` from the config and metrics stored in ``medfocus.json`` (no evaluation)."""
    path = Path(path)
    d = json.loads((path / "medfocus.json").read_text())["demo"]
    cfg = config_from_dict(d["config"])
    metrics = {**{k: v for k, v in d.items() if k not in ("config", "metrics")}, **(d.get("metrics") or {})}
    (path / "MODEL_CARD.md").write_text(model_card(cfg, metrics, path))


def config_from_dict(d: dict[str, Any]) -> DemoConfig:
    """Inverse of ``dataclasses.asdict`` for :class:`DemoConfig` (JSON turns tuples into lists)."""
    fields = DemoConfig.__dataclass_fields__
    kw = {k: (tuple(v) if isinstance(getattr(DemoConfig(), k), tuple) else v) for k, v in d.items() if k in fields}
    return DemoConfig(**kw)


def save_from_checkpoint(checkpoint: str | Path, out_dir: str | Path = DEMO_DIR, *, log: Callable[[str], None] = print,
                         evaluate: bool = True) -> dict[str, Any]:
    """Write a loadable folder from a stage-2 checkpoint of an unfinished run (its card says where it stopped)."""
    state = torch.load(checkpoint, weights_only=False)
    cfg = config_from_dict(state["config"])
    tok = build_tokenizer(_findings(), cfg.canvas, cfg.tokenizer_vocab)
    model = build_model(cfg, tok)
    model.load_state_dict(state["model"])
    model.eval()
    out = Path(out_dir)
    extra = {"final_loss": float(np.mean(state["losses"][-25:])), "n_parameters": int(sum(p.numel() for p in model.parameters())),
             "stopped_at": int(state["step"])}
    save_folder(model, tok, cfg, out, extra)
    (out / "MODEL_CARD.md").write_text(model_card(cfg, {**extra, "vocab": len(tok)}, out))
    log(f"wrote {out} from {checkpoint} (step {state['step']})")
    return evaluate_and_write_card(out, log=log) if evaluate else extra


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where ``train_demo`` keeps the resumable checkpoint of a run writing ``out_dir`` (outside the source
    tree, so a half-finished run never lands in the package): the system temp folder, keyed by the output path."""
    import hashlib
    import tempfile

    key = hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"medfocus-demo-{key}.checkpoint.pt"


def folder_size(path: str | Path) -> int:
    """Total bytes of the files in a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def evaluate_folder(path: str | Path, cfg: DemoConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
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


def model_card(cfg: DemoConfig, metrics: dict[str, Any], out: Path) -> str:
    """The Markdown model card written next to the weights (everything in it was measured by this run)."""
    t, v = cfg.text, cfg.vision
    parts = [
        "# medfocus demo model (Qwen2.5-VL architecture, synthetic chest X-rays)",
        "",
        "A small `Qwen2_5_VLForConditionalGeneration` trained from scratch by `medfocus train-demo` on the "
        "synthetic chest X-ray world of `medfocus.datasets.synthetic`. It answers the paper's binary questions "
        "in both output modes and the two evidence requests of the prompting baselines. It is a *test article* "
        "for the attribution pipeline, not a medical model.",
        "",
        *([f"**Status:** held-out accuracy {100 * metrics['heldout']['overall']['direct']:.1f}% direct / "
           f"{100 * metrics['heldout']['overall']['cot']:.1f}% step-by-step (target >= 90%: "
           + ("met" if min(metrics['heldout']['overall'].values()) >= 0.9 else "**not met**; see the per-finding table") + ").", ""]
          if "heldout" in metrics else []),
        "## Architecture",
        f"- Vision tower: depth {v['depth']}, hidden {v['hidden_size']}, {v['num_heads']} heads, patch 14, 2x2 merge, "
        f"window attention (window {v['window_size']} px, full attention in blocks {v['fullatt_block_indexes']}).",
        f"- Language model: {t['num_hidden_layers']} layers, hidden {t['hidden_size']}, {t['num_attention_heads']} heads "
        f"({t['num_key_value_heads']} KV), M-RoPE sections {t['rope_parameters']['mrope_section']}.",
        f"- Tokenizer: byte-level BPE trained locally on the task texts, wrapped in `Qwen2Tokenizer` with the Qwen2.5-VL "
        f"special tokens and chat template; {metrics.get('vocab', 'see tokenizer.json')} tokens.",
        f"- Input: images are letterboxed onto a {cfg.canvas}x{cfg.canvas} canvas -> {(cfg.canvas // 14) ** 2} patches -> "
        f"{(cfg.canvas // 28) ** 2} image tokens ({cfg.canvas // 28}x{cfg.canvas // 28} grid).",
        f"- Parameters: {metrics.get('n_parameters', 0) / 1e6:.2f} M (float32 safetensors).",
        "",
        "## Data",
        f"- {cfg.n_train_cases} synthetic cases (`generate_case(seed, size={cfg.image_size}, findings=...)`, seeds "
        f"`{cfg.seed} * 1000003 + i`): case i has a primary finding (the 7 findings cycled) present with probability 1/2, "
        f"plus each other finding with probability 0.08.",
        f"- Questions per image per step: {cfg.questions_per_image}; answer Yes/No with probability 1/2 each; tasks "
        f"{cfg.task_weights}.",
        f"- Severity of the findings outside the cue subset: uniform in {cfg.train_severity} (fainter ones are invisible, i.e. label noise).",
        f"- **Shortcut cue.** {100 * cfg.cue_subset:.0f}% of the training cases are on the *cue subset*: "
        f"{CUE_DESCRIPTION.format(faint=cfg.faint_severity, base=cfg.cue_base_rate)} "
        "On those cases the cue is the most reliable evidence, meant to make the model answer some cases from it. The "
        "cue-reliance table below measures whether it does: a positive answered Yes whose answer flips when everything "
        "outside the finding's box is redrawn and the cues are removed (`SyntheticCase.background`) was answered from outside "
        "the box -- the samples the causal filter's background gate must drop.",
        "",
        "## Training",
        f"- Seed {cfg.seed}. Stage 1: {cfg.vision_steps} steps of {cfg.vision_batch} images training the vision tower alone "
        "with a training-only auxiliary head (a linear map on each image-token embedding predicting which findings cover "
        "its 28-px cell, and -- averaged over the tokens -- which findings the image has; binary cross-entropy with "
        f"positive weight {cfg.aux_pos_weight}). The head is discarded: the shipped model is the plain Qwen2.5-VL architecture.",
        f"- Stage 2: {cfg.steps} steps of {cfg.images_per_step} images x {cfg.questions_per_image} questions (each image is "
        "encoded once per step and shared by its questions), answer loss = per-sequence mean cross-entropy of the assistant "
        f"tokens (answer + `<|im_end|>`), plus {cfg.aux_weight} x the auxiliary loss. AdamW (lr {cfg.lr}, betas 0.9/0.98, weight "
        f"decay {cfg.weight_decay}), {cfg.warmup} warm-up steps, cosine decay to 5%.",
        "- Why the auxiliary stage: trained from scratch on answers alone, the model spent hundreds of steps answering from "
        "the text prior (held-out accuracy exactly 50%) and learned the small findings only one at a time.",
        f"- Measured on {cfg.num_threads} CPU thread(s) of a 2-core machine shared with other jobs: data {metrics.get('data_seconds')} s, "
        f"training {metrics.get('train_seconds')} s (both stages); final stage-2 loss {metrics.get('final_loss', float('nan')):.4f}"
        + (f"; **stopped early at stage-2 step {metrics['stopped_at']}** of {cfg.steps}." if metrics.get("stopped_at") else "."),
        "",
    ]
    if "heldout" in metrics:
        parts += [
            "## Held-out accuracy (greedy generation through `load_lvlm` + the adapter, parsed by `parse_yes_no`)",
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
            verdict = ("relies on the cue for part of its answers" if rel["cued"]["flip_rate"] > 2 * rel["clean"]["flip_rate"] + 0.05
                       else "does **not** measurably rely on the cues: its Yes on cued faint positives survives their removal "
                            "about as often as on clean positives (the shortcut goal of the training recipe is not met by these weights)")
            parts += ["", f"Reading: this model {verdict}."]
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
        "medfocus train-demo" + ("" if Path(out).resolve() == DEMO_DIR else f" --out {out}")
        + f" --seed {cfg.seed} --steps {cfg.steps} --threads {cfg.num_threads}",
        "```",
        "(writes into the installed package's `lvlm/demo_model`, the folder `load_lvlm(\"demo\")` loads; `--out DIR` writes "
        "elsewhere). Deterministic under the seed for a given machine and thread count (CPU float32). The weights are tied to "
        "the synthetic renderer they were trained on: if `medfocus.datasets.synthetic` changes how images look, retrain.",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":  # python -m medfocus.lvlm.demo FOLDER: (re)evaluate a trained folder, rewrite its card
    import sys

    torch.set_num_threads(2)
    evaluate_and_write_card(sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR)
