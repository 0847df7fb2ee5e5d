"""parse_yes_no on a table of realistic direct and step-by-step outputs."""

from __future__ import annotations

import pytest

from medfocus.lvlm.answers import parse_yes_no

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


def test_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected
