"""VinDr-CXR loader: one binary sample per (image, finding class) with all that class's boxes.

Layouts accepted under ``root`` (searched in this order)::

    # PhysioNet release (credentialed), the benchmark's layout
    <root>/vindr-cxr/1.0.0/annotations/annotations_<split>.csv
    <root>/vindr-cxr/1.0.0/<split>/<image_id>.dicom
    # the same, with <root> pointing at vindr-cxr/1.0.0 itself
    <root>/annotations/annotations_<split>.csv
    <root>/<split>/<image_id>.dicom
    # Kaggle competition release ("train.csv" with class_id / rad_id columns)
    <root>/<split>.csv
    <root>/<split>/<image_id>.dicom

Both annotation schemas are read: the PhysioNet one (``image_id, rad_id|rad_ID, class_name, x_min,
y_min, x_max, y_max``) and the Kaggle one (``image_id, class_name, class_id, rad_id, x_min, ...``).
Column names are matched case-insensitively. Images may also be ``.dcm`` / ``.png`` / ``.jpg`` with the
same stem (the first existing one is used; ``.dicom`` is the real release's suffix).

**Index order (compatibility with MedGround-Bench):** rows whose ``class_name`` is ``"No finding"`` are
dropped; the rest are grouped by ``(image_id, class_name)`` and one sample is emitted per group in
ascending sorted order of the group keys (what ``pandas.DataFrame.groupby([...], sort=True)`` yields),
so ``Sample.index`` equals the benchmark's ``index``. Each box is ``[round(x_min), round(y_min),
round(x_max), round(y_max)]`` with Python's ``round`` (half to even), as the benchmark's builder stored
them; boxes of all radiologists are kept (the union is the GT region). Boxes are then clipped to the
image (size from the DICOM header; :class:`medfocus.datasets._common.BoxClipLog`): a box empty after
clipping is dropped, and the counts go into every sample's ``meta["provenance"]`` and one warning. The attribute is the class
name, lowercased by default (``"Pleural effusion" -> "pleural effusion"``); pass
``lowercase=False`` to keep the release's spelling (which is what the public benchmark's questions use).
"""

from __future__ import annotations

import math

import os
from pathlib import Path

import pandas as pd

from medfocus.datasets._common import BoxClipLog, SizeCache, check_box, id_str, require_file
from medfocus.errors import DataError
from medfocus.io.paths import resolve_inside
from medfocus.types import Sample

__all__ = ["load_vindr_cxr", "find_vindr_layout", "LAYOUT", "IMAGE_SUFFIXES"]

LAYOUT = """  <root>/vindr-cxr/1.0.0/annotations/annotations_<split>.csv   (PhysioNet; or <root>/annotations/...)
  <root>/vindr-cxr/1.0.0/<split>/<image_id>.dicom
  or Kaggle: <root>/<split>.csv + <root>/<split>/<image_id>.dicom"""

IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")
NO_FINDING = "no finding"
_REQUIRED = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")


def find_vindr_layout(root: str | os.PathLike, split: str = "test") -> tuple[Path, Path]:
    """Locate ``(annotations_csv, image_dir)`` for ``split`` under ``root`` (see module docstring).

    Raises:
        DataError: no known layout found; the message lists every path tried.
    """
    root = Path(root)
    candidates = [
        (root / "vindr-cxr" / "1.0.0" / "annotations" / f"annotations_{split}.csv", root / "vindr-cxr" / "1.0.0" / split),
        (root / "annotations" / f"annotations_{split}.csv", root / split),
        (root / f"annotations_{split}.csv", root / split),
        (root / f"{split}.csv", root / split),
    ]
    for csv, images in candidates:
        if csv.is_file():
            return csv, images
    tried = "\n".join(f"  {c}" for c, _ in candidates)
    raise DataError(f"VinDr-CXR annotations for split {split!r} not found under {root}; tried:\n{tried}\nexpected layout:\n{LAYOUT}")


def _image_path(image_dir: Path, image_id: str) -> Path:
    """The image file of ``image_id`` in ``image_dir`` (first existing suffix); an id that leaves the
    folder (``..``, absolute) is refused (:func:`medfocus.io.paths.resolve_inside`)."""
    for suf in IMAGE_SUFFIXES:
        p = resolve_inside(image_dir, f"{image_id}{suf}", what=f"image_id {image_id!r}")
        if p.is_file():
            return p
    return resolve_inside(image_dir, f"{image_id}.dicom", what=f"image_id {image_id!r}")


def load_vindr_cxr(
    root: str | os.PathLike,
    split: str = "test",
    *,
    annotations: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    lowercase: bool = True,
    read_sizes: bool = True,
) -> list[Sample]:
    """Load VinDr-CXR as binary "Is there evidence of {finding}?" samples (answer ``"Yes"``).

    Args:
        root: data root (see module docstring for the accepted layouts).
        split: ``"test"`` (the benchmark's split) or ``"train"``.
        annotations: explicit annotation CSV (overrides the layout search).
        image_dir: explicit folder of ``<image_id>.dicom`` files.
        lowercase: lowercase the class name for the attribute / question.
        read_sizes: read each image header for ``image_size`` (required for evaluation); when False
            the images need not exist and ``image_size`` is ``(0, 0)``.

    Returns:
        Samples in benchmark index order; ``meta`` holds ``image_id``, ``class_name``, ``rad_ids``,
        ``class_id`` (when present), the raw float boxes ``boxes_raw`` and ``provenance`` (clip counts).

    Raises:
        DataError: missing files (naming the file and layout) or malformed rows (naming row and column).
    """
    if annotations is not None:
        csv = require_file(Path(annotations), LAYOUT)
        images = Path(image_dir) if image_dir is not None else csv.parent.parent / split
    else:
        csv, images = find_vindr_layout(root, split)
        if image_dir is not None:
            images = Path(image_dir)
    try:
        df = pd.read_csv(csv)
    except Exception as exc:
        raise DataError(f"{csv}: cannot read CSV ({type(exc).__name__}: {exc})") from exc
    lower = {c.lower(): c for c in df.columns}
    missing = [c for c in _REQUIRED if c not in lower]
    if missing:
        raise DataError(f"{csv}: missing column(s) {missing}; expected VinDr-CXR columns {list(_REQUIRED)} (+ rad_id, class_id)")
    df = df.rename(columns={orig: low for low, orig in lower.items()})
    # The line numbers of the CSV (header = line 1) for error messages.
    df["_line"] = range(2, len(df) + 2)
    blank = df["class_name"].isna() | (df["class_name"].astype(str).str.strip() == "")
    if blank.any():  # an empty finding name is an error, not a finding called "nan" or a dropped row
        raise DataError(f"{csv} line {int(df.loc[blank, '_line'].iloc[0])}: empty 'class_name' "
                        f"({int(blank.sum())} row(s)); every row names a finding or 'No finding'")
    df["image_id"] = df["image_id"].map(id_str)
    df["class_name"] = df["class_name"].astype(str)
    df = df[df["class_name"].str.strip().str.lower() != NO_FINDING]

    sizes = SizeCache(LAYOUT)
    samples: list[Sample] = []
    clip_log = BoxClipLog("vindr_cxr")
    for (image_id, class_name), group in df.groupby(["image_id", "class_name"], sort=True):
        boxes, raw = [], []
        for _, row in group.iterrows():
            where = f"{csv} line {row['_line']}"
            try:
                vals = [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
            except (TypeError, ValueError) as exc:
                raise DataError(f"{where}: box columns x_min..y_max must be numbers") from exc
            if any(v != v for v in vals):  # NaN
                raise DataError(f"{where}: finding {class_name!r} has an empty box (x_min..y_max); only 'No finding' rows may")
            if not all(math.isfinite(v) for v in vals):  # inf would overflow round() below
                raise DataError(f"{where}: box columns x_min..y_max must be finite numbers, got {vals}")
            check_box(tuple(vals), where=where, field="x_min,y_min,x_max,y_max")  # type: ignore[arg-type]
            raw.append(vals)
            boxes.append(tuple(float(round(v)) for v in vals))
        path = _image_path(images, image_id)
        size = sizes(path) if read_sizes else (0, 0)
        boxes, prov = clip_log.clip(boxes, size if read_sizes else None,
                                    where=f"{csv} line(s) {group['_line'].tolist()}", what=f"{image_id} / {class_name}")
        attribute = class_name.strip().lower() if lowercase else class_name.strip()
        meta = {
            "image_id": image_id,
            "class_name": class_name,
            "boxes_raw": raw,
            "source": str(csv),
            "provenance": prov,
        }
        rad_col = "rad_id" if "rad_id" in group.columns else None
        if rad_col:
            meta["rad_ids"] = [str(r) for r in group[rad_col].tolist()]
        if "class_id" in group.columns:
            meta["class_id"] = int(group["class_id"].iloc[0])
        samples.append(
            Sample.positive(
                "vindr_cxr", len(samples), str(path), attribute, boxes, size,
                meta=meta,
            )
        )
    return clip_log.finish(samples)
