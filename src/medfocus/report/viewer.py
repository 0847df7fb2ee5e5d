"""The interactive viewer: one self-contained HTML file (``explain.html``) per set of explained films.

No server, no network, no CDN: the page carries its CSS and vanilla JavaScript inline
(``viewer_assets/viewer.css``, ``viewer_assets/viewer.js``) and its data as one JSON document in a
``<script type="application/json">`` element, with ``<``, ``>`` and ``&`` escaped, so no data string can
close the element or become markup. The script builds every node with ``createElement`` and puts data
strings in with ``textContent`` only (no ``innerHTML``), so a finding or an answer such as
``<img onerror=...>`` shows as text.

Per film the page shows: the film with the selected method's map as an overlay (opacity slider, colour
bar with the map's real value range), the predicted boxes, the expert boxes when given; a method
switcher and a small-multiples grid of every method; the answer's tokens (hover or click a token to see
that token's map for every method that has per-token maps -- MedFocus then shows each concept's drop for
that token; the final yes/no token is highlighted); for MedFocus the concept bars (drop in nats, the
fallback threshold ``-ln tau``), the concept boxes and masks, the winner and whether the whole-image
fallback fired; and the cost of each method (forward / backward passes, seconds).

Input: result records in the runner's schema (:func:`medfocus.runner.run_grid`) with their ``.npz``
arrays. Maps are area-averaged to display size and quantised to 8 bits per map (min-max, the real
minimum and maximum are kept for the colour bar); boxes stay in original pixels and are scaled in the
browser.
"""

from __future__ import annotations

import base64
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medfocus.errors import DataError
from medfocus.types import token_texts

log = logging.getLogger(__name__)

#: Longer side (px) of the film, of the whole-answer maps, of per-token maps and of concept masks in the page.
FILM_SIDE = 600
MAP_SIDE = 192
TOKEN_MAP_SIDE = 96
TOKEN_MAP_SIDE_LONG = 64  # answers of more than LONG_ANSWER tokens (step-by-step rationales)
LONG_ANSWER = 32
MASK_SIDE = 128


def _size_for(w0: int, h0: int, side: int) -> tuple[int, int]:
    """``(w, h)`` with the film's aspect ratio and a longer side of at most ``side`` px."""
    s = min(1.0, side / max(w0, h0))
    return max(1, round(w0 * s)), max(1, round(h0 * s))


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape == (h, w):
        return a
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).decode("ascii")


def encode_map(a: np.ndarray | None, side: int) -> dict[str, Any] | None:
    """A map for the page: area-averaged to a longer side of ``side`` px, min-max quantised to uint8.

    Returns ``{"w", "h", "lo", "hi", "data"}`` (``data``: base64 of ``h*w`` bytes, row-major; ``lo``/``hi``:
    the real minimum and maximum, shown on the colour bar) or ``None`` when ``a`` is ``None``. Non-finite
    values count as the minimum and are reported in ``"nonfinite"``; a constant map has ``hi == lo`` and
    all-zero data."""
    if a is None:
        return None
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise DataError(f"viewer: a map must be 2-D, got shape {a.shape}")
    finite = np.isfinite(a)
    n_bad = int((~finite).sum())
    lo = float(a[finite].min()) if finite.any() else 0.0
    hi = float(a[finite].max()) if finite.any() else 0.0
    w, h = _size_for(a.shape[1], a.shape[0], side)
    small = _resize(np.where(finite, a, lo), w, h)
    q = np.zeros((h, w), np.uint8) if hi <= lo else np.clip(np.rint((small - lo) / (hi - lo) * 255.0), 0, 255)
    out: dict[str, Any] = {"w": w, "h": h, "lo": lo, "hi": hi, "data": _b64(q)}
    if n_bad:
        out["nonfinite"] = n_bad
    return out


def _film(img: np.ndarray) -> dict[str, Any]:
    h0, w0 = img.shape
    w, h = _size_for(w0, h0, FILM_SIDE)
    small = np.clip(np.rint(_resize(img.astype(np.float32), w, h)), 0, 255)
    return {"w": w, "h": h, "data": _b64(small)}


def _boxes(v: Any) -> list[list[float]]:
    if not v:
        return []
    return [[float(x) for x in b] for b in v if b is not None and len(b) == 4 and all(np.isfinite(float(x)) for x in b)]


def _extras(rec: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    ex = dict(rec.get("extras") or {})
    for k, v in arrays.items():
        if k.startswith("extra_"):
            ex.setdefault(k[len("extra_"):], v)
    return ex


def _map_units(rec: Mapping[str, Any]) -> str | None:
    """The unit of a record's maps (``settings["heatmap_units"]`` up to its first colon), or ``None``."""
    units = (rec.get("settings") or {}).get("heatmap_units")
    return str(units).split(":", 1)[0].strip() or None if units else None


def _medfocus_panel(rec: Mapping[str, Any], arrays: Mapping[str, np.ndarray], ex: Mapping[str, Any]) -> dict[str, Any] | None:
    from medfocus.report.records import medfocus_view

    view = medfocus_view(rec, arrays)
    if not view.get("deltas"):
        return None
    names = list(view["deltas"])
    out: dict[str, Any] = {
        "variants": names,
        "deltas": [float(view["deltas"][n]) for n in names],
        "winner": view.get("winner"),
        "fallback": bool(view.get("fallback")),
        "tau": float(ex["tau"]) if ex.get("tau") is not None else None,
        "region": ex.get("region"), "rule": ex.get("rule"), "refine": ex.get("refine"),
        "reference_id": ex.get("reference_id"),
        "concept_boxes": {str(c): [float(x) for x in b] for c, b in (ex.get("concept_boxes") or {}).items()},
        "nested_checks": list(ex.get("nested_checks") or []),
    }
    if view.get("token_scores"):
        out["token_deltas"] = [[float(x) for x in view["token_scores"].get(n, [])] for n in names]
    masks = ex.get("concept_masks")
    mnames = ex.get("concept_mask_names")
    if masks is not None and mnames is not None:
        m = np.asarray(masks)
        if m.ndim == 3 and len(mnames) == m.shape[0]:
            enc = {}
            for i, n in enumerate(mnames):
                e = encode_map(m[i].astype(np.float32), MASK_SIDE)
                e["hi"], e["lo"] = 1.0, 0.0  # a mask: keep 0/1 even when a concept covers nothing
                enc[str(n)] = e
            out["masks"] = enc
    return out


#: The token strip's text where there are no answer tokens to show and nothing else is known.
NO_TOKENS = "no answer tokens recorded"


def token_note(rec: Mapping[str, Any], has_tokens: bool) -> str | None:
    """Why the token strip is empty for this record (``None`` when it has answer tokens): a method that
    attributes the whole answer at once or does not attribute an answer says so (that is not a missing
    recording); :data:`NO_TOKENS` where tokens are simply not recorded (a failed record, a per-token method
    whose record lacks them, a method that does not declare what its map covers)."""
    if has_tokens:
        return None
    if rec.get("error"):
        return f"{NO_TOKENS} (the method failed)"
    from medfocus.attribution import method_answer_scope

    name = str(rec["method"])
    scope = method_answer_scope(name)
    if scope == "whole_answer":
        return (f"{name} attributes the whole answer at once (one target: the answer's log-likelihood), so it has one map "
                "for all the answer's tokens and no per-token strip")
    if scope == "no_answer":
        return f"{name} asks the model for boxes instead of attributing an answer: no per-token strip"
    return NO_TOKENS


def _method_view(rec: Mapping[str, Any], base: Path | None) -> dict[str, Any]:
    from medfocus.report.records import load_arrays

    arrays = load_arrays(rec, base) if not rec.get("error") else {}
    ex = _extras(rec, arrays)
    tokens = ex.get("answer_tokens")
    n_tok = len(tokens) if tokens is not None else 0
    tside = TOKEN_MAP_SIDE if n_tok <= LONG_ANSWER else TOKEN_MAP_SIDE_LONG
    tok = arrays.get("token_heatmaps", arrays.get("token_heatmaps_lowres"))
    token_maps = [encode_map(np.asarray(t, np.float32), tside) for t in tok] if tok is not None else None
    fth = ex.get("final_token_heatmap")
    view: dict[str, Any] = {
        "name": str(rec["method"]),
        "error": rec.get("error"),
        "n_forward": int(rec.get("n_forward") or 0),
        "n_backward": int(rec.get("n_backward") or 0),
        "seconds": float(rec.get("seconds") or 0.0),
        "map": encode_map(arrays.get("heatmap"), MAP_SIDE),
        "token_maps": token_maps,
        "final_map": encode_map(np.asarray(fth, np.float32), MAP_SIDE) if isinstance(fth, np.ndarray) and fth.ndim == 2 else None,
        "final_token_index": ex.get("final_token_index"),
        "pred_boxes": _boxes(rec.get("pred_boxes")),
        "heatmap_boxes": _boxes(rec.get("heatmap_boxes")),
        "warning": rec.get("reference_pool_warning"),
        # the map's unit where the method records one (MedFocus: nats), shown beside the colour bar's real range
        "map_units": _map_units(rec),
        "tokens": token_texts(tokens) if tokens is not None else None,
        "token_note": token_note(rec, bool(tokens)),
    }
    if rec["method"] == "medfocus" and not rec.get("error"):
        view["medfocus"] = _medfocus_panel(rec, arrays, ex)
    return view


def sample_view(records: Sequence[Mapping[str, Any]], base_dir: str | Path | None = None, *,
                method_order: Sequence[str] | None = None, label: str | None = None) -> dict[str, Any]:
    """The page data of one film: every record of one ``(model, dataset, index, mode)`` cell.

    Raises:
        DataError: the records belong to different cells, or the film cannot be read.
    """
    from medfocus.io import read_image, read_orientation

    if not records:
        raise DataError("viewer: no records for this film")
    cells = {(r["model"], r["dataset"], int(r["index"]), r["mode"]) for r in records}
    if len(cells) != 1:
        raise DataError(f"viewer: sample_view needs the records of one film, got {sorted(cells)}")
    base = Path(base_dir) if base_dir is not None else None
    first = records[0]
    from medfocus.io.paths import record_film

    film = record_film(first)
    img, (w0, h0) = read_image(film)  # the film the records were computed on, or a DataError
    orientation = read_orientation(film)
    order = {m: i for i, m in enumerate(method_order or [])}
    recs = sorted(records, key=lambda r: (order.get(r["method"], len(order)), str(r["method"])))
    methods = [_method_view(r, base) for r in recs]
    tokens = next((m["tokens"] for m in methods if m["tokens"]), None)
    fti = next((m["final_token_index"] for m in methods if m["tokens"] and m["final_token_index"] is not None), None)
    # the film's own warnings (all-black, EXIF rotation, DICOM fallbacks; recorded by the run) and the methods'
    warnings = list(dict.fromkeys(w for r in records for w in (r.get("film_warnings") or []))) \
        + sorted({m["warning"] for m in methods if m["warning"]})
    return {
        "label": label or Path(str(first["image_path"])).name,
        "model": first["model"], "dataset": first["dataset"], "index": int(first["index"]), "mode": first["mode"],
        "image_path": str(film),  # the file read: under --data-root, the film's new place
        "finding": first.get("attribute"), "question": first.get("question"),
        "answer": first.get("answer"), "answer_source": first.get("answer_source"),
        "answer_parsed": first.get("answer_parsed"), "gt_answer": first.get("gt_answer"),
        "image_size": [int(w0), int(h0)], "gt_boxes": _boxes(first.get("gt_boxes")),
        "film": _film(img), "tokens": tokens, "final_token_index": fti,
        # R/L markers from the film's orientation (DICOM PatientOrientation; else the display convention)
        "markers": list(orientation.markers), "orientation": orientation.describe(),
        "warnings": warnings, "methods": methods,
    }


def _lut(name: str | None = None) -> list[int]:
    """The viewer's heatmap colours: 256 RGB triples, flat, of ``name`` (default: the report's
    :data:`~medfocus.report.figures.HEAT_CMAP`, so a map looks the same in both)."""
    import matplotlib

    from medfocus.report.figures import HEAT_CMAP

    rgb = matplotlib.colormaps[name or HEAT_CMAP](np.linspace(0.0, 1.0, 256))[:, :3]
    return [int(v) for v in np.rint(rgb * 255).astype(np.uint8).ravel()]


def _asset(name: str) -> str:
    return resources.files("medfocus.report").joinpath("viewer_assets", name).read_text(encoding="utf-8")


def script_json(obj: Any) -> str:
    """JSON for a ``<script type="application/json">`` element: ``<``, ``>``, ``&`` (and the JS line
    separators) as ``\\u`` escapes, so no string in it can end the element or open a tag; NaN refused."""
    text = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><link rel="icon" href="data:,"><style>{{ css }}</style></head>
<body><header><h1>{{ title }}</h1></header><main id="app"><noscript>This viewer needs JavaScript (it runs offline, nothing is loaded from the network).</noscript></main>
<script type="application/json" id="medfocus-data">{{ data }}</script>
<script>{{ js }}</script></body></html>
"""


def render_viewer(samples: Sequence[Mapping[str, Any]], *, title: str = "medfocus explain",
                  notes: Sequence[str] = (), citation: str | None = None) -> str:
    """The viewer page as a string (see :func:`build_viewer`)."""
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(autoescape=True)
    from medfocus.types import BILATERAL

    payload = {"title": title, "notes": list(notes), "citation": citation, "lut": _lut(),
               "unions": {k: list(v) for k, v in BILATERAL.items()}, "samples": list(samples)}
    return env.from_string(PAGE).render(
        title=title,
        css=Markup(_asset("viewer.css")),
        js=Markup(_asset("viewer.js")),
        data=Markup(script_json(payload)),
    )


def build_viewer(records: Sequence[Mapping[str, Any]], out: str | Path, *, base_dir: str | Path | None = None,
                 title: str = "medfocus explain", notes: Sequence[str] = (), citation: str | None = None,
                 method_order: Sequence[str] | None = None, labels: Mapping[tuple, str] | None = None) -> Path:
    """Write the self-contained viewer of every film in ``records`` to ``out`` (atomically).

    Args:
        records: result records (one film = one ``(model, dataset, index, mode)`` cell; all its methods).
        out: the ``.html`` path.
        base_dir: folder relative ``heatmap_path`` values are relative to (the store's folder).
        notes: lines shown at the top (e.g. what the demo model can and cannot tell).
        citation: a source line for the films (shown under every film).
        method_order: method order in the switcher and the grid (default: by name).
        labels: ``{(model, dataset, index, mode): label}`` per film (default: the file name).
    Returns:
        ``out``.
    """
    cells: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["model"], r["dataset"], int(r["index"]), r["mode"]), []).append(r)
    if method_order is None:
        from medfocus.attribution import BASELINES

        method_order = [*BASELINES, "medfocus"]
    samples = [sample_view(recs, base_dir, method_order=method_order, label=(labels or {}).get(k)) for k, recs in cells.items()]
    from medfocus.io.atomic import atomic_write_text

    return atomic_write_text(Path(out), render_viewer(samples, title=title, notes=notes, citation=citation))

