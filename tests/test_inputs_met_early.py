"""Inputs met late or unclearly (issue 21, class 4): each refused up front, in the one template, on every path.

Each group covers its class over several cases and every method where it applies: a stream without
declared features carrying the columns a selection adds, NaN/Inf in vectors handed in, a text
selector given non-text values, seeds past 64 bits, candidates that are no 2-D array, a device the
machine lacks, a cache folder that is no path or holds a read-only part, and a card whose replay
would run remote code or push elsewhere, or whose size meets a different rule by form.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, IterableDataset

import hf_otselect
from hf_otselect.config import MAX_YAML_BYTES, load_config
from hf_otselect.datasets_ext import run_selection
from hf_otselect.selectors import available_selectors, get_selector
from tests._thread_comm import run_ranks
from tests.conftest import REPO
from tests.test_bad_inputs import TARGET, no_encoder, pool, template  # noqa: F401 - fixtures

VECTOR_SELECTORS = [m for m in available_selectors() if not get_selector(m).needs_text]
READING_VECTORS = [m for m in VECTOR_SELECTORS if get_selector(m).needs_vectors]


def _cloud(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


# ------------------------------------------------------------------------ a stream's own columns
@pytest.mark.parametrize("taken", ["selected", "rank", "pool_index", "draw_order", "score"])
@pytest.mark.parametrize("method", ["random", "got_d", "dsir"])
def test_a_stream_without_features_that_has_a_column_the_selection_adds_is_refused(tmp_path, no_encoder, taken, method):
    def rows():
        for i in range(12):
            yield {"text": f"streamed row {i} about markets", taken: i}

    stream = IterableDataset.from_generator(rows)
    assert stream.column_names is None  # no declared features: the columns are known only by reading
    kind = "score_column" if taken == "score" else "dataset"
    with pytest.raises(ValueError, match=template(kind) + rf".*Got .*'{taken}'.* instead"):
        list(hf_otselect.select_by_ot(stream, TARGET, method=method, k=2, cache_dir=tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_a_stream_without_features_and_without_the_text_column_is_refused_before_the_encoder(tmp_path, no_encoder):
    stream = IterableDataset.from_generator(lambda: ({"body": f"row {i}"} for i in range(5)))
    with pytest.raises(ValueError, match=r"Column 'text' not in the dataset\. Current columns: \['body'\]"):
        hf_otselect.select_by_ot(stream, TARGET, method="got_d", k=2, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------ NaN / Inf in vectors handed in
def _poisoned(kind: str) -> np.ndarray:
    x = _cloud(20)
    if kind in ("nan", "both"):
        x[3, 1] = np.nan
    if kind in ("inf", "both"):
        x[7, 0] = -np.inf
    return x


@pytest.mark.parametrize("kind", ["nan", "inf", "both"])
@pytest.mark.parametrize("method", READING_VECTORS)
def test_nan_or_inf_in_pool_vectors_handed_in_is_refused_naming_the_rows(tmp_path, pool, method, kind):
    rows = {"nan": "1 row(s) with NaN or Inf: rows [3]", "inf": "1 row(s) with NaN or Inf: rows [7]",
            "both": "2 row(s) with NaN or Inf: rows [3, 7]"}[kind]
    with pytest.raises(ValueError, match=template("embeddings") + r"pool vectors that are finite.*Got '" + re.escape(rows) + "' instead"):
        run_selection(pool, TARGET, method, 3, cache_dir=tmp_path / "c", embeddings=(_poisoned(kind), _cloud(2, seed=1)))
    target = _cloud(2, seed=1)
    target[1, 4] = np.nan
    with pytest.raises(ValueError, match=template("embeddings") + r"target vectors that are finite.*rows \[1\]"):
        run_selection(pool, TARGET, method, 3, cache_dir=tmp_path / "c", embeddings=(_cloud(20), target))
    assert not (tmp_path / "c" / "scores").exists()


@pytest.mark.parametrize("method", READING_VECTORS)
def test_every_process_refuses_nan_held_by_one_of_them(tmp_path, pool, method):
    vectors, target = _poisoned("nan"), _cloud(2, seed=1)
    vectors[15, 2] = np.inf  # in the second process's half, row 15 of the pool (its local row 5)

    def part(comm):
        lo, hi = (0, 10) if comm.rank == 0 else (10, 20)
        try:
            run_selection(pool, TARGET, method, 3, cache_dir=tmp_path / f"c{comm.rank}", comm=comm, embeddings=(vectors[lo:hi], target))
        except ValueError as err:
            return str(err)
        return "accepted"

    first, second = run_ranks(2, part)  # no rank left waiting in a collective: both answer
    # each names its own rows by their global index; the count is the whole pool's
    assert "Got '2 row(s) with NaN or Inf: rows [3, ...]'" in first and "Got '2 row(s) with NaN or Inf: rows [15, ...]'" in second


@pytest.mark.parametrize("method", VECTOR_SELECTORS)
def test_the_array_api_names_the_rows_with_nan(method):
    with pytest.raises(ValueError, match=template("candidates") + r"finite.*2 row\(s\) with NaN or Inf: rows \[3, 7\]"):
        get_selector(method).select(_poisoned("both"), _cloud(2, seed=1), k=2)


# ------------------------------------------------------------------------ a text selector given other values
@pytest.mark.parametrize(("values", "shown"), [
    ([1, 2, 3, 4], r"int \(e\.g\. 1\) at row\(s\) \[0, 1, 2, 3\]"),
    ([1.5, 2.5, 3.5, 4.5], r"float \(e\.g\. 1\.5\) at row\(s\) \[0, 1, 2, 3\]"),
    (["a fine row", "another", None, "more"], r"NoneType .* at row\(s\) \[2\]"),
    ([["a", "list"], ["b"], ["c"], ["d"]], r"list .* at row\(s\) \[0, 1, 2, 3\]"),
    ([True, False, True, True], r"bool .* at row\(s\) \[0, 1, 2, 3\]"),
])
def test_dsir_on_a_column_that_is_not_text_is_refused_naming_it(tmp_path, no_encoder, values, shown):
    data = Dataset.from_dict({"text": values})
    with pytest.raises(TypeError, match=r"The 'data' parameter of select_by_ot must hold str values in column 'text'\. Got " + shown):
        hf_otselect.select_by_ot(data, TARGET, method="dsir", k=1, cache_dir=tmp_path / "cache")


def test_dsir_on_a_target_column_that_is_not_text_is_refused(tmp_path, pool, no_encoder):
    target = Dataset.from_dict({"text": [3, 7]})
    with pytest.raises(TypeError, match=r"select_by_ot \(target\) must hold str values in column 'text'\. Got int .* at row\(s\) \[0, 1\]"):
        hf_otselect.select_by_ot(pool, target, method="dsir", k=1, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"must hold non-empty texts in column 'text'.* at row\(s\) \[1\]"):
        hf_otselect.select_by_ot(Dataset.from_dict({"text": ["a row", "   ", "more"]}), TARGET, method="dsir", k=1, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------ seeds past 64 bits
SEED_RANGE = r"an int in \[0, 18446744073709551615\]"


@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_a_seed_outside_64_bits_is_refused_at_every_entry(tmp_path, pool, no_encoder, seed):
    with pytest.raises(ValueError, match=template("seed") + SEED_RANGE + rf"\. Got {seed} instead"):
        hf_otselect.select_by_ot(pool, TARGET, method="random", k=2, seed=seed, cache_dir=tmp_path / "c")
    for method in available_selectors():
        data, target = (pool["text"], TARGET) if get_selector(method).needs_text else (_cloud(20), _cloud(2, seed=1))
        with pytest.raises(ValueError, match=template("seed") + SEED_RANGE):
            get_selector(method).select(data, target, k=2, seed=seed)
    for method in ("got_d", "tsds"):  # their own seed parameter
        with pytest.raises(ValueError, match=template("seed") + SEED_RANGE):
            get_selector(method, seed=seed)
    with pytest.raises(ValueError, match=template("seed") + SEED_RANGE):
        load_config(REPO / "configs" / "demo.yaml", [f"seed={seed}"])


@pytest.mark.parametrize("method", VECTOR_SELECTORS)
def test_the_largest_64_bit_seed_works(method):
    x, y = _cloud(300), _cloud(4, seed=1)
    params = {"got_d": {"seed": 2**64 - 1, "chunk_size": 100}, "tsds": {"seed": 2**64 - 1, "index": "ivf"}}.get(method, {})
    first = get_selector(method, **params).select(x, y, k=5, seed=2**64 - 1)
    again = get_selector(method, **params).select(x, y, k=5, seed=2**64 - 1)
    assert len(first.indices) == 5 and first.indices.tolist() == again.indices.tolist()


# ------------------------------------------------------------------------ candidates that are no 2-D array
@pytest.mark.parametrize("shape", [(4, 3, 2), (4,), (2, 2, 2, 2)])
@pytest.mark.parametrize("method", VECTOR_SELECTORS)
def test_candidates_of_the_wrong_rank_are_named_before_k(method, shape):
    # k = 5 exceeds len() of each array: the message must be about the shape, not about k
    with pytest.raises(ValueError, match=template("candidates") + r"a 2-D float array of shape \(n, dim\)\. Got 'an array of shape"):
        get_selector(method).select(np.zeros(shape, np.float32), _cloud(2, 2), k=5)


# ------------------------------------------------------------------------ a device the machine lacks
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_a_solver_device_the_machine_lacks_is_refused_by_the_selector_itself(device):
    with pytest.raises(ValueError, match=template("device") + r".*(CUDA|MPS) is not available.*Got '" + device):
        get_selector("got_d", device=device)
    with pytest.raises(ValueError, match=template("device") + r".*(CUDA|MPS) is not available"):
        hf_otselect.GOTDSelector(device=device).select(_cloud(20), _cloud(2, seed=1), k=2)
    from hf_otselect.ot import sinkhorn_potentials

    with pytest.raises(ValueError, match=r"The 'device' parameter of sinkhorn_potentials must be .*(CUDA|MPS) is not available"):
        sinkhorn_potentials(_cloud(20), _cloud(2, seed=1), 0.5, device=device)


# ------------------------------------------------------------------------ the cache folder
@pytest.mark.parametrize("bad", [5, 2.5, True, b"cache", ["cache"], ""])
def test_a_cache_dir_that_is_no_path_is_refused_in_the_template(tmp_path, pool, no_encoder, bad):
    with pytest.raises(TypeError, match=template("cache_dir") + r"a folder path \(str or os\.PathLike\) or None"):
        hf_otselect.select_by_ot(pool, TARGET, method="got_d", k=2, cache_dir=bad)
    with pytest.raises(TypeError, match=template("cache_dir") + r"a folder path"):
        hf_otselect.embed(["some text"], cache_dir=bad)


def test_a_cache_dir_of_the_wrong_type_in_a_job_file_is_refused(tmp_path):
    with pytest.raises((TypeError, ValueError), match=template("cache_dir")):
        load_config(REPO / "configs" / "demo.yaml", ["cache_dir=5"]).check_environment()


@pytest.mark.parametrize("part", ["embeddings", "scores", "streams"])
def test_a_cache_part_that_is_a_file_is_refused_up_front(tmp_path, pool, no_encoder, part):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / part).write_text("not a folder")
    with pytest.raises(ValueError, match=template("cache_dir") + rf"a folder path \(its part '.*/cache/{part}' is a file\)"):
        hf_otselect.select_by_ot(pool, TARGET, method="random", k=2, cache_dir=cache)


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make ``folder`` unwritable for this process: mode 0o555, or for root (who writes anyway) the immutable flag."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without the immutable flag: no folder is read-only to root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize(("part", "method"), [("embeddings", "got_d"), ("embeddings", "similarity"), ("scores", "random"),
                                              ("scores", "dsir"), ("scores", "tsds")])
def test_a_read_only_part_of_a_writable_cache_is_refused_before_any_work(tmp_path, pool, no_encoder, part, method):
    cache = tmp_path / "cache"
    for sub in ("embeddings", "scores"):
        (cache / sub).mkdir(parents=True)
    with _read_only(cache / part):
        with pytest.raises(PermissionError, match=r"The 'cache_dir' parameter of select_by_ot must be a folder this process can "
                                                  rf"write\. Got '.*/cache/{part}' instead \('.*/cache/{part}' is not writable\)"):
            hf_otselect.select_by_ot(pool, TARGET, method=method, k=2, cache_dir=cache)
    assert not any((cache / part).iterdir())


def test_embed_refuses_a_read_only_cache_folder_before_the_encoder(tmp_path, no_encoder):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    with _read_only(folder), pytest.raises(PermissionError, match=r"The 'cache_dir' parameter of embed must be a folder this process can write"):
        hf_otselect.embed(["a text", "another"], cache_dir=folder)
    with _read_only(folder), pytest.raises(pytest.fail.Exception, match="the encoder was loaded"):  # no cache needed: no refusal
        hf_otselect.embed(["a text", "another"], cache_dir=folder, use_cache=False)


# ------------------------------------------------------------------------ replaying a card
def _card(tmp_path: Path, *overrides: str, pad: int = 0) -> str:
    from hf_otselect.hub import build_card

    config = load_config(REPO / "configs" / "demo.yaml", list(overrides))
    prov = {"method": config.method, "params": config.params, "seed": config.seed, "model": "bundled",
            "rows": {"pool": 10, "selected": 3, "selected_unique": 3}, "ot_distance": {}, "config": config.to_dict()}
    return str(build_card(json.loads(json.dumps(prov)), [0.1, 0.5, 0.9])) + "x" * pad


def _forms(tmp_path: Path, text: str) -> list:
    from huggingface_hub import DatasetCard

    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return [text, path, str(path), DatasetCard(text)]


def test_a_card_asking_for_remote_code_or_a_push_is_replayed_without_them_and_with_a_warning(tmp_path, caplog):
    from hf_otselect.hub import config_from_card

    text = _card(tmp_path, "embedding.trust_remote_code=true", "push_to_hub=true", "hub.repo_id=someone/elsewhere")
    for source in _forms(tmp_path, text):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_otselect.hub"):
            config = config_from_card(source)
        assert (config.embedding.trust_remote_code, config.push_to_hub, config.hub.repo_id) == (False, False, None)
        warned = caplog.text
        assert "trust_remote_code=true" in warned and "pass trust_remote_code=True" in warned
        assert "'someone/elsewhere'" in warned and "pass repo_id=" in warned
        explicit = config_from_card(source, trust_remote_code=True, repo_id="me/mine")
        assert (explicit.embedding.trust_remote_code, explicit.push_to_hub, explicit.hub.repo_id) == (True, True, "me/mine")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_otselect.hub"):
        plain = config_from_card(_card(tmp_path))
    assert not caplog.records and not plain.push_to_hub and not plain.embedding.trust_remote_code
    with pytest.raises(TypeError, match=template("trust_remote_code") + "a bool"):
        config_from_card(text, trust_remote_code="yes")
    with pytest.raises(ValueError, match=template("repo_id")):
        config_from_card(text, repo_id="not a repo")


def test_a_card_over_one_mib_is_refused_in_every_form_and_one_under_is_accepted(tmp_path):
    from hf_otselect.hub import config_from_card

    base = _card(tmp_path)
    size = len(base.encode())
    over = _card(tmp_path, pad=MAX_YAML_BYTES - size + 1)
    for source in _forms(tmp_path, over):
        with pytest.raises(ValueError, match=rf"The 'card' (text|file '.*README\.md') is larger than {MAX_YAML_BYTES} bytes"):
            config_from_card(source)
    under = _card(tmp_path, pad=MAX_YAML_BYTES - size - 200)  # DatasetCard may reflow the header a little
    for source in _forms(tmp_path, under):
        assert config_from_card(source).k == load_config(REPO / "configs" / "demo.yaml").k
