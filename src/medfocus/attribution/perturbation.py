"""Perturbation baselines: occlusion and RISE.

Both perturb the image *in the family's preprocessed tensor* (:meth:`LVLMAdapter.masked_pixel_values`,
no processor call per mask) and score all variants in batches with the answer-only teacher-forced
scorer (:func:`medfocus.lvlm.scoring.score_chat`), so their cost is the number of forward passes.

The score of a variant is the **mean answer-token probability** ``s = mean_t p(y_t | x)``; per-token
maps use ``p(y_t | x)`` alone. Masks are laid over the image content on the canvas (the letterbox
padding is excluded), so all cells cover real pixels whatever the aspect ratio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from medfocus.attribution._common import finish_token_maps, to_original
from medfocus.attribution.base import Attribution, Counter, PerturbationMethod, choice, integer, number
from medfocus.attribution.passes import ScorePlan, chunk_count

__all__ = ["Occlusion", "RISE", "RiseMasks", "chunk_count", "rise_masks"]
from medfocus.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the adapter interface lives in the LVLM layer
    from medfocus.lvlm.adapter import ChatInputs


def _content_box(chat: ChatInputs) -> tuple[int, int, int, int]:
    g = chat.geometry
    return g.pad_y, g.pad_x, g.new_h, g.new_w


def _cell_edges(n: int, grid: int) -> np.ndarray:
    """``grid + 1`` integer edges splitting ``n`` pixels into ``grid`` near-equal cells (all non-empty
    exactly when ``grid <= n``: the edges are then at least one pixel apart)."""
    return np.round(np.linspace(0, n, grid + 1)).astype(int)


def check_grid_fits(method: str, grid: int, adapter: Any, films: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a ``grid x grid`` partition finer than a film's content on the model's canvas.

    The masks are applied per canvas pixel (:meth:`~medfocus.lvlm.adapter.LVLMAdapter.masked_pixel_values`),
    over the letterboxed content only (``Letterbox.fit(film size, canvas)``: ``new_w x new_h`` pixels), so a
    cell needs at least one canvas pixel: with ``grid`` above the content's shorter side some cells are
    empty (an occlusion variant identical to the original image, a zero row of the map; RISE cells below
    one pixel). A cell smaller than one image token is still a distinct input (other pixels of the token's
    patch change) and is allowed.

    With a loaded adapter (``token_grid()`` available) every film is checked, except films whose content is
    under one image token, which the runner refuses per film
    (:func:`~medfocus.io.letterbox.check_film_content`). With a stand-in that has only ``canvas_size`` (the
    check before loading, :func:`medfocus.runner.grid.check_films_before_load`) ``grid`` is checked against
    the canvas, the largest content any film can have. An adapter without ``canvas_size`` is not checked.

    Args:
        method: the method's name (for the message). grid: cells per side. adapter: the model (its
            ``canvas_size``, ``name`` and, when loaded, ``token_grid()``).
        films: ``{image path: (width, height)}`` in original pixels.
    Raises:
        ConfigError: naming the method, ``grid``, the limit, the model's canvas and the film that sets it.
    """
    from medfocus.io.letterbox import Letterbox, content_below_one_token

    canvas = getattr(adapter, "canvas_size", None)
    if canvas is None or not films:
        return
    W, H = int(canvas[0]), int(canvas[1])
    model = getattr(adapter, "name", None)
    where = f"{f'model {model!r}' if model else 'the model'}'s {W}x{H} canvas"
    why = "(a cell needs at least one canvas pixel; a finer grid leaves empty cells, variants identical to the original)"
    token_grid = getattr(adapter, "token_grid", None)
    if not callable(token_grid):
        if grid > min(W, H):
            raise ConfigError(f"method {method!r}: parameter 'grid' = {grid} is finer than the image content can be on "
                              f"{where}: a film's content covers at most {W}x{H} canvas pixels, so grid can be at most "
                              f"{min(W, H)} (less for films of another aspect ratio) {why}. Give --param "
                              f"{method}.grid={min(W, H)} or less.")
        return
    gh, gw = (int(v) for v in token_grid())
    bad = {}
    for path, (w0, h0) in films.items():
        w0, h0 = int(w0), int(h0)
        if content_below_one_token((w0, h0), (W, H), (gh, gw)):
            continue  # under one image token: refused per film by check_film_content, not a grid matter
        geo = Letterbox.fit((w0, h0), (W, H))
        if grid > min(geo.new_w, geo.new_h):
            bad[path] = (w0, h0, geo.new_w, geo.new_h)
    if not bad:
        return
    limit = min(min(v[2], v[3]) for v in bad.values())
    worst = next(p for p, v in bad.items() if min(v[2], v[3]) == limit)
    w0, h0, nw, nh = bad[worst]
    raise ConfigError(
        f"method {method!r}: parameter 'grid' = {grid} is finer than the image content on {where}: the film "
        f"{worst} ({w0}x{h0} px) covers {nw}x{nh} canvas pixels, so grid can be at most {limit} there {why}"
        + (f"; {len(bad)} of {len(films)} films are below grid={grid}" if len(bad) > 1 else "")
        + f". Give --param {method}.grid={limit} or less.")


def _check_grid_on_content(method: str, grid: int, nw: int, nh: int, why: str) -> None:
    """A method called directly (not through the runner, which refuses this before any sample with
    :func:`check_grid_fits`): ``grid`` may not exceed this film's ``nw x nh`` content on the canvas."""
    if grid > min(nh, nw):
        raise ConfigError(f"{method}: grid={grid} is finer than this film's content on the canvas ({nw}x{nh} "
                          f"canvas pixels): at most {min(nh, nw)}, {why}")


class Occlusion(PerturbationMethod):
    """Occlusion (Zeiler & Fergus): replace each cell of a ``grid x grid`` partition of the image by the
    baseline; the cell's importance is the drop in mean answer-token probability, positive part.

    Passes: ``1 + grid**2`` forwards (the original plus one per cell).

    Source: Zeiler & Fergus (ECCV 2014), occlusion sensitivity, with non-overlapping cells. Deviations
    from the paper's public code: cells are laid over the image content only (not the letterbox
    padding), the variants are masked in the family's preprocessed tensor (the published code ran the
    processor per variant; identical values, tested), and the score is the mean answer-token
    probability of the answer's own tokens (end-of-turn excluded).
    """

    name = "occlusion"
    per_token_maps = True  # every variant is scored per answer token
    defaults = {"grid": 8, "baseline": "zero", "batch_size": 16}
    source = ("Zeiler & Fergus 2014 occlusion (grid cells over the image content, positive drop of the mean "
              "answer-token probability); masks applied in the preprocessed tensor")
    spec = {"grid": integer(1), "baseline": choice("zero", "mean"), "batch_size": integer(1)}

    def check_images(self, adapter: Any, films: Mapping[str, tuple[int, int]]) -> None:
        """``grid`` is at most every film's content side on the canvas (:func:`check_grid_fits`)."""
        check_grid_fits(self.name, int(self.params["grid"]), adapter, films)

    def forward_passes(self) -> tuple[int, str]:
        """``1 + grid**2``: the original and one variant per cell."""
        g = int(self.params["grid"])
        return 1 + g * g, f"1 + {g}x{g} grid cells"

    def _score_plan(self, adapter: Any, image: np.ndarray, chat: Any, counter: Counter) -> ScorePlan:
        grid, bs = int(self.params["grid"]), int(self.params["batch_size"])
        if grid < 1:
            raise ConfigError(f"occlusion: grid must be >= 1, got {grid}")
        W, H = adapter.canvas_size
        py, px, nh, nw = _content_box(chat)
        _check_grid_on_content("occlusion", grid, nw, nh, "else cells are empty")
        # cell id of every canvas pixel (-1 = letterbox padding), so masks and maps are single gathers
        rows = np.full(H, -1)
        cols = np.full(W, -1)
        rows[py : py + nh] = np.searchsorted(_cell_edges(nh, grid), np.arange(nh), side="right") - 1
        cols[px : px + nw] = np.searchsorted(_cell_edges(nw, grid), np.arange(nw), side="right") - 1
        cell = torch.from_numpy(np.where((rows[:, None] >= 0) & (cols[None] >= 0), rows[:, None] * grid + cols[None], -1))
        G = grid * grid
        baseline = self.params["baseline"]

        # variant 0 is the original image, variant k >= 1 occludes cell k - 1
        def pixel_values(i: int, j: int) -> torch.Tensor:
            return adapter.masked_pixel_values(chat, (cell[None] != torch.arange(i - 1, j - 1)[:, None, None]).float(), baseline)

        def finish(logp: torch.Tensor) -> Attribution:
            p = logp.exp()  # (1+G, T)
            drop_tok = torch.cat([(p[0:1] - p[1:]).clamp_min(0), torch.zeros(1, p.shape[1])])  # (G+1, T); row G = padding
            drop = torch.cat([(p[0].mean() - p[1:].mean(dim=1)).clamp_min(0), torch.zeros(1)])  # (G+1,)
            idx = torch.where(cell >= 0, cell, torch.full_like(cell, G))
            canvas = drop[idx]
            tok_canvas = drop_tok[idx].permute(2, 0, 1)
            signed = (p[0].mean() - p[1:].mean(dim=1)).view(grid, grid)  # before the positive part
            extras: dict[str, Any] = {"grid_map": drop[:G].view(grid, grid).numpy(), "signed_grid_map": signed.numpy(), "p_original": p[0].numpy()}
            tok = finish_token_maps(adapter, chat, tok_canvas, extras)
            return Attribution(heatmap=to_original(adapter, chat, canvas), token_heatmaps=tok, extras=extras)

        counter.n_forward += 1 + G
        return ScorePlan(1 + G, pixel_values, finish, bs)


class RiseMasks:
    """RISE masks (Petsiuk et al.): ``n`` random binary ``grid x grid`` grids (keep prob ``p_keep``),
    bilinearly upsampled to ``(grid+1)`` cells and randomly shifted by up to one cell, cropped to
    ``size_hw``; deterministic under ``seed``. ``masks[i:j]`` renders ``(j - i, h, w)`` float32 in [0, 1]
    on demand (only the small grids and shifts are stored).

    Rendering uses that bilinear upsampling is separable: with ``Ry (Uh, g)`` and ``Rx (Uw, g)`` the
    1-D interpolation matrices (``align_corners=False``, as ``F.interpolate``), the upsampled grid is
    ``Ry @ bits @ Rx^T`` and its crop at ``(dy, dx)`` is ``Ry[dy:dy+h] @ bits @ Rx[dx:dx+w]^T`` -- one
    batched matrix product instead of upsampling the whole ``(grid+1)``-cell canvas and cropping it.
    """

    def __init__(self, n: int, grid: int, p_keep: float, size_hw: tuple[int, int], seed: int) -> None:
        self.h, self.w = size_hw
        g = torch.Generator().manual_seed(int(seed))
        self.cell_h, self.cell_w = int(np.ceil(self.h / grid)), int(np.ceil(self.w / grid))
        self.up = ((grid + 1) * self.cell_h, (grid + 1) * self.cell_w)
        self.bits = (torch.rand(n, 1, grid, grid, generator=g) < p_keep).float()
        self.dy = torch.randint(0, self.cell_h, (n,), generator=g)
        self.dx = torch.randint(0, self.cell_w, (n,), generator=g)
        self.ry = _interp_matrix(grid, self.up[0])  # (Uh, g)
        self.rx = _interp_matrix(grid, self.up[1])  # (Uw, g)

    def __len__(self) -> int:
        return self.bits.shape[0]

    def __getitem__(self, sl: slice) -> torch.Tensor:
        idx = torch.arange(len(self))[sl]
        rows = self.dy[idx, None] + torch.arange(self.h)[None]  # (k, h) rows of the upsampled canvas
        cols = self.dx[idx, None] + torch.arange(self.w)[None]  # (k, w)
        return self.ry[rows] @ self.bits[idx, 0] @ self.rx[cols].transpose(1, 2)


def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of 1-D linear upsampling with ``align_corners=False`` (``F.interpolate``'s)."""
    return F.interpolate(torch.eye(n_in)[:, None], size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


def rise_masks(n: int, grid: int, p_keep: float, size_hw: tuple[int, int], seed: int) -> torch.Tensor:
    """All ``n`` RISE masks ``(n, h, w)`` at once (see :class:`RiseMasks`)."""
    return RiseMasks(n, grid, p_keep, size_hw, seed)[:]


class RISE(PerturbationMethod):
    """RISE: saliency = ``sum_i s(x * M_i) M_i / (N * p_keep)`` over ``N`` random smooth masks.

    Sanity check (Adebayo et al.): on the toy model RISE *fails* model randomisation -- the Spearman
    correlation between the maps of the constructed model and of a fully randomised copy stays at 0.79
    (0.66 even with the mean score subtracted, 0.57 with 256 masks). With 64 masks the map is dominated
    by the seed-fixed mask coverage and by what any model reacts to (masking the brightest cells), not
    by what this model reads. Occlusion, IG, Grad-CAM(++), gradient-weighted attention pass (< 0.2).

    Passes: ``n_masks`` forwards.

    Source: Petsiuk, Das & Saenko (BMVC 2018), RISE (saliency as above; masks: bilinearly upsampled random binary
    grids with a random shift). Deviations from the paper's public code: masks cover the image content
    only, are applied in the preprocessed tensor, and the score is the mean answer-token probability
    (end-of-turn excluded).
    """

    name = "rise"
    per_token_maps = True  # every masked variant is scored per answer token
    source = ("Petsiuk et al. 2018 RISE (upsampled random grids with random shift) over the image content; "
              "masks applied in the preprocessed tensor")
    defaults = {"n_masks": 64, "grid": 8, "p_keep": 0.5, "seed": 0, "baseline": "zero", "batch_size": 16}
    spec = {"n_masks": integer(1), "grid": integer(1), "p_keep": number(0, 1, lo_open=True, hi_open=True),
            "seed": integer(0), "baseline": choice("zero", "mean"), "batch_size": integer(1)}

    def check_images(self, adapter: Any, films: Mapping[str, tuple[int, int]]) -> None:
        """``grid`` is at most every film's content side on the canvas (:func:`check_grid_fits`): a mask
        cell is ``ceil(side / grid)`` pixels, so a finer grid has cells below one pixel."""
        check_grid_fits(self.name, int(self.params["grid"]), adapter, films)

    def forward_passes(self) -> tuple[int, str]:
        """``n_masks``: one variant per mask."""
        return int(self.params["n_masks"]), "n_masks"

    def _score_plan(self, adapter: Any, image: np.ndarray, chat: Any, counter: Counter) -> ScorePlan:
        n, grid, pk = int(self.params["n_masks"]), int(self.params["grid"]), float(self.params["p_keep"])
        if n < 1 or grid < 1 or not 0 < pk < 1:
            raise ConfigError(f"rise: need n_masks >= 1, grid >= 1, 0 < p_keep < 1; got {n}, {grid}, {pk}")
        W, H = adapter.canvas_size
        py, px, nh, nw = _content_box(chat)
        _check_grid_on_content("rise", grid, nw, nh, "else cells are below one pixel")
        masks = RiseMasks(n, grid, pk, (nh, nw), int(self.params["seed"]))
        # keep the rendered masks for the saliency sum when they are small (< 64 MB), else re-render them
        cache_ok = n * nh * nw * 4 < 64 * 2**20
        rendered: dict[tuple[int, int], torch.Tensor] = {}
        baseline, bs = self.params["baseline"], int(self.params["batch_size"])

        def pixel_values(i: int, j: int) -> torch.Tensor:
            m = masks[i:j]
            if cache_ok:
                rendered[(i, j)] = m
            keep = torch.ones(j - i, H, W)
            keep[:, py : py + nh, px : px + nw] = m
            return adapter.masked_pixel_values(chat, keep, baseline)

        def finish(logp: torch.Tensor) -> Attribution:
            p = logp.exp()  # (N, T)
            sal_tok = torch.zeros(p.shape[1], nh, nw)
            if cache_ok:
                for (i, j), m in rendered.items():
                    sal_tok += torch.einsum("nt,nhw->thw", p[i:j], m)
            else:
                step = max(1, bs)
                for i in range(0, n, step):
                    sal_tok += torch.einsum("nt,nhw->thw", p[i : i + step], masks[i : i + step])
            sal_tok /= n * pk
            tok_canvas = torch.zeros(p.shape[1], H, W)
            tok_canvas[:, py : py + nh, px : px + nw] = sal_tok
            canvas = tok_canvas.mean(0)  # mean over tokens of sum_i p_t,i M_i = sum_i (mean_t p_t,i) M_i
            extras: dict[str, Any] = {}
            tok = finish_token_maps(adapter, chat, tok_canvas, extras)
            return Attribution(heatmap=to_original(adapter, chat, canvas), token_heatmaps=tok, extras=extras)

        counter.n_forward += n
        return ScorePlan(n, pixel_values, finish, bs)
