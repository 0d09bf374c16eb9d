"""One rank of the multi-process TSDS test (run by tests/test_tsds.py under torchrun, gloo, CPU).

Every rank fits TSDS on its own contiguous, uneven shard of the same seeded pool, scores its rows,
chooses with and without replacement, and rank 0 writes what came out to the ``.npz`` named in argv.
"""

from __future__ import annotations

import sys

import numpy as np

from hf_otselect.dist import PoolView, get_comm
from hf_otselect.selectors.tsds import TSDSSelector


def problem() -> tuple[np.ndarray, np.ndarray, dict]:
    """The shared test problem: clusters, a clump of exact copies and a dense ball (densities matter)."""
    rng = np.random.default_rng(21)
    centers = rng.normal(size=(6, 16)) * 2
    x = centers[rng.integers(0, 6, 700)] + rng.normal(size=(700, 16))
    x[100:160] = x[99]  # 61 exact copies, split across ranks
    x[400:480] = x[400] + 0.05 * rng.normal(size=(80, 16))
    y = centers[rng.integers(0, 3, 20)] + rng.normal(size=(20, 16))
    params = dict(alpha=0.3, C=1.0, sigma=1.5, max_K=300, kde_K=40)
    return x.astype(np.float32), y.astype(np.float32), params


def main() -> None:
    x, y, params = problem()
    comm = get_comm()
    bounds = {1: [0, 700], 2: [0, 130, 700], 3: [0, 130, 450, 700]}[comm.world_size]
    lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
    view = PoolView.of(x[lo:hi], comm)
    sel = TSDSSelector(**params)
    state = sel.fit(view, y, comm=comm)
    index = np.arange(view.offset, view.offset + view.n_local)
    p = sel.score_batch(state, x[lo:hi], index)
    with_r = TSDSSelector(**params, replace=True).choose_rows(p, 50, seed=3, index=index, comm=comm)
    without = TSDSSelector(**params, replace=False).choose_rows(p, 30, seed=3, index=index, comm=comm)
    full = np.concatenate(comm.all_gather(p))
    auto = TSDSSelector(**{**params, "C": None, "budget": 50})  # the default scale, set from the merged lists
    p_auto = np.concatenate(comm.all_gather(auto.score_batch(auto.fit(view, y, comm=comm), x[lo:hi], index)))
    if comm.rank == 0:
        np.savez(sys.argv[1], p=full, p_auto=p_auto, with_replacement=with_r, without_replacement=without, rows=state.rows, level=state.level)
    comm.barrier()  # no close(): get_comm ends the group it started at exit


if __name__ == "__main__":
    main()
