"""DICOM files as found in the wild (issue 12): numeric attributes stored as raw strings, pixel
padding, compressed transfer syntaxes and their decoders — each kind with a table of known answers.

Quirky variants are written to ``tmp_path`` from the real films in ``../shared/data/real_cxr/dicom``
(never copied into the repository) or from small synthetic arrays whose display values are known.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from medfocus.errors import DataError, DataWarning
from medfocus.io import read_image, read_image_size, to_uint8, write_dicom


def _raw(ds, keyword: str, value: bytes, vr: str = "DS") -> None:
    """Store ``value`` byte for byte (as a non-conforming writer would), bypassing pydicom's checks."""
    if len(value) % 2:
        value += b" "
    tag = Tag(tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _read_quiet(path):
    """``read_image`` that fails the test on any DataWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return read_image(path)


def _read_not_chest(path, what: str):
    """``read_image`` whose only DataWarning says the header names no chest radiograph (``what``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = read_image(path)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(msgs) == 1 and msgs[0].startswith(f"{path}: {what}, not a chest radiograph"), msgs
    return out


def test_a_header_that_names_no_chest_radiograph_warns(films, tmp_path):
    """The nuclear-medicine whole-body scan warns naming its Modality and body part; the real CR chest film
    and a DX without BodyPartExamined (anonymised exports drop it) read quietly; 'Thorax' is the chest."""
    _read_not_chest(films / "JPEG-LL.dcm", "Modality NM, BodyPartExamined 'WHOLE BODY'")
    _read_quiet(films / "RG1_UNCR.dcm")
    arr = np.random.default_rng(0).integers(0, 4096, (64, 48)).astype(np.uint16)
    _read_quiet(write_dicom(tmp_path / "dx.dcm", arr))

    def with_part(part):
        def edit(ds):
            ds.BodyPartExamined = part
        return edit

    _read_quiet(_variant(films, tmp_path, "thorax.dcm", with_part("Thorax")))
    _read_not_chest(_variant(films, tmp_path, "knee.dcm", with_part("KNEE")), "BodyPartExamined 'KNEE'")


@pytest.fixture(scope="module")
def films(shared_data):
    d = shared_data / "real_cxr" / "dicom"
    if not (d / "RG1_UNCR.dcm").is_file():
        pytest.skip(f"real DICOM films not found in {d}")
    return d


def _variant(films, tmp_path, name, edit, src="RG1_UNCR.dcm"):
    ds = pydicom.dcmread(films / src)
    edit(ds)
    out = tmp_path / name
    ds.save_as(out)
    return out


def _read_quirky(tmp_path, arr, raw_values: dict, unusable: bool, **tags) -> np.ndarray:
    """Write ``arr`` with ``tags``, overwrite ``raw_values`` byte for byte, read it back. ``unusable``:
    the read must warn naming the file and one of the attributes, and give min-max of the stored values."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "src.dcm", arr, **tags))
    for keyword, value in raw_values.items():
        _raw(ds, keyword, value)
    ds.save_as(tmp_path / "q.dcm")
    if not unusable:
        return _read_quiet(tmp_path / "q.dcm")[0]
    names = "|".join(raw_values)
    with pytest.warns(DataWarning, match=rf"q\.dcm: .*({names}).*full-range min-max"):
        img, _ = read_image(tmp_path / "q.dcm")
    np.testing.assert_array_equal(img, to_uint8(arr))
    return img


# ---- 1. numeric attributes stored as raw strings ----------------------------------------------------

def test_decimal_comma_window_on_the_real_film_is_the_window_not_black(films, tmp_path):
    """The issue's input: WindowCenter "15000,5" / WindowWidth "29999,5" read as 15000.5 / 29999.5."""
    def quirky(ds):
        _raw(ds, "WindowCenter", b"15000,5")
        _raw(ds, "WindowWidth", b"29999,5")

    def proper(ds):
        ds.WindowCenter, ds.WindowWidth = 15000.5, 29999.5

    got, size = _read_quiet(_variant(films, tmp_path, "comma.dcm", quirky))
    want, _ = _read_quiet(_variant(films, tmp_path, "proper.dcm", proper))
    assert size == (1841, 1955)
    np.testing.assert_array_equal(got, want)
    assert 150 < got.mean() < 230  # a CR chest film in its window, not an all-black image


# (raw bytes written for WindowCenter, WindowWidth) -> the (centre, width) they must mean; None = unusable.
WINDOW_TABLE = [
    (b"128", b"256", (128, 256)),
    (b"128,0", b"256,0", (128, 256)),            # decimal comma
    (b" 127,5 ", b"255,5", (127.5, 255.5)),      # decimal comma with padding blanks
    (b"128\\50", b"256\\10", (128, 256)),        # multi-valued: the first pair
    (b"128,5\\50,5", b"256\\10", (128.5, 256)),  # multi-valued with decimal commas
    (b"1.28E2", b"2.56e+02", (128, 256)),        # exponent notation
    (b"", b"256", None),                         # empty
    (b"NaN", b"256", None),                      # non-finite
    (b"128", b"inf", None),
    (b"centre", b"256", None),                   # not a number
    (b"1,2,8", b"256", None),                    # ambiguous commas
    (b"128", b"0", None),                        # width the LINEAR function cannot use
]


@pytest.mark.parametrize("center,width,meaning", WINDOW_TABLE)
def test_window_attribute_dialects(tmp_path, center, width, meaning):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16) * 0 + np.arange(256, dtype=np.uint16).reshape(16, 16)
    arr = (arr * 4).astype(np.uint16)  # 0..1020: a window of 128/256 clips, min-max does not
    img = _read_quirky(tmp_path, arr, {"WindowCenter": center, "WindowWidth": width}, meaning is None)
    if meaning is None:
        return
    want, _ = _read_quiet(write_dicom(tmp_path / "want.dcm", arr, WindowCenter=meaning[0], WindowWidth=meaning[1]))
    np.testing.assert_array_equal(img, want)
    assert img.max() == 255 and img.min() == 0 and (img == 255).sum() > 100  # the window clipped


# (slope bytes, intercept bytes) -> (slope, intercept) or None (unusable -> min-max of stored values)
RESCALE_TABLE = [
    (b"2,0", b"-100,0", (2.0, -100.0)),
    (b"2\\3", b"-100\\7", (2.0, -100.0)),
    (b"0,5", b"0", (0.5, 0.0)),
    (b"", b"-100", None),
    (b"0", b"-100", None),        # a zero slope maps every pixel to the intercept
    (b"2", b"-Infinity", None),
]


@pytest.mark.parametrize("slope,intercept,meaning", RESCALE_TABLE)
def test_rescale_attribute_dialects(tmp_path, slope, intercept, meaning):
    # x = 2 * raw - 100 with window [0, 200] (LINEAR_EXACT) -> known values.
    raw_px = np.array([[10, 50, 100, 150, 200]], dtype=np.uint16)
    img = _read_quirky(tmp_path, raw_px, {"RescaleSlope": slope, "RescaleIntercept": intercept}, meaning is None,
                       WindowCenter=100, WindowWidth=200, VOILUTFunction="LINEAR_EXACT")
    if meaning is None:
        return
    s, b = meaning
    want = np.clip(np.floor(np.clip(((raw_px * s + b) - 0.0) / 200.0, 0, 1) * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(img, want.astype(np.uint8))


def test_lut_descriptor_dialects(tmp_path):
    from pydicom.dataset import Dataset

    p = write_dicom(tmp_path / "mlut.dcm", np.array([[0, 1, 2, 3]], dtype=np.uint16))
    ds = pydicom.dcmread(p)
    item = Dataset()
    _raw(item, "LUTDescriptor", b"4\\0,0\\16")  # written as decimal strings, one with a comma
    item.add_new(0x00283006, "US", [0, 10, 20, 1000])
    ds.ModalityLUTSequence = [item]
    ds.save_as(p, enforce_file_format=True)
    img, _ = _read_quiet(p)
    np.testing.assert_array_equal(img, [[0, 3, 5, 255]])

    # A descriptor promising more entries than the data holds: warned, min-max of the stored values.
    item.add_new(0x00283002, "US", [8, 0, 16])
    ds.ModalityLUTSequence = [item]
    ds.save_as(p, enforce_file_format=True)
    with pytest.warns(DataWarning, match=r"mlut\.dcm: ModalityLUTSequence LUTData has 4 entries.*min-max"):
        img, _ = read_image(p)
    np.testing.assert_array_equal(img, [[0, 85, 170, 255]])


# ---- 2. pixel padding --------------------------------------------------------------------------------

# (stored values, photometric, padding tags) -> displayed values (padding black, excluded from the range)
PADDING_TABLE = [
    ([[5, 10, 20, 999]], "MONOCHROME2", {"PixelPaddingValue": 999}, [[0, 85, 255, 0]]),
    ([[5, 10, 20, 999]], "MONOCHROME1", {"PixelPaddingValue": 999}, [[255, 170, 0, 0]]),
    ([[5, 10, 20, 900, 999]], "MONOCHROME2", {"PixelPaddingValue": 999, "PixelPaddingRangeLimit": 900},
     [[0, 85, 255, 0, 0]]),
    ([[5, 10, 20, 900, 999]], "MONOCHROME2", {"PixelPaddingValue": 900, "PixelPaddingRangeLimit": 999},
     [[0, 85, 255, 0, 0]]),
    ([[5, 10, 20]], "MONOCHROME2", {"PixelPaddingValue": 999}, [[0, 85, 255]]),  # no padding present
    ([[0, 100], [200, 400]], "MONOCHROME2", {}, [[0, 64], [128, 255]]),        # no padding attribute
    # With a window the range is explicit, but padding is still black.
    ([[0, 64, 128, 999]], "MONOCHROME2", {"PixelPaddingValue": 999, "WindowCenter": 128, "WindowWidth": 256},
     [[0, 64, 128, 0]]),
]


@pytest.mark.parametrize("stored,photometric,tags,want", PADDING_TABLE)
def test_pixel_padding_is_excluded_and_black(tmp_path, stored, photometric, tags, want):
    p = write_dicom(tmp_path / "pad.dcm", np.array(stored, dtype=np.uint16), photometric, **tags)
    img, _ = _read_quiet(p)
    np.testing.assert_array_equal(img, want)


def test_padded_real_film_keeps_its_full_grey_range(films, tmp_path):
    """The issue's input: the RG1 film without a window, border set to PixelPaddingValue 32767."""
    ds = pydicom.dcmread(films / "RG1_UNCR.dcm")
    stored = ds.pixel_array.copy()
    border = np.zeros(stored.shape, dtype=bool)
    border[:60], border[-60:], border[:, :45], border[:, -45:] = True, True, True, True
    stored[border] = 32767

    def edit(d):
        del d.WindowCenter, d.WindowWidth
        d.add_new(0x00280120, "US", 32767)  # PixelPaddingValue (US or SS: unsigned pixels)
        d.PixelData = stored.astype("<u2").tobytes()

    img, _ = _read_quiet(_variant(films, tmp_path, "pad.dcm", edit))
    assert (img[border] == 0).all()
    inner = ~border
    want = 255 - to_uint8(np.where(inner, stored, 0).astype(np.float64), valid=inner)  # MONOCHROME1
    np.testing.assert_array_equal(img[inner], want[inner])
    assert img[inner].min() == 0 and img[inner].max() == 255  # not washed out into 65..255


def test_unusable_padding_value_is_warned_and_ignored(tmp_path):
    p = write_dicom(tmp_path / "src.dcm", np.array([[5, 10, 20, 999]], dtype=np.uint16))
    ds = pydicom.dcmread(p)
    _raw(ds, "PixelPaddingValue", b"n/a", vr="DS")
    ds.save_as(tmp_path / "q.dcm")
    with pytest.warns(DataWarning, match=r"q\.dcm: PixelPaddingValue = 'n/a' is not a number; no pixel is treated"):
        img, _ = read_image(tmp_path / "q.dcm")
    np.testing.assert_array_equal(img, to_uint8(np.array([[5, 10, 20, 999]])))
    # Written as a decimal string by a non-conforming writer, the value still counts.
    _raw(ds, "PixelPaddingValue", b"999,0", vr="DS")
    ds.save_as(tmp_path / "q2.dcm")
    img, _ = _read_quiet(tmp_path / "q2.dcm")
    np.testing.assert_array_equal(img, [[0, 85, 255, 0]])


# ---- 3. compressed films and decoders ---------------------------------------------------------------

def test_lossless_encodings_decode_to_the_uncompressed_pixels(films):
    ref_ds = pydicom.dcmread(films / "RG1_UNCR.dcm")
    ref_img, ref_size = _read_quiet(films / "RG1_UNCR.dcm")
    j2kr = pydicom.dcmread(films / "RG1_J2KR.dcm")
    assert j2kr.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    np.testing.assert_array_equal(j2kr.pixel_array, ref_ds.pixel_array)
    img, size = _read_quiet(films / "RG1_J2KR.dcm")
    assert size == ref_size == (1841, 1955)
    np.testing.assert_array_equal(img, ref_img)


def test_rle_encoded_real_film_decodes_to_the_same_pixels(films, tmp_path):
    """RLE Lossless (1.2.840.10008.1.2.5), written here from the uncompressed film by pylibjpeg-rle."""
    ref_img, _ = _read_quiet(films / "RG1_UNCR.dcm")
    ds = pydicom.dcmread(films / "RG1_UNCR.dcm")
    ds.compress(pydicom.uid.RLELossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "rle.dcm")
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    img, _ = _read_quiet(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(img, ref_img)


def test_lossy_encoding_is_close(films):
    ref_ds = pydicom.dcmread(films / "RG1_UNCR.dcm")
    ref_img, _ = _read_quiet(films / "RG1_UNCR.dcm")
    lossy = pydicom.dcmread(films / "RG1_J2KI.dcm")
    assert lossy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    d = np.abs(lossy.pixel_array.astype(np.int64) - ref_ds.pixel_array.astype(np.int64))
    assert d.mean() < 0.005 * 32767 and d.max() < 0.02 * 32767  # stored 15-bit values
    img, _ = _read_quiet(films / "RG1_J2KI.dcm")
    g = np.abs(img.astype(np.int64) - ref_img.astype(np.int64))
    assert g.mean() < 1.0 and g.max() <= 4  # display grey levels


def test_jpeg_lossless_sv1_decodes_to_the_reference_pixels(films):
    """JPEG Lossless SV1 (1.2.840.10008.1.2.4.70): the decoded stored values hash to what GDCM 3.2.6
    (an independent decoder) produced for this file."""
    ds = pydicom.dcmread(films / "JPEG-LL.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    arr = ds.pixel_array
    assert arr.shape == (1024, 256) and arr.dtype == np.int16
    assert hashlib.sha256(np.ascontiguousarray(arr, dtype="<i2").tobytes()).hexdigest() == JPEG_LL_SHA256
    img, size = _read_not_chest(films / "JPEG-LL.dcm", "Modality NM, BodyPartExamined 'WHOLE BODY'")
    assert size == (256, 1024)
    np.testing.assert_array_equal(img, to_uint8(arr))  # no window, no rescale: min-max


JPEG_LL_SHA256 = "a6e9d32143339d3f5748b5520aa4e6c6ffb3550b6f71fdf17bdb2ebb44bc2611"


def test_lut_films_read(films):
    img, size = _read_not_chest(films / "mlut_18.dcm", "Modality OT")
    assert size == (512, 512) and img.min() == 0 and img.max() == 255
    img, size = _read_not_chest(films / "vlut_04.dcm", "Modality OT")
    assert size == (512, 512) and img.min() == 0 and img.max() == 255


# transfer syntax -> the package that must be named (and the one that must not) when its decoder is missing
DECODER_TABLE = [
    ("1.2.840.10008.1.2.4.50", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"),  # JPEG baseline
    ("1.2.840.10008.1.2.4.57", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"),  # JPEG lossless
    ("1.2.840.10008.1.2.4.70", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"),  # JPEG lossless SV1
    ("1.2.840.10008.1.2.4.80", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"),  # JPEG-LS lossless
    ("1.2.840.10008.1.2.4.90", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg"),  # JPEG 2000 lossless
    ("1.2.840.10008.1.2.4.91", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg"),  # JPEG 2000
    ("1.2.840.10008.1.2.4.201", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg"),  # HTJ2K lossless
    ("1.2.840.10008.1.2.5", "pylibjpeg-rle", "pylibjpeg-openjpeg"),  # RLE
]


@pytest.mark.parametrize("uid,package,not_package", DECODER_TABLE)
def test_every_compressed_syntax_is_decodable_and_names_its_package(uid, package, not_package):
    from pydicom.pixels import get_decoder

    from medfocus.io.reader import _decoder_advice

    assert get_decoder(uid).is_available, f"no decoder installed for {uid}: the default install must bring it"
    advice = _decoder_advice(pydicom.uid.UID(uid))
    assert package in advice and not_package not in advice


@pytest.mark.parametrize("name,uid,package,wrong", [
    ("JPEG-LL.dcm", "1.2.840.10008.1.2.4.70", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"),
    ("RG1_J2KR.dcm", "1.2.840.10008.1.2.4.90", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg"),
])
def test_missing_decoder_names_the_syntax_and_its_package(films, monkeypatch, name, uid, package, wrong):
    from pydicom.pixels import get_decoder

    monkeypatch.setattr(get_decoder(uid), "_available", {})  # as if the plugin were not installed
    with pytest.raises(DataError) as ei:
        read_image(films / name)
    msg = str(ei.value)
    assert name in msg and uid in msg and package in msg and wrong not in msg


def test_uncompressed_defects_give_no_decoder_advice(films, tmp_path):
    def truncate(ds):
        ds.PixelData = ds.PixelData[:1_000_000]

    with pytest.raises(DataError, match="does not match the pixel module") as ei:
        read_image(_variant(films, tmp_path, "trunc.dcm", truncate))
    assert "trunc.dcm" in str(ei.value) and "pip" not in str(ei.value) and "decoder" not in str(ei.value)

    def no_photometric(ds):
        del ds.PhotometricInterpretation

    with pytest.raises(DataError, match="missing required attribute.*PhotometricInterpretation") as ei:
        read_image(_variant(films, tmp_path, "nophoto.dcm", no_photometric))
    assert "nophoto.dcm" in str(ei.value) and "pip" not in str(ei.value) and "decoder" not in str(ei.value)


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "JPEG-LL.dcm"])
@pytest.mark.parametrize("keep", ["half", "all_but_100_bytes"])
def test_truncated_compressed_film_is_reported_as_truncated_without_a_library_warning(films, tmp_path, name, keep):
    """A compressed film cut short loses its encapsulated pixel element (pydicom drops it with a bare
    UserWarning): that is a truncated file, not a DICOM without pixel data."""
    data = (films / name).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: len(data) // 2] if keep == "half" else data[:-100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="truncated or damaged file") as ei:
            read_image(cut)
    assert str(cut) in str(ei.value) and "no pixel data" not in str(ei.value)
    assert not caught, [str(w.message) for w in caught]


def test_header_understating_the_image_size_is_refused_not_cropped(films, tmp_path):
    """pydicom would keep the first 1000 rows of the 1955-row film ("excess padding" warning)."""
    def fewer_rows(ds):
        ds.Rows = 1000

    path = _variant(films, tmp_path, "rows.dcm", fewer_rows)
    with pytest.raises(DataError, match=r"1000 x 1841 x 1 x 16 bits.*needs 3682000.*does not match") as ei:
        read_image(path)
    assert "rows.dcm" in str(ei.value) and "7198310 bytes" in str(ei.value)


@pytest.mark.parametrize("name", ["empty.dcm", "empty.png"])
def test_empty_file_is_said_to_be_empty(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    for reader in (read_image, read_image_size):
        with pytest.raises(DataError, match=r"empty file \(0 bytes\)") as ei:
            reader(tmp_path / name)
        assert name in str(ei.value)


def _grey_indices(tmp_path, photometric: str, **extra):
    """An 8-bit one-sample film of index values 0..99 with ``photometric`` (pydicom-built)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    idx = np.arange(100, dtype=np.uint8).reshape(10, 10)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 10, 10, 1, 8, 8, 7
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, photometric
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = idx.tobytes()
    path = tmp_path / f"{photometric.replace(' ', '_')}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, idx


def test_palette_color_film_shows_what_its_indices_point_to(tmp_path):
    """Known answer: an inverting grey palette (index i -> 255 - i on all three channels, 8-bit
    entries) displays as the inverted index image, not as the raw indices."""
    pal = (255 - np.arange(256)).astype(np.uint8).tobytes()
    desc = [256, 0, 8]
    path, idx = _grey_indices(tmp_path, "PALETTE COLOR",
                              RedPaletteColorLookupTableDescriptor=desc, GreenPaletteColorLookupTableDescriptor=desc,
                              BluePaletteColorLookupTableDescriptor=desc, RedPaletteColorLookupTableData=pal,
                              GreenPaletteColorLookupTableData=pal, BluePaletteColorLookupTableData=pal)
    img, size = _read_quiet(path)
    assert size == (10, 10)
    np.testing.assert_array_equal(img, to_uint8((255 - idx).astype(np.float64)))
    assert img[0, 0] == 255 and img[-1, -1] == 0  # index 0 -> white, index 99 -> black


def test_palette_color_without_a_palette_and_colour_photometric_on_one_sample_are_refused(tmp_path):
    path, _ = _grey_indices(tmp_path, "PALETTE COLOR")
    with pytest.raises(DataError, match="PALETTE COLOR but its palette cannot be applied") as ei:
        read_image(path)
    assert path.name in str(ei.value)
    path, _ = _grey_indices(tmp_path, "RGB")
    with pytest.raises(DataError, match="'RGB' needs 3 samples per pixel but the pixel data has 1") as ei:
        read_image(path)
    assert path.name in str(ei.value)


def test_one_trailing_pad_byte_is_allowed(tmp_path):
    """Odd-length native pixel data is padded to even length (PS3.5 8.1.1): not an error."""
    arr = np.arange(15, dtype=np.uint8).reshape(3, 5)
    path = tmp_path / "odd.dcm"
    write_dicom(path, arr)
    ds = pydicom.dcmread(path)
    assert len(ds.PixelData) == 16  # 15 bytes + the pad byte
    np.testing.assert_array_equal(_read_quiet(path)[0], to_uint8(arr))


# ---- header-only size ---------------------------------------------------------------------------------

def test_read_image_size_reads_only_the_header(films, tmp_path, monkeypatch):
    from PIL import Image

    assert read_image_size(films / "RG1_J2KR.dcm") == (1841, 1955)
    assert read_image_size(films / "JPEG-LL.dcm") == (256, 1024)
    # A truncated pixel stream still has a readable header.
    ds = pydicom.dcmread(films / "RG1_UNCR.dcm")
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(tmp_path / "t.dcm")
    assert read_image_size(tmp_path / "t.dcm") == (1841, 1955)
    Image.fromarray(np.zeros((7, 9), dtype=np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded pixels"))
    assert read_image_size(tmp_path / "a.png") == (9, 7)
    with pytest.raises(DataError, match="not found"):
        read_image_size(tmp_path / "none.png")
