"""Editors and the causal filter on the synthetic chest X-ray world (real DICOM files, exact
counterfactuals), with region-reading models whose evidence is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from medfocus.bench import build_benchmark, read_log, split_paths
from medfocus.editing import edit_mask, edit_prompt, get_editor
from medfocus.io import read_image
from test_bench import ToyAdapter

synthetic = pytest.importorskip("medfocus.datasets.synthetic.dataset", reason="synthetic world not present")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.write_dataset(root, n=10, seed=3, size=96, cue_rate=0.6, progress=False)
    samples = synthetic.load_synthetic(root)
    assert any(s.answer == "Yes" for s in samples)
    return root, samples


class RegionReader(ToyAdapter):
    """An LVLM that answers by looking at regions of the image: for the sample an image belongs to
    it checks whether the finding box and/or the sample's shortcut cue are intact (pixel-identical
    to the original film). ``needs="box"`` answers from the finding; ``needs="box+cue"`` also needs
    the cue (a shortcut: without the cue it does not see the finding)."""

    def __init__(self, samples, needs: str):
        super().__init__()
        self.needs = needs
        self.known = []
        for s in samples:
            if s.answer != "Yes":
                continue
            img, _ = read_image(s.image_path)
            fg = edit_mask("foreground", s.boxes, s.image_size)
            cue = np.zeros_like(fg)
            for c in s.meta.get("cues", []):
                if c.get("finding") == s.attribute:
                    x1, y1, x2, y2 = (int(round(v)) for v in c["box"])
                    cue[y1:y2, x1:x2] = True
            self.known.append((s, img, fg, cue & ~fg))

    def _answer(self, img, question):
        for s, orig, fg, cue in self.known:
            if not question.startswith(s.question):
                continue
            box_ok = np.array_equal(img[fg], orig[fg])
            if not (box_ok or np.array_equal(img[~fg], orig[~fg])):
                continue  # another film
            cue_ok = bool(cue.any()) and np.array_equal(img[cue], orig[cue])
            return box_ok and (cue_ok or self.needs == "box")
        raise AssertionError("image of an unknown sample")

    def generate(self, images, questions, *, max_new_tokens=64, batch_size=8):
        self.calls += 1
        self.n_images += len(images)
        return ["Yes." if self._answer(np.asarray(i), q) else "No." for i, q in zip(images, questions)]


def _has_cue(s):
    return any(c.get("finding") == s.attribute for c in s.meta.get("cues", []))


def test_oracle_filter_on_the_synthetic_world(world, tmp_path):
    root, samples = world
    pos = [s for s in samples if s.answer == "Yes"]
    cued = {s.index for s in pos if _has_cue(s)}
    assert cued and len(cued) < len(pos), "fixture must hold cued and uncued positives"
    ed = get_editor("oracle")
    recs, ret = build_benchmark(RegionReader(samples, "box"), samples, mode="direct", editor=ed, out_dir=tmp_path,
                                model_name="finding_reader", progress=False)
    assert {r["index"] for r in recs} == {s.index for s in pos} and ret["retention_pct"] == 100.0
    recs, ret = build_benchmark(RegionReader(samples, "box+cue"), samples, mode="direct", editor=ed, out_dir=tmp_path,
                                model_name="shortcut_reader", progress=False)
    assert recs == []
    log = read_log(split_paths(tmp_path, "shortcut_reader", "synthetic", "direct")["log"])
    gate = {k[2]: r["failed_gate"] for k, r in log.items()}
    assert {i for i, g in gate.items() if g == "background"} == cued  # the shortcut is caught by the background gate
    assert {i for i, g in gate.items() if g == "correct"} == {s.index for s in pos} - cued
    assert ret["failed_background"] + ret["failed_correct"] == ret["n"] == len(pos)


@pytest.mark.parametrize("name", ["oracle", "inpaint", "transplant"])
def test_every_editor_respects_its_mask_on_synthetic_films(world, tmp_path, name):
    root, samples = world
    kw = {}
    if name == "transplant":
        from medfocus.datasets.synthetic import write_reference_pool

        kw["reference_dir"] = write_reference_pool(tmp_path / "ref", n=3, seed=1, size=96)
    ed = get_editor(name, **kw)
    s = next(s for s in samples if s.answer == "Yes")
    img, _ = read_image(s.image_path)
    for kind in ("foreground", "background", "background_normal"):
        mask = edit_mask(kind, s.boxes, s.image_size)
        out = ed.edit(img, mask, edit_prompt(kind, s.attribute), sample=s, kind=kind)
        assert np.array_equal(out[~mask], img[~mask]), (name, kind)
        assert (out[mask] != img[mask]).any(), (name, kind)


def test_demo_model_bench_build_adds_up(world, tmp_path, request):
    adapter = request.getfixturevalue("demo_adapter")  # skips until the demo weights are shipped
    root, samples = world
    for mode in ("direct", "cot"):
        recs, ret = build_benchmark(adapter, samples[:6], mode=mode, editor=get_editor("oracle"), out_dir=tmp_path,
                                    model_name="demo", batch_size=8, max_new_tokens=48, progress=False)
        assert ret["n"] == sum(s.answer == "Yes" for s in samples[:6])
        assert ret["errors"] + ret["failed_correct"] + ret["failed_flip"] + ret["failed_background"] + ret["kept"] == ret["n"]
        from medfocus.datasets.medground import load_records

        assert len(load_records(split_paths(tmp_path, "demo", "synthetic", mode)["records"])) == ret["kept"]
