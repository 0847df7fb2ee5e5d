"""Dataset loaders behind one registry: ``load_dataset(name, root) -> list[Sample]``.

Names (aliases in :data:`ALIASES`):

=============  ==============================================================  =====================
name           loader                                                          data root holds
=============  ==============================================================  =====================
imagenome      :func:`medfocus.datasets.imagenome.load_imagenome`              chest-imagenome + MIMIC-CXR-JPG
vindr_cxr      :func:`medfocus.datasets.vindr_cxr.load_vindr_cxr`              vindr-cxr/1.0.0
padchest_gr    :func:`medfocus.datasets.padchest_gr.load_padchest_gr`          filtered_studies.json + PadChest_GR/
nih_cxr8       :func:`medfocus.datasets.nih_cxr8.load_nih_cxr8`                nih-chestxray8 (box list + images/)
synthetic      ``medfocus.datasets.synthetic.dataset:load_synthetic``          a ``medfocus synth`` output folder
=============  ==============================================================  =====================

Entries are ``"module:function"`` strings imported on first use (like timm's registries), so a
dataset whose optional code is missing only fails when it is asked for.

The data root comes from ``--data-root`` or the ``MEDFOCUS_DATA_ROOT`` environment variable
(:func:`resolve_data_root`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from medfocus.errors import ConfigError, DataError
from medfocus.registry import LazyRegistry
from medfocus.types import Sample

__all__ = [
    "DATA_ROOT_ENV",
    "DATASET_REGISTRY",
    "ALIASES",
    "register_dataset",
    "list_datasets",
    "canonical_name",
    "get_loader",
    "load_dataset",
    "resolve_data_root",
]

DATA_ROOT_ENV = "MEDFOCUS_DATA_ROOT"

#: dataset name -> "module:function" of a loader ``f(root, **kwargs) -> list[Sample]``.
DATASET_REGISTRY: LazyRegistry[Callable[..., list[Sample]]] = LazyRegistry("dataset", {
    "imagenome": "medfocus.datasets.imagenome:load_imagenome",
    "vindr_cxr": "medfocus.datasets.vindr_cxr:load_vindr_cxr",
    "padchest_gr": "medfocus.datasets.padchest_gr:load_padchest_gr",
    "nih_cxr8": "medfocus.datasets.nih_cxr8:load_nih_cxr8",
    "synthetic": "medfocus.datasets.synthetic.dataset:load_synthetic",
}, normalize=lambda name: name.strip().lower())

#: Other spellings accepted by :func:`canonical_name` (the benchmark's own names included).
ALIASES: dict[str, str] = {
    "imagenome-attr": "imagenome",
    "chest-imagenome": "imagenome",
    "chest_imagenome": "imagenome",
    "vindr-cxr": "vindr_cxr",
    "vindr": "vindr_cxr",
    "vindr-cxr-attr": "vindr_cxr",
    "padchest-gr": "padchest_gr",
    "padchest": "padchest_gr",
    "padchest-gr-attr": "padchest_gr",
    "synth": "synthetic",
    "nih": "nih_cxr8",
    "nih-cxr8": "nih_cxr8",
    "chestx-ray8": "nih_cxr8",
    "chestxray8": "nih_cxr8",
    "nih-chestxray8": "nih_cxr8",
}


def register_dataset(name: str, target: str | Callable[..., list[Sample]], *, overwrite: bool = False) -> None:
    """Register a loader under ``name`` (a ``"module:function"`` string or a callable).

    Raises:
        ConfigError: ``name`` is taken and ``overwrite`` is false.
    """
    DATASET_REGISTRY.register(name, target, overwrite=overwrite)


def list_datasets() -> dict[str, str]:
    """``{name: loader}`` (the ``"module:function"`` or the callable's name), sorted by name."""
    return {n: _describe(DATASET_REGISTRY[n]) for n in DATASET_REGISTRY.names()}


def _describe(target: Any) -> str:
    return target if isinstance(target, str) else f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def canonical_name(name: str) -> str:
    """Map any accepted spelling (``"VinDR-CXR-Attr"``, ``"vindr-cxr"``...) to the registry key."""
    key = DATASET_REGISTRY.key(name)
    key = ALIASES.get(key, key)
    if key not in DATASET_REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {DATASET_REGISTRY.names()}")
    return key


def get_loader(name: str) -> Callable[..., list[Sample]]:
    """The loader function of a dataset (imported lazily)."""
    return DATASET_REGISTRY.resolve(canonical_name(name))


def resolve_data_root(data_root: str | os.PathLike | None = None, *, required: bool = True) -> Path | None:
    """The data root: ``data_root`` (``--data-root``) if given, else ``$MEDFOCUS_DATA_ROOT``.

    Raises:
        ConfigError: neither is set (when ``required``), or the folder does not exist.
    """
    value = data_root if data_root not in (None, "") else os.environ.get(DATA_ROOT_ENV) or None
    if value is None:
        if required:
            raise ConfigError(f"no data root: pass one (--data-root DIR on the command line, root= in Python) or set {DATA_ROOT_ENV}")
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        # Only the environment variable is named: an explicit value may come from a flag, a config file or
        # a Python call, and the caller knows which.
        src = "" if data_root not in (None, "") else f" (from ${DATA_ROOT_ENV})"
        raise ConfigError(f"data root {root}{src} is not a directory")
    return root


def load_dataset(name: str, root: str | os.PathLike | None = None, **kwargs: Any) -> list[Sample]:
    """Load a dataset by name.

    Args:
        name: registry name or alias (``imagenome``, ``vindr_cxr``, ``padchest_gr``, ``nih_cxr8``, ``synthetic``).
        root: data root; ``None`` resolves it from ``$MEDFOCUS_DATA_ROOT``.
        **kwargs: passed to the loader (e.g. ``split="test"``).

    Returns:
        The samples, ``samples[i].index == i`` (stable, benchmark-compatible order).

    Raises:
        DataError: the loader's errors, and a dataset without any sample (a run on it would report
            "0 samples" as if it were a result).
    """
    loader = get_loader(name)
    resolved = resolve_data_root(root)
    samples = loader(resolved, **kwargs)
    if not samples:  # the loaders say why where they can (VinDr, NIH); this is the backstop for every loader
        raise DataError(f"dataset {name!r} under data root {resolved}: the loader found no samples")
    for i, s in enumerate(samples):
        if s.index != i:
            raise DataError(f"dataset {name!r}: loader returned sample #{i} with index {s.index}; indices must be 0..n-1 in order")
    return samples
