"""parse_yes_no on a table of realistic direct and step-by-step outputs."""

from __future__ import annotations

import pytest

from medfocus.lvlm.answers import answer_span, parse_yes_no

CASES = [
    # direct mode
    ("Yes", "Yes"),
    ("No", "No"),
    ("Yes.", "Yes"),
    ("No.", "No"),
    ("yes", "Yes"),
    ("NO", "No"),
    ("**No**", "No"),
    ("**Yes**.", "Yes"),
    ("  \n Yes\n", "Yes"),
    ("Answer: Yes", "Yes"),
    ("The answer is yes.", "Yes"),
    ("The answer is: **no**", "No"),
    ("Yes, there is evidence of pleural effusion in the image.", "Yes"),
    ("No, there is no evidence of a nodule.", "No"),
    ("Yes — however there is no pneumothorax.", "Yes"),
    ("No; the cardiac silhouette is within normal limits.", "No"),
    # step-by-step mode
    ("There is no evidence of effusion. Therefore, no.", "No"),
    ("The left costophrenic angle is blunted, consistent with effusion. Therefore, yes.", "Yes"),
    ("Step 1: Look at the lungs. Step 2: No focal opacity is seen. Final answer: No", "No"),
    ("1. The heart is enlarged.\n2. The cardiothoracic ratio exceeds 0.5.\nSo the answer is yes.", "Yes"),
    ("No obvious mass at first glance, but the right hilum is enlarged. In conclusion, yes.", "Yes"),
    ("Yes, at first the lungs look clear, but looking closer there is no consolidation. Thus, no.", "No"),
    ("Looking at the right lung, there is a dense opacity in the lower zone.\n\nAnswer: **Yes**", "Yes"),
    ("The lungs are clear and there is no pneumothorax. Hence the answer is no.", "No"),
    ("Let's think step by step. The mediastinum is midline. The heart size is normal.\nNo", "No"),
    ("Findings: bilateral lower-zone opacities.\nConclusion: yes", "Yes"),
    # no explicit yes/no word
    ("There is no evidence of cardiomegaly in the image.", "No"),
    ("The image does not show a pleural effusion.", "No"),
    ("Pneumothorax is absent.", "No"),
    ("There is evidence of consolidation in the right lower lobe.", "Yes"),
    ("Findings consistent with atelectasis.", "Yes"),
    # unparseable / ambiguous
    ("", None),
    ("   ", None),
    (None, None),
    ("Yes/No", None),
    ("I cannot determine this from the image.", None),
    ("The image quality is insufficient.", None),
    ("Possibly.", None),
    # words that merely contain yes/no
    ("Nodule.", None),
    ("Normal study.", None),
]

# Outputs in the styles of the paper's model families (issue 12, kind 5). Each right value was decided
# by reading the text as a radiologist would; the comment names what the case exercises.
WILD_CASES = [
    # -- the input: a marker ("so") followed by the determiner "no" is not a final answer
    ("Yes. The effusion is so large that no costophrenic angle is visible.", "Yes"),
    ("Yes, the effusion is so large that no normal lung is seen at the left base.", "Yes"),
    ("Yes. There is consolidation, thus no further view is needed.", "Yes"),
    ("Yes. Therefore no additional imaging would change this.", "Yes"),
    ("The heart is enlarged, so no doubt about it: yes.", "Yes"),
    ("So no pneumothorax is seen. The lungs are clear.", "No"),
    ("Therefore no effusion is present.", "No"),
    ("There is a large opacity, hence no air bronchograms are visible. Answer: yes", "Yes"),
    # -- explicit answers are not overridden by later incidental phrases
    ("Answer: Yes. The effusion is large, so no costophrenic angle can be seen.", "Yes"),
    ("Answer: Yes\nRationale: blunting of the left costophrenic angle; thus no sharp angle remains.", "Yes"),
    ("The answer is yes. There is no pneumothorax, however.", "Yes"),
    ("Answer: No. So the film is normal, with a yes-like appearance of nothing.", "No"),
    ("Final answer: yes. (So no, the heart is not normal.)", "Yes"),
    # -- Qwen2.5-VL / Qwen2-VL style: terse, often with a short justification
    ("Yes, there is evidence of cardiomegaly in the image.", "Yes"),
    ("No, there is no evidence of pneumothorax in the image.", "No"),
    ("Yes.", "Yes"),
    ("No.", "No"),
    ("Yes, the image shows signs of pleural effusion on the left side.", "Yes"),
    ("No. The lungs appear clear without any focal consolidation.", "No"),
    ("Yes, there appears to be a nodule in the right upper lobe.", "Yes"),
    ("No, the cardiac silhouette is within normal limits.", "No"),
    ("Yes\n", "Yes"),
    ("No\n\nThe costophrenic angles are sharp.", "No"),
    # -- MedGemma / Gemma 3 style: markdown headings and bold
    ("**Answer:** Yes\n\n**Rationale:** There is increased opacity in the right lower zone.", "Yes"),
    ("**Answer:** No\n\n**Explanation:** No focal consolidation, effusion or pneumothorax is seen.", "No"),
    ("**Final answer:** No", "No"),
    ("**Final Answer: Yes**", "Yes"),
    ("## Answer\nYes", "Yes"),
    ("### Final answer\n\n**No.**", "No"),
    ("Based on the chest X-ray, **yes**, there is evidence of atelectasis.", "Yes"),
    ("Based on the image provided, **no**, there is no evidence of a pneumothorax.", "No"),
    ("* **Heart:** enlarged\n* **Lungs:** clear\n\n**Conclusion:** Yes, cardiomegaly is present.", "Yes"),
    ("* Lungs: clear\n* Pleura: no effusion\n\n**Answer: No**", "No"),
    ("Answer: yes.", "Yes"),
    ("Answer: no.", "No"),
    ("answer - yes", "Yes"),
    ("Answer — No", "No"),
    # -- LLaVA / LLaVA-Med style: descriptive, answer in prose
    ("The chest X-ray shows an enlarged cardiac silhouette, which is consistent with cardiomegaly.", "Yes"),
    ("The image shows a chest X-ray with no signs of pleural effusion.", "No"),
    ("In the image, there is evidence of a mass in the left lung.", "Yes"),
    ("The chest x-ray does not show any evidence of pneumonia.", "No"),
    ("The lungs appear to be clear, and there is no evidence of consolidation.", "No"),
    ("Based on the image, yes, there is a small left pleural effusion.", "Yes"),
    ("Based on the image, it appears that there is no pneumothorax.", "No"),
    ("Yes, the chest X-ray shows signs of lung opacity, which could indicate pneumonia.", "Yes"),
    ("There are findings suggestive of interstitial lung disease.", "Yes"),
    ("The findings are not consistent with pleural effusion.", "No"),
    ("Effusion is not seen.", "No"),
    ("No acute cardiopulmonary abnormality.", "No"),
    # -- step-by-step (CoT) with several yes/no words
    ("Step 1: Assess the heart. The cardiothoracic ratio is about 0.6.\nStep 2: Is it above 0.5? Yes.\n"
     "Step 3: Any pulmonary edema? No.\nTherefore, the answer is yes.", "Yes"),
    ("First, is there blunting of the costophrenic angle? No. Is there a meniscus sign? No. "
     "Is there fluid in the fissure? No. So the answer is no.", "No"),
    ("Let's think step by step. 1) The trachea is midline. 2) There is no mediastinal shift. "
     "3) A visceral pleural line is visible at the right apex with no lung markings beyond it. "
     "Thus, yes.", "Yes"),
    ("The question asks whether there is a nodule. A small round opacity is present in the left mid zone. "
     "No calcification is seen. Therefore: yes.", "Yes"),
    ("Looking for effusion: no meniscus, no blunting, no fluid in the fissures. In conclusion, no.", "No"),
    ("Is there consolidation? Looking at the lower lobes, there is no air bronchogram and no opacity. "
     "Hence, the answer is No.", "No"),
    ("The right hemidiaphragm is elevated. No, wait, that is the stomach bubble on the left. "
     "Overall: no.", "No"),
    ("Reasoning: the lung volumes are low, there is crowding of the vessels, but no collapse.\n"
     "Conclusion: no", "No"),
    ("Reasoning: there is a wedge-shaped opacity at the right base with volume loss.\nConclusion: yes", "Yes"),
    ("Findings: cardiomegaly, no effusion.\nImpression: enlarged heart.\nAnswer: yes", "Yes"),
    ("We need to decide yes or no. The lungs are hyperinflated and there is no focal lesion. "
     "So, no.", "No"),
    ("Yes, at first glance the heart seems large, but this is an AP film. Corrected for magnification, "
     "it is normal. Therefore, no.", "No"),
    ("No obvious abnormality at first, but a subtle right apical pneumothorax is seen. "
     "Consequently, yes.", "Yes"),
    ("In summary, yes.", "Yes"),
    ("In summary: no.", "No"),
    # -- HuatuoGPT-Vision / reasoning-model style: thinking then a final response
    ("## Thinking\nThe left costophrenic angle is blunted... is it effusion? Yes, likely. But no meniscus?\n"
     "## Final Response\nYes, there is a left pleural effusion.", "Yes"),
    ("## Thinking\nHeart size normal. No.\n\n## Final Response\n\nNo, there is no cardiomegaly.", "No"),
    ("<think>The opacity could be atelectasis. Yes? Or no, it might be scarring.</think>\nNo.", "No"),
    ("<think>Is there a pneumothorax? The pleural line is visible. Yes.</think> Yes", "Yes"),
    ("<think>\nno effusion; answer no\n</think>\n<answer>No</answer>", "No"),
    ("<answer>Yes</answer>", "Yes"),
    ("The final answer is $\\boxed{Yes}$.", "Yes"),
    ("Final Answer: \\boxed{\\text{No}}", "No"),
    # -- negations around the marker must not decide
    ("The answer cannot be yes without a lateral view; there is no evidence of effusion.", "No"),
    ("I would not say the answer is yes with certainty. There is a subtle opacity consistent with pneumonia.", "Yes"),
    ("Therefore it is not yes: the lungs are clear. No.", "No"),
    # -- hedges
    ("Probably yes.", "Yes"),
    ("Likely no.", "No"),
    ("Possibly yes, there is a faint opacity in the left lower zone.", "Yes"),
    ("It is hard to say, but probably yes.", "Yes"),
    ("I am not sure, but I think the answer is no.", "No"),
    ("Maybe.", None),
    ("It is difficult to determine from this image.", None),
    ("I don't know.", None),
    ("I cannot tell whether there is an effusion from a single frontal view.", None),
    ("Not sure, but there is no evidence of pneumothorax.", "No"),
    ("The finding is uncertain.", None),
    # -- negated findings without yes/no
    ("There is no pleural effusion.", "No"),
    ("No pneumothorax.", "No"),
    ("No focal consolidation, pleural effusion or pneumothorax.", "No"),
    ("The heart size is normal with no cardiomegaly.", "No"),
    ("The lungs are clear with no infiltrates.", "No"),
    ("There is no doubt that a large effusion is present.", "Yes"),
    ("Pleural effusion is present on the right.", "Yes"),
    ("The study is positive for pneumonia.", "Yes"),
    ("The X-ray is negative for pneumothorax.", "No"),
    ("Unremarkable chest radiograph.", "No"),
    # -- echoed instruction / question, and non-answers
    ("Answer directly with yes or no: yes", "Yes"),
    ("Is there evidence of effusion in the image? Yes.", "Yes"),
    ("Is there evidence of pneumothorax in the image? No.", "No"),
    ("Yes or no?", None),
    ("yes and no", None),
    ("Yes/no: the image is ambiguous.", None),
    ("Please answer with yes or no.", None),
    ("The image is a frontal chest radiograph.", None),
    ("Cardiomegaly.", None),
    ("I'm sorry, I cannot provide medical diagnoses.", None),
    # -- words that merely contain yes/no, and yes/no inside other words
    ("Nodular opacities are noted.", None),
    ("Notable findings: none.", None),
    ("Eyes of the reader: unknown.", None),
    # -- mixed, where both answer words appear without a marker
    ("Yes for effusion, no for pneumothorax.", "Yes"),
    ("Effusion: yes. Pneumothorax: no.", None),
]


def test_table_is_large_enough():
    assert len(CASES) >= 30 and len(WILD_CASES) >= 100


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize("text,expected", WILD_CASES)
def test_parse_yes_no_outputs_of_the_model_families(text, expected):
    assert parse_yes_no(text) == expected


def test_every_stored_prediction_of_the_public_benchmark(shared_data):
    """The 7,520 direct-mode outputs of six paper models stored in the public MedGround-Bench records
    (8 distinct texts: "Yes", "Yes\\n", "Yes.\\n", "No." ...) read as the word they spell."""
    import json

    records = json.loads((shared_data / "medground_bench_direct.json").read_text())
    texts = {v for r in records for k, v in r.items() if k.startswith("prediction")}
    assert len(texts) >= 8
    for t in texts:
        assert parse_yes_no(t) == t.strip().rstrip(".").capitalize(), repr(t)


# A broken generation that merely contains an answer word is no answer (recorded as unparsed, None).
# The first is the demo model's background-view output from a `bench build --editor inpaint` cot log.
GARBLED = [
    "ThereThereThereThereThereThereThere is blunted with no[]",
    "There is blunted with no[]",
    "The left costophrenic angle is blunted with no.",
    "The lungs show no.",
    "the the the the the heart is no",
    "opacity opacity opacity opacity in the left lung, no",
    "lunglunglunglung no.",
]
# Well-formed outputs whose answer word stands on its own, or that a loop follows a clear answer in:
# they still parse.
STILL_PARSED = [
    ("I think yes.", "Yes"),
    ("I would say no.", "No"),
    ("It is a yes.", "Yes"),
    ("Clearly no.", "No"),
    ("The costophrenic angle is blunted.\nno", "No"),
    ("Looking at the base, with a meniscus: yes.", "Yes"),
    ("Yes. The the the the the", "Yes"),
    ("ThereThereThereThere is blunting. Therefore, yes.", "Yes"),
    ("heart heart heart heart\nAnswer: no", "No"),
    ("ThereThereThereThere is fluid.\nYes.", "Yes"),
]


@pytest.mark.parametrize("text", GARBLED)
def test_a_garbled_generation_is_unparsed_not_an_answer(text):
    assert parse_yes_no(text) is None


@pytest.mark.parametrize("text,expected", STILL_PARSED)
def test_clear_answers_still_parse(text, expected):
    assert parse_yes_no(text) == expected


def test_the_filter_counts_a_garbled_background_answer_as_unparseable():
    """The report's sample: a correct "Yes" that flips to "No" when the finding is edited out, and a garbled
    background view. It fails the background gate because the answer is unreadable, not as a real "No"."""
    from medfocus.bench.filter import apply_filter

    parsed = {"original": parse_yes_no("Yes"), "foreground": parse_yes_no("No"),
              "background": parse_yes_no(GARBLED[0]), "background_normal": parse_yes_no("Yes")}
    res = apply_filter("Yes", parsed)
    assert parsed["background"] is None
    assert (res.kept, res.failed_gate, res.unparseable) == (False, "background", True)


SPAN_CASES = [
    # (text, the deciding word's span in text)
    ("Yes", (0, 3)),
    ("**No**.", (2, 4)),
    # explicit marker: not the last yes/no word of the text
    ("Final answer: yes. No other finding is seen.", (14, 17)),
    ("The answer is \\boxed{Yes}. No effusion.", (21, 24)),
    # a conclusion after a leading word
    ("No. The angle is blunted, so yes.", (29, 32)),
    # only the text after </think> is read
    ("<think>yes</think> Final answer: no", (33, 35)),
    # a lone word after a clause break (rule 6), and the last sentence (rule 5)
    ("Based on the image, no, the angle is sharp.", (20, 22)),
    ("The cardiac silhouette is enlarged.\nYes", (36, 39)),
    # a character that lower() lengthens before the word keeps the offsets in the original text
    ("\u0130\u0130 Answer: YES", (11, 14)),
]


@pytest.mark.parametrize("text,span", SPAN_CASES)
def test_answer_span_points_at_the_deciding_word_of_the_original_text(text, span):
    assert answer_span(text) == span
    assert text[span[0]:span[1]].lower() == parse_yes_no(text).lower()


@pytest.mark.parametrize("text", ["There is no evidence of effusion.", "The effusion is present.", "", "Effusion: yes. Pneumothorax: no.", None])
def test_no_span_where_no_single_word_decided(text):
    """Rule 7 (phrasing), unparsed and ambiguous texts have no deciding word."""
    assert answer_span(text) is None


@pytest.mark.parametrize("text,expected", CASES + WILD_CASES)
def test_every_span_spells_the_parsed_answer(text, expected):
    span = answer_span(text)
    if span is not None:
        assert text[span[0]:span[1]].lower() == expected.lower()


def test_the_attributed_final_token_is_the_parsed_answers_word():
    """final_token_index (the token every method's final-token map scores) follows the parser: a
    step-by-step answer that names another yes/no word after its conclusion keeps the conclusion."""
    from types import SimpleNamespace

    from medfocus.attribution._common import final_token_index

    def index(tokens):
        return final_token_index(SimpleNamespace(answer_tokens=tokens, n_answer_tokens=len(tokens)))

    assert index(["Final", " answer", ":", " yes", ".", " No", " other", " finding", "."]) == 3
    # byte-level BPE spelling: "\u0120" a space, "\u010a" a line end (the last-sentence rule needs it)
    assert index(["\u0120The", "\u0120angle", "\u0120is", "\u0120blunted", ".", "\u010a", "Yes", "\u0120"]) == 6
    assert index(["Y", "es"]) == 0
    # answered from phrasing: the last yes/no word; none at all: the last token
    assert index(["There", " is", " no", " effusion", " seen", "."]) == 2
    assert index(["Normal", " study", "."]) == 2
