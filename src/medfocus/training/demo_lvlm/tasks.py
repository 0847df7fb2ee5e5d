"""The demo LVLM's four training tasks and their answer templates (see :mod:`medfocus.training.demo_lvlm`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from medfocus.types import EVIDENCE_REQUESTS, SUFFIXES, build_question, question_stem

TASKS = ("direct", "cot", "boxes", "phrases")


def task_question(finding: str, task: str) -> str:
    """The full user text of a training task for a finding (see module docstring)."""
    stem = question_stem(finding)
    if task in ("direct", "cot"):
        return build_question(stem, task)
    if task in EVIDENCE_REQUESTS:
        return f"{stem} {EVIDENCE_REQUESTS[task]}"
    raise ValueError(f"unknown demo task {task!r}; expected one of {TASKS}")


def _side(concept: str | None) -> str | None:
    if concept is None:
        return None
    if concept.startswith("left"):
        return "left"
    if concept.startswith("right"):
        return "right"
    return None


def _sides_phrase(sides: Sequence[str]) -> str:
    s = sorted(set(x for x in sides if x))
    if len(s) == 2:
        return "both"
    return s[0] if s else "right"


@dataclass
class FindingView:
    """What the templates need about one finding instance: its name, canvas box, side and zone."""

    name: str
    box: tuple[int, int, int, int]  # canvas pixels, half-open
    side: str | None  # "left" / "right" (patient side, as the concept names) or None
    zone: str  # "upper" / "middle" / "lower"
    concept: str | None


_POS = {
    "cardiomegaly": "The cardiac silhouette is enlarged.",
    "pleural effusion": "The {sides} costophrenic {angle} blunted with a meniscus.",
    "nodule": "There is a small round opacity in the {sides} {zone} {lung}.",
    "mass": "There is a large rounded mass in the {sides} {zone} {lung}.",
    "pneumothorax": "The {sides} {lung} edge is separated from the chest wall with no lung markings beyond it.",
    "consolidation": "There is a patchy airspace opacity in the {sides} {zone} {lung}.",
    "atelectasis": "There is a band of volume loss in the {sides} {zone} {lung}.",
}


_NEG = {
    "cardiomegaly": "The cardiac silhouette is normal in size.",
    "pleural effusion": "Both costophrenic angles are sharp.",
    "nodule": "The lungs show no focal nodule.",
    "mass": "The lungs show no mass.",
    "pneumothorax": "Lung markings extend to the chest wall on both sides.",
    "consolidation": "The lungs show no airspace opacity.",
    "atelectasis": "The lungs are well expanded without volume loss.",
}


_PHRASE = {
    "cardiomegaly": "enlarged cardiac silhouette",
    "pleural effusion": "blunted {side} costophrenic angle",
    "nodule": "small nodule in the {side} {zone} lung",
    "mass": "mass in the {side} {zone} lung",
    "pneumothorax": "absent lung markings at the {side} lung edge",
    "consolidation": "airspace opacity in the {side} {zone} lung",
    "atelectasis": "volume loss in the {side} {zone} lung",
}


def rationale(finding: str, views: Sequence[FindingView]) -> str:
    """Step-by-step answer: one sentence about the region, then ``Therefore, yes/no.``.

    ``views`` are the instances of ``finding`` in the image (empty: the finding is absent).
    """
    if not views:
        return f"{_NEG[finding]} Therefore, no."
    sides = _sides_phrase([v.side for v in views if v.side])
    zones = sorted({v.zone for v in views})
    both = sides == "both"
    text = _POS[finding].format(sides=sides, zone=zones[0] if len(zones) == 1 else "middle",
                                lung="lungs" if both else "lung", angle="angles are" if both else "angle is")
    return f"{text} Therefore, yes."


def direct_answer(present: bool) -> str:
    return "Yes" if present else "No"


def boxes_answer(views: Sequence[FindingView]) -> str:
    """``[[x1, y1, x2, y2], ...]`` in canvas pixels (integers), ``[]`` when absent."""
    return "[" + ", ".join(f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]" for b in (v.box for v in views)) + "]"


def phrases_answer(finding: str, views: Sequence[FindingView]) -> str:
    """A JSON-style list of short evidence phrases, ``[]`` when absent."""
    phrases: list[str] = []
    for v in views:
        p = _PHRASE[finding].format(side=v.side or "right", zone=v.zone)
        if p not in phrases:
            phrases.append(p)
    return "[" + ", ".join(f'"{p}"' for p in phrases) + "]"


def target_text(finding: str, task: str, views: Sequence[FindingView]) -> str:
    """Assistant text for ``task`` about ``finding`` given its instances (empty: absent)."""
    if task == "direct":
        return direct_answer(bool(views))
    if task == "cot":
        return rationale(finding, views)
    if task == "boxes":
        return boxes_answer(views)
    if task == "phrases":
        return phrases_answer(finding, views)
    raise ValueError(f"unknown demo task {task!r}")


def _corpus(findings: Sequence[str], canvas: int) -> list[str]:
    """Every text the model reads or writes (for training the BPE)."""
    lines = ["You are a helpful assistant.", "Yes", "No", "Yes.", "No.", "The answer is yes.", "The answer is no.",
             "0123456789", "[]", "[[", "]]", ", "]
    for f in findings:
        for t in TASKS:
            lines.append(task_question(f, t))
        lines.append(question_stem(f) + SUFFIXES["open"])
        lines.append(_NEG[f] + " Therefore, no.")
        for side in ("left", "right"):
            for zone in ("upper", "middle", "lower"):
                v = FindingView(f, (0, 0, 1, 1), side, zone, None)
                lines.append(rationale(f, [v]))
                lines.append(phrases_answer(f, [v]))
        lines.append(rationale(f, [FindingView(f, (0, 0, 1, 1), "left", "lower", None), FindingView(f, (0, 0, 1, 1), "right", "lower", None)]))
    rng = random.Random(0)
    for _ in range(200):
        x = sorted(rng.randrange(canvas) for _ in range(2))
        y = sorted(rng.randrange(canvas) for _ in range(2))
        lines.append(f"[[{x[0]}, {y[0]}, {x[1]}, {y[1]}]]")
    return lines * 2
