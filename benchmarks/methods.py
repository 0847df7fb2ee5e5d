"""Speed of the attribution baselines against the physical floor: the number of model passes.

For each model (the three tiny genuine families and, when shipped, the demo model) and each method
this prints and writes to ``benchmarks/methods.md``:

* seconds per sample (best of ``--repeats`` runs of ``method.attribute``, after one warm-up run; the floor is
  also a best-of, so the ratio compares like with like). Process CPU time is used for the ratio (single
  torch thread), so other processes on a shared machine do not distort it; wall-clock is shown too;
* passes per sample (``n_forward`` model inputs run forward, ``n_backward`` backward passes);
* the floor: ``n_forward x`` the best measured per-input time of a bare teacher-forced pass at the
  method's batch size -- forward-only (``score_chat`` under ``inference_mode``) for methods without
  backward passes, forward-with-graph + backward for gradient methods -- and the ratio to it.

Target (issue 6): every perturbation method within 1.25x of its floor on CPU.
Prompting methods are generation-bound (not pass-bounded) and are not timed here.

Usage: ``python benchmarks/methods.py [--models qwen_vl,gemma3,llava,demo] [--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from medfocus.attribution import get_method
from medfocus.attribution._common import forward_logprobs, score

OUT = Path(__file__).with_suffix(".md")
Q = "Is there evidence of cardiomegaly in the image? Answer directly with yes or no without any explanation."
#: method -> (batch size its passes run at, has backward)
METHODS: dict[str, tuple[int, bool]] = {
    "attention_head": (1, False), "attention_rollout": (1, False), "lrp": (1, False), "grad_weighted_attention": (1, True),
    "gradcam": (1, True), "gradcampp": (1, True), "integrated_gradients": (8, True), "occlusion": (16, False), "rise": (16, False),
}
PERTURBATION = ("occlusion", "rise")


def load_models(names: list[str]) -> dict[str, object]:
    from medfocus.lvlm.loading import load_lvlm

    out: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp(prefix="medfocus_bench_"))
    for name in names:
        if name == "demo":
            from medfocus.lvlm.registry import DEMO_DIR

            if not (DEMO_DIR / "config.json").is_file():
                print(f"[skip] demo model not shipped at {DEMO_DIR}", file=sys.stderr)
                continue
            out["demo"] = load_lvlm("demo", device="cpu")
        else:
            from medfocus.lvlm.tiny import build_tiny

            out[f"tiny_{name}"] = load_lvlm(str(build_tiny(name, tmp / name, seed=0)), device="cpu", dtype=torch.float32)
    return out


def sample_image() -> np.ndarray:
    try:
        from medfocus.datasets.synthetic import generate_case

        return generate_case(seed=0, size=256, findings=["cardiomegaly"]).image
    except Exception:  # the synthetic world is optional here
        return np.random.default_rng(0).integers(0, 255, size=(256, 256)).astype(np.uint8)


def per_input_time(adapter, chat, batch: int, backward: bool, repeats: int) -> float:
    """Best seconds per input of a bare teacher-forced pass over ``batch`` identical inputs."""
    pv = chat.inputs["pixel_values"][None].expand(batch, *chat.inputs["pixel_values"].shape).contiguous()
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.process_time()
        if backward:
            with torch.enable_grad():
                inputs = adapter.batch_inputs(chat, pv)
                logp, _ = forward_logprobs(adapter, chat, inputs)
                # backward to the first decoder layer's input, as the gradient methods need
                logp.sum().backward()
            adapter.model.zero_grad(set_to_none=True)
        else:
            score(adapter, chat, pv, batch_size=batch)
        best = min(best, time.process_time() - t0)
    return best / batch


def run(models: list[str], repeats: int, threads: int) -> str:
    torch.set_num_threads(threads)
    img = sample_image()
    adapters = load_models(models)
    rows = []
    for mname, adapter in adapters.items():
        answer = "Yes"
        chat = adapter.prepare(img, Q, answer)
        floors: dict[tuple[int, bool], float] = {}
        for meth, (bs, bwd) in METHODS.items():
            if (bs, bwd) not in floors:
                floors[(bs, bwd)] = per_input_time(adapter, chat, bs, bwd, repeats)
            m = get_method(meth)
            m.attribute(adapter, img, Q, answer)  # warm-up
            times, walls, res = [], [], None
            for _ in range(repeats):
                t0 = time.process_time()
                res = m.attribute(adapter, img, Q, answer)
                times.append(time.process_time() - t0)
                walls.append(res.seconds)
            sec = min(times)  # best-of CPU seconds, like the floor
            wall = min(walls)
            floor = res.n_forward * floors[(bs, bwd)]
            rows.append((mname, meth, sec, wall, res.n_forward, res.n_backward, bs, floor, sec / floor))
            print(f"{mname:14s} {meth:25s} {sec*1e3:9.1f} ms cpu {wall*1e3:9.1f} ms wall  fwd={res.n_forward:3d} bwd={res.n_backward:3d} batch={bs:2d} "
                  f"floor={floor*1e3:8.1f} ms  ratio={sec/floor:5.2f}", flush=True)
    lines = [
        "# Attribution methods: seconds per sample vs. the pass floor",
        "",
        f"Generated by `python benchmarks/methods.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, {threads} thread(s), float32, "
        f"one 256x256 synthetic image, answer \"Yes\" (direct mode), best of {repeats} runs after a warm-up.",
        "",
        "Floor = passes x best measured per-input time of a bare teacher-forced pass at the same batch size "
        "(forward-only for methods without backward; forward with graph + backward for gradient methods). "
        "Target: perturbation methods (occlusion, rise) <= 1.25x floor on CPU.",
        "",
        "Times are process CPU seconds with torch single-threaded (the benchmark machine's 2 cores are shared, so "
        "wall-clock is shown for reference but the ratio uses CPU time for both the method and its floor).",
        "",
        "| model | method | CPU s / sample | wall s / sample | forward passes | backward passes | batch | floor (CPU s) | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mname, meth, sec, wall, nf, nb, bs, floor, ratio in rows:
        mark = " (target <= 1.25)" if meth in PERTURBATION else ""
        lines.append(f"| {mname} | {meth} | {sec:.4f} | {wall:.4f} | {nf} | {nb} | {bs} | {floor:.4f} | {ratio:.2f}{mark} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen_vl,gemma3,llava,demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    md = run([m.strip() for m in a.models.split(",") if m.strip()], a.repeats, a.threads)
    a.out.write_text(md)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
