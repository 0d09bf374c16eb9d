"""Property-based tests (hypothesis) of every registered vector selector and of ``choose``.

Clouds hold exact duplicate rows (in the pool, and between pool and target) in most examples. For every example: one finite float64 score per
candidate; permuting the candidates permutes the scores; a selection has exactly ``k`` rows, all
in range, and distinct when drawn without replacement; the same seed gives the same rows.

Identical candidates are indistinguishable, so for the sampling selectors (TSDS) only the mass of
each group of identical rows is pinned under permutation; how a group's mass splits among its
copies is the implementation's free choice.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hf_otselect.selectors import available_selectors, choose, get_selector

VECTOR_SELECTORS = [m for m in available_selectors() if not get_selector(m).needs_text]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def clouds(draw):
    """(candidates (n, d), target (m, d), a permutation of range(n)), with duplicate rows.

    Distinct points are Gaussian (drawn from a hypothesis-chosen seed), so distances between
    distinct points do not tie; duplicates are exact copies: rows of the pool picked with
    repetition from a few distinct points, and target rows that may copy pool rows.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    d = draw(st.integers(1, 4))
    n_distinct = draw(st.integers(1, 8))
    base = rng.normal(size=(n_distinct, d))
    picks = draw(st.lists(st.integers(0, n_distinct - 1), min_size=2, max_size=14))
    x = base[picks].astype(np.float32)
    m = draw(st.integers(1, 6))
    y = rng.normal(size=(m, d))
    copies = draw(st.lists(st.integers(0, len(picks) - 1), max_size=m))
    for j, i in enumerate(copies):
        y[j] = x[i]
    perm = np.array(draw(st.permutations(range(len(picks)))), dtype=np.int64)
    return x, y.astype(np.float32), perm


def _score(sel, x, y) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Sinkhorn non-convergence warnings on tiny grids
        return sel.score(x, y)


def _groups(x: np.ndarray) -> np.ndarray:
    """Group label of each row: identical rows share one."""
    _, inverse = np.unique(x, axis=0, return_inverse=True)
    return inverse.ravel()


@pytest.mark.parametrize("method", VECTOR_SELECTORS)
@SETTINGS
@given(data=clouds())
def test_scores_are_finite_and_permutation_equivariant(method, data):
    x, y, perm = data
    sel = get_selector(method)
    base = _score(sel, x, y)
    assert base.shape == (len(x),) and base.dtype == np.float64 and np.isfinite(base).all()
    moved = _score(get_selector(method), x[perm], y)
    assert np.isfinite(moved).all()
    scale = max(1.0, float(np.abs(base).max()))
    if sel.choice == "sample":
        assert (base >= 0).all() and base.sum() > 0
        base, moved = base / base.sum(), moved / moved.sum()
        # the mass of every group of identical candidates is fixed; its split is free
        groups = _groups(x)
        n_groups = groups.max() + 1
        np.testing.assert_allclose(
            np.bincount(groups[perm], weights=moved, minlength=n_groups),
            np.bincount(groups, weights=base, minlength=n_groups),
            rtol=1e-4, atol=1e-6,
        )
    else:
        np.testing.assert_allclose(moved, base[perm], rtol=1e-4, atol=1e-5 * scale)
        # identical candidates score alike
        for g in np.unique(_groups(x)):
            rows = base[_groups(x) == g]
            np.testing.assert_allclose(rows, rows[0], rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("method", VECTOR_SELECTORS)
@SETTINGS
@given(data=clouds(), k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_selections_have_exactly_k_rows_in_range(method, data, k_frac, seed):
    x, y, _ = data
    sel = get_selector(method)
    scores = _score(sel, x, y)
    support = int((scores > 0).sum()) if sel.choice == "sample" else len(x)
    limit = len(x) if sel.replaces else support
    k = 1 + int(k_frac * (limit - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sel.select(x, y, k, seed=seed)
        again = get_selector(method).select(x, y, k, seed=seed)
    assert res.indices.shape == (k,) and res.indices.dtype == np.int64
    assert res.indices.min() >= 0 and res.indices.max() < len(x)
    if not sel.replaces:
        assert len(np.unique(res.indices)) == k
    np.testing.assert_array_equal(res.indices, again.indices)


@SETTINGS
@given(
    scores=hnp.arrays(np.float64, st.integers(1, 30), elements=st.integers(0, 4).map(float)),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_choose_top_k_is_the_stable_order_and_sampling_stays_in_the_support(scores, k_frac, seed):
    n = scores.size
    k = 1 + int(k_frac * (n - 1))
    top = choose(scores, k, mode="top_k")
    # reference: Python's sort is stable, so ties keep the lower index first
    expected = sorted(range(n), key=lambda i: -scores[i])[:k]
    assert top.tolist() == expected
    support = int((scores > 0).sum())
    if support:
        ks = min(k, support)
        drawn = choose(scores, ks, mode="sample", seed=seed)
        assert len(set(drawn.tolist())) == ks and (scores[drawn] > 0).all()
        np.testing.assert_array_equal(drawn, choose(scores, ks, mode="sample", seed=seed))
        with_rep = choose(scores, n + 3, mode="sample", seed=seed, replace=True)
        assert with_rep.shape == (n + 3,) and (scores[with_rep] > 0).all()
