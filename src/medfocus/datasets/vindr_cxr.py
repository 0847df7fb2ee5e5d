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
so ``Sample.index`` equals the benchmark's ``index``. The class name is compared as
:func:`finding_name` normalises it for the question (spaces trimmed and collapsed, case ignored): class
names differing only so are one finding, merged into one sample at the sorted position of their first
spelling, with a DataWarning (the release spells each class one way, so its order is unchanged). A CSV
without a positive row is a DataError naming it; a missing film is named with its CSV lines and the
suffixes tried. A box of zero width or height (after rounding) is dropped with a DataWarning naming its
line (a finding left with none is an error); it covers no pixel, so no metric changes. For a film that is
not a DICOM (a PNG/JPEG copy), boxes reaching past it are reported as a sign that it may be a resized
copy, since the boxes are in the original DICOM's pixels. Each box is ``[round(x_min), round(y_min),
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

from medfocus.datasets._common import BoxClipLog, SizeCache, check_box, id_str, missing_images_error, require_file, some
from medfocus.errors import DataError
from medfocus.io.paths import resolve_inside
from medfocus.types import Sample

__all__ = ["load_vindr_cxr", "find_vindr_layout", "finding_name", "LAYOUT", "IMAGE_SUFFIXES"]

LAYOUT = """  <root>/vindr-cxr/1.0.0/annotations/annotations_<split>.csv   (PhysioNet; or <root>/annotations/...)
  <root>/vindr-cxr/1.0.0/<split>/<image_id>.dicom
  or Kaggle: <root>/<split>.csv + <root>/<split>/<image_id>.dicom"""

IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dicom", ".dcm")
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
        Samples in benchmark index order; ``meta`` holds ``image_id``, ``class_name`` (the first spelling),
        ``rad_ids``, ``class_id`` (when present), the raw float boxes ``boxes_raw`` (every row),
        ``zero_area_lines`` (rows dropped for zero width/height) and ``provenance`` (clip counts).

    Raises:
        DataError: missing files (the CSV naming the layout; films counted, the first few named with their
            CSV lines and the suffixes tried), malformed rows (naming row and column), a finding whose every
            box has zero area, or a CSV without any positive finding row.
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
    n_rows = len(df)
    df["_key"] = df["class_name"].map(finding_name)
    df = df[df["_key"] != NO_FINDING]
    if df.empty:  # an empty run would report "0 samples" as a result
        why = "only a header, no rows" if n_rows == 0 else f"all {n_rows} rows are 'No finding'"
        raise DataError(f"{csv}: no positive finding rows ({why}); a VinDr-CXR sample is an (image_id, class_name) "
                        "with at least one box")

    # 1. rows parsed (errors name the line), 2. films located (one error listing the missing), 3. samples.
    # Grouping uses the finding's normalised name (finding_name, as in the question), so "Consolidation" and
    # "consolidation " of one film are one sample; groups keep the benchmark's order, sorted by
    # (image_id, class_name) with a merged group at its first spelling.
    groups, variants = [], []
    for (image_id, _), group in df.groupby(["image_id", "_key"], sort=False):
        spellings = sorted(set(group["class_name"]))
        if len(spellings) > 1:
            variants.append(f"{image_id}: {' + '.join(repr(v) for v in spellings)} (lines {group['_line'].tolist()})")
        raw = [_row_box(row, where=f"{csv} line {row['_line']}", class_name=spellings[0]) for _, row in group.iterrows()]
        groups.append((image_id, spellings[0], group, raw))
    groups.sort(key=lambda g: (g[0], g[1]))
    paths = {image_id: _image_path(images, image_id) for image_id, *_ in groups}
    if read_sizes:
        _check_films(csv, images, groups, paths)

    sizes = SizeCache(LAYOUT)
    samples: list[Sample] = []
    clip_log = BoxClipLog("vindr_cxr", frame_note=(
        "VinDr-CXR boxes are in the original DICOM's pixel frame, so a film that is not a DICOM and is smaller than "
        "its boxes may be a resized copy, with every box (and IoU) on it in the wrong frame, not only the clipped ones"))
    zero_area: list[str] = []
    for image_id, class_name, group, raw in groups:
        boxes, zero_lines, flats = [], [], []
        for line, vals in zip(group["_line"].tolist(), raw):
            box = tuple(float(round(v)) for v in vals)
            flat = _zero_extent(vals, box)
            if flat:  # no pixel: adds nothing to the union of the boxes, so dropped (and reported)
                zero_lines.append(line)
                flats.append(flat)
                zero_area.append(f"line {line} ({image_id} / {class_name}): {flat}")
                continue
            boxes.append(box)
        lines = group["_line"].tolist()
        if not boxes:
            raise DataError(f"{csv} line(s) {lines}: every box of {image_id} / {class_name} has zero area: {'; '.join(flats)}")
        path = paths[image_id]
        size = sizes(path) if read_sizes else (0, 0)
        doubt = (f"{path} ({size[0]}x{size[1]}, not a DICOM)"
                 if read_sizes and path.suffix.lower() not in DICOM_SUFFIXES else None)
        boxes, prov = clip_log.clip(boxes, size if read_sizes else None, where=f"{csv} line(s) {lines}",
                                    what=f"{image_id} / {class_name}", frame_doubt=doubt)
        meta = {
            "image_id": image_id,
            "class_name": class_name,
            "boxes_raw": raw,
            "zero_area_lines": zero_lines,
            "source": str(csv),
            "provenance": prov,
        }
        rad_col = "rad_id" if "rad_id" in group.columns else None
        if rad_col:
            meta["rad_ids"] = [str(r) for r in group[rad_col].tolist()]
        if "class_id" in group.columns:
            meta["class_id"] = int(group["class_id"].iloc[0])
        attribute = finding_name(class_name, lowercase=lowercase)
        samples.append(Sample.positive("vindr_cxr", len(samples), str(path), attribute, boxes, size, meta=meta))
    if variants or zero_area:
        import warnings

        from medfocus.errors import DataWarning

        if variants:
            warnings.warn(f"vindr_cxr: {csv}: class names differing only in case or spaces are one finding, merged into "
                          f"one sample each: {some(variants, 3)}", DataWarning, stacklevel=2)
        if zero_area:
            warnings.warn(f"vindr_cxr: {csv}: {len(zero_area)} zero-area box(es) dropped (they cover no pixel): "
                          f"{some(zero_area, 3)}", DataWarning, stacklevel=2)
    return clip_log.finish(samples)


def finding_name(class_name: str, *, lowercase: bool = True) -> str:
    """The finding's name as the question uses it and samples are grouped by: spaces trimmed and collapsed,
    lowercased unless ``lowercase=False`` (``" Pleural  effusion" -> "pleural effusion"``)."""
    name = " ".join(str(class_name).split())
    return name.lower() if lowercase else name


def _row_box(row: pd.Series, *, where: str, class_name: str) -> list[float]:
    """``[x_min, y_min, x_max, y_max]`` of one row as floats; empty, non-finite or inverted is an error."""
    try:
        vals = [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: box columns x_min..y_max must be numbers") from exc
    if any(v != v for v in vals):  # NaN
        raise DataError(f"{where}: finding {class_name!r} has an empty box (x_min..y_max); only 'No finding' rows may")
    if not all(math.isfinite(v) for v in vals):  # inf would overflow round() below
        raise DataError(f"{where}: box columns x_min..y_max must be finite numbers, got {vals}")
    check_box(tuple(vals), where=where, field="x_min,y_min,x_max,y_max")  # type: ignore[arg-type]
    return vals


def _zero_extent(raw: list[float], box: tuple[float, ...]) -> str:
    """Why a box (rounded to whole pixels as the benchmark stored it) covers no pixel, or ``""``."""
    out = []
    for axis, lo, hi in (("width", 0, 2), ("height", 1, 3)):
        if box[hi] == box[lo]:
            a, b = ("x_min", "x_max") if axis == "width" else ("y_min", "y_max")
            if raw[hi] == raw[lo]:
                out.append(f"zero {axis} ({a} == {b} == {raw[lo]:g})")
            else:
                out.append(f"zero {axis} after rounding to whole pixels ({a} {raw[lo]:g}, {b} {raw[hi]:g} -> {box[lo]:g})")
    return ", ".join(out)


def _check_films(csv: Path, images: Path, groups: list, paths: dict[str, Path]) -> None:
    """Every image_id of the CSV has a film, or one DataError: how many are missing, the first few with their
    CSV lines, the suffixes tried, and that a subset run is not supported."""
    lines: dict[str, list[int]] = {}
    for image_id, _, group, _ in groups:
        lines.setdefault(image_id, []).extend(int(v) for v in group["_line"])
    tried = "/".join(IMAGE_SUFFIXES)
    missing = [f"{image_id}{tried} (line(s) {sorted(ln)})" for image_id, ln in lines.items() if not paths[image_id].is_file()]
    if missing:
        raise missing_images_error(
            csv, missing, len(lines), images, layout=LAYOUT,
            note=f"Each image_id is looked for as <image_id> + one of {', '.join(IMAGE_SUFFIXES)} in that folder. The "
                 "loader has no option to skip missing films: sample indices number the CSV's findings in the "
                 "benchmark's order, so a subset would give other samples the benchmark's indices.")
