"""Small writers for fixtures and synthetic datasets, in the real file formats the readers accept.

* :func:`write_dicom` — a genuine DICOM Part-10 file (preamble, ``DICM``, file meta with transfer
  syntax Explicit VR Little Endian, SOP class *Digital X-Ray Image Storage - For Presentation*),
  8- or 16-bit unsigned (or 16-bit signed) grayscale, optional multi-frame, windowing, rescale and
  VOI LUT tags.
* :func:`write_png` / :func:`write_png16` — 8- or 16-bit grayscale PNG.
* :func:`write_tiff` — 8- or 16-bit grayscale TIFF.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medfocus.errors import DataError

__all__ = ["write_dicom", "write_png", "write_png16", "write_tiff"]

#: DICOM SOP class "Digital X-Ray Image Storage - For Presentation" (what chest DR films use).
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _ensure_parent(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def write_dicom(
    path: str | os.PathLike,
    array: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    voi_lut: np.ndarray | None = None,
    voi_lut_first: int = 0,
    voi_lut_bits: int | None = None,
    compression: str | None = None,
    **tags: Any,
) -> Path:
    """Write a grayscale image as a DICOM Part-10 file (uncompressed, Explicit VR Little Endian).

    Args:
        path: output file (parents are created). VinDr-CXR uses ``<image_id>.dicom``.
        array: ``(H, W)`` or multi-frame ``(F, H, W)`` array, dtype ``uint8``, ``uint16`` or ``int16``.
            Stored values are the raw pixel values (before the modality rescale).
        photometric: ``"MONOCHROME2"`` (0 = black) or ``"MONOCHROME1"`` (0 = white).
        voi_lut: optional 1-D VOI LUT (uint16 values) written as a ``VOILUTSequence`` item.
        voi_lut_first: first stored (modality-rescaled) value mapped by ``voi_lut``.
        voi_lut_bits: bits per LUT entry in the LUT descriptor (default: 16 if any value > 255 else 8).
        compression: ``None`` (uncompressed), ``"rle"`` (RLE Lossless, pydicom's encoder) or
            ``"jpeg2000"`` (JPEG 2000 lossless through Pillow/OpenJPEG, encapsulated; single-frame
            unsigned only) — for testing that compressed archives (as many real ones) read back.
        **tags: any DICOM keyword, e.g. ``WindowCenter=2048, WindowWidth=4096, RescaleSlope=2.0,
            RescaleIntercept=-1024, PatientID="P1", BitsStored=12, VOILUTFunction="SIGMOID"``.
            Unknown keywords raise :class:`ValueError` (from pydicom).

    Returns:
        The path written.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    arr = np.asarray(array)
    if arr.dtype not in (np.uint8, np.uint16, np.int16):
        raise DataError(f"write_dicom({path}): array dtype must be uint8, uint16 or int16, got {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise DataError(f"write_dicom({path}): array must be (H, W) or (F, H, W), got shape {arr.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"write_dicom({path}): photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    p = _ensure_parent(path)

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    today = _dt.date.today().strftime("%Y%m%d")
    ds.StudyDate = today
    ds.ContentDate = today
    ds.PatientID = "ANON"
    ds.PatientName = "Anonymous"

    bits = 8 if arr.dtype == np.uint8 else 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = int(arr.shape[-2])
    ds.Columns = int(arr.shape[-1])
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
    if arr.ndim == 3:
        ds.NumberOfFrames = int(arr.shape[0])

    if voi_lut is not None:
        lut = np.asarray(voi_lut).astype(np.uint16).ravel()
        nbits = voi_lut_bits if voi_lut_bits is not None else (16 if int(lut.max(initial=0)) > 255 else 8)
        item = Dataset()
        # Descriptor: number of entries (0 means 65536), first mapped value, bits per entry.
        # Both elements have ambiguous VRs (US/SS, US/OW); write them explicitly as US.
        item.add_new(0x00283002, "US", [len(lut) % 65536, int(voi_lut_first), int(nbits)])
        item.add_new(0x00283006, "US", lut.tolist())
        ds.VOILUTSequence = [item]

    for key, value in tags.items():
        setattr(ds, key, value)
    # Keep HighBit consistent when the caller overrides BitsStored (e.g. 12-bit detector data), and
    # the file meta consistent when the caller sets its own (e.g. deterministic) SOP UIDs.
    ds.HighBit = int(ds.BitsStored) - 1
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.MediaStorageSOPClassUID = ds.SOPClassUID

    data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    ds.PixelData = data.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    if compression is not None:
        _compress(ds, arr, compression, path)
    ds.save_as(p, enforce_file_format=True)
    return p


def _compress(ds, arr: np.ndarray, compression: str, path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, RLELossless

    if compression == "rle":
        ds.compress(RLELossless, arr, generate_instance_uid=False)
    elif compression == "jpeg2000":
        if arr.ndim != 2 or arr.dtype == np.int16:
            raise DataError(f"write_dicom({path}): jpeg2000 supports single-frame unsigned images only")
        import io

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    else:
        raise DataError(f"write_dicom({path}): compression must be None, 'rle' or 'jpeg2000', got {compression!r}")


def _to_image(arr: np.ndarray, path: str | os.PathLike) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DataError(f"{path}: only (H, W) grayscale arrays can be written, got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: array dtype must be uint8 or uint16, got {arr.dtype}")
    # 2-D uint8 becomes mode "L", 2-D uint16 becomes mode "I;16".
    return Image.fromarray(np.ascontiguousarray(arr))


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an ``(H, W)`` uint8 (8-bit) or uint16 (16-bit) grayscale PNG."""
    p = _ensure_parent(path)
    _to_image(array, path).save(p, format="PNG")
    return p


def write_png16(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an ``(H, W)`` array as a 16-bit grayscale PNG (values cast to uint16; must be in 0..65535)."""
    arr = np.asarray(array)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DataError(f"write_png16({path}): values must lie in 0..65535, got [{arr.min()}, {arr.max()}]")
    return write_png(path, arr.astype(np.uint16))


def write_tiff(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an ``(H, W)`` uint8 or uint16 grayscale TIFF."""
    p = _ensure_parent(path)
    _to_image(array, path).save(p, format="TIFF")
    return p
