"""Known-truth tests of the attribution baselines on the hand-built toy LVLM
(:mod:`medfocus.attribution.testing`), whose answer reads only one known patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfocus.attribution import get_method, list_methods
from medfocus.attribution._common import forward_logprobs, layer_hidden_hook
from medfocus.attribution.base import BASELINES, Attribution
from medfocus.attribution.testing import GRID, ToyAdapter, ToyLVLM, cell_box, randomize_weights, toy_image
from medfocus.errors import ConfigError


TARGET = (2, 5)
DISTRACTOR = (6, 1)
Q = "Is there evidence of nodule in the image? Answer directly with yes or no without any explanation."


@pytest.fixture(scope="module")
def toy() -> ToyAdapter:
    torch.manual_seed(0)
    return ToyAdapter(target_cell=TARGET)


def cell_means(hm: np.ndarray, size: int = 64) -> np.ndarray:
    """(GRID, GRID) mean heat per token-grid cell of a square original image."""
    s = size // GRID
    return hm.reshape(GRID, s, GRID, s).mean(axis=(1, 3))


def top_cell(hm: np.ndarray) -> tuple[int, int]:
    cm = cell_means(hm)
    return tuple(int(v) for v in np.unravel_index(np.argmax(cm), cm.shape))  # type: ignore[return-value]


def test_chunk_count():
    from medfocus.attribution.perturbation import chunk_count

    assert chunk_count(65, 16) == 4  # 16+16+17+16: the extra variant rides along
    assert chunk_count(64, 16) == 4 and chunk_count(16, 16) == 1 and chunk_count(3, 16) == 1
    assert chunk_count(70, 16) == 5  # 6 extra would make batches of 18 (> 10% over): 14 x 5
    assert chunk_count(17, 16) == 1 and chunk_count(18, 16) == 2
    assert chunk_count(11, 1) == 11 and chunk_count(0, 16) == 1


def test_registry_lists_ten_baselines_and_medfocus() -> None:
    methods = list_methods()
    # the list: 4 attention + 3 gradient + 2 perturbation + 2 prompting names ("ten baselines"
    # in the paper's wording counts the two prompting variants as one family)
    # 11 for the paper's baselines (its "LRP" row is lrp_paper) + AttnLRP (lrp) + the project's attention_flow_residual
    assert set(BASELINES) <= set(methods) and len(BASELINES) == 13
    assert {"lrp", "lrp_paper", "attention_flow_residual"} <= set(BASELINES)
    from medfocus.attribution import method_source

    assert all(method_source(n) for n in methods)  # every built-in method names its source / deviation
    assert method_source("no_such_method") == ""  # unregistered names (e.g. the trivial baselines' rows) have none
    assert "medfocus" in methods
    assert methods["occlusion"] == {"grid": 8, "baseline": "zero", "batch_size": 16}
    assert methods["rise"]["n_masks"] == 64 and methods["rise"]["p_keep"] == 0.5
    assert methods["integrated_gradients"]["steps"] == 24
    import importlib.util

    if importlib.util.find_spec("medfocus.concepts.method") is not None:  # the 11th entry, lazily resolved
        from medfocus.attribution.base import Method

        mf = get_method("medfocus")
        assert isinstance(mf, Method) and mf.name == "medfocus" and methods["medfocus"] == mf.defaults
    with pytest.raises(ConfigError):
        get_method("no_such_method")
    with pytest.raises(ConfigError):
        get_method("occlusion", gird=4)


def test_toy_model_reads_only_the_target(toy: ToyAdapter) -> None:
    img = toy_image(TARGET, distractor=DISTRACTOR)
    chat = toy.prepare(img, Q, "Yes")
    pv = chat.inputs["pixel_values"]
    assert torch.equal(toy.images_to_pixel_values(toy.pixel_values_to_images(pv, chat), chat), pv)
    keep = torch.ones(3, GRID, GRID)
    keep[1][TARGET] = 0
    keep[2][DISTRACTOR] = 0
    with torch.no_grad():
        p = forward_logprobs(toy, chat, toy.batch_inputs(chat, toy.masked_pixel_values(chat, keep)))[0].exp()[:, 0]
    assert p[1] < 0.05 * p[0]  # target occluded -> "Yes" collapses
    assert abs(float(p[2] - p[0])) < 1e-3  # distractor occluded -> nothing changes


@pytest.mark.parametrize("name", ["occlusion", "rise", "integrated_gradients", "gradcam", "gradcampp", "grad_weighted_attention",
                                  "attention_head", "attention_rollout", "lrp", "lrp_paper", "attention_flow_residual"])
def test_known_square_is_top_region(toy: ToyAdapter, name: str) -> None:
    # Grad-CAM's channel weights are global, so (by construction of Grad-CAM) any patch sharing the read
    # feature lights up; it is tested without the equally bright distractor. The others must ignore it.
    distractor = None if name in ("gradcam", "gradcampp") else DISTRACTOR
    img = toy_image(TARGET, seed=1, distractor=distractor)
    res = get_method(name).attribute(toy, img, Q, "Yes")
    assert isinstance(res, Attribution)
    assert res.heatmap is not None and res.heatmap.shape == img.shape and res.heatmap.dtype == np.float32
    assert top_cell(res.heatmap) == TARGET, cell_means(res.heatmap).round(4)
    assert res.n_forward >= 1 and res.seconds > 0


def test_pass_counters(toy: ToyAdapter) -> None:
    img = toy_image(TARGET)
    assert get_method("occlusion", grid=4).attribute(toy, img, Q, "Yes").n_forward == 17
    r = get_method("rise", n_masks=10, batch_size=4).attribute(toy, img, Q, "Yes")
    assert (r.n_forward, r.n_backward) == (10, 0)
    r = get_method("integrated_gradients", steps=6, batch_size=4).attribute(toy, img, Q, "Yes")
    assert (r.n_forward, r.n_backward) == (6, 6)
    r = get_method("gradcam").attribute(toy, img, Q, "Yes")
    assert (r.n_forward, r.n_backward) == (1, 1)
    assert get_method("attention_rollout").attribute(toy, img, Q, "Yes").n_backward == 0
    r = get_method("lrp").attribute(toy, img, Q, "Yes")
    assert (r.n_forward, r.n_backward) == (1, 1)


def test_rise_is_seeded(toy: ToyAdapter) -> None:
    img = toy_image(TARGET)
    a = get_method("rise", n_masks=16, seed=3).attribute(toy, img, Q, "Yes").heatmap
    b = get_method("rise", n_masks=16, seed=3).attribute(toy, img, Q, "Yes").heatmap
    c = get_method("rise", n_masks=16, seed=4).attribute(toy, img, Q, "Yes").heatmap
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_rollout_on_identity_attention_model_equals_direct_attention(toy: ToyAdapter) -> None:
    # Layers 0..L-2 attend each token to itself exactly; rollout's residual-averaged identity layers are
    # the identity, and the last layer contributes (A + I)/2, i.e. half the direct attention at image keys.
    img = toy_image(TARGET, seed=2, distractor=DISTRACTOR)
    direct = get_method("attention_head").attribute(toy, img, Q, "Yes")
    roll = get_method("attention_rollout").attribute(toy, img, Q, "Yes")
    np.testing.assert_allclose(roll.extras["grid_map"], 0.5 * direct.extras["grid_map"], rtol=1e-5, atol=1e-7)
    # a non-identity earlier layer breaks the equality (the test can fail)
    other = ToyAdapter(ToyLVLM(layer_modes=("read", "identity", "read"), target_cell=TARGET))
    d2 = get_method("attention_head").attribute(other, img, Q, "Yes").extras["grid_map"]
    r2 = get_method("attention_rollout").attribute(other, img, Q, "Yes").extras["grid_map"]
    assert not np.allclose(r2, 0.5 * d2, rtol=1e-3, atol=1e-5)


def test_lrp_paper_is_rollout_from_the_predicting_positions(toy: ToyAdapter) -> None:
    img = toy_image(TARGET, seed=3, distractor=DISTRACTOR)
    paper = get_method("lrp_paper").attribute(toy, img, Q, "Yes").extras["grid_map"]
    np.testing.assert_array_equal(paper, get_method("attention_rollout").attribute(toy, img, Q, "Yes").extras["grid_map"])
    assert get_method("lrp_paper").params == {"layers": "all", "queries": "predicting"}


def test_attention_flow_residual_conserves_relevance(toy: ToyAdapter) -> None:
    img = toy_image(TARGET, seed=2)
    res = get_method("attention_flow_residual").attribute(toy, img, Q, "Yes")
    g = res.extras["grid_map"]
    assert 0 < g.sum() <= 1 + 1e-5  # relevance rows sum to one over all positions, the image gets part of it
    assert np.unravel_index(np.argmax(g), g.shape) == TARGET


def image_grad_at_layer_output(adapter, image, question: str, answer: str, k: int) -> torch.Tensor:
    """``(N_img, D)`` gradient of the answer's log-likelihood w.r.t. decoder layer ``k``'s output at the
    image tokens, hooked directly (no method involved)."""
    chat = adapter.prepare(image, question, answer)
    store: dict = {}
    remove = layer_hidden_hook(adapter.decoder_layers[k], pre=False, store=store)
    try:
        logp, _ = forward_logprobs(adapter, chat, chat.inputs)
        (g,) = torch.autograd.grad(logp.sum(), store["h"])
    finally:
        remove()
    return g[0, chat.image_token_positions]


def test_gradcam_last_layer_is_refused_because_its_gradient_is_exactly_zero(toy: ToyAdapter) -> None:
    """The paper's pitfall: in a causal decoder the last layer's states at image positions cannot reach
    the answer, so their gradient is exactly zero (measured here by hooking that layer directly); Grad-CAM
    and Grad-CAM++ refuse that layer under both of its indices, naming the method, the setting, the value
    and the layer count, while the layer below it and the other specs work."""
    from medfocus.attribution.passes import resolve_grad_layer

    img = toy_image(TARGET, seed=3)
    n = len(toy.decoder_layers)
    assert n >= 2
    assert float(image_grad_at_layer_output(toy, img, Q, "Yes", n - 1).abs().sum()) == 0.0  # exactly zero
    assert float(image_grad_at_layer_output(toy, img, Q, "Yes", n - 2).abs().sum()) > 0
    for name in ("gradcam", "gradcampp"):
        for layer in (-1, n - 1):
            method = get_method(name, layer=layer)  # the type is fine; the model decides the range
            for call in (lambda: method.check_params(toy), lambda: method.attribute(toy, img, Q, "Yes")):
                with pytest.raises(ConfigError) as ei:
                    call()
                msg = str(ei.value)
                for w in (f"method {name!r}", "'layer'", f"= {layer}", f"{n} decoder layers", "exactly zero",
                          f"0..{n - 2} or -{n}..-2"):
                    assert w in msg, (w, msg)
        for layer in (99, -n - 1):
            with pytest.raises(ConfigError, match=rf"method '{name}': parameter 'layer' = {layer} is out of range .* {n} decoder layers"):
                get_method(name, layer=layer).check_params(toy)
    assert resolve_grad_layer(toy, -2)[2] == resolve_grad_layer(toy, n - 2)[2] == f"decoder_layer_{n - 2}_output"
    for layer in ("input", "middle", 0, -2):
        res = get_method("gradcam", layer=layer).attribute(toy, img, Q, "Yes")
        assert res.extras["grad_abs_sum"] > 0, layer
        assert top_cell(res.heatmap) == TARGET


def test_integrated_gradients_lit_patch_lands_where_it_was(toy: ToyAdapter) -> None:
    """IG goes through the toy's 2x2-merge-window patch order; a scrambled inverse would move the
    attribution of the lit target patch to another cell. Also checks completeness."""
    img = np.zeros((64, 64), np.uint8)
    x1, y1, x2, y2 = cell_box(TARGET)
    img[y1:y2, x1:x2] = 255
    res = get_method("integrated_gradients", steps=32, check_completeness=True).attribute(toy, img, Q, "Yes")
    c = res.extras["canvas_map"]  # canvas = original / 2 here; the target cell is canvas rows 8:12, cols 20:24
    assert c[y1 // 2 : y2 // 2, x1 // 2 : x2 // 2].sum() > 0.99 * c.sum()
    assert top_cell(res.heatmap) == TARGET
    assert abs(res.extras["completeness_gap"]) < 0.05 * abs(res.extras["ig_sum"])


def test_non_square_image_maps_back_to_original_pixels(toy: ToyAdapter) -> None:
    # 64 wide x 48 high: letterboxed with vertical padding; the target square in original pixels must
    # still be where occlusion puts its mass.
    img = np.random.default_rng(0).integers(0, 60, size=(48, 64)).astype(np.uint8)
    geo = toy.prepare(img, Q, "Yes").geometry
    # the canvas cell (2, 5) -> original pixels
    box = geo.inverse_box((5 * 4, 2 * 4, 6 * 4, 3 * 4))
    xs, ys = slice(int(np.ceil(box[0])), int(box[2])), slice(int(np.ceil(box[1])), int(box[3]))
    img[ys, xs] = 250
    res = get_method("occlusion", grid=8).attribute(toy, img, Q, "Yes")
    assert res.heatmap.shape == (48, 64)
    yy, xx = np.unravel_index(np.argmax(res.heatmap), res.heatmap.shape)
    assert box[0] - 8 <= xx <= box[2] + 8 and box[1] - 8 <= yy <= box[3] + 8


def test_step_by_step_answer_has_rationale_and_final_token_maps(toy: ToyAdapter) -> None:
    img = toy_image(TARGET, seed=4)
    q = "Is there evidence of nodule in the image? Think step by step and answer with yes or no."
    ans = "the bright square is in the region , therefore yes ."
    for name in ("occlusion", "attention_head", "gradcam", "integrated_gradients", "grad_weighted_attention"):
        kw = {"steps": 4} if name == "integrated_gradients" else {}
        res = get_method(name, **kw).attribute(toy, img, q, ans)
        k = res.extras["final_token_index"]
        assert k == 9, name  # "yes", not the trailing "."
        fin = res.extras["final_token_heatmap"]
        assert fin is not None and fin.shape == img.shape, name
        if res.token_heatmaps is not None:
            assert res.token_heatmaps.shape == (11,) + img.shape
            np.testing.assert_allclose(res.token_heatmaps[k], fin)
        assert top_cell(fin) == TARGET, name


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def adebayo_rank_correlation(name: str, **kw) -> float:
    img = toy_image(TARGET, seed=5, distractor=DISTRACTOR)
    a = ToyAdapter(target_cell=TARGET)
    h1 = get_method(name, **kw).attribute(a, img, Q, "Yes").heatmap
    randomize_weights(a.model, seed=11)
    h2 = get_method(name, **kw).attribute(a, img, Q, "Yes").heatmap
    return spearman(cell_means(h1), cell_means(h2))


@pytest.mark.parametrize("name,kw", [("occlusion", {}), ("integrated_gradients", {"steps": 8}),
                                     ("gradcam", {}), ("gradcampp", {}), ("grad_weighted_attention", {}), ("lrp", {})])
def test_adebayo_model_randomisation_changes_maps(name: str, kw: dict) -> None:
    """Model-parameter randomisation test (Adebayo et al., 2018): the map of the trained (constructed)
    model vs. the map of the same architecture with all weights re-drawn must decorrelate."""
    s = adebayo_rank_correlation(name, **kw)
    assert s < 0.5, f"{name}: rank correlation after randomisation {s:.3f}"


def test_adebayo_plain_rise_fails() -> None:
    """RISE with 64 masks (the paper's default) fails the randomisation check: its map is dominated by the
    seed-fixed mask coverage and input brightness, so it barely changes when the model is randomised
    (documented in RISE's docstring; on the demo model see ``benchmarks/validity.md``, where it fails on most
    films). Asserted as a failure, not an ``xfail``: an xfail would also "pass" if RISE crashed."""
    s = adebayo_rank_correlation("rise")
    assert s >= 0.5, f"rise now passes the randomisation check (rank correlation {s:.3f}): update README and RISE's docstring"


def test_layer_hook_gives_leaf_gradients(toy: ToyAdapter) -> None:
    chat = toy.prepare(toy_image(TARGET), Q, "Yes")
    store: dict = {}
    remove = layer_hidden_hook(toy.decoder_layers[1], pre=False, store=store)
    try:
        logp, _ = forward_logprobs(toy, chat, chat.inputs)
        (g,) = torch.autograd.grad(logp.sum(), store["h"])
    finally:
        remove()
    pos = chat.image_token_positions
    per_tok = g[0, pos].abs().sum(-1).reshape(GRID, GRID)
    assert np.unravel_index(int(per_tok.argmax()), per_tok.shape) == TARGET


def test_attention_query_choice(toy: ToyAdapter) -> None:
    img = toy_image(TARGET, seed=6, distractor=DISTRACTOR)
    for name in ("attention_head", "attention_rollout", "lrp_paper", "attention_flow_residual"):
        pred = get_method(name).attribute(toy, img, Q, "Yes")
        ans = get_method(name, queries="answer").attribute(toy, img, Q, "Yes")
        assert top_cell(pred.heatmap) == top_cell(ans.heatmap) == TARGET, name
    # why "predicting" is the default: the answer token's own position only produces the *next* token's
    # logits, so for a one-token answer the answer's gradient through its row is exactly zero
    ans = get_method("grad_weighted_attention", queries="answer").attribute(toy, img, Q, "Yes")
    assert float(np.abs(ans.heatmap).max()) == 0.0
    with pytest.raises(ConfigError):
        get_method("attention_head", queries="everything").attribute(toy, img, Q, "Yes")


def test_token_maps_of_huge_images_stay_low_resolution(toy: ToyAdapter, monkeypatch) -> None:
    import medfocus.attribution._common as common

    img = toy_image(TARGET, seed=7)
    ans = "the bright square , therefore yes ."
    full = get_method("occlusion").attribute(toy, img, Q, ans)
    monkeypatch.setattr(common, "MAX_TOKEN_MAP_FLOATS", 64 * 64 * 3)  # pretend the image is huge
    low = get_method("occlusion").attribute(toy, img, Q, ans)
    assert full.token_heatmaps.shape == (7, 64, 64) and low.token_heatmaps is None
    assert low.extras["token_maps_lowres"].shape == (7, 32, 32)  # canvas resolution
    np.testing.assert_allclose(low.extras["final_token_heatmap"], full.extras["final_token_heatmap"])
    np.testing.assert_allclose(low.heatmap, full.heatmap)


def test_rise_masks_match_upsample_then_crop():
    """The separable rendering equals the textbook recipe: bilinear upsampling of the whole
    (grid+1)-cell canvas (F.interpolate, align_corners=False), then a crop at the random shift."""
    import torch.nn.functional as F

    from medfocus.attribution.perturbation import RiseMasks

    m = RiseMasks(12, 5, 0.5, (61, 47), seed=4)
    up = F.interpolate(m.bits, size=m.up, mode="bilinear", align_corners=False)[:, 0]
    ref = torch.stack([up[k, m.dy[k]: m.dy[k] + m.h, m.dx[k]: m.dx[k] + m.w] for k in range(len(m))])
    assert torch.allclose(m[:], ref, atol=1e-6)
    assert torch.allclose(m[3:7], ref[3:7], atol=1e-6) and m[3:7].shape == (4, 61, 47)
    assert 0.0 <= float(m[:].min()) and float(m[:].max()) <= 1.0
