"""Causal concept intervention: how much does the answer depend on each anatomical concept?

For an answer ``y = (y_1 .. y_T)`` to question ``q`` about image ``x``, every *variant* ``c`` -- the
11 concept boxes and the 4 bilateral unions (:data:`medfocus.types.BILATERAL`: lungs, clavicles,
hilar structures, costophrenic angles) -- replaces the pixels inside its box(es) by a baseline
(``"zero"``: black; ``"mean"``: the image's mean) to give ``x_c``. All variants and the original
are scored in one batched teacher-forced pass (:func:`medfocus.lvlm.scoring.score_chat`), and

    delta_c = sum_t max(0, log p(y_t | x, q, y_<t) - log p(y_t | x_c, q, y_<t))

is the total log-probability the answer loses when ``c`` is hidden (token-wise drops are kept as
per-token attributions; only losses count, so a concept whose removal *helps* some tokens gets no
credit for it). The winner is ``argmax_c delta_c``.

Whole-image fallback. ``exp(-delta_c)`` is a lower bound on the fraction of the answer's
probability that survives hiding ``c`` (``p(y | x_c) / p(y | x) >= exp(-delta_c)``, since clipping
at 0 only drops gains). If even the most important concept keeps at least ``tau`` of it::

    exp(-max_c delta_c) >= tau      (tau = 0.75, i.e. max_c delta_c <= -ln 0.75 ~= 0.288 nats)

no single concept is necessary for the answer, and MedFocus answers "the whole image" (box = the
full image) instead of a concept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from medfocus.types import BILATERAL, Box, CONCEPTS

TAU = 0.75
WHOLE_IMAGE = "whole image"


def variant_names() -> list[str]:
    """The 15 intervention variants: 11 concepts then the 4 bilateral unions."""
    return list(CONCEPTS) + list(BILATERAL)


def variant_boxes(concept_boxes: Mapping[str, Box]) -> dict[str, list[Box]]:
    """Variant name -> the box(es) it hides (one for a concept, two for a bilateral union)."""
    out = {c: [tuple(concept_boxes[c])] for c in CONCEPTS}
    for u, (l, r) in BILATERAL.items():
        out[u] = [tuple(concept_boxes[l]), tuple(concept_boxes[r])]
    return out  # type: ignore[return-value]


def canvas_keep_masks(boxes_per_variant: Mapping[str, list[Box]], geometry: Any, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """``(K, canvas_h, canvas_w)`` float keep-masks: 0 inside the variant's boxes, 1 elsewhere.

    Boxes are in original-image pixels and are mapped through the chat's letterbox
    (``geometry.forward_box``); a canvas pixel is hidden when the box covers its centre
    (edges rounded to the nearest pixel edge), and every non-empty box hides at least one pixel.
    """
    H, W = canvas_hw
    keep = torch.ones((len(boxes_per_variant), H, W), dtype=torch.float32)
    for k, boxes in enumerate(boxes_per_variant.values()):
        for b in boxes:
            x1, y1, x2, y2 = geometry.forward_box(b)
            xa, ya = int(np.clip(round(x1), 0, W)), int(np.clip(round(y1), 0, H))
            xb, yb = int(np.clip(round(x2), 0, W)), int(np.clip(round(y2), 0, H))
            if x2 > x1 and y2 > y1:
                xb, yb = max(xb, min(xa + 1, W)), max(yb, min(ya + 1, H))
            keep[k, ya:yb, xa:xb] = 0.0
    return keep


@dataclass
class InterventionResult:
    """Scores of the intervention pass.

    Attributes:
        names: the ``K`` variant names (:func:`variant_names` order).
        logp_original: ``(T,)`` answer-token log-probs on the original image.
        logp_variants: ``(K, T)`` the same with each variant hidden.
        token_deltas: ``(K, T)`` ``max(0, logp_original - logp_variant)``.
        deltas: ``(K,)`` ``token_deltas.sum(1)``.
        n_forward: model inputs scored (``K + 1``).
    """

    names: list[str]
    logp_original: np.ndarray
    logp_variants: np.ndarray
    token_deltas: np.ndarray
    deltas: np.ndarray
    n_forward: int


def intervene(adapter: Any, chat: Any, concept_boxes: Mapping[str, Box], *, baseline: str = "zero",
              batch_size: int = 16) -> InterventionResult:
    """Score the original and the 15 concept-hidden variants of ``chat`` in one batched pass.

    Args:
        adapter: :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
        chat: :class:`~medfocus.lvlm.adapter.ChatInputs` prepared *with* the answer (teacher forcing).
        concept_boxes: the 11 concept boxes in original-image pixels.
        baseline: ``"zero"`` or ``"mean"`` (see :meth:`LVLMAdapter.masked_pixel_values`).
        batch_size: at most this many variants per forward pass.
    """
    from medfocus.lvlm.scoring import score_chat

    vb = variant_boxes(concept_boxes)
    cw, ch = adapter.canvas_size
    keep = canvas_keep_masks(vb, chat.geometry, (ch, cw))
    pv = adapter.masked_pixel_values(chat, keep, baseline)
    orig = chat.inputs["pixel_values"][None].to(pv.device, pv.dtype)
    logp = score_chat(adapter, chat, torch.cat([orig, pv], 0), batch_size=batch_size).float().cpu().numpy()
    lp0, lpv = logp[0], logp[1:]
    tok = np.maximum(0.0, lp0[None, :] - lpv)
    return InterventionResult(list(vb), lp0, lpv, tok, tok.sum(1), int(logp.shape[0]))


def decide(names: list[str], deltas: np.ndarray, tau: float = TAU) -> tuple[str, bool]:
    """``(winner, fallback)``: the variant with the largest delta, or :data:`WHOLE_IMAGE` with
    ``fallback=True`` when ``exp(-max delta) >= tau`` (see the module docstring)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    i = int(np.argmax(deltas))
    if math.exp(-float(deltas[i])) >= tau:
        return WHOLE_IMAGE, True
    return names[i], False
