"""UOT speed and agreement: our log-domain grid solver vs POT vs straightforward numpy Sinkhorn loops.

Problem: a synthetic target film vs a normal reference from the default pool (letterboxed to 224,
56 x 56 transfer grid, support = cells above the intensity threshold, cost = squared distance /
its 90th percentile), epsilon = 0.05, lambda = 0.1 both sides, reg_type = "kl", <= 500
iterations. Every solver runs to the same stopping rule (sup-norm change of the log-scalings
< 1e-6; POT uses its own rule with stopThr=1e-9) and the plans are compared with the POT plan.
Also times reference *selection* at 14 x 14: one batched call over the 16-image pool vs 16 POT calls.

    .venv/bin/python benchmarks/uot.py [--repeats 5] [--device cpu]

Writes ``benchmarks/uot.md``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp

from medfocus.concepts import uot
from medfocus.concepts.reference import default_pool
from medfocus.datasets.synthetic import generate_case

EPS, LAM, TOL, MAXIT = uot.EPSILON, uot.LAMBDA, uot.TOL, uot.MAX_ITER


def numpy_scaling(a, b, C):
    """Straightforward generalised Sinkhorn (scaling form, dense K) -- the textbook loop."""
    fi = LAM / (LAM + EPS)
    K = np.exp(-C / EPS) * a[:, None] * b[None, :]
    u, v = np.ones_like(a), np.ones_like(b)
    for _ in range(MAXIT):
        lu, lv = np.log(u), np.log(v)
        u = (a / (K @ v)) ** fi
        v = (b / (K.T @ u)) ** fi
        if max(np.abs(np.log(u) - lu).max(), np.abs(np.log(v) - lv).max()) < TOL:
            break
    return u[:, None] * K * v[None, :]


def numpy_log(a, b, C):
    """Straightforward log-domain generalised Sinkhorn (dense log-kernel, scipy logsumexp)."""
    fi = LAM / (LAM + EPS)
    la, lb = np.log(a), np.log(b)
    LK = -C / EPS + la[:, None] + lb[None, :]
    f, g = np.zeros_like(a), np.zeros_like(b)
    for _ in range(MAXIT):
        f0, g0 = f, g
        f = fi * (la - logsumexp(LK + g[None, :], axis=1))
        g = fi * (lb - logsumexp(LK + f[:, None], axis=0))
        if max(np.abs(f - f0).max(), np.abs(g - g0).max()) < TOL:
            break
    return np.exp(f[:, None] + LK + g[None, :])


def timeit(fn, repeats):
    out, best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import ot as pot

    pool = default_pool(Path(tempfile.mkdtemp()), n=16)
    rows = []
    for seed in (0, 1):
        target = generate_case(seed, lesion_size_rule="nih").image
        ref = pool[seed]
        a2, _ = ref.measure(56)
        b2, _ = uot.image_measure(target, 56)
        sa, sb = a2.ravel() > 0, b2.ravel() > 0
        scale = float(uot.grid_cost_scale(a2 > 0, b2 > 0))
        C = uot.grid_sqdist(56, 56)[np.ix_(sa, sb)] / scale
        a, b = a2.ravel()[sa], b2.ravel()[sb]

        t_ours, sol = timeit(lambda: uot.uot_grid(a2, b2, device=args.device), args.repeats)
        P_ours = sol.plan()[0].cpu().numpy()[np.ix_(sa, sb)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_pot, P_pot = timeit(lambda: pot.unbalanced.sinkhorn_unbalanced(a, b, C, EPS, LAM, reg_type="kl", numItermax=MAXIT,
                                                                              stopThr=1e-9), args.repeats)
        t_dense, dres = timeit(lambda: uot.sinkhorn_unbalanced_log(a, b, C, device=args.device), max(1, args.repeats // 2))
        t_np, P_np = timeit(lambda: numpy_scaling(a, b, C), max(1, args.repeats // 2))
        t_nplog, P_nplog = timeit(lambda: numpy_log(a, b, C), 1)
        ref_p = P_pot
        rel = lambda P: float(np.abs(P - ref_p).max() / ref_p.max())  # noqa: E731
        rows.append({"case": f"synthetic #{seed} vs {ref.id}", "n": f"{sa.sum()} x {sb.sum()}", "iters": sol.n_iter,
                     "ours": t_ours, "dense_torch": t_dense, "pot": t_pot, "np": t_np, "nplog": t_nplog,
                     "rel": {"ours": rel(P_ours), "dense_torch": rel(dres.plan.cpu().numpy()), "np": rel(P_np), "nplog": rel(P_nplog)}})

    # selection at 14x14: the pool in one batched call vs a loop of POT calls (debiased costs need 2 solves each)
    target = generate_case(0, lesion_size_rule="nih").image
    t_sel, costs = timeit(lambda: pool.selection_costs(target, device=args.device), args.repeats)
    b14, _ = uot.image_measure(target, 14)

    def pot_loop():
        out = []
        for r in pool.references:
            a14, _ = r.measure(14)
            sa_, sb_ = a14.ravel() > 0, b14.ravel() > 0
            s = float(uot.grid_cost_scale(a14 > 0, b14 > 0))
            Cab = uot.grid_sqdist(14, 14)[np.ix_(sa_, sb_)] / s
            Caa = uot.grid_sqdist(14, 14)[np.ix_(sa_, sa_)] / s
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(pot.unbalanced.sinkhorn_unbalanced(a14.ravel()[sa_], b14.ravel()[sb_], Cab, EPS, LAM, reg_type="kl",
                                                              numItermax=MAXIT, stopThr=1e-9))
                out.append(pot.unbalanced.sinkhorn_unbalanced(a14.ravel()[sa_], a14.ravel()[sa_], Caa, EPS, LAM, reg_type="kl",
                                                              numItermax=MAXIT, stopThr=1e-9))
        return out

    t_sel_pot, _ = timeit(pot_loop, args.repeats)

    dev = args.device if args.device != "cpu" else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread)"
    lines = [
        "# UOT solver benchmark (`benchmarks/uot.py`)", "",
        f"Device: {dev}; torch {torch.__version__}, POT {pot.__version__}; best of {args.repeats} runs; float64. "
        f"epsilon={EPS}, lambda={LAM} (both sides), reg_type=\"kl\", <= {MAXIT} iterations, tol {TOL}.", "",
        "## Transfer problem, 56 x 56 grid (one reference -> one target)", "",
        "| case | support (src x tgt) | iters | ours: grid log-domain (ms) | ours: dense log-domain torch (ms) | POT sinkhorn_unbalanced (ms) | numpy scaling loop (ms) | numpy log-domain loop (ms) | speed-up vs numpy scaling | max rel. plan diff vs POT (ours / dense / numpy / numpy-log) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['n']} | {r['iters']} | {1e3 * r['ours']:.1f} | {1e3 * r['dense_torch']:.0f} | {1e3 * r['pot']:.0f} | "
                     f"{1e3 * r['np']:.0f} | {1e3 * r['nplog']:.0f} | {r['np'] / r['ours']:.1f}x | "
                     f"{r['rel']['ours']:.1e} / {r['rel']['dense_torch']:.1e} / {r['rel']['np']:.1e} / {r['rel']['nplog']:.1e} |")
    lines += ["", "## Reference selection, 14 x 14 grid, pool of 16 (debiased cost: pair + self problem per reference)", "",
              "| ours: one batched call (ms) | POT: 32 calls (ms) | speed-up |", "|---|---|---|",
              f"| {1e3 * t_sel:.1f} | {1e3 * t_sel_pot:.0f} | {t_sel_pot / t_sel:.1f}x |", "",
              "The grid solver factorises each log-sum-exp over the 56 x 56 grid into two small batched matrix products "
              "(the squared-distance cost is separable), so one iteration costs O(h w (h + w)) instead of O((h w)^2); "
              "it never forms the 3136 x 3136 plan (the dense plan above is built only to compare).", ""]
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
