"""One contract, run over every registered selector (new ones are picked up automatically).

Vector selectors get small clustered embeddings; text selectors (``needs_text``) get real texts
from the bundled sample data. Each must: return one finite float64 score per candidate; be
deterministic under a seed; be equivariant to candidate order (permuting the candidates permutes
the scores); select k = 1 and k = n (or k up to the sampling support); and refuse k = 0, k > n,
NaN or non-text inputs and a dimension mismatch up front with the shared message template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hf_otselect.selectors as selectors
from hf_otselect.selectors import available_selectors, get_selector

N, M, DIM = 48, 12, 8
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def _texts(name: str, n: int) -> list[str]:
    with (SAMPLE / name).open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(n), fh)]


def _inputs(sel, seed: int = 0):
    if sel.needs_text:
        return _texts("pool.jsonl", N), _texts("target.jsonl", M)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, DIM)) * 2
    x = centres[rng.integers(0, 4, N)] + rng.normal(size=(N, DIM))
    y = centres[rng.integers(0, 2, M)] + rng.normal(size=(M, DIM))
    return x.astype(np.float32), y.astype(np.float32)


def _permute(cands, perm):
    return [cands[i] for i in perm] if isinstance(cands, list) else cands[perm]


def _replaces(sel) -> bool:
    return sel.choice == "sample" and bool(getattr(sel, "replace", False))


def _support(sel, scores: np.ndarray) -> int:
    # -inf: a row the selector never chooses (DSIR's rows without a token)
    return int((scores > 0).sum()) if sel.choice == "sample" else int(np.isfinite(scores).sum())


def test_the_built_in_selectors_are_registered():
    assert {"random", "similarity", "dsir"} <= set(available_selectors())
    assert all(hasattr(selectors, n) for n in selectors.__all__)


@pytest.fixture(params=available_selectors())
def sel(request):
    return get_selector(request.param)


def test_scores_have_one_finite_float64_per_candidate(sel):
    cands, target = _inputs(sel)
    scores = sel.score(cands, target)
    assert isinstance(scores, np.ndarray) and scores.shape == (N,) and scores.dtype == np.float64
    # finite, or -inf for a row the selector never chooses (DSIR's rows without a token)
    assert (np.isfinite(scores) | (scores == -np.inf)).all() and np.isfinite(scores).sum() >= N // 4
    if sel.choice == "sample":
        assert np.isfinite(scores).all()
    if sel.choice == "sample":
        assert (scores >= 0).all() and scores.sum() > 0


def test_deterministic_under_a_seed(sel):
    cands, target = _inputs(sel)
    a = sel.select(cands, target, 10, seed=7)
    b = get_selector(sel.name).select(cands, target, 10, seed=7)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_permuting_candidates_permutes_the_scores(sel):
    cands, target = _inputs(sel)
    perm = np.random.default_rng(1).permutation(N)
    base = sel.score(cands, target)
    moved = sel.score(_permute(cands, perm), target)
    if sel.choice == "sample":  # read as probabilities
        base, moved = base / base.sum(), moved / moved.sum()
    scale = max(1.0, float(np.abs(base[np.isfinite(base)]).max()))
    np.testing.assert_allclose(moved, base[perm], rtol=1e-4, atol=1e-5 * scale)


def test_k_one_and_k_all(sel):
    cands, target = _inputs(sel)
    one = sel.select(cands, target, 1, seed=0)
    assert one.indices.shape == (1,) and one.indices.dtype == np.int64 and 0 <= one.indices[0] < N
    k_all = N if _replaces(sel) else _support(sel, one.scores)
    res = sel.select(cands, target, k_all, seed=0)
    assert res.indices.shape == (k_all,) and res.indices.min() >= 0 and res.indices.max() < N
    if not _replaces(sel):
        assert len(set(res.indices.tolist())) == k_all
    if sel.choice == "top_k" and not getattr(sel, "resample", False):
        # Top-k follows the scores: best first, ties by index.
        np.testing.assert_array_equal(res.indices, np.lexsort((np.arange(N), -res.scores))[:k_all])
    if k_all == N and not _replaces(sel):
        assert sorted(res.indices.tolist()) == list(range(N))


def test_bad_k_is_refused_with_the_shared_template(sel):
    cands, target = _inputs(sel)
    with pytest.raises(ValueError, match=r"The 'k' parameter of .* must be an int in \[1, "):
        sel.select(cands, target, 0)
    with pytest.raises(TypeError, match="The 'k' parameter"):
        sel.select(cands, target, 2.0)
    if not _replaces(sel):
        with pytest.raises(ValueError, match="The 'k' parameter"):
            sel.select(cands, target, N + 1)


def test_bad_inputs_are_refused(sel):
    cands, target = _inputs(sel)
    if sel.needs_text:
        with pytest.raises(TypeError, match="The 'candidates' parameter"):
            sel.score(cands[:-1] + [None], target)
        with pytest.raises(TypeError, match="The 'target' parameter"):
            sel.score(cands, [1.5] + target)
        with pytest.raises(ValueError, match="The 'target' parameter"):
            sel.score(cands, [])
        return
    bad = cands.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="The 'candidates' parameter .* finite"):
        sel.score(bad, target)
    bad = target.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="The 'target' parameter .* finite"):
        sel.score(cands, bad)
    with pytest.raises(ValueError, match="The 'target' parameter .* columns"):
        sel.score(cands, target[:, :-1])
    with pytest.raises(ValueError, match="The 'candidates' parameter"):
        sel.score(cands[0], target)
