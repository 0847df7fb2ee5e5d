"""Read chest X-rays (DICOM, 8/16-bit PNG and TIFF, JPEG) as 8-bit grayscale.

Display pipeline for DICOM (PS3.3 C.11 order):

1. stored values -> **modality LUT**: ``RescaleSlope * x + RescaleIntercept`` (or a Modality LUT
   Sequence when present);
2. **VOI**: a VOI LUT Sequence when present (its output range ``[min(LUT), max(LUT)]`` -> [0, 1]),
   otherwise the first ``WindowCenter``/``WindowWidth`` pair with ``VOILUTFunction`` ``LINEAR``
   (default), ``LINEAR_EXACT`` or ``SIGMOID``; otherwise (or when the window is unusable, e.g.
   width 0) min-max over the image;
3. **MONOCHROME1** images (0 = white) are inverted so that the result always reads MONOCHROME2
   (bright bone, dark air);
4. quantised to uint8 0..255.

Multi-frame DICOMs (``NumberOfFrames > 1``) are rejected: a chest film is one frame.
PNG/TIFF/JPEG: 8-bit images are returned as they are (colour ones converted to luminance); 16-bit,
32-bit integer and float images are min-max normalised to 0..255 (a constant image becomes all 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfocus.errors import DataError

__all__ = ["read_image", "read_dicom", "is_dicom", "to_uint8"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


def is_dicom(path: str | os.PathLike) -> bool:
    """True when ``path`` has a DICOM suffix or starts with the Part-10 preamble + ``DICM`` magic."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max normalise any real array to uint8 0..255; a constant (or empty) array becomes zeros.

    Non-finite values are ignored for the range and mapped to 0.
    """
    a = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.where(finite, a, lo) - lo) * 255.0 / (hi - lo)
    # Round half up (not half-to-even) so mid-greys are reproducible across platforms.
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _unit_to_uint8(a: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 (clipped, rounded)."""
    return np.clip(np.floor(np.asarray(a, dtype=np.float64) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _first(value) -> float:
    """First value of a possibly multi-valued DICOM element (WindowCenter may hold several)."""
    try:
        return float(value[0])  # MultiValue / list
    except TypeError:
        return float(value)
    except IndexError:  # pragma: no cover - empty multi-value
        raise ValueError("empty value") from None


def _windowing(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    function = (function or "LINEAR").strip().upper()
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"WindowWidth must be > 0 for LINEAR_EXACT, got {width}")
        return np.clip((x - (center - width / 2.0)) / width, 0.0, 1.0)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"WindowWidth must be > 0 for SIGMOID, got {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function != "LINEAR":
        raise ValueError(f"unsupported VOILUTFunction {function!r}")
    if width < 1:
        raise ValueError(f"WindowWidth must be >= 1 for LINEAR, got {width}")
    # Piecewise linear with the standard's half-pixel offsets.
    lo = center - 0.5 - (width - 1) / 2.0
    hi = center - 0.5 + (width - 1) / 2.0
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else (x > center - 0.5).astype(np.float64)
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, y))


def _lut_values(item) -> tuple[np.ndarray, int, int]:
    """(lut, first_mapped, bits) of a VOI/Modality LUT sequence item."""
    desc = [int(v) for v in item.LUTDescriptor]
    n, first, bits = desc
    n = n or 65536
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        dtype = np.uint8 if bits <= 8 and len(data) == n else np.dtype("<u2")
        lut = np.frombuffer(bytes(data), dtype=dtype).astype(np.float64)
    else:
        lut = np.asarray(list(data) if not np.isscalar(data) else [data], dtype=np.float64)
    if lut.size < n:
        raise ValueError(f"LUTData has {lut.size} entries, descriptor says {n}")
    return lut[:n], first, bits


def _apply_lut(x: np.ndarray, lut: np.ndarray, first: int) -> np.ndarray:
    idx = np.clip(np.rint(x - first), 0, lut.size - 1).astype(np.int64)
    return lut[idx]


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a single-frame grayscale DICOM and apply modality LUT, VOI and MONOCHROME1 inversion.

    Returns:
        ``(img, (W, H))`` with ``img`` an ``(H, W)`` uint8 array (MONOCHROME2 sense).

    Raises:
        DataError: unreadable file, missing pixel data, multi-frame, compressed data without a
            decoder, or invalid VOI attributes — the message names the path and the reason.
    """
    import pydicom

    p = Path(path)
    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise DataError(f"{p}: cannot read DICOM ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{p}: DICOM has no pixel data (expected an image, e.g. a CXR in DX/CR storage)")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        raise DataError(f"{p}: multi-frame DICOM ({n_frames} frames); expected a single-frame radiograph")
    try:
        raw = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(
            f"{p}: cannot decode pixel data (transfer syntax {ts}; {type(exc).__name__}: {exc}). "
            "Compressed DICOMs need a decoder plugin, e.g. `pip install pylibjpeg pylibjpeg-openjpeg`."
        ) from exc

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if raw.ndim == 3 and raw.shape[-1] in (3, 4) and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # Colour DICOM (secondary capture): luminance, no VOI (VOI applies to grayscale only).
        rgb = raw[..., :3].astype(np.float64)
        if photometric.startswith("YBR"):
            lum = rgb[..., 0]
        else:
            lum = rgb @ np.array([0.299, 0.587, 0.114])
        img = to_uint8(lum)
        return img, (int(img.shape[1]), int(img.shape[0]))
    if raw.ndim != 2:
        raise DataError(f"{p}: expected a 2-D grayscale image, got pixel array of shape {raw.shape}")

    x = raw.astype(np.float64)
    try:
        # 1) modality LUT
        if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
            lut, first, _ = _lut_values(ds.ModalityLUTSequence[0])
            x = _apply_lut(x, lut, first)
        else:
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            x = x * slope + intercept
        # 2) VOI
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            lut, first, _bits = _lut_values(ds.VOILUTSequence[0])
            # The descriptor's bit depth is unreliable in practice (16 declared for 12-bit tables),
            # so the LUT's own output range [min, max] is mapped to 0..255.
            lo, hi = float(lut.min()), float(lut.max())
            v = _apply_lut(x, lut, first)
            unit = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
            img = _unit_to_uint8(unit)
        elif "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None and ds.WindowWidth is not None:
            func = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR")
            try:
                unit = _windowing(x, _first(ds.WindowCenter), _first(ds.WindowWidth), func)
                img = _unit_to_uint8(unit)
            except ValueError:
                # An unusable window (width 0, unknown function) is a header defect, not an
                # unreadable image: show the full range instead.
                img = to_uint8(x)
        else:
            img = to_uint8(x)
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{p}: invalid modality/VOI attributes ({exc})") from exc

    # 3) MONOCHROME1: 0 = white. Invert after VOI so the window is applied to the stored sense.
    if photometric == "MONOCHROME1":
        img = (255 - img).astype(np.uint8)
    return img, (int(img.shape[1]), int(img.shape[0]))


def _read_pil(p: Path) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        with Image.open(p) as im:
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            if n_frames > 1:
                raise DataError(f"{p}: multi-frame image ({n_frames} frames); expected a single radiograph")
            im.load()
            mode = im.mode
            if mode in ("L",):
                img = np.asarray(im, dtype=np.uint8).copy()
            elif mode in ("1", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
                if mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")
                img = np.asarray(im.convert("L"), dtype=np.uint8).copy()
            elif mode.startswith("I;16") or mode in ("I", "F"):
                arr = np.asarray(im)
                if arr.ndim != 2:
                    raise DataError(f"{p}: expected a 2-D grayscale image, got shape {arr.shape}")
                img = to_uint8(arr)
            else:
                raise DataError(f"{p}: unsupported image mode {mode!r}")
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{p}: image file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{p}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if img.ndim != 2:
        raise DataError(f"{p}: expected a 2-D grayscale image, got shape {img.shape}")
    return img, (int(img.shape[1]), int(img.shape[0]))


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a chest X-ray as 8-bit grayscale.

    Args:
        path: DICOM (``.dcm``/``.dicom`` or any file with the ``DICM`` magic), PNG (8/16-bit),
            TIFF (8/16-bit), or JPEG.

    Returns:
        ``(img, orig_size)``: ``img`` is an ``(H, W)`` uint8 array (0 = black, MONOCHROME2 sense) and
        ``orig_size = (W, H)`` the original size in pixels (equal to ``img``'s, which is never resized).

    Raises:
        DataError: the file is missing or cannot be read; the message names the path and reason.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: image file not found")
    if is_dicom(p):
        return read_dicom(p)
    return _read_pil(p)
