"""`medfocus bench build`: end to end on the toy world, and clear errors on the real-dataset path."""

from __future__ import annotations

import json
import re

import numpy as np

import pytest
from click.testing import CliRunner

import medfocus.commands.bench as bench_cmd
from medfocus.cli import main
from test_bench import PLAN, ToyAdapter, make_toy_world


@pytest.fixture
def toy_dataset(tmp_path, monkeypatch):
    import medfocus.datasets as ds

    root = tmp_path / "data"
    make_toy_world(root, PLAN, n_neg=2)
    monkeypatch.setitem(ds.DATASET_REGISTRY, "toy", lambda r, **kw: make_toy_world(r, PLAN, n_neg=2))
    return root


def test_bench_build_both_modes_writes_splits_and_retention(tmp_path, toy_dataset, monkeypatch):
    loaded = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter())
    out = tmp_path / "out"
    args = ["bench", "build", "--model", "toy_model", "--dataset", "toy", "--data-root", str(toy_dataset), "--mode", "direct",
            "--mode", "cot", "--editor", "oracle", "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert loaded == ["toy_model"]
    for mode in ("direct", "cot"):
        recs = json.loads((out / "toy_model" / "toy" / f"{mode}.json").read_text())
        assert [r["index"] for r in recs] == [0, 1, 4]
        assert f"toy_model / toy / {mode}: kept 3 of 6 positives (50.0%)" in res.output
    csv = (out / "retention.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("model,dataset,mode,editor,n,errors")
    # rerun: resumes (nothing to generate), same table
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: ToyAdapter(fail_on_call=1))
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == 0, res2.output
    res3 = CliRunner().invoke(main, ["bench", "retention", str(out)])
    assert res3.exit_code == 0 and "| toy_model | toy | cot | oracle | 6 | 0 | 1 | 0 | 2 | 3 | 50.0 |" in res3.output


def test_bench_retention_on_a_folder_without_logs_is_an_error_and_writes_nothing(tmp_path):
    """Was: an empty table, exit 0, and retention.csv / retention.md written into the folder."""
    folder = tmp_path / "odd"
    (folder / "m" / "d").mkdir(parents=True)
    (folder / "m" / "d" / "direct.log.jsonl").write_text("")  # a log without rows is no retention either
    (folder / "notes.txt").write_text("not a bench folder")
    res = CliRunner().invoke(main, ["bench", "retention", str(folder)])
    assert res.exit_code != 0
    assert f"{folder}: no bench logs here (<model>/<dataset>/<mode>.log.jsonl with at least one row)" in res.output, res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in folder.iterdir()) == ["m", "notes.txt"]


def test_bench_real_dataset_without_data_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["bench", "build", "--model", "qwen2_5_vl_3b", "--dataset", "vindr_cxr", "--data-root",
                                    str(tmp_path), "--mode", "direct", "--editor", "radedit", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "VinDr-CXR annotations" in res.output and "Traceback" not in res.output


def _vindr_fixture(root):
    import numpy as np

    from medfocus.io import write_png

    d = root / "vindr-cxr" / "1.0.0"
    (d / "annotations").mkdir(parents=True)
    (d / "annotations" / "annotations_test.csv").write_text(
        "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\nimg1,R8,Nodule/Mass,10,12,30,34\n")
    write_png(d / "test" / "img1.png", np.full((64, 64), 100, np.uint8))


def test_bench_real_dataset_radedit_without_weights_is_a_clear_error(tmp_path):
    _vindr_fixture(tmp_path)
    res = CliRunner().invoke(main, ["bench", "build", "--model", "qwen2_5_vl_3b", "--dataset", "vindr_cxr", "--data-root",
                                    str(tmp_path), "--mode", "direct", "--editor", "radedit", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0, res.output
    assert "radedit" in res.output and "Traceback" not in res.output


def test_bench_real_dataset_model_without_weights_is_a_clear_error(tmp_path):
    _vindr_fixture(tmp_path)
    res = CliRunner().invoke(main, ["bench", "build", "--model", "qwen2_5_vl_3b", "--dataset", "vindr_cxr", "--data-root",
                                    str(tmp_path), "--mode", "cot", "--editor", "inpaint", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0, res.output
    assert "qwen" in res.output.lower() and "Traceback" not in res.output


def test_model_given_as_a_folder_is_named_by_the_folder(tmp_path, toy_dataset, monkeypatch):
    model_dir = tmp_path / "models" / "my_finetune"
    model_dir.mkdir(parents=True)
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: ToyAdapter())
    res = CliRunner().invoke(main, ["bench", "build", "--model", str(model_dir), "--dataset", "toy", "--data-root",
                                    str(toy_dataset), "--editor", "inpaint", "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    recs = json.loads((tmp_path / "o" / "my_finetune" / "toy" / "direct.json").read_text())
    assert all(r["model"] == "my_finetune" and r["editor"].startswith("inpaint") for r in recs)


@pytest.mark.parametrize("editor,message", [("transplant", "reference"), ("photoshop", "unknown editor")])
def test_editor_problems_are_clear_errors_before_the_model_loads(tmp_path, toy_dataset, monkeypatch, editor, message):
    loaded = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter())
    res = CliRunner().invoke(main, ["bench", "build", "--model", "m", "--dataset", "toy", "--data-root", str(toy_dataset),
                                    "--editor", editor, "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output
    assert loaded == []


@pytest.mark.parametrize("option,value", [("--limit", "-3"), ("--limit", "0"), ("--batch-size", "0"), ("--batch-size", "-1"),
                                          ("--max-new-tokens", "0"), ("--max-new-tokens", "-5")])
def test_numbers_below_one_are_refused_before_anything_loads(tmp_path, toy_dataset, monkeypatch, option, value):
    # --limit -3 used to keep all but the last 3 samples, --max-new-tokens 0 ran with 16 tokens and
    # --batch-size 0 failed every sample with exit status 0
    loaded = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter())
    res = CliRunner().invoke(main, ["bench", "build", "--model", "m", "--dataset", "toy", "--data-root", str(toy_dataset),
                                    "--editor", "oracle", "--out", str(tmp_path / "o"), "--no-progress", option, value])
    assert res.exit_code == 2, res.output
    assert option in res.output and value in res.output and "x>=1" in res.output and "Traceback" not in res.output
    assert loaded == [] and not (tmp_path / "o").exists()


def test_a_config_file_number_below_one_is_refused_too(tmp_path, toy_dataset, monkeypatch):
    loaded = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter())
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max-new-tokens: 0\n")
    res = CliRunner().invoke(main, ["bench", "build", "--config", str(cfg), "--model", "m", "--dataset", "toy", "--data-root",
                                    str(toy_dataset), "--editor", "oracle", "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 2 and "--max-new-tokens" in res.output and "x>=1" in res.output, res.output
    assert loaded == []


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(batch_size=0), dict(samples_per_step=0), dict(max_new_tokens=-1)])
def test_build_benchmark_refuses_budgets_below_one(tmp_path, kw):
    # the library must not read 0 as "not given" (it used to run max_new_tokens=0 with the mode's 16)
    from medfocus.bench import build_benchmark
    from medfocus.editing import get_editor
    from medfocus.errors import ConfigError

    samples = make_toy_world(tmp_path / "data", PLAN, n_neg=2)
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=f"{name} must be an integer >= 1, got {kw[name]}"):
        build_benchmark(ToyAdapter(), samples, mode="direct", editor=get_editor("oracle"), out_dir=tmp_path / "o",
                        model_name="toy", progress=False, **kw)
    assert not (tmp_path / "o").exists()


class _NegativesAdapter(ToyAdapter):
    """The toy model, but on the "No" films: a wrong "Yes" on film 6, a failing generation on film 7 (the
    other negatives are answered "No" from their pixels, as ToyAdapter does)."""

    def generate(self, images, questions, *, max_new_tokens=64, batch_size=8):
        from test_bench import _base

        def is_film(img, i):
            a = np.asarray(img)
            return a.shape[:2] == (48, 48) and np.array_equal(a if a.ndim == 2 else a[..., 0], _base(i))

        if any(is_film(img, 7) for img in images):
            raise ValueError("out of memory on film 7")
        out = super().generate(images, questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return ["Yes." if is_film(img, 6) else t for img, t in zip(images, out)]


def test_retention_md_and_console_show_the_negatives(tmp_path, monkeypatch):
    """Was: retention.csv had negatives / negatives_correct, but retention.md and the console table had no
    negatives column. Three "No" films: one answered "Yes" (wrong), one failing, one answered "No"."""
    import medfocus.datasets as ds

    root = tmp_path / "data"
    make_toy_world(root, PLAN, n_neg=3)
    monkeypatch.setitem(ds.DATASET_REGISTRY, "toy", lambda r, **kw: make_toy_world(r, PLAN, n_neg=3))
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: _NegativesAdapter())
    out = tmp_path / "out"
    args = ["bench", "build", "--model", "toy_model", "--dataset", "toy", "--data-root", str(root), "--editor", "oracle",
            "--out", str(out), "--no-progress", "--batch-size", "1"]
    res = CliRunner().invoke(main, [*args, "--include-negatives"])
    assert res.exit_code == 0, res.output
    log = [json.loads(ln) for ln in (out / "toy_model" / "toy" / "direct.log.jsonl").read_text().splitlines()]
    neg = {r["index"]: r for r in log if r["kind"] == "negative"}
    assert neg[6]["correct"] is False and neg[7]["error"] and neg[8]["correct"] is True  # the known answers
    header = "| model | dataset | mode | editor | n | errors | ✗ correct | ✗ flip | ✗ background | kept | retention % | " \
             "unparseable (correct/flip/bg) | negatives (correct/n) |"
    row = "| toy_model | toy | direct | oracle | 6 | 0 | 1 | 0 | 2 | 3 | 50.0 | 0/0/0 | 1/2 (+1 error) |"
    md = (out / "retention.md").read_text()
    assert header in md and row in md, md
    assert header in res.output and row in res.output  # the console prints the same table
    csv = (out / "retention.csv").read_text().splitlines()
    assert csv[0].endswith("negatives,negatives_correct,negatives_errors") and csv[1].endswith(",2,1,1"), csv
    # a split built without --include-negatives answered none: '-' (not 0/0)
    res = CliRunner().invoke(main, ["bench", "build", "--model", "other", "--dataset", "toy", "--data-root", str(root),
                                    "--editor", "oracle", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "| other | toy | direct | oracle | 6 | 0 | 1 | 0 | 2 | 3 | 50.0 | 0/0/0 | - |" in res.output


def test_another_editor_or_budget_on_an_existing_split_is_refused_as_such_before_the_model_loads(tmp_path, toy_dataset,
                                                                                                  monkeypatch):
    """Was: another --editor on an existing --out was refused as 'rows filtered on other samples' (the oracle's
    per-sample inputs), advising --overwrite, which then failed only after the model had loaded. Now the
    refusal names the setting (stored -> now), gives no --overwrite advice, and comes before the model loads,
    with or without --overwrite; so does another --max-new-tokens."""
    loaded = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter())
    out = tmp_path / "out"
    base = ["bench", "build", "--model", "toy_model", "--dataset", "toy", "--data-root", str(toy_dataset), "--out", str(out),
            "--no-progress"]
    assert CliRunner().invoke(main, [*base, "--editor", "oracle"]).exit_code == 0 and loaded == ["toy_model"]
    log = out / "toy_model" / "toy" / "direct.log.jsonl"
    before = log.read_text()
    for extra in ([], ["--overwrite"]):
        loaded.clear()
        res = CliRunner().invoke(main, [*base, "--editor", "inpaint", *extra])
        assert res.exit_code == 1, res.output
        assert re.search(rf"{re.escape(str(log))} holds samples filtered with other settings: editor: 'oracle' \(stored\) "
                         r"-> 'inpaint-[0-9a-f]{8}' \(now\)\. A split is built with one editor", res.output), res.output
        assert "overwrite" not in res.output and "other samples" not in res.output
        assert loaded == [] and log.read_text() == before
    res = CliRunner().invoke(main, [*base, "--editor", "oracle", "--max-new-tokens", "32"])
    assert res.exit_code == 1 and "max_new_tokens: 16 (stored) -> 32 (now)" in res.output, res.output
    assert loaded == [] and log.read_text() == before
    # the same settings resume (nothing regenerated: a model failing on any call is not called)
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter(fail_on_call=1))
    res = CliRunner().invoke(main, [*base, "--editor", "oracle"])
    assert res.exit_code == 0 and loaded == ["toy_model"], res.output


def test_transplant_pool_of_abnormal_films_is_refused_before_the_model_loads(tmp_path, toy_dataset, monkeypatch):
    """Was: `--editor transplant --reference-dir` took a `medfocus synth` dataset (films with findings) as the
    pool of normal films, exit 0. Now: exit 1 before the model loads, naming the folder and what a pool is."""
    from medfocus.datasets import synthetic

    data = tmp_path / "d1"
    synthetic.write_dataset(data, n=4, seed=0, size=64, progress=False)
    loaded = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter())
    res = CliRunner().invoke(main, ["bench", "build", "--model", "m", "--dataset", "toy", "--data-root", str(toy_dataset),
                                    "--editor", "transplant", "--reference-dir", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and loaded == [] and not (tmp_path / "o").exists(), res.output
    assert f"reference pool {data} refused: it holds a dataset manifest" in res.output
    assert "normal films (no findings) recorded as such in reference.json" in res.output


def test_threads_option_sets_torch_threads_for_the_filter_only(tmp_path, toy_dataset, monkeypatch):
    import torch

    import medfocus.bench as bench_pkg

    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: ToyAdapter())
    seen = []
    real = bench_pkg.build_benchmark
    monkeypatch.setattr(bench_pkg, "build_benchmark", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    args = ["bench", "build", "--model", "m", "--dataset", "toy", "--data-root", str(toy_dataset), "--editor", "oracle",
            "--out", str(tmp_path / "o"), "--no-progress", "--threads", str(want)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert seen == [want] and torch.get_num_threads() == before  # set for the run, given back after
    res = CliRunner().invoke(main, args[:-1] + ["0"])
    assert res.exit_code == 2 and "--threads" in res.output and "x>=1" in res.output
