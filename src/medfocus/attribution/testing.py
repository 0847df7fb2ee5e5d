"""A hand-built toy LVLM with a known answer mechanism, for known-truth tests and benchmarks.

The toy is a genuine (small) decoder-only vision-language model implementing
:class:`~medfocus.lvlm.adapter.LVLMAdapter`: patch embedding + 2-D sinusoidal position codes
("vision tower"), a linear projector, image soft tokens spliced into the text sequence, ``L``
pre-residual decoder layers (multi-head causal softmax attention returning its weights, an MLP),
and an LM head. Its weights are *constructed* so that the answer depends (up to a leakage below
1e-4) only on the pixels of one known patch, the ``target_cell`` of the ``8 x 8`` token grid:

- the "read" layer's head 0 has a constant query ``c * P(target)`` (from a bias channel) and keys
  equal to each token's position code, so every query puts softmax weight ~1 on the target image
  token; its value is the patch's mean intensity, written to a "read" channel of the residual stream;
  head 1 attends uniformly and writes nothing (a useless head, so head averaging is exercised);
- "identity" layers attend each position to itself exactly (probabilities forced to the identity)
  and write to an unused channel; MLPs write to that unused channel too;
- the LM head turns the read channel ``m`` into ``logit(Yes) = alpha * m``, ``logit(No) = -alpha * m``
  (the same for lower-case yes/no); every other word has a constant logit.

``pixel_values`` are stored, like Qwen2.5-VL's, as ``(64, 3*4*4)`` patches in 2x2-merge-window
order, so tests of the exact unpatchify are meaningful.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medfocus.io.letterbox import Letterbox
from medfocus.lvlm.adapter import ChatInputs, LVLMAdapter

CANVAS = 32
PATCH = 4
GRID = CANVAS // PATCH  # 8
D = 16
POS_DIMS = 12  # 2 axes x 3 frequencies x (cos, sin)
CONTENT, READ, BIAS, SPARE = 12, 13, 14, 15

VOCAB = [
    "<pad>", "<unk>", "<bos>", "<img>", "<sep>", "<eot>", "Yes", "No", "yes", "no", ".", ",", "?", "[", "]",
    "is", "there", "evidence", "of", "in", "the", "image", "answer", "directly", "with", "or", "without", "any",
    "explanation", "think", "step", "by", "and", "a", "nodule", "bright", "square", "so", "therefore", "region",
    "output", "bounding", "boxes", "local", "short", "descriptions", "as", "list", "phrases",
] + [str(i) for i in range(64)]
TOK = {t: i for i, t in enumerate(VOCAB)}
_WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[int]:
    """Words and punctuation -> ids (``Yes``/``No`` are case-sensitive, other words lower-cased)."""
    ids = []
    for w in _WORD.findall(text):
        ids.append(TOK.get(w, TOK.get(w.lower(), TOK["<unk>"])))
    return ids


def pos_codes() -> torch.Tensor:
    """``(64, 12)`` 2-D sinusoidal codes; ``<P_i, P_j>`` peaks (6) at ``i == j``, neighbours <= 3."""
    r, c = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    feats = []
    for axis in (r.flatten(), c.flatten()):
        for k in (1, 2, 3):
            w = 2 * math.pi * k / GRID
            feats += [torch.cos(w * axis), torch.sin(w * axis)]
    return torch.stack(feats, dim=1).float()


class ToyAttention(nn.Module):
    """Multi-head causal softmax attention; returns ``(output, weights (B, H, S, S))``."""

    def __init__(self, n_heads: int = 2, head_dim: int = D, identity: bool = False) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.identity = n_heads, head_dim, identity
        self.q_proj = nn.Linear(D, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(D, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(D, n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, D, bias=False)

    def forward(self, h: torch.Tensor, lrp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = h.shape
        sh = lambda t: t.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = sh(self.q_proj(h)), sh(self.k_proj(h)), sh(self.v_proj(h))
        if lrp:
            from medfocus.attribution.lrp import attention_inputs

            q, k, v = attention_inputs(q, k, v)
        scores = q @ k.transpose(-1, -2)
        allowed = torch.ones(S, S, dtype=torch.bool, device=h.device).tril()
        if self.identity:
            allowed = torch.eye(S, dtype=torch.bool, device=h.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out), attn

    def attnlrp_forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward with AttnLRP's attention rule on ``q, k, v`` (used by ``medfocus.attribution.lrp``)."""
        return ToyAttention.forward(self, h, lrp=True)


class ToyLayer(nn.Module):
    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.self_attn = ToyAttention(identity=identity)
        self.mlp = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, D))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, w = self.self_attn(hidden_states)
        h = hidden_states + a
        return h + self.mlp(h), w


class ToyVision(nn.Module):
    """Patch embedding + position codes: ``(B, 64, 48)`` window-ordered patches -> ``(B, 64, D)`` row-major."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, D, bias=False)
        self.register_buffer("pos", torch.cat([pos_codes(), torch.zeros(GRID * GRID, D - POS_DIMS)], dim=1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows = pixel_values[:, _WINDOW_TO_ROW_INV]  # window order -> row-major token order
        return self.patch_embed(rows) + self.pos


def _window_order() -> torch.Tensor:
    """``order[k]`` = row-major index of the k-th patch in 2x2-merge-window order."""
    idx = torch.arange(GRID * GRID).view(GRID // 2, 2, GRID // 2, 2)  # (wr, dr, wc, dc)
    return idx.permute(0, 2, 1, 3).reshape(-1)


_WINDOW_TO_ROW = _window_order()
_WINDOW_TO_ROW_INV = torch.argsort(_WINDOW_TO_ROW)


class ToyLVLM(nn.Module):
    """The toy model (see module docstring). ``forward`` mirrors HF's: ``logits_to_keep``,
    ``output_attentions``, ``output_hidden_states``; returns a namespace with ``logits``,
    ``attentions``, ``hidden_states``."""

    def __init__(self, layer_modes: Sequence[str] = ("identity", "identity", "read"), target_cell: tuple[int, int] = (2, 5),
                 sharpness: float = 4.0, alpha: float = 3.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="eager")
        self.embed_tokens = nn.Embedding(len(VOCAB), D)
        self.vision = ToyVision()
        self.projector = nn.Linear(D, D, bias=False)
        self.layers = nn.ModuleList([ToyLayer(identity=(m == "identity")) for m in layer_modes])
        self.lm_head = nn.Linear(D, len(VOCAB), bias=True)
        self.target_cell = target_cell
        self._construct(layer_modes, target_cell, sharpness, alpha)

    @torch.no_grad()
    def _construct(self, layer_modes: Sequence[str], target_cell: tuple[int, int], c: float, alpha: float) -> None:
        for p in self.parameters():
            p.zero_()
        self.embed_tokens.weight[:, BIAS] = 1.0
        self.vision.patch_embed.weight[CONTENT, :] = 1.0 / (3 * PATCH * PATCH)  # mean intensity
        self.vision.patch_embed.weight[BIAS, :] = 0.0
        self.projector.weight.copy_(torch.eye(D))
        pt = pos_codes()[target_cell[0] * GRID + target_cell[1]]
        for layer, mode in zip(self.layers, layer_modes):
            at = layer.self_attn
            hd = at.head_dim
            if mode == "read":
                at.q_proj.weight[:POS_DIMS, BIAS] = c * pt  # head 0 query: c * P(target)
                at.k_proj.weight[:POS_DIMS, :POS_DIMS] = torch.eye(POS_DIMS)  # head 0 keys: position codes
                at.v_proj.weight[0, CONTENT] = 1.0
                at.o_proj.weight[READ, 0] = 1.0
                at.v_proj.weight[hd, CONTENT] = 1.0  # head 1: uniform attention, output discarded
            else:
                at.v_proj.weight[0, CONTENT] = 1.0
                at.o_proj.weight[SPARE, 0] = 1.0
            layer.mlp[0].weight[0, CONTENT] = 1.0
            layer.mlp[2].weight[SPARE, 0] = 0.5
        self.lm_head.bias.fill_(-4.0)
        for w, s in (("Yes", 1), ("yes", 1), ("No", -1), ("no", -1)):
            self.lm_head.weight[TOK[w], READ] = s * alpha
            self.lm_head.bias[TOK[w]] = 0.0
        self.lm_head.bias[TOK["<eot>"]] = 0.0
        # images must also be read with the bias channel set (for the constant query)
        self.vision.pos[:, BIAS] = 1.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_attentions: bool = False, output_hidden_states: bool = False,
                **_: Any) -> SimpleNamespace:
        h = self.embed_tokens(input_ids)
        if pixel_values is not None:
            pv = pixel_values if pixel_values.dim() == 3 else pixel_values[None]
            feats = self.projector(self.vision(pv))  # (B, 64, D)
            if feats.shape[0] == 1 and h.shape[0] > 1:
                feats = feats.expand(h.shape[0], -1, -1)
            is_img = input_ids == TOK["<img>"]
            h = h.masked_scatter(is_img[..., None], feats.to(h.dtype))
        attns, hiddens = [], [h]
        for layer in self.layers:
            h, w = layer(h)
            attns.append(w)
            hiddens.append(h)
        if isinstance(logits_to_keep, torch.Tensor):
            hk = h[:, logits_to_keep]
        elif logits_to_keep:
            hk = h[:, -logits_to_keep:]
        else:
            hk = h
        return SimpleNamespace(logits=self.lm_head(hk), attentions=tuple(attns) if output_attentions else None,
                               hidden_states=tuple(hiddens) if output_hidden_states else None, last_hidden_state=h)


class ToyAdapter(LVLMAdapter):
    """:class:`LVLMAdapter` around :class:`ToyLVLM` (canvas 32x32, 8x8 token grid, intensity
    normalised to [-1, 1], so black is -1)."""

    family = "toy"

    def __init__(self, model: ToyLVLM | None = None, **model_kwargs: Any) -> None:
        self.name = "toy"
        self.model = (model or ToyLVLM(**model_kwargs)).eval()
        self.processor = None
        self.device = torch.device("cpu")
        self.canvas_size = (CANVAS, CANVAS)
        self.black_level = torch.full((3,), -1.0)
        self.scripted_generation: list[str] | None = None  # test double for prompting tests

    # ---- inputs --------------------------------------------------------------------------
    def token_grid(self) -> tuple[int, int]:
        """The fixed ``GRID x GRID`` token grid."""
        return GRID, GRID

    def prepare(self, image: np.ndarray, question: str, answer: str | None = None, *, include_eot: bool = False) -> ChatInputs:
        img = np.asarray(image)
        geo = Letterbox.fit((img.shape[1], img.shape[0]), CANVAS)
        canvas = torch.from_numpy(geo.apply(img.astype(np.uint8), fill=0).astype(np.float32) / 255.0)
        norm = ((canvas - 0.5) / 0.5)[None].expand(3, -1, -1)
        pv = self.images_to_pixel_values(norm, None)  # type: ignore[arg-type]
        ids = [TOK["<bos>"]] + [TOK["<img>"]] * (GRID * GRID) + tokenize(question) + [TOK["<sep>"]]
        prompt_len = len(ids)
        span, ans_ids, ans_toks = None, None, []
        if answer is not None:
            a = tokenize(answer)
            ids = ids + a + [TOK["<eot>"]]
            n = len(a) + (1 if include_eot else 0)
            span = (prompt_len, prompt_len + n)
            ans_ids = torch.tensor(ids[prompt_len : prompt_len + n])
            ans_toks = [(" " if j else "") + VOCAB[i] for j, i in enumerate(ans_ids.tolist())]  # decoded pieces, like a real tokenizer
        input_ids = torch.tensor([ids])
        return ChatInputs(inputs={"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pv},
                          prompt_len=prompt_len, answer_span=span, answer_token_ids=ans_ids, answer_tokens=ans_toks,
                          image_token_positions=torch.arange(1, 1 + GRID * GRID), grid_hw=(GRID, GRID), geometry=geo,
                          question=question, answer=answer)

    def batch_inputs(self, chat: ChatInputs, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        B = pixel_values.shape[0]
        return {"input_ids": chat.inputs["input_ids"].expand(B, -1), "attention_mask": chat.inputs["attention_mask"].expand(B, -1),
                "pixel_values": pixel_values}

    def pixel_values_to_images(self, pixel_values: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        single = pixel_values.dim() == 2
        pv = pixel_values[None] if single else pixel_values
        B = pv.shape[0]
        x = pv.reshape(B, GRID // 2, GRID // 2, 2, 2, 3, PATCH, PATCH)  # (B, wr, wc, dr, dc, C, py, px)
        x = x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(B, 3, CANVAS, CANVAS)  # (B, C, wr, dr, py, wc, dc, px)
        return x[0] if single else x

    def images_to_pixel_values(self, images: torch.Tensor, chat: ChatInputs) -> torch.Tensor:
        single = images.dim() == 3
        x = images[None] if single else images
        B = x.shape[0]
        x = x.reshape(B, 3, GRID // 2, 2, PATCH, GRID // 2, 2, PATCH)  # (B, C, wr, dr, py, wc, dc, px)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(B, GRID * GRID, 3 * PATCH * PATCH)
        return x[0] if single else x

    # ---- model access ------------------------------------------------------------------------
    def generate(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
        if self.scripted_generation is not None:
            return [self.scripted_generation[i % len(self.scripted_generation)] for i in range(len(images))]
        outs = []
        with torch.inference_mode():
            for img, q in zip(images, questions):
                chat = self.prepare(img, q)
                ids = chat.inputs["input_ids"]
                words: list[str] = []
                for _ in range(max_new_tokens):
                    nxt = int(self.model(ids, pixel_values=chat.inputs["pixel_values"], logits_to_keep=1).logits[0, -1].argmax())
                    if nxt == TOK["<eot>"]:
                        break
                    words.append(VOCAB[nxt])
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
                outs.append(" ".join(words))
        return outs

    def hidden_states(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor]:
        """``((B, S, D) last hidden states,)`` (what :func:`medfocus.lvlm.scoring.score_chat` uses)."""
        return (self.model(**inputs, logits_to_keep=1, **kwargs).last_hidden_state,)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        return self.model.layers

    @property
    def language_model(self) -> nn.Module:
        return self.model.layers

    @property
    def image_feature_module(self) -> nn.Module:
        return self.model.projector


def cell_box(cell: tuple[int, int], image_size: int = 64) -> tuple[int, int, int, int]:
    """Original-pixel box ``(x1, y1, x2, y2)`` of a token-grid cell for a square ``image_size`` image."""
    s = image_size // GRID
    return (cell[1] * s, cell[0] * s, (cell[1] + 1) * s, (cell[0] + 1) * s)


def toy_image(target_cell: tuple[int, int] = (2, 5), size: int = 64, seed: int = 0, distractor: tuple[int, int] | None = None) -> np.ndarray:
    """``(size, size)`` uint8 image: dim noise (0..80), the target cell bright (230..255), and
    optionally an equally bright distractor cell the toy model does not read."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, size=(size, size)).astype(np.uint8)
    for cell in [target_cell] + ([distractor] if distractor else []):
        x1, y1, x2, y2 = cell_box(cell, size)
        img[y1:y2, x1:x2] = rng.integers(230, 256, size=(y2 - y1, x2 - x1))
    return img


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Adebayo-style full randomisation in place: every parameter re-drawn from a normal with the
    parameter's own std (or 0.02 when it is constant). Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        std = float(p.float().std()) if p.numel() > 1 else 0.0
        std = std if std > 0 else 0.02
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model


class SquareReader:
    """Make any adapter's model see only one square of its canvas (a *wrapper* with known truth).

    A forward pre-hook on the module that receives ``pixel_values`` in every path (the HF base model
    ``adapter.base_model``, which both the full model and the answer-only scorer call; else
    ``adapter.model``) replaces every pixel outside ``box`` (canvas pixels,
    ``(x1, y1, x2, y2)``) by black, in the family's own ``pixel_values`` layout (built with the adapter's
    exact :meth:`images_to_pixel_values`), before the vision tower runs. The answer then depends on the
    pixels inside the box only -- exactly, for every family. Use as a context manager.
    """

    def __init__(self, adapter: LVLMAdapter, chat: ChatInputs, box: tuple[int, int, int, int]) -> None:
        W, H = adapter.canvas_size
        keep = torch.zeros(3, H, W)
        x1, y1, x2, y2 = box
        keep[:, y1:y2, x1:x2] = 1.0
        black = adapter.black_level.float()[:, None, None].expand(3, H, W)
        self.keep_pv = adapter.images_to_pixel_values(keep, chat).detach()
        self.black_pv = adapter.images_to_pixel_values(black.contiguous(), chat).detach()
        self.model = getattr(adapter, "base_model", adapter.model)
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pv = kwargs.get("pixel_values")
        if pv is None:
            return args, kwargs
        k = self.keep_pv.to(pv.device, pv.dtype)
        b = self.black_pv.to(pv.device, pv.dtype)
        x = pv.reshape(-1, *k.shape)
        kwargs = dict(kwargs)
        kwargs["pixel_values"] = (x * k + b * (1 - k)).reshape(pv.shape)
        return args, kwargs

    def __enter__(self) -> "SquareReader":
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
