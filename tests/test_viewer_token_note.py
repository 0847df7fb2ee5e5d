"""The viewer's token strip says why a method has no per-token strip: a method that attributes the whole
answer at once (gradients of the answer's log-likelihood), a prompting method (it asks for boxes), and
"no answer tokens recorded" only where that is the truth (a failed record, a method that does not say)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfocus.attribution import BASELINES, get_method, list_methods

sys.path.insert(0, str(Path(__file__).parent))

NONE_RECORDED = "no answer tokens recorded"


def _film(tmp_path) -> str:
    p = tmp_path / "film.png"
    Image.fromarray(np.full((40, 50), 90, np.uint8)).save(p)
    return str(p)


def _rec(film, method, **kw):
    return dict({"model": "demo", "dataset": "files", "index": 0, "mode": "direct", "method": method, "image_path": film,
                 "question": "Is there evidence of <b>nodule</b>?", "answer": "Yes", "error": None}, **kw)


def test_every_built_in_method_declares_whether_it_makes_per_token_maps():
    for name in list_methods():
        assert type(get_method(name)).per_token_maps in (True, False), name


@pytest.mark.parametrize("method,expected", [
    ("gradcam", "gradcam attributes the whole answer at once"),
    ("integrated_gradients", "integrated_gradients attributes the whole answer at once"),
    ("lrp", "lrp attributes the whole answer at once"),
    ("prompting", "prompting asks the model for boxes"),
])
def test_whole_answer_and_prompting_methods_say_why(tmp_path, method, expected):
    from medfocus.report.viewer import sample_view

    view = sample_view([_rec(_film(tmp_path), method, pred_boxes=[[1, 1, 9, 9]])])
    note = view["methods"][0]["token_note"]
    assert note.startswith(expected) and NONE_RECORDED not in note


def test_no_answer_tokens_recorded_where_that_is_the_truth(tmp_path):
    from medfocus.report.viewer import sample_view

    film = _film(tmp_path)
    # a per-token method whose record carries no tokens (failed), and a method the registry does not know
    view = sample_view([_rec(film, "occlusion", error="CUDA out of memory"), _rec(film, "my_method")])
    notes = {m["name"]: m["token_note"] for m in view["methods"]}
    assert notes["occlusion"] == f"{NONE_RECORDED} (the method failed)"
    assert notes["my_method"] == NONE_RECORDED


def test_declared_per_token_maps_match_what_the_methods_return(demo_adapter):
    """``per_token_maps`` is not a label: each built-in method's result has per-token maps exactly when it
    says so (a multi-token answer, maps small enough to keep)."""
    from medfocus.datasets.synthetic import generate_case

    image = generate_case(seed=3, size=64, findings=["cardiomegaly"]).image
    q = "Is there evidence of cardiomegaly in the image? Think step by step and answer with yes or no."
    fast = {"integrated_gradients": {"steps": 2}, "rise": {"n_masks": 8}, "occlusion": {"grid": 2}}
    for name in BASELINES:
        m = get_method(name, **fast.get(name, {}))
        if not m.needs_answer:
            continue  # prompting: asks for boxes, no answer to attribute
        res = m.attribute(demo_adapter, image, q, "The heart is enlarged, so yes.")
        assert (res.token_heatmaps is not None) == type(m).per_token_maps, name


def test_strip_in_chromium_says_why_and_stays_text(tmp_path, browser):
    from selenium.webdriver.common.by import By

    from medfocus.report.viewer import build_viewer

    film = _film(tmp_path)
    hostile = 'x<img src=x onerror="window.__pwned=1">'
    out = build_viewer([_rec(film, "gradcam", pred_boxes=[[1, 1, 9, 9]]), _rec(film, "prompting", pred_boxes=[[1, 1, 9, 9]]),
                        _rec(film, "occlusion", error=hostile)], tmp_path / "v.html")
    html = out.read_text()
    assert 'onerror="' not in html
    browser.get(out.resolve().as_uri())
    strip = lambda: browser.find_element(By.CSS_SELECTOR, ".tokens").text  # noqa: E731
    browser.find_element(By.CSS_SELECTOR, '.method-btn[data-method="gradcam"]').click()
    assert strip().startswith("gradcam attributes the whole answer at once")
    browser.find_element(By.CSS_SELECTOR, '.method-btn[data-method="prompting"]').click()
    assert strip().startswith("prompting asks the model for boxes")
    browser.find_element(By.CSS_SELECTOR, '.method-btn[data-method="occlusion"]').click()
    assert strip() == f"{NONE_RECORDED} (the method failed)"
    assert browser.execute_script("return window.__pwned === undefined && document.querySelectorAll('img').length === 0")
    data = re.search(r'<script[^>]*type="application/json"[^>]*>(.*?)</script>', html, re.S).group(1)
    assert json.loads(data)["samples"][0]["methods"][0]["token_note"]
