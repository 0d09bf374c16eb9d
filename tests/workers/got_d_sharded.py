"""GOT-D fit + score_batch + choose on this rank's shard, run by tests under ``torchrun``.

    torchrun --standalone --nproc_per_node 2 tests/workers/got_d_sharded.py OUT.json

Every rank takes its contiguous share of the same seeded data; rank 0 writes what the test
compares with one process: the state's potentials, every score (gathered here for the check
only), the chosen rows, and the bytes each fit sent (at N and 4N with a fixed iteration count).
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np

from hf_otselect.dist import PoolView, get_comm
from hf_otselect.selectors.got_d import GOTDSelector


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool with a dense and a thin region, a target on both, a negative target elsewhere (unit rows)."""
    rng = np.random.default_rng(seed)
    d = 16

    def blob(center: np.ndarray, k: int) -> np.ndarray:
        v = center + 0.15 * rng.normal(size=(k, d))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    e = np.eye(d)
    pool = np.concatenate([blob(e[0], n - n // 10), blob(e[1], n // 10)])
    target = np.concatenate([blob(e[0], 60), blob(e[1], 60)])
    negative = blob(e[2], 30)
    return pool, target, negative


def shard(pool: np.ndarray, comm) -> PoolView:
    bounds = np.linspace(0, len(pool), comm.world_size + 1).astype(int)
    return PoolView.of(pool[bounds[comm.rank] : bounds[comm.rank + 1]], comm)


def main() -> None:
    comm = get_comm()
    out: dict = {"world_size": comm.world_size}
    pool, target, negative = data(440)
    sel = GOTDSelector(negative_target=negative, negative_weight=0.3)
    view = shard(pool, comm)
    state = sel.fit(view, target, comm=comm)
    idx, scores = [], []
    for i, rows in view.blocks(50):
        idx.append(i)
        scores.append(sel.score_batch(state, rows, i))
    idx, scores = np.concatenate(idx), np.concatenate(scores)
    chosen = sel.choose_rows(scores, 25, index=idx, comm=comm)
    all_idx = np.concatenate(comm.all_gather(idx))
    all_scores = np.concatenate(comm.all_gather(scores))
    out.update(g_f=state.target.results[0].g_f.tolist(), negative_g_f=state.negative.results[0].g_f.tolist(),
               scores=all_scores[np.argsort(all_idx)].tolist(), chosen=chosen.tolist())
    for n in (1000, 4000):  # bytes of a fit at N and 4N, same iteration count (recomputed kernel)
        big, tgt, _ = data(n, seed=1)
        view = shard(big, comm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            before = comm.bytes_sent
            GOTDSelector(backend="blocked", tol=0, max_iter=5).fit(view, tgt, comm=comm)
        out[f"bytes_{n}"] = comm.bytes_sent - before
    if comm.rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(out, fh)
    comm.barrier()


if __name__ == "__main__":
    main()
