"""GOT-D selector: paper formula, planted distribution shift, negative target, invariants."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_score_is_negated_calibrated_gradient_of_potentials():
    pool, _, target = _planted()
    sel = GOTDSelector()
    s = sel.score(pool, target)
    assert s.shape == (len(pool),) and s.dtype == np.float64 and np.isfinite(s).all()
    np.testing.assert_allclose(s, -calibrated_gradient(sel.potentials_))
    assert sel.target_potentials_.shape == (len(target),)
    d = sel.diagnostics_
    assert {"ot_distance", "n_iter", "converged", "eps", "backend", "marginal_error"} <= set(d)
    assert d["converged"] and d["ot_distance"] > 0 and d["eps"] == 0.1


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
    assert pushed_sel.negative_potentials_.shape == (len(pool),)
    assert "negative_ot_distance" in pushed.info
    # the combination is exactly target score - weight * negative score
    t = GOTDSelector().score(pool, target)
    n = GOTDSelector().score(pool, negative)
    np.testing.assert_allclose(GOTDSelector(negative_target=negative, negative_weight=0.5).score(pool, target), t - 0.5 * n)


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
