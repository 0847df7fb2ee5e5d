"""Qwen2.5-VL family: torchvision-free image-only processor and the adapter.

Pixel layout. The Qwen2-VL image processor stores an image of ``gh x gw`` patches (``patch = 14``)
as ``pixel_values`` of shape ``(gh * gw, C * T * 14 * 14)`` (``T = temporal_patch_size = 2``, the
still image repeated twice) with rows in *2x2-merge-window* order: row index
``((bh * (gw/2) + bw) * 2 + mh) * 2 + mw`` is patch ``(2*bh + mh, 2*bw + mw)``; within a row the
values are ordered ``(C, T, 14, 14)``. After the vision tower's 2x2 merge, image token ``k`` is merged
cell ``(k // (gw/2), k % (gw/2))`` -- the token grid is row-major ``(gh/2, gw/2)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from medfocus.lvlm.adapter import ChatInputs
from medfocus.lvlm.families.base import HFAdapter


class QwenVLImageProcessor(Qwen2_5_VLProcessor):
    """Image-only Qwen2.5-VL processor.

    transformers 5's ``Qwen2_5_VLProcessor`` also builds a video processor, which needs torchvision;
    this subclass drops the video part (its ``__init__`` has no ``video_processor`` argument, so
    ``from_pretrained`` never loads one) and is registered for ``Qwen2_5_VLConfig`` in
    :func:`register_processors`.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: D107
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("QwenVLImageProcessor is image-only (videos need torchvision)")
        return super().__call__(images=images, text=text, **kwargs)


_REGISTERED = False


def register_processors() -> None:
    """Make ``AutoProcessor`` return :class:`QwenVLImageProcessor` for Qwen2.5-VL configs (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoProcessor, Qwen2_5_VLConfig

    AutoProcessor.register(Qwen2_5_VLConfig, QwenVLImageProcessor, exist_ok=True)
    _REGISTERED = True


def patchify(images: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """``(3, H, W)`` or ``(B, 3, H, W)`` normalised images -> Qwen ``pixel_values`` ``(gh*gw, 3*T*p*p)``
    (or ``(B, gh*gw, 3*T*p*p)``), exactly as the Qwen2-VL image processor lays them out."""
    single = images.dim() == 3
    x = images[None] if single else images
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    x = x.reshape(B, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, bh, bw, mh, mw, C, ph, pw
    x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], temporal, patch, patch)
    out = x.reshape(B, gh * gw, C * temporal * patch * patch)
    return out[0] if single else out


def unpatchify(pixel_values: torch.Tensor, grid_hw: tuple[int, int], patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(gh*gw, D)`` or ``(B, gh*gw, D)`` with ``grid_hw = (gh, gw)``
    *patches* -> ``(3, H, W)`` / ``(B, 3, H, W)`` (temporal copy 0)."""
    single = pixel_values.dim() == 2
    x = pixel_values[None] if single else pixel_values
    B = x.shape[0]
    gh, gw = grid_hw
    C = x.shape[-1] // (temporal * patch * patch)
    x = x.reshape(B, gh // merge, gw // merge, merge, merge, C, temporal, patch, patch)[:, :, :, :, :, :, 0]
    x = x.permute(0, 5, 1, 3, 6, 2, 4, 7)  # B, C, bh, mh, ph, bw, mw, pw
    out = x.reshape(B, C, gh * patch, gw * patch)
    return out[0] if single else out


def _linear_patch_embed_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5_VisionPatchEmbed.forward`` as one matmul: ``(N, C*T*p*p)`` patch rows -> ``(N, D)``.

    The patch embedding is a ``Conv3d`` whose kernel equals its stride and the whole ``(C, T, p, p)`` input
    of each row, i.e. exactly ``rows @ W.view(D, -1).T`` (a row's values are in the kernel's ``(C, T, p, p)``
    order, module docstring); only the summation order differs (float rounding, ~1e-6)."""
    w = self.proj.weight
    return torch.nn.functional.linear(hidden_states.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1))


def use_linear_patch_embed(patch_embed: torch.nn.Module) -> bool:
    """Run a Qwen2.5-VL patch embedding on the CPU as the equivalent matmul (:func:`_linear_patch_embed_forward`);
    returns whether it was switched.

    Why: PyTorch's CPU ``Conv3d`` has no fast path for a kernel that covers its whole input: on the demo
    model's patch rows it is several times slower than the same product as a matmul, and it was the largest
    cost of a perturbation batch after the decoder's linear layers (a profile of the demo's attribute step).

    Switched only for a bias-free ``Conv3d`` with kernel == stride on the CPU, without an accelerate dispatch
    hook (whose wrapper owns ``forward`` on multi-device loads); GPU convolutions are left as the checkpoint's
    authors ran them. Weights and ``state_dict`` are unchanged (the same ``proj`` parameter is read), and
    module hooks still fire.
    """
    import types

    proj = getattr(patch_embed, "proj", None)
    if (not isinstance(proj, torch.nn.Conv3d) or proj.bias is not None or tuple(proj.kernel_size) != tuple(proj.stride)
            or proj.weight.device.type != "cpu" or hasattr(patch_embed, "_hf_hook")):
        return False
    patch_embed.forward = types.MethodType(_linear_patch_embed_forward, patch_embed)
    return True


class QwenVLAdapter(HFAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` (also Qwen2-VL checkpoints of the same layout)."""

    family = "qwen_vl"
    text_keys = ("input_ids", "attention_mask", "mm_token_type_ids")

    def __init__(self, model: Any, processor: Any, name: str, canvas_size: tuple[int, int]) -> None:
        vc = model.config.vision_config
        self.patch = int(vc.patch_size)
        self.merge = int(vc.spatial_merge_size)
        self.temporal = int(vc.temporal_patch_size)
        f = self.patch * self.merge
        if canvas_size[0] % f or canvas_size[1] % f:
            raise ValueError(f"Qwen2.5-VL canvas must be a multiple of {f} pixels, got {canvas_size}")
        super().__init__(model, processor, name, canvas_size)
        self.linear_patch_embed = use_linear_patch_embed(model.model.visual.patch_embed)

    def _patch_grid(self, chat_or_inputs: ChatInputs | dict[str, torch.Tensor]) -> tuple[int, int]:
        inputs = chat_or_inputs.inputs if isinstance(chat_or_inputs, ChatInputs) else chat_or_inputs
        thw = inputs["image_grid_thw"][0]
        return int(thw[1]), int(thw[2])

    def _grid_hw(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        gh, gw = self._patch_grid(inputs)
        return gh // self.merge, gw // self.merge

    def token_grid(self) -> tuple[int, int]:
        """``(gh, gw)`` of the canvas: one token per ``merge x merge`` patches of ``patch`` px (the canvas is a
        multiple of ``patch * merge``, checked at construction)."""
        f = self.patch * self.merge
        return self.canvas_size[1] // f, self.canvas_size[0] // f

    def pixel_values_to_images(self, pixel_values: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return unpatchify(pixel_values, self._patch_grid(chat), self.patch, self.merge, self.temporal)

    def images_to_pixel_values(self, images: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        return patchify(images, self.patch, self.merge, self.temporal)

    def masked_pixel_values(self, chat: ChatInputs, keep: torch.Tensor, baseline: str | torch.Tensor = "zero") -> torch.Tensor:
        """:meth:`LVLMAdapter.masked_pixel_values` computed in patch space (same result).

        The generic path unpatchifies the image, blends it with the baseline and patchifies ``B`` blended
        images, each carrying the temporal copy. Here only the one-channel keep masks are patchified and
        the blend broadcasts over channels and the temporal copy of the chat's own ``pixel_values``: one
        pass over the output instead of three (the perturbation methods' main per-batch overhead)."""
        pv = chat.inputs["pixel_values"]
        gh, gw = self._patch_grid(chat)
        H, W = gh * self.patch, gw * self.patch
        keep = keep.to(pv.device, pv.dtype)
        if keep.shape[-2:] != (H, W):
            keep = torch.nn.functional.interpolate(keep[:, None], size=(H, W), mode="nearest")[:, 0]
        B, N, P2 = keep.shape[0], pv.shape[0], self.patch * self.patch
        C = pv.shape[1] // (self.temporal * P2)
        k = patchify(keep[:, None], self.patch, self.merge, 1).view(B, N, 1, 1, P2)
        x = pv.view(1, N, C, self.temporal, P2)
        if isinstance(baseline, str):
            if baseline == "zero":
                fill = self.black_level.to(pv)
            elif baseline == "mean":
                fill = x[0, :, :, 0].mean(dim=(0, 2))  # per channel over the image (temporal copy 0)
            else:
                raise ValueError(f"baseline must be 'zero', 'mean' or a tensor, got {baseline!r}")
            f = fill.view(1, 1, C, 1, 1)
        else:
            f = patchify(baseline.to(pv)[None], self.patch, self.merge, self.temporal).view(1, N, C, self.temporal, P2)
        return torch.lerp(f, x, k).reshape(B, N, -1)  # keep * x + (1 - keep) * fill

    def _repeat_other(self, key: str, v: torch.Tensor, B: int) -> torch.Tensor:
        return v.repeat(B, *([1] * (v.dim() - 1)))  # image_grid_thw (1, 3) -> (B, 3): one row per image

    def rope_positions(self, chat: ChatInputs) -> torch.Tensor:
        """``(3, 1, S)`` multimodal rotary positions of ``chat`` (cached in ``chat.extras``).

        All image variants of one chat share them, so batches pass them explicitly instead of letting
        the model rebuild them per row in a Python loop -- and they never depend on the model's cached
        ``rope_deltas`` state (left over from a previous ``generate``)."""
        S = int(chat.inputs["input_ids"].shape[1])
        cached = chat.extras.get("rope_positions")
        if cached is None or cached.shape[-1] != S:
            cached, _ = self.model.model.get_rope_index(
                chat.inputs["input_ids"], mm_token_type_ids=chat.inputs["mm_token_type_ids"],
                image_grid_thw=chat.inputs["image_grid_thw"], attention_mask=chat.inputs.get("attention_mask"))
            chat.extras["rope_positions"] = cached
        return cached

    def batch_inputs(self, chat: ChatInputs, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().batch_inputs(chat, pixel_values)
        pos = self.rope_positions(chat)
        out["position_ids"] = pos.expand(pos.shape[0], int(pixel_values.shape[0]), pos.shape[2])
        return out

    @property
    def image_feature_module(self) -> torch.nn.Module:
        # ``visual`` returns a ModelOutput whose ``pooler_output`` is the merged image-token embeddings in
        # token order (the window permutation is undone inside); see image_features_from_output.
        return self.model.model.visual

    @property
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        return self.model.model.language_model.layers

register_processors()
