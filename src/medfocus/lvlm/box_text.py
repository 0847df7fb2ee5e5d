"""The one box-text parser: boxes written by a model, in every common dialect of the supported families.

Dialects (each read by a regular expression, never ``eval``), in the order they are tried; text a
dialect reads is not read again by a later one:

============  ======================================================  ==========================================
dialect       example                                                 coordinates
============  ======================================================  ==========================================
``qwen2_tok`` ``<|box_start|>(120,610),(430,890)<|box_end|>``         Qwen2-VL: ``x1, y1, x2, y2`` on 0..1000 (fixed)
``loc``       ``<loc0256><loc0100><loc0768><loc0900>``                PaliGemma: ``y1, x1, y2, x2`` on 0..1023 (fixed;
                                                                      a value ``v`` is the edge ``v / 1024``)
``box_2d``    ``{"box_2d": [610, 120, 890, 430], "label": "..."}``    Gemini/Gemma style: ``y1, x1, y2, x2`` on
                                                                      0..1000 (fixed)
``bbox_2d``   ``{"bbox_2d": [120, 610, 430, 890]}`` (also ``bbox``)   Qwen2.5-VL JSON: ``coords`` (auto: canvas pixels)
``pairs``     ``(120,610),(430,890)`` (Qwen2-VL without the tokens)   ``coords`` (auto: 0..1000, Qwen2-VL's frame)
``list``      ``[120, 610, 430, 890]`` / ``[[..], [..]]`` / ``(..)``  ``coords`` (auto: the family's default)
============  ======================================================  ==========================================

``coords`` is ``"canvas"`` (pixels of the model-input frame), ``"norm1000"`` (0..1000), ``"relative"``
(0..1) or ``"auto"``. Whatever ``coords`` says, a box of the last three dialects whose four numbers
all lie in [0, 1] with at least one fraction is read as **relative** (``[0.12, 0.3, 0.5, 0.71]`` is
never a sub-pixel box). Family defaults for ``list`` under ``"auto"`` (:data:`FAMILY_BOX_COORDS`):
``qwen_vl`` -> ``canvas`` (Qwen2.5-VL answers in absolute pixels of its input, the demo model too),
``gemma3`` -> ``norm1000`` (Gemma 3 / MedGemma follow the Gemini 0..1000 convention), ``llava`` ->
``relative`` (LLaVA-1.5 was trained on 0..1 boxes); any other family -> ``canvas``.

Every box is then put in frame pixels, its corners ordered, clipped to the frame, and dropped when
empty. The result says what happened (:class:`BoxText`): ``status`` is ``"boxes"`` (at least one
box), ``"empty"`` (no box: ``"[]"``, prose without box-like text, or only boxes empty after
clipping) or ``"unparseable"`` — the text holds **box-like text that no rule can read** (box tokens
without two coordinate pairs, ``<loc>`` tokens not in fours, a ``bbox``/``box_2d`` key without four
numbers, a bracketed or parenthesised group of two or more numbers that is not a box) and no box was
read. An unparseable answer is not an empty prediction: callers record it as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from medfocus.errors import ConfigError
from medfocus.types import Box

__all__ = ["BoxText", "parse_boxes", "COORDS", "FAMILY_BOX_COORDS", "box_coords_for"]

COORDS = ("auto", "canvas", "norm1000", "relative")
#: Frame of the ``list`` dialect per adapter family when ``coords="auto"`` (see module docstring).
FAMILY_BOX_COORDS = {"qwen_vl": "canvas", "gemma3": "norm1000", "llava": "relative"}

_N = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"
_SEP = r"\s*,\s*"
_QWEN2_TOK = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
_PAIR2 = re.compile(r"^\s*\(\s*" + _N + _SEP + _N + r"\s*\)\s*,?\s*\(\s*" + _N + _SEP + _N + r"\s*\)\s*$")
_LOC4 = re.compile(r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>")
_LOC_ANY = re.compile(r"<loc\d+>")
_KEYED = re.compile(r"[\"']?\b(box_2d|bbox_2d|bbox)\b[\"']?\s*[:=]\s*(\[[^\[\]]*\]|\([^()]*\))")
_KEY_ANY = re.compile(r"\b(?:box_2d|bbox_2d|bbox)\b")
_PAIRS = re.compile(r"\(\s*" + _N + _SEP + _N + r"\s*\)\s*,?\s*\(\s*" + _N + _SEP + _N + r"\s*\)")
_LIST = re.compile(r"[\[(]\s*" + _N + _SEP + _N + _SEP + _N + _SEP + _N + r"\s*,?\s*[\])]")
_QUAD = re.compile(r"^[\[(]\s*" + _N + _SEP + _N + _SEP + _N + _SEP + _N + r"\s*,?\s*[\])]$")
#: A bracketed / parenthesised group holding at least two comma-separated numbers.
_BOXLIKE = re.compile(r"[\[(][^\[\]()]*?" + _N + _SEP + _N + r"[^\[\]()]*[\])]")


@dataclass(frozen=True)
class BoxText:
    """What :func:`parse_boxes` read.

    Attributes:
        boxes: ``(x1, y1, x2, y2)`` half-open boxes in frame pixels (ordered, clipped, non-empty).
        status: ``"boxes"``, ``"empty"`` or ``"unparseable"`` (see module docstring).
        dialects: the dialect of each box read (before clipping), in text order.
        unread: box-like fragments no rule could read (kept for the record; may be non-empty
            alongside read boxes).
    """

    boxes: list[Box] = field(default_factory=list)
    status: str = "empty"
    dialects: tuple[str, ...] = ()
    unread: tuple[str, ...] = ()


def box_coords_for(family: str | None) -> str:
    """Frame of the ``list`` dialect for an adapter family under ``coords="auto"``."""
    return FAMILY_BOX_COORDS.get(str(family), "canvas")


def _is_relative(vals: list[float]) -> bool:
    return all(0.0 <= v <= 1.0 for v in vals) and any(v != int(v) for v in vals)


def parse_boxes(text: str | None, frame_w: float, frame_h: float, coords: str = "auto",
                family: str | None = None) -> BoxText:
    """Read every box in ``text`` (see the module docstring for the dialects and frames).

    Args:
        text: the model's answer.
        frame_w, frame_h: the frame the model saw (its input canvas), in pixels.
        coords: ``"auto"``, ``"canvas"``, ``"norm1000"`` or ``"relative"`` — the frame of the
            ``bbox_2d``/``pairs``/``list`` dialects (token dialects carry their own).
        family: adapter family, for the ``list`` default under ``"auto"``.

    Returns:
        A :class:`BoxText`; boxes in frame pixels.

    Raises:
        ConfigError: unknown ``coords`` or a non-positive frame.
    """
    if coords not in COORDS:
        raise ConfigError(f"box text: coords must be one of {', '.join(COORDS)}, got {coords!r}")
    if not (frame_w > 0 and frame_h > 0):
        raise ConfigError(f"box text: frame must have a positive size, got {frame_w}x{frame_h}")
    s = text or ""
    scale = {"canvas": (1.0, 1.0), "norm1000": (frame_w / 1000.0, frame_h / 1000.0), "relative": (float(frame_w), float(frame_h))}
    found: list[tuple[int, str, tuple[float, float, float, float]]] = []  # (position, dialect, frame box)
    unread: list[tuple[int, str]] = []
    mask = list(s)

    def consume(a: int, b: int) -> None:
        mask[a:b] = " " * (b - a)

    def add(pos: int, dialect: str, vals: list[float], frame: str) -> None:
        if dialect in ("bbox_2d", "pairs", "list") and _is_relative(vals):
            frame = "relative"
        sx, sy = scale[frame]
        x1, y1, x2, y2 = vals
        found.append((pos, dialect, (x1 * sx, y1 * sy, x2 * sx, y2 * sy)))

    def open_frame(default: str) -> str:
        return coords if coords != "auto" else default

    for m in _QWEN2_TOK.finditer(s):
        p = _PAIR2.match(m.group(1))
        if p:
            add(m.start(), "qwen2_tok", [float(v) for v in p.groups()], "norm1000")
        else:
            unread.append((m.start(), m.group(0)))
        consume(m.start(), m.end())
    cur = "".join(mask)
    for m in _LOC4.finditer(cur):
        y1, x1, y2, x2 = (int(v) / 1024.0 for v in m.groups())
        add(m.start(), "loc", [x1, y1, x2, y2], "relative")
        consume(m.start(), m.end())
    cur = "".join(mask)
    for m in _LOC_ANY.finditer(cur):  # stray <loc> tokens, not in groups of four
        unread.append((m.start(), m.group(0)))
        consume(m.start(), m.end())
    cur = "".join(mask)
    for m in _KEYED.finditer(cur):
        q = _QUAD.match(m.group(2))
        if q:
            vals = [float(v) for v in q.groups()]
            if m.group(1) == "box_2d":
                y1, x1, y2, x2 = vals
                add(m.start(), "box_2d", [x1, y1, x2, y2], "norm1000")
            else:
                add(m.start(), "bbox_2d", vals, open_frame("canvas"))
        else:
            unread.append((m.start(), m.group(0)))
        consume(m.start(), m.end())
    cur = "".join(mask)
    for m in _KEY_ANY.finditer(cur):  # a box key without a bracketed value
        unread.append((m.start(), m.group(0)))
        consume(m.start(), m.end())
    cur = "".join(mask)
    for m in _PAIRS.finditer(cur):
        add(m.start(), "pairs", [float(v) for v in m.groups()], open_frame("norm1000"))
        consume(m.start(), m.end())
    cur = "".join(mask)
    for m in _LIST.finditer(cur):
        add(m.start(), "list", [float(v) for v in m.groups()], open_frame(box_coords_for(family)))
        consume(m.start(), m.end())
    cur = "".join(mask)
    for m in _BOXLIKE.finditer(cur):
        unread.append((m.start(), m.group(0)))

    found.sort(key=lambda f: f[0])
    boxes: list[Box] = []
    for _, _, (x1, y1, x2, y2) in found:
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        x1, x2 = min(max(x1, 0.0), float(frame_w)), min(max(x2, 0.0), float(frame_w))
        y1, y2 = min(max(y1, 0.0), float(frame_h)), min(max(y2, 0.0), float(frame_h))
        if x2 > x1 and y2 > y1:
            boxes.append((x1, y1, x2, y2))
    status = "boxes" if boxes else ("unparseable" if unread and not found else "empty")
    return BoxText(boxes=boxes, status=status, dialects=tuple(f[1] for f in found),
                   unread=tuple(u for _, u in sorted(unread)))
