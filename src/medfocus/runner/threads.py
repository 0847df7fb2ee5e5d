"""CPU threads of a run: torch's and OpenCV's intra-op thread counts, set for the run and given back after.

More threads than the cores a process may use only adds contention, and under load the OpenMP workers'
spin-waiting burns the CPU other processes need; so runs default to :func:`available_cores` (the demo) or
take ``--threads`` (``explain``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from medfocus.errors import ConfigError


def available_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where unsupported), >= 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None, what: str = "threads") -> tuple[int, dict[str, int]]:
    """Set torch's and OpenCV's intra-op threads to ``threads`` (None: :func:`available_cores`); ``what`` names
    the setting in the error (e.g. ``"DemoConfig.threads"``, ``"--threads"``).

    Returns ``(threads set, previous settings)``; pass the latter to :func:`restore_threads`.

    Raises:
        ConfigError: ``threads`` < 1.
    """
    import torch

    n = available_cores() if threads is None else int(threads)
    if n < 1:
        raise ConfigError(f"{what} must be >= 1 (or None for the available cores), got {threads!r}")
    previous = {"torch": torch.get_num_threads()}
    torch.set_num_threads(n)
    try:
        import cv2

        previous["cv2"] = cv2.getNumThreads()
        cv2.setNumThreads(n)
    except ImportError:  # OpenCV is only needed by the inpaint editor
        pass
    return n, previous


def restore_threads(previous: dict[str, int]) -> None:
    """Undo :func:`configure_threads`."""
    import torch

    torch.set_num_threads(previous["torch"])
    if "cv2" in previous:
        import cv2

        cv2.setNumThreads(previous["cv2"])


@contextlib.contextmanager
def intra_op_threads(threads: int | None, what: str = "--threads") -> Iterator[int | None]:
    """``threads`` intra-op threads inside the block (:func:`configure_threads`), the caller's settings after;
    ``None`` changes nothing. Yields the number set (or None).

    Raises:
        ConfigError: ``threads`` < 1, naming ``what``.
    """
    if threads is None:
        yield None
        return
    n, previous = configure_threads(threads, what)
    try:
        yield n
    finally:
        restore_threads(previous)
