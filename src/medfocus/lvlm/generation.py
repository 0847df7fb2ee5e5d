"""Output modes: generate with the paper's suffix appended, and parse the final yes/no."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medfocus.lvlm.adapter import LVLMAdapter
from medfocus.lvlm.answers import parse_yes_no
from medfocus.types import build_question


@dataclass
class Generated:
    """One generation: the full question asked, the raw text, and the parsed answer (``None`` if unparseable)."""

    question: str
    text: str
    answer: str | None


def generate_answers(adapter: LVLMAdapter, images: Sequence[np.ndarray], stems: Sequence[str], mode: str = "direct", *,
                     max_new_tokens: int | None = None, batch_size: int = 8) -> list[Generated]:
    """Greedy, batched generation for ``(image, question stem)`` pairs in an output mode.

    Args:
        images: ``(H0, W0)`` uint8 images.
        stems: questions without suffix (e.g. ``Sample.question``).
        mode: ``"direct"`` or ``"cot"`` (or ``"open"``); the paper's suffix is appended.
        max_new_tokens: default 16 for direct, 256 for step-by-step / open.
    Returns:
        One :class:`Generated` per pair, in order.
    """
    questions = [build_question(s, mode) for s in stems]
    if max_new_tokens is None:
        max_new_tokens = 16 if mode == "direct" else 256
    texts = adapter.generate(list(images), questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [Generated(q, t, parse_yes_no(t)) for q, t in zip(questions, texts)]
