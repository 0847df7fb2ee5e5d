"""The method suite at its pass floor: every method alone vs. all of them on one prepared sample.

For the demo model and each tiny genuine family (qwen_vl, gemma3, llava), on one synthetic 256x256 image
with the direct answer "Yes" (and, for the demo model, also a step-by-step answer), this measures

* per method: process CPU seconds of ``method.attribute`` run alone (best of ``--repeats`` after a warm-up);
  its **floor** = the passes it needs x the best measured time of one such pass at the same batch size
  (the forward pass with exactly its needs -- eager attentions, backward(s) -- for the attention and
  gradient methods; ``n`` rows x the per-row time of a bare teacher-forced forward at its batch size for
  occlusion, RISE and MedFocus; ``steps`` rows x the per-row forward+backward-to-pixels time at batch 8 for
  integrated gradients); and the ratio (target <= 1.25). The prompting methods generate text: they have no
  pass floor and are shown with their time only;
* per sample: the suite (:func:`medfocus.attribution.suite.attribute_many`, everything prepared once and
  the passes shared), the sum of the methods run alone one after another (what the runner did before),
  the sum of the floors, and the floor of the passes the suite actually runs (one merged forward(+backward),
  the perturbation rows in full batches, IG's own passes, MedFocus' nested checks, plus the prompting
  methods' measured time). Targets: suite <= 1.1x its passes, and >= 2x faster than the sequential sum.

Times are process CPU seconds with one torch thread (the machine is shared; CPU time is what other
processes distort least), and the 1/5/15-minute load averages are recorded before and after.

Usage::

    .venv/bin/python benchmarks/suite.py                      # quick: best of 1, direct answers (~30 s CPU)
    .venv/bin/python benchmarks/suite.py --repeats 3 --cot    # the full table (~90 s CPU; + the demo's step-by-step answer)

Both write ``benchmarks/suite.md`` (``--out`` elsewhere). Wall time = CPU time on an idle machine; at a load
average of ~14 on 2 cores the full table took 9.5 minutes wall for 66 s of CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from medfocus.attribution import get_method, list_methods
from medfocus.attribution._common import forward_logprobs, prepare_sample, score
from medfocus.attribution.passes import chunk_count, merge_needs, run_forward_pass
from medfocus.attribution.suite import attribute_many

OUT = Path(__file__).with_suffix(".md")
Q_DIRECT = "Is there evidence of cardiomegaly in the image? Answer directly with yes or no without any explanation."
Q_COT = "Is there evidence of cardiomegaly in the image? Think step by step and answer with yes or no."
COT_ANSWER = "The cardiac silhouette is enlarged. Therefore, yes."


def load_models(names: list[str], tmp: Path) -> dict[str, object]:
    from medfocus.lvlm.loading import load_lvlm

    out: dict[str, object] = {}
    for name in names:
        if name == "demo":
            out["demo"] = load_lvlm("demo", device="cpu")
        else:
            from medfocus.lvlm.tiny import build_tiny

            out[f"tiny_{name}"] = load_lvlm(str(build_tiny(name, tmp / name, seed=0)), device="cpu", dtype=torch.float32)
    return out


def method_params(pool_dir: str, cache_dir: str) -> dict[str, dict]:
    """Every registered method at the paper's defaults; MedFocus and prompting_medsam with the demo's
    offline settings (anatomy-grounded detector, demo segmenter) and a small reference pool."""
    params: dict[str, dict] = {m: {} for m in list_methods()}
    if "medfocus" in params:
        params["medfocus"] = {"pool": pool_dir, "cache": cache_dir, "refine": "medsam", "medsam": "demo", "region": "mask", "rule": "nested"}
    if "prompting_medsam" in params:
        params["prompting_medsam"] = {"detector": "anatomy", "medsam": "demo", "pool": pool_dir, "cache": cache_dir}
    return params


def cpu_best(fn, repeats: int) -> tuple[float, object]:
    """Best process-CPU seconds of ``fn()`` over ``repeats`` runs after one warm-up; returns ``(seconds, last result)``."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def per_row_forward(adapter, chat, batch: int, repeats: int) -> float:
    """Best CPU seconds per row of a bare teacher-forced forward over ``batch`` identical rows."""
    pv = chat.inputs["pixel_values"][None].expand(batch, *chat.inputs["pixel_values"].shape).contiguous()
    return cpu_best(lambda: score(adapter, chat, pv, batch_size=batch), repeats)[0] / batch


def per_row_pixel_backward(adapter, chat, batch: int, final: bool, repeats: int) -> float:
    """Best CPU seconds per row of forward + backward(s) down to the pixels (integrated gradients' pass)."""
    from medfocus.attribution._common import final_token_index

    pv = chat.inputs["pixel_values"][None].expand(batch, *chat.inputs["pixel_values"].shape).contiguous()
    k = final_token_index(chat)

    def run() -> None:
        with torch.enable_grad():
            imgs = adapter.pixel_values_to_images(pv, chat).detach().requires_grad_(True)
            logp, _ = forward_logprobs(adapter, chat, adapter.batch_inputs(chat, adapter.images_to_pixel_values(imgs, chat)))
            torch.autograd.grad(logp.sum(), imgs, retain_graph=final)
            if final:
                torch.autograd.grad(logp[:, k].sum(), imgs)

    return cpu_best(run, repeats)[0] / batch


def bench_sample(mname: str, adapter, image: np.ndarray, question: str, answer: str, params: dict[str, dict], repeats: int) -> dict:
    methods = {m: get_method(m, **p) for m, p in params.items()}
    prep = prepare_sample(adapter, image, question, answer)
    chat = prep.chat
    T = chat.n_answer_tokens
    fwd_row: dict[int, float] = {}

    def fwd(bs: int) -> float:
        if bs not in fwd_row:
            fwd_row[bs] = per_row_forward(adapter, chat, bs, repeats)
        return fwd_row[bs]

    rows = []
    alone: dict[str, object] = {}
    for name, m in methods.items():
        sec, res = cpu_best(lambda m=m: m.attribute(adapter, image, question, answer), repeats)
        alone[name] = res
        kind = getattr(m, "shared_pass", None)
        if kind == "forward":
            floor = cpu_best(lambda m=m: run_forward_pass(adapter, chat, m._forward_needs(adapter)), repeats)[0]
            basis = "its forward pass"
        elif kind == "perturbation":
            bs = int(m.params["batch_size"])
            floor = res.n_forward * fwd(bs)
            basis = f"{res.n_forward} rows x fwd/row @ {bs}"
        elif name == "integrated_gradients":
            bs = int(m.params["batch_size"])
            final = bool(m.params["final_token"]) and T > 1
            floor = int(m.params["steps"]) * per_row_pixel_backward(adapter, chat, bs, final, repeats)
            basis = f"{m.params['steps']} rows x fwd+bwd(pixels)/row @ {bs}"
        else:
            floor, basis = None, "generation (no pass floor)"
        rows.append({"method": name, "alone": sec, "floor": floor, "basis": basis, "n_forward": res.n_forward, "n_backward": res.n_backward})
        print(f"{mname:13s} {name:24s} alone {sec:8.4f} s  floor {floor if floor is None else round(floor, 4)!s:>8}  "
              f"fwd={res.n_forward} bwd={res.n_backward}", flush=True)

    load_suite = os.getloadavg()
    suite_s, suite_res = cpu_best(lambda: attribute_many(adapter, image, question, answer, methods), repeats)
    # the passes the suite actually runs
    fwd_methods = [m for m in methods.values() if getattr(m, "shared_pass", None) == "forward"]
    needed = 0.0
    parts = []
    if fwd_methods:
        needs = merge_needs(adapter, [m._forward_needs(adapter) for m in fwd_methods])
        t = cpu_best(lambda: run_forward_pass(adapter, chat, needs), repeats)[0]
        needed += t
        parts.append(f"merged forward {t:.4f}")
    pert = [n for n, m in methods.items() if getattr(m, "shared_pass", None) == "perturbation"]
    if pert:
        extra_rows = suite_res["medfocus"].n_forward - 16 if "medfocus" in suite_res else 0  # MedFocus' nested checks
        t = t_extra = 0.0
        nb = 0
        for n in pert:  # each plan's rows in its own near-equal full batches
            bs = int(methods[n].params["batch_size"])
            rows_n = suite_res[n].n_forward - (extra_rows if n == "medfocus" else 0)
            nb += chunk_count(rows_n, bs)
            t += rows_n * fwd(bs)
            if n == "medfocus":
                t_extra = extra_rows * fwd(bs)
        n_rows = sum(suite_res[n].n_forward for n in pert) - extra_rows
        needed += t + t_extra
        parts.append(f"perturbation rows {n_rows} in {nb} full batches {t:.4f}" + (f" + nested {extra_rows} rows {t_extra:.4f}" if extra_rows else ""))
    for r in rows:
        m = methods[r["method"]]
        if getattr(m, "shared_pass", None) is None:
            t = r["floor"] if r["floor"] is not None else r["alone"]
            needed += t
            parts.append(f"{r['method']} {t:.4f}")
    # maps equal to alone (the suite's contract; tested in tests/test_attribution_suite.py)
    maxdiff = 0.0
    for n, a in alone.items():
        s = suite_res[n]
        if a.heatmap is not None:
            scale = max(1e-12, float(np.abs(a.heatmap).max()))
            maxdiff = max(maxdiff, float(np.abs(a.heatmap - s.heatmap).max()) / scale)
    seq = sum(r["alone"] for r in rows)
    floors = sum(r["floor"] if r["floor"] is not None else r["alone"] for r in rows)
    print(f"{mname:13s} SUITE {suite_s:.4f} s  sequential {seq:.4f} s  speed-up {seq / suite_s:.2f}x  needed passes {needed:.4f} s "
          f"ratio {suite_s / needed:.2f}  max rel map diff {maxdiff:.2e}", flush=True)
    return {"model": mname, "answer": answer, "T": T, "rows": rows, "suite": suite_s, "sequential": seq, "floors": floors,
            "needed": needed, "needed_parts": parts, "maxdiff": maxdiff, "load_suite": load_suite}


def render(results: list[dict], repeats: int, threads: int, load0: tuple, load1: tuple, wall: float, args: str) -> str:
    L = [
        "# The method suite at its forward-pass floor",
        "",
        f"Generated by `python benchmarks/suite.py{' ' + args if args else ''}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, {threads} torch thread(s), float32; one 256x256 synthetic image; best of {repeats} runs after "
        f"a warm-up; {wall:.0f} s wall for the whole script.",
        "",
        f"**Machine load** (1/5/15-min load averages): {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the start, "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at the end, on {os.cpu_count()} cores. Times are process CPU seconds "
        "(one thread), which other processes distort least; above ~1 load per core the caches and memory bandwidth are shared, "
        "so absolute times are upper bounds and ratios are what to read.",
        "",
        "Floor of a method = the passes it needs x the best measured time of one such pass at the same batch size: for the "
        "attention and gradient methods their own forward pass as it runs (eager attentions with autograd recording, so that "
        "a method gives the same numbers alone and in a suite; backward to the LM input / the attention weights; the "
        "final-token backward of a multi-token answer); for occlusion, RISE and MedFocus their rows x the per-row "
        "time of a bare teacher-forced forward at their batch size; for integrated gradients its steps x the per-row "
        "forward + backward to the pixels at batch 8. Prompting methods generate text: no pass floor (their time is used in "
        "the sums). MedFocus runs with the demo settings (mask regions, nested rule, demo segmenter; transfers cached after the "
        "warm-up, as in a run over many samples of one reference pool).",
        "",
        "Targets (issue 14): every method <= 1.25x its floor; the suite <= 1.1x the passes it needs; the suite >= 2x faster "
        "than the methods one after another.",
        "",
    ]
    over = sorted({f"{r['model']}/{row['method']}" for r in results for row in r["rows"]
                   if row["floor"] is not None and row["alone"] / row["floor"] > 1.25})
    L += ["## Summary", "",
          "| model, answer | suite / needed passes | speed-up over one after another | upper bound of that speed-up (sequential / needed passes) |",
          "|---|---:|---:|---:|"]
    for r in results:
        L.append(f"| {r['model']}, {r['T']}-token answer | {r['suite'] / r['needed']:.2f} | {r['sequential'] / r['suite']:.2f}x | "
                 f"{r['sequential'] / r['needed']:.2f}x |")
    L += ["", "Methods above 1.25x their floor when run alone: " + (", ".join(over) if over else "none") + ".", "",
          "The suite can only save what methods have in common: the preparation (one processor call instead of one per "
          "method) and the forward on the unperturbed image (one instead of six). Integrated gradients' steps and the "
          "occlusion, RISE and MedFocus rows are all different images, so they are passes the suite needs too; the last "
          "column is the most any sharing of passes can give on this sample.", ""]
    for r in results:
        L += [f"## {r['model']}, answer {r['answer']!r} ({r['T']} scored tokens)", "",
              "| method | alone (CPU s) | passes (fwd / bwd) | floor (CPU s) | floor basis | ratio |", "|---|---:|---:|---:|---|---:|"]
        for row in r["rows"]:
            fl = "n/a" if row["floor"] is None else f"{row['floor']:.4f}"
            ratio = "n/a" if row["floor"] is None else f"{row['alone'] / row['floor']:.2f}"
            L.append(f"| {row['method']} | {row['alone']:.4f} | {row['n_forward']} / {row['n_backward']} | {fl} | {row['basis']} | {ratio} |")
        ls = r["load_suite"]
        L += ["", "| per sample | CPU s |", "|---|---:|",
              f"| methods one after another (sum alone) | {r['sequential']:.4f} |",
              f"| sum of their floors | {r['floors']:.4f} |",
              f"| suite (`attribute_many`) | {r['suite']:.4f} |",
              f"| passes the suite needs | {r['needed']:.4f} |",
              f"| **suite / needed passes** (target <= 1.1) | **{r['suite'] / r['needed']:.2f}** |",
              f"| **speed-up over one after another** (target >= 2) | **{r['sequential'] / r['suite']:.2f}x** |",
              "",
              f"Needed passes: {'; '.join(r['needed_parts'])}. Largest map difference suite vs. alone (relative to the map's max): "
              f"{r['maxdiff']:.1e}. Load average when the suite was timed: {ls[0]:.2f}.", ""]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,qwen_vl,gemma3,llava")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per measurement, after one warm-up (best of)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cot", action="store_true", help="also the demo model's step-by-step answer")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    torch.set_num_threads(a.threads)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="medfocus_suite_"))
    from medfocus.concepts.reference import default_pool
    from medfocus.datasets.synthetic import generate_case

    pool = default_pool(tmp / "pool", n=8)
    params = method_params(str(pool.root), str(tmp / "cache"))
    image = generate_case(seed=0, size=256, findings=["cardiomegaly"]).image
    results = []
    for mname, adapter in load_models(models, tmp).items():
        results.append(bench_sample(mname, adapter, image, Q_DIRECT, "Yes", params, a.repeats))
        if mname == "demo" and a.cot:
            results.append(bench_sample(mname, adapter, image, Q_COT, COT_ANSWER, params, a.repeats))
    md = render(results, a.repeats, a.threads, load0, os.getloadavg(), time.perf_counter() - t_start, " ".join(sys.argv[1:]))
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(a.out, md)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
