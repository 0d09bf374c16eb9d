"""The datatrove filter step keeps exactly what ``Dataset.filter(fitted.keep(...))`` keeps.

Real data: rows of the bundled sample pool written to several jsonl files, read by datatrove's
``JsonlReader`` (one file per shard) in a ``LocalPipelineExecutor`` of several tasks and written by
its ``JsonlWriter`` (both need ``orjson``, from datatrove's ``io`` extra; the dev extra installs it).
"""

from __future__ import annotations

import gzip
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from hf_otselect import FittedSelector, embed, fit_selector
from hf_otselect.fitted import choice_keys
from tests.conftest import SAMPLE, read_jsonl

pytest.importorskip("datatrove")  # in the dev extra; a bare install skips rather than fails

from datatrove.data import Document  # noqa: E402
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402

from hf_otselect.integrations.datatrove import FittedSelectorFilter  # noqa: E402

N_ROWS, N_TARGET, MAX_LENGTH = 300, 30, 32
FILE_SIZES = (120, 100, 80)  # three files over two tasks: task 0 reads two, task 1 one


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """600 pool rows (the first 300 filtered, all 600 available to fits), 30 target rows, their vectors."""
    cache = tmp_path_factory.mktemp("cache")
    rows = read_jsonl(SAMPLE / "pool.jsonl", 2 * N_ROWS)
    texts = [r["text"] for r in rows]
    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", N_TARGET)]
    x = embed(texts, max_length=MAX_LENGTH, cache_dir=cache / "embeddings", show_progress=False)
    y = embed(target, max_length=MAX_LENGTH, cache_dir=cache / "embeddings", show_progress=False)
    return {"cache": cache, "rows": rows, "texts": texts, "target": target, "x": x, "y": y}


def _write_corpus(data, folder: Path, with_vectors: bool) -> Dataset:
    """The first N_ROWS rows as jsonl files and as the Dataset they equal; a row's ``id`` is its
    global row index as a str (datatrove's ids are str, and its writers drop a falsy 0)."""
    folder.mkdir()
    start = 0
    for f, size in enumerate(FILE_SIZES):
        with (folder / f"part-{f}.jsonl").open("w", encoding="utf-8") as fh:
            for i in range(start, start + size):
                row = {"id": str(i), "text": data["texts"][i], "domain": data["rows"][i]["domain"]}
                if with_vectors:
                    row["vec"] = data["x"][i].tolist()  # float32 -> JSON -> float32 is exact
                fh.write(json.dumps(row) + "\n")
        start += size
    assert start == N_ROWS
    columns = {"text": data["texts"][:N_ROWS]}
    if with_vectors:
        columns["vec"] = data["x"][:N_ROWS].tolist()
    return Dataset.from_dict(columns)


def _run(step: FittedSelectorFilter, corpus: Path, out: Path, tasks: int) -> dict[int, float]:
    """Run reader -> step -> writer with ``tasks`` tasks; the kept documents' ids and written scores."""
    reader = JsonlReader(str(corpus), glob_pattern="*.jsonl")
    LocalPipelineExecutor([reader, step, JsonlWriter(str(out / "kept"))], tasks=tasks, logging_dir=str(out / "logs")).run()
    docs = []
    for path in sorted((out / "kept").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line) for line in fh]
    kept = {int(doc["id"]): doc["metadata"]["score"] for doc in docs}
    assert len(kept) == len(docs)  # no id twice
    return kept


def _dataset_keeps(ds: Dataset, fitted: FittedSelector, **mode) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``ds.map(fitted).filter(fitted.keep(**mode))`` keeps, and every row's score."""
    scored = ds.map(fitted, batched=True, with_indices=True)
    kept = scored.add_column("row", list(range(len(scored)))).filter(fitted.keep(**mode), batched=True, with_indices=True)
    return np.asarray(kept["row"], dtype=np.int64), np.asarray(scored["score"])


def _assert_clear_of_the_threshold(fitted: FittedSelector, scores: np.ndarray, rule) -> None:
    """A row whose key sits within float32 rounding of the threshold could go either way when the
    batch changes; the planted data keeps every key clear of it, so the comparison can be exact."""
    keys = choice_keys(scores, np.arange(scores.size), fitted.choice, fitted.seed)
    finite = keys[np.isfinite(keys)]
    assert np.abs(finite - rule.threshold).min() > 1e-5 * np.abs(finite).max()


def test_the_step_keeps_what_dataset_filter_keeps_for_got_d_over_two_tasks(data, tmp_path):
    ds = _write_corpus(data, tmp_path / "corpus", with_vectors=True)
    # Fit on other rows of the pool, so the calibration threshold is no row's own score.
    fitted = fit_selector(Dataset.from_dict({"text": data["texts"][N_ROWS:], "vec": data["x"][N_ROWS:].tolist()}), data["y"], "got_d",
                          vector_column="vec")
    expected, scores = _dataset_keeps(ds, fitted, fraction=0.2)
    step = FittedSelectorFilter(fitted, fraction=0.2, batch_size=64)
    _assert_clear_of_the_threshold(fitted, scores, step.rule)
    assert 0 < expected.size < N_ROWS
    kept = _run(step, tmp_path / "corpus", tmp_path / "run", tasks=2)
    assert sorted(kept) == expected.tolist()
    # The scores written to the metadata are the map's (GOT-D's c-transform in other batches: float32 rounding).
    np.testing.assert_allclose([kept[i] for i in expected], scores[expected], rtol=0, atol=1e-6 * np.abs(scores).max())


def test_a_sampling_method_keys_documents_by_their_id_the_same_at_one_two_and_three_tasks(data, tmp_path):
    ds = _write_corpus(data, tmp_path / "corpus", with_vectors=True)
    # TSDS: scores looked up by fit row and kept by keys from (seed, global row index).
    fitted = fit_selector(ds, data["y"], "tsds", vector_column="vec", budget=30, seed=5)
    expected, scores = _dataset_keeps(ds, fitted, fraction=0.05)
    assert 0 < expected.size < (scores > 0).sum()  # a draw, not every reachable row
    for tasks in (1, 2, 3):
        kept = _run(FittedSelectorFilter(fitted, fraction=0.05, index_key="id"), tmp_path / "corpus", tmp_path / f"run{tasks}", tasks=tasks)
        assert sorted(kept) == expected.tolist(), tasks
        assert [kept[i] for i in expected] == scores[expected].tolist()


@pytest.mark.slow
def test_the_step_loads_a_saved_selector_and_embeds_the_texts_in_its_tasks(data, tmp_path):
    ds = _write_corpus(data, tmp_path / "corpus", with_vectors=False)
    fitted = fit_selector(data["texts"][N_ROWS:], data["target"], "got_d", max_length=MAX_LENGTH, cache_dir=data["cache"])
    fitted.save_pretrained(tmp_path / "selector")
    expected, scores = _dataset_keeps(ds, fitted, threshold=float(fitted.calibrated_threshold(0.3)))
    token = "hf_" + "q" * 34  # unused by a folder; the step must not keep it where datatrove writes its executor.json
    step = FittedSelectorFilter(str(tmp_path / "selector"), threshold=float(fitted.calibrated_threshold(0.3)), batch_size=50, token=token)
    assert step.fitted.fingerprint == fitted.fingerprint and step.fitted.encoder["max_length"] == MAX_LENGTH
    _assert_clear_of_the_threshold(fitted, scores, step.rule)
    kept = _run(step, tmp_path / "corpus", tmp_path / "run", tasks=2)
    assert sorted(kept) == expected.tolist()
    executor_json = (tmp_path / "run" / "logs" / "executor.json").read_text()
    assert fitted.fingerprint[:12] in executor_json and token not in executor_json
    # Batches of 50 texts pad differently from the map's batch: float32 rounding in the encoder.
    np.testing.assert_allclose([kept[i] for i in expected], scores[expected], rtol=0, atol=1e-5 * np.abs(scores).max())


def test_modes_a_stream_cannot_decide_and_missing_indices_are_refused(data):
    vec = Dataset.from_dict({"text": data["texts"][:60], "vec": data["x"][:60].tolist()})
    got_d = fit_selector(vec, data["y"], "got_d", vector_column="vec")
    with pytest.raises(ValueError, match=r"^The 'k' parameter of FittedSelectorFilter must be None \(an exact top-k needs every"):
        FittedSelectorFilter(got_d, k=10)
    with pytest.raises(ValueError, match="The 'fraction/threshold' parameter of FittedSelectorFilter must be exactly one of them"):
        FittedSelectorFilter(got_d, fraction=0.1, threshold=0.0)
    with pytest.raises(ValueError, match="The 'fraction/threshold' parameter"):
        FittedSelectorFilter(got_d)
    with pytest.raises(ValueError, match="The 'fraction' parameter of FittedSelectorFilter"):
        FittedSelectorFilter(got_d, fraction=1.5)
    with pytest.raises(TypeError, match="The 'selector' parameter of FittedSelectorFilter"):
        FittedSelectorFilter(object(), fraction=0.1)
    for method, params in (("random", {}), ("tsds", {"budget": 6})):
        fitted = fit_selector(vec, data["y"], method, vector_column="vec", **params)
        with pytest.raises(ValueError, match=rf"^The 'index_key' parameter of FittedSelectorFilter must be 'id' or .*{method!r}"):
            FittedSelectorFilter(fitted, fraction=0.1)
    step = FittedSelectorFilter(fitted, fraction=0.1, index_key="row")
    doc = Document(text=data["texts"][0], id="a.jsonl/0", metadata={"vec": data["x"][0].tolist()})
    with pytest.raises(ValueError, match=r"Column 'row' not in the metadata of document 'a.jsonl/0'. Current fields: \['vec'\]"):
        step.filter_batch([doc])
    doc.metadata["row"] = "zero"
    with pytest.raises(ValueError, match=r"The metadata field 'row' of document 'a.jsonl/0' must be its global row index .* Got 'zero'"):
        step.filter_batch([doc])
    doc.metadata["row"] = "0"  # a str of digits, as datatrove ids often are
    by_id = Document(text=doc.text, id="0", metadata={"vec": doc.metadata["vec"]})
    assert step.filter_batch([doc]) == FittedSelectorFilter(fitted, fraction=0.1, index_key="id").filter_batch([by_id])
    assert doc.metadata["score"] == by_id.metadata["score"] == fitted.score_rows(data["x"][:1], np.array([0]))[0]
    with pytest.raises(TypeError, match="The 'revision/token' parameter of FittedSelectorFilter must be None when selector is a"):
        FittedSelectorFilter(got_d, fraction=0.1, token="hf_" + "q" * 34)
    no_vec = FittedSelectorFilter(got_d, fraction=0.1)
    with pytest.raises(ValueError, match=r"Column 'vec' not in the metadata of document 'b'"):
        no_vec.filter(Document(text="x", id="b"))


def test_without_the_extra_the_import_names_it(monkeypatch):
    for name in [m for m in sys.modules if m == "datatrove" or m.startswith("datatrove.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if datatrove were not installed
    monkeypatch.setitem(sys.modules, "datatrove", None)
    monkeypatch.delitem(sys.modules, "hf_otselect.integrations.datatrove")
    with pytest.raises(ImportError, match=r"needs datatrove, which could not be imported .* pip install 'hf_otselect\[datatrove\]'"):
        importlib.import_module("hf_otselect.integrations.datatrove")
    assert "hf_otselect.integrations.datatrove" not in sys.modules
