"""Entropic unbalanced optimal transport (UOT), log-domain, batched, in torch.

Problem (Chizat et al., "Scaling algorithms for unbalanced optimal transport problems", 2018)::

    T* = argmin_{T >= 0}  <C, T> + lam_a KL(T 1 | a) + lam_b KL(T^T 1 | b) + eps * Omega(T)

with the *generalised* KL divergence ``KL(p | q) = sum p log(p / q) - p + q`` (masses need not be
probabilities) and the entropic regulariser ``Omega``:

* ``reg_type="kl"`` (default): ``Omega(T) = KL(T | a b^T)``, the relative entropy of the plan with
  respect to the product of the two measures -- the regulariser of Chizat et al. and of the
  unbalanced Sinkhorn divergences (Sejourne et al. 2019). This is POT's
  ``uot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=eps, reg_m=(lam_a, lam_b), reg_type="kl")``
  (POT's default since 0.9.5).
* ``reg_type="entropy"``: ``Omega(T) = sum T log T - T`` (``KL(T | 1)`` up to a constant), POT's
  ``reg_type="entropy"``. Because its gradient ``eps log T`` is very negative for the small
  per-cell masses of an image (~1e-3), it *creates* mass in proportion to how spread the measures
  are, and the resulting UOT cost stops ranking references by geometric similarity (a target is
  not its own cheapest reference). We therefore read the issue's ``eps H(T)`` as the relative
  entropy ``KL(T | a b^T)``; both variants are implemented and tested against POT.

Solver: the generalised Sinkhorn fixed point ``u = (a / K v)^(lam_a / (lam_a + eps))``,
``v = (b / K^T u)^(lam_b / (lam_b + eps))`` (``K = exp(-C / eps)``, times ``a b^T`` for ``"kl"``),
carried out on the log-potentials ``log u, log v`` with log-sum-exp reductions, so it stays finite
for small ``eps`` where ``K`` underflows. ``lam = inf`` gives the balanced problem on that side.
The plan is ``T = diag(u) K diag(v)``.

Two back ends share these updates:

* :func:`sinkhorn_unbalanced_log` -- dense cost matrices ``(B, N, M)``, any point clouds.
* :func:`uot_grid` -- both measures live on the same ``h x w`` pixel grid and the cost is the
  squared Euclidean distance divided by a per-problem scale. That cost is *separable*
  (``C = Cy + Cx``), so each log-sum-exp over ``h*w`` points factorises into two small batched
  matrix products with a max shift, ``O(h w (h + w))`` instead of ``O((h w)^2)``; the plan is
  never materialised (use :meth:`GridUOT.plan` to get it for small grids, :meth:`GridUOT.push`
  to transport a field of masses). Both back ends solve the same problem and agree to rounding.

Image measures (:func:`image_measure`): the grayscale image letterboxed onto a ``224 x 224``
canvas (:class:`medfocus.io.Letterbox`), area-averaged down to a ``g x g`` grid (14 for reference
selection, 56 for transfer). Support = cells with intensity above a small threshold (the black
letterbox padding carries no mass), mass = intensity in ``[0, 1]`` normalised to total mass 1.
Costs: squared distance between cell centres divided by its 90th percentile over all
(source-support, target-support) pairs (:func:`grid_cost_scale`), so ``eps`` and ``lam`` have
the same meaning for every image pair.

Stopping rule: the sup-norm change of ``log u`` and ``log v`` on the support in one iteration is
``< tol`` (scale-free), or ``max_iter`` iterations.

Devices: float64 throughout. :func:`uot_grid` with ``device=None`` uses CUDA only for batches of at
least :data:`CUDA_MIN_CELLS` grid cells (one image's problems are kernel-launch bound on a GPU) and
runs CPU work single-threaded (:func:`cpu_single_thread`). CUDA and CPU plans agree to ~1e-15
(``benchmarks/concepts_gpu_check.md``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from medfocus.io.letterbox import Letterbox

#: The paper's defaults.
EPSILON = 0.05
LAMBDA = 0.1
MAX_ITER = 500
TOL = 1e-6
CANVAS = 224
SUPPORT_THRESHOLD = 0.02  # intensity in [0, 1]; the letterbox padding is exactly 0
COST_QUANTILE = 0.9
REG_TYPE = "kl"

_NEG_INF = float("-inf")


@contextmanager
def cpu_single_thread(device: str | torch.device | None = "cpu") -> Iterator[None]:
    """Run torch CPU ops single-threaded inside the block (previous setting restored).

    The grid solver's operations are tiny (56 x 56 matrices); intra-op threading only adds
    synchronisation, which on a loaded machine made a transfer ~15x slower than one thread.
    No effect for CUDA devices.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _pair(lam: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(lam, (int, float)):
        return float(lam), float(lam)
    lam = tuple(float(v) for v in lam)  # type: ignore[assignment]
    if len(lam) == 1:
        return lam[0], lam[0]
    if len(lam) != 2:
        raise ValueError(f"lam must be a float or a pair, got {lam!r}")
    return lam[0], lam[1]


def _exponent(lam: float, eps: float) -> float:
    """``lam / (lam + eps)``; 1 for the balanced (``lam = inf``) side."""
    if lam <= 0:
        raise ValueError(f"marginal relaxation lam must be > 0 (or inf), got {lam}")
    return 1.0 if math.isinf(lam) else lam / (lam + eps)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log with exact ``-inf`` on zeros (no warnings, no nan)."""
    return torch.where(x > 0, torch.log(torch.where(x > 0, x, torch.ones_like(x))), torch.full_like(x, _NEG_INF))


def _kl_gen(p: torch.Tensor, q: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """Generalised KL ``sum p log(p/q) - p + q`` over ``dim`` (``0 log 0 = 0``)."""
    ratio = torch.where(p > 0, p * (_safe_log(p) - _safe_log(q)), torch.zeros_like(p))
    return (ratio - p + q).sum(dim=dim)


@dataclass
class UOTResult:
    """Result of :func:`sinkhorn_unbalanced_log`.

    Attributes:
        plan: ``(B, N, M)`` transport plan (``(N, M)`` if the inputs were unbatched).
        log_u, log_v: ``(B, N)``, ``(B, M)`` log scalings (``-inf`` off the support); the dual
            potentials are ``eps * log_u`` and ``eps * log_v``.
        n_iter: iterations run. err: final stopping criterion value.
        transport: ``(B,)`` ``<C, T>``.
        objective: ``(B,)`` full regularised objective (POT's ``log["total_cost"]``).
        uot_cost: ``(B,)`` unregularised UOT objective at the plan, ``<C,T> + lam_a KL(T1|a) +
            lam_b KL(T^T1|b)`` (what reference selection ranks by).
    """

    plan: torch.Tensor
    log_u: torch.Tensor
    log_v: torch.Tensor
    n_iter: int
    err: float
    transport: torch.Tensor
    objective: torch.Tensor
    uot_cost: torch.Tensor


def sinkhorn_unbalanced_log(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    C: torch.Tensor | np.ndarray,
    *,
    epsilon: float = EPSILON,
    lam: float | Sequence[float] = LAMBDA,
    reg_type: str = REG_TYPE,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> UOTResult:
    """Batched log-domain entropic UOT on dense costs.

    Args:
        a: ``(B, N)`` or ``(N,)`` non-negative source masses (zeros = outside the support; padding).
        b: ``(B, M)`` or ``(M,)`` non-negative target masses.
        C: ``(B, N, M)`` or ``(N, M)`` costs (broadcast against the batch).
        epsilon: entropic regularisation (in units of ``C``).
        lam: marginal relaxation, a float (both sides) or ``(lam_a, lam_b)``; ``inf`` = balanced side.
        reg_type: ``"entropy"`` (``Omega = sum T log T - T``) or ``"kl"`` (``Omega = KL(T | a b^T)``).
        max_iter, tol: stopping rule (see module docstring).
        device, dtype: computation device (default: that of ``C`` if a tensor, else CPU) and dtype.

    Returns:
        :class:`UOTResult`; unbatched inputs (all of ``a, b, C`` without a batch axis) give
        unbatched outputs.
    """
    if reg_type not in ("entropy", "kl"):
        raise ValueError(f"reg_type must be 'entropy' or 'kl', got {reg_type!r}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if device is None:
        device = C.device if isinstance(C, torch.Tensor) else torch.device("cpu")
    a = torch.as_tensor(a, dtype=dtype, device=device)
    b = torch.as_tensor(b, dtype=dtype, device=device)
    C = torch.as_tensor(C, dtype=dtype, device=device)
    unbatched = a.dim() == 1 and b.dim() == 1 and C.dim() == 2
    if a.dim() == 1:
        a = a[None]
    if b.dim() == 1:
        b = b[None]
    if C.dim() == 2:
        C = C[None]
    B = max(a.shape[0], b.shape[0], C.shape[0])
    N, M = C.shape[-2:]
    if a.shape[-1] != N or b.shape[-1] != M:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, C {tuple(C.shape)}")
    a = a.expand(B, N)
    b = b.expand(B, M)
    C = C.expand(B, N, M)
    if (a < 0).any() or (b < 0).any():
        raise ValueError("masses a and b must be non-negative")

    lam_a, lam_b = _pair(lam)
    fa, fb = _exponent(lam_a, epsilon), _exponent(lam_b, epsilon)
    log_a, log_b = _safe_log(a), _safe_log(b)
    sup_a, sup_b = a > 0, b > 0
    # log K = -C/eps (+ log a_i + log b_j for "kl"); the additive terms are folded into the reductions.
    logK = -C / epsilon
    alpha = log_a if reg_type == "kl" else torch.zeros_like(log_a)
    beta = log_b if reg_type == "kl" else torch.zeros_like(log_b)

    log_u = torch.zeros_like(a).masked_fill(~sup_a, _NEG_INF)
    log_v = torch.zeros_like(b).masked_fill(~sup_b, _NEG_INF)
    err, it = float("inf"), 0
    for it in range(1, max_iter + 1):
        prev_u, prev_v = log_u, log_v
        lkv = torch.logsumexp(logK + (beta + log_v)[:, None, :], dim=2) + alpha  # log (K v)_i
        log_u = torch.where(sup_a, fa * (log_a - lkv), torch.full_like(lkv, _NEG_INF))
        lku = torch.logsumexp(logK + (alpha + log_u)[:, :, None], dim=1) + beta  # log (K^T u)_j
        log_v = torch.where(sup_b, fb * (log_b - lku), torch.full_like(lku, _NEG_INF))
        err = max(_sup_change(log_u, prev_u, sup_a), _sup_change(log_v, prev_v, sup_b))
        if not math.isfinite(err):
            raise FloatingPointError(f"UOT diverged at iteration {it} (non-finite potentials)")
        if err < tol:
            break

    log_plan = log_u[:, :, None] + logK + (alpha + 0)[:, :, None] + beta[:, None, :] + log_v[:, None, :]
    plan = torch.exp(log_plan)
    transport, objective, uot_cost = _objectives(plan, C, a, b, epsilon, lam_a, lam_b, reg_type)
    if unbatched:
        return UOTResult(plan[0], log_u[0], log_v[0], it, err, transport[0], objective[0], uot_cost[0])
    return UOTResult(plan, log_u, log_v, it, err, transport, objective, uot_cost)


def _sup_change(new: torch.Tensor, old: torch.Tensor, support: torch.Tensor) -> float:
    d = torch.where(support, (new - old).abs(), torch.zeros_like(new))
    return float(d.max()) if d.numel() else 0.0


def _objectives(plan, C, a, b, eps, lam_a, lam_b, reg_type):
    transport = (plan * C).sum(dim=(1, 2))
    r, c = plan.sum(2), plan.sum(1)
    marg = torch.zeros_like(transport)
    if not math.isinf(lam_a):
        marg = marg + lam_a * _kl_gen(r, a, (1,))
    if not math.isinf(lam_b):
        marg = marg + lam_b * _kl_gen(c, b, (1,))
    ref = a[:, :, None] * b[:, None, :] if reg_type == "kl" else torch.ones_like(plan)
    objective = transport + marg + eps * _kl_gen(plan, ref, (1, 2))
    return transport, objective, transport + marg


# ---------------------------------------------------------------------------------------------
# Image measures on a pixel grid
# ---------------------------------------------------------------------------------------------
def image_measure(image: np.ndarray, grid: int, *, canvas: int = CANVAS, threshold: float = SUPPORT_THRESHOLD) -> tuple[np.ndarray, Letterbox]:
    """Grayscale image -> mass on a ``grid x grid`` lattice over the letterboxed canvas.

    Args:
        image: ``(H0, W0)`` uint8 (or float in [0, 1]) grayscale image.
        grid: lattice size (``canvas`` must be a multiple of it: 14, 56 for 224).
        canvas: letterbox canvas side in pixels.
        threshold: cells with mean intensity ``<= threshold`` (in [0, 1]) get no mass.
    Returns:
        ``(mass (grid, grid) float64`` summing to 1 (zeros off the support), ``letterbox)``.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D grayscale, got shape {img.shape}")
    if canvas % grid:
        raise ValueError(f"canvas {canvas} is not a multiple of grid {grid}")
    lb = Letterbox.fit((img.shape[1], img.shape[0]), canvas)
    x = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    cv = lb.apply(x.astype(np.float32), fill=0.0).astype(np.float64)
    k = canvas // grid
    cells = cv.reshape(grid, k, grid, k).mean(axis=(1, 3))
    mass = np.where(cells > threshold, cells, 0.0)
    total = mass.sum()
    if total <= 0:
        raise ValueError("image has no pixel above the support threshold (blank image?)")
    return mass / total, lb


def grid_sqdist(h: int, w: int) -> np.ndarray:
    """``(h*w, h*w)`` squared distances (in cell units) between cell centres, row-major order."""
    yy, xx = np.divmod(np.arange(h * w), w)
    return (yy[:, None] - yy[None, :]) ** 2 + (xx[:, None] - xx[None, :]) ** 2.0


def grid_cost_scale(mask_a: np.ndarray, mask_b: np.ndarray, q: float = COST_QUANTILE) -> np.ndarray:
    """Exact ``q``-quantile (numpy's default linear interpolation) of squared cell distances over
    all pairs (``i`` in support of ``mask_a``, ``j`` in support of ``mask_b``), without forming
    the pair matrix: the number of pairs at each offset ``(dy, dx)`` is the cross-correlation of
    the two masks (FFT, rounded to integers).

    Args:
        mask_a: ``(B, h, w)`` or ``(h, w)`` boolean support; mask_b: same shape or broadcastable.
    Returns:
        ``(B,)`` (or scalar array) quantiles in squared cell units; 1.0 where degenerate (0).
    """
    ma = np.asarray(mask_a, dtype=np.float64)
    mb = np.asarray(mask_b, dtype=np.float64)
    single = ma.ndim == 2 and mb.ndim == 2
    ma, mb = np.broadcast_arrays(ma.reshape((-1,) + ma.shape[-2:]), mb.reshape((-1,) + mb.shape[-2:]))
    _, h, w = ma.shape
    H, W = 2 * h - 1, 2 * w - 1
    # corr[dy, dx] = sum_{i} a[i] b[i + (dy, dx)]  via FFT: conj(F a) * F b.
    fa = np.fft.rfft2(ma, s=(H, W))
    fb = np.fft.rfft2(mb, s=(H, W))
    corr = np.rint(np.fft.irfft2(np.conj(fa) * fb, s=(H, W))).astype(np.int64)  # offsets wrap modulo (H, W)
    dy = np.fft.fftfreq(H, 1.0 / H).round().astype(np.int64)
    dx = np.fft.fftfreq(W, 1.0 / W).round().astype(np.int64)
    d2 = (dy[:, None] ** 2 + dx[None, :] ** 2).ravel()
    order = np.argsort(d2, kind="stable")
    vals = d2[order].astype(np.float64)
    out = np.empty(ma.shape[0])
    for i in range(ma.shape[0]):
        cnt = corr[i].ravel()[order]
        keep = cnt > 0
        v, c = vals[keep], np.cumsum(cnt[keep])
        n = int(c[-1]) if c.size else 0
        if n == 0:
            out[i] = 1.0
            continue
        p = q * (n - 1)
        k = int(math.floor(p))
        lo = v[np.searchsorted(c, k, side="right")]
        hi = v[np.searchsorted(c, min(k + 1, n - 1), side="right")]
        val = lo + (p - k) * (hi - lo)
        out[i] = val if val > 0 else 1.0
    return out[0] if single else out


@dataclass
class GridUOT:
    """Solution of a batch of UOT problems on an ``h x w`` grid with separable squared-distance cost.

    Attributes:
        log_u, log_v: ``(B, h, w)`` log scalings (``-inf`` off the support).
        log_kx: ``(B, w, w)`` and log_ky ``(B, h, h)``: ``-(dx^2) / (scale eps)`` 1-D log-kernels.
        alpha, beta: ``(B, h, w)`` additive log-kernel terms (``log a``/``log b`` for ``reg_type="kl"``, else 0).
        a, b: ``(B, h, w)`` masses. scale: ``(B,)`` cost scales (squared cell units). n_iter, err.
    """

    log_u: torch.Tensor
    log_v: torch.Tensor
    log_kx: torch.Tensor
    log_ky: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    epsilon: float
    lam: tuple[float, float]
    reg_type: str
    n_iter: int
    err: float

    def push(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Transport per-source-cell weights through the plan: ``out_j = sum_i w_i T_ij``.

        Args:
            weights: ``(B, K, h, w)`` or ``(K, h, w)`` non-negative fields on the source grid
                (e.g. concept-mask fractions). Returns ``(B, K, h, w)`` on the target grid.
        """
        w_ = torch.as_tensor(weights, dtype=self.log_u.dtype, device=self.log_u.device)
        if w_.dim() == 3:
            w_ = w_[None].expand(self.log_u.shape[0], *w_.shape)
        src = self.log_u[:, None] + self.alpha[:, None] + _safe_log(w_)  # (B,K,h,w)
        B, K, h, w = src.shape
        out = _sep_lse(src.reshape(B * K, h, w), self.log_ky.repeat_interleave(K, 0), self.log_kx.repeat_interleave(K, 0))
        return torch.exp(out.reshape(B, K, h, w) + (self.beta + self.log_v)[:, None])

    def pull(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Adjoint of :meth:`push`: ``out_i = sum_j T_ij w_j`` for target-grid fields.

        Args:
            weights: ``(B, K, h, w)`` or ``(K, h, w)`` non-negative fields on the target grid
                (e.g. target-cell coordinates, for barycentric maps). Returns ``(B, K, h, w)``.
        """
        w_ = torch.as_tensor(weights, dtype=self.log_v.dtype, device=self.log_v.device)
        if w_.dim() == 3:
            w_ = w_[None].expand(self.log_v.shape[0], *w_.shape)
        src = self.log_v[:, None] + self.beta[:, None] + _safe_log(w_)
        B, K, h, w = src.shape
        out = _sep_lse(src.reshape(B * K, h, w), self.log_ky.transpose(1, 2).repeat_interleave(K, 0),
                       self.log_kx.transpose(1, 2).repeat_interleave(K, 0))
        return torch.exp(out.reshape(B, K, h, w) + (self.alpha + self.log_u)[:, None])

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T 1, T^T 1)`` as ``(B, h, w)`` fields on the source / target grids."""
        col = self.push(torch.ones_like(self.a)[:, None])[:, 0]
        row = self.pull(torch.ones_like(self.b)[:, None])[:, 0]
        return row, col

    def barycenters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Barycentric map of the plan: for each source cell ``i``, ``(sum_j T_ij y_j, sum_j T_ij x_j) / sum_j T_ij``
        in cell units (``(B, 2, h, w)``; NaN where the source cell sends no mass), and the row
        masses ``T 1`` ``(B, h, w)``."""
        B, h, w = self.log_u.shape
        dev, dt = self.log_u.device, self.log_u.dtype
        yy = torch.arange(h, device=dev, dtype=dt)[:, None].expand(h, w)
        xx = torch.arange(w, device=dev, dtype=dt)[None, :].expand(h, w)
        pulled = self.pull(torch.stack([torch.ones_like(yy), yy, xx]))  # (B, 3, h, w)
        rows = pulled[:, 0]
        with torch.no_grad():
            bary = torch.where(rows[:, None] > 0, pulled[:, 1:] / torch.where(rows > 0, rows, torch.ones_like(rows))[:, None],
                               torch.full_like(pulled[:, 1:], float("nan")))
        return bary, rows

    def plan(self) -> torch.Tensor:
        """Dense ``(B, h*w, h*w)`` plan (source cells x target cells, row-major). Small grids only."""
        B, h, w = self.log_u.shape
        lk = self.log_ky[:, :, None, :, None] + self.log_kx[:, None, :, None, :]  # (B, h, w, h, w)
        lk = lk.reshape(B, h * w, h * w)
        lp = (self.log_u + self.alpha).reshape(B, -1, 1) + lk + (self.log_v + self.beta).reshape(B, 1, -1)
        return torch.exp(lp)

    def costs(self) -> dict[str, torch.Tensor]:
        """``(B,)`` tensors: ``transport = <C,T>``, ``uot_cost = transport + lam KL terms``, and
        ``objective`` = the full regularised objective (``uot_cost + eps KL(T | a b^T)``, or
        ``+ eps KL(T | 1)`` for ``reg_type="entropy"``, the reference measure spanning the full
        ``(h w) x (h w)`` grid). Computed separably (``C = Cy + Cx``), no dense plan."""
        B, h, w = self.log_u.shape
        dev, dt = self.log_u.device, self.log_u.dtype
        dy2 = torch.arange(h, device=dev, dtype=dt)
        dx2 = torch.arange(w, device=dev, dtype=dt)
        cy = ((dy2[:, None] - dy2[None, :]) ** 2)[None] / self.scale[:, None, None]
        cx = ((dx2[:, None] - dx2[None, :]) ** 2)[None] / self.scale[:, None, None]
        src = self.log_u + self.alpha
        tgt = self.log_v + self.beta
        # <C,T> = sum_ij u_i K_ij v_j (Cy_ij + Cx_ij); K C_y is again separable: (Ky Cy) x Kx.
        t1 = _sep_lse(src, self.log_ky + _safe_log(cy.expand_as(self.log_ky)), self.log_kx)
        t2 = _sep_lse(src, self.log_ky, self.log_kx + _safe_log(cx.expand_as(self.log_kx)))
        transport = (torch.exp(t1 + tgt) + torch.exp(t2 + tgt)).sum(dim=(1, 2))
        row, col = self.marginals()
        marg = torch.zeros_like(transport)
        if not math.isinf(self.lam[0]):
            marg = marg + self.lam[0] * _kl_gen(row, self.a, (1, 2))
        if not math.isinf(self.lam[1]):
            marg = marg + self.lam[1] * _kl_gen(col, self.b, (1, 2))
        # KL(T | ref): log(T_ij / ref_ij) = log u_i + log v_j - C_ij / eps for both reg_types, so
        # sum T log(T/ref) = <T1, log u> + <T^T1, log v> - <C,T>/eps (0 log 0 = 0 off the support).
        ent = (torch.where(row > 0, row * self.log_u, torch.zeros_like(row)).sum(dim=(1, 2))
               + torch.where(col > 0, col * self.log_v, torch.zeros_like(col)).sum(dim=(1, 2)) - transport / self.epsilon)
        mass_t = row.sum(dim=(1, 2))
        if self.reg_type == "kl":
            ref_mass = self.a.sum(dim=(1, 2)) * self.b.sum(dim=(1, 2))
        else:
            ref_mass = torch.full_like(mass_t, float((h * w) ** 2))
        objective = transport + marg + self.epsilon * (ent - mass_t + ref_mass)
        return {"transport": transport, "uot_cost": transport + marg, "objective": objective}


def _sep_lse(src: torch.Tensor, log_ky: torch.Tensor, log_kx: torch.Tensor) -> torch.Tensor:
    """``out[b, y, x] = log sum_{y', x'} exp(log_ky[b, y', y] + log_kx[b, x', x] + src[b, y', x'])``.

    Two max-shifted batched matmuls (``O(h w (h + w))``); exact log-sum-exp arithmetic up to
    rounding (each shift makes the largest term of every partial sum exactly 1).
    Shapes: src ``(B, h, w)``, log_ky ``(B, h, h)``, log_kx ``(B, w, w)``.
    """
    # stage 1, over x': s1[b, y', x] = log sum_x' exp(src[b,y',x'] + log_kx[b,x',x])
    m1 = src.amax(dim=2, keepdim=True)
    m1 = torch.where(torch.isfinite(m1), m1, torch.zeros_like(m1))
    kx = torch.exp(log_kx)
    s1 = _safe_log(torch.bmm(torch.exp(src - m1), kx)) + m1  # (B,h,w)
    # stage 2, over y': out[b, y, x] = log sum_y' exp(s1[b,y',x] + log_ky[b,y',y])
    m2 = s1.amax(dim=1, keepdim=True)
    m2 = torch.where(torch.isfinite(m2), m2, torch.zeros_like(m2))
    ky = torch.exp(log_ky)
    return _safe_log(torch.bmm(ky.transpose(1, 2), torch.exp(s1 - m2))) + m2


#: ``device=None`` runs a batch on CUDA only when it holds at least this many grid cells in total
#: (``B * h * w``): on an H200 one 56x56 problem took 30 ms on CUDA vs 15 ms on one CPU thread
#: (kernel-launch bound), while 1024 problems at 14x14 took 59 ms vs 378 ms
#: (``benchmarks/concepts_gpu_check.md``).
CUDA_MIN_CELLS = 100_000


def auto_device(n_cells: int) -> str:
    """``"cuda"`` when available and the batch is large enough to pay for kernel launches, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() and n_cells >= CUDA_MIN_CELLS else "cpu"


def uot_grid(a: Any, b: Any, **kw: Any) -> "GridUOT":
    """See :func:`_uot_grid`. ``device=None`` picks :func:`auto_device`; CPU work runs single-threaded
    (:func:`cpu_single_thread`)."""
    if kw.get("device") is None:
        sa, sb = np.shape(a), np.shape(b)
        batch = max(sa[0] if len(sa) == 3 else 1, sb[0] if len(sb) == 3 else 1)
        kw["device"] = auto_device(batch * sa[-2] * sa[-1])
    with cpu_single_thread(kw["device"]):
        return _uot_grid(a, b, **kw)


def _uot_grid(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    *,
    epsilon: float = EPSILON,
    lam: float | Sequence[float] = LAMBDA,
    reg_type: str = REG_TYPE,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    scale: np.ndarray | float | None = None,
    quantile: float = COST_QUANTILE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> GridUOT:
    """Batched log-domain UOT between masses on the same ``h x w`` grid, cost = squared cell
    distance / ``scale`` (default: its ``quantile`` over support pairs, per problem).

    Args:
        a: ``(B, h, w)`` or ``(h, w)`` source masses (e.g. the reference images);
        b: ``(B, h, w)`` or ``(h, w)`` target masses; a single target broadcasts against a batch
            of sources (selection: one target vs the whole pool in one call).
        epsilon, lam, reg_type, max_iter, tol: as :func:`sinkhorn_unbalanced_log`.
        scale: cost scale(s) in squared cell units; ``None`` -> :func:`grid_cost_scale`.
        device: computation device (:func:`uot_grid` resolves ``None`` with :func:`auto_device`).
    Returns:
        :class:`GridUOT` (always batched, ``B >= 1``).
    """
    if reg_type not in ("entropy", "kl"):
        raise ValueError(f"reg_type must be 'entropy' or 'kl', got {reg_type!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    a_np = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b_np = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a_np.ndim == 2:
        a_np = a_np[None]
    if b_np.ndim == 2:
        b_np = b_np[None]
    if a_np.shape[1:] != b_np.shape[1:]:
        raise ValueError(f"a and b must live on the same grid, got {a_np.shape} and {b_np.shape}")
    if (a_np < 0).any() or (b_np < 0).any():
        raise ValueError("masses a and b must be non-negative")
    B = max(a_np.shape[0], b_np.shape[0])
    a_np = np.array(np.broadcast_to(a_np, (B,) + a_np.shape[1:]))
    b_np = np.array(np.broadcast_to(b_np, (B,) + b_np.shape[1:]))
    _, h, w = a_np.shape
    if scale is None:
        scale_np = np.atleast_1d(grid_cost_scale(a_np > 0, b_np > 0, quantile))
    else:
        scale_np = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (B,)).copy()
    at = torch.as_tensor(np.ascontiguousarray(a_np), dtype=dtype, device=device)
    bt = torch.as_tensor(np.ascontiguousarray(b_np), dtype=dtype, device=device)
    sc = torch.as_tensor(scale_np, dtype=dtype, device=device)
    ys = torch.arange(h, device=device, dtype=dtype)
    xs = torch.arange(w, device=device, dtype=dtype)
    log_ky = -((ys[:, None] - ys[None, :]) ** 2)[None] / (sc[:, None, None] * epsilon)
    log_kx = -((xs[:, None] - xs[None, :]) ** 2)[None] / (sc[:, None, None] * epsilon)

    lam_a, lam_b = _pair(lam)
    fa, fb = _exponent(lam_a, epsilon), _exponent(lam_b, epsilon)
    log_a, log_b = _safe_log(at), _safe_log(bt)
    sup_a, sup_b = at > 0, bt > 0
    alpha = log_a if reg_type == "kl" else torch.zeros_like(log_a)
    beta = log_b if reg_type == "kl" else torch.zeros_like(log_b)
    log_kyT, log_kxT = log_ky.transpose(1, 2), log_kx.transpose(1, 2)
    log_u = torch.zeros_like(at).masked_fill(~sup_a, _NEG_INF)
    log_v = torch.zeros_like(bt).masked_fill(~sup_b, _NEG_INF)
    ninf = torch.full_like(at, _NEG_INF)
    err, it = float("inf"), 0
    for it in range(1, max_iter + 1):
        prev_u, prev_v = log_u, log_v
        # (K v)_i: kernels are symmetric, but pass the transposes to keep the index roles explicit.
        lkv = _sep_lse(beta + log_v, log_kyT, log_kxT) + alpha
        log_u = torch.where(sup_a, fa * (log_a - lkv), ninf)
        lku = _sep_lse(alpha + log_u, log_ky, log_kx) + beta
        log_v = torch.where(sup_b, fb * (log_b - lku), ninf)
        err = max(_sup_change(log_u, prev_u, sup_a), _sup_change(log_v, prev_v, sup_b))
        if not math.isfinite(err):
            raise FloatingPointError(f"grid UOT diverged at iteration {it} (non-finite potentials)")
        if err < tol:
            break
    return GridUOT(log_u, log_v, log_kx, log_ky, alpha, beta, at, bt, sc, float(epsilon), (lam_a, lam_b), reg_type, it, err)
