"""Matplotlib figures of a run, as image bytes (PNG by default; SVG or PDF for papers).

All public functions are pure: data in, ``bytes`` (a PNG, SVG or PDF file, ``fmt=``) out; the ``make_*``
functions return the open :class:`matplotlib.figure.Figure` so a caller can render one figure in
several formats (:func:`render` closes it). They use the non-interactive Agg backend and close
their figures, so they are safe in long runs and on headless machines.

Sizes are chosen for print: fonts of at least 8 pt at the figure's physical size, so a figure
placed at its natural width in a paper (or shown at 1400 px) stays readable.

The summary table every plot reads has one row per ``(model, dataset, mode, method, metric)`` with
columns ``mean``, ``ci_low``, ``ci_high`` (95% CI) in percent, ``n`` and ``n_error`` (see
:func:`medfocus.evaluation.summarize`); a row with ``n == 0`` and ``n_error > 0`` is a method whose
records all failed and is drawn as "failed", never as a zero.
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import patheffects  # noqa: E402

#: Colours of the boxes in overlays.
GT_COLOR = "#00e676"
PRED_COLOR = "#ff1744"
#: Output formats :func:`render` writes (``--format`` of ``medfocus report``).
FORMATS: tuple[str, ...] = ("png", "svg", "pdf")
MIME = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}
#: Default raster resolution (dots per inch) of PNG output and of the heatmaps embedded in SVG/PDF.
DPI = 150
#: Colour map of attribution heatmaps (perceptually uniform, readable in grey scale prints).
HEAT_CMAP = "inferno"
#: Shown for a method whose records all failed (instead of a bar or a value).
FAILED = "failed"

#: Label style on films: white on a dark box (text stays text in SVG/PDF, readable on any heatmap).
_ON_FILM = dict(color="white", bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.65, edgecolor="none"))


#: rcParams under which every figure is built and saved: strings are drawn literally (labels come from
#: records, and matplotlib would otherwise parse ``$...$`` as mathtext — a crafted label could fail the
#: whole report — or hand it to LaTeX).
_LITERAL = {"text.parse_math": False, "text.usetex": False}


def _literal_text(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Build the figure with every string drawn as literal text (see :data:`_LITERAL`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.rc_context(_LITERAL):
            return fn(*args, **kwargs)

    return wrapper


def render(fig: Any, fmt: str = "png", dpi: int = DPI, *, close: bool = True) -> bytes:
    """The figure as file bytes in ``fmt`` (``png``, ``svg`` or ``pdf``) at ``dpi``.

    Raises:
        ValueError: unknown ``fmt`` or a non-positive ``dpi``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not dpi or dpi <= 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    buf = io.BytesIO()
    # Fixed metadata: the same figure gives the same bytes (no creation date in SVG/PDF).
    meta = {"Date": None} if fmt in ("svg", "pdf") else None
    # Stable SVG element ids; text kept as text (SVG) and TrueType (PDF), so labels stay editable in a paper.
    with plt.rc_context({**_LITERAL, "svg.hashsalt": "medfocus", "svg.fonttype": "none", "pdf.fonttype": 42}):
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)
    if close:
        plt.close(fig)
    return buf.getvalue()


def _failed_rows(df: pd.DataFrame) -> pd.Series:
    """Rows of a summary table that stand for a method whose every record failed."""
    if "n_error" not in df.columns:
        return pd.Series(False, index=df.index)
    n = pd.to_numeric(df["n"], errors="coerce").fillna(0) if "n" in df.columns else 0
    return (n == 0) & (pd.to_numeric(df["n_error"], errors="coerce").fillna(0) > 0)


def _draw_boxes(ax: Any, boxes: Sequence[Sequence[float]] | None, color: str, lw: float = 1.6, ls: str = "-",
                outline: bool = True) -> None:
    from matplotlib.patches import Rectangle

    for b in boxes or []:
        x1, y1, x2, y2 = (float(v) for v in b)
        # Half-open pixel edges: pixel i spans [i - 0.5, i + 0.5] in imshow coordinates.
        r = Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=lw, linestyle=ls)
        if outline:  # a dark rim keeps the box visible on top of any heatmap colour
            r.set_path_effects([patheffects.withStroke(linewidth=lw + 2.0, foreground="black")])
        ax.add_patch(r)


def _side_markers(ax: Any, markers: Sequence[str], fontsize: float = 9) -> None:
    """``markers = (image-left, image-right)`` patient-direction letters drawn on the film's top corners: the
    film's orientation (:attr:`medfocus.io.reader.FilmOrientation.markers`; ``("R", "L")`` in the standard
    display, the patient's right on the image's left)."""
    for x, label, ha in ((0.03, markers[0], "left"), (0.97, markers[1], "right")):
        ax.text(x, 0.97, label, transform=ax.transAxes, ha=ha, va="top", fontsize=fontsize, fontweight="bold", **_ON_FILM)


def wrap(text: str, width: int) -> str:
    """``text`` wrapped at word boundaries to lines of at most ``width`` characters (never cut mid-word
    unless a single word is longer than a line)."""
    return "\n".join(textwrap.wrap(" ".join(str(text).split()), width=max(8, int(width)), break_long_words=True,
                                   break_on_hyphens=False)) or ""


@_literal_text
def make_metric_bars(summary: pd.DataFrame, *, metric: str = "iou", mode: str | None = None, title: str | None = None) -> Any:
    """Figure of :func:`metric_bars` (open; render it with :func:`render`)."""
    df = summary[summary["metric"] == metric]
    if mode is not None:
        df = df[df["mode"] == mode]
    methods = list(dict.fromkeys(df["method"]))
    groups = list(dict.fromkeys(zip(df["model"], df["dataset"])))
    fig_w = max(6.5, 0.6 * len(methods) * max(1, len(groups)) + 2)
    fig, ax = plt.subplots(figsize=(min(fig_w, 16), 4.2))
    width = 0.8 / max(1, len(groups))
    cmap = plt.get_cmap("tab10")
    failed = _failed_rows(df)
    finite_hi = pd.to_numeric(df.loc[~failed, "ci_high"], errors="coerce")
    top = max(5.0, float(finite_hi.max()) * 1.1 if finite_hi.notna().any() else 100.0)
    for gi, (model, ds) in enumerate(groups):
        sel = (df["model"] == model) & (df["dataset"] == ds)
        sub, sub_failed = df[sel].set_index("method"), failed[sel].to_numpy()
        failed_methods = set(df[sel]["method"][sub_failed])
        xs, ys, los, his = [], [], [], []
        for mi, m in enumerate(methods):
            if m not in sub.index:
                continue
            x = mi - 0.4 + width * (gi + 0.5)
            if m in failed_methods:
                # Every record failed: a hatched outline and the word, so it cannot be read as a score of 0.
                ax.bar([x], [top * 0.25], width=width * 0.95, facecolor="none", edgecolor="#9e9e9e", hatch="///", linewidth=0.8)
                ax.text(x, top * 0.02, FAILED, rotation=90, ha="center", va="bottom", fontsize=8, color="#b71c1c")
                continue
            row = sub.loc[m]
            if not math.isfinite(float(row["mean"])):
                continue
            xs.append(x)
            ys.append(float(row["mean"]))
            los.append(float(row["mean"]) - float(row["ci_low"]))
            his.append(float(row["ci_high"]) - float(row["mean"]))
        ax.bar(xs, ys, width=width * 0.95, color=cmap(gi % 10), label=f"{model} / {ds}")
        if xs:
            ax.errorbar(xs, ys, yerr=[np.maximum(los, 0), np.maximum(his, 0)], fmt="none", ecolor="black", elinewidth=0.9, capsize=2.5)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=9)
    ax.tick_params(axis="y", labelsize=9)
    ax.set_ylabel(f"{metric.upper() if metric == 'iou' else metric.capitalize()} (x100), mean and 95% CI", fontsize=9)
    ax.set_ylim(0, top)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"{metric} per method" + (f" ({mode})" if mode else ""), fontsize=11)
    if groups:
        ax.legend(fontsize=8, frameon=False, loc="upper right")
    return fig


def metric_bars(summary: pd.DataFrame, *, metric: str = "iou", mode: str | None = None, title: str | None = None,
                fmt: str = "png", dpi: int = DPI) -> bytes:
    """Per-method bars of ``metric`` (mean x100 with 95% CI error bars), one bar group per method and one
    colour per (model, dataset); a method whose records all failed is a hatched bar labelled "failed".

    Args:
        summary: summary table (see module docstring).
        metric: ``"iou"``, ``"f1"``, ``"precision"`` or ``"recall"``.
        mode: keep only this output mode.
        fmt, dpi: output format and resolution (:func:`render`).
    """
    return render(make_metric_bars(summary, metric=metric, mode=mode, title=title), fmt, dpi)


@_literal_text
def make_method_model_heatmap(summary: pd.DataFrame, *, metric: str = "iou", mode: str | None = None, title: str | None = None) -> Any:
    """Figure of :func:`method_model_heatmap` (open)."""
    df = summary[summary["metric"] == metric]
    if mode is not None:
        df = df[df["mode"] == mode]
    df = df.assign(column=df["model"] + " / " + df["dataset"], _failed=_failed_rows(df))
    mat = df.pivot_table(index="method", columns="column", values="mean", aggfunc="first", sort=False, dropna=False)
    failed = df.pivot_table(index="method", columns="column", values="_failed", aggfunc="first", sort=False, dropna=False)
    methods = list(dict.fromkeys(df["method"]))
    mat, failed = mat.reindex(methods), failed.reindex(index=methods, columns=mat.columns)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * max(1, mat.shape[1]), 1.0 + 0.36 * max(1, mat.shape[0])))
    vals = mat.to_numpy(dtype=float)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: no result (e.g. every record failed)
    finite = vals[np.isfinite(vals)]
    vmax = max(1.0, float(finite.max()) if finite.size else 1.0)
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, aspect="auto", vmin=0, vmax=vmax)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels(mat.columns, rotation=20, ha="right", fontsize=9)
    ax.set_yticks(range(mat.shape[0]))
    ax.set_yticklabels(mat.index, fontsize=9)
    fail = failed.to_numpy(dtype=object)
    for (r, c), v in np.ndenumerate(vals):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < vmax * 0.6 else "black")
        else:
            ax.text(c, r, FAILED if fail[r, c] is True else "n/a", ha="center", va="center", fontsize=8,
                    color="#b71c1c" if fail[r, c] is True else "#666666")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(f"{metric} (x100)", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    ax.set_title(title or f"{metric} (x100), method x model" + (f" ({mode})" if mode else ""), fontsize=11)
    return fig


def method_model_heatmap(summary: pd.DataFrame, *, metric: str = "iou", mode: str | None = None, title: str | None = None,
                         fmt: str = "png", dpi: int = DPI) -> bytes:
    """Matrix of ``metric`` means (x100): methods as rows, ``model / dataset`` as columns, values annotated,
    with a colour bar; a cell whose records all failed says "failed" (grey), a missing one "n/a"."""
    return render(make_method_model_heatmap(summary, metric=metric, mode=mode, title=title), fmt, dpi)


def panel_label(panel: Mapping[str, Any]) -> str:
    """The title of one gallery panel: the method, then its outcome — "failed", the IoU, and for MedFocus
    the winning concept or "whole-image fallback"."""
    label = str(panel.get("method", ""))
    if panel.get("error"):
        return label + "\nfailed"
    if panel.get("fallback"):
        label += "\nwhole-image fallback"
    elif panel.get("winner"):
        label += "\n" + str(panel["winner"])
    if panel.get("score") is not None and math.isfinite(float(panel["score"])):
        label += f"\nIoU {100 * float(panel['score']):.0f}"
    return label


@_literal_text
def make_sample_gallery_row(
    image: np.ndarray,
    gt_boxes: Sequence[Sequence[float]],
    panels: Sequence[Mapping[str, Any]],
    *,
    title: str = "",
    max_cols: int = 5,
    panel_inches: float = 2.3,
    markers: Sequence[str] = ("R", "L"),
) -> Any:
    """Figure of :func:`sample_gallery_row` (open). ``markers``: ``(image-left, image-right)`` side letters,
    the film's :attr:`FilmOrientation.markers <medfocus.io.reader.FilmOrientation.markers>` (default: the
    standard display, the patient's right on the image's left).

    Five 2.3-inch panels per row by default: shown at the report's 1300-px width, 9-pt titles render at
    about 13 px (seven panels per row would shrink them to about 9 px)."""
    from matplotlib.patches import Rectangle

    n = 1 + len(panels)
    cols = min(max_cols, n)
    rows = int(np.ceil(n / cols))
    has_heat = any(p.get("heatmap") is not None and not p.get("error") for p in panels)
    fig_w = panel_inches * cols + (0.6 if has_heat else 0.0)
    title_lines = wrap(title, int(fig_w * 13)).count("\n") + 1 if title else 0
    fig, axes = plt.subplots(rows, cols, figsize=(fig_w, (panel_inches + 0.75) * rows + 0.25 * title_lines), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    H, W = image.shape[:2]
    ax0 = axes[0, 0]
    ax0.imshow(image, cmap="gray", vmin=0, vmax=255)
    _draw_boxes(ax0, gt_boxes, GT_COLOR, lw=1.8)
    _side_markers(ax0, markers)
    ax0.set_title("X-ray + expert boxes", fontsize=9)
    mappable = None
    for k, p in enumerate(panels, start=1):
        ax = axes[k // cols, k % cols]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        heat = p.get("heatmap")
        if heat is not None and not p.get("error"):
            h = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
            lo, hi = float(h.min()), float(h.max())
            if hi > lo:  # a constant map carries no spatial information: show the bare image
                mappable = ax.imshow((h - lo) / (hi - lo), cmap=HEAT_CMAP, alpha=0.5, vmin=0, vmax=1)
        if p.get("error"):
            ax.imshow(np.full((H, W), 255, np.uint8), cmap="gray", vmin=0, vmax=255, alpha=0.6)
            ax.text(0.5, 0.5, FAILED, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#b71c1c", fontweight="bold")
        elif p.get("fallback"):
            # The whole-image answer: a labelled frame, not a bare one.
            ax.add_patch(Rectangle((-0.5, -0.5), W, H, fill=False, edgecolor=PRED_COLOR, linewidth=3, linestyle="--"))
            ax.text(0.5, 0.06, "whole image", transform=ax.transAxes, ha="center", va="bottom", fontsize=9, **_ON_FILM)
        else:
            _draw_boxes(ax, p.get("pred_boxes"), PRED_COLOR, lw=1.5, ls="--")
        _draw_boxes(ax, gt_boxes, GT_COLOR, lw=1.8)  # last: expert boxes stay on top of heatmap and predictions
        _side_markers(ax, markers, fontsize=8)
        ax.set_title(panel_label(p), fontsize=9)
    if title:
        fig.suptitle(wrap(title, int(fig_w * 13)), fontsize=10)
    if mappable is not None:
        cax = fig.add_axes((1.0 - 0.35 / fig_w, 0.15, 0.12 / fig_w, 0.6))
        cb = fig.colorbar(mappable, cax=cax)
        cb.set_label("attribution (min-max per panel)", fontsize=8)
        cb.ax.tick_params(labelsize=8)
        fig.subplots_adjust(right=1.0 - 0.6 / fig_w)
    return fig


def sample_gallery_row(
    image: np.ndarray,
    gt_boxes: Sequence[Sequence[float]],
    panels: Sequence[Mapping[str, Any]],
    *,
    title: str = "",
    max_cols: int = 5,
    fmt: str = "png",
    dpi: int = DPI,
    markers: Sequence[str] = ("R", "L"),
) -> bytes:
    """One sample: the X-ray with its expert boxes and R/L side markers, then one panel per method, with
    a colour bar for the heatmaps.

    Args:
        image: ``(H, W)`` uint8 X-ray.
        gt_boxes: expert boxes (original pixels, half-open) drawn in green, outlined, on top of every panel.
        panels: dicts with ``"method"`` (str), ``"heatmap"`` (``(H, W)`` float or ``None``; min-max
            normalised for display), ``"pred_boxes"`` (list or ``None``, drawn in red dashed), optional
            ``"score"`` (IoU, 0..1), ``"error"`` (str; the panel then says "failed"), ``"winner"``
            (MedFocus' winning concept, named in the title) and ``"fallback"`` (bool; the whole image
            is then framed and labelled "whole image").
        title: wrapped at word boundaries (never cut).
        max_cols: panels per row (the figure wraps).
        fmt, dpi: output format and resolution (:func:`render`).
        markers: ``(image-left, image-right)`` side letters (the film's orientation; default the standard display).
    """
    return render(make_sample_gallery_row(image, gt_boxes, panels, title=title, max_cols=max_cols, markers=markers), fmt, dpi)


@_literal_text
def make_concept_ranking(deltas: Mapping[str, float], *, winner: str | None = None, fallback: bool | None = None,
                         tau: float | None = None, title: str = "MedFocus concept ranking") -> Any:
    """Figure of :func:`concept_ranking` (open)."""
    items = sorted(((str(k), float(v)) for k, v in deltas.items()), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(5.2, 0.3 * max(3, len(items)) + 1.1))
    names = [k for k, _ in items]
    vals = [v for _, v in items]
    colors = ["#d81b60" if (winner is not None and k == winner and not fallback) else "#1e88e5" for k in names]
    ax.barh(range(len(items)), vals, color=colors)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(names, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("drop in answer log-prob δ (nats)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if tau is not None and 0 < float(tau) < 1:
        thr = -math.log(float(tau))
        ax.axvline(thr, color="#424242", ls="--", lw=1, label=f"whole-image fallback if max δ ≤ {thr:.2f} (τ = {float(tau):g})")
        ax.legend(fontsize=8, loc="lower right", frameon=True)
    if fallback:
        sub = "winner: whole-image fallback (no single concept necessary)"
    elif winner:
        sub = f"winner: {winner}"
    else:
        sub = ""
    ax.set_title(title + (f"\n{sub}" if sub else ""), fontsize=10)
    return fig


def concept_ranking(deltas: Mapping[str, float], *, winner: str | None = None, fallback: bool | None = None,
                    tau: float | None = None, title: str = "MedFocus concept ranking", fmt: str = "png", dpi: int = DPI) -> bytes:
    """Horizontal bars of the log-prob drop per concept (largest on top); the title names the winner or
    says that the whole-image fallback fired; with ``tau`` the fallback threshold ``-ln(tau)`` is drawn."""
    return render(make_concept_ranking(deltas, winner=winner, fallback=fallback, tau=tau, title=title), fmt, dpi)


def _token_text(tok: str) -> str:
    text = str(tok).replace("\n", "⏎").strip()
    return text if text else "·"


def layout_tokens(widths: Sequence[float], line_width: float, gap: float) -> list[tuple[int, float]]:
    """Flow layout: ``(line, x)`` of each box of the given widths, left to right, wrapping before a box that
    would pass ``line_width`` (a box wider than a line gets a line of its own). Boxes never overlap:
    ``x[i+1] >= x[i] + widths[i] + gap`` on the same line."""
    out, line, x = [], 0, 0.0
    for w in widths:
        if x > 0 and x + w > line_width:
            line, x = line + 1, 0.0
        out.append((line, x))
        x += w + gap
    return out


@_literal_text
def make_token_attribution(tokens: Sequence[str], scores: Mapping[str, Sequence[float]], *, title: str = "", max_rows: int = 4,
                           width_inches: float = 9.5, unit: str = "nats") -> Any:
    """Figure of :func:`token_attribution` (open)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.colors import Normalize
    from matplotlib.font_manager import FontProperties

    ranked = sorted(scores.items(), key=lambda kv: -float(np.nansum(np.maximum(np.asarray(kv[1], float), 0))))[:max_rows]
    fontsize, pad = 8.0, 2.5  # points
    texts = [_token_text(t) for t in tokens]
    # Measure each token's width in points at 72 dpi (1 unit = 1 pt), so the layout is exact at any output dpi.
    renderer = RendererAgg(10, 10, 72)
    prop = FontProperties(size=fontsize)
    # (+6 %: hinting at high output dpi renders text slightly wider than measured at 72 dpi)
    widths = [1.06 * renderer.get_text_width_height_descent(t, prop, ismath=False)[0] + 2 * pad for t in texts]
    line_w = (width_inches - 1.3) * 72.0  # room for the colour bar on the right
    pos = layout_tokens(widths, line_w, gap=3.0)
    n_lines = (pos[-1][0] + 1) if pos else 1
    line_h = fontsize + 2 * pad + 4.0
    block_h = 14.0 + n_lines * line_h
    n_blocks = max(1, len(ranked))
    total_h = n_blocks * block_h + 6.0
    fig_h = total_h / 72.0 + (0.35 if title else 0.1) + 0.25
    fig = plt.figure(figsize=(width_inches, fig_h))
    ax = fig.add_axes((0.1 / width_inches, 0.15 / fig_h, line_w / 72.0 / width_inches, total_h / 72.0 / fig_h))
    ax.set_xlim(0, line_w)
    ax.set_ylim(total_h, 0)  # y grows downwards, in points
    ax.axis("off")
    allv = [np.maximum(np.nan_to_num(np.asarray(v, dtype=float), nan=0.0), 0.0) for _, v in ranked]
    # One absolute scale for every block: colours compare across concepts and tokens.
    vmax = max([float(v.max()) for v in allv if v.size] + [0.0]) or 1.0
    norm = Normalize(0.0, vmax)
    cmap = plt.get_cmap("Reds")
    y = 0.0
    for (concept, _), v in zip(ranked, allv):
        ax.text(0, y + 6, str(concept), fontsize=9, fontweight="bold", va="center", ha="left")
        y += 14.0
        for t, (text, w, (line, x)) in enumerate(zip(texts, widths, pos)):
            val = float(v[t]) if t < v.size else 0.0
            frac = float(norm(val))
            yy = y + line * line_h
            ax.add_patch(matplotlib.patches.FancyBboxPatch((x, yy), w, fontsize + 2 * pad, boxstyle="round,pad=0,rounding_size=2",
                                                           facecolor=cmap(frac), edgecolor="#bdbdbd", linewidth=0.4))
            ax.text(x + pad, yy + pad + fontsize / 2, text, fontproperties=prop, va="center", ha="left",
                    color="white" if frac > 0.6 else "black")
        y += n_lines * line_h
    cax = fig.add_axes((1.0 - 0.75 / width_inches, 0.2 / fig_h, 0.12 / width_inches, max(0.3, (total_h / 72.0 - 0.2)) / fig_h))
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.set_label(f"drop ({unit})", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(wrap(title, int(width_inches * 12)), fontsize=10, x=0.01, ha="left")
    return fig


def token_attribution(tokens: Sequence[str], scores: Mapping[str, Sequence[float]], *, title: str = "", max_rows: int = 4,
                      fmt: str = "png", dpi: int = DPI, unit: str = "nats") -> bytes:
    """The answer's tokens as coloured boxes, one block per concept: colour = that concept's attribution of
    the token on one absolute scale shared by every block (white = 0, dark red = the largest value), with a
    colour bar in ``unit``. Tokens flow left to right in boxes measured from the rendered text, wrapping
    at the line end, so no two words overlap.

    Args:
        tokens: the ``T`` answer tokens as decoded strings.
        scores: ``{concept: (T,) values}`` (e.g. per-token log-prob drops in nats; negative values show as 0);
            the ``max_rows`` concepts with the largest total are shown.
        fmt, dpi: output format and resolution (:func:`render`).
    """
    return render(make_token_attribution(tokens, scores, title=title, max_rows=max_rows, unit=unit), fmt, dpi)


@_literal_text
def make_faithfulness_curves(curves: Mapping[str, Mapping[str, Any]], *, title: str = "") -> Any:
    """Mean deletion (left) and insertion (right) curves per method: score = mean answer-token
    probability vs fraction of image-token cells removed / revealed in the map's order. Reference maps
    (names starting with ``"reference"``) are dashed, grey (random) and black (expert box).

    Args:
        curves: ``{method: {"fractions", "deletion", "insertion", "n"}}``
            (:func:`medfocus.evaluation.faithfulness.mean_curves`).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    cmap = plt.get_cmap("tab20")
    ci = 0
    for name, c in curves.items():
        ref = str(name).startswith("reference")
        if ref:
            style: dict[str, Any] = {"linestyle": "--", "color": "black" if "expert" in str(name) else "grey", "linewidth": 1.8}
        else:
            style = {"color": cmap(ci % 20), "linewidth": 1.3}
            ci += 1
        axes[0].plot(c["fractions"], c["deletion"], label=f"{name} (n={int(c.get('n', 0))})", **style)
        axes[1].plot(c["fractions"], c["insertion"], **style)
    axes[0].set_title("deletion (lower area = more faithful)", fontsize=9)
    axes[1].set_title("insertion (higher area = more faithful)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("fraction of image-token cells", fontsize=9)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean answer-token probability", fontsize=9)
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def faithfulness_curves(curves: Mapping[str, Mapping[str, Any]], *, title: str = "", fmt: str = "png", dpi: int = DPI) -> bytes:
    """:func:`make_faithfulness_curves` rendered as ``fmt`` bytes."""
    return render(make_faithfulness_curves(curves, title=title), fmt, dpi)
