"""PadChest-GR loader: one binary sample per abnormal, boxed finding sentence of a study.

Layout under ``root``::

    <root>/filtered_studies.json
    <root>/PadChest_GR/<ImageID>          # 16-bit PNGs as released (ImageID includes ".png")

``filtered_studies.json`` is a JSON list of studies; each has ``ImageID`` and ``findings``, a list of
objects with ``abnormal`` (bool), ``labels`` (list of finding names), ``boxes`` and ``extra_boxes``
(lists of ``[x1, y1, x2, y2]`` in **relative** coordinates, 0..1 of the image width/height) and
optionally ``locations``. Other fields are kept in ``meta``.

**Index order (compatibility with MedGround-Bench):** the ``test`` split is the first 2,000 studies in
file order (``train``: the last 100 studies in reverse order); within a study, findings in file
order; findings that are not ``abnormal`` or have neither ``boxes`` nor ``extra_boxes`` are skipped.
The attribute is the finding's labels joined by ``" or "``; the boxes are ``boxes + extra_boxes``
scaled to the image's pixel size and rounded with Python's ``round`` (half to even), as the
benchmark's builder stored them (the unrounded pixel boxes are in ``meta["boxes_px"]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medfocus.datasets._common import BoxClipLog, SizeCache, check_box, load_json, parse_box_text
from medfocus.errors import DataError
from medfocus.io.paths import resolve_inside
from medfocus.types import Sample

__all__ = ["load_padchest_gr", "LAYOUT", "STUDIES_FILE", "IMAGE_DIR", "N_TEST_STUDIES", "N_TRAIN_STUDIES"]

STUDIES_FILE = "filtered_studies.json"
IMAGE_DIR = "PadChest_GR"
N_TEST_STUDIES = 2000
N_TRAIN_STUDIES = 100
LAYOUT = f"""  <root>/{STUDIES_FILE}
  <root>/{IMAGE_DIR}/<ImageID>   (the released 16-bit PNGs)"""


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DataError(f"{where}: field 'abnormal' must be a boolean, got {value!r}")


def _box_list(value: Any, where: str, field: str) -> list[tuple[float, float, float, float]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of [x1, y1, x2, y2], got {type(value).__name__}")
    return [parse_box_text(b, where=where, field=field) for b in value]


def select_studies(studies: list, split: str) -> list[tuple[int, Any]]:
    """``(position in file, study)`` pairs of a split (see module docstring)."""
    if split == "test":
        return list(enumerate(studies))[:N_TEST_STUDIES]
    if split == "train":
        return list(enumerate(studies))[-N_TRAIN_STUDIES:][::-1]
    raise DataError(f"PadChest-GR split must be 'test' or 'train', got {split!r}")


def load_padchest_gr(
    root: str | os.PathLike,
    split: str = "test",
    *,
    studies_file: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    read_sizes: bool = True,
) -> list[Sample]:
    """Load PadChest-GR as binary "Is there evidence of {labels joined by ' or '}?" samples.

    Args:
        root: data root (see module docstring).
        split: ``"test"`` (first 2,000 studies; the benchmark's) or ``"train"`` (last 100, reversed).
        studies_file: explicit ``filtered_studies.json``.
        image_dir: explicit image folder (default ``<root>/PadChest_GR``).
        read_sizes: read image headers — required to turn relative boxes into pixels. When False,
            boxes stay relative (0..1) and ``image_size`` is ``(0, 0)``; only for inspecting order.

    Raises:
        DataError: missing files (naming the file and layout) or malformed studies (naming the
            study position, finding position and field).
    """
    root = Path(root)
    path = Path(studies_file) if studies_file is not None else root / STUDIES_FILE
    if not path.is_file():
        raise DataError(f"missing file {path}; expected layout:\n{LAYOUT}")
    images = Path(image_dir) if image_dir is not None else root / IMAGE_DIR
    studies = load_json(path)
    if not isinstance(studies, list):
        raise DataError(f"{path}: expected a JSON list of studies, got {type(studies).__name__}")

    sizes = SizeCache(LAYOUT)
    samples: list[Sample] = []
    clip_log = BoxClipLog("padchest_gr")
    for pos, study in select_studies(studies, split):
        where_s = f"{path} study #{pos}"
        if not isinstance(study, dict):
            raise DataError(f"{where_s}: expected an object, got {type(study).__name__}")
        if "ImageID" not in study or "findings" not in study:
            raise DataError(f"{where_s}: missing field 'ImageID' or 'findings'")
        findings = study["findings"]
        if not isinstance(findings, list):
            raise DataError(f"{where_s}: field 'findings' must be a list")
        image_id = str(study["ImageID"])
        img_path = resolve_inside(images, image_id, what=f"{where_s}: 'ImageID' {image_id!r}")
        for k, f in enumerate(findings):
            where = f"{where_s} finding #{k}"
            if not isinstance(f, dict):
                raise DataError(f"{where}: expected an object, got {type(f).__name__}")
            if not _as_bool(f.get("abnormal", False), where):
                continue
            rel = _box_list(f.get("boxes"), where, "boxes") + _box_list(f.get("extra_boxes"), where, "extra_boxes")
            if not rel:
                continue
            labels = f.get("labels")
            if isinstance(labels, str):
                labels = [labels]
            if not isinstance(labels, list) or not labels:
                raise DataError(f"{where}: field 'labels' must be a non-empty list of finding names, got {labels!r}")
            attribute = " or ".join(str(x).strip() for x in labels)
            for b in rel:
                check_box(b, where=where, field="boxes")
            if read_sizes:
                W, H = sizes(img_path)
                px = [(b[0] * W, b[1] * H, b[2] * W, b[3] * H) for b in rel]
                boxes = [tuple(float(round(v)) for v in b) for b in px]
                size = (W, H)
            else:
                px, boxes, size = [], rel, (0, 0)
            boxes, prov = clip_log.clip(boxes, size if read_sizes else None, where=where, what=f"{image_id} / {attribute}")
            meta = {k2: v for k2, v in study.items() if k2 != "findings" and isinstance(v, (str, int, float, bool, type(None)))}
            meta.update({
                "image_id": image_id,
                "study_position": pos,
                "finding_position": k,
                "labels": [str(x) for x in labels],
                "locations": f.get("locations"),
                "boxes_relative": [list(b) for b in rel],
                "boxes_px": [list(b) for b in px],
                "source": str(path),
                "provenance": prov,
            })
            samples.append(
                Sample.positive(
                    "padchest_gr", len(samples), str(img_path), attribute, boxes, size,
                    meta=meta,
                )
            )
    return clip_log.finish(samples)
