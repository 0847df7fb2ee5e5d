"""Every attribution method (10 baselines + MedFocus) on a GPU versus the CPU, with the shipped demo model.

Checks the device code paths a GPU user hits (tensors created on the adapter's device, bf16 autocast of
the weights, masks and baselines moved to the device) and measures per-method wall time. For each
method and synthetic case it records: seconds on CPU (float32) and on CUDA (float32 and the default
bfloat16), and the Spearman correlation of the 16x16 cell means of the CUDA map with the CPU map
(1.0 = the same ranking of regions). Also the max |difference| of the answer's teacher-forced
log-probs between CPU and CUDA.

    python benchmarks/gpu_methods.py --out benchmarks/gpu_methods.md            # needs CUDA
    python benchmarks/gpu_methods.py --device cpu --cases 1 --out /tmp/x.md      # dry run on CPU

The table names the card it ran on. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEDFOCUS_CACHE", tempfile.mkdtemp(prefix="medfocus-gpu-"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medfocus.attribution import get_method, list_methods  # noqa: E402
from medfocus.datasets.synthetic import generate_case  # noqa: E402
from medfocus.lvlm import load_lvlm  # noqa: E402
from medfocus.lvlm.scoring import answer_logprobs  # noqa: E402
from medfocus.types import SUFFIXES, question_stem  # noqa: E402

PARAMS = {"prompting_medsam": {"detector": "anatomy"}}
CASES = [(11, "cardiomegaly"), (12, "pleural effusion"), (13, "nodule")]


def _cells(hm: np.ndarray, n: int = 16) -> np.ndarray:
    H, W = hm.shape
    ys, xs = np.linspace(0, H, n + 1).astype(int), np.linspace(0, W, n + 1).astype(int)
    return np.array([[hm[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() for j in range(n)] for i in range(n)]).ravel()


def _rho(a: np.ndarray | None, b: np.ndarray | None) -> float:
    from scipy.stats import spearmanr

    if a is None or b is None:
        return float("nan")
    ca, cb = _cells(a), _cells(b)
    if ca.std() == 0 or cb.std() == 0:
        return 1.0 if np.allclose(ca, cb) else float("nan")
    return float(spearmanr(ca, cb).statistic)


def _run(adapter, name: str, image: np.ndarray, q: str, answer: str) -> tuple[np.ndarray | None, float, str | None]:
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    try:
        res = get_method(name, **PARAMS.get(name, {})).attribute(adapter, image, q, answer)
        err = None
    except Exception as exc:  # noqa: BLE001 - one failing method is reported, not fatal
        return None, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"[:120]
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()
    return res.heatmap, time.perf_counter() - t, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/gpu_methods.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU only (dry run)"
    cpu = load_lvlm("demo", device="cpu", dtype=torch.float32)
    g32 = load_lvlm("demo", device=str(dev), dtype=torch.float32)
    gdef = load_lvlm("demo", device=str(dev))  # the default dtype: bfloat16 on CUDA
    methods = list(list_methods())
    rows, lp_diffs, errors = [], [], []
    for seed, finding in CASES[: args.cases]:
        case = generate_case(seed, findings=[finding])
        for mode in ("direct", "cot"):
            q = question_stem(finding) + SUFFIXES[mode]
            answer = cpu.generate([case.image], [q], max_new_tokens=48)[0]
            lp_c = answer_logprobs(cpu, case.image, q, answer).cpu()
            lp_g = answer_logprobs(g32, case.image, q, answer).float().cpu()
            lp_diffs.append(float((lp_c - lp_g).abs().max()))
            for m in methods:
                hc, tc, ec = _run(cpu, m, case.image, q, answer)
                _run(g32, m, case.image, q, answer)  # warm-up (kernels, caches) before timing
                h32, t32, e32 = _run(g32, m, case.image, q, answer)
                hbf, tbf, ebf = _run(gdef, m, case.image, q, answer)
                for e in (ec, e32, ebf):
                    if e:
                        errors.append(f"{m} ({finding}, {mode}): {e}")
                rows.append((m, finding, mode, tc, t32, tbf, _rho(hc, h32), _rho(hc, hbf)))
                print(f"{m:24s} {finding:17s} {mode:6s} cpu {tc:6.2f}s cuda32 {t32:6.2f}s cudabf16 {tbf:6.2f}s "
                      f"rho32 {rows[-1][6]:.3f} rhobf16 {rows[-1][7]:.3f}", flush=True)
    lines = ["# Attribution methods on GPU vs CPU (demo model)", "",
             f"Card: **{card}**; torch {torch.__version__}; {args.cases} synthetic case(s) x 2 modes; "
             "generated by `benchmarks/gpu_methods.py`.", "",
             f"Max |log p(answer) CPU fp32 - CUDA fp32| over cases and modes: {max(lp_diffs):.2e}.", "",
             "Seconds per sample (mean over cases and modes; CUDA timed after one warm-up call) and Spearman "
             "correlation of the CUDA map's 16x16 cell means with the CPU float32 map (mean; 1.0 = same ranking).", "",
             "| method | CPU fp32 s | CUDA fp32 s | CUDA bf16 s | rho CUDA fp32 | rho CUDA bf16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        r = [x for x in rows if x[0] == m]
        mean = lambda i: float(np.nanmean([x[i] for x in r]))  # noqa: E731
        lines.append(f"| {m} | {mean(3):.3f} | {mean(4):.3f} | {mean(5):.3f} | {mean(6):.3f} | {mean(7):.3f} |")
    lines += ["", "Errors: " + ("none" if not errors else ""), *[f"- {e}" for e in errors]]
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
