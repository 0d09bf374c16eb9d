"""The sharded flow: collectives, world-size-invariant choice and ranks, the same rows for 1..N processes.

Fast tests play the processes with threads (``_thread_comm.ThreadComm``); the slow ones launch real
processes with torchrun (gloo on CPU), as one node and as two "nodes" sharing a rendezvous on
127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from hf_otselect.datasets_ext import global_ranks, run_selection
from hf_otselect.dist import LOCAL, PoolView, RowSubset
from hf_otselect.selectors import get_selector
from hf_otselect.selectors.base import choose, row_uniforms

from .conftest import REPO, SAMPLE, read_jsonl
from ._thread_comm import contiguous_bounds
from ._thread_comm import run_ranks as run_world

WORLDS = (1, 2, 3, 5)


def _split_call(n: int, world: int, fn):
    """Run ``fn(comm, lo, hi)`` on each rank's contiguous rows; return rank 0's result."""
    return run_world(world, lambda comm: fn(comm, *contiguous_bounds(n, world, comm.rank)))[0]


def _reference_top_k(keys: np.ndarray, k: int) -> list[int]:
    return sorted(range(keys.size), key=lambda i: (-keys[i], i))[:k]  # plain Python, ties to the lower index


@pytest.mark.parametrize("world", WORLDS)
def test_top_k_merges_to_the_plain_reference_with_ties(world):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 101).astype(np.float64)  # many ties
    got = _split_call(101, world, lambda comm, lo, hi: choose(scores[lo:hi], 17, index=np.arange(lo, hi), comm=comm))
    assert got.tolist() == _reference_top_k(scores, 17)


@pytest.mark.parametrize("mode,replace", [("sample", False), ("sample", True), ("log_sample", False)])
def test_sampling_draws_the_same_rows_for_any_world_size(mode, replace):
    rng = np.random.default_rng(1)
    scores = rng.random(203) * (rng.random(203) > 0.3)
    if mode == "log_sample":
        scores = np.log(scores + 1e-3)
    runs = [
        _split_call(203, w, lambda comm, lo, hi: choose(scores[lo:hi], 40, mode=mode, replace=replace, seed=7,
                                                        index=np.arange(lo, hi), comm=comm))
        for w in WORLDS
    ]
    for other in runs[1:]:
        assert other.tolist() == runs[0].tolist()
    assert choose(scores, 40, mode=mode, replace=replace, seed=8).tolist() != runs[0].tolist()  # the seed matters


def test_row_uniforms_depend_on_seed_and_index_only_and_look_uniform():
    u = row_uniforms(5, np.arange(200_000))
    assert np.array_equal(u[1000:1010], row_uniforms(5, np.arange(1000, 1010)))
    assert 0.0 < u.min() and u.max() < 1.0
    # Kolmogorov-Smirnov distance to U(0, 1): 1.36/sqrt(n) is the 5% critical value.
    d = np.abs(np.sort(u) - (np.arange(1, u.size + 1) - 0.5) / u.size).max()
    assert d < 1.36 / np.sqrt(u.size)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01  # neighbouring rows are not correlated


def test_sampling_frequencies_follow_the_probabilities():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    # Without replacement, the first draw is a draw from p (Gumbel-max); over seeds, its frequency is p.
    firsts = np.bincount([choose(p, 1, mode="sample", seed=s)[0] for s in range(4000)], minlength=4) / 4000
    assert np.abs(firsts - p).max() < 0.03
    draws = np.bincount(choose(p, 20_000, mode="sample", replace=True, seed=0), minlength=4) / 20_000
    assert np.abs(draws - p).max() < 0.015


@pytest.mark.parametrize("world", WORLDS)
def test_global_ranks_equal_a_full_sort(world):
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, 60).astype(np.float64)
    scores[[3, 20]] = np.nan  # unscored rows are never counted
    queries = np.array([0, 7, 19, 33, 59])
    order = [i for i in sorted(range(60), key=lambda i: (-scores[i], i)) if not np.isnan(scores[i])]
    expected = [order.index(q) + 1 for q in queries]
    got = _split_call(60, world, lambda comm, lo, hi: global_ranks(scores[lo:hi], np.arange(lo, hi), scores[queries], queries, comm))
    assert got.tolist() == expected


@pytest.mark.parametrize("method,params", [
    ("random", {}), ("similarity", {"reduce": "mean"}), ("similarity", {"reduce": "max"}),
    ("similarity", {"reduce": "round_robin", "block_size": 7}), ("got_d", {}), ("tsds", {}),
])
@pytest.mark.parametrize("world", (2, 3))
def test_vector_fits_give_the_one_process_scores(method, params, world):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 8))
    x = (centres[rng.integers(0, 4, 90)] + 0.3 * rng.normal(size=(90, 8))).astype(np.float32)
    x[10] = x[11]  # an exact duplicate pair
    y = (centres[:2].repeat(6, axis=0) + 0.3 * rng.normal(size=(12, 8))).astype(np.float32)
    selector = get_selector(method, **params)
    whole = selector.score(x, y)

    def scores(comm, lo, hi):
        sel = get_selector(method, **params)
        view = PoolView.of(x[lo:hi], comm)
        state = sel.fit(view, y, comm=comm)
        local = np.concatenate([sel.score_batch(state, rows, idx) for idx, rows in view.blocks(5)])
        return np.concatenate(comm.all_gather(local))

    got = _split_call(90, world, scores)
    np.testing.assert_allclose(got, whole, rtol=1e-6 if method == "got_d" else 0, atol=1e-12 if method == "got_d" else 0)


@pytest.mark.parametrize("world", (2, 3))
def test_dsir_fit_gives_the_one_process_weights(world):
    rows = read_jsonl(SAMPLE / "pool.jsonl", 120)
    texts = [r["text"] for r in rows]
    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 30)]
    whole = get_selector("dsir").score(texts, target)
    from hf_otselect.dist import TextView

    def scores(comm, lo, hi):
        sel = get_selector("dsir")
        view = TextView.of(texts[lo:hi], comm)
        state = sel.fit(view, target, comm=comm)
        return np.concatenate(comm.all_gather(np.concatenate([sel.score_batch(state, t, i) for i, t in view.blocks(16)])))

    np.testing.assert_allclose(_split_call(120, world, scores), whole, rtol=1e-12)


def _pool_and_vectors(n: int = 140, dim: int = 16):
    rows = read_jsonl(SAMPLE / "pool.jsonl", n)
    pool = Dataset.from_list(rows)
    target = Dataset.from_list(read_jsonl(SAMPLE / "target.jsonl", 20))
    rng = np.random.default_rng(4)
    domains = sorted({r["domain"] for r in rows})
    centres = rng.normal(size=(len(domains), dim))
    pool_emb = np.stack([centres[domains.index(r["domain"])] + 0.5 * rng.normal(size=dim) for r in rows]).astype(np.float32)
    target_emb = (centres[0] + 0.5 * rng.normal(size=(20, dim))).astype(np.float32)
    return pool, target, pool_emb, target_emb


@pytest.mark.parametrize("method", ["random", "similarity", "dsir"])
def test_run_selection_splits_are_the_same_for_any_world_size(method, tmp_path):
    pool, target, pool_emb, target_emb = _pool_and_vectors()
    n = len(pool)

    def run(world):
        def part(comm):
            lo, hi = contiguous_bounds(n, world, comm.rank)
            r = run_selection(pool, target, method, 25, seed=1, cache_dir=tmp_path / f"c{world}", comm=comm,
                              embeddings=(pool_emb[lo:hi], target_emb))
            return r.result.indices.tolist(), r.scored.to_dict(), r.selected.to_dict()
        ranks = run_world(world, part)
        merged = [{key: sum((r[j][key] for r in ranks), []) for key in ranks[0][j]} for j in (1, 2)]
        return ranks[0][0], merged

    one = run(1)
    assert len(one[0]) == 25 and one[1][1]["pool_index"] == sorted(one[1][1]["pool_index"])
    for world in (2, 3):
        assert run(world) == one


def test_selected_rank_is_the_rank_by_score_and_draw_order_the_draw(tmp_path):
    pool, target, pool_emb, target_emb = _pool_and_vectors()
    run = run_selection(pool, target, "random", 10, seed=2, cache_dir=tmp_path, embeddings=(pool_emb, target_emb))
    sel = run.selected
    assert sorted(sel["draw_order"]) == list(range(1, 11))
    by_draw = [p for _, p in sorted(zip(sel["draw_order"], sel["pool_index"]))]
    assert by_draw == run.result.indices.tolist()
    # Random gives every row the same score: rank by score is then pool order (ties to the lower index).
    assert sel["rank"] == [p + 1 for p in sel["pool_index"]]
    run = run_selection(pool, target, "similarity", 10, cache_dir=tmp_path, embeddings=(pool_emb, target_emb))
    assert sorted(run.selected["rank"]) == list(range(1, 11)) and "draw_order" not in run.selected.column_names


def test_random_needs_no_encoder(tmp_path, monkeypatch):
    import importlib

    embed_mod = importlib.import_module("hf_otselect.embed")

    def tripwire(*a, **k):
        raise AssertionError("random loaded the encoder")

    monkeypatch.setattr(embed_mod, "load_encoder", tripwire)
    pool = Dataset.from_list(read_jsonl(SAMPLE / "pool.jsonl", 50))
    out = pool.select_by_ot(["any target"], method="random", k=5, cache_dir=tmp_path)
    assert len(out) == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_torchrun_two_and_three_processes_select_what_one_does(tmp_path):
    pool, target, pool_emb, target_emb = _pool_and_vectors(120)
    pool.to_json(tmp_path / "pool.jsonl")
    target.to_json(tmp_path / "target.jsonl")
    np.save(tmp_path / "emb.npy", np.concatenate([pool_emb, target_emb]))
    outs = {}
    for world in (1, 2, 3):
        out = tmp_path / f"w{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(REPO / "tests" / "workers" / "pipeline.py"), str(tmp_path / "pool.jsonl"), str(tmp_path / "target.jsonl"),
               str(tmp_path / "emb.npy"), str(out), str(tmp_path / f"cache{world}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[world] = json.loads(out.read_text())["results"]
    for world in (2, 3):
        for method, res in outs[world].items():
            ref = outs[1][method]
            assert res["indices"] == ref["indices"], method
            assert res["selected_pool_index"] == ref["selected_pool_index"], method
            assert res["selected_rank"] == ref["selected_rank"], method
            # GOT-D's reductions sum in another order across processes: within 1e-6 of the score scale.
            atol = 1e-6 * np.abs(ref["scores"]).max() if method == "got_d" else 0.0
            np.testing.assert_allclose(res["scores"], ref["scores"], rtol=0, atol=atol, err_msg=method)


def _job_overrides(tmp_path: Path, out: Path, cache: Path) -> list[str]:
    rows = read_jsonl(SAMPLE / "pool.jsonl")
    picked = rows[::18][:80]  # every domain
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
    return [f"pool.path={tmp_path / 'pool.jsonl'}", "target.max_rows=20", f"target.path={SAMPLE / 'target.jsonl'}",
            "k=10", "embedding.max_length=32", f"cache_dir={cache}", f"output_dir={out}", "report=false",
            "method=similarity"]


@pytest.mark.slow
def test_two_nodes_sharing_a_rendezvous_write_the_one_process_output(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = [sys.executable, "-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs" / "demo.yaml")]
    proc = subprocess.run([*base, *_job_overrides(tmp_path, one, tmp_path / "c1")], capture_output=True, text=True,
                          env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "hf_otselect.cli", "select",
             "--config", str(REPO / "configs" / "demo.yaml"), *_job_overrides(tmp_path, two, tmp_path / "c2")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = load_from_disk(str(one)), load_from_disk(str(two))
    for split in ("scored", "selected"):
        assert a[split].to_dict() == b[split].to_dict(), split
    meta = json.loads((two / "selection.json").read_text())
    assert meta["processes"] == 2 and meta["rows"]["pool"] == 80
    shutil.rmtree(tmp_path / "c2")


def test_local_comm_is_a_no_op():
    x = np.arange(5.0)
    assert LOCAL.world_size == 1 and LOCAL.all_reduce(x).tolist() == x.tolist()
    assert [a.tolist() for a in LOCAL.all_gather(x)] == [x.tolist()]
    assert LOCAL.exclusive_offset(7) == (0, 7)


_NO_CLOSE = """
import atexit, json, sys
import torch.distributed as tdist
from hf_otselect.dist import get_comm

path = []
atexit.register(lambda: json.dump({"up": tdist.is_initialized()}, open(path[0], "w")))  # runs after get_comm's hook
comm = get_comm()
path.append(sys.argv[1] + str(comm.rank))
comm.barrier()
"""


@pytest.mark.slow
def test_a_script_that_never_closes_its_comm_exits_with_the_group_ended(tmp_path):
    # gloo aborts a process whose group outlives main ("terminate called", exit -6), by chance.
    script = tmp_path / "no_close.py"
    script.write_text(_NO_CLOSE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "rank")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}").read_text()) == {"up": False}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.slow
def test_a_killed_process_stops_the_job_cleanly_and_the_rerun_resumes(tmp_path):
    import signal
    import time

    out, cache = tmp_path / "out", tmp_path / "cache"
    overrides = [*_job_overrides(tmp_path, out, cache), "embedding.shard_rows=4", "embedding.batch_size=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_otselect.cli",
           "select", "--config", str(REPO / "configs" / "demo.yaml"), *overrides]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(cache.glob("embeddings/*/*.npy"))) < 3:
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before any shard was cached"
    workers = _children(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.monotonic()
    _, err = job.communicate(timeout=300)  # every process must stop: no hang on a collective
    assert job.returncode != 0 and time.monotonic() - t0 < 300
    assert "exitcode" in err and "-9" in err  # torchrun names the killed process and its signal
    assert not out.exists()
    cached = {p: p.stat().st_mtime_ns for p in cache.glob("embeddings/*/*.npy")}
    assert cached
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == m for p, m in cached.items())  # finished shards were reused, not rewritten
    assert len(load_from_disk(str(out))["selected"]) == 10


@pytest.mark.slow
def test_a_row_subset_reads_what_a_copy_of_those_rows_holds(tmp_path):
    pool = np.lib.format.open_memmap(tmp_path / "pool.npy", mode="w+", dtype=np.float32, shape=(50, 3))
    pool[:] = np.arange(150, dtype=np.float32).reshape(50, 3)
    keep = np.array([0, 3, 4, 9, 17, 18, 40, 49])
    sub, copy = RowSubset(pool, keep), pool[keep]
    assert sub.shape == copy.shape and len(sub) == 8 and sub.ndim == 2 and sub.dtype == np.float32
    for key in (slice(2, 6), slice(None), np.array([1, 5, 7]), 3, (slice(1, 4), 2)):
        np.testing.assert_array_equal(sub[key], copy[key])
    np.testing.assert_array_equal(np.asarray(sub, dtype=np.float64), copy.astype(np.float64))
    view = PoolView(sub, 10, 80)  # the rows left after the filters, numbered from this process's offset
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in view.blocks(3)]), copy)
    np.testing.assert_array_equal(view.read(np.array([17, 11])), copy[[7, 1]])


@pytest.mark.parametrize("spec", ["similarity", "similarity+decontam+guard"])
def test_peak_memory_per_process_grows_with_its_shard_not_the_pool(tmp_path, spec):
    # With the filters and the guard the rows left are read through the shard's memory map, never copied.
    peaks = {}
    for n in (40_000, 160_000):
        rng = np.random.default_rng(0)
        pool = np.lib.format.open_memmap(tmp_path / f"pool{n}.npy", mode="w+", dtype=np.float32, shape=(n, 384))
        for s in range(0, n, 40_000):
            x = rng.normal(size=(min(40_000, n - s), 384))
            pool[s : s + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
        pool.flush()
        del pool
        np.save(tmp_path / "target.npy", rng.normal(size=(200, 384)).astype(np.float32))
        out = tmp_path / f"rows{n}.jsonl"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "benchmarks" / "scale_out.py"), "--worker", str(tmp_path / f"pool{n}.npy"),
               str(tmp_path / "target.npy"), spec, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        peaks[n] = max(r["peak_rss_gb"] for r in rows)
        assert all(r["dropped"] == (1000 if "decontam" in spec else 0) for r in rows)  # the planted held-out rows
    shard_growth = (160_000 - 40_000) / 2 * 384 * 4 / 2**30
    pool_growth = 2 * shard_growth
    growth = peaks[160_000] - peaks[40_000]
    assert growth < 1.2 * shard_growth + 0.03, (peaks, shard_growth)
    assert growth < 0.75 * pool_growth


# -- processes that disagree, collectives that end, folders every process sees, more processes than rows --

def _torchrun(world: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *args]


def _two_pools(tmp_path: Path, n: int = 12) -> tuple[Path, Path]:
    rows = read_jsonl(SAMPLE / "pool.jsonl", n)
    a, b = tmp_path / "pool_a.jsonl", tmp_path / "pool_b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rows[7] = {**rows[7], "text": rows[7]["text"] + " (a stale copy of the file differs in one row)"}
    b.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return a, b


@pytest.mark.slow
def test_processes_given_different_selections_all_refuse_before_any_work(tmp_path):
    # Today: another pool file or seed on one rank exits 0 with rows of both; another method hangs.
    a, b = _two_pools(tmp_path)
    np.save(tmp_path / "target.npy", np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32))
    cmd = _torchrun(2, str(REPO / "tests" / "workers" / "disagree.py"), str(a), str(b), str(tmp_path / "target.npy"),
                    str(tmp_path / "rank"), str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    differs = {"pool": "pool='12 rows, sha256", "seed": "seed=2 while rank 0 has 1", "method": "method='got_d' while rank 0 has 'similarity'",
               "k": "k=6 while rank 0 has 5", "method_random": "method='random' while rank 0 has 'similarity'"}
    for case, words in differs.items():
        for rank in ranks:  # every process refuses, with the same line naming the setting and the rank
            assert rank[case].get("error") == "JobMismatch", (case, rank[case])
            assert rank[case]["message"] == ranks[0][case]["message"]
        message = ranks[0][case]["message"]
        assert message.startswith(f"Processes disagree on the selection: rank 1 has {words}"), message
        assert message.endswith("every process must run the same job.") and "\n" not in message
    assert ranks[0]["same"] == ranks[1]["same"] and len(ranks[0]["same"]["ok"]) == 5  # the group still works
    # Refused before any scoring: the one score entry per process is the agreed case's.
    assert len(list((tmp_path / "cache" / "scores").iterdir())) == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["late", "crash"])
def test_a_collective_never_hangs_on_a_late_or_failed_process(tmp_path, mode):
    # Today: the late process is waited for (no timeout reaches the group); a crash surfaces as gloo's own text.
    env = {**_env(), "HF_OTSELECT_DIST_TIMEOUT": "5"}
    cmd = _torchrun(2, str(REPO / "tests" / "workers" / "late_rank.py"), mode, str(tmp_path / "rank"))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 100  # well before the late process would have come (120 s)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["error"] == "CollectiveError", got
    assert got["message"].startswith("Process 0 of 2: all_gather between the processes failed after ")
    if mode == "late":
        assert 4 < got["waited_s"] < 60
        assert "within the 5 s timeout" in got["message"] and "dist_timeout_s" in got["message"]
    else:
        assert "another process left the job (its own error is in its log)" in got["message"]


def test_the_collective_timeout_is_a_setting_checked_up_front(monkeypatch):
    from hf_otselect.config import SelectionConfig
    from hf_otselect.dist import DEFAULT_TIMEOUT_S, resolve_timeout

    assert resolve_timeout(None) == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("HF_OTSELECT_DIST_TIMEOUT", "12.5")
    assert resolve_timeout(None) == 12.5 and resolve_timeout(3) == 3.0
    monkeypatch.setenv("HF_OTSELECT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"The 'HF_OTSELECT_DIST_TIMEOUT' parameter of the environment must be a number"):
        resolve_timeout(None)
    base = {"pool": {"path": "p.jsonl"}, "target": {"path": "t.jsonl"}, "method": "random"}
    assert SelectionConfig.from_dict({**base, "dist_timeout_s": 90}).dist_timeout_s == 90.0
    for bad, exc in ((0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("10", TypeError), (True, TypeError)):
        with pytest.raises(exc, match=r"The 'dist_timeout_s' parameter of (SelectionConfig|the job config) must be"):
            SelectionConfig.from_dict({**base, "dist_timeout_s": bad})


def _two_nodes(tmp_path: Path, per_node: list[list[str]], timeout: int = 600) -> list[tuple[int, str]]:
    """Two one-process "nodes" sharing a rendezvous, each running the CLI job with its own overrides."""
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "hf_otselect.cli", "select",
             "--config", str(REPO / "configs" / "demo.yaml"), *overrides],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
        )
        for rank, overrides in enumerate(per_node)
    ]
    errors = [p.communicate(timeout=timeout)[1] for p in nodes]
    return [(p.returncode, err) for p, err in zip(nodes, errors)]


def _leftovers(folder: Path) -> list[str]:
    """What a job left in ``folder`` beyond the lock file every job leaves beside its output."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("setting,values", [
    ("pool.path", None),  # another file with the same rows but one
    ("method", ("similarity", "got_d")),  # today: a hang (GOT-D's fit on one node, similarity's on the other)
    ("seed", ("0", "1")),
])
def test_job_nodes_given_different_jobs_fail_alike_and_write_nothing(tmp_path, setting, values):
    out = tmp_path / "out"
    base = _job_overrides(tmp_path, out, tmp_path / "cache")
    if values is None:
        a, b = _two_pools(tmp_path, 40)
        values = (str(a), str(b))
    results = _two_nodes(tmp_path, [[*base, f"{setting}={v}"] for v in values])
    shown = {"pool.path": f"'{values[1]}' while rank 0 has '{values[0]}'", "method": "'got_d' while rank 0 has 'similarity'",
             "seed": "1 while rank 0 has 0"}[setting]
    for code, err in results:  # every node: its process exits 2 (bad input) with the CLI's one line
        assert code != 0 and "exitcode  : 2 " in err, err[-3000:]
        lines = [line for line in err.splitlines() if "Processes disagree" in line]
        assert len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"hf-otselect: error: Processes disagree on the job: rank 1 has {setting}={shown}")
        assert lines[0].endswith("every process must run the same job.")
    assert _leftovers(tmp_path) == sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl")
    assert not (tmp_path / "cache").exists()  # nothing embedded


@pytest.mark.slow
def test_an_output_dir_not_shared_by_the_nodes_is_named_and_nothing_is_left(tmp_path):
    # Each "node" has its own folder under the same name: rank 1 cannot see what rank 0 writes. Today each
    # node's rows go to its own folder and rank 0 commits an output missing rank 1's rows.
    homes = [tmp_path / "node0", tmp_path / "node1"]
    for home in homes:
        home.mkdir()
    results = _two_nodes(tmp_path, [_job_overrides(tmp_path, home / "out", tmp_path / "cache") for home in homes])
    for code, err in results:  # every node: its process exits 1 (an environment failure) with one line
        assert code != 0 and "exitcode  : 1 " in err, err[-3000:]
        line = [line for line in err.splitlines() if "every process sees" in line]
        assert len(line) == 1, err[-3000:]
        assert line[0].startswith("hf-otselect: error: The 'output_dir' must be on a filesystem every process sees: rank 1")
        assert str(homes[0] / "out.partial") in line[0] and str(homes[1] / "out.partial") in line[0]
    for home in homes:
        assert _leftovers(home) == [], list(home.iterdir())


@pytest.mark.slow
def test_more_processes_than_pool_rows_select_what_one_process_does(tmp_path):
    # Today: IndexError from Dataset.shard on the process whose shard starts past the last row.
    one, three = tmp_path / "one", tmp_path / "three"
    rows = read_jsonl(SAMPLE / "pool.jsonl", 2)
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    overrides = [f"pool.path={tmp_path / 'tiny.jsonl'}", "target.max_rows=5", f"target.path={SAMPLE / 'target.jsonl'}", "k=1",
                 "embedding.max_length=32", "report=false", "method=similarity"]
    cli = ["-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs" / "demo.yaml"), *overrides]
    proc = subprocess.run([sys.executable, *cli, f"output_dir={one}", f"cache_dir={tmp_path / 'c1'}"],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(_torchrun(3, *cli, f"output_dir={three}", f"cache_dir={tmp_path / 'c3'}"),
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_from_disk(str(one)), load_from_disk(str(three))
    for split in ("scored", "selected"):
        assert a[split].to_dict() == b[split].to_dict(), split
    assert len(b["scored"]) == 2 and len(b["selected"]) == 1
    meta, ref = (json.loads((folder / "selection.json").read_text()) for folder in (three, one))
    assert meta["processes"] == 3 and meta["rows"] == {**meta["rows"], "pool": 2, "selected": 1}
    assert meta["fingerprints"] == ref["fingerprints"]  # the whole pool's, not process 0's shard's


@pytest.mark.parametrize("n,world", [(2, 3), (2, 5), (4, 5), (3, 3)])
@pytest.mark.parametrize("method", ["random", "similarity", "got_d", "tsds", "dsir"])
def test_more_processes_than_rows_select_what_one_process_does(tmp_path, method, n, world):
    # Empty shards are legal: such a process joins every collective with no rows (today: IndexError in
    # Dataset.shard); a process none of whose rows is chosen builds an empty split (today: datasets' concat error).
    pool, target, pool_emb, target_emb = _pool_and_vectors(n)
    pool_emb, target_emb = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (pool_emb, target_emb))  # an encoder's

    def run(w):
        def part(comm):
            lo, hi = contiguous_bounds(n, w, comm.rank)
            r = run_selection(pool, target, method, 1, seed=4, cache_dir=tmp_path / f"c{w}", comm=comm,
                              embeddings=(pool_emb[lo:hi], target_emb), **({"chunk_tokens": 5} if method == "dsir" else {}))
            return r.result.indices.tolist(), r.scored.to_dict(), r.selected.to_dict(), r.n_pool
        ranks = run_world(w, part)
        merged = [{key: sum((r[j][key] for r in ranks), []) for key in ranks[0][j]} for j in (1, 2)]
        return ranks[0][0], merged, {r[3] for r in ranks}

    one, many = run(1), run(world)
    assert many[0] == one[0] and many[2] == {n}
    for got, ref in zip(many[1], one[1]):  # scored and selected, every column, in pool order
        # GOT-D's reductions sum in another order across processes: within 1e-6 of the score scale.
        atol = 1e-6 * max(np.abs(ref["score"]).max(initial=0), 1e-30) if method == "got_d" else 0.0
        np.testing.assert_allclose(got.pop("score"), ref.pop("score"), rtol=0, atol=atol)
        assert got == ref


def test_every_process_refuses_another_target_or_setting_in_one_line(tmp_path):
    from hf_otselect.dist import JobMismatch

    pool, target, pool_emb, target_emb = _pool_and_vectors(20)
    other = target_emb.copy()
    other[3, 0] += 1e-3  # one number of one target row

    def ranks(change):
        def part(comm):
            lo, hi = contiguous_bounds(20, 2, comm.rank)
            kwargs = {"seed": 1, "k": 4, "method": "similarity", "tgt": target_emb, "embedding": {}}
            if comm.rank == 1:
                kwargs.update(change)
            try:
                run_selection(pool, kwargs["tgt"], kwargs["method"], kwargs["k"], seed=kwargs["seed"], comm=comm,
                              cache_dir=tmp_path, embeddings=(pool_emb[lo:hi], target_emb), embedding=kwargs["embedding"],
                              **kwargs.get("params", {}))
            except JobMismatch as err:
                return str(err)
            return None
        return run_world(2, part)

    for change, words in [
        ({"tgt": other}, "target='array (20, 16), "),
        ({"params": {"reduce": "max"}}, "params.reduce='max' while rank 0 has 'mean'"),
        ({"embedding": {"max_length": 64}}, "embedding.max_length=64 while rank 0 has (unset)"),
        ({"embedding": {"device": "cpu", "num_proc": 2}}, None),  # per-process resources may differ
    ]:
        got = ranks(change)
        assert got[0] == got[1], change
        if words is None:
            assert got == [None, None]
        else:
            assert got[0].startswith(f"Processes disagree on the selection: rank 1 has {words}"), got[0]


def test_the_pool_fingerprint_is_its_content_wherever_it_was_read(tmp_path):
    from datasets import load_dataset

    from hf_otselect.datasets_ext import content_fingerprint

    rows = read_jsonl(SAMPLE / "pool.jsonl", 30)
    paths = []
    for name in ("node0", "node1"):  # the same file on two nodes' own disks, read through their own caches
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "pool.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    loaded = [load_dataset("json", data_files=str(p), split="train", cache_dir=str(p.parent / "hf")) for p in paths]
    assert loaded[0]._fingerprint != loaded[1]._fingerprint  # datasets' own fingerprint names the place
    assert content_fingerprint(loaded[0]) == content_fingerprint(loaded[1]) == content_fingerprint(Dataset.from_list(rows))
    changed = [dict(r) for r in rows]
    changed[29]["domain"] = changed[29]["domain"] + "!"  # one cell of a column that is not embedded
    assert content_fingerprint(Dataset.from_list(changed)) != content_fingerprint(loaded[0])
    assert content_fingerprint(loaded[0].select(range(29))) != content_fingerprint(loaded[0])


def test_a_folder_each_process_sees_alone_is_refused_on_every_process_and_left_clean(tmp_path):
    from hf_otselect.dist import FolderNotShared, check_shared_folder

    shared, own = tmp_path / "shared", [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for folder in (shared, *own):
        folder.mkdir()

    def part(folders):
        def run(comm):
            try:
                check_shared_folder(comm, folders[comm.rank], wait_s=0.2)
            except FolderNotShared as err:
                return str(err)
            return None
        return run_world(3, run)

    assert part([shared] * 3) == [None] * 3
    got = part(own)  # three "nodes", each with its own folder
    assert got[0] == got[1] == got[2]
    assert got[0].startswith("The 'output_dir' must be on a filesystem every process sees: rank 1 ")
    assert f"(rank 1 looked in '{own[1]}') (nor do ranks [2])" in got[0] and f"wrote in '{own[0]}'" in got[0]
    assert [list(f.iterdir()) for f in (shared, *own)] == [[], [], [], []]  # the probe file is gone


def test_the_job_passes_its_timeout_to_the_process_group(tmp_path, monkeypatch):
    import hf_otselect.job as job
    from hf_otselect.config import load_config

    seen = []

    class Reached(Exception):
        pass

    def fake_get_comm(device=None, timeout_s=None):
        seen.append(timeout_s)
        raise Reached

    monkeypatch.setattr(job, "get_comm", fake_get_comm)
    overrides = [*_job_overrides(tmp_path, tmp_path / "out", tmp_path / "cache"), "dist_timeout_s=7"]
    with pytest.raises(Reached):
        job.run_job(load_config(REPO / "configs" / "demo.yaml", overrides))
    assert seen == [7.0]


_LAUNCHED = """
import atexit, sys
atexit.register(lambda: print("exit handler ran", flush=True))
from hf_otselect.cli import main
code = main(sys.argv[1:])
print("main returned", code)
"""


@pytest.mark.parametrize(("argv", "status"), [(["methods"], 0), (["select", "--config", "missing.yaml"], 2)])
def test_a_launched_cli_process_runs_its_exit_handlers_and_ends_with_the_commands_status(tmp_path, argv, status):
    """Under a launcher (WORLD_SIZE > 1) the CLI ends its process itself, skipping interpreter
    finalisation (where gloo's threads can abort a finished process): the exit handlers still run,
    everything printed arrives, and the status is the command's."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _LAUNCHED, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert proc.stdout.rstrip().endswith("exit handler ran") and "main returned" not in proc.stdout
    if status == 0:
        assert "got_d" in proc.stdout  # the command's own output, flushed before the exit
    else:
        assert "hf-otselect: error:" in proc.stderr and "missing.yaml" in proc.stderr
    alone = subprocess.run([sys.executable, "-c", _LAUNCHED, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")})
    assert alone.returncode == 0 and f"main returned {status}" in alone.stdout  # one process: main returns as before
