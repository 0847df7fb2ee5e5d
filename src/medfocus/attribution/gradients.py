"""Gradient baselines: Grad-CAM, Grad-CAM++ and integrated gradients.

Gradient target: the sum of the answer tokens' teacher-forced log-probs, ``sum_t log p(y_t | x, y_<t)``
(the log-likelihood of the whole answer, rationale included for step-by-step answers). When the answer
has more than one token a second backward pass (sharing the forward) gives the map of the final yes/no
token alone (``extras["final_token_heatmap"]``).

Which layer for Grad-CAM (and why not the paper's). The paper applies Grad-CAM to the *last* decoder
layer's hidden states at the image-token positions. In a causal decoder the last layer's state at
position ``i`` feeds only the logits at position ``i``; the answer is read from later positions, so
that gradient is exactly zero and the maps are empty (measured on the published code, and asserted in
our tests). We use, by default, ``layer="input"``: the language model's input embeddings at the image
positions -- i.e. the projector's image-token embeddings as the LM receives them, in row-major grid
order -- whose every element reaches the answer through all decoder layers. ``layer=k`` (an int,
negative from the end) uses the output of decoder layer ``k``; any layer but the last works, and the last
(``-1`` or ``n - 1``) is refused with a ConfigError when the model is loaded, before any sample runs.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

import numpy as np
import torch

from medfocus.attribution._common import final_token_index, forward_logprobs, grid_from_tokens, prepare_answer, to_original
from medfocus.attribution.base import Attribution, Counter, ForwardMethod, InvalidSetting, Method, Param, boolean, choice, either, integer
from medfocus.attribution.passes import ForwardNeeds, ForwardPass, resolve_grad_layer
from medfocus.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import LVLMAdapter


def gradcam_weights(feats: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM over tokens: channel weights = mean gradient over the ``N`` image tokens;
    map = ReLU(sum_d w_d F[:, d]). ``(N, D), (N, D) -> (N,)``."""
    return torch.relu(feats @ grads.mean(dim=0))


def gradcampp_weights(feats: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al., exponential-score closed form) over tokens: per-token, per-channel
    ``a = g^2 / (2 g^2 + sum_i F_i g^3)``, channel weight ``w = sum_i a ReLU(g)``, map = ReLU(F w).
    ``(N, D), (N, D) -> (N,)``.

    The closed form is derived for non-negative (post-ReLU) activations; token embeddings are signed,
    and a negative ``sum_i F_i`` flips the sign of ``a`` exactly where the gradient is largest. Each
    channel is therefore shifted by its minimum over the image tokens first (a constant shift of an
    activation leaves its gradient unchanged, so this only moves the activations into the domain the
    formula assumes)."""
    feats = feats - feats.min(dim=0, keepdim=True).values
    g2, g3 = grads**2, grads**3
    denom = 2 * g2 + feats.sum(dim=0, keepdim=True) * g3
    a = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    w = (a * torch.relu(grads)).sum(dim=0)
    return torch.relu(feats @ w)


class GradCAM(ForwardMethod):
    """Grad-CAM on image-token activations (see the module docstring for the layer choice).

    Passes: 1 forward, 1 backward (+1 backward for the final token of a multi-token answer).

    Source: Selvaraju et al. (ICCV 2017), Grad-CAM eqs. 1-2 over image tokens instead of spatial
    positions. Deviation from the paper's public code: the layer -- the paper uses the last decoder layer,
    whose gradient at image positions is exactly zero in a causal decoder; the default here is the LM's
    input embeddings at the image positions (see the module docstring). Target: the answer's
    log-likelihood without the end-of-turn token.
    """

    name = "gradcam"
    per_token_maps = False  # one target: the answer's log-likelihood (+ the final token's map)
    defaults = {"layer": "input", "final_token": True}
    source = ("Selvaraju et al. 2017 Grad-CAM over image tokens; deviation: on the LM input embeddings, not the "
              "paper code's last decoder layer (its gradient there is exactly zero)")
    spec = {"layer": either(choice("input", "middle"), integer()), "final_token": boolean()}
    _combine = staticmethod(gradcam_weights)

    def check_params(self, adapter: Any) -> None:
        """``layer`` names a decoder layer of this model other than the last (:func:`resolve_grad_layer`)."""
        resolve_grad_layer(adapter, self.params["layer"], method=self.name)

    def _forward_needs(self, adapter: Any) -> ForwardNeeds:
        self.check_params(adapter)  # validates the spec before any pass
        return ForwardNeeds(grad_layer=self.params["layer"], final_token=bool(self.params["final_token"]))

    def _from_forward(self, adapter: Any, chat: Any, fp: ForwardPass) -> Attribution:
        grid = grid_from_tokens(self._combine(fp.image_feats, fp.image_grads), chat)
        heat = to_original(adapter, chat, grid)
        extras: dict[str, Any] = {"layer": fp.grad_layer, "grid_map": grid.numpy(), "grad_abs_sum": float(fp.image_grads.abs().sum())}
        extras["final_token_index"] = final_token_index(chat)
        if self.params["final_token"] and fp.image_grads_final is not None:
            extras["final_token_heatmap"] = to_original(adapter, chat, grid_from_tokens(self._combine(fp.image_feats, fp.image_grads_final), chat))
        else:  # one-token answer (or final_token=False): the whole-answer map is that token's map
            extras["final_token_heatmap"] = heat if chat.n_answer_tokens == 1 else None
        return Attribution(heatmap=heat, extras=extras)


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ on the same activations as :class:`GradCAM`.

    Source: Chattopadhay et al. (WACV 2018), Grad-CAM++ (exponential-score closed form) over
    image tokens. Deviations: the layer (as :class:`GradCAM`), and each channel is shifted by its minimum
    first (the closed form assumes non-negative activations; see :func:`gradcampp_weights`)."""

    name = "gradcampp"
    source = ("Chattopadhay et al. 2018 Grad-CAM++ (closed form) over image tokens; deviations: LM input "
              "embeddings as Grad-CAM, channels shifted to be non-negative")
    defaults = {"layer": "input", "final_token": True}
    _combine = staticmethod(gradcampp_weights)


def _tensor3(v: Any) -> Any:
    """A ``(3, H, W)`` tensor baseline (programmatic use only; the CLI gives strings)."""
    if not isinstance(v, torch.Tensor) or v.ndim != 3 or v.shape[0] != 3:
        raise InvalidSetting
    return v


class IntegratedGradients(Method):
    """Integrated gradients (Sundararajan et al.) on the normalised pixel image.

    Path ``x_a = b + a (x - b)`` from the baseline ``b`` (black) to the image, ``steps`` midpoint
    Riemann points ``a = (k + 1/2) / steps``, run in batches. The gradient is taken w.r.t. the
    ``(3, canvas_h, canvas_w)`` *image*; the family's pixel layout (e.g. Qwen2.5-VL's 2x2-merge-window
    patch order) is produced from it by :meth:`LVLMAdapter.images_to_pixel_values` inside the graph,
    so autograd maps the gradient back through the exact inverse of the patchification.
    Map: ``|IG|`` summed over channels. ``extras["completeness_gap"]`` = ``sum(IG) - (F(x) - F(b))``.

    Passes: ``steps`` forwards and ``steps`` backwards (batched), +2 forwards for the completeness check
    when ``check_completeness``.

    Source: Sundararajan, Taly & Yan (ICML 2017), integrated gradients eq. 1 with a midpoint Riemann sum
    (eq. 3's right-point sum in the paper). Deviation from the paper's public code: none known in the
    rule; the gradient reaches the pixels through the family's exact patchification inverse.
    """

    name = "integrated_gradients"
    per_token_maps = False  # one target along the path: the answer's log-likelihood
    source = ("Sundararajan et al. 2017 integrated gradients on the normalised image, black baseline, "
              "midpoint Riemann sum, |IG| summed over channels")
    defaults = {"steps": 24, "baseline": "zero", "batch_size": 8, "final_token": True, "check_completeness": False}
    spec = {"steps": integer(1), "baseline": either(choice("zero"), Param("a (3, H, W) tensor", _tensor3)), "batch_size": integer(1),
            "final_token": boolean(), "check_completeness": boolean()}

    def _attribute(self, adapter: LVLMAdapter, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        steps, bs = int(self.params["steps"]), int(self.params["batch_size"])
        if steps < 1:
            raise ConfigError(f"integrated_gradients: steps must be >= 1, got {steps}")
        chat = prepare_answer(adapter, image, question, answer, self.name, counter)
        x = adapter.pixel_values_to_images(chat.inputs["pixel_values"], chat).detach().float()  # (3, H, W)
        base = self.params["baseline"]
        if isinstance(base, str):
            if base != "zero":
                raise ConfigError(f"integrated_gradients: baseline must be 'zero' or a (3,H,W) tensor, got {base!r}")
            b = adapter.black_level.to(x)[:, None, None].expand_as(x)
        else:
            b = torch.as_tensor(base).to(x)
        k = final_token_index(chat)
        need_final = bool(self.params["final_token"]) and chat.n_answer_tokens > 1
        alphas = (torch.arange(steps, dtype=x.dtype) + 0.5) / steps
        gsum = torch.zeros_like(x)
        gsum_f = torch.zeros_like(x) if need_final else None
        dtype = getattr(adapter.model, "dtype", torch.float32)
        with torch.enable_grad():
            for i in range(0, steps, bs):
                a = alphas[i : i + bs].to(x.device)[:, None, None, None]
                xs = (b[None] + a * (x - b)[None]).requires_grad_(True)
                pv = adapter.images_to_pixel_values(xs.to(dtype), chat)
                logp, _ = forward_logprobs(adapter, chat, adapter.batch_inputs(chat, pv))
                counter.n_forward += xs.shape[0]
                (g,) = torch.autograd.grad(logp.sum(), xs, retain_graph=need_final)
                gsum += g.sum(0).float()
                if need_final:
                    (gf,) = torch.autograd.grad(logp[:, k].sum(), xs)
                    gsum_f += gf.sum(0).float()  # type: ignore[operator]
                    counter.n_backward += xs.shape[0]
                counter.n_backward += xs.shape[0]
        ig = (x - b) * gsum / steps  # (3, H, W)
        extras: dict[str, Any] = {"final_token_index": k, "ig_sum": float(ig.sum())}
        if self.params["check_completeness"]:
            with torch.no_grad():
                pv2 = adapter.images_to_pixel_values(torch.stack([x, b]).to(dtype), chat)
                lp2, _ = forward_logprobs(adapter, chat, adapter.batch_inputs(chat, pv2))
                counter.n_forward += 2
            extras["completeness_gap"] = float(ig.sum() - (lp2[0].sum() - lp2[1].sum()))
        extras["canvas_map"] = ig.abs().sum(0).cpu().numpy()
        heat = to_original(adapter, chat, ig.abs().sum(0))
        if gsum_f is not None:
            extras["final_token_heatmap"] = to_original(adapter, chat, ((x - b) * gsum_f / steps).abs().sum(0))
        else:  # one-token answer (or final_token=False)
            extras["final_token_heatmap"] = heat if chat.n_answer_tokens == 1 else None
        return Attribution(heatmap=heat, extras=extras)
