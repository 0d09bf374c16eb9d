"""The choosing stage keeps each process's own top-k rows without gathering scores.

A byte counter around the in-process comm measures what each process *receives* in the choose
step: the same at N and 4N (16 x P counts per round, a fixed number of rounds), while the rows
kept are exactly a full stable sort's first k (descending key, ties to the lower global index).
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_otselect.selectors import get_selector
from hf_otselect.selectors.base import descending_order, order_chosen
from hf_otselect.stages.choosing import keep_top_k
from tests._thread_comm import ThreadComm, _Hub, contiguous_bounds, run_ranks


class CountingComm(ThreadComm):
    """ThreadComm that counts the bytes this rank receives from the others (all-reduce, gather, broadcast)."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        super().__init__(hub, rank)
        self.bytes_received = 0

    def _exchange(self, x):
        values = super()._exchange(x)
        self.bytes_received += sum(v.nbytes for r, v in enumerate(values) if r != self.rank and v is not None)
        return values


def _run(world, fn):
    return run_ranks(world, fn, CountingComm)


def _tied_scores(n: int, seed: int = 0) -> np.ndarray:
    """Scores with many exact ties (a quarter of the rows share one of 20 values), as GOT-D's can."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n)
    tied = rng.random(n) < 0.25
    scores[tied] = rng.integers(0, 20, size=int(tied.sum())) / 10.0 - 1.0
    return scores


def _choose_bytes(scores: np.ndarray, k: int, world: int, method: str = "similarity"):
    """Each rank's kept global rows and the bytes it received while choosing."""
    n = scores.size
    selector = get_selector(method)

    def part(comm):
        lo, hi = contiguous_bounds(n, world, comm.rank)
        index = np.arange(lo, hi, dtype=np.int64)
        before = comm.bytes_received
        keys = selector.choice_keys(scores[lo:hi], k, seed=7, index=index, comm=comm)
        kept = index[keep_top_k(keys, k, index, comm)]
        return kept, comm.bytes_received - before

    return _run(world, part)


@pytest.mark.parametrize("world", [2, 3])
def test_choose_bytes_per_process_do_not_grow_with_n_and_rows_equal_a_full_sort(world):
    received = {}
    for n in (3_000, 12_000):  # N and 4N, k = N / 2
        scores, k = _tied_scores(n), n // 2
        ranks = _choose_bytes(scores, k, world)
        kept = np.sort(np.concatenate([r[0] for r in ranks]))
        np.testing.assert_array_equal(kept, np.sort(descending_order(scores)[:k]))  # ties to the lower index
        assert len(np.unique(scores[kept])) < k  # the cut really ran through tied scores
        received[n] = [r[1] for r in ranks]
    # What each process receives is a fixed number of rounds of 16 x P counts: the same at 4N.
    assert received[12_000] == received[3_000]
    assert max(received[3_000]) < 64 * 1024  # far below one float per row (24 kB at N = 3,000 would be k floats)


@pytest.mark.parametrize("method", ["random", "tsds"])
def test_sampling_without_replacement_keeps_the_rows_of_the_gumbel_sort(method):
    # Random (and TSDS without replacement) draw k rows by Gumbel keys from (seed, global index):
    # their top-k by the cut is the draw the one-process sort makes, at any number of processes.
    n, k = 4_000, 2_000
    rng = np.random.default_rng(3)
    p = rng.random(n) * (rng.random(n) < 0.8) if method == "tsds" else np.ones(n)
    selector = get_selector(method, replace=False) if method == "tsds" else get_selector(method)
    want = np.sort(selector.choose_rows(p, k, seed=7))
    for world in (2, 3):
        def part(comm):
            lo, hi = contiguous_bounds(n, world, comm.rank)
            index = np.arange(lo, hi, dtype=np.int64)
            before = comm.bytes_received
            keys = selector.choice_keys(p[lo:hi], k, seed=7, index=index, comm=comm)
            return index[keep_top_k(keys, k, index, comm)], comm.bytes_received - before

        ranks = _run(world, part)
        np.testing.assert_array_equal(np.sort(np.concatenate([r[0] for r in ranks])), want)
        assert max(r[1] for r in ranks) < 64 * 1024


def test_draws_with_replacement_have_no_keys_and_keep_their_own_path():
    p = np.random.default_rng(0).random(50)
    assert get_selector("tsds", replace=True).choice_keys(p, 80, seed=1) is None
    assert get_selector("random", replace=True).choice_keys(p, 80, seed=1) is None
    # TSDS's default draws distinct rows only while p reaches k rows; below that, as the paper, with replacement.
    sparse = np.where(np.arange(50) < 10, p, 0.0)
    assert get_selector("tsds").choice_keys(sparse, 20, seed=1) is None
    assert get_selector("tsds").choice_keys(sparse, 10, seed=1) is not None


@pytest.mark.parametrize("world", [2, 3])
def test_the_kept_rows_are_ordered_best_first_as_one_process_orders_them(world):
    n, k = 999, 400
    scores = _tied_scores(n, seed=5)

    def part(comm):
        lo, hi = contiguous_bounds(n, world, comm.rank)
        index = np.arange(lo, hi, dtype=np.int64)
        mine = keep_top_k(scores[lo:hi], k, index, comm)
        return order_chosen(scores[lo:hi][mine], index[mine], comm)

    for got in _run(world, part):
        np.testing.assert_array_equal(got, descending_order(scores)[:k])
