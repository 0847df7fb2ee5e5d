"""LLaVA-1.5 family (llava-hf conversions).

Image tokens: ``<image>`` is expanded by the processor to ``(S/14)^2`` copies (CLS dropped by the
``default`` feature-select strategy); token ``k`` is CLIP patch ``(k // (S/14), k % (S/14))``,
row-major. Pixel layout: ``(1, 3, S, S)`` per example, ``S = vision_config.image_size``.
"""

from __future__ import annotations

from typing import Any

import torch

from medfocus.lvlm.adapter import ChatInputs
from medfocus.lvlm.families.base import HFAdapter

class LlavaAdapter(HFAdapter):
    """Adapter for ``LlavaForConditionalGeneration``."""

    family = "llava"
    image_kwargs = {"do_resize": False, "do_center_crop": False}

    def __init__(self, model: Any, processor: Any, name: str, canvas_size: tuple[int, int] | None = None) -> None:
        s = int(model.config.vision_config.image_size)
        super().__init__(model, processor, name, canvas_size or (s, s))

    def _messages(self, question: str, answer: str | None) -> list[dict[str, Any]]:
        msgs = super()._messages(question, answer)
        if answer is not None:  # the template writes "ASSISTANT: " itself: the assistant text follows a space
            msgs[-1]["content"][0]["text"] = answer.strip()
        return msgs

    def _grid_hw(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    def pixel_values_to_images(self, pixel_values: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return pixel_values[..., 0, :, :, :] if pixel_values.dim() == 5 else pixel_values[0]

    def images_to_pixel_values(self, images: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return images[:, None] if images.dim() == 4 else images[None]


