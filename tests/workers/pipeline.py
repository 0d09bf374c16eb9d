"""Run under torchrun by tests/test_distributed.py: every selector through run_selection on a shard.

Usage: torchrun ... tests/workers/pipeline.py POOL.jsonl TARGET.jsonl EMB.npy OUT.json CACHE_DIR
EMB.npy holds (n_pool + n_target, dim) vectors: the pool's rows, then the target's.
Process 0 writes, per method, the chosen global rows and every row's score (gathered here for the
comparison only; the library never gathers scores).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from datasets import load_dataset

from hf_otselect.datasets_ext import run_selection
from hf_otselect.dist import get_comm

METHODS = {"got_d": {}, "tsds": {}, "random": {}, "similarity": {"reduce": "round_robin"}, "dsir": {}}


def main() -> None:
    pool_path, target_path, emb_path, out_path, cache = sys.argv[1:6]
    comm = get_comm()
    pool = load_dataset("json", data_files=pool_path, split="train")
    target = load_dataset("json", data_files=target_path, split="train")
    emb = np.load(emb_path)
    pool_emb, target_emb = emb[: len(pool)], emb[len(pool) :]
    part = pool.shard(num_shards=comm.world_size, index=comm.rank, contiguous=True)
    offset, _ = comm.exclusive_offset(len(part))
    results = {}
    for method, params in METHODS.items():
        run = run_selection(pool, target, method, 15, seed=3, cache_dir=cache, comm=comm,
                            embeddings=(pool_emb[offset : offset + len(part)], target_emb), **params)
        scores = np.concatenate(comm.all_gather(run.result.scores))
        selected = [np.asarray(run.selected[c]) for c in ("pool_index", "rank")]
        gathered = [np.concatenate(comm.all_gather(c)) for c in selected]
        results[method] = {"indices": run.result.indices.tolist(), "scores": scores.tolist(),
                           "selected_pool_index": gathered[0].tolist(), "selected_rank": gathered[1].tolist()}
    if comm.is_main:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump({"world": comm.world_size, "results": results}, fh)
    comm.close()


if __name__ == "__main__":
    main()
