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
from typing import Callable

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


def _sub(pattern: re.Pattern, s: str, idx: list[int], repl: Callable[[re.Match], tuple[str, list[int]]]) -> tuple[str, list[int]]:
    """``pattern.sub`` that carries, for every character, its index in the original text.

    ``repl(match) -> (text, indices)``; inserted characters carry -1. The parse rules read the normalised
    text, and :func:`answer_span` must point back into the text the model wrote."""
    out, oidx, last = [], [], 0
    for m in pattern.finditer(s):
        out.append(s[last:m.start()])
        oidx.extend(idx[last:m.start()])
        r, ri = repl(m)
        out.append(r)
        oidx.extend(ri)
        last = m.end()
    out.append(s[last:])
    oidx.extend(idx[last:])
    return "".join(out), oidx


def _blank(text: str) -> Callable[[re.Match], tuple[str, list[int]]]:
    return lambda m: (text, [-1] * len(text))


def _normalise_tracked(text: str) -> tuple[str, list[int]]:
    """The module docstring's normalisation, with each character's index in ``text`` (-1: inserted)."""
    def unbox(m: re.Match) -> tuple[str, list[int]]:
        g = 1 if m.group(1) is not None else 2
        inner = m.group(g) or ""
        return " " + inner + " ", [-1] + idx[m.start(g):m.start(g) + len(inner)] + [-1]

    idx = list(range(len(text)))
    t, idx = _sub(_BOXED, text, idx, unbox)
    # per character, because lower() may lengthen one ("\u0130" -> "i" + a combining dot)
    low = [(c.lower() if c != "\u2019" else "'", i) for c, i in zip(t, idx)]
    t, idx = "".join(c for c, _ in low), [i for c, i in low for _ in c]
    k = t.rfind("</think>")
    if k >= 0 and t[k + len("</think>"):].strip():
        t, idx = t[k + len("</think>"):], idx[k + len("</think>"):]
    t, idx = _sub(re.compile(r"<\s*answer\s*>"), t, idx, _blank(" answer: "))
    for pattern in (_TAG, _MD, _BOTH):
        t, idx = _sub(pattern, t, idx, _blank(" "))
    # whitespace runs collapse onto their first character's index
    t, idx = _sub(_WS, t, idx, lambda m: (" ", [idx[m.start()]]))
    t, idx = _sub(_NL, t, idx, lambda m: ("\n", [idx[m.start()]]))
    a = len(t) - len(t.lstrip())
    b = len(t.rstrip())
    return t[a:b], idx[a:b]


def _after_marker(t: str, marker: re.Pattern, n_fill: int) -> tuple[str, int] | None:
    """The answer word of the *last* marker that is followed by one, and where it starts in ``t`` (see
    module docstring)."""
    found = None
    for m in marker.finditer(t):
        f = _FOLLOW[n_fill].match(t[m.end():])
        if f and not _NEGATION.search(f.group("fill")):
            found = (f.group("word"), m.end() + f.start("word"))
    return found


def parse_yes_no(text: str | None) -> str | None:
    """Final answer of a model output: ``"Yes"``, ``"No"`` or ``None`` (unparseable / ambiguous).

    Args:
        text: the generated text (direct or step-by-step), any of the families' styles (markdown,
            "Final answer:", ``<think>`` blocks, ``\\boxed{}``).
    Returns:
        ``"Yes"`` / ``"No"`` / ``None`` following the rules in the module docstring.
    """
    return _decide(text)[0]


def answer_span(text: str | None) -> tuple[int, int] | None:
    """Where in ``text`` the word that decided :func:`parse_yes_no` stands.

    Args:
        text: the generated text, as for :func:`parse_yes_no`.
    Returns:
        ``(start, end)``, a half-open character span of ``text`` holding "yes" or "no" (any case), for
        rules 2-6 of the module docstring; ``None`` when no single word decided (rule 7's phrasing, an
        unparsed or ambiguous text). Attribution uses it to find the answer's deciding token, which in a
        step-by-step output is not always its last yes/no word ("Final answer: yes. No other finding").
    """
    return _decide(text)[1]


def _decide(text: str | None) -> tuple[str | None, tuple[int, int] | None]:
    """``(answer, span of the deciding word in text)``: the rules of the module docstring."""
    if text is None:
        return None, None
    t, idx = _normalise_tracked(str(text))

    def found(word: str, pos: int) -> tuple[str, tuple[int, int] | None]:
        first, last = idx[pos], idx[pos + len(word) - 1]
        # a word stitched from inserted characters has no place in the original text
        return word.capitalize(), ((first, last + 1) if first >= 0 and last >= first else None)

    if not t.strip(" .!?,;:"):
        return None, None
    hit = _after_marker(t, _EXPLICIT, 5) or _after_marker(t, _CONCLUDE, 3)
    if hit:
        return found(*hit)
    first = _FIRST.match(t)
    if first:
        return found(first.group(1), first.start(1))
    parts = [m for m in re.finditer(r"[^.!?\n]+", t) if m.group().strip(" .!,;:")]
    if parts and parts[-1].group().strip(" .!,;:") in ("yes", "no"):
        last = parts[-1]
        word = last.group().strip(" .!,;:")
        return found(word, last.start() + last.group().index(word))
    if _DEGENERATE.search(t):  # a broken generation: no answer guessed from its words (module docstring)
        return None, None
    lone = [m for m in _ANSWER_WORD.finditer(t) if _STANDALONE.search(t[:m.start()])]
    words = {m.group(1) for m in lone}
    if len(words) == 1:
        return found(lone[-1].group(1), lone[-1].start(1))
    if len(words) == 2:
        return None, None
    t = _UNSURE.sub(" ", t)
    # Positive phrasing inside a negated span ("no effusion is present") is not positive.
    neg, pos = bool(_NEG.search(t)), bool(_POS.search(_NEG.sub(" not", t)))
    if neg and not pos:
        return "No", None
    if pos and not neg:
        return "Yes", None
    return None, None
