"""`medfocus explain` and the interactive viewer: settings checked before the model loads, records in the
normal schema, the viewer in a real headless chromium (no console errors, tokens and method switches change
the overlay, non-blank film, data shown as text), and the shipped demo model on a synthetic film."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from medfocus.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).parent))


# ---- settings are validated before anything expensive ------------------------------------------------
def _no_model(name):
    raise AssertionError("the model must not load when the settings are wrong")


def test_explain_validates_before_loading_the_model(tmp_path):
    from medfocus.io.writers import write_png
    from medfocus.runner.explain import explain, parse_box

    film = write_png(tmp_path / "f.png", np.full((40, 50), 90, np.uint8))
    kw = dict(out=tmp_path / "o", load_model=_no_model, progress=False)
    with pytest.raises(ConfigError, match="exactly one of"):
        explain([film], finding="x", question="y", **kw)
    with pytest.raises(ConfigError, match="exactly one of"):
        explain([film], **kw)
    with pytest.raises(DataError, match="missing.png"):
        explain([tmp_path / "missing.png"], finding="nodule", **kw)
    with pytest.raises(ConfigError, match="unknown method"):
        explain([film], finding="nodule", methods=["nope"], **kw)
    with pytest.raises(ConfigError, match="not selected"):
        explain([film], finding="nodule", methods=["occlusion"], params={"rise": {"n_masks": 8}}, **kw)
    with pytest.raises(ConfigError, match="unknown parameter"):
        explain([film], finding="nodule", methods=["rise"], params={"rise": {"n_mask": 8}}, **kw)
    other = write_png(tmp_path / "g.png", np.full((40, 50), 80, np.uint8))
    with pytest.raises(ConfigError, match="single film"):
        explain([film, other], finding="nodule", boxes=[(1, 1, 5, 5)], **kw)
    with pytest.raises(ConfigError, match=r"0 <= x1 < x2 <= 50"):
        explain([film], finding="nodule", boxes=[(10, 10, 60, 20)], **kw)
    # fractions given as pixels: on a film of >= 32 px per side, refused with the pixel box they probably mean
    with pytest.raises(ConfigError, match=r"--box 0,0,0\.5,0\.5: every value is within \[0, 1\].*50x40 px film f\.png.*0,0,25,20"):
        explain([film], finding="nodule", boxes=[(0, 0, 0.5, 0.5)], **kw)
    assert parse_box(" 1, 2.5,3,4") == (1.0, 2.5, 3.0, 4.0)
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,nan"):
        with pytest.raises(ConfigError, match="four numbers"):
            parse_box(bad)
    assert not (tmp_path / "o").exists()  # nothing written for refused settings


def test_script_json_cannot_close_its_element():
    from medfocus.report.viewer import script_json

    text = script_json({"a": "</script><img src=x onerror=alert(1)> & \u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": "</script><img src=x onerror=alert(1)> & \u2028"}
    with pytest.raises(ValueError):
        script_json({"x": float("nan")})


def test_encode_map_keeps_the_real_range_and_the_aspect():
    from medfocus.report.viewer import encode_map

    a = np.zeros((400, 200), np.float32)
    a[:200] = 3.0  # top half hot
    a[0, 0] = np.nan
    e = encode_map(a, 100)
    assert (e["w"], e["h"]) == (50, 100) and e["lo"] == 0.0 and e["hi"] == 3.0 and e["nonfinite"] == 1
    import base64

    q = np.frombuffer(base64.b64decode(e["data"]), np.uint8).reshape(100, 50)
    assert q[0, 0] == 239 and q[1:50].min() == 255 and q[50:].max() == 0  # the NaN pixel counts as the minimum
    const = encode_map(np.full((10, 10), 2.0, np.float32), 100)
    assert const["lo"] == const["hi"] == 2.0 and set(base64.b64decode(const["data"])) == {0}


def test_pool_warning_once_per_run_and_in_every_record(tmp_path, caplog):
    """A method on the default synthetic pool warns once per run on non-synthetic films, and says so in the records."""
    from medfocus.runner import ResultStore, WorkItem, load_results, run_grid
    from test_runner_fakes import FakeAdapter, HotBoxMethod, make_samples, read_npy, simple_boxes

    class PoolMethod(HotBoxMethod):
        uses_synthetic_pool = True

    samples, boxes = make_samples(tmp_path / "real", 3, dataset="vindr_cxr")
    synth, sboxes = make_samples(tmp_path / "syn", 2, dataset="synthetic")
    boxes.update(sboxes)
    items = [WorkItem("m", s.dataset, "direct", s, answer="Yes") for s in samples + synth]
    with caplog.at_level("WARNING"), ResultStore(tmp_path / "r.jsonl") as st:
        run_grid(items, ["pool"], st, load_model=FakeAdapter, make_method=lambda n, p: PoolMethod(boxes),
                 read_image=read_npy, heatmap_to_boxes=simple_boxes, progress=False)
    recs = load_results(tmp_path / "r.jsonl")
    warned = [r for r in recs if r.get("reference_pool_warning")]
    assert sorted(r["dataset"] for r in warned) == ["vindr_cxr"] * 3
    assert "synthetic" in warned[0]["reference_pool_warning"] and "medfocus.pool" in warned[0]["reference_pool_warning"]
    assert sum("default reference pool" in m for m in caplog.messages) == 1  # once per run
    assert all(r["answer_source"] == "given" and r["answer"] == "Yes" for r in recs)


# ---- the demo model on a synthetic film, and the viewer in chromium ----------------------------------
HOSTILE = 'c<img src=x onerror="window.__pwned=1">.dcm'  # a file name is data too
METHODS = ["attention_head", "gradcam", "occlusion", "medfocus"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, demo_adapter):
    from medfocus.datasets.synthetic import generate_case
    from medfocus.datasets.synthetic.dataset import _write_dicom
    from medfocus.runner.explain import explain

    root = tmp_path_factory.mktemp("explain_synth")
    case = generate_case(5, findings=["cardiomegaly"], severity=1.0)
    film = root / HOSTILE
    _write_dicom(film, case.image, "explain-test")
    box = tuple(float(v) for v in case.findings[0].box)
    res = explain([film], out=root / "out", finding="cardiomegaly", mode="cot", methods=METHODS,
                  params={"occlusion": {"grid": 4}, "medfocus": {"region": "mask", "rule": "nested", "refine": "medsam", "medsam": "demo"}},
                  boxes=[box], load_model=lambda name: demo_adapter, progress=False)
    return res, case, box


def test_explain_records_and_viewer_file(synthetic_run):
    res, case, box = synthetic_run
    assert res.html.name == "explain.html" and len(res.records) == len(METHODS)
    assert res.summary.errors == 0
    for r in res.records:
        assert r["dataset"] == "files" and r["index"] == 0 and r["mode"] == "cot"
        assert r["answer"] == res.answers[0]["answer"] and r["answer_source"] == "model" and r["answer_parsed"] == "Yes"
        assert len(r["answer"].split()) > 3  # step-by-step: the model's whole rationale is explained
        assert r["gt_answer"] is None and r["gt_boxes"] == [list(box)]
        assert "reference_pool_warning" not in r  # a synthetic DICOM: the default pool is the right one
        assert r["question"] == "Is there evidence of cardiomegaly in the image? Think step by step and answer with yes or no."
        h = res.heatmap(0, r["method"])
        assert h.shape == case.image.shape and np.isfinite(h).all()
    with np.load(res.record(0, "occlusion")["heatmap_path"]) as z:
        tok = z["token_heatmaps"]
    assert tok.ndim == 3 and tok.shape[1:] == case.image.shape and tok.shape[0] >= 5  # one map per answer token
    mf = res.record(0, "medfocus")
    assert mf["extras"]["concept"] == "cardiac silhouette" and not mf["extras"]["fallback"]
    with np.load(mf["heatmap_path"]) as z:
        masks = z["extra_concept_masks"]
    assert masks.shape == (11, *case.image.shape) and set(np.unique(masks)) <= {0, 1}
    html = res.html.read_text()
    # self-contained: no external resource, the data in one JSON element, the hostile question never raw
    assert not re.search(r'(src|href)\s*=\s*["\']?(?!data:)[a-z]+:', html)
    assert "<img" not in html and 'onerror="' not in html
    assert html.count("<script") == 2 and 'type="application/json"' in html
    # a rerun with the same settings resumes; other settings in the same folder are refused
    from medfocus.runner.explain import explain

    again = explain([case_path(res)], out=res.out, finding="cardiomegaly", mode="cot", methods=METHODS,
                    params=json.loads((res.out / "explain.json").read_text())["params"], boxes=[box],
                    load_model=_no_model, progress=False)
    assert again.summary.skipped == len(METHODS) and again.summary.done == 0
    with pytest.raises(ConfigError, match="other settings"):
        explain([case_path(res)], out=res.out, finding="nodule", methods=METHODS, load_model=_no_model, progress=False)


def test_explain_a_given_answer(synthetic_run, demo_adapter, tmp_path):
    from medfocus.runner.explain import explain

    res = explain([case_path(synthetic_run[0])], out=tmp_path / "o", finding="cardiomegaly", answer="No", methods=["occlusion"],
                  params={"occlusion": {"grid": 2}}, load_model=lambda name: demo_adapter, progress=False)
    (r,) = res.records
    assert r["answer"] == "No" and r["answer_source"] == "given" and r["answer_parsed"] == "No" and r["error"] is None


def test_a_film_given_twice_is_explained_once_with_a_note(synthetic_run, demo_adapter, tmp_path, monkeypatch):
    from medfocus.runner.explain import explain

    film = case_path(synthetic_run[0])
    monkeypatch.chdir(Path(film).parent)  # the same film by its absolute and its relative name
    lines: list[str] = []
    res = explain([film, Path(film).name], out=tmp_path / "o", finding="cardiomegaly", answer="No", methods=["occlusion"],
                  params={"occlusion": {"grid": 2}}, load_model=lambda name: demo_adapter, progress=False,
                  notify=lines.append)
    assert len(res.records) == 1 and len(res.answers) == 1 and res.records[0]["error"] is None
    assert any("given more than once, explained once" in ln and film in ln for ln in lines)


def case_path(res) -> str:
    return res.records[0]["image_path"]


def _canvas(browser, css):
    from selenium.webdriver.common.by import By

    c = browser.find_element(By.CSS_SELECTOR, css)
    return c, browser.execute_script("return arguments[0].toDataURL()", c), c.get_attribute("data-state")


def _severe(browser):
    return [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]


def test_viewer_in_chromium(synthetic_run, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By

    res, case, box = synthetic_run
    browser.get(res.html.resolve().as_uri())
    assert _severe(browser) == []
    assert browser.execute_script("return window.__pwned === undefined && document.querySelectorAll('img').length === 0")
    assert browser.find_element(By.CSS_SELECTOR, ".film h2").text == HOSTILE  # shown as text
    main, whole, state = _canvas(browser, "canvas.main-canvas")
    assert state == "medfocus|all|whole answer"
    tokens = browser.find_elements(By.CSS_SELECTOR, ".token")
    answer = res.answers[0]["answer"]
    assert len(tokens) >= 5 and "".join(t.text for t in tokens).split() == answer.split()
    final = browser.find_elements(By.CSS_SELECTOR, ".token.final")
    assert len(final) == 1 and final[0].text.strip().lower() == "yes"
    # click a rationale token: MedFocus shows that token's map and that token's concept drops
    bars_whole = browser.find_element(By.CSS_SELECTOR, ".medfocus table.bars").text
    word = next(t for t in tokens if t.text.strip() and "yes" not in t.text.lower())
    word.click()
    _, tok_url, tok_state = _canvas(browser, "canvas.main-canvas")
    t = word.get_attribute("data-t")
    assert tok_state == f"medfocus|{t}|token {t}" and tok_url != whole
    # captions name the token as a reader does: 1-based position, count and its text (not a 0-based index)
    name = f"token {int(t) + 1}/{len(tokens)} \u201c{word.text.strip()}\u201d"
    assert name in browser.find_element(By.CSS_SELECTOR, ".film .caption").text
    assert browser.find_element(By.CSS_SELECTOR, ".medfocus h3").text == f"MedFocus: drop for {name} (nats)"
    assert browser.find_element(By.CSS_SELECTOR, ".medfocus table.bars").text != bars_whole
    final[0].click()
    _, fin_url, fin_state = _canvas(browser, "canvas.main-canvas")
    assert fin_state.startswith("medfocus|") and fin_url not in (whole, tok_url)
    assert "· final token " in browser.find_element(By.CSS_SELECTOR, ".film .caption").text
    # switch methods: occlusion has per-token maps, gradcam shows its final-token map for the final token
    browser.find_element(By.CSS_SELECTOR, '.method-btn[data-method="occlusion"]').click()
    _, occ_url, occ_state = _canvas(browser, "canvas.main-canvas")
    assert occ_state.startswith("occlusion|") and occ_url != fin_url
    browser.find_element(By.CSS_SELECTOR, '.method-btn[data-method="gradcam"]').click()
    assert _canvas(browser, "canvas.main-canvas")[2].endswith("|final token")
    word.click()
    assert _canvas(browser, "canvas.main-canvas")[2].endswith("|whole answer (no per-token map)")
    browser.find_element(By.CSS_SELECTOR, ".all-tokens").click()
    # the small multiples: one per method; the opacity slider changes the overlay
    assert len(browser.find_elements(By.CSS_SELECTOR, ".grid .cell")) == len(METHODS)
    before = _canvas(browser, "canvas.main-canvas")[1]
    browser.execute_script("var r=document.querySelector('input.opacity'); r.value='0'; r.dispatchEvent(new Event('input'));")
    assert _canvas(browser, "canvas.main-canvas")[1] != before
    # a screenshot of the film is not blank: film structure shows through
    shot = np.asarray(Image.open(io.BytesIO(main.screenshot_as_png)).convert("L")).astype(float)
    assert shot.shape[0] > 200 and shot.std() > 20 and np.percentile(shot, 95) - np.percentile(shot, 5) > 60
    assert _severe(browser) == []


# ---- item 5: without a split, `attribute` explains the model's own answer ----------------------------
def test_attribute_without_split_explains_the_models_own_answer(tmp_path, demo_adapter, monkeypatch):
    from click.testing import CliRunner

    import medfocus.lvlm
    from medfocus.cli import main
    from medfocus.datasets.synthetic import write_dataset
    from medfocus.io import read_image
    from medfocus.lvlm.generation import generate_answers
    from medfocus.runner import load_results

    monkeypatch.setattr(medfocus.lvlm, "load_lvlm", lambda name, **kw: demo_adapter)
    write_dataset(tmp_path / "data", n=6, seed=4, counterfactuals=False, progress=False)
    data = tmp_path / "data"
    base = ["attribute", "--dataset", "synthetic", "--data-root", str(data), "--model", "demo", "--method", "occlusion",
            "--param", "occlusion.grid=2", "--limit", "1", "--no-progress"]
    runner = CliRunner()
    r = runner.invoke(main, [*base, "--mode", "direct", "--mode", "cot", "--out", str(tmp_path / "own")])
    assert r.exit_code == 0, r.output
    recs = load_results(tmp_path / "own" / "predictions.jsonl")
    assert len(recs) == 2 and all(x["error"] is None for x in recs)
    for x in recs:
        img, _ = read_image(x["image_path"])
        stem = x["question"].split("?")[0] + "?"
        g = generate_answers(demo_adapter, [img], [stem], x["mode"])[0]
        assert x["answer"] == g.text.strip() and x["answer_parsed"] == g.answer
        assert x["answer_source"] == "model" and x["gt_answer"] == "Yes"
    cot = [x for x in recs if x["mode"] == "cot"]
    assert all(len(x["answer"].split()) > 3 for x in cot)  # the rationale, not a bare "Yes"
    r = runner.invoke(main, [*base, "--answer-source", "ground-truth", "--out", str(tmp_path / "gt")])
    assert r.exit_code == 0, r.output
    gt = load_results(tmp_path / "gt" / "predictions.jsonl")
    assert all(x["answer"] == "Yes" and x["answer_source"] == "ground_truth" for x in gt)
    r = runner.invoke(main, ["attribute", "--bench", str(tmp_path / "x.json"), "--answer-source", "ground-truth",
                             "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "without --bench" in r.output


def test_report_gallery_viewers_of_a_hostile_run(tmp_path, browser):
    """The report's gallery links each sample to its viewer; hostile strings in records stay text there."""
    from selenium.webdriver.common.by import By

    from medfocus.report import build_report
    from medfocus.runner import load_results
    from test_security_report import TRAVERSAL, hostile_run

    run = hostile_run(tmp_path)
    out = build_report(load_results(run / "predictions.jsonl"), run / "report.html")
    links = re.findall(r'href="(viewers/[^"]+)"', out.read_text())
    assert links and all((run / h).parent == run / "viewers" for h in links)
    for h in links:
        browser.get((run / h).resolve().as_uri())
        assert _severe(browser) == []
        assert browser.execute_script("return window.__xss === undefined && "
                                      "document.querySelectorAll('img,svg,iframe,[onerror],[onload]').length === 0")
        assert len(browser.find_elements(By.CSS_SELECTOR, "script")) == 2  # the data element and the viewer
        assert f"{TRAVERSAL}/answer" in browser.find_element(By.TAG_NAME, "body").text


def test_long_answer_on_a_large_film_keeps_low_resolution_token_maps(tmp_path, demo_adapter, monkeypatch):
    """Per-token maps too big for original pixels (the methods keep them on the token grid) are stored in the
    film's frame at low resolution, and the viewer still shows one map per token. The size limits are
    lowered so that a 512-px film and a sentence stand for a 3000-px film and a long rationale."""
    import medfocus.attribution._common as common
    import medfocus.runner.grid as grid_mod
    from medfocus.datasets.synthetic import generate_case
    from medfocus.io.writers import write_png
    from medfocus.report.viewer import sample_view
    from medfocus.runner.explain import explain
    from medfocus.runner.grid import LOWRES_TOKEN_SIDE

    monkeypatch.setattr(common, "MAX_TOKEN_MAP_FLOATS", 2**20)
    monkeypatch.setattr(grid_mod, "MAX_TOKEN_MAP_VALUES", 2**20)
    case = generate_case(2, size=512, findings=["cardiomegaly"], severity=1.0)
    film = write_png(tmp_path / "big.png", case.image)
    answer = "The cardiac silhouette is enlarged and the heart is wide on this film, wider than half the chest. Therefore, yes."
    res = explain([film], out=tmp_path / "o", finding="cardiomegaly", mode="cot", answer=answer, methods=["attention_head"],
                  load_model=lambda name: demo_adapter, progress=False)
    (r,) = res.records
    T = len(r["extras"]["answer_tokens"])
    assert T * 512 * 512 > common.MAX_TOKEN_MAP_FLOATS  # the method could not keep them in original pixels
    with np.load(r["heatmap_path"]) as z:
        assert "token_heatmaps" not in z.files
        low = z["token_heatmaps_lowres"].astype(np.float32)
        grid = z["extra_token_maps_lowres"]
    assert low.shape == (T, LOWRES_TOKEN_SIDE, LOWRES_TOKEN_SIDE) and np.isfinite(low).all()
    # the same maps as the grid: the hottest grid cell is where the low-resolution map is hottest
    for t in (0, T - 1):
        gy, gx = np.unravel_index(np.argmax(grid[t]), grid[t].shape)
        ly, lx = np.unravel_index(np.argmax(low[t]), low[t].shape)
        cell = LOWRES_TOKEN_SIDE / grid[t].shape[0]
        assert abs((ly + 0.5) / cell - (gy + 0.5)) <= 1 and abs((lx + 0.5) / cell - (gx + 0.5)) <= 1
    view = sample_view(res.records, res.out)
    assert len(view["methods"][0]["token_maps"]) == T == len(view["tokens"])


def test_explain_checks_the_model_and_its_indices_before_writing_anything(tmp_path, monkeypatch):
    """A layer index the loaded model does not have (or Grad-CAM's last layer) and a model that cannot be
    loaded without the network are one error before --out is touched (new-user report items 4, 6, 11)."""
    import huggingface_hub.constants as hfc

    from medfocus.attribution.testing import ToyAdapter, toy_image
    from medfocus.errors import ModelError
    from medfocus.io.writers import write_png
    from medfocus.runner.explain import explain

    film = write_png(tmp_path / "f.png", toy_image((2, 5)))
    loads = []
    kw = dict(out=tmp_path / "o", finding="nodule", load_model=lambda name: loads.append(name) or ToyAdapter(), progress=False)
    n = len(ToyAdapter().decoder_layers)
    for method, params, words in (("gradcam", {"layer": -1}, ["'layer' = -1", f"last of the {n} decoder layers", "exactly zero"]),
                                  ("attention_head", {"layer": 50}, ["'layer' = 50", f"{n} decoder layers", f"0..{n - 1}"])):
        with pytest.raises(ConfigError) as ei:
            explain([film], methods=[method, "occlusion"], params={method: params}, **kw)
        assert all(w in str(ei.value) for w in [f"method {method!r}", *words]), str(ei.value)
        assert not (tmp_path / "o").exists()
    assert loads == ["demo", "demo"]  # loaded once per call, then refused
    res = explain([film], methods=["gradcam"], params={"gradcam": {"layer": -2}}, **kw)
    assert res.summary.done == 1 and res.records[0]["extras"]["layer"] == f"decoder_layer_{n - 2}_output"
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelError, match="'someone/not-cached'.*not available locally"):
        explain([film], out=tmp_path / "o2", finding="nodule", model="someone/not-cached", methods=["occlusion"], progress=False)
    assert not (tmp_path / "o2").exists()


def test_viewer_heatmap_colours_are_the_reports_colour_map():
    """A heatmap looks the same in the viewer and in the report: one colour map (figures.HEAT_CMAP)."""
    import matplotlib

    from medfocus.report.figures import HEAT_CMAP
    from medfocus.report.viewer import _lut

    lut = np.asarray(_lut(), np.uint8).reshape(256, 3)
    ends = np.rint(matplotlib.colormaps[HEAT_CMAP]([0.0, 1.0])[:, :3] * 255).astype(np.uint8)
    assert np.array_equal(lut[[0, 255]], ends)
    assert lut[0].astype(int).sum() < 30 and lut[255].astype(int).sum() > 600  # dark -> bright (jet started blue, (0, 0, 128))


def test_explain_threads_option_sets_torch_threads_for_the_run_only(tmp_path, monkeypatch):
    import torch
    from click.testing import CliRunner

    import medfocus.runner.explain as rx
    from medfocus.cli import main

    seen = []

    def fake(*a, **k):
        seen.append(torch.get_num_threads())
        raise ConfigError("stop here")

    monkeypatch.setattr(rx, "explain", fake)
    film = tmp_path / "f.png"
    film.write_bytes(b"")
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    r = CliRunner().invoke(main, ["explain", str(film), "--finding", "x", "--out", str(tmp_path / "o"), "--threads", str(want)])
    assert r.exit_code == 1 and "stop here" in r.output and "Traceback" not in r.output
    assert seen == [want] and torch.get_num_threads() == before  # given back, also when the run fails
    r = CliRunner().invoke(main, ["explain", str(film), "--finding", "x", "--out", str(tmp_path / "o")])
    assert seen[-1] == before  # no --threads: torch's own setting
    r = CliRunner().invoke(main, ["explain", str(film), "--finding", "x", "--out", str(tmp_path / "o"), "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.output and len(seen) == 2
