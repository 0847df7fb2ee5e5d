"""Optional MedSAM refinement of transferred concept boxes (``medfocus attribute --refine medsam``).

MedSAM (Ma et al., 2024) is SAM ViT-B fine-tuned on medical images with *box* prompts. We load it
through transformers' ``SamModel`` / ``SamProcessor`` (default checkpoint
``flaviagiammarino/medsam-vit-base``). MedSAM was trained to produce one mask per box, so the
model is called with ``multimask_output=False`` (SAM's three-mask "ambiguity" head is not what it
was tuned on); the single low-resolution logit map is passed through a sigmoid, brought back to
the original image by the processor's ``post_process_masks(..., binarize=False)`` and thresholded
at 0.5, and only its largest 8-connected component is kept (each concept is one structure; a
stray speck would stretch the box). The refined box is the tight box of that component and the
concept's soft mask becomes the probability map (capped below the threshold outside the
component); an empty mask keeps the transferred box and soft mask.

Weights are never downloaded here: :func:`load_medsam` looks in the local Hugging Face cache /
a local directory and, when the weights are absent, returns ``None`` after a logged notice, and
the transfer keeps its OT boxes.

Offline stand-in: the checkpoint name ``"demo"`` loads the shipped synthetic-world segmenter in
``concepts/synthetic_sam/`` (a tiny ``SamModel`` trained on the synthetic world by
:mod:`medfocus.training.demo_segmenter`, same code path) -- for the embedded default only; it knows
nothing of real radiographs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medfocus.types import Box

log = logging.getLogger(__name__)

MEDSAM_ID = "flaviagiammarino/medsam-vit-base"
#: Checkpoint name of the shipped demo segmenter (synthetic world only).
DEMO = "demo"
#: Folder of the shipped demo segmenter (``medsam="demo"``): a box-prompted SAM for the synthetic world.
SYNTHETIC_SAM_DIR = Path(__file__).with_name("synthetic_sam")
_LOADED: dict[str, Any] = {}


def resolve_checkpoint(name_or_path: str | Path) -> str:
    """``"demo"`` -> the shipped demo segmenter's folder; anything else unchanged (a hub id or path)."""
    if str(name_or_path) == DEMO:
        return str(SYNTHETIC_SAM_DIR)
    return str(name_or_path)


class MedSAMRefiner:
    """Box-prompted segmentation with a ``SamModel``.

    Args:
        model: a transformers ``SamModel`` (eval mode).
        processor: the matching ``SamProcessor``.
        threshold: probability threshold of the mask (0.5).
        device: where to run (default: the model's device).
    """

    def __init__(self, model: Any, processor: Any, *, threshold: float = 0.5, device: str | torch.device | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.threshold = float(threshold)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)

    @classmethod
    def from_pretrained(cls, name_or_path: str = MEDSAM_ID, *, device: str | torch.device | None = None,
                        local_files_only: bool = True, **kw: Any) -> "MedSAMRefiner":
        """Load model + processor (local files only by default: nothing is fetched). ``"demo"``: the
        shipped demo segmenter (:data:`DEMO`)."""
        from transformers import SamModel, SamProcessor

        name_or_path = resolve_checkpoint(name_or_path)
        model = SamModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        processor = SamProcessor.from_pretrained(name_or_path, local_files_only=local_files_only)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, processor, device=device, **kw)

    @torch.inference_mode()
    def segment(self, image: np.ndarray, boxes: list[Box]) -> np.ndarray:
        """Masks for box prompts.

        Args:
            image: ``(H, W)`` uint8 grayscale image (replicated to RGB, as MedSAM expects).
            boxes: ``K`` boxes in ``image`` pixels ``(x1, y1, x2, y2)``.
        Returns:
            ``(K, H, W)`` float32 probabilities in ``[0, 1]``.
        """
        img = np.asarray(image)
        rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        if not boxes:
            return np.zeros((0,) + img.shape[:2], np.float32)
        inputs = self.processor(images=rgb, input_boxes=[[list(map(float, b)) for b in boxes]], return_tensors="pt")
        inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        out = self.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
        probs = torch.sigmoid(out.pred_masks.float()).cpu()  # (1, K, 1, h, w)
        masks = self.processor.image_processor.post_process_masks(
            probs, inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu(), binarize=False)
        return masks[0][:, 0].numpy().astype(np.float32)  # (K, H, W)

    def refine(self, image: np.ndarray, boxes: Mapping[str, Box]) -> dict[str, Box]:
        """Tight box of each box-prompted mask (``> threshold``); an empty mask keeps the input box."""
        return self.refine_with_masks(image, boxes)[0]

    def refine_with_masks(self, image: np.ndarray, boxes: Mapping[str, Box]) -> tuple[dict[str, Box], dict[str, np.ndarray | None]]:
        """Boxes as :meth:`refine` and, per name, the ``(H, W)`` float32 probability map (``None``
        where the mask came out empty and the input box was kept)."""
        names = list(boxes)
        probs = self.segment(image, [boxes[n] for n in names])
        out: dict[str, Box] = {}
        maps: dict[str, np.ndarray | None] = {}
        for n, p in zip(names, probs):
            keep = largest_component(p > self.threshold)
            ys, xs = np.nonzero(keep)
            if ys.size == 0:
                out[n], maps[n] = boxes[n], None
            else:
                out[n] = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                maps[n] = np.where(keep, p, np.minimum(p, self.threshold * 0.999)).astype(np.float32)
        return out, maps


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean ``(H, W)`` mask (empty stays empty).

    Each concept is one connected structure; a stray speck elsewhere would otherwise stretch the
    tight box across the image."""
    from scipy.ndimage import label

    lab, n = label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def build_tiny_sam(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-initialised genuine ``SamModel`` + ``SamProcessor`` (64-px input, ~0.2 MB)
    to ``out_dir`` for tests and offline demos of the refinement code path. Returns ``out_dir``."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(seed)
    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    out = Path(out_dir)
    SamModel(cfg).eval().save_pretrained(out)
    # The PIL image processor: transformers' default SAM processor needs torchvision, which we avoid.
    SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(out)
    return out


def load_medsam(name_or_path: str = MEDSAM_ID, device: str | None = None) -> MedSAMRefiner | None:
    """The MedSAM refiner if its weights are available locally (memoised), else ``None`` with a
    logged notice (the caller keeps the OT boxes). ``"demo"``: the shipped demo segmenter."""
    key = f"{resolve_checkpoint(name_or_path)}@{device}"
    if key in _LOADED:
        return _LOADED[key]
    try:
        ref = MedSAMRefiner.from_pretrained(name_or_path, device=device)
    except (OSError, ValueError, ImportError) as exc:
        log.warning("MedSAM refinement skipped: weights %r are not available locally (%s). "
                    "Concept boxes come from the OT transfer alone (refine=none).", name_or_path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        ref = None
    _LOADED[key] = ref
    return ref


def refiner_name(refiner: MedSAMRefiner | str | Path | None) -> str:
    """A stable name of the refiner for cache keys: the resolved checkpoint, or the model's
    ``name_or_path`` for a loaded refiner (a hash of its weights when it has none), followed by the
    fingerprint of its weights (:func:`medfocus.lvlm.loading.weights_fingerprint`: a local folder's
    config, weight and processor files by content; a hub id's cached snapshot revision), so retrained
    weights (e.g. a new demo segmenter, even copied with preserved sizes and times) never reuse
    transfers refined by the old ones."""
    if refiner is None or isinstance(refiner, (str, Path)):
        return _with_weights_stamp(resolve_checkpoint(refiner if refiner is not None else MEDSAM_ID))
    name = str(getattr(getattr(refiner.model, "config", None), "_name_or_path", "") or "")
    if name:
        return _with_weights_stamp(name)
    # An unsaved model (e.g. built in a test): its weights are its identity.
    from medfocus.lvlm.loading import module_weights_digest

    return "weights:" + module_weights_digest(refiner.model)[:16]


#: Files besides config and weights that change a refiner's masks: the processor's resize/pad canvas.
_REFINER_FILES = ("preprocessor_config.json", "processor_config.json")


def _with_weights_stamp(name: str) -> str:
    """``name|<fingerprint>`` of the weights (:func:`medfocus.lvlm.loading.weights_fingerprint`: a local
    folder's content, a hub id's cached snapshot revision); ``name`` alone when nothing identifies them."""
    from medfocus.lvlm.loading import weights_fingerprint

    fp = weights_fingerprint(name, also=_REFINER_FILES)
    return name if fp is None else f"{name}|{fp}"


def refine_concepts(image: np.ndarray, boxes: Mapping[str, Box], refiner: MedSAMRefiner | str | Path | None = None
                    ) -> tuple[dict[str, Box], dict[str, np.ndarray | None]] | None:
    """Refine concept boxes with MedSAM: ``(boxes, probability maps)`` (see
    :meth:`MedSAMRefiner.refine_with_masks`), or ``None`` when no refiner could be loaded (notice logged).

    ``refiner``: a :class:`MedSAMRefiner`, a checkpoint name/path (``"demo"``: the demo segmenter),
    or ``None`` for :data:`MEDSAM_ID`.
    """
    if refiner is None or isinstance(refiner, (str, Path)):
        refiner = load_medsam(str(refiner) if refiner is not None else MEDSAM_ID)
        if refiner is None:
            return None
    return refiner.refine_with_masks(image, boxes)
