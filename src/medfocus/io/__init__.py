"""Image reading (DICOM, 8/16-bit PNG/TIFF, JPEG) and letterbox geometry."""

from medfocus.io.letterbox import Letterbox

__all__ = ["Letterbox"]
