"""NIH ChestX-ray8 bounding-box subset: 984 expert boxes on 880 frontal films, 8 findings.

The only box-annotated chest X-ray set whose images anyone can download without credentials (NIH
Clinical Center, public domain: https://nihcc.app.box.com/v/ChestXray-NIHCC -- the ``images_*.tar.gz``
archives, each extracting into ``images/``, and ``BBox_List_2017.csv``).

Layout under ``root`` (the box list is searched in this order)::

    <root>/nih-chestxray8/BBox_List_2017.csv        (the release's name)
    <root>/nih-chestxray8/BBox_List_2017.csv.gz
    <root>/nih-chestxray8/nih_bbox_list_2017.csv.gz  (as redistributed by torchxrayvision)
    <root>/nih-chestxray8/images/<Image Index>       (00013118_008.png ...)

(``root`` may also point at ``nih-chestxray8`` itself.) The list's header is malformed in the release
(``Image Index,Finding Label,Bbox [x,y,w,h],,,``), so the columns are read by position: image index,
finding label, ``x, y, w, h`` in pixels of the original film.

**Order.** Rows are grouped by ``(Image Index, Finding Label)`` and one positive sample is emitted per
group in ascending sorted order of the keys (string order; what ``pandas.groupby(sort=True)`` yields).
In the 2017 list every group has exactly one row, so the 984 rows give 984 samples; the loader does not
rely on that (a group's boxes are all kept).

**Boxes.** ``(x, y, x + w, y + h)`` as half-open pixel edges (the release's ``x, y`` is the top-left
corner and ``w, h`` the extent, in the 1024-px film; ``w`` and ``h`` must be > 0), kept as floats, then
clipped to the image (:func:`medfocus.datasets._common.clip_boxes`); a box empty after clipping is
dropped and the counts are recorded in every sample's ``meta["provenance"]`` and warned about once per
load.

**Frame.** Every film of the release is 1024x1024 and the boxes are in its pixels, so a film of another
size (the resized 256x256 / 512x512 copies circulating) is a DataError naming it and its size -- clipping
boxes of the original frame to a smaller film would give plausible, wrong IoUs. ``rescale_boxes=True``
(Python only) scales the boxes of a square film by ``W / 1024`` instead.

**Missing films** are one DataError counting them and naming the first few with their lines; there is no
option to skip them (indices number the whole list), but a box list holding only the present films' rows
(``annotations=``) runs on that subset, with indices numbering it.

**Findings -> question attribute** (:data:`NIH_FINDINGS`): ``Effusion -> "pleural effusion"``
(the effusions boxed are pleural), ``Infiltrate -> "infiltration"`` (the finding's noun, as the
ChestX-ray14 label list spells it), the six others lowercased (``atelectasis``, ``cardiomegaly``,
``mass``, ``nodule``, ``pneumonia``, ``pneumothorax``). An unknown label is a DataError naming the
line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from medfocus.datasets._common import BoxClipLog, SizeCache, missing_images_error, require_file, some
from medfocus.errors import DataError
from medfocus.io.paths import resolve_inside
from medfocus.types import Sample

__all__ = ["load_nih_cxr8", "find_nih_layout", "NIH_FINDINGS", "LAYOUT", "BOX_LIST_NAMES", "ORIGINAL_SIZE"]

LAYOUT = """  <root>/nih-chestxray8/BBox_List_2017.csv   (or BBox_List_2017.csv.gz / nih_bbox_list_2017.csv.gz)
  <root>/nih-chestxray8/images/<Image Index>   (e.g. 00013118_008.png; root may also be nih-chestxray8 itself)
  images: https://nihcc.app.box.com/v/ChestXray-NIHCC (images_*.tar.gz, no credentials needed)"""

#: Side of every film of the release, the frame of the box list's pixels.
ORIGINAL_SIZE = 1024

BOX_LIST_NAMES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz", "nih_bbox_list_2017.csv.gz")

#: NIH finding label -> question attribute.
NIH_FINDINGS: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural effusion",
    "Infiltrate": "infiltration",
    "Infiltration": "infiltration",  # the ChestX-ray14 image-label spelling, should a list use it
    "Mass": "mass",
    "Nodule": "nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}


def find_nih_layout(root: str | os.PathLike) -> tuple[Path, Path]:
    """Locate ``(box_list, image_dir)`` under ``root`` (see module docstring).

    Raises:
        DataError: no box list found; the message lists every path tried and where to get the data.
    """
    root = Path(root)
    tried = []
    for base in (root / "nih-chestxray8", root):
        for name in BOX_LIST_NAMES:
            p = base / name
            tried.append(p)
            if p.is_file():
                return p, base / "images"
    lines = "\n".join(f"  {p}" for p in tried)
    raise DataError(f"NIH ChestX-ray8 box list not found under {root}; tried:\n{lines}\nexpected layout:\n{LAYOUT}")


def load_nih_cxr8(root: str | os.PathLike | None, *, annotations: str | os.PathLike | None = None,
                  image_dir: str | os.PathLike | None = None, read_sizes: bool = True,
                  rescale_boxes: bool = False) -> list[Sample]:
    """Load the NIH ChestX-ray8 box subset as "Is there evidence of {finding}?" samples (answer ``"Yes"``).

    Args:
        root: data root (see module docstring); may be ``None`` when ``annotations`` and ``image_dir``
            are both given.
        annotations: explicit box list (``.csv`` or ``.csv.gz``), overriding the layout search.
        image_dir: explicit folder of ``<Image Index>`` files (default: ``images/`` of the layout under
            ``root``; with ``annotations`` and no ``root``, ``images/`` next to the list).
        read_sizes: read each image header for ``image_size``, check the film is 1024x1024 and clip the
            boxes to it (required for evaluation); when False the images need not exist, ``image_size``
            is ``(0, 0)`` and boxes are left in the list's 1024x1024 frame, unclipped.
        rescale_boxes: opt-in for square resized copies of the films (e.g. 256x256 or 512x512
            downloads): scale every box by ``W / 1024`` (``W = H``) into the film's pixels instead of
            refusing the film. A non-square film is refused either way (it is not a uniformly resized
            1024x1024 original). Python only: the command line has no loader options.

    Returns:
        Samples in the documented order; ``meta`` holds ``image_index``, ``finding_label``, the CSV
        ``lines`` (header = line 1), the raw ``boxes_xywh`` (1024x1024 frame), ``box_scale`` (the
        factor applied: ``1.0`` unless rescaled) and ``provenance`` (clip counts).

    Raises:
        DataError: missing files (the box list naming the layout; films: how many of the list's films are
            missing and the first few), malformed rows (naming the line), an unknown finding label, a
            non-positive ``w`` / ``h`` or a non-finite value, a film that is not 1024x1024 (naming the films
            and their sizes; with ``rescale_boxes`` only a non-square one), or a list without any box row.
    """
    if annotations is not None:
        csv = require_file(Path(annotations), LAYOUT)
        if image_dir is not None:
            images = Path(image_dir)
        elif root is not None:
            base = Path(root) / "nih-chestxray8"
            images = (base if base.is_dir() else Path(root)) / "images"
        else:
            images = csv.parent / "images"
    else:
        if root is None:
            raise DataError(f"NIH ChestX-ray8: no data root and no annotations file given; expected layout:\n{LAYOUT}")
        csv, images = find_nih_layout(root)
        if image_dir is not None:
            images = Path(image_dir)
    try:
        # the release's header row is malformed (see module docstring): read positionally
        df = pd.read_csv(csv, header=None, skiprows=1, usecols=range(6), dtype={0: str, 1: str})
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    except Exception as exc:
        raise DataError(f"{csv}: cannot read the box list as CSV with >= 6 columns "
                        f"(Image Index, Finding Label, x, y, w, h) ({type(exc).__name__}: {exc})") from exc
    if df.empty:  # an empty run would report "0 samples" as a result
        raise DataError(f"{csv}: the box list holds no box rows (only a header, or nothing); expected one row per "
                        "expert box (Image Index, Finding Label, x, y, w, h)")
    df.columns = ["image_index", "finding_label", "x", "y", "w", "h"]
    df["_line"] = range(2, len(df) + 2)
    df["image_index"] = df["image_index"].astype(str).str.strip()
    df["finding_label"] = df["finding_label"].astype(str).str.strip()

    # 1. every row parsed (errors name the line), 2. every film located (one error listing the missing),
    # 3. every film's frame checked (one error listing the resized), 4. boxes clipped into samples.
    groups = []
    for (image_index, label), group in df.groupby(["image_index", "finding_label"], sort=True):
        if label not in NIH_FINDINGS:
            line = int(group["_line"].iloc[0])
            raise DataError(f"{csv} line {line}: unknown Finding Label {label!r}; expected one of {sorted(NIH_FINDINGS)}")
        raw = [_row_xywh(row, where=f"{csv} line {row['_line']}") for _, row in group.iterrows()]
        path = resolve_inside(images, image_index, what=f"{csv}: 'Image Index' {image_index!r}")
        groups.append((image_index, label, [int(v) for v in group["_line"]], raw, path))
    sizes = SizeCache(LAYOUT)
    scale = {g[4]: 1.0 for g in groups}
    if read_sizes:
        _check_films(csv, images, groups)
        scale = _film_scales(groups, sizes, rescale_boxes)

    samples: list[Sample] = []
    clip_log = BoxClipLog("nih_cxr8")
    for image_index, label, lines, raw, path in groups:
        k = scale[path]
        boxes = [(x * k, y * k, (x + w) * k, (y + h) * k) for x, y, w, h in raw]
        size = sizes(path) if read_sizes else (0, 0)
        boxes, prov = clip_log.clip(boxes, size if read_sizes else None, where=f"{csv} line(s) {lines}",
                                    what=f"{image_index} / {label}")
        meta = {"image_index": image_index, "finding_label": label, "lines": lines, "boxes_xywh": raw,
                "box_scale": k, "source": str(csv), "provenance": prov}
        samples.append(Sample.positive("nih_cxr8", len(samples), str(path), NIH_FINDINGS[label], boxes, size, meta=meta))
    return clip_log.finish(samples)


def _row_xywh(row: pd.Series, *, where: str) -> list[float]:
    """``[x, y, w, h]`` of one list row; ``w`` and ``h`` must be positive (reported as the list gives them)."""
    try:
        x, y, w, h = (float(row[k]) for k in ("x", "y", "w", "h"))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: columns x, y, w, h must be numbers") from exc
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataError(f"{where}: columns x, y, w, h must be finite numbers, got {(x, y, w, h)}")
    for name, v in (("w", w), ("h", h)):
        if v <= 0:
            raise DataError(f"{where}: {name} must be > 0 (the box's {'width' if name == 'w' else 'height'} in "
                            f"pixels), got {name}={v:g} (x, y, w, h = {x:g}, {y:g}, {w:g}, {h:g})")
    return [x, y, w, h]


def _check_films(csv: Path, images: Path, groups: list) -> None:
    """Every film of the list exists, or one DataError: how many are missing, the first few, and the limitation."""
    films: dict[Path, list[int]] = {}
    for _, _, lines, _, path in groups:
        films.setdefault(path, []).extend(lines)
    missing = [f"{p.name} (line(s) {lines})" for p, lines in films.items() if not p.is_file()]
    if missing:
        raise missing_images_error(
            csv, missing, len(films), images, layout=LAYOUT,
            note="The loader has no option to skip missing films (sample indices number the whole list, so a "
                 "subset run would give other samples the same indices): extract every images_*.tar.gz archive, "
                 "or, to run on the films present, point annotations= (Python) or a data root of its own at a box "
                 "list holding only their rows (its sample indices then number that subset).")


def _film_scales(groups: list, sizes: SizeCache, rescale: bool) -> dict[Path, float]:
    """Per film, the factor from the list's 1024x1024 frame to the film's pixels (see :func:`load_nih_cxr8`).

    Raises:
        DataError: films not 1024x1024 (without ``rescale``) or not square (with it), naming each and its size.
    """
    out: dict[Path, float] = {}
    bad: list[str] = []
    for *_, path in groups:
        if path in out:
            continue
        W, H = sizes(path)
        out[path] = W / ORIGINAL_SIZE if rescale else 1.0
        if (W, H) != (ORIGINAL_SIZE, ORIGINAL_SIZE) and (not rescale or W != H):
            bad.append(f"{path} is {W}x{H}")
    if not bad:
        n = sum(k != 1.0 for k in out.values())
        if n:
            import warnings

            from medfocus.errors import DataWarning

            warnings.warn(f"nih_cxr8: boxes of {n} of {len(out)} films rescaled from the 1024x1024 originals to the "
                          "film's size (rescale_boxes=True)", DataWarning, stacklevel=3)
        return out
    why = ("a non-square film is not a uniformly resized 1024x1024 original, so rescale_boxes cannot place the "
           "boxes on it" if rescale else
           "a resized copy (such as the 256x256 / 512x512 downloads) would put every box in the wrong frame. Use "
           "the original 1024x1024 PNGs, or, for a square resized copy, load_dataset('nih_cxr8', root, "
           "rescale_boxes=True) in Python or --rescale-boxes on the command line (attribute, bench build) scales the "
           "boxes to the film")
    raise DataError(f"NIH ChestX-ray8 boxes are in the pixels of the {ORIGINAL_SIZE}x{ORIGINAL_SIZE} original films, "
                    f"but {len(bad)} of {len(out)} films are not {ORIGINAL_SIZE}x{ORIGINAL_SIZE}: {some(bad)}; {why}.")
