"""Trivial localisation baselines: known maps, leave-one-out priors, paired comparison, CLI outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medfocus.evaluation import evaluate_records
from medfocus.evaluation.baselines import (
    PRIOR_GRID,
    TRIVIAL_BASELINES,
    centre_gaussian_map,
    compare_to_baselines,
    finding_prior_maps,
    finding_table,
    random_map,
    trivial_baseline_records,
)


def test_centre_gaussian_peaks_at_the_centre_and_is_symmetric():
    g = centre_gaussian_map((40, 20), sigma=0.25)
    assert g.shape == (20, 40) and g.dtype == np.float32
    assert np.unravel_index(np.argmax(g), g.shape) in {(9, 19), (9, 20), (10, 19), (10, 20)}
    np.testing.assert_allclose(g, g[::-1, ::-1], atol=1e-7)
    # one sigma from the centre along x: exp(-1/2) of the peak (pixel centres at (i + 0.5) / W)
    x = (np.arange(40) + 0.5) / 40 - 0.5
    np.testing.assert_allclose(g[10, :], np.exp(-0.5 * ((x / 0.25) ** 2 + ((10.5 / 20 - 0.5) / 0.25) ** 2)), rtol=1e-5)
    with pytest.raises(ValueError):
        centre_gaussian_map((0, 10))


def test_random_map_is_seeded_uniform():
    a, b = random_map(3), random_map(3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_map(4))
    assert a.shape == (16, 16) and 0 <= a.min() and a.max() < 1


def _sample(index, attribute, boxes, size=(100, 100), dataset="synthetic"):
    return {"dataset": dataset, "index": index, "attribute": attribute, "gt_boxes": boxes, "image_size": list(size)}


def test_finding_prior_is_the_leave_one_out_mean_of_the_other_films():
    # three films with the finding in the left half, top-left quarter and right half (relative coordinates)
    s = [_sample(0, "nodule", [[0, 0, 50, 100]]), _sample(1, "nodule", [[0, 0, 100, 100]], size=(200, 200)),
         _sample(2, "nodule", [[50, 0, 100, 100]]), _sample(3, "mass", [[10, 10, 20, 20]])]
    s[1]["gt_boxes"] = [[0, 0, 100, 100]]  # top-left quarter of a 200x200 film
    priors = finding_prior_maps(s)
    half = PRIOR_GRID // 2
    left = np.zeros((PRIOR_GRID, PRIOR_GRID)); left[:, :half] = 1
    quarter = np.zeros_like(left); quarter[:half, :half] = 1
    right = np.zeros_like(left); right[:, half:] = 1
    np.testing.assert_allclose(priors[0], (quarter + right) / 2, atol=1e-6)  # film 0's own box is left out
    np.testing.assert_allclose(priors[1], (left + right) / 2, atol=1e-6)
    np.testing.assert_allclose(priors[2], (left + quarter) / 2, atol=1e-6)
    assert priors[3] is None  # the only film with a mass: no prior, never a made-up map
    # the same film asked by another model/mode counts once
    again = finding_prior_maps(s + [dict(s[0])])
    np.testing.assert_allclose(again[0], priors[0])


def test_fractional_coverage_of_boxes_off_the_grid():
    p = finding_prior_maps([_sample(0, "x", [[0, 0, 25, 100]], size=(PRIOR_GRID * 4, 100)),
                            _sample(1, "x", [[2, 0, 6, 100]], size=(PRIOR_GRID * 4, 100))])
    # film 1 covers x in [2, 6) px of a 256-px-wide film: cell 0 ([0, 4) px) half, cell 1 ([4, 8) px) half
    np.testing.assert_allclose(p[0][0, :3], [0.5, 0.5, 0.0], atol=1e-6)


def _records_for(method, maps, samples):
    return [{"model": "m", "dataset": "synthetic", "mode": "direct", "method": method, "index": s["index"],
             "attribute": s["attribute"], "gt_boxes": s["gt_boxes"], "image_size": s["image_size"], "heatmap": h,
             "error": None} for s, h in zip(samples, maps)]


def _films(n=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = rng.integers(5, 70, size=2)
        out.append(_sample(i, "nodule" if i % 2 else "mass", [[int(x), int(y), int(x) + 20, int(y) + 20]]))
    return out


def test_perfect_method_beats_the_baselines_and_a_random_copy_does_not():
    films = _films()
    perfect = []
    for s in films:
        h = np.zeros((100, 100), np.float32)
        x1, y1, x2, y2 = s["gt_boxes"][0]
        h[y1:y2, x1:x2] = 1
        perfect.append(h)
    recs = _records_for("oracle", perfect, films)
    base = trivial_baseline_records(recs, seed=5)
    assert sorted({r["method"] for r in base}) == sorted(TRIVIAL_BASELINES)
    assert len(base) == 3 * len(films)
    # a "method" that is the random baseline itself: difference exactly 0, never "beats"
    rand = {r["index"]: r["heatmap"] for r in base if r["method"] == "baseline_random"}
    recs += _records_for("copy_of_random", [rand[s["index"]] for s in films], films)
    df = evaluate_records(recs + base)
    assert (df.loc[df.method == "oracle", "iou"] > 0.99).all()
    comp = compare_to_baselines(df, ["iou"], n_boot=500)
    row = comp.set_index("method").loc["oracle"]
    assert row["beats"] is True or row["beats"] == True  # noqa: E712 - numpy bool
    assert row["ci_low"] > 0 and row["n_pairs"] == len(films)
    cp = comp.set_index("method").loc["copy_of_random"]
    if cp["baseline"] == "baseline_random":
        assert cp["difference"] == pytest.approx(0.0) and not cp["beats"]
    else:  # another baseline is better than random: the copy cannot beat it either
        assert not cp["beats"]
    assert set(comp["baseline"]) <= set(TRIVIAL_BASELINES)


def test_baselines_skip_errors_and_negatives():
    films = _films(4)
    recs = _records_for("m1", [np.ones((100, 100), np.float32)] * 4, films)
    recs[0]["error"] = "boom"
    recs.append({**recs[1], "index": 99, "gt_boxes": []})  # a negative: nothing to localise
    base = trivial_baseline_records(recs)
    assert sorted({r["index"] for r in base}) == [1, 2, 3]


def test_finding_table_breaks_down_by_finding():
    films = _films(6)
    recs = _records_for("m1", [centre_gaussian_map((100, 100))] * 6, films)
    df = evaluate_records(recs)
    ft = finding_table(df)
    assert set(ft["attribute"]) == {"nodule", "mass"}
    assert ft["n"].sum() == 6
    for attr, g in ft.groupby("attribute"):
        assert g["mean"].iloc[0] == pytest.approx(100 * df[df.attribute == attr]["iou"].mean())


def test_evaluate_cli_writes_baseline_rows_and_comparisons(tmp_path):
    from medfocus.cli import main

    films = _films(8)
    lines = []
    for s in films:
        h = np.zeros((100, 100), np.float32)
        x1, y1, x2, y2 = s["gt_boxes"][0]
        h[y1:y2, x1:x2] = 1
        np.save(tmp_path / f"h{s['index']}.npy", h)
        lines.append({"model": "m", "dataset": "synthetic", "mode": "direct", "method": "oracle", "index": s["index"],
                      "attribute": s["attribute"], "gt_boxes": s["gt_boxes"], "image_size": s["image_size"],
                      "heatmap_path": f"h{s['index']}.npy", "error": None})
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in lines))
    res = CliRunner().invoke(main, ["evaluate", str(pred), "--out", str(tmp_path / "e"), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "e" / "table.md").read_text()
    for b in TRIVIAL_BASELINES:
        assert b in table
    comp = pd.read_csv(tmp_path / "e" / "baselines.csv")
    assert set(comp["method"]) == {"oracle"} and comp["beats"].all()
    assert "mass" in (tmp_path / "e" / "by_finding.md").read_text()
    res = CliRunner().invoke(main, ["evaluate", str(pred), "--out", str(tmp_path / "n"), "--no-baselines"])
    assert res.exit_code == 0 and "baseline_" not in (tmp_path / "n" / "table.md").read_text()


def test_report_shows_baseline_rows_comparison_and_per_finding(tmp_path):
    import sys
    from html.parser import HTMLParser
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import make_run

    from medfocus.report import build_report

    preds, _ = make_run(tmp_path, n=3)
    html = build_report(preds, tmp_path / "r.html").read_text()
    for b in TRIVIAL_BASELINES:
        assert f">{b}<" in html  # a row of the results tables
    assert "Against trivial baselines" in html and "best trivial baseline" in html
    assert "Per finding (IoU x100, n)" in html

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cells, self._in = [], False

        def handle_starttag(self, tag, attrs):
            self._in = tag in ("td", "th")

        def handle_data(self, data):
            if self._in and data.strip():
                self.cells.append(data.strip())

    p = Cells()
    p.feed(html)
    # 3 samples: fewer pairs than MIN_PAIRS (10), so no verdict either way -- "n/a", said in the section's note
    assert "n/a" in p.cells and "beats it" not in p.cells and "does not beat it" not in p.cells
    assert "n/a: fewer than 10 paired samples" in html
    plain = build_report(preds, tmp_path / "p.html", baselines=False).read_text()
    assert "baseline_random" not in plain and "Against trivial baselines" not in plain


def test_baselines_on_non_square_films_are_image_relative_and_the_summary_names_each_reason(tmp_path):
    """On non-square films the image-relative baselines (prior, random grid) span the whole film and are
    scored; a stored map of another aspect ratio is still refused; the closing line counts each reason."""
    from medfocus.cli import main
    from medfocus.evaluation.records import evaluate_record

    W, H = 300, 200  # landscape, like the paediatric films
    films = [_sample(i, "nodule", [[0, 0, W // 2, H]], size=(W, H)) for i in range(3)]  # the left half, every film
    films.append(_sample(3, "mass", [[10, 10, 60, 60]], size=(W, H)))  # the only mass: no prior
    lines = []
    for s in films:
        h = np.zeros((H, W), np.float32)
        x1, y1, x2, y2 = s["gt_boxes"][0]
        h[y1:y2, x1:x2] = 1
        np.save(tmp_path / f"h{s['index']}.npy", h)
        lines.append({"model": "m", "dataset": "synthetic", "mode": "direct", "method": "oracle", "index": s["index"],
                      "attribute": s["attribute"], "gt_boxes": s["gt_boxes"], "image_size": [W, H],
                      "heatmap_path": f"h{s['index']}.npy", "error": None})
    base = trivial_baseline_records(lines)
    rows = {(r["method"], r["index"]): evaluate_record(r) for r in base}
    for (method, index), row in rows.items():
        if (method, index) == ("baseline_finding_prior", 3):
            assert row["error"].startswith("no other sample of finding 'mass'")
        else:
            assert row["error"] is None, (method, index, row["error"])
    # the prior of a nodule film is the other films' left half: stretched onto the 300x200 film, the GT box up to
    # the bilinear edge of the 64-cell grid (stretched wrongly, e.g. as a square canvas, it would not be)
    assert rows[("baseline_finding_prior", 0)]["iou"] > 0.95
    # the same 64x64 grid stored as a method's map of this film: another aspect ratio, refused
    prior = next(r["heatmap"] for r in base if r["method"] == "baseline_finding_prior" and r["index"] == 0)
    stored = evaluate_record({**lines[0], "method": "mine", "heatmap_path": None, "heatmap": prior})
    assert stored["error"] is not None and "is not the frame of image_size [300, 200]" in stored["error"]
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in lines))
    res = CliRunner().invoke(main, ["evaluate", str(pred), "--out", str(tmp_path / "e"), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    assert "12 trivial-baseline rows (1 undefined: 1 with no other sample of the finding to build a prior from)" in res.output
    recs = pd.read_csv(tmp_path / "e" / "baseline_records.csv")
    assert int(recs["error"].notna().sum()) == 1
