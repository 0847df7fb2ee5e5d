"""Shared implementation of :class:`~medfocus.lvlm.adapter.LVLMAdapter` for transformers models.

A family subclass provides: the image-token id, the token grid, the pixel layout (patchify /
unpatchify), the normalisation constants and the end-of-turn text. Everything else (chat template
rendering, answer span, batching, generation, answer-only hidden states) lives here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from medfocus.errors import ModelError
from medfocus.io.letterbox import Letterbox
from medfocus.lvlm.adapter import ChatInputs, LVLMAdapter


class HFAdapter(LVLMAdapter):
    """Common base for the transformers-backed family adapters.

    Args:
        model: a ``...ForConditionalGeneration`` model (eval mode is set here).
        processor: its processor (chat template + image processor + tokenizer).
        name: registry name or path (for messages).
        canvas_size: ``(canvas_w, canvas_h)``; the processor must not resize this size again.
    """

    family = "base"
    #: processor output keys that hold per-token text tensors (repeated ``B`` times in batches).
    text_keys: tuple[str, ...] = ("input_ids", "attention_mask")
    #: image-processor options for every call: the canvas already has the model's input size, so no
    #: resize / crop may touch it again (whatever backend -- PIL or torchvision -- the processor uses).
    image_kwargs: dict[str, Any] = {"do_resize": False}

    def __init__(self, model: Any, processor: Any, name: str, canvas_size: tuple[int, int]) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.canvas_size = (int(canvas_size[0]), int(canvas_size[1]))
        # With device_map sharding, inputs go where the token embeddings live.
        self.device = model.get_input_embeddings().weight.device
        mean, std = self._norm_constants()
        self.image_mean = torch.tensor(mean, dtype=torch.float32)
        self.image_std = torch.tensor(std, dtype=torch.float32)
        self.black_level = (0.0 - self.image_mean) / self.image_std

    # ---- family hooks ------------------------------------------------------------------------------
    def _norm_constants(self) -> tuple[Sequence[float], Sequence[float]]:
        ip = self.processor.image_processor
        return list(ip.image_mean), list(ip.image_std)

    @property
    def image_token_id(self) -> int:
        """Id of the image *soft* token (the placeholders replaced by image features)."""
        return int(self.model.config.image_token_id)

    def _grid_hw(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        raise NotImplementedError

    def token_grid(self) -> tuple[int, int]:
        """``(gh, gw)`` of the fixed canvas, from the model's configuration (no processor call); families
        whose grid is read from the processed inputs override it."""
        return self._grid_hw({})

    def _messages(self, question: str, answer: str | None) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return msgs

    # ---- text + image preprocessing ----------------------------------------------------------------
    def letterbox(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """``(H0, W0)`` uint8 grayscale (or ``(H0, W0, 3)``) -> ``(canvas_h, canvas_w, 3)`` uint8 RGB + geometry."""
        img = np.asarray(image)
        if img.ndim == 3 and img.shape[2] == 3:
            img = img.mean(axis=2).round().astype(np.uint8) if not (img[..., 0] == img[..., 1]).all() else img[..., 0]
        if img.ndim != 2:
            raise ModelError(f"{self.name}: expected a (H, W) grayscale image, got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ModelError(f"{self.name}: expected a uint8 image, got {img.dtype}")
        geo = Letterbox.fit((img.shape[1], img.shape[0]), self.canvas_size)
        canvas = geo.apply(img, fill=0)
        return np.repeat(canvas[:, :, None], 3, axis=2), geo

    def render(self, question: str, answer: str | None = None) -> str:
        """Chat-template text (with image placeholder) for generation (``answer=None``) or teacher forcing."""
        return self.processor.apply_chat_template(self._messages(question, answer), add_generation_prompt=answer is None, tokenize=False)

    def _add_special(self, texts: Sequence[str]) -> bool:
        # Templates that write the BOS themselves (Gemma) must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        return not (bos and all(t.startswith(bos) for t in texts))

    def _process(self, texts: list[str], images: list[np.ndarray], padding: bool = False) -> dict[str, torch.Tensor]:
        out = self.processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=padding,
                             add_special_tokens=self._add_special(texts), **self.image_kwargs)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def _text_ids(self, text: str, add_special: bool) -> list[int]:
        """Token ids of ``text`` from the tokenizer alone (the image placeholder stays unexpanded)."""
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def prepare(self, image: np.ndarray, question: str, answer: str | None = None, *, include_eot: bool = False) -> ChatInputs:
        """See :meth:`LVLMAdapter.prepare`. One processor call (image preprocessing + the image-token
        expansion of the full text); the answer span comes from the tokenizer alone.

        The processor's output differs from the text-only tokenisation only where it expands the image
        placeholder, which lies inside the generation prompt. So the text-only ids give the prompt
        length ``P`` and the answer-only length ``A`` of the unexpanded text, and the expanded ids share
        the text-only ids' tail after the prompt: ``prompt_len = len(expanded) - (len(text_only) - P)``.
        Checked, each raising :class:`ModelError`: the prompt is a prefix of the teacher-forced text and
        its tokens are a prefix of the teacher-forced tokens; the answer tokens do not change when the
        end of turn is appended; the expanded and text-only ids agree from the last prompt token on; the
        image tokens all lie in the prompt.
        """
        canvas, geo = self.letterbox(image)
        prompt_text = self.render(question)
        if answer is None:
            inputs, prompt_len, span, ids = self._process([prompt_text], [canvas]), None, None, None
        else:
            full_text = self.render(question, answer)
            if not full_text.startswith(prompt_text):
                raise ModelError(f"{self.name}: chat template: the generation prompt is not a prefix of the teacher-forced text")
            rest = full_text[len(prompt_text):]
            ans = answer.strip()
            k = rest.find(ans)
            if k < 0:
                raise ModelError(f"{self.name}: answer {answer!r} not found in the rendered assistant turn {rest!r}")
            inputs = self._process([full_text], [canvas])
            full_ids = inputs["input_ids"][0]
            # Text-only tokenisations, with the special-token rule the processor call used.
            add_special = self._add_special([full_text])
            t_prompt = self._text_ids(prompt_text, add_special)
            t_full = self._text_ids(full_text, add_special)
            P, F = len(t_prompt), len(t_full)
            if t_full[:P] != t_prompt:
                raise ModelError(f"{self.name}: tokenised prompt is not a prefix of the tokenised teacher-forced input")
            n_tail = F - P + 1  # the answer turn plus the prompt's last token
            if P < 1 or full_ids.shape[0] < n_tail or full_ids[-n_tail:].tolist() != t_full[-n_tail:]:
                raise ModelError(f"{self.name}: the processor's expanded tokens differ from the text-only tokens after the prompt")
            prompt_len = int(full_ids.shape[0]) - (F - P)
            if include_eot:
                end = int(full_ids.shape[0])
            else:
                t_ans = self._text_ids(prompt_text + rest[: k + len(ans)], add_special)
                if t_full[: len(t_ans)] != t_ans:
                    raise ModelError(f"{self.name}: answer tokens change when the end of turn is appended")
                end = prompt_len + (len(t_ans) - P)
            if end <= prompt_len:
                raise ModelError(f"{self.name}: answer {answer!r} has no tokens")
            span = (prompt_len, end)
            ids = full_ids[prompt_len:end].clone()
        if prompt_len is None:
            prompt_len = int(inputs["input_ids"].shape[1])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        positions = (inputs["input_ids"][0] == self.image_token_id).nonzero()[:, 0]
        grid = self._grid_hw(inputs)
        if grid[0] * grid[1] != positions.numel():
            raise ModelError(f"{self.name}: {positions.numel()} image tokens but a {grid} grid")
        if positions.numel() and int(positions[-1]) >= prompt_len:
            raise ModelError(f"{self.name}: image tokens found after the generation prompt (position {int(positions[-1])} >= {prompt_len})")
        return ChatInputs(
            inputs=inputs, prompt_len=prompt_len, answer_span=span, answer_token_ids=ids,
            answer_tokens=[self.tokenizer.decode([int(t)]) for t in ids] if ids is not None else [],
            image_token_positions=positions, grid_hw=grid, geometry=geo, question=question, answer=answer,
        )

    def with_answer_ids(self, chat: ChatInputs, token_ids: Sequence[int] | torch.Tensor) -> ChatInputs:
        """A teacher-forcing copy of a *generation-prompt* ``chat`` with the given answer token ids appended
        (used to re-score exactly what :meth:`generate` produced)."""
        if chat.answer_span is not None:
            raise ModelError("with_answer_ids needs a chat prepared without an answer")
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        inputs = dict(chat.inputs)
        S = chat.prompt_len
        for key, v in chat.inputs.items():
            if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == S and key != "pixel_values":
                fill = ids if key == "input_ids" else (torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids))
                inputs[key] = torch.cat([v, fill.to(v.dtype)], dim=1)
        T = ids.shape[1]
        return ChatInputs(inputs=inputs, prompt_len=S, answer_span=(S, S + T), answer_token_ids=ids[0].clone(),
                          answer_tokens=[self.tokenizer.decode([int(t)]) for t in ids[0]], image_token_positions=chat.image_token_positions,
                          grid_hw=chat.grid_hw, geometry=chat.geometry, question=chat.question, answer=self.tokenizer.decode(ids[0]))

    # ---- batching -----------------------------------------------------------------------------------
    def _stack_pixel_values(self, chat: ChatInputs, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, *layout)`` -> what the model's forward takes for ``B`` images."""
        return pixel_values.reshape(-1, *chat.inputs["pixel_values"].shape[1:])

    def batch_inputs(self, chat: ChatInputs, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        layout = tuple(chat.inputs["pixel_values"].shape)
        if tuple(pixel_values.shape[1:]) != layout:
            raise ModelError(f"{self.name}: pixel_values batch must be (B, {layout}), got {tuple(pixel_values.shape)}")
        B = int(pixel_values.shape[0])
        out: dict[str, torch.Tensor] = {}
        for k, v in chat.inputs.items():
            if k == "pixel_values":
                out[k] = self._stack_pixel_values(chat, pixel_values.to(self.device, self.model.dtype))
            else:
                out[k] = self._repeat_other(k, v, B)
        return out

    def _repeat_other(self, key: str, v: torch.Tensor, B: int) -> torch.Tensor:
        return v.repeat(B, *([1] * (v.dim() - 1)))

    # ---- model access ------------------------------------------------------------------------------
    @property
    def base_model(self) -> torch.nn.Module:
        """The model without its LM head (returns hidden states)."""
        return self.model.model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the LM head (and the family's logit soft-capping, if any) to ``(..., D)`` hidden states."""
        logits = self.lm_head(hidden)
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def hidden_states(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """Run the base model (no LM head) -> its output (``[0]`` is ``(B, S, D)`` last hidden state)."""
        return self.base_model(**inputs, use_cache=False, **kwargs)

    @property
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        return self.model.model.language_model.layers

    @property
    def image_feature_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def image_features_from_output(self, output: Any) -> torch.Tensor:
        """The image-token embeddings from :attr:`image_feature_module`'s forward output, as the very
        tensor the model consumes (so ``torch.autograd.grad`` w.r.t. it works): ``(B, N_img, D)`` for
        Gemma 3 / LLaVA (projector output), ``(B * N_img, D)`` for Qwen (``visual(...).pooler_output``).
        Rows are in token-grid row-major order."""
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def generate(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
        if len(images) != len(questions):
            raise ModelError(f"generate: {len(images)} images but {len(questions)} questions")
        outs: list[str] = []
        tok = self.tokenizer
        prev_side = tok.padding_side
        tok.padding_side = "left"  # generation continues from the right end of every row
        try:
            for i in range(0, len(images), batch_size):
                canv = [self.letterbox(im)[0] for im in images[i : i + batch_size]]
                texts = [self.render(q) for q in questions[i : i + batch_size]]
                inputs = {k: v.to(self.device) for k, v in self._process(texts, canv, padding=True).items()}
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                with torch.inference_mode():
                    seq = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                              pad_token_id=tok.pad_token_id)
                new = seq[:, inputs["input_ids"].shape[1]:]
                outs += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
        finally:
            tok.padding_side = prev_side
        return outs

    # ---- pixels --------------------------------------------------------------------------------------
    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W)`` intensities in [0, 255] -> normalised model-input values."""
        m = self.image_mean.to(images.device, images.dtype)[:, None, None]
        s = self.image_std.to(images.device, images.dtype)[:, None, None]
        return (images / 255.0 - m) / s
