"""MedFocus end to end: a toy LVLM whose answer depends on a known anatomical region, the registry
entry, generated answers, the fallback, the tiny genuine families and the shipped demo model."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from medfocus.concepts.method import MedFocus, MedFocusMethod, MedFocusResult
from medfocus.concepts.reference import default_pool
from medfocus.concepts.transfer import TransferCache, transfer_concepts
from medfocus.io.letterbox import Letterbox
from medfocus.lvlm.adapter import ChatInputs, LVLMAdapter
from medfocus.types import BILATERAL, CONCEPTS, SUFFIXES

synthetic = pytest.importorskip("medfocus.datasets.synthetic")

CANVAS = 64
VOCAB = ["<bos>", "<sep>", "<eot>", "<unk>", "Yes", "No", "yes", "no", "the", "cardiac", "silhouette", "is", "enlarged",
         ",", "consistent", "with", "cardiomegaly", ".", "so", "answer", "there", "evidence", "of", "in", "image", "?",
         "directly", "or", "without", "any", "explanation", "think", "step", "by", "and"]
TOK = {w: i for i, w in enumerate(VOCAB)}
COT = "The cardiac silhouette is enlarged, consistent with cardiomegaly. So the answer is yes."
#: words whose logit reads the region's brightness, and how strongly
GAIN = {"cardiomegaly": 8.0, "enlarged": 8.0, "Yes": 3.0, "yes": 3.0}
Q = "Is there evidence of cardiomegaly in the image?"


def tokenize(text: str) -> list[int]:
    return [TOK.get(w, TOK.get(w.lower(), TOK["<unk>"])) for w in re.findall(r"\w+|[^\w\s]", text)]


class RegionReader(LVLMAdapter):
    """A toy LVLM implementing :class:`LVLMAdapter` whose answer reads one known region.

    Text: a fixed bigram table (logit 5 for the continuation of the templates ``"Yes"`` and
    :data:`COT`, 0 otherwise). Image: ``f`` = mean brightness (in [0, 1]) of the canvas pixels of
    ``region`` (a mask in original-image pixels); the logits of the words in :data:`GAIN` get
    ``gain * (f - 0.5)`` added at every position. Hiding the region (black baseline) lowers those
    words' log-probabilities and nothing else (other words only gain, through the softmax).
    """

    family = "toy_region"

    def __init__(self, region: np.ndarray, gain_scale: float = 1.0) -> None:
        self.name = "region_reader"
        self.model = torch.nn.Identity()
        self.processor = None
        self.device = torch.device("cpu")
        self.canvas_size = (CANVAS, CANVAS)
        self.black_level = torch.full((3,), -1.0)
        geo = Letterbox.fit((region.shape[1], region.shape[0]), CANVAS)
        self.region = torch.from_numpy(geo.apply(region.astype(np.float32), fill=0.0) > 0.5)
        assert self.region.any()
        V = len(VOCAB)
        self.bigram = torch.zeros(V, V)
        for text in ("Yes", COT):
            ids = [TOK["<sep>"]] + tokenize(text) + [TOK["<eot>"]]
            for p, n in zip(ids, ids[1:]):
                self.bigram[p, n] = 5.0
        self.gain = torch.zeros(V)
        for w, g in GAIN.items():
            self.gain[TOK[w]] = g * gain_scale
        self.n_calls = 0

    def prepare(self, image, question, answer=None, *, include_eot=False) -> ChatInputs:
        img = np.asarray(image)
        geo = Letterbox.fit((img.shape[1], img.shape[0]), CANVAS)
        canvas = torch.from_numpy(geo.apply(img.astype(np.uint8), fill=0).astype(np.float32) / 255.0)
        pv = ((canvas - 0.5) / 0.5)[None].expand(3, -1, -1).clone()
        ids = [TOK["<bos>"]] + tokenize(question) + [TOK["<sep>"]]
        prompt_len = len(ids)
        span, ans_ids, toks = None, None, []
        if answer is not None:
            a = tokenize(answer)
            ids = ids + a + [TOK["<eot>"]]
            n = len(a) + (1 if include_eot else 0)
            span = (prompt_len, prompt_len + n)
            ans_ids = torch.tensor(ids[prompt_len:prompt_len + n])
            toks = [(" " if j else "") + VOCAB[i] for j, i in enumerate(ans_ids.tolist())]  # decoded pieces, like a real tokenizer
        input_ids = torch.tensor([ids])
        return ChatInputs({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pv},
                          prompt_len, span, ans_ids, toks, torch.arange(0), (8, 8), geo, question, answer)

    def batch_inputs(self, chat, pixel_values):
        B = pixel_values.shape[0]
        return {"input_ids": chat.inputs["input_ids"].expand(B, -1), "pixel_values": pixel_values}

    def pixel_values_to_images(self, pixel_values, chat):
        return pixel_values

    def images_to_pixel_values(self, images, chat):
        return images

    def _logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        pv = pixel_values if pixel_values.dim() == 4 else pixel_values[None]
        f = ((pv[:, 0] + 1) / 2)[:, self.region].mean(dim=1)  # (B,)
        return self.bigram[input_ids] + (f[:, None, None] - 0.5) * self.gain[None, None, :]

    def hidden_states(self, inputs, **kw):
        self.n_calls += inputs["pixel_values"].shape[0]
        return (self._logits(inputs["input_ids"], inputs["pixel_values"]),)

    def logits_from_hidden(self, hidden):
        return hidden

    def generate(self, images, questions, *, max_new_tokens=64, batch_size=8):
        outs = []
        for im, q in zip(images, questions):
            chat = self.prepare(im, q)
            ids = chat.inputs["input_ids"]
            words = []
            for _ in range(max_new_tokens):
                nxt = int(self._logits(ids, chat.inputs["pixel_values"])[0, -1].argmax())
                if nxt == TOK["<eot>"]:
                    break
                words.append(VOCAB[nxt])
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            outs.append(" ".join(words))
        return outs

    @property
    def decoder_layers(self):
        return []

    @property
    def image_feature_module(self):
        return self.model


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return default_pool(tmp_path_factory.mktemp("cache"), n=8)


@pytest.fixture(scope="module")
def case():
    return synthetic.generate_case(3, findings=[])


def test_heart_reader_gets_cardiac_silhouette(pool, case):
    heart = case.concept_masks["cardiac silhouette"]
    model = RegionReader(heart)
    q = Q + SUFFIXES["direct"]
    res = MedFocus(model, pool, cache=False).attribute(case.image, q, "Yes")
    assert isinstance(res, MedFocusResult)
    assert not res.fallback
    d = res.deltas
    assert set(d) == set(CONCEPTS) | set(BILATERAL)
    # The synthetic mediastinum (like ImaGenome's mediastinum box) contains the heart, so hiding it
    # hides the heart too: the two are the top-2 concepts, everything else is far behind.
    top2 = {n for n, _ in res.ranking()[:2]}
    assert top2 == {"cardiac silhouette", "mediastinum"}, res.ranking()[:4]
    assert d["cardiac silhouette"] > 0.5
    for other in ("left lung", "right lung", "left clavicle", "right clavicle", "upper mediastinum", "costophrenic angles",
                  "left hilar structures", "right hilar structures"):
        assert d[other] < 0.6 * d["cardiac silhouette"], (other, d)
    assert res.concept == res.ranking()[0][0]
    assert res.box == res.concept_boxes[res.concept] and res.boxes == [res.box]
    # the heatmap peaks on the heart
    H, W = case.image.shape
    # in nats, not normalised: sum over concepts of the positive drops x their soft masks
    want = sum(np.float32(dv) * res.variant_soft_mask(n) for n, dv in d.items() if dv > 0)
    np.testing.assert_allclose(res.heatmap, want, rtol=1e-6, atol=1e-7)
    assert res.heatmap.shape == (H, W) and res.heatmap.max() > 0.5  # the heart's own drop (> 0.5 nats) is under it
    assert res.heatmap[heart].mean() > 2 * res.heatmap[~heart].mean()
    # one batched scoring pass over 15 variants + the original, and nothing else
    assert res.passes == {"generate": 0, "forward": 16} and model.n_calls == 16
    assert res.reference_id in pool.ids
    assert set(res.seconds) == {"generate", "transfer", "intervention", "total"}


def _box_of(m):
    ys, xs = np.nonzero(m)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def test_mask_region_separates_concepts_whose_boxes_overlap():
    """An enlarged heart reader, exact concept boxes vs exact masks: the left-lung *box* contains the
    heart's left border (hiding it costs the answer), the left-lung *mask* does not."""
    from medfocus.concepts.intervention import intervene

    case = synthetic.generate_case(100, findings=["cardiomegaly"], severity=1.0)
    heart = case.concept_masks["cardiac silhouette"]
    model = RegionReader(heart)
    chat = model.prepare(case.image, Q + SUFFIXES["direct"], "Yes")
    boxes, soft = _exact(case)  # an empty exact mask (the enlarged heart may hide a hilum): a dummy box
    by_box = dict(zip(*(lambda r: (r.names, r.deltas))(intervene(model, chat, boxes))))
    by_mask = dict(zip(*(lambda r: (r.names, r.deltas))(intervene(model, chat, boxes, region="mask", soft_masks=soft))))
    assert by_box["left lung"] > 0.3 * by_box["cardiac silhouette"]
    assert by_mask["left lung"] < 0.03 * by_mask["cardiac silhouette"]
    assert by_mask["cardiac silhouette"] == pytest.approx(max(by_mask.values()))
    assert by_mask["cardiac silhouette"] == pytest.approx(by_box["cardiac silhouette"], rel=0.1)
    with pytest.raises(ValueError, match="soft_masks"):
        intervene(model, chat, boxes, region="mask")


def test_mask_region_with_an_empty_mask_hides_the_box(pool, case):
    from medfocus.concepts.intervention import intervene

    heart = case.concept_masks["cardiac silhouette"]
    model = RegionReader(heart)
    chat = model.prepare(case.image, Q + SUFFIXES["direct"], "Yes")
    boxes = {c: _box_of(case.concept_masks[c]) for c in CONCEPTS}
    soft = {c: case.concept_masks[c].astype(np.float32) for c in CONCEPTS}
    soft["cardiac silhouette"] = np.zeros_like(soft["cardiac silhouette"])
    r_box = intervene(model, chat, boxes)
    r_mask = intervene(model, chat, boxes, region="mask", soft_masks=soft)
    i = r_box.names.index("cardiac silhouette")
    assert r_mask.deltas[i] == pytest.approx(r_box.deltas[i]) and r_mask.deltas[i] > 0.5


def _exact(case):
    """Exact concept boxes (a dummy 1-pixel box for an empty mask) and masks as soft masks."""
    boxes = {c: _box_of(case.concept_masks[c]) if case.concept_masks[c].any() else (0.0, 0.0, 1.0, 1.0) for c in CONCEPTS}
    return boxes, {c: case.concept_masks[c].astype(np.float32) for c in CONCEPTS}


@pytest.mark.parametrize("column_share, expected", [(0.03, "cardiac silhouette"), (0.5, "mediastinum"), (1.0, "mediastinum")])
def test_nested_rule(case, column_share, expected):
    """A reader of the heart plus part of the mediastinal column (mask regions, exact masks).
    The mediastinum contains both, so argmax names it; the nested rule hides the mediastinum
    except the heart: when the column carries little of the reading (3%) the rest is not necessary
    and the heart wins; when it carries half, or the reader sees only the column, the mediastinum stays."""
    from medfocus.concepts.intervention import decide, intervene, nested_winner

    heart = case.concept_masks["cardiac silhouette"]
    column = case.concept_masks["mediastinum"] & ~heart
    ys, xs = np.nonzero(column)
    # take the column's pixels top-down until they are column_share of the region read
    n_col = column.sum() if column_share == 1.0 else int(round(column_share / (1 - column_share) * heart.sum()))
    order = np.argsort(ys, kind="stable")[::-1][:n_col]  # the lowest rows of the column, next to the heart
    region = np.zeros_like(heart) if column_share == 1.0 else heart.copy()
    region[ys[order], xs[order]] = True
    model = RegionReader(region, gain_scale=2.0)
    chat = model.prepare(case.image, Q + SUFFIXES["direct"], "Yes")
    boxes, soft = _exact(case)
    iv = intervene(model, chat, boxes, region="mask", soft_masks=soft)
    d = dict(zip(iv.names, iv.deltas))
    w, fb = decide(iv.names, iv.deltas)
    assert not fb and w == "mediastinum", d
    final, checks, n = nested_winner(model, chat, iv, w)
    assert final == expected, [vars(c) for c in checks]
    if column_share < 1.0:
        heart_check = [c for c in checks if c.inner == "cardiac silhouette"]
        assert len(heart_check) == 1 and heart_check[0].container == "mediastinum"
        assert heart_check[0].accepted == (expected == "cardiac silhouette")
        assert n >= 1
    else:  # the heart alone is not necessary: it is not even tested
        assert d["cardiac silhouette"] < -math.log(0.75) and not any(c.inner == "cardiac silhouette" for c in checks)


def test_nested_rule_through_medfocus(pool, case):
    heart = case.concept_masks["cardiac silhouette"]
    model = RegionReader(heart)
    res = MedFocus(model, pool, cache=False, rule="nested").attribute(case.image, Q + SUFFIXES["direct"], "Yes")
    # heart and mediastinum boxes both hide the heart; whichever argmax picks, the answer is the heart
    assert res.concept == "cardiac silhouette" and res.rule == "nested"
    assert res.passes["forward"] == 16 + len(res.nested_checks)
    att = res.to_attribution()
    assert att.extras["rule"] == "nested" and att.extras["nested_checks"] == res.nested_checks


def test_lung_reader_gets_that_lung(pool, case):
    # radiological left = image right: the "left lung" concept mask is on the image's right side
    lung = case.concept_masks["left lung"]
    res = MedFocus(RegionReader(lung), pool, cache=False).attribute(case.image, Q + SUFFIXES["direct"], "Yes")
    assert res.concept in ("left lung", "lungs"), res.ranking()[:3]
    assert res.deltas["left lung"] > res.deltas["right lung"]


def test_token_level_drop_on_finding_words(pool, case):
    model = RegionReader(case.concept_masks["cardiac silhouette"])
    res = MedFocus(model, pool, cache=False).attribute(case.image, Q + SUFFIXES["cot"], COT)
    assert res.concept in ("cardiac silhouette", "mediastinum")
    td = res.token_deltas["cardiac silhouette"]
    toks = [t.strip() for t in res.answer_tokens]
    assert len(td) == len(toks) == len(tokenize(COT))
    top = {toks[i] for i in np.argsort(-td)[:2]}
    assert top == {"cardiomegaly", "enlarged"}, list(zip(toks, td.round(3)))
    # words that do not read the image lose nothing
    for i, t in enumerate(toks):
        if t not in GAIN:
            assert td[i] == pytest.approx(0.0, abs=1e-6)
    th = res.token_heatmaps()
    assert th.shape == (len(toks),) + case.image.shape
    assert th[toks.index("cardiac")].max() == pytest.approx(0.0, abs=1e-6)


def test_image_blind_model_falls_back_to_whole_image(pool, case):
    model = RegionReader(case.concept_masks["cardiac silhouette"], gain_scale=0.0)
    res = MedFocus(model, pool, cache=False).attribute(case.image, Q + SUFFIXES["direct"], "Yes")
    assert res.fallback and res.concept == "whole image"
    H, W = case.image.shape
    assert res.box == (0.0, 0.0, float(W), float(H))
    assert max(res.deltas.values()) <= -math.log(0.75)
    assert res.heatmap.max() == 0.0


def test_tau_controls_fallback(pool, case):
    model = RegionReader(case.concept_masks["cardiac silhouette"], gain_scale=0.05)
    mf_hi = MedFocus(model, pool, cache=False, tau=0.99)
    mf_lo = MedFocus(model, pool, cache=False, tau=0.3)
    r_hi = mf_hi.attribute(case.image, Q + SUFFIXES["direct"], "Yes")
    r_lo = mf_lo.attribute(case.image, Q + SUFFIXES["direct"], "Yes")
    dmax = max(r_hi.deltas.values())
    assert 0 < dmax < -math.log(0.3) and dmax > -math.log(0.99)
    assert not r_hi.fallback and r_lo.fallback


def test_generates_answer_when_none(pool, case):
    model = RegionReader(case.concept_masks["cardiac silhouette"])
    res = MedFocus(model, pool, cache=False).attribute(case.image, Q + SUFFIXES["direct"])
    assert res.answer == "Yes" and res.passes["generate"] == 1 and res.concept in ("cardiac silhouette", "mediastinum")


def test_registry_entry_returns_the_baselines_result_type(pool, case, tmp_path):
    from medfocus.attribution import get_method
    from medfocus.attribution.base import Attribution

    m = get_method("medfocus", pool=str(pool.root), cache=str(tmp_path))
    assert isinstance(m, MedFocusMethod)
    model = RegionReader(case.concept_masks["cardiac silhouette"])
    att = m.attribute(model, case.image, Q + SUFFIXES["cot"], COT)
    assert isinstance(att, Attribution)
    H, W = case.image.shape
    assert att.heatmap.shape == (H, W) and att.heatmap.dtype == np.float32
    assert att.boxes and att.extras["concept"] in ("cardiac silhouette", "mediastinum")
    assert att.token_heatmaps.shape == (len(tokenize(COT)), H, W)
    assert att.n_forward == 16 and att.n_backward == 0 and att.seconds > 0
    assert att.extras["token_deltas"].shape == (15, len(tokenize(COT)))
    assert att.extras["answer_tokens"][att.extras["final_token_index"]] == " yes"
    assert att.extras["final_token_heatmap"].shape == (H, W)
    assert set(att.extras["ranking"][:2]) == {"cardiac silhouette", "mediastinum"}
    # the transfer was cached under the given directory and is reused
    assert len(list((tmp_path / "transfers").glob("*.npz"))) == 1
    att2 = m.attribute(model, case.image, Q + SUFFIXES["direct"], "Yes")
    assert att2.extras["concept_boxes"] == att.extras["concept_boxes"]


def test_bad_options():
    from medfocus.errors import ConfigError

    with pytest.raises(ConfigError):
        MedFocusMethod(refine="sam2")
    with pytest.raises(ConfigError):
        MedFocusMethod(nonsense=1)
    with pytest.raises(ConfigError, match="region"):
        MedFocusMethod(region="circle")
    with pytest.raises(ConfigError, match="region"):
        MedFocus(RegionReader(np.ones((8, 8), bool)), None, region="circle")  # checked before any pool is loaded


def test_tiny_genuine_families(pool, tiny_adapters):
    case = synthetic.generate_case(5, size=128)
    for fam, adapter in tiny_adapters.items():
        q = Q + SUFFIXES["direct"]
        res = MedFocus(adapter, pool, cache=False).attribute(case.image, q, "Yes")
        assert res.passes["forward"] == 16, fam
        assert len(res.deltas) == 15 and all(v >= 0 for v in res.deltas.values()), fam
        assert res.heatmap.shape == (128, 128), fam
        tok = res.token_deltas[res.ranking()[0][0]]
        assert tok.shape == (len(res.answer_tokens),), fam
        att = res.to_attribution()
        assert att.heatmap.shape == (128, 128) and att.boxes, fam


def _word_of_token(tokens: list[str], i: int) -> str:
    """The whitespace-delimited word of the decoded answer that token ``i`` falls in."""
    text = "".join(t.replace("\u0120", " ").replace("\u2581", " ") for t in tokens)
    start = sum(len(t) for t in tokens[:i])
    left = text.rfind(" ", 0, start + 1) + 1 if not text[start:start + 1].isspace() else start + 1
    right = text.find(" ", left)
    return re.sub(r"\W", "", text[left:right if right >= 0 else len(text)])


def test_demo_model_cardiomegaly_uses_the_heart(pool, demo_adapter):
    """Demo model, severe cardiomegaly (held-out seeds), its own answers.

    * Exact concept *boxes*: hiding the cardiac silhouette drops the answer nearly as much as any
      variant (>= 75% of the max), while every concept whose box misses the heart leaves the answer
      alone (< 10% of the heart's drop): the model relies on the heart. The left-lung and
      mediastinum *boxes* overlap the enlarged heart and hide it too, so with boxes the label is
      ambiguous.
    * MedFocus with the demo segmenter's refinement (the offline MedSAM stand-in), mask regions and
      the nested rule names "cardiac silhouette" in both modes (plain argmax sometimes names the
      mediastinum, whose mask contains the heart); hiding the refined lung masks leaves the answer alone. The paper's plain setting (transferred boxes, no
      refinement) does not fall back and its winner covers >= 30% of the heart, but its label is
      usually "left lung" / "mediastinum" (benchmarks/medfocus_concepts.md).
    * Step-by-step: the token with the largest drop belongs to the word naming the finding.
    """
    from medfocus.concepts.refine import SYNTHETIC_SAM_DIR as DEMO_SAM_DIR
    from medfocus.concepts.intervention import intervene

    if not (DEMO_SAM_DIR / "config.json").is_file():
        pytest.skip("demo segmenter not built yet (medfocus train-demo-sam)")

    refined_nested = MedFocus(demo_adapter, pool, cache=False, refine="medsam", refiner="demo", region="mask", rule="nested")
    plain = MedFocus(demo_adapter, pool, cache=False)
    for seed in range(3):
        case = synthetic.generate_case(100 + seed, findings=["cardiomegaly"], severity=1.0)
        heart = case.concept_masks["cardiac silhouette"]
        res = refined_nested.attribute(case.image, Q + SUFFIXES["direct"])
        assert res.answer.strip().lower().startswith("yes"), res.answer
        assert res.refine == "medsam" and res.region == "mask"
        assert res.concept == "cardiac silhouette" and not res.fallback, (res.ranking()[:4], res.nested_checks)
        (x1, y1, x2, y2), (hx1, hy1, hx2, hy2) = res.box, _box_of(heart)
        inter = max(0, min(x2, hx2) - max(x1, hx1)) * max(0, min(y2, hy2) - max(y1, hy1))
        assert inter / ((x2 - x1) * (y2 - y1) + (hx2 - hx1) * (hy2 - hy1) - inter) > 0.7
        # the enlarged heart's borders lie inside the lung boxes but not inside the refined lung masks
        assert res.deltas["lungs"] < 0.1 * res.deltas["cardiac silhouette"], res.ranking()[:4]

        exact = _exact(case)[0]  # an empty exact mask (a hilum hidden by the heart): a dummy 1-pixel box
        iv = intervene(demo_adapter, demo_adapter.prepare(case.image, Q + SUFFIXES["direct"], res.answer), exact)
        d = dict(zip(iv.names, iv.deltas))
        assert d["cardiac silhouette"] >= 0.75 * max(d.values()) > 1.0, d
        misses_heart = [c for c, (x1, y1, x2, y2) in exact.items()
                        if not heart[int(y1):int(y2), int(x1):int(x2)].any()]
        assert len(misses_heart) >= 3, misses_heart  # clavicles and the right costophrenic angle at least
        assert all(d[c] < 0.1 * d["cardiac silhouette"] for c in misses_heart), d

        p = plain.attribute(case.image, Q + SUFFIXES["direct"], res.answer)
        assert not p.fallback
        hidden = np.zeros_like(heart)
        for x1, y1, x2, y2 in p.boxes:
            hidden[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
        assert (hidden & heart).sum() >= 0.3 * heart.sum(), (p.concept, p.ranking()[:3])

        cot = refined_nested.attribute(case.image, Q + SUFFIXES["cot"])
        assert "enlarged" in cot.answer and cot.concept == "cardiac silhouette", (cot.answer, cot.ranking()[:3])
        td = cot.token_deltas[cot.concept]
        assert _word_of_token(cot.answer_tokens, int(np.argmax(td))) == "enlarged", list(zip(cot.answer_tokens, td.round(2)))


def test_mean_baseline(pool, case):
    # the heart is brighter than the image mean: filling it with the mean still lowers f
    model = RegionReader(case.concept_masks["cardiac silhouette"])
    z = MedFocus(model, pool, cache=False).attribute(case.image, Q + SUFFIXES["direct"], "Yes")
    m = MedFocus(model, pool, cache=False, baseline="mean").attribute(case.image, Q + SUFFIXES["direct"], "Yes")
    assert {n for n, _ in m.ranking()[:2]} == {"cardiac silhouette", "mediastinum"}
    assert 0 < m.deltas["cardiac silhouette"] < z.deltas["cardiac silhouette"]


def test_registry_medsam_refinement(pool, case, tmp_path):
    from medfocus.attribution import get_method
    from medfocus.concepts.refine import build_tiny_sam

    sam = build_tiny_sam(tmp_path / "sam")
    model = RegionReader(case.concept_masks["cardiac silhouette"])
    att = get_method("medfocus", pool=str(pool.root), cache=False, refine="medsam", medsam=str(sam)).attribute(
        model, case.image, Q + SUFFIXES["direct"], "Yes")
    assert att.extras["refine"] == "medsam" and att.n_forward == 16
    att2 = get_method("medfocus", pool=str(pool.root), cache=False, refine="medsam", medsam=str(tmp_path / "absent")).attribute(
        model, case.image, Q + SUFFIXES["direct"], "Yes")
    assert att2.extras["refine"] == "none"


@pytest.mark.parametrize("region", ["box", "mask"])
def test_cached_and_fresh_results_are_bit_identical(pool, case, tmp_path, region):
    """Issue 13 item 10: the transfer cache stores exactly what was computed, so MedFocus gives the same
    masks, heatmap and deltas (bit for bit) whether the cache is cold or warm."""
    model = RegionReader(case.concept_masks["cardiac silhouette"])
    q = Q + SUFFIXES["direct"]
    cold = MedFocus(model, pool, cache=tmp_path / "c", region=region).attribute(case.image, q, "Yes")
    warm = MedFocus(model, pool, cache=tmp_path / "c", region=region).attribute(case.image, q, "Yes")
    assert not cold.transfer_stats["cached"] and warm.transfer_stats["cached"]
    assert warm.deltas == cold.deltas and warm.concept_boxes == cold.concept_boxes
    assert np.array_equal(warm.heatmap, cold.heatmap) and warm.heatmap.dtype == cold.heatmap.dtype
    tr_cold = transfer_concepts(case.image, pool)  # no cache at all
    tr_warm = transfer_concepts(case.image, pool, cache=TransferCache(tmp_path / "c"))
    assert tr_warm.stats["cached"]
    for c in CONCEPTS:
        assert tr_warm.soft_masks[c].dtype == np.float32 and np.array_equal(tr_warm.soft_masks[c], tr_cold.soft_masks[c])
    assert np.array_equal(tr_warm.grid_masses, tr_cold.grid_masses)
