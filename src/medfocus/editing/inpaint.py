"""Classical inpainting editor (OpenCV Telea / Navier–Stokes).

Fast and CPU-only, but **out of distribution**: the masked region is filled by propagating the
intensities and isophotes of its border inward, which yields smooth, texture-free patches (and,
for background edits whose mask is everything except the boxes, an image that is mostly a smear of
the box borders). Such images are far from any real radiograph, so a model's answer on them can
change for reasons unrelated to the finding. Use it for quick CPU checks and ablations; the paper's
benchmark uses RadEdit (:mod:`medfocus.editing.radedit`) and the in-distribution CPU alternative is
:mod:`medfocus.editing.transplant`. The prompt is ignored (inpainting is not text-guided).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medfocus.editing.base import Editor
from medfocus.errors import ConfigError
from medfocus.types import Sample


class InpaintEditor(Editor):
    """``cv2.inpaint`` inside the mask.

    Args:
        method: ``"telea"`` (fast marching, Telea 2004) or ``"ns"`` (Navier–Stokes, Bertalmio 2001).
        radius: neighbourhood radius in pixels used by OpenCV.
    """

    name = "inpaint"

    def __init__(self, method: str = "telea", radius: float = 5.0, seed: int = 0):
        if method not in ("telea", "ns"):
            raise ConfigError(f"inpaint method must be 'telea' or 'ns', got {method!r}")
        self.method = method
        self.radius = float(radius)
        self.seed = int(seed)  # unused: the editor is deterministic

    def params(self) -> dict[str, Any]:
        return {"method": self.method, "radius": self.radius}

    def _edit(self, image: np.ndarray, mask: np.ndarray, prompt: str, *, sample: Sample | None,
              kind: str | None) -> np.ndarray:
        import cv2

        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        return cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8) * 255, self.radius, flag)
