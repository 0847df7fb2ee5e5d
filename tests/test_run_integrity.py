"""Run integrity (issue 13, item 6): a result is keyed by its settings. A rerun with other method
settings or other model weights refuses, naming what differs; an error record does not shadow a
corrected rerun; `bench build` refuses other generation settings the same way."""

from __future__ import annotations

import numpy as np
import pytest

from medfocus.attribution import get_method
from medfocus.attribution.testing import ToyAdapter, toy_image
from medfocus.errors import ConfigError
from medfocus.io import write_png
from medfocus.runner.grid import WorkItem, run_grid
from medfocus.runner.store import ResultStore, load_results
from medfocus.types import Sample, question_stem


def _items(tmp_path, n=2):
    items = []
    for i in range(n):
        p = write_png(tmp_path / f"img{i}.png", toy_image(seed=i))
        s = Sample("synthetic", i, str(p), "nodule", question_stem("nodule"), "Yes", [(40.0, 16.0, 48.0, 24.0)], (64, 64))
        items.append(WorkItem("toy", "synthetic", "direct", s, answer_source="ground_truth"))
    return items


@pytest.fixture(scope="module")
def toy():
    import torch

    torch.manual_seed(0)
    return ToyAdapter(target_cell=(2, 5))


def _run(items, store_path, toy, params, identity=None, **kw):
    with ResultStore(store_path) as st:
        return run_grid(items, params, st, load_model=lambda name: toy, progress=False,
                        identify_model=lambda name: identity or {"name": name, "source": "toy", "fingerprint": "w1"}, **kw)


def test_changed_parameter_refuses_naming_it(tmp_path, toy):
    items, store = _items(tmp_path), tmp_path / "out" / "predictions.jsonl"
    s1 = _run(items, store, toy, {"occlusion": {"grid": 2}})
    assert s1.done == 2 and s1.errors == 0
    before = {r["index"]: np.load(r["heatmap_path"])["heatmap"] for r in load_results(store)}
    rec = load_results(store)[0]
    assert rec["settings"] == {"baseline": "zero", "batch_size": 16, "grid": 2}
    assert rec["model_identity"]["fingerprint"] == "w1"
    # same settings: resumed, nothing recomputed
    assert _run(items, store, toy, {"occlusion": {"grid": 2}}).skipped == 2
    # a batch size does not change results: not a different setting
    assert _run(items, store, toy, {"occlusion": {"grid": 2, "batch_size": 3}}).skipped == 2
    with pytest.raises(ConfigError) as ei:
        _run(items, store, toy, {"occlusion": {"grid": 4}})
    msg = str(ei.value)
    assert "method 'occlusion' (2 records): grid: 2 (stored) -> 4 (now)" in msg and "new --out" in msg
    from medfocus.runner.grid import StoredSettingsError

    assert isinstance(ei.value, StoredSettingsError)  # the type the demo turns into its --fresh advice
    after = {r["index"]: np.load(r["heatmap_path"])["heatmap"] for r in load_results(store)}
    assert all(np.array_equal(before[i], after[i]) for i in before)  # nothing was overwritten
    # other weights under the same model name
    with pytest.raises(ConfigError, match="model fingerprint: 'w1' \\(stored\\) -> 'w2' \\(now\\)"):
        _run(items, store, toy, {"occlusion": {"grid": 2}}, identity={"name": "toy", "source": "toy", "fingerprint": "w2"})
    # a new store for the new setting works and gives the grid=4 map
    s4 = _run(items, tmp_path / "out4" / "predictions.jsonl", toy, {"occlusion": {"grid": 4}})
    assert s4.done == 2


class Fragile:
    """Fails unless ``ok`` is true (a run whose settings were wrong in a way only the run shows)."""

    def __init__(self, ok: bool) -> None:
        self.params = {"ok": ok}

    def settings(self):
        return dict(self.params)

    def attribute(self, adapter, image, question, answer):
        if not self.params["ok"]:
            raise RuntimeError("bad setting")
        return get_method("occlusion", grid=2).attribute(adapter, image, question, answer)


def test_error_record_does_not_shadow_corrected_rerun(tmp_path, toy):
    items, store = _items(tmp_path), tmp_path / "out" / "predictions.jsonl"
    fac = lambda name, params: Fragile(**params)  # noqa: E731
    s1 = _run(items, store, toy, {"fragile": {"ok": False}}, make_method=fac)
    assert s1.errors == 2
    s2 = _run(items, store, toy, {"fragile": {"ok": True}}, make_method=fac)
    assert s2.done == 2 and s2.skipped == 0
    recs = load_results(store)
    assert len(recs) == 2 and all(r["error"] is None and r["settings"] == {"ok": True} for r in recs)
    # same (failing) settings again: the error records stay unless --retry-errors
    s3 = _run(items, tmp_path / "o3" / "p.jsonl", toy, {"fragile": {"ok": False}}, make_method=fac)
    s4 = _run(items, tmp_path / "o3" / "p.jsonl", toy, {"fragile": {"ok": False}}, make_method=fac)
    assert s3.errors == 2 and s4.skipped == 2


def test_records_without_settings_are_refused(tmp_path, toy):
    items, store = _items(tmp_path, 1), tmp_path / "out" / "predictions.jsonl"
    _run(items, store, toy, {"occlusion": {"grid": 2}})
    rec = load_results(store, absolute_paths=False)[0]
    del rec["settings"]
    with ResultStore(store) as st:
        st.append(rec)
    with pytest.raises(ConfigError, match="not recorded"):
        _run(items, store, toy, {"occlusion": {"grid": 2}})


def test_cli_rerun_with_other_param_exits_nonzero(tmp_path, monkeypatch, toy):
    from click.testing import CliRunner

    import medfocus.commands.attribute as attr_cmd
    import medfocus.lvlm.loading as loading
    from medfocus.cli import main

    items = _items(tmp_path)
    monkeypatch.setattr(attr_cmd, "load_samples", lambda ds, root, rescale_boxes=False: [it.sample for it in items])
    monkeypatch.setattr(loading, "load_lvlm", lambda name, device=None, **kw: toy)
    monkeypatch.setattr(attr_cmd, "check_models", lambda names: None)
    base = ["attribute", "--dataset", "synthetic", "--model", "demo", "--method", "occlusion", "--out", str(tmp_path / "o"),
            "--no-progress"]
    r = CliRunner().invoke(main, [*base, "--param", "occlusion.grid=2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*base, "--param", "occlusion.grid=4"])
    assert r.exit_code == 1 and "grid: 2 (stored) -> 4 (now)" in r.output and "Traceback" not in r.output
