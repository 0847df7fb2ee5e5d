"""A benchmark split used on changed data never attributes the model's answer to another film.

A split's records name their samples by ``(dataset, index)``; ``attribute --bench`` attributed the recorded
answer on whatever film was at that index now -- after a film was overwritten, on another ``--data-root``,
after the annotations gained a row -- with ``answer_source: split``: the answer the model gave to film A,
explained on film B. Now every record ``bench build`` writes carries its sample's identity (film size and
SHA-256, finding, ground-truth answer, boxes, question) and ``attribute --bench`` refuses, before any model
loads, records whose sample is not that one, naming each; a public MedGround-Bench record (no identity)
is still accepted, its ``answer`` checked. And ``bench build --limit`` rewrites the records file from the
whole log: rows outside the selection are judged against the current data too, never written unchecked.
Toy world and model of ``test_bench`` (kept indices known by construction: PLAN keeps 0, 1 and 4).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from medfocus.bench import build_benchmark, read_log, split_paths
from medfocus.cli import main
from medfocus.editing import get_editor
from medfocus.errors import DataWarning
from medfocus.io.fingerprint import file_sha256
from medfocus.runner.store import load_results

sys.path.insert(0, str(Path(__file__).parent))
import test_runner_fakes as fakes  # noqa: E402
from test_bench import PLAN, ToyAdapter, _base, make_toy_world  # noqa: E402


class ConstMethod:
    """A fake attribution method: a uniform heatmap (what is attributed does not matter here)."""

    def __init__(self, **params):
        self.params = params

    def attribute(self, adapter, image, question, answer):
        return fakes.FakeAttribution(np.ones(image.shape, np.float32))


@pytest.fixture()
def toy_cli(tmp_path, monkeypatch):
    """Dataset 'toy' read from whatever root it is given (films written once, never rewritten by loading),
    the toy LVLM for `bench build`, a fake LVLM and method for `attribute`; records which models loaded."""
    import medfocus.attribution.base as abase
    import medfocus.commands.bench as bench_cmd
    import medfocus.datasets as ds
    import medfocus.lvlm.loading as loading

    worlds: dict[Path, list] = {}

    def world(root: Path, plan=PLAN):
        worlds[root.resolve()] = make_toy_world(root, list(plan))
        return root

    def copy(root: Path, dest: Path):
        shutil.copytree(root, dest)
        worlds[dest.resolve()] = worlds[root.resolve()]
        return dest

    def load(r, **kw):
        return [replace(s, image_path=str(Path(r) / Path(s.image_path).name)) for s in worlds[Path(r).resolve()]]

    monkeypatch.setitem(ds.DATASET_REGISTRY, "toy", load)
    loads: list[str] = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loads.append(name) or ToyAdapter())
    monkeypatch.setattr(loading, "load_lvlm", lambda name, device=None, **kw: loads.append(name) or fakes.FakeAdapter(name))
    monkeypatch.setitem(abase._REGISTRY, "fake_const", f"{__name__}:ConstMethod")
    real_resolve = abase._resolve
    monkeypatch.setattr(abase, "_resolve", lambda name: ConstMethod if name == "fake_const" else real_resolve(name))

    def bench(root: Path, out: Path, *extra: str):
        return CliRunner().invoke(main, ["bench", "build", "--model", "demo", "--dataset", "toy", "--data-root", str(root),
                                         "--editor", "oracle", "--out", str(out), "--no-progress", *extra])

    def attribute(split: Path, root: Path, out: Path):
        return CliRunner().invoke(main, ["attribute", "--bench", str(split), "--data-root", str(root), "--method",
                                         "fake_const", "--out", str(out), "--no-progress"])

    return {"world": world, "copy": copy, "bench": bench, "attribute": attribute, "loads": loads}


def _split(out: Path) -> Path:
    return split_paths(out, "demo", "toy", "direct")["records"]


def _rewrite_without_finding(path: Path, index: int) -> None:
    """Another film at the same path (same size, the finding removed)."""
    cv2.imwrite(str(path), _base(index))


def _built(toy_cli, tmp_path):
    root = toy_cli["world"](tmp_path / "data")
    out = tmp_path / "bench"
    res = toy_cli["bench"](root, out)
    assert res.exit_code == 0, res.output
    return root, out, _split(out)


def test_split_records_carry_their_samples_identity_and_unchanged_data_runs(toy_cli, tmp_path):
    """(c) On the data it was built on -- or the same films under another root -- the split runs, and each
    record says which film and annotations its answers were given to."""
    root, out, split = _built(toy_cli, tmp_path)
    recs = json.loads(split.read_text())
    assert [r["index"] for r in recs] == [0, 1, 4]
    for r in recs:
        fp = r["sample_fingerprint"]
        size, sha = file_sha256(root / f"{r['index']}.png")
        assert (fp["image"], fp["image_bytes"], fp["image_sha256"]) == (f"{r['index']}.png", size, sha)
        assert (fp["finding"], fp["gt_answer"], fp["gt_boxes"], fp["question"]) == (
            "nodule", "Yes", [[float(v) for v in b] for b in r["boxes"]], r["question"])
    toy_cli["loads"].clear()
    res = toy_cli["attribute"](split, root, tmp_path / "attr")
    assert res.exit_code == 0, res.output
    got = sorted((x["index"], x["answer"], x["answer_source"]) for x in load_results(tmp_path / "attr" / "predictions.jsonl"))
    assert got == [(0, "Yes.", "split"), (1, "Yes.", "split"), (4, "Yes.", "split")]
    moved = toy_cli["copy"](root, tmp_path / "moved")  # the same bytes under another data root are the same films
    res = toy_cli["attribute"](split, moved, tmp_path / "attr_moved")
    assert res.exit_code == 0, res.output


def test_overwritten_films_are_refused_naming_every_record(toy_cli, tmp_path):
    """(a) Films 1 and 4 overwritten after the split was built: refused before any model loads, both
    records named with what changed, and the remedy."""
    root, out, split = _built(toy_cli, tmp_path)
    old = {i: file_sha256(root / f"{i}.png") for i in (1, 4)}
    for i in (1, 4):
        _rewrite_without_finding(root / f"{i}.png", i)
    toy_cli["loads"].clear()
    res = toy_cli["attribute"](split, root, tmp_path / "attr")
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    msg = " ".join(res.output.split())
    assert f"2 benchmark records of {split} were built on other samples than the ones now at their" in msg
    for rec_no, i in ((1, 1), (2, 4)):
        size, sha = file_sha256(root / f"{i}.png")
        assert (f"model 'demo', toy #{i} direct (benchmark file {split} record {rec_no}): image_sha256: {i}.png "
                f"(sha256 {old[i][1][:12]}, {old[i][0]} bytes) -> {i}.png (sha256 {sha[:12]}, {size} bytes)") in msg
    assert "toy #0" not in msg  # unchanged
    assert "medfocus bench build" in msg and "--data-root" in msg
    assert toy_cli["loads"] == [] and not (tmp_path / "attr" / "predictions.jsonl").exists()


def test_other_data_root_with_another_film_at_index_0_is_refused(toy_cli, tmp_path):
    """(b) Another root holds the same annotations but another film at index 0 (a cue drawn in)."""
    root, out, split = _built(toy_cli, tmp_path)
    other = toy_cli["world"](tmp_path / "other", [("large", True)] + PLAN[1:])
    assert file_sha256(other / "0.png") != file_sha256(root / "0.png")
    assert file_sha256(other / "1.png") == file_sha256(root / "1.png")
    toy_cli["loads"].clear()
    res = toy_cli["attribute"](split, other, tmp_path / "attr")
    msg = " ".join(res.output.split())
    assert res.exit_code != 0 and f"a benchmark record of {split} was built on another sample" in msg, res.output
    assert f"toy #0 direct (benchmark file {split} record 0): image_sha256: 0.png" in msg
    assert f"under data root {other}" in msg and "toy #1" not in msg
    assert toy_cli["loads"] == []


def test_public_schema_record_is_accepted_and_its_answer_checked(toy_cli, tmp_path):
    """(d) A record of the public schema (no identity) runs; what it holds is still compared: a record
    saying 'No' for a sample whose ground truth is 'Yes' is refused."""
    root = toy_cli["world"](tmp_path / "data")
    public = {"model": "demo", "dataset": "toy", "index": 0, "answer": "Yes", "prediction_direct": "Yes",
              "prediction_edited_direct": "No", "prediction_edited_kept_direct": "Yes",
              "prediction_edited_kept_normal_direct": "Yes"}
    split = tmp_path / "public.json"
    split.write_text(json.dumps([public, {**public, "index": 1, "answer": "yes"}]))
    res = toy_cli["attribute"](split, root, tmp_path / "attr")
    assert res.exit_code == 0, res.output
    assert sorted(x["index"] for x in load_results(tmp_path / "attr" / "predictions.jsonl")) == [0, 1]
    split.write_text(json.dumps([public, {**public, "index": 1, "answer": "No", "prediction_direct": "No"}]))
    res = toy_cli["attribute"](split, root, tmp_path / "attr2")
    msg = " ".join(res.output.split())
    assert res.exit_code != 0 and f"toy #1 direct (benchmark file {split} record 1): gt_answer: 'No' -> 'Yes'" in msg, msg


def test_real_public_file_is_accepted_on_the_layout_it_describes(shared_data, tmp_path):
    """The 1,880 public records against loader-order stand-ins of their datasets (every real loader's
    samples are positives, answer 'Yes'): nothing refused; the same records against a 'No' sample are."""
    from medfocus.datasets.medground import load_record_dicts_located
    from medfocus.errors import DataError
    from medfocus.runner.grid import check_split_items, items_from_benchmark
    from medfocus.types import Sample, question_stem

    located = load_record_dicts_located(shared_data / "medground_bench_direct.json")
    n = {}
    for _, r in located:
        n[r["dataset"]] = max(n.get(r["dataset"], 0), r["index"] + 1)
    samples = [Sample(ds, i, str(tmp_path / f"{ds}_{i}.png"), "Nodule", question_stem("Nodule"), "Yes", [(0, 0, 1, 1)], (2, 2))
               for ds, k in n.items() for i in range(k)]
    items = items_from_benchmark([r for _, r in located], samples, mode="direct", where=[w for w, _ in located])
    assert len(items) == 1880 and all(it.split_sample["stored"] == {"gt_answer": "Yes"} for it in items)
    check_split_items(items)
    first_ds, first_idx = located[0][1]["dataset"], located[0][1]["index"]
    flipped = [replace(s, answer="No") if (s.dataset, s.index) == (first_ds, first_idx) else s for s in samples]
    with pytest.raises(DataError, match=rf"#{first_idx} direct \(.*record 0\): gt_answer: 'Yes' -> 'No'"):
        check_split_items(items_from_benchmark([located[0][1]], flipped, mode="direct", where=[located[0][0]]))


def test_rows_outside_the_limit_are_judged_before_the_records_are_rewritten(toy_cli, tmp_path):
    """(e) --limit 4, film 3 (kept) overwritten, --limit 2: the records file is rewritten from the whole log,
    so row 3 is judged against the current data too: refused before the model loads; --overwrite drops it
    from the split (a warning names it) and a run selecting it filters it again on the new film."""
    plan = [("large", False), ("large", True), ("small", True), ("large", False), ("large", True)]
    root = toy_cli["world"](tmp_path / "data", plan)
    out = tmp_path / "bench"
    res = toy_cli["bench"](root, out, "--limit", "4")
    assert res.exit_code == 0, res.output
    assert [r["index"] for r in json.loads(_split(out).read_text())] == [0, 1, 3]
    _rewrite_without_finding(root / "3.png", 3)
    toy_cli["loads"].clear()
    res = toy_cli["bench"](root, out, "--limit", "2")
    msg = " ".join(res.output.split())
    assert res.exit_code != 0 and "toy #3 direct: image 3.png" in msg and "outside this run's selection" in msg, msg
    assert toy_cli["loads"] == []
    res = toy_cli["bench"](root, out, "--limit", "2", "--overwrite")
    assert res.exit_code == 0, res.output
    assert "Warning: " in res.output and "the rows of indices [3] were filtered on samples that changed" in res.output
    assert "dropped from the split" in res.output
    assert [r["index"] for r in json.loads(_split(out).read_text())] == [0, 1]
    log = split_paths(out, "demo", "toy", "direct")["log"]
    assert sorted(k[2] for k in read_log(log)) == [0, 1, 2]
    res = toy_cli["bench"](root, out, "--limit", "4")
    assert res.exit_code == 0, res.output
    assert [r["index"] for r in json.loads(_split(out).read_text())] == [0, 1]  # film 3 now has no finding
    assert read_log(log)[("demo", "toy", 3)]["sample_fingerprint"]["image_sha256"] == file_sha256(root / "3.png")[1]


def test_rows_no_loaded_sample_can_judge_are_left_out_with_a_warning(tmp_path):
    """A library call given a subset without the whole dataset cannot judge the other rows: they stay in
    the log, out of the records, with a warning naming them; given the dataset, they are judged and kept."""
    samples = make_toy_world(tmp_path / "data", PLAN)
    kw = {"mode": "direct", "model_name": "toy", "progress": False, "model_identity": {"source": "toy", "fingerprint": "w"},
          "out_dir": tmp_path / "out"}
    recs, _ = build_benchmark(ToyAdapter(), samples, editor=get_editor("oracle"), **kw)
    assert [r["index"] for r in recs] == [0, 1, 4]
    with pytest.warns(DataWarning, match=r"rows of indices \[2, 3, 4, 5\] name samples that are not in the data loaded"):
        recs, ret = build_benchmark(ToyAdapter(), samples[:2], editor=get_editor("oracle"), **kw)
    assert [r["index"] for r in recs] == [0, 1] and ret["n"] == 6
    assert [r["index"] for r in json.loads(split_paths(tmp_path / "out", "toy", "toy", "direct")["records"].read_text())] == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        recs, _ = build_benchmark(ToyAdapter(), samples[:2], editor=get_editor("oracle"), dataset_samples=samples, **kw)
    assert [r["index"] for r in recs] == [0, 1, 4]
