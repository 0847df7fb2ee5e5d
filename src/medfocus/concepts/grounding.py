"""Anatomy grounding of free-text evidence phrases, and the offline anatomy detector.

:func:`ground_phrase` maps a short phrase such as ``"blunted left costophrenic angle"`` or
``"small nodule in the right upper lung"`` to one of MedFocus' 11 anatomical concepts
(:data:`medfocus.types.CONCEPTS`) or one of the 4 bilateral unions (:data:`medfocus.types.BILATERAL`),
or to ``None`` when it names none of them. Rules, in this order:

1. the phrase is lower-cased and split into words (hyphens, slashes, punctuation are separators);
2. the *structure* is the first of these word patterns that matches (most specific first, so
   ``"left hilum of the lung"`` is hilar, ``"left heart border"`` is cardiac):

   ======================  ================================================================
   costophrenic angle      costophrenic, costodiaphragmatic, CP angle/sulcus/recess, effusion
                           (not pericardial: a small pleural effusion first blunts the angle)
   hilar structures        hilum, hila, hilar, hilus, perihilar
   clavicle                clavicle(s), clavicular, collarbone
   upper mediastinum       upper/superior mediastinum, trachea, paratracheal, aortic knob/arch
   mediastinum             mediastinum, mediastinal
   cardiac silhouette      heart, cardiac, cardio..., pericardial, cardiomegaly
   lung                    lung(s), pulmonary, apex/apices/apical, upper/mid/lower zone,
                           base(s)/basal/basilar/bibasilar, lobe, lingula, hemithorax, parenchyma,
                           airspace
   ======================  ================================================================

3. the *side* of a two-sided structure (lung, clavicle, hilar structures, costophrenic angle):
   ``left``/``lt`` and ``right``/``rt`` are radiological sides, i.e. the patient's, as in the
   concept names (the patient's left appears on the image's right); the explicit image-frame
   forms ``"left of the image"`` / ``"image left"`` are turned into the patient's side (flipped for a film in
   the standard display, kept for a film stored mirrored: ``mirrored=True``). Exactly one
   side named and no ``bilateral``/``both``/``bibasilar`` -> that side's concept; otherwise
   (both sides, a bilateral word, a plural such as ``"lungs"``, or no side at all) -> the
   bilateral union (``"lungs"``, ``"clavicles"``, ``"hilar structures"``,
   ``"costophrenic angles"``); the lingula, named without a side, is the left lung. Cardiac
   silhouette and the mediastina have no side.

:class:`AnatomyDetector` turns grounded phrases into boxes on one image: the concept boxes that
MedFocus' concept transfer (:func:`medfocus.concepts.transfer.transfer_concepts`, unbalanced OT
from the nearest normal reference of a pool) places on that image, in original-image pixels. It
is an offline, deterministic stand-in for the open-vocabulary detector of the ``prompting_medsam``
baseline (OWL-ViT in the paper) -- it can only find the 11 anatomical regions, never a lesion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfocus.types import BILATERAL, CONCEPTS, Box

#: Two-sided structures: structure -> (left concept, right concept, bilateral union name).
_SIDED: dict[str, tuple[str, str, str]] = {
    "costophrenic angle": ("left costophrenic angle", "right costophrenic angle", "costophrenic angles"),
    "hilar structures": ("left hilar structures", "right hilar structures", "hilar structures"),
    "clavicle": ("left clavicle", "right clavicle", "clavicles"),
    "lung": ("left lung", "right lung", "lungs"),
}

#: (structure, word pattern) in priority order (most specific first); patterns match whole words of
#: the normalised phrase (lower case, single spaces).
STRUCTURE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("costophrenic angle", r"costo ?phrenic|costo ?diaphragmatic|cp (?:angles?|sulc(?:us|i)|recess(?:es)?)"
                           r"|(?<!pericardial )effusions?"),
    ("hilar structures", r"hilum|hila|hilar|hilus|perihilar"),
    ("clavicle", r"clavicles?|clavicular|collar ?bones?"),
    ("upper mediastinum", r"(?:upper|superior) mediastin\w*|trachea\w*|paratracheal|aortic (?:knob|knuckle|arch)"),
    ("mediastinum", r"mediastin\w*"),
    ("cardiac silhouette", r"hearts?|cardiac|cardio\w*|pericardi\w*"),
    ("lung", r"lungs?|pulmonary|ap(?:ex|ices|ical)|(?:upper|mid|middle|lower) zones?|bases?|basal|basilar|bibas(?:al|ilar)"
             r"|lobes?|lobar|lingula\w*|hemithora(?:x|ces)|parenchyma\w*|air ?spaces?"),
)
_STRUCT_RE = [(s, re.compile(rf"\b(?:{p})\b")) for s, p in STRUCTURE_PATTERNS]
_IMAGE_SIDE_RE = re.compile(r"\bimage(?: s)? (left|right)\b|\b(left|right) (?:side |half |part )?of (?:the )?image\b")
_LEFT_RE = re.compile(r"\b(?:left|lt)\b")
_RIGHT_RE = re.compile(r"\b(?:right|rt)\b")
_BOTH_RE = re.compile(r"\b(?:bilateral\w*|both|bibas(?:al|ilar))\b")


def normalise_phrase(phrase: str) -> str:
    """Lower case, every non-alphanumeric run -> one space (``"Left-sided CP angle." -> "left sided cp angle"``)."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(phrase).lower()).split())


def ground_phrase(phrase: str, mirrored: bool = False) -> str | None:
    """The concept (:data:`~medfocus.types.CONCEPTS`) or bilateral union (:data:`~medfocus.types.BILATERAL`)
    a phrase names, or ``None`` (rules in the module docstring). ``mirrored``: the film is stored mirrored
    (DICOM ``PatientOrientation`` row direction ``R``), so an image side is the patient's same side.

    >>> ground_phrase("blunted left costophrenic angle"), ground_phrase("both lung bases"), ground_phrase("rib")
    ('left costophrenic angle', 'lungs', None)
    """
    text = normalise_phrase(phrase)
    structure = next((s for s, rx in _STRUCT_RE if rx.search(text)), None)
    if structure is None:
        return None
    if structure not in _SIDED:
        return structure
    left_c, right_c, union = _SIDED[structure]
    # "left of the image" names the image frame: the patient's right on a film in the standard display
    # (and vice versa); the patient's left on a film stored mirrored.
    img_side = _IMAGE_SIDE_RE.search(text)
    if img_side:
        side = img_side.group(1) or img_side.group(2)
        patient = side if mirrored else ("right" if side == "left" else "left")
        text = _IMAGE_SIDE_RE.sub(" ", text) + " " + patient
    left, right = bool(_LEFT_RE.search(text)), bool(_RIGHT_RE.search(text))
    if structure == "lung" and not (left or right) and re.search(r"\blingula", text):
        left = True  # the lingula is part of the left lung only
    if left != right and not _BOTH_RE.search(text):
        return left_c if left else right_c
    return union


def variant_concepts(name: str) -> tuple[str, ...]:
    """The concepts of a grounding result: ``(name,)`` for a concept, both sides for a bilateral union."""
    if name in BILATERAL:
        return tuple(BILATERAL[name])
    if name in CONCEPTS:
        return (name,)
    raise KeyError(f"{name!r} is neither one of the 11 concepts nor a bilateral union")


@dataclass
class AnatomyDetections:
    """What :meth:`AnatomyDetector.detect` finds for a list of phrases on one image.

    Attributes:
        boxes: one box per distinct grounded concept (a bilateral union gives both sides), in order of
            first mention, original-image pixels (half-open edges).
        box_concepts: the concept of each box.
        box_phrases: the (first) phrase that produced each box.
        groundings: phrase -> concept / bilateral union / ``None``, for every phrase.
        unmatched: phrases that name none of the concepts (they give no box).
        reference_id: the reference the concepts were transferred from (``None`` when nothing matched:
            then no transfer is run).
    """

    boxes: list[Box]
    box_concepts: list[str]
    box_phrases: list[str]
    groundings: dict[str, str | None]
    unmatched: list[str]
    reference_id: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class AnatomyDetector:
    """Offline anatomy-grounded phrase detector: phrase -> concept (:func:`ground_phrase`) -> the box
    MedFocus' concept transfer puts on the image.

    Args:
        pool: a :class:`~medfocus.concepts.reference.ReferencePool`, a pool folder, or ``None`` for the
            default synthetic pool (:func:`~medfocus.concepts.reference.default_pool`).
        cache: transfer cache: ``True`` (the default cache directory, shared with MedFocus, so an image's
            transfer is computed once for both), a directory, or ``False``/``None``.
        transfer_kw: other settings of :func:`~medfocus.concepts.transfer.transfer_concepts`
            (``mode``, ``core``, ``iterations``, ``epsilon``, ``lam``, ...; defaults = MedFocus').
    """

    def __init__(self, pool: Any = None, *, cache: bool | str | Path | None = True, **transfer_kw: Any) -> None:
        from medfocus.concepts.reference import ReferencePool, cached_pool
        from medfocus.concepts.transfer import TransferCache

        self.pool = pool if isinstance(pool, ReferencePool) else cached_pool(str(pool) if pool else None)
        self.cache = TransferCache() if cache is True else (TransferCache(cache) if cache else None)
        self.transfer_kw = dict(transfer_kw)

    def transfer(self, image: np.ndarray, orientation: Any = None) -> Any:
        """The :class:`~medfocus.concepts.transfer.ConceptTransfer` of ``image`` (no refinement; cached), sides
        named for the film's ``orientation`` (``None``: the convention ``L\\F``)."""
        from medfocus.concepts.transfer import transfer_concepts

        return transfer_concepts(image, self.pool, refine="none", cache=self.cache, orientation=orientation, **self.transfer_kw)

    def detect(self, image: np.ndarray, phrases: list[str], orientation: Any = None) -> AnatomyDetections:
        """Ground ``phrases`` and locate their concepts on ``image`` (``(H0, W0)`` grayscale).

        ``orientation``: the film's :class:`~medfocus.io.reader.FilmOrientation` (``None``: the display
        convention ``L\\F``); "left lung" is the patient's left lung whichever side of the image it lies on.

        Returns:
            :class:`AnatomyDetections`; boxes in original-image pixels. The concept transfer runs only
            when at least one phrase is grounded.
        Raises:
            DataError: an ``orientation`` whose rows do not run left/right, when a phrase is grounded.
        """
        mirrored = bool(orientation is not None and orientation.mirrored)
        groundings = {p: ground_phrase(p, mirrored) for p in phrases}
        unmatched = [p for p, g in groundings.items() if g is None]
        concepts: list[str] = []
        origin: list[str] = []
        for p, g in groundings.items():
            for c in variant_concepts(g) if g is not None else ():
                if c not in concepts:  # the same region named twice is one detection
                    concepts.append(c)
                    origin.append(p)
        if not concepts:
            return AnatomyDetections([], [], [], groundings, unmatched)
        tr = self.transfer(image, orientation)
        boxes = [tuple(float(v) for v in tr.boxes[c]) for c in concepts]
        return AnatomyDetections(boxes, concepts, origin, groundings, unmatched, tr.reference_id,  # type: ignore[arg-type]
                                 {"cached": bool(tr.stats.get("cached", False))})
