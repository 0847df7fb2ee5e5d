"""No statistical claim from too little data, and no interval that was never computed.

* ``best_methods`` bolds nothing on fewer than ``MIN_PAIRS`` (10) paired samples -- on 2 pairs whose
  differences are both positive the percentile interval is always above 0 -- and says why (``withheld``);
  ``compare_to_baselines`` likewise answers "n/a", not "beats it".
* Fewer than ``MIN_PAIRS`` values or ``--n-boot 0``: the mean with "no CI", never a zero-width ``[m, m]``
  nor a percentile interval too narrow to be a 95% one, in the Markdown tables, the HTML report and (as
  empty bounds) the CSV.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medfocus.cli import main
from medfocus.evaluation import best_methods, bootstrap_ci, paired_bootstrap_diff, summarize, to_markdown
from medfocus.evaluation.baselines import baselines_markdown, compare_to_baselines
from medfocus.evaluation.significance import MIN_PAIRS
from medfocus.evaluation.tables import format_ci


def _frame(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([dict(model="m", dataset="d", mode="direct", method=meth, index=i, error=None, iou=float(v))
                         for meth, vals in values.items() for i, v in enumerate(vals)])


def test_min_pairs_is_ten_and_two_consistent_pairs_are_not_significant():
    assert MIN_PAIRS == 10
    # the trial's case: A above B on both of 2 samples -> today bold "significantly best"
    r = best_methods(_frame({"A": [0.47, 0.466], "B": [0.2, 0.3]}), ("iou",)).iloc[0]
    assert r.best == "A" and not r.significant
    assert r.withheld == "fewer than 10 paired samples (2)" and r.n_pairs == 2
    assert r.difference == pytest.approx(100 * ((0.47 - 0.2) + (0.466 - 0.3)) / 2) and math.isnan(r.ci_low)


@pytest.mark.parametrize("n, significant", [(9, False), (10, True)])
def test_the_threshold_is_exactly_min_pairs(n, significant):
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 0.5, n)
    r = best_methods(_frame({"A": list(b + 0.2 + rng.uniform(0, 0.01, n)), "B": list(b)}), ("iou",), n_boot=300).iloc[0]
    assert r.best == "A" and bool(r.significant) is significant
    assert (r.withheld is None) is significant


def test_no_bootstrap_resamples_withholds_the_test():
    r = best_methods(_frame({"A": [0.9] * 12, "B": [0.1] * 12}), ("iou",), n_boot=0).iloc[0]
    assert not r.significant and r.withheld == "no bootstrap resamples"


def test_baseline_comparison_on_few_pairs_is_not_decided():
    rows = []
    for i in range(3):
        for meth, v in (("gradcam", 0.6), ("baseline_centre_gaussian", 0.2 + 0.01 * i)):
            rows.append(dict(model="m", dataset="d", mode="direct", method=meth, index=i, error=None, iou=v))
    comp = compare_to_baselines(pd.DataFrame(rows), ["iou"], n_boot=200)
    r = comp.iloc[0]
    assert r["n_pairs"] == 3 and r["beats"] is None and r["difference"] == pytest.approx(39.0)
    md = baselines_markdown(comp)
    # no interval either: on 3 pairs the percentile interval is far too narrow to print as a 95% one
    assert "| gradcam | 60.0 | 21.0 | +39.0 (no CI) |" in md and "| 3 | n/a |" in md and "fewer than 10 paired samples" in md


def test_a_row_of_the_baseline_comparison_adds_up_when_the_baseline_lacks_a_sample():
    """The finding prior is undefined for a finding with one sample: the paired difference is over the other
    samples, and so are the row's two means (a mean over all of the method's samples beside it did not add up:
    18.4 - 5.0 printed as +7.7)."""
    rows = []
    for i in range(12):
        rows.append(dict(model="m", dataset="d", mode="direct", method="gradcam", index=i, error=None, iou=0.2 + 0.02 * i))
        rows.append(dict(model="m", dataset="d", mode="direct", method="baseline_finding_prior", index=i,
                         error="no other sample" if i == 11 else None, iou=None if i == 11 else 0.1))
    comp = compare_to_baselines(pd.DataFrame(rows), ["iou"], n_boot=200)
    r = comp.iloc[0]
    assert r["n_pairs"] == 11 and r["method_mean"] == pytest.approx(100 * np.mean([0.2 + 0.02 * i for i in range(11)]))
    assert r["method_mean"] - r["baseline_mean"] == pytest.approx(r["difference"])
    assert r["baseline_overall_mean"] == pytest.approx(10.0)
    md = baselines_markdown(comp)
    assert "| gradcam | 30.0 | 10.0 | +20.0 [" in md and "the means of a row are over its n pairs" in md


def test_one_value_or_no_resamples_gives_no_interval():
    for mean, lo, hi in (bootstrap_ci([0.25, 0.5, 0.75], n_boot=0), bootstrap_ci([0.5], n_boot=1000)):
        assert mean == pytest.approx(0.5) and math.isnan(lo) and math.isnan(hi)
    d = paired_bootstrap_diff([0.5], [0.25])
    assert d[0] == 0.25 and math.isnan(d[1]) and math.isnan(d[2])
    assert format_ci(14.5, math.nan, math.nan) == "14.5 (no CI)"
    assert format_ci(14.5, 10.0, 20.0) == "14.5 [10.0, 20.0]"
    assert format_ci(math.nan, math.nan, math.nan) == "–"
    s = summarize(_frame({"A": [0.1, 0.2]}), ("iou",), n_boot=0)
    md = to_markdown(s, ("iou",))
    assert "| A | 15.0 (no CI) |" in md and '"no CI": no interval was computed' in md and "[15.0, 15.0]" not in md


def test_an_interval_needs_min_pairs_values():
    """The percentile bootstrap undercovers steeply below 10 values (benchmarks/min_pairs.py); on 2 values its
    "95%" interval is about their range. Means and paired differences alike: no interval below MIN_PAIRS."""
    rng = np.random.default_rng(3)
    v = list(rng.uniform(0, 1, 10))
    for n in (2, 5, 9):
        mean, lo, hi = bootstrap_ci(v[:n], n_boot=500)
        assert mean == pytest.approx(np.mean(v[:n])) and math.isnan(lo) and math.isnan(hi)
        d = paired_bootstrap_diff(v[:n], [0.0] * n, n_boot=500)
        assert d[0] == pytest.approx(np.mean(v[:n])) and math.isnan(d[1]) and math.isnan(d[2])
    mean, lo, hi = bootstrap_ci(v, n_boot=500)
    assert lo < mean < hi and lo > min(v) and hi < max(v)
    d = paired_bootstrap_diff(v, [0.0] * 10, n_boot=500)
    assert d[1] < d[0] < d[2]
    # an explicit smaller minimum is the caller's choice (best_methods passes its min_pairs)
    assert math.isfinite(bootstrap_ci(v[:3], n_boot=500, min_n=3)[1])
    assert math.isfinite(paired_bootstrap_diff(v[:3], [0.0] * 3, n_boot=500, min_n=3)[1])
    md = to_markdown(summarize(_frame({"A": v[:4]}), ("iou",)), ("iou",))
    assert "(no CI)" in md and "fewer than 10 samples" in md


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        for meth, pred in (("gradcam", [[0, 0, 8, 8]]), ("occlusion", [[0, 0, 4 + i % 3, 8]])):
            out.append({"model": "demo", "dataset": "synthetic", "index": i, "mode": "direct", "method": meth,
                        "attribute": "nodule", "gt_boxes": [[0, 0, 8, 8]], "image_size": [32, 32], "pred_boxes": pred,
                        "error": None})
    return out


def test_evaluate_n_boot_0_prints_no_ci_in_markdown_and_leaves_the_csv_bounds_empty(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(4)))
    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "e"), "--n-boot", "0"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "e" / "table.md").read_text()
    assert "| gradcam | 100.0 (no CI) |" in md and "[100.0, 100.0]" not in md
    table = pd.read_csv(tmp_path / "e" / "table.csv")
    g = table[(table.method == "gradcam") & (table.metric == "iou")].iloc[0]
    assert g["mean"] == 100.0 and math.isnan(g["ci_low"]) and math.isnan(g["ci_high"])
    bmd = (tmp_path / "e" / "baselines.md").read_text()
    assert "(no CI)" in bmd and "| yes |" not in bmd and "| no |" not in bmd
    assert "— IoU per finding (mean x100, n)" in (tmp_path / "e" / "by_finding.md").read_text()  # names its metric


def test_report_withholds_bold_on_few_pairs_and_says_so(tmp_path):
    from medfocus.report import build_report

    out = build_report(_records(3), tmp_path / "report.html", gallery=0, viewers=False, baselines=False)
    html = out.read_text()
    assert "<b>100.0</b>" not in html  # today: gradcam bold on 3 pairs
    assert "Bold withheld in" in html and "fewer than 10 paired samples (3)" in html
    # 12 pairs, gradcam exact on every one: bold, no withheld note
    html = build_report(_records(12), tmp_path / "twelve.html", gallery=0, viewers=False, baselines=False).read_text()
    # IoU, F1, recall; not precision: occlusion's boxes lie inside the expert box, precision 100 too (a tie)
    assert html.count("<b>100.0</b>") == 3 and "Bold withheld in" not in html
    out = build_report(_records(1), tmp_path / "one.html", gallery=0, viewers=False, baselines=False)
    html = out.read_text()
    assert '<span class="ci">no CI</span>' in html and "[100.0, 100.0]" not in html
    assert "&#34;no CI&#34;: no interval was computed" in html or '"no CI": no interval was computed' in html
