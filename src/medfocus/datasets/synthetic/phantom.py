"""Procedural frontal chest radiograph phantom: anatomy parameters, exact concept masks, rendering.

Conventions
-----------
* Normalised coordinates: ``x`` (image columns) and ``y`` (image rows) in ``[0, 1]`` of the image side; the
  pixel ``(i, j)`` has centre ``((j + 0.5) / S, (i + 0.5) / S)``. Anatomy is defined in a *body frame*
  (the image frame rotated by a few degrees, shifted and scaled), so a patient can be slightly rotated.
* Radiological convention: the patient's **right** is on the **image left**. So ``"right lung"`` is the
  lung with the smaller ``x``.
* Every structure is an approximate signed distance field (normalised units, negative inside). The
  exact mask is ``sdf < 0``; the rendering uses a soft edge of about one pixel around the same zero
  level, so masks and drawing agree to within a pixel. Unions are ``min``, intersections ``max``.
* Density (attenuation, 0 = air, ~0.8 = bone/mediastinum) is composed in float32, blurred with a
  sub-pixel Gaussian (detector PSF), mapped through a per-image exposure curve, then receives
  quantum noise. Every step is local (no image-wide normalisation), so removing a finding changes
  pixels only near that finding — the property the counterfactual oracles rely on.

Concept masks (the 11 ImaGenome regions, exact, as drawn)
--------------------------------------------------------
* ``right lung`` / ``left lung``: the aerated lung fields (superellipses cut by the hemidiaphragm dome,
  the mediastinum and the heart); disjoint from each other, from the heart and from the mediastinum.
* ``cardiac silhouette``: the heart (tilted ellipse resting on the left dome); part of ``mediastinum``.
* ``mediastinum``: the central band from the thoracic inlet to the diaphragm, the aortic knob and the
  heart. ``upper mediastinum``: the part of the band/knob above the knob's lower edge (disjoint from the
  heart).
* ``right/left hilar structures``: an ellipse at the medial lung border at hilum height, inside the lung.
* ``right/left costophrenic angle``: the lateral-inferior corner of each lung (an ellipse around the
  point where the lateral lung wall meets the dome), inside the lung.
* ``right/left clavicle``: S-curved bands from the sternal end to the shoulder (they overlap apex and
  mediastinum, as on a film).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import cv2
import numpy as np

from medfocus.types import CONCEPTS

#: Radiological sides: ``"right"`` structures are on the image left (``x < 0.5``).
SIDE_SIGN = {"right": -1.0, "left": 1.0}


# --------------------------------------------------------------------------------------------------
# small vectorised helpers
# --------------------------------------------------------------------------------------------------
def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Cubic Hermite step from 0 at ``e0`` to 1 at ``e1`` (float32)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-indicator of an SDF: 1 well inside, 0 well outside, 0.5 on the zero level."""
    return np.clip(0.5 - d / edge, 0.0, 1.0).astype(np.float32)


def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean, unit-ish noise field ``(size, size)`` float32 with ``cells`` features per side.

    A ``(cells+3)^2`` Gaussian lattice is bicubically upsampled, so the pattern scales with the image
    size (same seed -> same anatomy at 256 or 1024 px).
    """
    g = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    step = size / cells
    big = cv2.resize(g, (int(round(step * (cells + 3))), int(round(step * (cells + 3)))), interpolation=cv2.INTER_CUBIC)
    o = int(round(step * 1.5))
    return np.ascontiguousarray(big[o : o + size, o : o + size])


def seg_distance(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    """Euclidean distance from points ``(x, y)`` to the segment ``p0 -> p1``."""
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    L2 = vx * vx + vy * vy + 1e-12
    t = np.clip(((x - p0[0]) * vx + (y - p0[1]) * vy) / L2, 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * vx), y - (p0[1] + t * vy))


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Half-open pixel box ``(x1, y1, x2, y2)`` of a boolean mask, ``None`` if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


# --------------------------------------------------------------------------------------------------
# anatomy parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Anatomy:
    """Geometry, texture seeds and exposure of one phantom (normalised body-frame units).

    ``heart_w`` is the width of the cardiac silhouette box (fraction of the image side); the
    cardiothoracic ratio is ``heart_w / thorax_width``.
    """

    angle: float = 0.0  # patient rotation, radians
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    lung_off: float = 0.20  # lung centre distance from midline
    lung_a: float = 0.165  # lung half-width
    lung_cy: float = 0.52
    lung_b: float = 0.38  # lung half-height (the bottom is cut by the diaphragm)
    dome_r: float = 0.70  # top of the right (image-left) hemidiaphragm dome
    dome_l_delta: float = 0.025  # left dome lies lower
    dome_c: float = 0.075  # dome curvature (drop from top to the lateral wall)
    med_hw: float = 0.058  # mediastinum half-width
    med_x: float = 0.5
    knob_r: float = 0.030
    heart_w: float = 0.32
    heart_h: float = 0.24
    heart_shift: float = 0.22  # heart centre right of midline, in units of heart_w
    heart_tilt: float = 0.45  # long-axis tilt (radians), apex to image right
    clav_y: float = 0.185
    rib_y0: float = 0.095
    rib_sp: float = 0.061
    hilum_y: float = 0.43
    tex_seed: int = 0
    noise_seed: int = 0
    gain: float = 1.0
    gamma: float = 1.0
    offset: float = 0.0

    @property
    def thorax_width(self) -> float:
        """Inner thoracic width (lateral lung wall to lateral lung wall), normalised."""
        return 2.0 * (self.lung_off + self.lung_a)

    def dome_top(self, side: str) -> float:
        return self.dome_r if side == "right" else self.dome_r + self.dome_l_delta


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a plausible normal anatomy (size, position, few-degree rotation, inspiration, heart, exposure)."""
    u = rng.uniform
    lung_off = u(0.19, 0.215)
    lung_a = u(0.155, 0.175)
    tw = 2 * (lung_off + lung_a)
    ctr = u(0.39, 0.47)  # normal cardiothoracic ratio
    return Anatomy(
        angle=float(np.deg2rad(u(-3.0, 3.0))),
        shift=(float(u(-0.015, 0.015)), float(u(-0.02, 0.02))),
        scale=float(u(0.95, 1.04)),
        lung_off=float(lung_off),
        lung_a=float(lung_a),
        lung_cy=float(u(0.50, 0.54)),
        lung_b=float(u(0.36, 0.40)),
        dome_r=float(u(0.69, 0.76)),  # inspiration depth
        dome_l_delta=float(u(0.01, 0.035)),
        dome_c=float(u(0.08, 0.11)),
        med_hw=float(u(0.046, 0.056)),
        med_x=float(0.5 + u(-0.006, 0.006)),
        knob_r=float(u(0.024, 0.034)),
        heart_w=float(ctr * tw),
        heart_h=float(u(0.19, 0.24)),
        heart_shift=float(u(0.18, 0.25)),
        heart_tilt=float(u(0.25, 0.45)),
        clav_y=float(u(0.16, 0.20)),
        rib_y0=float(u(0.085, 0.11)),
        rib_sp=float(u(0.057, 0.065)),
        hilum_y=float(u(0.41, 0.45)),
        tex_seed=int(rng.integers(0, 2**31 - 1)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        gain=float(u(0.93, 1.07)),
        gamma=float(u(0.85, 1.15)),
        offset=float(u(-0.03, 0.03)),
    )


def jitter_anatomy(anat: Anatomy, rng: np.random.Generator, amount: float = 1.0) -> Anatomy:
    """A slightly different anatomy with new texture and noise: used to re-draw the background.

    Geometry moves by a few pixels only (so the re-drawn surroundings still fit a pasted box);
    exposure is kept (it belongs to the acquisition, not to the anatomy).
    """
    u = lambda lo, hi: float(rng.uniform(lo, hi)) * amount  # noqa: E731
    return replace(
        anat,
        angle=anat.angle + float(np.deg2rad(u(-0.7, 0.7))),
        shift=(anat.shift[0] + u(-0.006, 0.006), anat.shift[1] + u(-0.006, 0.006)),
        scale=anat.scale * (1 + u(-0.015, 0.015)),
        lung_a=anat.lung_a * (1 + u(-0.03, 0.03)),
        lung_b=anat.lung_b * (1 + u(-0.02, 0.02)),
        dome_r=anat.dome_r + u(-0.01, 0.01),
        med_hw=anat.med_hw * (1 + u(-0.05, 0.05)),
        knob_r=anat.knob_r * (1 + u(-0.1, 0.1)),
        clav_y=anat.clav_y + u(-0.008, 0.008),
        rib_y0=anat.rib_y0 + u(-0.012, 0.012),
        rib_sp=anat.rib_sp * (1 + u(-0.03, 0.03)),
        hilum_y=anat.hilum_y + u(-0.01, 0.01),
        tex_seed=int(rng.integers(0, 2**31 - 1)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------------------------------
# geometry: SDFs and exact masks on the pixel grid
# --------------------------------------------------------------------------------------------------
@dataclass
class Geometry:
    """Fields of one anatomy on an ``S x S`` grid (all float32 / bool arrays of shape ``(S, S)``)."""

    size: int
    anat: Anatomy
    X: np.ndarray  # image-frame normalised coordinates
    Y: np.ndarray
    Xb: np.ndarray  # body-frame coordinates
    Yb: np.ndarray
    sdf: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)  # body-frame landmarks

    @property
    def edge(self) -> float:
        """Soft-edge width (normalised units): about 1.2 px."""
        return 1.2 / self.size

    def to_image(self, xb: float, yb: float) -> tuple[float, float]:
        """Body-frame point -> image-frame normalised point."""
        a = self.anat
        c, s = np.cos(a.angle), np.sin(a.angle)
        dx, dy = (xb - 0.5) * a.scale, (yb - 0.5) * a.scale
        return (0.5 + a.shift[0] + c * dx - s * dy, 0.5 + a.shift[1] + s * dx + c * dy)

    def dome(self, xb: np.ndarray) -> np.ndarray:
        """Diaphragm height ``y(x)`` in the body frame (two domes, the left one lower)."""
        a = self.anat
        out = np.empty_like(xb)
        for side in ("right", "left"):
            cx = a.med_x + SIDE_SIGN[side] * (a.lung_off - 0.015)
            sel = (xb < a.med_x) if side == "right" else (xb >= a.med_x)
            out[sel] = a.dome_top(side) + a.dome_c * np.abs((xb[sel] - cx) / a.lung_a) ** 2.6
        return out


def heart_sdf(geo: Geometry, heart_w: float, heart_h: float) -> tuple[np.ndarray, np.ndarray]:
    """SDFs ``(silhouette, extent)`` of the heart with a given box width/height (body frame).

    Both are the same field: the heart ellipse above the diaphragm. The ellipse's lowest point sits just
    below the left dome's top, so the silhouette rests on the diaphragm without running down its lateral
    slope (the lung reaches into the cardiophrenic angle beside it)."""
    a = geo.anat
    Xb, Yb = geo.Xb, geo.Yb
    th = a.heart_tilt
    c2, s2 = np.cos(th) ** 2, np.sin(th) ** 2
    hw = heart_w / 2
    hh = (heart_h + 0.06) / 2  # the bottom 0.06 of the ellipse is hidden below the diaphragm
    # Semi-axes (p along the tilted long axis) whose rotated bounding box has half-sizes (hw, hh).
    pa2 = max((hw**2 * c2 - hh**2 * s2) / (c2 - s2), (0.6 * hw) ** 2)
    pb2 = max((hh**2 * c2 - hw**2 * s2) / (c2 - s2), (0.45 * hh) ** 2)
    pa, pb = np.sqrt(pa2), np.sqrt(pb2)
    cx = a.med_x + a.heart_shift * heart_w
    cy = a.dome_top("left") + 0.06 - hh
    u = (Xb - cx) * np.cos(th) + (Yb - cy) * np.sin(th)
    v = -(Xb - cx) * np.sin(th) + (Yb - cy) * np.cos(th)
    r = np.sqrt((u / pa) ** 2 + (v / pb) ** 2)
    d = (r - 1.0) * min(pa, pb)
    heart = np.maximum(d, Yb - geo.dome(Xb)).astype(np.float32)
    return heart, heart


def build_geometry(anat: Anatomy, size: int, heart_wh: tuple[float, float] | None = None) -> Geometry:
    """Evaluate every anatomical SDF and the 11 exact concept masks on an ``size x size`` grid.

    Args:
        anat: anatomy parameters.
        size: image side in pixels.
        heart_wh: optional override of the cardiac silhouette box ``(w, h)`` (cardiomegaly).
    """
    S = int(size)
    t = (np.arange(S, dtype=np.float32) + 0.5) / S
    X, Y = np.meshgrid(t, t)
    c, s = np.cos(anat.angle), np.sin(anat.angle)
    dx, dy = X - 0.5 - anat.shift[0], Y - 0.5 - anat.shift[1]
    Xb = (0.5 + (c * dx + s * dy) / anat.scale).astype(np.float32)
    Yb = (0.5 + (-s * dx + c * dy) / anat.scale).astype(np.float32)
    geo = Geometry(S, anat, X, Y, Xb, Yb)
    a = anat
    sd = geo.sdf
    dome = geo.dome(Xb)
    apex = a.lung_cy - a.lung_b

    # Body outline: neck + sloping shoulders + flanks.
    adx = np.abs(Xb - 0.5)
    shoulder = 0.03 + 0.30 * np.clip((adx - 0.09) / 0.38, 0, 1) ** 2
    sd["body"] = np.maximum(adx - 0.44, shoulder - Yb).astype(np.float32)

    # Mediastinum: a central band (upper part narrower) + aortic knob; heart added below.
    mw = a.med_hw * (0.92 + 0.08 * smoothstep(0.3, 0.45, Yb))
    band = np.maximum(np.abs(Xb - a.med_x) - mw, np.maximum(apex - 0.01 - Yb, Yb - dome))
    knob_c = (a.med_x + a.med_hw + 0.4 * a.knob_r, apex + 0.21)
    knob = np.hypot(Xb - knob_c[0], Yb - knob_c[1]) - a.knob_r
    hw_h = heart_wh if heart_wh is not None else (a.heart_w, a.heart_h)
    heart, heart_ext = heart_sdf(geo, *hw_h)
    sd["heart"] = heart
    sd["heart extent"] = heart_ext
    sd["mediastinum"] = np.minimum(np.minimum(band, knob), heart).astype(np.float32)
    y_um = knob_c[1] + a.knob_r
    sd["upper mediastinum"] = np.maximum(np.minimum(band, knob), Yb - y_um).astype(np.float32)

    # Lungs: superellipses (rounder apex, boxier base) cut by the dome, the mediastinum and the heart.
    for side, sg in SIDE_SIGN.items():
        cx = a.med_x + sg * a.lung_off
        p = 2.0 + 1.6 * smoothstep(a.lung_cy - 0.1, a.lung_cy + 0.12, Yb)
        f = np.abs((Xb - cx) / a.lung_a) ** p + np.abs((Yb - a.lung_cy) / a.lung_b) ** p
        ell = ((f ** (1.0 / p)) - 1.0) * a.lung_a
        sd[f"{side} lung field"] = ell.astype(np.float32)
        lung = np.maximum(np.maximum(ell, Yb - dome), -np.minimum(sd["mediastinum"], heart_ext))
        sd[f"{side} lung"] = lung.astype(np.float32)
        # Costophrenic angle: the most lateral point of the dome still inside the lung field.
        xs = np.linspace(cx - 1.2 * a.lung_a, cx, 400) if sg < 0 else np.linspace(cx + 1.2 * a.lung_a, cx, 400)
        ys = geo.dome(xs.astype(np.float32))
        pp = 2.0 + 1.6 * smoothstep(a.lung_cy - 0.1, a.lung_cy + 0.12, ys)
        ff = np.abs((xs - cx) / a.lung_a) ** pp + np.abs((ys - a.lung_cy) / a.lung_b) ** pp
        k = int(np.argmax(ff < 1.0))
        cp = (float(xs[k]), float(ys[k]))
        geo.points[f"{side} cp"] = cp
        cpd = np.sqrt(((Xb - cp[0]) / 0.075) ** 2 + ((Yb - cp[1]) / 0.095) ** 2) - 1.0
        sd[f"{side} costophrenic angle"] = np.maximum(lung, cpd * 0.075).astype(np.float32)
        # Hilum: an ellipse at the medial lung border.
        hx = a.med_x + sg * (a.med_hw + 0.045)
        hy = a.hilum_y - (0.012 if side == "left" else 0.0)
        geo.points[f"{side} hilum"] = (float(hx), float(hy))
        hil = np.sqrt(((Xb - hx) / 0.048) ** 2 + ((Yb - hy) / 0.07) ** 2) - 1.0
        sd[f"{side} hilar structures"] = np.maximum(lung, hil * 0.048).astype(np.float32)
        # Clavicle: an S-curved band from the sternal end to the acromion.
        tt = (sg * (Xb - 0.5) - 0.035) / 0.30
        yc = a.clav_y - 0.075 * np.clip(tt, 0, 1) ** 0.8 - 0.018 * np.sin(np.pi * np.clip(tt, 0, 1))
        thick = 0.0165 - 0.006 * np.clip(tt, 0, 1)
        cl = np.maximum(np.abs(Yb - yc) - thick, np.maximum(-tt * 0.3, (tt - 1.0) * 0.3))
        sd[f"{side} clavicle"] = cl.astype(np.float32)
    sd["cardiac silhouette"] = heart
    sd["abdomen"] = np.maximum(dome - Yb, sd["body"]).astype(np.float32)
    sd["spine"] = np.maximum(np.abs(Xb - a.med_x) - 0.04, -Yb).astype(np.float32)
    # Trachea to the carina, then the main bronchi towards the hila.
    carina = (a.med_x, a.hilum_y - 0.035)
    tr = np.maximum(np.abs(Xb - a.med_x) - 0.016, Yb - carina[1])
    for side in SIDE_SIGN:
        hx, hy = geo.points[f"{side} hilum"]
        tr = np.minimum(tr, seg_distance(Xb, Yb, carina, (hx + 0.3 * (a.med_x - hx), hy + 0.015)) - 0.009)
    sd["trachea"] = tr.astype(np.float32)
    bub_c = (a.med_x + a.lung_off + 0.01, a.dome_top("left") + a.dome_c * 0.4 + 0.05)
    sd["gastric bubble"] = (np.sqrt(((Xb - bub_c[0]) / 0.05) ** 2 + ((Yb - bub_c[1]) / 0.03) ** 2) - 1.0) * 0.03

    for concept in CONCEPTS:
        geo.masks[concept] = sd[concept] < 0
    return geo


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """A finding's effect on the density map (all arrays full-size ``(S, S)`` float32 or ``None``).

    ``D <- D + over_alpha * (over_value - D)``, then ``D <- D + add``; ``suppress`` (0..1) removes lung
    markings (pneumothorax).
    """

    over_alpha: np.ndarray | None = None
    over_value: float = 0.0
    add: np.ndarray | None = None
    suppress: np.ndarray | None = None


def anatomy_texture(geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """``(base density, lung-marking density)`` of the anatomy (float32 ``(S, S)``)."""
    a, S, e = geo.anat, geo.size, geo.edge
    sd = geo.sdf
    Xb, Yb = geo.Xb, geo.Yb
    rng = np.random.default_rng([a.tex_seed, 7])
    n_soft = value_noise(rng, S, 5)
    n_wob = value_noise(rng, S, 7)
    n_wob2 = value_noise(rng, S, 13)
    n_dash = value_noise(rng, S, 22)
    n_fine = value_noise(rng, S, 48)

    body = soft(sd["body"], 3 * e)
    D = body * (0.40 + 0.05 * n_soft) * (0.72 + 0.28 * smoothstep(0.0, 0.07, -sd["body"]))
    lungs = np.maximum(soft(sd["right lung"], e), soft(sd["left lung"], e))
    field_soft = np.maximum(soft(sd["right lung field"], 6 * e), soft(sd["left lung field"], 6 * e))
    # Lung air: darker centrally; the chest wall / pleura gives a slight gradient near the border.
    D = D - lungs * (0.27 + 0.03 * n_soft)
    # Abdomen below the diaphragm and the mediastinum are dense.
    abd = soft(sd["abdomen"], 2 * e)
    D = D + abd * (0.70 - D) * 0.95
    D = D - 0.22 * soft(sd["gastric bubble"], 3 * e) * abd
    med = soft(sd["mediastinum"], e)
    D = D + med * (0.56 + 0.12 * soft(sd["heart"], 4 * e) + 0.03 * n_soft - D)
    # Spine: vertebral bodies with darker disc spaces, faint through the heart.
    ph = (Yb - 0.02) / 0.047
    vert = 1.0 - 0.55 * np.exp(-(((ph - np.floor(ph)) - 0.5) / 0.09) ** 2)
    D = D + 0.05 * soft(sd["spine"], 2 * e) * vert * body
    # Ribs: posterior ribs (arcs descending laterally) + faint anterior ribs; only over the thorax.
    r = np.abs(Xb - 0.5) / 0.4
    thorax = field_soft * (1.0 - 0.85 * med) * (Yb < geo.dome(Xb) + 0.04)
    lat = smoothstep(0.03, 0.09, np.abs(Xb - 0.5))
    ribs = np.zeros_like(D)
    for off, amp, g in (
        (0.0, 1.0, -0.06 * r + 0.22 * r * r),
        (0.45, 0.45, 0.12 - 0.20 * r * r),
    ):
        phi = (Yb - g - a.rib_y0) / a.rib_sp + off
        k = np.floor(phi)
        fr = phi - k
        w = 0.44
        band = smoothstep(0.0, 0.06, fr) * (1.0 - smoothstep(w - 0.06, w, fr))
        cortex = np.exp(-((fr - 0.05) / 0.05) ** 2) + np.exp(-((fr - w + 0.05) / 0.05) ** 2)
        valid = (k >= 0) & (k <= 9)
        ribs += amp * valid * band * (0.55 + 0.35 * cortex)
    D = D + 0.11 * ribs * thorax * lat
    # Clavicles.
    for side in SIDE_SIGN:
        D = D + 0.22 * soft(sd[f"{side} clavicle"], e) * body
    # Trachea and main bronchi: air column.
    D = D - 0.20 * soft(sd["trachea"], e) * body
    # Hila: dense branching vessels at the lung root.
    for side in SIDE_SIGN:
        D = D + (0.10 + 0.04 * n_wob2) * soft(sd[f"{side} hilar structures"], 3 * e)

    # Lung markings: vessels radiating from each hilum, tapering to the periphery.
    vessels = np.zeros_like(D)
    for side in SIDE_SIGN:
        hx, hy = geo.points[f"{side} hilum"]
        rr = np.hypot(Xb - hx, Yb - hy)
        th = np.arctan2(Yb - hy, Xb - hx)
        v1 = np.cos(38 * th + 2.2 * n_wob)
        v2 = np.cos(85 * th + 3.0 * n_wob2)
        ridge1 = np.clip((v1 - 0.72) / 0.28, 0, 1) ** 1.5
        ridge2 = np.clip((v2 - 0.80) / 0.20, 0, 1) ** 1.5
        amp1 = np.exp(-rr / 0.20) * smoothstep(0.0, 0.04, rr)
        amp2 = 0.6 * np.exp(-rr / 0.28) * smoothstep(0.06, 0.14, rr)
        sel = (Xb < a.med_x) if side == "right" else (Xb >= a.med_x)
        vessels += sel * (amp1 * ridge1 + amp2 * ridge2)
    vessels = vessels * (0.65 + 0.35 * np.clip(n_dash, -1, 1)) + 0.08 * np.clip(n_fine, -2, 2)
    marks = (0.17 * vessels * lungs).astype(np.float32)
    return D.astype(np.float32), marks


def _detector_sigma(size: int) -> float:
    return 0.6 * size / 256.0


def detector_blur(D: np.ndarray, size: int) -> np.ndarray:
    """The detector's unsharpness on a film of ``size`` px: a Gaussian blur of sigma ``0.6 * size / 256``
    px (OpenCV picks the kernel's width from sigma) of the 2-D float32 density ``D``, reflected at the edges."""
    sigma = _detector_sigma(size)
    return cv2.GaussianBlur(D, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


@lru_cache(maxsize=None)
def detector_reach(size: int) -> int:
    """How many pixels :func:`detector_blur` carries a change at one pixel (the half-width of its
    kernel), measured on an impulse rather than re-deriving OpenCV's kernel-size rule: a structure
    drawn in the density changes the film up to this far beyond its own pixels (3 px at 256 px)."""
    n = 2 * (int(np.ceil(6 * _detector_sigma(size))) + 2) + 1  # wider than any kernel OpenCV picks (<= 8 sigma + 1)
    impulse = np.zeros((n, n), np.float32)
    impulse[n // 2, n // 2] = 1.0
    row = detector_blur(impulse, size)[n // 2]
    return int(np.flatnonzero(row > 0).max() - n // 2)


def compose(
    geo: Geometry,
    layers: list[Layer],
    cue_alpha: np.ndarray | None = None,
    texture: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Render the final ``(S, S)`` uint8 image (MONOCHROME2) from anatomy, finding layers and cues."""
    a, S = geo.anat, geo.size
    base, marks = texture if texture is not None else anatomy_texture(geo)
    sup = None
    for lay in layers:
        if lay.suppress is not None:
            sup = lay.suppress if sup is None else np.maximum(sup, lay.suppress)
    D = base + (marks if sup is None else marks * (1.0 - sup))
    for lay in layers:
        if lay.over_alpha is not None:
            D = D + lay.over_alpha * (lay.over_value - D)
        if lay.add is not None:
            D = D + lay.add
    if cue_alpha is not None:
        D = D + cue_alpha * (1.05 - D)
    D = detector_blur(D, S)
    I = a.gain * np.clip(D + 0.05 + a.offset, 0.0, None) ** a.gamma
    nrng = np.random.default_rng([a.noise_seed, 11])
    I = I + 0.012 * nrng.standard_normal((S, S)).astype(np.float32) + 0.008 * value_noise(nrng, S, 30)
    return np.clip(I * 255.0 + 0.5, 0, 255).astype(np.uint8)
