"""Shortcut cues: radiopaque burn-ins a model can learn to answer from instead of the finding.

Three cue types, all drawn outside every finding box (so the background counterfactual, which re-draws
everything outside the finding's box, removes them):

* ``marker`` — a lead side-marker letter ("L" or "R") in a framed square near a top corner;
* ``portable`` — the text tag "PORTABLE" near a top corner;
* ``tube`` — a chest tube: a bright line entering through the lateral chest wall and running up to the apex.

Each cue is recorded as ``{"type", "box", "core_box", "text" (marker / portable), "finding" (the finding it
was correlated with, or None)}``, boxes as ``[x1, y1, x2, y2]`` half-open pixel edges:

* ``box`` -- every pixel the cue can change: its drawn pixels (opacity > 0, the anti-aliased fringe
  included) widened by the detector blur's reach (:func:`~medfocus.datasets.synthetic.phantom.detector_reach`,
  3 px at 256 px), clipped to the image; a film with the cue differs from the same film without it only
  inside (tested). The ground truth of "does the map point at the cue".
* ``core_box`` -- the stroke's core (drawn at more than 40/255 of full intensity): what the placement
  keeps clear of findings and earlier cues (so films are the same as before ``box`` covered the whole
  cue), and what the shortcut twin's auxiliary loss marks (its training recipe).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from medfocus.datasets.synthetic.phantom import Geometry, detector_reach, mask_box

CUE_TYPES: tuple[str, ...] = ("marker", "portable", "tube")

#: Default finding -> cue type correlation used by ``generate_case(cue_rate=...)``.
DEFAULT_CUE_MAP: dict[str, str] = {
    "cardiomegaly": "portable",
    "pleural effusion": "tube",
    "pneumothorax": "tube",
    "consolidation": "portable",
    "atelectasis": "portable",
    "nodule": "marker",
    "mass": "marker",
}


def _intersects(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]], pad: float) -> bool:
    for o in others:
        if box[0] < o[2] + pad and o[0] - pad < box[2] and box[1] < o[3] + pad and o[1] - pad < box[3]:
            return True
    return False


def _cue_record(kind: str, canvas: np.ndarray, core: tuple[float, float, float, float], text: str | None) -> dict[str, Any]:
    """The record of a placed cue (see the module docstring): ``box`` from its nonzero pixels widened by the
    detector blur and clipped to the image, ``core_box`` the placement's ``core``."""
    S = canvas.shape[0]
    r = detector_reach(S)
    x1, y1, x2, y2 = mask_box(canvas > 0)  # type: ignore[misc] - the core is not empty, so neither is this
    box = [max(0.0, x1 - r), max(0.0, y1 - r), min(float(S), x2 + r), min(float(S), y2 + r)]
    return {"type": kind, "box": box, "core_box": list(core), "text": text}


def predates_whole_cue_boxes(cue: dict[str, Any]) -> bool:
    """Whether a cue record was written before ``box`` held the whole cue (no ``core_box``: its ``box`` is
    the stroke's core, which misses the fringe and the blur). The films are the same; rewriting the
    dataset with ``medfocus synth`` (same seed and settings) gives whole-cue boxes."""
    return "core_box" not in cue


def draw_cue(
    kind: str,
    geo: Geometry,
    rng: np.random.Generator,
    avoid: list[tuple[float, float, float, float]],
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Draw one cue as an opacity map ``(S, S)`` float32 in ``[0, 1]`` and its record, avoiding ``avoid`` boxes.

    ``avoid`` holds finding boxes and earlier cues' ``core_box`` es: a placement is refused when its
    core box comes within ``max(3, S / 64)`` px of one (boxes are whole pixels, so the clearance is at least
    the blur's reach plus the one-pixel anti-aliased fringe at every size, and the full ``box`` stays clear
    of every finding box too; tested).

    Returns ``None`` when no placement avoids every box.
    """
    S = geo.size
    pad = max(3.0, S / 64)
    th = max(1, int(round(S / 160)))
    if kind in ("marker", "portable"):
        corners = ["tl", "tr", "bl", "br"] if kind == "marker" else ["tr", "tl", "br", "bl"]
        order = list(rng.permutation(2)) + [2, 3]
        text = ("L" if rng.random() < 0.5 else "R") if kind == "marker" else "PORTABLE"
        scale = (S / 256) * (0.55 if kind == "marker" else 0.42)
        (tw, tht), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, th)
        m = int(round(S * 0.035))
        for idx in order:
            c = corners[idx]
            x0 = m if c[1] == "l" else S - m - tw - 2 * th
            y0 = m + tht if c[0] == "t" else S - m - base
            canvas = np.zeros((S, S), np.uint8)
            cv2.putText(canvas, text, (int(x0 + th), int(y0)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, th, cv2.LINE_AA)
            if kind == "marker":
                cv2.rectangle(canvas, (int(x0 - th), int(y0 - tht - 2 * th)), (int(x0 + tw + 2 * th), int(y0 + base)), 255, 1)
            box = mask_box(canvas > 40)
            if box is None or _intersects(box, avoid, pad):
                continue
            return canvas.astype(np.float32) / 255.0, _cue_record(kind, canvas, box, text)
        return None
    if kind == "tube":
        a = geo.anat
        for side in ([-1, 1] if rng.random() < 0.5 else [1, -1]):
            lat = 0.5 + side * (a.lung_off + a.lung_a + 0.06)
            pts_b = [
                (lat + side * 0.05, 0.80),
                (lat - side * 0.02, 0.70),
                (0.5 + side * (a.lung_off + 0.6 * a.lung_a), 0.55),
                (0.5 + side * (a.lung_off + 0.2 * a.lung_a), 0.35),
                (0.5 + side * a.lung_off, a.lung_cy - a.lung_b + 0.07),
            ]
            pts = np.array([geo.to_image(x, y) for x, y in pts_b]) * S
            canvas = np.zeros((S, S), np.uint8)
            cv2.polylines(canvas, [np.round(pts * 4).astype(np.int32)], False, 255, max(2, th + 1), cv2.LINE_AA, shift=2)
            box = mask_box(canvas > 40)
            if box is None or _intersects(box, avoid, pad):
                continue
            return canvas.astype(np.float32) / 255.0 * 0.8, _cue_record("tube", canvas, box, None)
        return None
    raise ValueError(f"unknown cue type {kind!r}; expected one of {CUE_TYPES}")
