"""The bad-input catalogue: one case per row, through the Python API and through the CLI.

Each refused input must raise a ``ValueError``/``TypeError`` (or ``FileNotFoundError`` /
``FileExistsError``) whose message names the argument, what was expected and what came, *before*
any expensive work: the encoder is never loaded (``load_encoder`` is replaced by a tripwire and the
cache folder is fresh, so a cache hit cannot hide a forward pass) and no output folder is written.
Inputs the package accepts on purpose (1 MB texts, lone surrogates, a pool of identical rows, a
target larger than the pool) must give a valid result instead.

Decision on bad text values (README, "What is guaranteed"): None, non-str, empty and
whitespace-only values *fail* with the column and the first row indices, because silently dropping
rows would shift ``pool_index`` against the user's data; very long texts are truncated to
``max_length`` tokens and lone surrogates become U+FFFD, so both always embed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

import hf_otselect
from hf_otselect import cli
from hf_otselect.config import load_config
from hf_otselect.hub import check_repo_id
from hf_otselect.job import output_paths, run_job
from hf_otselect.selectors import available_selectors, get_selector
from tests.conftest import REPO

EMBED = sys.modules["hf_otselect.embed"]  # the module (hf_otselect.embed is also the function)
VECTOR_SELECTORS = [m for m in available_selectors() if not get_selector(m).needs_text]
# The shared template; the look-ahead demands "Got ... instead" while later parts of a pattern pin
# the expected and received values.
TEMPLATE = r"(?=.* Got .* instead\.)The '{name}' parameter of .* must be "


def template(name: str) -> str:
    return TEMPLATE.format(name=name)


@pytest.fixture
def no_encoder(monkeypatch):
    """Fail the test if anything loads the encoder (the expensive step every refusal must precede)."""

    def tripwire(*args, **kwargs):
        pytest.fail("the encoder was loaded before the bad input was refused")

    monkeypatch.setattr(EMBED, "load_encoder", tripwire)


@pytest.fixture
def pool() -> Dataset:
    return Dataset.from_dict({"text": [f"row {i} talks about topic {i % 4}" for i in range(20)], "id": list(range(20))})


TARGET = ["a target sentence about topic one", "another one about topic two"]


def select(tmp_path: Path, data, target, **kwargs):
    return hf_otselect.select_by_ot(data, target, cache_dir=tmp_path / "cache", **kwargs)


# ----------------------------------------------------------------------------------------------
# Python API: select_by_ot


@pytest.mark.parametrize(
    ("case", "kwargs", "exc", "pattern"),
    [
        ("empty pool", {"data": "empty"}, ValueError, template("dataset") + ".*0 rows"),
        ("empty target list", {"target": []}, ValueError, template("target") + ".*empty list"),
        ("empty target dataset", {"target": "empty"}, ValueError, template("target") + ".*empty Dataset"),
        ("k = 0", {"k": 0}, ValueError, template("k") + r".*\[1, .*Got 0 instead"),
        ("k < 0", {"k": -3}, ValueError, template("k") + ".*Got -3 instead"),
        ("k > n", {"k": 21}, ValueError, template("k") + r".*\[1, 20\]\. Got 21 instead"),
        ("k float", {"k": 2.0}, TypeError, template("k") + ".*Got 2.0 instead"),
        ("k str", {"k": "2"}, TypeError, template("k") + ".*Got '2' instead"),
        ("k bool", {"k": True}, TypeError, template("k") + ".*Got True instead"),
        ("missing column", {"column": "txt"}, ValueError, r"'txt'.*Current columns: \['text', 'id'\]"),
        ("missing target column", {"target": "dataset", "target_column": "body"}, ValueError, r"'body'.*Current columns: \['text'\]"),
        ("unknown method", {"method": "gotd"}, ValueError, template("method") + r".*one of \[.*'got_d'.*\]\. Got 'gotd'"),
        ("unknown GOT-D back end", {"method": "got_d", "backend": "nope"}, ValueError, template("backend") + ".*'tensorized'.*Got 'nope'"),
        ("unknown TSDS index", {"method": "tsds", "index": "nope"}, ValueError, template("index") + ".*'flat'.*Got 'nope'"),
        ("negative eps", {"method": "got_d", "eps": -0.1}, ValueError, template("eps") + r".*\(0.0, inf\]\. Got -0.1"),
        ("negative alpha", {"method": "tsds", "alpha": -0.5}, ValueError, template("alpha") + r".*\[0.0, 1.0\]\. Got -0.5"),
        ("negative sigma", {"method": "tsds", "sigma": -1.0}, ValueError, template("sigma") + ".*Got -1.0"),
        ("bad similarity reduce", {"method": "similarity", "reduce": "median"}, ValueError, template("reduce") + ".*Got 'median'"),
        ("unknown selector keyword", {"method": "got_d", "epsilon": 0.1}, TypeError, template("epsilon") + r".*'got_d' selector \(eps, .*embedding=\{\.\.\.\}.*Got \{'epsilon': 0\.1\}"),
        ("unknown embedding key", {"embedding": {"modle": "x"}}, ValueError, template("embedding") + r".*Got \['modle'\]"),
        ("model path that does not exist", {"embedding": {"model": "/no/such/model"}}, ValueError, template("model") + ".*'/no/such/model'"),
        ("relative model path that does not exist", {"embedding": {"model": "./no_model_here"}}, ValueError, template("model")),
        ("device name that is no device", {"embedding": {"device": "gpu"}}, ValueError, template("device") + ".*Got 'gpu'"),
        ("NaN in target embeddings", {"target": "nan"}, ValueError, template("target") + ".*finite.*1 row"),
        ("Inf in target embeddings", {"target": "inf"}, ValueError, template("target") + ".*finite.*2 row"),
        ("1-D target embeddings", {"target": "1d"}, ValueError, template("target") + ".*2-D"),
        ("negative target with a method that has none", {"method": "tsds", "negative_target": ["bad text"]}, ValueError, template("negative_target")),
        ("return_scored not a bool", {"return_scored": "yes"}, TypeError, template("return_scored") + ".*a bool.*Got 'yes'"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_select_by_ot_refuses_before_any_work(tmp_path, pool, no_encoder, case, kwargs, exc, pattern):
    kwargs = dict(kwargs)
    data = pool.select([]) if kwargs.pop("data", None) == "empty" else pool
    target = kwargs.pop("target", TARGET)
    target = {
        "empty": Dataset.from_dict({"text": []}),
        "dataset": Dataset.from_dict({"text": TARGET}),
        "nan": np.array([[0.0, 1.0], [np.nan, 1.0]], dtype=np.float32),
        "inf": np.full((2, 4), np.inf, dtype=np.float32),
        "1d": np.ones(4, dtype=np.float32),
    }.get(target, target) if isinstance(target, str) else target
    kwargs.setdefault("k", 2)
    with pytest.raises(exc, match=pattern):
        select(tmp_path, data, target, **kwargs)
    assert not (tmp_path / "cache").exists() or not any(p.suffix == ".npy" for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_machine_is_refused_naming_device(tmp_path, pool, no_encoder, device):
    with pytest.raises(ValueError, match=template("device") + r".*CUDA is not available.*Got '" + device):
        select(tmp_path, pool, TARGET, k=2, embedding={"device": device})


@pytest.mark.parametrize(
    ("value", "exc", "pattern"),
    [
        (None, TypeError, r"must hold str values in column 'text'\. Got NoneType .* at row\(s\) \[2\]"),
        ("", ValueError, r"must hold non-empty texts in column 'text'\. Got 1 empty or whitespace-only value\(s\) at row\(s\) \[2\]"),
        (" \t\n ", ValueError, r"non-empty texts .* at row\(s\) \[2\]"),
    ],
    ids=["None", "empty", "whitespace"],
)
def test_bad_pool_text_values_fail_with_the_row_before_the_encoder(tmp_path, no_encoder, value, exc, pattern):
    data = Dataset.from_dict({"text": ["first row", "second row", value, "fourth row"]})
    with pytest.raises(exc, match=pattern):
        select(tmp_path, data, TARGET, k=1)


def test_a_non_string_text_column_fails_naming_the_column(tmp_path, no_encoder):
    data = Dataset.from_dict({"text": [1, 2, 3]})
    with pytest.raises(TypeError, match=r"str values in column 'text'\. Got int \(e\.g\. 1\) at row\(s\) \[0, 1, 2\]"):
        select(tmp_path, data, TARGET, k=1)


@pytest.mark.parametrize("value", [None, "", "   ", 7, b"bytes"], ids=["None", "empty", "whitespace", "int", "bytes"])
def test_bad_target_text_values_fail_before_the_pool_is_embedded(tmp_path, pool, no_encoder, value):
    with pytest.raises((TypeError, ValueError), match=r"The 'data' parameter of select_by_ot \(target\) must hold .*row\(s\) \[1\]"):
        select(tmp_path, pool, ["fine", value], k=1)


def test_a_target_larger_than_the_pool_still_selects_k_up_to_n(tmp_path):
    small = Dataset.from_dict({"text": ["cells and proteins", "stock markets fell", "a film review"]})
    big_target = [f"protein binding assay number {i}" for i in range(10)]
    for method in ("got_d", "tsds"):
        out = select(tmp_path, small, big_target, method=method, k=3, embedding={"max_length": 32})
        assert len(out) == 3 and all(0 <= i < 3 for i in out["pool_index"])
        if method == "got_d":
            assert sorted(out["pool_index"]) == [0, 1, 2]
    with pytest.raises(ValueError, match=template("k") + r".*\[1, 3\]\. Got 4 instead"):
        select(tmp_path, small, big_target, method="got_d", k=4)


# ----------------------------------------------------------------------------------------------
# texts that are accepted on purpose


def test_a_1mb_text_embeds_as_its_truncated_prefix(tmp_path):
    long = "protein " * 131072  # 1 MiB of one repeated word
    assert len(long.encode()) == 1 << 20
    vecs = EMBED.embed([long, "protein " * 200], max_length=32, cache_dir=tmp_path)
    assert vecs.shape == (2, 384) and np.isfinite(vecs).all()
    # both are cut at 32 tokens, so the 1 MB text embeds exactly like a short prefix of itself
    np.testing.assert_allclose(vecs[0], vecs[1], atol=1e-6)


def test_lone_surrogates_embed_as_the_replacement_character(tmp_path):
    bad = ["a lone \ud800 high surrogate", "and a lone \udfff low one"]
    fixed = ["a lone \ufffd high surrogate", "and a lone \ufffd low one"]
    vecs = EMBED.embed(bad, max_length=32, cache_dir=tmp_path)
    assert np.isfinite(vecs).all()
    np.testing.assert_array_equal(vecs, EMBED.embed(fixed, max_length=32, cache_dir=tmp_path / "other"))
    out = select(tmp_path, Dataset.from_dict({"text": fixed + ["plain"]}), bad, k=2, embedding={"max_length": 32})
    assert len(out) == 2


# ----------------------------------------------------------------------------------------------
# selectors on arrays


def _cloud(n: int = 12, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("method", VECTOR_SELECTORS)
@pytest.mark.parametrize(
    ("which", "bad", "exc", "pattern"),
    [
        ("candidates", "nan", ValueError, template("candidates") + ".*finite.*1 row"),
        ("target", "inf", ValueError, template("target") + ".*finite.*1 row"),
        ("target", "dim", ValueError, template("target") + r".*6 columns.*shape \(4, 5\)"),
        ("candidates", "empty", ValueError, template("candidates") + ".*non-empty.*Got '0 rows'"),
        ("target", "empty", ValueError, template("target") + ".*non-empty"),
        ("candidates", "strings", TypeError, template("candidates") + ".*dtype"),
        ("candidates", "width 0", ValueError, template("candidates") + r".*dim >= 1.*shape \(12, 0\)"),
    ],
)
def test_vector_selectors_refuse_bad_arrays(monkeypatch, method, which, bad, exc, pattern):
    x, y = _cloud(), _cloud(4, seed=1)
    arr = {"candidates": x, "target": y}[which].copy()
    if bad == "nan":
        arr[1, 2] = np.nan
    elif bad == "inf":
        arr[0, 0] = np.inf
    elif bad == "dim":
        arr = arr[:, :5]
    elif bad == "empty":
        arr = arr[:0]
    elif bad == "strings":
        arr = np.array([["a"] * 6] * 3)
    elif bad == "width 0":
        arr, y = arr[:, :0], y[:, :0]
    args = {"candidates": x, "target": y, which: arr}
    sel = get_selector(method)
    with pytest.raises(exc, match=pattern):
        sel.select(args["candidates"], args["target"], k=min(2, max(len(args["candidates"]), 1)))


@pytest.mark.parametrize("method", available_selectors())
def test_a_pool_of_identical_rows_gives_a_valid_selection(method):
    # DSIR with chunks of 2 for 4-token rows (the long-row path; short rows: test_baselines)
    sel = get_selector(method, **({"chunk_tokens": 2} if method == "dsir" else {}))
    if sel.needs_text:
        pool, target = ["the very same sentence"] * 15, ["a target sentence", "another"]
    else:
        pool, target = np.tile(_cloud(1), (15, 1)), _cloud(3, seed=2)
    res = sel.select(pool, target, k=5, seed=0)
    assert np.isfinite(res.scores).all() and res.scores.shape == (15,)
    assert len(res.indices) == 5 and all(0 <= i < 15 for i in res.indices)
    if not sel.replaces:
        assert len(set(res.indices.tolist())) == 5
    # identical rows get (numerically) identical scores; BLAS may differ in the last bits per row
    np.testing.assert_allclose(res.scores, res.scores[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("repo_id", ["nouser", "a/b/c", "user/with space", "user/--bad..", "", None, 42])
def test_malformed_hub_repo_ids_are_refused(repo_id):
    with pytest.raises(ValueError, match=template("repo_id") + ".*'user/name'"):
        check_repo_id(repo_id)


# ----------------------------------------------------------------------------------------------
# jobs: config and CLI


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"pool.path={REPO / 'data/sample/pool.jsonl'}",
        f"target.path={REPO / 'data/sample/target.jsonl'}",
        "pool.max_rows=30", "target.max_rows=5", "k=3", "embedding.max_length=32",
        f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", "report=false",
        *extra,
    ]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(tmp_path: Path, name: str, values: list) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": v}) + "\n" for v in values), encoding="utf-8")
    return str(path)


def _error_lines(capsys) -> list[str]:
    """The CLI's error: exactly one line, no traceback (datasets' progress bars may share stderr)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("hf-otselect: error: ")]
    assert len(lines) == 1, err
    return lines


CLI_CASES = [
    ("unknown config key", ["colour=blue"], r"Unknown config key 'colour'. Known keys: \[.*'pool'"),
    ("unknown nested key", ["embedding.modle=x"], r"Unknown config key 'embedding.modle'. Did you mean 'model'\? Known keys of embedding: \[.*'model'"),
    ("wrong type", ["k=many"], template("k") + ".*a int. Got 'many' instead"),
    ("k = 0", ["k=0"], template("k") + ".*Got 0 instead"),
    ("k > n", ["k=31"], template("k") + r".*\[1, 30\]\. Got 31 instead"),
    ("unknown method", ["method=gotd"], template("method") + ".*Got 'gotd' instead"),
    ("unknown back end", ["params.backend=nope"], template("backend") + ".*Got 'nope' instead"),
    ("negative eps", ["params.eps=-1"], template("eps") + ".*Got -1.0 instead"),
    ("negative alpha", ["method=tsds", "params.alpha=-0.5"], template("alpha") + ".*Got -0.5 instead"),
    ("negative sigma", ["method=tsds", "params.sigma=-2"], template("sigma") + ".*Got -2.0 instead"),
    ("unknown selector key", ["params.epsilon=0.1"], template("params") + r".*Got \['epsilon'\] instead"),
    ("model path that does not exist", ["embedding.model=/no/such/model"], template("model") + ".*'/no/such/model'"),
    ("device name that is no device", ["embedding.device=gpu"], template("device") + ".*Got 'gpu' instead"),
    ("missing pool file", ["pool.path=/no/such/pool.jsonl"], r"'pool.path' file '/no/such/pool.jsonl' does not exist"),
    ("missing text column", ["pool.column=body"], r"Column 'body' not in the dataset\. Current columns: \['text', 'domain'\]"),
    ("malformed repo id", ["push_to_hub=true", "hub.repo_id=not a repo"], template("repo_id") + ".*'not a repo'"),
    ("push without repo id", ["push_to_hub=true"], template("hub.repo_id")),
    ("malformed override", ["k"], template("overrides") + ".*key=value"),
]


@pytest.mark.parametrize(("case", "extra", "pattern"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_select_exits_2_with_one_line_before_any_work(tmp_path, capsys, no_encoder, case, extra, pattern):
    status = cli.main(["select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path, *extra)])
    err = _error_lines(capsys)
    assert status == 2
    assert re.search(pattern, err[0]), err[0]
    out, partial = output_paths(tmp_path / "out")
    assert not out.exists()
    assert not partial.exists() or not any(partial.rglob("*"))


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        (["fine", None, "fine"], r"str values in column 'text'\. Got NoneType.*row\(s\) \[1\]"),
        (["fine", "", "fine"], r"non-empty texts in column 'text'.*row\(s\) \[1\]"),
        (["fine", "  ", "fine"], r"non-empty texts in column 'text'.*row\(s\) \[1\]"),
    ],
    ids=["None", "empty", "whitespace"],
)
def test_cli_bad_text_values_in_the_pool_file(tmp_path, capsys, no_encoder, values, pattern):
    pool = _jsonl(tmp_path, "pool.jsonl", values)
    status = cli.main(["select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path, f"pool.path={pool}", "pool.max_rows=null", "k=1")])
    err = _error_lines(capsys)
    assert status == 2 and re.search(pattern, err[0]), err
    assert not output_paths(tmp_path / "out")[0].exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_on_a_cpu_machine(tmp_path, capsys, no_encoder):
    status = cli.main(["select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path, "embedding.device=cuda")])
    err = capsys.readouterr().err
    assert status == 2 and "'device'" in err and "CUDA is not available" in err


def test_cli_malformed_yaml(tmp_path, capsys, no_encoder):
    bad = _write(tmp_path, "bad.yaml", "pool:\n  path: [unclosed\nk: 3\n")
    assert cli.main(["select", "--config", str(bad)]) == 2
    assert f"The 'config' file '{bad}' is not valid YAML" in _error_lines(capsys)[0]


def test_cli_yaml_that_is_not_a_mapping(tmp_path, capsys, no_encoder):
    bad = _write(tmp_path, "list.yaml", "- a\n- b\n")
    assert cli.main(["select", "--config", str(bad)]) == 2
    assert "must be a YAML mapping at the top level. Got 'list' instead" in capsys.readouterr().err


def test_cli_missing_config_file(tmp_path, capsys, no_encoder):
    assert cli.main(["select", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "The 'config' file" in capsys.readouterr().err


def test_cli_existing_output_folder_is_refused_unless_overwrite(tmp_path, capsys, no_encoder):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path)]) == 2
    err = capsys.readouterr().err
    # A folder of the user's own: the refusal that overwrite=true would meet is said first (issue 23).
    assert "'output_dir'" in err and "has no .hf_otselect.json marker" in err and "even with overwrite=true" in err
    assert "Pass overwrite=true" not in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_existing_output_folder_is_replaced_with_overwrite_only_if_ours(tmp_path):
    first = run_job(load_config(REPO / "configs/demo.yaml", _overrides(tmp_path, "save_embeddings=true")))
    assert (first / "embeddings").is_dir()
    out = run_job(load_config(REPO / "configs/demo.yaml", _overrides(tmp_path, "overwrite=true", "save_embeddings=false", "k=4")))
    assert out == first and not (out / "embeddings").exists() and (out / "selected").is_dir()
    assert json.loads((out / "selection.json").read_text())["k"] == 4
    (out / "stale.txt").write_text("the user's")  # a file we did not write: the folder is no longer ours to replace
    with pytest.raises(FileExistsError, match=r"holds files hf_otselect did not write.*\['stale.txt'\]"):
        run_job(load_config(REPO / "configs/demo.yaml", _overrides(tmp_path, "overwrite=true")))
    assert (out / "stale.txt").read_text() == "the user's" and (out / "selected").is_dir()


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    """A real process: what a user sees in a terminal (exit 2, one line on stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "hf_otselect.cli", "select", "--config", str(REPO / "configs/demo.yaml"),
         *_overrides(tmp_path, "params.eps=-1")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["hf-otselect: error: The 'eps' parameter of GOTDSelector must be a float in (0.0, inf]. Got -1.0 instead."]
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("side", ["pool", "target"])
def test_cli_an_empty_data_file(tmp_path, capsys, no_encoder, side):
    empty = _write(tmp_path, "empty.jsonl", "")
    status = cli.main(["select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path, f"{side}.path={empty}")])
    assert status == 2
    assert re.search(template(f"{side}.path") + "a data file with at least one row", _error_lines(capsys)[0])
    assert not output_paths(tmp_path / "out")[0].exists()


def test_cli_a_hub_dataset_id_that_cannot_be_reached(tmp_path, capsys, no_encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = cli.main(["select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path, "pool.path=someone/no_such_dataset")])
    assert status == 2
    assert re.search(template("pool.path") + ".*Hub dataset id that can be reached.*Got 'someone/no_such_dataset'", _error_lines(capsys)[0])


def test_cli_push_with_a_malformed_repo_id_touches_nothing(tmp_path, capsys):
    assert cli.main(["push", str(tmp_path / "missing"), "--repo-id", "not a repo/x"]) == 2
    assert re.search(template("repo_id") + ".*Got 'not a repo/x' instead", _error_lines(capsys)[0])


def test_cli_report_on_a_folder_that_is_no_selection(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "is not a selection output folder" in _error_lines(capsys)[0]
    assert not (tmp_path / "report.html").exists()


# ----------------------------------------------------------------------------------------------
# stale results: a streamed pool's second run returns its own rows and scores


def _pool_rows(labels: list[int], source: str) -> list[dict]:
    topics = ["cooking pasta", "tax law", "football scores", "protein folding"]
    return [{"text": f"note {i}: a few words about {topics[i % 4]} and item {i}", "label": lab, "source": source, "weight": i / 7}
            for i, lab in enumerate(labels)]


def _streamed(path: Path, rows: list[dict]):
    from datasets import load_dataset

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_dataset("json", data_files=str(path), split="train", streaming=True)


STALE_EMB = {"max_length": 32, "shard_rows": 10}


@pytest.mark.parametrize(("first", "second"), [("got_d", "similarity"), ("similarity", "got_d"), ("random", "tsds")])
def test_a_streamed_pool_never_returns_the_scores_of_another_method(tmp_path, first, second):
    rows = _pool_rows([i % 3 for i in range(26)], "web")
    cache = tmp_path / "cache"
    runs = {}
    for method in (first, second):  # the same file, the same caches, only the method changes
        runs[method] = _streamed(tmp_path / "pool.jsonl", rows).select_by_ot(
            TARGET, method=method, k=4, cache_dir=cache, return_scored=True, embedding=STALE_EMB)
    # An independent reference: the in-memory pool, its own fresh cache.
    ref = hf_otselect.select_by_ot(Dataset.from_list(rows), TARGET, second, 4, cache_dir=tmp_path / "ref",
                                   return_scored=True, embedding=STALE_EMB)
    got = np.asarray(runs[second]["scored"]["score"])
    assert not np.allclose(got, np.asarray(runs[first]["scored"]["score"]))  # the methods do differ here
    np.testing.assert_allclose(got, np.asarray(ref["scored"]["score"]), rtol=1e-12, atol=0)
    assert runs[second]["selected"]["pool_index"] == ref["selected"]["pool_index"]


@pytest.mark.parametrize("change", ["every row", "one row"])
def test_a_streamed_pool_carries_the_new_values_of_its_other_columns(tmp_path, change):
    before = _pool_rows([i % 3 for i in range(23)], "web")
    if change == "every row":
        after = _pool_rows([(7 * i) % 5 + 10 for i in range(23)], "books")
    else:
        after = [dict(r) for r in before]
        after[17]["source"] = "forum"
    cache = tmp_path / "cache"
    path = tmp_path / "pool.jsonl"
    for rows in (before, after):  # only non-text columns differ: the vectors and scores are the same
        dd = _streamed(path, rows).select_by_ot(TARGET, method="got_d", k=5, cache_dir=cache, return_scored=True,
                                                embedding=STALE_EMB)
    assert dd["scored"]["label"] == [r["label"] for r in after]
    assert dd["scored"]["source"] == [r["source"] for r in after]
    assert dd["selected"]["source"] == [after[i]["source"] for i in dd["selected"]["pool_index"]]


# issue 13: everything checkable is checked before the encoder loads (item 6), numbers at any
# finite scale (item 5), and the CLI's exit statuses (item 7)


def _rows(tmp_path: Path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _select_cli(tmp_path: Path, *extra: str, config: str = "configs/tsds.yaml") -> int:
    return cli.main(["select", "--config", str(REPO / config), *_overrides(tmp_path, *extra)])


def test_report_columns_absent_from_the_pool_fail_before_the_encoder(tmp_path, capsys, no_encoder):
    # every bundled config names 'domain'; this pool has 'source' instead
    pool = _rows(tmp_path, "p.jsonl", [{"text": f"line {i} of the pool", "source": "s"} for i in range(8)])
    assert _select_cli(tmp_path, f"pool.path={pool}", "report=true") == 2
    line = _error_lines(capsys)[0]
    assert re.search(template("report_columns") + r"columns of the pool \(it has \['text', 'source'\]\).*Got \['domain'\]", line), line
    assert not output_paths(tmp_path / "out")[1].exists()
    # the same pool without a report runs past this check (report_columns are only read by the report)
    assert _select_cli(tmp_path, f"pool.path={pool}", "report=false", "pool.column=nope") == 2
    assert "Column 'nope' not in the dataset" in _error_lines(capsys)[0]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_pool_that_is_already_a_selection_is_refused_before_the_encoder(tmp_path, capsys, no_encoder, streaming):
    rows = [{"text": f"row {i} of an earlier selection", "domain": "d", "pool_index": i, "score": 0.5, "rank": i + 1} for i in range(6)]
    pool = _rows(tmp_path, "selected.jsonl", rows)
    assert _select_cli(tmp_path, f"pool.path={pool}", f"pool.streaming={str(streaming).lower()}", "k=2") == 2
    line = _error_lines(capsys)[0]
    assert re.search(template("pool.path") + r"a pool without the columns a selection adds.*remove_columns\(\['pool_index', 'rank', 'score'\]\)", line), line


def test_the_python_api_refuses_a_pool_with_pool_index_before_the_encoder(tmp_path, pool, no_encoder):
    with pytest.raises(ValueError, match=template("dataset") + r"a pool without the columns \[.*'rank'.*\] that the selection adds .*Got \['rank'\]"):
        select(tmp_path, pool.add_column("rank", list(range(len(pool)))), TARGET, k=2)


def test_output_dir_that_is_a_file_is_refused_before_the_encoder(tmp_path, capsys, no_encoder):
    target = tmp_path / "results.txt"
    target.write_text("someone's notes")
    assert _select_cli(tmp_path, f"output_dir={target}", "overwrite=true") == 2
    assert re.search(r"The 'output_dir' '.*results\.txt' is not a folder; hf_otselect never replaces one", _error_lines(capsys)[0])
    assert target.read_text() == "someone's notes"
    nested = tmp_path / "results.txt" / "run1"  # a file in the middle of the path
    assert _select_cli(tmp_path, f"output_dir={nested}") == 2
    assert re.search(template("output_dir") + r"a path whose parent can be created and written", _error_lines(capsys)[0])


needs_permissions = pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                                       reason="root may write anywhere")


@needs_permissions
@pytest.mark.parametrize("setting", ["output_dir", "cache_dir"])
def test_an_unwritable_output_or_cache_folder_fails_first_with_exit_1(tmp_path, capsys, no_encoder, setting):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert _select_cli(tmp_path, f"{setting}={locked / 'sub' / 'dir'}") == 1
        line = _error_lines(capsys)[0]
    finally:
        locked.chmod(0o700)
    assert f"The '{setting}' parameter of " in line and f"'{locked}' is not writable" in line
    assert not any(locked.iterdir())


def test_permission_checks_name_the_setting_even_as_root(tmp_path):
    """The check itself, pinned where the suite runs as root: the nearest existing parent decides."""
    from hf_otselect._checks import check_writable_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=template("cache_dir") + r"a folder path \(its part '.*/f' is a file\)"):
        check_writable_folder(tmp_path / "f" / "a" / "b", "cache_dir", "X")
    assert check_writable_folder(tmp_path / "new" / "deeper", "cache_dir", "X") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing created


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_solver_device_that_does_not_exist_fails_before_the_encoder(tmp_path, capsys, pool, no_encoder, device):
    assert _select_cli(tmp_path, f"params.device={device}", config="configs/got_d.yaml") == 2
    line = _error_lines(capsys)[0]
    assert re.search(template("device") + r".*CUDA is not available.*Got '" + device + "' instead", line) and "GOTDSelector" in line
    with pytest.raises(ValueError, match=template("device") + ".*CUDA is not available"):
        select(tmp_path, pool, TARGET, k=2, device=device)


@pytest.mark.parametrize(("side", "value"), [("pool", -5), ("target", 0), ("negative_target", -1)])
def test_a_non_positive_max_rows_is_named(tmp_path, capsys, no_encoder, side, value):
    extra = [f"negative_target.path={REPO / 'data/sample/target.jsonl'}"] if side == "negative_target" else []
    assert _select_cli(tmp_path, *extra, f"{side}.max_rows={value}", config="configs/got_d.yaml") == 2
    assert re.search(template(f"{side}.max_rows") + r"an int in \[1, inf\]\. Got " + str(value), _error_lines(capsys)[0])


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(("bad", "what"), [('{"text": "seven", "domain": "d"', "malformed JSON line 7"),
                                           ('["a list", "not a row"]', "JSON line 7 that is not an object")])
def test_a_malformed_line_in_a_data_file_is_one_line_naming_file_and_line(tmp_path, capsys, no_encoder, streaming, bad, what):
    good = [json.dumps({"text": f"row {i} is fine", "domain": "d"}) for i in range(9)]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(good[:6] + [bad] + good[6:]) + "\n", encoding="utf-8")
    status = _select_cli(tmp_path, f"pool.path={path}", f"pool.streaming={str(streaming).lower()}", "pool.max_rows=null", "k=2")
    line = _error_lines(capsys)[0]
    assert status == 2
    assert f"The 'pool.path' file '{path}' has a {what}" in line, line


def test_a_streamed_pool_is_only_scanned_as_far_as_max_rows(tmp_path):
    from hf_otselect._checks import check_json_lines

    path = tmp_path / "tail_broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": "c"}\nnot json\n', encoding="utf-8")
    check_json_lines(str(path), "pool.path", max_rows=3)  # the broken line 5 is never read
    with pytest.raises(ValueError, match=r"'pool.path' file '.*tail_broken.jsonl' has a malformed JSON line 5"):
        check_json_lines(str(path), "pool.path")


INVISIBLE = ["\u200b\u200b", "\ufeff", "\x00\x07\x1b", "\u200d \u2060\u00ad", "\u202e\u2028", "\t\u3000\u200c"]


@pytest.mark.parametrize("value", INVISIBLE, ids=[ascii(v) for v in INVISIBLE])
def test_invisible_only_texts_count_as_empty_before_the_encoder(tmp_path, no_encoder, value):
    data = Dataset.from_dict({"text": ["a visible row", "another one", value, "\u200bvisible after a zero-width space"]})
    with pytest.raises(ValueError, match=r"non-empty texts in column 'text'\. Got 1 empty or whitespace-only value\(s\) at row\(s\) \[2\]"):
        select(tmp_path, data, TARGET, k=1)
    with pytest.raises(ValueError, match=r"Got 1 empty or whitespace-only value\(s\) at row\(s\) \[1\]"):
        select(tmp_path, Dataset.from_dict({"text": ["row one", "row two", "row three"]}), ["a target", value], k=1)


def test_the_cli_refuses_invisible_texts_in_a_file(tmp_path, capsys, no_encoder):
    pool = _jsonl(tmp_path, "pool.jsonl", ["fine text", "\ufeff\u200b", "more text", "\x0c\x0b"])
    assert _select_cli(tmp_path, f"pool.path={pool}", "pool.max_rows=null", "k=1", "report=false") == 2
    assert re.search(r"Got 2 empty or whitespace-only value\(s\) at row\(s\) \[1, 3\]", _error_lines(capsys)[0])


# -- numbers ------------------------------------------------------------------------------------


def _planted(n: int = 80, dim: int = 12, m: int = 6, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Unit candidates; the target sits on the *last* m rows, so an index-order tie-break cannot pass."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x[-m:] + 0.02 * rng.normal(size=(m, dim))
    return x, y


@pytest.mark.parametrize("method", ["tsds"])  # GOT-D rescales its costs: it is correct at any scale (below)
@pytest.mark.parametrize("scale", [1e17, 1e25, 1e36, 1e-17, 1e-26, 1e-36])
def test_distance_selectors_refuse_out_of_range_magnitudes_naming_the_argument(method, scale):
    x, y = _planted()
    with pytest.raises(ValueError, match=template("candidates") + r"embeddings whose largest \|value\| lies in \[1e-15, 1e\+15\].*Got 'largest \|value\| "):
        get_selector(method).select(x * scale, y, 3)
    with pytest.raises(ValueError, match=template("target") + r"embeddings whose largest \|value\| lies in \[1e-15, 1e\+15\]"):
        get_selector(method).select(x, y * scale, 3)


@pytest.mark.parametrize("scale", [1e-36, 1e-26, 1e-17, 1e17, 1e25, 1e36])
def test_got_d_is_correct_at_any_finite_scale(scale):
    """GOT-D shifts and rescales its costs: the planted rows win however large or small the vectors."""
    x, y = _planted()
    chosen = get_selector("got_d", eps=0.02, eps_mode="relative").select(x * scale, y * scale, 6).indices
    assert sorted(chosen.tolist()) == list(range(74, 80))


@pytest.mark.parametrize("scale", [1e-14, 1e-6, 1e7, 1e14])
def test_got_d_is_correct_at_large_and_small_scales_inside_the_range(scale):
    """Scaling the vectors by s and eps by s^2 is the same OT problem: the planted rows win at every s."""
    x, y = _planted()
    chosen = get_selector("got_d", eps=0.05 * scale**2).select(x * scale, y * scale, 6).indices
    assert sorted(chosen.tolist()) == list(range(74, 80))
    relative = get_selector("got_d", eps=0.02, eps_mode="relative").select(x * scale, y * scale, 6).indices
    assert sorted(relative.tolist()) == list(range(74, 80))


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_similarity_is_scale_free(scale, reduce):
    x, y = _planted()
    at_one = get_selector("similarity", reduce=reduce).select(x, y, 6).indices.tolist()
    assert get_selector("similarity", reduce=reduce).select(x * scale, y * scale, 6).indices.tolist() == at_one
    if reduce == "max":  # each planted row is its target point's nearest
        assert sorted(at_one) == list(range(74, 80))


@pytest.mark.parametrize(("eps", "mode"), [(1e-25, "absolute"), (3e4, "absolute"), (1e300, "absolute"), (2e4, "relative"), (1e-22, "relative")])
def test_got_d_refuses_an_eps_the_solver_cannot_rank_with_and_gives_the_range(eps, mode):
    x, y = _planted()
    sel = get_selector("got_d", eps=eps, eps_mode=mode)
    with pytest.raises(ValueError) as err:
        sel.select(x, y, 3)
    msg = str(err.value)
    assert re.search(template("eps"), msg) and f"Got {eps!r} instead." in msg
    if mode == "absolute":  # the range is in the user's units: 1e-8..1e3 times the mean squared distance
        lo, hi = (float(v) for v in re.search(r"a float in \[([^,]+), ([^\]]+)\] for these candidates and target", msg).groups())
        mean = np.mean(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))  # the plain all-pairs mean
        assert lo == pytest.approx(1e-8 * mean, rel=1e-2) and hi == pytest.approx(1e3 * mean, rel=1e-2)
    else:
        assert "[1e-08, 1000] with eps_mode='relative'" in msg


@pytest.mark.parametrize("sigma", [1e-200, 1e200])
def test_tsds_refuses_a_sigma_outside_float32_distances(sigma):
    with pytest.raises(ValueError, match=template("sigma") + r"a float in \[1e-15, 1000000000000000.0\]\. Got " + re.escape(repr(sigma))):
        get_selector("tsds", sigma=sigma)


def test_float64_vectors_beyond_float32_are_named_as_such_not_as_nan():
    x, y = _planted()
    with pytest.raises(ValueError, match=template("candidates") + r"values within float32's range \(\|value\| <= 3.4e\+38.*Got 'largest \|value\| [0-9.]+e\+39'"):
        get_selector("similarity").select(x * 4e39, y, 3)


def test_select_by_ot_refuses_a_huge_target_array_before_the_encoder(tmp_path, pool, no_encoder):
    _, y = _planted(dim=384)
    with pytest.raises(ValueError, match=template("target") + r"embeddings whose largest \|value\| lies in \[1e-15, 1e\+15\]"):
        select(tmp_path, pool, y * 1e22, method="tsds", k=2)


# -- the CLI: exit statuses and one line ----------------------------------------------------------


def _cli_process(tmp_path: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hf_otselect.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, **kwargs)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("hf-otselect: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """A real SIGINT while the job reads its pool (a FIFO that never delivers a row)."""
    import os
    import signal
    import time

    fifo = tmp_path / "pool.jsonl"
    os.mkfifo(fifo)
    # A job started in the background by a script inherits SIGINT ignored (POSIX), and Python then
    # keeps it ignored, rightly (the nohup convention). A terminal's foreground job has it at its
    # default: start the job that way whatever this test runner inherited.
    proc = _cli_process(tmp_path, "select", "--config", str(REPO / "configs/demo.yaml"),
                        *_overrides(tmp_path, f"pool.path={fifo}", "pool.streaming=true"),
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writer, deadline = None, time.monotonic() + 120
    while writer is None:  # opening the write end succeeds once the job has the FIFO open for reading
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # Signal once the job sleeps in read(), as a user's Ctrl-C on a stalled pool finds it. Sent the
    # moment the FIFO opens, it can land between CPython's last signal check and the read() syscall:
    # the handler runs only when the read returns, which here is never (a second Ctrl-C ends it).
    wchan = Path(f"/proc/{proc.pid}/wchan")
    while wchan.exists() and "pipe" not in wchan.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(writer)
        proc.kill()  # a no-op once it has exited; never leave a hung job behind
    assert proc.returncode == 130
    assert "interrupted (Ctrl-C)" in _one_error_line(err)


def test_a_closed_stdout_does_not_fail_a_finished_job(tmp_path):
    """``hf-otselect select ... | head -c0``: the reader is gone before the job prints its folder."""
    from datasets import load_from_disk

    proc = _cli_process(tmp_path, "select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path))
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert len(load_from_disk(str(tmp_path / "out"))["selected"]) == 3


def test_a_write_failure_exits_1_with_one_line(tmp_path):
    """A real environment failure: the file-size limit makes the cache writes fail (EFBIG, like ENOSPC)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the OSError instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = _cli_process(tmp_path, "select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path, "k=2"), preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert re.search(r"File too large|requested and \d+ written", _one_error_line(err))


@pytest.mark.parametrize(("exc", "status"), [
    (OSError(28, "No space left on device"), 1),
    (PermissionError(13, "Permission denied"), 1),
    (ConnectionError("Hub unreachable"), 1),
    (RuntimeError("something unforeseen"), 1),
    (KeyboardInterrupt(), 130),
    (ValueError("bad\nvalue"), 2),
])
def test_every_failure_is_one_line_with_its_status(tmp_path, capsys, monkeypatch, exc, status):
    import hf_otselect.job as job

    def fail(config):
        raise exc

    monkeypatch.setattr(job, "run_job", fail)
    assert cli.main(["select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path)]) == status
    line = _error_lines(capsys)[0]
    if isinstance(exc, RuntimeError):
        assert "RuntimeError: something unforeseen (an unexpected error; --verbose shows the traceback)" in line
    elif not isinstance(exc, KeyboardInterrupt):
        assert " ".join(str(exc).split()) in line


@pytest.mark.parametrize("kind", ["http", "connect"])
def test_a_network_error_on_push_exits_1(tmp_path, capsys, monkeypatch, kind):
    """huggingface_hub's HTTP errors, and its transport's connection errors (not OSError subclasses)."""
    httpx = pytest.importorskip("httpx2")
    from huggingface_hub.errors import HfHubHTTPError

    import hf_otselect.hub as hub

    url = "https://huggingface.co/api/repos/create"
    err = (HfHubHTTPError(f"503 Service Unavailable for url: {url}", response=httpx.Response(503, request=httpx.Request("POST", url)))
           if kind == "http" else httpx.ConnectError("[Errno -3] Temporary failure in name resolution"))

    def unreachable(*args, **kwargs):
        raise err

    monkeypatch.setattr(hub, "push", unreachable)
    assert cli.main(["push", str(tmp_path), "--repo-id", "user/name"]) == 1
    line = _error_lines(capsys)[0]
    assert str(err) in line and "unexpected" not in line


def test_verbose_shows_the_traceback_and_the_same_line(tmp_path):
    proc = _cli_process(tmp_path, "--verbose", "select", "--config", str(REPO / "configs/demo.yaml"), *_overrides(tmp_path, "k=0"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in err
    assert [ln for ln in err.splitlines() if ln.startswith("hf-otselect: error: ")] == [
        "hf-otselect: error: The 'k' parameter of SelectionConfig must be an int >= 1. Got 0 instead."]


def test_a_duplicate_key_job_file_is_one_line_and_exit_2_from_the_real_command(tmp_path):
    job = _write(tmp_path, "dup.yaml", f"pool: {{path: {REPO / 'data/sample/pool.jsonl'}}}\ntarget: {{path: x.jsonl}}\nmethod: tsds\nmethod: got_d\n")
    proc = _cli_process(tmp_path, "select", "--config", str(job))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert _one_error_line(err) == (f"hf-otselect: error: The 'config' file '{job}' is refused: the key 'method' appears twice "
                                    "(first at line 3) (line 4, column 1).")


def test_a_dollar_in_a_category_value_renders_as_text_in_the_report(tmp_path):
    rows = [{"text": f"sentence number {i} about {['prices', 'maths', 'code'][i % 3]}", "domain": ["$x^$", r"$\frac$", "cost $5"][i % 3]}
            for i in range(24)]
    pool = _rows(tmp_path, "dollars.jsonl", rows)
    out = run_job(load_config(REPO / "configs/demo.yaml", _overrides(tmp_path, f"pool.path={pool}", "pool.max_rows=null", "k=4",
                                                                     "method=random", "report=true", "report_columns=[domain]")))
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "$x^$" in html and r"$\frac$" in html
    assert len(list(out.rglob("composition_0.png"))) == 1


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_decontamination_and_the_guard_normalise_at_any_finite_scale(scale):
    """Both work on unit vectors: scaling every row by one factor changes nothing (float32 norms used to
    overflow or flush to 0 here, dropping every row)."""
    from hf_otselect.decontaminate import decontaminate
    from hf_otselect.dedup import epanechnikov_density

    x, _ = _planted(n=40)
    held = x[[3, 17]] + 0.01  # near-copies of rows 3 and 17
    at_one = decontaminate(x, held, radius=0.1, ngram=None).dropped
    assert np.flatnonzero(at_one).tolist() == [3, 17]
    assert np.array_equal(decontaminate(x * scale, held * scale, radius=0.1, ngram=None).dropped, at_one)
    rows = np.arange(len(x))
    assert np.allclose(epanechnikov_density(x * scale, rows, radius=0.5), epanechnikov_density(x, rows, radius=0.5))


@pytest.mark.parametrize("setting", ["pool.column", "pool.path", "target.column"])
def test_a_huge_config_value_gives_a_short_error_line(tmp_path, capsys, no_encoder, setting):
    value = ("data/" if setting == "pool.path" else "") + "c" * 100_000 + (".jsonl" if setting == "pool.path" else "")
    assert _select_cli(tmp_path, f"{setting}={value}") == 2
    line = _error_lines(capsys)[0]
    assert len(line) < 700 and "ccc...ccc" in line, line[:300]


def test_a_partial_folder_that_is_a_symlink_is_one_line_and_its_target_survives(tmp_path, capsys, no_encoder):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    (tmp_path / "out.partial").symlink_to(elsewhere, target_is_directory=True)
    status = _select_cli(tmp_path)
    _error_lines(capsys)  # exactly one line, no traceback
    assert status in (1, 2)
    assert (elsewhere / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# Selectors, choosing and the fitted selector called directly


@pytest.mark.parametrize("value", ["hello world foo", b"bytes", {"a": 1}, None], ids=["str", "bytes", "dict", "None"])
@pytest.mark.parametrize("which", ["candidates", "target"])
def test_text_selectors_refuse_a_lone_string_for_a_list_of_texts(which, value):
    """list("abc") is three one-letter texts: a lone str (bytes, mapping, None) is refused by name."""
    args = {"candidates": ["the cat sat", "dogs bark", "protein binds"], "target": ["protein receptor"], which: value}
    with pytest.raises(TypeError, match=template(which) + "a sequence of str"):
        get_selector("dsir").select(args["candidates"], args["target"], 1)


@pytest.mark.parametrize("chunk_tokens", [None, 16])
def test_dsir_never_prefers_a_row_without_tokens(chunk_tokens):
    """An empty or blank row has no n-gram to weigh: -inf (never chosen) in both scoring modes, not 0."""
    pool = ["the cat sat", "dogs bark", "protein binds receptor", "markets fell", "", "   ", "bad \ud800 surrogate"]
    sel = get_selector("dsir", chunk_tokens=chunk_tokens)
    scores = sel.score(pool, ["protein receptor binding"])
    assert np.isneginf(scores[4:6]).all() and np.isfinite(scores[[0, 1, 2, 3, 6]]).all()
    assert set(sel.select(pool, ["protein receptor binding"], 5).indices.tolist()) == {0, 1, 2, 3, 6}


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7"])
def test_choose_refuses_a_seed_that_is_no_uint64(seed):
    from hf_otselect.selectors.base import choose

    with pytest.raises((TypeError, ValueError), match=template("seed")):
        choose(np.ones(3), 1, mode="sample", seed=seed)


@pytest.mark.parametrize("device", [3, "meta"])
def test_a_solver_device_that_is_no_compute_device_is_refused(device):
    with pytest.raises((TypeError, ValueError), match=template("device")):
        get_selector("got_d", device=device).select(_cloud(), _cloud(4, seed=1), 2)


@pytest.fixture
def fitted():
    return hf_otselect.fit_selector(_cloud(40), _cloud(5, seed=1), method="got_d").using(vector_column="v")


def test_a_fitted_map_refuses_nan_vectors_naming_the_column(fitted):
    """NaN scores would be dropped by any filter without a word: the map refuses the rows instead."""
    bad = _cloud(40)
    bad[5] = np.nan
    bad[7, 0] = np.inf
    ds = Dataset.from_dict({"v": bad.tolist(), "id": list(range(40))})
    with pytest.raises(ValueError, match=template("v") + r".*finite.*2 row\(s\).*rows \[5, 7\]"):
        ds.map(fitted, batched=True)
    with pytest.raises(ValueError, match=template("v") + ".*finite"):
        list(fitted.select(ds, fraction=0.5))
    with pytest.raises(ValueError, match=template("rows") + ".*finite"):
        fitted.using(vector_column=None).score_rows(bad)


def test_a_fitted_map_never_overwrites_a_column(fitted):
    ds = Dataset.from_dict({"v": _cloud(40).tolist(), "score": [0.0] * 40})
    with pytest.raises(ValueError, match=template("score_column") + ".*'score' would be overwritten"):
        ds.map(fitted, batched=True)
    with pytest.raises(ValueError, match=template("score_column") + ".*'v' would be overwritten"):
        fitted.using(score_column="v")
    with pytest.raises(ValueError, match=template("score_column") + ".*'text' would be overwritten"):
        hf_otselect.fit_selector(_cloud(40), _cloud(5, seed=1), score_column="text")
    assert "pick" in ds.map(fitted.using(score_column="pick"), batched=True).column_names


@pytest.mark.parametrize(
    ("settings", "name"),
    [({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"device": "foo"}, "device"), ({"device": 3}, "device"),
     ({"column": None}, "column"), ({"vector_column": 5}, "vector_column"), ({"score_column": 5}, "score_column")],
    ids=["seed -1", "seed 2**64", "device foo", "device 3", "column None", "vector_column int", "score_column int"],
)
def test_fitted_using_checks_each_setting(fitted, settings, name):
    with pytest.raises((TypeError, ValueError), match=template(name)):
        fitted.using(**settings)


def test_fitted_keep_and_score_rows_name_bad_arguments(fitted):
    scores = np.linspace(0, 1, 40)
    with pytest.raises(TypeError, match=template("k") + ".*Got '3'"):
        fitted.keep(k="3", scores=scores)
    with pytest.raises(TypeError, match=template("scores")):
        fitted.keep(k=3, scores="abc")
    nan = scores.copy()
    nan[[3, 9]] = np.nan
    with pytest.raises(ValueError, match=template("scores") + ".*2 NaN"):
        fitted.keep(k=3, scores=nan)
    with pytest.raises(TypeError, match=template("rows")):
        fitted.score_rows(None)
    with pytest.raises(ValueError, match=template("index") + r".*shape \(3,\)"):
        fitted.score_rows(_cloud(3, dim=6), np.array([0, 1]))
    with pytest.raises(ValueError, match=template("index") + ".*int array"):
        fitted.score_rows(_cloud(3, dim=6), np.array([0.5, 1.2, 2.9]))

