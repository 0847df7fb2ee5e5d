"""Perturbation baselines: occlusion and RISE.

Both perturb the image *in the family's preprocessed tensor* (:meth:`LVLMAdapter.masked_pixel_values`,
no processor call per mask) and score all variants in batches with the answer-only teacher-forced
scorer (:func:`medfocus.lvlm.scoring.score_chat`), so their cost is the number of forward passes.

The score of a variant is the **mean answer-token probability** ``s = mean_t p(y_t | x)``; per-token
maps use ``p(y_t | x)`` alone. Masks are laid over the image content on the canvas (the letterbox
padding is excluded), so all cells cover real pixels whatever the aspect ratio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfocus.attribution._common import finish_token_maps, prepare_answer, score, to_original
from medfocus.attribution.base import Attribution, Counter, Method
from medfocus.errors import ConfigError


def _content_box(chat: Any) -> tuple[int, int, int, int]:
    g = chat.geometry
    return g.pad_y, g.pad_x, g.new_h, g.new_w


def _cell_edges(n: int, grid: int) -> np.ndarray:
    """``grid + 1`` integer edges splitting ``n`` pixels into ``grid`` near-equal cells."""
    return np.round(np.linspace(0, n, grid + 1)).astype(int)


def _score_masks(adapter: Any, chat: Any, keep: torch.Tensor, baseline: Any, batch_size: int, counter: Counter) -> torch.Tensor:
    """``(B, H, W)`` canvas keep-masks -> ``(B, T)`` answer-token probabilities, built and scored per batch
    (so at most ``batch_size`` perturbed tensors exist at a time)."""
    out = []
    for i in range(0, keep.shape[0], batch_size):
        pv = adapter.masked_pixel_values(chat, keep[i : i + batch_size], baseline)
        out.append(score(adapter, chat, pv, batch_size=batch_size).exp())
        counter.n_forward += int(pv.shape[0])
    return torch.cat(out)


class Occlusion(Method):
    """Occlusion (Zeiler & Fergus): replace each cell of a ``grid x grid`` partition of the image by the
    baseline; the cell's importance is the drop in mean answer-token probability, positive part.

    Passes: ``1 + grid**2`` forwards (the original plus one per cell).
    """

    name = "occlusion"
    defaults = {"grid": 8, "baseline": "zero", "batch_size": 16}

    def _attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        grid, bs = int(self.params["grid"]), int(self.params["batch_size"])
        if grid < 1:
            raise ConfigError(f"occlusion: grid must be >= 1, got {grid}")
        chat = prepare_answer(adapter, image, question, answer, self.name)
        W, H = adapter.canvas_size
        py, px, nh, nw = _content_box(chat)
        ye, xe = _cell_edges(nh, grid) + py, _cell_edges(nw, grid) + px
        keep = torch.ones(1 + grid * grid, H, W)
        cells = []
        for r in range(grid):
            for c in range(grid):
                keep[1 + len(cells), ye[r] : ye[r + 1], xe[c] : xe[c + 1]] = 0.0
                cells.append((r, c))
        p = _score_masks(adapter, chat, keep, self.params["baseline"], bs, counter)  # (1+G, T)
        drop_tok = (p[0:1] - p[1:]).clamp_min(0)  # (G, T) per token
        drop = (p[0].mean() - p[1:].mean(dim=1)).clamp_min(0)  # (G,)
        canvas = torch.zeros(H, W)
        tok_canvas = torch.zeros(p.shape[1], H, W)
        for k, (r, c) in enumerate(cells):
            canvas[ye[r] : ye[r + 1], xe[c] : xe[c + 1]] = drop[k]
            tok_canvas[:, ye[r] : ye[r + 1], xe[c] : xe[c + 1]] = drop_tok[k][:, None, None]
        extras: dict[str, Any] = {"grid_map": drop.view(grid, grid).numpy(), "p_original": p[0].numpy()}
        tok = finish_token_maps(adapter, chat, tok_canvas, extras)
        return Attribution(heatmap=to_original(adapter, chat, canvas), token_heatmaps=tok, extras=extras)


def rise_masks(n: int, grid: int, p_keep: float, size_hw: tuple[int, int], seed: int) -> torch.Tensor:
    """RISE masks (Petsiuk et al.): ``n`` random binary ``grid x grid`` grids (keep prob ``p_keep``),
    bilinearly upsampled to ``(grid+1)`` cells and randomly shifted by up to one cell, cropped to
    ``size_hw``. Returns ``(n, h, w)`` float32 in [0, 1]; deterministic under ``seed``."""
    h, w = size_hw
    g = torch.Generator().manual_seed(int(seed))
    cell_h, cell_w = int(np.ceil(h / grid)), int(np.ceil(w / grid))
    up_h, up_w = (grid + 1) * cell_h, (grid + 1) * cell_w
    bits = (torch.rand(n, 1, grid, grid, generator=g) < p_keep).float()
    up = F.interpolate(bits, size=(up_h, up_w), mode="bilinear", align_corners=False)[:, 0]
    dy = torch.randint(0, cell_h, (n,), generator=g)
    dx = torch.randint(0, cell_w, (n,), generator=g)
    return torch.stack([up[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


class RISE(Method):
    """RISE: saliency = ``sum_i s(x * M_i) M_i / (N * p_keep)`` over ``N`` random smooth masks.

    Sanity check (Adebayo et al.): on the toy model RISE *fails* model randomisation -- the Spearman
    correlation between the maps of the constructed model and of a fully randomised copy stays at 0.79
    (0.66 even with the mean score subtracted, 0.57 with 256 masks). With 64 masks the map is dominated
    by the seed-fixed mask coverage and by what any model reacts to (masking the brightest cells), not
    by what this model reads. Occlusion, IG, Grad-CAM(++), gradient-weighted attention pass (< 0.2).

    Passes: ``n_masks`` forwards.
    """

    name = "rise"
    defaults = {"n_masks": 64, "grid": 8, "p_keep": 0.5, "seed": 0, "baseline": "zero", "batch_size": 16}

    def _attribute(self, adapter: Any, image: np.ndarray, question: str, answer: str, counter: Counter) -> Attribution:
        n, grid, pk = int(self.params["n_masks"]), int(self.params["grid"]), float(self.params["p_keep"])
        if n < 1 or grid < 1 or not 0 < pk < 1:
            raise ConfigError(f"rise: need n_masks >= 1, grid >= 1, 0 < p_keep < 1; got {n}, {grid}, {pk}")
        chat = prepare_answer(adapter, image, question, answer, self.name)
        W, H = adapter.canvas_size
        py, px, nh, nw = _content_box(chat)
        m = rise_masks(n, grid, pk, (nh, nw), int(self.params["seed"]))  # (N, nh, nw)
        keep = torch.ones(n, H, W)
        keep[:, py : py + nh, px : px + nw] = m
        p = _score_masks(adapter, chat, keep, self.params["baseline"], int(self.params["batch_size"]), counter)  # (N, T)
        norm = n * pk
        sal = torch.einsum("n,nhw->hw", p.mean(dim=1), m) / norm
        sal_tok = torch.einsum("nt,nhw->thw", p, m) / norm
        canvas = torch.zeros(H, W)
        canvas[py : py + nh, px : px + nw] = sal
        tok_canvas = torch.zeros(p.shape[1], H, W)
        tok_canvas[:, py : py + nh, px : px + nw] = sal_tok
        extras: dict[str, Any] = {}
        tok = finish_token_maps(adapter, chat, tok_canvas, extras)
        return Attribution(heatmap=to_original(adapter, chat, canvas), token_heatmaps=tok, extras=extras)
