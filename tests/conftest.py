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
