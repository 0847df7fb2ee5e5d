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
corner and ``w, h`` the extent, in the 1024-px film), kept as floats, then clipped to the image
(:func:`medfocus.datasets._common.clip_boxes`); a box empty after clipping is dropped and the counts
are recorded in every sample's ``meta["provenance"]`` and warned about once per load.

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

from medfocus.datasets._common import BoxClipLog, SizeCache, check_box, require_file
from medfocus.errors import DataError
from medfocus.io.paths import resolve_inside
from medfocus.types import Sample

__all__ = ["load_nih_cxr8", "find_nih_layout", "NIH_FINDINGS", "LAYOUT", "BOX_LIST_NAMES"]

LAYOUT = """  <root>/nih-chestxray8/BBox_List_2017.csv   (or BBox_List_2017.csv.gz / nih_bbox_list_2017.csv.gz)
  <root>/nih-chestxray8/images/<Image Index>   (e.g. 00013118_008.png; root may also be nih-chestxray8 itself)
  images: https://nihcc.app.box.com/v/ChestXray-NIHCC (images_*.tar.gz, no credentials needed)"""

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
                  image_dir: str | os.PathLike | None = None, read_sizes: bool = True) -> list[Sample]:
    """Load the NIH ChestX-ray8 box subset as "Is there evidence of {finding}?" samples (answer ``"Yes"``).

    Args:
        root: data root (see module docstring); may be ``None`` when ``annotations`` and ``image_dir``
            are both given.
        annotations: explicit box list (``.csv`` or ``.csv.gz``), overriding the layout search.
        image_dir: explicit folder of ``<Image Index>`` files (default: ``images/`` of the layout under
            ``root``; with ``annotations`` and no ``root``, ``images/`` next to the list).
        read_sizes: read each image header for ``image_size`` and clip the boxes to it (required for
            evaluation); when False the images need not exist, ``image_size`` is ``(0, 0)`` and boxes
            are not clipped.

    Returns:
        Samples in the documented order; ``meta`` holds ``image_index``, ``finding_label``, the CSV
        ``lines`` (header = line 1), the raw ``boxes_xywh`` and ``provenance`` (clip counts).

    Raises:
        DataError: missing files (naming the file and layout), malformed rows (naming the line), an
            unknown finding label, or an inverted / non-finite box.
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
    except Exception as exc:
        raise DataError(f"{csv}: cannot read the box list as CSV with >= 6 columns "
                        f"(Image Index, Finding Label, x, y, w, h) ({type(exc).__name__}: {exc})") from exc
    df.columns = ["image_index", "finding_label", "x", "y", "w", "h"]
    df["_line"] = range(2, len(df) + 2)
    df["image_index"] = df["image_index"].astype(str).str.strip()
    df["finding_label"] = df["finding_label"].astype(str).str.strip()

    sizes = SizeCache(LAYOUT)
    samples: list[Sample] = []
    clip_log = BoxClipLog("nih_cxr8")
    for (image_index, label), group in df.groupby(["image_index", "finding_label"], sort=True):
        if label not in NIH_FINDINGS:
            line = int(group["_line"].iloc[0])
            raise DataError(f"{csv} line {line}: unknown Finding Label {label!r}; expected one of {sorted(NIH_FINDINGS)}")
        raw, boxes = [], []
        for _, row in group.iterrows():
            where = f"{csv} line {row['_line']}"
            try:
                x, y, w, h = (float(row[k]) for k in ("x", "y", "w", "h"))
            except (TypeError, ValueError) as exc:
                raise DataError(f"{where}: columns x, y, w, h must be numbers") from exc
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise DataError(f"{where}: columns x, y, w, h must be finite numbers, got {(x, y, w, h)}")
            box = check_box((x, y, x + w, y + h), where=where, field="x,y,w,h")  # negative extent
            raw.append([x, y, w, h])
            boxes.append(box)
        path = resolve_inside(images, image_index, what=f"{csv}: 'Image Index' {image_index!r}")
        size = sizes(path) if read_sizes else (0, 0)
        boxes, prov = clip_log.clip(boxes, size if read_sizes else None,
                                    where=f"{csv} line(s) {group['_line'].tolist()}", what=f"{image_index} / {label}")
        meta = {"image_index": image_index, "finding_label": label, "lines": [int(v) for v in group["_line"]],
                "boxes_xywh": raw, "source": str(csv), "provenance": prov}
        samples.append(Sample.positive("nih_cxr8", len(samples), str(path), NIH_FINDINGS[label], boxes, size, meta=meta))
    return clip_log.finish(samples)
