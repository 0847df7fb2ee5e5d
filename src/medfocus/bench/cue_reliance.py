"""Known-by-construction cue reliance: which correct "yes" answers a shortcut cue decided.

On the synthetic world every shortcut cue is drawn from its own random stream, so the same film can be
rendered with and without its cues and be otherwise pixel-identical (``write_dataset(..., cue_rate=1)``
and ``write_dataset(..., cue_rate=0)`` at the same seed give the same anatomy, findings and noise). A
positive sample whose film carries the correlated cue of the asked finding is **cue-necessary** for a
model when the model answers "Yes" on the film and "No" on the same film with the cues removed (and
nothing else changed): the cue decided that answer. It is **cue-independent** when the "Yes" survives
the removal.

This is an ablation of the cue alone, independent of the causal filter's background edit (which redraws
everything outside the finding's box *and* removes the cues), so the filter's retention can be scored
against it: a sound filter keeps almost no cue-necessary samples and keeps the cue-independent ones
(:func:`retention_by_reliance`). It also says where an attribution map *should* point for a
cue-necessary answer: at the cue (scored by :func:`medfocus.evaluation.metrics.cue_pointing`).

Used by ``benchmarks/shortcut.py`` and ``tests/test_shortcut_twin.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from medfocus.datasets.synthetic.cues import predates_whole_cue_boxes
from medfocus.errors import DataError
from medfocus.types import Sample, build_question

__all__ = ["CueOutcome", "correlated_cue_box", "cue_necessity", "retention_by_reliance"]


@dataclass(frozen=True)
class CueOutcome:
    """One positive sample whose film carries the asked finding's correlated cue.

    Attributes:
        index: the sample's index in its dataset.
        answer_cued: parsed answer on the film with its cues ("Yes", "No" or None: unparseable).
        answer_free: parsed answer on the same film without cues.
        cue_box: the cue's box ``(x1, y1, x2, y2)``, half-open pixel edges of the original image.
    """

    index: int
    answer_cued: str | None
    answer_free: str | None
    cue_box: tuple[float, float, float, float]

    @property
    def correct(self) -> bool:
        """The model says "Yes" (the truth) on the cued film."""
        return self.answer_cued == "Yes"

    @property
    def cue_necessary(self) -> bool:
        """Correct on the cued film and "No" once only the cues are removed: the cue decided the answer."""
        return self.correct and self.answer_free == "No"

    @property
    def cue_independent(self) -> bool:
        """Correct on the cued film and still "Yes" without the cues."""
        return self.correct and self.answer_free == "Yes"


def correlated_cue_box(sample: Sample) -> tuple[float, float, float, float] | None:
    """The box of the shortcut cue the synthetic world drew *for the asked finding* (``meta["cues"]``
    entries whose ``finding`` is ``sample.attribute``; every pixel the cue changes), or None when the film
    has no such cue.

    Raises:
        DataError: the record predates boxes that hold the whole cue (no ``core_box``: its ``box`` was the
            stroke's core, which misses the fringe and blur), so it would score pointing at the cue wrongly.
    """
    for c in sample.meta.get("cues", []) or []:
        if c.get("finding") == sample.attribute:
            if predates_whole_cue_boxes(c):
                raise DataError(f"{sample.image_path}: its cue record was written by an older medfocus whose cue box "
                                "missed the cue's faint edge; write the dataset again with `medfocus synth` (same "
                                "seed and settings: the same films, whole-cue boxes)")
            x1, y1, x2, y2 = (float(v) for v in c["box"])
            return (x1, y1, x2, y2)
    return None


def cue_necessity(adapter: Any, cued: Sequence[Sample], cue_free: Sequence[Sample], *, mode: str = "direct",
                  batch_size: int = 16, max_new_tokens: int | None = None) -> list[CueOutcome]:
    """Answer every positive of ``cued`` that carries its correlated cue, with and without the cues.

    Args:
        adapter: an :class:`~medfocus.lvlm.adapter.LVLMAdapter` (only ``generate`` is used; greedy).
        cued: samples of a synthetic dataset written with ``cue_rate > 0``.
        cue_free: the samples of the same dataset (same seed, size and films) written with ``cue_rate=0``;
            matched to ``cued`` by ``(meta["image_id"], attribute)``.
        mode: ``"direct"`` or ``"cot"`` (the paper's question suffix for that mode).
        batch_size, max_new_tokens: generation settings (default budget: 16 tokens direct, 256 cot,
            as :func:`medfocus.bench.build_benchmark`).

    Returns:
        One :class:`CueOutcome` per positive with its correlated cue, in ``cued`` order.

    Raises:
        DataError: a cued positive has no cue-free counterpart, or the two renders differ in size (not
            the same films).
    """
    from medfocus.bench.build import DEFAULT_MAX_NEW_TOKENS
    from medfocus.io import read_image
    from medfocus.lvlm.answers import parse_yes_no

    free = {(s.meta.get("image_id"), s.attribute): s for s in cue_free}
    todo: list[tuple[Sample, Sample, tuple[float, float, float, float]]] = []
    for s in cued:
        box = correlated_cue_box(s) if s.answer == "Yes" else None
        if box is None:
            continue
        twin = free.get((s.meta.get("image_id"), s.attribute))
        if twin is None:
            raise DataError(f"cued sample {s.meta.get('image_id')!r} ({s.attribute}) has no cue-free counterpart: write both "
                            "datasets with the same seed, size and number of films")
        if tuple(twin.image_size) != tuple(s.image_size):
            raise DataError(f"{s.meta.get('image_id')!r}: cued film is {s.image_size}, cue-free film {twin.image_size} (not the same film)")
        todo.append((s, twin, box))
    if not todo:
        return []
    images = [read_image(s.image_path)[0] for s, _, _ in todo] + [read_image(t.image_path)[0] for _, t, _ in todo]
    questions = [build_question(s.question, mode) for s, _, _ in todo] * 2
    texts = adapter.generate(images, questions, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[mode],
                             batch_size=batch_size)
    n = len(todo)
    return [CueOutcome(int(s.index), parse_yes_no(texts[k]), parse_yes_no(texts[n + k]), box)
            for k, (s, _, box) in enumerate(todo)]


def retention_by_reliance(outcomes: Sequence[CueOutcome], kept: dict[int, bool]) -> dict[str, tuple[int, int]]:
    """How many cue-necessary and cue-independent samples the causal filter kept.

    Args:
        outcomes: :func:`cue_necessity` results.
        kept: sample index -> kept by the filter (from the benchmark log of the same model and mode).

    Returns:
        ``{"cue_necessary": (kept, n), "cue_independent": (kept, n)}`` over the outcomes the log covers.
    """
    out: dict[str, tuple[int, int]] = {}
    for group in ("cue_necessary", "cue_independent"):
        members = [o for o in outcomes if getattr(o, group) and o.index in kept]
        out[group] = (sum(bool(kept[o.index]) for o in members), len(members))
    return out
