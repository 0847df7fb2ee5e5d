"""Prompting baselines: ask the model where its evidence is.

``prompting``: the question stem plus a request for ``[[x1, y1, x2, y2], ...]`` boxes. The model sees the
letterboxed *canvas*, so its boxes are read in the canvas frame by the package's one box-text parser,
:func:`medfocus.lvlm.box_text.parse_boxes` (every common dialect: Qwen2.5-VL JSON, Qwen2-VL box tokens,
bracketed lists, 0..1 floats, ``<locNNNN>`` tokens; ``coords="auto"`` takes the adapter family's
default, or ``"canvas"``/``"norm1000"``/``"relative"``; never ``eval``) and mapped back to original
pixels through the chat's letterbox geometry. An answer with box-like text that no rule reads is
**unparseable**: ``extras["box_text"] == "unparseable"``, which the runner records as the record's
``unparseable`` field (not an empty prediction).

``prompting_medsam``: the stem plus a request for short descriptions of the evidence regions; each
phrase is detected by an open-vocabulary detector (OWL-ViT via transformers' ``OwlViTForObjectDetection``,
top-scoring box per phrase) on the original image, and each box is refined by MedSAM
(:class:`medfocus.concepts.refine.MedSAMRefiner`, box prompt, single-mask output) into a mask.
``detector="anatomy"`` swaps OWL-ViT for an offline, deterministic stand-in (not the paper's detector):
each phrase is grounded to one of MedFocus' 11 anatomical concepts and boxed where MedFocus' concept
transfer puts that concept on the image (:mod:`medfocus.concepts.grounding`; see :class:`PromptingMedSAM`).

Both return ``boxes`` (original pixels) and a heatmap (sum of box indicators, or of MedSAM mask
probabilities), so the same evaluation as the other baselines applies. ``n_forward`` counts one per
``generate`` call (plus one per detector / MedSAM call): these methods are not pass-bounded.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from medfocus.attribution._common import model_input_image
from medfocus.attribution.base import Attribution, Counter, Method, boolean, choice, either, integer, number, obj, optional, path_like, text
from medfocus.errors import ModelError
from medfocus.lvlm.box_text import COORDS, parse_boxes
from medfocus.types import EVIDENCE_REQUESTS, SUFFIXES, Box

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import LVLMAdapter

#: The evidence requests, appended after a space to the question stem (the demo model is trained on
#: exactly these: :data:`medfocus.types.EVIDENCE_REQUESTS`).
BOX_REQUEST = EVIDENCE_REQUESTS["boxes"]
PHRASE_REQUEST = EVIDENCE_REQUESTS["phrases"]

OWLVIT_ID = "google/owlvit-base-patch32"
MEDSAM_ID = "flaviagiammarino/medsam-vit-base"

def question_stem_of(question: str) -> str:
    """The question without its output-mode suffix (any of :data:`medfocus.types.SUFFIXES`)."""
    for suf in SUFFIXES.values():
        if question.endswith(suf):
            return question[: -len(suf)].strip()
    return question.strip()


def parse_phrases(text: str, max_phrases: int = 8) -> list[str]:
    """Evidence phrases from generated text: a JSON list of strings if there is one, else quoted
    strings, else lines / comma-separated items (bullets and numbering stripped). Never ``eval``."""
    text = (text or "").strip()
    items: list[str] = []
    m = re.search(r"\[.*\]", text, flags=re.S)
    if m:
        try:
            val = json.loads(m.group(0))
            if isinstance(val, list):
                items = [str(v) for v in val if isinstance(v, (str, int, float))]
        except (json.JSONDecodeError, RecursionError):  # model output nested thousands deep is not a list of phrases
            items = []
    if not items:
        items = re.findall(r'"([^"]+)"', text) or re.findall(r"'([^']+)'", text)
    if not items:
        items = [p for p in re.split(r"[\n;,]", text.strip("[]"))]
    clean: list[str] = []
    for it in items:
        it = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", it).strip().strip(".").strip()
        if it and it.lower() not in (c.lower() for c in clean):
            clean.append(it)
    return clean[:max_phrases]


def boxes_heatmap(boxes: list[Box], size_hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` float32: how many boxes cover each pixel (pixel centres inside the half-open box)."""
    H, W = size_hw
    hm = np.zeros((H, W), np.float32)
    for x1, y1, x2, y2 in boxes:
        c0, c1 = int(np.ceil(x1 - 0.5)), int(np.ceil(x2 - 0.5))
        r0, r1 = int(np.ceil(y1 - 0.5)), int(np.ceil(y2 - 0.5))
        hm[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] += 1.0
    return hm


def _generate(adapter: LVLMAdapter, image: np.ndarray, prompt: str, max_new_tokens: int, counter: Counter) -> str:
    # the model sees the original image even when the method works in a reduced work frame
    text = adapter.generate([model_input_image(image, counter)], [prompt], max_new_tokens=max_new_tokens, batch_size=1)[0]
    counter.n_forward += 1
    return text


class Prompting(Method):
    """Ask the model for evidence boxes and map them from its input (canvas) frame to the image.

    Source: the MedFocus paper's box-request prompt. Deviation from its public code: the reply is read by
    the package's one box-text parser (:func:`medfocus.lvlm.box_text.parse_boxes`: regular expressions for
    the models' box dialects, never ``eval``), and boxes are mapped back through the letterbox from the
    canvas frame the model saw."""

    name = "prompting"
    per_token_maps = False  # asks for boxes: no answer is attributed
    source = ("the paper's box-request prompt; boxes read by the package's box-text parser (regular expressions, "
              "several model dialects; the paper's code used eval)")
    defaults = {"request": BOX_REQUEST, "coords": "auto", "max_new_tokens": 128}
    spec = {"request": text(), "coords": choice(*COORDS), "max_new_tokens": integer(1)}
    needs_answer = False

    def _heatmap_to_original(self, res: Attribution, frame: Any) -> np.ndarray:
        """The box count map, redrawn from the (converted) boxes at the original size: exact box edges."""
        return boxes_heatmap(list(res.boxes or []), (frame.orig_h, frame.orig_w))

    def _attribute(self, adapter: LVLMAdapter, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        prompt = f"{question_stem_of(question)} {self.params['request']}"
        text = _generate(adapter, image, prompt, int(self.params["max_new_tokens"]), counter)
        # the letterbox depends only on the image size and the canvas: the sample's prepared geometry when shared
        geo = counter.prepared.geometry if counter.prepared is not None else adapter.prepare(image, prompt).geometry
        read = parse_boxes(text, geo.out_w, geo.out_h, self.params["coords"], family=getattr(adapter, "family", None))
        canvas_boxes = read.boxes
        boxes = []
        for b in canvas_boxes:
            ob = geo.inverse_box(b, clip=True)
            if ob[2] > ob[0] and ob[3] > ob[1]:  # a box entirely in the letterbox padding is dropped
                boxes.append(ob)
        hm = boxes_heatmap(boxes, image.shape[:2])
        return Attribution(heatmap=hm, boxes=boxes, extras={"generated_text": text, "prompt": prompt, "canvas_boxes": canvas_boxes,
                                                            "box_text": read.status, "box_dialects": list(read.dialects),
                                                            "box_text_unread": list(read.unread)})


class OwlDetector:
    """Open-vocabulary detection with OWL-ViT (transformers ``OwlViTForObjectDetection`` + ``OwlViTProcessor``).

    :meth:`detect` returns, for each phrase, the highest-scoring predicted box over all image patches
    (OWL-ViT v1 predicts one box per patch; its boxes are ``(cx, cy, w, h)`` relative to the image, the
    processor resizing without padding) and its sigmoid score.
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)

    @classmethod
    def from_pretrained(cls, name_or_path: str = OWLVIT_ID, device: str | None = None) -> "OwlDetector":
        from transformers import OwlViTForObjectDetection, OwlViTProcessor

        try:
            model = OwlViTForObjectDetection.from_pretrained(name_or_path, local_files_only=True)
            processor = OwlViTProcessor.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"prompting_medsam: OWL-ViT weights {name_or_path!r} are not available locally ({exc}). "
                             f"Download them once (huggingface-cli download {OWLVIT_ID}) and pass the local folder "
                             f"(--param prompting_medsam.detector=/path/to/owlvit).") from exc
        return cls(model, processor, device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @torch.inference_mode()
    def detect(self, image: np.ndarray, phrases: list[str]) -> tuple[list[Box], list[float]]:
        """``(H, W)`` uint8 image, ``K`` phrases -> ``K`` boxes in image pixels and their scores."""
        if not phrases:
            return [], []
        img = np.asarray(image)
        rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 16))
        inputs = self.processor(text=[phrases], images=rgb, return_tensors="pt", padding="max_length", truncation=True, max_length=max_len)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out = self.model(**inputs)
        return top_box_per_query(out.logits[0], out.pred_boxes[0], img.shape[1], img.shape[0])


def top_box_per_query(logits: torch.Tensor, pred_boxes: torch.Tensor, width: int, height: int) -> tuple[list[Box], list[float]]:
    """OWL-ViT outputs ``logits (P, K)`` and ``pred_boxes (P, 4)`` (relative ``cx, cy, w, h``) -> for each of
    the ``K`` queries the box of its best patch in pixels (clipped) and its sigmoid score."""
    best = logits.float().argmax(dim=0)  # (K,)
    boxes, scores = [], []
    for k, p in enumerate(best.tolist()):
        cx, cy, w, h = pred_boxes[p].float().tolist()
        x1, x2 = (cx - w / 2) * width, (cx + w / 2) * width
        y1, y2 = (cy - h / 2) * height, (cy + h / 2) * height
        boxes.append((max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)))
        scores.append(float(torch.sigmoid(logits[p, k].float())))
    return boxes, scores


_CACHE: dict[str, Any] = {}

#: ``detector=`` values: the paper's OWL-ViT (alias of :data:`OWLVIT_ID`) and the offline anatomy stand-in.
DETECTORS = ("owlvit", "anatomy")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pair_or(method: str) -> Callable[[Any], bool]:
    """Accepts a ``(model, processor)`` pair or an object with ``method``."""
    return lambda v: (isinstance(v, tuple) and len(v) == 2) or callable(getattr(v, method, None))


def _resolve_detector(spec: Any, pool: Any = None, cache: Any = True) -> Any:
    """``"anatomy"`` or an :class:`~medfocus.concepts.grounding.AnatomyDetector` -> the anatomy detector;
    ``"owlvit"`` (= :data:`OWLVIT_ID`), a hub id / local folder, an :class:`OwlDetector` or ``(model, processor)``
    -> OWL-ViT. Loads are memoised per process, and so is a failed load: every sample then fails with the
    same :class:`~medfocus.errors.ModelError` without retrying the load."""
    from medfocus.concepts.grounding import AnatomyDetector

    if isinstance(spec, (OwlDetector, AnatomyDetector)):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        return OwlDetector(*spec)
    if spec == "anatomy":
        key = f"anatomy:{pool}:{cache}"
        if key not in _CACHE:
            _CACHE[key] = AnatomyDetector(pool, cache=cache)
        return _CACHE[key]
    name = OWLVIT_ID if spec in (None, "owlvit") else str(spec)
    key = f"owl:{name}"
    if key not in _CACHE:
        try:
            _CACHE[key] = OwlDetector.from_pretrained(name)
        except ModelError as exc:
            _CACHE[key] = ModelError(
                f"prompting_medsam: OWL-ViT weights {name!r} are not available locally ({_first_line(exc.__cause__ or exc)}). "
                f"Pass a local copy with --param prompting_medsam.detector=/path/to/owlvit-base-patch32 "
                f"(fetch it once where the hub is reachable: huggingface-cli download {OWLVIT_ID}), or use the offline "
                f"anatomy-grounded stand-in (not the paper's detector) with --param prompting_medsam.detector=anatomy.")
    if isinstance(_CACHE[key], ModelError):
        raise ModelError(str(_CACHE[key]))
    return _CACHE[key]


def _resolve_medsam(spec: Any, *, lenient: bool = False) -> Any:
    """``None``/``"none"`` -> no refinement; a MedSAMRefiner; ``(model, processor)``; or a name/path.

    Weights absent: a :class:`~medfocus.errors.ModelError` (memoised like the detector's), or with
    ``lenient`` (the anatomy detector) ``None`` after the logged notice of
    :func:`medfocus.concepts.refine.load_medsam`, as in MedFocus' own refinement."""
    from medfocus.concepts.refine import MedSAMRefiner, load_medsam

    if spec is None or spec == "none":
        return None
    if isinstance(spec, MedSAMRefiner):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        return MedSAMRefiner(*spec)
    if lenient:
        return load_medsam(str(spec))
    key = f"sam:{spec}"
    if key not in _CACHE:
        try:
            _CACHE[key] = MedSAMRefiner.from_pretrained(str(spec))
        except (OSError, ValueError, ImportError) as exc:
            _CACHE[key] = ModelError(
                f"prompting_medsam: MedSAM weights {spec!r} are not available locally ({_first_line(exc)}). "
                f"Pass a local copy with --param prompting_medsam.medsam=/path/to/medsam-vit-base (fetch it once: "
                f"huggingface-cli download {MEDSAM_ID}), or skip the refinement with --param prompting_medsam.medsam=none.")
    if isinstance(_CACHE[key], ModelError):
        raise ModelError(str(_CACHE[key]))
    return _CACHE[key]


class PromptingMedSAM(Method):
    """Ask for evidence-region descriptions, detect each phrase, refine each box with MedSAM.

    Source: the MedFocus paper's phrase prompt -> OWL-ViT (Minderer et al. 2022) -> MedSAM (Ma et al.
    2024). Deviation: none with the default detector; ``detector="anatomy"`` is an offline stand-in
    (below), not the paper's pipeline.

    Detectors (``detector``):

    * ``"owlvit"`` (default, the paper's setting): OWL-ViT, top-scoring box per phrase. Also a hub id /
      local folder of OWL-ViT weights, an :class:`OwlDetector`, or ``(model, processor)``. Weights are
      only read locally; when they are absent *every* sample fails with the same
      :class:`~medfocus.errors.ModelError` (naming ``--param prompting_medsam.detector=PATH``), raised
      before the model generates, whatever it would have answered. MedSAM weights absent: the same
      (``medsam="none"`` skips the refinement).
    * ``"anatomy"``: an **offline, deterministic stand-in, not the paper's detector**
      (:class:`~medfocus.concepts.grounding.AnatomyDetector`). Each phrase is grounded to one of the 11
      anatomical concepts or a bilateral union (:func:`~medfocus.concepts.grounding.ground_phrase`:
      synonyms such as heart/cardiac, CP angle, hilum, apex/upper zone, base/lower zone; left/right are
      the patient's sides, as in the concept names; ``"lungs"``/``"bilateral"``/no side -> both sides)
      and gets the box MedFocus' concept transfer puts on this image (reference pool ``pool``: a folder,
      or ``None`` for the default synthetic pool; transfers cached per ``cache`` like MedFocus'). A union
      gives both side boxes; a concept named twice gives one box; phrases naming no concept give no box
      and are listed in ``extras["unmatched_phrases"]``. MedSAM (``medsam``) then refines the boxes when
      its weights are available, and is skipped with a logged notice otherwise (the policy of
      :mod:`medfocus.concepts.refine`); ``extras["refine"]`` says which happened. It can only ever
      point at anatomy, never at a lesion inside it.

    Other params: ``medsam`` (id/folder, a ``MedSAMRefiner``, ``(model, processor)``, or ``"none"``),
    ``score_threshold`` (OWL-ViT detections below it are dropped; anatomy boxes have score 1),
    ``max_phrases``, ``max_new_tokens``, ``request``.

    ``n_forward``: 1 per ``generate`` call, +1 per OWL-ViT call, +1 per MedSAM call (the anatomy
    detector runs no network: its OT transfer is not counted, as in MedFocus).
    """

    name = "prompting_medsam"
    per_token_maps = False  # asks for boxes: no answer is attributed
    source = ("the paper's phrase prompt -> OWL-ViT -> MedSAM; detector='anatomy' is an offline stand-in, "
              "not the paper's detector")
    defaults = {"request": PHRASE_REQUEST, "detector": "owlvit", "medsam": MEDSAM_ID, "score_threshold": 0.0,
                "max_phrases": 8, "max_new_tokens": 128, "pool": None, "cache": True}
    spec = {"request": text(), "detector": either(path_like(), obj("a detector object or (model, processor)", _pair_or("detect"))),
            "medsam": optional(either(path_like(), obj("a MedSAMRefiner or (model, processor)", _pair_or("segment")))),
            "score_threshold": number(0, 1), "max_phrases": integer(1), "max_new_tokens": integer(1),
            "pool": optional(either(path_like(), obj("a ReferencePool", lambda v: hasattr(v, "references")))),
            "cache": either(boolean(), path_like())}
    needs_answer = False
    frame_extras = {**Method.frame_extras, "detector_boxes": "boxes"}

    def _heatmap_to_original(self, res: Attribution, frame: Any) -> np.ndarray:
        """MedSAM's probability maps are upsampled; without refinement the box count map is redrawn from the
        (converted) boxes at the original size."""
        if res.extras.get("refine") == "medsam":
            return super()._heatmap_to_original(res, frame)
        return boxes_heatmap(list(res.boxes or []), (frame.orig_h, frame.orig_w))

    @property
    def uses_synthetic_pool(self) -> bool:
        """The anatomy detector with ``pool=None`` grounds phrases through the default synthetic pool."""
        return self.params.get("detector") == "anatomy" and not self.params.get("pool")

    def _attribute(self, adapter: LVLMAdapter, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        from medfocus.concepts.grounding import AnatomyDetector

        # Resolve (and, for OWL-ViT / MedSAM, check the weights of) everything before generating, so a
        # missing checkpoint fails every sample the same way, not only those where phrases come out.
        det = _resolve_detector(self.params["detector"], self.params["pool"], self.params["cache"])
        anatomy = isinstance(det, AnatomyDetector)
        refiner = _resolve_medsam(self.params["medsam"], lenient=anatomy)
        prompt = f"{question_stem_of(question)} {self.params['request']}"
        text = _generate(adapter, image, prompt, int(self.params["max_new_tokens"]), counter)
        phrases = parse_phrases(text, int(self.params["max_phrases"]))
        extras: dict[str, Any] = {"generated_text": text, "prompt": prompt, "phrases": phrases,
                                  "detector": "anatomy" if anatomy else "owlvit", "refine": "none"}
        H, W = image.shape[:2]
        if not phrases:
            return Attribution(heatmap=np.zeros((H, W), np.float32), boxes=[], extras=extras)
        if anatomy:
            found = det.detect(image, phrases, counter.orientation)
            boxes, scores = list(found.boxes), [1.0] * len(found.boxes)
            extras.update({"detected_phrases": found.box_phrases, "detected_concepts": found.box_concepts,
                           "groundings": found.groundings, "unmatched_phrases": found.unmatched,
                           "reference_id": found.reference_id})
        else:
            boxes, scores = det.detect(image, phrases)
            counter.n_forward += 1
            keep = [i for i, (b, s) in enumerate(zip(boxes, scores)) if s >= float(self.params["score_threshold"]) and b[2] > b[0] and b[3] > b[1]]
            boxes, scores = [boxes[i] for i in keep], [scores[i] for i in keep]
            extras["detected_phrases"] = [phrases[i] for i in keep]
        extras.update({"detector_boxes": boxes, "detector_scores": scores})
        if refiner is None or not boxes:
            return Attribution(heatmap=boxes_heatmap(boxes, (H, W)), boxes=boxes, extras=extras)
        probs = refiner.segment(image, boxes)  # (K, H, W)
        counter.n_forward += 1
        extras["refine"] = "medsam"
        refined: list[Box] = []
        for b, p in zip(boxes, probs):
            ys, xs = np.nonzero(p > refiner.threshold)
            refined.append(b if ys.size == 0 else (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
        heat = np.clip(probs, 0, 1).sum(0).astype(np.float32) if len(probs) else np.zeros((H, W), np.float32)
        return Attribution(heatmap=heat, boxes=refined, extras=extras)
