"""Helpers shared by the attribution methods: teacher-forced answer log-probs (with or without
gradients), batched scoring, final-answer-token lookup, map post-processing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from medfocus.errors import ConfigError
from medfocus.lvlm.answers import answer_span
from medfocus.types import token_texts

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import ChatInputs, LVLMAdapter

_YES_NO_WORD = re.compile(r"(?<![A-Za-z])(yes|no)(?![A-Za-z])", re.IGNORECASE)


@dataclass(frozen=True)
class PreparedSample:
    """One ``(image, question, answer)`` prepared once and handed to every method that runs on it.

    Attributes:
        adapter: the adapter it was prepared for (a prepared sample is only valid for that model).
        image: the ``(H0, W0)`` uint8 original image.
        question: full question (mode suffix included).
        answer: the teacher-forced answer text.
        chat: ``adapter.prepare(image, question, answer)``: chat inputs (pixel values included), the
            scored answer span and the letterbox geometry from the original image to the canvas.
        model_image: ``None``, or for a sample in a reduced work frame (:meth:`in_work_frame`) the original
            image: what the model sees (its pixel values in ``chat`` come from it), while ``image`` is then
            the work-frame copy every image-sized array is built on.
    """

    adapter: Any
    image: np.ndarray
    question: str
    answer: str
    chat: Any
    model_image: np.ndarray | None = None

    @property
    def geometry(self) -> Any:
        """The letterbox from the original image to the model's canvas."""
        return self.chat.geometry

    def matches(self, adapter: Any, image: np.ndarray, question: str, answer: str) -> bool:
        """Whether this sample is the preparation of exactly these inputs (same adapter object, equal image,
        question and answer)."""
        if adapter is not self.adapter or question != self.question or answer != self.answer:
            return False
        img = np.asarray(image)
        return img is self.image or (img.shape == self.image.shape and img.dtype == self.image.dtype and np.array_equal(img, self.image))

    def in_work_frame(self, frame: Any) -> "PreparedSample":
        """This sample for methods working in ``frame`` (a :class:`~medfocus.io.letterbox.WorkFrame` of
        ``image``): ``image`` becomes the work-frame copy and the chat's geometry maps work-frame pixels to
        the canvas (:meth:`WorkFrame.geometry`); the chat's inputs, hence the model input, are unchanged.
        An identity frame returns the sample itself."""
        if frame.identity:
            return self
        from dataclasses import replace

        chat = replace(self.chat, geometry=frame.geometry(self.chat.geometry))
        return PreparedSample(self.adapter, frame.downsample(self.image), self.question, self.answer, chat,
                              model_image=self.image)


def model_input_image(image: np.ndarray, counter: Any) -> np.ndarray:
    """The image to hand the model (e.g. to ``adapter.generate``): the original when the method runs in a
    reduced work frame (``counter.prepared.model_image``), else ``image`` itself."""
    prepared = getattr(counter, "prepared", None)
    mi = getattr(prepared, "model_image", None)
    return image if mi is None else mi


def prepare_sample(adapter: Any, image: np.ndarray, question: str, answer: str, method: str = "suite") -> PreparedSample:
    """Prepare ``(image, question, answer)`` once (one processor call) for every method of a sample.

    Raises:
        ConfigError: empty answer, or an answer with no scored tokens (``method`` names the caller).
    """
    return PreparedSample(adapter, np.asarray(image), question, answer, _prepare_checked(adapter, image, question, answer, method))


def _prepare_checked(adapter: Any, image: np.ndarray, question: str, answer: str, method: str) -> Any:
    if not answer or not str(answer).strip():
        raise ConfigError(f"method {method!r}: an answer text is required to attribute (got {answer!r})")
    chat = adapter.prepare(image, question, answer)
    if chat.answer_span is None or chat.n_answer_tokens <= 0:
        raise ConfigError(f"method {method!r}: the answer {answer!r} produced no scored tokens")
    return chat


def prepare_answer(adapter: Any, image: np.ndarray, question: str, answer: str, method: str, counter: Any = None) -> Any:
    """``adapter.prepare`` with the answer teacher-forced; refuses an empty scored span. When the method
    runs with a :class:`PreparedSample` (``counter.prepared``, set by :meth:`Method.attribute`), its chat
    is reused instead (no processor call)."""
    prepared = getattr(counter, "prepared", None)
    if prepared is not None:
        return prepared.chat
    return _prepare_checked(adapter, image, question, answer, method)


def final_token_index(chat: Any) -> int:
    """Index (0..T-1) of the answer's deciding yes/no token: where the word that
    :func:`~medfocus.lvlm.answers.parse_yes_no` reads as the answer starts (its span from
    :func:`~medfocus.lvlm.answers.answer_span`) -- a word may span several tokens ("Y" + "es"), and its first
    token carries the decision. In a step-by-step answer this is the conclusion, attributed separately
    from the rationale; it is not always the last yes/no word ("Final answer: yes. No other finding").
    When no single word decided (an answer read from phrasing, or none), the last word "yes" or "no";
    the last token when there is no such word."""
    # the pieces as text (a line end stays one): the joined text keeps the parser's sentence and line rules
    toks = token_texts(chat.answer_tokens)
    starts = np.cumsum([0] + [len(t) for t in toks])
    text = "".join(toks)
    span = answer_span(text)
    if span is not None:
        c = span[0]
    else:
        matches = list(_YES_NO_WORD.finditer(text))
        if not matches:
            return chat.n_answer_tokens - 1
        c = matches[-1].start()
    return int(np.searchsorted(starts, c, side="right") - 1)


def predicting_positions(chat: ChatInputs) -> torch.Tensor:
    """``(T,)`` positions whose next-token logits score the answer tokens (``start-1 .. end-2``)."""
    s, e = chat.answer_span
    return torch.arange(s - 1, e - 1, device=chat.inputs["input_ids"].device)


def forward_logprobs(adapter: LVLMAdapter, chat: ChatInputs, inputs: dict[str, torch.Tensor], **model_kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Run ``adapter.model(**inputs)`` and return ``((B, T) float32 answer-token log-probs, outputs)``.

    Only the ``T`` positions that predict the answer are sent through the LM head
    (``logits_to_keep``), so no ``(B, S, vocab)`` tensor is built. Gradients flow when enabled.
    """
    pos = predicting_positions(chat)
    out = adapter.model(**inputs, logits_to_keep=pos, use_cache=False, **model_kwargs)
    logits = out.logits
    if logits.shape[1] != pos.numel():  # a model that ignored logits_to_keep
        logits = logits[:, pos]
    ids = chat.answer_token_ids.to(logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)[..., 0]
    return logp, out


def score(adapter: LVLMAdapter, chat: ChatInputs, pixel_values: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``(B, T)`` answer-token log-probs for ``B`` image variants (family layout, stacked), in
    batches, by the LVLM layer's answer-only scorer (:func:`medfocus.lvlm.scoring.score_chat`)."""
    from medfocus.lvlm.scoring import score_chat

    return torch.as_tensor(score_chat(adapter, chat, pixel_values, batch_size=batch_size)).float().cpu()


def answer_target(logp: torch.Tensor, which: str | int) -> torch.Tensor:
    """Scalar (per batch row) gradient target from ``(B, T)`` log-probs: ``"answer"`` sums the
    log-probs of every scored answer token (the whole answer / rationale), an int selects one token."""
    if which == "answer":
        return logp.sum(dim=-1)
    return logp[:, int(which)]


def grid_from_tokens(values: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
    """``(N_img,)`` values in row-major token-grid order -> ``(gh, gw)``."""
    gh, gw = chat.grid_hw
    if values.numel() != gh * gw:
        raise ConfigError(f"got {values.numel()} image-token values for a {gh}x{gw} grid")
    return values.reshape(gh, gw)


def to_original(adapter: LVLMAdapter, chat: ChatInputs, m: torch.Tensor | np.ndarray) -> np.ndarray:
    """Grid or canvas map -> ``(H0, W0)`` float32 map in original pixels."""
    return adapter.grid_to_original(m, chat).astype(np.float32)


def maps_to_original(adapter: LVLMAdapter, chat: ChatInputs, maps: torch.Tensor) -> np.ndarray:
    """``(T, h, w)`` grid/canvas maps -> ``(T, H0, W0)``."""
    return np.stack([to_original(adapter, chat, m) for m in maps]) if len(maps) else np.zeros((0,) + (chat.geometry.orig_h, chat.geometry.orig_w), np.float32)


#: Above this many floats (256 MB), per-token maps are not brought to original pixels: a 60-token
#: rationale on a 2500 x 3000 radiograph would take 1.8 GB. The low-resolution maps are kept instead.
MAX_TOKEN_MAP_FLOATS = 2**26


def finish_token_maps(adapter: LVLMAdapter, chat: ChatInputs, token_maps: torch.Tensor, extras: dict[str, Any]) -> np.ndarray | None:
    """Per-token maps ``(T, h, w)`` (grid or canvas) -> ``(T, H0, W0)`` in original pixels, or ``None``
    when that would exceed :data:`MAX_TOKEN_MAP_FLOATS` (then only ``extras["token_maps_lowres"]`` holds
    them). Always records ``final_token_index``, ``final_token_heatmap`` (original pixels) and the tokens."""
    k = final_token_index(chat)
    extras["final_token_index"] = k
    extras["final_token_heatmap"] = to_original(adapter, chat, token_maps[k])
    extras["answer_tokens"] = list(chat.answer_tokens)
    T = int(token_maps.shape[0])
    if T * chat.geometry.orig_h * chat.geometry.orig_w > MAX_TOKEN_MAP_FLOATS:
        extras["token_maps_lowres"] = token_maps.detach().float().cpu().numpy()
        return None
    return maps_to_original(adapter, chat, token_maps)


def layer_hidden_hook(module: torch.nn.Module, *, pre: bool, store: dict[str, Any]) -> Callable[[], None]:
    """Hook that replaces a decoder layer's input (``pre``) or output hidden states by a leaf tensor
    that requires grad, stored in ``store["h"]``; returns the remover. Replacing by a leaf makes the
    gradient w.r.t. these activations available even when parameters are frozen."""

    def _leaf(t: torch.Tensor) -> torch.Tensor:
        leaf = t.detach().requires_grad_(True)
        store["h"] = leaf
        return leaf

    if pre:

        def pre_hook(mod, args, kwargs):  # type: ignore[no-untyped-def]
            if args:
                return (_leaf(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = _leaf(kwargs["hidden_states"])
            return args, kwargs

        h = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(mod, args, output):  # type: ignore[no-untyped-def]
            if isinstance(output, torch.Tensor):
                return _leaf(output)
            if isinstance(output, tuple):
                return (_leaf(output[0]),) + tuple(output[1:])
            raise TypeError(f"unsupported decoder-layer output type {type(output)}")

        h = module.register_forward_hook(post_hook)
    return h.remove
