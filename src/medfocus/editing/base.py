"""The counterfactual-editor interface, its registry, mask helpers and the on-disk edit cache.

An editor changes an ``(H, W)`` uint8 chest X-ray only where a boolean mask says, guided by a
text prompt ("No {attribute}", "No abnormality"). The causal filter (:mod:`medfocus.bench`) uses
three edits per sample (:data:`EDIT_KINDS`):

==================== ============================ ======================
kind                 mask                         prompt
==================== ============================ ======================
``foreground``       union of the GT boxes        ``"No {attribute}"``
``background``       complement of that union     ``"No {attribute}"``
``background_normal`` complement of that union    ``"No abnormality"``
==================== ============================ ======================

Contract shared by every editor: **pixels outside the mask are returned unchanged** (bit-exact).
Editors that blend (``transplant``, ``radedit``) feather only *inside* the mask, over a band of
``feather`` pixels along its border, so the guarantee holds exactly.

Registry (timm-style): :func:`get_editor` by name, :func:`list_editors`, :func:`register_editor`.
Entries are imported lazily so that e.g. ``radedit`` (diffusers) costs nothing unless used.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from medfocus.errors import ConfigError, DataError
from medfocus.io.atomic import atomic_write_bytes
from medfocus.io.paths import safe_filename
from medfocus.registry import LazyRegistry
from medfocus.types import Box, Sample

#: The three edits of the causal filter, in the order the filter makes them.
EDIT_KINDS: tuple[str, ...] = ("foreground", "background", "background_normal")

#: Prompt of the "remove everything abnormal" background edit.
NORMAL_PROMPT = "No abnormality"


def removal_prompt(attribute: str) -> str:
    """The prompt that edits a finding out: ``"No {attribute}"``."""
    return f"No {attribute}"


def edit_prompt(kind: str, attribute: str) -> str:
    """Prompt of an edit kind for a finding (see the module table)."""
    if kind not in EDIT_KINDS:
        raise ConfigError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    return NORMAL_PROMPT if kind == "background_normal" else removal_prompt(attribute)


def boxes_mask(boxes: Iterable[Box], size: tuple[int, int]) -> np.ndarray:
    """Rasterise half-open pixel-edge boxes into a boolean ``(H, W)`` mask.

    Args:
        boxes: ``(x1, y1, x2, y2)`` edges in pixels; fractional edges are rounded *outwards*
            (``floor(x1)``, ``ceil(x2)``) so every pixel the box touches is covered.
        size: ``(W, H)`` of the image.
    Returns:
        ``(H, W)`` bool, True inside the union of the boxes (clipped to the image).
    """
    W, H = int(size[0]), int(size[1])
    mask = np.zeros((H, W), dtype=bool)
    for b in boxes:
        x1, y1, x2, y2 = (float(v) for v in b)
        c1, r1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        c2, r2 = min(W, int(np.ceil(x2))), min(H, int(np.ceil(y2)))
        if c2 > c1 and r2 > r1:
            mask[r1:r2, c1:c2] = True
    return mask


def edit_mask(kind: str, boxes: Iterable[Box], size: tuple[int, int]) -> np.ndarray:
    """Mask of the region an edit kind changes: the box union (foreground) or its complement."""
    fg = boxes_mask(boxes, size)
    if kind == "foreground":
        return fg
    if kind in ("background", "background_normal"):
        return ~fg
    raise ConfigError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def feather_alpha(mask: np.ndarray, feather: float) -> np.ndarray:
    """Blend weights that are 0 outside ``mask`` and ramp up to 1 *inside* it.

    ``alpha = clip(d / feather, 0, 1)`` where ``d`` is the Euclidean distance (pixels) from a mask
    pixel to the nearest non-mask pixel (1 for pixels on the border). Pixels deeper than ``feather``
    get weight 1; ``feather <= 1`` gives the hard mask. The image border does not count as a
    boundary (an all-True mask gives all ones).

    Args:
        mask: ``(H, W)`` bool.
        feather: width of the ramp in pixels.
    Returns:
        ``(H, W)`` float32 in [0, 1], exactly 0 wherever ``mask`` is False.
    """
    mask = np.asarray(mask, dtype=bool)
    if feather <= 1 or not mask.any() or mask.all():
        return mask.astype(np.float32)
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(mask)
    return np.clip(d / float(feather), 0.0, 1.0).astype(np.float32) * mask


def composite(original: np.ndarray, edited: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``alpha * edited + (1 - alpha) * original`` as uint8, bit-exact where ``alpha == 0``."""
    out = original.astype(np.float32) * (1.0 - alpha) + edited.astype(np.float32) * alpha
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    out[alpha <= 0] = original[alpha <= 0]
    return out


def check_edit_inputs(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise ``(image uint8 (H, W), mask bool (H, W))``."""
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 2:
        raise DataError(f"editor input must be a (H, W) grayscale image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise DataError(f"editor input must be uint8, got {image.dtype}")
    if mask.shape != image.shape:
        raise DataError(f"edit mask shape {mask.shape} does not match image shape {image.shape}")
    return image, mask.astype(bool)


class Editor(ABC):
    """A counterfactual image editor.

    Subclasses implement :meth:`_edit`; :meth:`edit` validates the inputs and enforces the
    "unchanged outside the mask" contract. ``cache_id`` names the editor *and* every parameter that
    changes its output, so cached edits of different settings never collide; the content of the files it
    reads (reference pool, weights, renders) is :meth:`sample_inputs`'s.

    Attributes:
        name: registry name.
        seed: seed of any randomness (part of the cache key; deterministic editors ignore it).
    """

    name: str = "editor"
    seed: int = 0

    def edit(self, image: np.ndarray, mask: np.ndarray, prompt: str, *, sample: Sample | None = None,
             kind: str | None = None) -> np.ndarray:
        """Edit ``image`` inside ``mask`` according to ``prompt``.

        Args:
            image: ``(H, W)`` uint8 grayscale X-ray (original pixels).
            mask: ``(H, W)`` bool, True where the image may change.
            prompt: e.g. ``"No pleural effusion"`` or ``"No abnormality"``.
            sample: the sample the image belongs to (needed by editors that use its metadata,
                e.g. the synthetic oracle).
            kind: which of :data:`EDIT_KINDS` this edit is, when known (the oracle infers it
                otherwise).
        Returns:
            ``(H, W)`` uint8, identical to ``image`` wherever ``mask`` is False.
        """
        image, mask = check_edit_inputs(image, mask)
        if not mask.any():
            return image.copy()
        out = np.asarray(self._edit(image, mask, prompt, sample=sample, kind=kind))
        if out.shape != image.shape:
            raise DataError(f"editor {self.name!r} returned shape {out.shape}, expected {image.shape}")
        out = np.clip(out, 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out.copy()
        out[~mask] = image[~mask]  # the contract, enforced once for every editor
        return out

    @abstractmethod
    def _edit(self, image: np.ndarray, mask: np.ndarray, prompt: str, *, sample: Sample | None,
              kind: str | None) -> np.ndarray:
        """Editor-specific work; may return any array of the image's shape (clipped to uint8)."""

    def params(self) -> dict[str, Any]:
        """Parameters that change the output (part of :attr:`cache_id`)."""
        return {}

    @property
    def cache_id(self) -> str:
        """``name`` plus a short hash of :meth:`params` (stable across runs)."""
        p = self.params()
        if not p:
            return self.name
        h = hashlib.sha1(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.name}-{h}"

    def sample_inputs(self, sample: Sample) -> dict[str, Any]:
        """Content of what an edit of ``sample`` reads besides the film and the settings, as ``{name:
        fingerprint}``: per-sample files (the oracle's counterfactual renders) and editor-wide ones (the
        transplant's reference pool, RadEdit's weights). Part of the edit-cache key and of a benchmark
        split's sample fingerprint, so a changed input is never served an old edit. Must be cheap per
        call (editor-wide fingerprints are computed once per editor). Default: none."""
        return {}

    def prepare(self) -> None:
        """Load whatever the editor needs now (weights, reference pool) so that a missing file fails
        before a long run starts. Editors load lazily otherwise; the default does nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()})"


# ---- registry ----------------------------------------------------------------------------------
_REGISTRY: LazyRegistry[Callable[..., Editor]] = LazyRegistry("editor", {
    "oracle": "medfocus.editing.oracle:OracleEditor",
    "inpaint": "medfocus.editing.inpaint:InpaintEditor",
    "inpaint_telea": "medfocus.editing.inpaint:InpaintEditor",
    "inpaint_ns": "medfocus.editing.inpaint:InpaintEditor",
    "transplant": "medfocus.editing.transplant:TransplantEditor",
    "radedit": "medfocus.editing.radedit:RadEditEditor",
})
_DEFAULT_KW: dict[str, dict[str, Any]] = {
    "inpaint_telea": {"method": "telea"},
    "inpaint_ns": {"method": "ns"},
}


def register_editor(name: str, factory: str | Callable[..., Editor], *, overwrite: bool = False) -> None:
    """Register an editor class/factory (or a lazy ``"module:attr"`` path) under ``name``.

    Raises:
        ConfigError: ``name`` is taken and ``overwrite`` is false.
    """
    _REGISTRY.register(name, factory, overwrite=overwrite)


def list_editors() -> dict[str, dict[str, Any]]:
    """``{name: default keyword arguments}`` of every registered editor, sorted by name."""
    return {n: dict(_DEFAULT_KW.get(n, {})) for n in _REGISTRY.names()}


def get_editor(name: str, **kwargs: Any) -> Editor:
    """Instantiate a registered editor, e.g. ``get_editor("inpaint", method="ns")``.

    Raises:
        ConfigError: unknown name.
    """
    factory = _REGISTRY.resolve(name)
    return factory(**{**_DEFAULT_KW.get(name, {}), **kwargs})


# ---- on-disk cache ----------------------------------------------------------------------------
def _mask_digest(mask: np.ndarray) -> str:
    """Short hash of a boolean mask (its shape and bits): the region an edit may change."""
    m = np.asarray(mask, dtype=bool)
    return hashlib.sha1(repr(m.shape).encode() + np.packbits(m).tobytes()).hexdigest()[:16]


class EditCache:
    """Edited images on disk, keyed by what the edit is a function of.

    The key is ``(dataset, index, editor, kind, prompt, seed)`` plus the *content* the edit depends
    on: the film's SHA-256 (the caller's, hashed once per run: :func:`medfocus.io.fingerprint.file_sha256`),
    the edit mask (a hash of its bits, i.e. the boxes it was made from), the finding and the editor's
    inputs besides its settings (:meth:`Editor.sample_inputs`: the oracle's counterfactual renders, the
    transplant's reference pool, RadEdit's weights). So an overwritten film, changed boxes, a row inserted
    into the annotations (indices shift), another data root, a rewritten pool or retrained weights never
    get an old edit: the key differs and the edit is made again. The key does not include the
    model, so every model filtered with the same editor reuses the same counterfactuals (as the paper
    does). Files are lossless 8-bit PNGs written atomically (temporary file + rename), so a killed run
    never leaves a truncated entry.

    Layout: ``root/<editor cache_id>/<dataset>/<index>_<kind>_<hash>.png`` where ``hash`` covers the
    whole key (prompt, seed and content included).
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def path(self, dataset: str, index: int, editor: str, kind: str, prompt: str, seed: int,
             content: dict[str, Any] | None = None) -> Path:
        """File of one entry; ``content``: what the edit depends on besides the names (see the class)."""
        key = json.dumps([dataset, int(index), editor, kind, prompt, int(seed), content], sort_keys=True)
        h = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.root / safe_filename(editor) / safe_filename(dataset) / f"{int(index)}_{safe_filename(kind)}_{h}.png"

    def get(self, *key: Any) -> np.ndarray | None:
        p = self.path(*key)
        if not p.is_file():
            return None
        import cv2

        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        return None if img is None else img  # unreadable -> recompute (and overwrite)

    def put(self, image: np.ndarray, *key: Any) -> Path:
        import cv2

        p = self.path(*key)
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image, dtype=np.uint8))
        if not ok:
            raise DataError(f"could not encode cached edit {p}")
        return atomic_write_bytes(p, png.tobytes())

    def get_or_edit(self, editor: Editor, image: np.ndarray, mask: np.ndarray, *, sample: Sample, kind: str,
                    prompt: str, film_sha256: str, sample_inputs: dict[str, Any] | None = None) -> np.ndarray:
        """Cached edit of ``sample`` (computes and stores it on a miss).

        Args:
            image, mask, prompt, sample, kind: as :meth:`Editor.edit`.
            film_sha256: SHA-256 of the film file ``image`` was read from (hashed once per run by the
                caller, :func:`medfocus.io.fingerprint.file_sha256`), so a changed film misses.
            sample_inputs: ``editor.sample_inputs(sample)`` when the caller has it already (computed here
                otherwise).
        Raises:
            ConfigError: ``film_sha256`` is empty (the cache cannot tell films apart without it).
        """
        if not film_sha256:
            raise ConfigError("EditCache.get_or_edit needs the film's sha256 (medfocus.io.fingerprint.file_sha256): "
                              "without it an edit of another film under the same (dataset, index) would be served")
        if sample_inputs is None:
            sample_inputs = editor.sample_inputs(sample)
        content = {"film_sha256": film_sha256, "mask": _mask_digest(mask), "finding": sample.attribute,
                   "inputs": sample_inputs}
        key = (sample.dataset, sample.index, editor.cache_id, kind, prompt, editor.seed, content)
        hit = self.get(*key)
        if hit is not None and hit.shape == image.shape:
            return hit
        out = editor.edit(image, mask, prompt, sample=sample, kind=kind)
        self.put(out, *key)
        return out
