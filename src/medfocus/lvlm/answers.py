"""Final yes/no extraction from direct and step-by-step model outputs (pure text rules, never ``eval``).

Rules, in order (the first that decides wins):

1. empty / whitespace-only text -> ``None`` ("yes or no" / "yes/no" is removed first);
2. an explicit final-answer marker -- "answer is", "answer:", "final answer", "therefore", "thus",
   "hence", "so", "in conclusion", "conclusion:" -- followed within a few words by yes/no: the *last*
   such marker decides (step-by-step outputs end with their conclusion);
3. the first word is yes/no ("Yes, ..." / "No." / "**No**");
4. the last sentence is just yes/no;
5. standalone words "yes"/"no" anywhere: if only one of them occurs it decides; both -> ``None``;
6. no yes/no word at all: clear negative phrasing ("does not", "absent", "negative for", "no evidence",
   "not seen"...) -> "No", clear positive phrasing ("there is evidence", "is present", "positive for",
   "consistent with"...) -> "Yes"; both or neither -> ``None``.
"""

from __future__ import annotations

import re

_MD = re.compile(r"[*_`#>]+")
_WS = re.compile(r"\s+")
_MARKER = re.compile(
    r"(?:final answer|the answer|answer|therefore|thus|hence|in conclusion|conclusion|so)\b"
    r"(?:\s+(?:is|would be|will be|=))?\s*[:,\-\u2014\u2013]?\s*(?:\w+\s+){0,2}?\b(yes|no)\b"
)
_YESNO = re.compile(r"\b(yes|no)\b")
_NEG = re.compile(
    r"\b(?:does not|do not|doesn't|don't|is not|isn't|are not|aren't|not (?:seen|present|visible|identified|evident|observed)|"
    r"absent|absence of|negative for|without evidence|no evidence|unremarkable|cannot be seen)\b"
)
_POS = re.compile(r"\b(?:there is evidence|there are signs|is present|are present|positive for|consistent with|suggestive of|indicative of|shows (?:a|an|signs))\b")
#: "yes or no" / "yes/no" (an echoed instruction or a non-answer) is removed before the rules apply.
_BOTH = re.compile(r"\b(?:yes\s*(?:/|or)\s*no|no\s*(?:/|or)\s*yes)\b")


def _normalise(text: str) -> str:
    t = _MD.sub(" ", text)
    t = t.replace("\u2019", "'").lower()
    return _WS.sub(" ", t).strip()


def parse_yes_no(text: str | None) -> str | None:
    """Final answer of a model output: ``"Yes"``, ``"No"`` or ``None`` (unparseable / ambiguous).

    Args:
        text: the generated text (direct or step-by-step).
    Returns:
        ``"Yes"`` / ``"No"`` / ``None`` following the rules in the module docstring.
    """
    if text is None:
        return None
    t = _BOTH.sub(" ", _normalise(str(text))).strip()
    if not t.strip(" .!?,;:"):
        return None
    markers = list(_MARKER.finditer(t))
    if markers:
        return markers[-1].group(1).capitalize()
    first = re.match(r"^[^\w]*(yes|no)\b", t)
    if first:
        return first.group(1).capitalize()
    sentences = [s.strip(" .!,;:") for s in re.split(r"[.!?\n]+", t) if s.strip(" .!,;:")]
    if sentences and sentences[-1] in ("yes", "no"):
        return sentences[-1].capitalize()
    words = {m.group(1) for m in _YESNO.finditer(t)}
    if len(words) == 1:
        return words.pop().capitalize()
    if len(words) == 2:
        return None
    neg, pos = bool(_NEG.search(t)), bool(_POS.search(t))
    if neg and not pos:
        return "No"
    if pos and not neg:
        return "Yes"
    return None
