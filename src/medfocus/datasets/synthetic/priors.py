"""Box-size / box-position priors of the synthetic findings, derived from the NIH ChestX-ray8 box list.

Source: ``nih_bbox_list_2017.csv.gz`` (NIH Clinical Center ChestX-ray8 / ChestX-ray14, "BBox_List_2017.csv",
984 expert boxes on 1024x1024 frontal films; columns ``Image Index, Finding Label, Bbox [x,y,w,h]``).
Only the *derived summary* is committed (``nih_box_priors.json`` next to this module); the raw list is
never copied into the project. Re-derive it with::

    python -m medfocus.datasets.synthetic.priors ../shared/data/nih_bbox_list_2017.csv.gz

NIH label -> synthetic finding mapping (one home for it: :data:`NIH_LABEL_MAP`):

=============  ==================  ==========================================================
NIH label      synthetic finding   why
=============  ==================  ==========================================================
Cardiomegaly   cardiomegaly        same finding
Effusion       pleural effusion    same finding
Nodule         nodule              same finding
Mass           mass                same finding
Pneumothorax   pneumothorax        same finding
Atelectasis    atelectasis         same finding
Infiltrate     consolidation       airspace opacity; the NIH list has no "Consolidation" box
Pneumonia      consolidation       pneumonia boxes outline the (consolidative) airspace opacity
=============  ==================  ==========================================================

For each finding the summary stores the normalised box centre ``cx, cy`` and size ``w, h`` (fractions of
the 1024-px side) as 21 quantiles (0, 5, ..., 100 %), the fraction of boxes whose centre lies in the
image-left half (the patient's right), and the 4x4 correlation of the normal scores of
``(cx, cy, w, h)``. :func:`sample_boxes` draws from a Gaussian copula with exactly these marginals and
correlations.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medfocus.errors import DataError

#: NIH ChestX-ray8 box label -> synthetic finding name.
NIH_LABEL_MAP: dict[str, str] = {
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural effusion",
    "Nodule": "nodule",
    "Mass": "mass",
    "Pneumothorax": "pneumothorax",
    "Atelectasis": "atelectasis",
    "Infiltrate": "consolidation",
    "Pneumonia": "consolidation",
}

#: Quantile levels stored in the table (percent).
QUANTILE_LEVELS: tuple[float, ...] = tuple(float(q) for q in range(0, 101, 5))

#: Box variables, in this order everywhere.
VARIABLES: tuple[str, ...] = ("cx", "cy", "w", "h")

PRIORS_FILE = Path(__file__).with_name("nih_box_priors.json")
NIH_SIDE = 1024.0


def _normal_scores(x: np.ndarray) -> np.ndarray:
    """Rank-based normal scores (van der Waerden) of a 1-D sample."""
    from scipy.stats import norm, rankdata

    r = rankdata(x)
    return norm.ppf(r / (len(x) + 1.0))


def derive_priors(csv_path: str | Path) -> dict[str, Any]:
    """Derive the per-finding box summary from the NIH box list.

    Args:
        csv_path: path of ``BBox_List_2017.csv`` (optionally gzipped), boxes in 1024-px pixels.

    Returns:
        ``{"source": ..., "label_map": ..., "quantile_levels": [...], "findings": {finding: {"n", "nih_labels",
        "p_image_left", "quantiles": {var: [21 floats]}, "corr": 4x4, "mean": {...}, "std": {...}}}}``.
    """
    import pandas as pd

    path = Path(csv_path)
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - reported as a data error naming the file
        raise DataError(f"{path}: cannot read the NIH box list: {exc}") from exc
    cols = list(df.columns)
    if len(cols) < 6 or "Finding Label" not in cols:
        raise DataError(f"{path}: expected columns 'Image Index, Finding Label, Bbox [x,y,w,h]', got {cols[:6]}")
    x, y, w, h = (pd.to_numeric(df[c], errors="coerce").to_numpy(float) for c in cols[2:6])
    labels = df["Finding Label"].astype(str).to_numpy()
    out: dict[str, Any] = {
        "source": "NIH ChestX-ray8 BBox_List_2017.csv (nih_bbox_list_2017.csv.gz), 1024x1024 px; "
        "derived summary only (quantiles / side fraction / normal-score correlations)",
        "label_map": NIH_LABEL_MAP,
        "quantile_levels": list(QUANTILE_LEVELS),
        "findings": {},
    }
    for finding in sorted(set(NIH_LABEL_MAP.values())):
        nih = sorted(k for k, v in NIH_LABEL_MAP.items() if v == finding)
        sel = np.isin(labels, nih) & np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & np.isfinite(h)
        if sel.sum() < 10:
            raise DataError(f"{path}: fewer than 10 boxes for {nih}")
        vals = {
            "cx": (x[sel] + w[sel] / 2) / NIH_SIDE,
            "cy": (y[sel] + h[sel] / 2) / NIH_SIDE,
            "w": w[sel] / NIH_SIDE,
            "h": h[sel] / NIH_SIDE,
        }
        z = np.stack([_normal_scores(vals[v]) for v in VARIABLES])
        corr = np.corrcoef(z)
        out["findings"][finding] = {
            "n": int(sel.sum()),
            "nih_labels": nih,
            "p_image_left": round(float(np.mean(vals["cx"] < 0.5)), 4),
            "quantiles": {v: [round(float(q), 4) for q in np.percentile(vals[v], QUANTILE_LEVELS)] for v in VARIABLES},
            "mean": {v: round(float(vals[v].mean()), 4) for v in VARIABLES},
            "std": {v: round(float(vals[v].std()), 4) for v in VARIABLES},
            "corr": [[round(float(c), 4) for c in row] for row in corr],
        }
    return out


@lru_cache(maxsize=1)
def load_priors() -> dict[str, Any]:
    """The committed summary table (``nih_box_priors.json``)."""
    try:
        return json.loads(PRIORS_FILE.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{PRIORS_FILE}: cannot read the synthetic box priors: {exc}") from exc


def quantile_function(finding: str, var: str) -> tuple[np.ndarray, np.ndarray]:
    """``(levels in [0,1], values)`` of the stored piecewise-linear inverse CDF of one variable."""
    pri = load_priors()
    if finding not in pri["findings"]:
        raise DataError(f"no box prior for finding {finding!r}; known: {sorted(pri['findings'])}")
    lv = np.asarray(pri["quantile_levels"], float) / 100.0
    return lv, np.asarray(pri["findings"][finding]["quantiles"][var], float)


def sample_boxes(finding: str, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """Draw ``n`` normalised boxes ``(cx, cy, w, h)`` from the finding's prior (Gaussian copula).

    Returns:
        ``(n, 4)`` float array, fractions of the image side.
    """
    from scipy.stats import norm

    pri = load_priors()["findings"].get(finding)
    if pri is None:
        raise DataError(f"no box prior for finding {finding!r}")
    corr = np.asarray(pri["corr"], float)
    # Nearest PSD fix (the stored rounding can make it marginally indefinite).
    evals, evecs = np.linalg.eigh(corr)
    chol = evecs @ np.diag(np.sqrt(np.clip(evals, 1e-6, None)))
    z = rng.standard_normal((n, 4)) @ chol.T
    u = norm.cdf(z)
    out = np.empty((n, 4))
    for j, var in enumerate(VARIABLES):
        lv, q = quantile_function(finding, var)
        out[:, j] = np.interp(u[:, j], lv, q)
    return out


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - maintenance entry point
    """Re-derive ``nih_box_priors.json`` from the NIH box list given as the first argument."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m medfocus.datasets.synthetic.priors NIH_BBOX_CSV[.gz] [OUT.json]")
    out = Path(argv[1]) if len(argv) > 1 else PRIORS_FILE
    out.write_text(json.dumps(derive_priors(argv[0]), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
