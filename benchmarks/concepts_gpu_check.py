"""CUDA check of the MedFocus OT path: the grid solver, batched selection and concept transfer on the
GPU agree with the CPU, and their times. Needs torch with CUDA (no POT).

    PYTHONPATH=src python3 benchmarks/concepts_gpu_check.py [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from medfocus.concepts import uot
from medfocus.concepts import transfer as T
from medfocus.concepts.reference import Reference, ReferencePool
from medfocus.datasets.synthetic import generate_case
from medfocus.types import CONCEPTS


def best(fn, n=5, sync=False):
    out, t_best = None, float("inf")
    for _ in range(n):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = []
    log = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    if not torch.cuda.is_available():
        log("CUDA not available")
        return
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    pool = ReferencePool([Reference(f"r{i}", c.image, c.concept_masks) for i in range(16)
                          for c in [generate_case(10_000 + i, findings=[])]])
    targets = [generate_case(s, lesion_size_rule="nih").image for s in range(4)]
    a, _ = pool[0].measure(56)
    b, _ = uot.image_measure(targets[0], 56)
    t_cpu, s_cpu = best(lambda: uot.uot_grid(a, b, device="cpu"))
    uot.uot_grid(a, b, device="cuda")  # warm-up
    t_gpu, s_gpu = best(lambda: uot.uot_grid(a, b, device="cuda"), sync=True)
    pc, pg = s_cpu.plan()[0].numpy(), s_gpu.plan()[0].cpu().numpy()
    log(f"uot_grid 56x56: cpu {1e3 * t_cpu:.1f} ms ({s_cpu.n_iter} it), cuda {1e3 * t_gpu:.1f} ms ({s_gpu.n_iter} it), "
        f"max rel plan diff {np.abs(pc - pg).max() / pc.max():.2e}")
    for dev in ("cpu", "cuda"):
        pool.selection_costs(targets[0], device=dev)
    t_sc, c_cpu = best(lambda: pool.selection_costs(targets[0], device="cpu"))
    t_sg, c_gpu = best(lambda: pool.selection_costs(targets[0], device="cuda"), sync=True)
    log(f"selection 14x14 x16: cpu {1e3 * t_sc:.1f} ms, cuda {1e3 * t_sg:.1f} ms, argmin {int(np.argmin(c_cpu))}/{int(np.argmin(c_gpu))}, "
        f"max abs cost diff {np.abs(c_cpu - c_gpu).max():.2e}")
    worst = 0.0
    same_ref = 0
    tc, tg = [], []
    for img in targets:
        t0 = time.perf_counter()
        r1 = T.transfer_concepts(img, pool, device="cpu")
        tc.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r2 = T.transfer_concepts(img, pool, device="cuda")
        torch.cuda.synchronize()
        tg.append(time.perf_counter() - t0)
        same_ref += r1.reference_id == r2.reference_id
        worst = max(worst, max(float(np.abs(np.subtract(r1.boxes[c], r2.boxes[c])).max()) for c in CONCEPTS))
    log(f"transfer_concepts x{len(targets)}: same reference {same_ref}/{len(targets)}, max box corner diff {worst:.3f} px, "
        f"median time cpu {1e3 * np.median(tc):.0f} ms, cuda {1e3 * np.median(tg[1:]):.0f} ms")
    # batched throughput: 64 targets vs the pool at 14x14 in one call
    B = np.stack([uot.image_measure(generate_case(100 + i, lesion_size_rule="nih").image, 14)[0] for i in range(64)])
    A = pool.measures(14)
    AA = np.repeat(A, 64, axis=0)
    BB = np.tile(B, (16, 1, 1))
    uot.uot_grid(AA, BB, device="cuda")
    t_big, sol = best(lambda: uot.uot_grid(AA, BB, device="cuda"), n=3, sync=True)
    t_big_cpu, _ = best(lambda: uot.uot_grid(AA, BB, device="cpu"), n=1)
    log(f"1024 problems at 14x14 in one call: cuda {1e3 * t_big:.1f} ms, cpu {1e3 * t_big_cpu:.0f} ms")
    if args.out:
        from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

        atomic_write_text(Path(args.out), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
