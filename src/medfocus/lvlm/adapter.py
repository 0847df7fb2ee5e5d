"""The one interface every attribution method, the causal filter and MedFocus use to talk to an LVLM.

A *family adapter* (``qwen_vl``, ``gemma3``, ``llava``; see :mod:`medfocus.lvlm.families`) wraps a
transformers model + processor and hides three things that differ per family:

1. the chat template and where the answer tokens are (teacher forcing);
2. where the image tokens are and how they form a 2-D grid;
3. how the preprocessed ``pixel_values`` tensor relates to the image (e.g. Qwen2.5-VL stores
   2x2-merge-window-ordered patches), so perturbations are made directly in that tensor.

Geometry. An original image ``(H0, W0)`` is letterboxed (our own :class:`~medfocus.io.Letterbox`)
onto the family's *canvas* (``canvas_w x canvas_h`` pixels), chosen so that the processor does not
resize it again. Every map a method produces is either on the token grid ``(gh, gw)`` or on the
canvas ``(canvas_h, canvas_w)``; :meth:`LVLMAdapter.grid_to_original` and
:meth:`LVLMAdapter.canvas_to_original` bring it back to original-image pixels.

Pixel tensors. :meth:`LVLMAdapter.pixel_values_to_images` returns the *normalised* model input as a
``(B, 3, canvas_h, canvas_w)`` tensor; :meth:`LVLMAdapter.images_to_pixel_values` is its exact
inverse. "Zero baseline" means a black image (intensity 0 before normalisation), whose normalised
value per channel is :attr:`LVLMAdapter.black_level`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from medfocus.io.letterbox import Letterbox


@dataclass
class ChatInputs:
    """One prepared ``(image, question[, answer])`` example (batch size 1), ready for ``model(**inputs)``.

    Attributes:
        inputs: every tensor the model's forward needs (``input_ids``, ``attention_mask``,
            ``pixel_values`` and family extras such as ``image_grid_thw``, ``mm_token_type_ids``,
            ``token_type_ids``), batch dimension 1, on the adapter's device.
        prompt_len: number of tokens of the generation prompt; answer tokens start here.
        answer_span: ``(start, end)`` half-open positions in ``input_ids`` of the *scored* answer
            tokens (end-of-turn token and trailing newline excluded unless ``include_eot``), or
            ``None`` when no answer was given.
        answer_token_ids: ``(T,)`` ids of the scored answer tokens (``T = end - start``).
        answer_tokens: the ``T`` decoded token strings (for token-level displays).
        image_token_positions: ``(N_img,)`` positions of the image soft tokens in ``input_ids``,
            in row-major order of the token grid.
        grid_hw: token grid ``(gh, gw)``; ``gh * gw == N_img``.
        geometry: letterbox from the original image to the canvas.
        question: the full question text (suffix included).
        answer: the answer text, if any.
    """

    inputs: dict[str, torch.Tensor]
    prompt_len: int
    answer_span: tuple[int, int] | None
    answer_token_ids: torch.Tensor | None
    answer_tokens: list[str]
    image_token_positions: torch.Tensor
    grid_hw: tuple[int, int]
    geometry: Letterbox
    question: str
    answer: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_answer_tokens(self) -> int:
        return 0 if self.answer_span is None else self.answer_span[1] - self.answer_span[0]


class LVLMAdapter(ABC):
    """Family-independent access to an LVLM (see module docstring).

    Attributes:
        name: registry name or path the model was loaded from.
        family: ``"qwen_vl"``, ``"gemma3"`` or ``"llava"``.
        model: the transformers model (``...ForConditionalGeneration``), in eval mode.
        processor: its processor.
        device: where the model lives; every tensor in :class:`ChatInputs` is on it.
        canvas_size: ``(canvas_w, canvas_h)`` model-input pixels.
        black_level: ``(3,)`` tensor, the normalised value of intensity 0 per channel.
    """

    name: str
    family: str
    model: Any
    processor: Any
    device: torch.device
    canvas_size: tuple[int, int]
    black_level: torch.Tensor

    # ---- inputs ---------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, image: np.ndarray, question: str, answer: str | None = None, *, include_eot: bool = False) -> ChatInputs:
        """Build chat inputs for an ``(H0, W0)`` uint8 grayscale image and a full question
        (suffix included). With ``answer``, the answer is appended as the assistant turn for teacher
        forcing and :attr:`ChatInputs.answer_span` marks its tokens."""

    @abstractmethod
    def batch_inputs(self, chat: ChatInputs, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs for ``B`` variants of ``chat`` that differ only in the image:
        ``pixel_values`` is a stacked ``(B, *chat.inputs['pixel_values'].shape)`` tensor (each item in
        the family's own preprocessed layout); text tensors are repeated ``B`` times."""

    @abstractmethod
    def pixel_values_to_images(self, pixel_values: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        """Preprocessed tensor of one example (family layout) -> normalised image ``(3, canvas_h, canvas_w)``.
        A leading batch dimension ``(B, *layout)`` gives ``(B, 3, canvas_h, canvas_w)``."""

    @abstractmethod
    def images_to_pixel_values(self, images: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        """Exact inverse of :meth:`pixel_values_to_images` (``(3,H,W)`` or ``(B,3,H,W)``)."""

    def masked_pixel_values(self, chat: ChatInputs, keep: torch.Tensor, baseline: str | torch.Tensor = "zero") -> torch.Tensor:
        """Perturb the image in preprocessed space, with no processor call.

        Args:
            keep: ``(B, canvas_h, canvas_w)`` or ``(B, gh, gw)`` float mask in [0, 1]; 1 keeps the pixel,
                0 replaces it by the baseline (grid masks are upsampled by nearest, exact cells).
            baseline: ``"zero"`` (black), ``"mean"`` (the image's mean normalised value per channel),
                or a ``(3, canvas_h, canvas_w)`` normalised image.
        Returns:
            ``(B, *pixel_values.shape)`` in the family layout, ready for :meth:`batch_inputs`.
        """
        base_img = self.pixel_values_to_images(chat.inputs["pixel_values"], chat)  # (3,H,W)
        _, H, W = base_img.shape
        keep = keep.to(base_img.device, base_img.dtype)
        if keep.shape[-2:] != (H, W):
            keep = torch.nn.functional.interpolate(keep[:, None], size=(H, W), mode="nearest")[:, 0]
        if isinstance(baseline, str):
            if baseline == "zero":
                fill = self.black_level.to(base_img)[:, None, None].expand_as(base_img)
            elif baseline == "mean":
                fill = base_img.mean(dim=(1, 2), keepdim=True).expand_as(base_img)
            else:
                raise ValueError(f"baseline must be 'zero', 'mean' or a tensor, got {baseline!r}")
        else:
            fill = baseline.to(base_img)
        imgs = keep[:, None] * base_img[None] + (1 - keep[:, None]) * fill[None]
        return self.images_to_pixel_values(imgs, chat)

    # ---- model access ---------------------------------------------------------------------------
    @abstractmethod
    def generate(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
        """Greedy generation for (image, full question) pairs; returns the decoded answers."""

    @property
    @abstractmethod
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        """The language model's decoder layers (for hooks on hidden states)."""

    @property
    def language_model(self) -> torch.nn.Module:
        """The module that maps the LM input embeddings to the final hidden states (decoder layers and
        final norm; the LM head is ``model.lm_head``). Default: ``self.model.model.language_model``."""
        return self.model.model.language_model

    @property
    @abstractmethod
    def image_feature_module(self) -> torch.nn.Module:
        """Module whose output are the image-token embeddings fed to the language model
        (Qwen: ``visual`` merger output; Gemma 3 / LLaVA: ``multi_modal_projector``)."""

    # Added by the LVLM layer (additive): the answer-only scoring path of medfocus.lvlm.scoring.
    def hidden_states(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """Run the model *without* its LM head on ``inputs`` (e.g. from :meth:`batch_inputs`); the
        result's ``[0]`` is the ``(B, S, D)`` last hidden state (after the final norm). ``kwargs`` go to
        the forward (``output_attentions``, ``output_hidden_states``...). Default: ``self.model.model``."""
        return self.model.model(**inputs, use_cache=False, **kwargs)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on ``(..., D)`` hidden states -> ``(..., vocab)`` logits (family logit
        soft-capping included). Default: ``self.model.lm_head``."""
        return self.model.lm_head(hidden)

    def image_features_from_output(self, output: Any) -> torch.Tensor:
        """The image-token embeddings from a forward hook's output of :attr:`image_feature_module`, as
        the very tensor the model consumes (so gradients w.r.t. it are defined); ``reshape(-1, D)`` gives
        them in token-grid row-major order."""
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @contextmanager
    def eager_attention(self) -> Iterator[None]:
        """Temporarily switch to eager attention so ``output_attentions=True`` returns weights."""
        model = self.model
        prev = getattr(model.config, "_attn_implementation", None)
        if prev == "eager" or not hasattr(model, "set_attn_implementation"):
            yield
            return
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation(prev)

    # ---- geometry ------------------------------------------------------------------------------
    def grid_to_original(self, grid_map: np.ndarray | torch.Tensor, chat: ChatInputs) -> np.ndarray:
        """``(gh, gw)`` token-grid map -> ``(H0, W0)`` float32 map in original-image pixels."""
        arr = grid_map.detach().float().cpu().numpy() if isinstance(grid_map, torch.Tensor) else np.asarray(grid_map, np.float32)
        return chat.geometry.map_to_original(arr)

    def canvas_to_original(self, canvas_map: np.ndarray | torch.Tensor, chat: ChatInputs) -> np.ndarray:
        """``(canvas_h, canvas_w)`` map -> ``(H0, W0)`` float32 map in original-image pixels."""
        return self.grid_to_original(canvas_map, chat)

    def token_grid(self) -> tuple[int, int]:
        """``(gh, gw)``: the image-token grid of the canvas (fixed for an adapter: its canvas is fixed). Read
        once from :meth:`prepare` on a blank canvas-sized image (a processor call, no model pass) and memoised."""
        grid = getattr(self, "_token_grid_memo", None)
        if grid is None:
            cw, ch = self.canvas_size
            grid = tuple(int(v) for v in self.prepare(np.zeros((ch, cw), np.uint8), "image").grid_hw)
            self._token_grid_memo = grid
        return grid  # type: ignore[return-value]
