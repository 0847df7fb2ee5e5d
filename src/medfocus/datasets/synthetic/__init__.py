"""medfocus.datasets.synthetic — a procedural chest X-ray world with exact ground truth.

* :func:`generate_case` — one radiograph, its 11 exact concept masks, findings (boxes + masks), shortcut
  cues and counterfactual oracles (``foreground`` / ``background`` / ``background_normal``).
* :func:`write_dataset` / :func:`load_synthetic` — a dataset on disk in the VinDr-CXR layout + manifest.
* :func:`write_reference_pool` — normal phantoms with concept masks for MedFocus.
"""

from medfocus.datasets.synthetic.case import SyntheticCase, SyntheticFinding, generate_case
from medfocus.datasets.synthetic.cues import CUE_TYPES, DEFAULT_CUE_MAP
from medfocus.datasets.synthetic.findings import FINDINGS

#: Bumped whenever the rendering changes (same seed -> different pixels). Key caches of generated
#: images (reference pools, training sets) on it.
GENERATOR_VERSION = 1

__all__ = [
    "GENERATOR_VERSION",
    "FINDINGS",
    "CUE_TYPES",
    "DEFAULT_CUE_MAP",
    "SyntheticCase",
    "SyntheticFinding",
    "generate_case",
    "write_dataset",
    "load_synthetic",
    "write_reference_pool",
]


def __getattr__(name: str):
    # Lazy: the dataset writers pull in pydicom/pandas only when used.
    if name in ("write_dataset", "load_synthetic"):
        from medfocus.datasets.synthetic import dataset

        return getattr(dataset, name)
    if name == "write_reference_pool":
        from medfocus.datasets.synthetic.reference import write_reference_pool

        return write_reference_pool
    raise AttributeError(name)
