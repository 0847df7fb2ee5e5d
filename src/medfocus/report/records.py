"""What the report and the viewer read from result records: stored arrays and MedFocus' outputs.

One home for both pages (:mod:`medfocus.report.html` and :mod:`medfocus.report.viewer`), so neither
imports the other for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["load_arrays", "medfocus_view", "first_present"]


def load_arrays(rec: Mapping[str, Any], base: Path | None) -> dict[str, np.ndarray]:
    """The arrays of a record's ``.npz`` (heatmap, token maps, ``extra_*``); empty when absent or unreadable
    (the page then shows the record without them and the warning says why)."""
    hp = rec.get("heatmap_path")
    if not hp:
        return {}
    p = Path(hp)
    if not p.is_absolute() and base is not None:
        p = base / p
    try:
        with np.load(p) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", p, exc)
        return {}


def first_present(d: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` that ``d`` holds with a value other than ``None``."""
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return None


def medfocus_view(rec: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Concept ranking and per-token attributions of a MedFocus record (empty dict when absent).

    Returns ``{"deltas": {concept: delta}, "winner": str|None, "tokens": [str], "token_scores":
    {concept: (T,) list}, "fallback": bool|None}`` from the record's ``extras`` (and ``extra_*`` arrays).
    """
    ex = dict(rec.get("extras") or {})
    for k, v in arrays.items():
        if k.startswith("extra_"):
            ex.setdefault(k[len("extra_"):], v)
    deltas = first_present(ex, "deltas", "concept_deltas", "ranking")
    out: dict[str, Any] = {}
    if isinstance(deltas, Mapping):
        out["deltas"] = {str(k): float(v) for k, v in deltas.items() if v is not None}
    elif isinstance(deltas, list) and deltas and isinstance(deltas[0], (list, tuple)):
        out["deltas"] = {str(k): float(v) for k, v in deltas}
    out["winner"] = first_present(ex, "winner", "winning_concept", "concept")
    out["fallback"] = first_present(ex, "fallback", "whole_image_fallback")
    tokens = first_present(ex, "answer_tokens", "tokens")
    tok_scores = first_present(ex, "token_deltas", "per_token", "token_attributions", "per_token_deltas")
    if tokens is not None and tok_scores is not None:
        tokens = [str(t) for t in tokens]
        scores: dict[str, list[float]] = {}
        if isinstance(tok_scores, Mapping):
            scores = {str(k): list(np.asarray(v, float).ravel()) for k, v in tok_scores.items()}
        else:
            arr = np.asarray(tok_scores, dtype=float)
            names = first_present(ex, "variant_names", "concepts", "concept_names")
            names = [str(n) for n in (list(names) if names is not None else (out.get("deltas") or {}).keys())]
            if arr.ndim == 2 and len(names) == arr.shape[0]:
                scores = {str(n): list(arr[i]) for i, n in enumerate(names)}
        if scores:
            out["tokens"] = tokens
            out["token_scores"] = scores
    return out
