"""medfocus.lvlm: registry, loading, family adapters, teacher-forced scoring, answers, tiny builders.

Public names are imported lazily (``from medfocus.lvlm import load_lvlm``) so that importing the package
does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LVLMAdapter": "medfocus.lvlm.adapter",
    "ChatInputs": "medfocus.lvlm.adapter",
    "load_lvlm": "medfocus.lvlm.loading",
    "list_models": "medfocus.lvlm.registry",
    "get_entry": "medfocus.lvlm.registry",
    "register": "medfocus.lvlm.registry",
    "ModelEntry": "medfocus.lvlm.registry",
    "score_chat": "medfocus.lvlm.scoring",
    "answer_logprobs": "medfocus.lvlm.scoring",
    "parse_yes_no": "medfocus.lvlm.answers",
    "parse_boxes": "medfocus.lvlm.box_text",
    "build_tiny": "medfocus.lvlm.tiny",
    "generate_answers": "medfocus.lvlm.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medfocus.lvlm' has no attribute {name!r}")
