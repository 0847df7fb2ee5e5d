"""Size guard and file-type errors (issue 13, items 5 and 8): an image above the documented pixel limit
is refused from its header, before decoding (PNG bombs, huge DICOMs), with an error naming the file,
the size and how to raise the limit; random bytes named .dcm are "not a DICOM file"."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfocus.errors import DataError
from medfocus.io import read_image, write_dicom, write_png
from medfocus.io.reader import DEFAULT_MAX_PIXELS, max_pixels, read_image_size


def _png_claiming(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says ``w x h`` (8-bit gray) with one tiny compressed row: decoding it would
    allocate ``w * h`` bytes, reading its header costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def test_default_limit_is_documented_and_generous():
    assert DEFAULT_MAX_PIXELS == 60_000_000 and max_pixels() == DEFAULT_MAX_PIXELS
    assert 4300 * 4300 < DEFAULT_MAX_PIXELS  # the largest real chest films pass


def test_png_bomb_refused_from_header_without_allocating(tmp_path):
    p = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    assert read_image_size(p) == (20000, 20000)
    tracemalloc.start()
    with pytest.raises(DataError) as ei:
        read_image(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    msg = str(ei.value)
    assert "bomb.png" in msg and "20000 x 20000 = 400,000,000 pixels" in msg and "MEDFOCUS_MAX_PIXELS" in msg
    assert peak < 50 * 2**20  # nothing near the 400 MB a decode would take
    # above PIL's own bomb threshold (2 x 89 MP) the error is still ours, never a bare DecompressionBombError
    with pytest.raises(DataError, match="above the limit"):
        read_image(_png_claiming(tmp_path / "b2.png", 15000, 15000))


def test_dicom_claiming_huge_size_refused_before_decoding(tmp_path):
    p = write_dicom(tmp_path / "huge.dcm", np.zeros((16, 16), np.uint16))
    ds = pydicom.dcmread(p)
    ds.Rows, ds.Columns = 20000, 20000  # the header a 20000 x 20000 film would have
    ds.save_as(p)
    with pytest.raises(DataError, match=r"huge.dcm: image is 20000 x 20000 = 400,000,000 pixels, above the limit"):
        read_image(p)


def test_limit_overridable(tmp_path, monkeypatch):
    p = write_png(tmp_path / "small.png", np.zeros((40, 50), np.uint8))
    monkeypatch.setenv("MEDFOCUS_MAX_PIXELS", "1000")
    with pytest.raises(DataError, match=r"50 x 40 = 2,000 pixels, above the limit of 1,000"):
        read_image(p)
    monkeypatch.setenv("MEDFOCUS_MAX_PIXELS", "0")  # no limit
    assert read_image(p)[0].shape == (40, 50)
    monkeypatch.setenv("MEDFOCUS_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match=r"MEDFOCUS_MAX_PIXELS must be an integer.*'lots'"):
        read_image(p)


def test_random_bytes_named_dcm_are_not_a_dicom(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="x.dcm: not a DICOM file"):
        read_image(p)
    with pytest.raises(DataError, match="not a DICOM file"):
        read_image_size(p)
    empty = tmp_path / "e.dicom"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="e.dicom"):
        read_image(empty)
