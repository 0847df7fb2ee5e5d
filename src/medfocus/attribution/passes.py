"""The two kinds of model passes attribution methods share when they run on the same sample.

* **Forward pass** (:func:`run_forward_pass`): one teacher-forced forward on the *unperturbed* image, with
  whatever the methods reading it declared in their :class:`ForwardNeeds`: eager attention weights of every
  layer (attention head / rollout / relevance), the per-layer residual and update norms (the relevance
  rule), and one backward (plus one for the final answer token) to the image-token activations of a layer
  (Grad-CAM, Grad-CAM++) and/or to the attention weights (gradient-weighted attention). Needs merge with
  :func:`merge_needs`, so six methods read one forward and one backward.
* **Score plans** (:func:`run_score_plans`): perturbation methods (occlusion, RISE, MedFocus' intervention)
  describe their image variants as a :class:`ScorePlan` (``n`` rows made on demand + what to do with their
  answer log-probs); the plans' rows go through one queue, each plan in near-equal full batches.

A method run alone goes through exactly the same code with only its own needs / plan, and every forward
pass runs the same way (eager attention, autograd recording) whatever it serves, so a method's map in a
suite is the map it gives alone, bit for bit on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medfocus.attribution._common import final_token_index, forward_logprobs, layer_hidden_hook, score
from medfocus.errors import ConfigError, ModelError


def resolve_grad_layer(adapter: Any, layer: Any, *, method: str = "gradcam") -> tuple[torch.nn.Module, bool, str]:
    """``(module, pre_hook?, description)`` of a Grad-CAM layer spec: ``"input"`` (the LM's input
    embeddings, a pre-hook on decoder layer 0), ``"middle"`` or an int decoder-layer index (its output),
    negative from the end.

    The last decoder layer is refused, whichever index names it (``-1`` or ``n - 1``): in a causal
    decoder its output at position ``i`` feeds only the logits at ``i`` (final norm and LM head act per
    position), and the answer is read at positions after the image, so the gradient of the answer's
    log-probability w.r.t. that output at the image tokens is exactly zero and every map would be empty
    (asserted in ``tests/test_attribution.py``).

    Args:
        method: the method's name, for the error message (``gradcam`` / ``gradcampp``).
    Raises:
        ConfigError: an unknown spec, an index out of range or the last layer, naming the method, the
            parameter, the value and the model's number of decoder layers.
    """
    layers = adapter.decoder_layers
    n = len(layers)
    if layer == "input":
        return layers[0], True, "lm_input_embeddings"
    valid = f"valid: 'input', 'middle', 0..{n - 2} or -{n}..-2" if n > 1 else "valid: 'input'"
    if layer == "middle":
        k = (n - 1) // 2  # never the last layer (its image-position gradient is zero) for n >= 2
    else:
        try:
            k = int(layer)
        except (TypeError, ValueError):
            raise ConfigError(f"method {method!r}: parameter 'layer' must be 'input', 'middle' or an int decoder-layer "
                              f"index, got {layer!r}") from None
    if not -n <= k < n:
        raise ConfigError(f"method {method!r}: parameter 'layer' = {k} is out of range for model "
                          f"{getattr(adapter, 'name', '?')!r} with {n} decoder layers ({valid})")
    if k % n == n - 1:
        raise ConfigError(f"method {method!r}: parameter 'layer' = {layer!r} is the last of the {n} decoder layers of model "
                          f"{getattr(adapter, 'name', '?')!r}, whose output at the image tokens reaches no answer position: its "
                          f"gradient is exactly zero and every map would be empty ({valid})")
    k %= n
    return layers[k], False, f"decoder_layer_{k}_output"


@dataclass(frozen=True)
class ForwardNeeds:
    """What a method reads from the forward pass on the unperturbed image.

    Attributes:
        attentions: eager attention weights of every decoder layer.
        residual_norms: per layer, ``|h_i|`` and ``|u_i|`` (the layer's input and its update) per position.
        grad_layer: a :func:`resolve_grad_layer` spec: activations and gradients at the image tokens there.
        attention_grad_layers: decoder layers whose attention weights need gradients.
        final_token: also the gradients of the final yes/no token alone (a second backward; only when the
            answer has more than one token).
    """

    attentions: bool = False
    residual_norms: bool = False
    grad_layer: Any = None
    attention_grad_layers: tuple[int, ...] = ()
    final_token: bool = False

    @property
    def backward(self) -> bool:
        return self.grad_layer is not None or bool(self.attention_grad_layers)

    def passes(self, n_answer_tokens: int) -> tuple[int, int]:
        """``(n_forward, n_backward)`` a method with these needs costs alone."""
        if not self.backward:
            return 1, 0
        return 1, 1 + int(self.final_token and n_answer_tokens > 1)


def merge_needs(adapter: Any, needs: Sequence[ForwardNeeds]) -> ForwardNeeds:
    """One :class:`ForwardNeeds` serving all of ``needs``.

    Raises:
        ValueError: they cannot share one pass: two different gradient layers, or a gradient layer other
            than the LM input together with attention gradients (its activations are swapped for a
            detached leaf, which would cut the attention weights below it off the graph).
    """
    out = ForwardNeeds()
    for n in needs:
        gl = out.grad_layer
        if n.grad_layer is not None:
            if gl is not None and resolve_grad_layer(adapter, gl)[2] != resolve_grad_layer(adapter, n.grad_layer)[2]:
                raise ValueError(f"gradient layers {gl!r} and {n.grad_layer!r} differ")
            gl = n.grad_layer
        out = ForwardNeeds(attentions=out.attentions or n.attentions, residual_norms=out.residual_norms or n.residual_norms,
                           grad_layer=gl, attention_grad_layers=tuple(sorted(set(out.attention_grad_layers) | set(n.attention_grad_layers))),
                           final_token=out.final_token or n.final_token)
    if out.attention_grad_layers and out.grad_layer is not None and resolve_grad_layer(adapter, out.grad_layer)[2] != "lm_input_embeddings":
        raise ValueError(f"gradient layer {out.grad_layer!r} would cut the attention weights below it off the graph")
    return out


@dataclass
class ForwardPass:
    """What :func:`run_forward_pass` measured (all detached).

    Attributes:
        logp: ``(1, T)`` float32 answer-token log-probs.
        attentions: per decoder layer ``(1, H, S, S)`` attention weights (``None`` unless requested).
        norms: layer -> ``((S,), (S,))`` float32 norms of the layer input and of its update.
        image_feats, image_grads, image_grads_final: ``(N_img, D)`` float32 activations / gradients of the
            whole answer / of the final token at the image tokens of ``grad_layer``.
        grad_layer: description of that layer.
        attention_grads, attention_grads_final: layer -> ``(1, H, S, S)`` gradient of the whole answer's /
            the final token's log-prob w.r.t. the layer's attention weights.
        n_forward, n_backward: passes actually run.
    """

    logp: torch.Tensor
    attentions: Sequence[torch.Tensor] | None = None
    norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    image_feats: torch.Tensor | None = None
    image_grads: torch.Tensor | None = None
    image_grads_final: torch.Tensor | None = None
    grad_layer: str | None = None
    attention_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_grads_final: dict[int, torch.Tensor] | None = None
    n_forward: int = 1
    n_backward: int = 0


def _attentions(out: Any) -> Sequence[torch.Tensor]:
    att = getattr(out, "attentions", None)
    if not att or any(a is None for a in att):
        raise ModelError("attention: the model returned no attention weights (eager attention required)")
    return att


def run_forward_pass(adapter: Any, chat: Any, needs: ForwardNeeds) -> ForwardPass:
    """One teacher-forced forward on ``chat``'s own image (batch 1) serving ``needs`` (see the module
    docstring), plus its backward(s) when gradients are needed.

    The backward starts from the sum of the answer tokens' log-probs (and, for ``final_token``, from the
    final yes/no token's). Activations entering decoder layer 0 (or the Grad-CAM layer) are swapped for a
    leaf tensor, so the backward never runs into the vision tower.

    Raises:
        ModelError: no attention weights returned, attention weights outside the autograd graph, or
            residual norms hooked on a different number of layers than attention maps returned.
    """
    # Every forward-group pass runs the same way -- eager attention returning weights, autograd recording,
    # decoder-layer 0's input swapped for a leaf -- whatever it is asked for, so a method's numbers do not
    # depend on which other methods share its pass (nor on a resumed run computing it with fewer of them).
    grad = needs.backward
    removers: list[Callable[[], None]] = []
    norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    store: dict[str, Any] = {}
    desc = None
    if needs.residual_norms:
        for i, mod in enumerate(adapter.decoder_layers):
            def hook(m, args, kwargs, output, i=i):  # type: ignore[no-untyped-def]
                h = args[0] if args else kwargs["hidden_states"]
                o = output if isinstance(output, torch.Tensor) else output[0]
                with torch.no_grad():
                    hf, of = h[0].detach().float(), o[0].detach().float()
                    norms[i] = (hf.norm(dim=-1), (of - hf).norm(dim=-1))
            removers.append(mod.register_forward_hook(hook, with_kwargs=True).remove)
    module, pre, desc = resolve_grad_layer(adapter, needs.grad_layer if needs.grad_layer is not None else "input")
    removers.append(layer_hidden_hook(module, pre=pre, store=store))
    fp = ForwardPass(logp=torch.empty(0), grad_layer=desc if needs.grad_layer is not None else None)
    try:
        with adapter.eager_attention(), torch.enable_grad():
            logp, out = forward_logprobs(adapter, chat, chat.inputs, output_attentions=True)
            att = _attentions(out)
            if grad:
                targets: list[torch.Tensor] = [store["h"]] if needs.grad_layer is not None else []
                sel = [att[k] for k in needs.attention_grad_layers] if att is not None else []
                if not all(a.requires_grad for a in sel):
                    raise ModelError("grad_weighted_attention: attention weights are not part of the autograd graph")
                targets += sel
                need_final = needs.final_token and logp.shape[1] > 1
                gs = torch.autograd.grad(logp.sum(), targets, retain_graph=need_final)
                fp.n_backward = 1
                gfs = None
                if need_final:
                    gfs = torch.autograd.grad(logp[0, final_token_index(chat)], targets)
                    fp.n_backward = 2
                off = 0
                if needs.grad_layer is not None:
                    pos = chat.image_token_positions.to(store["h"].device)
                    at_img = lambda t: t[0, pos].detach().float()  # noqa: E731
                    fp.image_feats, fp.image_grads = at_img(store["h"]), at_img(gs[0])
                    fp.image_grads_final = None if gfs is None else at_img(gfs[0])
                    off = 1
                fp.attention_grads = {k: g.detach() for k, g in zip(needs.attention_grad_layers, gs[off:])}
                if gfs is not None:
                    fp.attention_grads_final = {k: g.detach() for k, g in zip(needs.attention_grad_layers, gfs[off:])}
    finally:
        for rm in removers:
            rm()
    fp.logp = logp.detach()
    fp.attentions = [a.detach() for a in att] if needs.attentions or needs.attention_grad_layers else None
    if needs.residual_norms:
        if fp.attentions is not None and len(norms) != len(fp.attentions):
            raise ModelError(f"lrp: hooked {len(norms)} decoder layers but got {len(fp.attentions)} attention maps")
        fp.norms = norms
    return fp


# ---- perturbation rows ------------------------------------------------------------------------------
def chunk_count(n: int, batch_size: int) -> int:
    """Number of near-equal batches for ``n`` inputs at ``batch_size``: ``n // batch_size`` when the
    remainder can ride along (batches then exceed ``batch_size`` by at most 10%, at least by one),
    else ``ceil(n / batch_size)``."""
    bs = max(1, int(batch_size))
    n_floor = n // bs
    if n_floor >= 1 and n % bs and -(-n // n_floor) <= bs + max(1, bs // 10):
        return n_floor
    return max(1, -(-n // bs))


@dataclass
class ScorePlan:
    """The image variants a perturbation method needs scored, and what it does with their scores.

    Attributes:
        n: number of variants (rows).
        pixel_values: ``(i, j) -> (j - i, *layout)`` rows ``i..j-1`` in the family's pixel layout, made on
            demand (a full stack of masks at 896 pixels would be hundreds of MB).
        finish: ``(n, T) float32 CPU log-probs -> the method's result``; may run further dependent passes
            of its own (e.g. MedFocus' nested rule).
        batch_size: the method's batch size (its rows run in near-equal batches of about this size).
    """

    n: int
    pixel_values: Callable[[int, int], torch.Tensor]
    finish: Callable[[torch.Tensor], Any]
    batch_size: int


def run_score_plans(adapter: Any, chat: Any, plans: Sequence[ScorePlan]) -> list[torch.Tensor]:
    """Score the rows of every plan in one queue -> per plan ``(n, T)`` float32 CPU answer-token log-probs.

    Each plan's rows run in :func:`chunk_count` near-equal batches of its own batch size: 65 occlusion rows at
    batch 16 run as 16+16+17+16, not 16+16+16+16+1 (a lone last item costs almost a whole pass), so every
    batch is full. Rows of different plans are not mixed in one batch: a row's score would then depend on
    which other methods ran (the batch composition changes float rounding), and a resumed run computing one
    method alone would not reproduce it; with near-equal batches mixing saves no call at the paper's
    settings (65 + 64 + 16 rows at 16: 4 + 4 + 1 calls either way).
    """
    if not plans:
        return []
    sizes = [int(p.n) for p in plans]
    if any(n < 1 for n in sizes):
        raise ConfigError(f"score plans need at least one row each, got {sizes}")
    out: list[torch.Tensor] = []
    for p, n in zip(plans, sizes):
        edges = np.linspace(0, n, chunk_count(n, p.batch_size) + 1).round().astype(int)
        out.append(torch.cat([score(adapter, chat, p.pixel_values(int(a), int(b)), batch_size=int(b - a))
                              for a, b in zip(edges[:-1], edges[1:])]))
    return out
