"""The one box-text parser (issue 12, kind 6): every dialect of the supported families, per-family
defaults, and unparseable box-like text recorded as such (through prompting, the runner record,
evaluate and the tables) instead of an empty prediction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medfocus.errors import ConfigError
from medfocus.lvlm.box_text import FAMILY_BOX_COORDS, box_coords_for, parse_boxes

W, H = 500, 400  # frame the model saw
ISSUE = "<|box_start|>(120,610),(430,890)<|box_end|>"

# (text, coords, family) -> (boxes in frame pixels, status, dialects)
TABLE = [
    # Qwen2-VL box tokens: 0..1000, whatever coords says (the issue's input)
    (ISSUE, "norm1000", None, [(60, 244, 215, 356)], "boxes", ("qwen2_tok",)),
    (ISSUE, "canvas", "qwen_vl", [(60, 244, 215, 356)], "boxes", ("qwen2_tok",)),
    ("<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(120,610),(430,890)<|box_end|>", "auto", "qwen_vl",
     [(60, 244, 215, 356)], "boxes", ("qwen2_tok",)),
    ("<|box_start|>(430, 890), (120, 610)<|box_end|><|box_start|>(0,0),(1000,100)<|box_end|>", "auto", None,
     [(60, 244, 215, 356), (0, 0, 500, 40)], "boxes", ("qwen2_tok", "qwen2_tok")),
    # Qwen2-VL pairs without the tokens: 0..1000 under auto, else coords
    ("(120,610),(430,890)", "auto", "qwen_vl", [(60, 244, 215, 356)], "boxes", ("pairs",)),
    ("The effusion is at (12, 61), (43, 89).", "canvas", None, [(12, 61, 43, 89)], "boxes", ("pairs",)),
    # Qwen2.5-VL JSON: absolute pixels of its input under auto
    ('```json\n[\n  {"bbox_2d": [120, 61, 430, 89], "label": "nodule"}\n]\n```', "auto", "qwen_vl",
     [(120, 61, 430, 89)], "boxes", ("bbox_2d",)),
    ('[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [50, 60, 70, 80], "label": "b"}]', "auto", "gemma3",
     [(10, 20, 30, 40), (50, 60, 70, 80)], "boxes", ("bbox_2d", "bbox_2d")),
    ('{"bbox_2d": [100, 200, 300, 400]}', "norm1000", None, [(50, 80, 150, 160)], "boxes", ("bbox_2d",)),
    ('{"bbox": [0.1, 0.2, 0.5, 0.6]}', "auto", "qwen_vl", [(50, 80, 250, 240)], "boxes", ("bbox_2d",)),
    # Gemini / Gemma style box_2d: y first, 0..1000
    ('{"box_2d": [250, 125, 750, 625], "label": "effusion"}', "auto", "gemma3", [(62.5, 100, 312.5, 300)], "boxes", ("box_2d",)),
    # PaliGemma <loc> tokens: y first, 0..1023 (value / 1024)
    ("<loc0256><loc0128><loc0768><loc0640> nodule", "auto", None, [(62.5, 100, 312.5, 300)], "boxes", ("loc",)),
    ("<loc0000><loc0000><loc0512><loc0512> a ; <loc0512><loc0512><loc1023><loc1023> b", "canvas", None,
     [(0, 0, 250, 200), (250, 200, 500 * 1023 / 1024, 400 * 1023 / 1024)], "boxes", ("loc", "loc")),
    # bracketed lists: the family default under auto
    ("[[10, 20, 30, 40]]", "auto", "qwen_vl", [(10, 20, 30, 40)], "boxes", ("list",)),
    ("[[100, 200, 300, 400]]", "auto", "gemma3", [(50, 80, 150, 160)], "boxes", ("list",)),
    ("[0.12, 0.25, 0.5, 0.75]", "auto", "llava", [(60, 100, 250, 300)], "boxes", ("list",)),
    ("(10, 20, 30, 40)", "canvas", None, [(10, 20, 30, 40)], "boxes", ("list",)),
    ("The nodule is located at **[120, 61, 430, 89]** in the right upper lobe.", "auto", "qwen_vl",
     [(120, 61, 430, 89)], "boxes", ("list",)),
    # normalised floats are relative whatever coords says
    ("[0.12, 0.25, 0.5, 0.75]", "auto", "qwen_vl", [(60, 100, 250, 300)], "boxes", ("list",)),
    ("[0.12, 0.25, 0.5, 0.75]", "norm1000", None, [(60, 100, 250, 300)], "boxes", ("list",)),
    ("[0, 0, 1, 1]", "canvas", None, [(0, 0, 1, 1)], "boxes", ("list",)),  # integers: pixels
    # read, but nothing left after ordering/clipping
    ("[[7, 7, 7, 9]]", "canvas", None, [], "empty", ("list",)),
    ("[[600, 500, 900, 700]]", "canvas", None, [], "empty", ("list",)),
    # no box-like text
    ("[]", "auto", None, [], "empty", ()),
    ("", "auto", None, [], "empty", ()),
    ("No abnormality is visible.", "auto", None, [], "empty", ()),
    ("The heart measures 14 cm, cardiothoracic ratio 0.55 (about 5 mm margin).", "auto", None, [], "empty", ()),
    # box-like text no rule reads: unparseable, not an empty prediction
    ("<|box_start|>(120,610)<|box_end|>", "auto", None, [], "unparseable", ()),
    ("<loc0256><loc0128> nodule", "auto", None, [], "unparseable", ()),
    ('{"bbox_2d": [120, 610, 430]}', "auto", None, [], "unparseable", ()),
    ('{"bbox_2d": "left lower zone"}', "auto", None, [], "unparseable", ()),
    ("The box is [120, 610].", "auto", None, [], "unparseable", ()),
    ("[[120, 610, 430, 890, 12]]", "auto", None, [], "unparseable", ()),
    # partly readable: the boxes count, the rest is kept as unread
    ("[[10, 20, 30, 40]] and [5, 6]", "canvas", None, [(10, 20, 30, 40)], "boxes", ("list",)),
]


@pytest.mark.parametrize("text,coords,family,boxes,status,dialects", TABLE)
def test_box_dialects(text, coords, family, boxes, status, dialects):
    got = parse_boxes(text, W, H, coords, family=family)
    assert got.status == status and got.dialects == dialects
    assert len(got.boxes) == len(boxes)
    for g, w in zip(got.boxes, boxes):
        assert g == pytest.approx(tuple(float(v) for v in w))


def test_unread_fragments_are_kept():
    assert parse_boxes("[[10, 20, 30, 40]] and [5, 6]", W, H, "canvas").unread == ("[5, 6]",)
    assert parse_boxes("<loc0256><loc0128> nodule", W, H).unread == ("<loc0256>", "<loc0128>")


def test_family_defaults_and_errors():
    assert FAMILY_BOX_COORDS == {"qwen_vl": "canvas", "gemma3": "norm1000", "llava": "relative"}
    assert box_coords_for("toy") == "canvas" and box_coords_for(None) == "canvas"
    with pytest.raises(ConfigError, match="coords must be one of"):
        parse_boxes("[1, 2, 3, 4]", W, H, "pixels")
    with pytest.raises(ConfigError, match="positive size"):
        parse_boxes("[1, 2, 3, 4]", 0, H)


def test_one_box_text_parser_in_the_package():
    """No other module defines a box-text parser (the demo and the prompting baseline use this one)."""
    import pathlib
    import re

    import medfocus

    root = pathlib.Path(medfocus.__file__).parent
    defs = [str(p.relative_to(root)) for p in root.rglob("*.py") if re.search(r"^def parse_boxes\b", p.read_text(), re.M)]
    assert defs == ["lvlm/box_text.py"]


def test_unparseable_answer_is_recorded_and_counted_not_scored(tmp_path):
    """prompting -> runner record -> evaluate -> tables: an unreadable box answer is its own kind."""
    from medfocus.attribution import get_method
    from medfocus.attribution.testing import ToyAdapter
    from medfocus.evaluation import evaluate_records
    from medfocus.evaluation.tables import summarize, to_markdown

    toy = ToyAdapter()
    img = np.zeros((32, 32), np.uint8)
    q = "Is there evidence of nodule in the image?"
    toy.scripted_generation = ["<|box_start|>(120,610)<|box_end|>"]
    res = get_method("prompting").attribute(toy, img, q, "Yes")
    assert res.boxes == [] and res.extras["box_text"] == "unparseable"
    toy.scripted_generation = [ISSUE]
    res_ok = get_method("prompting", coords="norm1000").attribute(toy, img, q, "Yes")
    assert res_ok.extras["box_text"] == "boxes" and res_ok.boxes == [pytest.approx((3.84, 19.52, 13.76, 28.48))]
    with pytest.raises(ConfigError, match="parameter .coords. expects one of"):
        get_method("prompting", coords="pixels")

    base = {"model": "m", "dataset": "d", "mode": "direct", "method": "prompting", "gt_boxes": [[0, 0, 16, 16]],
            "image_size": [32, 32]}
    recs = [dict(base, index=0, pred_boxes=[], unparseable=True),
            dict(base, index=1, pred_boxes=[], unparseable=False),
            dict(base, index=2, pred_boxes=[[0, 0, 16, 16]])]
    df = evaluate_records(recs)
    assert df["source"].tolist() == ["unparseable", "boxes", "boxes"]
    assert math.isnan(df.loc[0, "iou"]) and df.loc[1, "iou"] == 0.0 and df.loc[2, "iou"] == 1.0
    s = summarize(df, ["iou"], n_boot=10)
    assert s.loc[0, "n"] == 2 and s.loc[0, "n_unparseable"] == 1 and s.loc[0, "mean"] == pytest.approx(50.0)
    md = to_markdown(s, ["iou"])
    assert "| unparseable |" in md and md.strip().splitlines()[4].endswith("| 1 |")


def test_runner_records_unparseable(tmp_path):
    import sys
    from types import SimpleNamespace

    from medfocus.runner import ResultStore, WorkItem, load_results, run_grid

    sys.path.insert(0, str(Path(__file__).parent))
    from test_runner_fakes import FakeAdapter, make_samples, read_npy  # noqa: E402

    samples, _ = make_samples(tmp_path / "imgs", 2)
    items = [WorkItem("m1", s.dataset, "direct", s) for s in samples]
    status = {0: "unparseable", 1: "empty"}

    class Scripted:
        def attribute(self, adapter, image, question, answer):
            k = len(calls)
            calls.append(k)
            return SimpleNamespace(heatmap=None, boxes=[], extras={"box_text": status[k]}, n_forward=1)

    calls: list[int] = []
    with ResultStore(tmp_path / "r.jsonl") as st:
        run_grid(items, ["prompting"], st, load_model=FakeAdapter, make_method=lambda n, p: Scripted(),
                 read_image=read_npy, progress=False)
    recs = sorted(load_results(tmp_path / "r.jsonl"), key=lambda r: r["index"])
    assert [r["unparseable"] for r in recs] == [True, False] and [r["pred_boxes"] for r in recs] == [[], []]
