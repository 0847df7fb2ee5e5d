"""Command-line options that reach a dataset loader, shared by ``attribute`` and ``bench build`` (no model
code imported: ``--help`` stays fast)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import click

from medfocus.errors import ConfigError


def rescale_boxes_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--rescale-boxes``: NIH ChestX-ray8 films that are square resized copies of the 1024x1024 originals."""
    return click.option(
        "--rescale-boxes", is_flag=True,
        help="nih_cxr8 only: the films are square resized copies of the 1024x1024 originals (such as the 256x256 / "
             "512x512 downloads); scale the box list to each film's size (a warning says how many). Without it such "
             "films are refused: the boxes would lie in the wrong frame.")(f)


def loader_options(dataset: str, rescale_boxes: bool = False) -> dict[str, Any]:
    """Keyword arguments of :func:`medfocus.datasets.load_dataset` for one dataset of a run: ``rescale_boxes``
    reaches the NIH ChestX-ray8 loader only (:func:`medfocus.datasets.nih_cxr8.load_nih_cxr8`)."""
    from medfocus.datasets import canonical_name

    return {"rescale_boxes": True} if rescale_boxes and canonical_name(dataset) == "nih_cxr8" else {}


def check_rescale_boxes(rescale_boxes: bool, datasets: Sequence[str]) -> None:
    """Refuse ``--rescale-boxes`` in a run without an NIH ChestX-ray8 sample (it would do nothing there).

    Raises:
        ConfigError: the flag is set and none of ``datasets`` is ``nih_cxr8`` (an unknown name: as
            :func:`medfocus.datasets.canonical_name` says).
    """
    from medfocus.datasets import canonical_name

    if rescale_boxes and not any(canonical_name(d) == "nih_cxr8" for d in datasets):
        raise ConfigError(f"--rescale-boxes applies to nih_cxr8 films only; this run's dataset(s): {sorted(set(datasets))}")
