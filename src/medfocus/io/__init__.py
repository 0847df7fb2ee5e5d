"""Image reading (DICOM, 8/16-bit PNG/TIFF, JPEG), fixture writers, and letterbox geometry."""

from medfocus.io.letterbox import Letterbox
from medfocus.io.reader import (CONVENTIONAL_ORIENTATION, FilmOrientation, is_dicom, read_dicom, read_image, read_image_size,
                                read_orientation, to_uint8)
from medfocus.io.writers import write_dicom, write_png, write_png16, write_tiff

__all__ = [
    "Letterbox",
    "read_image",
    "read_image_size",
    "read_orientation",
    "FilmOrientation",
    "CONVENTIONAL_ORIENTATION",
    "read_dicom",
    "is_dicom",
    "to_uint8",
    "write_dicom",
    "write_png",
    "write_png16",
    "write_tiff",
]
