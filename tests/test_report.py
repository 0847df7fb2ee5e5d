"""Report: summary numbers, Table-1 HTML, figures, the self-contained HTML file, and (when Debian
chromium is installed) a headless screenshot that must show a rendered, non-blank page."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfocus.report import build_report, medfocus_view, results_table, summarize
from medfocus.report import figures
from medfocus.runner.store import ResultStore, load_results
from medfocus.types import CONCEPTS

METHODS = ("occlusion", "rise", "medfocus")


def _metrics_frame():
    rows = []
    for method, base in (("occlusion", 0.2), ("rise", 0.4)):
        for i in range(10):
            v = base + 0.02 * (i - 4.5)
            rows.append(dict(model="demo", dataset="synthetic", index=i, mode="direct", method=method,
                             iou=v, f1=v + 0.1, precision=v + 0.2, recall=v, error=None))
    rows.append(dict(model="demo", dataset="synthetic", index=11, mode="direct", method="rise",
                     iou=np.nan, f1=np.nan, precision=np.nan, recall=np.nan, error="boom"))
    return pd.DataFrame(rows)


def _html_escape(text: str) -> str:
    import html as _h

    return _h.escape(text, quote=True)


def test_summarize_and_table():
    s = summarize(_metrics_frame(), n_boot=500)
    r = s[(s.method == "rise") & (s.metric == "iou")].iloc[0]
    assert r["n"] == 10 and r["mean"] == pytest.approx(40.0)
    assert r["ci_low"] < 40.0 < r["ci_high"] and r["ci_high"] - r["ci_low"] < 10 and r["n_error"] == 1
    assert s[(s.method == "occlusion") & (s.metric == "precision")]["mean"].iloc[0] == pytest.approx(40.0)
    assert "<b>" not in results_table(s, model="demo", mode="direct")  # bold only where significance says so
    html = results_table(s, model="demo", mode="direct", best={("synthetic", "iou"): "rise"})
    assert "<b>40.0</b>" in html and html.count("<b>") == 1
    assert ">20.0<" in html and "[" in html and html.count("<tr>") == 2 + 2
    assert "1 failed" in html  # rise's failed record is shown next to its n
    # the source / deviation column: each method's declared source line, escaped
    from medfocus.attribution import method_source

    assert "Source / deviation" in html and method_source("rise") and method_source("occlusion")
    assert _html_escape(method_source("rise")) in html and _html_escape(method_source("occlusion")) in html
    assert results_table(s, model="demo", mode="cot") == ""


def test_an_undefined_trivial_baseline_is_not_called_failed():
    """The finding prior of a finding with no other sample has no value (evaluate: "undefined"); the report
    says "undefined" for it, and "failed" only for a method whose records failed."""
    rows = [dict(model="demo", dataset="synthetic", index=i, mode="direct", method=m, iou=np.nan, f1=np.nan,
                 precision=np.nan, recall=np.nan, error="no other sample of finding 'mass' in synthetic to build a prior from"
                 if m == "baseline_finding_prior" else "boom") for i in range(2) for m in ("baseline_finding_prior", "rise")]
    html = results_table(summarize(pd.DataFrame(rows), n_boot=50), model="demo", mode="direct")
    body = [r for r in html.split("<tr") if "<td" in r]
    (prior,) = [r for r in body if "baseline_finding_prior" in r]
    (rise,) = [r for r in body if "baseline_finding_prior" not in r]
    assert "baseline_finding_prior" in prior and prior.count(">undefined<") == 4 and "2 undefined" in prior
    assert "failed" not in prior
    assert "rise" in rise and rise.count(">failed<") == 4 and "2 failed" in rise and "undefined" not in rise


def test_figures_are_pngs():
    s = summarize(_metrics_frame(), n_boot=100)
    img = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    heat = np.zeros((64, 64), np.float32)
    heat[10:20, 10:20] = 1
    outs = [
        figures.metric_bars(s, metric="iou", mode="direct"),
        figures.method_model_heatmap(s, metric="iou", mode="direct"),
        figures.method_model_heatmap(pd.concat([s, s.assign(model="other", mean=np.nan)]), metric="iou", mode="direct"),
        figures.sample_gallery_row(img, [(10, 10, 20, 20)], [{"method": "a", "heatmap": heat, "pred_boxes": [(10, 10, 20, 20)], "score": 1.0},
                                                            {"method": "b", "heatmap": None, "pred_boxes": None, "error": "x"}]),
        figures.concept_ranking({"left lung": 0.5, "cardiac silhouette": 2.0}, winner="cardiac silhouette"),
        figures.token_attribution(["The", " heart", " is", " enlarged", ".", " Yes"], {"cardiac silhouette": [0, 2, 0, 1, 0, 3], "left lung": [0.1] * 6}),
    ]
    for png in outs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        im = np.asarray(Image.open(__import__("io").BytesIO(png)).convert("L"))
        assert im.std() > 5  # something was drawn


def test_medfocus_view_reads_extras():
    names = list(CONCEPTS[:3])
    rec = {"extras": {"deltas": {n: float(i) for i, n in enumerate(names)}, "winner": names[2], "answer_tokens": ["a", "b"]}}
    arrays = {"extra_token_deltas": np.array([[0, 1], [1, 0], [2, 2]], float), "extra_concepts": np.array(names)}
    v = medfocus_view(rec, arrays)
    assert v["winner"] == names[2] and v["deltas"][names[1]] == 1.0
    assert v["tokens"] == ["a", "b"] and v["token_scores"][names[2]] == [2.0, 2.0]
    assert medfocus_view({"extras": {}}, {}) == {"winner": None, "fallback": None}


def make_run(tmp_path: Path, n: int = 3) -> tuple[list[dict], pd.DataFrame]:
    """A small run written through the real store: images, heatmaps, records, metrics."""
    rng = np.random.default_rng(0)
    store_path = tmp_path / "run" / "predictions.jsonl"
    metric_rows = []
    with ResultStore(store_path) as st:
        for mode in ("direct", "cot"):
            for i in range(n):
                img = (rng.random((96, 96)) * 80 + 60).astype(np.uint8)
                img[30:50, 40:70] = 220
                ipath = tmp_path / f"img{i}.png"
                Image.fromarray(img).save(ipath)
                gt = [[40.0, 30.0, 70.0, 50.0]]
                for k, method in enumerate(METHODS):
                    key = ("demo", "synthetic", i, mode, method)
                    heat = np.zeros((96, 96), np.float32)
                    off = 10 * k
                    heat[30 + off // 2:50, 40 - off:70 - off] = 1.0
                    extras = {}
                    arrays = {"heatmap": heat}
                    if method == "medfocus":
                        extras = {"deltas": {c: float(j == 0) * 2 + 0.1 * j for j, c in enumerate(CONCEPTS)}, "winner": CONCEPTS[0],
                                  "answer_tokens": ["The", " heart", " is", " large", ".", " Yes"], "concepts": list(CONCEPTS)}
                        arrays["extra_token_deltas"] = rng.random((len(CONCEPTS), 6))
                    err = "RuntimeError: out of memory" if (method == "rise" and i == n - 1) else None
                    rec = {"model": "demo", "dataset": "synthetic", "index": i, "mode": mode, "method": method,
                           "attribute": "cardiomegaly" if i % 2 else "nodule", "answer": "Yes", "gt_boxes": gt,
                           "image_size": [96, 96], "image_path": str(ipath), "extras": extras, "error": err,
                           "pred_boxes": None if err else [[40.0 - off, 30.0 + off // 2, 70.0 - off, 50.0]],
                           "heatmap_path": None if err else st.save_arrays(key, **arrays)}
                    st.append(rec)
                    iou = np.nan if err else max(0.0, (30 - off) * (20 - off // 2)) / (600 + (30 * (20 - off // 2)) - (30 - off) * (20 - off // 2))
                    metric_rows.append(dict(model="demo", dataset="synthetic", index=i, mode=mode, method=method,
                                            iou=iou, f1=iou, precision=iou, recall=iou, error=err))
    return load_results(store_path), pd.DataFrame(metric_rows)


def test_build_report_self_contained(tmp_path):
    preds, metrics = make_run(tmp_path)
    retention = [{"model": "demo", "dataset": "synthetic", "mode": "direct", "editor": "oracle", "n": 10, "errors": 0,
                  "failed_correct": 2, "failed_flip": 1, "failed_background": 0, "kept": 7, "retention_pct": 70.0},
                 {"model": "demo", "dataset": "synthetic", "mode": "cot", "editor": "inpaint", "n": 10, "errors": 1,
                  "failed_correct": 2, "failed_flip": 3, "failed_background": 0, "kept": 4, "retention_pct": 40.0}]
    out = build_report(preds, tmp_path / "elsewhere" / "report.html", metrics=metrics, retention=retention,
                       run_info={"Elapsed": "1.0 s"}, figures_dir=tmp_path / "figs")
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # self-contained: no external resources, no scripts
    assert not re.search(r'src="(?!data:)', html) and "<script" not in html
    # the only links: each gallery sample's interactive viewer, a file next to the report
    links = re.findall(r'href="([^"]*)"', html)
    assert len(links) == 4 and all(re.fullmatch(r"viewers/[A-Za-z0-9._-]+\.html", h) for h in links)  # one per gallery sample
    assert all((out.parent / h).is_file() for h in links)
    n_img = html.count('src="data:image/png;base64,')
    # 2 modes x 2 bar plots (one model/dataset: no method x model matrix) + gallery (2 modes x 2 findings,
    # one sample each) + 3 MedFocus examples x 2 figures
    assert n_img == 4 + 4 + 6
    assert len(list((tmp_path / "figs").glob("*.png"))) == n_img
    for text in ("Direct answer", "Step-by-step", "occlusion", "inpaint", "Failures", "out of memory", "cardiac silhouette", "Elapsed"):
        assert text in html
    # occlusion is exact (IoU 100), better than every other method on every paired sample -- but on 3 samples:
    # too few pairs for the paired bootstrap to call it best (MIN_PAIRS), so no bold, and the note says why
    assert html.count("<b>100.0</b>") == 0 and "paired bootstrap" in html
    assert "Bold withheld in" in html and "fewer than 10 paired samples (" in html
    # the gallery is stratified by finding: both findings of the run are shown in each mode
    assert html.count("<h4>cardiomegaly</h4>") == 2 and html.count("<h4>nodule</h4>") == 2


def test_report_figures_in_vector_format_and_failed_methods(tmp_path):
    preds, metrics = make_run(tmp_path)
    long_answer = "The cardiac silhouette is enlarged and there are no lung markings beyond the pleural line on the right. " * 3 + "Yes"
    for r in preds:
        r["answer"] = long_answer
        if r["method"] == "rise":  # every rise record failed
            r.update(error="RuntimeError: out of memory", heatmap_path=None, pred_boxes=None)
    metrics.loc[metrics["method"] == "rise", ["iou", "f1", "precision", "recall"]] = np.nan
    metrics.loc[metrics["method"] == "rise", "error"] = "RuntimeError: out of memory"
    out = build_report(preds, tmp_path / "r.html", metrics=metrics, figures_dir=tmp_path / "figs", fig_format="svg", dpi=100)
    html = out.read_text()
    svgs = {p.name: p.read_text() for p in (tmp_path / "figs").glob("*.svg")}
    assert svgs and not list((tmp_path / "figs").glob("*.png")) and all("<svg" in t for t in svgs.values())
    assert '<td class="failed">failed</td>' in html  # not "0.0", not a dash
    assert long_answer in html  # the caption is whole (wrapped by the page), never cut mid-word
    gallery = [t for n, t in svgs.items() if n.startswith("gallery_")]
    assert len(gallery) == 4
    for t in gallery:  # MedFocus' panel names its winner; the failed method says so; R/L markers
        assert f">{CONCEPTS[0]}<" in t and ">failed<" in t and ">R<" in t and ">L<" in t
    assert any(">failed<" in t for n, t in svgs.items() if n.startswith("bars_"))
    with pytest.raises(Exception, match="figure format"):
        build_report(preds, tmp_path / "x.html", metrics=metrics, fig_format="jpg")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    preds, metrics = make_run(tmp_path, n=2)
    out = build_report(preds, tmp_path / "report.html", metrics=metrics)
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
           "--window-size=1200,1600", out.resolve().as_uri()]
    subprocess.run(cmd, check=False, timeout=90, capture_output=True)
    shutil.rmtree(profile, ignore_errors=True)
    assert shot.exists(), "chromium wrote no screenshot"
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[:2] == (1600, 1200)
    # a rendered page: mostly white background, dark text, and colour from the embedded figures
    gray = im.mean(axis=2)
    assert (gray > 240).mean() > 0.3 and (gray < 100).mean() > 0.002
    sat = im.max(axis=2) - im.min(axis=2)
    assert (sat > 80).mean() > 0.005


def test_compact_retention_of_the_bench_table():
    from medfocus.bench.build import RETENTION_COLUMNS
    from medfocus.report.html import compact_retention

    row = dict.fromkeys(RETENTION_COLUMNS, 0)
    row.update(model="demo", dataset="synthetic", mode="cot", editor="oracle", n=10, failed_correct=2, failed_flip=1,
               kept=7, retention_pct=70.0, unparseable_correct=1, unparseable_flip=1)
    df = compact_retention(pd.DataFrame([row], columns=RETENTION_COLUMNS))
    assert list(df.columns)[-3:] == ["kept", "retention %", "unparseable answers"]
    assert df.iloc[0]["unparseable answers"] == 2 and df.iloc[0]["✗ correct"] == 2
    assert "negatives (correct/n)" not in df.columns
