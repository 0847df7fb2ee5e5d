"""Building the demo LVLM: tokenizer, randomly initialised model, processor, training-sequence encoder,
and the loadable folder it is saved as."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from medfocus.training.demo_lvlm.config import DemoLVLMConfig
from medfocus.training.demo_lvlm.tasks import _corpus

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


def build_model(cfg: DemoLVLMConfig, tok):
    """Randomly initialised ``Qwen2_5_VLForConditionalGeneration`` of the demo sizes (seeded)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medfocus.lvlm.tiny import qwen_vl_config

    vision = dict(cfg.vision, patch_size=14, spatial_merge_size=cfg.spatial_merge_size, temporal_patch_size=2)
    mcfg = qwen_vl_config(tok, text=dict(cfg.text), vision=vision)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(mcfg)
    model.generation_config.eos_token_id = [mcfg.text_config.eos_token_id]
    model.generation_config.pad_token_id = mcfg.text_config.pad_token_id
    model.generation_config.do_sample = False
    # the CPU patch embedding as the equivalent matmul (same parameters; several times faster than Conv3d
    # forward and backward there, a large share of a stage-1 step at the 16x16 grid)
    from medfocus.lvlm.families.qwen_vl import use_linear_patch_embed

    use_linear_patch_embed(model.model.visual.patch_embed)
    return model


def build_processor(tok, canvas: int, merge: int = 2):
    """The image-only Qwen2.5-VL processor fixed to ``canvas x canvas`` inputs (no second resize), with the
    model's spatial ``merge`` (it sets how many ``<|image_pad|>`` tokens a prompt gets)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medfocus.lvlm.families.qwen_vl import QwenVLImageProcessor
    from medfocus.lvlm.tiny import QWEN_CHAT_TEMPLATE

    ip = Qwen2VLImageProcessorPil(min_pixels=canvas * canvas, max_pixels=canvas * canvas, merge_size=merge)
    return QwenVLImageProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)


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


def save_folder(model, tok, cfg: DemoLVLMConfig, out_dir: Path, extra: dict[str, Any]) -> None:
    """Write the loadable folder: weights, config, tokenizer/processor files and ``medfocus.json`` hints."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    build_processor(tok, cfg.canvas, cfg.spatial_merge_size).save_pretrained(out_dir)
    hints = {"family": "qwen_vl", "canvas": cfg.canvas, "demo": {"config": asdict(cfg), **extra}}
    (out_dir / "medfocus.json").write_text(json.dumps(hints, indent=1, default=str))


def folder_size(path: str | Path) -> int:
    """Total bytes of the files in a folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
