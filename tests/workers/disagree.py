"""Run under torchrun by tests/test_distributed.py: processes given different selections, one case at a time.

Usage: torchrun ... tests/workers/disagree.py POOL_A.jsonl POOL_B.jsonl TARGET.npy OUT_PREFIX CACHE_DIR
Every case runs ``run_selection`` on every process with the same arguments except one, which rank 1
(the last rank) changes: another pool file, seed, method or k. The last case changes nothing.
Each process writes ``OUT_PREFIX<rank>.json``: per case, ``{"ok": chosen rows}`` or ``{"error": type,
"message": text}``. A refusal is a collective decision (every process raises together), so the
process group is still usable for the next case.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from datasets import load_dataset

from hf_otselect.datasets_ext import run_selection
from hf_otselect.dist import get_comm

BASE = {"method": "similarity", "k": 5, "seed": 1, "pool": 0}
CASES = [("pool", {"pool": 1}), ("seed", {"seed": 2}), ("method", {"method": "got_d"}), ("k", {"k": 6}),
         ("method_random", {"method": "random"}), ("same", {})]


def main() -> None:
    pools, target_path, out_prefix, cache = sys.argv[1:3], sys.argv[3], sys.argv[4], sys.argv[5]
    comm = get_comm()
    target = np.load(target_path)
    last = comm.rank == comm.world_size - 1
    results = {}
    for name, change in CASES:
        args = {**BASE, **(change if last else {})}
        pool = load_dataset("json", data_files=pools[args["pool"]], split="train")
        # The vectors depend on the row's position only: the pool's text is what differs.
        vectors = np.random.default_rng(0).normal(size=(len(pool), target.shape[1])).astype(np.float32)
        size, extra = divmod(len(pool), comm.world_size)
        lo = comm.rank * size + min(comm.rank, extra)
        hi = lo + size + (comm.rank < extra)
        try:
            run = run_selection(pool, target, args["method"], args["k"], seed=args["seed"], cache_dir=cache, comm=comm,
                                embeddings=(vectors[lo:hi], target))
            results[name] = {"ok": run.result.indices.tolist()}
        except Exception as err:  # noqa: BLE001 - recorded for the test to judge
            results[name] = {"error": type(err).__name__, "message": str(err)}
    with open(f"{out_prefix}{comm.rank}.json", "w", encoding="utf-8") as fh:
        json.dump(results, fh)
    comm.close()


if __name__ == "__main__":
    main()
