"""Gemma 3 / MedGemma family.

Image tokens: the processor expands ``<start_of_image>`` into ``"\\n\\n<start_of_image>" +
mm_tokens_per_image x <image_soft_token> + "<end_of_image>\\n\\n"``; the soft-token id is
``config.image_token_id`` (the processor's own ``image_token_id`` is the begin-of-image token). The
SigLIP patches are average-pooled to a square ``sqrt(mm_tokens_per_image)`` grid, row-major.
``token_type_ids`` (1 on image tokens) must reach the model: Gemma 3 attends bidirectionally within
an image. Pixel layout: ``(1, 3, S, S)`` per example, ``S = vision_config.image_size``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medfocus.lvlm.adapter import ChatInputs
from medfocus.lvlm.families.base import HFAdapter

class Gemma3Adapter(HFAdapter):
    """Adapter for ``Gemma3ForConditionalGeneration`` (Gemma 3, MedGemma, MedGemma 1.5)."""

    family = "gemma3"
    # Pan-and-scan would add crops (more pixel tensors); one canvas = one crop.
    image_kwargs = {"do_resize": False, "do_pan_and_scan": False}

    def __init__(self, model: Any, processor: Any, name: str, canvas_size: tuple[int, int] | None = None) -> None:
        s = int(model.config.vision_config.image_size)
        super().__init__(model, processor, name, canvas_size or (s, s))

    def _grid_hw(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        side = int(math.isqrt(int(self.model.config.mm_tokens_per_image)))
        return side, side

    def pixel_values_to_images(self, pixel_values: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return pixel_values[..., 0, :, :, :] if pixel_values.dim() == 5 else pixel_values[0]

    def images_to_pixel_values(self, images: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return images[:, None] if images.dim() == 4 else images[None]

    @property
    def decoder_layers(self):
        return self.model.model.language_model.layers


