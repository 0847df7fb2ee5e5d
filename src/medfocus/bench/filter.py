"""The three-step causal filter: pure decision logic on parsed answers.

For one (model, sample, mode) the model answers four images: the original, the *foreground* edit
(finding edited out of its boxes, "No {attribute}"), the *background* edit (everything outside the
boxes edited, "No {attribute}") and the *background-normal* edit (outside edited, "No abnormality").
The sample is kept iff

1. **correct** — the original answer equals the ground truth;
2. **flip** — the foreground answer differs from the original answer;
3. **background** — both background answers equal the original answer.

Gates are applied in that order; a sample is charged to the *first* gate it fails, so
``kept + failed_correct + failed_flip + failed_background (+ errors) == n``. An answer the parser
cannot read (neither yes nor no) fails the gate that needs it and is counted as *unparseable* for
that gate. Each gate's own pass/fail (independent of the others) is recorded too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: Names of the four generations, in the order the filter makes them, and the MedGround-Bench
#: record field each one fills (``{mode}`` is ``direct`` or ``cot``).
VIEWS: tuple[str, ...] = ("original", "foreground", "background", "background_normal")
RECORD_FIELDS: dict[str, str] = {
    "original": "prediction_{mode}",
    "foreground": "prediction_edited_{mode}",
    "background": "prediction_edited_kept_{mode}",
    "background_normal": "prediction_edited_kept_normal_{mode}",
}
#: The gates, in order.
GATES: tuple[str, ...] = ("correct", "flip", "background")

ParseFn = Callable[[str], "str | None"]

@dataclass
class FilterResult:
    """Outcome of the filter for one sample.

    Attributes:
        parsed: view -> "Yes" / "No" / None (unparseable).
        kept: all three gates passed.
        failed_gate: first gate failed (``"correct"``, ``"flip"``, ``"background"``) or None.
        unparseable: True when the first failed gate failed because an answer it needed was unreadable.
        gates: each gate's own outcome (flip and background judged against the original answer
            even when the original is wrong).
    """

    parsed: dict[str, str | None]
    kept: bool
    failed_gate: str | None
    unparseable: bool
    gates: dict[str, bool] = field(default_factory=dict)


def apply_filter(answer: str, parsed: dict[str, str | None]) -> FilterResult:
    """Apply the three gates to parsed answers (see module docstring).

    Args:
        answer: ground truth, ``"Yes"`` or ``"No"``.
        parsed: view -> parsed answer for the four :data:`VIEWS`.
    """
    o, f = parsed["original"], parsed["foreground"]
    b, bn = parsed["background"], parsed["background_normal"]
    g_correct = o is not None and o == answer
    g_flip = o is not None and f is not None and f != o
    g_bg = o is not None and b == o and bn == o
    gates = {"correct": g_correct, "flip": g_flip, "background": g_bg}
    if not g_correct:
        return FilterResult(parsed, False, "correct", o is None, gates)
    if not g_flip:
        return FilterResult(parsed, False, "flip", f is None, gates)
    if not g_bg:
        return FilterResult(parsed, False, "background", b is None or bn is None, gates)
    return FilterResult(parsed, True, None, False, gates)
