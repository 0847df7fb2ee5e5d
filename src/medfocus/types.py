"""Core data model shared by every module.

Boxes are ``(x1, y1, x2, y2)`` pixel *edges*, half-open: a component covering columns 3..5 has
``x1 = 3, x2 = 6``. Unless a name says otherwise, coordinates are in the original image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any, Literal, Sequence

Box = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` half-open pixel edges."""

Mode = Literal["direct", "cot", "open"]

QUESTION_STEM = "Is there evidence of {attribute} in the image?"

#: Suffixes appended to the question stem, exactly as in the paper.
SUFFIXES: dict[str, str] = {
    "direct": " Answer directly with yes or no without any explanation.",
    "cot": " Think step by step and answer with yes or no.",
    "open": " Answer with a letter, word, phrase, or sentence.",
}

#: The prompting baselines' evidence requests, appended (after a space) to the question stem. The demo
#: model is trained on exactly these strings, so they have one home here.
EVIDENCE_REQUESTS: dict[str, str] = {
    "boxes": "Please output the bounding boxes of the local evidence as [[x1, y1, x2, y2], ...].",
    "phrases": "Please output short descriptions of the evidence regions as a list of phrases.",
}

DATASETS = ("imagenome", "vindr_cxr", "padchest_gr", "synthetic")


def question_stem(attribute: str) -> str:
    """The paper's binary question for a finding name, without a mode suffix."""
    return QUESTION_STEM.format(attribute=attribute)


def build_question(stem: str, mode: str) -> str:
    """Append the output-mode suffix (``direct`` / ``cot`` / ``open``) to a question stem."""
    if mode not in SUFFIXES:
        from medfocus.errors import ConfigError

        raise ConfigError(f"unknown output mode {mode!r}; expected one of {sorted(SUFFIXES)}")
    return stem + SUFFIXES[mode]


@dataclass
class Sample:
    """One binary CXR-VQA sample: an image, a finding, the answer, and the expert boxes.

    Attributes:
        dataset: dataset key (``imagenome``, ``vindr_cxr``, ``padchest_gr``, ``synthetic``).
        index: stable position of this sample in that dataset loader's output (the key used by
            the MedGround-Bench records).
        image_path: path of the image file (DICOM / PNG / JPEG).
        attribute: finding name used in the question, e.g. ``"pleural effusion"``.
        question: question stem, ``"Is there evidence of {attribute} in the image?"`` (no suffix).
        answer: ``"Yes"`` or ``"No"``; ``None`` when no ground truth is known (a user's own film,
            ``medfocus explain``).
        boxes: expert boxes in original-image pixels, half-open ``(x1, y1, x2, y2)``.
        image_size: original image size as ``(width, height)`` in pixels.
        concept: optional anatomical concept / region name associated with the finding.
        meta: free-form extra information (ids, radiologist, cues...), JSON-serialisable.
    """

    dataset: str
    index: int
    image_path: str
    attribute: str
    question: str
    answer: str | None
    boxes: list[Box]
    image_size: tuple[int, int]
    concept: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer not in ("Yes", "No", None):
            from medfocus.errors import DataError

            raise DataError(f"Sample {self.dataset}#{self.index}: answer must be 'Yes', 'No' or None (unknown), got {self.answer!r}")
        self.boxes = [tuple(float(v) for v in b) for b in self.boxes]  # type: ignore[misc]
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @classmethod
    def positive(cls, dataset: str, index: int, image_path: str, attribute: str, boxes: list[Box],
                 image_size: tuple[int, int], *, concept: str | None = None, meta: dict[str, Any] | None = None) -> "Sample":
        """A sample whose finding is present: the paper's question about ``attribute``
        (:func:`question_stem`), answer ``"Yes"``, the expert ``boxes`` (original pixels)."""
        return cls(dataset=dataset, index=index, image_path=image_path, attribute=attribute,
                   question=question_stem(attribute), answer="Yes", boxes=boxes, image_size=image_size,
                   concept=concept, meta={} if meta is None else meta)

    def question_for(self, mode: str) -> str:
        """The full prompt text for an output mode (stem + the paper's suffix)."""
        return build_question(self.question, mode)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (boxes as lists)."""
        d = asdict(self)
        d["boxes"] = [list(b) for b in self.boxes]
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        """Inverse of :meth:`to_dict`."""
        return cls(
            dataset=d["dataset"],
            index=int(d["index"]),
            image_path=d["image_path"],
            attribute=d["attribute"],
            question=d["question"],
            answer=d["answer"],
            boxes=[tuple(b) for b in d["boxes"]],
            image_size=tuple(d["image_size"]),
            concept=d.get("concept"),
            meta=dict(d.get("meta") or {}),
        )


#: The 11 ImaGenome anatomical concepts MedFocus transfers (radiological left = image right).
CONCEPTS: tuple[str, ...] = (
    "cardiac silhouette",
    "left lung",
    "right lung",
    "mediastinum",
    "upper mediastinum",
    "left clavicle",
    "right clavicle",
    "left hilar structures",
    "right hilar structures",
    "left costophrenic angle",
    "right costophrenic angle",
)

#: The 4 bilateral unions MedFocus also intervenes on.
BILATERAL: dict[str, tuple[str, str]] = {
    "lungs": ("left lung", "right lung"),
    "clavicles": ("left clavicle", "right clavicle"),
    "hilar structures": ("left hilar structures", "right hilar structures"),
    "costophrenic angles": ("left costophrenic angle", "right costophrenic angle"),
}


def token_texts(tokens: Sequence[str]) -> list[str]:
    """Tokenizer pieces as text: byte-level BPE's ``\u0120`` / ``\u010a`` (a space / a line end) and
    SentencePiece's ``\u2581`` (a space) become the characters they stand for, one for one, so positions in the
    joined pieces are positions in the decoded answer (what the answer parser reads)."""
    return [str(t).replace("\u0120", " ").replace("\u010a", "\n").replace("\u2581", " ") for t in tokens]


def concept_slug(concept: str) -> str:
    """File-name form of a concept: ``"left hilar structures" -> "left_hilar_structures"``."""
    return concept.strip().lower().replace(" ", "_")
