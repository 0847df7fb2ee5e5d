"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML 2024) for the language model of every LVLM family: the registry's ``lrp``.

What is computed. The relevance of the answer (see ``target``) is propagated from the logits back to
the language model's *input embeddings* with the AttnLRP rules, in the paper's efficient
Gradient x Input form (one forward pass that builds a graph whose backward *is* the LRP rule, one
backward pass): relevance at a tensor ``x`` = ``x * dF/dx`` with the modified backward below. The map is
the relevance of each image token (summed over the embedding dimension) on the token grid, signed
(positive = evidence for the answer), brought to original pixels like every token-grid map.

The rules, identical to the authors' ``lxt`` package (``lxt.efficient``, version 2.1), which this module
reproduces rule for rule (tested for equality against ``lxt``'s own code on tiny Qwen2, Gemma 3 and Llama
language models, ``tests/test_attribution_lrp.py``):

* linear layers (projections, LM head): the epsilon rule with epsilon -> 0, i.e. the plain gradient
  (biases absorb their share of relevance, as in the paper);
* element-wise non-linearities (SiLU / GELU of the gated MLPs, stand-alone activations): the identity
  rule (eq. 9), backward ``dF/dx = f(x) / (x + 1e-10) * dF/dy`` (lxt's ``identity_rule_implicit``);
* element-wise products (the gated MLP's ``act(gate) * up``): the uniform rule (eq. 7), gradient
  halved; the attention's two matrix products ``softmax(q k^T) v``: gradient of ``q`` and ``k`` divided by
  4 and of ``v`` by 2 (lxt's ``patch_attention``), the softmax itself by its gradient (the paper's
  softmax rule in Gradient x Input form);
* RMSNorm: the identity rule on the normaliser (its ``rsqrt(mean(x^2) + eps)`` is a constant in the
  backward), for the ``weight * x`` (Qwen2 / Llama) and ``x * (1 + weight)`` (Gemma 3) forms.

Relevance is *not* exactly conserved by AttnLRP: biases absorb ``b * dF/db`` and each softmax leaks
half of ``sum(s * dF/ds) - sum(x * dF/dx)`` (its output minus its input relevance, halved by the
``q``/``k`` split). With those two terms accounted for, the relevance at the inputs equals the relevance
at the logits to rounding error (the conservation test); ``extras`` reports the totals.

Why ``lxt`` is not called at run time (a deviation of implementation, not of rules): ``lxt`` 2.1, the
current release, does not import under transformers 5 (``lxt.efficient`` imports
``transformers.modeling_attn_mask_utils``, removed in transformers 5, and ``torchvision`` for its ViT
map); its attention patch replaces transformers' ``AttentionInterface`` by a plain ``dict``, which
transformers 5 calls ``.get_interface`` on; it has no map for Qwen2.5-VL's language model
(``modeling_qwen2_5_vl``); and it patches *classes* globally and irreversibly, which would silently
change the gradients of every other gradient method (Grad-CAM, integrated gradients) in the same
process. Here the rules are applied to the *instances* of one language model, only while
:func:`attnlrp_rules` is active, and restored afterwards.

Default target layer: the language model's input embeddings (for image tokens: the projector's output
as the LM receives it), not the pixels. That is where the LM's attribution is complete for every family
with the rules above; propagating on through the vision towers (Qwen2.5-VL's windowed ViT and patch
merger, SigLIP, CLIP) would need AttnLRP rules for those modules, which this module does not implement.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from medfocus.attribution._common import (
    final_token_index,
    grid_from_tokens,
    layer_hidden_hook,
    predicting_positions,
    prepare_answer,
    to_original,
)
from medfocus.attribution.base import Attribution, Counter, Method, boolean, choice
from medfocus.errors import ConfigError, ModelError

#: Name under which the AttnLRP attention function is registered with transformers' AttentionInterface.
ATTN_IMPL = "medfocus_attnlrp"
#: lxt's stabiliser of the identity rule (``identity_rule_implicit_fn``'s epsilon).
IDENTITY_EPS = 1e-10
TARGETS = ("logprob", "logit")


# ---- the rules, as autograd functions (lxt.efficient.rules) -----------------------------------------
class _IdentityRule(torch.autograd.Function):
    """Identity rule for an element-wise non-linearity ``y = f(x)`` (AttnLRP eq. 9): the backward
    multiplies the incoming gradient by ``f(x) / (x + eps)``, so Gradient x Input passes the output's
    relevance to the input unchanged."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = fn(x)
        ctx.save_for_backward(y / (x + IDENTITY_EPS))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return None, ratio * grad


class _Uniform(torch.autograd.Function):
    """Uniform rule (AttnLRP eq. 7): identity forward, gradient divided by ``factor`` (2 for each
    factor of a product; 4 for ``q`` and ``k``, which meet in ``q k^T`` behind the ``A v`` product)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad / ctx.factor, None


def identity_rule(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with the identity rule's backward (see :class:`_IdentityRule`)."""
    return _IdentityRule.apply(fn, x)


def uniform_rule(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` with its gradient divided by ``factor`` (see :class:`_Uniform`)."""
    return _Uniform.apply(x, factor)


class _AttentionCalls:
    """Counts the attention calls that went through the AttnLRP rule (a check that none was missed)."""

    n = 0


def attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AttnLRP attention rule on the inputs of ``softmax(q k^T) v`` (lxt's ``wrap_attention_forward``):
    gradients of ``q``, ``k`` divided by 4, of ``v`` by 2. For custom attention modules'
    ``attnlrp_forward`` (see :func:`attnlrp_rules`)."""
    _AttentionCalls.n += 1
    return uniform_rule(query, 4), uniform_rule(key, 4), uniform_rule(value, 2)


# ---- module forwards with the rules (lxt.efficient.patches) ----------------------------------------
def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``: identity rule on ``act``, uniform rule on the product."""
    gate = identity_rule(self.act_fn, self.gate_proj(x))
    return self.down_proj(uniform_rule(gate * self.up_proj(x), 2))


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2 / Llama RMSNorm ``weight * x / rms(x)`` with the normaliser held constant in the backward."""
    dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).detach()
    return self.weight * (h * inv).to(dtype)


def _gemma_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma 3 RMSNorm's ``_norm`` with the normaliser held constant in the backward."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps).detach()


def _activation_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return identity_rule(type(self).forward.__get__(self), x)


def _attnlrp_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """transformers attention function: the module's own family's eager attention on the rule-wrapped
    ``q, k, v`` (dropout off). Registered as :data:`ATTN_IMPL`."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ModelError(f"AttnLRP: {type(module).__module__} has no eager_attention_forward for {type(module).__name__}")
    if kwargs.get("softcap") is not None:
        raise ModelError(f"AttnLRP: {type(module).__name__} soft-caps attention logits (tanh); no rule is implemented for it")
    kwargs["dropout"] = 0.0
    q, k, v = attention_inputs(query, key, value)
    return eager(module, q, k, v, *args, **kwargs)


def _register_attention() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    if ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPL, _attnlrp_attention)
        AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _is_activation(m: nn.Module) -> bool:
    mod = type(m).__module__
    if mod == "transformers.activations":
        return True
    return mod == "torch.nn.modules.activation" and not isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.MultiheadAttention))


#: Leaf modules on the relevance path that need no rule (linear maps: the epsilon rule is their gradient;
#: rotary embeddings compute position codes, not on the relevance path; dropout is off in eval mode).
_PLAIN_LEAVES = (nn.Linear, nn.Embedding, nn.Dropout, nn.Identity)


@contextmanager
def attnlrp_rules(language_model: nn.Module, lm_head: nn.Module | None = None) -> Iterator[None]:
    """Apply the AttnLRP rules to one language model's instances while the context is active.

    ``language_model`` maps the LM input embeddings to the final hidden states (an HF ``*TextModel`` /
    ``*Model`` of Qwen2, Qwen2.5-VL, Gemma 3, Llama, or any module whose attention modules define
    ``attnlrp_forward``). A graph built inside keeps the rules for its backward, which may run after
    the context has closed. Every module is restored on exit, so other methods see the plain model.

    Raises:
        ModelError: a leaf module on the relevance path with no known rule (named), logit or attention
            soft-capping, or a norm of an unknown form -- never a silent fallback to the plain gradient.
    """
    cfg = getattr(language_model, "config", None)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg is not None and getattr(cfg, key, None) is not None:
            raise ModelError(f"AttnLRP: {key}={getattr(cfg, key)} (tanh soft-capping) has no rule implemented here")
    if lm_head is not None and not isinstance(lm_head, nn.Linear):
        raise ModelError(f"AttnLRP: the LM head is a {type(lm_head).__name__}, expected nn.Linear")
    patched: list[tuple[nn.Module, str]] = []
    in_gated_mlp: set[int] = set()
    try:
        for m in language_model.modules():
            name = type(m).__name__
            if hasattr(m, "attnlrp_forward"):
                m.forward = m.attnlrp_forward
                patched.append((m, "forward"))
            elif _is_gated_mlp(m):
                m.forward = MethodType(_gated_mlp_forward, m)
                patched.append((m, "forward"))
                in_gated_mlp.add(id(m.act_fn))
            elif name.endswith("RMSNorm"):
                if hasattr(m, "_norm") and hasattr(m, "eps"):  # Gemma 3: _norm(x) * (1 + weight)
                    m._norm = MethodType(_gemma_norm, m)
                    patched.append((m, "_norm"))
                elif hasattr(m, "variance_epsilon") and hasattr(m, "weight"):  # Qwen2 / Llama: weight * _norm(x)
                    m.forward = MethodType(_rms_norm_forward, m)
                    patched.append((m, "forward"))
                else:
                    raise ModelError(f"AttnLRP: unknown RMSNorm form {name} (neither Gemma's _norm/eps nor variance_epsilon/weight)")
        for m in language_model.modules():
            if next(m.children(), None) is not None or id(m) in in_gated_mlp:
                continue
            name = type(m).__name__
            if any(p is m for p, _ in patched) or isinstance(m, _PLAIN_LEAVES) or name.endswith("RotaryEmbedding"):
                continue
            if _is_activation(m):
                m.forward = MethodType(_activation_forward, m)
                patched.append((m, "forward"))
                continue
            raise ModelError(f"AttnLRP: no rule for the module {name} ({type(m).__module__}) in the language model")
        prev_impl = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
        switch = cfg is not None and prev_impl is not None and not any(hasattr(m, "attnlrp_forward") for m in language_model.modules())
        if switch:
            _register_attention()
            cfg._attn_implementation = ATTN_IMPL
        try:
            yield
        finally:
            if switch:
                cfg._attn_implementation = prev_impl
    finally:
        for m, attr in patched:
            m.__dict__.pop(attr, None)


# ---- the method ------------------------------------------------------------------------------------
@dataclass
class LRPPass:
    """One AttnLRP forward: ``scores`` ``(T,)`` per-answer-token targets (in the graph), ``inputs`` the
    ``(1, S, D)`` LM input embeddings (a leaf), ``logits`` ``(T, V)`` at least float32 (in the graph), and
    ``target_relevance`` the relevance at the logits, ``sum(z * dF/dz)`` (float)."""

    scores: torch.Tensor
    inputs: torch.Tensor
    logits: torch.Tensor
    target_relevance: float


def attnlrp_forward(adapter: Any, chat: Any, target: str = "logprob") -> LRPPass:
    """Run ``adapter``'s model once on ``chat`` with the AttnLRP rules and a leaf at the LM input.

    ``target="logprob"``: the answer tokens' log-probabilities ``log p(y_t)``; Gradient x Input of the
    log-softmax puts ``z_y - sum_k p_k z_k`` on the logits (the logit against the model's expected
    logit). ``target="logit"``: the answer tokens' logits ``z_y`` (what lxt's examples explain).
    """
    if target not in TARGETS:
        raise ConfigError(f"lrp: target must be one of {TARGETS}, got {target!r}")
    lm = adapter.language_model
    store: dict[str, Any] = {}
    remove = layer_hidden_hook(adapter.decoder_layers[0], pre=True, store=store)
    calls0 = _AttentionCalls.n
    try:
        with attnlrp_rules(lm, getattr(adapter.model, "lm_head", None)), torch.enable_grad():
            pos = predicting_positions(chat)
            out = adapter.model(**chat.inputs, logits_to_keep=pos, use_cache=False)
    finally:
        remove()
    n_calls = _AttentionCalls.n - calls0
    if n_calls != len(adapter.decoder_layers):
        raise ModelError(f"AttnLRP: {n_calls} attention calls went through the rule for {len(adapter.decoder_layers)} decoder layers")
    logits = out.logits
    if logits.shape[1] != pos.numel():
        logits = logits[:, pos]
    z = logits[0].to(torch.promote_types(logits.dtype, torch.float32))  # at least float32 (bf16 models)
    ids = chat.answer_token_ids.to(z.device)
    zy = z.gather(-1, ids[:, None])[:, 0]
    with torch.no_grad():
        if target == "logit":
            rel = float(zy.sum())
        else:
            rel = float((zy - (torch.softmax(z, -1) * z).sum(-1)).sum())
    scores = zy if target == "logit" else torch.log_softmax(z, -1).gather(-1, ids[:, None])[:, 0]
    return LRPPass(scores=scores, inputs=store["h"], logits=z, target_relevance=rel)


class AttnLRP(Method):
    """AttnLRP (Achtibat et al., ICML 2024) from the answer to the LM's image-token inputs.

    Source: the paper's rules in lxt's efficient Gradient x Input form (see the module docstring),
    reproduced here and tested equal to ``lxt`` 2.1's rule code. Deviation from the MedFocus paper's
    public code: that code's "LRP" is attention rollout read from the predicting positions (our
    ``lrp_paper``); this is LRP as published by its authors. Deviation from lxt: the rules are applied
    per instance and reversibly (lxt patches classes globally), and Qwen2.5-VL's language model is
    covered (lxt has no map for it).

    Parameters: ``target`` (``"logprob"``: the answer's log-likelihood ``sum_t log p(y_t)``, as the other
    gradient methods; ``"logit"``: ``sum_t z_{y_t}``), ``final_token`` (a second backward for the final
    yes/no token of a multi-token answer). Map: signed relevance per image token (positive = for the
    answer). Passes: 1 forward, 1 backward (+1 for the final token).
    ``extras``: ``relevance_target`` (at the logits), ``relevance_inputs`` (all LM inputs),
    ``relevance_image`` (image tokens), ``grid_map``, ``layer`` (``"lm_input_embeddings"``).
    """

    name = "lrp"
    per_token_maps = False  # relevance of one target, the answer's log-likelihood (+ the final token's map)
    defaults = {"target": "logprob", "final_token": True}
    spec = {"target": choice(*TARGETS), "final_token": boolean()}
    source = ("AttnLRP (Achtibat et al., ICML 2024), lxt 2.1's rules re-applied per instance (lxt does not run under "
              "transformers 5), to the LM input embeddings; the paper's code's 'LRP' is lrp_paper")

    def _attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        chat = prepare_answer(adapter, image, question, answer, self.name, counter)
        p = attnlrp_forward(adapter, chat, self.params["target"])
        counter.n_forward += 1
        k = final_token_index(chat)
        need_final = bool(self.params["final_token"]) and chat.n_answer_tokens > 1
        (g,) = torch.autograd.grad(p.scores.sum(), p.inputs, retain_graph=need_final)
        counter.n_backward += 1
        img = chat.image_token_positions.to(p.inputs.device)
        rel = (p.inputs[0] * g[0]).sum(-1).detach().float()  # (S,) relevance per LM input position
        grid = grid_from_tokens(rel[img], chat).cpu()
        heat = to_original(adapter, chat, grid)
        extras: dict[str, Any] = {
            "layer": "lm_input_embeddings", "grid_map": grid.numpy(), "final_token_index": k,
            "relevance_target": p.target_relevance, "relevance_inputs": float(rel.sum()), "relevance_image": float(rel[img].sum()),
        }
        if need_final:
            (gf,) = torch.autograd.grad(p.scores[k], p.inputs)
            counter.n_backward += 1
            relf = (p.inputs[0] * gf[0]).sum(-1).detach().float()
            extras["final_token_heatmap"] = to_original(adapter, chat, grid_from_tokens(relf[img], chat).cpu())
        else:
            extras["final_token_heatmap"] = heat if chat.n_answer_tokens == 1 else None
        return Attribution(heatmap=heat, extras=extras)
