"""TSDS: closed form against the paper's toy example and against scipy's LP solver, invariants."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.optimize import linprog

from hf_otselect.selectors import tsds as tsds_mod
from hf_otselect.selectors.tsds import TSDSSelector, knn_kde_allocation, sample_epochs


def _toy() -> tuple[np.ndarray, np.ndarray]:
    """The paper's toy example: a query at the origin; candidates at 0.1, 0.2, 0.3 (x3), 0.4, 0.5."""
    x = np.zeros((7, 2), dtype=np.float32)
    x[:, 0] = [0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.5]
    return x, np.zeros((1, 2), dtype=np.float32)


def _density(x: np.ndarray, h: float, n_kde: int) -> np.ndarray:
    """Brute-force Epanechnikov density over the n_kde nearest points (self included)."""
    x = x.astype(np.float64)
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)
    nearest = np.sort(sq, axis=1)[:, :n_kde]
    return np.maximum(0.0, 1.0 - nearest / h**2).sum(1)


def _lp_optimum(y, x, rho, alpha, C):
    """Solve min (a/C) sum g d + (1-a) M t  s.t. rows sum to 1/M, rho_j g_ij <= t, g >= 0 with HiGHS."""
    m, n = len(y), len(x)
    d = np.sqrt(((y.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1))
    c = np.concatenate([alpha / C * d.ravel(), [(1 - alpha) * m]])
    a_eq = np.zeros((m, m * n + 1))
    for i in range(m):
        a_eq[i, i * n : (i + 1) * n] = 1
    a_ub = np.zeros((m * n, m * n + 1))
    a_ub[np.arange(m * n), np.arange(m * n)] = np.tile(rho, m)
    a_ub[:, -1] = -1
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(m * n), A_eq=a_eq, b_eq=np.full(m, 1 / m), bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun, d


def _objective(gamma, d, rho, alpha, C):
    m = gamma.shape[0]
    return alpha / C * (gamma * d).sum() + (1 - alpha) * m * (gamma * rho[None]).max()


def test_toy_example_knn_uniform():
    x, y = _toy()
    p = TSDSSelector(alpha=0.5, C=1.0, sigma=0.0, max_K=7, kde_K=7).score(x, y)
    np.testing.assert_allclose(p, [1 / 6] * 6 + [0], atol=1e-12)
    assert p[2:5].sum() == pytest.approx(0.5)


def test_toy_example_knn_kde():
    x, y = _toy()
    p = TSDSSelector(alpha=0.5, C=1.0, sigma=0.05, max_K=7, kde_K=7).score(x, y)
    np.testing.assert_allclose(p, [0.25, 0.25, 1 / 12, 1 / 12, 1 / 12, 0.25, 0.0], atol=1e-9)
    # This instance sits exactly on a flat piece of the objective: moving mass to the 0.5
    # candidate costs as much alignment as it saves diversity. Our plan is one of the optima.
    rho = _density(x, 0.05, 7)
    np.testing.assert_allclose(rho, [1, 1, 3, 3, 3, 1, 1])
    best, d = _lp_optimum(y, x, rho, 0.5, 1.0)
    assert _objective(p[None], d, rho, 0.5, 1.0) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kernel", ["uniform", "kde"])
def test_closed_form_equals_linear_program(seed, kernel):
    rng = np.random.default_rng(seed)
    m, n, dim = 3, 14, 3
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[5:8] = x[4] + 0.05 * rng.normal(size=(3, dim)).astype(np.float32)  # a near-duplicate clump
    y = rng.normal(size=(m, dim)).astype(np.float32)
    alpha, C, h = [0.3, 0.5, 0.8][seed % 3], [1.0, 5.0][seed % 2], 0.6
    n_kde = n if seed % 2 else 3
    rho = _density(x, h, n_kde) if kernel == "kde" else np.ones(n)
    best, d = _lp_optimum(y, x, rho, alpha, C)
    order = np.argsort(d, axis=1, kind="stable")
    gamma_sorted, _, _ = knn_kde_allocation(np.take_along_axis(d, order, 1), 1 / rho[order], alpha=alpha, C=C)
    gamma = np.zeros((m, n))
    np.put_along_axis(gamma, order, gamma_sorted, 1)
    np.testing.assert_allclose(gamma.sum(1), 1 / m, atol=1e-15)
    assert gamma.min() >= 0
    assert _objective(gamma, d, rho, alpha, C) == pytest.approx(best, abs=1e-6)
    # The selector (FAISS neighbours, its own densities) gives the same p.
    sel = TSDSSelector(alpha=alpha, C=C, sigma=h if kernel == "kde" else 0.0, max_K=n, kde_K=n_kde, kernel=kernel)
    np.testing.assert_allclose(sel.score(x, y), gamma.sum(0), atol=1e-9)


def _blobs(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_alpha_one_puts_each_query_on_its_nearest_even_when_its_budget_is_exceeded():
    x = _blobs(60, seed=1)
    y = _blobs(5, seed=2)
    # Query 0's nearest candidate sits in a clump of 4 exact duplicates: a large density, so the
    # water level of the others exceeds its budget (K_i = 0 in the published code's terms).
    x[:4] = y[0] + 0.01
    p = TSDSSelector(alpha=1.0, sigma=0.5, max_K=60, kde_K=60).score(x, y)
    d = ((y[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    expected = np.bincount(np.argmin(d, axis=1), minlength=60) / 5.0
    np.testing.assert_allclose(p, expected, atol=1e-12)
    # Just below alpha = 1 the same holds (nearest neighbours are isolated by a margin).
    p = TSDSSelector(alpha=1 - 1e-9, sigma=0.0, max_K=60).score(x[3:], y)
    d = ((y[:, None].astype(np.float64) - x[3:][None]) ** 2).sum(-1)
    np.testing.assert_allclose(p, np.bincount(np.argmin(d, axis=1), minlength=57) / 5.0, atol=1e-12)


def test_alpha_zero_spreads_over_all_prefetched_neighbours():
    x = _blobs(200, seed=3)
    y = _blobs(4, seed=4)
    sel = TSDSSelector(alpha=0.0, sigma=0.0, max_K=25)
    p = sel.score(x, y)
    d = ((y[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, :25]
    expected = np.bincount(nearest.ravel(), minlength=200) / (4 * 25)
    np.testing.assert_allclose(p, expected, atol=1e-12)
    assert sel.diagnostics_["max_neighbourhood"] == 25


def test_duplicate_injection_kde_invariant_uniform_not():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(500, 16)).astype(np.float32)
    y = rng.normal(size=(20, 16)).astype(np.float32)
    dup = np.arange(5)  # 1% of the pool, each present 1000 times after injection
    pool = np.vstack([base, np.repeat(base[dup], 999, axis=0)])
    content = np.concatenate([dup, 500 + np.arange(5 * 999)])
    n = len(pool)
    kw = dict(alpha=0.05, C=5.0, max_K=n, kde_K=1000)
    # sigma well below the spacing of distinct points (> 3 here) so densities count copies only
    p0 = TSDSSelector(sigma=0.5, **kw).score(base, y)
    p1 = TSDSSelector(sigma=0.5, **kw).score(pool, y)
    assert p0[dup].sum() > 1e-3  # the duplicated content matters in the first place
    assert p1[content].sum() == pytest.approx(p0[dup].sum(), abs=1e-9)
    np.testing.assert_allclose(p1[5:500], p0[5:500], atol=1e-9)
    u0 = TSDSSelector(sigma=0.0, **kw).score(base, y)
    u1 = TSDSSelector(sigma=0.0, **kw).score(pool, y)
    assert u1[content].sum() > 5 * u0[dup].sum()


def _reference_p(x, y, alpha, C, sigma, max_K, kde_K):
    """The algorithm without any shortcut: all max_K neighbours by brute force (ties to the lower
    index), brute-force densities over the kde_K nearest, one closed-form solve."""
    d = np.sqrt(((y.astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1))
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), d.shape), d), axis=1)[:, :max_K]
    rho = _density(x, sigma, kde_K) if sigma > 0 else np.ones(len(x))
    gamma, _, _ = knn_kde_allocation(np.take_along_axis(d, order, 1), 1 / rho[order], alpha=alpha, C=C)
    return np.bincount(order.ravel(), weights=gamma.ravel(), minlength=len(x))


@pytest.mark.parametrize("first", [2, 128])
@pytest.mark.parametrize("table_rows", [2**23, 0])  # densities kept by row number; as sorted rows searched
def test_widening_lists_equal_the_full_width_solution(monkeypatch, first, table_rows):
    rng = np.random.default_rng(6)
    x = np.vstack([rng.normal(size=(300, 8)), rng.normal(size=(100, 8)) * 0.1]).astype(np.float32)
    y = rng.normal(size=(10, 8)).astype(np.float32) * 0.3
    monkeypatch.setattr(tsds_mod, "_FIRST_WIDTH", first)
    monkeypatch.setattr(tsds_mod, "_TABLE_ROWS", table_rows)
    sel = TSDSSelector(alpha=0.2, C=1.0, sigma=0.8, max_K=400, kde_K=50)
    p = sel.score(x, y)
    if first == 2:
        assert 2 < sel.diagnostics_["width"] < 400  # it had to widen, and stopped early
    np.testing.assert_allclose(p, _reference_p(x, y, 0.2, 1.0, 0.8, 400, 50), atol=1e-12)


def _spy_searches(monkeypatch):
    """Record (n_queries, neighbours searched) of every search the selector makes over its shard."""
    calls = []
    real = tsds_mod._Shard._search

    def spy(shard, queries, k, kind, nprobe, ahead, ordered=True):
        calls.append((len(queries), max(k, ahead)))
        return real(shard, queries, k, kind, nprobe, ahead, ordered)

    monkeypatch.setattr(tsds_mod._Shard, "_search", spy)
    return calls


def test_densities_of_copies_and_of_a_dense_pool_are_bounded_by_kde_K(monkeypatch):
    rng = np.random.default_rng(12)
    # 600 exact copies of one row, 200 rows in a tiny ball (all pairs within sigma), 200 spread.
    x = np.vstack([np.repeat(rng.normal(size=(1, 4)), 600, axis=0), 0.01 * rng.normal(size=(200, 4)) + 3.0,
                   5 * rng.normal(size=(200, 4))]).astype(np.float32)
    y = np.vstack([x[:1] + 0.05, x[600:601] + 0.05, 5 * rng.normal(size=(3, 4))]).astype(np.float32)
    calls = _spy_searches(monkeypatch)
    kde_K, max_K = 50, 1000
    sel = TSDSSelector(alpha=0.3, C=1.0, sigma=0.5, max_K=max_K, kde_K=kde_K)
    p = sel.score(x, y)
    np.testing.assert_allclose(p, _reference_p(x, y, 0.3, 1.0, 0.5, max_K, kde_K), atol=1e-12)
    calls.clear()
    state = sel.fit(tsds_mod.PoolView(x), y)
    copies = state.rows < 600
    assert copies.any() and np.all(state.density[copies] == kde_K)  # kde_K copies at distance 0
    # No search asks for more than kde_K (+ the re-ranking margin) neighbours per density row,
    # and the copies are searched once (grouped), not once per copy.
    density_calls = [(q, k) for q, k in calls if q != len(y)]
    assert density_calls and max(k for _, k in density_calls) <= kde_K + tsds_mod._margin(kde_K)
    assert sum(q for q, _ in density_calls) <= 2 * (len(x) - 599)  # 401 distinct vectors, two passes at most


def test_probabilities_and_determinism():
    x = _blobs(300, seed=7)
    y = _blobs(12, seed=8)
    sel = TSDSSelector(alpha=0.3, sigma=1.5, max_K=100, kde_K=30)
    p = sel.score(x, y)
    assert p.dtype == np.float64 and p.shape == (300,)
    assert (p >= 0).all() and p.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(p, TSDSSelector(alpha=0.3, sigma=1.5, max_K=100, kde_K=30).score(x, y))
    perm = np.random.default_rng(0).permutation(300)
    np.testing.assert_allclose(sel.score(x[perm], y), p[perm], atol=1e-12)  # order-invariant
    a = sel.select(x, y, 50, seed=3)
    np.testing.assert_array_equal(a.indices, sel.select(x, y, 50, seed=3).indices)
    assert (a.scores[a.indices] > 0).all()  # select passes k on as the budget, so its p is its own
    b = TSDSSelector(alpha=0.3, sigma=1.5, max_K=100, kde_K=30, replace=False).select(x, y, 20, seed=3)
    assert len(set(b.indices.tolist())) == 20


def test_sample_epochs_seeded_and_distinct():
    p = np.full(100, 0.01)
    e = sample_epochs(p, 30, 3, seed=1)
    assert e.shape == (3, 30) and e.dtype == np.int64
    np.testing.assert_array_equal(e, sample_epochs(p, 30, 3, seed=1))
    assert not np.array_equal(e[0], e[1])
    e = sample_epochs(p, 100, 2, replace=False, seed=2)
    assert all(sorted(r.tolist()) == list(range(100)) for r in e)


def test_small_pools_work_and_caps_are_clipped_quietly(caplog):
    """Issue 23: the paper's default caps exceed every small pool; clipping them is no warning."""
    x, y = _blobs(3, seed=9), _blobs(2, seed=10)
    with caplog.at_level(logging.DEBUG, logger="hf_otselect.selectors.tsds"):
        p = TSDSSelector().score(x, y)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "max_K=5000 exceeds the 3 candidates" in caplog.text
    assert "kde_K=1000 exceeds the 3 candidates" in caplog.text
    assert p.sum() == pytest.approx(1.0) and (p >= 0).all()
    assert TSDSSelector(sigma=0.3).score(x[:1], y)[0] == pytest.approx(1.0)


def test_ivf_index_path_close_to_exact():
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(10, 16)) * 3
    x = (centers[rng.integers(0, 10, 4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    y = (centers[rng.integers(0, 3, 30)] + rng.normal(size=(30, 16))).astype(np.float32)
    kw = dict(alpha=0.2, C=5.0, sigma=2.0, max_K=200, kde_K=100)
    exact = TSDSSelector(index="flat", **kw).score(x, y)
    approx = TSDSSelector(index="ivf", nprobe=16, **kw).score(x, y)
    assert approx.sum() == pytest.approx(1.0)
    assert 0.5 * np.abs(exact - approx).sum() < 0.05  # total variation


@pytest.mark.parametrize(
    "params, match",
    [
        ({"alpha": 1.5}, "'alpha' parameter of TSDSSelector must be a float in \\[0.0, 1.0\\]"),
        ({"C": 0.0}, "'C' parameter"),
        ({"sigma": -0.1}, "'sigma' parameter"),
        ({"max_K": 0}, "'max_K' parameter"),
        ({"kde_K": 2.5}, "'kde_K' parameter"),
        ({"kernel": "tv"}, "'kernel' parameter"),
        ({"replace": "yes"}, "'replace' parameter"),
        ({"index": "lsh"}, "'index' parameter"),
    ],
)
def test_bad_parameters_raise(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TSDSSelector(**params)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="'target' parameter of TSDSSelector.score"):
        TSDSSelector().score(_blobs(10), _blobs(2, dim=4))
    with pytest.raises(ValueError, match="'n_epochs' parameter of sample_epochs"):
        sample_epochs(np.ones(3) / 3, 2, 0)



@pytest.mark.parametrize("n", [500, 20_000])
def test_default_scale_selects_near_the_target_at_any_pool_size(n):
    """C=None: each query spreads over about max(2, k/M) rows, so the draws land in the target's
    clusters whatever the pool size (a fixed C spreads them over the pool as N shrinks)."""
    rng = np.random.default_rng(13)
    centers = rng.normal(size=(20, 32))
    x = centers[rng.integers(0, 20, n)] * 0.35 + rng.normal(size=(n, 32)) * 0.2
    y = centers[rng.integers(0, 2, 60)] * 0.35 + rng.normal(size=(60, 32)) * 0.2
    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x, y))
    x, y = x.astype(np.float32), y.astype(np.float32)
    labels = np.argmax(x @ (centers / np.linalg.norm(centers, axis=1, keepdims=True)).T, axis=1)
    k = 100
    sel = TSDSSelector(budget=k)
    chosen = sel.select(x, y, k, seed=0).indices
    assert np.isin(labels[chosen], [0, 1]).mean() >= 0.9  # random would give ~0.1
    assert sel.diagnostics_["mean_neighbourhood"] == pytest.approx(max(2, k / 60), abs=0.5)
    assert not sel.diagnostics_["capped"]


@pytest.mark.parametrize("aim", [2, 5, 12])
def test_auto_scale_gives_the_aimed_mean_neighbourhood(aim):
    rng = np.random.default_rng(aim)
    d = np.sort(rng.uniform(0.5, 1.5, size=(40, 64)), axis=1)
    inv = 1.0 / rng.choice([1.0, 1.0, 2.0, 3.0], size=d.shape)
    c = tsds_mod.auto_scale(d, inv, np.ones(d.shape, bool), aim)
    gamma, _, _ = knn_kde_allocation(d, inv, alpha=0.5, C=c)
    assert (gamma > 0).sum(axis=1).mean() == pytest.approx(aim, abs=1.0)
    # alpha keeps its meaning around that scale: more alignment, narrower; less, wider.
    narrow, _, _ = knn_kde_allocation(d, inv, alpha=0.8, C=c)
    wide, _, _ = knn_kde_allocation(d, inv, alpha=0.2, C=c)
    assert (narrow > 0).sum() < (gamma > 0).sum() < (wide > 0).sum()


def test_lists_grow_until_the_optimum_is_inside_and_warn_at_the_cap(caplog, monkeypatch):
    x = _blobs(3000, seed=14)
    y = _blobs(10, seed=15)
    monkeypatch.setattr(tsds_mod, "_FIRST_WIDTH", 8)
    sel = TSDSSelector(alpha=0.5, C=5.0, sigma=0.0, max_K=3000)
    p = sel.score(x, y)
    width = sel.diagnostics_["width"]
    assert 8 < width < 3000 and not sel.diagnostics_["capped"]
    np.testing.assert_allclose(p, _reference_p(x, y, 0.5, 5.0, 0.0, 3000, 1), atol=1e-12)
    with caplog.at_level(logging.WARNING, logger="hf_otselect.selectors.tsds"):
        capped = TSDSSelector(alpha=0.5, C=5.0, sigma=0.0, max_K=width // 4).score(x, y)
    assert "the optimum still reaches the end of 10 of 10 queries' lists at max_K=" in caplog.text
    assert capped.sum() == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_shards_give_the_one_process_probabilities_and_rows(tmp_path, nproc):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hf_otselect.selectors.base import choose

    from tests.workers import tsds_sharded as worker

    x, y, params = worker.problem()
    one = TSDSSelector(**params).score(x, y)
    np.testing.assert_allclose(one, _reference_p(x, y, params["alpha"], params["C"], params["sigma"], params["max_K"], params["kde_K"]), atol=1e-12)
    out = tmp_path / "out.npz"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).parent / "workers" / "tsds_sharded.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    np.testing.assert_allclose(got["p"], one, rtol=0, atol=1e-12)
    auto = TSDSSelector(**{**params, "C": None, "budget": 50}).score(x, y)
    np.testing.assert_allclose(got["p_auto"], auto, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got["with_replacement"], choose(one, 50, mode="sample", seed=3, replace=True))
    np.testing.assert_array_equal(got["without_replacement"], choose(one, 30, mode="sample", seed=3, replace=False))
    assert (one[got["rows"]] > 0).any() and one[np.setdiff1d(np.arange(len(x)), got["rows"])].sum() == 0


def test_fit_reads_a_memory_mapped_shard_in_blocks(tmp_path, monkeypatch):
    """A fit over a memmap-backed PoolView (small blocks, offset rows) equals the in-memory score."""
    from hf_otselect import dist, knn

    x, y = _blobs(900, seed=16), _blobs(15, seed=17)
    path = tmp_path / "pool.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    monkeypatch.setattr(knn, "BLOCK_BYTES", 64 * 4 * x.shape[1])
    read = []
    view = dist.PoolView(mm)
    real_read = view.read
    view.read = lambda idx: (read.append(len(idx)), real_read(idx))[1]
    sel = TSDSSelector(alpha=0.4, C=2.0, sigma=1.2, max_K=400, kde_K=30)
    state = sel.fit(view, y)
    p = np.concatenate([sel.score_batch(state, rows, idx) for idx, rows in view.blocks()])
    np.testing.assert_array_equal(p, TSDSSelector(alpha=0.4, C=2.0, sigma=1.2, max_K=400, kde_K=30).score(x, y))
    assert read and max(read) <= 16_384  # rows are read by index, a bounded chunk at a time


def _sharded_p(x: np.ndarray, y: np.ndarray, bounds: list[int], **params) -> np.ndarray:
    """Every row's p from a fit over the shards ``x[bounds[r]:bounds[r + 1]]``, one thread per rank."""
    from hf_otselect.dist import PoolView

    from tests._thread_comm import run_ranks

    def rank(comm):
        sel = TSDSSelector(**params)
        view = PoolView.of(x[bounds[comm.rank] : bounds[comm.rank + 1]], comm)
        state = sel.fit(view, y, comm=comm)
        local = np.concatenate([sel.score_batch(state, rows, idx) for idx, rows in view.blocks(7)] or [np.zeros(0)])
        return np.concatenate(comm.all_gather(local))

    return run_ranks(len(bounds) - 1, rank)[0]


@pytest.mark.parametrize("bounds", [[0, 20, 40], [0, 17, 40], [0, 18, 22, 40], [0, 15, 15, 19, 40]])
def test_tied_copies_across_a_shard_boundary_merge_by_global_index(bounds):
    """10 exact copies (rows 15..24) straddle the shard boundaries; a query sits on the copy and its
    list holds max_K = 4 of them. The merged list must be rows 15..18 (ties to the lower *global*
    index), as on one process: a tie broken by the index within a shard takes the next shard's first
    copies instead, and moves probability onto other rows."""
    rng = np.random.default_rng(21)
    x = (3.0 * rng.normal(size=(40, 6))).astype(np.float32)
    copy = rng.normal(size=6).astype(np.float32)
    x[15:25] = copy
    y = np.vstack([copy, 3.0 * rng.normal(size=(2, 6))]).astype(np.float32)
    params = {"alpha": 0.5, "C": 1.0, "sigma": 0.5, "max_K": 4, "kde_K": 4}
    one = TSDSSelector(**params).score(x, y)
    np.testing.assert_allclose(one, _reference_p(x, y, 0.5, 1.0, 0.5, 4, 4), atol=1e-12)
    assert (one[15:19] > 0).all() and one[19:25].sum() == 0  # the planted answer: the first 4 copies
    np.testing.assert_array_equal(_sharded_p(x, y, bounds, **params), one)


@pytest.mark.parametrize("counts", [[5], [4, 0, 5], [0, 3], [2, 7, 1, 0]])
def test_pool_view_offset_is_the_rows_of_the_lower_ranks(counts):
    """PoolView.of / TextView.of place a rank's rows after those of the *lower* ranks (exclusive
    prefix sum): offset 0 on rank 0, and n_global the sum over all ranks."""
    from hf_otselect.dist import PoolView, TextView

    from tests._thread_comm import run_ranks

    def rank(comm):
        rows = np.zeros((counts[comm.rank], 3), dtype=np.float32)
        view, texts = PoolView.of(rows, comm), TextView.of(["t"] * counts[comm.rank], comm)
        first = [int(idx[0]) for idx, _ in view.blocks(2)][:1]
        return view.offset, view.n_global, texts.offset, texts.n_global, first

    expected = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    got = run_ranks(len(counts), rank)
    assert [g[0] for g in got] == expected and [g[2] for g in got] == expected
    assert {g[1] for g in got} == {g[3] for g in got} == {sum(counts)}
    assert [g[4] for g in got] == [[e] if c else [] for e, c in zip(expected, counts)]


def _faiss_index_search(shard, queries, k, kind, nprobe, ahead, ordered=True):
    """The search before the no-copy one: a FAISS index holding a copy of the shard (flat: exact)."""
    rows = np.concatenate([r for _, r in shard.pool.blocks()])
    return tsds_mod.knn.knn_search(queries, rows, k, index=kind, device="cpu", nprobe=nprobe)


def _fixtures():
    rng = np.random.default_rng(21)
    copies = np.vstack([np.repeat(rng.normal(size=(1, 4)), 60, axis=0), 0.01 * rng.normal(size=(40, 4)) + 3.0,
                        5 * rng.normal(size=(300, 4))]).astype(np.float32)
    yield "toy", *_toy(), dict(alpha=0.5, C=5.0, sigma=0.15, kde_K=3)
    yield "blobs", _blobs(900, seed=16), _blobs(15, seed=17), dict(alpha=0.4, C=2.0, sigma=1.2, max_K=400, kde_K=30)
    yield "copies", copies, np.vstack([copies[:1] + 0.05, copies[60:61], 5 * rng.normal(size=(3, 4))]).astype(np.float32), \
        dict(alpha=0.3, sigma=0.5, max_K=300, kde_K=50)
    yield "widening", _blobs(700, seed=3), _blobs(40, seed=4), dict(alpha=0.05, C=1.0, sigma=0.9, kde_K=20)


@pytest.mark.parametrize("name", ["toy", "blobs", "copies", "widening"])
def test_blockwise_search_gives_the_faiss_flat_index_state(monkeypatch, name):
    """Exact search block by block (no copy of the shard, the next round's list fetched ahead)
    leaves every list, density and p as a FAISS flat index over a copy of the shard did."""
    x, y, params = next((x, y, p) for n, x, y, p in _fixtures() if n == name)
    view = tsds_mod.PoolView(x)
    new = TSDSSelector(index="flat", **params).fit(view, y)
    with monkeypatch.context() as mp:
        mp.setattr(tsds_mod._Shard, "_search", _faiss_index_search)
        old = TSDSSelector(index="flat", **params).fit(view, y)
    for field in ("neighbours", "distances", "rows", "probs", "density"):
        np.testing.assert_array_equal(getattr(new, field), getattr(old, field), err_msg=field)
    assert new.level == old.level


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_prefetch_searches_once_per_three_rounds(monkeypatch, index):
    """Widening rounds are answered from an earlier round's look-ahead, not from a new pass."""
    x, y = _blobs(3000, seed=3), _blobs(40, seed=4)
    passes = []
    flat, ivf = tsds_mod.knn.knn_blocks, tsds_mod.knn.RowIVF.search
    monkeypatch.setattr(tsds_mod.knn, "knn_blocks", lambda q, blocks, k: passes.append((len(q), k)) or flat(q, blocks, k))
    monkeypatch.setattr(tsds_mod.knn.RowIVF, "search", lambda self, q, k, nprobe, **kw: passes.append((len(q), k)) or ivf(self, q, k, nprobe, **kw))
    sel = TSDSSelector(alpha=0.002, C=1.0, sigma=0.9, kde_K=20, index=index)
    sel.fit(tsds_mod.PoolView(x), y)
    assert sel.diagnostics_["width"] == 1024  # rounds of 128, 256, 512 and 1024 neighbours
    # Round 1 fetches the lists of rounds 2-3; round 4 those of 5-6, which the 3,000 rows cap.
    ahead = [512 + tsds_mod._margin(512), len(x)]
    assert [k for q, k in passes if q == len(y)] == ahead


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_prefetch_computes_each_exact_distance_once(monkeypatch, index):
    """A wider list starts with the narrower one (the same search, or for flat a wider exact one):
    its pairs keep their exact distances, so over all rounds each query's exact re-ranking costs
    one final list, not the sum of the rounds' lists."""
    x, y = _blobs(3000, seed=3), _blobs(40, seed=4)
    pairs = []
    real = tsds_mod._exact_sq
    monkeypatch.setattr(tsds_mod, "_exact_sq", lambda q, qrow, pool, g: pairs.append(qrow.size if np.array_equal(q, y) else 0) or real(q, qrow, pool, g))
    sel = TSDSSelector(alpha=0.002, C=1.0, sigma=0.9, kde_K=20, index=index)
    state = sel.fit(tsds_mod.PoolView(x), y)
    assert sel.diagnostics_["width"] == 1024  # four rounds: 144, 288, 576 and 1,152 pairs per query
    computed = sum(pairs)
    if index == "flat":
        assert computed == len(y) * (1024 + tsds_mod._margin(1024))
    else:  # round 4 is a new IVF search (wider probes): only its pairs found in place are kept
        assert len(y) * (1024 + tsds_mod._margin(1024)) <= computed < len(y) * (576 + 1152)
    # ... and each kept distance is still its own pair's (float64, from the rows themselves).
    ok = state.neighbours >= 0
    diff = y.astype(np.float64)[:, None] - x.astype(np.float64)[np.maximum(state.neighbours, 0)]
    np.testing.assert_allclose(state.distances[ok], np.sqrt((diff**2).sum(-1))[ok], rtol=1e-12)


@pytest.mark.slow
def test_fit_peak_memory_is_the_shard_without_a_second_copy(tmp_path):
    """Peak RSS growth of a fit over a memmap at N and 4N rows (flat, then IVF under "auto"): the
    shard's pages plus a fixed overhead, not the shard twice as when a FAISS index held a copy."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    dim, rng = 256, np.random.default_rng(5)
    centers = rng.normal(size=(50, dim)).astype(np.float32)
    target = (centers[:20] + 0.3 * rng.normal(size=(20, dim))).astype(np.float32)
    np.save(tmp_path / "target.npy", target)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    growth, shard = {}, {}
    for n in (60_000, 240_000):
        path = tmp_path / f"pool{n}.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        for s in range(0, n, 20_000):  # written in blocks: this process never holds the pool either
            mm[s : s + 20_000] = centers[rng.integers(0, 50, min(20_000, n - s))] + 0.3 * rng.normal(size=(min(20_000, n - s), dim))
        mm.flush()
        del mm
        params = json.dumps({"sigma": 0.5, "max_K": 500, "kde_K": 100})
        proc = subprocess.run([sys.executable, str(repo / "tests" / "workers" / "tsds_memory.py"), str(path), str(tmp_path / "target.npy"), params],
                              capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        growth[n], shard[n] = got["peak_gb"] - got["before_gb"], got["shard_gb"]
        assert got["index"] == ("flat" if n <= tsds_mod.knn.FLAT_MAX_BASE else "ivf")
        path.unlink()
        # The fixed part: one block of rows and of distances, the lists, 8 bytes per row for IVF.
        assert growth[n] <= 1.2 * shard[n] + 0.1, (growth, shard)  # a copy would add another shard
    assert growth[240_000] - growth[60_000] <= 1.2 * (shard[240_000] - shard[60_000]), (growth, shard)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_densities_take_exact_distances_only_of_pairs_within_h(monkeypatch, index):
    """The kernel is zero beyond h: a pair whose search distance is past h^2 (by more than float32
    rounding) gets no float64 distance, and the densities, hence p, are unchanged. (Rows of norm
    ~9 against sigma 0.5: float32 distances are too coarse here, so IVF takes exact ones too.)"""
    rng = np.random.default_rng(30)
    # A spread pool with a tight group in it: a few pairs within h, most far apart.
    x = np.vstack([rng.normal(size=(1500, 8)), 3.0 + 0.05 * rng.normal(size=(60, 8))]).astype(np.float32)
    y = np.vstack([x[1500:1503] + 0.01, rng.normal(size=(12, 8))]).astype(np.float32)
    params = dict(alpha=0.4, C=2.0, sigma=0.5, max_K=400, kde_K=40)
    pairs = []
    real = tsds_mod._exact_sq
    monkeypatch.setattr(tsds_mod, "_exact_sq", lambda q, qrow, pool, g: pairs.append((len(q), qrow.size)) or real(q, qrow, pool, g))
    sel = TSDSSelector(index=index, nprobe=64, density_nprobe=64, **params)  # every IVF list probed: exact
    p = sel.score(x, y)
    np.testing.assert_allclose(p, _reference_p(x, y, **params), atol=1e-12)
    pairs.clear()
    rows = sel.fit(tsds_mod.PoolView(x), y).rows
    sq = ((x[rows].astype(np.float64)[:, None] - x.astype(np.float64)[None]) ** 2).sum(-1)
    within = int((sq < 0.5**2 * 1.01).sum())
    density_pairs = sum(n for q, n in pairs if q != len(y))
    # Within h at most twice (a row whose first lists lie all within h is searched again, wider);
    # every density row's whole first list (32 pairs each) was the cost before.
    assert 0 < density_pairs <= 2 * within < rows.size * tsds_mod._KDE_FIRST, (density_pairs, within, rows.size)


@pytest.mark.parametrize("offset", [0.01, 1.5])
def test_on_a_dense_pool_densities_are_searched_in_one_pass(monkeypatch, offset):
    """A pool as dense near the queries as their first lists show (offset 0.01: most queries' first
    32 neighbours within h) skips the short first pass from the start; otherwise (offset 1.5: the
    queries lie beyond h of every row) the rounds after the first where most rows needed their whole
    kde_K list skip it. The probabilities are those of the two-pass search (the reference, exactly)."""
    rng = np.random.default_rng(31)
    x = (0.05 * rng.normal(size=(900, 4))).astype(np.float32)  # every pair within sigma
    y = x[rng.choice(900, 6, replace=False)] + np.float32(offset)
    params = dict(alpha=0.2, C=0.02, sigma=1.0, max_K=900, kde_K=60)
    calls = _spy_searches(monkeypatch)
    sel = TSDSSelector(**params)
    p = sel.score(x, y)
    np.testing.assert_allclose(p, _reference_p(x, y, **params), atol=1e-12)
    full = params["kde_K"] + tsds_mod._margin(params["kde_K"])
    density = [k for q, k in calls if q != len(y)]
    assert sel.diagnostics_["width"] > tsds_mod._FIRST_WIDTH  # more than one round
    if offset < 1:
        assert set(density) == {full}, density
    else:
        assert density[:2] == [tsds_mod._KDE_FIRST, full] and set(density[2:]) == {full}, density


@pytest.mark.parametrize("world", [1, 2, 3])
def test_densities_in_bounded_chunks_give_the_reference_for_any_split(monkeypatch, world):
    """With room for only a few hundred neighbour slots per density search, the rows go in chunks
    (short lists for most, kde_K for the dense ones, whole chunks at once after a dense round) and
    p is still the brute-force reference, on one process or split over several."""
    from hf_otselect.dist import PoolView

    from ._thread_comm import contiguous_bounds, run_ranks

    rng = np.random.default_rng(12)
    # 300 exact copies of one row, 200 rows in a tiny ball (every pair within sigma), 300 spread.
    x = np.vstack([np.repeat(rng.normal(size=(1, 4)), 300, axis=0), 0.01 * rng.normal(size=(200, 4)) + 3.0,
                   5 * rng.normal(size=(300, 4))]).astype(np.float32)
    y = np.vstack([x[:1] + 0.05, x[300:301] + 0.05, 5 * rng.normal(size=(4, 4))]).astype(np.float32)
    params = dict(alpha=0.3, C=1.0, sigma=0.5, max_K=700, kde_K=50)
    room = 600
    monkeypatch.setattr(tsds_mod, "_DENSITY_ELEMENTS", room)
    widest = []
    real = tsds_mod._Shard.nearest
    monkeypatch.setattr(tsds_mod._Shard, "nearest", lambda self, q, k, **kw: (widest.append(len(q) * k) if len(q) != len(y) else None) or real(self, q, k, **kw))

    def fit(comm):
        lo, hi = contiguous_bounds(len(x), comm.world_size, comm.rank)
        sel = TSDSSelector(index="flat", **params)
        state = sel.fit(PoolView.of(x[lo:hi], comm), y, comm=comm)
        p = np.zeros(len(x))
        p[state.rows] = state.probs
        return p

    p = run_ranks(world, fit)[0] if world > 1 else fit(tsds_mod.LOCAL)
    np.testing.assert_allclose(p, _reference_p(x, y, **params), atol=1e-12)
    full_k = params["kde_K"] + tsds_mod._margin(params["kde_K"])
    assert widest and max(widest) <= room + full_k  # a chunk holds at least one row


@pytest.mark.parametrize("sigma", [0.5, 1e-4])
def test_ivf_densities_take_float32_distances_unless_sigma_is_near_their_resolution(monkeypatch, sigma):
    """Unit rows: at sigma 0.5 an IVF density uses the search's float32 distances (no row read again,
    p within their rounding of the reference); at sigma 1e-4, below float32's resolution of a unit
    row's squared distance (~2e-7), exact ones, so that 40 copies of a row still count 40."""
    rng = np.random.default_rng(33)
    x = rng.normal(size=(1500, 8))
    x[:40] = x[1500 - 1]  # 40 copies of the last row
    x[300:340] = x[299] + 2e-5 * rng.normal(size=(40, 8))  # near copies, within 1e-4 of it
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    y = np.vstack([x[:1], x[299:300], rng.normal(size=(6, 8)) / 3]).astype(np.float32)
    params = dict(alpha=0.4, C=2.0, sigma=sigma, max_K=400, kde_K=60)
    pairs = []
    real = tsds_mod._exact_sq
    monkeypatch.setattr(tsds_mod, "_exact_sq", lambda q, qrow, pool, g: pairs.append((len(q), qrow.size)) or real(q, qrow, pool, g))
    sel = TSDSSelector(index="ivf", nprobe=64, density_nprobe=64, **params)  # every list probed
    state = sel.fit(tsds_mod.PoolView(x), y)
    density_pairs = sum(n for q, n in pairs if q != len(y))
    p = np.zeros(len(x))
    p[state.rows] = state.probs
    reference = _reference_p(x, y, **params)
    if sigma == 0.5:
        assert density_pairs == 0
        bound = 2 * np.finfo(np.float32).eps * 2.0 / sigma**2  # per-neighbour kernel error
        np.testing.assert_allclose(p, reference, rtol=params["kde_K"] * bound, atol=1e-12)
    else:
        copies = np.isin(state.rows, np.arange(40))
        assert copies.any() and np.all(state.density[copies] == 41)  # the 40 copies and the original
        np.testing.assert_allclose(p, reference, atol=1e-12)
        assert density_pairs > 0


def test_ivf_densities_of_a_dense_pool_are_the_reference_within_float32_rounding():
    """Every pair within sigma and kde_K most of the pool: the IVF density search picks each row's
    kde_K values by partition, without row numbers, and sums them unsorted; with every list probed
    that is the reference's density up to the float32 rounding of the distances."""
    rng = np.random.default_rng(35)
    x = (0.05 * rng.normal(size=(900, 4))).astype(np.float32)
    y = x[rng.choice(900, 6, replace=False)] + np.float32(0.01)
    params = dict(alpha=0.2, C=0.02, sigma=1.0, max_K=900, kde_K=500)
    sel = TSDSSelector(index="ivf", nprobe=64, density_nprobe=64, **params)  # every list probed
    state = sel.fit(tsds_mod.PoolView(x), y)
    assert (state.density > 400).all()  # kde_K rows counted, nearly all within h
    ref = np.maximum(0.0, 1.0 - np.sort(((x[state.rows, None].astype(np.float64) - x[None]) ** 2).sum(-1), axis=1)[:, :500])
    big = 2 * float((x.astype(np.float64) ** 2).sum(1).max())
    np.testing.assert_allclose(state.density, ref.sum(1), rtol=500 * 2 * np.finfo(np.float32).eps * big / 1.0)
    p = np.zeros(len(x))
    p[state.rows] = state.probs
    np.testing.assert_allclose(p, _reference_p(x, y, **params), rtol=1e-4, atol=1e-9)


def test_row_order_is_lexsort_by_key_then_index_with_padding_last():
    """The lists' order (by distance, ties to the lower index, padding last) equals np.lexsort's,
    on rows with planted ties in and out of index order, padding, and rows with no tie at all."""
    rng = np.random.default_rng(36)
    key = np.round(rng.random((50, 40)), 1)  # one decimal: many exact ties
    key[::7] = rng.random((8, 40))  # some rows without ties
    idx = np.stack([rng.permutation(1000)[:40] for _ in range(50)]).astype(np.int64)
    key[:, -5:], idx[:, -5:] = np.inf, -1  # padding
    big = np.iinfo(np.int64).max
    want = np.lexsort((np.where(idx >= 0, idx, big), key), axis=1)
    np.testing.assert_array_equal(tsds_mod._row_order(key, idx), want)


def test_distinct_rows_groups_bit_identical_rows_and_survives_a_hash_collision(monkeypatch):
    rng = np.random.default_rng(34)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    x[100:150] = x[7]
    x[300, 0], x[301, 0] = 0.0, -0.0  # equal as numbers, different bits: two groups
    x[301, 1:] = x[300, 1:]
    first, inverse = tsds_mod._distinct_rows(x)
    _, ref_first, ref_inverse = np.unique(x.view(np.dtype((np.void, 24))).ravel(), return_index=True, return_inverse=True)
    assert len(first) == len(ref_first) == 500 - 50
    np.testing.assert_array_equal(x[first][inverse].view(np.uint32), x.view(np.uint32))
    np.testing.assert_array_equal(inverse[:, None] == inverse[None], ref_inverse.ravel()[:, None] == ref_inverse.ravel()[None])
    assert set(first) == set(ref_first)  # the first row of each group

    class AllOnes:  # every multiplier 1: the hash is the sum of the words, so (1, 2) and (2, 1) collide
        def integers(self, low, high, size, dtype):
            return np.zeros(size, dtype=dtype)

    monkeypatch.setattr(tsds_mod.np.random, "default_rng", lambda seed: AllOnes())
    y = np.array([[1, 2], [2, 1], [1, 2]], dtype=np.uint32).view(np.float32)
    first, inverse = tsds_mod._distinct_rows(y)
    assert len(first) == 2 and inverse[0] == inverse[2] != inverse[1]
