"""The self-contained HTML report of a run (one file, images embedded as base64 PNG, no scripts,
no external resources), meant to be attached to a paper review.

Sections: run overview; Table-1-style results (IoU, F1, precision, recall x100 per method x dataset,
95% bootstrap CI and n) for every model in direct and step-by-step mode; when records carry
deletion/insertion curves, faithfulness beside plausibility (IoU, deletion and insertion AUC with CIs,
random-map and expert-box references, mean curves); the retention table of the
causal filter; per-method bars and the method x model matrix; a sample gallery (X-ray + GT boxes +
each method's heatmap and predicted boxes); MedFocus concept rankings and step-by-step answers with
tokens coloured by attribution; failures.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from medfocus.evaluation.tables import ci_text
from medfocus.io.atomic import atomic_write_bytes, atomic_write_text
from medfocus.io.paths import safe_filename
from medfocus.report import figures
from medfocus.report.records import first_present, load_arrays, medfocus_view  # noqa: F401 - medfocus_view re-exported

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("iou", "f1", "precision", "recall")
METRIC_LABELS = {"iou": "IoU", "f1": "F1", "precision": "Prec.", "recall": "Rec."}
MODE_LABELS = {"direct": "Direct answer", "cot": "Step-by-step (reasoning)", "open": "Open answer"}
KEYS = ["model", "dataset", "mode", "method"]


# ---- numbers ---------------------------------------------------------------------------------------
def summarize(metrics: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The evaluation's summary table (:func:`medfocus.evaluation.summarize`): one row per
    ``(model, mode, method, dataset, metric)`` with ``mean, ci_low, ci_high`` (x100), ``n``, ``n_error``."""
    from medfocus.evaluation import summarize as _summarize

    return _summarize(metrics, METRICS, n_boot=n_boot, seed=seed)


# ---- html pieces -----------------------------------------------------------------------------------
# All HTML comes from the jinja2 templates in ``templates/``, rendered with autoescaping on: every value
# from records, configs, data or model output is escaped by construction, and Python code here only
# builds plain data (strings, numbers, lists). Nothing is marked safe.
_ENV: Any = None


def _env() -> Any:
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(
            loader=jinja2.PackageLoader("medfocus.report", "templates"),
            autoescape=True,  # every template, whatever its file name
            undefined=jinja2.StrictUndefined,  # a missing context value is a bug, not an empty string
            trim_blocks=False,
        )
    return _ENV


def _macro(name: str, arg: Any) -> str:
    return str(getattr(_env().get_template("macros.html.jinja").module, name)(arg))


def _fig(png: bytes, alt: str, width: str | None = None) -> dict[str, Any]:
    return {"alt": str(alt), "b64": base64.b64encode(png).decode("ascii"), "width": width}


#: The "source / deviation" cell of the trivial localisation baselines' rows.
TRIVIAL_SOURCE = "trivial baseline that needs no model (medfocus.evaluation.baselines); the floor a method must beat"


def source_of(method: str) -> str:
    """The "source / deviation" line of a table row: the method's (:func:`medfocus.attribution.method_source`),
    the trivial baselines' label, or empty for other rows (e.g. faithfulness references)."""
    from medfocus.attribution import method_source
    from medfocus.evaluation.baselines import is_baseline

    return method_source(method) or (TRIVIAL_SOURCE if is_baseline(method) else "")


def results_table_data(summary: pd.DataFrame, *, model: str, mode: str, method_order: Sequence[str] | None = None,
                       best: Mapping[tuple[str, str], str] | None = None) -> dict[str, Any] | None:
    """The cells of :func:`results_table` as plain data (``None`` when ``model``/``mode`` have no rows).

    A cell is ``None`` (no result), ``{"failed": True, "undefined": bool}`` (every record of the method
    failed; ``undefined`` for a trivial baseline, whose error rows are samples it is not defined for) or
    ``{"mean", "ci", "bold"}`` (``ci``: ``"[lo, hi]"`` or "no CI", :func:`medfocus.evaluation.tables.ci_text`); ``bold`` is set only for the method ``best`` names for that
    ``(dataset, metric)``. Each row also carries the method's "source / deviation" line
    (:func:`medfocus.attribution.method_source`)."""
    df = summary[(summary["model"] == model) & (summary["mode"] == mode)]
    if df.empty:
        return None
    datasets = list(dict.fromkeys(df["dataset"]))
    methods = list(dict.fromkeys(method_order or [])) + [m for m in dict.fromkeys(df["method"]) if m not in (method_order or [])]
    methods = [m for m in methods if m in set(df["method"])]
    idx = {(r.dataset, r.method, r.metric): r for r in df.itertuples(index=False)}
    best = dict(best or {})
    from medfocus.evaluation.baselines import is_baseline

    rows = []
    for me in methods:
        groups = []
        # a trivial baseline's error rows are samples it is not defined for (the finding prior of a finding
        # with no other sample), not failures: said as evaluate says it
        undefined = is_baseline(str(me))
        for ds in datasets:
            n, cells = None, []
            for m in METRICS:
                r = idx.get((ds, me, m))
                if r is not None and int(r.n) == 0 and int(getattr(r, "n_error", 0)) > 0:
                    cells.append({"failed": True, "undefined": undefined})  # not a score of 0, not "no result"
                    continue
                if r is None or not np.isfinite(r.mean):
                    cells.append(None)
                    continue
                n = r.n
                bold = best.get((ds, m)) == me
                cells.append({"failed": False, "mean": f"{r.mean:.1f}", "ci": ci_text(r.ci_low, r.ci_high), "bold": bold})
            errs = max((int(getattr(idx[(ds, me, m)], "n_error", 0)) for m in METRICS if (ds, me, m) in idx), default=0)
            groups.append({"cells": cells, "n": n if n is not None else 0, "errors": errs, "undefined": undefined})
        rows.append({"method": str(me), "source": source_of(str(me)), "groups": groups})
    return {"datasets": [str(d) for d in datasets], "metric_labels": [METRIC_LABELS[m] for m in METRICS], "rows": rows}


def results_table(summary: pd.DataFrame, *, model: str, mode: str, method_order: Sequence[str] | None = None,
                  best: Mapping[tuple[str, str], str] | None = None) -> str:
    """Table-1-style HTML table: methods as rows, datasets as column groups, IoU/F1/Prec./Rec. (x100)
    with their 95% CI below and ``n`` (failed records in red). A method whose records all failed says
    "failed" in its cells, never a number. The second column is each method's "source / deviation" line
    (what it computes, from which paper or code, and how it deviates from the paper's public code). Every name is HTML-escaped (rendered by the autoescaping template).

    Args:
        summary: :func:`summarize` output.
        best: ``{(dataset, metric): method}`` of the methods to mark as best (bold), i.e. those
            significantly better than every other method (:func:`significant_best`); ``None`` marks none.
    Returns:
        the ``<table>`` as a string, ``""`` when ``summary`` has no rows for ``model`` and ``mode``.
    """
    data = results_table_data(summary, model=model, mode=mode, method_order=method_order, best=best)
    return "" if data is None else _macro("results_table", data)


def significant_best(metrics: pd.DataFrame | None, *, n_boot: int = 1000, seed: int = 0,
                     withheld: list[str] | None = None) -> dict[tuple[str, str], dict[tuple[str, str], str]]:
    """``{(model, mode): {(dataset, metric): method}}`` of the methods that are significantly better
    than every other method in their column (:func:`medfocus.evaluation.best_methods`, paired bootstrap).
    ``withheld``, when given, receives one ``"model / mode / dataset / metric: reason"`` per column where no
    test could be made (too few paired samples, :data:`~medfocus.evaluation.significance.MIN_PAIRS`)."""
    from medfocus.evaluation import best_methods

    out: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    if metrics is None or len(metrics) == 0 or "index" not in metrics.columns:
        return out
    for r in best_methods(metrics, METRICS, n_boot=n_boot, seed=seed).itertuples(index=False):
        if r.significant:
            out.setdefault((str(r.model), str(r.mode)), {})[(str(r.dataset), str(r.metric))] = str(r.best)
        elif r.withheld and withheld is not None:
            withheld.append(f"{r.model} / {r.mode} / {r.dataset} / {METRIC_LABELS.get(str(r.metric), r.metric)}: {r.withheld}")
    return out


def frame_table_data(df: pd.DataFrame | None, *, float_fmt: str = "{:.1f}", cls: str = "plain") -> dict[str, Any]:
    """A DataFrame as plain table data: column names and cell strings (floats formatted, non-finite as '–')."""
    if df is None or len(df) == 0:
        return {"cls": cls, "columns": [], "rows": []}
    rows = []
    for rec in df.itertuples(index=False):
        rows.append([(float_fmt.format(v) if np.isfinite(v) else "–") if isinstance(v, (float, np.floating)) else str(v)
                     for v in rec])
    return {"cls": cls, "columns": [str(c) for c in df.columns], "rows": rows}


FAITH_METRICS: tuple[str, ...] = ("iou", "deletion_auc", "insertion_auc")
FAITH_LABELS = {"iou": "IoU", "deletion_auc": "Del. AUC ↓", "insertion_auc": "Ins. AUC ↑"}


def faithfulness_table_data(summary: pd.DataFrame, *, model: str, mode: str, method_order: Sequence[str] | None = None
                            ) -> dict[str, Any] | None:
    """Plausibility beside faithfulness, as the plain data of the ``results_table`` macro: methods (then
    the two reference maps) as rows, per dataset the IoU, deletion AUC and insertion AUC (x100) with their
    95% CI and ``n`` (records with curves); the best method per column is bold (lowest for deletion).
    Methods without any curve (box-only methods) are left out; ``None`` when nothing is left."""
    df = summary[(summary["model"] == model) & (summary["mode"] == mode)]
    has_f = set(df[df["metric"].isin(["deletion_auc", "insertion_auc"])]["method"])
    df = df[df["method"].isin(has_f)]
    if df.empty:
        return None
    datasets = list(dict.fromkeys(df["dataset"]))
    order = list(dict.fromkeys([*(method_order or []), *df["method"]]))
    refs = [m for m in order if str(m).startswith("reference")]
    methods = [m for m in order if m in has_f and m not in refs] + [m for m in refs if m in has_f]
    idx = {(r.dataset, r.method, r.metric): r for r in df.itertuples(index=False)}
    best = {}
    for ds in datasets:
        for m in FAITH_METRICS:
            vals = [idx[(ds, me, m)].mean for me in methods if (ds, me, m) in idx and me not in refs and np.isfinite(idx[(ds, me, m)].mean)]
            best[(ds, m)] = (min(vals) if m == "deletion_auc" else max(vals)) if vals else None
    rows = []
    for me in methods:
        groups = []
        for ds in datasets:
            ns, cells = [], []
            for m in FAITH_METRICS:
                r = idx.get((ds, me, m))
                if r is None or not np.isfinite(r.mean):
                    cells.append(None)
                    continue
                if m != "iou":
                    ns.append(int(r.n))
                bold = best[(ds, m)] is not None and me not in refs and abs(r.mean - best[(ds, m)]) < 1e-9
                cells.append({"mean": f"{r.mean:.1f}", "ci": ci_text(r.ci_low, r.ci_high), "bold": bold, "failed": False})
            groups.append({"cells": cells, "n": max(ns) if ns else 0, "errors": 0, "undefined": False})
        rows.append({"method": str(me), "source": source_of(str(me)), "groups": groups})
    return {"datasets": [str(d) for d in datasets], "metric_labels": [FAITH_LABELS[m] for m in FAITH_METRICS], "rows": rows}


def faithfulness_section(preds: Sequence[Mapping[str, Any]], metrics: pd.DataFrame | None, *, modes: Sequence[str], models: Sequence[str],
                         method_order: Sequence[str], seed: int, keep: Any) -> list[dict[str, Any]] | None:
    """Data of the "Faithfulness beside plausibility" section: per mode and model the
    :func:`faithfulness_table_data` and the mean-curve figure; ``None`` when no record carries curves."""
    if metrics is None or "deletion_auc" not in metrics.columns or not np.isfinite(pd.to_numeric(metrics["deletion_auc"], errors="coerce")).any():
        return None
    from medfocus.evaluation import summarize as _summarize
    from medfocus.evaluation.faithfulness import mean_curves

    fsum = _summarize(metrics, FAITH_METRICS, seed=seed)
    out = []
    for mode in modes:
        for model in models:
            tab = faithfulness_table_data(fsum, model=model, mode=mode, method_order=method_order)
            if tab is None:
                continue
            fig = None
            curves = mean_curves([r for r in preds if r.get("mode") == mode and r.get("model") == model])
            if curves:
                order = {m: i for i, m in enumerate(method_order)}
                curves = dict(sorted(curves.items(), key=lambda kv: (kv[0].startswith("reference"), order.get(kv[0], len(order)), kv[0])))
                png = keep(figures.make_faithfulness_curves(curves, title=f"mean curves: {model}, {MODE_LABELS.get(mode, mode)}"),
                           "faithfulness", mode, model)
                fig = _fig(png, f"faithfulness curves {mode} {model}", width="100%")
            out.append({"label": MODE_LABELS.get(mode, mode), "model": str(model), "table": tab, "fig": fig})
    return out


def frame_table(df: pd.DataFrame, *, float_fmt: str = "{:.1f}", cls: str = "plain") -> str:
    """A DataFrame as a plain HTML table (escaped; floats formatted)."""
    return _macro("frame_table", frame_table_data(df, float_fmt=float_fmt, cls=cls))


RETENTION_LABELS = {
    "model": "model", "dataset": "dataset", "mode": "mode", "editor": "editor", "n": "n positives",
    "errors": "errors", "failed_correct": "✗ correct", "failed_flip": "✗ flip", "failed_background": "✗ background",
    "kept": "kept", "retention_pct": "retention %",
}


def compact_retention(df: pd.DataFrame) -> pd.DataFrame:
    """The retention table's main columns with readable headers (the bench's full table has more):
    gates failed (each sample charged to the first gate it fails), kept, retention %, and the number of
    gate failures caused by an unparseable answer; columns that are all zero are dropped when optional."""
    if not set(RETENTION_LABELS) <= set(df.columns):
        return df
    out = df[list(RETENTION_LABELS)].rename(columns=RETENTION_LABELS)
    unp = [c for c in ("unparseable_correct", "unparseable_flip", "unparseable_background") if c in df.columns]
    if unp:
        out["unparseable answers"] = df[unp].sum(axis=1)
    if "negatives" in df.columns and (df["negatives"] > 0).any():
        out["negatives (correct/n)"] = df["negatives_correct"].astype(str) + "/" + df["negatives"].astype(str)
    return out


def _wrong_answer_info(metrics: pd.DataFrame | None) -> dict[str, str]:
    """The overview line counting the scored records that attribute a wrong answer (``answer_correct`` of
    :func:`medfocus.evaluation.evaluate_records`); empty when ``metrics`` has no such column."""
    from medfocus.evaluation.significance import successful_rows

    if metrics is None or "answer_correct" not in metrics.columns or metrics.empty:
        return {}
    m = successful_rows(metrics)
    m = m[~m["method"].astype(str).str.startswith(("baseline_", "reference"))]
    m = m[np.isfinite(pd.to_numeric(m["iou"], errors="coerce"))] if "iou" in m.columns else m
    known = m["answer_correct"].map(lambda v: isinstance(v, (bool, np.bool_)))
    wrong = int((known & m["answer_correct"].map(lambda v: v is False or v is np.False_)).sum())
    if len(m) == 0:
        return {}
    text = (f"{wrong} of {len(m)} scored records attribute an answer that is not the ground truth; they are scored "
            "against the expert boxes and are in the tables (medfocus report --correct-only leaves them out)")
    if int((~known).sum()):
        text += f"; {int((~known).sum())} carry no answer_parsed / gt_answer (correctness unknown)"
    return {"Wrong answers scored": text}


# ---- record helpers --------------------------------------------------------------------------------
def _read_image(record: Mapping[str, Any], missing: list[str] | None = None) -> np.ndarray | None:
    """The film of a gallery sample (:func:`medfocus.io.paths.record_film`: the one its records were
    computed on); ``None`` with a logged warning when it is missing, unreadable or another film, the reason
    then also appended to ``missing`` (the report lists them under its gallery)."""
    try:
        from medfocus.io import read_image
        from medfocus.io.paths import record_film

        return read_image(record_film(record))[0]
    except Exception as exc:  # a missing image only removes a gallery row (and says why on the page)
        log.warning("gallery: cannot read the film of %s/%s#%s: %s", record.get("model"), record.get("dataset"),
                    record.get("index"), exc)
        if missing is not None:
            missing.append(str(exc))
        return None


def _film_markers(record: Mapping[str, Any]) -> tuple[str, str]:
    """``(image-left, image-right)`` side letters of a gallery sample's film, from its orientation
    (:func:`medfocus.io.reader.read_orientation`: DICOM ``PatientOrientation``, else the display convention)."""
    from medfocus.io import read_orientation
    from medfocus.io.paths import record_film

    return read_orientation(record_film(record)).markers


def gallery_strata(cells: Mapping[tuple, Sequence[Mapping[str, Any]]], mode: str, *, per_finding: int) -> list[tuple[str, list[tuple]]]:
    """The gallery's samples of one mode, stratified by finding: ``[(finding, [cell key, ...]), ...]``,
    findings in alphabetical order, up to ``per_finding`` samples each — those with the most successful
    methods, then by dataset, index and model (deterministic). ``cells`` maps
    ``(model, dataset, index, mode)`` to that sample's records."""
    by_finding: dict[str, list[tuple]] = {}
    for k, recs in cells.items():
        if k[3] == mode:
            by_finding.setdefault(str(recs[0].get("attribute") or "unknown finding"), []).append(k)
    out = []
    for finding in sorted(by_finding):
        keys = sorted(by_finding[finding], key=lambda k: (-sum(1 for r in cells[k] if not r.get("error")), k[1], k[2], k[0]))
        if per_finding > 0:
            out.append((finding, keys[:per_finding]))
    return out


def gallery_panel(rec: Mapping[str, Any], arrays: Mapping[str, np.ndarray], iou: float | None) -> dict[str, Any]:
    """One method's panel of a gallery row (see :func:`medfocus.report.figures.sample_gallery_row`): its
    heatmap, boxes, IoU, error, and for MedFocus the winning concept and whether the fallback fired."""
    ex = rec.get("extras") or {}
    boxes = rec.get("pred_boxes") if rec.get("pred_boxes") is not None else rec.get("heatmap_boxes")
    is_mf = rec["method"] == "medfocus"
    return {"method": rec["method"], "heatmap": arrays.get("heatmap"), "pred_boxes": boxes, "score": iou,
            "error": rec.get("error"), "winner": first_present(ex, "winner", "winning_concept", "concept") if is_mf else None,
            "fallback": bool(first_present(ex, "fallback", "whole_image_fallback")) if is_mf else None}


# ---- the report ------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#1b1b1b;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:34px}
h3{font-size:15px;margin:18px 0 6px} .meta{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:12px;margin:8px 0 14px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:center} thead th{background:#f1f3f6}
th.method{text-align:left;background:#fafafa;font-weight:600} td.src{text-align:left;max-width:260px;font-size:10px;color:#555} td.na{color:#aaa} td.failed{color:#b71c1c;font-style:italic} .ci{color:#777;font-size:10px}
td.n{color:#555} .figs img{margin:4px 10px 4px 0;border:1px solid #eee;max-width:48%;vertical-align:top}
.caption{font-size:13px;color:#333;margin:14px 0 0;overflow-wrap:anywhere} h4{font-size:14px;margin:16px 0 2px} .gallery img{max-width:100%;display:block;margin:8px 0}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:6px 10px;font-size:13px}
.err{color:#b71c1c;font-size:12px} code{background:#f4f4f4;padding:1px 3px}
.legend span{display:inline-block;padding:0 6px;margin-right:10px;font-size:12px}
"""


def _gallery_viewer(records: Sequence[Mapping[str, Any]], folder: Path, base: Path, methods: Sequence[str],
                    title: str) -> tuple[str | None, str | None]:
    """Write one gallery sample's interactive viewer to ``folder/viewers/<sample>.html``.

    Returns ``(relative link, None)``, or ``(None, reason)`` when it could not be written (the gallery
    still shows the figure and prints the reason under it)."""
    r = records[0]
    name = safe_filename("__".join(str(r[f]) for f in ("model", "dataset", "index", "mode"))) + ".html"
    try:
        from medfocus.report.viewer import build_viewer

        build_viewer(records, folder / "viewers" / name, base_dir=base, method_order=methods, title=title)
    except Exception as exc:
        log.warning("viewer for %s failed: %s", name, exc)
        return None, f"{type(exc).__name__}: {exc}"
    return f"viewers/{name}", None


def build_report(
    predictions: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    metrics: pd.DataFrame | None = None,
    summary: pd.DataFrame | None = None,
    retention: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
    title: str = "medfocus report",
    run_info: Mapping[str, Any] | None = None,
    base_dir: str | Path | None = None,
    gallery: int = 1,
    viewers: bool = True,
    medfocus_examples: int = 3,
    method_order: Sequence[str] | None = None,
    figures_dir: str | Path | None = None,
    seed: int = 0,
    fig_format: str = "png",
    dpi: int = figures.DPI,
    baselines: bool = True,
    retention_source: str = "retention table",
) -> Path:
    """Write the self-contained HTML report.

    Args:
        predictions: result records (the runner's store records).
        out: the ``.html`` path to write.
        metrics: per-record metrics (``evaluate_records`` output); computed from ``predictions`` when ``None``.
        summary: the summary table (:func:`summarize` of ``metrics`` when ``None``), columns
            ``model, mode, method, dataset, metric, mean, ci_low, ci_high, n, n_error``.
        retention: the causal filter's retention table (rows of dicts or a DataFrame, as ``bench build``
            writes it), checked by :func:`medfocus.report.retention.check_retention`; rows of models /
            datasets without records here are left out with a note (:func:`~medfocus.report.retention.rows_of_run`).
        retention_source: how errors and the note name the retention table (its file).
        run_info: extra ``key: value`` lines for the overview (e.g. elapsed time, seeds, editors).
        base_dir: directory relative heatmap paths are relative to (default: ``out``'s directory).
        gallery: samples in the gallery per finding, for each mode that has results (the gallery is
            stratified by finding, so every finding of the run is shown).
        viewers: also write each gallery sample's interactive viewer (:mod:`medfocus.report.viewer`) to
            ``viewers/<sample>.html`` next to ``out`` and link it from the gallery.
        medfocus_examples: number of MedFocus examples (concept ranking + token colouring).
        method_order: row order of the tables (default: first appearance).
        figures_dir: also save every figure there, in ``fig_format``.
        seed: seed of the bootstrap intervals and of the paired significance test.
        fig_format: ``png``, ``svg`` or ``pdf`` for the saved figures (the HTML always embeds PNGs).
        dpi: resolution of PNGs and of the rasters inside vector figures.
        baselines: add the trivial-baseline rows (:mod:`medfocus.evaluation.baselines`) to the tables
            (unless ``metrics`` already has them), the comparison of every method with the best of them,
            and the per-finding table.
    Returns:
        the path written.
    Raises:
        ConfigError: unknown ``fig_format`` or a ``dpi`` outside 30..1200.
        DataError: a retention table that is not one, contradicts itself or holds no row of the run.
    """
    from medfocus.errors import ConfigError

    if fig_format not in figures.FORMATS:
        raise ConfigError(f"figure format must be one of {', '.join(figures.FORMATS)}, got {fig_format!r}")
    if not 30 <= int(dpi) <= 1200:
        raise ConfigError(f"dpi must be within 30..1200, got {dpi}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = Path(base_dir) if base_dir is not None else out.parent
    preds = [dict(r) for r in predictions]
    ret_rows, ret_note = None, None
    if retention is not None:  # checked before any scoring or plotting
        from medfocus.report.retention import check_retention, rows_of_run

        ret_rows, ret_note = rows_of_run(check_retention(retention, source=retention_source),
                                         [(r["model"], r["dataset"]) for r in preds], source=retention_source)
    from medfocus.evaluation import evaluate_records
    from medfocus.evaluation.baselines import is_baseline, trivial_baseline_records

    if metrics is None:
        metrics = evaluate_records(preds)
    if baselines and not metrics.empty and not metrics["method"].astype(str).map(is_baseline).any():
        # the trivial rows every localisation table carries (medfocus.evaluation.baselines)
        base_recs = trivial_baseline_records(preds, seed=seed)
        if base_recs:
            metrics = pd.concat([metrics, evaluate_records(base_recs)], ignore_index=True)
            summary = None  # recomputed below with the baseline rows
    if summary is None:
        summary = summarize(metrics, seed=seed)
    if len(summary):
        # Plots and tables follow the paper's order: methods by family then MedFocus, datasets as in Table 1.
        from medfocus.evaluation.tables import DATASET_ORDER, METHOD_ORDER

        rank_ds = {d: i for i, d in enumerate(DATASET_ORDER)}
        rank_me = {m: i for i, m in enumerate([*(method_order or []), *METHOD_ORDER])}
        summary = summary.assign(_d=summary["dataset"].map(lambda d: rank_ds.get(d, len(rank_ds))),
                                 _m=summary["method"].map(lambda m: rank_me.get(m, len(rank_me))))
        summary = summary.sort_values(["_m", "method", "_d", "dataset"], kind="stable").drop(columns=["_d", "_m"])
    fig_dir = Path(figures_dir) if figures_dir else None
    if fig_dir:
        fig_dir.mkdir(parents=True, exist_ok=True)

    def keep(fig: Any, *name_parts: Any) -> bytes:
        """PNG bytes of an open figure for the page; with ``figures_dir`` also the file in ``fig_format``."""
        png = figures.render(fig, "png", dpi, close=fig_format == "png")
        if fig_dir:
            data = png if fig_format == "png" else figures.render(fig, fig_format, dpi)
            # Figure names carry record fields (mode, dataset, model, index): one sanitiser makes each a
            # single safe path component, so a crafted field cannot write outside ``figures_dir``.
            atomic_write_bytes(fig_dir / f"{safe_filename('_'.join(str(p) for p in name_parts))}.{fig_format}", data)
        return png

    models = list(dict.fromkeys(r["model"] for r in preds))
    datasets = list(dict.fromkeys(r["dataset"] for r in preds))
    modes = [m for m in ("direct", "cot", "open") if any(r["mode"] == m for r in preds)]
    if method_order is None:
        try:  # the registry's order: the paper's baselines, then MedFocus
            from medfocus.attribution import BASELINES

            method_order = [*BASELINES, "medfocus"]
        except Exception:
            method_order = []
    methods = list(dict.fromkeys([*method_order, *(r["method"] for r in preds)]))
    methods = [m for m in methods if any(r["method"] == m for r in preds)]
    n_err = sum(1 for r in preds if r.get("error"))
    n_samples = len({(r["model"], r["dataset"], r["index"], r["mode"]) for r in preds})
    ctx: dict[str, Any] = {"title": str(title), "css": CSS, "no_records": not preds}

    # ---- overview
    # what the attributed answers are: only "split" records passed the causal filter, so a retention table
    # beside records of unfiltered samples must not read as describing them
    src_labels = {"split": "a causally filtered split", "split_other_model": "another model's split (--relabel-split-model)",
                  "given": "a given answer", "model": "the model's own answer on unfiltered samples",
                  "ground_truth": "the ground-truth answer", "": "records that do not say (written before answer_source)"}
    from collections import Counter

    sources = Counter(str(r.get("answer_source") or "") for r in preds)
    unfiltered = sum(n for s, n in sources.items() if s != "split")
    if ret_rows is not None and unfiltered:
        ret_note = ((ret_note + " ") if ret_note else "") + (
            f"{unfiltered} of {len(preds)} records were not attributed on a causally filtered split (see 'Answers "
            "attributed' above): this table describes the filter's run, not their samples.")
    info = {
        "Models": ", ".join(map(str, models)),
        "Datasets": ", ".join(map(str, datasets)),
        "Modes": ", ".join(MODE_LABELS.get(m, m) for m in modes),
        "Methods": f"{len(methods)}: " + ", ".join(map(str, methods)),
        "Records": f"{len(preds)} ({n_samples} model/sample/mode cells; {n_err} failed)",
        "Answers attributed": "; ".join(f"{n} from {src_labels.get(s, s)}" for s, n in sorted(sources.items())) or "–",
        **_wrong_answer_info(metrics),
        **{str(k): str(v) for k, v in (run_info or {}).items()},
        "Generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    ctx["info"] = list(info.items())

    # ---- results tables
    from medfocus.evaluation.significance import MIN_PAIRS, TEST_DESCRIPTION

    withheld: list[str] = []
    best = significant_best(metrics, seed=seed, withheld=withheld)
    ctx["best_note"] = TEST_DESCRIPTION.format(n_boot=1000, level=95, min_pairs=MIN_PAIRS).capitalize()
    ctx["min_pairs"] = MIN_PAIRS
    # columns where no method could be called best for lack of pairs: said, not left to read as "no winner"
    ctx["best_withheld"] = (f"Bold withheld in {len(withheld)} column(s) with fewer than {MIN_PAIRS} paired samples "
                            f"(too few for the interval to mean anything): " + "; ".join(withheld[:6])
                            + (f"; and {len(withheld) - 6} more" if len(withheld) > 6 else "")) if withheld else None
    ctx["no_ci_note"] = bool(len(summary) and (np.isfinite(pd.to_numeric(summary["mean"], errors="coerce"))
                                               & ~np.isfinite(pd.to_numeric(summary["ci_low"], errors="coerce"))).any())
    ctx["results"] = []
    for mode in modes:
        tables = []
        for model in models:
            tab = results_table_data(summary, model=model, mode=mode, method_order=methods, best=best.get((model, mode), {}))
            if tab is not None:
                tables.append({"model": str(model), "table": tab})
        ctx["results"].append({"label": MODE_LABELS.get(mode, mode), "tables": tables})

    # ---- faithfulness beside plausibility
    ctx["faithfulness"] = faithfulness_section(preds, metrics, modes=modes, models=models, method_order=methods, seed=seed, keep=keep)

    # ---- trivial baselines and per-finding results
    ctx["baselines"] = ctx["by_finding"] = None
    if baselines:
        from medfocus.evaluation.baselines import compare_to_baselines, finding_table

        comp = compare_to_baselines(metrics, ["iou"], seed=seed)
        if len(comp):
            comp = comp.assign(interval=[ci_text(lo, hi, signed=True) if np.isfinite(d) else "–"
                                         for d, lo, hi in zip(comp["difference"], comp["ci_low"], comp["ci_high"])],
                               verdict=["n/a" if b is None else ("beats it" if b else "does not beat it") for b in comp["beats"]])
            comp = comp[["model", "mode", "dataset", "method", "method_mean", "baseline", "baseline_mean", "difference",
                         "interval", "n_pairs", "verdict"]].rename(columns={
                "method_mean": "IoU (n pairs)", "baseline": "best trivial baseline", "baseline_mean": "its IoU (n pairs)",
                "difference": "difference", "interval": "95% CI", "n_pairs": "n pairs", "verdict": "verdict"})
            ctx["baselines"] = frame_table_data(comp)
        ft = finding_table(metrics, "iou")
        if len(ft):
            wide = ft.assign(cell=[f"{m:.1f} ({n})" for m, n in zip(ft["mean"], ft["n"])]).pivot_table(
                index=["model", "mode", "dataset", "method"], columns="attribute", values="cell", aggfunc="first")
            wide = wide.reset_index().fillna("–")
            wide.columns = [str(c) for c in wide.columns]
            ctx["by_finding"] = frame_table_data(wide)

    # ---- retention
    ctx["retention"] = frame_table_data(compact_retention(ret_rows), float_fmt="{:.3g}") if ret_rows is not None else None
    ctx["retention_note"] = ret_note

    # ---- plots
    ctx["plots"] = None
    if len(summary):
        plots = []
        for mode in modes:
            for metric in ("iou", "f1"):
                if ((summary["mode"] == mode) & (summary["metric"] == metric)).any():
                    png = keep(figures.make_metric_bars(summary, metric=metric, mode=mode), "bars", metric, mode)
                    plots.append(_fig(png, f"{metric} bars {mode}"))
            sub = summary[(summary["mode"] == mode) & (summary["metric"] == "iou")]
            if len(sub) and len(set(zip(sub["model"], sub["dataset"]))) > 1:  # one column would repeat the bars
                png = keep(figures.make_method_model_heatmap(summary, metric="iou", mode=mode), "matrix_iou", mode)
                plots.append(_fig(png, f"method x model {mode}"))
        ctx["plots"] = plots

    # ---- gallery
    iou_of: dict[tuple, float] = {}
    if metrics is not None and len(metrics) and "iou" in metrics.columns:
        for r in metrics.itertuples(index=False):
            iou_of[(r.model, r.dataset, int(r.index), r.mode, r.method)] = float(r.iou)
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in preds:
        cells.setdefault((r["model"], r["dataset"], int(r["index"]), r["mode"]), []).append(r)
    ctx["gallery_per_finding"] = int(gallery)
    ctx["gallery"] = []
    ctx["gallery_missing"] = missing = []
    for mode in modes:
        strata = []
        for finding, chosen in gallery_strata(cells, mode, per_finding=gallery):
            items = []
            for k in chosen:
                recs = {r["method"]: r for r in cells[k]}
                first = next(iter(recs.values()))
                img = _read_image(first, missing)
                if img is None:
                    continue
                panels = [gallery_panel(recs[me], load_arrays(recs[me], base), iou_of.get((*k[:4], me)))
                          for me in methods if me in recs]
                # The page shows the whole caption (wrapped by the browser); the figure's own title is wrapped
                # and, for a long rationale, shortened at a word boundary with an ellipsis.
                t = f"{k[0]} · {k[1]} #{k[2]} · {first.get('attribute')} · answer: {first.get('answer')}"
                fig = figures.make_sample_gallery_row(img, first.get("gt_boxes") or [], panels, markers=_film_markers(first),
                                                      title=textwrap.shorten(t, width=400, placeholder=" …"))
                png = keep(fig, "gallery", mode, k[1], k[2], k[0])
                item = {"caption": t, "fig": _fig(png, t), "viewer": None, "viewer_error": None}
                if viewers:
                    item["viewer"], item["viewer_error"] = _gallery_viewer(cells[k], out.parent, base, methods,
                                                                           f"{title} · {k[0]} · {k[1]} #{k[2]} · {k[3]}")
                items.append(item)
            if items:
                strata.append({"finding": finding, "entries": items})
        if strata:
            ctx["gallery"].append({"label": MODE_LABELS.get(mode, mode), "strata": strata})

    # ---- MedFocus
    ctx["medfocus"] = None
    mf = [r for r in preds if r["method"] == "medfocus" and not r.get("error")]
    if mf:
        mf.sort(key=lambda r: (r["mode"] != "cot", r["dataset"], int(r["index"]), r["model"]))
        examples = []
        for r in mf:
            if len(examples) >= medfocus_examples:
                break
            view = medfocus_view(r, load_arrays(r, base))
            if not view.get("deltas"):
                continue
            tau = (r.get("extras") or {}).get("tau")
            figs = [_fig(keep(figures.make_concept_ranking(view["deltas"], winner=view.get("winner"), fallback=view.get("fallback"), tau=tau),
                              "concepts", r["mode"], r["index"]), "concept ranking")]
            if view.get("tokens"):
                figs.append(_fig(keep(figures.make_token_attribution(view["tokens"], view["token_scores"],
                                                                     title="answer tokens coloured by each concept's drop in the token's log-prob"),
                                      "tokens", r["mode"], r["index"]), "token attribution", width="100%"))
            examples.append({"model": str(r["model"]), "dataset": str(r["dataset"]), "index": str(r["index"]),
                             "attribute": str(r.get("attribute")), "mode": str(r["mode"]), "winner": str(view.get("winner")),
                             "fallback": bool(view.get("fallback")), "figs": figs})
        ctx["medfocus"] = examples

    # ---- failures
    ctx["failures"] = None
    if n_err:
        by_method: dict[str, list[Mapping[str, Any]]] = {}
        for r in preds:
            if r.get("error"):
                by_method.setdefault(r["method"], []).append(r)
        rows = [{"method": m, "failed records": len(v), "first error": str(v[0]["error"])[:200]} for m, v in by_method.items()]
        ctx["failures"] = frame_table_data(pd.DataFrame(rows))

    doc = _env().get_template("report.html.jinja").render(**ctx)
    atomic_write_text(out, doc)
    return out
