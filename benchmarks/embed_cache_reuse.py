"""What the per-text embedding cache (issue 23, item 3) reuses, and what its index costs.

1. The sample pool (``data/sample/pool.jsonl``) embedded cold into a fresh cache, then the same pool
   reordered (a seeded permutation), a subset (every other row) and a superset (the pool plus the
   target texts), each timed with the rows the encoder ran on (counted at the encoder loop).
2. Opening the cache index of ``--index-rows`` texts (``.keys`` files of 4,096 keys, checked and
   sorted), cold (first open in the process) and warm (a second store on the unchanged folder).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_cache_reuse.py --out benchmarks/results/embed_cache_reuse.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _provenance import header, provenance  # noqa: E402


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


def _reuse(cache: Path, seed: int) -> list[tuple[str, int, int, float]]:
    """(case, rows, rows encoded, seconds) for cold, reordered, subset and superset calls."""
    embed_mod = importlib.import_module("hf_otselect.embed")
    encoded: list[int] = []
    real = embed_mod._encode

    def counting(texts, *args, **kwargs):
        encoded.append(len(texts))
        return real(texts, *args, **kwargs)

    embed_mod._encode = counting
    pool = _texts(REPO / "data" / "sample" / "pool.jsonl")
    target = _texts(REPO / "data" / "sample" / "target.jsonl")
    perm = np.random.default_rng(seed).permutation(len(pool))
    cases = {"cold": pool, "reordered (warm)": [pool[i] for i in perm], "subset, every other row (warm)": pool[::2],
             "superset, pool + target (warm)": pool + target}
    rows = []
    for name, texts in cases.items():
        encoded.clear()
        t = time.perf_counter()
        embed_mod.embed(texts, device="cpu", cache_dir=cache, show_progress=False)
        rows.append((name, len(texts), sum(encoded), time.perf_counter() - t))
    embed_mod._encode = real
    return rows


def _index(folder: Path, n: int, seed: int) -> tuple[float, float]:
    from hf_otselect import embed_cache
    from hf_otselect.cache import save_array, write_checked

    rng = np.random.default_rng(seed)
    settings = "benchmark"
    for s in range(0, n, 4096):
        keys = rng.bytes(16 * min(4096, n - s))
        sid = f"{s:012d}"
        write_checked(folder / f"{sid}.keys", keys, key=f"embeddings/{settings}/{sid}")
        save_array(folder / f"{sid}.npy", np.zeros((1, 1), dtype=np.float32), key="unused")  # only listed here
    t = time.perf_counter()
    store = embed_cache.VectorStore(folder, settings)
    cold = time.perf_counter() - t
    assert len(store) == n
    t = time.perf_counter()
    embed_cache.VectorStore(folder, settings)
    return cold, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index-rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    prov = provenance(seeds={"permutation": args.seed, "index keys": args.seed})
    with tempfile.TemporaryDirectory() as tmp:
        reuse = _reuse(Path(tmp) / "cache", args.seed)
        cold, warm = _index(Path(tmp) / "index", args.index_rows, args.seed)
    lines = ["# Embedding cache: reuse across order, cut and size; index cost", "", *header(prov), "",
             "Bundled all-MiniLM-L6-v2, CPU, default settings (max_length 256, batch 64, shard_rows 4096).", "",
             "| call | rows | rows encoded | seconds |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {rows} | {enc} | {sec:.2f} |" for name, rows, enc, sec in reuse]
    lines += ["", f"Index of {args.index_rows:,} cached texts ({args.index_rows * 16 / 2**20:.0f} MiB of keys): "
              f"opened cold in {cold:.2f} s (read, checksum, sort), warm in {warm:.3f} s (folder listed, sorted index reused)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
