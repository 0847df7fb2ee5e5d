"""Read chest X-rays (DICOM, 8/16-bit PNG and TIFF, JPEG) as 8-bit grayscale.

Display pipeline for DICOM (PS3.3 C.11 order):

0. **pixel padding** (PS3.3 C.7.5.1.1.2): stored values equal to ``PixelPaddingValue`` — or, when
   ``PixelPaddingRangeLimit`` is present, between the two inclusive — are padding, not image: they
   are left out of every automatic (min-max) range and rendered black in the result;
1. stored values -> **modality LUT**: ``RescaleSlope * x + RescaleIntercept`` (or a Modality LUT
   Sequence when present);
2. **VOI**: a VOI LUT Sequence when present (its output range ``[min(LUT), max(LUT)]`` -> [0, 1]),
   otherwise the first ``WindowCenter``/``WindowWidth`` pair with ``VOILUTFunction`` ``LINEAR``
   (default), ``LINEAR_EXACT`` or ``SIGMOID``; otherwise min-max over the (non-padding) image;
3. **MONOCHROME1** images (0 = white) are inverted so that the result always reads MONOCHROME2
   (bright bone, dark air);
4. quantised to uint8 0..255.

Numeric attributes as written in the wild (window centre/width, rescale slope/intercept, pixel
padding value and range limit, LUT descriptors): a multi-valued element gives its **first** value;
a string that pydicom could not parse is read by the same rule — the part before the first
backslash, with one decimal comma read as a point (``"15000,5"`` -> 15000.5). A value that is still
unusable (empty, not a number, non-finite, a zero rescale slope, a window width the VOI function
cannot use, a LUT descriptor that does not match its data) is never guessed: the reader issues a
:class:`~medfocus.errors.DataWarning` naming the file and the attribute and falls back to
**full-range min-max** over the non-padding pixels of the last usable stage (stored values when the
modality transform is unusable, modality values when the VOI is). An unusable padding attribute is
warned about and ignored (no pixel is treated as padding).

Compressed transfer syntaxes are decoded by pydicom's pylibjpeg plugins (``pylibjpeg`` with
``pylibjpeg-libjpeg`` for JPEG baseline/extended/lossless/JPEG-LS, ``pylibjpeg-openjpeg`` for
JPEG 2000 and HTJ2K, ``pylibjpeg-rle`` for RLE), installed with medfocus. When the decoder of a
file's syntax is missing, the error names the syntax and the package that decodes it; defects of
uncompressed files (truncated pixel data, missing pixel-module attributes) are reported as such.

Multi-frame DICOMs (``NumberOfFrames > 1``) are rejected: a chest film is one frame.

Size limit: an image above :func:`max_pixels` pixels (default 60 million, e.g. 7746 x 7746 -- real
chest films are at most about 4300 x 4300 = 18.5 MP; override with ``$MEDFOCUS_MAX_PIXELS``, ``0`` for
no limit) is refused with a :class:`~medfocus.errors.DataError` *before* its pixels are decoded: the size
comes from the header (DICOM ``Rows``/``Columns``, PIL's lazy header), so a decompression bomb or a
20000 x 20000 file never allocates gigabytes.
PNG/TIFF/JPEG: 8-bit images are returned as they are (colour ones converted to luminance); 16-bit,
32-bit integer and float images are min-max normalised to 0..255 (a constant image becomes all 0).

Frames and patient sides. Pixels are always returned **in the stored frame** (never flipped or rotated):
every box of the project (dataset ground truth, predictions) is ``(x1, y1, x2, y2)`` in that frame.
Which patient side lies on which image side is a separate piece of metadata, :class:`FilmOrientation`,
read from the header by :func:`read_orientation` (as :func:`read_image_size` reads the size):

* DICOM: ``PatientOrientation`` (0020,0020), PS3.3 C.7.6.1.1.1 -- two values, the patient direction of
  the image rows (increasing column index, toward the image's right) and of the columns (increasing row
  index, downward); the first letter of each value is its principal direction. The standard frontal
  display is ``L\\F`` (the patient's left on the image's right, feet down). A film stored mirrored
  (``R\\F``) keeps its pixels; its R/L markers and MedFocus' left/right concepts are named from the
  header (:mod:`medfocus.concepts.transfer`). :func:`read_dicom` warns (:class:`~medfocus.errors.DataWarning`
  naming the file and the value) when the header value is malformed, when the rows do not run
  left/right (a lateral view or a film rotated by 90 degrees: sides cannot be named) and when the
  columns run toward the head (an upside-down film).
* PNG/TIFF/JPEG, and a DICOM without the tag: no orientation is recorded; the standard display
  convention (``L\\F``) is assumed. A JPEG/PNG/TIFF whose EXIF ``Orientation`` tag is not 1 is read in
  its stored frame, which is *not* the frame image viewers show, with a DataWarning naming the file and
  the tag (:func:`read_image`): EXIF rotation is not applied because dataset boxes are defined on the
  stored pixel array (and :func:`read_image_size` reports the stored size).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfocus.errors import DataError, DataWarning

__all__ = ["read_image", "read_image_size", "read_dicom", "is_dicom", "to_uint8", "max_pixels", "DEFAULT_MAX_PIXELS",
           "FilmOrientation", "read_orientation", "CONVENTIONAL_ORIENTATION"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: Default pixel limit of :func:`read_image` (60 MP: generous for real chest films, ~18.5 MP at most).
DEFAULT_MAX_PIXELS = 60_000_000


def max_pixels() -> int | None:
    """The pixel limit in force: ``$MEDFOCUS_MAX_PIXELS`` (an integer; ``0`` = no limit) or
    :data:`DEFAULT_MAX_PIXELS`. Raises :class:`DataError` naming the variable when it is not an integer."""
    from medfocus.io.env import env_pixels

    return env_pixels("MEDFOCUS_MAX_PIXELS", DEFAULT_MAX_PIXELS, DataError, "no limit")


def _check_pixels(p: Path, w: int, h: int, limit: int | None) -> None:
    if limit is not None and w * h > limit:
        raise DataError(f"{p}: image is {w} x {h} = {w * h:,} pixels, above the limit of {limit:,} "
                        "(set $MEDFOCUS_MAX_PIXELS to a larger number, or 0 for no limit, if the image is genuine)")


def _has_dicm_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom(path: str | os.PathLike) -> bool:
    """True when ``path`` has a DICOM suffix or starts with the Part-10 preamble + ``DICM`` magic."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    return _has_dicm_magic(p)


def _not_dicom(p: Path, ds) -> bool:
    """A file named like a DICOM that is none: no Part-10 ``DICM`` marker and none of the elements an
    image dataset starts with (``force=True`` parses random bytes as an empty or junk dataset)."""
    if _has_dicm_magic(p):
        return False
    return not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "Columns", "PixelData", "StudyInstanceUID"))


def to_uint8(arr: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Min-max normalise any real array to uint8 0..255; a constant (or empty) array becomes zeros.

    Non-finite values, and those where the boolean mask ``valid`` (same shape) is False, are
    ignored for the range and mapped to 0.
    """
    a = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(a) if valid is None else np.isfinite(a) & np.asarray(valid, dtype=bool)
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


class _Unusable(Exception):
    """A present DICOM attribute whose value cannot be used; ``str(self)`` says which and why."""


# Required pixel-module attributes (PS3.3 C.7.6.3): without them the stored bytes cannot be laid out.
_PIXEL_MODULE = ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PhotometricInterpretation",
                 "PixelRepresentation")


def _parse_number(value, keyword: str) -> float:
    """First finite number of a DICOM element value, by the module's documented rule.

    ``MultiValue``/list -> its first item; ``bytes``/``str`` -> the part before the first backslash,
    with a single decimal comma read as a point. Raises :class:`_Unusable` otherwise.
    """
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", errors="replace")
    if value is None:
        raise _Unusable(f"{keyword} is empty")
    if not isinstance(value, str) and hasattr(value, "__len__"):  # MultiValue, list, tuple
        if len(value) == 0:
            raise _Unusable(f"{keyword} is empty")
        return _parse_number(value[0], keyword)
    if isinstance(value, str):
        text = value.replace("\x00", " ").split("\\")[0].strip()
        if not text:
            raise _Unusable(f"{keyword} is empty")
        if text.count(",") == 1 and "." not in text:
            text = text.replace(",", ".")
        try:
            number = float(text)
        except ValueError:
            raise _Unusable(f"{keyword} = {value!r} is not a number") from None
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _Unusable(f"{keyword} = {value!r} is not a number") from None
    if not math.isfinite(number):
        raise _Unusable(f"{keyword} = {value!r} is not finite")
    return number


def _element_value(ds, keyword: str):
    """Raw value of ``keyword`` in ``ds`` (``None`` when empty); pydicom's own parse warnings are
    replaced by ours, and an element pydicom refuses to convert is returned as its raw bytes."""
    from pydicom.datadict import tag_for_keyword

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ds[keyword].value
        except Exception:  # reading_validation_mode RAISE, or an undecodable raw value
            return getattr(ds.get_item(tag_for_keyword(keyword)), "value", None)


def _number_attr(ds, keyword: str) -> float | None:
    """``None`` when ``keyword`` is absent; its first value by :func:`_parse_number` otherwise."""
    if keyword not in ds:
        return None
    return _parse_number(_element_value(ds, keyword), keyword)


def _windowing(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]; raises :class:`_Unusable`."""
    function = (function or "LINEAR").strip().upper()
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise _Unusable(f"WindowWidth must be > 0 for LINEAR_EXACT, got {width}")
        return np.clip((x - (center - width / 2.0)) / width, 0.0, 1.0)
    if function == "SIGMOID":
        if width <= 0:
            raise _Unusable(f"WindowWidth must be > 0 for SIGMOID, got {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function != "LINEAR":
        raise _Unusable(f"VOILUTFunction {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    if width < 1:
        raise _Unusable(f"WindowWidth must be >= 1 for LINEAR, got {width}")
    # Piecewise linear with the standard's half-pixel offsets.
    lo = center - 0.5 - (width - 1) / 2.0
    hi = center - 0.5 + (width - 1) / 2.0
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else (x > center - 0.5).astype(np.float64)
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, y))


def _lut_values(item, name: str) -> tuple[np.ndarray, int]:
    """(lut, first_mapped) of a VOI/Modality LUT sequence item; raises :class:`_Unusable`."""
    if "LUTDescriptor" not in item or "LUTData" not in item:
        raise _Unusable(f"{name} item lacks LUTDescriptor or LUTData")
    desc = _element_value(item, "LUTDescriptor")
    if isinstance(desc, (bytes, bytearray)) and len(desc) == 6:
        desc = list(np.frombuffer(bytes(desc), dtype="<u2"))
    if isinstance(desc, str) or not hasattr(desc, "__len__") or len(desc) != 3:
        raise _Unusable(f"{name} LUTDescriptor = {desc!r} is not three numbers")
    n, first, bits = (_parse_number(v, f"{name} LUTDescriptor") for v in desc)
    if n != int(n) or first != int(first) or n < 0:
        raise _Unusable(f"{name} LUTDescriptor = {list(desc)!r} is not three integers")
    n, first, bits = int(n) or 65536, int(first), int(bits)
    data = _element_value(item, "LUTData")
    if isinstance(data, (bytes, bytearray)):
        dtype = np.uint8 if bits <= 8 and len(data) == n else np.dtype("<u2")
        lut = np.frombuffer(bytes(data)[: len(data) // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize],
                            dtype=dtype).astype(np.float64)
    elif data is None:
        raise _Unusable(f"{name} LUTData is empty")
    else:
        lut = np.asarray(list(data) if not np.isscalar(data) else [data], dtype=np.float64)
    if lut.size < n:
        raise _Unusable(f"{name} LUTData has {lut.size} entries, its LUTDescriptor says {n}")
    return lut[:n], first


def _apply_lut(x: np.ndarray, lut: np.ndarray, first: int) -> np.ndarray:
    idx = np.clip(np.rint(x - first), 0, lut.size - 1).astype(np.int64)
    return lut[idx]


def _padding_mask(ds, raw: np.ndarray, p: Path) -> np.ndarray:
    """Boolean ``(H, W)`` mask of padding pixels (PS3.3 C.7.5.1.1.2), in stored-value space."""
    try:
        value = _number_attr(ds, "PixelPaddingValue")
        limit = _number_attr(ds, "PixelPaddingRangeLimit")
    except _Unusable as exc:
        warnings.warn(f"{p}: {exc}; no pixel is treated as padding", DataWarning, stacklevel=4)
        return np.zeros(raw.shape, dtype=bool)
    if value is None:
        if limit is not None:
            warnings.warn(f"{p}: PixelPaddingRangeLimit without PixelPaddingValue; no pixel is treated as padding",
                          DataWarning, stacklevel=4)
        return np.zeros(raw.shape, dtype=bool)
    lo, hi = (value, value) if limit is None else (min(value, limit), max(value, limit))
    return (raw >= lo) & (raw <= hi)


def _decoder_advice(ts) -> str:
    """The pip packages that decode transfer syntax ``ts`` (pydicom's pylibjpeg plugin table)."""
    from pydicom.pixels.decoders.pylibjpeg import DECODER_DEPENDENCIES

    packages = DECODER_DEPENDENCIES.get(ts)
    if not packages:
        return "medfocus knows no installable decoder for it"
    return "install its decoder: pip install " + " ".join(f'"{pkg}"' for pkg in packages)


def _decode(ds, p: Path) -> np.ndarray:
    """``ds.pixel_array`` with errors that say what is wrong: missing decoder (syntax + package),
    undecodable compressed data, or a malformed uncompressed pixel module (no decoder advice)."""
    from pydicom.uid import UID

    missing = [kw for kw in _PIXEL_MODULE if kw not in ds or _element_value(ds, kw) in (None, "")]
    if missing:
        raise DataError(f"{p}: pixel module incomplete, missing required attribute(s) {', '.join(missing)} "
                        "(DICOM PS3.3 C.7.6.3)")
    ts = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    compressed = ts.is_compressed if ts.is_transfer_syntax else False
    if compressed:
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DataError(f"{p}: pixel data is compressed with transfer syntax {ts} ({ts.name}) and no installed "
                            f"decoder reads it; {_decoder_advice(ts)}")
    if not compressed and "PixelData" in ds:
        _check_uncompressed_length(ds, p)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arr = ds.pixel_array
        for w in caught:  # pydicom's own warnings, re-issued naming the file
            warnings.warn(f"{p}: {w.message}", DataWarning, stacklevel=3)
        return arr
    except Exception as exc:  # pydicom raises many types for broken pixel data
        if compressed:
            raise DataError(f"{p}: cannot decode the {ts.name} ({ts}) pixel data: the compressed stream is "
                            f"damaged or unsupported ({type(exc).__name__}: {exc})") from exc
        raise DataError(f"{p}: pixel data does not match the pixel module (truncated file or wrong "
                        f"Rows/Columns/BitsAllocated; transfer syntax {ts}): {exc}") from exc


def _check_uncompressed_length(ds, p: Path) -> None:
    """Refuse native (uncompressed) pixel data longer than the pixel module says (DICOM PS3.5 8.1.1).

    pydicom crops such data with a warning ("excess padding"), which would silently keep the first
    ``Rows`` rows of a film whose header understates its size; one trailing pad byte (odd length made
    even) is the only excess the standard allows. Too-short data is left to the decoder's own error.
    """
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits, spp = int(ds.BitsAllocated), int(ds.SamplesPerPixel)
        frames = int(_number_attr(ds, "NumberOfFrames") or 1)
    except (TypeError, ValueError, _Unusable):
        return  # malformed attributes: the decoder reports them
    n_bits = rows * cols * spp * frames * bits
    expected = (n_bits + 7) // 8
    got = len(ds.PixelData)
    if got > expected + (expected % 2) + 1:
        raise DataError(f"{p}: pixel data holds {got} bytes but Rows x Columns x SamplesPerPixel x BitsAllocated "
                        f"= {rows} x {cols} x {spp} x {bits} bits ({frames} frame(s)) needs {expected}: the header's "
                        "image size does not match the data (wrong Rows/Columns?)")


def _display(ds, raw: np.ndarray, pad: np.ndarray, p: Path) -> np.ndarray:
    """Stages 1-2 of the display pipeline -> uint8 (stored sense); see the module docstring."""
    valid = ~pad
    x = raw.astype(np.float64)

    def fallback(stage: np.ndarray, exc: Exception) -> np.ndarray:
        warnings.warn(f"{p}: {exc}; falling back to full-range min-max over the image", DataWarning, stacklevel=4)
        return to_uint8(stage, valid=valid)

    # 1) modality LUT
    try:
        if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
            lut, first = _lut_values(ds.ModalityLUTSequence[0], "ModalityLUTSequence")
            x = _apply_lut(x, lut, first)
        else:
            slope = _number_attr(ds, "RescaleSlope")
            intercept = _number_attr(ds, "RescaleIntercept")
            if slope == 0:
                raise _Unusable("RescaleSlope is 0 (every pixel would map to the intercept)")
            x = x * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    except _Unusable as exc:
        return fallback(x, exc)
    # 2) VOI
    try:
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            lut, first = _lut_values(ds.VOILUTSequence[0], "VOILUTSequence")
            # The descriptor's bit depth is unreliable in practice (16 declared for 12-bit tables),
            # so the LUT's own output range [min, max] is mapped to 0..255.
            lo, hi = float(lut.min()), float(lut.max())
            v = _apply_lut(x, lut, first)
            return _unit_to_uint8((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v))
        has_center, has_width = "WindowCenter" in ds, "WindowWidth" in ds
        if has_center or has_width:
            if not (has_center and has_width):
                raise _Unusable("WindowCenter without WindowWidth" if has_center else "WindowWidth without WindowCenter")
            center, width = _number_attr(ds, "WindowCenter"), _number_attr(ds, "WindowWidth")
            func = str(_element_value(ds, "VOILUTFunction") or "LINEAR") if "VOILUTFunction" in ds else "LINEAR"
            return _unit_to_uint8(_windowing(x, center, width, func))
    except _Unusable as exc:
        return fallback(x, exc)
    return to_uint8(x, valid=valid)


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


@dataclass(frozen=True)
class FilmOrientation:
    """Patient directions of a film's two image axes (DICOM ``PatientOrientation``, PS3.3 C.7.6.1.1.1).

    Attributes:
        row: principal patient direction of increasing column index (toward the image's right): one of
            ``"L", "R", "A", "P", "H", "F"``.
        column: principal patient direction of increasing row index (downward), same letters.
        from_header: ``True`` when read from the file's ``PatientOrientation``; ``False`` for the assumed
            display convention (PNG/JPEG/TIFF, or a DICOM without the tag).
        value: the header value as written (``"L\\F"``), ``""`` when none.
        path: the file it was read from (for messages), ``""`` when none.
    """

    row: str
    column: str
    from_header: bool = False
    value: str = ""
    path: str = ""

    @property
    def mirrored(self) -> bool:
        """The rows run toward the patient's right: the patient's right is on the image's right."""
        return self.row == "R"

    @property
    def sides_known(self) -> bool:
        """The rows run left/right, so the patient's left and right are the image's two sides."""
        return self.row in ("L", "R")

    @property
    def upside_down(self) -> bool:
        """The columns run toward the head (the top of the image is the patient's feet side)."""
        return self.column == "H"

    @property
    def markers(self) -> tuple[str, str]:
        """``(image-left, image-right)`` direction letters to draw on the film's sides (``("R", "L")`` for
        the standard ``L\\F`` display)."""
        return _OPPOSITE[self.row], self.row

    def describe(self) -> str:
        """One line for records and messages, e.g. ``"PatientOrientation R\\F (mirrored: ...)"``."""
        if not self.from_header:
            return "no PatientOrientation: display convention L\\F assumed (patient's left on the image's right)"
        what = ("patient's left on the image's right" if self.row == "L" else
                "mirrored: patient's right on the image's right" if self.row == "R" else
                "rows do not run left/right: patient sides cannot be named")
        return f"PatientOrientation {self.value} ({what}{'; upside down' if self.upside_down else ''})"


#: What a film without orientation metadata is taken to be: the standard frontal display ``L\\F``.
CONVENTIONAL_ORIENTATION = FilmOrientation("L", "F")


def _parse_orientation(ds, p: Path) -> tuple[FilmOrientation, str | None]:
    """``(orientation, problem)`` from a dataset's ``PatientOrientation``; ``problem`` is a message for a
    value that cannot be used (the convention is then assumed) or an orientation that needs a warning."""
    if "PatientOrientation" not in ds:
        return CONVENTIONAL_ORIENTATION, None
    raw = _element_value(ds, "PatientOrientation")
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("ascii", errors="replace")
    if raw is None or raw == "" or (not isinstance(raw, str) and hasattr(raw, "__len__") and len(raw) == 0):
        return CONVENTIONAL_ORIENTATION, None  # type 2C: present but empty is "not known"
    parts = raw.split("\\") if isinstance(raw, str) else [str(v) for v in raw]
    parts = [str(v).strip().upper() for v in parts]
    value = "\\".join(parts)
    ok = len(parts) == 2 and all(v and set(v) <= set(_OPPOSITE) for v in parts)
    if not ok:
        return CONVENTIONAL_ORIENTATION, (f"{p}: PatientOrientation = {value!r} is not two patient directions "
                                          "(letters A/P/R/L/H/F, e.g. L\\F); the display convention L\\F is assumed "
                                          "(patient's left on the image's right)")
    o = FilmOrientation(parts[0][0], parts[1][0], True, value, str(p))
    if o.row in ("H", "F") and o.column in ("H", "F") or o.row in ("L", "R") and o.column in ("L", "R") \
            or o.row in ("A", "P") and o.column in ("A", "P"):
        return CONVENTIONAL_ORIENTATION, (f"{p}: PatientOrientation = {value!r} names the same axis twice; the display "
                                          "convention L\\F is assumed (patient's left on the image's right)")
    problems = []
    if not o.sides_known:
        problems.append("its image rows do not run left/right (a lateral view, or a film rotated by 90 degrees): "
                        "R/L markers and MedFocus' left/right concepts cannot be placed on it")
    if o.upside_down:
        problems.append("its image columns run toward the head: the film is stored upside down; it is read as "
                        "stored (pixels and boxes in the stored frame) and anatomy transferred from upright "
                        "references is unreliable on it")
    return o, (f"{p}: PatientOrientation = {value!r}: " + "; ".join(problems)) if problems else None


def read_orientation(path: str | os.PathLike) -> FilmOrientation:
    """The patient directions of a film's image axes, from its header only (no pixel decoding).

    DICOM: ``PatientOrientation`` (see the module docstring); other formats and a DICOM without (or with an
    unusable) value: :data:`CONVENTIONAL_ORIENTATION` (``L\\F``, ``from_header=False``). Warnings about the
    value are issued by :func:`read_image`, which every film passes through first; this function is silent.

    Raises:
        DataError: missing or unreadable file.
    """
    p = Path(path)
    _check_file(p)
    if not is_dicom(p):
        return CONVENTIONAL_ORIENTATION
    import pydicom

    try:
        ds = pydicom.dcmread(p, force=True, stop_before_pixels=True, specific_tags=["PatientOrientation"])
    except Exception as exc:  # pydicom raises many types for broken files
        raise DataError(f"{p}: cannot read DICOM header ({type(exc).__name__}: {exc})") from exc
    return _parse_orientation(ds, p)[0]


#: DICOM Modality codes of projection radiographs (PS3.3 C.7.3.1.1.1): computed radiography, digital
#: radiography, radiographic imaging (conventional film/screen).
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")
#: BodyPartExamined values (PS3.16 CID 4031, and the free text sites write) that name the chest.
_CHEST_PARTS = ("CHEST", "THORAX", "LUNG")


def not_a_chest_radiograph(ds: Any) -> str | None:
    """What in a DICOM header says the film is not a chest radiograph (``"Modality NM, BodyPartExamined
    'WHOLE BODY'"``), or ``None``. Only a value that is present counts: anonymised exports often drop both
    attributes, and their absence says nothing."""
    problems = []
    modality = str(_element_value(ds, "Modality") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        problems.append(f"Modality {modality}")
    part = str(_element_value(ds, "BodyPartExamined") or "").strip()
    if part and not any(k in part.upper() for k in _CHEST_PARTS):
        problems.append(f"BodyPartExamined {part!r}")
    return ", ".join(problems) or None


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a single-frame grayscale DICOM: padding, modality LUT, VOI and MONOCHROME1 inversion.

    Returns:
        ``(img, (W, H))`` with ``img`` an ``(H, W)`` uint8 array (MONOCHROME2 sense; padding pixels 0).

    Raises:
        DataError: unreadable file, missing pixel data or pixel-module attributes, multi-frame,
            truncated pixel data, or compressed data whose decoder is not installed (the message
            names the transfer syntax and the package that decodes it) — always naming the path.

    Warns:
        DataWarning: a numeric display attribute is unusable and the documented fallback was used
            (see the module docstring); the header says the film is not a chest radiograph
            (:func:`not_a_chest_radiograph`: another Modality or body part).
    """
    import pydicom

    p = Path(path)
    try:
        ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise DataError(f"{p}: cannot read DICOM ({type(exc).__name__}: {exc})") from exc
    if _not_dicom(p, ds):
        raise DataError(f"{p}: not a DICOM file (no 'DICM' marker and no DICOM image attributes)")
    w, h = _number_or_none(ds, "Columns"), _number_or_none(ds, "Rows")
    if w is not None and h is not None:
        _check_pixels(p, int(w), int(h), max_pixels())  # from the header, before the pixels are read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(p, force=True)
        except Exception as exc:  # pydicom raises many types for broken files
            raise DataError(f"{p}: cannot read DICOM ({type(exc).__name__}: {exc})") from exc
    read_problems = [str(w.message) for w in caught]
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if read_problems:  # pydicom dropped an element it could not finish reading: the file was cut short
            raise DataError(f"{p}: truncated or damaged file: the pixel data element could not be read to its end "
                            f"({read_problems[0]})")
        raise DataError(f"{p}: DICOM has no pixel data (expected an image, e.g. a CXR in DX/CR storage)")
    for msg in read_problems:  # never a bare library warning: name the file
        warnings.warn(f"{p}: {msg}", DataWarning, stacklevel=2)
    orientation_problem = _parse_orientation(ds, p)[1]
    if orientation_problem:
        warnings.warn(orientation_problem, DataWarning, stacklevel=3)
    not_chest = not_a_chest_radiograph(ds)
    if not_chest:
        warnings.warn(f"{p}: {not_chest}, not a chest radiograph (expected Modality {'/'.join(RADIOGRAPH_MODALITIES)} and "
                      f"BodyPartExamined CHEST): a chest-film model's answer and every attribution map on it say nothing "
                      "about a chest X-ray", DataWarning, stacklevel=2)
    try:
        n_frames = int(_number_attr(ds, "NumberOfFrames") or 1)
    except _Unusable as exc:
        raise DataError(f"{p}: {exc}") from exc
    if n_frames > 1:
        raise DataError(f"{p}: multi-frame DICOM ({n_frames} frames); expected a single-frame radiograph")
    raw = _decode(ds, p)

    photometric = str(ds.PhotometricInterpretation).strip().upper()
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
    if photometric == "PALETTE COLOR":
        # Stored values are indices into the palette (PS3.3 C.7.6.3.1.2): display what they index.
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(raw, ds).astype(np.float64)
        except Exception as exc:  # missing or malformed palette descriptors / data
            raise DataError(f"{p}: PhotometricInterpretation is PALETTE COLOR but its palette cannot be applied "
                            f"({type(exc).__name__}: {exc})") from exc
        img = to_uint8(rgb @ np.array([0.299, 0.587, 0.114]))
        return img, (int(img.shape[1]), int(img.shape[0]))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{p}: PhotometricInterpretation {photometric!r} needs 3 samples per pixel but the pixel data "
                        f"has 1 (SamplesPerPixel {_element_value(ds, 'SamplesPerPixel')}); expected MONOCHROME1/2 for a "
                        "grayscale radiograph")

    pad = _padding_mask(ds, raw, p)
    try:
        img = _display(ds, raw, pad, p)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a malformed LUT sequence item, say
        raise DataError(f"{p}: invalid modality/VOI attributes ({type(exc).__name__}: {exc})") from exc
    # 3) MONOCHROME1: 0 = white. Invert after VOI so the window is applied to the stored sense.
    if photometric == "MONOCHROME1":
        img = (255 - img).astype(np.uint8)
    img[pad] = 0  # padding is not anatomy: black in the displayed (MONOCHROME2) sense
    return img, (int(img.shape[1]), int(img.shape[0]))


def _number_or_none(ds, keyword: str) -> float | None:
    try:
        return _number_attr(ds, keyword)
    except _Unusable:
        return None


def _check_file(p: Path) -> None:
    """A readable, non-empty file (an empty one is said to be empty, not "not a DICOM/image file")."""
    if not p.is_file():
        raise DataError(f"{p}: image file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file (0 bytes); expected an image (DICOM, PNG, JPEG, TIFF)")


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Original ``(W, H)`` of an image from its header only (no pixel decoding).

    DICOM: ``Columns``/``Rows`` read with ``stop_before_pixels``; other formats: PIL's lazy header.

    Raises:
        DataError: missing or unreadable file, or a DICOM without ``Rows``/``Columns``.
    """
    p = Path(path)
    _check_file(p)
    if is_dicom(p):
        import pydicom

        try:
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
            if _not_dicom(p, ds):
                raise DataError(f"{p}: not a DICOM file (no 'DICM' marker and no DICOM image attributes)")
            w, h = _number_attr(ds, "Columns"), _number_attr(ds, "Rows")
        except DataError:
            raise
        except _Unusable as exc:
            raise DataError(f"{p}: {exc}") from exc
        except Exception as exc:  # pydicom raises many types for broken files
            raise DataError(f"{p}: cannot read DICOM header ({type(exc).__name__}: {exc})") from exc
        if w is None or h is None or w < 1 or h < 1:
            raise DataError(f"{p}: DICOM header lacks positive Rows/Columns (got {h!r}/{w!r})")
        return int(w), int(h)
    try:
        with _pil_limit(None), Image.open(p) as im:  # a size query decodes nothing: no bomb check needed
            return int(im.size[0]), int(im.size[1])
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{p}: cannot read image header ({type(exc).__name__}: {exc})") from exc


class _pil_limit:
    """Temporarily give PIL our pixel limit (its own bomb check would otherwise fire at 2 x 89 MP with a
    bare ``DecompressionBombError``, or warn at 89 MP, whatever limit the user set)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        self.saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = self.limit

    def __exit__(self, *exc: object) -> None:
        Image.MAX_IMAGE_PIXELS = self.saved


#: EXIF Orientation (tag 0x0112) values -> what a viewer does to the stored pixels to display them.
_EXIF_ORIENTATION = {2: "mirrors it left-right", 3: "rotates it by 180 degrees", 4: "mirrors it top-bottom",
                     5: "transposes it (mirror + rotation by 90 degrees)", 6: "rotates it by 90 degrees clockwise",
                     7: "transverses it (mirror + rotation by 270 degrees)", 8: "rotates it by 90 degrees counter-clockwise"}


def _warn_exif_orientation(im: Image.Image, p: Path) -> None:
    """DataWarning for an EXIF Orientation other than 1: the film is read in its stored frame (module docstring)."""
    try:
        value = im.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: nothing a viewer would apply either
        return
    if value in (None, 1, 0):
        return
    what = _EXIF_ORIENTATION.get(int(value) if isinstance(value, int) else -1, "applies an unknown transform")
    w, h = im.size
    warnings.warn(f"{p}: EXIF Orientation = {value}: image viewers show this film transformed (the viewer {what}), "
                  f"but medfocus reads pixels and boxes in the stored frame ({w} x {h} px, rows top to bottom as "
                  "stored); boxes drawn on the displayed image are in another frame, and R/L markers assume the "
                  "stored frame is the standard display. Re-save the file without the tag (e.g. PIL "
                  "ImageOps.exif_transpose) if its boxes were drawn as displayed.", DataWarning, stacklevel=4)


def _read_pil(p: Path) -> tuple[np.ndarray, tuple[int, int]]:
    limit = max_pixels()
    try:
        with _pil_limit(None), Image.open(p) as im:  # the header only: nothing decoded yet
            _check_pixels(p, int(im.size[0]), int(im.size[1]), limit)
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            if n_frames > 1:
                raise DataError(f"{p}: multi-frame image ({n_frames} frames); expected a single radiograph")
            _warn_exif_orientation(im, p)
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
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
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
        DataError: the file is missing or cannot be read, or has more pixels than :func:`max_pixels`
            (checked from the header, before decoding); the message names the path and reason.
    """
    p = Path(path)
    _check_file(p)
    if is_dicom(p):
        return read_dicom(p)
    return _read_pil(p)
