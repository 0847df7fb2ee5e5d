"""Speed of the synthetic chest X-ray world (target: 1,000 films at 256 px in < 60 s on 2 cores).

Measures, single process and with a 2-process pool:
  * generate_case only (image + masks + findings, cue_rate 0.3) for 1,000 films at 256 px;
  * the three counterfactual renders of every positive;
  * write_dataset (DICOM + PNG masks + counterfactual PNGs + manifest) for 200 films.
Prints a table and writes synth_speed.md next to this script.

    python benchmarks/synth_speed.py [--n 1000] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _gen(seed: int, size: int = 256) -> int:
    from medfocus.datasets.synthetic import generate_case

    return len(generate_case(seed, size=size, cue_rate=0.3, lesion_size_rule="nih").findings)


def _gen_cf(seed: int, size: int = 256) -> int:
    from medfocus.datasets.synthetic import generate_case

    c = generate_case(seed, size=size, cue_rate=0.3, lesion_size_rule="nih")
    for f in c.findings:
        c.foreground(f.name), c.background(f.name), c.background_normal(f.name)
    return len(c.findings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-write", type=int, default=200)
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    from medfocus.datasets.synthetic import write_dataset

    _gen(0, args.size)  # warm-up (imports, prior table)
    rows = []

    t = time.perf_counter()
    nf = sum(_gen(s, args.size) for s in range(args.n))
    rows.append((f"generate_case x{args.n} ({args.size} px), 1 process", time.perf_counter() - t, args.n, nf))
    t = time.perf_counter()
    with ProcessPoolExecutor(2) as ex:
        nf = sum(ex.map(_gen, range(args.n), [args.size] * args.n, chunksize=25))
    rows.append((f"generate_case x{args.n} ({args.size} px), 2 processes", time.perf_counter() - t, args.n, nf))
    t = time.perf_counter()
    with ProcessPoolExecutor(2) as ex:
        nf = sum(ex.map(_gen_cf, range(args.n), [args.size] * args.n, chunksize=25))
    rows.append((f"+ 3 counterfactuals per positive x{args.n}, 2 processes", time.perf_counter() - t, args.n, nf))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_dataset(Path(tmp) / "d", args.n_write, seed=0, size=args.size, cue_rate=0.3, workers=2, progress=False, lesion_size_rule="nih")
        rows.append((f"write_dataset x{args.n_write} (DICOM+masks+counterfactuals), 2 processes",
                     time.perf_counter() - t, args.n_write, -1))

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Synthetic world speed",
        "",
        f"Machine: {cpu}; Python {platform.python_version()}; 1-min load average at the end: {load:.1f} "
        "(a load above the core count means other jobs shared the CPUs, so the 2-process rows may not scale). "
        f"Command: `python benchmarks/synth_speed.py --n {args.n} --size {args.size}`.",
        "",
        "| what | seconds | films | ms / film | findings drawn |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, sec, n, nf in rows:
        lines.append(f"| {name} | {sec:.1f} | {n} | {1000 * sec / n:.1f} | {nf if nf >= 0 else '-'} |")
    lines += ["", "Target: 1,000 films at 256 px in under 60 s on 2 cores (row 2)."]
    text = "\n".join(lines) + "\n"
    print(text)
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(Path(__file__).with_name("synth_speed.md"), text)


if __name__ == "__main__":
    main()
