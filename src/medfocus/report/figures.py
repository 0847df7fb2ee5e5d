"""Matplotlib figures of a run, returned as PNG bytes (the HTML report embeds them; callers may save them).

All functions are pure: data in, ``bytes`` (a PNG file) out. They use the non-interactive Agg backend
and close their figures, so they are safe in long runs and on headless machines.

The summary table every plot reads has one row per ``(model, dataset, mode, method, metric)`` with
columns ``mean``, ``ci_low``, ``ci_high`` (95% CI) in percent and ``n`` (see :func:`medfocus.evaluation.summarize`).
"""

from __future__ import annotations

import functools
import io
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

#: Colours of the boxes in overlays.
GT_COLOR = "#00e676"
PRED_COLOR = "#ff1744"


def _literal_text(fn: Callable[..., bytes]) -> Callable[..., bytes]:
    """Draw every string as literal text: labels come from records (model, dataset, finding, method,
    answer tokens), and matplotlib would otherwise parse ``$...$`` as mathtext (a crafted label could
    fail the whole report) or hand it to LaTeX."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> bytes:
        with plt.rc_context({"text.parse_math": False, "text.usetex": False}):
            return fn(*args, **kwargs)

    return wrapper


def _png(fig: Any, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _draw_boxes(ax: Any, boxes: Sequence[Sequence[float]] | None, color: str, lw: float = 1.6, ls: str = "-") -> None:
    from matplotlib.patches import Rectangle

    for b in boxes or []:
        x1, y1, x2, y2 = (float(v) for v in b)
        # Half-open pixel edges: pixel i spans [i - 0.5, i + 0.5] in imshow coordinates.
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=lw, linestyle=ls))


@_literal_text
def metric_bars(summary: pd.DataFrame, *, metric: str = "iou", mode: str | None = None, title: str | None = None) -> bytes:
    """Per-method bars of ``metric`` (mean x100 with 95% CI error bars), one bar group per method and one
    colour per (model, dataset).

    Args:
        summary: summary table (see module docstring).
        metric: ``"iou"``, ``"f1"``, ``"precision"`` or ``"recall"``.
        mode: keep only this output mode.
    """
    df = summary[summary["metric"] == metric]
    if mode is not None:
        df = df[df["mode"] == mode]
    methods = list(dict.fromkeys(df["method"]))
    groups = list(dict.fromkeys(zip(df["model"], df["dataset"])))
    fig_w = max(6.0, 0.55 * len(methods) * max(1, len(groups)) + 2)
    fig, ax = plt.subplots(figsize=(min(fig_w, 16), 3.6))
    width = 0.8 / max(1, len(groups))
    cmap = plt.get_cmap("tab10")
    for gi, (model, ds) in enumerate(groups):
        sub = df[(df["model"] == model) & (df["dataset"] == ds)].set_index("method")
        xs, ys, los, his = [], [], [], []
        for mi, m in enumerate(methods):
            if m in sub.index:
                row = sub.loc[m]
                xs.append(mi - 0.4 + width * (gi + 0.5))
                ys.append(float(row["mean"]))
                los.append(float(row["mean"]) - float(row["ci_low"]))
                his.append(float(row["ci_high"]) - float(row["mean"]))
        ax.bar(xs, ys, width=width * 0.95, color=cmap(gi % 10), label=f"{model} / {ds}")
        ax.errorbar(xs, ys, yerr=[np.maximum(los, 0), np.maximum(his, 0)], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric.upper() if metric == 'iou' else metric.capitalize()} (x100)")
    ax.set_ylim(0, max(5.0, float(df["ci_high"].max()) * 1.1 if len(df) else 100.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"{metric} per method" + (f" ({mode})" if mode else ""), fontsize=10)
    if groups:
        ax.legend(fontsize=7, frameon=False, loc="upper right")
    return _png(fig)


@_literal_text
def method_model_heatmap(summary: pd.DataFrame, *, metric: str = "iou", mode: str | None = None, title: str | None = None) -> bytes:
    """Matrix of ``metric`` means (x100): methods as rows, ``model / dataset`` as columns, values annotated."""
    df = summary[summary["metric"] == metric]
    if mode is not None:
        df = df[df["mode"] == mode]
    df = df.assign(column=df["model"] + " / " + df["dataset"])
    mat = df.pivot_table(index="method", columns="column", values="mean", aggfunc="first", sort=False)
    methods = list(dict.fromkeys(df["method"]))
    mat = mat.reindex(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * max(1, mat.shape[1]), 0.8 + 0.32 * max(1, mat.shape[0])))
    vals = mat.to_numpy(dtype=float)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: no result (e.g. every record failed)
    finite = vals[np.isfinite(vals)]
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, aspect="auto", vmin=0, vmax=max(1.0, float(finite.max()) if finite.size else 1.0))
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels(mat.columns, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(mat.shape[0]))
    ax.set_yticklabels(mat.index, fontsize=8)
    for (r, c), v in np.ndenumerate(vals):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v < float(finite.max()) * 0.6 else "black")
        else:
            ax.text(c, r, "n/a", ha="center", va="center", fontsize=7, color="#666666")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(title or f"{metric} (x100), method x model" + (f" ({mode})" if mode else ""), fontsize=10)
    return _png(fig)


@_literal_text
def sample_gallery_row(
    image: np.ndarray,
    gt_boxes: Sequence[Sequence[float]],
    panels: Sequence[Mapping[str, Any]],
    *,
    title: str = "",
    max_cols: int = 7,
) -> bytes:
    """One sample: the X-ray with its GT boxes, then one panel per method.

    Args:
        image: ``(H, W)`` uint8 X-ray.
        gt_boxes: expert boxes (original pixels, half-open) drawn in green on every panel.
        panels: dicts with ``"method"`` (str), ``"heatmap"`` (``(H, W)`` float or ``None``),
            ``"pred_boxes"`` (list or ``None``, drawn in red dashed), optional ``"score"`` (e.g. IoU, 0..1)
            and ``"error"`` (str; the panel then says the method failed).
        max_cols: panels per row (the figure wraps).
    """
    n = 1 + len(panels)
    cols = min(max_cols, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.35 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    ax0 = axes[0, 0]
    ax0.imshow(image, cmap="gray", vmin=0, vmax=255)
    _draw_boxes(ax0, gt_boxes, GT_COLOR)
    ax0.set_title("X-ray + GT", fontsize=8)
    for k, p in enumerate(panels, start=1):
        ax = axes[k // cols, k % cols]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        heat = p.get("heatmap")
        if heat is not None:
            h = np.asarray(heat, dtype=np.float32)
            h = np.nan_to_num(h, nan=0.0)
            lo, hi = float(h.min()), float(h.max())
            if hi > lo:  # a constant map carries no spatial information: show the bare image
                ax.imshow((h - lo) / (hi - lo), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        _draw_boxes(ax, gt_boxes, GT_COLOR, lw=1.0)
        _draw_boxes(ax, p.get("pred_boxes"), PRED_COLOR, lw=1.4, ls="--")
        label = str(p.get("method", ""))
        if p.get("error"):
            label += "\n(failed)"
        elif p.get("score") is not None:
            label += f"\nIoU {100 * float(p['score']):.0f}"
        ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig, dpi=90)


@_literal_text
def concept_ranking(deltas: Mapping[str, float], *, winner: str | None = None, title: str = "MedFocus concept ranking") -> bytes:
    """Horizontal bars of the log-prob drop per concept (largest on top; the winner highlighted)."""
    items = sorted(((str(k), float(v)) for k, v in deltas.items()), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(4.6, 0.3 * max(3, len(items)) + 0.8))
    names = [k for k, _ in items]
    vals = [v for _, v in items]
    colors = ["#d81b60" if (winner is not None and k == winner) else "#1e88e5" for k in names]
    ax.barh(range(len(items)), vals, color=colors)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("drop in answer log-prob (Δ)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    return _png(fig)


@_literal_text
def token_attribution(tokens: Sequence[str], scores: Mapping[str, Sequence[float]], *, title: str = "", max_rows: int = 4, wrap: int = 12) -> bytes:
    """The answer's tokens as coloured cells, one block per concept: colour = that concept's attribution
    of the token (normalised per concept, white = 0, dark red = the concept's largest value).

    Args:
        tokens: the ``T`` answer tokens as decoded strings.
        scores: ``{concept: (T,) values}`` (e.g. per-token log-prob drops); the ``max_rows`` concepts
            with the largest total are shown.
        wrap: tokens per text line.
    """
    T = len(tokens)
    ranked = sorted(scores.items(), key=lambda kv: -float(np.nansum(np.maximum(np.asarray(kv[1], float), 0))))[:max_rows]
    lines = max(1, int(np.ceil(T / wrap)))
    n_blocks = max(1, len(ranked))
    fig_h = 0.35 + n_blocks * (0.3 + 0.32 * lines)
    fig, ax = plt.subplots(figsize=(9.5, fig_h))
    ax.axis("off")
    cmap = plt.get_cmap("Reds")
    y = 0.0
    total_h = n_blocks * (1 + lines)
    for concept, vals in ranked:
        v = np.maximum(np.nan_to_num(np.asarray(vals, dtype=float), nan=0.0), 0.0)
        vmax = float(v.max()) if v.size and v.max() > 0 else 1.0
        ax.text(0, total_h - y - 0.5, concept, fontsize=8, fontweight="bold", va="center")
        y += 1
        for t, tok in enumerate(tokens):
            r, c = divmod(t, wrap)
            val = float(v[t]) / vmax if t < len(v) else 0.0
            text = tok.replace("\n", "⏎") or "·"
            ax.text(
                c / wrap, total_h - (y + r) - 0.5, text[:14], fontsize=7, va="center", ha="left",
                bbox=dict(boxstyle="round,pad=0.15", facecolor=cmap(0.05 + 0.85 * val), edgecolor="none"),
                color="white" if val > 0.6 else "black",
            )
        y += lines
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, total_h)
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return _png(fig)
