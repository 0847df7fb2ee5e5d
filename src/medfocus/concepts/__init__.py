"""MedFocus: concept-based causal attribution with unbalanced optimal transport.

Modules: :mod:`~medfocus.concepts.uot` (log-domain batched unbalanced Sinkhorn),
:mod:`~medfocus.concepts.reference` (reference pool, selection), :mod:`~medfocus.concepts.transfer`
(concept transfer), :mod:`~medfocus.concepts.refine` (optional MedSAM), :mod:`~medfocus.concepts.intervention`
(causal concept masking), :mod:`~medfocus.concepts.method` (:class:`MedFocus`, registry entry),
:mod:`~medfocus.concepts.grounding` (phrase -> concept grounding, the anatomy detector of ``prompting_medsam``).
Names are imported lazily so ``import medfocus.concepts`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medfocus.registry import lazy_exports

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
    "sinkhorn_unbalanced_log": "medfocus.concepts.uot",
    "uot_grid": "medfocus.concepts.uot",
}

__all__ = [
    "AnatomyDetector",
    "ConceptTransfer",
    "MedFocus",
    "MedFocusMethod",
    "MedFocusResult",
    "Reference",
    "ReferencePool",
    "TransferCache",
    "build_pool_from_regions",
    "cached_pool",
    "default_pool",
    "ground_phrase",
    "sinkhorn_unbalanced_log",
    "transfer_concepts",
    "uot_grid",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for IDEs, type checkers and help()
    from medfocus.concepts.grounding import AnatomyDetector, ground_phrase
    from medfocus.concepts.method import MedFocus, MedFocusMethod, MedFocusResult
    from medfocus.concepts.uot import sinkhorn_unbalanced_log, uot_grid
    from medfocus.concepts.reference import Reference, ReferencePool, build_pool_from_regions, cached_pool, default_pool
    from medfocus.concepts.transfer import ConceptTransfer, TransferCache, transfer_concepts
