"""Chest ImaGenome (gold set) loader: one binary sample per (image, finding label) with its boxes.

Layout under ``root`` (PhysioNet releases, credentialed)::

    <root>/chest-imagenome/1.0.0/gold_dataset/gold_object_attribute_with_coordinates.txt
    <root>/mimic-cxr-jpg/2.1.0/files/p<first 2 digits of patient>/p<patient_id>/s<study_id>/<image_id>.jpg

(``<root>`` may also point at ``chest-imagenome/1.0.0`` or at ``gold_dataset`` itself for the table;
images are then looked up under ``image_root``, default ``<root>``.)

The gold table is tab-separated with (at least) the columns ``patient_id, study_id, image_id,
bbox, label_name, categoryID, relation, coord_original``; ``image_id`` is the DICOM id with a
``.dcm`` suffix (the JPEG has the same stem); ``coord_original`` is ``"[x1, y1, x2, y2]"`` in the
original image's pixels (parsed by a regex — never ``eval``); ``bbox`` is the anatomical region
(kept as ``Sample.concept`` when all boxes of a sample share it, and in ``meta["regions"]``).

**Index order (compatibility with MedGround-Bench):** keep rows with ``relation == 1`` whose
``categoryID`` is ``anatomicalfinding`` or ``disease``; group by ``(patient_id, study_id, image_id,
label_name, categoryID)``; one sample per group in ascending sorted order of the group keys, exactly
as ``pandas.read_csv(sep="\\t")`` + ``groupby([...], sort=True)`` orders them (numeric ids sort
numerically). The attribute is ``label_name`` as written in the table (ImaGenome labels are
lowercase, e.g. ``"lung opacity"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from medfocus.datasets._common import BoxClipLog, SizeCache, check_box, id_str, parse_box_text
from medfocus.errors import DataError
from medfocus.io.paths import resolve_inside
from medfocus.types import Sample

__all__ = ["load_imagenome", "find_gold_table", "image_relpath", "GOLD_FILE", "LAYOUT"]

GOLD_FILE = "gold_object_attribute_with_coordinates.txt"
LAYOUT = f"""  <root>/chest-imagenome/1.0.0/gold_dataset/{GOLD_FILE}
  <root>/mimic-cxr-jpg/2.1.0/files/p<PP>/p<patient_id>/s<study_id>/<image_id>.jpg"""
KEEP_CATEGORIES = ("anatomicalfinding", "disease")
GROUP_KEYS = ["patient_id", "study_id", "image_id", "label_name", "categoryID"]
_REQUIRED = GROUP_KEYS + ["relation", "coord_original"]


def find_gold_table(root: str | os.PathLike) -> Path:
    """Locate the gold attribute table under ``root`` (see module docstring)."""
    root = Path(root)
    candidates = [
        root / "chest-imagenome" / "1.0.0" / "gold_dataset" / GOLD_FILE,
        root / "gold_dataset" / GOLD_FILE,
        root / GOLD_FILE,
    ]
    for c in candidates:
        if c.is_file():
            return c
    tried = "\n".join(f"  {c}" for c in candidates)
    raise DataError(f"ImaGenome gold table not found under {root}; tried:\n{tried}\nexpected layout:\n{LAYOUT}")


def image_relpath(patient_id: str, study_id: str, image_id: str) -> str:
    """MIMIC-CXR-JPG path of an image relative to the data root."""
    stem = image_id[:-4] if image_id.lower().endswith(".dcm") else image_id
    return f"mimic-cxr-jpg/2.1.0/files/p{patient_id[:2]}/p{patient_id}/s{study_id}/{stem}.jpg"


def load_imagenome(
    root: str | os.PathLike,
    *,
    gold_table: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    read_sizes: bool = True,
) -> list[Sample]:
    """Load the Chest ImaGenome gold set as binary "Is there evidence of {label}?" samples.

    Args:
        root: data root (see module docstring).
        gold_table: explicit path of ``gold_object_attribute_with_coordinates.txt``.
        image_root: folder that holds ``mimic-cxr-jpg/`` (default ``root``).
        read_sizes: read each JPEG header for ``image_size``; when False images need not exist
            and ``image_size`` is ``(0, 0)``.

    Returns:
        Samples in benchmark index order, answer ``"Yes"``; ``meta`` holds the ids, ``categoryID``
        the region names (``regions``) of the boxes and ``provenance`` (clip counts: boxes are clipped
        to the JPEG's size read from its header, boxes empty after clipping dropped, one warning).

    Raises:
        DataError: missing table/images (naming file and layout), missing columns, or a malformed
            ``coord_original`` (naming the line).
    """
    table = Path(gold_table) if gold_table is not None else find_gold_table(root)
    if not table.is_file():
        raise DataError(f"missing file {table}; expected layout:\n{LAYOUT}")
    img_root = Path(image_root) if image_root is not None else Path(root)
    try:
        df = pd.read_csv(table, sep="\t")
    except Exception as exc:
        raise DataError(f"{table}: cannot read tab-separated table ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{table}: missing column(s) {missing}; expected the ImaGenome gold columns {_REQUIRED} (tab-separated)")
    df["_line"] = range(2, len(df) + 2)
    relation = pd.to_numeric(df["relation"], errors="coerce")
    keep = (relation == 1) & df["categoryID"].isin(KEEP_CATEGORIES)
    df = df[keep]

    sizes = SizeCache(LAYOUT)
    samples: list[Sample] = []
    clip_log = BoxClipLog("imagenome")
    for key, group in df.groupby(GROUP_KEYS, sort=True):
        patient_id, study_id, image_id, label, category = key
        pid, sid, iid = id_str(patient_id), id_str(study_id), id_str(image_id)
        boxes, regions = [], []
        for _, row in group.iterrows():
            where = f"{table} line {row['_line']}"
            box = parse_box_text(row["coord_original"], where=where, field="coord_original")
            boxes.append(check_box(box, where=where, field="coord_original"))
            if "bbox" in group.columns:
                regions.append(str(row["bbox"]))
        path = resolve_inside(img_root, image_relpath(pid, sid, iid), what=f"{table}: image {iid!r}")
        size = sizes(path) if read_sizes else (0, 0)
        boxes, prov = clip_log.clip(boxes, size if read_sizes else None,
                                    where=f"{table} line(s) {group['_line'].tolist()}", what=f"{iid} / {label}")
        attribute = str(label).strip()
        concept = regions[0] if regions and len(set(regions)) == 1 else None
        samples.append(
            Sample.positive(
                "imagenome", len(samples), str(path), attribute, boxes, size,
                concept=concept,
                meta={"patient_id": pid, "study_id": sid, "image_id": iid, "categoryID": str(category),
                      "regions": regions, "source": str(table), "provenance": prov},
            )
        )
    return clip_log.finish(samples)
