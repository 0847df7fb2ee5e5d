"""Transplant editor: replace the masked region by healthy tissue from a normal reference X-ray.

For a target image and an edit mask:

1. every *normal* reference X-ray of a pool is aligned to the target in two ways: by the
   unbalanced-OT correspondence of :mod:`medfocus.concepts.uot` (barycentric map of the plan between
   the two images' intensity masses, :func:`uot_warps`; used when that module is importable) and by
   an affine fit of the lung fields (landmarks = corners of the 2nd-98th-percentile extent and
   centroid of each lung, estimated the same way on both images by :func:`estimate_lung_fields`,
   fitted by least squares). ``aligner="uot"`` / ``"affine"`` keeps only one kind. On our phantom
   pairs (shift + 12% scale) the affine fit aligns better (NCC 0.97 vs 0.80 for the UOT map at
   ``epsilon=0.001``; intensity-mass OT is not a registration), so in ``"auto"`` both candidates
   compete on the matching score of step 3 rather than UOT being trusted blindly;
2. the reference's intensities are matched to the target (gain/offset on mean and standard deviation);
3. the *best-matching* (reference, alignment) is the one whose aligned image has the highest normalised
   cross-correlation with the target over the region that is **not** edited;
4. it is pasted into the mask with feathered blending: the blend weight ramps from 0 on the mask
   border to 1 at ``feather`` pixels inside (:func:`medfocus.editing.base.feather_alpha`), so
   pixels outside the mask never change and the seam is smooth.

Unlike inpainting, the result is real (synthetic-world: rendered) healthy anatomy, i.e. a
healthy-tissue counterfactual that stays in distribution. The prompt is not used (the reference
pool is normal, so "No {attribute}" and "No abnormality" give the same replacement).

Reference pool layout (what ``medfocus synth-reference`` / ``write_reference_pool`` and MedFocus'
:func:`medfocus.concepts.reference.write_pool` write): ``<dir>/images/<id>.png``,
``<dir>/masks/<id>/<concept_slug>.png`` (uint8 0/255) and ``<dir>/reference.json``, an object whose
``"ids"`` list records the films of ``images/`` as normal (no findings); the lung fields are the
``left_lung`` and ``right_lung`` masks (estimated from the image when absent). A folder without that
record -- a dataset folder, whose films carry findings, has ``images/`` too -- is refused
(:func:`load_reference_pool`): pasted "healthy" tissue carrying another finding would make the flip gate
measure against a wrong counterfactual.
The pool must come from the same world as the targets: synthetic normals for the synthetic world,
real normal films (e.g. the MedFocus pool of :func:`medfocus.concepts.reference.build_pool_from_regions`)
for real X-rays — a synthetic patch in a real radiograph would be out of distribution again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medfocus.editing.base import Editor, composite, feather_alpha
from medfocus.errors import ConfigError, DataError
from medfocus.types import Sample


@dataclass
class Reference:
    """One normal reference X-ray: ``image`` (H, W) uint8 and its ``lungs`` (H, W) bool mask."""

    id: str
    image: np.ndarray
    lungs: np.ndarray


def estimate_lung_fields(image: np.ndarray) -> np.ndarray:
    """Rough lung-field mask of a frontal chest X-ray (the two dark regions inside the body).

    Otsu threshold of the blurred image; dark connected components that touch the image border
    (air outside the patient) are dropped; the two largest remaining components are kept.

    Args:
        image: ``(H, W)`` uint8.
    Returns:
        ``(H, W)`` bool; all False when nothing plausible is found.
    """
    import cv2
    from scipy import ndimage

    H, W = image.shape
    blur = cv2.GaussianBlur(image, (0, 0), sigmaX=max(1.0, min(H, W) / 128))
    thr, _ = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = blur < thr
    lab, n = ndimage.label(dark)
    if n == 0:
        return np.zeros_like(dark)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
    sizes = ndimage.sum(dark, lab, index=np.arange(1, n + 1))
    order = [i + 1 for i in np.argsort(-sizes) if (i + 1) not in border and sizes[i] >= 0.005 * H * W]
    return np.isin(lab, order[:2])


def lung_landmarks(lungs: np.ndarray) -> np.ndarray:
    """``(K, 2)`` (x, y) landmarks of a lung mask: per lung (components sorted left to right) the
    four corners of its 2nd–98th-percentile extent and its centroid. One component (or a union that
    does not split) gives 5 points; an empty mask gives an empty array."""
    from scipy import ndimage

    lab, n = ndimage.label(lungs)
    comps = []
    if n >= 2:
        sizes = ndimage.sum(lungs, lab, index=np.arange(1, n + 1))
        keep = np.argsort(-sizes)[:2] + 1
        comps = [lab == k for k in keep]
        comps.sort(key=lambda m: np.nonzero(m)[1].mean())
    elif n == 1:
        comps = [lungs]
    pts = []
    for m in comps:
        ys, xs = np.nonzero(m)
        x0, x1 = np.percentile(xs, [2, 98])
        y0, y1 = np.percentile(ys, [2, 98])
        pts += [(x0, y0), (x1, y0), (x0, y1), (x1, y1), (xs.mean(), ys.mean())]
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine ``(2, 3)`` matrix mapping ``(K, 2)`` points ``src`` onto ``dst`` (K >= 3)."""
    A = np.hstack([src, np.ones((len(src), 1))])
    M, *_ = np.linalg.lstsq(A, dst, rcond=None)  # (3, 2)
    return M.T


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def uot_warps(references: Sequence[np.ndarray], image: np.ndarray, *, grid: int = 56, epsilon: float = 0.001,
              lam: float = 1.0) -> list[np.ndarray]:
    """Warp reference images onto ``image`` by the barycentric map of an unbalanced OT plan.

    One batched :func:`medfocus.concepts.uot.uot_grid` solve (references -> target, image masses on
    a ``grid x grid`` lattice of the letterboxed canvas). For every target cell ``j`` the matched
    source position is the plan's barycentre ``sum_i x_i T_ij / sum_i T_ij``; cells that receive
    (almost) no mass map to themselves. The cell map is interpolated to every target pixel and the
    reference is resampled there (bilinear, reflected border). A small ``epsilon`` keeps the map
    sharp: entropic plans pull barycentres towards the mean, so MedFocus' ``epsilon=0.05`` (made
    for mass transfer, not registration) would contract the anatomy.

    Args:
        references: ``(Hr, Wr)`` uint8 images (sizes may differ).
        image: ``(H, W)`` uint8 target.
    Returns:
        one ``(H, W)`` uint8 warped image per reference.
    """
    import cv2

    from medfocus.concepts import uot  # the MedFocus solver (editing sits above concepts)

    import torch

    b, lbt = uot.image_measure(image, grid)
    cell = lbt.out_w / grid
    c = (np.arange(grid) + 0.5) * cell
    X, Y = np.meshgrid(c, c)
    measures = [uot.image_measure(r, grid) for r in references]
    # The grid solver's operations are tiny (batched 56 x 56 products): extra threads only add
    # synchronisation cost (measured 6x slower with 2 threads on a loaded 2-core machine).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sol = uot.uot_grid(np.stack([m for m, _ in measures]), b, epsilon=epsilon, lam=lam, device="cpu")
        pushed = sol.push(np.stack([X, Y, np.ones_like(X)])).detach().cpu().numpy()  # (B, 3, g, g)
    finally:
        torch.set_num_threads(prev)
    H, W = image.shape
    # target pixel centres -> canvas -> fractional grid index (cell centres at integers)
    gx = ((np.arange(W) + 0.5) * lbt.scale_x + lbt.pad_x) / cell - 0.5
    gy = ((np.arange(H) + 0.5) * lbt.scale_y + lbt.pad_y) / cell - 0.5
    GX, GY = (a.astype(np.float32) for a in np.meshgrid(gx, gy))
    out = []
    for k, (ref, (_, lbr)) in enumerate(zip(references, measures)):
        arr = pushed[k, 2]
        ok = arr > 1e-3 * arr.max()
        sx = np.where(ok, pushed[k, 0] / np.where(ok, arr, 1.0), X).astype(np.float32)
        sy = np.where(ok, pushed[k, 1] / np.where(ok, arr, 1.0), Y).astype(np.float32)
        cx = cv2.remap(sx, GX, GY, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        cy = cv2.remap(sy, GX, GY, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        rx = ((cx - lbr.pad_x) / lbr.scale_x - 0.5).astype(np.float32)
        ry = ((cy - lbr.pad_y) / lbr.scale_y - 0.5).astype(np.float32)
        out.append(cv2.remap(ref, rx, ry, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return out


def load_reference_pool(ref_dir: str | Path) -> list[Reference]:
    """Read a reference pool directory (see module docstring).

    Raises:
        DataError: no ``images/`` folder or no image in it; the films are not recorded as normal
            (:func:`medfocus.concepts.reference.pool_normal_ids`); a mask whose shape differs from its film's.
    """
    from medfocus.concepts.reference import _HOW_TO_POOL, pool_normal_ids  # the pool format's home; imports torch, so only here
    from medfocus.io import read_image

    ref_dir = Path(ref_dir)
    img_dir = ref_dir / "images"
    if not img_dir.is_dir():
        raise DataError(f"reference pool {ref_dir}: expected an 'images/' folder of normal X-rays "
                        f"(and 'masks/<id>/left_lung.png', 'right_lung.png'); {_HOW_TO_POOL}")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff"))
    if not files:
        raise DataError(f"reference pool {ref_dir}: no images in {img_dir}")
    pool_normal_ids(ref_dir, files)
    refs = []
    for f in files:
        img, _ = read_image(f)
        lungs = np.zeros(img.shape, dtype=bool)
        for slug in ("left_lung", "right_lung"):
            mp = ref_dir / "masks" / f.stem / f"{slug}.png"
            if mp.is_file():
                m, _ = read_image(mp)
                if m.shape != img.shape:
                    raise DataError(f"mask {mp} has shape {m.shape}, image {f} has {img.shape}")
                lungs |= m > 127
        if not lungs.any():
            lungs = estimate_lung_fields(img)
        refs.append(Reference(f.stem, img, lungs))
    return refs


class TransplantEditor(Editor):
    """Healthy-tissue transplant from the best-matching normal reference (see module docstring).

    Args:
        reference_dir: reference pool folder (``images/`` + ``masks/``).
        references: alternatively, the references themselves.
        feather: blend ramp width in pixels, inside the mask.
        aligner: ``"auto"`` (the affine alignments and the UOT alignment of the best one, whichever matches better; see :meth:`choose`),
            ``"uot"`` or ``"affine"``.
        match_size: side of the downsampled images used to pick the best reference.
    """

    name = "transplant"

    def __init__(self, reference_dir: str | Path | None = None, references: Sequence[Reference] | None = None,
                 feather: float = 8.0, aligner: str = "auto", match_size: int = 64, uot_epsilon: float = 0.001,
                 uot_lam: float = 1.0, seed: int = 0):
        if aligner not in ("auto", "uot", "affine"):
            raise ConfigError(f"transplant aligner must be 'auto', 'uot' or 'affine', got {aligner!r}")
        if reference_dir is None and not references:
            raise ConfigError("the transplant editor needs a pool of normal reference X-rays: pass reference_dir "
                              "(CLI: --reference-dir; write one with `medfocus synth-reference`)")
        self.reference_dir = None if reference_dir is None else Path(reference_dir)
        self._refs: list[Reference] | None = list(references) if references else None
        self.feather = float(feather)
        self.aligner = aligner
        self.match_size = int(match_size)
        self.seed = int(seed)
        self._est_pts: dict[str, np.ndarray] = {}
        self.uot_epsilon, self.uot_lam = float(uot_epsilon), float(uot_lam)
        self.last_choice: str | None = None  # id of the reference used by the latest edit
        self.last_aligner: str | None = None  # "uot" or "affine"
        self._pool_sha256: str | None = None

    def sample_inputs(self, sample: Sample) -> dict[str, Any]:
        """``{"reference_pool": SHA-256 of the pool}`` (the same for every sample): every edit reads the
        whole pool (the best match is chosen per image), so a pool overwritten in place, or another pool
        under the same settings, must not be served old edits (:class:`~medfocus.editing.base.EditCache`)."""
        return {"reference_pool": self.pool_sha256()}

    def pool_sha256(self) -> str:
        """SHA-256 over the references as loaded (id, shape, pixels and lung mask of each, in order),
        computed once per editor. The loaded arrays are what the edits use, so the digest cannot disagree
        with them even if a file changes after the pool was read; it also covers ``references=`` pools
        that have no files. A file rewrite that leaves the decoded pixels unchanged does not change it."""
        if self._pool_sha256 is None:
            import hashlib

            h = hashlib.sha256()
            for r in self.references:
                img = np.ascontiguousarray(r.image)
                h.update(f"{r.id}\0{img.dtype.str}\0{img.shape}\0".encode())
                h.update(img.tobytes())
                h.update(np.packbits(np.asarray(r.lungs, dtype=bool)).tobytes())
            self._pool_sha256 = h.hexdigest()
        return self._pool_sha256

    def params(self) -> dict[str, Any]:
        ids = [r.id for r in self.references] if self._refs is not None or self.reference_dir else []
        return {"feather": self.feather, "aligner": self.aligner, "match_size": self.match_size,
                "uot": [self.uot_epsilon, self.uot_lam],
                "pool": str(self.reference_dir) if self.reference_dir else None, "refs": ids}

    @property
    def references(self) -> list[Reference]:
        if self._refs is None:
            self._refs = load_reference_pool(self.reference_dir)  # type: ignore[arg-type]
        return self._refs

    def prepare(self) -> None:
        _ = self.references

    # ---- alignment ------------------------------------------------------------------------------
    def _affine_align(self, ref: Reference, target_pts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        import cv2

        H, W = shape
        # The target's lung fields are estimated from its pixels, so the reference's landmarks are
        # estimated the same way: the estimator's bias (blur, threshold) then cancels in the fit.
        # The pool's exact masks are the fallback when the estimate finds nothing.
        if ref.id not in self._est_pts:
            pts = lung_landmarks(estimate_lung_fields(ref.image))
            self._est_pts[ref.id] = pts if len(pts) == len(lung_landmarks(ref.lungs)) else lung_landmarks(ref.lungs)
        src = self._est_pts[ref.id]
        if len(src) == len(target_pts) and len(src) >= 3:
            M = fit_affine(src, target_pts)
        else:  # no usable lung fields: scale the whole reference onto the target frame
            rh, rw = ref.image.shape
            M = np.array([[W / rw, 0, 0], [0, H / rh, 0]], dtype=np.float64)
        return cv2.warpAffine(ref.image, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    @staticmethod
    def _match(warped: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Gain/offset so that ``warped`` has the target's mean and standard deviation."""
        w = warped.astype(np.float32)
        t = image.astype(np.float32)
        gain = t.std() / max(w.std(), 1e-6)
        return np.clip((w - w.mean()) * gain + t.mean(), 0, 255)

    def _uot_candidates(self, refs: list[Reference], image: np.ndarray) -> list[tuple[Reference, str, np.ndarray]]:
        warped = uot_warps([r.image for r in refs], image, epsilon=self.uot_epsilon, lam=self.uot_lam)
        return [(r, "uot", self._match(w, image)) for r, w in zip(refs, warped)]

    def choose(self, image: np.ndarray, mask: np.ndarray) -> tuple[Reference, str, np.ndarray]:
        """Best ``(reference, "uot" | "affine", aligned (H, W) float32)`` for ``image`` given the edit
        mask (matching score: NCC over the non-edited region, see module docstring).

        ``"affine"``/``"uot"`` score every reference aligned that way. ``"auto"`` scores every
        affine alignment, then also the UOT alignment of the best reference (one OT solve per image
        instead of one per reference: OT at 56 x 56 costs about 0.5 s per pair on one CPU core)
        and keeps whichever matches better."""
        import cv2

        s = self.match_size
        small_keep = cv2.resize((~mask).astype(np.uint8), (s, s), interpolation=cv2.INTER_NEAREST).astype(bool)
        small_t = cv2.resize(image.astype(np.float32), (s, s), interpolation=cv2.INTER_AREA)
        region = small_keep if small_keep.sum() >= 16 else np.ones_like(small_keep)

        def best_of(cands: list[tuple[Reference, str, np.ndarray]]) -> tuple[float, tuple[Reference, str, np.ndarray]]:
            scores = [_ncc(cv2.resize(w, (s, s), interpolation=cv2.INTER_AREA)[region], small_t[region]) for _, _, w in cands]
            i = int(np.argmax(scores))
            return scores[i], cands[i]

        if self.aligner == "uot":
            return best_of(self._uot_candidates(self.references, image))[1]
        target_pts = lung_landmarks(estimate_lung_fields(image))
        affine = [(r, "affine", self._match(self._affine_align(r, target_pts, image.shape), image)) for r in self.references]
        score, best = best_of(affine)
        if self.aligner == "auto":
            uot = self._uot_candidates([best[0]], image)
            if uot:
                u_score, u_best = best_of(uot)
                if u_score > score:
                    best = u_best
        return best

    def _edit(self, image: np.ndarray, mask: np.ndarray, prompt: str, *, sample: Sample | None,
              kind: str | None) -> np.ndarray:
        ref, how, aligned = self.choose(image, mask)
        self.last_choice, self.last_aligner = ref.id, how
        return composite(image, aligned, feather_alpha(mask, self.feather))
