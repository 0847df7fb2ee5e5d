"""Settings read from the environment: the pixel limit, the working-resolution cap (integers) and the
cache directory (:func:`cache_root`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MEDFOCUS_CACHE`` or ``~/.cache/medfocus``: the one home of medfocus' caches (reference pools,
    concept transfers, the file-digest memo); created on demand by its users."""
    env = os.environ.get("MEDFOCUS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medfocus"


def env_pixels(name: str, default: int | None, error: type[Exception], off: str) -> int | None:
    """``$name`` as a pixel count: ``default`` when unset or empty, ``None`` for ``0`` (``off``: what 0 means,
    for the message), else the integer.

    Raises:
        error: the value is not an integer, or is negative; the message names the variable.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise error(f"${name} must be an integer number of pixels (0 = {off}), got {raw!r}") from None
    if n < 0:
        raise error(f"${name} must be >= 0 (0 = {off}), got {n}")
    return n or None
