"""Family adapters on tiny genuine Qwen2.5-VL, Gemma 3 and LLaVA models (known answers, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfocus.lvlm.scoring import answer_logprobs, score_chat
from medfocus.types import SUFFIXES, question_stem

FAMS = ("qwen_vl", "gemma3", "llava")
Q = question_stem("nodule") + SUFFIXES["direct"]


def _img(h=100, w=80, seed=0):
    return (np.random.RandomState(seed).rand(h, w) * 255).astype(np.uint8)


def test_qwen_autoprocessor_is_image_only(tiny_model_dirs):
    from transformers import AutoProcessor

    from medfocus.lvlm.families.qwen_vl import QwenVLImageProcessor, register_processors

    register_processors()
    proc = AutoProcessor.from_pretrained(tiny_model_dirs["qwen_vl"])
    assert isinstance(proc, QwenVLImageProcessor)  # not a bare tokenizer, no torchvision video processor
    assert not hasattr(proc, "video_processor")


@pytest.mark.parametrize("fam", FAMS)
def test_prepare_answer_span_and_image_tokens(tiny_adapters, fam):
    a = tiny_adapters[fam]
    c = a.prepare(_img(), Q, "Yes")
    s, e = c.answer_span
    assert s == c.prompt_len and e > s
    assert a.tokenizer.decode(c.answer_token_ids).strip() == "Yes"
    ids = c.inputs["input_ids"][0]
    assert torch.equal(ids[s:e], c.answer_token_ids)
    # generation prompt is a prefix of the teacher-forced input
    p = a.prepare(_img(), Q)
    assert p.answer_span is None and torch.equal(p.inputs["input_ids"][0], ids[: c.prompt_len])
    # end of turn is excluded by default and included on request
    ce = a.prepare(_img(), Q, "Yes", include_eot=True)
    assert ce.answer_span[0] == s and ce.answer_span[1] > e
    eot_text = a.tokenizer.decode(ce.answer_token_ids[e - s :])
    assert "Yes" not in eot_text and eot_text.strip() != ""
    # image tokens: contiguous soft tokens, grid covers them
    pos = c.image_token_positions
    gh, gw = c.grid_hw
    assert pos.numel() == gh * gw and bool((pos[1:] - pos[:-1] == 1).all())
    assert bool((ids[pos] == a.image_token_id).all()) and int((ids == a.image_token_id).sum()) == gh * gw


@pytest.mark.parametrize("fam", FAMS)
def test_pixel_layout_roundtrip_and_no_second_resize(tiny_adapters, fam):
    a = tiny_adapters[fam]
    img = _img(90, 70, seed=1)
    c = a.prepare(img, Q, "No")
    pv = c.inputs["pixel_values"]
    ims = a.pixel_values_to_images(pv, c)
    W, H = a.canvas_size
    assert ims.shape == (3, H, W)
    assert torch.equal(a.images_to_pixel_values(ims, c), pv)  # exact inverse
    # the processor did not resize our letterboxed canvas again
    canvas, geo = a.letterbox(img)
    ref = a.normalize_images(torch.from_numpy(canvas).permute(2, 0, 1).float())
    assert torch.allclose(ims, ref, atol=1e-5)
    # batch form
    b = a.pixel_values_to_images(torch.stack([pv, pv]), c)
    assert b.shape == (2, 3, H, W) and torch.equal(a.images_to_pixel_values(b, c), torch.stack([pv, pv]))
    # black level is what intensity 0 normalises to
    assert torch.allclose(ims[:, 0, 0], a.black_level, atol=1e-6)  # corner is letterbox padding (0)


def test_qwen_patchify_exact_and_lit_patch():
    from medfocus.lvlm.families.qwen_vl import patchify, unpatchify

    x = torch.randn(2, 3, 56, 84)  # non-square: 4 x 6 patches
    pv = patchify(x)
    assert pv.shape == (2, 24, 3 * 2 * 14 * 14)
    assert torch.equal(unpatchify(pv, (4, 6)), x)
    # a lit patch at patch (r, c) = (3, 4): merge window (1, 2), offset (1, 0) -> row ((1*3+2)*2+1)*2+0 = 22
    img = torch.zeros(3, 56, 84)
    img[:, 3 * 14 : 4 * 14, 4 * 14 : 5 * 14] = 1.0
    p = patchify(img)
    lit = (p.abs().sum(1) > 0).nonzero()[:, 0].tolist()
    assert lit == [22] and bool((p[22] == 1).all())
    back = unpatchify(p, (4, 6))
    assert torch.equal(back, img)


def test_qwen_matches_processor_layout_and_nonsquare_grid(tiny_adapters):
    from medfocus.lvlm.families.qwen_vl import QwenVLAdapter

    a0 = tiny_adapters["qwen_vl"]
    a = QwenVLAdapter(a0.model, a0.processor, "tiny-nonsquare", (168, 112))
    img = np.zeros((100, 150), np.uint8)
    img[10:30, 100:140] = 255  # bright block in the upper right
    c = a.prepare(img, Q, "Yes")
    assert c.grid_hw == (4, 6) and tuple(c.inputs["image_grid_thw"][0].tolist()) == (1, 8, 12)
    # the processor's own patchification equals ours
    canvas, geo = a.letterbox(img)
    ref = a.normalize_images(torch.from_numpy(canvas).permute(2, 0, 1).float())
    assert torch.allclose(a.images_to_pixel_values(ref, c), c.inputs["pixel_values"], atol=1e-5)
    # the bright block lands where it was (through the letterbox) after unpatchify
    ims = a.pixel_values_to_images(c.inputs["pixel_values"], c)
    bright = (ims[0] > 1.0).float()
    ys, xs = bright.nonzero(as_tuple=True)
    x1, y1, x2, y2 = geo.forward_box((100, 10, 140, 30))
    assert abs(xs.min().item() - x1) <= 1 and abs(xs.max().item() + 1 - x2) <= 1
    assert abs(ys.min().item() - y1) <= 1 and abs(ys.max().item() + 1 - y2) <= 1


@pytest.mark.parametrize("fam", FAMS)
def test_score_equals_full_forward(tiny_adapters, fam):
    a = tiny_adapters[fam]
    c = a.prepare(_img(), Q, "Yes, there is a nodule.")
    lp = score_chat(a, c)
    with torch.inference_mode():
        logits = a.model(**c.inputs).logits.float()
    s, e = c.answer_span
    ref = torch.log_softmax(logits[0, s - 1 : e - 1], -1).gather(-1, c.answer_token_ids[:, None])[:, 0]
    assert lp.shape == (1, e - s) and lp.dtype == torch.float32
    assert torch.allclose(lp[0], ref, atol=1e-4)


@pytest.mark.parametrize("fam", FAMS)
def test_teacher_forcing_agrees_with_generation(tiny_adapters, fam):
    a = tiny_adapters[fam]
    p = a.prepare(_img(seed=3), Q)
    with torch.inference_mode():
        out = a.model.generate(**p.inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=a.tokenizer.pad_token_id)
    gen = out.sequences[0, p.prompt_len :]
    gen_lp = torch.stack([torch.log_softmax(l[0].float(), -1) for l in out.logits])  # (4, V)
    tf = a.with_answer_ids(p, gen)
    lp = score_chat(a, tf)[0]
    assert torch.allclose(lp, gen_lp.gather(-1, gen[:, None])[:, 0], atol=1e-4)
    # greedy token = argmax of the teacher-forced distribution at that position
    with torch.inference_mode():
        h = a.hidden_states(tf.inputs)[0][0, p.prompt_len - 1 : p.prompt_len + 3]
        assert torch.equal(a.logits_from_hidden(h).argmax(-1), gen)


def test_qwen_needs_mm_token_type_ids(tiny_adapters):
    """Without mm_token_type_ids transformers 5 silently uses text-only rotary positions."""
    a = tiny_adapters["qwen_vl"]
    c = a.prepare(_img(), Q, "Yes")
    lp = score_chat(a, c)
    inputs = {k: v for k, v in c.inputs.items() if k != "mm_token_type_ids"}
    with torch.inference_mode():
        h = a.hidden_states(inputs)[0]
        s, e = c.answer_span
        bad = torch.log_softmax(a.logits_from_hidden(h[:, s - 1 : e - 1]), -1)[0, 0, c.answer_token_ids[0]]
    assert abs(bad.item() - lp[0, 0].item()) > 1e-4


@pytest.mark.parametrize("fam", FAMS)
def test_batch_equals_single_and_masking(tiny_adapters, fam):
    a = tiny_adapters[fam]
    c = a.prepare(_img(seed=4), Q, "No")
    gh, gw = c.grid_hw
    keep = torch.ones(4, gh, gw)
    keep[1, 0, 0] = 0
    keep[2, :, : gw // 2] = 0
    keep[3] = 0
    pv = a.masked_pixel_values(c, keep)
    assert torch.allclose(pv[0], c.inputs["pixel_values"], atol=1e-6)  # keep-all is the original
    full_black = a.pixel_values_to_images(pv[3], c)
    assert torch.allclose(full_black, a.black_level[:, None, None].expand_as(full_black), atol=1e-6)
    batched = score_chat(a, c, pv, batch_size=4)
    single = torch.cat([score_chat(a, c, pv[i : i + 1], batch_size=1) for i in range(4)])
    assert batched.shape == (4, c.n_answer_tokens)
    assert torch.allclose(batched, single, atol=1e-4)
    assert torch.allclose(batched[0], score_chat(a, c)[0], atol=1e-4)
    assert not torch.allclose(batched[0], batched[3], atol=1e-4)  # the image matters
    # answer_logprobs over images of one size batches them and equals per-image scoring
    imgs = [_img(seed=5), _img(seed=6)]
    al = answer_logprobs(a, imgs, Q, "No", batch_size=2)
    per = torch.cat([answer_logprobs(a, im, Q, "No") for im in imgs])
    assert torch.allclose(al, per, atol=1e-4)
    mixed = [_img(seed=5), _img(40, 120, seed=6)]  # different letterboxes, same text
    am = answer_logprobs(a, mixed, Q, "No")
    assert torch.allclose(am[0], per[0], atol=1e-4) and am.shape == (2, c.n_answer_tokens)


def test_qwen_patch_space_masking_equals_the_generic_path(tiny_adapters):
    """Qwen blends in patch space; the result must be the generic unpatchify -> blend -> patchify's."""
    from medfocus.lvlm.adapter import LVLMAdapter

    a = tiny_adapters["qwen_vl"]
    c = a.prepare(_img(60, 90, seed=8), Q, "Yes")  # letterboxed: padding rows/columns too
    W, H = a.canvas_size
    g = torch.Generator().manual_seed(0)
    soft = torch.rand(3, H, W, generator=g)  # soft keeps (RISE-like), full resolution
    cells = (torch.rand(3, *c.grid_hw, generator=g) > 0.5).float()  # token-grid keeps (occlusion-like)
    image_baseline = torch.randn(3, H, W, generator=g)
    for keep in (soft, cells):
        for baseline in ("zero", "mean", image_baseline):
            fast = a.masked_pixel_values(c, keep, baseline)
            ref = LVLMAdapter.masked_pixel_values(a, c, keep, baseline)
            assert fast.shape == ref.shape and torch.allclose(fast, ref, atol=1e-5)
    with pytest.raises(ValueError, match="baseline"):
        a.masked_pixel_values(c, soft, "blur")


def test_qwen_cpu_patch_embedding_is_the_conv3d_as_a_matmul(tiny_adapters):
    """The CPU fast path of the patch embedding computes what the checkpoint's Conv3d computes: the same
    values and pixel gradients, and the same answer scores through the whole model."""
    import types

    from medfocus.lvlm.families.qwen_vl import use_linear_patch_embed

    a = tiny_adapters["qwen_vl"]
    pe = a.model.model.visual.patch_embed
    assert a.linear_patch_embed and isinstance(pe.forward, types.MethodType) and "forward" in vars(pe)
    c = a.prepare(_img(seed=3), Q, "Yes")
    pv = c.inputs["pixel_values"].clone().requires_grad_(True)
    fast = pe(pv)
    conv = type(pe).forward(pe, pv)  # the class's Conv3d forward
    assert fast.shape == conv.shape and torch.allclose(fast, conv, atol=1e-5)
    g_fast, g_conv = (torch.autograd.grad(y.square().sum(), pv)[0] for y in (fast, conv))
    assert torch.allclose(g_fast, g_conv, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        lp_fast = score_chat(a, c, c.inputs["pixel_values"][None])
        del pe.forward  # back to the Conv3d for the reference score
        try:
            lp_conv = score_chat(a, c, c.inputs["pixel_values"][None])
        finally:
            assert use_linear_patch_embed(pe)
    assert torch.allclose(lp_fast, lp_conv, atol=1e-5)
    # not switched: a convolution with a bias or a stride other than its kernel, or one owned by an accelerate hook
    assert not use_linear_patch_embed(types.SimpleNamespace(proj=torch.nn.Conv3d(3, 4, (2, 14, 14), stride=(2, 14, 14))))
    assert not use_linear_patch_embed(types.SimpleNamespace(proj=torch.nn.Conv3d(3, 4, (2, 14, 14), stride=1, bias=False)))
    hooked = types.SimpleNamespace(proj=torch.nn.Conv3d(3, 4, (2, 14, 14), stride=(2, 14, 14), bias=False), _hf_hook=object())
    assert not use_linear_patch_embed(hooked)


@pytest.mark.parametrize("fam", FAMS)
def test_gradients_reach_pixels_and_image_features(tiny_adapters, fam):
    a = tiny_adapters[fam]
    c = a.prepare(_img(seed=7), Q, "Yes")
    pv = c.inputs["pixel_values"].clone().requires_grad_(True)
    feats = []
    handle = a.image_feature_module.register_forward_hook(lambda m, i, o: feats.append(a.image_features_from_output(o)))
    try:
        lp = score_chat(a, c, pv[None], grad=True)
    finally:
        handle.remove()
    assert len(feats) == 1 and feats[0].reshape(-1, feats[0].shape[-1]).shape[0] == c.grid_hw[0] * c.grid_hw[1]
    g_feat = torch.autograd.grad(lp.sum(), [pv, feats[0]])
    assert g_feat[0].abs().sum() > 0 and g_feat[1].abs().sum() > 0
    # per-token-cell gradients are spatially non-degenerate
    g_img = a.pixel_values_to_images(g_feat[0], c).abs().sum(0)
    assert g_img.shape == (a.canvas_size[1], a.canvas_size[0]) and (g_img > 0).float().mean() > 0.5


@pytest.mark.parametrize("fam", FAMS)
def test_eager_attentions_hidden_states_and_geometry(tiny_adapters, fam):
    a = tiny_adapters[fam]
    c = a.prepare(_img(120, 90, seed=8), Q, "Yes")
    with a.eager_attention(), torch.inference_mode():
        out = a.hidden_states(c.inputs, output_attentions=True, output_hidden_states=True)
    S = c.inputs["input_ids"].shape[1]
    assert len(out.attentions) == len(a.decoder_layers) and out.attentions[-1].shape[-2:] == (S, S)
    assert torch.allclose(out.attentions[-1].sum(-1), torch.ones(()), atol=1e-4)
    assert len(out.hidden_states) == len(a.decoder_layers) + 1
    gh, gw = c.grid_hw
    m = np.zeros((gh, gw), np.float32)
    m[0, gw - 1] = 1.0  # top-right token cell
    orig = a.grid_to_original(m, c)
    assert orig.shape == (120, 90)
    ys, xs = np.nonzero(orig > 0.5)
    assert ys.min() == 0 and xs.max() == 89 and xs.min() > 45


@pytest.mark.parametrize("fam", FAMS)
def test_generate_batched(tiny_adapters, fam):
    a = tiny_adapters[fam]
    imgs = [_img(seed=9), _img(seed=10), _img(60, 100, seed=11)]
    qs = [Q, question_stem("mass") + SUFFIXES["cot"], Q]
    batched = a.generate(imgs, qs, max_new_tokens=3, batch_size=3)
    single = [a.generate([im], [q], max_new_tokens=3)[0] for im, q in zip(imgs, qs)]
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert batched == single


def test_generate_answers_modes_append_suffix(tiny_adapters):
    from medfocus.lvlm.generation import generate_answers

    a = tiny_adapters["qwen_vl"]
    stem = question_stem("cardiomegaly")
    out = generate_answers(a, [_img(seed=12)] * 2, [stem] * 2, "cot", max_new_tokens=3)
    assert [g.question for g in out] == [stem + SUFFIXES["cot"]] * 2
    assert out[0].text == a.generate([_img(seed=12)], [stem + SUFFIXES["cot"]], max_new_tokens=3)[0]
    assert out[0].answer in ("Yes", "No", None)


def test_answer_logprobs_from_pixel_tensor(tiny_adapters):
    a = tiny_adapters["llava"]
    c = a.prepare(_img(seed=13), Q, "No")
    pv = c.inputs["pixel_values"][None].repeat(2, *([1] * c.inputs["pixel_values"].dim()))
    lp = answer_logprobs(a, pv, Q, "No", chat=c)
    assert lp.shape == (2, c.n_answer_tokens) and torch.allclose(lp[0], lp[1], atol=1e-5)
    with pytest.raises(Exception, match="chat="):
        answer_logprobs(a, pv, Q, "No")
