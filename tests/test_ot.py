"""hf_otselect.ot: duals against POT, robustness, conventions and parameter errors."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

from hf_otselect.ot import mean_sq_distance, ot_distance, sinkhorn_potentials

ot = pytest.importorskip("ot")  # POT: dev dependency, reference solutions only
torch = pytest.importorskip("torch")

BACKENDS = ["tensorized", "blocked", "geomloss"] + (["keops"] if importlib.util.find_spec("pykeops") else [])


def _clouds(n=120, m=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) * 0.8 + 0.4
    return x, y


def _pot_duals(x, y, eps, a=None, b=None):
    """POT float64 log-domain Sinkhorn to 1e-12; returns (f, g, plan) in our convention."""
    a = np.full(len(x), 1 / len(x)) if a is None else a
    b = np.full(len(y), 1 / len(y)) if b is None else b
    C = ot.dist(x, y)  # squared Euclidean, no 1/2: our cost
    P, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", log=True, stopThr=1e-12, numItermax=200000)
    # POT: P = exp(log_u + log_v - C/eps); ours: P = a b exp((f + g - C)/eps).
    return eps * (log["log_u"] - np.log(a)), eps * (log["log_v"] - np.log(b)), P, C


def _same_up_to_constant(f, g, fr, gr, atol):
    c = np.mean(f - fr)
    np.testing.assert_allclose(f - c, fr, atol=atol)
    np.testing.assert_allclose(g + c, gr, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [1.0, 0.3])
def test_duals_match_pot_float64(backend, eps):
    x, y = _clouds()
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 1.5, len(x)), rng.uniform(0.5, 1.5, len(y))
    a, b = a / a.sum(), b / b.sum()
    fr, gr, P, C = _pot_duals(x, y, eps, a, b)
    r = sinkhorn_potentials(x, y, eps, a, b, backend=backend, tol=1e-10, max_iter=100000, block_size=32)
    assert r.converged and r.backend == backend and r.f.shape == (120,) and r.g.shape == (40,)
    assert r.f.dtype == np.float64 and r.g.dtype == np.float64
    _same_up_to_constant(r.f, r.g, fr, gr, atol=1e-6)
    primal = float(np.sum(P * C) + eps * np.sum(P * np.log(P / np.outer(a, b))))
    assert r.cost == pytest.approx(primal, rel=1e-7)  # dual value = entropic OT value


@pytest.mark.parametrize("eps", [1.0, 0.3])
def test_geomloss_potentials_are_converted_to_our_conventions(eps):
    """GeomLoss alone (cost C/2, blur**2 = eps/2), before our finishing iterations, sits near POT's
    duals once its annealing is slow enough (scaling 0.99: max error 0.05-0.12 here). A wrong
    mapping (blur**2 = eps, or potentials not doubled) stays 0.6 to 6 away."""
    from hf_otselect.ot import _geomloss_init

    x, y = _clouds()
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    fr, gr, _, _ = _pot_duals(x, y, eps)
    f, g = _geomloss_init(x, y, a, b, eps, "cpu", scaling=0.99)
    _same_up_to_constant(f.numpy(), g.numpy(), fr, gr, atol=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_close_to_pot_and_backends_agree(backend):
    x, y = _clouds(n=300, m=50, d=16, seed=3)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    fr, gr, _, _ = _pot_duals(x, y, 0.05)
    r = sinkhorn_potentials(x.astype(np.float32), y.astype(np.float32), 0.05, backend=backend, tol=1e-5, block_size=64)
    _same_up_to_constant(r.f, r.g, fr, gr, atol=2e-4)


def test_auto_picks_by_memory_budget():
    x, y = _clouds()
    assert sinkhorn_potentials(x, y, 0.5).backend == "tensorized"
    assert sinkhorn_potentials(x, y, 0.5, memory_budget=0).backend == "blocked"


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_with_duplicates_identical_clouds_and_tiny_eps(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dup = np.concatenate([x, x[:10], x[:10]])
    for xx, yy, eps in [(dup, x[:20], 0.05), (x, x, 0.05), (x, x, 1e-4), (dup, x[:7], 1e-4)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # tiny eps may need more iterations
            r = sinkhorn_potentials(xx, yy, eps, backend=backend, max_iter=50, block_size=16)
        assert np.isfinite(r.f).all() and np.isfinite(r.g).all() and np.isfinite(r.cost)
    # identical clouds at small eps: the plan is (nearly) the identity, OT value near 0
    r = sinkhorn_potentials(x, x, 1e-3, backend=backend, tol=1e-6, max_iter=2000)
    assert r.converged and abs(r.cost) < 0.05


def test_outlier_target_column_does_not_underflow():
    # A target point far from all candidates at small eps: its column sums underflow in float32
    # in the fused pass, and the exact fallback must keep g finite.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32) * 0.1
    y = np.concatenate([x[:30], np.full((1, 4), 3.0, np.float32)])
    for backend in BACKENDS:
        r = sinkhorn_potentials(x, y, 0.01, backend=backend, tol=1e-4, max_iter=5000, block_size=50)
        assert np.isfinite(r.g).all() and r.converged


def test_half_precision_inputs():
    x, y = _clouds(n=64, m=16, d=8)
    ref = sinkhorn_potentials(x.astype(np.float32), y.astype(np.float32), 0.5, tol=1e-6)
    r16 = sinkhorn_potentials(x.astype(np.float16), y.astype(np.float16), 0.5, tol=1e-6)
    rbf = sinkhorn_potentials(torch.tensor(x, dtype=torch.bfloat16), torch.tensor(y, dtype=torch.bfloat16), 0.5, tol=1e-6)
    for r in (r16, rbf):
        assert np.isfinite(r.f).all() and r.f.dtype == np.float64
        assert np.corrcoef(r.f, ref.f)[0, 1] > 0.99  # same problem up to input rounding


def test_relative_eps_uses_mean_cost():
    x, y = _clouds()
    mean_cost = ot.dist(x, y).mean()
    assert mean_sq_distance(x, y) == pytest.approx(mean_cost, rel=1e-10)
    r = sinkhorn_potentials(x, y, 0.1, eps_mode="relative")
    assert r.eps == pytest.approx(0.1 * mean_cost, rel=1e-10)


def test_non_convergence_warns_with_figures():
    x, y = _clouds()
    with pytest.warns(RuntimeWarning, match=r"marginal error .* after 1 iterations"):
        r = sinkhorn_potentials(x, y, 0.01, max_iter=1, tol=1e-9)
    assert not r.converged and r.n_iter == 1


def test_ot_distance_is_cost_and_symmetric_in_value():
    x, y = _clouds()
    d = ot_distance(x, y, eps=0.5, tol=1e-9)
    assert d == pytest.approx(sinkhorn_potentials(x, y, 0.5, tol=1e-9).cost)
    assert d == pytest.approx(ot_distance(y, x, eps=0.5, tol=1e-9), rel=1e-6)
    with pytest.raises(TypeError, match="kwargs"):
        ot_distance(x, y, blur=0.1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"eps": -0.1}, ValueError, "'eps' parameter"),
        ({"eps": 0.0}, ValueError, "'eps' parameter"),
        ({"backend": "tensorised"}, ValueError, "'backend' parameter"),
        ({"eps_mode": "rel"}, ValueError, "'eps_mode' parameter"),
        ({"max_iter": 0}, ValueError, "'max_iter' parameter"),
        ({"tol": 0}, ValueError, "'tol' parameter"),
        ({"a": np.ones(3)}, ValueError, "'a' parameter"),
    ],
)
def test_bad_parameters(kwargs, exc, match):
    x, y = _clouds()
    with pytest.raises(exc, match=match):
        sinkhorn_potentials(x, y, **kwargs)


def test_bad_inputs():
    x, y = _clouds()
    with pytest.raises(ValueError, match="'y' parameter.*6 columns"):
        sinkhorn_potentials(x, y[:, :3])
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="'x' parameter.*NaN"):
        sinkhorn_potentials(bad, y)
    with pytest.raises(TypeError, match="'x' parameter"):
        sinkhorn_potentials(np.array([["a", "b"]]), y)


@pytest.mark.skipif(importlib.util.find_spec("pykeops") is not None, reason="pykeops installed")
def test_keops_without_pykeops_says_what_to_install():
    x, y = _clouds()
    with pytest.raises(ImportError, match="pip install pykeops"):
        sinkhorn_potentials(x, y, backend="keops")
