"""Teacher-forced answer scoring: the hot path of every perturbation method.

The LM head is applied only to the hidden states that predict answer tokens (positions
``start-1 .. end-2`` predict tokens ``start .. end-1``), so a batch never materialises
``(B, S, vocab)`` logits: for Qwen2.5-VL-3B (vocab 151k) that saves ``S/T`` times the largest
activation of the pass.

Scored span: by default exactly the answer's own tokens -- the end-of-turn token and the trailing
newline of the chat template are excluded (they say nothing about the image); ``include_eot=True``
adds them (e.g. to score "the model stops here").
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from medfocus.errors import ModelError
from medfocus.lvlm.adapter import ChatInputs, LVLMAdapter


def _answer_logprobs_from_hidden(adapter: LVLMAdapter, hidden: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
    """``(B, S, D)`` last hidden states -> ``(B, T)`` float32 log-probs of the answer tokens."""
    start, end = chat.answer_span  # type: ignore[misc]
    h = hidden[:, start - 1 : end - 1]  # (B, T, D): states that predict the answer tokens
    logits = adapter.logits_from_hidden(h).float()  # type: ignore[attr-defined]
    logp = torch.log_softmax(logits, dim=-1)
    tgt = chat.answer_token_ids.to(logp.device)  # type: ignore[union-attr]
    return logp.gather(-1, tgt[None, :, None].expand(logp.shape[0], -1, 1))[..., 0]


def score_chat(adapter: LVLMAdapter, chat: ChatInputs, pixel_values: torch.Tensor | None = None, *, batch_size: int = 16,
               grad: bool = False, **forward_kwargs: Any) -> torch.Tensor:
    """Per-token log-probabilities of ``chat``'s answer under teacher forcing, for image variants.

    Args:
        adapter: a family adapter.
        chat: prepared with an answer (:meth:`LVLMAdapter.prepare` ``(image, question, answer)``).
        pixel_values: ``(B, *layout)`` image variants in the family's preprocessed layout (e.g. from
            :meth:`LVLMAdapter.masked_pixel_values`); ``None`` scores the chat's own image (``B = 1``).
        batch_size: forward passes take at most this many variants.
        grad: keep the autograd graph (no ``inference_mode``); then ``batch_size`` must cover ``B``.
        forward_kwargs: passed to the base model's forward (e.g. ``inputs_embeds`` hooks are better).
    Returns:
        ``(B, T)`` float32 log-probs on the adapter's device (``T = chat.n_answer_tokens``).
    """
    if chat.answer_span is None or chat.answer_token_ids is None:
        raise ModelError("score_chat needs a chat prepared with an answer (teacher forcing)")
    pv = chat.inputs["pixel_values"][None] if pixel_values is None else pixel_values
    B = int(pv.shape[0])
    outs: list[torch.Tensor] = []
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx:
        for i in range(0, B, batch_size):
            inputs = adapter.batch_inputs(chat, pv[i : i + batch_size])
            hidden = adapter.hidden_states(inputs, **forward_kwargs)[0]  # type: ignore[attr-defined]
            outs.append(_answer_logprobs_from_hidden(adapter, hidden, chat))
    return torch.cat(outs, 0)


def answer_logprobs(adapter: LVLMAdapter, images_or_pixel_values: np.ndarray | Sequence[np.ndarray] | torch.Tensor,
                    question: str, answer: str, *, batch_size: int = 16, include_eot: bool = False,
                    chat: ChatInputs | None = None) -> torch.Tensor:
    """``(N, T)`` teacher-forced log-probs of ``answer`` for ``N`` images of one question.

    Args:
        images_or_pixel_values: one ``(H0, W0)`` uint8 image, a list of them (each prepared through the
            processor; they may differ in size), or a ``(N, *layout)`` tensor of preprocessed variants
            (then ``chat`` -- or the first image's preparation -- supplies the text).
        question: full question (suffix included).
        answer: answer text (e.g. ``"Yes"``).
        include_eot: also score the end-of-turn token and trailing newline.
        chat: a prepared chat to reuse with a pixel tensor.
    Returns:
        ``(N, T)`` float32 on the adapter's device.
    """
    x = images_or_pixel_values
    if isinstance(x, torch.Tensor):
        if chat is None:
            raise ModelError("answer_logprobs: pass chat= (a prepared ChatInputs) along with a pixel_values tensor")
        return score_chat(adapter, chat, x, batch_size=batch_size)
    images = [x] if isinstance(x, np.ndarray) and x.ndim == 2 else list(x)
    chats = [adapter.prepare(im, question, answer, include_eot=include_eot) for im in images]
    # Images of one size share the text tensors, so they batch as pixel variants of the first chat.
    same = all(c.inputs["pixel_values"].shape == chats[0].inputs["pixel_values"].shape
               and torch.equal(c.inputs["input_ids"], chats[0].inputs["input_ids"]) for c in chats)
    if same:
        pv = torch.stack([c.inputs["pixel_values"] for c in chats])
        return score_chat(adapter, chats[0], pv, batch_size=batch_size)
    return torch.cat([score_chat(adapter, c, batch_size=batch_size) for c in chats], 0)
