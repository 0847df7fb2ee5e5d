"""Result tables shaped like the paper's Table 1: methods as rows, datasets as column groups.

Each cell is the mean x100 of a metric over the evaluated records of one (model, mode, method,
dataset), with a 95% percentile-bootstrap confidence interval of the mean (resampling records with
replacement, ``n_boot`` resamples, seeded) and the number of records ``n``. Records that carry an
error are excluded from the mean and counted in ``n_error``; records whose box text could not be read
(``unparseable``) likewise, counted in ``n_unparseable``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from medfocus.io.atomic import atomic_write_text

__all__ = ["bootstrap_ci", "format_ci", "ci_text", "NO_CI", "summarize", "build_tables", "table_metrics", "LOCALISATION_METRICS", "METHOD_ORDER", "DATASET_ORDER",
           "METRIC_LABELS"]

#: Row order (the paper's method families, then MedFocus); unknown methods follow alphabetically.
METHOD_ORDER = (
    "attention_head",
    "attention_rollout",
    "lrp_paper",
    "lrp",
    "attention_flow_residual",
    "grad_weighted_attention",
    "gradcam",
    "gradcampp",
    "integrated_gradients",
    "occlusion",
    "rise",
    "prompting",
    "prompting_medsam",
    "medfocus",
    # the trivial baselines (medfocus.evaluation.baselines) close every table
    "baseline_centre_gaussian",
    "baseline_finding_prior",
    "baseline_random",
    # the faithfulness reference maps (medfocus.evaluation.faithfulness)
    "reference: random map",
    "reference: expert-box map",
)
DATASET_ORDER = ("imagenome", "vindr_cxr", "padchest_gr", "synthetic")
METRIC_LABELS = {
    "iou": "IoU",
    "f1": "F1",
    "precision": "Prec.",
    "recall": "Rec.",
    "pointing_game": "PG",
    "energy_pg": "EPG",
    "auprc": "AUPRC",
    "deletion_auc": "Del. AUC (lower = more faithful)",
    "insertion_auc": "Ins. AUC (higher = more faithful)",
}
DATASET_LABELS = {"imagenome": "ImaGenome", "vindr_cxr": "VinDr-CXR", "padchest_gr": "PadChest-GR", "synthetic": "Synthetic"}
GROUP_KEYS = ["model", "mode", "method", "dataset"]


#: Fewest values a percentile-bootstrap interval is computed from (:func:`bootstrap_ci`, :func:`~medfocus.evaluation.
#: significance.paired_bootstrap_diff`), and fewest paired samples a comparison needs before it may call one method better
#: (``best_methods``' bold, ``compare_to_baselines``' "beats it"). With n pairs whose differences are all
#: positive, every resampled mean is positive, so the percentile interval lies above 0 whatever n is: on 2
#: pairs "significant" only says both differences had the same sign. Simulated under a null of normal
#: paired differences (benchmarks/min_pairs.py: 2000 trials of 500 resamples per n, default_rng(0); Wilson
#: 95% intervals within about +-2 points), the interval's lower bound
#: lies above 0 -- nominally 2.5% of the time -- in 24% of trials at n=2, 10% at n=4, 8% at n=6, 5.7% at
#: n=10 and 4% at n=20: the percentile interval is too narrow at small n, steeply so below 10. From 10
#: pairs on the one-sided false-positive rate stays within the test's stated two-sided 5%.
MIN_PAIRS = 10


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, ci: float = 0.95, seed: int = 0, *,
                 min_n: int = MIN_PAIRS) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the mean with a percentile-bootstrap CI (NaNs dropped).

    No interval is computed from fewer than ``min_n`` values (default
    :data:`MIN_PAIRS`, 10) or with ``n_boot <= 0``: ``(mean, nan, nan)``
    (:func:`format_ci` prints "no CI"). Below 10 values the percentile interval is far too narrow (its
    nominal 95% covers the true mean much less often: on 2 values it is about the range of the two;
    ``benchmarks/min_pairs.py``), and a zero-width ``[v, v]`` from one value would read like a perfectly
    certain mean. No value gives NaNs. Deterministic for a given ``seed``.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if v.size < max(2, min_n) or n_boot <= 0:
        return (mean, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    # Chunked so memory stays ~O(n) x 100 regardless of n_boot.
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 2_000_000 // v.size))
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        means[s : s + k] = v[rng.integers(0, v.size, size=(k, v.size))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (mean, float(lo), float(hi))


def _order(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    vals = list(dict.fromkeys(str(v) for v in values))
    head = [p for p in preferred if p in vals]
    return head + sorted(v for v in vals if v not in preferred)


def summarize(
    df: pd.DataFrame,
    metrics: Sequence[str] = ("iou", "f1", "precision", "recall"),
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Long table: one row per (model, mode, method, dataset, metric) with ``mean, ci_low, ci_high``
    (all x100), ``n`` (records evaluated), ``n_error`` and ``n_unparseable`` (records whose box text
    could not be read; left out of the means like errors), ``n_wrong_answer`` (of the ``n`` scored records,
    those whose attributed answer is wrong: ``answer_correct`` False; they are in the mean) and
    ``n_answer_unknown`` (of the ``n``, those without ``answer_parsed`` / ``gt_answer``). Metrics absent from ``df`` or all-NaN for a
    group (e.g. pointing game for a box-only method) are left out of that group."""
    cols = GROUP_KEYS + ["metric", "mean", "ci_low", "ci_high", "n", "n_error", "n_unparseable", "n_wrong_answer", "n_answer_unknown"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    d = df.copy()
    for k in GROUP_KEYS:
        if k not in d.columns:
            d[k] = ""
        d[k] = d[k].fillna("").astype(str)
    has_err = d["error"].notna() & (d["error"].astype(str) != "") if "error" in d.columns else pd.Series(False, index=d.index)
    unparseable = d["unparseable"].fillna(False).astype(bool) if "unparseable" in d.columns else pd.Series(False, index=d.index)
    # scored rows whose attributed answer is wrong (answer_correct is False; None = unknown is not counted)
    known = d["answer_correct"].map(lambda v: isinstance(v, (bool, np.bool_))) if "answer_correct" in d.columns \
        else pd.Series(False, index=d.index)
    wrong = known & d["answer_correct"].map(lambda v: not bool(v) if isinstance(v, (bool, np.bool_)) else False) \
        if "answer_correct" in d.columns else pd.Series(False, index=d.index)
    rows = []
    for key, g in d.groupby(GROUP_KEYS, sort=True):
        err = has_err.loc[g.index]
        n_unp = int((unparseable.loc[g.index] & ~err).sum())
        ok = g[~err]
        for j, m in enumerate(metrics):
            if m not in g.columns:
                continue
            vals = pd.to_numeric(ok[m], errors="coerce").to_numpy(dtype=np.float64)
            n_wrong = int((np.isfinite(vals) & wrong.loc[ok.index].to_numpy()).sum())
            n_unknown = int((np.isfinite(vals) & ~known.loc[ok.index].to_numpy()).sum())
            vals = vals[np.isfinite(vals)]
            if vals.size == 0 and len(ok):
                continue
            # A distinct, reproducible stream per cell so cells do not share resamples.
            cell_seed = (seed, hash_key(key), j)
            mean, lo, hi = bootstrap_ci(vals, n_boot=n_boot, ci=ci, seed=int(np.random.SeedSequence(cell_seed).generate_state(1)[0]))
            rows.append(dict(zip(GROUP_KEYS, key), metric=m, mean=100 * mean, ci_low=100 * lo, ci_high=100 * hi, n=int(vals.size),
                             n_error=int(err.sum()), n_unparseable=n_unp, n_wrong_answer=n_wrong,
                             n_answer_unknown=n_unknown))
    return pd.DataFrame(rows, columns=cols)


def hash_key(key: tuple) -> int:
    """Stable (process-independent) 32-bit hash of a group key — Python's ``hash`` of str is salted."""
    import zlib

    return zlib.crc32("\x1f".join(str(k) for k in key).encode("utf-8"))


#: What a cell says instead of an interval that was not computed (one sample, or ``--n-boot 0``).
NO_CI = "no CI"


def ci_text(lo: float, hi: float, decimals: int = 1, *, signed: bool = False) -> str:
    """``"[lo, hi]"``, or :data:`NO_CI` when the interval was not computed (non-finite bounds: one sample or
    no bootstrap resamples). The one format of an interval in Markdown, HTML and benchmark tables."""
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return NO_CI
    f = f"+.{decimals}f" if signed else f".{decimals}f"
    return f"[{lo:{f}}, {hi:{f}}]"


def format_ci(mean: float, lo: float, hi: float, decimals: int = 1, *, signed: bool = False) -> str:
    """``"mean [lo, hi]"``; ``"mean (no CI)"`` when no interval was computed (:func:`ci_text`); ``"–"``
    when there is no mean."""
    if not math.isfinite(float(mean)):
        return "–"
    f = f"+.{decimals}f" if signed else f".{decimals}f"
    ci = ci_text(lo, hi, decimals, signed=signed)
    return f"{mean:{f}} " + (f"({ci})" if ci == NO_CI else ci)



def to_markdown(summary: pd.DataFrame, metrics: Sequence[str] = ("iou", "f1", "precision", "recall"), decimals: int = 1) -> str:
    """Markdown: one table per (model, mode); rows = methods; columns = dataset x metric groups.

    Cells are ``mean [CI low, CI high]`` (x100). The group header names the dataset and ``n``
    (per cell as ``(n=..)`` when methods differ in n); methods with errors, or with answers whose box
    text could not be read, list their counts in last columns (``errors``, ``unparseable``).
    """
    if summary.empty:
        return "_No evaluated records._\n"
    parts = []
    for (model, mode), sm in summary.groupby(["model", "mode"], sort=True):
        datasets = _order(sm["dataset"].unique(), DATASET_ORDER)
        methods = _order(sm["method"].unique(), METHOD_ORDER)
        present = [m for m in metrics if m in set(sm["metric"])]
        idx = {(r.method, r.dataset, r.metric): r for r in sm.itertuples(index=False)}
        n_by_ds = {}
        for ds in datasets:
            ns = {int(r.n) for r in sm[sm["dataset"] == ds].itertuples(index=False)}
            n_by_ds[ds] = ns.pop() if len(ns) == 1 else None
        header = ["Method"]
        for ds in datasets:
            label = DATASET_LABELS.get(ds, ds)
            n = n_by_ds[ds]
            for m in present:
                header.append(f"{label}{f' (n={n})' if n is not None else ''} {METRIC_LABELS.get(m, m)}")
        any_err = bool((sm["n_error"] > 0).any())
        any_unp = "n_unparseable" in sm.columns and bool((sm["n_unparseable"] > 0).any())
        any_wrong = "n_wrong_answer" in sm.columns and bool((sm["n_wrong_answer"] > 0).any())
        if any_err:
            header.append("errors")
        if any_unp:
            header.append("unparseable")
        if any_wrong:
            header.append("wrong answers (scored)")
        lines = [f"### {model} — {mode}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for meth in methods:
            cells = [meth]
            n_err = 0
            for ds in datasets:
                for m in present:
                    r = idx.get((meth, ds, m))
                    if r is None:
                        cells.append("–")
                        continue
                    n_err = max(n_err, int(r.n_error))
                    # Every record failed: say so, a dash would read like "not run" and a 0 like a score.
                    cell = "failed" if int(r.n) == 0 and int(r.n_error) > 0 else format_ci(r.mean, r.ci_low, r.ci_high, decimals)
                    if n_by_ds[ds] is None and int(r.n):
                        cell += f" (n={int(r.n)})"
                    cells.append(cell)
            for flag, col in ((any_err, "n_error"), (any_unp, "n_unparseable"), (any_wrong, "n_wrong_answer")):
                if flag:
                    cells.append(str(int(sm[(sm["method"] == meth)].groupby("dataset")[col].max().sum())))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    note = (
        "\n\nCells: mean x100 over samples [95% bootstrap CI]; IoU/F1/precision/recall of the union of "
        "predicted boxes vs the union of expert boxes."
    )
    note += wrong_answer_note(summary)
    finite = summary["mean"].map(lambda v: math.isfinite(float(v)))
    no_ci = finite & ~(summary["ci_low"].map(lambda v: math.isfinite(float(v))))
    if bool(no_ci.any()):
        note += (f" \"{NO_CI}\": no interval was computed (fewer than 10 samples, where a bootstrap interval is far "
                 "too narrow, or --n-boot 0); the mean alone is no "
                 "evidence of precision.")
    if {"deletion_auc", "insertion_auc"} & set(summary["metric"]) & set(metrics):
        note += (" Del./Ins. AUC: area under the deletion / insertion curve of the mean answer-token probability "
                 "(x100; RISE's protocol on image-token cells, medfocus.evaluation.faithfulness); the reference rows "
                 "rank cells randomly / by the expert boxes.")
    return "\n\n".join(parts) + note + "\n"


def wrong_answer_note(summary: pd.DataFrame, *, flag: str = "evaluate --correct-only") -> str:
    """One sentence: how many of the scored records (methods' rows, first metric of each cell) attribute a wrong
    answer and are in the means; ``""`` when the summary has no ``n_wrong_answer``. ``flag``: the option that
    leaves them out."""
    if summary.empty or "n_wrong_answer" not in summary.columns:
        return ""
    first = summary.drop_duplicates(GROUP_KEYS)  # one metric per cell: records, not record x metric
    # the methods' rows only: the trivial baselines (baseline_*) and faithfulness references answer nothing
    first = first[~first["method"].astype(str).map(lambda m: m.startswith(("baseline_", "reference")))]
    n, wrong = int(first["n"].sum()), int(first["n_wrong_answer"].sum())
    unknown = int(first["n_answer_unknown"].sum()) if "n_answer_unknown" in first.columns else 0
    if n == 0:
        return ""
    if unknown == n:
        return (f" Wrong answers: unknown for all {n} scored records (they carry no answer_parsed / gt_answer), so "
                "attributions of wrong answers may be among them.")
    text = (f" Wrong answers: {wrong} of the {n} scored records attribute an answer that is not the ground truth "
            f"(the model's own answer, e.g. \"No\" on a film with the finding); they are scored against the expert "
            f"boxes and are in the means ({flag} leaves them out).")
    if unknown:
        text += f" {unknown} scored records carry no answer_parsed / gt_answer: correctness unknown."
    return text


def build_tables(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    metrics: Sequence[str] = ("iou", "f1", "precision", "recall"),
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    decimals: int = 1,
) -> str:
    """Summarise per-record metrics and write ``table.csv`` (long format, one row per
    model/mode/method/dataset/metric) and ``table.md`` (Table-1 shape) into ``out_dir``.

    Args:
        df: output of :func:`medfocus.evaluation.evaluate_records`.
        out_dir: folder (created).
        metrics: metric columns to tabulate (the CSV includes them all; the Markdown shows them).
        n_boot, ci, seed: bootstrap settings.

    Returns:
        The Markdown text (also written to ``table.md``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df, metrics, n_boot=n_boot, ci=ci, seed=seed)
    md = to_markdown(summary, metrics, decimals=decimals)
    atomic_write_text(out / "table.csv", summary.to_csv(index=False))
    atomic_write_text(out / "table.md", md)
    return md


#: The localisation columns every table shows (``medfocus evaluate``'s default ``--metrics``).
LOCALISATION_METRICS: tuple[str, ...] = ("iou", "f1", "precision", "recall")


def table_metrics(records: Iterable[Mapping[str, Any]], base: Sequence[str] = LOCALISATION_METRICS) -> tuple[str, ...]:
    """The metric columns of a table of ``records``: ``base``, plus the deletion / insertion AUCs when a
    record carries faithfulness curves (a ``faithfulness`` mapping: ``attribute --faithfulness``, the demo's
    faithfulness subset, ``evaluate --faithfulness``), so those columns are never silently dropped."""
    from medfocus.evaluation.faithfulness import FAITHFULNESS_METRICS

    faith = any(isinstance(r.get("faithfulness"), Mapping) for r in records)
    return tuple(base) + (tuple(m for m in FAITHFULNESS_METRICS if m not in base) if faith else ())
