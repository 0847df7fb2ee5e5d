"""Every validity number the README and the demo model card publish is quoted from benchmarks/validity.md.

The quoted passages sit between the markers of :data:`medfocus.training.demo_lvlm.card.VALIDITY_BEGIN` / ``VALIDITY_END``;
each decimal number, percentage-with-interval and ``k/n`` count in them must occur in validity.md, so a
hand-typed or stale figure fails here.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from medfocus.lvlm.registry import DEMO_DIR
from medfocus.training.demo_lvlm.card import VALIDITY_BEGIN, VALIDITY_END, validity_block
from medfocus.training.demo_lvlm.evaluate import rewrite_card

ROOT = Path(__file__).resolve().parents[1]
VALIDITY_MD = ROOT / "benchmarks" / "validity.md"
#: decimals (0.85, 80.0, -0.06) and counts (11/20); integers alone are too common to check this way
NUMBER = re.compile(r"-?\d+\.\d+|\d+/\d+")


def _blocks(text: str) -> list[str]:
    return re.findall(re.escape(VALIDITY_BEGIN) + r"(.*?)" + re.escape(VALIDITY_END), text, flags=re.S)


@pytest.mark.parametrize("doc", [ROOT / "README.md", DEMO_DIR / "MODEL_CARD.md"], ids=["README", "MODEL_CARD"])
def test_validity_numbers_are_quoted_from_validity_md(doc: Path):
    if not VALIDITY_MD.is_file():
        pytest.skip("benchmarks/validity.md is not in this checkout (run benchmarks/validity.py)")
    source = VALIDITY_MD.read_text(encoding="utf-8")
    blocks = _blocks(doc.read_text(encoding="utf-8"))
    assert blocks, f"{doc.name} has no passage quoted from benchmarks/validity.md"
    numbers = [n for b in blocks for n in NUMBER.findall(b)]
    assert len(numbers) >= 5, f"{doc.name}: the quoted passages carry almost no numbers: {numbers}"
    missing = sorted({n for n in numbers if n not in source})
    assert not missing, f"{doc.name} quotes numbers that benchmarks/validity.md does not contain: {missing}"


def test_rewriting_the_card_keeps_the_quoted_block(tmp_path):
    folder = tmp_path / "demo_model"
    folder.mkdir()
    for name in ("medfocus.json", "MODEL_CARD.md"):
        shutil.copy(DEMO_DIR / name, folder / name)
    before = validity_block((folder / "MODEL_CARD.md").read_text(encoding="utf-8"))
    assert before is not None
    rewrite_card(folder)
    after = (folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert validity_block(after) == before and "Quoted from it for these weights" in after
    # new weights (no block carried over): the card says the figures are still to be measured
    (folder / "MODEL_CARD.md").unlink()
    rewrite_card(folder)
    fresh = (folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert validity_block(fresh) is None and "have not been measured there yet" in fresh
