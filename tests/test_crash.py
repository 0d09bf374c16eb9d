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

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        "report=false", "params.tol=1.0e-30", "params.max_iter=20000",
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
