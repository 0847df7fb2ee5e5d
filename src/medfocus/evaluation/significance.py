"""Which method is best — only where the data say so.

A table that bolds the column maximum invites the reader to call that method the winner even when
its interval overlaps the runner-up's. :func:`best_methods` marks a best method only where a **paired
bootstrap** shows it above every other method: for each other method, the per-sample differences on
the samples both methods scored (same model, dataset, mode and sample index; failed records and
missing values left out) are resampled ``n_boot`` times, and the top method is better when the
two-sided ``1 - alpha`` percentile interval of the mean difference lies above 0. The claim "best" is
the conjunction of these comparisons (an intersection-union test), so it holds at level ``alpha``
without a multiplicity correction; with fewer than two methods, or a comparison with fewer than
``min_pairs`` (default :data:`MIN_PAIRS`) paired samples, or without bootstrap resamples, nothing is marked
and the row says why (``withheld``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from medfocus.evaluation.tables import MIN_PAIRS, hash_key

__all__ = ["best_methods", "paired_bootstrap_diff", "successful_rows", "wilson_interval", "TEST_DESCRIPTION", "MIN_PAIRS"]


#: One sentence for reports and tables (what "best" means).
TEST_DESCRIPTION = ("bold marks the highest mean only where a paired bootstrap (samples both methods scored, "
                    "{n_boot} resamples, {level:.0f}% percentile interval of the mean difference) puts it above "
                    "every other method, each comparison on at least {min_pairs} paired samples")

_CELL = ["model", "mode", "dataset"]


def wilson_interval(k: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` Wilson score interval ``(low, high)`` of a proportion ``k / n``
    (Wilson 1927, via :meth:`scipy.stats.binomtest`'s ``proportion_ci``); both in [0, 1].

    Raises:
        ValueError: ``n < 1`` or ``k`` outside ``[0, n]``.
    """
    from scipy.stats import binomtest

    if int(n) < 1 or not 0 <= int(k) <= int(n):
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def format_proportion(k: int, n: int) -> str:
    """``"p% [low, high] (k/n)"`` with the Wilson 95% interval (:func:`wilson_interval`), percentages to one
    decimal; ``"n/a (n = 0)"`` when ``n`` is 0. The one format of a proportion in reports and benchmarks."""
    if int(n) == 0:
        return "n/a (n = 0)"
    lo, hi = wilson_interval(k, n)
    return f"{100 * int(k) / int(n):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({int(k)}/{int(n)})"


def successful_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The per-record metric rows without an error (a failed record is counted, never scored)."""
    if "error" not in metrics.columns:
        return metrics.copy()
    return metrics[metrics["error"].isna() | (metrics["error"].astype(str) == "")].copy()


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], *, n_boot: int = 1000, alpha: float = 0.05,
                          seed: int = 0, min_n: int = MIN_PAIRS) -> tuple[float, float, float]:
    """``(mean difference, low, high)`` of ``mean(a - b)`` for paired values, with the two-sided
    ``1 - alpha`` percentile-bootstrap interval (pairs resampled together). Deterministic for a seed.
    Fewer than ``min_n`` pairs (:data:`MIN_PAIRS`: below it the interval is far too narrow) or
    ``n_boot <= 0``: no interval, ``(mean, nan, nan)`` (never a zero-width or misleadingly narrow one).

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or are empty.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if np.asarray(a).shape != np.asarray(b).shape or d.size == 0:
        raise ValueError(f"paired values must be non-empty and of equal length, got {np.asarray(a).shape} and {np.asarray(b).shape}")
    mean = float(d.mean())
    if d.size < max(2, min_n) or n_boot <= 0:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def best_methods(metrics: pd.DataFrame, metric_names: Sequence[str] = ("iou", "f1", "precision", "recall"), *,
                 n_boot: int = 1000, alpha: float = 0.05, min_pairs: int = MIN_PAIRS, seed: int = 0) -> pd.DataFrame:
    """The method with the highest mean per (model, mode, dataset, metric), and whether it is
    significantly better than every other method (see the module docstring).

    Args:
        metrics: per-record metrics (``evaluate_records`` output): columns ``model, mode, dataset, method,
            index, error`` and the metric columns (0..1).
        metric_names: metric columns to test (absent ones are skipped).
        n_boot, alpha: bootstrap resamples and the two-sided level.
        min_pairs: fewest paired samples a comparison needs to count as significant (:data:`MIN_PAIRS`, see there).
        seed: base seed (each comparison gets its own reproducible stream).

    Returns:
        one row per (model, mode, dataset, metric): ``best`` (method), ``significant`` (bool),
        ``runner_up`` (the method with the weakest evidence against the best), ``difference``, ``ci_low``,
        ``ci_high`` (that comparison's mean difference and interval, x100), ``n_pairs``, and ``withheld``:
        why no test could mark a best method (``"fewer than N paired samples"`` -- the fewest pairs of any
        comparison -- or ``"no bootstrap resamples"``), ``None`` when every comparison was tested.
    """

    cols = [*_CELL, "metric", "best", "significant", "runner_up", "difference", "ci_low", "ci_high", "n_pairs", "withheld"]
    if metrics is None or metrics.empty:
        return pd.DataFrame(columns=cols)
    d = successful_rows(metrics)
    rows = []
    for key, g in d.groupby(_CELL, sort=True):
        for m in metric_names:
            if m not in g.columns:
                continue
            v = g.assign(_v=pd.to_numeric(g[m], errors="coerce"))
            v = v[np.isfinite(v["_v"])]
            # One value per (method, sample): duplicates (should not exist) are averaged, not double-counted.
            wide = v.pivot_table(index="index", columns="method", values="_v", aggfunc="mean")
            if wide.shape[1] == 0:
                continue
            means = wide.mean(axis=0)
            best = str(means.idxmax())
            row = dict(zip(_CELL, key), metric=m, best=best, significant=False, runner_up=None, difference=math.nan,
                       ci_low=math.nan, ci_high=math.nan, n_pairs=0, withheld=None)
            if wide.shape[1] >= 2:
                worst_lo, significant, fewest = math.inf, True, math.inf
                for other in wide.columns:
                    if other == best:
                        continue
                    pair = wide[[best, other]].dropna()
                    if len(pair) < min_pairs or n_boot <= 0:
                        # too few pairs for the percentile interval to mean anything (MIN_PAIRS), or none computed
                        fewest = min(fewest, len(pair))
                        significant = False
                        stats = (float((pair[best] - pair[other]).mean()) if len(pair) else math.nan, -math.inf, math.nan)
                    else:
                        seed_k = int(np.random.SeedSequence((seed, hash_key((*key, m, best, other)))).generate_state(1)[0])
                        stats = paired_bootstrap_diff(pair[best].to_numpy(), pair[other].to_numpy(), n_boot=n_boot,
                                                      alpha=alpha, seed=seed_k, min_n=min_pairs)
                        significant = significant and stats[1] > 0
                    if stats[1] < worst_lo or row["runner_up"] is None:
                        worst_lo = stats[1]
                        row.update(runner_up=str(other), difference=100 * stats[0],
                                   ci_low=100 * stats[1] if math.isfinite(stats[1]) else math.nan, ci_high=100 * stats[2],
                                   n_pairs=int(len(pair)))
                row["significant"] = bool(significant)
                if n_boot <= 0:
                    row["withheld"] = "no bootstrap resamples"
                elif math.isfinite(fewest):
                    row["withheld"] = f"fewer than {min_pairs} paired samples ({int(fewest)})"
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)
