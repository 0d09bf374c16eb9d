"""Determinism: same inputs, parameters and seed -> byte-identical scored and selected splits.

Checked across runs that each compute everything afresh (separate caches), between a computing
run and a cache-reading run, whatever the global numpy/torch RNG state, and for the embedding
across ``num_proc``. Across process counts (torchrun, 2 ranks) see ``tests/test_job.py``. The
seed must matter where the method is random, so these tests could fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

import hf_otselect
from hf_otselect.selectors import available_selectors, get_selector
from tests.conftest import SAMPLE, read_jsonl

EMBED = sys.modules["hf_otselect.embed"]
EMB = {"max_length": 32}
K = 8


@pytest.fixture(scope="module")
def pool() -> Dataset:
    rows = read_jsonl(SAMPLE / "pool.jsonl")[::28][:60]
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def target() -> list[str]:
    return [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 8)]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """Two caches shared by the methods: each embeds once, and scores every method afresh."""
    return tmp_path_factory.mktemp("cache_a"), tmp_path_factory.mktemp("cache_b")


def _save(splits, folder: Path) -> dict[str, bytes]:
    splits["scored"].save_to_disk(str(folder / "scored"))
    splits["selected"].save_to_disk(str(folder / "selected"))
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(pool, target, method, cache: Path, seed: int = 0):
    return hf_otselect.select_by_ot(pool, target, method, K, seed=seed, cache_dir=cache, embedding=EMB, return_scored=True)


@pytest.mark.parametrize("method", available_selectors())
def test_fresh_runs_and_a_cached_rerun_write_identical_bytes(tmp_path, pool, target, caches, method):
    cache_a, cache_b = caches
    first = _save(_run(pool, target, method, cache_a), tmp_path / "a")
    second = _save(_run(pool, target, method, cache_b), tmp_path / "b")  # its own vectors and scores
    cached = _save(_run(pool, target, method, cache_a), tmp_path / "c")  # reads vectors and scores back
    assert any(name.endswith(".arrow") for name in first)
    assert first == second
    assert first == cached


@pytest.mark.parametrize(("method", "params"), [("tsds", {"alpha": 0.4}), ("got_d", {"eps": 0.2}), ("random", {"replace": True})])
def test_global_rng_state_is_neither_read_nor_advanced(pool, target, caches, method, params):
    # parameters no other test uses, so each call scores afresh (the vectors come from the cache)
    results = []
    for global_seed, cache in zip((1, 2), caches):
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
        out = hf_otselect.select_by_ot(pool, target, method, K, seed=0, cache_dir=cache, embedding=EMB, **params)
        assert (np.random.get_state()[1] == np_state).all(), "select_by_ot advanced numpy's global RNG"
        assert torch.equal(torch.get_rng_state(), torch_state), "select_by_ot advanced torch's global RNG"
        results.append(list(out["pool_index"]))
    assert results[0] == results[1]


@pytest.mark.parametrize("method", [m for m in available_selectors() if get_selector(m).choice == "sample"])
def test_the_seed_matters_for_sampling_methods(pool, target, caches, method):
    def rows(seed: int) -> list[int]:
        return list(_run(pool, target, method, caches[0], seed=seed)["selected"]["pool_index"])

    assert rows(0) != rows(1)
    assert rows(0) == rows(0)


@pytest.mark.slow
def test_embedding_is_byte_identical_across_num_proc(tmp_path, pool):
    texts = pool["text"][:40]
    one = EMBED.embed(texts, max_length=32, shard_rows=10, cache_dir=tmp_path / "one")
    two = EMBED.embed(texts, max_length=32, shard_rows=10, num_proc=2, cache_dir=tmp_path / "two")
    assert one.tobytes() == two.tobytes()
