"""The seven synthetic findings: placement (NIH-derived box priors + anatomical constraints) and drawing.

A finding is described by a :class:`FindingSpec` (type, side, target box in normalised image units,
severity, texture seed). :func:`build_finding` turns a spec into an exact boolean mask and a density
:class:`~medfocus.datasets.synthetic.phantom.Layer` on a given anatomy, so the same finding can be re-drawn
on a jittered anatomy (background counterfactuals). Cardiomegaly is an anatomy change (a larger cardiac
silhouette, see :func:`cardiomegaly_heart`), not a layer.

Where each finding is drawn (clinical placement):

* ``cardiomegaly`` — the cardiac silhouette widened to a cardiothoracic ratio >= 0.55; box = heart.
* ``pleural effusion`` — fluid in the lateral costophrenic angle with a meniscus rising along the chest wall.
* ``nodule`` / ``mass`` — round (mass: lobulated) opacities centred inside a lung field, clipped to it.
* ``pneumothorax`` — an apical/lateral rim of the lung field without lung markings, slightly more lucent,
  bounded medially by a thin bright visceral pleural line.
* ``consolidation`` — patchy, ill-defined opacity with darker air-bronchogram-like branching lines.
* ``atelectasis`` — a plate-like linear band (wide boxes) or a wedge pointing to the hilum (tall boxes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from medfocus.datasets.synthetic.phantom import (
    SIDE_SIGN,
    Anatomy,
    Geometry,
    Layer,
    mask_box,
    seg_distance,
    smoothstep,
    soft,
    value_noise,
)
from medfocus.datasets.synthetic.priors import sample_boxes

#: Finding names, in the order used everywhere (questions use these strings verbatim).
FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "pleural effusion",
    "nodule",
    "mass",
    "pneumothorax",
    "consolidation",
    "atelectasis",
)

#: Relative frequency of each finding when a random finding set is drawn.
FINDING_WEIGHTS: dict[str, float] = {f: 1.0 for f in FINDINGS}

#: Side of a synthetic film in centimetres. The world needs a physical scale only for a finding defined by
#: its size (nodule vs mass); a square field as wide as the standard 35 x 43 cm (14 x 17 in) chest cassette
#: puts the phantom's inner thoracic width (0.705-0.765 of the side, 5-95% of anatomies) at 24.7-26.8 cm,
#: an adult value.
FIELD_OF_VIEW_CM = 35.0

#: Largest diameter of a pulmonary nodule; a mass is larger. Fleischner Society glossary of terms for
#: thoracic imaging (Hansell et al., Radiology 2008;246:697-722): a nodule measures up to 3 cm, a mass
#: is an opacity greater than 3 cm.
NODULE_MAX_DIAMETER_CM = 3.0

#: How the sizes of nodules and masses are drawn (``generate_case(lesion_size_rule=...)``):
#:
#: - ``"nih"``: straight from the NIH ChestX-ray8 box priors. Their widths overlap (nodule 10-90% quantiles
#:   0.047-0.098 of the side, mass 0.075-0.307), so a small mass and a large nodule can look the same: the
#:   label is not a function of the image for part of these films.
#: - ``"fleischner"``: the same priors conditioned on the radiological definition -- a nodule's visible
#:   long axis (the longer side of its mask's box; the world's lesions are axis-aligned ellipses) is at most
#:   :data:`NODULE_MAX_DIAMETER_CM` on the :data:`FIELD_OF_VIEW_CM` field, a mass's is longer. A candidate
#:   box that breaks the rule is skipped for the next one already drawn (the random stream is unchanged), so
#:   films without a nodule or mass are byte-identical in both worlds, and on the others the other findings
#:   keep their severity and texture (they may sit elsewhere where they avoided the lesion's box).
LESION_SIZE_RULES: tuple[str, ...] = ("nih", "fleischner")

#: The rule ``generate_case``, ``write_dataset`` and ``medfocus synth`` use unless told otherwise: the radiological
#: definition, so that every label of the default world is a function of the image (``benchmarks/
#: nodule_mass_ceiling.py`` measures how many nodule/mass answers no reader can get right in the ``"nih"`` world).
#: Recipes and benchmarks that depend on the world name their rule explicitly.
DEFAULT_LESION_SIZE_RULE = "fleischner"


def lesion_diameter_cm(box: tuple[int, int, int, int], size: int) -> float:
    """Long axis of a finding in centimetres: the longer side of its pixel box ``(x1, y1, x2, y2)`` on a
    ``size``-px synthetic film, at :data:`FIELD_OF_VIEW_CM`."""
    return max(box[2] - box[0], box[3] - box[1]) / size * FIELD_OF_VIEW_CM


def breaks_size_rule(name: str, box: tuple[int, int, int, int], size: int, rule: str) -> bool:
    """Whether a drawn nodule or mass with pixel box ``box`` contradicts :data:`LESION_SIZE_RULES` ``rule``
    (always ``False`` under ``"nih"`` and for every other finding)."""
    if rule != "fleischner" or name not in ("nodule", "mass"):
        return False
    return (lesion_diameter_cm(box, size) > NODULE_MAX_DIAMETER_CM) == (name == "nodule")


#: VinDr-CXR class name and id of each finding (VinDr has one joint "Nodule/Mass" class).
VINDR_CLASS: dict[str, tuple[str, int]] = {
    "cardiomegaly": ("Cardiomegaly", 3),
    "pleural effusion": ("Pleural effusion", 10),
    "nodule": ("Nodule/Mass", 8),
    "mass": ("Nodule/Mass", 8),
    "pneumothorax": ("Pneumothorax", 12),
    "consolidation": ("Consolidation", 4),
    "atelectasis": ("Atelectasis", 1),
}

#: Cardiothoracic-ratio range of an enlarged heart.
CTR_RANGE = (0.55, 0.75)


@dataclass(frozen=True)
class FindingSpec:
    """Parameters of one finding; ``cx, cy, w, h`` are the *target* box in normalised image units
    (the exact box is the bounding box of the drawn mask)."""

    name: str
    side: str | None
    cx: float
    cy: float
    w: float
    h: float
    severity: float
    seed: int
    variant: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ellipse_rho(geo: Geometry, sp: FindingSpec) -> np.ndarray:
    return np.sqrt(((geo.X - sp.cx) / (sp.w / 2)) ** 2 + ((geo.Y - sp.cy) / (sp.h / 2)) ** 2)


def _lung(geo: Geometry, side: str | None) -> np.ndarray:
    if side is None:
        return np.minimum(geo.sdf["right lung"], geo.sdf["left lung"])
    return geo.sdf[f"{side} lung"]


def cardiomegaly_heart(anat: Anatomy, sp: FindingSpec) -> tuple[float, float]:
    """Cardiac silhouette box ``(w, h)`` of an enlarged heart (cardiothoracic ratio in :data:`CTR_RANGE`)."""
    tw = anat.thorax_width
    w = float(np.clip(sp.w, CTR_RANGE[0] * tw, CTR_RANGE[1] * tw))
    h = float(np.clip(sp.h, max(anat.heart_h, 0.22), min(0.42, 0.95 * w)))
    return w, h


def build_finding(sp: FindingSpec, geo: Geometry) -> tuple[np.ndarray, Layer]:
    """Exact mask ``(S, S)`` bool and density layer of a (non-cardiomegaly) finding on an anatomy.

    The layer is confined to the mask dilated by 2 px (its soft edge), so a finding never changes
    pixels far from its box — what the foreground counterfactual's locality relies on.
    """
    mask, layer = _build_finding(sp, geo)
    k = np.ones((5, 5), np.uint8)
    support = cv2.dilate(mask.astype(np.uint8), k).astype(np.float32)
    for attr in ("over_alpha", "add", "suppress"):
        arr = getattr(layer, attr)
        if arr is not None:
            setattr(layer, attr, (arr * support).astype(np.float32))
    return mask, layer


def _build_finding(sp: FindingSpec, geo: Geometry) -> tuple[np.ndarray, Layer]:
    e = geo.edge
    S = geo.size
    rng = np.random.default_rng([sp.seed, 3])
    sev = float(sp.severity)
    name = sp.name
    if name in ("nodule", "mass"):
        rho = _ellipse_rho(geo, sp)
        m = min(sp.w, sp.h) / 2
        if name == "mass":
            th = np.arctan2((geo.Y - sp.cy) / sp.h, (geo.X - sp.cx) / sp.w)
            ph = rng.uniform(0, 2 * np.pi, 2)
            lob = 1.0 - 0.07 * (1 - np.cos(3 * th + ph[0])) - 0.04 * (1 - np.cos(5 * th + ph[1]))
            rho = rho / lob
        d = np.maximum((rho - 1.0) * m, _lung(geo, sp.side))
        amp = (0.20 + 0.22 * sev) if name == "nodule" else (0.24 + 0.24 * sev)
        tex = 1.0 + (0.06 * value_noise(rng, S, 40) if name == "mass" else 0.0)
        add = amp * soft(d, e) * (0.85 + 0.15 * np.clip(1 - rho * rho, 0, 1)) * tex
        return d < 0, Layer(add=add.astype(np.float32))
    if name == "consolidation":
        rho = _ellipse_rho(geo, sp)
        m = min(sp.w, sp.h) / 2
        cells = int(np.clip(4.0 / max(min(sp.w, sp.h), 0.05), 10, 60))
        n1 = np.clip(value_noise(rng, S, cells), -1.5, 1.5)
        n2 = value_noise(rng, S, cells * 2)
        n3 = value_noise(rng, S, max(8, cells))
        d = np.maximum(np.maximum((rho - 1.0) * m, (rho + 0.40 * n1 - 1.0) * m), _lung(geo, sp.side))
        amp = 0.22 + 0.22 * sev
        dens = amp * soft(d, 2.5 * e) * (0.75 + 0.25 * np.clip(n2, -1, 1))
        # Air bronchograms: thin dark branching lines (zero-crossings of a smooth field) in the interior.
        bron = np.exp(-(n3 / 0.07) ** 2) * smoothstep(0.0, 0.35, 1.0 - rho)
        add = dens * (1.0 - 0.6 * bron)
        return d < 0, Layer(add=add.astype(np.float32))
    if name == "atelectasis":
        sg = SIDE_SIGN[sp.side or "right"]
        x1, x2 = sp.cx - sp.w / 2, sp.cx + sp.w / 2
        y1, y2 = sp.cy - sp.h / 2, sp.cy + sp.h / 2
        if sp.variant == "wedge":
            # Triangle: base on the lateral side of the box, apex on the medial side (towards the hilum).
            lat_x, med_x = (x1, x2) if sg < 0 else (x2, x1)
            pts = [(lat_x, y1), (lat_x, y2), (med_x, sp.cy)]
            d = _convex_sdf(geo.X, geo.Y, pts)
        else:
            t = float(np.clip(0.22 * min(sp.w, sp.h), 0.006, 0.02))
            dy = max(sp.h / 2 - t, 0.0) * (1 if rng.random() < 0.5 else -1)
            d = seg_distance(geo.X, geo.Y, (x1 + t, sp.cy - dy), (x2 - t, sp.cy + dy)) - t
        d = np.maximum(d, _lung(geo, sp.side))
        amp = 0.22 + 0.22 * sev
        add = amp * soft(d, 1.5 * e)
        return d < 0, Layer(add=add.astype(np.float32))
    if name == "pleural effusion":
        side = sp.side or "right"
        sg = SIDE_SIGN[side]
        px, py = geo.points[f"{side} cp"]
        a = geo.anat
        apex = a.lung_cy - a.lung_b
        h = float(np.clip(sp.h, 0.05, 0.7 * (py - apex)))
        w = float(np.clip(sp.w, 0.06, 1.6 * a.lung_a))
        y_top = py - h
        # The box starts at the lateral chest wall at the fluid top (the lung bulges beyond the angle).
        cxl = a.med_x + sg * a.lung_off
        pp = 2.0 + 1.6 * float(smoothstep(a.lung_cy - 0.1, a.lung_cy + 0.12, np.float32(y_top)))
        x_lat = cxl + sg * a.lung_a * max(1.0 - abs((y_top - a.lung_cy) / a.lung_b) ** pp, 0.0) ** (1.0 / pp)
        x_end = x_lat - sg * w
        if sg * (px - x_end) <= 0.02:  # keep the meniscus at least 2 % wide medially of the angle
            x_end = px - sg * 0.02
        w = abs(px - x_end)
        y_end = float(geo.dome(np.asarray([x_end], np.float32))[0])
        ell_raw = -sg * (geo.Xb - px) / w
        ell = np.clip(ell_raw, 0, 1)
        ys = y_top + (max(y_end, y_top) - y_top) * ell**0.8
        # Medial limit: beyond the dome's peak the diaphragm descends again (do not spill under the heart).
        d = np.maximum(np.maximum(_lung(geo, side), ys - geo.Yb), (ell_raw - 1.0) * w)
        depth = smoothstep(0.0, 0.06, geo.Yb - ys)
        alpha = soft(d, 2.5 * e) * (0.78 + 0.17 * sev) * (0.7 + 0.3 * depth)
        return d < 0, Layer(over_alpha=alpha.astype(np.float32), over_value=0.58)
    if name == "pneumothorax":
        side = sp.side or "right"
        a = geo.anat
        apex = a.lung_cy - a.lung_b
        h = float(np.clip(sp.h, 0.10, 0.55))
        y_lim = apex + h
        fieldm = (geo.sdf[f"{side} lung field"] < 0).astype(np.uint8)
        dist = cv2.distanceTransform(fieldm, cv2.DIST_L2, 5) / S
        depth = (0.022 + 0.035 * sev) * np.clip((y_lim - geo.Yb) / (0.35 * h), 0, 1) ** 0.7
        lung = _lung(geo, side)
        rim_d = np.maximum(np.maximum(dist - depth, lung), geo.Yb - y_lim)
        px = 1.0 / S
        line = np.exp(-(((dist - depth) / (0.8 * px)) ** 2)) * (depth > 1.5 * px) * soft(lung, e) * (geo.Yb < y_lim)
        rim = soft(rim_d, e)
        mask = (rim_d < 0) | (line > 0.3)
        add = -0.07 * rim + 0.20 * line
        return mask, Layer(add=add.astype(np.float32), suppress=rim)
    raise ValueError(f"unknown finding {name!r}; expected one of {FINDINGS}")


def _convex_sdf(X: np.ndarray, Y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Signed distance-like field of a convex polygon (max over edges of the outward half-plane distance)."""
    # Orientation: make the centroid lie on the negative side of every edge.
    cx = sum(p[0] for p in pts) / len(pts)
    cy = sum(p[1] for p in pts) / len(pts)
    d = None
    for i in range(len(pts)):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % len(pts)]
        nx, ny = y1 - y0, -(x1 - x0)
        L = np.hypot(nx, ny) + 1e-12
        nx, ny = nx / L, ny / L
        if (cx - x0) * nx + (cy - y0) * ny > 0:
            nx, ny = -nx, -ny
        di = (X - x0) * nx + (Y - y0) * ny
        d = di if d is None else np.maximum(d, di)
    return d


def _overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> bool:
    x1, y1, x2, y2 = box
    a = (x2 - x1) * (y2 - y1)
    for o in others:
        iw = min(x2, o[2]) - max(x1, o[0])
        ih = min(y2, o[3]) - max(y1, o[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            b = (o[2] - o[0]) * (o[3] - o[1])
            if inter > 0.3 * min(a, b):
                return True
    return False


def sample_spec(
    name: str,
    geo: Geometry,
    rng: np.random.Generator,
    severity: float | None,
    taken: list[tuple[float, float, float, float]],
    max_tries: int = 60,
    lesion_size_rule: str = DEFAULT_LESION_SIZE_RULE,
) -> tuple[FindingSpec, np.ndarray | None, Layer | None]:
    """Draw a finding's spec from its NIH prior under anatomical constraints.

    Returns ``(spec, mask, layer)``; for cardiomegaly ``mask``/``layer`` are ``None`` (the caller rebuilds
    the anatomy). Boxes in ``taken`` (pixel boxes of findings already placed) are avoided when possible.
    ``lesion_size_rule`` (one of :data:`LESION_SIZE_RULES`) conditions nodule and mass sizes.
    """
    S = geo.size
    sev = float(rng.uniform(0.0, 1.0)) if severity is None else float(np.clip(severity, 0.0, 1.0))
    seed = int(rng.integers(0, 2**31 - 1))
    cand = sample_boxes(name, rng, max_tries)
    if name == "cardiomegaly":
        cx, cy, w, h = cand[0]
        return FindingSpec(name, None, float(cx), float(cy), float(w), float(h), sev, seed), None, None
    best = None
    for k in range(max_tries):
        cx, cy, w, h = (float(v) for v in cand[k])
        if name in ("pleural effusion", "pneumothorax"):
            side = "right" if cx < 0.5 else "left"
            sp = FindingSpec(name, side, cx, cy, w, h, sev, seed)
        else:
            i, j = int(np.clip(cy * S, 0, S - 1)), int(np.clip(cx * S, 0, S - 1))
            side = "right" if geo.masks["right lung"][i, j] else ("left" if geo.masks["left lung"][i, j] else None)
            if side is None:
                continue
            lung_w = geo.anat.lung_a * 2 * geo.anat.scale
            w, h = min(w, 0.95 * lung_w), min(h, 0.75 * geo.anat.lung_b * 2)
            variant = ("wedge" if h > 0.7 * w else "linear") if name == "atelectasis" else ""
            sp = FindingSpec(name, side, cx, cy, w, h, sev, seed, variant)
        mask, layer = build_finding(sp, geo)
        box = mask_box(mask)
        if box is None:
            continue
        area_req = 0.4 * (np.pi / 4 if name in ("nodule", "mass", "consolidation") else 0.5) * sp.w * sp.h * S * S
        if name in ("nodule", "mass", "consolidation", "atelectasis") and mask.sum() < max(area_req, 4):
            continue
        if breaks_size_rule(name, box, S, lesion_size_rule):
            continue
        if _overlaps(box, taken) and k < max_tries - 1:
            best = best or (sp, mask, layer)
            continue
        return sp, mask, layer
    if best is not None:
        return best
    # Fallback (rare): a small finding at the centre of a random lung.
    side = "right" if rng.random() < 0.5 else "left"
    ys, xs = np.nonzero(geo.masks[f"{side} lung"])
    cx, cy = (xs.mean() + 0.5) / S, (ys.mean() + 0.5) / S
    sz = 0.05 if name == "nodule" else 0.09
    if lesion_size_rule == "fleischner" and name == "mass":
        # 0.09 of the side is 3.15 cm before lobulation and lung clipping: too close to the 3 cm boundary
        sz = 0.13
    variant = "linear" if name == "atelectasis" else ""
    sp = FindingSpec(name, side, float(cx), float(cy), sz, sz * 0.8, sev, seed, variant)
    mask, layer = build_finding(sp, geo)
    return sp, mask, layer
