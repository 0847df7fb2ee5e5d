"""Every validity number the README and the model cards publish is quoted from its benchmark file: the demo
model's from benchmarks/validity.md, the shortcut twin's from benchmarks/shortcut.md (and the
candidates' and the nodule/mass ceiling from their own benchmark files).

The quoted passages sit between the markers of :data:`medfocus.training.demo_lvlm.card.VALIDITY_BEGIN` / ``VALIDITY_END``
(``SHORTCUT_BEGIN`` / ``SHORTCUT_END``); each decimal number, percentage-with-interval and ``k/n`` count in them
must occur in the benchmark file, so a hand-typed or stale figure fails here.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from medfocus.lvlm.registry import DEMO_DIR, DEMO_SHORTCUT_DIR
from medfocus.training.demo_lvlm.card import SHORTCUT_BEGIN, SHORTCUT_END, VALIDITY_BEGIN, VALIDITY_END, validity_block
from medfocus.training.demo_lvlm.evaluate import rewrite_card

ROOT = Path(__file__).resolve().parents[1]
VALIDITY_MD = ROOT / "benchmarks" / "validity.md"
SHORTCUT_MD = ROOT / "benchmarks" / "shortcut.md"
#: decimals (0.85, 80.0, -0.06) and counts (11/20); integers alone are too common to check this way
NUMBER = re.compile(r"-?\d+\.\d+|\d+/\d+")


def _blocks(text: str, begin: str = VALIDITY_BEGIN, end: str = VALIDITY_END) -> list[str]:
    return re.findall(re.escape(begin) + r"(.*?)" + re.escape(end), text, flags=re.S)


@pytest.mark.parametrize("doc,source_md,begin,end", [
    (ROOT / "README.md", VALIDITY_MD, VALIDITY_BEGIN, VALIDITY_END),
    (DEMO_DIR / "MODEL_CARD.md", VALIDITY_MD, VALIDITY_BEGIN, VALIDITY_END),
    (ROOT / "README.md", SHORTCUT_MD, SHORTCUT_BEGIN, SHORTCUT_END),
    (DEMO_SHORTCUT_DIR / "MODEL_CARD.md", SHORTCUT_MD, SHORTCUT_BEGIN, SHORTCUT_END),
    *((ROOT / "candidates" / "README.md", ROOT / "benchmarks" / f"validity_{c}.md",
       f"<!-- validity: quoted from benchmarks/validity_{c}.md -->", VALIDITY_END)
      for c in ("demo12x12", "demo12x12_focus", "demo12x12_focus_lr1e-3", "demo12x12_fleischner",
                "demo12x12_fleischner_stage3", "demo12x12_fleischner_long")),
    (ROOT / "README.md", ROOT / "benchmarks" / "validity_demo12x12.md", "<!-- validity: quoted from benchmarks/validity_demo12x12.md -->",
     VALIDITY_END),
    (ROOT / "README.md", ROOT / "benchmarks" / "nodule_mass_ceiling.md",
     "<!-- validity: quoted from benchmarks/nodule_mass_ceiling.md -->", VALIDITY_END),
], ids=["README-validity", "MODEL_CARD-demo", "README-shortcut", "MODEL_CARD-demo-shortcut", "candidates-demo12x12",
        "candidates-demo12x12-focus", "candidates-demo12x12-focus-lr1e-3", "candidates-demo12x12-fleischner",
        "candidates-demo12x12-fleischner-stage3", "candidates-demo12x12-fleischner-long", "README-demo12x12", "README-nodule-mass-ceiling"])
def test_validity_numbers_are_quoted_from_the_benchmark(doc: Path, source_md: Path, begin: str, end: str):
    if not source_md.is_file():
        pytest.skip(f"benchmarks/{source_md.name} is not in this checkout (run benchmarks/{source_md.stem}.py)")
    source = source_md.read_text(encoding="utf-8")
    blocks = _blocks(doc.read_text(encoding="utf-8"), begin, end)
    assert blocks, f"{doc.name} has no passage quoted from benchmarks/{source_md.name}"
    numbers = [n for b in blocks for n in NUMBER.findall(b)]
    assert len(numbers) >= 5, f"{doc.name}: the quoted passages carry almost no numbers: {numbers}"
    missing = sorted({n for n in numbers if n not in source})
    assert not missing, f"{doc.name} quotes numbers that benchmarks/{source_md.name} does not contain: {missing}"


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
