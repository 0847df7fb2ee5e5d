"""`medfocus explain` rerun on a folder that already holds the run: a subset of its methods (same film,
same settings) is served from the stored records, without the model and without touching explain.json;
anything else is refused with a message that says how to get it."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from medfocus.errors import ConfigError

METHODS = ["gradcam", "occlusion"]
PARAMS = {"occlusion": {"grid": 2}}


def _no_model(name):
    raise AssertionError("a rerun served from the stored records must not load the model")


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory, demo_adapter):
    from medfocus.datasets.synthetic import generate_case
    from medfocus.datasets.synthetic.dataset import _write_dicom
    from medfocus.runner.explain import explain

    root = tmp_path_factory.mktemp("explain_subset")
    film = root / "film.dcm"
    _write_dicom(film, generate_case(7, findings=["cardiomegaly"], severity=1.0).image, "explain-test")
    res = explain([film], out=root / "out", finding="cardiomegaly", methods=METHODS, params=PARAMS,
                  load_model=lambda name: demo_adapter, progress=False)
    assert res.summary.done == 2 and res.summary.errors == 0
    return film, res


def _viewer_methods(html_path):
    text = html_path.read_text()
    data = re.search(r'<script[^>]*type="application/json"[^>]*>(.*?)</script>', text, re.S).group(1)
    return [m["name"] for s in json.loads(data)["samples"] for m in s["methods"]]


@pytest.mark.parametrize("methods", [["occlusion"], ["gradcam"], ["occlusion", "gradcam"]])
def test_a_subset_of_the_stored_methods_is_served_from_the_store(stored_run, methods):
    from medfocus.runner.explain import explain

    film, res = stored_run
    spec_before = (res.out / "explain.json").read_bytes()
    store_before = (res.out / "predictions.jsonl").read_bytes()
    again = explain([film], out=res.out, finding="cardiomegaly", methods=methods,
                    params={m: p for m, p in PARAMS.items() if m in methods}, load_model=_no_model, progress=False)
    assert again.summary.done == 0 and again.summary.skipped == len(methods)
    assert sorted(r["method"] for r in again.records) == sorted(methods)
    for m in methods:  # the very records (and maps) of the stored run
        assert again.record(0, m) == res.record(0, m)
    assert again.served_from == sorted(METHODS)
    # the folder still holds the whole run: a later full rerun resumes instead of recomputing
    assert (res.out / "explain.json").read_bytes() == spec_before
    assert (res.out / "predictions.jsonl").read_bytes() == store_before
    assert sorted(_viewer_methods(again.html)) == sorted(methods)
    full = explain([film], out=res.out, finding="cardiomegaly", methods=METHODS, params=PARAMS, load_model=_no_model, progress=False)
    assert full.summary.skipped == 2 and full.served_from is None and sorted(_viewer_methods(full.html)) == METHODS


def test_a_subset_with_other_settings_is_refused_with_the_way_out(stored_run):
    from medfocus.runner.explain import explain

    film, res = stored_run
    with pytest.raises(ConfigError) as e:  # the subset's own parameter differs: another run
        explain([film], out=res.out, finding="cardiomegaly", methods=["occlusion"], params={"occlusion": {"grid": 3}},
                load_model=_no_model, progress=False)
    assert "params" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(ConfigError) as e:  # more methods than stored: refused, naming how to get them
        explain([film], out=res.out, finding="cardiomegaly", methods=[*METHODS, "rise"], params=PARAMS,
                load_model=_no_model, progress=False)
    msg = str(e.value)
    assert "methods" in msg and "'rise'" in msg and "--overwrite" in msg and "another --out" in msg


def test_cli_subset_rerun_says_it_is_served_from_the_stored_run(stored_run):
    from medfocus.cli import main

    film, res = stored_run
    out = CliRunner().invoke(main, ["explain", str(film), "--finding", "cardiomegaly", "--method", "occlusion",
                                    "--param", "occlusion.grid=2", "--out", str(res.out), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "served from the stored run" in out.output and "gradcam, occlusion" in out.output
    assert "0 computed, 1 already in the store" in out.output


def test_a_result_neutral_setting_is_no_difference_and_a_subset_is_not_listed(stored_run):
    """batch_size cannot change results (Method.runtime_settings, which attribute's check skips too): a rerun
    that only adds it -- on a subset of the stored methods or on all of them -- is served from the store
    without the model; an explicit default is no difference either. A refused subset names only what else
    differs, never the (allowed) subset of methods."""
    from medfocus.runner.explain import explain

    film, res = stored_run
    sub = explain([film], out=res.out, finding="cardiomegaly", methods=["occlusion"],
                  params={"occlusion": {"grid": 2, "batch_size": 3}}, load_model=_no_model, progress=False)
    assert sub.summary.done == 0 and sub.summary.skipped == 1 and sub.served_from == sorted(METHODS)
    assert sub.record(0, "occlusion") == res.record(0, "occlusion")
    full = explain([film], out=res.out, finding="cardiomegaly", methods=METHODS,
                   params={"occlusion": {"grid": 2, "batch_size": 5, "baseline": "zero"}, "gradcam": {"layer": "input"}},
                   load_model=_no_model, progress=False)
    assert full.summary.done == 0 and full.summary.skipped == 2
    with pytest.raises(ConfigError) as e:
        explain([film], out=res.out, finding="cardiomegaly", methods=["occlusion"], params={"occlusion": {"grid": 3}},
                load_model=_no_model, progress=False)
    msg = str(e.value)
    assert "params: {'occlusion': {'grid': 2}} -> {'occlusion': {'grid': 3}}" in msg, msg
    assert "methods:" not in msg


def test_a_parameter_given_twice_with_two_values_is_an_error(stored_run):
    from medfocus.cli import main
    from medfocus.commands.attribute import parse_params

    assert parse_params(["rise.grid=4", "rise.grid=4", "rise.n_masks=8"]) == {"rise": {"grid": 4, "n_masks": 8}}
    with pytest.raises(ConfigError) as e:
        parse_params(["gradcam.layer=middle", "rise.grid=4", "gradcam.layer=input"])
    assert str(e.value) == ("--param gradcam.layer is given twice with different values: 'gradcam.layer=middle' and "
                            "'gradcam.layer=input'; give it once")
    with pytest.raises(ConfigError):  # 4 (an integer) and 4.0 are not silently the same value
        parse_params(["rise.grid=4", "rise.grid=4.0"])
    film, res = stored_run
    out = CliRunner().invoke(main, ["explain", str(film), "--finding", "cardiomegaly", "--method", "occlusion",
                                    "--param", "occlusion.grid=2", "--param", "occlusion.grid=3", "--out",
                                    str(res.out), "--no-progress"])
    assert out.exit_code != 0 and "given twice with different values" in out.output and "Traceback" not in out.output


def test_film_labels_are_the_shortest_distinguishing_path_suffix():
    from medfocus.runner.explain import film_labels

    assert film_labels(["/x/a/f.png", "/y/a/f.png", "/z/f.png", "/x/b/g.png"]) == ["x/a/f.png", "y/a/f.png", "z/f.png", "g.png"]
    assert film_labels(["/x/f.png", "/x/f.png"]) == ["f.png #0", "f.png #1"]  # the same file twice: its position


def test_cli_labels_films_of_one_name_apart_and_overwrite_recomputes(tmp_path, demo_adapter, monkeypatch):
    """Two films called film.dcm in one run are told apart in the CLI lines and the viewer; --overwrite with
    unchanged settings recomputes every film and method (what 'replace it' promises), it does not serve the store."""
    import medfocus.lvlm as lvlm
    from medfocus.cli import main
    from medfocus.datasets.synthetic import generate_case
    from medfocus.datasets.synthetic.dataset import _write_dicom

    films = [tmp_path / d / "film.dcm" for d in ("a", "b")]
    for seed, f in zip((7, 8), films):
        f.parent.mkdir()
        _write_dicom(f, generate_case(seed, findings=["cardiomegaly"], severity=1.0).image, "explain-test")
    loads = []
    monkeypatch.setattr(lvlm, "load_lvlm", lambda name, device=None, **kw: loads.append(name) or demo_adapter)
    out = tmp_path / "out"
    argv = ["explain", *map(str, films), "--finding", "cardiomegaly", "--method", "occlusion", "--param", "occlusion.grid=2",
            "--out", str(out), "--no-progress"]
    # the demo's canvas is 224x224: no film has more than 224 content pixels a side, so grid 225 leaves empty cells
    r = CliRunner().invoke(main, [*argv[:-4], "occlusion.grid=225", *argv[-3:]])
    assert r.exit_code == 1 and "forward passes per film: occlusion 50,626 (1 + 225x225 grid cells)" in r.output, r.output
    assert "so grid can be at most 224 (less for films of another aspect ratio)" in r.output and not out.exists()
    assert loads == []  # refused before the model loads: the demo's canvas is known from its medfocus.json
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    assert "forward passes per film: occlusion 5 (1 + 2x2 grid cells)" in r.output
    lines = [ln.split(": answer")[0] for ln in r.output.splitlines() if ": answer " in ln]
    assert lines == ["a/film.dcm", "b/film.dcm"], r.output
    data = re.search(r'<script[^>]*type="application/json"[^>]*>(.*?)</script>', (out / "explain.html").read_text(), re.S).group(1)
    assert [s["label"] for s in json.loads(data)["samples"]] == ["a/film.dcm", "b/film.dcm"]
    r = CliRunner().invoke(main, argv)  # a plain rerun resumes
    assert r.exit_code == 0 and "0 computed, 2 already in the store" in r.output, r.output
    r = CliRunner().invoke(main, [*argv, "--overwrite"])
    assert r.exit_code == 0 and "2 computed, 0 already in the store" in r.output, r.output
    assert loads == ["demo", "demo"]


def test_canvas_known_before_loading_only_where_load_lvlm_fixes_it():
    from medfocus.lvlm.loading import known_canvas

    assert known_canvas("demo") == (224, 224)  # its medfocus.json
    assert known_canvas("qwen2_5_vl_7b") == (448, 448)  # the registry entry
    assert known_canvas("gemma3_4b") is None and known_canvas("llava1_5_7b") is None  # from the processor, at load
