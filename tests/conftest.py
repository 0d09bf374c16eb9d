"""Shared fixtures: the bundled sample data and a private cache per test session."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED_DATA = Path(os.environ.get("HF_OTSELECT_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name``, the name it has when another benchmark imports it
    (they put benchmarks/ on sys.path), so a test and the benchmarks share one copy."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_jsonl(path: Path, n: int | None = None) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if n is not None and len(rows) == n:
                break
    return rows


@pytest.fixture(scope="session")
def sample_pool_rows() -> list[dict]:
    return read_jsonl(SAMPLE / "pool.jsonl")


@pytest.fixture(scope="session")
def sample_target_rows() -> list[dict]:
    return read_jsonl(SAMPLE / "target.jsonl")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def torchrun_filters(tmp_path_factory) -> dict[int, dict]:
    """tests/workers/filters_sharded.py under real torchrun (gloo, CPU) at 2 and 3 processes: rank 0's JSON per world."""
    import subprocess

    folder = tmp_path_factory.mktemp("filters_torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    outs = {}
    for world in (2, 3):
        out = folder / f"w{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(REPO / "tests" / "workers" / "filters_sharded.py"), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=folder)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[world] = json.loads(out.read_text())
    return outs


def cli_error_line(capsys) -> str:
    """The one ``hf-otselect: error: ...`` line a refused command prints (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("hf-otselect: error: ")]
    assert len(lines) == 1, err
    return lines[0]
