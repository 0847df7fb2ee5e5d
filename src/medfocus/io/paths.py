"""Path safety: the one sanitiser for file names built from record/data fields, the data-root
containment check used by the dataset loaders, and the check that a stored record's film is still the
one it was computed on (:func:`record_film`).

Every file name the library builds from values it did not choose itself (a record's ``model``,
``dataset``, ``mode``, ``method``, ``index``; a finding name from an annotation CSV) goes through
:func:`safe_filename`, so a field such as ``../../x`` or ``/etc/passwd`` can never name a path outside
the folder it is written into.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from medfocus.errors import DataError
from medfocus.io.fingerprint import FINGERPRINT_FIELD, file_sha256  # re-exported: record_film checks films with them

__all__ = ["safe_filename", "resolve_inside", "allow_outside_root", "file_sha256", "record_label", "record_film", "films_under",
           "FINGERPRINT_FIELD"]


_ALLOW_OUTSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("medfocus_allow_outside_root", default=False)


@contextlib.contextmanager
def allow_outside_root(allow: bool = True) -> Iterator[None]:
    """Within this block, :func:`resolve_inside` warns about paths outside the data root instead of
    refusing them (what ``--allow-outside-root`` turns on)."""
    token = _ALLOW_OUTSIDE.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_OUTSIDE.reset(token)

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
                   allow_outside: bool | None = None) -> Path:
    """``root / relative``, refused when it leaves ``root``.

    The check is lexical (``..`` segments are collapsed, an absolute ``relative`` replaces ``root``), so
    a data owner's own symlinks inside the root (an ``images`` folder linked to another disk) keep
    working, while an id from a data file such as ``../../etc/passwd`` or ``/home/x/secret.png`` cannot
    name a file outside the root.

    Args:
        root: the data root (or the loader's image folder inside it).
        relative: a path from a data file (CSV/JSON field); ``..`` is allowed only while the result
            stays inside ``root``.
        what: how the error message names the value (e.g. ``"image_id '...'"``).
        allow_outside: explicit opt-in (``--allow-outside-root``): a path outside ``root`` is returned
            with a warning instead of an error. ``None``: as set by :func:`allow_outside_root` (default off).
    Returns:
        the normalised path (absolute when ``root`` is).
    Raises:
        DataError: the path leaves ``root`` (names the value, the path and the root).
    """
    if allow_outside is None:
        allow_outside = _ALLOW_OUTSIDE.get()
    base = os.path.normpath(os.fspath(root))
    p = os.path.normpath(os.path.join(base, os.fspath(relative)))
    if p == base or p.startswith(base.rstrip(os.sep) + os.sep):
        return Path(p)
    msg = f"{what}: {os.fspath(relative)!r} leads to {p}, outside the data root {base}"
    if allow_outside:
        import logging

        logging.getLogger(__name__).warning("%s (allowed by --allow-outside-root)", msg)
        return Path(p)
    raise DataError(msg + "; refusing to read it (pass --allow-outside-root to allow such paths)")


_MOVED = ("If the data root moved: `medfocus report` and `medfocus evaluate --faithfulness` read the films at the new "
          "place with --data-root NEW_ROOT; `medfocus attribute` rerun with the moved --data-root into the same output "
          "serves its records (not recomputed) with the films' new paths")
#: for a film that was given by its own path (``medfocus explain``), not found under a data root
_GIVEN = "it was given by its own path, not found under a data root (e.g. a `medfocus explain` film), so only that path can hold it"
_FILM_ROOT: contextvars.ContextVar[str | None] = contextvars.ContextVar("medfocus_film_root", default=None)


@contextlib.contextmanager
def films_under(data_root: str | os.PathLike[str] | None) -> Iterator[None]:
    """Within this block, :func:`record_film` reads every record's film from ``data_root`` (the data root
    moved since the records were written: another machine, a remounted disk). ``None`` changes nothing."""
    token = _FILM_ROOT.set(None if data_root is None else os.fspath(data_root))
    try:
        yield
    finally:
        _FILM_ROOT.reset(token)


def record_label(record: Mapping[str, Any]) -> str:
    """How messages name a result record: ``record <model>/<dataset>#<index> (<method>)``."""
    return f"record {record.get('model')}/{record.get('dataset')}#{record.get('index')} ({record.get('method')})"


def record_film(record: Mapping[str, Any], *, where: str | None = None,
                data_root: str | os.PathLike[str] | None = None) -> str:
    """The film a stored result record was computed on: its ``image_path``, checked against the sha256 in
    its sample fingerprint.

    A record names its film by the absolute path it had when it ran. After the data root moved, that
    path may be missing -- or hold another film (a dataset re-extracted at the old place), which a viewer
    would show under the record's maps and boxes. The fingerprint's ``image`` (the path relative to the
    data root) is named in the error, so the user can tell where the film went. A record without a
    fingerprint (written before they were recorded) cannot be checked and is used as given.

    Args:
        record: a result record (``image_path``, optionally ``sample_fingerprint``).
        where: how errors name the record (default ``model/dataset#index (method)``).
        data_root: the data root's new place (default: the one set by :func:`films_under`, else none):
            the film is read at ``data_root / <fingerprint image>`` instead of ``image_path``, still
            checked by its sha256.
    Returns:
        the path to read.
    Raises:
        DataError: no ``image_path``; the film is missing; the file there has other bytes than the film
            the record was computed on; with ``data_root``, a record whose fingerprint holds no film path
            relative to its data root (written before fingerprints, or a film that lay outside the root),
            or whose relative path leaves ``data_root``.
    """
    name = where or record_label(record)
    root = os.fspath(data_root) if data_root is not None else _FILM_ROOT.get()
    path = record.get("image_path")
    if not path:
        raise DataError(f"{name}: no 'image_path' (the film it was computed on)")
    path = str(path)
    fp = record.get(FINGERPRINT_FIELD)
    sha = fp.get("image_sha256") if isinstance(fp, Mapping) else None
    rel = fp.get("image") if isinstance(fp, Mapping) else None
    if root is not None:
        # never a silent fall back to the old path: the user said the films are elsewhere now
        if not sha or not rel:
            raise DataError(f"{name}: its film cannot be looked up under the data root {root}: the record stores no "
                            "film path relative to its data root and no film hash (it was written before sample "
                            f"fingerprints); run without --data-root to read {path}")
        if os.path.isabs(str(rel)):
            raise DataError(f"{name}: its film {rel} has no place under the data root {root}: {_GIVEN}; put the film "
                            "back there")
        path = str(resolve_inside(root, str(rel), what=f"{name}'s film {str(rel)!r}", allow_outside=False))
    if not sha:
        return path
    called = (f" (the record calls it {rel!r}, relative to its data root)"
              if rel and str(rel) != path and not os.path.isabs(str(rel)) else "")
    got = file_sha256(path)
    if got is None:
        if root is not None:
            raise DataError(f"{name}: its film {rel!r} is not under the data root {root} (looked for {path})")
        if rel and os.path.isabs(str(rel)):
            raise DataError(f"{name}: its film {path} is missing; {_GIVEN}: put it back there, or rerun on the film "
                            "where it is now")
        raise DataError(f"{name}: its film {path} is missing{called}; was the data root moved? {_MOVED}")
    if got[1] != sha:
        raise DataError(f"{name}: the file at {path} (sha256 {got[1][:12]}, {got[0]} bytes) is not the film this "
                        f"record was computed on (sha256 {sha[:12]}, {fp.get('image_bytes')} bytes){called}; a moved or "
                        f"replaced data root? Refusing to show or score another film under its maps. {_MOVED}")
    return path
