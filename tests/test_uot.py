"""Unbalanced OT (medfocus.concepts.uot): agreement with POT, balanced limit, batching, grid back end."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

ot_pot = pytest.importorskip("ot")

from medfocus.concepts import uot  # noqa: E402


def _masses(rng, h, w, zero_frac=0.2):
    a = rng.random((h, w))
    a[a < zero_frac] = 0.0
    return a / a.sum()


def _pot_plan(a, b, C, eps, lam, reg_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that reg_type="entropy" overwrites c
        return ot_pot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, lam, reg_type=reg_type, numItermax=20000, stopThr=1e-14)


def _rel(p, q):
    return float(np.abs(np.asarray(p) - np.asarray(q)).max() / np.abs(q).max())


@pytest.mark.parametrize("eps,lam", [(0.05, 0.1), (0.1, 1.0), (0.02, (0.5, 0.05))])
def test_dense_matches_pot_entropy(eps, lam):
    # zero masses are allowed (outside the support)
    rng = np.random.default_rng(1)
    a, b = rng.random(30), rng.random(40) * 2.0  # unequal total masses
    a[:3] = 0.0
    C = rng.random((30, 40)) * 2
    ref = _pot_plan(a, b, C, eps, lam, "entropy")
    res = uot.sinkhorn_unbalanced_log(a, b, C, epsilon=eps, lam=lam, reg_type="entropy", tol=1e-12, max_iter=20000)
    assert _rel(res.plan.numpy(), ref) < 1e-6
    # default stopping rule (tol 1e-6 on the log-potentials) already agrees to 1e-6
    res2 = uot.sinkhorn_unbalanced_log(a, b, C, epsilon=eps, lam=lam, reg_type="entropy")
    assert _rel(res2.plan.numpy(), ref) < 1e-6
    assert res2.n_iter <= uot.MAX_ITER


def test_dense_matches_pot_kl_and_objective():
    rng = np.random.default_rng(2)
    a, b = rng.random(25) + 0.05, rng.random(20) + 0.05  # "kl" needs a b^T > 0 in POT
    C = rng.random((25, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, lg = ot_pot.unbalanced.sinkhorn_unbalanced(a, b, C, 0.05, 0.1, reg_type="kl", numItermax=20000, stopThr=1e-14, log=True)
    res = uot.sinkhorn_unbalanced_log(a, b, C, tol=1e-12, max_iter=20000)  # default reg_type = "kl"
    assert uot.REG_TYPE == "kl"
    assert _rel(res.plan.numpy(), ref) < 1e-6
    assert float(res.transport) == pytest.approx(float(lg["cost"]), rel=1e-8)
    # first-order optimality of the documented objective: dF/dT_ij = C_ij + lam log(r_i/a_i)
    # + lam log(c_j/b_j) + eps log(T_ij / (a_i b_j)) = 0 everywhere
    T = res.plan.numpy()
    grad = C + 0.1 * np.log(T.sum(1) / a)[:, None] + 0.1 * np.log(T.sum(0) / b)[None, :] + 0.05 * np.log(T / np.outer(a, b))
    assert np.abs(grad).max() < 1e-9
    # the objective value is the documented formula
    kl = lambda p, q: float(np.sum(p * np.log(p / q) - p + q))  # noqa: E731
    F = float((C * T).sum()) + 0.1 * kl(T.sum(1), a) + 0.1 * kl(T.sum(0), b) + 0.05 * kl(T, np.outer(a, b))
    assert float(res.objective) == pytest.approx(F, rel=1e-10)
    # and a perturbed plan is worse
    T2 = T * (1 + 0.01 * np.random.default_rng(0).standard_normal(T.shape))
    F2 = float((C * T2).sum()) + 0.1 * kl(T2.sum(1), a) + 0.1 * kl(T2.sum(0), b) + 0.05 * kl(T2, np.outer(a, b))
    assert F2 > F


def test_entropy_and_kl_differ():
    # guards the documented reg_type choice: the two regularisers give different plans
    rng = np.random.default_rng(3)
    a, b, C = rng.random(10) + 0.1, rng.random(12) + 0.1, rng.random((10, 12))
    pe = uot.sinkhorn_unbalanced_log(a, b, C, reg_type="entropy").plan.numpy()
    pk = uot.sinkhorn_unbalanced_log(a, b, C, reg_type="kl").plan.numpy()
    assert _rel(pe, pk) > 1e-2


def test_small_epsilon_is_finite():
    # log-domain: K = exp(-C/eps) underflows entirely for eps = 1e-3 (exp(-1000)), the solver does not
    rng = np.random.default_rng(4)
    a, b = rng.random(15), rng.random(15)
    C = 1.0 + rng.random((15, 15))
    res = uot.sinkhorn_unbalanced_log(a, b, C, epsilon=1e-3, lam=0.1)
    assert torch.isfinite(res.plan).all() and float(res.plan.sum()) > 0


def test_large_lambda_tends_to_balanced():
    rng = np.random.default_rng(5)
    a, b = rng.random(12), rng.random(12)
    a, b = a / a.sum(), b / b.sum()
    C = rng.random((12, 12))
    eps = 0.1
    bal = ot_pot.sinkhorn(a, b, C, eps, numItermax=100000, stopThr=1e-13)
    errs, marg = [], []
    for lam in (0.1, 1.0, 10.0, 300.0):
        p = uot.sinkhorn_unbalanced_log(a, b, C, epsilon=eps, lam=lam, tol=1e-10, max_iter=100000).plan.numpy()
        errs.append(_rel(p, bal))
        marg.append(np.abs(p.sum(1) - a).sum() + np.abs(p.sum(0) - b).sum())
    assert all(x > y for x, y in zip(errs, errs[1:])), errs
    assert all(x > y for x, y in zip(marg, marg[1:])), marg
    assert errs[-1] < 1e-2 and marg[-1] < 2e-3
    # lam = inf is exactly the balanced problem
    p_inf = uot.sinkhorn_unbalanced_log(a, b, C, epsilon=eps, lam=float("inf"), tol=1e-12, max_iter=100000).plan.numpy()
    assert _rel(p_inf, bal) < 1e-6


def test_batched_equals_unbatched():
    rng = np.random.default_rng(6)
    A = rng.random((4, 12))
    A[A < 0.2] = 0  # zero masses = padding of smaller supports
    b = rng.random(9)
    C = rng.random((4, 12, 9))
    res = uot.sinkhorn_unbalanced_log(A, b, C)
    assert res.plan.shape == (4, 12, 9)
    for i in range(4):
        single = uot.sinkhorn_unbalanced_log(A[i], b, C[i])
        assert _rel(res.plan[i].numpy(), single.plan.numpy()) < 1e-6
        assert (res.plan[i].numpy()[A[i] == 0] == 0).all()


def test_grid_cost_scale_is_exact_quantile():
    rng = np.random.default_rng(7)
    ma, mb = rng.random((2, 9, 7)) > 0.4
    D = uot.grid_sqdist(9, 7)
    expect = np.quantile(D[np.ix_(ma.ravel(), mb.ravel())], 0.9)
    assert uot.grid_cost_scale(ma, mb) == pytest.approx(expect, abs=1e-12)
    both = uot.grid_cost_scale(np.stack([ma, mb]), mb, 0.5)
    assert both[1] == pytest.approx(np.quantile(D[np.ix_(mb.ravel(), mb.ravel())], 0.5), abs=1e-12)


@pytest.mark.parametrize("reg_type", ["entropy", "kl"])
def test_grid_backend_matches_pot(reg_type):
    rng = np.random.default_rng(8)
    h, w = 9, 8
    a = _masses(rng, h, w, 0.0 if reg_type == "kl" else 0.25) + (0.01 if reg_type == "kl" else 0.0)
    b = _masses(rng, h, w, 0.0 if reg_type == "kl" else 0.25) + (0.01 if reg_type == "kl" else 0.0)
    sol = uot.uot_grid(a, b, reg_type=reg_type, device="cpu")
    scale = float(sol.scale[0])
    assert scale == pytest.approx(np.quantile(uot.grid_sqdist(h, w)[np.ix_(a.ravel() > 0, b.ravel() > 0)], 0.9))
    C = uot.grid_sqdist(h, w) / scale
    ref = _pot_plan(a.ravel(), b.ravel(), C, uot.EPSILON, uot.LAMBDA, reg_type)
    plan = sol.plan()[0].numpy()
    assert _rel(plan, ref) < 1e-6
    dense = uot.sinkhorn_unbalanced_log(a.ravel(), b.ravel(), C, reg_type=reg_type)
    costs = sol.costs()
    assert float(costs["transport"][0]) == pytest.approx(float(dense.transport), rel=1e-6)
    assert float(costs["uot_cost"][0]) == pytest.approx(float(dense.uot_cost), rel=1e-6)
    assert float(costs["objective"][0]) == pytest.approx(float(dense.objective), rel=1e-6)
    row, col = sol.marginals()
    np.testing.assert_allclose(row[0].numpy().ravel(), plan.sum(1), atol=1e-12)
    np.testing.assert_allclose(col[0].numpy().ravel(), plan.sum(0), atol=1e-12)
    # push == weights^T plan
    wts = rng.random((3, h, w))
    pushed = sol.push(wts)[0].numpy().reshape(3, -1)
    np.testing.assert_allclose(pushed, wts.reshape(3, -1) @ plan, rtol=1e-9, atol=1e-15)


def _blob(cy, cx, s=2.5, n=14):
    yy, xx = np.mgrid[0:n, 0:n]
    m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    m[m < 0.05] = 0
    return m / m.sum()


def test_grid_batched_one_target_many_sources():
    rng = np.random.default_rng(9)
    A = np.stack([_masses(rng, 10, 10) for _ in range(5)])
    b = _masses(rng, 10, 10)
    sol = uot.uot_grid(A, b, device="cpu")
    costs = sol.costs()["uot_cost"].numpy()
    for i in range(5):
        one = uot.uot_grid(A[i], b, device="cpu")
        assert _rel(sol.plan()[i].numpy(), one.plan()[0].numpy()) < 1e-9
        assert costs[i] == pytest.approx(float(one.costs()["uot_cost"][0]), rel=1e-9)


def test_uot_cost_ranks_by_displacement():
    # selection signal: a blob shifted further costs more; the target itself is the cheapest source
    b = _blob(7, 7)
    A = np.stack([_blob(7, 7 + d) for d in (3, 0, 1, 4, 2)] + [_blob(7, 7, 3.5), _blob(7, 7, 1.8)])
    c = uot.uot_grid(A, b, device="cpu").costs()["uot_cost"].numpy()
    assert int(np.argmin(c)) == 1
    assert c[1] < c[2] < c[4] < c[0] < c[3]
    # with the plain-entropy regulariser this ranking breaks (why "kl" is the default)
    ce = uot.uot_grid(A, b, device="cpu", reg_type="entropy").costs()["uot_cost"].numpy()
    assert int(np.argmin(ce)) != 1


def test_image_measure_letterbox_and_support():
    img = np.zeros((40, 80), np.uint8)
    img[:, :] = 100
    img[10:20, 10:30] = 0  # a black hole carries no mass
    mass, lb = uot.image_measure(img, 14)
    assert mass.shape == (14, 14) and mass.sum() == pytest.approx(1.0)
    assert lb.new_w == 224 and lb.new_h == 112
    # letterbox padding (rows above/below the content) has no mass
    assert mass[:3].sum() == 0 and mass[-3:].sum() == 0
    assert (mass[4:10] > 0).sum() > 0
    with pytest.raises(ValueError):
        uot.image_measure(np.zeros((10, 10), np.uint8), 14)


def test_bad_inputs():
    with pytest.raises(ValueError):
        uot.sinkhorn_unbalanced_log(np.ones(3), np.ones(4), np.ones((4, 3)))
    with pytest.raises(ValueError):
        uot.sinkhorn_unbalanced_log(-np.ones(3), np.ones(3), np.ones((3, 3)))
    with pytest.raises(ValueError):
        uot.sinkhorn_unbalanced_log(np.ones(3), np.ones(3), np.ones((3, 3)), reg_type="l2")


def test_swapping_source_and_target_transposes_the_plan():
    rng = np.random.default_rng(10)
    a, b = _masses(rng, 7, 9), _masses(rng, 7, 9)
    p_ab = uot.uot_grid(a, b, device="cpu", tol=1e-12, max_iter=5000).plan()[0].numpy()
    p_ba = uot.uot_grid(b, a, device="cpu", tol=1e-12, max_iter=5000).plan()[0].numpy()
    assert _rel(p_ba.T, p_ab) < 1e-9
