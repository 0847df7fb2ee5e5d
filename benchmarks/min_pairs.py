"""Why ``best_methods`` needs at least ``MIN_PAIRS`` (10) paired samples before it bolds a method.

The paired test calls method A better than B when the lower bound of the two-sided 95% percentile-bootstrap
interval of the mean paired difference lies above 0 (one-sided false-positive rate nominally 2.5%). This
script measures how often that happens when A and B are equally good: paired differences drawn from a
standard normal (a null of no difference), ``--trials`` trials per n, ``--n-boot`` resamples each, the same
resampling as :func:`medfocus.evaluation.significance.paired_bootstrap_diff`. Each rate is printed with
its Wilson 95% interval (:func:`medfocus.evaluation.significance.format_proportion`).

Seed: ``numpy.random.default_rng(0)``; synthetic numbers only (no data, no model), disjoint from everything
else. Run: ``PYTHONPATH=src .venv/bin/python benchmarks/min_pairs.py`` (about a minute on one core).
The comment at ``medfocus.evaluation.significance.MIN_PAIRS`` quotes its output at the defaults.
"""

from __future__ import annotations

import argparse

import numpy as np


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
    args = ap.parse_args()
    from medfocus.evaluation.significance import format_proportion

    rng = np.random.default_rng(0)
    print("| n pairs | lower bound > 0 under the null (nominal 2.5%) |")
    print("|---|---|")
    for n in (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30):
        print(f"| {n} | {format_proportion(false_positive_count(n, args.trials, args.n_boot, rng), args.trials)} |")


if __name__ == "__main__":
    main()
