"""Thread oversubscription check for the demo: the same demo-model work (32 greedy answers, one RISE and
one occlusion map) in fresh processes with 2 or 1 torch threads and OpenMP's default vs passive waiting.

Writes ``benchmarks/demo_threads.md`` (wall and CPU seconds per setting, machine load). Run:
``PYTHONPATH=src .venv/bin/python benchmarks/demo_threads.py [--repeats 2]``. On a loaded machine,
spinning OpenMP workers wait for a descheduled partner thread at every barrier; ``medfocus demo``
therefore sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) and as many threads as cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_WORK = """
import os, sys, time, resource
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from medfocus.lvlm.loading import load_lvlm
from medfocus.attribution import get_method
from medfocus.datasets.synthetic.case import generate_case
a = load_lvlm("demo", device="cpu")
imgs = [np.asarray(generate_case(7_000_000_000 + i, size=256).image) for i in range(32)]
q = "Is there evidence of nodule in the image? Answer directly with yes or no without any explanation."
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.time()
a.generate(imgs, [q] * len(imgs), max_new_tokens=4, batch_size=16)
get_method("rise").attribute(a, imgs[0], q, "Yes"); get_method("occlusion").attribute(a, imgs[1], q, "Yes")
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(time.time() - t0, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), os.getloadavg()[0])
"""

SETTINGS = (("2", None), ("2", "PASSIVE"), ("1", None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for _ in range(a.repeats):
        for threads, wait in SETTINGS:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            if wait:
                env["OMP_WAIT_POLICY"] = wait
            out = subprocess.run([sys.executable, "-c", _WORK, threads], capture_output=True, text=True, check=True, env=env)
            wall, cpu, load = (float(x) for x in out.stdout.split()[-3:])
            rows.append((threads, wait or "default", wall, cpu, load))
            print(rows[-1], flush=True)
    lines = ["# Demo model work under thread settings", "",
             f"Measured by `benchmarks/demo_threads.py` on {os.cpu_count()} CPUs; each row a fresh process "
             "(32 greedy answers + one RISE + one occlusion map on the demo model, after loading).", "",
             "| torch threads | OMP_WAIT_POLICY | wall s | CPU s | 1-min load |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {t} | {w} | {wall:.1f} | {cpu:.1f} | {load:.1f} |" for t, w, wall, cpu, load in rows]
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(HERE / "demo_threads.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
