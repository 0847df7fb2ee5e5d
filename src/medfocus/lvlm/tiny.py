"""Tiny, randomly initialised but *genuine* LVLM folders for tests (fully offline).

``build_tiny(family, out_dir)`` writes a folder that loads with ``from_pretrained`` exactly like a real
checkpoint: ``config.json`` + ``model.safetensors`` of the real transformers architecture
(Qwen2.5-VL, Gemma 3, LLaVA-1.5), a tokenizer trained locally with ``tokenizers`` and wrapped in the
family's real tokenizer class (real special tokens and chat template), and the family's image
processor configuration. Each folder is about 1-3 MB.

Tokenizers: Qwen uses byte-level BPE (merges stored as a list of ``(left, right)`` tuples); Gemma and
LLaVA (Llama) use SentencePiece-style BPE with ``"▁"`` for spaces and ``<0xXX>`` byte fallback, as the
real ones do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medfocus.errors import ConfigError

FAMILIES = ("qwen_vl", "gemma3", "llava")

_FINDINGS = ("cardiomegaly", "pleural effusion", "nodule", "mass", "pneumothorax", "consolidation", "atelectasis",
             "lung opacity", "aortic enlargement", "pulmonary fibrosis", "infiltration", "edema")
_REGIONS = ("left lung", "right lung", "cardiac silhouette", "mediastinum", "upper mediastinum", "left clavicle",
            "right clavicle", "left hilar structures", "right hilar structures", "left costophrenic angle",
            "right costophrenic angle")


def _corpus() -> list[str]:
    """Small English/CXR corpus so the BPE learns the words our prompts and answers use."""
    from medfocus.types import SUFFIXES, question_stem

    lines: list[str] = []
    for f in _FINDINGS:
        for suffix in SUFFIXES.values():
            lines.append(question_stem(f) + suffix)
        for r in _REGIONS:
            lines.append(f"Looking at the {r}, there is evidence of {f}. Therefore, yes.")
            lines.append(f"The {r} appears normal with no {f}. Therefore, no.")
    lines += ["Yes", "No", "Yes.", "No.", "yes", "no", "The answer is yes.", "The answer is no.",
              "You are a helpful assistant.", "output the bounding boxes of the local evidence as [[x1, y1, x2, y2], ...]",
              "output short descriptions of the evidence regions as a list of phrases",
              "[[12, 34, 56, 78], [90, 12, 34, 56]]", "0123456789"]
    return lines * 3


def _train_bpe(backend: Any, vocab_size: int, special_tokens: list[str], initial_alphabet: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a BPE with ``backend``'s own normalizer and pre-tokenizer; return ``(vocab, merges)``."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = backend.normalizer
    tok.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=initial_alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL
# --------------------------------------------------------------------------------------------
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer(vocab_size: int = 600):
    from tokenizers import pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    empty = Qwen2Tokenizer()
    vocab, merges = _train_bpe(empty._tokenizer, vocab_size, QWEN_SPECIAL, pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=32768)
    from tokenizers import AddedToken

    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN_SPECIAL]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def qwen_vl_config(tok, *, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None):
    """A Qwen2.5-VL config whose special token ids match ``tok``; ``text``/``vision`` override sizes."""
    from transformers import Qwen2_5_VLConfig

    t = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
             bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
             pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=False)
    t.update(text or {})
    v = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
             temporal_patch_size=2, window_size=56, out_hidden_size=t["hidden_size"], fullatt_block_indexes=[1])
    v.update(vision or {})
    v["out_hidden_size"] = t["hidden_size"]
    return Qwen2_5_VLConfig(
        text_config=t, vision_config=v,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"), vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        bos_token_id=t["bos_token_id"], eos_token_id=t["eos_token_id"], pad_token_id=t["pad_token_id"], tie_word_embeddings=False,
    )


def _build_qwen_vl(out_dir: Path, seed: int, canvas: int) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medfocus.lvlm.families.qwen_vl import QwenVLImageProcessor

    tok = _qwen_tokenizer()
    cfg = qwen_vl_config(tok)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [cfg.text_config.eos_token_id]
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.save_pretrained(out_dir)
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=1024 * 28 * 28)
    proc = QwenVLImageProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    proc.save_pretrained(out_dir)
    _write_medfocus_json(out_dir, {"family": "qwen_vl", "canvas": canvas})


def _write_medfocus_json(out_dir: Path, d: dict[str, Any]) -> None:
    """``medfocus.json``: optional per-folder hints (family, canvas) read by :func:`medfocus.lvlm.load_lvlm`."""
    (out_dir / "medfocus.json").write_text(json.dumps(d, indent=1))


def build_tiny(family: str, out_dir: str | Path, *, seed: int = 0, canvas: int | None = None) -> Path:
    """Write a tiny random-initialised genuine model + processor folder of ``family``.

    Args:
        family: ``"qwen_vl"``, ``"gemma3"`` or ``"llava"``.
        out_dir: folder to create (parents too).
        seed: torch seed for the weights (deterministic).
        canvas: model-input canvas side in pixels (Qwen: a multiple of 28, default 112;
            Gemma 3 / LLaVA: the vision tower's ``image_size``, default 112 / 56).
    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`; load it with :func:`medfocus.lvlm.load_lvlm`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "qwen_vl":
        _build_qwen_vl(out, seed, canvas or 112)
    elif family == "gemma3":
        from medfocus.lvlm.families.gemma3 import build_tiny_gemma3

        build_tiny_gemma3(out, seed, canvas or 112)
    elif family == "llava":
        from medfocus.lvlm.families.llava import build_tiny_llava

        build_tiny_llava(out, seed, canvas or 56)
    else:
        raise ConfigError(f"build_tiny: unknown family {family!r}; expected one of {FAMILIES}")
    return out
