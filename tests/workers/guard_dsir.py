"""Run under torchrun by tests/test_dedup.py: the guard, DSIR on a stream and the selection's OT distance.

Usage: torchrun ... tests/workers/guard_dsir.py DATA_DIR OUT.json CACHE_DIR
DATA_DIR holds pool-*.jsonl (the pool, in file order), target.jsonl and emb.npy ((n_pool + n_target,
dim): the pool's vectors, then the target's). Process 0 writes, per case, the chosen global rows,
the guard's figures and the selection's OT distance; the same pool is read in memory and streamed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from datasets import load_dataset

from hf_otselect.datasets_ext import run_selection
from hf_otselect.dist import get_comm
from hf_otselect.job import selection_ot_distance

CASES = {
    "got_d+greedy": ("got_d", {"dedup_radius": 0.2}),
    "tsds+greedy": ("tsds", {"dedup_radius": 0.2, "replace": False, "C": 5.0}),
    "tsds+kde": ("tsds", {"dedup_radius": 0.2, "sigma": 0.0, "replace": True, "C": 5.0}),
    "dsir+greedy": ("dsir", {"dedup_radius": 0.2}),
    "dsir": ("dsir", {}),
}


def main() -> None:
    data, out_path, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    comm = get_comm()
    files = sorted(str(p) for p in data.glob("pool-*.jsonl"))
    pools = {"memory": load_dataset("json", data_files=files, split="train"),
             "stream": load_dataset("json", data_files=files, split="train", streaming=True)}
    target = load_dataset("json", data_files=str(data / "target.jsonl"), split="train")
    emb = np.load(data / "emb.npy")
    n = len(pools["memory"])
    pool_emb, target_emb = emb[:n], emb[n:]
    part = pools["memory"].shard(num_shards=comm.world_size, index=comm.rank, contiguous=True)
    offset, _ = comm.exclusive_offset(len(part))
    mine = pool_emb[offset : offset + len(part)]
    results = {}
    for kind, pool in pools.items():
        for case, (method, params) in CASES.items():
            run = run_selection(pool, target, method, 12, seed=4, cache_dir=cache / kind, comm=comm,
                                embeddings=(mine, target_emb), **params)
            assert run.offset == offset  # the stream's file shards split as the in-memory rows do
            results[f"{kind}:{case}"] = {
                "indices": run.result.indices.tolist(), "dedup": run.dedup,
                "selection_ot": selection_ot_distance(mine, offset, run.result.indices, target_emb, comm),
            }
    if comm.is_main:
        Path(out_path).write_text(json.dumps({"world": comm.world_size, "results": results}), encoding="utf-8")
    comm.close()


if __name__ == "__main__":
    main()
