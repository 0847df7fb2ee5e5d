"""Time `medfocus demo` end to end from an empty output folder (target: <= 5 minutes on a quiet 2-core machine).

Runs the real command in a subprocess (fresh folder, so nothing is reused), reads the per-step
seconds the demo writes to ``timings.json``, prints a table and writes it to ``benchmarks/demo_time.md``.

    .venv/bin/python benchmarks/demo_time.py                 # the default demo sizes
    .venv/bin/python benchmarks/demo_time.py -- --per-mode 3 # extra arguments go to `medfocus demo`
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_S = 300.0  # issue 19 item 5: `make demo` <= 5 min on a quiet 2-core machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    out = ROOT / "runs" / "demo-timing"
    if out.exists():
        shutil.rmtree(out)
    medfocus = Path(sys.executable).with_name("medfocus")
    cmd = [str(medfocus) if medfocus.exists() else sys.executable, *([] if medfocus.exists() else ["-m", "medfocus.cli"]),
           "demo", "--out", str(out), "--no-progress", *extra]
    print("running:", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the demo and its worker processes: above wall x cores means threads fought for cores
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        print(f"medfocus demo failed with exit code {proc.returncode} after {wall:.1f}s")
        return proc.returncode
    info = json.loads((out / "timings.json").read_text())
    steps = info["timings"]
    cfg = info["config"]
    rows = [(k, v) for k, v in steps.items() if k != "total"]
    lines = [
        f"# `medfocus demo` wall time ({dt.date.today().isoformat()})",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), torch/OpenCV threads {info.get('threads', 'default')} "
        f"(the demo's default: the cores available to it), no GPU. "
        f"Command: `medfocus demo {' '.join(extra)}` from an empty folder. 1-minute load average before/after: "
        f"{load_before:.1f}/{load_after:.1f} (above 2 means other processes shared the cores, so the time is an upper bound).",
        f"Sizes: {cfg['n_samples']} synthetic cases, <= {cfg['per_mode']} attributed samples per mode, "
        f"modes {cfg['modes']}, editors {cfg['editors']}, {info['n_records']} result records ({info['n_errors']} with errors).",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in rows],
        f"| **total (in-process)** | **{steps['total']:.1f}** |",
        f"| **wall (process, incl. imports)** | **{wall:.1f}** |",
        f"| CPU time (process + workers) | {cpu:.1f} ({cpu / max(wall, 1e-9):.2f} cores busy on average) |",
        "",
        f"Target: < {TARGET_S:.0f} s. {'PASS' if wall < TARGET_S else 'FAIL'}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(HERE / "demo_time.md", text)
    return 0 if wall < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
