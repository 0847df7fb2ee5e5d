"""MedFocus: concept-based causal attribution with unbalanced optimal transport.

Modules: :mod:`~medfocus.concepts.ot` (log-domain batched unbalanced Sinkhorn),
:mod:`~medfocus.concepts.reference` (reference pool, selection), :mod:`~medfocus.concepts.transfer`
(concept transfer), :mod:`~medfocus.concepts.refine` (optional MedSAM), :mod:`~medfocus.concepts.intervention`
(causal concept masking), :mod:`~medfocus.concepts.method` (:class:`MedFocus`, registry entry),
:mod:`~medfocus.concepts.grounding` (phrase -> concept grounding, the anatomy detector of ``prompting_medsam``).
Names are imported lazily so ``import medfocus.concepts`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MedFocus": "medfocus.concepts.method",
    "MedFocusMethod": "medfocus.concepts.method",
    "MedFocusResult": "medfocus.concepts.method",
    "ReferencePool": "medfocus.concepts.reference",
    "Reference": "medfocus.concepts.reference",
    "default_pool": "medfocus.concepts.reference",
    "build_pool_from_regions": "medfocus.concepts.reference",
    "transfer_concepts": "medfocus.concepts.transfer",
    "ConceptTransfer": "medfocus.concepts.transfer",
    "TransferCache": "medfocus.concepts.transfer",
    "ground_phrase": "medfocus.concepts.grounding",
    "AnatomyDetector": "medfocus.concepts.grounding",
    "cached_pool": "medfocus.concepts.reference",
    "sinkhorn_unbalanced_log": "medfocus.concepts.ot",
    "uot_grid": "medfocus.concepts.ot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medfocus.concepts' has no attribute {name!r}")
