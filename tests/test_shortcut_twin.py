"""The shipped shortcut twin (``demo-shortcut``) against the demo model: known cue reliance and the causal
filter's effect at scale, with Wilson intervals (issue 19 item 3).

Both datasets are the same films rendered with and without their correlated cues (test seed 8); a
cue-necessary answer is a correct "Yes" that flips to "No" when only the cues are removed
(:mod:`medfocus.bench.cue_reliance`). The published figures at larger n are in ``benchmarks/shortcut.md``.
"""

from __future__ import annotations

import pytest

from medfocus.evaluation import wilson_interval
from medfocus.lvlm.loading import load_lvlm
from medfocus.runner.shortcut import measure_shortcut, shortcut_markdown, write_cue_twins

FILMS = 60


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("shortcut_worlds")
    cued, free = write_cue_twins(root, FILMS, seed=8)
    return {name: measure_shortcut(load_lvlm(name, device="cpu"), name, cued, free, root / name) for name in ("demo", "demo-shortcut")}


def test_twin_answers_from_the_cue_and_the_filter_drops_those_answers(results):
    r = results["demo-shortcut"]
    nec, yes = r.cue_necessary_share
    assert yes >= 30, f"too few cued positives answered Yes ({yes}) to measure"
    # the cue decides most of the twin's "yes" answers (>= 50%; n here is small, so the interval is wide),
    # far more than the demo model's (whose upper bound is below this lower bound)
    lo, _ = wilson_interval(nec, yes)
    assert nec / yes >= 0.5 and lo > 0.3, f"cue-necessary share {nec}/{yes}: the twin must answer most cued positives from the cue"
    d_nec, d_yes = results["demo"].cue_necessary_share
    assert wilson_interval(d_nec, d_yes)[1] < lo, "the twin's cue reliance must be clearly above the demo model's"
    k, n = r.retention["cue_necessary"]
    assert n == nec
    _, hi = wilson_interval(k, n)
    assert hi < 0.15, f"the causal filter kept {k}/{n} cue-necessary answers of the twin"


def test_demo_does_not_need_the_cue_and_both_keep_clean_answers(results):
    r = results["demo"]
    nec, yes = r.cue_necessary_share
    assert yes >= 30
    _, hi = wilson_interval(nec, yes)
    assert hi < 0.15, f"demo: cue-necessary share {nec}/{yes}"
    k, n = r.retention["cue_independent"]
    assert n >= 30 and wilson_interval(k, n)[0] > 0.5, f"demo: the filter kept only {k}/{n} cue-independent answers"
    for name, res in results.items():
        k, n = res.clean
        assert n >= 10 and wilson_interval(k, n)[0] > 0.3, f"{name}: the filter kept only {k}/{n} clean answers"
    md = shortcut_markdown(list(results.values()))
    assert md.count("| demo") == 2 * 2 and "[" in md
