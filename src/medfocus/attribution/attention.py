"""Attention baselines: raw attention, attention rollout (and the paper's "LRP", which its public code
computes as rollout: ``lrp_paper``), the project's residual-weighted attention flow
(``attention_flow_residual``), and gradient-weighted attention (Chefer et al.). AttnLRP, the registry's
``lrp``, is in :mod:`medfocus.attribution.lrp`.

All read the language model's self-attention probabilities (eager attention, one forward pass).
Queries are, by default (``queries="predicting"``), the positions that *predict* the answer tokens
(position ``t-1`` for answer token ``t``: its output is what produces ``y_t``); ``queries="answer"``
uses the answer tokens' own positions instead (what some published code does). Keys are restricted to the image-token positions at the end,
which are in row-major token-grid order, so each method gives a ``(gh, gw)`` map per answer token.
Every method computes only the ``T`` query rows it needs (``T x S`` instead of ``S x S`` products).
"""

from __future__ import annotations

from typing import Any, Sequence, TYPE_CHECKING

import numpy as np
import torch

from medfocus.attribution._common import final_token_index, finish_token_maps, grid_from_tokens, predicting_positions, to_original
from medfocus.attribution.base import Attribution, ForwardMethod, boolean, choice, either, int_list, integer
from medfocus.attribution.passes import ForwardNeeds, ForwardPass
from medfocus.errors import ConfigError, ModelError

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import ChatInputs


def _layer_indices(spec: Any, n: int, name: str, param: str = "layers", model: str | None = None) -> list[int]:
    """Decoder-layer indices of a ``layer``/``layers`` setting (``"all"``, an int or a list; negative from
    the end) for a model with ``n`` decoder layers, sorted and deduplicated.

    Raises:
        ConfigError: an index out of range, naming the method, the setting, the value and the valid range.
    """
    if spec == "all":
        return list(range(n))
    idx = [int(spec)] if isinstance(spec, (int, np.integer)) else [int(s) for s in spec]
    for k in idx:
        if not -n <= k < n:
            raise ConfigError(f"method {name!r}: parameter {param!r} = {spec!r}: layer {k} is out of range for "
                              f"{f'model {model!r}' if model else 'the model'} with {n} decoder layers "
                              f"(valid: 0..{n - 1} or -{n}..-1)")
    return sorted({k % n for k in idx})


def attention_heads(adapter: Any) -> int | None:
    """The number of attention heads of the language model's decoder layers (what an attention map's
    ``H`` is), read from the first layer's attention module (its config, or ``num_heads`` / ``n_heads``);
    ``None`` when the module does not say."""
    attn = getattr(adapter.decoder_layers[0], "self_attn", None)
    for v in (getattr(getattr(attn, "config", None), "num_attention_heads", None), getattr(attn, "num_heads", None),
              getattr(attn, "n_heads", None)):
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


class _LayersMethod(ForwardMethod):
    """A forward method whose ``layers`` setting names decoder layers of the model."""

    per_token_maps = True  # one relevance row per answer query (:func:`_finish`)

    def check_params(self, adapter: Any) -> None:
        """Every index of ``layers`` is a decoder layer of this model."""
        _layer_indices(self.params["layers"], len(adapter.decoder_layers), self.name, "layers", getattr(adapter, "name", None))


def _finish(adapter: Any, chat: Any, rows: torch.Tensor, extras: dict[str, Any]) -> Attribution:
    """``(T, S)`` relevance rows (one per answer token) -> Attribution with per-token maps; the
    heatmap is the mean over answer tokens."""
    img = chat.image_token_positions.to(rows.device)
    tok_grid = torch.stack([grid_from_tokens(r[img].float(), chat) for r in rows])  # (T, gh, gw)
    grid = tok_grid.mean(0)
    extras["grid_map"] = grid.cpu().numpy()
    tok = finish_token_maps(adapter, chat, tok_grid.cpu(), extras)
    return Attribution(heatmap=to_original(adapter, chat, grid.cpu()), token_heatmaps=tok, extras=extras)


def _queries(chat: ChatInputs, mode: str) -> torch.Tensor:
    if mode == "predicting":
        return predicting_positions(chat)
    if mode == "answer":
        s, e = chat.answer_span
        return torch.arange(s, e, device=chat.inputs["input_ids"].device)
    raise ConfigError(f"queries must be 'predicting' or 'answer', got {mode!r}")


def _head_mean(a: torch.Tensor, heads: Any = "mean") -> torch.Tensor:
    """``(1, H, S, S)`` -> ``(S, S)`` float32: mean over heads, or one head."""
    a = a[0].float()
    return a.mean(0) if heads == "mean" else a[int(heads)]


class AttentionHead(ForwardMethod):
    """Raw attention of one layer (default the last), heads averaged: answer queries -> image tokens.

    Source: the attention weights ``softmax(q k^T / sqrt(d))`` of the chosen decoder layer, read at the
    rows of the predicting positions and the image-token columns. Deviation from the paper's public
    code: none known in the rule; the scored answer span excludes the end-of-turn token (README
    "Answer-only scoring") and only the ``T`` needed rows are kept."""

    name = "attention_head"
    per_token_maps = True
    source = ("raw attention (one layer, heads averaged), rows of the predicting positions; "
              "no known deviation from the paper's code")
    defaults = {"layer": -1, "heads": "mean", "queries": "predicting"}
    spec = {"layer": integer(), "heads": either(choice("mean"), integer(0)), "queries": choice("predicting", "answer")}

    def check_params(self, adapter: Any) -> None:
        """``layer`` is a decoder layer and an int ``heads`` an attention head of this model."""
        model = getattr(adapter, "name", None)
        _layer_indices(self.params["layer"], len(adapter.decoder_layers), self.name, "layer", model)
        h, n_heads = self.params["heads"], attention_heads(adapter)
        if h != "mean" and n_heads is not None and not 0 <= int(h) < n_heads:
            raise ConfigError(f"method {self.name!r}: parameter 'heads' = {h!r} is out of range for "
                              f"{f'model {model!r}' if model else 'the model'} with {n_heads} attention heads "
                              f"(valid: 'mean' or 0..{n_heads - 1})")

    def _forward_needs(self, adapter: Any) -> ForwardNeeds:
        self.check_params(adapter)
        return ForwardNeeds(attentions=True)

    def _from_forward(self, adapter: Any, chat: Any, fp: ForwardPass) -> Attribution:
        att = fp.attentions
        (k,) = _layer_indices(self.params["layer"], len(att), self.name, "layer")
        q = _queries(chat, self.params["queries"])
        rows = _head_mean(att[k], self.params["heads"])[q]
        return _finish(adapter, chat, rows, {"layers": [k]})


def rollout_rows(atts: Sequence[torch.Tensor], layers: Sequence[int], q: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema) restricted to query rows ``q``:
    ``A_l' = rownorm(mean_heads A_l + I)``, ``R = A_L' ... A_1'``, returns ``R[q]`` ``(T, S)``."""
    S = atts[0].shape[-1]
    r = torch.zeros(len(q), S, device=atts[0].device)
    r[torch.arange(len(q), device=r.device), q.to(r.device)] = 1.0
    for k in sorted(layers, reverse=True):
        a = _head_mean(atts[k]) + torch.eye(S, device=r.device)
        a = a / a.sum(-1, keepdim=True)
        r = r @ a
    return r


class AttentionRollout(_LayersMethod):
    """Attention rollout with the residual added and rows renormalised, over ``layers`` (default all).

    Source: Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers", eq. for rollout:
    ``A' = rownorm(mean_heads(A) + I)``, ``R = A'_L ... A'_1`` (the product taken from the last layer
    down, row form, :func:`rollout_rows`), read at the predicting positions' rows. Deviation: none known
    in the rule; the paper's public code computes the same product for its "LRP" entry
    (:class:`LRPPaper`)."""

    name = "attention_rollout"
    source = ("Abnar & Zuidema 2020 rollout, rownorm(mean_heads A + I), last layer to first, "
              "rows of the predicting positions")
    defaults = {"layers": "all", "queries": "predicting"}
    spec = {"layers": either(choice("all"), integer(), int_list()), "queries": choice("predicting", "answer")}

    def _forward_needs(self, adapter: Any) -> ForwardNeeds:
        self.check_params(adapter)
        return ForwardNeeds(attentions=True)

    def _from_forward(self, adapter: Any, chat: Any, fp: ForwardPass) -> Attribution:
        att = fp.attentions
        layers = _layer_indices(self.params["layers"], len(att), self.name)
        rows = rollout_rows(att, layers, _queries(chat, self.params["queries"]))
        return _finish(adapter, chat, rows, {"layers": layers})


class LRPPaper(AttentionRollout):
    """The MedFocus paper's "LRP" baseline as its public code computes it: attention rollout read from
    the positions that predict the answer tokens.

    Source: the paper's public code (its "LRP" entry), reproduced: the project's rollout with these
    settings (``layers="all"``, ``queries="predicting"``) matched that code's maps to 1.4e-6 (measured
    when issue 20 was filed). Deviation: none intended -- this entry exists so the paper's Table 1 can be
    reproduced and compared; it is *not* Layer-wise Relevance Propagation (that is ``lrp``, AttnLRP).
    Passes: 1 forward."""

    name = "lrp_paper"
    source = ("the paper's public code's 'LRP' = attention rollout from the predicting positions "
              "(reproduced to 1.4e-6); not LRP proper (see lrp)")


class AttentionFlowResidual(_LayersMethod):
    """The project's residual-weighted attention flow (formerly registered as ``lrp``).

    Source: this project's own rule, not a published method; it is not Layer-wise Relevance Propagation
    (that is ``lrp``, AttnLRP). It exists because it is a cheap (one forward, no backward) propagation that,
    unlike rollout's fixed ``(A + I) / 2``, lets each layer's measured residual-vs-update balance decide how
    much relevance stays in place. The rule: at layer ``l`` the output at position ``i`` is ``h_i + u_i`` (residual
    plus the layer's update). The relevance of ``i`` is split between the residual (share
    ``rho_i = |h_i| / (|h_i| + |u_i|)``, measured on this input) which keeps it at ``i``, and the update
    (share ``1 - rho_i``), which is redistributed over the attended positions in proportion to the
    head-averaged attention ``A_l[i, :]``. Relevance rows start one-hot at the answer queries and sum to
    one at every layer (rows of ``A`` sum to one), so maps of different answers are comparable.
    Uses decoder-layer hooks for ``h`` and ``u`` (one forward pass).
    """

    name = "attention_flow_residual"
    defaults = {"layers": "all", "queries": "predicting"}
    source = ("this project's rule (not published, not LRP): relevance split between residual and "
              "head-averaged attention by |h| / (|h| + |update|)")
    spec = {"layers": either(choice("all"), integer(), int_list()), "queries": choice("predicting", "answer")}

    def _forward_needs(self, adapter: Any) -> ForwardNeeds:
        self.check_params(adapter)
        return ForwardNeeds(attentions=True, residual_norms=True)

    def _from_forward(self, adapter: Any, chat: Any, fp: ForwardPass) -> Attribution:
        att, norms = fp.attentions, fp.norms
        layers = _layer_indices(self.params["layers"], len(att), self.name)
        q = _queries(chat, self.params["queries"])
        S = att[0].shape[-1]
        dev = att[0].device
        r = torch.zeros(len(q), S, device=dev)
        r[torch.arange(len(q), device=dev), q.to(dev)] = 1.0
        for k in sorted(layers, reverse=True):
            hn, un = (t.to(dev) for t in norms[k])
            rho = hn / (hn + un).clamp_min(1e-12)
            r = r * rho[None] + (r * (1 - rho)[None]) @ _head_mean(att[k])
        return _finish(adapter, chat, r, {"layers": layers})


class GradWeightedAttention(_LayersMethod):
    """Gradient-weighted attention (Chefer et al., 2021, generic rule):
    ``Abar_l = mean_heads(ReLU(dF/dA_l) * A_l)`` with ``F`` the answer log-likelihood, relevance
    ``R = prod_l (I + Abar_l)`` accumulated from the first to the last of ``layers``; the map is
    ``R[answer queries, image tokens]``. Passes: 1 forward, 1 backward (+1 for the final token of a
    multi-token answer, in ``extras["final_token_heatmap"]``).

    Source: Chefer, Gur & Wolf (ICCV 2021), "Generic Attention-model Explainability for Interpreting
    Bi-Modal and Encoder-Decoder Transformers", the self-attention rule ``Abar = E_h((grad A * A)^+)``,
    ``R <- R + Abar R`` (``A >= 0``, so ``(g * A)^+ = ReLU(g) * A``). Deviation: ``F`` is the whole answer's
    log-likelihood (end-of-turn token excluded), read at the predicting positions."""

    name = "grad_weighted_attention"
    per_token_maps = False  # one gradient target, the whole answer (see _from_forward)
    defaults = {"layers": "all", "final_token": True, "queries": "predicting"}
    source = ("Chefer et al. 2021 (generic rule): mean_heads(ReLU(grad) * A), R = prod (I + Abar); "
              "target = answer log-likelihood without end-of-turn")
    spec = {"layers": either(choice("all"), integer(), int_list()), "final_token": boolean(), "queries": choice("predicting", "answer")}

    def _forward_needs(self, adapter: Any) -> ForwardNeeds:
        self.check_params(adapter)
        layers = _layer_indices(self.params["layers"], len(adapter.decoder_layers), self.name)
        return ForwardNeeds(attentions=True, attention_grad_layers=tuple(layers), final_token=bool(self.params["final_token"]))

    def _from_forward(self, adapter: Any, chat: Any, fp: ForwardPass) -> Attribution:
        att = fp.attentions
        layers = _layer_indices(self.params["layers"], len(att), self.name)
        k_final = final_token_index(chat)
        need_final = bool(self.params["final_token"]) and fp.logp.shape[1] > 1
        sel = [att[k] for k in layers]
        q = _queries(chat, self.params["queries"])

        def relevance(gs: Sequence[torch.Tensor]) -> torch.Tensor:
            S = sel[0].shape[-1]
            r = torch.zeros(len(q), S, device=sel[0].device)
            r[torch.arange(len(q), device=r.device), q.to(r.device)] = 1.0
            # R = (I + Abar_L) ... (I + Abar_1); row form: r <- r + r @ Abar_l, last layer first.
            for a, g in reversed(list(zip(sel, gs))):
                abar = (torch.relu(g[0].float()) * a[0].float()).mean(0)
                r = r + r @ abar
            return r

        extras: dict[str, Any] = {"layers": layers}
        res = _finish(adapter, chat, relevance([fp.attention_grads[k] for k in layers]), extras)
        res.token_heatmaps = None  # one target (the whole answer); per-token rows would need T backwards
        extras.pop("final_token_heatmap", None)
        extras["final_token_index"] = k_final
        # one-token answer: the whole-answer map is that token's map
        extras["final_token_heatmap"] = res.heatmap if chat.n_answer_tokens == 1 else None
        if need_final:
            if fp.attention_grads_final is None:
                raise ModelError("grad_weighted_attention: the forward pass ran no final-token backward")
            rf = relevance([fp.attention_grads_final[k] for k in layers])[k_final : k_final + 1]
            img = chat.image_token_positions.to(rf.device)
            extras["final_token_heatmap"] = to_original(adapter, chat, grid_from_tokens(rf[0, img], chat).cpu())
        return res
