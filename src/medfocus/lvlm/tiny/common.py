"""What the tiny builders share: a small CXR corpus, BPE training with a family's own normalizer and
pre-tokenizer, and the ``medfocus.json`` hints file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_FINDINGS = ("cardiomegaly", "pleural effusion", "nodule", "mass", "pneumothorax", "consolidation", "atelectasis",
             "lung opacity", "aortic enlargement", "pulmonary fibrosis", "infiltration", "edema")


_REGIONS = ("left lung", "right lung", "cardiac silhouette", "mediastinum", "upper mediastinum", "left clavicle",
            "right clavicle", "left hilar structures", "right hilar structures", "left costophrenic angle",
            "right costophrenic angle")


def _corpus() -> list[str]:
    """Small English/CXR corpus so the BPE learns the words our prompts and answers use."""
    from medfocus.types import SUFFIXES, question_stem

    lines: list[str] = []
    for f in _FINDINGS:
        for suffix in SUFFIXES.values():
            lines.append(question_stem(f) + suffix)
        for r in _REGIONS:
            lines.append(f"Looking at the {r}, there is evidence of {f}. Therefore, yes.")
            lines.append(f"The {r} appears normal with no {f}. Therefore, no.")
    lines += ["Yes", "No", "Yes.", "No.", "yes", "no", "The answer is yes.", "The answer is no.",
              "You are a helpful assistant.", "output the bounding boxes of the local evidence as [[x1, y1, x2, y2], ...]",
              "output short descriptions of the evidence regions as a list of phrases",
              "[[12, 34, 56, 78], [90, 12, 34, 56]]", "0123456789"]
    return lines * 3


def _train_bpe(backend: Any, vocab_size: int, special_tokens: list[str], initial_alphabet: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a BPE with ``backend``'s own normalizer and pre-tokenizer; return ``(vocab, merges)``."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = backend.normalizer
    tok.pre_tokenizer = backend.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=initial_alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def _write_medfocus_json(out_dir: Path, d: dict[str, Any]) -> None:
    """``medfocus.json``: optional per-folder hints (family, canvas) read by :func:`medfocus.lvlm.load_lvlm`."""
    (out_dir / "medfocus.json").write_text(json.dumps(d, indent=1))
