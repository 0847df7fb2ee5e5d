"""Tiny genuine LLaVA-1.5 folder (CLIP + Llama, SentencePiece-style BPE with byte fallback in the real
``LlamaTokenizer``, llava-hf's conversation template)."""

from __future__ import annotations

from pathlib import Path

import torch

from medfocus.lvlm.tiny.common import _train_bpe, _write_medfocus_json

#: llava-hf's LLaVA-1.5 conversation format ("USER: <image>\n{question} ASSISTANT: {answer}").
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + eos_token }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]


def build_tiny_llava(out_dir: Path, seed: int, canvas: int) -> None:
    """Write a tiny genuine LLaVA-1.5 folder (CLIP 2 layers, Llama 2 layers, (canvas/14)^2 image tokens)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llama.tokenization_llama import LlamaTokenizer
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    empty = LlamaTokenizer()
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    vocab, merges = _train_bpe(empty._tokenizer, 700, LLAVA_SPECIAL + byte_tokens, [])
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False,
                         unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
    patch = 14
    n_img = (canvas // patch) ** 2
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=ids["<pad>"],
                         bos_token_id=ids["<s>"], eos_token_id=ids["</s>"]),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=canvas, patch_size=patch, projection_dim=32),
        image_token_index=ids["<image>"], image_seq_length=n_img, vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=ids["<pad>"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(out_dir)
    ip = LlavaImageProcessorPil(size={"shortest_edge": canvas}, crop_size={"height": canvas, "width": canvas},
                                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1)
    proc.save_pretrained(out_dir)
    _write_medfocus_json(out_dir, {"family": "llava", "canvas": canvas})
