"""Prompting baselines: safe parsing, canvas -> original mapping, OWL-ViT + MedSAM plumbing on tiny
random-initialised genuine transformers models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfocus.attribution import get_method
from medfocus.attribution.prompting import (
    BOX_REQUEST,
    OwlDetector,
    boxes_heatmap,
    parse_phrases,
    question_stem_of,
    top_box_per_query,
)
from medfocus.attribution.testing import ToyAdapter
from medfocus.lvlm.box_text import parse_boxes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning OpenMP threads
    make each tiny op hundreds of times slower; restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


Q = "Is there evidence of nodule in the image? Answer directly with yes or no without any explanation."


def test_parse_boxes_formats_and_safety(tmp_path) -> None:
    assert parse_boxes("[[10, 20, 30, 40]]", 100, 100).boxes == [(10.0, 20.0, 30.0, 40.0)]
    # corners re-ordered, clipped, degenerate dropped, floats and prose accepted
    assert parse_boxes("boxes: [[30,40,10,20], [-5, 0, 5.5, 120], [7, 7, 7, 9]]", 100, 100).boxes == [
        (10.0, 20.0, 30.0, 40.0), (0.0, 0.0, 5.5, 100.0)]
    assert parse_boxes('{"bbox_2d": [1, 2, 3, 4], "label": "nodule"}', 10, 10).boxes == [(1.0, 2.0, 3.0, 4.0)]
    assert parse_boxes("[[0, 0, 500, 1000]]", 200, 100, coords="norm1000").boxes == [(0.0, 0.0, 100.0, 100.0)]
    assert parse_boxes("[[0.5, 0.5, 1, 1]]", 200, 100, coords="relative").boxes == [(100.0, 50.0, 200.0, 100.0)]
    # model output is never executed
    marker = tmp_path / "pwned"
    assert parse_boxes(f"__import__('pathlib').Path('{marker}').touch() [[1, 2]]", 10, 10).boxes == []
    assert not marker.exists()
    assert parse_boxes("", 10, 10).boxes == [] and parse_boxes("no boxes here", 10, 10).boxes == []


def test_parse_phrases() -> None:
    assert parse_phrases('["cardiac silhouette", "left lower lung"]') == ["cardiac silhouette", "left lower lung"]
    assert parse_phrases("- right apex\n- Right apex\n2) costophrenic angle.") == ["right apex", "costophrenic angle"]
    assert parse_phrases("The evidence: 'enlarged heart' and 'blunted angle'") == ["enlarged heart", "blunted angle"]
    assert parse_phrases("[]") == [] and parse_phrases("") == []


def test_question_stem_of_strips_the_mode_suffix() -> None:
    assert question_stem_of(Q) == "Is there evidence of nodule in the image?"


def test_prompting_maps_canvas_boxes_to_original_pixels() -> None:
    toy = ToyAdapter()
    # 64 wide x 48 high -> canvas 32x32: scale 0.5, vertical padding 4 canvas pixels
    img = np.zeros((48, 64), np.uint8)
    toy.scripted_generation = ["The evidence is at [[10, 8, 20, 16], [0, 0, 32, 3]]."]
    res = get_method("prompting").attribute(toy, img, Q, "Yes")
    assert res.boxes == [(20.0, 8.0, 40.0, 24.0)]  # the second box lies entirely in the padding
    assert res.extras["prompt"].endswith(BOX_REQUEST) and "Answer directly" not in res.extras["prompt"]
    assert res.heatmap.shape == (48, 64) and res.heatmap.sum() == 20 * 16
    assert res.heatmap[8:24, 20:40].min() == 1.0 and res.n_forward == 1


def test_boxes_heatmap_half_open() -> None:
    hm = boxes_heatmap([(3, 1, 6, 2), (5, 1, 7, 3)], (4, 8))
    assert hm[1, 3:5].tolist() == [1, 1] and hm[1, 5] == 2 and hm[2, 5:7].tolist() == [1, 1] and hm.sum() == 3 + 4


def test_top_box_per_query_known_answer() -> None:
    logits = torch.tensor([[0.0, 5.0], [3.0, -1.0], [1.0, 0.0]])  # 3 patches, 2 queries
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.9, 0.9, 0.1, 0.1]])
    boxes, scores = top_box_per_query(logits, pred, width=200, height=100)
    assert boxes[0] == (0.0, 0.0, 100.0, 100.0) and boxes[1] == pytest.approx((80.0, 40.0, 120.0, 60.0))
    assert scores == pytest.approx([float(torch.sigmoid(torch.tensor(3.0))), float(torch.sigmoid(torch.tensor(5.0)))])


def _byte_chars() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_owl_and_sam():
    """Tiny random-initialised OWL-ViT (with a locally built byte-level CLIP tokenizer) and SAM."""
    from transformers import (CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor,
                              SamConfig, SamImageProcessor, SamModel, SamProcessor)

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    V = len(vocab)
    torch.manual_seed(0)
    owl = OwlViTForObjectDetection(OwlViTConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16),
        projection_dim=32))
    with torch.no_grad():  # random box-head outputs saturate; shrink them so boxes sit near each patch's prior box
        owl.box_head.dense2.weight.mul_(1e-3)
        owl.box_head.dense2.bias.zero_()
    owl_proc = OwlViTProcessor(image_processor=OwlViTImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64}),
                               tokenizer=tok)
    sam = SamModel(SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16, output_channels=32,
                           mlp_dim=64, global_attn_indexes=[0], window_size=0, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32)))
    sam_proc = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    return (owl, owl_proc), (sam, sam_proc)


def test_prompting_medsam_end_to_end_on_tiny_models(tiny_owl_and_sam) -> None:
    owl, sam = tiny_owl_and_sam
    toy = ToyAdapter()
    toy.scripted_generation = ['["cardiac silhouette", "left lower lung", "cardiac silhouette"]']
    img = np.random.default_rng(0).integers(0, 255, size=(48, 80)).astype(np.uint8)
    res = get_method("prompting_medsam", detector=OwlDetector(*owl), medsam=sam).attribute(toy, img, Q, "Yes")
    assert res.extras["phrases"] == ["cardiac silhouette", "left lower lung"]
    assert len(res.boxes) == len(res.extras["detector_boxes"]) >= 1
    for x1, y1, x2, y2 in res.boxes + res.extras["detector_boxes"]:
        assert 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 48
    assert res.heatmap.shape == (48, 80) and res.heatmap.dtype == np.float32
    assert res.n_forward == 3  # generate + detector + MedSAM
    # without refinement the heatmap is the detector boxes' indicator
    res2 = get_method("prompting_medsam", detector=owl, medsam="none").attribute(toy, img, Q, "Yes")
    assert res2.boxes == res.extras["detector_boxes"] and res2.n_forward == 2
    # nothing parseable -> no boxes, an empty map, no detector call
    toy.scripted_generation = [""]
    res3 = get_method("prompting_medsam", detector=owl, medsam=sam).attribute(toy, img, Q, "Yes")
    assert res3.boxes == [] and res3.heatmap.sum() == 0 and res3.n_forward == 1


def test_missing_weights_give_a_clear_error() -> None:
    from medfocus.errors import ModelError

    toy = ToyAdapter()
    toy.scripted_generation = ['["heart"]']
    with pytest.raises(ModelError, match="not available locally"):
        get_method("prompting_medsam", detector="/nonexistent/owlvit").attribute(toy, np.zeros((32, 32), np.uint8), Q, "Yes")
