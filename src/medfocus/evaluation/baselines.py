"""Trivial localisation baselines: what a map scores without looking at the model (or the image).

A method's IoU means little until it is read against maps that need no model at all. Every
localisation table therefore carries three trivial rows, scored by exactly the same protocol as the
methods (the map goes through :func:`medfocus.evaluation.records.evaluate_record`: heatmap -> boxes at
the same quantile, pointing game, energy pointing game, AUPRC):

``baseline_centre_gaussian``
    an isotropic Gaussian centred on the image, ``sigma`` = 0.25 of each side (a "the lesion is
    somewhere in the middle of the film" guess; sees neither image nor question).
``baseline_finding_prior``
    the **image-blind finding prior**: the mean expert-box mask of the *asked finding* over the other
    samples of the same dataset (leave-one-out: the evaluated sample is excluded, so the baseline
    never sees its own answer), in image-relative coordinates (each sample's boxes divided by its
    ``(W, H)``) on a ``PRIOR_GRID x PRIOR_GRID`` grid. It knows the question, not the image. A finding
    with no other sample has no prior: that row is an error ("no other sample"), not a made-up map.
``baseline_random``
    independent uniform random values on a 16x16 grid (the paper models' image-token grid), seeded per
    sample (``seed`` and the sample key), then resized like any map.

The prior and the random grid are image-relative (their grid spans the whole film): their records say so
(``heatmap_frame`` :data:`~medfocus.evaluation.records.IMAGE_RELATIVE`) and are stretched onto films of any
aspect ratio, where a stored map of another aspect ratio is refused.

Samples are the distinct ``(model, dataset, mode, index)`` of the evaluated records that have expert
boxes; baselines are computed once per sample whatever the number of methods.

:func:`compare_to_baselines` gives, per (model, mode, dataset) and metric, each method's paired
difference to the **best** trivial baseline of that cell (highest mean) with a paired-bootstrap 95%
interval over the samples both scored (:func:`medfocus.evaluation.significance.paired_bootstrap_diff`),
so a reader sees at a glance which methods beat a map that needs no model.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from medfocus.evaluation.records import IMAGE_RELATIVE

__all__ = ["TRIVIAL_BASELINES", "PRIOR_GRID", "centre_gaussian_map", "random_map", "finding_prior_maps",
           "trivial_baseline_records", "compare_to_baselines", "is_baseline"]

TRIVIAL_BASELINES = ("baseline_centre_gaussian", "baseline_finding_prior", "baseline_random")
#: Side of the image-relative grid the finding prior is averaged on.
PRIOR_GRID = 64
#: Side of the grid of the random map (the paper models' 16x16 image-token grid).
RANDOM_GRID = 16


def is_baseline(method: str) -> bool:
    """Whether a method name is one of the trivial baselines."""
    return str(method) in TRIVIAL_BASELINES


def centre_gaussian_map(size: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """``(H, W)`` float32 isotropic Gaussian centred on the image; ``sigma`` in units of each side.

    Raises:
        ValueError: non-positive size or sigma.
    """
    W, H = int(size[0]), int(size[1])
    if W <= 0 or H <= 0 or not sigma > 0:
        raise ValueError(f"centre_gaussian_map needs a positive size and sigma, got size={size}, sigma={sigma}")
    x = ((np.arange(W) + 0.5) / W - 0.5) / sigma
    y = ((np.arange(H) + 0.5) / H - 0.5) / sigma
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


def random_map(seed: int, grid: int = RANDOM_GRID) -> np.ndarray:
    """``(grid, grid)`` float32 i.i.d. uniform values in [0, 1) from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(int(seed) & 0xFFFFFFFF).random((grid, grid), dtype=np.float32)


def _relative_mask(boxes: Iterable[Sequence[float]], size: tuple[int, int], grid: int) -> np.ndarray:
    """Union of ``boxes`` (pixels, half-open) as a fractional-coverage mask on an image-relative grid."""
    W, H = float(size[0]), float(size[1])
    m = np.zeros((grid, grid), dtype=np.float64)
    edges = np.arange(grid + 1) / grid
    for b in boxes:
        x1, y1, x2, y2 = (float(v) for v in b)
        fx = np.clip(np.minimum(edges[1:], x2 / W) - np.maximum(edges[:-1], x1 / W), 0, None) * grid
        fy = np.clip(np.minimum(edges[1:], y2 / H) - np.maximum(edges[:-1], y1 / H), 0, None) * grid
        m = np.maximum(m, fy[:, None] * fx[None, :])  # union of boxes, not their sum
    return m


def _sample_key(rec: Mapping[str, Any]) -> tuple[str, str, str, int]:
    return (str(rec.get("model")), str(rec.get("dataset")), str(rec.get("mode")), int(rec.get("index")))


def finding_prior_maps(samples: Sequence[Mapping[str, Any]], grid: int = PRIOR_GRID) -> list[np.ndarray | None]:
    """Leave-one-out finding priors, one per sample (``None`` when no other sample has the finding).

    Args:
        samples: dicts with ``dataset``, ``index``, ``attribute``, ``gt_boxes`` (pixels) and
            ``image_size`` ``[W, H]``. Samples sharing ``(dataset, index)`` (the same film asked by
            several models or modes) count once.
        grid: side of the image-relative grid.
    Returns:
        per sample, the ``(grid, grid)`` float32 mean box mask of the other films of the same dataset
        and finding.
    """
    films: dict[tuple[str, int], tuple[str, np.ndarray]] = {}
    for s in samples:
        k = (str(s["dataset"]), int(s["index"]))
        if k not in films:
            films[k] = (str(s.get("attribute")), _relative_mask(s["gt_boxes"], s["image_size"], grid))
    totals: dict[tuple[str, str], tuple[np.ndarray, int]] = {}
    for (ds, _), (attr, m) in films.items():
        tot, n = totals.get((ds, attr), (np.zeros((grid, grid)), 0))
        totals[(ds, attr)] = (tot + m, n + 1)
    out: list[np.ndarray | None] = []
    for s in samples:
        ds, idx = str(s["dataset"]), int(s["index"])
        attr, own = films[(ds, idx)]
        tot, n = totals[(ds, attr)]
        out.append(None if n <= 1 else ((tot - own) / (n - 1)).astype(np.float32))
    return out


def trivial_baseline_records(records: Iterable[Mapping[str, Any]], *, seed: int = 0,
                             sigma: float = 0.25) -> list[dict[str, Any]]:
    """Prediction records (with an in-memory ``heatmap``) of the three trivial baselines.

    One record per baseline and distinct ``(model, dataset, mode, index)`` of ``records`` that has
    ``gt_boxes`` and ``image_size`` (error records and negatives are skipped). Feed them to
    :func:`medfocus.evaluation.evaluate_records` like any prediction.
    """
    samples: dict[tuple[str, str, str, int], Mapping[str, Any]] = {}
    for r in records:
        if r.get("error") or not r.get("gt_boxes") or r.get("image_size") is None or is_baseline(str(r.get("method"))):
            continue
        try:
            key = _sample_key(r)
        except (TypeError, ValueError):
            continue
        samples.setdefault(key, r)
    ordered = [samples[k] for k in sorted(samples)]
    try:
        priors = finding_prior_maps(ordered)
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        priors = [None] * len(ordered)
    out: list[dict[str, Any]] = []
    for s, prior in zip(ordered, priors):
        key = _sample_key(s)
        base = {"model": key[0], "dataset": key[1], "mode": key[2], "index": key[3], "attribute": s.get("attribute"),
                "gt_boxes": [list(b) for b in s["gt_boxes"]], "image_size": list(s["image_size"]), "error": None}
        W, H = int(s["image_size"][0]), int(s["image_size"][1])
        # the Gaussian at a bounded resolution (evaluation resizes every map to (H, W) anyway)
        scale = min(1.0, 256.0 / max(W, H))
        out.append({**base, "method": "baseline_centre_gaussian",
                    "heatmap": centre_gaussian_map((max(1, round(W * scale)), max(1, round(H * scale))), sigma)})
        if prior is None:
            out.append({**base, "method": "baseline_finding_prior",
                        "error": f"no other sample of finding {s.get('attribute')!r} in {key[1]} to build a prior from"})
        else:
            out.append({**base, "method": "baseline_finding_prior", "heatmap": prior, "heatmap_frame": IMAGE_RELATIVE})
        rseed = zlib.crc32(f"{seed}|{key[1]}|{key[3]}".encode())  # one random map per film, any model/mode
        out.append({**base, "method": "baseline_random", "heatmap": random_map(rseed), "heatmap_frame": IMAGE_RELATIVE})
    return out


def compare_to_baselines(metrics: pd.DataFrame, metric_names: Sequence[str] = ("iou",), *, n_boot: int = 1000,
                         alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Each method against the best trivial baseline of its (model, mode, dataset) cell.

    Args:
        metrics: per-record metrics (``evaluate_records`` output) including the baseline rows.
        metric_names: metrics to compare (0..1 columns).
        n_boot, alpha, seed: paired bootstrap settings.
    Returns:
        one row per (model, mode, dataset, metric, method): ``baseline`` (the best trivial baseline by
        mean over all its samples, ``baseline_overall_mean``), ``method_mean`` and ``baseline_mean`` over the
        ``n_pairs`` samples both scored -- the samples of ``difference`` (= ``method_mean - baseline_mean``),
        ``ci_low``, ``ci_high`` (all x100; a method's mean over *all* its samples is in the results table, and
        differs when the baseline lacks some of them, e.g. the finding prior of a finding with one sample) --
        and ``beats`` (True when the whole interval is above 0, False when it is below or
        straddles 0, None -- "n/a" -- with fewer than :data:`~medfocus.evaluation.significance.MIN_PAIRS`
        pairs or no bootstrap resamples: no interval that could decide; the difference is still given).
    """
    from medfocus.evaluation.significance import MIN_PAIRS, paired_bootstrap_diff, successful_rows
    from medfocus.evaluation.tables import hash_key

    cols = ["model", "mode", "dataset", "metric", "method", "baseline", "method_mean", "baseline_mean", "difference",
            "ci_low", "ci_high", "n_pairs", "beats", "baseline_overall_mean"]
    if metrics is None or metrics.empty:
        return pd.DataFrame(columns=cols)
    d = successful_rows(metrics)
    rows = []
    for cell, g in d.groupby(["model", "mode", "dataset"], sort=True):
        for j, m in enumerate(metric_names):
            if m not in g.columns:
                continue
            per = {meth: gm.set_index("index")[m].astype(float).dropna() for meth, gm in g.groupby("method")}
            base_means = {b: float(per[b].mean()) for b in TRIVIAL_BASELINES if b in per and len(per[b])}
            if not base_means:
                continue
            best = max(base_means, key=lambda b: (base_means[b], b))
            for meth, vals in sorted(per.items()):
                if is_baseline(meth) or vals.empty:
                    continue
                common = vals.index.intersection(per[best].index)
                # both means over the pairs, so that the three numbers of a row agree (a mean over all of the
                # method's samples beside a paired difference does not)
                row = dict(zip(["model", "mode", "dataset"], cell), metric=m, method=meth, baseline=best,
                           method_mean=100 * float(vals.loc[common].mean()) if len(common) else math.nan,
                           baseline_mean=100 * float(per[best].loc[common].mean()) if len(common) else math.nan,
                           baseline_overall_mean=100 * base_means[best], n_pairs=int(len(common)))
                if len(common) == 0:
                    row.update(difference=math.nan, ci_low=math.nan, ci_high=math.nan, beats=None)
                else:
                    s = int(np.random.SeedSequence((seed, hash_key((*cell, meth)), j)).generate_state(1)[0])
                    diff, lo, hi = paired_bootstrap_diff(vals.loc[common].to_numpy(), per[best].loc[common].to_numpy(),
                                                         n_boot=n_boot, alpha=alpha, seed=s)
                    decided = len(common) >= MIN_PAIRS and math.isfinite(lo)
                    row.update(difference=100 * diff, ci_low=100 * lo, ci_high=100 * hi, beats=bool(lo > 0) if decided else None)
                rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def baselines_markdown(comparison: pd.DataFrame, decimals: int = 1) -> str:
    """Markdown table of :func:`compare_to_baselines` (one block per model / mode / dataset)."""
    from medfocus.evaluation.tables import format_ci

    if comparison is None or comparison.empty:
        return "_no method could be compared with the trivial baselines_\n"
    lines = []
    for (model, mode, ds, metric), g in comparison.groupby(["model", "mode", "dataset", "metric"], sort=True):
        lines.append(f"**{model} / {mode} / {ds}** — {metric} vs the best trivial baseline "
                     f"(`{g['baseline'].iloc[0]}`, {g['baseline_overall_mean'].iloc[0]:.{decimals}f} over all its samples); "
                     "the means of a row are over its n pairs (the samples both scored)\n")
        lines.append("| method | mean | baseline | difference [95% CI] | n pairs | beats it |")
        lines.append("|---|---|---|---|---|---|")
        for _, r in g.iterrows():
            diff = format_ci(r["difference"], r["ci_low"], r["ci_high"], decimals, signed=True).replace("–", "n/a")
            verdict = "n/a" if r["beats"] is None else ("yes" if r["beats"] else "no")
            mean, base = (f"{v:.{decimals}f}" if math.isfinite(v) else "–" for v in (r["method_mean"], r["baseline_mean"]))
            lines.append(f"| {r['method']} | {mean} | {base} | {diff} | {r['n_pairs']} | {verdict} |")
        lines.append("")
    if comparison["beats"].isna().any():
        from medfocus.evaluation.significance import MIN_PAIRS

        lines.append(f"beats it n/a: fewer than {MIN_PAIRS} paired samples or no bootstrap interval (--n-boot 0), "
                     "too little to call a difference real.\n")
    return "\n".join(lines) + "\n"


def finding_table(metrics: pd.DataFrame, metric: str = "iou") -> pd.DataFrame:
    """Mean ``metric`` (x100) and ``n`` per (model, mode, dataset, finding, method): the per-finding
    breakdown (a method can beat the baselines on average through one finding only). Needs the
    ``attribute`` column of ``evaluate_records``; error rows are left out."""
    from medfocus.evaluation.significance import successful_rows

    cols = ["model", "mode", "dataset", "attribute", "method", "mean", "n"]
    if metrics is None or metrics.empty or "attribute" not in metrics.columns or metric not in metrics.columns:
        return pd.DataFrame(columns=cols)
    d = successful_rows(metrics)
    d = d[np.isfinite(pd.to_numeric(d[metric], errors="coerce"))]
    if d.empty:
        return pd.DataFrame(columns=cols)
    d["attribute"] = d["attribute"].fillna("").astype(str)
    g = d.groupby(["model", "mode", "dataset", "attribute", "method"], sort=True)[metric].agg(["mean", "count"]).reset_index()
    g["mean"] *= 100
    return g.rename(columns={"count": "n"})[cols]


def finding_markdown(table: pd.DataFrame, decimals: int = 1, metric: str = "iou") -> str:
    """Methods as rows, findings as columns (mean x100 and n), one block per model / mode / dataset; ``metric``
    (the one :func:`finding_table` was computed on) is named in each block's heading."""
    from medfocus.evaluation.tables import METRIC_LABELS

    if table is None or table.empty:
        return "_no per-finding results_\n"
    lines = []
    for (model, mode, ds), g in table.groupby(["model", "mode", "dataset"], sort=True):
        findings = sorted(g["attribute"].unique())
        lines.append(f"**{model} / {mode} / {ds}** — {METRIC_LABELS.get(metric, metric)} per finding (mean x100, n)\n")
        lines.append("| method | " + " | ".join(findings) + " |")
        lines.append("|---|" + "---|" * len(findings))
        for meth, gm in g.groupby("method", sort=True):
            cells = {r["attribute"]: f"{r['mean']:.{decimals}f} ({r['n']})" for _, r in gm.iterrows()}
            lines.append(f"| {meth} | " + " | ".join(cells.get(f, "–") for f in findings) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
