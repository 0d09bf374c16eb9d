"""The OT distance of a selection: one Sinkhorn solve sharded over each process's own chosen rows."""

from __future__ import annotations

import numpy as np
import pytest

from hf_otselect.dist import LOCAL
from hf_otselect.job import selection_ot_distance
from hf_otselect.ot import ot_distance

from ._thread_comm import contiguous_bounds, run_ranks


def _data(n: int = 240, m: int = 30, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(n, d))
    target = rng.normal(size=(m, d)) + 0.5
    unit = [(v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for v in (pool, target)]  # as embeddings are
    return unit[0], unit[1]


def _split(world: int, pool: np.ndarray, indices: np.ndarray, target: np.ndarray) -> list[tuple[float, int]]:
    def part(comm):
        lo, hi = contiguous_bounds(len(pool), world, comm.rank)
        shapes = []
        gather = comm.all_gather
        comm.all_gather = lambda x: shapes.append(np.shape(x)) or gather(x)
        value = selection_ot_distance(pool[lo:hi], lo, indices, target, comm)
        return value, shapes

    return run_ranks(world, part)


@pytest.mark.parametrize("spread", ["everywhere", "first_rank_only"])
def test_the_sharded_value_is_the_gathered_one(spread):
    """One process: exactly ``ot_distance`` of the chosen rows; 2 and 3 ranks (one of them with no
    chosen row at all in the second case): the same value to 1e-6 relative, far inside the solver's
    tolerance, with no vector sent (per-target sums only: a few hundred bytes per iteration)."""
    pool, target = _data()
    rng = np.random.default_rng(1)
    indices = rng.permutation(240)[:25] if spread == "everywhere" else rng.permutation(70)[:25]
    expected = ot_distance(pool[np.unique(indices)], target)
    assert selection_ot_distance(pool, 0, indices, target, LOCAL) == expected
    for world in (2, 3):
        ranks = _split(world, pool, indices, target)
        assert all(v == ranks[0][0] for v, _ in ranks)  # the same figure on every process
        assert ranks[0][0] == pytest.approx(expected, rel=1e-6)
        # the old way all-gathered every process's chosen vectors; now only counts are gathered
        assert all(len(shape) < 2 for _, shapes in ranks for shape in shapes) and expected > 0


def test_a_row_drawn_twice_weighs_twice():
    pool, target = _data()
    indices = np.array([3, 3, 3, 150, 200, 7, 7, 90])
    rows, draws = np.unique(indices, return_counts=True)
    expected = ot_distance(pool[rows], target, a=draws.astype(np.float64))
    assert expected != pytest.approx(ot_distance(pool[rows], target), rel=1e-3)  # the weights matter here
    assert selection_ot_distance(pool, 0, indices, target, LOCAL) == pytest.approx(expected, rel=1e-12)
    for world in (2, 3):
        assert _split(world, pool, indices, target)[0][0] == pytest.approx(expected, rel=1e-6)
