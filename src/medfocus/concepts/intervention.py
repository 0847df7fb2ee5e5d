"""Causal concept intervention: how much does the answer depend on each anatomical concept?

For an answer ``y = (y_1 .. y_T)`` to question ``q`` about image ``x``, every *variant* ``c`` -- the
11 concept boxes and the 4 bilateral unions (:data:`medfocus.types.BILATERAL`: lungs, clavicles,
hilar structures, costophrenic angles) -- replaces the pixels of its region by a baseline
(``"zero"``: black; ``"mean"``: the image's mean) to give ``x_c``. The region is the concept's box
(``region="box"``, the paper's recipe) or its mask (``region="mask"``: the pixels where the
concept's soft mask is at least 0.5; a union hides both sides). Boxes of large neighbouring
structures overlap -- the left-lung and mediastinum boxes both contain much of an enlarged heart --
so with boxes, hiding "left lung" also hides the heart's left border and the two concepts cannot
be told apart; masks hide only the concept (``benchmarks/medfocus_concepts.md`` measures both). All variants and the original
are scored in one batched teacher-forced pass (:func:`medfocus.lvlm.scoring.score_chat`), and

    delta_c = sum_t max(0, log p(y_t | x, q, y_<t) - log p(y_t | x_c, q, y_<t))

is the total log-probability the answer loses when ``c`` is hidden (token-wise drops are kept as
per-token attributions; only losses count, so a concept whose removal *helps* some tokens gets no
credit for it).

Winner (``rule``):

* ``"argmax"`` (the paper): ``argmax_c delta_c``.
* ``"nested"``: argmax, then a causal test for nested anatomy. The mediastinum contains the cardiac
  silhouette and the lungs variant contains each lung, so when the model reads the heart, hiding
  the mediastinum costs the answer as much as hiding the heart (often a little more: it also hides
  the heart) and argmax names the container. For the current winner ``w`` and every variant ``v``
  whose hidden region lies (>= 90%) inside ``w``'s and which is itself necessary
  (``exp(-delta_v) < tau``), the *rest* ``w`` minus ``v`` is hidden alone (one more batched pass); if the
  rest is not necessary (``exp(-delta_rest) >= tau``, the fallback criterion below) then ``w``
  matters only through ``v``, and ``v`` (the one with the largest delta among such) becomes the
  winner. This repeats from ``v`` until nothing nested passes. Checks and their deltas are reported.

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
from typing import Any, Mapping, TYPE_CHECKING

import numpy as np
import torch

from medfocus.types import BILATERAL, Box, CONCEPTS

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import ChatInputs, LVLMAdapter

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


REGIONS = ("box", "mask")
#: A pixel belongs to a concept's mask region when its soft mask is at least this.
MASK_THRESHOLD = 0.5


def variant_masks(soft_masks: Mapping[str, np.ndarray], threshold: float = MASK_THRESHOLD) -> dict[str, np.ndarray]:
    """Variant name -> ``(H0, W0)`` bool region hidden with ``region="mask"`` (a union: both sides)."""
    out = {c: np.asarray(soft_masks[c]) >= threshold for c in CONCEPTS}
    for u, (l, r) in BILATERAL.items():
        out[u] = out[l] | out[r]
    return out


def canvas_keep_from_masks(masks_per_variant: Mapping[str, np.ndarray], geometry: Any, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """``(K, canvas_h, canvas_w)`` float keep-masks: 0 where the variant's mask (original pixels,
    letterboxed like the image) covers at least half of a canvas pixel, 1 elsewhere."""
    H, W = canvas_hw
    keep = torch.ones((len(masks_per_variant), H, W), dtype=torch.float32)
    for k, m in enumerate(masks_per_variant.values()):
        hidden = geometry.apply(np.asarray(m, np.float32), fill=0.0) >= 0.5
        if hidden.shape != (H, W):
            raise ValueError(f"letterboxed mask has shape {hidden.shape}, expected the canvas {(H, W)}")
        keep[k][torch.from_numpy(hidden)] = 0.0
    return keep


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
        keep: ``(K, canvas_h, canvas_w)`` the keep masks used (1 kept, 0 hidden).
    """

    names: list[str]
    logp_original: np.ndarray
    logp_variants: np.ndarray
    token_deltas: np.ndarray
    deltas: np.ndarray
    n_forward: int
    keep: torch.Tensor | None = None


def intervention_keep(adapter: Any, chat: Any, concept_boxes: Mapping[str, Box], *, region: str = "box",
                      soft_masks: Mapping[str, np.ndarray] | None = None) -> tuple[list[str], torch.Tensor]:
    """``(names, keep)``: the 15 variant names and their ``(K, canvas_h, canvas_w)`` keep masks (1 kept,
    0 hidden) for :func:`intervene` (see there for ``region`` and ``soft_masks``)."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    vb = variant_boxes(concept_boxes)
    cw, ch = adapter.canvas_size
    keep = canvas_keep_masks(vb, chat.geometry, (ch, cw))
    if region == "mask":
        if soft_masks is None:
            raise ValueError("region='mask' needs the concepts' soft_masks")
        vm = variant_masks(soft_masks)
        km = canvas_keep_from_masks(vm, chat.geometry, (ch, cw))
        # A concept lost by the transfer/refinement (empty mask) still gets hidden: by its box.
        use_mask = torch.tensor([bool((km[k] < 1).any()) for k in range(len(vm))])
        keep = torch.where(use_mask[:, None, None], km, keep)
    return list(vb), keep


def intervention_rows(adapter: Any, chat: Any, keep: torch.Tensor, baseline: str = "zero") -> torch.Tensor:
    """``(K + 1, *layout)`` model inputs: the original image (row 0, ``chat``'s own pixel values) and the
    ``K`` variants hiding ``keep == 0`` with ``baseline``."""
    pv = adapter.masked_pixel_values(chat, keep, baseline)
    orig = chat.inputs["pixel_values"][None].to(pv.device, pv.dtype)
    return torch.cat([orig, pv], 0)


def intervention_result(names: list[str], logp: np.ndarray, keep: torch.Tensor | None = None) -> InterventionResult:
    """:class:`InterventionResult` from the ``(K + 1, T)`` log-probs of :func:`intervention_rows`' rows."""
    logp = np.asarray(logp, dtype=np.float32)
    lp0, lpv = logp[0], logp[1:]
    tok = np.maximum(0.0, lp0[None, :] - lpv)
    return InterventionResult(list(names), lp0, lpv, tok, tok.sum(1), int(logp.shape[0]), keep)


def intervene(adapter: Any, chat: Any, concept_boxes: Mapping[str, Box], *, baseline: str = "zero",
              batch_size: int = 16, region: str = "box", soft_masks: Mapping[str, np.ndarray] | None = None) -> InterventionResult:
    """Score the original and the 15 concept-hidden variants of ``chat`` in one batched pass.

    Args:
        adapter: :class:`~medfocus.lvlm.adapter.LVLMAdapter`.
        chat: :class:`~medfocus.lvlm.adapter.ChatInputs` prepared *with* the answer (teacher forcing).
        concept_boxes: the 11 concept boxes in original-image pixels.
        baseline: ``"zero"`` or ``"mean"`` (see :meth:`LVLMAdapter.masked_pixel_values`).
        batch_size: at most this many variants per forward pass.
        region: ``"box"`` (hide each concept's box) or ``"mask"`` (hide ``soft_mask >= 0.5``; a
            concept whose mask is empty hides its box instead).
        soft_masks: concept -> ``(H0, W0)`` soft mask in ``[0, 1]`` (required for ``region="mask"``).
    """
    from medfocus.lvlm.scoring import score_chat

    names, keep = intervention_keep(adapter, chat, concept_boxes, region=region, soft_masks=soft_masks)
    rows = intervention_rows(adapter, chat, keep, baseline)
    logp = score_chat(adapter, chat, rows, batch_size=batch_size).float().cpu().numpy()
    return intervention_result(names, logp, keep)


RULES = ("argmax", "nested")
#: A variant is nested in another when at least this share of its hidden canvas pixels is hidden by the other.
CONTAINMENT = 0.9


def decide(names: list[str], deltas: np.ndarray, tau: float = TAU) -> tuple[str, bool]:
    """``(winner, fallback)``: the variant with the largest delta, or :data:`WHOLE_IMAGE` with
    ``fallback=True`` when ``exp(-max delta) >= tau`` (see the module docstring)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    i = int(np.argmax(deltas))
    if math.exp(-float(deltas[i])) >= tau:
        return WHOLE_IMAGE, True
    return names[i], False


@dataclass
class NestedCheck:
    """One test of the ``"nested"`` rule: hiding ``container`` except ``inner`` cost ``delta_rest`` nats."""

    container: str
    inner: str
    delta_rest: float
    accepted: bool


def nested_winner(adapter: LVLMAdapter, chat: ChatInputs, iv: InterventionResult, winner: str, *, tau: float = TAU,
                  baseline: str = "zero", batch_size: int = 16, containment: float = CONTAINMENT
                  ) -> tuple[str, list[NestedCheck], int]:
    """Apply the ``"nested"`` rule (module docstring) from ``winner`` (the argmax of ``iv``).

    Args:
        adapter, chat: as for :func:`intervene` (the same chat).
        iv: the :func:`intervene` result (needs its ``keep`` masks).
        winner: the argmax variant (not the whole-image fallback).
        tau: the fallback threshold, reused as "not necessary" for the rest of a container.
        containment: share of a variant's hidden pixels that must lie in the container.
    Returns:
        ``(winner, checks, n_forward)``: the final winner, every check made, extra inputs scored.
    """
    from medfocus.lvlm.scoring import score_chat

    if iv.keep is None:
        raise ValueError("nested_winner needs the keep masks of the intervention")
    thr = -math.log(tau)  # delta above which a variant is necessary
    hidden = iv.keep < 0.5  # (K, H, W)
    area = hidden.flatten(1).sum(1).clamp_min(1)
    idx = {n: k for k, n in enumerate(iv.names)}
    checks: list[NestedCheck] = []
    n_forward = 0
    current, seen = winner, {winner}
    while True:
        w = idx[current]
        inside = (hidden & hidden[w]).flatten(1).sum(1) / area
        cands = [k for k in range(len(iv.names)) if iv.names[k] not in seen and k != w and iv.deltas[k] > thr
                 and float(inside[k]) >= containment and int(hidden[k].sum()) < int(hidden[w].sum())]
        if not cands:
            return current, checks, n_forward
        # hide the container except the candidate, for every candidate, in one pass
        keep = torch.stack([1.0 - (hidden[w] & ~hidden[k]).float() for k in cands])
        pv = adapter.masked_pixel_values(chat, keep, baseline)
        lp = score_chat(adapter, chat, pv, batch_size=batch_size).float().cpu().numpy()
        n_forward += len(cands)
        rest = np.maximum(0.0, iv.logp_original[None, :] - lp).sum(1)
        ok = []
        for k, r in zip(cands, rest):
            accepted = math.exp(-float(r)) >= tau
            checks.append(NestedCheck(iv.names[w], iv.names[k], float(r), accepted))
            seen.add(iv.names[k])
            if accepted:
                ok.append(k)
        if not ok:
            return current, checks, n_forward
        current = iv.names[max(ok, key=lambda k: float(iv.deltas[k]))]
        seen.add(current)
