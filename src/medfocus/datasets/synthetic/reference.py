"""Reference pool of normal synthetic films with the 11 concept masks (what MedFocus transfers from).

Format (agreed with the MedFocus concepts module)::

    <out>/images/<id>.png                       8-bit grayscale film
    <out>/masks/<id>/<concept_slug>.png         uint8 0/255, one per medfocus.types.CONCEPTS entry
    <out>/reference.json                        {"ids": [...], "concepts": [...], "seed", "size"}

``<concept_slug>`` is :func:`medfocus.types.concept_slug` (``"left hilar structures" -> left_hilar_structures``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medfocus.datasets.synthetic import GENERATOR_VERSION
from medfocus.datasets.synthetic.case import generate_case
from medfocus.errors import ConfigError
from medfocus.types import CONCEPTS, concept_slug

#: Reference films use seeds far from dataset seeds (dataset film i of seed s uses s * 100000 + i).
REFERENCE_SEED_OFFSET = 7_000_000_000


def write_reference_pool(out_dir: str | os.PathLike, n: int = 16, seed: int = 0, size: int = 256) -> Path:
    """Write ``n`` normal phantoms (no findings, no cues) with their concept masks.

    Returns:
        The output folder.
    """
    from medfocus.io.writers import write_png

    if n < 1:
        raise ConfigError(f"reference pool size must be >= 1, got {n}")
    out = Path(out_dir)
    ids = []
    for i in range(int(n)):
        case = generate_case(REFERENCE_SEED_OFFSET + int(seed) * 10_000 + i, size=size, findings=[])
        rid = f"ref{i:04d}"
        write_png(out / "images" / f"{rid}.png", case.image)
        for c in CONCEPTS:
            write_png(out / "masks" / rid / f"{concept_slug(c)}.png", case.concept_masks[c].astype(np.uint8) * 255)
        ids.append(rid)
    (out / "reference.json").write_text(
        json.dumps({"ids": ids, "concepts": list(CONCEPTS), "seed": int(seed), "size": int(size),
                    "generator_version": GENERATOR_VERSION}, indent=1)
    )
    return out
