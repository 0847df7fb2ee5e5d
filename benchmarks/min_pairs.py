"""Why ``best_methods`` needs at least ``MIN_PAIRS`` (10) paired samples before it bolds a method.

The paired test calls method A better than B when the lower bound of the two-sided 95% percentile-bootstrap
interval of the mean paired difference lies above 0 (one-sided false-positive rate nominally 2.5%). This
script measures how often that happens when A and B are equally good: paired differences drawn from a
standard normal (a null of no difference), ``--trials`` trials per n, ``--n-boot`` resamples each, the same
resampling as :func:`medfocus.evaluation.significance.paired_bootstrap_diff`. Each rate is printed with
its Wilson 95% interval (:func:`medfocus.evaluation.significance.format_proportion`).

Seed: ``numpy.random.default_rng(0)``; synthetic numbers only (no data, no model), disjoint from everything
else. Run: ``PYTHONPATH=src .venv/bin/python benchmarks/min_pairs.py`` (about a minute on one core); it prints
the table and writes it, with the command, date and machine, to ``benchmarks/min_pairs.md``.
The comment at ``medfocus.evaluation.significance.MIN_PAIRS`` quotes its output at the defaults.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_suffix(".md")


def false_positive_count(n: int, trials: int, n_boot: int, rng: np.random.Generator) -> int:
    """How many of ``trials`` null samples of ``n`` paired differences give a 2.5% lower bound above 0."""
    hits = 0
    for _ in range(trials):
        d = rng.normal(size=n)
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        hits += bool(np.quantile(means, 0.025) > 0)
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from medfocus.evaluation.significance import format_proportion

    rng = np.random.default_rng(0)
    t0 = time.time()
    rows = ["| n pairs | lower bound > 0 under the null (nominal 2.5%) |", "|---|---|"]
    print("\n".join(rows))
    for n in (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30):
        rows.append(f"| {n} | {format_proportion(false_positive_count(n, args.trials, args.n_boot, rng), args.trials)} |")
        print(rows[-1], flush=True)
    head = (f"# Paired-bootstrap false positives at small n (why `MIN_PAIRS` = 10)\n\n"
            f"Written by `benchmarks/min_pairs.py --trials {args.trials} --n-boot {args.n_boot}` on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({platform.machine()}, {time.time() - t0:.0f} s). "
            "Paired differences drawn from a standard normal (no real difference), seed `default_rng(0)`; each row: "
            "the share of trials whose 95% percentile-bootstrap interval of the mean difference lies above 0 "
            "(nominally 2.5%), with its Wilson 95% interval (k/n).\n\n")
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(args.out, head + "\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
