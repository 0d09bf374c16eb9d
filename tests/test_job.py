from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from hf_otselect.config import load_config
from hf_otselect.hub import config_from_card
from hf_otselect.job import output_paths, run_job
from tests.conftest import REPO


def _config(tmp_path: Path, *extra: str):
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"pool.path={REPO / 'data/sample/pool.jsonl'}",
            f"target.path={REPO / 'data/sample/target.jsonl'}",
            "pool.max_rows=90",
            "target.max_rows=25",
            "k=12",
            "embedding.max_length=64",
            f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}",
            "report=false",
            *extra,
        ],
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_job_writes_a_complete_folder(tmp_path):
    out = run_job(_config(tmp_path))
    assert out == (tmp_path / "out").resolve()
    assert {"scored", "selected", "selection.json", "README.md", "embeddings"} <= {p.name for p in out.iterdir()}
    assert not output_paths(out)[1].exists()
    selected = load_from_disk(str(out / "selected"))
    scored = load_from_disk(str(out / "scored"))
    assert len(selected) == 12 and len(scored) == 90
    prov = json.loads((out / "selection.json").read_text())
    assert prov["method"] == "got_d" and prov["k"] == 12 and prov["seed"] == 0
    assert prov["rows"] == {"pool": 90, "target": 25, "selected": 12, "selected_unique": 12}
    assert prov["fingerprints"]["pool"] and prov["fingerprints"]["target"]
    # GOT-D moves the data toward the target: the selection is closer than the pool as a whole
    assert prov["ot_distance"]["target_selection"] < prov["ot_distance"]["target_pool"]
    assert prov["hf_otselect_version"] and "embed_s" in prov["timings_s"]


def test_existing_output_is_refused_before_work(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    import hf_otselect.job as job

    monkeypatch.setattr(job, "load_split", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(FileExistsError, match="'output_dir'.*overwrite=true"):
        run_job(_config(tmp_path))


def test_a_crashed_job_leaves_nothing_that_looks_complete_and_reruns(tmp_path, monkeypatch):
    import hf_otselect.job as job

    config = _config(tmp_path)
    original = job.run_selection

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(job, "run_selection", crash)
    with pytest.raises(KeyboardInterrupt):
        run_job(config)
    out, partial = output_paths(config.output_dir)
    assert not out.exists() and partial.exists()
    monkeypatch.setattr(job, "run_selection", original)
    assert run_job(config) == out and not partial.exists()


def test_reruns_are_byte_identical_and_the_card_reproduces_the_job(tmp_path):
    first = run_job(_config(tmp_path, f"output_dir={tmp_path / 'a'}"))
    second = run_job(_config(tmp_path, f"output_dir={tmp_path / 'b'}"))
    a, b = _files(first / "selected"), _files(second / "selected")
    assert a == b
    assert _files(first / "scored") == _files(second / "scored")
    config = config_from_card(first / "README.md")
    assert config.to_dict() == _config(tmp_path, f"output_dir={tmp_path / 'a'}").to_dict()
    config.output_dir = str(tmp_path / "c")
    third = run_job(config)
    assert _files(third / "selected") == a


@pytest.mark.slow
def test_two_process_launch_gives_the_one_process_selection(tmp_path):
    single = run_job(_config(tmp_path, f"output_dir={tmp_path / 'one'}"))
    cfg = _config(tmp_path, f"output_dir={tmp_path / 'two'}")
    overrides = [f"{k}={v}" for k, v in [
        ("pool.path", cfg.pool.path), ("target.path", cfg.target.path), ("pool.max_rows", 90),
        ("target.max_rows", 25), ("k", 12), ("embedding.max_length", 64), ("cache_dir", tmp_path / "cache2"),
        ("output_dir", cfg.output_dir), ("report", "false"),
    ]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*torchrun, "-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs/demo.yaml"), *overrides],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Path(cfg.output_dir)
    one_sel = load_from_disk(str(single / "selected"))
    two_sel = load_from_disk(str(two / "selected"))
    assert two_sel["pool_index"] == one_sel["pool_index"]
    shutil.rmtree(tmp_path / "cache2")
