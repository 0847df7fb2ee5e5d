"""Contact sheet of synthetic films with their finding boxes (and cue boxes) drawn on top."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from medfocus.datasets.synthetic.case import SyntheticCase
from medfocus.datasets.synthetic.findings import FINDINGS

#: One colour per finding (RGB), cues in cyan.
COLOURS = {
    "cardiomegaly": (255, 80, 80),
    "pleural effusion": (80, 160, 255),
    "nodule": (255, 220, 0),
    "mass": (255, 140, 0),
    "pneumothorax": (200, 80, 255),
    "consolidation": (80, 230, 120),
    "atelectasis": (255, 100, 200),
}
CUE_COLOUR = (0, 230, 230)


def contact_sheet(cases: list[SyntheticCase], path: str | os.PathLike, cols: int | None = None, tile: int = 256) -> Path:
    """Write a PNG grid of ``cases`` (each resized to ``tile`` px) with finding boxes, labels and cue boxes.

    Returns:
        The path written.
    """
    if not cases:
        raise ValueError("contact_sheet needs at least one case")
    cols = cols or min(len(cases), 4)
    rows = math.ceil(len(cases) / cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), (0, 0, 0))
    for k, c in enumerate(cases):
        im = Image.fromarray(c.image).convert("RGB").resize((tile, tile), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        s = tile / c.size
        for cue in c.cues:
            x1, y1, x2, y2 = (v * s for v in cue["box"])
            d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=CUE_COLOUR)
        for f in c.findings:
            x1, y1, x2, y2 = (v * s for v in f.box)
            col = COLOURS.get(f.name, (255, 255, 255))
            d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=col, width=max(1, tile // 200))
            d.text((x1 + 2, max(0, y1 - 11)), f.name, fill=col)
        label = f"seed {c.seed}" + ("" if c.findings else "  normal")
        d.text((3, tile - 12), label, fill=(255, 255, 255))
        sheet.paste(im, ((k % cols) * tile, (k // cols) * tile))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(p)
    return p


__all__ = ["contact_sheet", "COLOURS", "FINDINGS"]
