"""Final yes/no extraction from direct and step-by-step model outputs (pure text rules, never ``eval``).

Normalisation: markdown (``* _ ` # >``), LaTeX ``\\boxed{...}`` and ``$``, double quotes and HTML-like
tags are removed; ``<answer>`` counts as "answer:"; when a reasoning block ends with ``</think>``
only the text after it is read (when there is any). "yes or no", "yes/no" and "yes and no" (an
echoed instruction or a non-answer) are removed. Text is lowercased.

An **answer word** is "yes" or "no" followed by the end of the text, a line end or punctuation
(``. , ! ? ; : )``, a dash) — never by another word, so the determiner in "no costophrenic angle" or "no
evidence of" is not an answer. A **marker** counts only when the answer word follows it within a
few words that contain no negation ("the answer is clearly yes" counts, "the answer cannot be yes"
does not).

Rules, in order (the first that decides wins):

1. empty / whitespace-only text -> ``None``;
2. an **explicit answer marker** -- "final answer", "final response", "answer is", "answer:",
   "conclusion", "verdict" -- followed by an answer word: the *last* such one decides;
3. a **conclusion marker** -- "therefore", "thus", "hence", "so", "overall", "in summary",
   "consequently" -- followed by an answer word: the *last* such one decides (step-by-step outputs
   end with their conclusion; a leading "Yes." is only overridden by such a conclusion, never by an
   incidental "so ... no <noun>");
4. the first word is yes/no ("Yes, ..." / "No." / "**No**" / "No focal opacity ...");
5. the last sentence is just yes/no;
6. answer words that stand on their own: if only one of yes/no occurs it decides; both -> ``None``.
   An answer word stands on its own where it starts a clause (after the start of the text, a line
   end or punctuation: "Based on the image, no, ...") or follows a hedge ("probably yes", "I think
   no"); after any other word it is a sentence cut short ("... is blunted with no"), not an answer;
7. no answer word: phrases of uncertainty ("cannot determine", "not sure", "I don't know") are
   removed, then clear negative phrasing ("no <finding>", "does not", "absent", "negative for",
   "without evidence", "not seen"...) -> "No", clear positive phrasing outside those negative spans
   ("there is evidence", "is present", "positive for", "consistent with" not preceded by "not"...)
   -> "Yes"; both or neither -> ``None``.

A **degenerate** generation -- one word repeated four or more times in a row, glued or spaced
("ThereThereThereThere is blunted with no[]", the loop a greedy decoder falls into) -- is read only
by rules 1-5: a clear marker, leading or closing answer still decides, but no answer is guessed from
the words of a broken text (rules 6 and 7), so it is ``None`` (unparsed) rather than a real "No".
"""

from __future__ import annotations

import re

_TAG = re.compile(r"<\s*/?\s*[a-z_]+\s*>")
_MD = re.compile(r"[*_`#>$\"\u201c\u201d]+")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}|\\text\s*\{([^{}]*)\}")
_WS = re.compile(r"[^\S\n]+")
_NL = re.compile(r"\s*\n\s*")
#: "yes or no" / "yes/no" / "yes and no" (an echoed instruction or a non-answer).
_BOTH = re.compile(r"\b(?:yes\s*(?:/|or|and)\s*no|no\s*(?:/|or|and)\s*yes)\b")

_EXPLICIT = re.compile(r"\b(?:final answer|final response|answer|conclusion|verdict)\b")
_CONCLUDE = re.compile(r"\b(?:therefore|thus|hence|so|overall|in summary|consequently)\b")
#: After a marker: up to ``n`` filler words (checked for negation), then an answer word followed by
#: the end of the text or punctuation.
_FOLLOW = {n: re.compile(r"^(?P<fill>(?:[^\w\n]*\w+){0,%d}?)[^\w\n]*\b(?P<word>yes|no)\b(?=[^\S\n]*(?:$|\n|[^\w\s]))" % n)
           for n in (3, 5)}
_NEGATION = re.compile(r"\b(?:not|cannot|can't|never|n't|isn't|wasn't|unlikely|if)\b|n't\b")
_ANSWER_WORD = re.compile(r"\b(yes|no)\b(?=[^\S\n]*(?:$|\n|[^\w\s]))")
_FIRST = re.compile(r"^[^\w]*(yes|no)\b")
#: Words after which a lone answer word is still an answer (rule 6): hedges, "I think / I'd say", "a yes".
_HEDGE = ("probably", "likely", "possibly", "maybe", "perhaps", "definitely", "certainly", "clearly", "surely",
          "think", "say", "believe", "guess", "a")
#: What may stand right before a lone answer word (rule 6): start, line end, punctuation or a hedge.
_STANDALONE = re.compile(r"(?:^|\n|[^\w\s][^\S\n]*|\b(?:%s)[^\S\n]+)$" % "|".join(_HEDGE))
#: One word (two letters or more) four or more times in a row, glued or spaced: a decoding loop.
_DEGENERATE = re.compile(r"([a-z]{2,})(?:[^\S\n]*\1){3,}")

_UNSURE = re.compile(
    r"\b(?:i\s+)?(?:do not|don't|cannot|can't|am not able to|unable to|not possible to|impossible to|"
    r"difficult to|hard to|not able to)\s+(?:know|determine|tell|say|assess|confirm|evaluate|be certain)\b|"
    r"\bnot (?:sure|certain)\b|\buncertain\b|\bunclear\b")
_NEG = re.compile(
    r"\b(?:does not|do not|doesn't|don't|is not|isn't|are not|aren't|"
    r"not (?:seen|present|visible|identified|evident|observed|demonstrated|appreciated)|"
    r"absent|absence of|negative for|without evidence|unremarkable|cannot be seen|"
    r"no\s+(?:[\w-]+\s+){0,4}?(?:is|are)\s+(?:present|seen|visible|identified|noted|evident)|"
    r"no(?!\s+(?:doubt|question|longer|matter|change)\b)\s+\w+)\b"
)
_POS = re.compile(
    r"\b(?:there is evidence|there are signs|is present|are present|positive for|(?<!not )consistent with|"
    r"(?<!not )suggestive of|(?<!not )indicative of|shows signs)\b"
)


def _normalise(text: str) -> str:
    t = _BOXED.sub(lambda m: " " + (m.group(1) or m.group(2) or "") + " ", text)
    t = t.replace("\u2019", "'").lower()
    if "</think>" in t and t.split("</think>")[-1].strip():
        t = t.split("</think>")[-1]
    t = re.sub(r"<\s*answer\s*>", " answer: ", t)
    t = _TAG.sub(" ", t)
    t = _MD.sub(" ", t)
    t = _BOTH.sub(" ", t)
    return _NL.sub("\n", _WS.sub(" ", t)).strip()


def _after_marker(t: str, marker: re.Pattern, n_fill: int) -> str | None:
    """The answer word of the *last* marker that is followed by one (see module docstring)."""
    found = None
    for m in marker.finditer(t):
        f = _FOLLOW[n_fill].match(t[m.end():])
        if f and not _NEGATION.search(f.group("fill")):
            found = f.group("word")
    return found


def parse_yes_no(text: str | None) -> str | None:
    """Final answer of a model output: ``"Yes"``, ``"No"`` or ``None`` (unparseable / ambiguous).

    Args:
        text: the generated text (direct or step-by-step), any of the families' styles (markdown,
            "Final answer:", ``<think>`` blocks, ``\\boxed{}``).
    Returns:
        ``"Yes"`` / ``"No"`` / ``None`` following the rules in the module docstring.
    """
    if text is None:
        return None
    t = _normalise(str(text))
    if not t.strip(" .!?,;:"):
        return None
    word = _after_marker(t, _EXPLICIT, 5) or _after_marker(t, _CONCLUDE, 3)
    if word:
        return word.capitalize()
    first = _FIRST.match(t)
    if first:
        return first.group(1).capitalize()
    sentences = [s.strip(" .!,;:") for s in re.split(r"[.!?\n]+", t) if s.strip(" .!,;:")]
    if sentences and sentences[-1] in ("yes", "no"):
        return sentences[-1].capitalize()
    if _DEGENERATE.search(t):  # a broken generation: no answer guessed from its words (module docstring)
        return None
    words = {m.group(1) for m in _ANSWER_WORD.finditer(t) if _STANDALONE.search(t[:m.start()])}
    if len(words) == 1:
        return words.pop().capitalize()
    if len(words) == 2:
        return None
    t = _UNSURE.sub(" ", t)
    # Positive phrasing inside a negated span ("no effusion is present") is not positive.
    neg, pos = bool(_NEG.search(t)), bool(_POS.search(_NEG.sub(" not", t)))
    if neg and not pos:
        return "No"
    if pos and not neg:
        return "Yes"
    return None
