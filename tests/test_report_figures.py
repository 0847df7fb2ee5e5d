"""Report figures and numbers a researcher can put in a paper: the paired significance test behind
"best", failed methods shown as failed, vector export, colour bars, wrapped captions, named MedFocus
winners and labelled fallbacks, token strips without overlap, left/right markers."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfocus.evaluation import best_methods, paired_bootstrap_diff, summarize, to_markdown
from medfocus.report import figures


def _frame(values: dict[str, np.ndarray], errors: dict[str, set[int]] | None = None) -> pd.DataFrame:
    rows = []
    for method, vals in values.items():
        for i, v in enumerate(vals):
            err = "boom" if i in (errors or {}).get(method, set()) else None
            rows.append(dict(model="m", dataset="d", mode="direct", method=method, index=i, error=err,
                             iou=np.nan if err else float(v)))
    return pd.DataFrame(rows)


def test_paired_bootstrap_diff_known_answers():
    a = np.linspace(0.3, 0.9, 10)
    mean, lo, hi = paired_bootstrap_diff(a, a - 0.1, n_boot=200)
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)  # constant difference
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1.0], [1.0, 2.0])


def test_best_is_marked_only_when_the_paired_difference_is_significant():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.8, 30)  # large between-sample spread
    # A beats B by a small but consistent 0.02 on every sample: the unpaired CIs overlap, the paired test decides.
    df = _frame({"A": base + 0.02, "B": base})
    s = summarize(df.rename(columns={}), ("iou",), n_boot=500)
    a, b = (s[s.method == k].iloc[0] for k in ("A", "B"))
    assert a.ci_low < b.ci_high  # intervals overlap ...
    r = best_methods(df, ("iou",), n_boot=500).iloc[0]
    assert r.best == "A" and r.significant and r.runner_up == "B" and r.n_pairs == 30 and r.difference == pytest.approx(2.0)
    # ... while pure noise between two methods is not significant, whichever mean is higher.
    noisy = _frame({"A": base + rng.normal(0, 0.1, 30), "B": base + rng.normal(0, 0.1, 30)})
    r = best_methods(noisy, ("iou",), n_boot=500).iloc[0]
    assert not r.significant and r.ci_low < 0 < r.ci_high
    # Best must beat *every* other method: a third method tied with A removes the mark.
    tied = _frame({"A": base + 0.02, "B": base, "C": base + 0.02 + rng.normal(0, 0.05, 30)})
    assert not best_methods(tied, ("iou",), n_boot=500).iloc[0].significant
    # A single method has nobody to beat.
    assert not best_methods(_frame({"A": base}), ("iou",)).iloc[0].significant


def test_failed_records_are_left_out_of_the_pairs_and_all_failed_is_failed():
    base = np.linspace(0.1, 0.6, 12)
    df = _frame({"A": base + 0.1, "B": base, "F": base}, errors={"A": {0, 1}, "F": set(range(12))})
    r = best_methods(df, ("iou",), n_boot=200).iloc[0]
    assert r.best == "A" and r.significant and r.n_pairs == 10  # F (all failed) is no competitor; A's 2 failures unpaired
    s = summarize(df, ("iou",), n_boot=100)
    f = s[s.method == "F"].iloc[0]
    assert f.n == 0 and f.n_error == 12
    md = to_markdown(s, ("iou",))
    assert "| F | failed |" in md


def _png_array(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(int)


def test_vector_and_raster_export():
    s = summarize(_frame({"A": np.linspace(0, 1, 8), "B": np.linspace(0, 0.5, 8)}), ("iou",), n_boot=50)
    pdf = figures.metric_bars(s, metric="iou", fmt="pdf")
    svg = figures.metric_bars(s, metric="iou", fmt="svg")
    lo, hi = figures.metric_bars(s, metric="iou", dpi=72), figures.metric_bars(s, metric="iou", dpi=200)
    assert pdf[:5] == b"%PDF-" and b"<svg" in svg[:400]
    assert _png_array(hi).shape[1] > 2.5 * _png_array(lo).shape[1]  # --dpi scales the raster
    # Deterministic bytes (no creation date in vector output)
    assert figures.metric_bars(s, metric="iou", fmt="svg") == svg
    with pytest.raises(ValueError, match="png, svg, pdf"):
        figures.metric_bars(s, metric="iou", fmt="jpg")


def test_all_failed_method_is_drawn_as_failed_not_zero():
    df = _frame({"A": np.linspace(0.2, 0.8, 8), "F": np.zeros(8)}, errors={"F": set(range(8))})
    s = summarize(df, ("iou",), n_boot=50)
    svg = figures.metric_bars(s, metric="iou", fmt="svg").decode()
    assert ">failed<" in svg
    # Compare with a method that really scored 0: no "failed" text.
    s0 = summarize(_frame({"A": np.linspace(0.2, 0.8, 8), "Z": np.zeros(8)}), ("iou",), n_boot=50)
    assert "failed" not in figures.metric_bars(s0, metric="iou", fmt="svg").decode()
    mat = figures.method_model_heatmap(pd.concat([s, s.assign(model="other")]), metric="iou", fmt="svg").decode()
    assert ">failed<" in mat


def test_wrap_never_cuts_words():
    text = "The heart is enlarged and there are no lung markings beyond the pleural line. Yes"
    lines = figures.wrap(text, 20).split("\n")
    assert all(len(line) <= 20 for line in lines) and " ".join(lines) == text
    assert "beyon" not in lines[-2][-5:] or lines[-2].endswith("beyond")


def test_panel_labels_name_the_winner_and_the_fallback():
    assert figures.panel_label({"method": "medfocus", "winner": "cardiac silhouette", "score": 0.5}) == "medfocus\ncardiac silhouette\nIoU 50"
    assert figures.panel_label({"method": "medfocus", "winner": "whole image", "fallback": True}) == "medfocus\nwhole-image fallback"
    assert figures.panel_label({"method": "rise", "error": "oom", "score": 0.0}) == "rise\nfailed"


def test_gallery_row_has_colour_bar_markers_and_visible_expert_boxes():
    img = np.full((100, 120), 90, np.uint8)
    heat = np.zeros((100, 120), np.float32)
    heat[20:60, 30:90] = 1.0
    panels = [{"method": "occlusion", "heatmap": heat, "pred_boxes": [(30, 20, 90, 60)], "score": 1.0},
              {"method": "medfocus", "heatmap": heat, "fallback": True, "winner": "whole image"},
              {"method": "rise", "error": "boom"}]
    svg = figures.sample_gallery_row(img, [(30, 20, 90, 60)], panels, title="a long caption " * 20, fmt="svg").decode()
    for text in ("R", "L", "whole image", "whole-image fallback", "failed", "attribution (min-max per panel)"):
        assert f">{text}<" in svg, text
    # Every panel shows the expert box.
    assert svg.count(figures.GT_COLOR) >= 4  # one expert box per panel
    # Raster: pure green pixels of the expert box survive on top of the heatmap in the occlusion panel.
    arr = _png_array(figures.sample_gallery_row(img, [(30, 20, 90, 60)], panels[:1]))
    green = (arr[..., 1] > 200) & (arr[..., 0] < 60) & (arr[..., 2] < 160)
    assert green[:, arr.shape[1] // 2:].sum() > 50


def test_token_layout_never_overlaps():
    widths = [30.0, 80.0, 12.0, 200.0, 50.0, 500.0, 5.0]
    pos = figures.layout_tokens(widths, 220.0, gap=3.0)
    for (l1, x1), w1, (l2, x2) in zip(pos, widths, pos[1:]):
        assert l2 > l1 or x2 >= x1 + w1 + 3.0
    assert all(x + w <= 220.0 or x == 0 for (_, x), w in zip(pos, widths))  # only an over-long token overflows, alone
    tokens = ["The", " cardiothoracic", " ratio", " is", " enlarged", ".", "\n", " Yes"] * 6
    svg = figures.token_attribution(tokens, {"cardiac silhouette": np.linspace(0, 2, len(tokens))}, fmt="svg").decode()
    assert ">drop (nats)<" in svg  # the colour bar's scale


def test_concept_ranking_names_winner_and_threshold():
    svg = figures.concept_ranking({"cardiac silhouette": 2.0, "left lung": 0.1}, winner="cardiac silhouette", tau=0.75, fmt="svg").decode()
    assert "winner: cardiac silhouette" in svg and "0.29" in svg
    svg = figures.concept_ranking({"cardiac silhouette": 0.1}, winner="whole image", fallback=True, fmt="svg").decode()
    assert "whole-image fallback" in svg
