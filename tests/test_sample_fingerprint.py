"""A stored result is tied to the sample it was computed on (new-user report, defects 1 and 2).

The key ``(model, dataset, index, mode, method)`` does not identify a sample: a row added to the
annotations shifts every index, another ``--data-root`` holds other films, a film is overwritten at
the same path. Every record carries ``sample_fingerprint`` (image path relative to the data root, size
and SHA-256 of the file, finding, boxes, question, answer); a rerun into the same ``--out`` refuses
records of another sample (naming what changed) before any model pass, ``--overwrite`` recomputes
them, and the same data resumes as before. ``medfocus explain`` does the same for its films.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medfocus.attribution.testing import ToyAdapter, toy_image
from medfocus.cli import main
from medfocus.errors import ConfigError
from medfocus.io import read_image, write_png
from medfocus.runner.grid import WorkItem, run_grid
from medfocus.runner.store import FINGERPRINT_FIELD, ResultStore, load_results, merge_stores
from medfocus.types import Sample, question_stem

METHODS = ("gradcam", "attention_head")
HEADER = ("image_id", "rad_ID", "class_name", "x_min", "y_min", "x_max", "y_max")
# image id -> (width, height, seed): every film a different size, so a record's image_size names its film
FILMS = {"n01": (40, 48, 1), "p01": (56, 40, 2), "a00": (48, 56, 3)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _film(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    return write_png(path, rng.integers(0, 256, size=(h, w), dtype=np.uint8))


def _vindr_root(root: Path, ids=("n01", "p01"), box=(4, 6, 20, 30)) -> Path:
    """A PhysioNet-layout VinDr root: one Cardiomegaly box per image (sorted by image id)."""
    base = root / "vindr-cxr" / "1.0.0"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    (base / "test").mkdir(exist_ok=True)
    with open(base / "annotations" / "annotations_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for image_id in ids:
            w.writerow((image_id, "R1", "Cardiomegaly", *box))
            if not (base / "test" / f"{image_id}.png").exists():
                _film(base / "test" / f"{image_id}.png", *FILMS[image_id])
    return base


@pytest.fixture
def demo_cli(demo_adapter, monkeypatch):
    """``medfocus attribute`` with the demo model already loaded (counts the loads)."""
    import medfocus.lvlm as lvlm

    loads = []
    monkeypatch.setattr(lvlm, "load_lvlm", lambda name, device=None, **kw: loads.append(name) or demo_adapter)

    def run(root: Path, out: Path, *extra: str):
        args = ["attribute", "--dataset", "vindr_cxr", "--data-root", str(root), "--model", "demo",
                *[a for m in METHODS for a in ("--method", m)], "--answer-source", "ground-truth",
                "--no-progress", "--out", str(out), *extra]
        return CliRunner().invoke(main, args)

    run.loads = loads
    return run


def _by_index(out: Path) -> dict[int, dict]:
    recs = load_results(out / "predictions.jsonl")
    assert len({(r["index"], r["method"]) for r in recs}) == len(recs)  # one record per key
    return {r["index"]: r for r in recs if r["method"] == "gradcam"}


def test_attribute_refuses_a_shifted_index_and_overwrite_recomputes(tmp_path, demo_cli):
    root, out = tmp_path / "root", tmp_path / "attr"
    base = _vindr_root(root)
    r1 = demo_cli(root, out)
    assert r1.exit_code == 0, r1.output
    first = _by_index(out)
    assert [Path(first[i]["image_path"]).name for i in (0, 1)] == ["n01.png", "p01.png"]
    fp = first[0][FINGERPRINT_FIELD]
    assert fp["image"] == "vindr-cxr/1.0.0/test/n01.png"  # relative to the data root
    assert fp["image_sha256"] == _sha(base / "test" / "n01.png")
    assert fp["image_bytes"] == (base / "test" / "n01.png").stat().st_size
    assert fp["finding"] == "cardiomegaly" and fp["gt_boxes"] == [[4.0, 6.0, 20.0, 30.0]] and fp["gt_answer"] == "Yes"
    assert fp["answer"] == "Yes" and fp["answer_source"] == "ground_truth"

    # same data, same settings: served (resume)
    r2 = demo_cli(root, out)
    assert r2.exit_code == 0 and "0 computed, 4 already in the store" in r2.output, r2.output

    # a row that sorts first shifts every index: refused before any model pass, naming what changed
    _vindr_root(root, ids=("a00", "n01", "p01"))
    lines_before = (out / "predictions.jsonl").read_text()
    n_loads = len(demo_cli.loads)
    r3 = demo_cli(root, out)
    assert r3.exit_code != 0
    msg = r3.output
    assert str(out / "predictions.jsonl") in msg and "--overwrite" in msg and "another --out" in msg
    assert "vindr_cxr #0 direct (gradcam, attention_head)" in msg
    assert (f"image vindr-cxr/1.0.0/test/n01.png (sha256 {_sha(base / 'test' / 'n01.png')[:12]}"
            in msg and f"-> vindr-cxr/1.0.0/test/a00.png (sha256 {_sha(base / 'test' / 'a00.png')[:12]}" in msg)
    assert "vindr_cxr #1 direct" in msg and "p01.png" in msg  # index 1: p01 -> n01
    assert len(demo_cli.loads) == n_loads  # nothing loaded
    assert (out / "predictions.jsonl").read_text() == lines_before  # nothing written
    # the launchers refuse before starting any worker
    r3l = demo_cli(root, out, "--launcher", "local", "--devices", "cpu")
    assert r3l.exit_code != 0 and "holds results computed on other samples" in r3l.output, r3l.output
    assert not (out / "launch").exists()

    # --overwrite: recomputed on the current films; every record's size and map match its own film
    r4 = demo_cli(root, out, "--overwrite")
    assert r4.exit_code == 0 and "6 computed, 0 already in the store" in r4.output, r4.output
    now = _by_index(out)
    assert [Path(now[i]["image_path"]).name for i in (0, 1, 2)] == ["a00.png", "n01.png", "p01.png"]
    for i, r in now.items():
        w, h = FILMS[Path(r["image_path"]).stem][:2]
        assert r["image_size"] == [w, h] and r[FINGERPRINT_FIELD]["image_sha256"] == _sha(Path(r["image_path"]))
        with np.load(r["heatmap_path"]) as z:
            assert z["heatmap"].shape == (h, w)
    # and the next rerun resumes again
    r5 = demo_cli(root, out)
    assert r5.exit_code == 0 and "0 computed, 6 already in the store" in r5.output, r5.output


def test_attribute_other_data_root_and_changed_boxes(tmp_path, demo_cli):
    root, out = tmp_path / "root", tmp_path / "attr"
    _vindr_root(root, ids=("n01",))
    assert demo_cli(root, out).exit_code == 0
    # a copy of the same films under another root: the same samples, served
    import shutil

    shutil.copytree(root, tmp_path / "moved")
    r = demo_cli(tmp_path / "moved", out)
    assert r.exit_code == 0 and "0 computed, 2 already in the store" in r.output, r.output
    # another root whose film has the same name but other pixels: refused
    other = tmp_path / "other"
    _vindr_root(other, ids=())
    _film(other / "vindr-cxr/1.0.0/test/n01.png", 40, 48, seed=99)
    _vindr_root(other, ids=("n01",))
    r = demo_cli(other, out)
    assert r.exit_code != 0 and "image vindr-cxr/1.0.0/test/n01.png (sha256" in r.output, r.output
    # the same film with other expert boxes: refused naming them
    _vindr_root(root, ids=("n01",), box=(5, 6, 20, 30))
    r = demo_cli(root, out)
    assert r.exit_code != 0 and "gt_boxes: [[4.0, 6.0, 20.0, 30.0]] -> [[5.0, 6.0, 20.0, 30.0]]" in r.output, r.output


# ---- the store level: records without a fingerprint, error records, merging ----------------------

@pytest.fixture(scope="module")
def toy():
    import torch

    torch.manual_seed(0)
    return ToyAdapter(target_cell=(2, 5))


def _items(tmp_path: Path, seeds=(0, 1)) -> list[WorkItem]:
    items = []
    for i, sd in enumerate(seeds):
        p = write_png(tmp_path / f"img{i}.png", toy_image(seed=sd))
        s = Sample("synthetic", i, str(p), "nodule", question_stem("nodule"), "Yes", [(40.0, 16.0, 48.0, 24.0)], (64, 64))
        items.append(WorkItem("toy", "synthetic", "direct", s, answer_source="ground_truth"))
    return items


def _run(items, path, toy, **kw):
    with ResultStore(path) as st:
        return run_grid(items, ["gradcam"], st, load_model=lambda name: toy, progress=False,
                        identify_model=lambda name: {"name": name, "source": "toy", "fingerprint": "w1"}, **kw)


def _strip_fingerprints(path: Path, error: str | None = None) -> None:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for r in recs:
        r.pop(FINGERPRINT_FIELD)
        if error:
            r["error"] = error
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_records_without_fingerprint_are_refused_not_served(tmp_path, toy):
    items, store = _items(tmp_path), tmp_path / "out" / "p.jsonl"
    assert _run(items, store, toy).done == 2
    _strip_fingerprints(store)  # as written before fingerprints were recorded
    with pytest.raises(ConfigError, match="no sample fingerprint") as ei:
        _run(items, store, toy)
    assert "--overwrite" in str(ei.value) and "synthetic #0" in str(ei.value) and "synthetic #1" in str(ei.value)
    s = _run(items, store, toy, overwrite=True)
    assert s.done == 2 and s.skipped == 0
    assert all(r[FINGERPRINT_FIELD]["image_sha256"] == _sha(Path(r["image_path"])) for r in load_results(store))
    assert _run(items, store, toy).skipped == 2


def test_error_records_of_another_sample_are_recomputed(tmp_path, toy):
    items, store = _items(tmp_path), tmp_path / "out" / "p.jsonl"
    _run(items, store, toy)
    _strip_fingerprints(store, error="RuntimeError: old failure")
    s = _run(items, store, toy)  # nothing is served from an error record of an unverifiable sample
    assert s.done == 2 and s.skipped == 0 and not any(r["error"] for r in load_results(store))


def test_merge_refuses_shards_of_another_sample(tmp_path, toy):
    merged = tmp_path / "out" / "predictions.jsonl"
    _run(_items(tmp_path), merged, toy)
    old1 = _sha(tmp_path / "img1.png")
    shard = tmp_path / "out" / "predictions.shard-0-of-1.jsonl"
    _run(_items(tmp_path, seeds=(0, 5)), shard, toy)  # img0 rewritten with the same bytes, img1 with another film
    new1 = _sha(tmp_path / "img1.png")
    assert new1 != old1
    before = merged.read_text()
    with pytest.raises(ConfigError, match="different samples") as ei:
        merge_stores([shard], merged)
    msg = str(ei.value)
    assert f"synthetic #1 direct (gradcam): image {tmp_path / 'img1.png'} (sha256 {old1[:12]}" in msg
    assert "synthetic #0" not in msg and "--overwrite" in msg
    assert merged.read_text() == before
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "out")])
    assert r.exit_code != 0 and "different samples" in r.output
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "out"), "--overwrite"])
    assert r.exit_code == 0, r.output
    recs = {x["index"]: x for x in load_results(merged)}
    assert recs[1][FINGERPRINT_FIELD]["image_sha256"] == new1 and len(recs) == 2
    assert merge_stores([shard], merged) == 2  # now consistent: merging again is a no-op
    # an error record of another sample in the merged file is replaced without asking (it holds no result)
    _strip_fingerprints(merged, error="RuntimeError: old failure")
    assert merge_stores([shard], merged) == 2
    assert not any(x["error"] for x in load_results(merged))


def test_a_launched_overwrite_run_merges_its_recomputed_shards(tmp_path, toy):
    from medfocus.runner.launch import Manifest, ShardTask, merge_outputs

    out = tmp_path / "out"
    _run(_items(tmp_path), out / "predictions.jsonl", toy)
    name = "predictions.shard-0-of-1.jsonl"
    _run(_items(tmp_path, seeds=(0, 5)), out / name, toy)
    task = ShardTask(shard=0, n=1, model=None, argv=[], output=name, expected=2)
    Manifest(command="attribute", launcher="local", out=str(out), tasks=[task]).save()
    with pytest.raises(ConfigError, match="different samples"):
        merge_outputs(out)
    Manifest(command="attribute", launcher="local", out=str(out), tasks=[task], overwrite=True).save()
    merge_outputs(out)  # the run had --overwrite: its shard records replace the stale ones
    recs = {x["index"]: x for x in load_results(out / "predictions.jsonl")}
    assert recs[1][FINGERPRINT_FIELD]["image_sha256"] == _sha(tmp_path / "img1.png")


# ---- explain: a film overwritten at the same path ------------------------------------------------

def test_explain_refuses_a_film_overwritten_in_place(tmp_path, demo_adapter):
    from medfocus.runner.explain import explain

    film, out = tmp_path / "film.png", tmp_path / "x"
    _film(film, 40, 48, seed=1)
    kw = dict(out=out, finding="pneumonia", methods=["gradcam"], answer="Yes", load_model=lambda name: demo_adapter,
              progress=False)
    first = explain([film], **kw)
    assert first.summary.done == 1 and first.record(0, "gradcam")["image_size"] == [40, 48]
    spec = json.loads((out / "explain.json").read_text())
    assert spec["samples"][0]["image_sha256"] == _sha(film)
    # the same file rewritten with the same bytes: resumed
    film.write_bytes(film.read_bytes())
    again = explain([film], **kw)
    assert again.summary.skipped == 1 and again.summary.done == 0
    # another film copied over it: refused, naming the film and both hashes
    old_sha = _sha(film)
    _film(film, 56, 40, seed=2)
    with pytest.raises(ConfigError) as ei:
        explain([film], **kw)
    msg = str(ei.value)
    assert f"film 0: image {film.resolve()} (sha256 {old_sha[:12]}" in msg and f"(sha256 {_sha(film)[:12]}" in msg
    assert "--overwrite" in msg and str(out) in msg
    # --overwrite: recomputed on the new film
    new = explain([film], overwrite=True, **kw)
    assert new.summary.done == 1 and new.record(0, "gradcam")["image_size"] == [56, 40]
    assert new.heatmap(0, "gradcam").shape == read_image(film)[0].shape


def test_explain_refusal_names_the_settings_and_old_spec(tmp_path, demo_adapter):
    from medfocus.runner.explain import explain

    film, out = tmp_path / "film.png", tmp_path / "x"
    _film(film, 40, 48, seed=1)
    kw = dict(out=out, finding="pneumonia", answer="Yes", load_model=lambda name: demo_adapter, progress=False)
    explain([film], methods=["gradcam"], **kw)
    with pytest.raises(ConfigError) as ei:
        explain([film], methods=["attention_head"], params={"attention_head": {"layer": 0}}, **kw)
    msg = str(ei.value)
    assert "methods: ['gradcam'] -> ['attention_head']" in msg and "params: {} -> {'attention_head': {'layer': 0}}" in msg
    # an explain.json written before film fingerprints: refused as unverifiable
    spec = json.loads((out / "explain.json").read_text())
    spec.pop("samples")
    (out / "explain.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="no film fingerprints"):
        explain([film], methods=["gradcam"], **kw)
