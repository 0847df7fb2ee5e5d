"""The demo trainer's training-pool cache (``train-demo --pool-cache``): the same cases as rendering them,
served only for the same data, rebuilt (and said so) when the file is not such a pool."""

from __future__ import annotations

import dataclasses

import numpy as np

from medfocus.training.demo_lvlm.config import DemoLVLMConfig
from medfocus.training.demo_lvlm.data import NON_POOL_FIELDS, POOL_FIELDS, build_train_pool, pool_key


def _cfg(**kw) -> DemoLVLMConfig:
    return DemoLVLMConfig(canvas=56, spatial_merge_size=1, image_size=64, n_train_cases=8, co_occurrence=0.4,
                          cue_subset=0.5, **kw)


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.seed == y.seed and x.cued == y.cued and x.severity == y.severity and x.views == y.views
        assert x.canvas.dtype == y.canvas.dtype and np.array_equal(x.canvas, y.canvas)
        assert x.grid_labels.dtype == y.grid_labels.dtype and np.array_equal(x.grid_labels, y.grid_labels)


def test_every_config_field_is_classified_for_the_pool_key():
    fields = set(DemoLVLMConfig.__dataclass_fields__)
    assert POOL_FIELDS | NON_POOL_FIELDS == fields and not POOL_FIELDS & NON_POOL_FIELDS


def test_cached_pool_is_the_rendered_pool_and_only_for_the_same_data(tmp_path):
    cfg = _cfg()
    fresh = build_train_pool(cfg, progress=False)
    assert any(c.views for c in fresh) and any(c.cued for c in fresh)  # the comparison covers findings and cues
    msgs: list[str] = []
    first = build_train_pool(cfg, progress=False, cache_dir=tmp_path, log=msgs.append)
    files = sorted(tmp_path.glob("train-pool-*.npz"))
    assert len(files) == 1 and msgs[-1].startswith("training pool cached at")
    _same(first, fresh)
    loaded = build_train_pool(cfg, progress=False, cache_dir=tmp_path, log=msgs.append)
    assert msgs[-1].startswith("training pool loaded from")
    _same(loaded, fresh)
    # a training-only field shares the pool; a field that changes the cases does not
    assert pool_key(dataclasses.replace(cfg, lr=1e-4, steps=5, num_threads=1)) == pool_key(cfg)
    for change in ({"seed": 1}, {"n_train_cases": 9}, {"canvas": 84}, {"lesion_size_rule": "fleischner"},
                   {"train_severity": (0.5, 1.0)}, {"aux_target": "cue"}):
        assert pool_key(dataclasses.replace(cfg, **change)) != pool_key(cfg), change
    other = dataclasses.replace(cfg, seed=3)
    _same(build_train_pool(other, progress=False, cache_dir=tmp_path), build_train_pool(other, progress=False))
    assert len(list(tmp_path.glob("train-pool-*.npz"))) == 2


def test_unreadable_or_foreign_cache_file_is_replaced_and_reported(tmp_path):
    cfg = _cfg()
    build_train_pool(cfg, progress=False, cache_dir=tmp_path)
    (path,) = tmp_path.glob("train-pool-*.npz")
    fresh = build_train_pool(cfg, progress=False)
    for bad in (b"not a zip file", None):
        if bad is None:  # a readable npz with another key (e.g. planted or from other code)
            with np.load(path, allow_pickle=False) as z:
                arrays = dict(z)
            arrays["key"] = np.array("0" * 64)
            np.savez(path, **arrays)  # the name ends in .npz: written in place
        else:
            path.write_bytes(bad)
        msgs: list[str] = []
        pool = build_train_pool(cfg, progress=False, cache_dir=tmp_path, log=msgs.append)
        assert "not used" in msgs[0] and str(path) in msgs[0] and msgs[-1].startswith("training pool cached at")
        _same(pool, fresh)
    msgs = []
    build_train_pool(cfg, progress=False, cache_dir=tmp_path, log=msgs.append)
    assert msgs == [f"training pool loaded from {path} (8 cases)"]
