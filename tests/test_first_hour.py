"""Issue 23, the first hour of a Hugging Face user: one order, names that work offline, discoverable
methods and keys, advice that is not then refused, no lock files left, TSDS that gives what was
asked for, no clutter. One test (or a few) per item of the issue; each failed on the code before it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, load_from_disk

import hf_otselect
from hf_otselect.config import load_config
from hf_otselect.job import run_job
from tests.conftest import REPO, SAMPLE, read_jsonl

TEXTS = ["aspirin binds the receptor", "the kinase inhibits growth", "stocks fell sharply today",
         "a moving film about loss", "def add(a, b): return a + b", "protein folding in cells"]


def _job(tmp_path: Path, *extra: str, name: str = "out"):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"pool.path={SAMPLE / 'pool.jsonl'}", f"target.path={SAMPLE / 'target.jsonl'}", "pool.max_rows=90",
        "target.max_rows=25", "k=12", "embedding.max_length=64", f"cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / name}", "report=false", *extra,
    ])


def _sample(n_pool: int = 90, n_target: int = 25) -> tuple[Dataset, Dataset]:
    return (Dataset.from_list(read_jsonl(SAMPLE / "pool.jsonl", n_pool)),
            Dataset.from_list(read_jsonl(SAMPLE / "target.jsonl", n_target)))


# --------------------------------------------------------------------- 1. one order, best first
@pytest.mark.parametrize("world", [1, 2])
def test_the_jobs_selected_split_is_best_first_like_select_by_ot(tmp_path, monkeypatch, world):
    """selected/ on disk comes in the order select_by_ot returns: first drawn (or best) first, for
    one process and for two (each writes its own rows in pool order; process 0 reorders them)."""
    import hf_otselect.job as job
    from tests._thread_comm import run_ranks

    config = _job(tmp_path, "method=random")
    if world == 1:
        out = run_job(config)
    else:
        local = threading.local()
        monkeypatch.setattr(job, "get_comm", lambda device=None, timeout_s=None: local.comm)

        def rank(comm):
            local.comm = comm
            return run_job(config)

        out = run_ranks(2, rank)[0]
    on_disk = load_from_disk(str(out / "selected"))
    assert on_disk["draw_order"] == list(range(1, 13))
    pool, target = _sample()
    direct = pool.select_by_ot(target, "random", 12, cache_dir=tmp_path / "cache")
    assert on_disk["pool_index"] == direct["pool_index"] != sorted(direct["pool_index"])
    assert load_from_disk(str(out))["selected"]["pool_index"] == direct["pool_index"]


def test_a_top_k_selection_is_best_first_on_disk(tmp_path):
    out = run_job(_job(tmp_path, "method=similarity"))
    selected = load_from_disk(str(out / "selected"))
    assert selected["rank"] == list(range(1, 13))
    assert selected["score"] == sorted(selected["score"], reverse=True)


def test_push_uploads_the_rows_best_first_even_from_a_folder_saved_in_pool_order(tmp_path):
    import pyarrow.parquet as pq

    from tests.test_hub import FAKE_TOKEN, LocalHub, _cli_push, _provenance

    folder = tmp_path / "out"
    rows = {"text": ["a", "b", "c", "d"], "pool_index": [1, 4, 6, 9], "score": [0.2, 0.9, 0.5, 0.7], "rank": [4, 1, 3, 2]}
    Dataset.from_dict({k: v * 2 for k, v in rows.items()}).save_to_disk(str(folder / "scored"))
    Dataset.from_dict(rows).save_to_disk(str(folder / "selected"))  # pool order: how jobs saved it before
    (folder / "selection.json").write_text(json.dumps(_provenance()))
    (tmp_path / "work").mkdir()
    with LocalHub(FAKE_TOKEN) as hub:
        proc = _cli_push(folder, hub, tmp_path / "work")
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = hub.repos["user/selection"]["files"]
    table = pq.read_table(io.BytesIO(files["data/train-00000-of-00001.parquet"]))
    assert table.column("rank").to_pylist() == [1, 2, 3, 4]
    assert table.column("text").to_pylist() == ["b", "d", "c", "a"]


# --------------------------------------------------------------------- 2. the bundled encoder by name
@pytest.mark.parametrize("name", ["sentence-transformers/all-MiniLM-L6-v2", "bundled"])
def test_the_bundled_encoder_is_reachable_by_its_hub_id_and_by_bundled_offline(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool = Dataset.from_dict({"text": TEXTS})
    default = pool.select_by_ot(["enzyme kinetics of the kinase"], "similarity", 3, cache_dir=tmp_path / "a")
    named = pool.select_by_ot(["enzyme kinetics of the kinase"], "similarity", 3, model=name, cache_dir=tmp_path / "b")
    assert named["pool_index"] == default["pool_index"] and named["score"] == default["score"]
    np.testing.assert_array_equal(hf_otselect.embed(TEXTS[:2], model=name, cache_dir=tmp_path / "c"),
                                  hf_otselect.embed(TEXTS[:2], cache_dir=tmp_path / "c"))


def test_a_job_yaml_and_the_scripts_take_the_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tests.test_scripts import _script

    pre = _script("prefinetune")
    assert pre.model_path("sentence-transformers/all-MiniLM-L6-v2") == hf_otselect.DEFAULT_MODEL
    assert pre.model_path("bundled") == hf_otselect.DEFAULT_MODEL
    out = run_job(_job(tmp_path, "method=similarity", "embedding.model=sentence-transformers/all-MiniLM-L6-v2", "pool.max_rows=20", "k=3"))
    assert json.loads((out / "selection.json").read_text())["model"].startswith("sentence-transformers/all-MiniLM-L6-v2")


# --------------------------------------------------------------------- 4. DatasetDict.select_by_ot
def test_datasetdict_select_by_ot_is_every_split_as_one_pool_or_one_named_split(tmp_path):
    dd = DatasetDict(news=Dataset.from_dict({"text": TEXTS[:3]}), bio=Dataset.from_dict({"text": TEXTS[3:]}))
    whole = dd.select_by_ot(["x"], "random", 4, seed=1)
    assert whole.to_dict() == hf_otselect.select_by_ot(dd, ["x"], "random", 4, seed=1).to_dict()
    assert set(whole["source"]) <= {"news", "bio"} and max(whole["pool_index"]) < 6
    one = dd.select_by_ot(["x"], "random", 2, split="bio", seed=1)
    assert one.to_dict() == dd["bio"].select_by_ot(["x"], "random", 2, seed=1).to_dict()
    with pytest.raises(ValueError, match=r"The 'split' parameter of DatasetDict.select_by_ot must be None \(every split\) or one of \['news', 'bio'\]"):
        dd.select_by_ot(["x"], "random", 2, split="train")


# --------------------------------------------------------------------- 5. discovering what exists
def test_methods_lists_every_method_with_its_parameters_and_defaults(capsys):
    from hf_otselect.cli import main
    from hf_otselect.selectors.base import selector_class

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in hf_otselect.available_selectors():
        assert re.search(rf"^{name}  \({selector_class(name).__name__}\)", out, re.M)
    assert "eps=0.1" in out and "alpha=0.5" in out and "chunk_tokens=100" in out


def test_version_flag_prints_the_package_version(capsys):
    from hf_otselect.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"hf-otselect {hf_otselect.__version__}"


@pytest.mark.parametrize(("override", "suggestion"), [("methdo=tsds", "method"), ("embedding.modle=x", "model"),
                                                      ("pool.colum=text", "column")])
def test_an_unknown_yaml_key_says_did_you_mean(override, suggestion):
    with pytest.raises(ValueError, match=rf"Did you mean '{suggestion}'\? Known keys"):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_an_unknown_keyword_lists_select_by_ots_own_keywords_and_suggests(no_encoder):
    pool = Dataset.from_dict({"text": TEXTS})
    with pytest.raises(TypeError) as err:
        pool.select_by_ot(["x"], "got_d", 2, retrun_scored=True)
    text = str(err.value)
    assert text.startswith("The 'retrun_scored' parameter of select_by_ot must be a keyword of select_by_ot (column, ")
    assert "target_column" in text and "eps" in text and text.endswith("Did you mean 'return_scored'?")
    with pytest.raises(TypeError, match=r"Did you mean 'eps'\?$"):
        pool.select_by_ot(["x"], "got_d", 2, epss=0.1)
    with pytest.raises(ValueError, match=r"Did you mean 'got_d'\?$"):
        pool.select_by_ot(["x"], "gotd", 2)


@pytest.fixture
def no_encoder(monkeypatch):
    embed = sys.modules["hf_otselect.embed"]  # the attribute hf_otselect.embed is the function

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(embed, "load_encoder", refuse)


# --------------------------------------------------------------------- 6. advice that holds, no lock files
def test_a_users_own_folder_is_refused_naming_the_marker_first(tmp_path, no_encoder):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in ("false", "true"):
        with pytest.raises(FileExistsError) as err:
            run_job(_job(tmp_path, f"overwrite={overwrite}", name="mine"))
        assert "has no .hf_otselect.json marker" in str(err.value) and "even with overwrite=true" in str(err.value)
        assert "Pass overwrite=true" not in str(err.value)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_no_lock_file_is_left_after_a_job_that_succeeded_or_failed(tmp_path, monkeypatch):
    import hf_otselect.job as job

    out = run_job(_job(tmp_path, "method=random", name="ok"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["cache", "ok"]
    monkeypatch.setattr(job, "run_selection", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run_job(_job(tmp_path, "method=random", name="failed"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["cache", "ok"]


# --------------------------------------------------------------------- 7. TSDS gives what was asked for
def _tsds_problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    pool = rng.normal(size=(200, 8)).astype(np.float32)
    return pool, (pool[:40] + 0.01 * rng.normal(size=(40, 8))).astype(np.float32)


def test_tsds_gives_k_distinct_rows_by_default_drawn_from_p(caplog):
    from hf_otselect.selectors import TSDSSelector, choose

    pool, target = _tsds_problem()
    sel = TSDSSelector(alpha=0.3, sigma=0.5)
    with caplog.at_level(logging.WARNING):
        got = sel.select(pool, target, 30, seed=4)
    assert len(got.indices) == 30 and np.unique(got.indices).size == 30 and not caplog.records
    assert (got.scores[got.indices] > 0).all()
    # the paper's draws with repeats skipped: sampling without replacement from p, in draw order
    assert got.indices.tolist() == choose(got.scores, 30, mode="sample", seed=4, replace=False).tolist()
    paper = TSDSSelector(alpha=0.3, sigma=0.5, replace=True).select(pool, target, 30, seed=4)
    assert paper.indices.tolist() == choose(paper.scores, 30, mode="sample", seed=4, replace=True).tolist()
    with pytest.raises(ValueError, match=r"The 'k' parameter of TSDSSelector.select must be an int in \[1, 200\]. Got 201"):
        sel.select(pool, target, 201)
    assert len(TSDSSelector(replace=True).select(pool, target, 201).indices) == 201  # the paper's rule allows it


def test_tsds_falls_back_to_the_papers_draws_when_p_reaches_fewer_than_k_rows_and_says_so(caplog):
    from hf_otselect.selectors import TSDSSelector

    pool, target = _tsds_problem()
    sel = TSDSSelector(alpha=1.0, sigma=0.0)  # each query's mass on its nearest row: p reaches <= 40 rows
    support = int((sel.score(pool, target) > 0).sum())
    assert support <= 40
    with caplog.at_level(logging.WARNING):
        got = sel.select(pool, target, 60, seed=2)
    paper = TSDSSelector(alpha=1.0, sigma=0.0, replace=True).select(pool, target, 60, seed=2)
    assert got.indices.tolist() == paper.indices.tolist()
    distinct = np.unique(got.indices).size
    assert f"p reaches only {support} rows, fewer than k=60" in caplog.text and f": {distinct} distinct" in caplog.text
    with pytest.raises(ValueError, match=f"at most the {support} rows with positive probability"):
        TSDSSelector(alpha=1.0, sigma=0.0, replace=False).select(pool, target, 60)


def test_a_default_tsds_call_on_a_small_pool_is_silent(caplog):
    from hf_otselect.selectors import TSDSSelector

    pool, target = _tsds_problem()
    with caplog.at_level(logging.WARNING):
        TSDSSelector().select(pool, target, 20)  # max_K=5000 and kde_K=1000 exceed the 200 rows
    assert not caplog.records


# --------------------------------------------------------------------- 8. clutter and consistency
def test_select_by_ot_shows_no_flattening_bars(capfd):
    import datasets

    datasets.enable_progress_bars()
    pool = Dataset.from_dict({"text": TEXTS, "label": list(range(6))})
    got = pool.select_by_ot(["x"], "random", 3, return_scored=True)
    assert "Flattening the indices" not in capfd.readouterr().err
    assert got["selected"].column_names == ["text", "label", "pool_index", "score", "rank", "draw_order"]
    assert got["selected"]["label"] == [got["scored"]["label"][i] for i in got["selected"]["pool_index"]]
    # a filtered and shuffled pool, and a DatasetDict of such splits, need flattening: quietly
    mixed = pool.filter(lambda row: row["label"] != 2).shuffle(seed=0)
    mixed.select_by_ot(["x"], "random", 2)
    DatasetDict(a=mixed, b=mixed.select([3, 1])).select_by_ot(["x"], "random", 2)
    assert "Flattening the indices" not in capfd.readouterr().err
    assert not datasets.are_progress_bars_disabled()  # the user's setting is back


def test_the_embedding_bar_does_not_count_the_encoder_load(tmp_path, monkeypatch, capfd):
    """The bar's clock starts when the first batch starts: a slow model load (here 4 s) no longer
    turns into a first ETA many times the real one."""
    import time

    embed = sys.modules["hf_otselect.embed"]
    real = embed.load_encoder

    def slow(*args, **kwargs):
        time.sleep(4)
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "load_encoder", slow)
    monkeypatch.setattr(embed, "_ENCODERS", {})  # loaded afresh, through the slow load
    hf_otselect.embed(TEXTS[:2], cache_dir=tmp_path, show_progress=True)
    elapsed = re.findall(r"2/2 \[(\d+):(\d+)<", capfd.readouterr().err)
    assert elapsed and int(elapsed[-1][0]) * 60 + int(elapsed[-1][1]) < 3


def test_a_prefinetune_yaml_reads_relative_paths_from_its_folder(tmp_path, monkeypatch):
    from tests.test_scripts import _script

    pre = _script("prefinetune")
    folder = tmp_path / "configs"
    (folder / "job").mkdir(parents=True)
    (folder / "args.yaml").write_text("model_name_or_path: sentence-transformers/all-MiniLM-L6-v2\ntrain_data: job\n"
                                      "validation_data: missing.jsonl\noutput_dir: ../warm\nuse_cpu: true\nreport_to: none\n")
    monkeypatch.chdir(tmp_path / "configs" / "job")  # anywhere else
    model_args, data_args, training_args = pre.parse_args([str(folder / "args.yaml")])
    assert data_args.train_data == str(folder / "job")
    assert data_args.validation_data == "missing.jsonl"  # not there: left as given (a Hub id, say)
    assert training_args.output_dir == str(tmp_path / "warm")
    assert model_args.model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert pre.model_path(model_args.model_name_or_path) == hf_otselect.DEFAULT_MODEL
    (folder / "bad.yaml").write_text("train_data: job\nblok_size: 3\n")
    with pytest.raises(ValueError, match=r"Unknown key 'blok_size' in .*bad.yaml'. Did you mean 'block_size'\?"):
        pre.parse_args([str(folder / "bad.yaml")])
