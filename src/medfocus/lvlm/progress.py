"""The libraries' own progress bars: ``--no-progress`` for every bar a command shows, and quiet model
loading inside a run that draws one overall bar (the demo).

medfocus' loops use tqdm with ``disable=not progress``; transformers draws its own bar while it loads
weights ("Loading weights") and huggingface_hub one per download. :func:`progress_bars` switches those
off too for the duration of a command and restores the previous state afterwards (so an in-process
caller, e.g. a test, is left as it was).
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Context in which the transformers / huggingface_hub progress bars are on (``enabled``) or off.

    With ``enabled=True`` nothing is changed. A library that is not installed is skipped.
    """
    if enabled:
        yield
        return
    restore = []
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    except ImportError:  # pragma: no cover
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()
