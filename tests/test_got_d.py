"""GOT-D selector: paper formula, planted distribution shift, negative target, invariants."""

from __future__ import annotations

import numpy as np
import pytest

from hf_otselect.dist import PoolView
from hf_otselect.selectors.base import get_selector
from hf_otselect.selectors.got_d import GOTDSelector, calibrated_gradient

pytest.importorskip("torch")


def _unit(v):
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _blob(rng, center, n, spread=0.15):
    return _unit(center + spread * rng.normal(size=(n, len(center))))


def _planted(seed=0):
    """Pool: region A dense (400), region B thin (40). Target: A and B equally (60 + 60)."""
    rng = np.random.default_rng(seed)
    d = 16
    ca, cb = np.eye(d)[0], np.eye(d)[1]
    pool = np.concatenate([_blob(rng, ca, 400), _blob(rng, cb, 40)])
    region = np.array([0] * 400 + [1] * 40)
    target = np.concatenate([_blob(rng, ca, 60), _blob(rng, cb, 60)])
    return pool, region, target


def test_calibrated_gradient_matches_paper_formula():
    f = np.random.default_rng(0).normal(size=7)
    direct = np.array([f[j] - np.delete(f, j).sum() / 6 for j in range(7)])
    np.testing.assert_allclose(calibrated_gradient(f), direct)
    assert calibrated_gradient(np.array([3.0])).tolist() == [0.0]


def _pot_scores(pool, target, eps):
    """Independent GOT-D scores: POT's float64 log-domain duals, then Kang et al. Eq. 3 written out."""
    ot = pytest.importorskip("ot")
    x, y = pool.astype(np.float64), target.astype(np.float64)
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    _, log = ot.sinkhorn(a, b, ot.dist(x, y), eps, method="sinkhorn_log", log=True, stopThr=1e-12, numItermax=100000)
    f = eps * log["log_u"]  # the candidate potential up to a constant, which Eq. 3 cancels
    n = len(f)
    grad = np.array([f[j] - (f.sum() - f[j]) / (n - 1) for j in range(n)])
    return -grad


def test_scores_equal_pot_potentials_through_eq3():
    pool, _, target = _planted()
    sel = GOTDSelector(tol=1e-8)
    s = sel.score(pool, target)
    assert s.shape == (len(pool),) and s.dtype == np.float64 and np.isfinite(s).all()
    np.testing.assert_allclose(s, _pot_scores(pool, target, 0.1), atol=2e-5 * np.abs(s).max())
    assert sel.target_potentials_.shape == (len(target),)
    d = sel.diagnostics_
    assert {"ot_distance", "n_iter", "converged", "eps", "backend", "marginal_error", "processes"} <= set(d)
    assert d["converged"] and d["ot_distance"] > 0 and d["eps"] == 0.1 and d["processes"] == 1


def test_scores_equal_the_in_memory_solver_at_default_tolerance():
    """score() = fit + score_batch gives what Eq. 3 on sinkhorn_potentials' f gives (1e-6 relative)."""
    from hf_otselect.ot import sinkhorn_potentials

    pool, _, target = _planted()
    for backend in ("tensorized", "blocked"):
        res = sinkhorn_potentials(pool, target, 0.1, backend=backend)
        f = res.f
        ref = -(f - (f.sum() - f) / (len(f) - 1))
        s = GOTDSelector(backend=backend).score(pool, target)
        np.testing.assert_allclose(s, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_planted_shift_got_d_picks_thin_region_similarity_does_not():
    """Kang et al.'s central claim: GOT-D fills what the pool lacks relative to the target."""
    pool, region, target = _planted()
    k = 30
    got = GOTDSelector().select(pool, target, k).indices
    # Plain similarity top-k: highest mean cosine similarity to the target examples.
    sim = pool @ target.T
    top_sim = np.lexsort((np.arange(len(pool)), -sim.mean(1)))[:k]
    assert (region[got[:20]] == 1).mean() >= 0.9  # first picks from the thin region B
    assert 0.3 <= (region[top_sim] == 0).mean()  # similarity takes A at least as a third
    assert (region[got] == 1).mean() > (region[top_sim] == 1).mean() + 0.3


def test_negative_target_pushes_away_from_toxic_cluster():
    rng = np.random.default_rng(1)
    d = 16
    clean_c, toxic_c = np.eye(d)[0], 0.8 * np.eye(d)[0] + 0.6 * np.eye(d)[1]
    pool = np.concatenate([_blob(rng, clean_c, 150, 0.3), _blob(rng, toxic_c, 150, 0.3)])
    toxic = np.array([0] * 150 + [1] * 150)
    target = _blob(rng, 0.9 * clean_c + 0.45 * np.eye(d)[1], 80, 0.3)  # between both, nearer toxic
    negative = _blob(rng, toxic_c, 80, 0.3)
    k = 50
    plain = GOTDSelector().select(pool, target, k)
    pushed_sel = GOTDSelector(negative_target=negative, negative_weight=1.0)
    pushed = pushed_sel.select(pool, target, k)
    assert (toxic[plain.indices] == 1).mean() >= 0.5
    assert (toxic[pushed.indices] == 1).mean() <= (toxic[plain.indices] == 1).mean() - 0.3
    assert "negative_ot_distance" in pushed.info and pushed.info["negative_converged"]
    # the combination is target score - weight * negative score, each from POT + Eq. 3
    combined = GOTDSelector(negative_target=negative, negative_weight=0.5, tol=1e-8).score(pool, target)
    ref = _pot_scores(pool, target, 0.1) - 0.5 * _pot_scores(pool, negative, 0.1)
    np.testing.assert_allclose(combined, ref, atol=2e-5 * np.abs(ref).max())


def test_same_seed_same_result_and_permutation_equivariance():
    pool, _, target = _planted()
    a = GOTDSelector().select(pool, target, 25)
    b = GOTDSelector().select(pool, target, 25)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)
    perm = np.random.default_rng(5).permutation(len(pool))
    sp = GOTDSelector().score(pool[perm], target)
    np.testing.assert_allclose(sp, a.scores[perm], atol=1e-5)
    c1 = GOTDSelector(chunk_size=100, seed=3).select(pool, target, 25)
    c2 = GOTDSelector(chunk_size=100, seed=3).select(pool, target, 25)
    np.testing.assert_array_equal(c1.indices, c2.indices)


def test_chunked_mode_close_to_global_on_planted_data():
    pool, region, target = _planted()
    k = 30
    glob = set(GOTDSelector().select(pool, target, k).indices.tolist())
    sel = GOTDSelector(chunk_size=150, seed=0)
    res = sel.select(pool, target, k)
    assert res.info["n_chunks"] == 3
    assert len(glob & set(res.indices.tolist())) / k >= 0.7
    assert (region[res.indices] == 1).mean() >= 0.8


def test_relative_eps_and_backends_give_same_ranking():
    pool, _, target = _planted()
    s_t = GOTDSelector(backend="tensorized", tol=1e-6).score(pool, target)
    s_b = GOTDSelector(backend="blocked", tol=1e-6).score(pool, target)
    np.testing.assert_allclose(s_t, s_b, atol=1e-4)
    sel = GOTDSelector(eps=0.05, eps_mode="relative")
    sel.score(pool, target)
    mean_cost = ((pool[:, None, :] - target[None]) ** 2).sum(-1).mean()
    assert sel.diagnostics_["eps"] == pytest.approx(0.05 * mean_cost, rel=1e-4)


def test_registry_and_params():
    sel = get_selector("got_d", eps=0.2)
    assert isinstance(sel, GOTDSelector) and sel.get_params()["eps"] == 0.2


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"eps": -1.0}, ValueError, "'eps' parameter of GOTDSelector"),
        ({"eps_mode": "mean"}, ValueError, "'eps_mode' parameter"),
        ({"backend": "gpu"}, ValueError, "'backend' parameter"),
        ({"negative_weight": -1.0}, ValueError, "'negative_weight' parameter"),
        ({"chunk_size": 1}, ValueError, "'chunk_size' parameter"),
        ({"negative_target": np.ones((3, 5))}, ValueError, "'negative_target' parameter"),
    ],
)
def test_bad_parameters_raise_before_work(kwargs, exc, match):
    pool, _, target = _planted()
    with pytest.raises(exc, match=match):
        GOTDSelector(**kwargs).score(pool, target)


def test_bad_inputs():
    pool, _, target = _planted()
    with pytest.raises(ValueError, match="'target' parameter"):
        GOTDSelector().score(pool, target[:, :5])
    bad = pool.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        GOTDSelector().score(bad, target)


# --- sharded fit ------------------------------------------------------------------------------

def _sharded_scores(sel, pool, target, world):
    """fit on ``world`` thread ranks, score_batch per rank, choose top-k across ranks."""
    from ._thread_comm import run_ranks, shard

    def rank(comm):
        view = shard(pool, comm)
        state = sel.fit(view, target, comm=comm)
        parts = [(idx, sel.score_batch(state, rows, idx)) for idx, rows in view.blocks(37)]
        idx = np.concatenate([p[0] for p in parts])
        sc = np.concatenate([p[1] for p in parts])
        return state, idx, sc, sel.choose_rows(sc, 25, index=idx, comm=comm)

    out = run_ranks(world, rank)
    scores = np.empty(len(pool))
    for _, idx, sc, _ in out:
        scores[idx] = sc
    return out, scores


@pytest.mark.parametrize("world", [2, 3])
def test_two_and_three_ranks_score_and_choose_as_one_process(world):
    pool, _, target = _planted()
    rng = np.random.default_rng(7)
    negative = _blob(rng, np.eye(16)[2], 30)
    sel = GOTDSelector(negative_target=negative, negative_weight=0.3)
    one = sel.select(pool, target, 25)
    out, scores = _sharded_scores(GOTDSelector(negative_target=negative, negative_weight=0.3), pool, target, world)
    np.testing.assert_allclose(scores, one.scores, rtol=0, atol=1e-6 * np.abs(one.scores).max())
    for state, _, _, chosen in out:
        np.testing.assert_array_equal(chosen, one.indices)
        np.testing.assert_allclose(state.target.results[0].g_f, out[0][0].target.results[0].g_f, rtol=0, atol=0)
        assert state.target.results[0].f_local is None  # nothing of size n in the state


def test_chunk_size_is_refused_in_a_multi_process_fit():
    from ._thread_comm import run_ranks

    pool, _, target = _planted()
    with pytest.raises(ValueError, match=r"The 'chunk_size' parameter of GOTDSelector.fit must be None in a multi-process run"):
        run_ranks(2, lambda comm: GOTDSelector(chunk_size=100).fit(PoolView.of(pool[comm.rank::2], comm), target, comm=comm))


def test_chunked_scores_are_each_chunks_own_eq3():
    """Chunked mode: each row's score is Eq. 3 within its chunk (same permutation as documented)."""
    pool, _, target = _planted()
    sel = GOTDSelector(chunk_size=150, seed=4, tol=1e-8)
    s = sel.score(pool, target)
    perm = np.random.default_rng(4).permutation(len(pool))
    for chunk in np.array_split(perm, 3):
        np.testing.assert_allclose(s[chunk], _pot_scores(pool[chunk], target, 0.1), atol=2e-5 * np.abs(s).max())


# --- numbers at any scale (issue 13) ------------------------------------------------------------

@pytest.mark.parametrize("magnitude", [1e20, 1e-21])
def test_huge_and_tiny_vectors_rank_as_at_unit_scale_with_relative_eps(magnitude):
    pool, _, target = _planted()
    unit = GOTDSelector(eps=0.05, eps_mode="relative")
    ref = unit.select(pool, target, 30)
    sel = GOTDSelector(eps=0.05, eps_mode="relative")
    got = sel.select(pool * np.float32(magnitude), target * np.float32(magnitude), 30)
    assert np.isfinite(got.scores).all()
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.scores / magnitude**2, ref.scores, rtol=0, atol=1e-4 * np.abs(ref.scores).max())


@pytest.mark.parametrize("magnitude, eps", [(1e18, 0.1), (1e-18, 0.1), (1.0, 1e-12), (1.0, 1e9)])
def test_eps_out_of_scale_is_refused_naming_eps_and_the_range(magnitude, eps):
    pool, _, target = _planted()
    with pytest.raises(ValueError, match=r"^The 'eps' parameter of GOTDSelector must be a float in \[.+\] for these candidates "
                       r"and target \(1e-08 to 1000 times their mean squared distance .+eps_mode='relative'\)\. Got"):
        GOTDSelector(eps=eps).select(pool * np.float32(magnitude), target * np.float32(magnitude), 10)


def test_a_pool_far_from_the_origin_ranks_as_the_centred_one():
    pool, _, target = _planted()
    ref = GOTDSelector().select(pool, target, 30)
    shift = np.float32(1e4) * np.ones(pool.shape[1], np.float32)
    got = GOTDSelector().select(pool + shift, target + shift, 30)
    assert len(set(got.indices.tolist()) & set(ref.indices.tolist())) >= 28  # float32 rows lose digits at 1e4


# --- a real torchrun job (gloo, CPU) ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_ranks_give_the_one_process_scores_and_rows(nproc, tmp_path):
    import importlib.util
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists() or importlib.util.find_spec("accelerate") is None:
        pytest.skip("torchrun/accelerate not installed")
    repo = Path(__file__).resolve().parents[1]
    worker = repo / "tests" / "workers" / "got_d_sharded.py"
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), str(worker), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world_size"] == nproc

    import importlib.machinery

    spec = importlib.util.spec_from_file_location("got_d_sharded_worker", worker)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pool, target, negative = mod.data(440)
    sel = GOTDSelector(negative_target=negative, negative_weight=0.3)
    one = sel.select(pool, target, 25)
    state = sel.fit(PoolView(pool), target)
    np.testing.assert_allclose(got["g_f"], state.target.results[0].g_f, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["negative_g_f"], state.negative.results[0].g_f, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["scores"], one.scores, rtol=0, atol=1e-6 * np.abs(one.scores).max())
    assert got["chosen"] == one.indices.tolist()
    # communication of a fit does not grow with N: 4x the rows, the same bytes (5 iterations)
    assert got["bytes_1000"] == got["bytes_4000"] > 0


def test_warm_starts_score_as_the_cold_fit_in_fewer_passes():
    """eps-scaling and a sample fit's g (fit_selector(sample=...)) seed the no-kernel fit: same
    scores within the solver's tolerance, fewer counted passes."""
    from hf_otselect.fitted import fit_selector

    pool, _, target = _planted()
    kw = dict(eps=0.01, backend="blocked", tol=1e-3)
    cold = GOTDSelector(**kw)
    s_cold = cold.score(pool, target)
    sample = fit_selector(pool, target, sample=0.5, **kw)
    g = sample.state.target.results[0].g
    assert "init_g" not in sample.params  # a fit-time start is not a parameter of the kept fit
    for warm in ({"eps_scaling": 4}, {"init_g": g}):
        sel = GOTDSelector(**kw, **warm)
        s = sel.score(pool, target)
        assert sel.diagnostics_["converged"]
        np.testing.assert_allclose(s, s_cold, atol=5e-3)  # 1e-3 marginal error at eps 0.01: scores ~1e-2 apart
        top = set(np.argsort(-s)[:40].tolist())
        assert len(top & set(np.argsort(-s_cold)[:40].tolist())) >= 38
    seeded = GOTDSelector(**kw, init_g=g)
    seeded.score(pool, target)
    assert seeded.diagnostics_["n_iter"] < cold.diagnostics_["n_iter"]


@pytest.mark.parametrize("init_g, got", [(np.zeros(119), "an array of shape (119,)"), (np.full(120, np.nan), "120 NaN or Inf value(s)")])
def test_a_bad_init_g_is_refused_naming_the_selector(init_g, got):
    pool, _, target = _planted()
    msg = ("The 'init_g' parameter of GOTDSelector must be None or a finite float array of shape (120,) (target potentials, "
           f"e.g. a sample fit's g). Got '{got}' instead.")
    with pytest.raises(ValueError) as err:
        GOTDSelector(init_g=init_g).score(pool, target)
    assert str(err.value) == msg
    with pytest.raises(ValueError, match=r"^The 'eps_scaling' parameter of GOTDSelector must be an int in \[0, 64\]"):
        GOTDSelector(eps_scaling=65).score(pool, target)


def test_over_relaxation_scores_as_plain_sinkhorn_in_fewer_passes():
    """An over-relaxed no-kernel solve (relaxation=1.4) gives plain Sinkhorn's scores (the default,
    relaxation=1.0) within the solver's tolerance, in fewer counted passes."""
    pool, _, target = _planted()
    kw = dict(eps=0.01, backend="blocked", tol=1e-3)
    relaxed, plain = GOTDSelector(**kw, relaxation=1.4), GOTDSelector(**kw)
    assert plain.relaxation == 1.0
    s, s_plain = relaxed.score(pool, target), plain.score(pool, target)
    assert relaxed.diagnostics_["converged"] and plain.diagnostics_["converged"]
    np.testing.assert_allclose(s, s_plain, atol=5e-3)  # 1e-3 marginal error at eps 0.01: scores ~1e-2 apart
    top = set(np.argsort(-s)[:40].tolist())
    assert len(top & set(np.argsort(-s_plain)[:40].tolist())) >= 38
    assert relaxed.diagnostics_["n_iter"] < plain.diagnostics_["n_iter"]


@pytest.mark.parametrize("relaxation, exc, got", [(2.0, ValueError, "2.0"), (0.5, ValueError, "0.5"), (None, TypeError, "None")])
def test_a_bad_relaxation_is_refused_naming_the_selector(relaxation, exc, got):
    pool, _, target = _planted()
    with pytest.raises(exc) as err:
        GOTDSelector(relaxation=relaxation).score(pool, target)
    assert str(err.value) == f"The 'relaxation' parameter of GOTDSelector must be a float in [1.0, 2.0). Got {got} instead."
