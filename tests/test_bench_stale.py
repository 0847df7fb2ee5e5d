"""`bench build` never serves a result of another sample under the same (dataset, index).

The split log, the edit cache and the original-view generation cache were keyed by ``(dataset, index)``
only: after a film was overwritten, a row was inserted into the annotations (every later index shifts)
or ``--data-root`` pointed at other films, a rerun reused the old edits, answers and log rows for the new
sample -- keep/drop decisions that look right and are wrong. Now every log row carries the sample's
fingerprint (film path, size and SHA-256, finding, answer, boxes, question, the oracle's counterfactual
renders) and both caches are keyed by the film's hash: a rerun into the same ``--out`` refuses changed
rows (naming the log, the index and what changed) before anything is generated, ``overwrite`` recomputes
them, and a new ``--out`` sharing the cache gets exactly what a build without any cache gets. Each
scenario checks the result against a fresh build on the new data (``_fresh``), so it fails when stale
values are served.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import pytest

from medfocus.bench import build_benchmark, read_log, split_paths
from medfocus.bench.build import merge_split_logs
from medfocus.editing import get_editor
from medfocus.errors import ConfigError
from medfocus.io.fingerprint import file_sha256
from medfocus.types import Sample

sys.path.insert(0, str(Path(__file__).parent))
from test_bench import PLAN, ToyAdapter, _base, make_toy_world  # noqa: E402

W1 = {"source": "toy", "fingerprint": "w1"}


class CountingOracle:
    """The oracle editor, counting the edits it actually makes (the cache serves the rest)."""

    def __init__(self):
        self.inner = get_editor("oracle")
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def edit(self, *a, **k):
        self.calls += 1
        return self.inner.edit(*a, **k)


def _build(samples, out, *, adapter=None, editor=None, **kw):
    kw = {"mode": "direct", "model_name": "toy", "progress": False, "model_identity": W1, **kw}
    adapter = adapter or ToyAdapter()
    recs, ret = build_benchmark(adapter, samples, editor=editor or get_editor("oracle"), out_dir=out, **kw)
    return recs, ret, adapter


def _fresh(samples, tmp_path, name):
    """Records and retention of a build on ``samples`` with nothing cached and no log: the truth."""
    recs, ret, _ = _build(samples, tmp_path / f"fresh_{name}", cache_dir=tmp_path / f"fresh_{name}_cache",
                          cache_generations=False)
    return recs, ret


def _overwrite_film_without_finding(sample: Sample) -> None:
    """Rewrite a film in place with its finding removed (same size, same path, other bytes)."""
    cv2.imwrite(sample.image_path, _base(int(sample.index)))


def test_overwritten_film_is_not_served_old_rows_edits_or_answers(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    out, cache = tmp_path / "out", tmp_path / "cache"
    recs0, ret0, _ = _build(samples, out, cache_dir=cache)
    assert 0 in {r["index"] for r in recs0}  # a large finding: kept
    old_sha = file_sha256(samples[0].image_path)[1]
    _overwrite_film_without_finding(samples[0])
    recs_new, ret_new = _fresh(samples, tmp_path, "new")
    assert 0 not in {r["index"] for r in recs_new} and ret_new["failed_correct"] == ret0["failed_correct"] + 1  # the truth differs

    # same --out: refused before anything is generated, naming the log, the index and the film change
    idle = ToyAdapter()
    with pytest.raises(ConfigError) as err:
        _build(samples, out, adapter=idle, cache_dir=cache)
    msg = str(err.value)
    log = split_paths(out, "toy", "toy", "direct")["log"]
    assert str(log) in msg and "toy #0 direct: image" in msg and f"sha256 {old_sha[:12]}" in msg and "--overwrite" in msg
    assert "#1" not in msg and idle.calls == 0

    # a new --out sharing the caches: only film 0 is edited and answered again, and the result is the truth
    ed = CountingOracle()
    recs, ret, ad = _build(samples, tmp_path / "out2", cache_dir=cache, editor=ed)
    assert (recs, ret) == (recs_new, ret_new)
    assert ed.calls == 3 and ad.n_images == 3 * 6 + 1  # the three edits of film 0; its original view once

    # overwrite: the changed row is recomputed, the others resume
    ad = ToyAdapter()
    recs, ret, _ = _build(samples, out, adapter=ad, cache_dir=cache, overwrite=True)
    assert (recs, ret) == (recs_new, ret_new) and ad.n_images == 3  # film 0's original view: answered in out2
    rows = read_log(log)
    assert len(rows) == 6 and rows[("toy", "toy", 0)]["sample_fingerprint"]["image_sha256"] != old_sha
    assert len(log.read_text().splitlines()) == 6  # the stale row left the log, it is not merely shadowed
    again = ToyAdapter()
    assert _build(samples, out, adapter=again, cache_dir=cache)[0] == recs_new and again.calls == 0  # resumes


def test_inserted_row_shifting_indices_is_not_served_the_old_samples(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    out = tmp_path / "out"
    _build(samples, out)
    # a new annotation row comes first: every sample moves one index up, the films stay where they are
    extra = make_toy_world(tmp_path / "added", [("small", False)])[0]  # a small uncued finding (answered No)
    shifted = [extra] + [replace(s, index=s.index + 1) for s in samples]
    recs_new, ret_new = _fresh(shifted, tmp_path, "shifted")
    assert [r["index"] for r in recs_new] == [1, 2, 5]

    with pytest.raises(ConfigError) as err:
        _build(shifted, out)
    msg = str(err.value)
    for i in range(6):  # every stored index now names another film
        assert f"toy #{i} direct: image" in msg
    assert str(tmp_path / "added") in msg

    ed = CountingOracle()
    recs, ret, _ = _build(shifted, tmp_path / "out2", cache_dir=out / "edits", editor=ed)
    assert (recs, ret) == (recs_new, ret_new)
    assert ed.calls == 3 * 7  # no edit of the film that was at that index before
    recs, ret, _ = _build(shifted, out, overwrite=True)
    assert (recs, ret) == (recs_new, ret_new)


def test_generation_cache_entry_of_another_film_is_not_served(tmp_path):
    """The original-view answer cache alone (another editor reads it): an entry of the old film under
    the same (model, dataset, index, mode, question, budget) is not the answer of the new film."""
    samples = make_toy_world(tmp_path / "data", PLAN)
    cache = tmp_path / "cache"
    _build(samples, tmp_path / "oracle", cache_dir=cache)
    _overwrite_film_without_finding(samples[0])
    inpaint = get_editor("inpaint")
    truth = _build(samples, tmp_path / "alone", editor=inpaint, cache_dir=tmp_path / "c2", cache_generations=False)[:2]
    recs, ret, ad = _build(samples, tmp_path / "inpaint", editor=inpaint, cache_dir=cache)
    assert (recs, ret) == truth and ad.n_images == 3 * 6 + 1


synthetic = pytest.importorskip("medfocus.datasets.synthetic.dataset", reason="synthetic world not present")


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory):
    """Two synthetic worlds written by the same writer with other seeds (same layout and indices, other films)."""
    roots = []
    for seed in (3, 4):
        root = tmp_path_factory.mktemp(f"synth{seed}")
        synthetic.write_dataset(root, n=8, seed=seed, size=96, cue_rate=0.6, progress=False)
        roots.append(root)
    return roots


def test_other_data_root_is_not_served_the_first_roots_results(two_roots, tmp_path, request):
    adapter = request.getfixturevalue("demo_adapter")  # the shipped demo model (skips without its weights)
    root_a, root_b = two_roots
    a = synthetic.load_synthetic(root_a)
    b = synthetic.load_synthetic(root_b)
    kw = {"adapter": adapter, "model_name": "demo", "model_identity": {"source": "demo", "fingerprint": "d"},
          "batch_size": 16}
    out = tmp_path / "out"
    recs_a, _, _ = _build(a, out, data_root=root_a, **kw)
    truth = _build(b, tmp_path / "fresh", data_root=root_b, cache_dir=tmp_path / "fresh_cache", cache_generations=False, **kw)[:2]
    assert recs_a != truth[0]  # the roots' splits differ

    with pytest.raises(ConfigError, match=r"synthetic #\d+ direct: image .*sha256"):
        _build(b, out, data_root=root_b, **kw)
    ed = CountingOracle()
    recs, ret, _ = _build(b, tmp_path / "out_b", data_root=root_b, cache_dir=out / "edits", editor=ed, **kw)
    assert (recs, ret) == truth
    assert ed.calls == 3 * ret["n"]  # not one edit of root A served
    recs, ret, _ = _build(b, out, data_root=root_b, overwrite=True, **kw)
    assert (recs, ret) == truth
    # the same films under a moved root resume (paths are stored relative to the data root)
    moved = tmp_path / "moved"
    root_b.rename(moved)
    try:
        idle = ToyAdapter(fail_on_call=1)
        assert _build(synthetic.load_synthetic(moved), out, data_root=moved, **{**kw, "adapter": idle})[0] == truth[0]
    finally:
        moved.rename(root_b)


def test_rows_without_fingerprint_are_refused_then_recomputed(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    out = tmp_path / "out"
    recs0, _, _ = _build(samples, out)
    log = split_paths(out, "toy", "toy", "direct")["log"]
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sample_fingerprint"}) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"(?s)toy #0 direct: carries no sample fingerprint .*--overwrite"):
        _build(samples, out)
    ad = ToyAdapter()
    recs, _, _ = _build(samples, out, adapter=ad, overwrite=True)
    assert recs == recs0 and ad.n_images == 3 * 6  # (the original views: from the generation cache)


def test_merge_refuses_shard_rows_of_other_samples_unless_overwrite(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    out = tmp_path / "out"
    _build(samples, out)
    _overwrite_film_without_finding(samples[0])
    truth = _fresh(samples, tmp_path, "new")
    shard = out / "shards" / "0-of-1"
    _build(samples, shard, cache_dir=out / "edits")
    log = split_paths(out, "toy", "toy", "direct")["log"]
    before = log.read_bytes()
    with pytest.raises(ConfigError, match=r"(?s)merging into .*toy #0 direct: image.*--overwrite"):
        merge_split_logs([shard], out)
    assert log.read_bytes() == before  # nothing written
    merge_split_logs([shard], out, overwrite=True)
    recs = json.loads(split_paths(out, "toy", "toy", "direct")["records"].read_text())
    assert recs == truth[0]


def test_a_film_rewritten_right_after_hashing_is_hashed_again(tmp_path):
    """File times tick coarsely: a same-size rewrite within one tick keeps them, so a fresh file's hash
    is not cached (the per-process cache would otherwise return the old film's hash)."""
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 64)
    first = file_sha256(p)
    p.write_bytes(b"b" * 64)
    assert file_sha256(p)[1] != first[1] and file_sha256(p)[0] == 64
    assert file_sha256(tmp_path / "missing.bin") is None


def test_cli_refuses_before_the_model_loads_and_overwrite_recomputes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import medfocus.commands.bench as bench_cmd
    import medfocus.datasets as ds
    from medfocus.cli import main

    root = tmp_path / "data"
    root.mkdir()
    plan = list(PLAN)
    monkeypatch.setitem(ds.DATASET_REGISTRY, "toy", lambda r, **kw: make_toy_world(Path(r), plan))
    loaded = []
    monkeypatch.setattr(bench_cmd, "_load_model", lambda name, device: loaded.append(name) or ToyAdapter())
    out = tmp_path / "out"
    args = ["bench", "build", "--model", "toy_model", "--dataset", "toy", "--data-root", str(root), "--editor", "oracle",
            "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert [r["index"] for r in json.loads((out / "toy_model" / "toy" / "direct.json").read_text())] == [0, 1, 4]
    plan.insert(0, ("small", False))  # a row inserted first: films rewritten, every index shifted
    loaded.clear()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and loaded == []  # refused before the model loads
    log = split_paths(out, "toy_model", "toy", "direct")["log"]
    assert f"{log} holds rows filtered on other samples" in res.output and "toy #0 direct: image" in res.output
    assert "--overwrite" in res.output and "Traceback" not in res.output
    # the launcher checks the same before any task starts
    res = CliRunner().invoke(main, args + ["--launcher", "local", "--devices", "cpu"])
    assert res.exit_code == 1 and "toy #0 direct: image" in res.output, res.output
    assert not (out / "launch").exists() and not (out / "shards").exists()
    res = CliRunner().invoke(main, args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert [r["index"] for r in json.loads((out / "toy_model" / "toy" / "direct.json").read_text())] == [1, 2, 5]
    assert "kept 3 of 7 positives" in res.output


def test_reference_pool_rewritten_in_place_refuses_rows_and_misses_edits(tmp_path):
    """The transplant editor's pool is part of what an edit is made from: rewriting its films in place
    (same folder, names and settings) refuses the split's rows and the edit cache misses."""
    from test_editing import _write_pool

    samples = make_toy_world(tmp_path / "data", PLAN)
    pool = tmp_path / "pool"
    _write_pool(pool, [1, 2])

    def transplant():
        return get_editor("transplant", reference_dir=pool, aligner="affine", feather=2)

    out, cache = tmp_path / "out", tmp_path / "cache"
    _build(samples, out, cache_dir=cache, editor=transplant())
    n_edits = len(list((cache).rglob("transplant-*/**/*.png")))
    assert n_edits > 0
    _write_pool(pool, [7, 8])
    with pytest.raises(ConfigError, match="edit_inputs"):
        _build(samples, out, adapter=ToyAdapter(), cache_dir=cache, editor=transplant())
    recs, ret, _ = _build(samples, out, cache_dir=cache, editor=transplant(), overwrite=True)
    assert len(list((cache).rglob("transplant-*/**/*.png"))) == 2 * n_edits  # every edit made again
    fresh = _build(samples, tmp_path / "fresh", cache_dir=tmp_path / "fresh_cache", editor=transplant(),
                   cache_generations=False)
    assert (recs, ret) == fresh[:2]
