"""Path safety: the one sanitiser for file names built from record/data fields, and the data-root
containment check used by the dataset loaders.

Every file name the library builds from values it did not choose itself (a record's ``model``,
``dataset``, ``mode``, ``method``, ``index``; a finding name from an annotation CSV) goes through
:func:`safe_filename`, so a field such as ``../../x`` or ``/etc/passwd`` can never name a path outside
the folder it is written into.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from medfocus.errors import DataError

__all__ = ["safe_filename", "resolve_inside"]

_MAX_LEN = 150  # well below the 255-byte file-name limit of common file systems, leaving room for suffixes


def safe_filename(text: str) -> str:
    """One safe path component made from arbitrary text.

    ASCII letters, digits, ``-``, ``_`` and ``.`` are kept; every other character (path separators,
    NUL, whitespace, non-ASCII) becomes ``-``; a leading ``.`` becomes ``_`` (no ``..``, no hidden
    files); the empty string becomes ``_``. Names longer than 150 characters are cut and suffixed with a
    hash of the full text, so distinct long inputs stay distinct.

    Returns:
        a string that is a single file-name component (never ``.``/``..``, never containing ``/``).
    """
    text = str(text)
    out = "".join(c if (c.isascii() and (c.isalnum() or c in "-_.")) else "-" for c in text)
    if out.startswith("."):
        out = "_" + out[1:]
    if not out:
        out = "_"
    if len(out) > _MAX_LEN:
        out = out[: _MAX_LEN - 17] + "-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return out


def resolve_inside(root: str | os.PathLike, relative: str | os.PathLike, *, what: str = "image path",
                   allow_outside: bool = False) -> Path:
    """``root / relative`` resolved (symlinks followed), refused when it leaves ``root``.

    Args:
        root: the data root.
        relative: a path from a data file (CSV/JSON field); an absolute path or one with ``..`` is
            allowed only while it stays inside ``root``.
        what: how the error message names the value (e.g. ``"image_id"``).
        allow_outside: explicit opt-in (``--allow-outside-root``): a path outside ``root`` is returned
            with a warning instead of an error.
    Returns:
        the resolved absolute path.
    Raises:
        DataError: the path leaves ``root`` (names the value, the resolved path and the root).
    """
    root_r = Path(root).resolve()
    p = (root_r / Path(relative)).resolve()
    if p == root_r or root_r in p.parents:
        return p
    msg = f"{what} {str(relative)!r} resolves to {p}, outside the data root {root_r}"
    if allow_outside:
        import logging

        logging.getLogger(__name__).warning("%s (allowed by --allow-outside-root)", msg)
        return p
    raise DataError(msg + "; refusing to read it (pass --allow-outside-root to allow such paths)")
