"""A sample fit, its scores and its exact top-k cut on this rank's rows, run by tests under ``torchrun``.

    torchrun --standalone --nproc_per_node 2 tests/workers/fitted_sample.py OUT.json

Every rank passes the whole (seeded) pool to ``fit_selector``, which fits on this rank's
contiguous part of the keyed sample; each rank scores its own rows and keeps its top-k by the cut
found from all-reduced counts. Rank 0 writes the sample size, every score and every kept row
(gathered here for the check only), and the bytes one rank sent to find cuts at N and 10N.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from hf_otselect import fit_selector
from hf_otselect.dist import get_comm
from hf_otselect.threshold import top_k_cut
from tests._thread_comm import contiguous_bounds
from tests.workers.got_d_sharded import data


def main() -> None:
    comm = get_comm()
    pool, target, _ = data(440)
    fitted = fit_selector(pool, target, "got_d", sample=0.3, seed=5, comm=comm)
    lo, hi = contiguous_bounds(len(pool), comm.world_size, comm.rank)
    index = np.arange(lo, hi)
    scores = fitted.score_rows(pool[lo:hi])
    cut = fitted.keep(k=40, scores=scores, index=index, comm=comm).cut
    kept = index[cut.keeps(scores, index)]
    out = {"n_fit": fitted.fit_info["n_fit"], "scores": np.concatenate(comm.all_gather(scores)).tolist(),
           "kept": np.concatenate(comm.all_gather(kept)).tolist(), "bytes": {}}
    for n in (2_000, 20_000):  # the cut's traffic at N and 10N, k = N / 2, many ties
        keys = np.random.default_rng(n).integers(0, 30, size=n).astype(np.float64)
        lo, hi = contiguous_bounds(n, comm.world_size, comm.rank)
        before = comm.bytes_sent
        top_k_cut(keys[lo:hi], n // 2, index=np.arange(lo, hi), comm=comm)
        out["bytes"][n] = comm.bytes_sent - before
    if comm.rank == 0:
        with open(sys.argv[1], "w", encoding="utf-8") as fh:
            json.dump(out, fh)
    comm.close()


if __name__ == "__main__":
    main()
