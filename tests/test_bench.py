"""The three-step causal filter on a hand-built world whose truth is known by construction.

Toy world: a 48x48 image with a bright finding (value 230) inside its box and, in *cued* images, a
shortcut cue (a 4x4 patch of value 250) in the top-left corner. The oracle counterfactuals are exact:
foreground = finding removed (cue kept); background / background-normal = finding kept, everything
outside the box redrawn (other texture, cue removed).

The toy LVLM accumulates evidence: one point per finding pixel, plus ``cue_bonus`` if the cue is
visible; it answers Yes iff the evidence reaches ``threshold``. With threshold 30 and bonus 25:
* a *large* finding (64 px) is seen on its own -> the model answers from the finding -> kept;
* a *small* finding (9 px) is only "seen" together with the cue -> the model answers from the
  shortcut -> correct and flipped, but the background edit (cue removed) changes the answer ->
  removed by the background gate;
* a small finding without cue -> wrong answer -> removed by the correctness gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from medfocus.bench import apply_filter, build_benchmark, read_log, retention_table, split_paths
from medfocus.bench.build import make_record
from medfocus.editing import Editor, get_editor
from medfocus.io.fingerprint import file_sha256
from medfocus.lvlm.adapter import LVLMAdapter
from medfocus.types import SUFFIXES, Sample, question_stem

FINDING, CUE = 230, 250


class ToyAdapter(LVLMAdapter):
    """Implements :meth:`LVLMAdapter.generate` by reading pixels (a model whose evidence is known).
    The other abstract methods are not used by the filter."""

    name = family = "toy"

    def __init__(self, threshold: int = 30, cue_bonus: int = 25, fail_on_call: int | None = None,
                 gibberish: bool = False):
        self.threshold, self.cue_bonus = threshold, cue_bonus
        self.calls = 0
        self.n_images = 0
        self.fail_on_call = fail_on_call
        self.gibberish = gibberish
        self.questions: list[str] = []

    def evidence(self, img: np.ndarray) -> int:
        cue = int((img == CUE).sum() >= 16)
        return int((img == FINDING).sum()) + self.cue_bonus * cue

    def generate(self, images, questions, *, max_new_tokens=64, batch_size=8):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # simulates the process being killed mid-run
        self.n_images += len(images)
        self.questions += list(questions)
        out = []
        for img, q in zip(images, questions):
            yes = self.evidence(np.asarray(img)) >= self.threshold
            if self.gibberish:
                out.append("I cannot say.")
            elif q.endswith(SUFFIXES["cot"]):
                out.append(f"Step 1: look at the image. Step 2: weigh the findings. Final answer: {'yes' if yes else 'no'}.")
            else:
                out.append("Yes." if yes else "No.")
        return out

    # not used by the filter
    def prepare(self, image, question, answer=None, *, include_eot=False):
        raise NotImplementedError

    def batch_inputs(self, chat, pixel_values):
        raise NotImplementedError

    def pixel_values_to_images(self, pixel_values, chat):
        raise NotImplementedError

    def images_to_pixel_values(self, images, chat):
        raise NotImplementedError

    @property
    def decoder_layers(self):
        raise NotImplementedError

    @property
    def image_feature_module(self):
        raise NotImplementedError


def _base(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 100 + 30 * np.sin(xx / 4.0 + seed) * np.cos(yy / 6.0) + rng.normal(0, 5, (size, size))
    return np.clip(img, 60, 160).astype(np.uint8)


def make_toy_world(root: Path, plan: list[tuple[str, bool]], n_neg: int = 0, size: int = 48) -> list[Sample]:
    """Write images + exact counterfactuals; ``plan`` = [(finding size 'large'|'small', cued), ...]."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (kind, cued) in enumerate(plan + [("none", False)] * n_neg):
        base = _base(i)
        img = base.copy()
        x0, y0 = 20 + (i % 3) * 4, 18 + (i % 2) * 6
        side = {"large": 8, "small": 3, "none": 0}[kind]
        box = (x0 - 2, y0 - 2, x0 + side + 2, y0 + side + 2)
        img[y0:y0 + side, x0:x0 + side] = FINDING
        if cued:
            img[1:5, 1:5] = CUE
        paths = {"image": root / f"{i}.png"}
        cv2.imwrite(str(paths["image"]), img)
        meta = {}
        if kind != "none":
            fg = img.copy()
            fg[y0:y0 + side, x0:x0 + side] = base[y0:y0 + side, x0:x0 + side]
            bg = np.clip(_base(1000 + i).astype(int) + 5, 0, 255).astype(np.uint8)  # redrawn outside, no cue
            bx1, by1, bx2, by2 = box
            bg[by1:by2, bx1:bx2] = img[by1:by2, bx1:bx2]
            for k, a in (("foreground", fg), ("background", bg), ("background_normal", bg)):
                cv2.imwrite(str(root / f"{i}_{k}.png"), a)
            meta = {"counterfactuals": {k: f"{i}_{k}.png" for k in ("foreground", "background", "background_normal")},
                    "truth": f"{kind}{'_cued' if cued else ''}"}
        samples.append(Sample("toy", i, str(paths["image"]), "nodule", question_stem("nodule"),
                              "Yes" if kind != "none" else "No", [box] if kind != "none" else [], (size, size), meta=meta))
    return samples


PLAN = [("large", False), ("large", True), ("small", True), ("small", False), ("large", True), ("small", True)]


def test_apply_filter_gates():
    Y, N = "Yes", "No"
    ok = apply_filter(Y, {"original": Y, "foreground": N, "background": Y, "background_normal": Y})
    assert ok.kept and ok.failed_gate is None
    r = apply_filter(Y, {"original": N, "foreground": N, "background": N, "background_normal": N})
    assert r.failed_gate == "correct" and not r.unparseable
    r = apply_filter(Y, {"original": Y, "foreground": None, "background": Y, "background_normal": Y})
    assert r.failed_gate == "flip" and r.unparseable
    r = apply_filter(Y, {"original": Y, "foreground": N, "background": Y, "background_normal": N})
    assert r.failed_gate == "background" and not r.unparseable and r.gates == {"correct": True, "flip": True, "background": False}
    r = apply_filter(Y, {"original": None, "foreground": N, "background": Y, "background_normal": Y})
    assert r.failed_gate == "correct" and r.unparseable


@pytest.mark.parametrize("mode", ["direct", "cot"])
def test_oracle_filter_removes_shortcut_answers_and_keeps_finding_answers(tmp_path, mode):
    samples = make_toy_world(tmp_path / "data", PLAN)
    adapter = ToyAdapter()
    records, ret = build_benchmark(adapter, samples, mode=mode, editor=get_editor("oracle"), out_dir=tmp_path / "out",
                                   model_name="toy", progress=False)
    truth = {s.index: s.meta["truth"] for s in samples}
    kept = {r["index"] for r in records}
    assert kept == {i for i, t in truth.items() if t.startswith("large")}
    log = read_log(split_paths(tmp_path / "out", "toy", "toy", mode)["log"])
    gate = {k[2]: r["failed_gate"] for k, r in log.items()}
    assert all(gate[i] == "background" for i, t in truth.items() if t == "small_cued")
    assert all(gate[i] == "correct" for i, t in truth.items() if t == "small")
    # retention numbers add up and match the construction
    assert (ret["n"], ret["kept"], ret["failed_correct"], ret["failed_flip"], ret["failed_background"], ret["errors"]) == (6, 3, 1, 0, 2, 0)
    assert ret["n"] == ret["errors"] + ret["failed_correct"] + ret["failed_flip"] + ret["failed_background"] + ret["kept"]
    assert ret["retention_pct"] == 50.0
    # the model saw the paper's question with the mode suffix, four images per sample
    assert set(adapter.questions) == {question_stem("nodule") + SUFFIXES[mode]} and adapter.n_images == 4 * 6
    rec = records[0]
    m = mode
    assert (rec[f"prediction_{m}"], rec[f"prediction_edited_{m}"], rec[f"prediction_edited_kept_{m}"],
            rec[f"prediction_edited_kept_normal_{m}"]) == ("Yes", "No", "Yes", "Yes")
    assert rec["editor"] == "oracle" and rec["boxes"] and rec["question"].endswith(SUFFIXES[mode])
    md = (tmp_path / "out" / "retention.md").read_text()
    assert f"| toy | toy | {mode} | oracle | 6 | 0 | 1 | 0 | 2 | 3 | 50.0 |" in md


def test_cue_dominated_model_loses_cued_samples_finding_model_keeps_all(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    ed = get_editor("oracle")
    recs, ret = build_benchmark(ToyAdapter(threshold=16, cue_bonus=100), samples, mode="direct", editor=ed,
                                out_dir=tmp_path / "cue", model_name="cue_only", progress=False)
    # the cue alone decides whenever it is present (large findings reach the threshold on their own,
    # small ones do not) -> only the large uncued sample is kept, every cued one is removed
    assert {r["index"] for r in recs} == {0}
    assert ret["failed_flip"] == 4  # cued: the foreground edit keeps the cue, so the answer cannot flip
    assert ret["failed_correct"] == 1  # small uncued: not seen
    recs2, ret2 = build_benchmark(ToyAdapter(threshold=9, cue_bonus=0), samples, mode="direct", editor=ed,
                                  out_dir=tmp_path / "finding", model_name="finding_only", progress=False)
    assert len(recs2) == 6 and ret2["retention_pct"] == 100.0


def _toy_split(tmp_path, mode="direct"):
    samples = make_toy_world(tmp_path / "data", PLAN)
    build_benchmark(ToyAdapter(), samples, mode=mode, editor=get_editor("oracle"), out_dir=tmp_path / "out",
                    model_name="toy", progress=False)
    return samples, split_paths(tmp_path / "out", "toy", "toy", mode)["records"]


def test_records_match_the_public_schema(tmp_path, shared_data):
    _, path = _toy_split(tmp_path)
    ours = json.loads(path.read_text())
    public = json.loads((shared_data / "medground_bench_direct.json").read_text())
    assert set(public[0]) <= set(ours[0])  # every public field, plus our extras
    for k in public[0]:
        assert type(ours[0][k]) is type(public[0][k]), k


@pytest.mark.parametrize("mode", ["direct", "cot"])
def test_records_round_trip_through_the_benchmark_loader(tmp_path, mode):
    from medfocus.datasets.medground import join_records, load_records

    samples, path = _toy_split(tmp_path, mode)
    ours = json.loads(path.read_text())
    loaded = load_records(path)
    assert [r.to_dict() for r in loaded] == ours
    assert all(r.modes == [mode] and r.passes_filter(mode) for r in loaded)
    assert [r.index for r in loaded] == [0, 1, 4]
    assert loaded[0].extra["editor"] == "oracle" and loaded[0].extra["boxes"] == [list(samples[0].boxes[0])]
    joined = join_records(loaded, samples)
    assert [(r.index, s.index) for r, s in joined] == [(0, 0), (1, 1), (4, 4)]


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    ed = get_editor("oracle")
    kw = dict(mode="direct", editor=ed, model_name="toy", progress=False, samples_per_step=2)
    with pytest.raises(KeyboardInterrupt):
        build_benchmark(ToyAdapter(fail_on_call=2), samples, out_dir=tmp_path / "run", **kw)
    log_path = split_paths(tmp_path / "run", "toy", "toy", "direct")["log"]
    assert len(read_log(log_path)) == 2  # the first step (2 samples) was saved
    with log_path.open("a") as fh:  # and a kill in the middle of writing a line
        fh.write('{"model": "toy", "dataset": "toy", "ind')
    again = ToyAdapter()
    recs, ret = build_benchmark(again, samples, out_dir=tmp_path / "run", **kw)
    assert again.n_images == 4 * 4  # only the 4 missing samples were generated
    fresh, ret_fresh = build_benchmark(ToyAdapter(), samples, out_dir=tmp_path / "fresh", **kw)
    assert recs == fresh and ret == ret_fresh
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip().endswith("}")]
    assert sorted(r["index"] for r in lines) == list(range(6))  # no duplicates
    # a third run does nothing
    third = ToyAdapter()
    build_benchmark(third, samples, out_dir=tmp_path / "run", **kw)
    assert third.calls == 0


def test_failing_sample_is_recorded_and_the_run_continues(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    Path(samples[1].image_path).unlink()
    recs, ret = build_benchmark(ToyAdapter(), samples, mode="direct", editor=get_editor("oracle"),
                                out_dir=tmp_path / "out", model_name="toy", progress=False)
    assert ret["errors"] == 1 and ret["kept"] == 2 and ret["n"] == 6
    row = read_log(split_paths(tmp_path / "out", "toy", "toy", "direct")["log"])[("toy", "toy", 1)]
    assert "1.png" in row["error"]


def test_unparseable_answers_fail_their_gate_and_are_counted(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    recs, ret = build_benchmark(ToyAdapter(gibberish=True), samples, mode="cot", editor=get_editor("oracle"),
                                out_dir=tmp_path / "out", model_name="toy", progress=False)
    assert recs == [] and ret["failed_correct"] == ret["unparseable_correct"] == 6


class _CountingOracle(Editor):
    name = "oracle"

    def __init__(self):
        self.inner = get_editor("oracle")
        self.calls = 0

    def _edit(self, image, mask, prompt, *, sample, kind):
        self.calls += 1
        return self.inner._edit(image, mask, prompt, sample=sample, kind=kind)


def test_edits_are_cached_and_shared_across_models(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN)
    ed = _CountingOracle()
    cache = tmp_path / "edits"
    build_benchmark(ToyAdapter(), samples, mode="direct", editor=ed, out_dir=tmp_path / "out", model_name="a",
                    cache_dir=cache, progress=False)
    assert ed.calls == 3 * 6
    build_benchmark(ToyAdapter(threshold=9, cue_bonus=0), samples, mode="cot", editor=ed, out_dir=tmp_path / "out",
                    model_name="b", cache_dir=cache, progress=False)
    assert ed.calls == 3 * 6  # second model, other mode: every edit came from the cache
    df = retention_table(tmp_path / "out")
    assert sorted(zip(df["model"], df["mode"], df["kept"])) == [("a", "direct", 3), ("b", "cot", 6)]


def test_negatives_are_off_by_default_and_separate(tmp_path):
    samples = make_toy_world(tmp_path / "data", PLAN, n_neg=3)
    out = tmp_path / "out"
    a = ToyAdapter()
    _, ret = build_benchmark(a, samples, mode="direct", editor=get_editor("oracle"), out_dir=out, model_name="toy",
                             progress=False)
    p = split_paths(out, "toy", "toy", "direct")
    assert a.n_images == 24 and not p["negatives"].exists() and ret["negatives"] == 0
    _, ret = build_benchmark(ToyAdapter(), samples, mode="direct", editor=get_editor("oracle"), out_dir=out,
                             model_name="toy", include_negatives=True, progress=False)
    neg = json.loads(p["negatives"].read_text())
    assert [r["index"] for r in neg] == [6, 7, 8] and all(r["prediction_direct"] == "No" for r in neg)
    assert ret["negatives"] == ret["negatives_correct"] == 3 and ret["n"] == 6  # positives unchanged
    assert len(json.loads(p["records"].read_text())) == 3


def test_make_record_schema():
    row = {"model": "m", "dataset": "d", "index": 3, "mode": "cot", "answer": "Yes", "editor": "oracle",
           "attribute": "mass", "question": "q", "boxes": [[1, 2, 3, 4]], "image_size": [8, 8],
           "parsed": {"original": "Yes", "foreground": "No", "background": "Yes", "background_normal": "Yes"}}
    rec = make_record(row)
    assert list(rec)[:8] == ["model", "dataset", "index", "answer", "prediction_cot", "prediction_edited_cot",
                             "prediction_edited_kept_cot", "prediction_edited_kept_normal_cot"]


def test_a_split_is_built_with_one_editor(tmp_path):
    from medfocus.errors import ConfigError

    samples = make_toy_world(tmp_path / "data", PLAN)
    build_benchmark(ToyAdapter(), samples, mode="direct", editor=get_editor("oracle"), out_dir=tmp_path / "out",
                    model_name="toy", progress=False)
    with pytest.raises(ConfigError, match=r"other settings: editor: 'oracle' \(stored\) -> 'inpaint-[0-9a-f]+' \(now\)"):
        build_benchmark(ToyAdapter(), samples, mode="direct", editor=get_editor("inpaint"), out_dir=tmp_path / "out",
                        model_name="toy", progress=False)


def _inpaint_split(samples, out, cache_dir, **kw):
    adapter = ToyAdapter()
    recs, ret = build_benchmark(adapter, samples, mode="direct", editor=get_editor("inpaint"), out_dir=out,
                                model_name="toy", cache_dir=cache_dir, progress=False, **kw)
    return adapter, recs, ret


def test_original_view_generations_are_shared_across_editors(tmp_path):
    from medfocus.bench import GenerationCache

    samples = make_toy_world(tmp_path / "data", PLAN, n_neg=2)
    cache = tmp_path / "cache"
    first = ToyAdapter()
    build_benchmark(first, samples, mode="direct", editor=get_editor("oracle"), out_dir=tmp_path / "oracle",
                    model_name="toy", cache_dir=cache, progress=False)
    assert first.n_images == 4 * 6
    gc = GenerationCache(cache, "toy", "toy", "direct")
    assert gc.path == cache / "generations" / "toy" / "toy" / "direct.jsonl" and len(gc) == 6
    q = question_stem("nodule") + SUFFIXES["direct"]
    sha = [file_sha256(s.image_path)[1] for s in samples]
    assert gc.get(0, q, 16, sha[0]) == "Yes." and gc.get(0, q, 17, sha[0]) is None and gc.get(3, q, 16, sha[3]) == "No."
    assert gc.get(0, q, 16, sha[3]) is None and gc.get(0, q, 16, None) is None  # another film: not served
    # second editor, other out folder, same cache_dir: only the three edited views are generated
    second, recs, ret = _inpaint_split(samples, tmp_path / "inpaint", cache)
    assert second.n_images == 3 * 6
    # identical to building the inpaint split alone, without any cache
    alone, recs_alone, ret_alone = _inpaint_split(samples, tmp_path / "alone", tmp_path / "cache_alone",
                                                  cache_generations=False)
    assert alone.n_images == 4 * 6
    assert recs == recs_alone and ret == ret_alone
    log = read_log(split_paths(tmp_path / "inpaint", "toy", "toy", "direct")["log"])
    log_alone = read_log(split_paths(tmp_path / "alone", "toy", "toy", "direct")["log"])
    assert log == log_alone  # raw generations, parsed answers and gates too
    assert not (tmp_path / "cache_alone" / "generations").exists()
    # another budget or mode is another key: nothing reused
    other = ToyAdapter()
    build_benchmark(other, samples, mode="direct", editor=get_editor("inpaint"), out_dir=tmp_path / "budget",
                    model_name="toy", cache_dir=cache, max_new_tokens=8, progress=False)
    assert other.n_images == 4 * 6
    # negatives: answered once, from the cache on the next editor
    neg1 = ToyAdapter()
    build_benchmark(neg1, samples, mode="direct", editor=get_editor("oracle"), out_dir=tmp_path / "neg_oracle",
                    model_name="toy", cache_dir=cache, include_negatives=True, progress=False)
    assert neg1.n_images == 3 * 6 + 2
    neg2 = ToyAdapter()
    build_benchmark(neg2, samples, mode="direct", editor=get_editor("inpaint"), out_dir=tmp_path / "neg_inpaint",
                    model_name="toy", cache_dir=cache, include_negatives=True, progress=False)
    assert neg2.n_images == 3 * 6


def test_generation_cache_ignores_a_truncated_last_line(tmp_path):
    from medfocus.bench import GenerationCache

    samples = make_toy_world(tmp_path / "data", PLAN)
    cache = tmp_path / "cache"
    build_benchmark(ToyAdapter(), samples, mode="direct", editor=get_editor("oracle"), out_dir=tmp_path / "a",
                    model_name="toy", cache_dir=cache, progress=False, samples_per_step=2)
    path = GenerationCache(cache, "toy", "toy", "direct").path
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    # a kill in the middle of writing the entry of sample 5: keep only a prefix of that line
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    gc = GenerationCache(cache, "toy", "toy", "direct")
    assert len(gc) == 5 and gc.get(5, question_stem("nodule") + SUFFIXES["direct"], 16, file_sha256(samples[5].image_path)[1]) is None
    second, recs, ret = _inpaint_split(samples, tmp_path / "b", cache)
    assert second.n_images == 3 * 5 + 4  # sample 5's original is generated again
    _, recs_alone, ret_alone = _inpaint_split(samples, tmp_path / "alone", tmp_path / "cache_alone",
                                              cache_generations=False)
    assert recs == recs_alone and ret == ret_alone
    # the cache was re-terminated before appending: every line parses again and all 6 are known
    gc = GenerationCache(cache, "toy", "toy", "direct")
    assert len(gc) == 6
    assert sum(1 for x in path.read_text().splitlines() if x.strip().endswith("}")) == 6
