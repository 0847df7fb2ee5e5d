"""Faithfulness through the runner, the evaluation tables, ``medfocus evaluate --faithfulness`` and the report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medfocus.attribution import get_method
from medfocus.attribution.testing import ToyAdapter, cell_box, toy_image
from medfocus.evaluation import build_tables, evaluate_records
from medfocus.evaluation.faithfulness import FaithfulnessConfig
from medfocus.runner import ResultStore, WorkItem, load_results, run_grid
from medfocus.types import Sample

TARGET = (2, 5)


class _Inverted:
    """A 'method' whose map ranks the toy's target cell last."""

    def attribute(self, adapter, image, question, answer):
        hm = np.ones(image.shape, np.float32)
        x1, y1, x2, y2 = cell_box(TARGET, image.shape[0])
        hm[y1:y2, x1:x2] = 0.0
        return SimpleNamespace(heatmap=hm, boxes=None, extras={})


class _BoxOnly:
    def attribute(self, adapter, image, question, answer):
        return SimpleNamespace(heatmap=None, boxes=[(0.0, 0.0, 8.0, 8.0)], extras={})


def _factory(name, params):
    if name == "inverted":
        return _Inverted()
    if name == "boxes":
        return _BoxOnly()
    return get_method(name, **dict(params))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faith_run")
    items = []
    for i, seed in enumerate((1, 2)):
        p = tmp / f"img{i}.png"
        Image.fromarray(toy_image(TARGET, size=64, seed=seed)).save(p)
        s = Sample.positive("toy", i, str(p), "nodule", [cell_box(TARGET, 64)], (64, 64))
        items.append(WorkItem(model="toy", dataset="toy", mode="direct", sample=s, answer="Yes"))
    adapter = ToyAdapter(target_cell=TARGET)
    cfg = FaithfulnessConfig(steps=8, baseline="zero", seed=3)
    methods = {"occlusion": {"grid": 8, "baseline": "zero"}, "inverted": {}, "boxes": {}}
    with ResultStore(tmp / "predictions.jsonl") as st:
        summ = run_grid(items, methods, st, load_model=lambda _n: adapter, make_method=_factory, progress=False, faithfulness=cfg)
    assert summ.errors == 0
    return tmp, load_results(tmp / "predictions.jsonl"), adapter, cfg


def test_records_carry_curves_and_references(run):
    _, recs, _, _ = run
    by = {(r["index"], r["method"]): r for r in recs}
    for i in (0, 1):
        occ, inv, box = by[(i, "occlusion")], by[(i, "inverted")], by[(i, "boxes")]
        assert "deletion_auc" not in box  # no heatmap, no curves
        f = occ["faithfulness"]
        assert len(f["deletion"]) == 9 and f["fractions"][0] == 0 and f["fractions"][-1] == 1 and f["error"] is None
        # occlusion finds the read cell: its curves are the expert box's; the inverted map is worst
        assert occ["deletion_auc"] == pytest.approx(f["expert_box"]["deletion_auc"], abs=1e-6)
        assert occ["deletion_auc"] < f["random"]["deletion_auc"] <= inv["deletion_auc"]
        assert occ["insertion_auc"] > f["random"]["insertion_auc"] >= inv["insertion_auc"]
        # references are scored once per sample and shared by its methods
        assert inv["faithfulness"]["random"] == f["random"] and inv["faithfulness"]["settings"] == f["settings"]
    # per-sample tie seeds differ between samples
    assert by[(0, "occlusion")]["faithfulness"]["settings"]["seed"] != by[(1, "occlusion")]["faithfulness"]["settings"]["seed"]


def test_tables_gain_faithfulness_columns_and_reference_rows(run, tmp_path):
    _, recs, _, _ = run
    df = evaluate_records(recs)
    refs = df[df["source"] == "reference"]
    assert sorted(refs["method"].unique()) == ["reference: expert-box map", "reference: random map"] and len(refs) == 4
    occ = df[df["method"] == "occlusion"]
    assert np.allclose(occ["deletion_auc"], [r["deletion_auc"] for r in recs if r["method"] == "occlusion"])
    md = build_tables(df, tmp_path, metrics=("iou", "deletion_auc", "insertion_auc"))
    assert "Del. AUC" in md and "reference: random map" in md
    row = next(line for line in md.splitlines() if line.startswith("| occlusion"))
    mean_del = 100 * np.mean([r["deletion_auc"] for r in recs if r["method"] == "occlusion"])
    n_occ = sum(r["method"] == "occlusion" for r in recs)
    assert f"{mean_del:.1f} " + ("[" if n_occ >= 10 else "(no CI)") in row  # an interval from 10 samples on


def test_evaluate_recomputes_the_same_numbers_from_stored_heatmaps(run, tmp_path, monkeypatch):
    src, recs, adapter, cfg = run
    stripped = tmp_path / "predictions.jsonl"
    with open(stripped, "w") as fh:
        for r in recs:
            r = {k: v for k, v in r.items() if k not in ("deletion_auc", "insertion_auc", "faithfulness")}
            fh.write(json.dumps(r) + "\n")
    import medfocus.lvlm as lvlm
    from medfocus.cli import main

    monkeypatch.setattr(lvlm, "load_lvlm", lambda name, **kw: adapter)
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["evaluate", str(stripped), "--out", str(out), "--faithfulness", "--model", "toy",
                                    "--faithfulness-steps", "8", "--faithfulness-baseline", "zero", "--seed", "3", "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    assert "4 heatmap records scored with toy" in res.output
    again = {(r["index"], r["method"]): r for r in map(json.loads, (out / "predictions.faithfulness.jsonl").read_text().splitlines())}
    # heatmap paths relative to the file (the store's convention): the run and its evaluation move together
    with_maps = [a for a in again.values() if a.get("heatmap_path")]
    assert with_maps and all(not Path(a["heatmap_path"]).is_absolute() and (out / a["heatmap_path"]).is_file() for a in with_maps)
    for r in recs:
        if "deletion_auc" in r:
            # --seed is the bootstrap seed; the tie seed derives from the curve settings' seed (default 0 here)
            a = again[(r["index"], r["method"])]
            assert a["faithfulness"]["settings"]["steps"] == 8 and a["faithfulness"]["error"] is None
    occ_again = [again[(i, "occlusion")]["deletion_auc"] for i in (0, 1)]
    occ_run = [r["deletion_auc"] for r in recs if r["method"] == "occlusion"]
    assert np.allclose(occ_again, occ_run, atol=1e-6)  # the target cell ranks first whatever the tie seed
    assert "Del. AUC" in (out / "table.md").read_text()
    bad = CliRunner().invoke(main, ["evaluate", str(stripped), "--out", str(out), "--faithfulness"])
    assert bad.exit_code != 0 and "--faithfulness needs --model" in bad.output


def test_report_shows_faithfulness_beside_iou(run):
    src, recs, _, _ = run
    from medfocus.report import build_report

    html = build_report(recs, src / "report.html").read_text()
    assert "Faithfulness beside plausibility" in html
    sec = html.split("Faithfulness beside plausibility", 1)[1].split("<h2>", 1)[0]
    for name in ("occlusion", "inverted", "reference: random map", "reference: expert-box map"):
        assert f">{name}<" in sec
    assert ">boxes<" not in sec  # a box-only method has no curves
    assert "Del. AUC" in sec and "data:image/png;base64" in sec  # the table and the mean-curve plot
