"""The shipped shortcut twin (``demo-shortcut``) against the demo model: known cue reliance and the causal
filter's effect at scale, with Wilson intervals (issue 19 item 3).

Both datasets are the same films rendered with and without their correlated cues (test seed 8); a
cue-necessary answer is a correct "Yes" that flips to "No" when only the cues are removed
(:mod:`medfocus.bench.cue_reliance`). The published figures at larger n are in ``benchmarks/shortcut.md``.
"""

from __future__ import annotations

import pytest

from medfocus.bench import build_benchmark, read_log
from medfocus.bench.cue_reliance import cue_necessity, retention_by_reliance
from medfocus.datasets.synthetic import load_synthetic, write_dataset
from medfocus.editing import get_editor
from medfocus.evaluation import wilson_interval
from medfocus.lvlm.loading import load_lvlm

FILMS = 60


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("shortcut_worlds")
    write_dataset(root / "cued", FILMS, seed=8, cue_rate=1.0, imagenome=False, progress=False)
    write_dataset(root / "free", FILMS, seed=8, cue_rate=0.0, counterfactuals=False, imagenome=False, progress=False)
    return root, load_synthetic(root / "cued"), load_synthetic(root / "free")


def _reliance_and_filter(name, worlds):
    root, cued, free = worlds
    adapter = load_lvlm(name, device="cpu")
    outcomes = cue_necessity(adapter, cued, free)
    out = root / f"bench_{name}"
    build_benchmark(adapter, cued, mode="direct", editor=get_editor("oracle"), out_dir=out, model_name=name, progress=False)
    log = read_log(next(out.rglob("direct.log.jsonl")))
    kept = {int(r["index"]): bool(r.get("kept")) for r in log.values() if r.get("kind", "positive") == "positive"}
    return outcomes, retention_by_reliance(outcomes, kept)


def test_twin_answers_from_the_cue_and_the_filter_drops_those_answers(worlds):
    outcomes, ret = _reliance_and_filter("demo-shortcut", worlds)
    yes = [o for o in outcomes if o.correct]
    nec = sum(o.cue_necessary for o in yes)
    assert len(yes) >= 30, f"too few cued positives answered Yes ({len(yes)}) to measure"
    lo, _ = wilson_interval(nec, len(yes))
    assert lo > 0.5, f"cue-necessary share {nec}/{len(yes)}: the twin must answer most cued positives from the cue"
    k, n = ret["cue_necessary"]
    assert n == nec
    _, hi = wilson_interval(k, n)
    assert hi < 0.15, f"the causal filter kept {k}/{n} cue-necessary answers of the twin"


def test_demo_does_not_need_the_cue_and_keeps_its_clean_answers(worlds):
    outcomes, ret = _reliance_and_filter("demo", worlds)
    yes = [o for o in outcomes if o.correct]
    nec = sum(o.cue_necessary for o in yes)
    assert len(yes) >= 30
    _, hi = wilson_interval(nec, len(yes))
    assert hi < 0.15, f"demo: cue-necessary share {nec}/{len(yes)}"
    k, n = ret["cue_independent"]
    lo, _ = wilson_interval(k, n)
    assert n >= 30 and lo > 0.5, f"demo: the filter kept only {k}/{n} cue-independent answers"
