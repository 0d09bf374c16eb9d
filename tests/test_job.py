from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from hf_otselect import FittedSelector
from hf_otselect.config import load_config
from hf_otselect.fitted import choice_keys
from hf_otselect.hub import config_from_card
from hf_otselect.job import load_split, output_paths, run_job
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
    # The fit each job kept scores the pool alike: process 0 saved the 2-process fit, whose
    # reductions sum in another order (GOT-D: within 1e-6 of the score scale).
    pool = load_split(cfg.pool, "pool")
    one_fit, two_fit = (FittedSelector.from_pretrained(folder / "selector") for folder in (single, two))
    ref, got = (np.asarray(pool.map(f, batched=True)["score"]) for f in (one_fit, two_fit))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert two_fit.fit_info["processes"] == 2 and two_fit.fit_info["n_fit"] == one_fit.fit_info["n_fit"] == 90
    shutil.rmtree(tmp_path / "cache2")


@pytest.mark.parametrize("method", ["got_d", "similarity", "dsir"])
def test_the_job_keeps_its_fit_and_the_saved_selector_maps_to_the_scored_column(tmp_path, method):
    """Issue 20 item 3: the fit outlives the job; applied to the pool it gives the job's scores."""
    params = ["params={chunk_tokens: 8}"] if method == "dsir" else []
    config = _config(tmp_path, f"method={method}", *params)
    out = run_job(config)
    fitted = FittedSelector.from_pretrained(out / "selector")
    assert fitted.method == method and fitted.fit_info["n_fit"] == 90
    prov = json.loads((out / "selection.json").read_text())
    assert prov["fitted_selector"] == {"saved": True, "path": "selector", "fingerprint": fitted.fingerprint, "scores": "any row"}
    assert "## The fitted selector" in (out / "README.md").read_text()
    scored = load_from_disk(str(out / "scored")).sort("pool_index")
    ref = np.asarray(scored["score"])
    pool = load_split(config.pool, "pool")
    # On texts the map embeds them itself, a batch at a time (the job: length-sorted shards), so
    # the vectors differ in float32 rounding: the scores within 1e-6 of their scale; DSIR reads
    # the texts, exact.
    on_texts = np.asarray(pool.map(fitted, batched=True, batch_size=32)["score"])
    if method == "dsir":
        np.testing.assert_array_equal(on_texts, ref)
    else:
        np.testing.assert_allclose(on_texts, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
        # On the job's own vectors the scoring path is the job's: similarity exact, GOT-D within
        # 1e-6 (its c-transform reduces over blocks of another size).
        vectors = np.load(out / "embeddings" / "pool.npy")
        on_vectors = np.asarray(pool.add_column("vec", vectors.tolist()).map(fitted.using(vector_column="vec"), batched=True,
                                                                                  batch_size=32)["score"])
        if method == "got_d":
            np.testing.assert_allclose(on_vectors, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
        else:
            np.testing.assert_array_equal(on_vectors, ref)
    # The calibration is the quantiles of the job's own keys (scores, or DSIR's log-weight + Gumbel):
    # exactly the best 10% of them lie at or above its threshold for 0.1.
    keys = choice_keys(ref, np.arange(ref.size), fitted.choice, fitted.seed)
    assert (keys >= fitted.calibrated_threshold(0.1)).sum() == 9


@pytest.mark.parametrize("radius", [0.3, 1.1])
def test_rename_happens_only_once_every_output_file_is_in_the_partial_folder(tmp_path, monkeypatch, radius):
    """Issue 16: the output is renamed into place only when complete, not just before any write.

    ``os.replace`` is intercepted; at the moment the partial folder is renamed its whole content is
    read back and checked against plain recomputations (ranks by a sort written here, the selected
    rows from those ranks), and nothing may be added to the folder after the rename. Radius 0.3
    removes no pool row (no decontaminated/ split: datasets cannot read back a 0-row one), 1.1 some.
    """
    import numpy as np

    config = _config(
        tmp_path, "report=true", "report_columns=[domain]", "source_column=domain", "prefilter.keep=4",
        "prefilter.sample_size=100", f"decontaminate.path={REPO / 'data/sample/target_eval.jsonl'}",
        "decontaminate.column=text", f"decontaminate.radius={radius}",
    )
    out, partial = output_paths(config.output_dir)
    real_replace = os.replace
    seen: dict[str, object] = {}

    def spy(src, dst, *args, **kwargs):
        if Path(src) == partial:
            assert Path(dst) == out and not out.exists()
            seen["files"] = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
            scored = load_from_disk(str(partial / "scored"))
            selected = load_from_disk(str(partial / "selected"))
            assert len(scored) == 90 and scored["pool_index"] == list(range(90))
            scores = np.asarray(scored["score"], dtype=float)
            # ranks (from 1) by a plain sort: highest score first, ties to the lower row, unscored (NaN) last
            order = sorted(range(90), key=lambda i: (np.isnan(scores[i]), -np.nan_to_num(scores[i]), i))
            assert selected["pool_index"] == order[:12]  # best first on disk, as select_by_ot returns them
            assert [p for _, p in sorted(zip(selected["rank"], selected["pool_index"]))] == order[:12]
            assert sorted(selected["rank"]) == list(range(1, 13))
            assert [i for i in range(90) if scored["selected"][i]] == sorted(order[:12])
            assert set(load_from_disk(str(partial))) == {"scored", "selected"}  # one DatasetDict
            prov = json.loads((partial / "selection.json").read_text())
            assert prov["k"] == 12 and prov["rows"]["selected"] == 12 and prov["rows"]["pool"] == 90
            assert {"prefilter", "decontamination"} <= set(prov)
            card = (partial / "README.md").read_text()
            assert card.startswith("---\n") and "got_d" in card
            assert np.load(partial / "embeddings" / "pool.npy").shape == (90, 384)
            assert np.load(partial / "embeddings" / "target.npy").shape == (25, 384)
            assert (partial / "report.html").stat().st_size > 1000
            assert len(load_from_disk(str(partial / "prefilter"))) >= 1
            prov_drops = prov["decontamination"]
            if radius > 1:
                assert len(load_from_disk(str(partial / "decontaminated"))) >= 1
            seen["drops"] = prov_drops
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    assert run_job(config) == out
    assert "files" in seen, "the partial folder was never renamed with os.replace"
    # nothing was written after the rename: the folder holds exactly what the partial one held
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == seen["files"]
    want = {"selection.json", "README.md", "report.html", "embeddings/pool.npy", "embeddings/target.npy", "dataset_dict.json",
            "scored/state.json", "selected/state.json", "prefilter/state.json"}
    assert want | ({"decontaminated/state.json"} if radius > 1 else set()) <= set(seen["files"])
    assert ("decontaminated/state.json" in seen["files"]) == (radius > 1), seen["drops"]
    assert not partial.exists()
