"""Tiny genuine Qwen2.5-VL folder: byte-level BPE in the real ``Qwen2Tokenizer``, the real special tokens and
chat template, a ``Qwen2_5_VLForConditionalGeneration`` of tiny sizes. The demo model's trainer
(:mod:`medfocus.training.demo_lvlm`) reuses the template, the special tokens and :func:`qwen_vl_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medfocus.lvlm.tiny.common import _train_bpe, _write_medfocus_json

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


def build_tiny_qwen_vl(out_dir: Path, seed: int, canvas: int) -> None:
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
