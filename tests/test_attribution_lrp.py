"""AttnLRP (``lrp``): equality with lxt's own rule code, relevance conservation, known truth, hygiene."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medfocus.attribution import get_method
from medfocus.attribution.lrp import attnlrp_forward, attnlrp_rules
from medfocus.attribution.testing import GRID, ToyAdapter, toy_image
from medfocus.errors import ConfigError, ModelError

Q = "Is there evidence of cardiomegaly in the image? Answer directly with yes or no without any explanation."
LXT_REFERENCE = Path(__file__).with_name("_lxt_reference.py")


# ---- equality with lxt ------------------------------------------------------------------------------
def _tiny_lm(family: str, out: Path) -> Path:
    """A tiny random causal LM of ``family`` (weights perturbed so biases and norm weights matter), saved."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                                   query_pre_attn_scalar=8, final_logit_softcapping=None, attn_logit_softcapping=None))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, mlp_bias=True, attention_bias=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.mark.skipif(importlib.util.find_spec("lxt") is None, reason="lxt (the AttnLRP authors' package) is not installed")
@pytest.mark.parametrize("family", ["qwen2", "gemma3", "llama"])
def test_rules_equal_lxt(tmp_path: Path, family: str) -> None:
    """Our per-instance rules give the same input relevance as lxt 2.1's own patches (run in a subprocess,
    since lxt patches transformers' classes for the whole process) on a tiny Qwen2 / Gemma 3 / Llama LM."""
    from transformers import AutoModelForCausalLM

    model_dir = _tiny_lm(family, tmp_path / family)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 10, 32, generator=g, dtype=torch.float64)
    target_ids = torch.randint(0, 48, (10,), generator=g)
    torch.save({"inputs_embeds": emb, "target_ids": target_ids}, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, str(LXT_REFERENCE), family, str(model_dir), str(tmp_path / "inputs.pt"), str(tmp_path / "ref.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(tmp_path / "ref.pt")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()  # SDPA by default
    x = emb.clone().requires_grad_(True)
    with attnlrp_rules(model.model, model.lm_head):
        logits = model(inputs_embeds=x, use_cache=False).logits[0]
    target = logits[torch.arange(10), target_ids].sum()
    (grad,) = torch.autograd.grad(target, x)
    ours = (x * grad).detach()
    torch.testing.assert_close(target.detach(), ref["target"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref["relevance"], rtol=1e-9, atol=1e-12)
    # the rules matter: the plain gradient x input differs (the test can fail)
    x2 = emb.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(model(inputs_embeds=x2, use_cache=False).logits[0][torch.arange(10), target_ids].sum(), x2)
    assert not torch.allclose(x2 * g2, ref["relevance"], rtol=1e-3, atol=1e-6)


# ---- conservation -----------------------------------------------------------------------------------
def _budget(adapter, chat, target: str, monkeypatch) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """``(relevance at the LM inputs, inputs + bias absorption + half the softmax leak, relevance at the logits)``
    of one AttnLRP pass, every term measured with hooks on the same graph."""
    softmaxes: list[tuple[torch.Tensor, torch.Tensor]] = []
    orig_softmax = nn.functional.softmax

    def recording_softmax(x, *args, **kwargs):  # type: ignore[no-untyped-def]
        y = orig_softmax(x, *args, **kwargs)
        if x.requires_grad:
            softmaxes.append((x, y))
        return y

    biased: list[tuple[torch.Tensor, torch.Tensor]] = []
    linears = [m for m in [*adapter.language_model.modules(), adapter.model.lm_head] if isinstance(m, nn.Linear) and m.bias is not None]
    hooks = [m.register_forward_hook(lambda m, a, out: biased.append((m.bias, out))) for m in linears]
    with monkeypatch.context() as mp:
        mp.setattr(nn.functional, "softmax", recording_softmax)
        try:
            p = attnlrp_forward(adapter, chat, target)
        finally:
            for h in hooks:
                h.remove()
    assert len(softmaxes) == len(adapter.decoder_layers)
    wrt = [p.inputs, p.logits] + [t for pair in softmaxes for t in pair] + [out for _, out in biased]
    grads = [g.detach().double() for g in torch.autograd.grad(p.scores.sum(), wrt)]
    r_in = float((p.inputs.detach() * grads[0]).sum())
    assert float((p.logits.detach() * grads[1]).sum()) == pytest.approx(p.target_relevance, rel=1e-9)
    rest = grads[2:]
    leak = 0.0
    for i, (x, y) in enumerate(softmaxes):
        gx, gy = rest[2 * i], rest[2 * i + 1]
        # masked scores are finfo.min with zero gradient: their x * g is 0, not nan
        leak += 0.5 * float((y.detach().double() * gy).sum() - torch.where(gx != 0, x.detach().double() * gx, 0).sum())
    bias = sum(float((b.detach().double() * g).sum()) for (b, _), g in zip(biased, rest[2 * len(softmaxes):]))
    return r_in, r_in + bias + leak, p.target_relevance


@pytest.mark.parametrize("family", ["qwen_vl", "gemma3", "llava"])
@pytest.mark.parametrize("target", ["logprob", "logit"])
def test_relevance_budget_is_conserved(tiny_model_dirs, monkeypatch, family: str, target: str) -> None:
    """AttnLRP's relevance budget closes on every tiny family (float64): relevance at the LM inputs
    + relevance absorbed by biases + half the softmax leak (output minus input relevance of each softmax,
    halved by the q/k split) = relevance at the logits, to rounding (the softmax runs in float32)."""
    from medfocus.lvlm.loading import load_lvlm

    adapter = load_lvlm(str(tiny_model_dirs[family]), device="cpu", dtype=torch.float64)
    img = np.random.default_rng(0).integers(0, 255, size=(60, 80)).astype(np.uint8)
    r_in, closed, at_logits = _budget(adapter, adapter.prepare(img, Q, "Yes, there is."), target, monkeypatch)
    assert closed == pytest.approx(at_logits, rel=1e-5, abs=1e-7)
    assert abs(r_in) > 1e-6  # the budget is not trivially zero


def test_budget_fails_without_a_rule(tiny_model_dirs, monkeypatch) -> None:
    """The conservation check can fail: with the gated MLP's plain backward (no identity / uniform rule)
    the same budget does not close."""
    import medfocus.attribution.lrp as lrp
    from medfocus.lvlm.loading import load_lvlm

    adapter = load_lvlm(str(tiny_model_dirs["llava"]), device="cpu", dtype=torch.float64)
    img = np.random.default_rng(0).integers(0, 255, size=(60, 80)).astype(np.uint8)
    monkeypatch.setattr(lrp, "_gated_mlp_forward", lambda self, x: self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))
    _, closed, at_logits = _budget(adapter, adapter.prepare(img, Q, "Yes, there is."), "logit", monkeypatch)
    assert closed != pytest.approx(at_logits, rel=1e-3)


# ---- known truth, passes, hygiene ---------------------------------------------------------------------
def test_known_truth_on_toy_reads_one_patch() -> None:
    """The toy LVLM's answer depends only on patch (2, 5): AttnLRP puts its largest relevance there (with an
    equally bright distractor elsewhere), in 1 forward + 1 backward."""
    toy = ToyAdapter()
    for seed in (0, 1, 2):
        img = toy_image((2, 5), seed=seed, distractor=(6, 1))
        res = get_method("lrp").attribute(toy, img, "Is there a nodule?", "Yes")
        g = res.extras["grid_map"]
        assert g.shape == (GRID, GRID)
        assert np.unravel_index(int(np.argmax(g)), g.shape) == (2, 5), g.round(4)
        assert g[2, 5] > 10 * np.abs(np.delete(g.ravel(), 2 * GRID + 5)).max()
        assert (res.n_forward, res.n_backward) == (1, 1)
        assert res.heatmap is not None and res.heatmap.shape == img.shape


def test_model_is_restored_and_other_gradients_unchanged(tiny_adapters) -> None:
    adapter = tiny_adapters["gemma3"]
    img = np.random.default_rng(2).integers(0, 255, size=(60, 80)).astype(np.uint8)
    before = get_method("gradcam").attribute(adapter, img, Q, "Yes").heatmap
    impl = adapter.language_model.config._attn_implementation
    res = get_method("lrp").attribute(adapter, img, Q, "Yes")
    assert (res.n_forward, res.n_backward) == (1, 2)  # the tiny Gemma tokenizer splits "Yes": +1 for the final token
    assert adapter.language_model.config._attn_implementation == impl
    assert not any("forward" in m.__dict__ or "_norm" in m.__dict__ for m in adapter.model.modules())
    np.testing.assert_array_equal(get_method("gradcam").attribute(adapter, img, Q, "Yes").heatmap, before)


def test_unknown_module_and_settings_are_refused() -> None:
    lm = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ModelError, match="LayerNorm"):
        with attnlrp_rules(lm):
            pass
    assert "forward" not in lm[0].__dict__
    with pytest.raises(ConfigError, match="target"):
        get_method("lrp", target="probability")
