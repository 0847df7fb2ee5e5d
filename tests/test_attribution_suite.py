"""``attribute_many``: one prepared sample, shared passes, and maps identical to each method run alone."""

from __future__ import annotations

import numpy as np
import pytest

from medfocus.attribution import get_method
from medfocus.attribution._common import prepare_sample
from medfocus.attribution.base import BASELINES, Method
from medfocus.attribution.suite import attribute_many
from medfocus.errors import ConfigError

Q_DIRECT = "Is there evidence of cardiomegaly in the image? Answer directly with yes or no without any explanation."
Q_COT = "Is there evidence of cardiomegaly in the image? Think step by step and answer with yes or no."
COT_ANSWER = "The cardiac silhouette is enlarged. Therefore, yes."
FAST = {"integrated_gradients": {"steps": 4, "batch_size": 4}, "occlusion": {"grid": 4, "batch_size": 8},
        "rise": {"n_masks": 12, "batch_size": 8}, "prompting": {"max_new_tokens": 8},
        "prompting_medsam": {"detector": "anatomy", "max_new_tokens": 16}}
# lrp (AttnLRP) is not here: it needs its own rule-wrapped forward + backward and runs alone.
FORWARD = ("attention_head", "attention_rollout", "lrp_paper", "attention_flow_residual", "grad_weighted_attention", "gradcam", "gradcampp")
PERTURBATION = ("occlusion", "rise", "medfocus")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from medfocus.concepts.reference import default_pool

    return default_pool(tmp_path_factory.mktemp("suite_pool"), n=4)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from medfocus.datasets.synthetic import generate_case

    return generate_case(seed=3, size=96, findings=["cardiomegaly"]).image


def _methods(pool, medfocus_rule: str = "argmax") -> dict[str, Method]:
    params = {n: dict(FAST.get(n, {})) for n in BASELINES}
    params["medfocus"] = {"pool": str(pool.root), "cache": False, "batch_size": 8, "rule": medfocus_rule, "region": "mask"}
    params["prompting_medsam"].update(pool=str(pool.root), cache=False)
    return {n: get_method(n, **p) for n, p in params.items()}


def _close(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    # bit for bit: a method's numbers must not depend on which methods shared its passes (resumed runs)
    assert np.array_equal(a, b), f"{what}: max diff {np.abs(a.astype(np.float64) - b).max():.3g}"


def _check_equal_to_alone(adapter, image, question, answer, methods) -> dict:
    alone = {n: m.attribute(adapter, image, question, answer) for n, m in methods.items()}
    suite = attribute_many(adapter, image, question, answer, methods)
    assert list(suite) == list(methods)
    for n in methods:
        a, s = alone[n], suite[n]
        _close(a.heatmap, s.heatmap, f"{n} heatmap")
        _close(a.token_heatmaps, s.token_heatmaps, f"{n} token_heatmaps")
        _close(a.extras.get("final_token_heatmap"), s.extras.get("final_token_heatmap"), f"{n} final_token_heatmap")
        assert (a.boxes is None) == (s.boxes is None), n
        if a.boxes is not None:
            np.testing.assert_allclose(np.asarray(a.boxes, float).reshape(-1, 4), np.asarray(s.boxes, float).reshape(-1, 4), err_msg=n)
        assert (s.n_forward, s.n_backward) == (a.n_forward, a.n_backward), n
        assert s.seconds > 0, n
        if n in FORWARD:
            note = s.extras["shared_pass"]
            assert note["kind"] == "forward" and set(note["methods"]) == set(FORWARD) and note["n_forward"] == 1, n
        elif n in PERTURBATION:
            note = s.extras["shared_pass"]
            assert note["kind"] == "perturbation" and set(note["methods"]) == set(PERTURBATION), n
            # the queue ran every row of the three plans (MedFocus' nested checks run after it, on their own)
            assert note["n_forward"] == suite["occlusion"].n_forward + suite["rise"].n_forward + 16, n
        else:
            assert "shared_pass" not in s.extras, n
    return suite


@pytest.mark.parametrize("family", ["qwen_vl", "gemma3", "llava"])
def test_suite_maps_equal_single_method_maps_on_tiny_families(tiny_adapters, family, image, pool):
    adapter = tiny_adapters[family]
    _check_equal_to_alone(adapter, image, Q_DIRECT, "Yes", _methods(pool))
    _check_equal_to_alone(adapter, image, Q_COT, COT_ANSWER, _methods(pool))


def test_suite_maps_equal_single_method_maps_on_demo_model(demo_adapter, image, pool):
    _check_equal_to_alone(demo_adapter, image, Q_DIRECT, "Yes", _methods(pool, medfocus_rule="nested"))
    _check_equal_to_alone(demo_adapter, image, Q_COT, COT_ANSWER, _methods(pool, medfocus_rule="nested"))


def _count_calls(adapter):
    calls = []
    h = adapter.decoder_layers[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls, h.remove


def test_suite_runs_one_forward_for_six_methods_and_one_queue(tiny_adapters, image, pool):
    adapter = tiny_adapters["gemma3"]  # "Yes" is two tokens: the final-token backward is shared too
    ms = _methods(pool)
    calls, remove = _count_calls(adapter)
    try:
        attribute_many(adapter, image, Q_DIRECT, "Yes", {n: ms[n] for n in FORWARD})
        assert len(calls) == 1
        calls.clear()
        for n in FORWARD:
            ms[n].attribute(adapter, image, Q_DIRECT, "Yes")
        assert len(calls) == len(FORWARD)
        calls.clear()
        res = attribute_many(adapter, image, Q_DIRECT, "Yes", {n: ms[n] for n in ("occlusion", "rise")})
        rows = res["occlusion"].n_forward + res["rise"].n_forward  # 17 -> 8+9 and 12 -> 6+6 at batch 8, each full
        assert rows == 29 and len(calls) == 4
        calls.clear()
        ms["occlusion"].attribute(adapter, image, Q_DIRECT, "Yes")
        ms["rise"].attribute(adapter, image, Q_DIRECT, "Yes")
        assert len(calls) == 2 + 2  # 17 -> 8+9, 12 -> 6+6
    finally:
        remove()


def test_incompatible_needs_get_their_own_pass_and_stay_equal(tiny_adapters, image):
    adapter = tiny_adapters["qwen_vl"]
    ms = {"grad_weighted_attention": get_method("grad_weighted_attention"), "gradcam": get_method("gradcam", layer="middle"),
          "attention_head": get_method("attention_head")}
    calls, remove = _count_calls(adapter)
    try:
        suite = attribute_many(adapter, image, Q_DIRECT, "Yes", ms)
    finally:
        remove()
    assert len(calls) == 2  # a middle-layer leaf would cut the attention graph: Grad-CAM gets its own forward
    assert "shared_pass" not in suite["gradcam"].extras
    assert set(suite["attention_head"].extras["shared_pass"]["methods"]) == {"grad_weighted_attention", "attention_head"}
    _close(ms["gradcam"].attribute(adapter, image, Q_DIRECT, "Yes").heatmap, suite["gradcam"].heatmap, "gradcam middle")


def test_prepared_sample_is_reused_and_checked(tiny_adapters, image):
    adapter = tiny_adapters["llava"]
    prep = prepare_sample(adapter, image, Q_DIRECT, "Yes")
    calls = []
    orig = adapter.prepare
    adapter.prepare = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        res = get_method("attention_rollout").attribute(adapter, image, Q_DIRECT, "Yes", prepared=prep)
        out = attribute_many(adapter, image, Q_DIRECT, "Yes", [get_method("gradcam"), get_method("occlusion", grid=2)], prepared=prep)
        assert calls == []
        attribute_many(adapter, image, Q_DIRECT, "Yes", [get_method("gradcam"), get_method("occlusion", grid=2)])
        assert calls == [1]  # prepared once for both methods
    finally:
        adapter.prepare = orig
    assert res.heatmap.shape == image.shape and set(out) == {"gradcam", "occlusion"}
    with pytest.raises(ConfigError, match="prepared sample is for another"):
        get_method("attention_head").attribute(adapter, image, Q_DIRECT, "No", prepared=prep)
    with pytest.raises(ConfigError, match="prepared sample is for another"):
        attribute_many(adapter, image[::-1].copy(), Q_DIRECT, "Yes", [get_method("gradcam")], prepared=prep)


def test_errors_returned_per_method_and_unknown_methods_run_alone(tiny_adapters, image):
    adapter = tiny_adapters["qwen_vl"]

    class Plain:  # not a Method: no shared pass, no prepared sample
        name = "plain"

        def attribute(self, adapter, image, question, answer):
            return get_method("attention_head").attribute(adapter, image, question, answer)

    # a layer index the model does not have is only known once the model is: an error at attribution time
    out = attribute_many(adapter, image, Q_DIRECT, "Yes", {"plain": Plain(), "head": get_method("attention_head"),
                                                           "bad": get_method("attention_head", layer=99)}, errors="return")
    assert isinstance(out["bad"], ConfigError) and "out of range" in str(out["bad"])
    _close(out["plain"].heatmap, out["head"].heatmap, "plain vs head")
    with pytest.raises(ConfigError, match="out of range"):
        attribute_many(adapter, image, Q_DIRECT, "Yes", [get_method("attention_head", layer=99)])


def test_runner_uses_the_suite_and_records_match_alone(tiny_adapters, image, tmp_path):
    from medfocus.runner.grid import WorkItem, run_grid
    from medfocus.runner.store import ResultStore, read_jsonl
    from medfocus.types import Sample

    adapter = tiny_adapters["qwen_vl"]
    np.save(tmp_path / "img.npy", image)
    sample = Sample(dataset="synthetic", index=0, image_path=str(tmp_path / "img.npy"), attribute="cardiomegaly",
                    question="Is there evidence of cardiomegaly in the image?", answer="Yes", boxes=[(10.0, 10.0, 50.0, 50.0)],
                    image_size=(image.shape[1], image.shape[0]))
    methods = {"attention_head": {}, "gradcam": {}, "occlusion": {"grid": 2}, "rise": {"n_masks": 6}, "integrated_gradients": {"steps": 2}}
    calls = []
    orig = adapter.prepare
    adapter.prepare = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        with ResultStore(tmp_path / "pred.jsonl") as st:
            summ = run_grid([WorkItem("tiny", "synthetic", "direct", sample, answer_source="ground_truth")], methods, st, load_model=lambda _n: adapter,
                            read_image=np.load, progress=False, release_model=False)
    finally:
        adapter.prepare = orig
    assert summ.done == len(methods) and summ.errors == 0
    assert calls == [1]  # one preparation for the five methods of the sample
    recs = {r["method"]: r for r in read_jsonl(tmp_path / "pred.jsonl")[0]}
    assert recs["attention_head"]["shared_pass"]["methods"] == ["attention_head", "gradcam"]
    assert recs["rise"]["shared_pass"] == {"kind": "perturbation", "methods": ["occlusion", "rise"], "n_forward": 11, "n_backward": 0}
    assert recs["integrated_gradients"]["shared_pass"] is None and "shared_pass" not in recs["rise"]["extras"]
    q = sample.question_for("direct")
    for m, p in methods.items():
        alone = get_method(m, **p).attribute(adapter, image, q, "Yes")
        stored = np.load(tmp_path / recs[m]["heatmap_path"])["heatmap"]
        _close(alone.heatmap, stored, m)
        assert (recs[m]["n_forward"], recs[m]["n_backward"]) == (alone.n_forward, alone.n_backward), m
