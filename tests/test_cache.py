"""Cache entries bound to their keys (issue 21, class 1).

A cached file that is well formed, with its own valid checksum, but lies under another key (moved,
copied, swapped) must be a miss, logged and recomputed, never used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hf_otselect.cache import load_array, load_json, save_array, save_json, sidecar
from hf_otselect.embed import embed

from .conftest import SAMPLE, read_jsonl
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
