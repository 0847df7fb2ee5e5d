"""A stored record names its film by an absolute ``image_path``. When the data root moves, that path may
be missing -- or hold *another* film (a dataset re-extracted at the old place). Whatever reads a record's
film (the viewer, the report's gallery, ``evaluate --faithfulness``) checks it against the record's sample
fingerprint (sha256 of the bytes it was computed on) and refuses another film, naming the record."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from medfocus.errors import DataError
from medfocus.runner.store import sample_fingerprint


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((40, 50), np.uint8)
    a[10:30, 10:40] = value
    Image.fromarray(a).save(path)
    return path


def _record(root, film, **kw):
    fp = sample_fingerprint(str(film), finding="nodule", gt_answer="Yes", gt_boxes=[[10, 10, 40, 30]],
                            question="Is there evidence of nodule in the image?", answer="Yes", answer_source="split", root=root)
    return dict({"model": "demo", "dataset": "vindr_cxr", "index": 3, "mode": "direct", "method": "prompting",
                 "image_path": str(film), "gt_boxes": [[10, 10, 40, 30]], "image_size": [50, 40],
                 "pred_boxes": [[10, 10, 40, 30]], "answer": "Yes", "error": None, "sample_fingerprint": fp}, **kw)


@pytest.fixture()
def moved(tmp_path):
    """A record computed on ``old/train/a.png``; the root then moved to ``new/`` and another film (same size)
    was put at the old path."""
    old = tmp_path / "old"
    film = _png(old / "train" / "a.png", 200)
    rec = _record(old, film)
    (tmp_path / "new").mkdir()
    film.rename(tmp_path / "new" / "a.png")
    _png(film, 60)  # another film at the old place
    return rec, film


def test_viewer_refuses_another_film_at_the_records_path(moved):
    from medfocus.report.viewer import build_viewer

    rec, film = moved
    with pytest.raises(DataError) as e:
        build_viewer([rec], film.parent / "v.html")
    msg = str(e.value)
    assert "demo/vindr_cxr#3" in msg and str(film) in msg and "not the film" in msg and "sha256" in msg
    assert "train/a.png" in msg  # what the record calls it, relative to its data root


def test_viewer_names_a_missing_film_and_its_name_under_the_data_root(moved):
    from medfocus.report.viewer import build_viewer

    rec, film = moved
    film.unlink()
    with pytest.raises(DataError) as e:
        build_viewer([rec], film.parent / "v.html")
    msg = str(e.value)
    assert "demo/vindr_cxr#3" in msg and "missing" in msg and "train/a.png" in msg and "data root" in msg


def test_the_film_it_was_computed_on_is_used(tmp_path):
    from medfocus.report.viewer import sample_view

    film = _png(tmp_path / "r" / "a.png", 200)
    view = sample_view([_record(tmp_path / "r", film)])
    assert view["image_size"] == [50, 40]
    # a record written before fingerprints were recorded cannot be checked: used as given, as before
    rec = _record(tmp_path / "r", film)
    del rec["sample_fingerprint"]
    assert sample_view([rec])["image_size"] == [50, 40]


def test_report_gallery_leaves_out_another_film(moved, caplog):
    from medfocus.report.html import _read_image

    rec, film = moved
    with caplog.at_level(logging.WARNING):
        assert _read_image(rec) is None
    assert any("not the film" in m for m in caplog.messages)


def test_faithfulness_refuses_another_film(moved):
    from medfocus.commands.evaluate import add_faithfulness

    rec, film = moved
    hp = film.parent / "h.npy"
    np.save(hp, np.ones((40, 50), np.float32))
    rec.update(method="rise", pred_boxes=None, heatmap_path=str(hp))

    def no_load(name):
        raise AssertionError("the films are checked before the model loads")

    with pytest.raises(DataError, match="not the film"):
        add_faithfulness([rec], "demo", cfg=None, load_model=no_load, progress=False)


# ---- a rerun on the moved data root serves the stored records with the film's new path ---------------

def _toy_items(root):
    from medfocus.attribution.testing import toy_image
    from medfocus.io import write_png
    from medfocus.runner.grid import WorkItem
    from medfocus.types import Sample, question_stem

    items = []
    for i in range(2):
        p = root / "films" / f"img{i}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            write_png(p, toy_image(seed=i))
        s = Sample("synthetic", i, str(p), "nodule", question_stem("nodule"), "Yes", [(40.0, 16.0, 48.0, 24.0)], (64, 64))
        items.append(WorkItem("toy", "synthetic", "direct", s, answer_source="ground_truth"))
    return items


def test_rerun_on_a_moved_data_root_updates_the_stored_film_paths(tmp_path):
    import shutil

    import torch

    from medfocus.attribution.testing import ToyAdapter
    from medfocus.report.viewer import build_viewer
    from medfocus.runner.grid import run_grid
    from medfocus.runner.store import ResultStore, load_results

    torch.manual_seed(0)
    toy = ToyAdapter(target_cell=(2, 5))
    store_path = tmp_path / "out" / "p.jsonl"

    def run(root):
        with ResultStore(store_path) as st:
            return run_grid(_toy_items(root), ["gradcam"], st, load_model=lambda name: toy, progress=False, data_root=root,
                            identify_model=lambda name: {"name": name, "source": "toy", "fingerprint": "w1"})

    assert run(tmp_path / "old").done == 2
    before = {r["index"]: r for r in load_results(store_path)}
    shutil.move(tmp_path / "old", tmp_path / "new")
    s = run(tmp_path / "new")
    assert s.done == 0 and s.skipped == 2  # the same films: served, not recomputed
    after = {r["index"]: r for r in load_results(store_path)}
    for i in (0, 1):
        assert after[i]["image_path"] == str(tmp_path / "new" / "films" / f"img{i}.png")
        # nothing else of the record changes (maps, numbers, fingerprint)
        assert {k: v for k, v in after[i].items() if k != "image_path"} == {k: v for k, v in before[i].items() if k != "image_path"}
    build_viewer([after[0]], tmp_path / "v.html")  # reads the film where it is now
    n_lines = len(store_path.read_text().splitlines())
    assert run(tmp_path / "new").skipped == 2 and len(store_path.read_text().splitlines()) == n_lines  # no rewrite when current


# ---- --data-root: read the films of stored records from the root's new place --------------------------

@pytest.fixture()
def relocated(tmp_path):
    """A record computed on ``old/train/a.png``; the whole root then moved to ``new/`` (nothing left at the
    old place)."""
    import shutil

    film = _png(tmp_path / "old" / "train" / "a.png", 200)
    rec = _record(tmp_path / "old", film)
    shutil.move(tmp_path / "old", tmp_path / "new")
    return rec, tmp_path / "new"


def test_record_film_under_a_moved_data_root_is_found_and_checked(relocated):
    from medfocus.io.paths import films_under, record_film

    rec, new = relocated
    assert record_film(rec, data_root=new) == str(new / "train" / "a.png")
    with films_under(new):
        assert record_film(rec) == str(new / "train" / "a.png")
    with pytest.raises(DataError, match="missing"):
        record_film(rec)  # outside the block: the stored path, which is gone
    # another film at the new place is refused like one at the old place
    _png(new / "train" / "a.png", 60)
    with pytest.raises(DataError, match="not the film"):
        record_film(rec, data_root=new)


def test_a_moved_data_root_never_falls_back_to_the_stored_path(relocated, tmp_path):
    from medfocus.io.paths import record_film

    rec, new = relocated
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(DataError) as e:
        record_film(rec, data_root=elsewhere)
    assert "'train/a.png' is not under the data root" in str(e.value) and "demo/vindr_cxr#3" in str(e.value)
    # a record written before fingerprints has no path relative to its root: refused, not read at image_path
    old = dict(rec)
    del old["sample_fingerprint"]
    with pytest.raises(DataError, match="before sample fingerprints"):
        record_film(old, data_root=new)
    # a film given by its own path (an explain film: no data root) has no place under any root, and its
    # missing-film message does not send the user to --data-root
    outside = {**rec, "image_path": "/somewhere/else/a.png",
               "sample_fingerprint": {**rec["sample_fingerprint"], "image": "/somewhere/else/a.png"}}
    with pytest.raises(DataError, match="given by its own path, not found under a data root"):
        record_film(outside, data_root=new)
    with pytest.raises(DataError) as e:
        record_film(outside)
    assert "given by its own path" in str(e.value) and "--data-root" not in str(e.value)
    # a crafted relative path cannot leave the given root
    hostile = {**rec, "sample_fingerprint": {**rec["sample_fingerprint"], "image": "../../etc/passwd"}}
    with pytest.raises(DataError, match="outside"):
        record_film(hostile, data_root=new)


def test_report_reads_the_gallery_films_from_a_moved_data_root(relocated, tmp_path):
    import json

    from click.testing import CliRunner

    from medfocus.cli import main

    rec, new = relocated
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions.jsonl").write_text(json.dumps(rec) + "\n")
    res = CliRunner().invoke(main, ["report", str(run), "--title", "moved"])
    assert res.exit_code == 0, res.output
    assert not list((run / "viewers").glob("*.html"))  # the film is gone from its stored path: no viewer
    page = (run / "report.html").read_text()  # and the page says why its gallery is empty
    assert "1 gallery sample(s) left out: their film could not be read" in page and "is missing" in page
    res = CliRunner().invoke(main, ["report", str(run), "--title", "moved", "--data-root", str(new)])
    assert res.exit_code == 0, res.output
    (viewer,) = list((run / "viewers").glob("*.html"))
    assert str(new / "train" / "a.png") in viewer.read_text()  # the film read, at its new place
    assert f"--data-root {new}" in (run / "report.html").read_text()


def test_evaluate_data_root_only_with_faithfulness(tmp_path):
    from click.testing import CliRunner

    from medfocus.cli import main

    (tmp_path / "p.jsonl").write_text("")
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "e"), "--data-root", str(tmp_path)])
    assert res.exit_code != 0 and "--data-root is only used with --faithfulness" in res.output
