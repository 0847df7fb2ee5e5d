"""Concept transfer: carry the 11 anatomical concept masks of a normal reference onto a target
chest X-ray through an unbalanced OT plan.

Steps for a target image (all geometry on the letterboxed ``224 x 224`` canvas, then mapped back):

1. select the reference (:meth:`~medfocus.concepts.reference.ReferencePool.select_best`, debiased
   UOT cost at 14 x 14, one batched solve over the pool);
2. solve UOT reference -> target at the 56 x 56 grid (:func:`medfocus.concepts.uot.uot_grid`);
3. push each concept's reference mask (``m_i`` = fraction of reference cell ``i`` inside the mask)
   to the target grid, giving transferred mass ``t_j`` and a soft mask ``s_j`` in ``[0, 1]`` (the
   share of what arrives at target cell ``j`` that comes from the concept). Two ways (``mode``):

   * ``"plan"`` -- the literal recipe: ``t_j = sum_i m_i T_ij`` through the entropic plan itself,
     ``s_j = t_j / sum_i T_ij``. With ``eps = 0.05`` of the 90th-percentile squared distance the
     plan spreads every reference cell over ~7 grid cells (~28 canvas px), so small concepts
     (hila, costophrenic angles, clavicles) come out as blur (mean box IoU 0.24 on the synthetic
     world, ``benchmarks/concept_transfer.md``).
   * ``"barycentric"`` (default) -- each reference cell ``i`` moves to the barycentre of its row of
     the plan, ``y(i) = sum_j T_ij y_j / sum_j T_ij``, *debiased* by the reference->reference plan
     at the same cost scale (``y(i) - (y_self(i) - i)``: entropic barycentres are pulled towards the
     inside of the support, most near its border, and the self-plan has nearly the same pull); the
     mask fractions are splatted (bilinear) at the moved positions, ``s`` is the ratio of the
     concept's splat to the splat of all moved cells after a one-cell Gaussian blur. The map is
     re-estimated ``iterations`` times (default 5), each pass solving from the reference cells
     moved so far, so later passes only explain the remaining displacement (mean box IoU 0.65 on
     the synthetic films; 0.55 vs 0.41 for reusing the reference's boxes when targets are affinely
     perturbed);

4. the *densest core*: cells sorted by ``s_j`` in decreasing order, kept until they hold ``core`` of
   ``sum_j t_j`` (:data:`DEFAULT_CORE`: 0.75 for ``"plan"`` as in the paper, 0.95 for
   ``"barycentric"`` whose splat has no blur tail to cut); the concept box is their tight box;
5. optionally refine each box with MedSAM (:mod:`medfocus.concepts.refine`), box prompt: the box
   becomes the tight box of MedSAM's mask and the soft mask its probability map;
6. boxes go back to original-image pixels through the letterbox, soft masks are resampled to
   ``(H0, W0)``.

Transfers depend only on the image, the pool and these settings (not on the model or the
question), so :class:`TransferCache` stores them per image on disk.

Patient sides. The references are films in the standard frontal display (the patient's left on the
image's right, DICOM ``PatientOrientation`` ``L\\F``). A target stored mirrored (row direction ``R``, given
by its :class:`~medfocus.io.reader.FilmOrientation`) is transferred in that display too: its pixels are
mirrored left-right first, steps 1-5 run on them, and the boxes, soft masks and grid masses are mirrored
back into the stored pixel frame. So every concept, one-sided ones such as the cardiac silhouette
included, lands where the patient's structure is on the stored film, and "left lung" is the patient's
left lung. (Renaming the left/right concepts of a transfer made on the stored pixels would not do: the
transport follows the reference's layout as much as the film's content, so it would put the heart and
mediastinum on the wrong side.) A film whose rows do not run left/right (a lateral view, a film rotated by
90 degrees) is refused: its sides cannot be named. Without an orientation the convention ``L\\F`` is assumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfocus.concepts import uot
from medfocus.concepts.reference import SELECT_GRID, TRANSFER_GRID, ReferencePool
from medfocus.errors import ConfigError, DataError
from medfocus.io.atomic import atomic_save_npz
from medfocus.io.env import cache_root
from medfocus.types import Box, CONCEPTS

log = logging.getLogger(__name__)


CORE = 0.75



def check_sides(orientation: Any) -> None:
    """Raise :class:`DataError` (naming the file and the header value) when a film's
    :class:`~medfocus.io.reader.FilmOrientation` has rows that do not run toward the patient's left or right."""
    if orientation.sides_known:
        return
    where = f"{orientation.path}: " if orientation.path else ""
    raise DataError(f"{where}PatientOrientation = {orientation.value!r}: the image rows do not run toward the patient's "
                    "left or right (a lateral view, or a film rotated by 90 degrees), so MedFocus' left/right concepts "
                    "cannot be named on it; use a frontal film (PatientOrientation L\\F or R\\F)")


@dataclass
class ConceptTransfer:
    """Concepts located on one target image.

    Attributes:
        boxes: concept -> box in original-image pixels (half-open edges), for the 11 concepts.
        soft_masks: concept -> ``(H0, W0)`` float32 soft mask in ``[0, 1]``.
        grid_masses: ``(11, g, g)`` transferred masses ``t`` on the transfer grid (canvas order).
        reference_id: the selected reference.
        selection_costs: reference id -> UOT cost at the selection grid.
        refine: ``"none"`` or ``"medsam"`` (what was actually applied).
        image_size: ``(W0, H0)``.
        stats: timings (s) and solver iterations.
        sides: the film orientation the transfer was made for (:meth:`FilmOrientation.describe
            <medfocus.io.reader.FilmOrientation.describe>`; ``""`` as cached, in the standard display).
    """

    boxes: dict[str, Box]
    soft_masks: dict[str, np.ndarray]
    grid_masses: np.ndarray
    reference_id: str
    selection_costs: dict[str, float]
    refine: str
    image_size: tuple[int, int]
    stats: dict[str, Any] = field(default_factory=dict)
    sides: str = ""

    def mirrored(self) -> "ConceptTransfer":
        """This transfer mirrored left-right in its image (``W0 = image_size[0]``): box ``(x1, y1, x2, y2)`` ->
        ``(W0 - x2, y1, W0 - x1, y2)`` (half-open edges, exact), soft masks and grid masses flipped along x
        (the grid is the letterboxed canvas's, whose side pads differ by at most one canvas pixel). Concept
        names are unchanged. Returns a new object."""
        from dataclasses import replace

        W = self.image_size[0]
        return replace(self, boxes={c: (W - b[2], b[1], W - b[0], b[3]) for c, b in self.boxes.items()},
                       soft_masks={c: np.ascontiguousarray(np.asarray(m)[:, ::-1]) for c, m in self.soft_masks.items()},
                       grid_masses=np.ascontiguousarray(np.asarray(self.grid_masses)[..., ::-1]))

    # ---- persistence (one .npz per image) -------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Atomic write to ``path`` (.npz)."""
        meta = {"boxes": {c: list(b) for c, b in self.boxes.items()}, "reference_id": self.reference_id,
                "selection_costs": self.selection_costs, "refine": self.refine,
                "image_size": list(self.image_size), "stats": self.stats}
        # Exactly what was computed (float32, no rounding): a warm cache must give the same masks,
        # heatmaps and deltas as a cold one (float16 here once moved deltas by up to 0.025 nats).
        atomic_save_npz(path, meta=np.array(json.dumps(meta)), grid_masses=self.grid_masses,
                        soft_masks=np.stack([np.asarray(self.soft_masks[c], np.float32) for c in CONCEPTS]))

    @classmethod
    def load(cls, path: str | Path) -> "ConceptTransfer":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            soft = z["soft_masks"]
            if soft.dtype != np.float32:  # an entry of another version: not what this code computes
                raise DataError(f"{path}: soft masks stored as {soft.dtype}, expected float32")
            grid = z["grid_masses"]
        return cls({c: tuple(meta["boxes"][c]) for c in CONCEPTS}, {c: soft[i] for i, c in enumerate(CONCEPTS)}, grid,
                   meta["reference_id"], meta["selection_costs"], meta["refine"], tuple(meta["image_size"]),
                   {**meta["stats"], "cached": True})


def core_cells(mass: np.ndarray, density: np.ndarray, core: float = CORE) -> np.ndarray:
    """Boolean ``(g, g)`` set of the densest cells holding ``core`` of ``mass.sum()``.

    Cells are taken by decreasing ``density`` (ties broken by larger mass, then raster order)
    until their cumulative ``mass`` reaches ``core * total``. Empty when the total is 0.
    """
    flat_m, flat_d = mass.ravel(), density.ravel()
    total = flat_m.sum()
    out = np.zeros(flat_m.shape, bool)
    if total <= 0:
        return out.reshape(mass.shape)
    order = np.lexsort((np.arange(flat_m.size), -flat_m, -flat_d))
    cum = np.cumsum(flat_m[order])
    n = int(np.searchsorted(cum, core * total - 1e-12 * total, side="left")) + 1
    out[order[: min(n, flat_m.size)]] = True
    return out.reshape(mass.shape)


def cells_box(cells: np.ndarray, cell: float) -> Box | None:
    """Tight box (half-open canvas pixels) of the ``True`` cells of a grid with ``cell``-pixel cells."""
    ys, xs = np.nonzero(cells)
    if ys.size == 0:
        return None
    return (xs.min() * cell, ys.min() * cell, (xs.max() + 1) * cell, (ys.max() + 1) * cell)


def splat(points_yx: np.ndarray, weights: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear splatting: deposit ``weights (N,)`` at sub-cell positions ``points_yx (N, 2)`` (cell
    units, cell centres at integers) onto an ``(h, w)`` grid; positions are clipped to the grid."""
    h, w = shape
    out = np.zeros(h * w)
    y = np.clip(points_yx[:, 0], 0, h - 1)
    x = np.clip(points_yx[:, 1], 0, w - 1)
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = np.minimum(y0 + dy, h - 1), np.minimum(x0 + dx, w - 1)
            np.add.at(out, yi * w + xi, weights * wy * wx)
    return out.reshape(h, w)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma, mode="constant") if sigma > 0 else x


MODES = ("barycentric", "plan")
#: Barycentric passes (benchmarks/concept_transfer.md: affine-perturbed targets 0.50 -> 0.55 mean IoU
#: from 1 to 5 passes; unperturbed films 0.66 -> 0.65).
DEFAULT_ITERATIONS = 5
DEFAULT_CORE = {"barycentric": 0.95, "plan": CORE}


def transfer_with_reference(image: np.ndarray, reference: Any, *, grid: int = TRANSFER_GRID, core: float | None = None,
                            mode: str = "barycentric", iterations: int = DEFAULT_ITERATIONS, **uot_kw: Any) -> tuple[dict[str, Box], dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Transfer the concepts of one reference onto ``image`` (no refinement).

    Args:
        image: ``(H0, W0)`` uint8 target image.
        reference: a :class:`~medfocus.concepts.reference.Reference`.
        grid: transfer grid (56).
        core: mass fraction of the densest core (default per mode, :data:`DEFAULT_CORE`).
        mode: ``"barycentric"`` (default; debiased barycentric push, see the module docstring) or
            ``"plan"`` (push the mask mass through the entropic plan itself).
        iterations: barycentric passes (each re-solves from the reference cells moved so far).
        uot_kw: passed to :func:`medfocus.concepts.uot.uot_grid` (epsilon, lam, device, ...).
    Returns:
        ``(boxes, soft_masks, grid_masses (11, g, g), stats)`` with boxes/masks in original pixels.
    """
    if mode not in MODES:
        raise ConfigError(f"transfer mode must be one of {MODES}, got {mode!r}")
    core = DEFAULT_CORE[mode] if core is None else float(core)
    if not 0.0 < core <= 1.0:
        raise ConfigError(f"core must be in (0, 1], got {core}")
    if int(iterations) < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    img = np.asarray(image)
    b, lb = uot.image_measure(img, grid)
    a, _ = reference.measure(grid)
    fr = reference.mask_fractions(grid)  # (11, g, g)
    stats: dict[str, Any] = {"mode": mode}
    if mode == "plan":
        sol = uot.uot_grid(a, b, **uot_kw)
        stats.update({"ot_iterations": sol.n_iter, "ot_err": sol.err, "cost_scale": float(sol.scale[0])})
        pushed = sol.push(np.concatenate([fr, np.ones((1, grid, grid))]))[0].detach().cpu().numpy()  # (12, g, g)
        t, arriving = pushed[:-1], pushed[-1]
    else:
        # Barycentric map of the reference->target plan, debiased by the reference->reference plan
        # solved at the same cost scale: entropic blur pulls barycentres towards the inside of the
        # support (strongly near its border); the self-plan has (almost) the same pull, so
        # ``bary_ab(i) - (bary_aa(i) - i)`` removes it. With ``iterations > 1`` the reference
        # cells, moved so far, are splatted into a new source measure and the map is re-estimated
        # from there (each pass only has to explain the remaining displacement).
        from scipy.ndimage import map_coordinates

        yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float64)
        grid_yx = np.stack([yy, xx])
        a_flat = a.ravel()
        keep = a_flat > 0
        pos = grid_yx.reshape(2, -1).T[keep]  # (N, 2) current positions of the reference cells with mass
        src = a
        iters = []
        for _ in range(int(iterations)):
            sol = uot.uot_grid(src, b, **uot_kw)
            bary, _ = sol.barycenters()
            self_sol = uot.uot_grid(src, src, **{**uot_kw, "scale": sol.scale.detach().cpu().numpy()})
            bary_self, _ = self_sol.barycenters()
            disp = bary[0].detach().cpu().numpy() - bary_self[0].detach().cpu().numpy()  # (2, g, g) displacement
            disp = np.where(np.isfinite(disp), disp, 0.0)  # cells that send no mass do not move
            pos = pos + np.stack([map_coordinates(disp[k], pos.T, order=1, mode="nearest") for k in (0, 1)], 1)
            iters.append(sol.n_iter)
            src = splat(pos, a_flat[keep], (grid, grid))
            src = src / src.sum()
        coverage = splat(pos, np.ones(len(pos)), (grid, grid))
        t = np.stack([splat(pos, fr[i].ravel()[keep], (grid, grid)) for i in range(len(CONCEPTS))])
        # The core is taken on the splatted mass itself (sharp); the density that orders it is the
        # smoothed ratio (a one-cell blur fills the holes an expanding map leaves between points).
        arriving = _blur(coverage, 1.0)
        t_smooth = np.stack([_blur(ti, 1.0) for ti in t])
        stats.update({"ot_iterations": iters, "passes": int(iterations), "ot_err": sol.err, "cost_scale": float(sol.scale[0])})
    else_t = t if mode == "plan" else t_smooth
    with np.errstate(invalid="ignore", divide="ignore"):
        soft = np.where(arriving > 1e-12, else_t / np.where(arriving > 1e-12, arriving, 1.0), 0.0).clip(0.0, 1.0)
    cell = lb.out_w / grid
    boxes: dict[str, Box] = {}
    softs: dict[str, np.ndarray] = {}
    for i, c in enumerate(CONCEPTS):
        cb = cells_box(core_cells(t[i], soft[i], core), cell)
        if cb is None:  # concept mass lost entirely: fall back to the whole image content
            rs, cs = lb.content_slice()
            cb = (cs.start, rs.start, cs.stop, rs.stop)
        boxes[c] = lb.inverse_box(cb)
        softs[c] = np.clip(lb.map_to_original(soft[i].astype(np.float32)), 0.0, 1.0)
    return boxes, softs, t, stats


class TransferCache:
    """On-disk cache of :class:`ConceptTransfer` per (image bytes, pool, settings).

    Files: ``<root>/transfers/<key>.npz`` with ``root`` = ``$MEDFOCUS_CACHE`` / ``~/.cache/medfocus``
    by default.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.dir = (Path(root) if root is not None else cache_root()) / "transfers"

    @staticmethod
    def key(image: np.ndarray, pool_fp: str, settings: dict[str, Any]) -> str:
        h = hashlib.sha1()
        img = np.ascontiguousarray(image)
        h.update(str(img.shape).encode() + str(img.dtype).encode())
        h.update(img.tobytes())
        h.update(pool_fp.encode())
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return h.hexdigest()[:24]

    def get(self, key: str) -> ConceptTransfer | None:
        p = self.dir / f"{key}.npz"
        if not p.is_file():
            return None
        try:
            return ConceptTransfer.load(p)
        except Exception as exc:  # a corrupt entry is recomputed, never fatal
            log.warning("ignoring unreadable transfer cache entry %s: %s", p, exc)
            return None

    def put(self, key: str, tr: ConceptTransfer) -> None:
        tr.save(self.dir / f"{key}.npz")


def transfer_concepts(image: np.ndarray, pool: ReferencePool, *, select_grid: int = SELECT_GRID,
                      transfer_grid: int = TRANSFER_GRID, core: float | None = None, mode: str = "barycentric",
                      iterations: int = DEFAULT_ITERATIONS, refine: str = "none",
                      refiner: Any = None, cache: TransferCache | None = None, epsilon: float = uot.EPSILON,
                      lam: float = uot.LAMBDA, device: str | None = None, orientation: Any = None) -> ConceptTransfer:
    """Locate the 11 concepts on ``image`` (steps 1-6 of the module docstring).

    Args:
        image: ``(H0, W0)`` uint8 grayscale target.
        pool: the reference pool.
        select_grid, transfer_grid: 14 and 56. core, mode: see the module docstring.
        epsilon, lam: UOT parameters (0.05, 0.1). device: OT device (default CPU: per-image problems
            are too small for a GPU, see :func:`medfocus.concepts.uot.auto_device`).
        refine: ``"none"`` or ``"medsam"``; with ``"medsam"`` the ``refiner`` (a
            :class:`~medfocus.concepts.refine.MedSAMRefiner`, default: loaded from the hub cache)
            refines the boxes; when the weights are absent the step is skipped with a logged notice.
        cache: a :class:`TransferCache` (``None``: no caching).
        orientation: the film's :class:`~medfocus.io.reader.FilmOrientation` (``None``: the convention ``L\\F``):
            a film stored mirrored is transferred in the standard display and the result mirrored back (module
            docstring, "Patient sides"); the cache holds transfers in the standard display.
    Returns:
        :class:`ConceptTransfer`, boxes and masks in the stored pixel frame of ``image``.
    Raises:
        DataError: an ``orientation`` whose rows do not run left/right (checked before any work).
    """
    if refine not in ("none", "medsam"):
        raise ConfigError(f"refine must be 'none' or 'medsam', got {refine!r}")
    from medfocus.io.reader import CONVENTIONAL_ORIENTATION

    film = CONVENTIONAL_ORIENTATION if orientation is None else orientation
    check_sides(film)
    img = np.asarray(image)
    if img.ndim != 2:
        raise ConfigError(f"concept transfer needs a 2-D grayscale image, got shape {img.shape}")
    if img.dtype != np.uint8:  # floats in [0, 1] or wider integer/float ranges -> uint8
        from medfocus.io.reader import to_uint8

        img = to_uint8(img)
    if film.mirrored:  # into the references' display (module docstring, "Patient sides"); mirrored back below
        img = np.ascontiguousarray(img[:, ::-1])

    def in_film_frame(tr: ConceptTransfer) -> ConceptTransfer:
        from dataclasses import replace

        return replace(tr.mirrored() if film.mirrored else tr, sides=film.describe())
    settings = {"select_grid": select_grid, "transfer_grid": transfer_grid, "core": core, "mode": mode, "iterations": int(iterations), "refine": refine,
                "epsilon": epsilon, "lam": lam, "v": 3}  # v3: soft masks cached as float32
    if refine == "medsam":  # a different segmenter must not reuse another one's refined transfer
        from medfocus.concepts.refine import refiner_name

        settings["refiner"] = refiner_name(refiner)
    key = None
    if cache is not None:
        key = cache.key(img, pool.fingerprint, settings)
        hit = cache.get(key)
        if hit is not None:
            return in_film_frame(hit)
    uot_kw = {"epsilon": epsilon, "lam": lam, "device": device}
    t0 = time.perf_counter()
    with uot.cpu_single_thread(device or "cpu"):  # device=None: per-image problems are small -> CPU (uot.auto_device)
        ref, costs = pool.select_best(img, grid=select_grid, **uot_kw)
        t1 = time.perf_counter()
        boxes, softs, t, stats = transfer_with_reference(img, ref, grid=transfer_grid, core=core, mode=mode,
                                                         iterations=iterations, **uot_kw)
    t2 = time.perf_counter()
    applied = "none"
    if refine == "medsam":
        from medfocus.concepts.refine import refine_concepts

        refined = refine_concepts(img, boxes, refiner=refiner)
        if refined is not None:
            boxes, maps = refined
            softs = {c: (softs[c] if maps[c] is None else maps[c].astype(np.float32)) for c in CONCEPTS}
            applied = "medsam"
    stats.update({"seconds_select": t1 - t0, "seconds_transfer": t2 - t1, "seconds_refine": time.perf_counter() - t2,
                  "cached": False})
    tr = ConceptTransfer(boxes, softs, t.astype(np.float32), ref.id, {r: float(c) for r, c in zip(pool.ids, costs)},
                         applied, (int(img.shape[1]), int(img.shape[0])), stats)
    if cache is not None and key is not None and applied == refine:  # a skipped refinement is not cached
        cache.put(key, tr)
    return in_film_frame(tr)
