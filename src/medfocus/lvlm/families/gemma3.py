"""Gemma 3 / MedGemma family.

Image tokens: the processor expands ``<start_of_image>`` into ``"\\n\\n<start_of_image>" +
mm_tokens_per_image x <image_soft_token> + "<end_of_image>\\n\\n"``; the soft-token id is
``config.image_token_id`` (the processor's own ``image_token_id`` is the begin-of-image token). The
SigLIP patches are average-pooled to a square ``sqrt(mm_tokens_per_image)`` grid, row-major.
``token_type_ids`` (1 on image tokens) must reach the model: Gemma 3 attends bidirectionally within
an image. Pixel layout: ``(1, 3, S, S)`` per example, ``S = vision_config.image_size``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from medfocus.lvlm.adapter import ChatInputs
from medfocus.lvlm.families.base import HFAdapter

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


class Gemma3Adapter(HFAdapter):
    """Adapter for ``Gemma3ForConditionalGeneration`` (Gemma 3, MedGemma, MedGemma 1.5)."""

    family = "gemma3"
    # Pan-and-scan would add crops (more pixel tensors); one canvas = one crop.
    image_kwargs = {"do_resize": False, "do_pan_and_scan": False}

    def __init__(self, model: Any, processor: Any, name: str, canvas_size: tuple[int, int] | None = None) -> None:
        s = int(model.config.vision_config.image_size)
        super().__init__(model, processor, name, canvas_size or (s, s))

    def _grid_hw(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        side = int(math.isqrt(int(self.model.config.mm_tokens_per_image)))
        return side, side

    def pixel_values_to_images(self, pixel_values: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return pixel_values[..., 0, :, :, :] if pixel_values.dim() == 5 else pixel_values[0]

    def images_to_pixel_values(self, images: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return images[:, None] if images.dim() == 4 else images[None]

    @property
    def decoder_layers(self):
        return self.model.model.language_model.layers


def build_tiny_gemma3(out_dir: Path, seed: int, canvas: int) -> None:
    """Write a tiny genuine Gemma 3 folder (SigLIP 2 layers, Gemma 3 text 2 layers, 4x4 image tokens)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from medfocus.lvlm.tiny import _train_bpe, _write_medfocus_json

    empty = GemmaTokenizer()
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    vocab, merges = _train_bpe(empty._tokenizer, 700, GEMMA3_SPECIAL + byte_tokens, [])
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>",
                                               "eot_token": "<end_of_turn>"})
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    patch = 14
    side = canvas // patch
    tokens_side = max(1, side // 2)
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIAL}
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, sliding_window=64,
                         layer_types=["sliding_attention", "full_attention"], pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
                         bos_token_id=ids["<bos>"], query_pre_attn_scalar=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=canvas,
                           patch_size=patch, vision_use_head=False),
        mm_tokens_per_image=tokens_side * tokens_side, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], pad_token_id=ids["<pad>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        bos_token_id=ids["<bos>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    # Gemma 3 zero-initialises the projection; a zero projection would make every image gradient 0.
    with torch.no_grad():
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.normal_(0.0, 1.0 / math.sqrt(w.shape[0]))
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(out_dir)
    ip = Gemma3ImageProcessorPil(size={"height": canvas, "width": canvas}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_CHAT_TEMPLATE,
                           image_seq_length=tokens_side * tokens_side)
    proc.save_pretrained(out_dir)
    _write_medfocus_json(out_dir, {"family": "gemma3", "canvas": canvas})
