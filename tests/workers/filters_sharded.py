"""One rank of the multi-process filter tests (tests/test_prefilter.py, tests/test_decontaminate.py).

    torchrun --standalone --nproc_per_node 2 tests/workers/filters_sharded.py OUT.json

Every rank takes its contiguous, uneven share of the same seeded multi-source pool, decontaminates
it (texts and sources read once, as from a stream) and pre-filters its sources on what is left;
rank 0 writes the summaries and, gathered here for the check only, every row's decision.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from hf_otselect.decontaminate import decontaminate
from hf_otselect.dist import get_comm, shard_bounds
from hf_otselect.prefilter import prefilter_sources

WORDS = [f"w{i}" for i in range(400)]


def problem(seed: int = 0) -> dict:
    """A pool of four sources (interleaved), its target, and a held-out set with planted copies.

    ``near`` is drawn like the target, ``mid`` and ``far`` are shifted, ``tiny`` is small; 20 pool
    rows are noisy copies of held-out vectors (12 within radius 0.3), 6 others carry a held-out
    13-gram in their text.
    """
    rng = np.random.default_rng(seed)
    d = 16
    centers = rng.normal(size=(4, d))

    def cloud(n: int, shift: float) -> np.ndarray:
        x = centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d))
        x[:, 0] += shift
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    parts = {"near": cloud(60, 0.0), "mid": cloud(150, 0.6), "far": cloud(300, 1.5), "tiny": cloud(25, 0.3)}
    x = np.concatenate(list(parts.values()))
    labels = np.concatenate([[name] * len(v) for name, v in parts.items()])
    texts = [" ".join(rng.choice(WORDS, 20)) for _ in range(len(x))]
    heldout = cloud(30, 0.0)
    held_texts = [" ".join(rng.choice(WORDS, 20)) for _ in range(30)]
    copies = rng.choice(len(x), 20, replace=False)
    for j, row in enumerate(copies):  # 12 close copies, 8 farther ones
        noisy = heldout[j] + (0.04 if j < 12 else 0.4) * rng.normal(size=d)
        x[row] = noisy / np.linalg.norm(noisy)
    spliced = rng.choice(np.setdiff1d(np.arange(len(x)), copies), 6, replace=False)
    for j, row in enumerate(spliced):
        texts[row] = texts[row] + " " + " ".join(held_texts[j].split()[3:16])
    order = rng.permutation(len(x))  # interleave the sources so that every shard mixes them
    return {"x": x[order].astype(np.float32), "labels": labels[order].tolist(), "texts": [texts[i] for i in order],
            "target": cloud(80, 0.0).astype(np.float32), "heldout": heldout.astype(np.float32), "held_texts": held_texts}


def run(p: dict, comm, lo: int, hi: int) -> tuple:
    """Decontaminate, then pre-filter, this rank's rows ``[lo, hi)``; texts and labels as one-pass iterators."""
    dec = decontaminate(p["x"][lo:hi], p["heldout"], radius=0.3, candidate_texts=iter(p["texts"][lo:hi]),
                        heldout_texts=p["held_texts"], ngram=13, sources=iter(p["labels"][lo:hi]), comm=comm, block_rows=16)
    pre = prefilter_sources(p["x"][lo:hi], p["labels"][lo:hi], p["target"], keep=2, sample_size=80, seed=3,
                            eligible=~dec.dropped, comm=comm)
    return dec, pre


def main() -> None:
    comm = get_comm()
    p = problem()
    lo, hi = shard_bounds(len(p["x"]), comm.world_size, comm.rank)
    dec, pre = run(p, comm, lo, hi)
    gather = lambda a: np.concatenate(comm.all_gather(np.asarray(a))).tolist()  # noqa: E731 - the check only
    out = {"world_size": comm.world_size, "decontamination": dec.to_dict(), "prefilter": pre.to_dict(),
           "dropped": gather(dec.dropped), "nearest_distance": gather(dec.nearest_distance), "mask": gather(pre.mask)}
    if comm.is_main:
        Path(sys.argv[1]).write_text(json.dumps(out), encoding="utf-8")
    comm.barrier()  # no close(): get_comm ends the group it started at exit


if __name__ == "__main__":
    main()
