"""RadEdit editor: genuine diffusers/transformers architectures, tiny and randomly initialised,
saved and loaded through the real loading code; the keep-mask fix; clear errors without weights."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from medfocus.editing import boxes_mask, get_editor
from medfocus.errors import ModelError

diffusers = pytest.importorskip("diffusers", reason="radedit tests need the optional extra: pip install 'medfocus[radedit]'")


@pytest.fixture(scope="module")
def tiny_radedit_dir(tmp_path_factory):
    """unet/, vae/, text_encoder/ (+ a locally trained WordPiece tokenizer) in the layout
    RadEditEditor(weights_dir=...) loads."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("radedit")
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = ["no nodule", "no abnormality", "no pleural effusion", "no cardiomegaly", "mass consolidation"] * 4
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(root / "text_encoder")
    te = BertModel(BertConfig(vocab_size=len(fast), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, max_position_embeddings=130))
    te.save_pretrained(root / "text_encoder")
    return root


def _editor(root, **kw):
    kw = {"steps": 6, "image_size": 32, "keep_margin": 4, "feather": 2, "device": "cpu", **kw}
    return get_editor("radedit", weights_dir=root, **kw)


def test_radedit_loads_and_edits_only_inside_mask(tiny_radedit_dir):
    rng = np.random.default_rng(0)
    img = rng.integers(40, 200, size=(40, 30)).astype(np.uint8)  # non-square: letterboxed to 32x32
    mask = boxes_mask([(5, 8, 20, 25)], (30, 40))
    ed = _editor(tiny_radedit_dir)
    out = ed.edit(img, mask, "No nodule")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], img[~mask])
    assert (out[mask] != img[mask]).any()
    # deterministic under the seed (the inversion noise), different with another seed
    assert np.array_equal(ed.edit(img, mask, "No nodule"), out)
    assert not np.array_equal(_editor(tiny_radedit_dir, seed=1).edit(img, mask, "No nodule"), out)


def test_radedit_keep_region_is_pasted_at_the_matching_noise_level(tiny_radedit_dir):
    """The public pipeline leaves the kept latents one step too noisy; ours end exactly at z0."""
    ed = _editor(tiny_radedit_dir)
    S = 32
    canvas = np.random.default_rng(1).integers(0, 255, size=(S, S)).astype(np.uint8)
    e = np.zeros((S, S), bool)
    e[4:14, 4:14] = True
    keep = np.ones((S, S), bool)
    keep[:18, :18] = False
    out = ed.edit_latents(canvas, e, keep, "No nodule")
    z0, lat = out["z0"], out["latents"]
    k = out["keep"]
    assert k.sum() > 0 and not (k & out["edit"]).any()
    assert np.isfinite(lat.numpy()).all()  # no NaN from the zero-variance last step
    assert np.array_equal(lat[0][:, k].numpy(), z0[0][:, k].numpy())
    assert not np.allclose(lat[0][:, ~k].numpy(), z0[0][:, ~k].numpy())  # the rest was regenerated


def test_radedit_without_diffusers_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    ed = get_editor("radedit")  # lazy: constructing it needs nothing
    with pytest.raises(ModelError, match=r"medfocus\[radedit\]"):
        ed.edit(np.zeros((8, 8), np.uint8), np.ones((8, 8), bool), "No nodule")


def test_radedit_without_weights_names_the_component(tmp_path):
    with pytest.raises(ModelError, match="UNet.*microsoft/radedit"):
        get_editor("radedit", weights_dir=tmp_path).prepare()


def test_radedit_inversion_reconstructs_exactly_without_guidance(tiny_radedit_dir):
    """Edit-friendly inversion: with guidance 0 the reverse process retraces the inverted latents,
    down to z0 itself (the zero-variance last step included), whatever the masks."""
    ed = _editor(tiny_radedit_dir, guidance_scale=0.0)
    S = 32
    canvas = np.random.default_rng(2).integers(0, 255, size=(S, S)).astype(np.uint8)
    e = np.ones((S, S), bool)
    out = ed.edit_latents(canvas, e, ~e, "No nodule")
    assert not out["keep"].any()
    np.testing.assert_allclose(out["latents"].numpy(), out["z0"].numpy(), atol=1e-4)
    # with guidance the edit region moves away from z0
    out7 = _editor(tiny_radedit_dir, guidance_scale=7.5).edit_latents(canvas, e, ~e, "No nodule")
    assert np.abs(out7["latents"].numpy() - out7["z0"].numpy()).max() > 1e-3


def _counted_cached_edits(weights_dir, tmp_path, *, seed: int, prompt: str, film_sha256: str):
    """A copy of ``weights_dir`` under ``tmp_path/w``, a nodule sample on a random 32x32 film and
    ``edit(editor)``: a foreground edit through an :class:`EditCache`, each computed (not cached) edit
    appending to ``calls``. Returns ``(root, sample, edit, calls)``."""
    import shutil

    from medfocus.editing import EditCache
    from medfocus.types import Sample, question_stem

    root = tmp_path / "w"
    shutil.copytree(weights_dir, root)
    img = np.random.default_rng(seed).integers(40, 200, size=(32, 32)).astype(np.uint8)
    mask = boxes_mask([(8, 8, 20, 20)], (32, 32))
    s = Sample("d", 0, str(tmp_path / "x.png"), "nodule", question_stem("nodule"), "Yes", [(8, 8, 20, 20)], (32, 32))
    cache = EditCache(tmp_path / "cache")
    calls: list[int] = []

    def edit(ed):
        orig = ed._edit
        ed._edit = lambda *a, **k: calls.append(1) or orig(*a, **k)
        return cache.get_or_edit(ed, img, mask, sample=s, kind="foreground", prompt=prompt, film_sha256=film_sha256)

    return root, s, edit, calls


def test_radedit_edits_are_keyed_on_the_weights(tiny_radedit_dir, tmp_path):
    """Retrained weights in the same folder (same settings, same cache_id) are another edit; the same
    weights are still a cache hit."""
    import torch

    root, s, edit, calls = _counted_cached_edits(tiny_radedit_dir, tmp_path, seed=1, prompt="No nodule", film_sha256="a" * 64)

    first = _editor(root)
    a = edit(first)
    same = _editor(root)
    assert same.sample_inputs(s) == first.sample_inputs(s)
    assert np.array_equal(edit(same), a) and len(calls) == 1
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05)
    unet.save_pretrained(root / "unet")  # "retrained" in place
    retrained = _editor(root)
    assert retrained.cache_id == first.cache_id
    assert retrained.sample_inputs(s)["weights"]["unet"] != first.sample_inputs(s)["weights"]["unet"]
    edit(retrained)
    assert len(calls) == 2


def test_radedit_weights_identity_of_hub_snapshots_and_loaded_components(tiny_radedit_dir, tmp_path, monkeypatch):
    """Hub ids are identified by their cached snapshot's revision (the UNet's in its ``unet/`` subfolder);
    components passed in are identified by their parameters."""
    import huggingface_hub.constants as hfc

    from medfocus.editing.radedit import load_radedit_components

    for repo, sub in (("me/radedit", "unet/"), ("me/vae", ""), ("me/te", "")):
        snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / f"rev-{repo[3:]}" / sub
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
        (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
        (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(f"rev-{repo[3:]}")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    ed = get_editor("radedit", unet_id="me/radedit", vae_id="me/vae", text_encoder_id="me/te")
    assert ed.weights_identity() == {"unet": "rev-radedit", "vae": "rev-vae", "text_encoder": "rev-te"}
    assert get_editor("radedit", unet_id="me/other").weights_identity()["unet"] is None  # not cached

    comps = load_radedit_components(weights_dir=tiny_radedit_dir, device="cpu")
    a = get_editor("radedit", components=comps).weights_identity()
    assert a == get_editor("radedit", components=load_radedit_components(weights_dir=tiny_radedit_dir, device="cpu")).weights_identity()
    next(comps.vae.parameters()).data.add_(1.0)
    b = get_editor("radedit", components=comps).weights_identity()
    assert b["vae"] != a["vae"] and b["unet"] == a["unet"] and b["text_encoder"] == a["text_encoder"]


def test_radedit_edits_are_keyed_on_the_tokenizer(tiny_radedit_dir, tmp_path):
    """Another tokenizer changes the text conditioning without touching any weights: the edit cache key
    changes (a miss), while the unchanged folder keeps its key (a hit)."""
    import json

    from transformers import AutoTokenizer

    from medfocus.editing.radedit import load_radedit_components

    root, s, edit, calls = _counted_cached_edits(tiny_radedit_dir, tmp_path, seed=2, prompt="No pleural effusion",
                                                 film_sha256="b" * 64)

    first = _editor(root)
    edit(first)
    assert _editor(root).sample_inputs(s) == first.sample_inputs(s)
    edit(_editor(root))
    assert len(calls) == 1  # unchanged folder: a hit
    given = get_editor("radedit", components=load_radedit_components(weights_dir=root, device="cpu")).weights_identity()

    te = root / "text_encoder"
    weights_before = {f.name: f.read_bytes() for f in te.iterdir() if f.name in ("config.json", "model.safetensors")}
    ids = AutoTokenizer.from_pretrained(te)("No pleural effusion")["input_ids"]
    spec = json.loads((te / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["no"], vocab["[UNK]"] = vocab["[UNK]"], vocab["no"]  # "no" and the unknown piece trade ids
    (te / "tokenizer.json").write_text(json.dumps(spec))
    assert AutoTokenizer.from_pretrained(te)("No pleural effusion")["input_ids"] != ids
    assert {f.name: f.read_bytes() for f in te.iterdir() if f.name in weights_before} == weights_before
    retok = _editor(root)
    assert retok.cache_id == first.cache_id
    a, b = first.sample_inputs(s)["weights"], retok.sample_inputs(s)["weights"]
    assert b["text_encoder"] != a["text_encoder"] and {k: v for k, v in b.items() if k != "text_encoder"} == {
        k: v for k, v in a.items() if k != "text_encoder"}
    edit(retok)
    assert len(calls) == 2  # a miss: edited again with the new tokenizer
    # components passed in: their tokenizer is fingerprinted as it would be saved
    given2 = get_editor("radedit", components=load_radedit_components(weights_dir=root, device="cpu")).weights_identity()
    assert given2["text_encoder_files"] != given["text_encoder_files"] and given2["text_encoder"] == given["text_encoder"]
