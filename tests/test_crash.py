"""Crash safety with real processes: ``kill -9`` a job while it embeds, then while it scores.

The job (``hf-otselect select`` on 240 pool rows, 20-row embedding shards) is started as a
subprocess; the test watches the shard cache and sends SIGKILL once some but not all shards exist
(embedding), then, on the rerun, once every shard exists but no scores do (scoring: a Sinkhorn held
at ``max_iter`` iterations keeps that phase at a second or more). After each kill nothing that
looks like a finished output may exist. The rerun must resume: shards finished before a kill keep
their inode and mtime (never recomputed), and after the scoring kill the encoder is not even
loaded. The final folder must be byte-identical (scored/, selected/, embeddings/) to a run that was
never interrupted and used a cache of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hf_otselect.cache import load_json
from tests.conftest import REPO

N_POOL, N_TARGET, SHARD = 240, 20, 20
N_SHARDS = N_POOL // SHARD + 1  # pool shards + one target shard

pytestmark = pytest.mark.slow


def _command(cache: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs/demo.yaml"),
        f"pool.path={REPO / 'data/sample/pool.jsonl'}", f"target.path={REPO / 'data/sample/target.jsonl'}",
        f"pool.max_rows={N_POOL}", f"target.max_rows={N_TARGET}", "k=15", "embedding.max_length=32",
        "embedding.batch_size=20", f"embedding.shard_rows={SHARD}", f"cache_dir={cache}", f"output_dir={out}",
        "report=false", "params.tol=0", "params.max_iter=20000",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _shards(cache: Path) -> dict[str, tuple[int, int]]:
    """Finished embedding shards: name -> (inode, mtime_ns). Temporary files start with '.'."""
    folder = cache / "embeddings"
    found = {}
    for p in folder.rglob("*.npy") if folder.exists() else ():
        if not p.name.startswith("."):
            st = p.stat()
            found[p.name] = (st.st_ino, st.st_mtime_ns)
    return found


def _scores(cache: Path) -> list[Path]:
    return list((cache / "scores").rglob("scores.npy")) if (cache / "scores").exists() else []


def _run(cache: Path, out: Path, log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as fh:
        proc = subprocess.run(_command(cache, out), stdout=fh, stderr=subprocess.STDOUT, env=_env(), timeout=600, cwd=out.parent)
    return proc


def _run_and_kill(cache: Path, out: Path, log: Path, ready) -> None:
    """Start the job and SIGKILL it as soon as ``ready()`` holds; fail if it ends first."""
    with log.open("w") as fh:
        proc = subprocess.Popen(_command(cache, out), stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=out.parent)
        try:
            deadline = time.monotonic() + 600
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"the job ended (status {proc.returncode}) before the kill point:\n{log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("the kill point was never reached")
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_nothing_complete(out: Path) -> None:
    assert not out.exists(), "a killed job left a folder at the final output path"
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        names = {p.name for p in partial.rglob("*")}
        assert not names & {"selection.json", "selected", "scored", "README.md"}, names


def test_kill_9_while_embedding_and_while_scoring_then_resume_byte_identical(tmp_path):
    # The uninterrupted reference, with its own cache.
    ref = tmp_path / "ref"
    done = _run(tmp_path / "ref_cache", ref, tmp_path / "ref.log")
    assert done.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert len(_shards(tmp_path / "ref_cache")) == N_SHARDS

    cache, out = tmp_path / "cache", tmp_path / "out"

    # 1. Killed while embedding: some pool shards finished, not all.
    _run_and_kill(cache, out, tmp_path / "kill1.log", lambda: len(_shards(cache)) >= 3)
    before = _shards(cache)
    assert 3 <= len(before) < N_SHARDS, f"killed with {len(before)} of {N_SHARDS} shards"
    assert not _scores(cache)
    _assert_nothing_complete(out)

    # 2. The rerun resumes (finished shards untouched); kill it while it scores.
    _run_and_kill(cache, out, tmp_path / "kill2.log", lambda: len(_shards(cache)) == N_SHARDS)
    after = _shards(cache)
    assert len(after) == N_SHARDS
    assert {name: after[name] for name in before} == before, "a finished shard was recomputed"
    assert not _scores(cache), "scoring finished before the kill: the kill point was missed"
    _assert_nothing_complete(out)

    # 3. The last rerun loads no encoder at all and writes the reference's bytes.
    final = _run(cache, out, tmp_path / "final.log")
    log = (tmp_path / "final.log").read_text()
    assert final.returncode == 0, log[-3000:]
    assert "Embedding with" not in log, "the encoder was loaded although every shard was cached"
    assert _shards(cache) == after
    assert not out.with_name("out.partial").exists()
    for part in ("scored", "selected", "embeddings"):
        assert _files(out / part) == _files(ref / part), f"{part}/ differs from the uninterrupted run"


# ----------------------------------------------------------------------------------------------
# damaged cache entries: logged, discarded, recomputed; never used, never a permanent failure


def _small_pool(n: int = 36):
    from datasets import Dataset

    from tests.conftest import SAMPLE, read_jsonl

    return Dataset.from_list(read_jsonl(SAMPLE / "pool.jsonl", n))


def _select(cache: Path, pool, method: str = "got_d", k: int = 5):
    from hf_otselect import select_by_ot
    from tests.conftest import SAMPLE, read_jsonl

    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 6)]
    dd = select_by_ot(pool, target, method, k, cache_dir=cache, return_scored=True,
                      embedding={"max_length": 32, "shard_rows": 12})
    return dd["selected"]["pool_index"], np.asarray(dd["scored"]["score"])


def _data_offset(path: Path) -> int:
    """Where a .npy file's numbers start (after its header)."""
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read(fh)
        return fh.tell()


@pytest.mark.parametrize("row", [0, 7], ids=["first-row", "middle-row"])
def test_a_shard_with_changed_numbers_and_an_intact_header_is_recomputed(tmp_path, caplog, row):
    pool = _small_pool()
    want_rows, want_scores = _select(tmp_path / "ref_cache", pool)
    cache = tmp_path / "cache"
    _select(cache, pool)
    shards = sorted((cache / "embeddings").rglob("*.npy"))
    assert len(shards) == 4  # 3 pool shards of 12 rows + the target's
    victim = next(p for p in shards if np.load(p).shape[0] == 12)
    original = victim.read_bytes()
    vectors = np.load(victim)
    damaged = vectors.copy()
    damaged[row] = -vectors[row]  # still finite unit vectors: only a checksum can tell
    at = _data_offset(victim)
    victim.write_bytes(original[:at] + damaged.astype("<f4").tobytes())
    assert np.load(victim).shape == vectors.shape and not np.array_equal(np.load(victim), vectors)
    with caplog.at_level("WARNING", logger="hf_otselect.cache"):
        rows, scores = _select(cache, pool)
    assert any("Discarding the damaged cache entry" in r.getMessage() and victim.name in r.getMessage() for r in caplog.records)
    assert rows == want_rows
    np.testing.assert_array_equal(scores, want_scores)
    assert victim.read_bytes() == original  # recomputed and written back whole


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flip":  # the last number's bytes, the header untouched
        path.write_bytes(data[:-8] + bytes(b ^ 0x5A for b in data[-8:]))
    elif how == "no-checksum":
        Path(str(path) + ".check.json").unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    ("method", "name", "how"),
    [("got_d", "scores.npy", "truncate"), ("got_d", "scores.npy", "flip"), ("got_d", "info.json", "truncate"),
     ("tsds", "info.json", "empty"), ("similarity", "scores.npy", "no-checksum"), ("got_d", "scores.npy.check.json", "truncate"),
     ("got_d", "selector/state.safetensors", "flip"), ("similarity", "selector/fitted_selector.json", "truncate")],
)
def test_a_damaged_score_entry_is_recomputed_and_never_a_permanent_failure(tmp_path, caplog, method, name, how):
    pool = _small_pool(30)
    cache = tmp_path / "cache"
    want_rows, want_scores = _select(cache, pool, method)
    (entry,) = list((cache / "scores").glob("*"))
    names = sorted(p.name for p in entry.iterdir())  # the files and the kept fit's folder (selector/)
    intact = {p.name: p.read_bytes() for p in entry.iterdir() if p.is_file()}
    _damage(entry / name, how)
    with caplog.at_level("INFO"):
        rows, scores = _select(cache, pool, method)
    messages = [r.getMessage() for r in caplog.records]
    damaged = "The cached fit in" if name.startswith("selector/") else "Discarding the damaged cache entry"
    assert any(damaged in m for m in messages), messages
    assert not any("Scores read from the cache" in m for m in messages)
    assert rows == want_rows
    np.testing.assert_array_equal(scores, want_scores)
    # Rewritten whole and verified (info.json holds timings, so only its keys are compared).
    assert (entry / "scores.npy").read_bytes() == intact["scores.npy"]
    assert sorted(p.name for p in entry.iterdir()) == names
    info = load_json(entry / "info.json", key=entry.name)
    assert info is not None and sorted(info) == sorted(json.loads(intact["info.json"]))
    caplog.clear()
    with caplog.at_level("INFO"):  # and the entry is good again: read, not recomputed
        assert _select(cache, pool, method)[0] == want_rows
    assert any("Scores read from the cache" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# two jobs on one output folder


def test_two_jobs_started_together_on_one_folder_leave_a_consistent_output(tmp_path):
    """One holds the lock; the other fails at once naming it, or runs after it. Either way the
    folder left is one job's whole output: selection.json describes exactly the splits beside it."""
    from datasets import load_from_disk

    out = tmp_path / "out"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    for log, k in zip(logs, (4, 9)):
        cmd = [*_command(tmp_path / f"cache_{k}", out), f"k={k}", "overwrite=true", "pool.max_rows=60"]
        with log.open("w") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path))
    codes = [p.wait(timeout=600) for p in procs]
    texts = [log.read_text() for log in logs]
    assert 0 in codes, texts
    for code, text in zip(codes, texts):
        if code != 0:
            errors = [ln for ln in text.splitlines() if ln.startswith("hf-otselect: error: ")]
            assert len(errors) == 1 and "is being written by another job (pid " in errors[0], text[-2000:]
            assert "Traceback" not in text
    prov = json.loads((out / "selection.json").read_text())
    selected, scored = load_from_disk(str(out / "selected")), load_from_disk(str(out / "scored"))
    assert prov["rows"]["selected"] == len(selected) == prov["k"]
    assert prov["rows"]["pool"] == len(scored) == 60
    assert sorted(selected["rank"]) == list(range(1, prov["k"] + 1))
    assert not out.with_name("out.partial").exists() and not out.with_name("out.previous").exists()
