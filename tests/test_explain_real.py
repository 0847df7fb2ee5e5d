"""Real films end to end: `medfocus explain` with the shipped demo model on the real computed-radiography
film (uncompressed and JPEG 2000 lossy DICOM) and two real paediatric JPEGs (Kermany et al., Cell 2018,
CC BY 4.0), every registered method.

The demo model knows only the synthetic world, so its answers here mean nothing; what the films check is
the pipeline: decoding, every method's map in the film's own pixels (or a recorded error), the anatomy
transfer (lungs on the correct sides in the radiological convention, heart low in the middle), the
warning about the synthetic reference pool, and the viewer in a real browser."""

from __future__ import annotations

import io

import numpy as np
import pytest

FILMS = ("real_cxr/dicom/RG1_UNCR.dcm", "real_cxr/dicom/RG1_J2KI.dcm", "real_cxr/kermany_val/normal_01.jpeg",
         "real_cxr/kermany_val/pneumonia_01.jpeg")
# Every method, at reduced sample counts to keep the test short (the maps' geometry is what is checked).
PARAMS = ("integrated_gradients.steps=4", "rise.n_masks=16", "occlusion.grid=4", "prompting_medsam.detector=anatomy")


@pytest.fixture(scope="module")
def real_run(shared_data, tmp_path_factory):
    pytest.importorskip("openjpeg", reason="the JPEG 2000 decoder (pylibjpeg-openjpeg) is not installed")
    from click.testing import CliRunner

    from medfocus.cli import main
    from medfocus.runner import load_results

    out = tmp_path_factory.mktemp("explain_real")
    args = ["explain", *[str(shared_data / f) for f in FILMS], "--finding", "cardiomegaly", "--out", str(out), "--no-progress"]
    for p in PARAMS:
        args += ["--param", p]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return out, load_results(out / "predictions.jsonl"), r.output


def test_every_method_maps_the_real_film_or_records_why(real_run):
    from medfocus.attribution import list_methods
    from medfocus.io import read_image

    out, recs, output = real_run
    methods = list(list_methods())
    assert len(recs) == len(FILMS) * len(methods)
    assert output.count("answer '") == len(FILMS)
    for i, f in enumerate(FILMS):
        path = next(r["image_path"] for r in recs if r["index"] == i)
        assert path.endswith(f.split("/")[-1])
        _, (w, h) = read_image(path)
        mine = {r["method"]: r for r in recs if r["index"] == i}
        assert set(mine) == set(methods)
        for m, r in mine.items():
            assert r["image_size"] == [w, h] and r["answer_source"] == "model" and r["gt_answer"] is None
            if r["error"]:
                assert isinstance(r["error"], str) and r["error"]
                continue
            if r["heatmap_path"]:
                with np.load(r["heatmap_path"]) as z:
                    hm = z["heatmap"]
                assert hm.shape == (h, w) and np.isfinite(hm).all(), (f, m)
            for b in r.get("pred_boxes") or []:
                assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h, (f, m, b)
        ok = [m for m, r in mine.items() if not r["error"]]
        assert len(ok) == len(methods), {m: r["error"] for m, r in mine.items() if r["error"]}
        # not from the synthetic world and on the default (synthetic) pool: said in the records
        for m in ("medfocus", "prompting_medsam"):
            assert "synthetic" in mine[m]["reference_pool_warning"]
        assert "reference_pool_warning" not in mine["occlusion"]


def test_anatomy_transfer_on_real_films(real_run):
    """Concept boxes inside the film; the patient's left lung on the image's right half, the right lung on its
    left half (radiological convention), the heart in the lower middle."""
    _, recs, _ = real_run
    mf = sorted((r for r in recs if r["method"] == "medfocus"), key=lambda r: r["index"])
    assert len(mf) == len(FILMS)
    for r in mf:
        w, h = r["image_size"]
        cb = r["extras"]["concept_boxes"]
        assert len(cb) == 11
        for c, b in cb.items():
            assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h, (r["image_path"], c, b)
        cx = {c: (b[0] + b[2]) / 2 / w for c, b in cb.items()}
        cy = {c: (b[1] + b[3]) / 2 / h for c, b in cb.items()}
        assert cx["left lung"] > 0.5 and cb["left lung"][0] > 0.4 * w, r["image_path"]
        assert cx["right lung"] < 0.5 and cb["right lung"][2] < 0.6 * w, r["image_path"]
        assert 0.35 < cx["cardiac silhouette"] < 0.7 and cy["cardiac silhouette"] > 0.5, r["image_path"]
        assert cx["left costophrenic angle"] > 0.5 > cx["right costophrenic angle"]
    # the same film, uncompressed and JPEG 2000 lossy: the same anatomy within 1 % of the film's width
    a, b = mf[0]["extras"]["concept_boxes"], mf[1]["extras"]["concept_boxes"]
    w = mf[0]["image_size"][0]
    assert max(abs(x - y) for c in a for x, y in zip(a[c], b[c])) < 0.01 * w


def test_lossy_film_gives_the_same_maps(real_run):
    _, recs, _ = real_run
    for m in ("occlusion", "gradcam"):
        pair = [r for r in recs if r["method"] == m and r["index"] in (0, 1)]
        maps = []
        for r in sorted(pair, key=lambda r: r["index"]):
            with np.load(r["heatmap_path"]) as z:
                maps.append(z["heatmap"][::8, ::8].ravel())
        assert np.corrcoef(maps[0], maps[1])[0, 1] > 0.9, m


def test_real_viewer_in_chromium(real_run, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By

    out, _, _ = real_run
    html = out / "explain.html"
    assert html.stat().st_size < 20_000_000
    browser.get(html.resolve().as_uri())
    assert [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] == []
    sections = browser.find_elements(By.CSS_SELECTOR, "section.film")
    assert len(sections) == len(FILMS)
    assert "trained only on the synthetic" in browser.find_element(By.CSS_SELECTOR, ".notes").text
    assert "synthetic" in sections[0].find_element(By.CSS_SELECTOR, ".warn").text
    canvas = sections[1].find_element(By.CSS_SELECTOR, "canvas.main-canvas")
    browser.execute_script("arguments[0].scrollIntoView()", canvas)
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("L")).astype(float)
    assert shot.std() > 20 and np.percentile(shot, 95) - np.percentile(shot, 5) > 60  # film structure, not a flat page
