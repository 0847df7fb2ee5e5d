"""`bench build` run integrity (issue 13, items 6 and 9): a split is keyed by its generation settings
(budget, parser, model weights) as by its editor; a rerun with other settings refuses naming them;
error rows do not shadow a corrected rerun; the split is locked like `attribute`'s result file; and
temporary files left by a killed write are removed on resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medfocus.bench import build_benchmark, read_log, split_paths
from medfocus.editing import get_editor
from medfocus.errors import ConfigError
from medfocus.io.locks import acquire_lock

sys.path.insert(0, str(Path(__file__).parent))
from test_bench import PLAN, ToyAdapter, make_toy_world  # noqa: E402

W1 = {"source": "toy", "fingerprint": "w1"}


def _build(samples, out, adapter=None, **kw):
    kw = {"mode": "direct", "editor": get_editor("oracle"), "model_name": "toy", "progress": False, "model_identity": W1, **kw}
    return build_benchmark(adapter or ToyAdapter(), samples, out_dir=out, **kw)


def test_other_generation_settings_refuse_naming_them(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    recs, _ = _build(samples, tmp_path / "out")
    log = split_paths(tmp_path / "out", "toy", "toy", "direct")["log"]
    row = next(iter(read_log(log).values()))
    assert row["generation"]["max_new_tokens"] == 16 and row["generation"]["model_fingerprint"] == "w1"
    again = ToyAdapter()
    assert _build(samples, tmp_path / "out", again)[0] == recs and again.calls == 0  # same settings: resumed
    with pytest.raises(ConfigError, match=r"max_new_tokens: 16 \(stored\) -> 8 \(now\)"):
        _build(samples, tmp_path / "out", max_new_tokens=8)
    with pytest.raises(ConfigError, match=r"model_fingerprint: 'w1' \(stored\) -> 'w2' \(now\)"):
        _build(samples, tmp_path / "out", model_identity={"source": "toy", "fingerprint": "w2"})
    with pytest.raises(ConfigError, match="parser"):
        _build(samples, tmp_path / "out", parse=lambda text: "yes")


def test_error_rows_do_not_shadow_a_corrected_rerun(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    # every generation fails under the first setting (an adapter error, recorded per sample) ...
    broken = ToyAdapter()
    broken.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    _, ret = _build(samples, tmp_path / "out", broken, max_new_tokens=4)
    assert ret["errors"] == 6
    # ... a rerun with corrected settings recomputes them instead of keeping the errors
    fixed = ToyAdapter()
    recs, ret = _build(samples, tmp_path / "out", fixed, max_new_tokens=16)
    assert ret["errors"] == 0 and fixed.n_images == 6 * 4 and len(recs) == ret["kept"] > 0


def test_split_is_locked_and_debris_removed(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    paths = split_paths(tmp_path / "out", "toy", "toy", "direct")
    held = acquire_lock(paths["log"], "benchmark split")  # another process building the same split
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            _build(samples, tmp_path / "out")
    finally:
        held.close()
    # debris of a killed atomic write (named as the writers name their temporary files), and a
    # temporary file of another split in the same folder that must be left alone
    paths["records"].parent.mkdir(parents=True, exist_ok=True)
    debris = [paths["records"].parent / ".direct.json.k1ll3d.tmp", paths["records"].parent / "direct.jsonabc123.tmp"]
    other = paths["records"].parent / ".cot.json.busy.tmp"
    for f in [*debris, other]:
        f.write_text("partial")
    _build(samples, tmp_path / "out")
    assert not any(f.exists() for f in debris) and other.exists()


def test_result_store_removes_heatmap_debris_on_resume(tmp_path):
    import numpy as np

    from medfocus.runner.store import ResultStore

    with ResultStore(tmp_path / "p.jsonl") as st:
        st.save_arrays(("m", "d", 0, "direct", "x"), heatmap=np.zeros((2, 2)))
        debris = st.heatmap_dir / ".m__d__1__direct__x.q9z.npz.tmp"
        debris.write_bytes(b"PK\x03")  # a kill in the middle of np.savez
    with ResultStore(tmp_path / "p.jsonl") as st:
        assert not debris.exists() and len(list(st.heatmap_dir.glob("*.npz"))) == 1
