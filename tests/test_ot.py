"""hf_otselect.ot: duals against POT, robustness, conventions and parameter errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hf_otselect.ot import mean_sq_distance, ot_distance, sinkhorn_potentials

ot = pytest.importorskip("ot")  # POT: dev dependency, reference solutions only
torch = pytest.importorskip("torch")

BACKENDS = ["tensorized", "blocked", "geomloss"]


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
        ({"tol": -1e-3}, ValueError, "'tol' parameter"),
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


def test_keops_is_not_a_back_end():
    x, y = _clouds(10, 6, 4)
    with pytest.raises(ValueError, match="'backend' parameter of sinkhorn_potentials must be one of"):
        sinkhorn_potentials(x, y, backend="keops")


# --- the sharded solver -------------------------------------------------------------------------

from scipy.special import logsumexp  # noqa: E402

from hf_otselect.dist import LOCAL, PoolView  # noqa: E402
from hf_otselect.ot import EPS_RELATIVE_RANGE, STALL_ITERATIONS, sharded_sinkhorn  # noqa: E402

from ._thread_comm import run_ranks, shard  # noqa: E402


def _c_transform_reference(x, y, g, eps, b=None):
    """f_i = -eps log sum_j b_j exp((g_j - ||x_i - y_j||^2) / eps), in float64 with scipy."""
    b = np.full(len(y), 1 / len(y)) if b is None else b
    C = ot.dist(x.astype(np.float64), y.astype(np.float64))
    return -eps * logsumexp(np.log(b)[None, :] + (g[None, :] - C) / eps, axis=1)


def _sharded(x, y, eps, world, **kw):
    """Run the sharded solver on ``world`` ranks; returns (per-rank results, concatenated f)."""
    res = run_ranks(world, lambda comm: sharded_sinkhorn(shard(x, comm), y, eps, comm=comm, **kw))
    return res, np.concatenate([r.f_local for r in res])


# kernel kept; cost blocks all cached / 3 of 40 rows' blocks cached / none (recomputed every pass)
MODES = {"kernel": (True, None), "cached": (False, None), "partial": (False, 3 * 16 * 40 * 8), "recompute": (False, 0)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("eps", [1.0, 0.3])
def test_sharded_duals_match_pot_float64(mode, world, eps):
    keep_kernel, budget = MODES[mode]
    x, y = _clouds()
    fr, gr, P, C = _pot_duals(x, y, eps)
    res, f = _sharded(x, y, eps, world, keep_kernel=keep_kernel, memory_budget=budget, tol=1e-11, max_iter=100000, block_rows=16)
    r0 = res[0]
    assert r0.converged and r0.kernel_kept == keep_kernel and r0.n_global == len(x)
    for r in res[1:]:  # identical state on every rank
        np.testing.assert_array_equal(r.g, r0.g)
        np.testing.assert_array_equal(r.g_f, r0.g_f)
        assert (r.f_sum, r.cost, r.n_iter) == (r0.f_sum, r0.cost, r0.n_iter)
    _same_up_to_constant(f, r0.g, fr, gr, atol=1e-6)
    assert r0.f_sum == pytest.approx(f.sum(), rel=1e-12)
    primal = float(np.sum(P * C) + eps * np.sum(P * np.log(P * len(x) * len(y))))
    assert r0.cost == pytest.approx(primal, rel=1e-7)
    # a row's potential is the c-transform of g_f: scipy's, and the state's own c_transform
    np.testing.assert_allclose(_c_transform_reference(x, y, r0.g_f, eps), f, atol=1e-9)
    np.testing.assert_allclose(r0.c_transform(x), f, atol=1e-9)


def test_cached_cost_blocks_give_the_recomputed_numbers():
    x, y = _clouds(n=300, m=40, d=8, seed=6)
    x, y = x.astype(np.float32), y.astype(np.float32)
    runs = [sharded_sinkhorn(PoolView(x), y, 0.3, keep_kernel=False, memory_budget=b, block_rows=32, tol=1e-5)
            for b in (0, 5 * 32 * 40 * 4, None)]  # none, 5 of 10 blocks, all cached
    for r in runs[1:]:
        np.testing.assert_array_equal(r.g, runs[0].g)
        np.testing.assert_array_equal(r.f_local, runs[0].f_local)


@pytest.mark.parametrize("keep_kernel", [True, False])
def test_sharded_on_two_and_three_ranks_equals_the_in_memory_solver(keep_kernel):
    x, y = _clouds(n=600, m=50, d=16, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    x, y = x.astype(np.float32), y.astype(np.float32)
    ref = sinkhorn_potentials(x, y, 0.02, backend="tensorized" if keep_kernel else "blocked", tol=1e-4)
    assert ref.n_iter > 3
    for world in (1, 2, 3):
        res, f = _sharded(x, y, 0.02, world, keep_kernel=keep_kernel, tol=1e-4, block_rows=64)
        assert res[0].n_iter == ref.n_iter
        np.testing.assert_allclose(res[0].g, ref.g, atol=2e-6)
        np.testing.assert_allclose(f, ref.f, atol=2e-6)


@pytest.mark.parametrize("keep_kernel", [True, False])
def test_bytes_per_iteration_do_not_grow_with_n(keep_kernel):
    """Traffic is per target: the same bytes for N and 4N rows at a fixed number of iterations."""
    rng = np.random.default_rng(0)
    m, iters = 40, 6
    y = rng.normal(size=(m, 8)).astype(np.float32)
    sent = {}
    for n in (300, 1200):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = run_ranks(2, lambda comm: (sharded_sinkhorn(shard(x, comm), y, 0.5, comm=comm, keep_kernel=keep_kernel,
                                                               tol=0, max_iter=iters), comm.bytes_sent))
        assert res[0][0].n_iter == iters
        sent[n] = res[0][1]
    # setup: an offset all-gather (PoolView.of), the mean cost, the kernel decision; per iteration
    # at most two m-vectors of float64 plus two scalars; the closing sums
    per_iter_bound = (2 * m + 3) * 8
    assert sent[300] <= 200 + iters * per_iter_bound
    if not keep_kernel:  # the log pass: exactly the same messages whatever N
        assert sent[300] == sent[1200]
    else:  # absorptions may differ with the data; each costs a log pass, still O(m)
        assert sent[1200] <= 200 + iters * per_iter_bound


@pytest.mark.parametrize(
    "magnitude, offset, dtype, atol",
    [(1e20, 0.0, np.float64, 1e-6), (1e-20, 0.0, np.float64, 1e-6), (1.0, 1e12, np.float64, 1e-3),
     (1e15, 1e25, np.float64, 1e-3), (1e20, 0.0, np.float32, 1e-4), (1e-20, 0.0, np.float32, 1e-4),
     (1e3, 1e8, np.float32, 0.05)],
)
def test_any_finite_magnitude_gives_the_unit_scale_potentials(magnitude, offset, dtype, atol):
    """OT with cost C and eps equals cost s^2 C and s^2 eps with potentials times s^2; a shift of
    both clouds changes no cost. float32 at 1e20 would overflow |x|^2, at 1e-20 underflow it."""
    x, y = _clouds(n=200, m=30, d=8, seed=2)
    ref = sinkhorn_potentials(x, y, 0.5, tol=1e-9)
    xs = (x * magnitude + offset).astype(dtype)
    ys = (y * magnitude + offset).astype(dtype)
    s2 = magnitude**2
    r = sharded_sinkhorn(PoolView(xs), ys, 0.5 * s2, tol=1e-9)
    assert np.isfinite(r.g).all() and np.isfinite(r.f_local).all()
    _same_up_to_constant(r.f_local / s2, r.g / s2, ref.f, ref.g, atol=atol)
    # the same, given as eps relative to the mean cost
    rel = 0.5 / mean_sq_distance(x, y)
    r = sharded_sinkhorn(PoolView(xs), ys, rel, eps_mode="relative", tol=1e-9)
    _same_up_to_constant(r.f_local / s2, r.g / s2, ref.f, ref.g, atol=atol)


@pytest.mark.parametrize("eps", [1e-3, 1e6])
def test_eps_outside_the_valid_range_is_refused_in_the_users_terms(eps):
    x, y = _clouds()
    big_x, big_y = (x * 1e10).astype(np.float32), (y * 1e10).astype(np.float32)
    mean_cost = mean_sq_distance(big_x, big_y)  # about 1e21: eps 1e-3 is far below it, 1e6 x it far above
    with pytest.raises(ValueError, match=r"The 'eps' parameter of sinkhorn_potentials must be a float in \[[0-9.e+]+, [0-9.e+]+\] for these x and y") as info:
        sinkhorn_potentials(big_x, big_y, eps if eps < 1 else eps * mean_cost)
    assert "eps_mode='relative'" in str(info.value)
    with pytest.raises(ValueError, match=r"The 'eps' parameter of sharded_sinkhorn must be a float in \[1e-08, 1000\] with eps_mode='relative'"):
        sharded_sinkhorn(PoolView(x), y, EPS_RELATIVE_RANGE[1] * 2, eps_mode="relative")


def test_sharded_parameter_errors_name_the_callers_arguments():
    x, y = _clouds()
    with pytest.raises(ValueError, match="'target' parameter of sharded_sinkhorn must be an array with 6 columns"):
        sharded_sinkhorn(PoolView(x), y[:, :4])
    with pytest.raises(ValueError, match="'eps' parameter"):
        sharded_sinkhorn(PoolView(x), y, -1.0)
    assert sharded_sinkhorn(PoolView(x), y, 0.5, comm=LOCAL).n_global == len(x)


def test_read_only_inputs_give_no_torch_warning():
    """A memory-mapped cache hands the solver read-only rows: no torch 'not writable' warning.

    In a fresh interpreter with warnings as errors, because torch warns once per process.
    """
    import subprocess
    import sys

    code = """
import numpy as np
from hf_otselect.dist import PoolView
from hf_otselect.ot import sharded_sinkhorn, sinkhorn_potentials
rng = np.random.default_rng(0)
x = rng.normal(size=(40, 8)).astype(np.float32) + 100  # far from the origin: the shifted path too
y = rng.normal(size=(6, 8)).astype(np.float32) + 100
b = np.full(6, 1 / 6)
for v in (x, y, b):
    v.setflags(write=False)
fit = sharded_sinkhorn(PoolView(x, 0, 40), y, b=b)
fit.c_transform(x)
for backend in ("tensorized", "blocked", "geomloss"):
    sinkhorn_potentials(x, y, b=b, backend=backend)
"""
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("world", [1, 2])
def test_a_tol_below_float32s_floor_is_reached_in_float64(world):
    """float32 inputs and a tol the float32 kernel iterations never reach (their error floors near
    1e-7 here): finished in float64, with POT's duals. (The log-domain passes measure the change of
    ``f``, which float32 can bring to 0, so they need no switch.)"""
    x, y = (v.astype(np.float32) for v in _clouds(n=300, m=40))
    assert sharded_sinkhorn(PoolView(x), y, 0.3, keep_kernel=True).precision == "float32"
    res, f = _sharded(x, y, 0.3, world, keep_kernel=True, tol=1e-11, max_iter=5000)
    r = res[0]
    assert r.converged and not r.stalled and r.precision == "float64" and r.marginal_error < 1e-11
    fr, gr, _, _ = _pot_duals(x.astype(np.float64), y.astype(np.float64), 0.3)
    _same_up_to_constant(f, r.g, fr, gr, atol=1e-8)


def test_a_tol_below_float64s_floor_stops_where_the_error_stalls():
    """No dtype reaches 1e-300: the solve stops at float64's floor, says so, and does not spin to max_iter."""
    x, y = _clouds()
    with pytest.warns(RuntimeWarning, match="float64 rounding sets for this problem. Raise tol"):
        r = sinkhorn_potentials(x, y, 0.3, tol=1e-300, max_iter=100_000)
    assert not r.converged and r.precision == "float64" and r.n_iter < 2000
    assert r.marginal_error < 1e-12  # it got to float64's floor before stopping


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tol_zero_runs_exactly_max_iter_in_the_inputs_precision(dtype):
    x, y = (v.astype(dtype) for v in _clouds())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an asked-for iteration count is no convergence failure
        r = sinkhorn_potentials(x, y, 0.3, tol=0, max_iter=3 * STALL_ITERATIONS)
    assert r.n_iter == 3 * STALL_ITERATIONS and not r.converged and r.precision == np.dtype(dtype).name


@pytest.mark.parametrize("value", [0.12573022, 3.0, 1e6])
@pytest.mark.parametrize("m", [1, 6, 7])
def test_identical_clouds_have_zero_mean_cost_whatever_the_rounding_of_their_mean(value, m):
    """All rows equal: the mean cost is 0, not the rounding left by averaging with inexact 1/m
    weights (1.5e-33 at one BLAS thread for 0.12573022 and m = 6), which made eps=0.1 'out of range'."""
    x = np.full((2, 1), value, dtype=np.float32)
    y = np.full((m, 1), value, dtype=np.float32)
    # float32 potentials of size eps = 0.1 carry a few ulps of it
    assert sharded_sinkhorn(PoolView(x), y, 0.1).cost == pytest.approx(0.0, abs=8 * float(np.finfo(np.float32).eps) * 0.1)


# ---------------------------------------------------------------- warm starts (issue 24, item 2)
def _unit_clouds(n=600, m=50, d=16, seed=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) * 0.8 + 0.4
    return x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)


def _gap(r, ref_f, ref_g):
    """Largest potential difference up to the shared constant (f + c, g - c)."""
    c = np.mean(r.f_local - ref_f)
    return max(np.abs(r.f_local - c - ref_f).max(), np.abs(r.g + c - ref_g).max())


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def torch_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("keep_kernel", [False, True])
def test_warm_started_potentials_are_pots_in_float64(torch_threads, keep_kernel):
    """eps-scaling and a sample fit's g change the start only: the fixed point is POT's (float64)."""
    x, y = _clouds()
    eps = 0.3
    fr, gr, _, _ = _pot_duals(x, y, eps)
    kw = dict(keep_kernel=keep_kernel, tol=1e-10, max_iter=100000, block_rows=32)
    sample = sharded_sinkhorn(PoolView(x[::2]), y, eps, tol=1e-10, max_iter=100000)
    for warm in ({"eps_scaling": 4}, {"init_g": sample.g}, {"eps_scaling": 2, "init_g": sample.g}):
        r = sharded_sinkhorn(PoolView(x), y, eps, **kw, **warm)
        assert r.converged and r.precision == "float64"
        assert r.warm_passes == (0 if keep_kernel else warm.get("eps_scaling", 0))  # no coarse pass with the kernel kept
        _same_up_to_constant(r.f_local, r.g, fr, gr, atol=1e-6)


def test_warm_started_float32_potentials_are_as_close_to_the_fixed_point_as_cold_ones(torch_threads):
    """float32, tol 1e-3: a warm start stops as near the float64 fixed point as the cold solve does."""
    x, y = _unit_clouds()
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    ref = sharded_sinkhorn(PoolView(x), y, 0.01, tol=1e-12, max_iter=100000)
    cold = sharded_sinkhorn(PoolView(x32), y32, 0.01, keep_kernel=False, tol=1e-3)
    sample = sharded_sinkhorn(PoolView(x32[::2]), y32, 0.01, tol=1e-3)
    base = _gap(cold, ref.f_local, ref.g)
    assert base > 0
    for warm in ({"eps_scaling": 8}, {"init_g": sample.g}):
        r = sharded_sinkhorn(PoolView(x32), y32, 0.01, keep_kernel=False, tol=1e-3, **warm)
        assert r.converged and r.precision == "float32"
        assert _gap(r, ref.f_local, ref.g) <= 1.5 * base


def test_warm_starts_take_fewer_passes(torch_threads):
    """Counted passes (deterministic), float32 no-kernel solve at eps 0.01, tol 1e-3: cold 157."""
    x, y = (v.astype(np.float32) for v in _unit_clouds())
    kw = dict(keep_kernel=False, tol=1e-3)
    cold = sharded_sinkhorn(PoolView(x), y, 0.01, **kw)
    scaled = sharded_sinkhorn(PoolView(x), y, 0.01, eps_scaling=8, **kw)
    sample = sharded_sinkhorn(PoolView(x[::2]), y, 0.01, tol=1e-3)
    seeded = sharded_sinkhorn(PoolView(x), y, 0.01, init_g=sample.g, **kw)
    again = sharded_sinkhorn(PoolView(x), y, 0.01, init_g=cold.g, **kw)
    assert scaled.warm_passes == 8 and cold.warm_passes == 0
    assert scaled.n_iter < cold.n_iter - 10  # 131 (8 of them coarse) against 157
    assert seeded.n_iter < cold.n_iter - 30  # 108
    assert again.n_iter <= 2  # from its own fixed point: one pass to measure, one to confirm
    # with the kernel kept, the given g is the start too
    assert sharded_sinkhorn(PoolView(x), y, 0.01, keep_kernel=True, tol=1e-3, init_g=sample.g).n_iter < cold.n_iter - 30


def test_eps_scaling_leaves_a_pass_at_the_target_eps():
    x, y = _clouds()
    r = sharded_sinkhorn(PoolView(x), y, 0.3, keep_kernel=False, eps_scaling=5, max_iter=3, tol=0)
    assert (r.n_iter, r.warm_passes) == (3, 2)


@pytest.mark.parametrize("init_g, got", [
    (np.zeros(39), "an array of shape (39,)"),
    (np.zeros((40, 1)), "an array of shape (40, 1)"),
    (np.r_[np.zeros(39), np.nan], "1 NaN or Inf value(s)"),
    (np.r_[np.inf, np.zeros(39)], "1 NaN or Inf value(s)"),
])
def test_a_bad_init_g_is_refused_in_the_template_before_any_pass(init_g, got, monkeypatch):
    import hf_otselect.ot as hot

    x, y = _clouds()
    monkeypatch.setattr(hot, "_frame", lambda *a, **k: pytest.fail("a pass over the rows ran before the check"))
    expected = ("The 'init_g' parameter of sharded_sinkhorn must be None or a finite float array of shape (40,) "
                f"(target potentials, e.g. a sample fit's g). Got '{got}' instead.")
    with pytest.raises(ValueError) as err:
        sharded_sinkhorn(PoolView(x), y, 0.3, init_g=init_g)
    assert str(err.value) == expected


def test_bad_eps_scaling_and_init_g_with_geomloss_are_refused():
    x, y = _clouds()
    with pytest.raises(ValueError, match=r"^The 'eps_scaling' parameter of sharded_sinkhorn must be an int in \[0, 64\]. Got -1 instead.$"):
        sharded_sinkhorn(PoolView(x), y, 0.3, eps_scaling=-1)
    with pytest.raises(TypeError, match=r"^The 'eps_scaling' parameter of sharded_sinkhorn must be an int"):
        sharded_sinkhorn(PoolView(x), y, 0.3, eps_scaling=2.0)
    with pytest.raises(ValueError, match=r"^The 'init_g' parameter of sharded_sinkhorn must be None with backend='geomloss'"):
        sharded_sinkhorn(PoolView(x), y, 0.3, init_g=np.zeros(40), start="geomloss")


# ---------------------------------------------------------------- over-relaxation (issue 24, item 2)
def _unguarded_relaxed_errors(x, y, eps, omega, passes):
    """Over-relaxed log-domain Sinkhorn without any safeguard (float64, scipy), first pass plain:
    the L1 row + column marginal error of the plan before each pass, as the solver measures it."""
    C = ot.dist(x, y)
    la, lb = np.full(len(x), -np.log(len(x))), np.full(len(y), -np.log(len(y)))
    f, g, errs = np.zeros(len(x)), np.zeros(len(y)), []
    for k in range(passes):
        fb = -eps * logsumexp(lb[None, :] + (g[None, :] - C) / eps, axis=1)
        tg = -eps * logsumexp(la[:, None] + (f[:, None] - C) / eps, axis=0)
        errs.append(np.exp(la) @ np.abs(np.expm1((f - fb) / eps)) + (np.exp(lb) @ np.abs(np.expm1((g - tg) / eps)) if k else 0.0))
        w = 1.0 if k == 0 else omega
        f = (1 - w) * f + w * fb
        g = (1 - w) * g + w * -eps * logsumexp(la[:, None] + (f[:, None] - C) / eps, axis=0)
    return np.array(errs)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("omega", [1.3, 1.6, 1.95])
def test_relaxed_potentials_are_pots_and_the_plain_solves_in_float64(world, omega):
    """Same fixed point: POT's duals (1e-6), the plain solve's, and f is still the c-transform of g_f."""
    x, y = _clouds()
    eps = 0.3
    fr, gr, _, _ = _pot_duals(x, y, eps)
    kw = dict(keep_kernel=False, tol=1e-11, max_iter=100000, block_rows=16)
    plain = _sharded(x, y, eps, world, **kw)[0][0]
    res, f = _sharded(x, y, eps, world, relaxation=omega, **kw)
    r0 = res[0]
    assert r0.converged and r0.precision == "float64"
    for r in res[1:]:  # identical state on every rank
        np.testing.assert_array_equal(r.g_f, r0.g_f)
        assert (r.n_iter, r.relaxed_passes) == (r0.n_iter, r0.relaxed_passes)
    _same_up_to_constant(f, r0.g, fr, gr, atol=1e-6)
    np.testing.assert_allclose(r0.g - r0.g[0], plain.g - plain.g[0], atol=1e-8)
    np.testing.assert_allclose(_c_transform_reference(x, y, r0.g_f, eps), f, atol=1e-9)


def test_relaxation_takes_fewer_passes_to_the_same_accuracy(torch_threads):
    """Counted passes (deterministic), float32 no-kernel solve at eps 0.01, tol 1e-3: plain 157."""
    x, y = _unit_clouds()
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    ref = sharded_sinkhorn(PoolView(x), y, 0.01, tol=1e-12, max_iter=100000)
    kw = dict(keep_kernel=False, tol=1e-3)
    plain = sharded_sinkhorn(PoolView(x32), y32, 0.01, **kw)
    base = _gap(plain, ref.f_local, ref.g)
    assert plain.n_iter > 150 and plain.relaxed_passes == 0
    for omega, most in ((1.4, 85), (1.5, 70), (1.7, 35)):  # 78 at 1.4, 63 at 1.5, 31 at 1.7
        r = sharded_sinkhorn(PoolView(x32), y32, 0.01, relaxation=omega, **kw)
        assert r.converged and r.precision == "float32" and r.n_iter <= most
        assert r.relaxed_passes == r.n_iter - 2  # all but the first (plain) and the last (returned plain)
        assert _gap(r, ref.f_local, ref.g) <= 1.5 * base
    # with the kernel kept the relaxation is ignored: the stabilised scaling iterations as before
    kept = sharded_sinkhorn(PoolView(x32), y32, 0.01, keep_kernel=True, tol=1e-3)
    assert sharded_sinkhorn(PoolView(x32), y32, 0.01, keep_kernel=True, tol=1e-3, relaxation=1.5).n_iter == kept.n_iter


def test_the_safeguard_falls_back_to_plain_sinkhorn_where_omega_near_2_oscillates():
    """omega 1.95 at eps 0.01: unguarded, the error swings up and down and after 60 passes sits far
    above plain Sinkhorn's; guarded, the dual objective's fall stops the relaxation and the error
    never ends above the plain one (tol 0: exactly 60 passes each)."""
    x, y = _unit_clouds()
    passes = 60
    wild = _unguarded_relaxed_errors(x, y, 0.01, 1.95, passes + 1)[1:]  # errors of the states after passes 1..60
    assert (np.diff(wild) > 0).sum() >= 5  # oscillates
    plain = sharded_sinkhorn(PoolView(x), y, 0.01, keep_kernel=False, tol=0, max_iter=passes + 1)
    for omega in (1.9, 1.95, 1.99):
        r = sharded_sinkhorn(PoolView(x), y, 0.01, keep_kernel=False, tol=0, max_iter=passes + 1, relaxation=omega)
        assert r.relaxed_passes < passes - 1  # the safeguard engaged
        # the same plain iterations from pass 2 on, up to the rounding of the pass that computed both steps
        assert r.marginal_error <= plain.marginal_error * (1 + 1e-9) and plain.marginal_error < wild[-1] / 2
        conv = sharded_sinkhorn(PoolView(x), y, 0.01, keep_kernel=False, tol=1e-6, max_iter=100000, relaxation=omega)
        assert conv.converged


def test_relaxation_one_is_plain_sinkhorn_iterate_for_iterate():
    """relaxation=1.0 (the solver's default) runs the plain log-domain iterations bit for bit: k + 1
    passes are k passes then one more from their g, and both are scipy's float64 iterations."""
    x, y = _unit_clouds()
    eps, k = 0.01, 9
    kw = dict(keep_kernel=False, tol=0, block_rows=64)
    more = sharded_sinkhorn(PoolView(x), y, eps, max_iter=k + 1, relaxation=1.0, **kw)
    some = sharded_sinkhorn(PoolView(x), y, eps, max_iter=k, relaxation=1.0, **kw)
    step = sharded_sinkhorn(PoolView(x), y, eps, max_iter=1, init_g=some.g, relaxation=1.0, **kw)
    np.testing.assert_array_equal(step.g, more.g)
    np.testing.assert_array_equal(step.f_local, more.f_local)
    assert more.relaxed_passes == 0
    default = sharded_sinkhorn(PoolView(x), y, eps, max_iter=k + 1, **kw)
    np.testing.assert_array_equal(default.g, more.g)
    C = ot.dist(x, y)
    f, g = np.zeros(len(x)), np.zeros(len(y))
    for _ in range(k + 1):
        f = -eps * logsumexp(-np.log(len(y)) + (g[None, :] - C) / eps, axis=1)
        g = -eps * logsumexp(-np.log(len(x)) + (f[:, None] - C) / eps, axis=0)
    np.testing.assert_allclose(more.g, g, atol=1e-11)
    np.testing.assert_allclose(more.f_local, f, atol=1e-11)


@pytest.mark.parametrize("relaxation, exc, got", [
    (2.0, ValueError, "2.0"), (0.99, ValueError, "0.99"), (float("nan"), ValueError, "nan"), ("1.5", TypeError, "'1.5'"),
    (True, TypeError, "True"),
])
def test_a_bad_relaxation_is_refused_in_the_template_before_any_pass(relaxation, exc, got, monkeypatch):
    import hf_otselect.ot as hot

    x, y = _clouds()
    monkeypatch.setattr(hot, "_frame", lambda *a, **k: pytest.fail("a pass over the rows ran before the check"))
    with pytest.raises(exc) as err:
        sharded_sinkhorn(PoolView(x), y, 0.3, relaxation=relaxation)
    assert str(err.value) == f"The 'relaxation' parameter of sharded_sinkhorn must be a float in [1.0, 2.0). Got {got} instead."
