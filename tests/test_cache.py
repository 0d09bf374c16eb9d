"""Cache entries bound to their keys (issue 21, class 1); an embedding cache keyed by each text (issue 23, item 3).

A cached file that is well formed, with its own valid checksum, but lies under another key (moved,
copied, swapped) must be a miss, logged and recomputed, never used. And the embedding cache must
find every vector already computed whatever the pool's order, cut, size or process count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_otselect.cache import load_array, load_json, save_array, save_json, sidecar
from hf_otselect.embed import embed, iter_embeddings

from .conftest import REPO, SAMPLE, read_jsonl
from .test_embed import encoded  # noqa: F401  (a fixture: the rows each encoder call gets)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """36 distinct short texts of the sample pool (every domain)."""
    short = [r["text"] for r in read_jsonl(SAMPLE / "pool.jsonl") if len(r["text"]) <= 300]
    return short[:: len(short) // 36][:36]


def _kw(cache: Path, **extra):
    return {"device": "cpu", "cache_dir": cache, "show_progress": False, "max_length": 64, **extra}


def _discarded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Discarding the damaged cache entry" in r.getMessage()]


# ----------------------------------------------------------------------------------------------
# the checked-file layer


def test_a_file_read_under_another_key_is_a_miss_and_removed(tmp_path, caplog):
    a, b = tmp_path / "a" / "x.npy", tmp_path / "b" / "x.npy"
    save_array(a, np.arange(4.0), key="key-a")
    np.testing.assert_array_equal(load_array(a, key="key-a"), np.arange(4.0))
    b.parent.mkdir()
    shutil.copy(a, b)
    shutil.copy(sidecar(a), sidecar(b))  # the copy carries its own valid checksum
    with caplog.at_level("WARNING", logger="hf_otselect.cache"):
        assert load_array(b, key="key-b") is None
    assert any("another key" in m for m in _discarded(caplog))
    assert not b.exists() and not sidecar(b).exists()
    # Its key edited in the sidecar to the one asked for: the digest covers the key, still a miss.
    save_json(a.with_suffix(".json"), {"v": 1}, key="key-a")
    side = sidecar(a.with_suffix(".json"))
    check = json.loads(side.read_text())
    side.write_text(json.dumps({**check, "key": "key-b"}))
    assert load_json(a.with_suffix(".json"), key="key-b") is None
    # Renamed in the same folder (the name is bound too).
    save_array(a, np.arange(4.0), key="key-a")
    a.rename(a.with_name("y.npy"))
    sidecar(a).rename(sidecar(a.with_name("y.npy")))
    assert load_array(a.with_name("y.npy"), key="key-a") is None


# ----------------------------------------------------------------------------------------------
# embedding shards moved, copied, swapped


def _shards(cache: Path) -> dict[str, list[Path]]:
    """Shard id -> its files (vectors, keys, their sidecars), for shards of 8 rows."""
    out: dict[str, list[Path]] = {}
    for p in sorted(cache.rglob("*.npy")):
        if np.load(p).shape[0] == 8:
            stem = p.name[: -len(".npy")]
            out[stem] = [q for q in p.parent.iterdir() if q.name.split(".", 1)[0] == stem]
    return out


def _rename(files: list[Path], old: str, new: str, suffix: str = "") -> None:
    for f in files:
        f.rename(f.with_name(f.name.replace(old, new, 1) + suffix))


@pytest.mark.parametrize("how", ["swap-vectors", "swap-whole-shards", "copy-over"])
def test_embedding_shards_swapped_or_copied_with_their_sidecars_are_recomputed(texts, tmp_path, caplog, encoded, how):
    rows = texts[:24]
    cache = tmp_path / "cache"
    want = embed(rows, shard_rows=8, **_kw(cache))
    (a, files_a), (b, files_b) = list(_shards(cache).items())[:2]
    if how == "copy-over":  # shard a's files, sidecars included, copied over shard b's names
        for f in files_b:
            f.unlink()
        for f in files_a:
            shutil.copy(f, f.with_name(f.name.replace(a, b, 1)))
    else:
        if how == "swap-vectors":  # only the vectors and their sidecars change places
            files_a = [f for f in files_a if ".npy" in f.name]
            files_b = [f for f in files_b if ".npy" in f.name]
        _rename(files_a, a, b, ".tmp")
        _rename(files_b, b, a)
        for f in cache.rglob("*.tmp"):
            f.rename(f.with_name(f.name[: -len(".tmp")]))
    encoded.clear()
    with caplog.at_level("WARNING", logger="hf_otselect.cache"):
        got = embed(rows, shard_rows=8, **_kw(cache))
    np.testing.assert_array_equal(got, want)
    assert any("another key" in m for m in _discarded(caplog)), _discarded(caplog)
    assert sum(encoded) == (8 if how == "copy-over" else 16)  # the misplaced shards, recomputed
    encoded.clear()
    np.testing.assert_array_equal(embed(rows, shard_rows=8, **_kw(cache)), want)
    assert encoded == []  # rewritten whole under their own keys


# ----------------------------------------------------------------------------------------------
# score entries moved, copied, swapped


def _select(cache: Path, method: str, target_rows: slice = slice(0, 6)):
    from datasets import Dataset

    from hf_otselect import select_by_ot

    pool = Dataset.from_list(read_jsonl(SAMPLE / "pool.jsonl", 30))
    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 12)][target_rows]
    dd = select_by_ot(pool, target, method, 5, cache_dir=cache, return_scored=True, embedding={"max_length": 32})
    return dd["selected"]["pool_index"], np.asarray(dd["scored"]["score"])


def _entries(cache: Path) -> set[Path]:
    return set((cache / "scores").iterdir())


@pytest.mark.parametrize("how", ["swap-methods", "copy-other-target"])
def test_score_entries_swapped_or_copied_under_another_key_are_recomputed(tmp_path, caplog, how):
    cache = tmp_path / "cache"
    first = _select(cache, "got_d")
    (mine,) = _entries(cache)
    other_run = ("similarity", slice(0, 6)) if how == "swap-methods" else ("got_d", slice(6, 12))
    other = _select(cache, *other_run)
    (theirs,) = _entries(cache) - {mine}
    assert not np.allclose(other[1], first[1])
    if how == "swap-methods":  # both folders, sidecars and all, change places
        mine.rename(cache / "scores" / "tmp")
        theirs.rename(mine)
        (cache / "scores" / "tmp").rename(theirs)
    else:  # the other target's entry copied over this one
        shutil.rmtree(mine)
        shutil.copytree(theirs, mine)
    caplog.clear()
    with caplog.at_level("INFO"):
        rows, scores = _select(cache, "got_d")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("Scores read from the cache" in m for m in messages)
    assert any("another key" in m for m in _discarded(caplog)), messages
    assert rows == first[0]
    np.testing.assert_array_equal(scores, first[1])
    if how == "swap-methods":
        np.testing.assert_array_equal(_select(cache, *other_run)[1], other[1])


# ----------------------------------------------------------------------------------------------
# one key per text: order, cut, size, duplicates, streams


def test_reordered_subset_and_superset_pools_read_every_vector_from_the_cache(texts, tmp_path, encoded):
    cache = tmp_path / "cache"
    rows = texts[:30]
    want = embed(rows, shard_rows=8, **_kw(cache))
    assert sum(encoded) == 30
    perm = np.random.default_rng(0).permutation(30)
    cases = {
        "reversed": list(range(29, -1, -1)),
        "shuffled": perm.tolist(),
        "subset": perm[:11].tolist(),
        "one row": [17],
        "repeated rows": [3, 3, 9, 3, 9],
    }
    for name, order in cases.items():
        encoded.clear()
        got = embed([rows[i] for i in order], shard_rows=8, **_kw(cache))
        assert encoded == [], name
        assert got.tobytes() == want[order].tobytes(), name  # byte-identical: read, not recomputed
    # A stream in another order reads the cache too.
    encoded.clear()
    blocks = list(iter_embeddings(iter([rows[i] for i in perm]), shard_rows=8, **_kw(cache)))
    assert encoded == []
    assert np.concatenate(blocks).tobytes() == want[perm].tobytes()
    # A superset: only its new texts are encoded, each once, the old rows byte-identical.
    new = texts[30:36]
    grown = [*new[:3], *rows[::-1], *new[3:], new[0]]
    encoded.clear()
    got = embed(grown, shard_rows=8, **_kw(cache))
    assert encoded == [6]
    assert got[3:33].tobytes() == want[::-1].tobytes()
    assert got[-1].tobytes() == got[0].tobytes()
    encoded.clear()
    np.testing.assert_array_equal(embed(new, **_kw(cache)), got[[0, 1, 2, 33, 34, 35]])
    assert encoded == []


def test_a_pool_with_repeated_texts_encodes_each_once(texts, tmp_path, encoded):
    pool = [texts[i % 5] for i in range(23)]
    got = embed(pool, shard_rows=4, **_kw(tmp_path / "cache"))
    assert sum(encoded) == 5
    ref = embed(texts[:5], **_kw(tmp_path / "cache", use_cache=False))
    np.testing.assert_allclose(got, ref[np.arange(23) % 5], atol=1e-6, rtol=0)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": str(REPO)}


def _job(tmp_path: Path, out: Path, cache: Path, pool: Path, world: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd = [*launcher, "-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs" / "demo.yaml"),
           f"pool.path={pool}", f"target.path={SAMPLE / 'target.jsonl'}", "target.max_rows=10", "k=8",
           "method=similarity", "embedding.max_length=32", "embedding.shard_rows=16", f"cache_dir={cache}",
           f"output_dir={out}", "report=false", "save_embeddings=true"]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_a_two_process_job_on_a_reordered_pool_reads_every_vector_the_one_process_job_cached(tmp_path):
    rows = read_jsonl(SAMPLE / "pool.jsonl")[::20][:60]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cache = tmp_path / "cache"
    one = _job(tmp_path, tmp_path / "one", cache, tmp_path / "pool.jsonl", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "Embedding with" in one.stdout + one.stderr  # the log line this test looks for below
    cached = {p: p.stat().st_mtime_ns for p in (cache / "embeddings").rglob("*")}
    assert cached
    # The same pool, its two halves swapped, on two processes: each rank's part was a block of
    # the other process layout, and each rank's rows now sit at other offsets.
    (tmp_path / "swapped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:] + rows[:30]), encoding="utf-8")
    two = _job(tmp_path, tmp_path / "two", cache, tmp_path / "swapped.jsonl", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (cache / "embeddings").rglob("*")} == cached, "a vector was encoded again"
    assert "Embedding with" not in two.stdout + two.stderr  # no process loaded the encoder
    ones = np.load(tmp_path / "one" / "embeddings" / "pool.npy")
    twos = np.concatenate([np.load(p) for p in sorted((tmp_path / "two" / "embeddings").glob("pool-*.npy"))])
    assert twos.tobytes() == np.concatenate([ones[30:], ones[:30]]).tobytes()
