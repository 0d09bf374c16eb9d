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
        ("unknown selector keyword", {"method": "got_d", "epsilon": 0.1}, ValueError, template("params") + r".*'eps'.*Got \['epsilon'\]"),
        ("unknown embedding key", {"embedding": {"modle": "x"}}, ValueError, template("embedding") + r".*Got \['modle'\]"),
        ("model path that does not exist", {"embedding": {"model": "/no/such/model"}}, ValueError, template("model") + ".*'/no/such/model'"),
        ("relative model path that does not exist", {"embedding": {"model": "./no_model_here"}}, ValueError, template("model")),
        ("device name that is no device", {"embedding": {"device": "gpu"}}, ValueError, template("device") + ".*Got 'gpu'"),
        ("NaN in target embeddings", {"target": "nan"}, ValueError, template("target") + ".*finite.*1 row"),
        ("Inf in target embeddings", {"target": "inf"}, ValueError, template("target") + ".*finite.*2 row"),
        ("1-D target embeddings", {"target": "1d"}, ValueError, template("target") + ".*2-D"),
        ("negative target with a method that has none", {"method": "tsds", "negative_target": ["bad text"]}, ValueError, template("negative_target")),
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
    args = {"candidates": x, "target": y, which: arr}
    sel = get_selector(method)
    with pytest.raises(exc, match=pattern):
        sel.select(args["candidates"], args["target"], k=min(2, max(len(args["candidates"]), 1)))


@pytest.mark.parametrize("method", available_selectors())
def test_a_pool_of_identical_rows_gives_a_valid_selection(method):
    # DSIR never chooses rows shorter than one chunk (default 100 tokens): chunks of 2 for 4-token rows
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
    ("unknown nested key", ["embedding.modle=x"], r"Unknown config key 'embedding.modle'. Known keys of embedding: \[.*'model'"),
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
    assert "'output_dir'" in err and "already exists" in err and "overwrite=true" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_existing_output_folder_is_replaced_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    out = run_job(load_config(REPO / "configs/demo.yaml", _overrides(tmp_path, "overwrite=true", "save_embeddings=false")))
    assert not (out / "stale.txt").exists() and (out / "selected").is_dir()


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
