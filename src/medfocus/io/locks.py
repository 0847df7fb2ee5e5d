"""Per-output locks and the clean-up of debris left by killed writes.

One process writes one output at a time: ``medfocus attribute`` locks its result file and
``medfocus bench build`` its split, both with :func:`exclusive_lock` (an advisory ``flock`` on
``<output>.lock``, released when the process exits, even by SIGKILL, so a stale lock file never
blocks a rerun). Under that lock, :func:`remove_orphaned_tmp` deletes the temporary files that an
atomic write killed mid-way left behind (``*.tmp`` next to the output); nothing else can be writing
them, because every writer of that output holds the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import IO, Any, Iterator

from medfocus.errors import ConfigError

__all__ = ["acquire_lock", "exclusive_lock", "remove_orphaned_tmp"]

log = logging.getLogger(__name__)


def acquire_lock(output: str | os.PathLike[str], what: str) -> IO[Any] | None:
    """Take the exclusive lock of ``output`` (``<output>.lock``) without waiting.

    Args:
        output: the file the lock protects.
        what: how the error names the output (e.g. ``"result store"``, ``"benchmark split"``).
    Returns:
        the open lock file (close it to release), or ``None`` on platforms without ``fcntl``.
    Raises:
        ConfigError: another process holds the lock (names the output and what to do).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return None
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fh = open(out.with_name(out.name + ".lock"), "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(f"{what} {out} is in use by another process; give each concurrent run its own "
                          "output (e.g. one --out per --shard, or another model/mode) and merge afterwards") from None
    return fh


@contextlib.contextmanager
def exclusive_lock(output: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Context manager form of :func:`acquire_lock`."""
    fh = acquire_lock(output, what)
    try:
        yield
    finally:
        if fh is not None:
            fh.close()


def remove_orphaned_tmp(folder: str | os.PathLike[str], prefix: str | None = None) -> list[Path]:
    """Delete the ``*.tmp`` files in ``folder`` (only those whose name, without a leading dot, starts
    with ``prefix`` when given). Call it only while holding the lock of every output written there.

    Returns:
        the files removed (logged at INFO).
    """
    d = Path(folder)
    if not d.is_dir():
        return []
    pat = re.compile(r"^\.?" + (re.escape(prefix) if prefix else "") + r".*\.tmp$")
    removed = []
    for f in d.iterdir():
        if f.is_file() and pat.match(f.name):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                removed.append(f)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), d)
    return removed
