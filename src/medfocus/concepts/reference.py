"""Reference pool of normal chest X-rays with per-concept masks, and reference selection.

Directory format (one reference per id)::

    <root>/images/<id>.png                       grayscale image (8- or 16-bit PNG)
    <root>/masks/<id>/<concept_slug>.png         uint8 0/255 mask of that concept, same size

where ``concept_slug`` is :func:`medfocus.types.concept_slug` (``"left hilar structures"`` ->
``left_hilar_structures``) and every one of the 11 :data:`medfocus.types.CONCEPTS` must be present.

Sources:

* the synthetic world (:func:`medfocus.datasets.synthetic.write_reference_pool`), which is what
  :func:`default_pool` generates on demand into the cache directory (``$MEDFOCUS_CACHE`` or
  ``~/.cache/medfocus``);
* ImaGenome gold annotations (:func:`build_pool_from_regions` / :func:`build_pool_from_imagenome`):
  normal images (no positive finding) whose region table covers all 11 concepts; each concept
  mask is its region box filled.

Selection (:meth:`ReferencePool.select_best`): the reference with the lowest unbalanced-OT cost
against the target at the 14 x 14 grid, all references solved in one batched call; the cost is
debiased as an unbalanced Sinkhorn divergence (see :meth:`ReferencePool.selection_costs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from medfocus.concepts import uot
from medfocus.errors import DataError
from medfocus.io.atomic import atomic_directory, atomic_write_text
from medfocus.io.env import cache_root
from medfocus.types import Box, CONCEPTS, concept_slug

log = logging.getLogger(__name__)

SELECT_GRID = 14
TRANSFER_GRID = 56


@dataclass
class Reference:
    """One normal reference image with its 11 concept masks.

    Attributes:
        id: identifier (file stem).
        image: ``(H, W)`` uint8 grayscale image.
        masks: concept name -> ``(H, W)`` bool mask, for every concept in :data:`CONCEPTS`.
    """

    id: str
    image: np.ndarray
    masks: dict[str, np.ndarray]
    _measures: dict[int, tuple[np.ndarray, Any]] = field(default_factory=dict, repr=False)

    def measure(self, grid: int) -> tuple[np.ndarray, Any]:
        """``(mass (grid, grid), letterbox)`` of :func:`medfocus.concepts.uot.image_measure` (memoised)."""
        if grid not in self._measures:
            self._measures[grid] = uot.image_measure(self.image, grid)
        return self._measures[grid]

    def mask_fractions(self, grid: int) -> np.ndarray:
        """``(11, grid, grid)`` fraction of each grid cell covered by each concept mask, on the
        letterboxed canvas of :func:`~medfocus.concepts.uot.image_measure` (area average)."""
        _, lb = self.measure(grid)
        k = lb.out_w // grid
        out = np.empty((len(CONCEPTS), grid, grid))
        for i, c in enumerate(CONCEPTS):
            cv = lb.apply(self.masks[c].astype(np.float32), fill=0.0).astype(np.float64)
            out[i] = cv.reshape(grid, k, grid, k).mean(axis=(1, 3))
        return out


def _read_gray(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DataError(f"reference pool: cannot read image {path}: {exc}") from exc
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    if arr.dtype == np.uint16 or arr.max() > 255:
        arr = arr.astype(np.float64) * (255.0 / max(float(arr.max()), 1.0))
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


class ReferencePool:
    """A set of :class:`Reference` images (load one with :meth:`load`)."""

    def __init__(self, references: list[Reference], root: str | Path | None = None) -> None:
        if not references:
            raise DataError(f"reference pool {root or ''} is empty".strip())
        self.references = references
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.references)

    def __getitem__(self, i: int) -> Reference:
        return self.references[i]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.references]

    @property
    def fingerprint(self) -> str:
        """Short hash of the pool's contents (images and masks), for cache keys."""
        h = hashlib.sha1()
        for r in self.references:
            h.update(r.id.encode())
            h.update(np.ascontiguousarray(r.image).tobytes())
            for c in CONCEPTS:
                h.update(np.packbits(r.masks[c]).tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def load(cls, root: str | Path) -> "ReferencePool":
        """Read ``root/images/<id>.png`` + ``root/masks/<id>/<slug>.png`` (see module docstring).

        Raises:
            DataError: missing directory, unreadable image, missing concept mask, size mismatch; films not
                recorded as normal in ``reference.json`` (:func:`pool_normal_ids`: e.g. a ``medfocus synth``
                dataset folder, whose ``images/`` + ``masks/`` look like a pool but whose films carry findings).
        """
        root = Path(root)
        img_dir = root / "images"
        if not img_dir.is_dir():
            raise DataError(f"reference pool {root}: no images/ directory (expected images/<id>.png + masks/<id>/<concept>.png)")
        files = sorted(img_dir.glob("*.png"))
        if files:
            pool_normal_ids(root, files)
        refs = []
        for p in files:
            image = _read_gray(p)
            masks = {}
            for c in CONCEPTS:
                mp = root / "masks" / p.stem / f"{concept_slug(c)}.png"
                if not mp.is_file():
                    raise DataError(f"reference pool {root}: missing mask {mp} for concept {c!r}")
                m = _read_gray(mp) > 127
                if m.shape != image.shape:
                    raise DataError(f"reference pool {root}: mask {mp} has shape {m.shape}, image {p} has {image.shape}")
                masks[c] = m
            refs.append(Reference(p.stem, image, masks))
        if not refs:
            raise DataError(f"reference pool {root}: images/ holds no .png file")
        return cls(refs, root)

    def save(self, root: str | Path) -> Path:
        """Write the pool in the directory format; returns ``root``."""
        return write_pool(self.references, root)

    def measures(self, grid: int) -> np.ndarray:
        """``(B, grid, grid)`` masses of all references."""
        return np.stack([r.measure(grid)[0] for r in self.references])

    def selection_costs(self, image: np.ndarray, *, grid: int = SELECT_GRID, debias: bool = True, **uot_kw: Any) -> np.ndarray:
        """``(B,)`` selection cost of every reference for ``image`` at ``grid x grid``, batched.

        With ``debias`` (default) this is the unbalanced *Sinkhorn divergence* (Sejourne et al.
        2019) up to a term that is the same for every reference:
        ``OT_eps(ref, target) - OT_eps(ref, ref) / 2`` with ``OT_eps`` the full regularised
        objective (:meth:`GridUOT.costs` ``"objective"``) and the self-problem solved at the pair's
        cost scale (``- OT_eps(target, target) / 2`` is dropped: it does not change the ranking).
        Without it, the raw entropic cost is dominated by the blur term, which favours compact
        references: a target is then not even its own nearest reference. ``debias=False`` ranks
        by the unregularised UOT cost at the entropic plan (``"uot_cost"``).
        """
        b, _ = uot.image_measure(image, grid)
        a = self.measures(grid)
        sol = uot.uot_grid(a, b, **uot_kw)
        if not debias:
            return sol.costs()["uot_cost"].detach().cpu().numpy()
        self_sol = uot.uot_grid(a, a, **{**uot_kw, "scale": sol.scale.detach().cpu().numpy()})
        cost = sol.costs()["objective"] - 0.5 * self_sol.costs()["objective"]
        return cost.detach().cpu().numpy()

    def select_best(self, image: np.ndarray, *, grid: int = SELECT_GRID, **kw: Any) -> tuple[Reference, np.ndarray]:
        """The reference with the lowest selection cost (:meth:`selection_costs`; ties: first), and
        all ``(B,)`` costs."""
        costs = self.selection_costs(image, grid=grid, **kw)
        return self.references[int(np.argmin(costs))], costs


#: The file of a reference pool that records its films as normal (``{"ids": [<image stems>], ...}``).
POOL_RECORD = "reference.json"
_HOW_TO_POOL = (f"a pool is a folder of normal films (no findings) recorded as such in {POOL_RECORD} "
                "(an object with \"ids\": the stems of the files in images/); write one with `medfocus synth-reference "
                f"--out DIR` (synthetic world), or put real normal films in DIR/images/ and list their stems in DIR/{POOL_RECORD}")


def pool_normal_ids(ref_dir: str | Path, files: Sequence[Path]) -> list[str]:
    """The ids of ``files`` (``images/`` of the pool ``ref_dir``) after checking that the pool's record
    (:data:`POOL_RECORD`) declares exactly these films normal.

    Raises:
        DataError: naming the folder and what is expected: no record (and, when the folder holds a
            ``medfocus synth`` manifest, that it is a dataset whose films carry findings), an unreadable or
            malformed record, films in ``images/`` the record does not list (stale or abnormal films), or
            listed ids without a film.
    """
    ref_dir = Path(ref_dir)
    rec = ref_dir / POOL_RECORD
    if not rec.is_file():
        what = (f"it holds a dataset manifest ({ref_dir / 'manifest.json'}): a dataset's films carry findings, "
                "so they are not a pool of normal X-rays" if (ref_dir / "manifest.json").is_file()
                else f"it has no {POOL_RECORD} recording its films as normal")
        raise DataError(f"reference pool {ref_dir} refused: {what}; {_HOW_TO_POOL}")
    try:
        data = json.loads(rec.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"reference pool record {rec}: not readable JSON ({exc}); {_HOW_TO_POOL}") from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise DataError(f"reference pool record {rec}: expected an object with \"ids\": a non-empty list of image stems, "
                        f"got {type(ids if isinstance(data, dict) else data).__name__}; {_HOW_TO_POOL}")
    stems = [f.stem for f in files]
    unlisted = sorted(set(stems) - set(ids))
    if unlisted:
        raise DataError(f"reference pool {ref_dir} refused: {len(unlisted)} film(s) in {ref_dir / 'images'} are not recorded "
                        f"as normal in {rec} (e.g. {unlisted[:5]}): a pool holds normal films only; remove them or, "
                        "if they are normal, add their stems to \"ids\"")
    missing = sorted(set(ids) - set(stems))
    if missing:
        raise DataError(f"reference pool {ref_dir}: {rec} lists {len(missing)} film(s) with no image in "
                        f"{ref_dir / 'images'} (e.g. {missing[:5]})")
    return stems


def write_pool(references: Iterable[Reference], root: str | Path) -> Path:
    """Write references in the directory format (masks as uint8 0/255 PNGs), and ``reference.json``
    (``{"ids": [...]}``), which records the films as normal: what the transplant editor requires of a
    ``--reference-dir`` and :meth:`ReferencePool.load` require (:func:`pool_normal_ids`)."""

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    ids = []
    for r in references:
        Image.fromarray(np.asarray(r.image, np.uint8)).save(root / "images" / f"{r.id}.png")
        md = root / "masks" / r.id
        md.mkdir(parents=True, exist_ok=True)
        for c in CONCEPTS:
            Image.fromarray((np.asarray(r.masks[c], bool) * 255).astype(np.uint8)).save(md / f"{concept_slug(c)}.png")
        ids.append(str(r.id))
    atomic_write_text(root / POOL_RECORD, json.dumps({"ids": ids, "concepts": list(CONCEPTS)}, indent=1))
    return root


def boxes_to_masks(shape: tuple[int, int], boxes: Mapping[str, Box]) -> dict[str, np.ndarray]:
    """Fill each concept's box (half-open edges, rounded outward, clipped) into an ``(H, W)`` bool mask."""
    H, W = shape
    out = {}
    for c in CONCEPTS:
        x1, y1, x2, y2 = boxes[c]
        m = np.zeros((H, W), bool)
        xa, ya = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        xb, yb = min(int(np.ceil(x2)), W), min(int(np.ceil(y2)), H)
        if xb > xa and yb > ya:
            m[ya:yb, xa:xb] = True
        out[c] = m
    return out


def build_pool_from_regions(entries: Iterable[tuple[str, np.ndarray, Mapping[str, Box]]], root: str | Path, *,
                            max_refs: int | None = None) -> ReferencePool:
    """Build and write a pool from ``(id, image (H, W) uint8, {concept: box})`` entries (e.g. ImaGenome
    gold normals). Entries whose region table lacks one of the 11 concepts (names compared after
    :func:`concept_slug`) are skipped with a logged notice. Returns the loaded pool."""
    refs = []
    for rid, image, boxes in entries:
        by_slug = {concept_slug(k): v for k, v in boxes.items()}
        missing = [c for c in CONCEPTS if concept_slug(c) not in by_slug]
        if missing:
            log.info("reference %s skipped: region table lacks %s", rid, missing)
            continue
        img = np.asarray(image)
        refs.append(Reference(str(rid), img.astype(np.uint8), boxes_to_masks(img.shape[:2], {c: by_slug[concept_slug(c)] for c in CONCEPTS})))
        if max_refs is not None and len(refs) >= max_refs:
            break
    if not refs:
        raise DataError("no reference image covers all 11 concepts")
    write_pool(refs, root)
    return ReferencePool.load(root)


BBOX_FILE = "gold_bbox_coordinate_annotations_1000images.csv"


def imagenome_reference_entries(root: str | Path, *, gold_table: str | Path | None = None, bbox_table: str | Path | None = None,
                                image_root: str | Path | None = None) -> Iterator[tuple[str, np.ndarray, dict[str, Box]]]:
    """``(id, image, {region: box})`` for the *normal* images of the ImaGenome gold set.

    Normal: no row of the gold attribute table (``gold_object_attribute_with_coordinates.txt``,
    see :mod:`medfocus.datasets.imagenome`) with ``relation == 1`` and ``categoryID`` in
    ``anatomicalfinding`` / ``disease``. Region boxes come from the gold bounding-box table
    (``gold_bbox_coordinate_annotations_1000images.csv``: ``image_id, bbox_name,
    original_x1, original_y1, original_x2, original_y2``) when it is found next to the attribute
    table or given, else from the attribute table's own ``bbox`` / ``coord_original`` rows (any
    ``relation``). Images are read from MIMIC-CXR-JPG under ``image_root`` (default ``root``).
    Entries are yielded in sorted image-id order; the caller keeps those covering all 11 concepts.
    """
    import pandas as pd

    from medfocus.datasets._common import id_str, parse_box_text
    from medfocus.datasets.imagenome import KEEP_CATEGORIES, find_gold_table, image_relpath
    from medfocus.io import read_image

    table = Path(gold_table) if gold_table is not None else find_gold_table(root)
    try:
        df = pd.read_csv(table, sep="\t")
    except Exception as exc:
        raise DataError(f"{table}: cannot read the ImaGenome gold attribute table ({type(exc).__name__}: {exc})") from exc
    need = ["patient_id", "study_id", "image_id", "bbox", "categoryID", "relation", "coord_original"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{table}: missing column(s) {missing}; expected the ImaGenome gold columns {need}")
    df["image_id"] = df["image_id"].map(id_str)
    rel = pd.to_numeric(df["relation"], errors="coerce")
    abnormal = set(df.loc[(rel == 1) & df["categoryID"].isin(KEEP_CATEGORIES), "image_id"])
    ids = {iid: (id_str(p), id_str(s)) for iid, p, s in zip(df["image_id"], df["patient_id"], df["study_id"]) if iid not in abnormal}

    regions: dict[str, dict[str, Box]] = {}
    bt = Path(bbox_table) if bbox_table is not None else table.parent / BBOX_FILE
    if bt.is_file():
        bdf = pd.read_csv(bt)
        cols = ["image_id", "bbox_name", "original_x1", "original_y1", "original_x2", "original_y2"]
        miss = [c for c in cols if c not in bdf.columns]
        if miss:
            raise DataError(f"{bt}: missing column(s) {miss}; expected {cols}")
        for row in bdf.itertuples(index=False):
            iid = id_str(getattr(row, "image_id"))
            iid = iid if iid.lower().endswith(".dcm") or iid in ids else f"{iid}.dcm"
            regions.setdefault(iid, {})[str(row.bbox_name)] = (float(row.original_x1), float(row.original_y1),
                                                             float(row.original_x2), float(row.original_y2))
    else:
        for i, row in enumerate(df.itertuples(index=False)):
            if row.image_id in ids:
                box = parse_box_text(row.coord_original, where=f"{table} line {i + 2}", field="coord_original")
                regions.setdefault(row.image_id, {}).setdefault(str(row.bbox), box)
    img_root = Path(image_root) if image_root is not None else Path(root)
    for iid in sorted(ids):
        if iid not in regions:
            continue
        pid, sid = ids[iid]
        path = img_root / image_relpath(pid, sid, iid)
        image, _ = read_image(path)
        yield Path(iid).stem, image, regions[iid]


def build_pool_from_imagenome(root: str | Path, out_dir: str | Path, *, max_refs: int | None = 32, **kw: Any) -> ReferencePool:
    """Write a reference pool of ImaGenome gold normals covering all 11 concepts (masks = region
    boxes) to ``out_dir`` and load it (see :func:`imagenome_reference_entries` for ``kw``)."""
    return build_pool_from_regions(imagenome_reference_entries(root, **kw), out_dir, max_refs=max_refs)


#: Said once per run (and stored in each record's ``reference_pool_warning``) when MedFocus or the anatomy
#: detector of ``prompting_medsam`` transfers concepts from the default synthetic pool onto a film that is not
#: from the synthetic world (runner: :func:`medfocus.runner.grid.run_grid`).
SYNTHETIC_POOL_WARNING = (
    "the default reference pool holds synthetic films only: on a real film the transferred concept boxes come "
    "from synthetic anatomy; build a real pool (build_pool_from_imagenome / build_pool_from_regions, see the "
    "README's 'Reference pool') and pass --param medfocus.pool=DIR (prompting_medsam.pool=DIR)"
)


def default_pool(cache_dir: str | Path | None = None, *, n: int = 16, seed: int = 0, size: int = 256) -> ReferencePool:
    """The default pool: ``n`` normal synthetic references written by the synthetic world into
    ``<cache>/reference_pool/synthetic_v{GENERATOR_VERSION}_n{n}_s{seed}_{size}`` on first use, then loaded from there."""
    from medfocus.datasets.synthetic import GENERATOR_VERSION

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    # The generator version is part of the key: a changed renderer must not reuse stale references.
    out = root / "reference_pool" / f"synthetic_v{GENERATOR_VERSION}_n{n}_s{seed}_{size}"
    done = out / ".complete"
    if not done.is_file():
        from medfocus.datasets.synthetic import write_reference_pool

        log.info("writing the default synthetic reference pool (%d images) to %s", n, out)
        if out.exists() and not done.is_file():  # left over by a killed writer of an older version
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        # Published whole; a concurrent writer that won the race keeps its copy (overwrite=False).
        with atomic_directory(out, overwrite=False) as tmp:
            write_reference_pool(tmp, n=n, seed=seed, size=size)
            (tmp / ".complete").write_text("ok\n")
    return ReferencePool.load(out)


_LOADED_POOLS: dict[str, ReferencePool] = {}


def cached_pool(path: str | Path | None = None) -> ReferencePool:
    """The pool in folder ``path`` (``None``: :func:`default_pool`), loaded once per process.

    Shared by every user of a pool in one run (MedFocus, the anatomy detector of ``prompting_medsam``),
    so a pool is read from disk once and the transfer cache sees one fingerprint."""
    key = str(path) if path else "<default>"
    if key not in _LOADED_POOLS:
        _LOADED_POOLS[key] = ReferencePool.load(path) if path else default_pool()
    return _LOADED_POOLS[key]
