"""Oracle editor: the exact counterfactuals of the synthetic chest X-ray world.

The synthetic world (:mod:`medfocus.datasets.synthetic`) renders, for every positive sample, the
three counterfactuals the causal filter needs and lists their files in
``sample.meta["counterfactuals"] = {"foreground": path, "background": path, "background_normal": path}``:

* ``foreground`` — the same image with that finding absent;
* ``background`` — the finding pixel-identical inside its box, anatomy outside redrawn, cues removed;
* ``background_normal`` — as ``background``, and every other finding outside the box removed too.

The oracle returns the rendered counterfactual inside the edit mask and the original outside it
(the renderers only change pixels in that region anyway; compositing makes the editor contract
exact). Which counterfactual to use is the ``kind`` argument; when it is not given it is inferred:
``"No abnormality"`` means ``background_normal``; otherwise ``foreground`` if the mask is the union
of the sample's boxes, else ``background``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medfocus.editing.base import NORMAL_PROMPT, Editor, boxes_mask
from medfocus.errors import DataError
from medfocus.types import Sample


def resolve_meta_path(path: str, sample: Sample) -> Path:
    """Resolve a path stored in ``sample.meta``: absolute, or relative to ``meta["root"]``, to the
    image's folder or one of its ancestors (manifests store paths relative to the dataset root)."""
    p = Path(path)
    if p.is_absolute():
        return p
    bases: list[Path] = []
    if sample.meta.get("root"):
        bases.append(Path(sample.meta["root"]))
    img_dir = Path(sample.image_path).resolve().parent
    bases += [img_dir, *img_dir.parents[:4]]
    for base in bases:
        if (base / p).exists():
            return base / p
    return (bases[0] / p) if bases else p


class OracleEditor(Editor):
    """Exact synthetic counterfactuals (see module docstring). Deterministic; the prompt only serves
    to infer the kind when it is not passed."""

    name = "oracle"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def params(self) -> dict[str, Any]:
        return {}

    def sample_inputs(self, sample: Sample) -> dict[str, Any]:
        """SHA-256 of each counterfactual render of ``sample`` (``None`` for a missing file, whose edit then
        fails): the edits are these files, so they are part of the edit-cache key."""
        from medfocus.io.fingerprint import file_sha256

        cfs = sample.meta.get("counterfactuals")
        if not isinstance(cfs, dict):
            return {}
        out: dict[str, Any] = {}
        for kind, rel in sorted(cfs.items()):
            h = file_sha256(resolve_meta_path(str(rel), sample)) if rel else None
            out[f"counterfactual_{kind}"] = None if h is None else h[1]
        return out

    @staticmethod
    def infer_kind(mask: np.ndarray, prompt: str, sample: Sample) -> str:
        """``background_normal`` for "No abnormality"; ``foreground`` if ``mask`` equals the box union."""
        if prompt.strip().lower() == NORMAL_PROMPT.lower():
            return "background_normal"
        fg = boxes_mask(sample.boxes, (mask.shape[1], mask.shape[0]))
        return "foreground" if np.array_equal(fg, mask) else "background"

    def _edit(self, image: np.ndarray, mask: np.ndarray, prompt: str, *, sample: Sample | None,
              kind: str | None) -> np.ndarray:
        if sample is None:
            raise DataError("the oracle editor needs the sample (its meta['counterfactuals'] paths)")
        cfs = sample.meta.get("counterfactuals")
        if not isinstance(cfs, dict):
            raise DataError(
                f"sample {sample.dataset}#{sample.index} has no meta['counterfactuals']; the oracle editor only works "
                "on the synthetic world (medfocus synth) whose manifest lists exact counterfactual renders"
            )
        kind = kind or self.infer_kind(mask, prompt, sample)
        if kind not in cfs or not cfs[kind]:
            raise DataError(
                f"sample {sample.dataset}#{sample.index}: meta['counterfactuals'] has no {kind!r} entry "
                f"(has {sorted(cfs)})"
            )
        from medfocus.io import read_image

        path = resolve_meta_path(str(cfs[kind]), sample)
        cf, _ = read_image(path)
        if cf.shape != image.shape:
            raise DataError(f"counterfactual {path} has shape {cf.shape}, image has {image.shape}")
        return np.where(mask, cf, image)
