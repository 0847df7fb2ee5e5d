"""medfocus.lvlm: registry, loading, family adapters, teacher-forced scoring, answers, tiny builders.

Public names are imported lazily (``from medfocus.lvlm import load_lvlm``) so that importing the package
does not import transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medfocus.registry import lazy_exports

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

__all__ = [
    "ChatInputs",
    "LVLMAdapter",
    "ModelEntry",
    "answer_logprobs",
    "build_tiny",
    "generate_answers",
    "get_entry",
    "list_models",
    "load_lvlm",
    "parse_boxes",
    "parse_yes_no",
    "register",
    "score_chat",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for IDEs, type checkers and help()
    from medfocus.lvlm.adapter import ChatInputs, LVLMAdapter
    from medfocus.lvlm.answers import parse_yes_no
    from medfocus.lvlm.box_text import parse_boxes
    from medfocus.lvlm.generation import generate_answers
    from medfocus.lvlm.loading import load_lvlm
    from medfocus.lvlm.registry import ModelEntry, get_entry, list_models, register
    from medfocus.lvlm.scoring import answer_logprobs, score_chat
    from medfocus.lvlm.tiny import build_tiny
