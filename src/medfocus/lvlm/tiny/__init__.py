"""Tiny, randomly initialised but *genuine* LVLM folders for tests (fully offline).

``build_tiny(family, out_dir)`` writes a folder that loads with ``from_pretrained`` exactly like a real
checkpoint: ``config.json`` + ``model.safetensors`` of the real transformers architecture
(Qwen2.5-VL, Gemma 3, LLaVA-1.5), a tokenizer trained locally with ``tokenizers`` and wrapped in the
family's real tokenizer class (real special tokens and chat template), and the family's image
processor configuration. Each folder is about 1-3 MB.

Tokenizers: Qwen uses byte-level BPE (merges stored as a list of ``(left, right)`` tuples); Gemma and
LLaVA (Llama) use SentencePiece-style BPE with ``"▁"`` for spaces and ``<0xXX>`` byte fallback, as the
real ones do.

One module per family (:mod:`~.qwen_vl`, :mod:`~.gemma3`, :mod:`~.llava`) holds its builder with its chat
template and special tokens; the family adapters (:mod:`medfocus.lvlm.families`) hold no builders, so
neither side imports the other.
"""

from __future__ import annotations

from pathlib import Path

from medfocus.errors import ConfigError
from medfocus.lvlm.tiny.gemma3 import GEMMA3_CHAT_TEMPLATE, GEMMA3_SPECIAL, build_tiny_gemma3
from medfocus.lvlm.tiny.llava import LLAVA_CHAT_TEMPLATE, LLAVA_SPECIAL, build_tiny_llava
from medfocus.lvlm.tiny.qwen_vl import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL, build_tiny_qwen_vl, qwen_vl_config

__all__ = [
    "FAMILIES",
    "GEMMA3_CHAT_TEMPLATE",
    "GEMMA3_SPECIAL",
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_SPECIAL",
    "QWEN_CHAT_TEMPLATE",
    "QWEN_SPECIAL",
    "build_tiny",
    "build_tiny_gemma3",
    "build_tiny_llava",
    "build_tiny_qwen_vl",
    "qwen_vl_config",
]

FAMILIES = ("qwen_vl", "gemma3", "llava")


def build_tiny(family: str, out_dir: str | Path, *, seed: int = 0, canvas: int | None = None) -> Path:
    """Write a tiny random-initialised genuine model + processor folder of ``family``.

    Args:
        family: ``"qwen_vl"``, ``"gemma3"`` or ``"llava"``.
        out_dir: folder to create (parents too).
        seed: torch seed for the weights (deterministic).
        canvas: model-input canvas side in pixels (Qwen: a multiple of 28, default 112;
            Gemma 3 / LLaVA: the vision tower's ``image_size``, default 112 / 56).
    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`; load it with :func:`medfocus.lvlm.load_lvlm`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "qwen_vl":
        build_tiny_qwen_vl(out, seed, canvas or 112)
    elif family == "gemma3":
        build_tiny_gemma3(out, seed, canvas or 112)
    elif family == "llava":
        build_tiny_llava(out, seed, canvas or 56)
    else:
        raise ConfigError(f"build_tiny: unknown family {family!r}; expected one of {FAMILIES}")
    return out
