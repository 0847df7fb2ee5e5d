"""Image I/O: DICOM display pipeline, PNG/TIFF 8/16-bit, JPEG, errors — all with known answers."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from medfocus.errors import DataError, DataWarning
from medfocus.io import is_dicom, read_image, to_uint8, write_dicom, write_png, write_png16, write_tiff


def test_dicom_file_is_a_real_part10_file(tmp_path):
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    p = write_dicom(tmp_path / "x.dicom", arr, PatientID="P7", BitsStored=12)
    raw = p.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(p)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PatientID == "P7" and ds.BitsStored == 12 and ds.HighBit == 11
    assert ds.Rows == 3 and ds.Columns == 4
    np.testing.assert_array_equal(ds.pixel_array, arr)
    # Caller-chosen UIDs (deterministic fixtures) are mirrored into the file meta.
    q = write_dicom(tmp_path / "y.dcm", arr, SOPInstanceUID="1.2.3.4.5")
    assert pydicom.dcmread(q).file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"


def test_dicom_minmax_without_voi(tmp_path):
    arr = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    img, size = read_image(write_dicom(tmp_path / "a.dcm", arr))
    assert size == (2, 2) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, [[0, 64], [128, 255]])


def test_dicom_linear_window_is_identity_for_full_8bit_window(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img, size = read_image(write_dicom(tmp_path / "w.dcm", arr, WindowCenter=128, WindowWidth=256))
    assert size == (16, 16)
    np.testing.assert_array_equal(img, arr)


def test_dicom_rescale_then_linear_exact_window(tmp_path):
    # x = 2 * raw - 100; window [0, 200] -> 0..1
    raw = np.array([[10, 50, 100, 150, 200]], dtype=np.uint16)
    p = write_dicom(
        tmp_path / "r.dcm", raw, RescaleSlope=2, RescaleIntercept=-100,
        WindowCenter=100, WindowWidth=200, VOILUTFunction="LINEAR_EXACT",
    )
    img, size = read_image(p)
    assert size == (5, 1)
    np.testing.assert_array_equal(img, [[0, 0, 128, 255, 255]])


def test_dicom_multivalued_window_uses_first(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img, _ = read_image(write_dicom(tmp_path / "m.dcm", arr, WindowCenter=[128, 50], WindowWidth=[256, 10]))
    np.testing.assert_array_equal(img, arr)


def test_dicom_sigmoid_window_centre_is_mid_grey(tmp_path):
    arr = np.array([[0, 1000, 2000]], dtype=np.uint16)
    img, _ = read_image(write_dicom(tmp_path / "s.dcm", arr, WindowCenter=1000, WindowWidth=400, VOILUTFunction="SIGMOID"))
    assert img[0, 0] == 0 and img[0, 2] == 255 and abs(int(img[0, 1]) - 128) <= 1


def test_dicom_unusable_window_falls_back_to_minmax(tmp_path):
    arr = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    for kw in ({"WindowCenter": 100, "WindowWidth": 0}, {"WindowCenter": 100, "WindowWidth": 50, "VOILUTFunction": "CUBIC"}):
        with pytest.warns(DataWarning, match=r"bw\.dcm: .*full-range min-max"):
            img, _ = read_image(write_dicom(tmp_path / "bw.dcm", arr, **kw))
        np.testing.assert_array_equal(img, [[0, 64], [128, 255]])


def test_dicom_voi_lut_sequence_takes_precedence_over_window(tmp_path):
    raw = np.array([[5, 10, 11, 12, 13, 20]], dtype=np.uint16)
    lut = np.array([0, 100, 300, 400], dtype=np.uint16)
    p = write_dicom(tmp_path / "l.dcm", raw, voi_lut=lut, voi_lut_first=10, voi_lut_bits=16, WindowCenter=3, WindowWidth=2)
    img, _ = read_image(p)
    np.testing.assert_array_equal(img, [[0, 0, 64, 191, 255, 255]])


def test_dicom_monochrome1_is_inverted(tmp_path):
    arr = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    img, _ = read_image(write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(img, 255 - np.array([[0, 64], [128, 255]]))
    # With a window too: inversion happens after VOI.
    a8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img, _ = read_image(write_dicom(tmp_path / "m1w.dcm", a8, photometric="MONOCHROME1", WindowCenter=128, WindowWidth=256))
    np.testing.assert_array_equal(img, 255 - a8)


def test_dicom_signed_pixels_with_intercept(tmp_path):
    raw = np.array([[-1000, 0, 1000]], dtype=np.int16)
    img, _ = read_image(write_dicom(tmp_path / "s16.dcm", raw, RescaleIntercept=-1024))
    np.testing.assert_array_equal(img, [[0, 128, 255]])


@pytest.mark.parametrize("compression", ["rle", "jpeg2000"])
def test_compressed_dicom_reads_like_uncompressed(tmp_path, compression):
    arr = (np.arange(48 * 64).reshape(48, 64) * 13 % 4096).astype(np.uint16)
    ref, _ = read_image(write_dicom(tmp_path / "u.dcm", arr, BitsStored=12, WindowCenter=2048, WindowWidth=4096))
    p = write_dicom(tmp_path / "c.dcm", arr, BitsStored=12, WindowCenter=2048, WindowWidth=4096, compression=compression)
    assert pydicom.dcmread(p).file_meta.TransferSyntaxUID.is_compressed
    img, size = read_image(p)
    assert size == (64, 48)
    np.testing.assert_array_equal(img, ref)


def test_dicom_multiframe_is_an_error(tmp_path):
    arr = np.zeros((2, 4, 4), dtype=np.uint16)
    p = write_dicom(tmp_path / "mf.dcm", arr)
    with pytest.raises(DataError, match="multi-frame"):
        read_image(p)


def test_dicom_detected_by_magic_without_suffix(tmp_path):
    arr = np.array([[0, 255]], dtype=np.uint8)
    p = write_dicom(tmp_path / "noext.dcm", arr)
    q = tmp_path / "IM0001"
    q.write_bytes(p.read_bytes())
    assert is_dicom(q)
    img, size = read_image(q)
    np.testing.assert_array_equal(img, [[0, 255]])
    assert size == (2, 1)


def test_dicom_without_pixels_and_garbage_are_errors(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = "X"
    p = tmp_path / "nopix.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(DataError, match="no pixel data") as ei:
        read_image(p)
    assert str(p) in str(ei.value)

    g = tmp_path / "garbage.dicom"
    g.write_bytes(b"\x00\x01not a dicom at all" * 3)
    with pytest.raises(DataError, match="garbage.dicom"):
        read_image(g)


def test_png8_is_returned_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(7, 9), dtype=np.uint8)
    img, size = read_image(write_png(tmp_path / "a.png", arr))
    assert size == (9, 7)
    np.testing.assert_array_equal(img, arr)


def test_png16_and_tiff16_are_minmax_normalised(tmp_path):
    arr = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    expected = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    p = write_png16(tmp_path / "a16.png", arr)
    assert Image.open(p).mode.startswith("I")  # genuinely 16-bit on disk
    img, size = read_image(p)
    np.testing.assert_array_equal(img, expected)
    assert size == (2, 2)
    img, _ = read_image(write_tiff(tmp_path / "a16.tif", arr))
    np.testing.assert_array_equal(img, expected)
    img, _ = read_image(write_tiff(tmp_path / "a8.tiff", expected))
    np.testing.assert_array_equal(img, expected)


def test_constant_16bit_image_reads_as_zeros(tmp_path):
    img, _ = read_image(write_png16(tmp_path / "c.png", np.full((3, 3), 777, dtype=np.uint16)))
    assert img.dtype == np.uint8 and not img.any()


def test_rgb_png_and_jpeg(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red -> luminance 76
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img, _ = read_image(tmp_path / "rgb.png")
    assert img.shape == (8, 8) and abs(int(img[0, 0]) - 76) <= 1

    gray = np.zeros((32, 48), dtype=np.uint8)
    gray[:, 24:] = 200
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    img, size = read_image(tmp_path / "g.jpg")
    assert size == (48, 32)
    assert np.abs(img[:, :20].astype(int) - 0).max() <= 4
    assert np.abs(img[:, 28:].astype(int) - 200).max() <= 4


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="bad.png"):
        read_image(bad)


def test_multiframe_tiff_is_an_error(tmp_path):
    frames = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (0, 255)]
    p = tmp_path / "mf.tif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match="multi-frame"):
        read_image(p)


def test_to_uint8_edge_cases():
    assert not to_uint8(np.full((2, 2), 5.0)).any()
    out = to_uint8(np.array([np.nan, 0.0, 1.0, np.inf]))
    np.testing.assert_array_equal(out, [0, 0, 255, 0])
    assert to_uint8(np.array([np.nan])).tolist() == [0]


def test_write_png16_rejects_out_of_range(tmp_path):
    with pytest.raises(DataError, match="0..65535"):
        write_png16(tmp_path / "x.png", np.array([[70000]]))


def test_dicom_modality_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset

    p = write_dicom(tmp_path / "mlut.dcm", np.array([[0, 1, 2, 3]], dtype=np.uint16))
    ds = pydicom.dcmread(p)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])
    item.add_new(0x00283006, "US", [0, 10, 20, 1000])
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    ds.save_as(p, enforce_file_format=True)
    img, _ = read_image(p)
    np.testing.assert_array_equal(img, [[0, 3, 5, 255]])  # LUT output 0, 10, 20, 1000 min-max scaled
