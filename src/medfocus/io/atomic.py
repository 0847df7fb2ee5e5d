"""The one way medfocus writes a file or a folder that someone may read at the same time.

A reader (another process, a resumed run, a shard) sees either the old content or the new one,
never a mix, and never a file cut short by a kill:

1. the content goes to a temporary file with a *unique* name (``tempfile.mkstemp``) in the *same*
   folder as the target, so concurrent writers (shards) never share a temporary file and the final
   rename never crosses a file system;
2. the temporary file is flushed and ``fsync``-ed, so its bytes are on disk before it gets the name;
3. ``os.replace`` gives it the target name (atomic on POSIX and Windows);
4. the folder is ``fsync``-ed, so the rename itself survives a power cut.

A failed write removes its temporary file and leaves the target untouched. Folders (a trained
model, a reference pool) are published the same way by :func:`atomic_directory`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_npz",
    "atomic_directory",
    "fsync_dir",
]


def _default_mode(base: int) -> int:
    """``base`` under the process umask: the mode ``open``/``mkdir`` would give (``mkstemp``/``mkdtemp``
    create private 0600/0700 entries, which would hide results from the other members of a group)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a folder so that a rename inside it is durable (a no-op where the platform cannot)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. folders cannot be fsync-ed on Windows
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path``.

    Args:
        path: the target file (its folder is created).
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: text encoding (ignored for ``"wb"``).

    Yields:
        The open temporary file. If the block raises, the temporary file is removed and ``path`` keeps
        its old content (or stays absent).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _default_mode(0o666))
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see module docstring). Returns ``path``."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see module docstring). Returns ``path``."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1, **dumps_kw: Any) -> Path:
    """Write ``json.dumps(obj, indent=indent, **dumps_kw)`` plus a final newline to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kw) + "\n")


def atomic_save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Write ``np.savez_compressed(path, **arrays)`` atomically: readers see the old file or the new one.

    Returns ``path`` (which should end in ``.npz``; no suffix is added).
    """
    import numpy as np

    with atomic_write(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return Path(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name next to ``path`` and publish it as ``path`` on a clean exit.

    Args:
        path: the folder to publish.
        overwrite: replace an existing ``path`` (the old folder is moved aside first, then deleted).
            With ``overwrite=False`` an existing non-empty ``path`` wins (e.g. a concurrent writer that
            finished first) and the new copy is discarded. (Replacing a folder is two renames: for that
            instant ``path`` is absent, never half-written.)

    Yields:
        The (empty) temporary folder to fill. If the block raises, it is removed and ``path`` is left
        as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent)))
    try:
        os.chmod(tmp, _default_mode(0o777))
        yield tmp
        _fsync_tree(tmp)
        old: Path | None = None
        if target.exists() and overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=str(target.parent)))
            os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # put the old folder back: a failed publish changes nothing
                os.replace(old / "x", target)
                shutil.rmtree(old, ignore_errors=True)
            if overwrite or not target.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer published first: keep its copy
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
