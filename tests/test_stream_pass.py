"""One pass over a stream: a fitted selector embeds, scores, filters and writes in one pass.

Real data: the first rows of the bundled sample pool and target (data/sample), embedded once with
the bundled encoder; the CLI test embeds its own few rows end to end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from datasets import Dataset, IterableDataset, load_dataset

from hf_otselect import FittedSelector, StreamPass, embed, fit_selector, write_selected
from hf_otselect.cli import main
from hf_otselect.fitted import choice_keys
from hf_otselect.stream_pass import INDEX_COLUMN
from tests.conftest import REPO, SAMPLE, read_jsonl

N_POOL, N_TARGET = 240, 30
METHODS = {"got_d": {}, "similarity": {}, "dsir": {"chunk_tokens": 8}, "random": {}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    pool = read_jsonl(SAMPLE / "pool.jsonl", N_POOL)
    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", N_TARGET)]
    x = embed([r["text"] for r in pool], cache_dir=cache / "embeddings", show_progress=False)
    y = embed(target, cache_dir=cache / "embeddings", show_progress=False)
    ds = Dataset.from_dict({"text": [r["text"] for r in pool], "domain": [r["domain"] for r in pool], "vec": x.tolist()})
    fitted = {m: fit_selector(ds, target, m, vector_column="vec", cache_dir=cache, **p) for m, p in METHODS.items()}
    return {"cache": cache, "target": target, "x": x, "y": y, "ds": ds, "fitted": fitted}


def _reference(ds: Dataset, f: FittedSelector, **how) -> Dataset:
    """What the pass must equal: datasets' own map then filter over the whole in-memory Dataset."""
    return ds.map(f, batched=True, batch_size=50, with_indices=True).filter(f.keep(**how), batched=True, with_indices=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_one_pass_keeps_what_map_then_filter_keeps(data, method, tmp_path):
    f, ds = data["fitted"][method], data["ds"]
    keys = choice_keys(f.score_rows(list(ds["text"]) if method == "dsir" else data["x"], np.arange(N_POOL)),
                       np.arange(N_POOL), f.choice, f.seed)
    threshold = float(np.sort(keys[np.isfinite(keys)])[-40])  # about 40 rows, decided row by row
    for how in ({"threshold": threshold}, {"fraction": 0.2}):
        ref = _reference(ds, f, **how)
        assert 0 < len(ref) < N_POOL
        # select(): the lazy IterableDataset, over a stream of 3 file shards, batches crossing them.
        lazy = f.select(ds.to_iterable_dataset(num_shards=3), batch_size=50, **how)
        assert isinstance(lazy, IterableDataset)
        rows = list(lazy)
        assert [r["text"] for r in rows] == ref["text"] and [r["score"] for r in rows] == ref["score"]
        # StreamPass over a plain generator of dict rows, another batch size.
        run = StreamPass(f, (row for row in ds), batch_size=64, **how)
        tables = list(run)
        assert sum(t.num_rows for t in tables) == run.rows_kept == len(ref) and run.rows_seen == N_POOL
        assert [i for t in tables for i in t.column("pool_index").to_pylist()] == [i for i in range(N_POOL) if keys[i] >= run.keep.threshold]
        # write_selected: Parquet shards of 7 rows and a summary, read back by datasets.
        out = tmp_path / f"out-{'t' if 'threshold' in how else 'f'}"
        summary = write_selected(f, ds.to_iterable_dataset(), out, batch_size=50, shard_rows=7, **how)
        back = load_dataset(str(out), split="train")
        assert back["text"] == ref["text"] and back["score"] == ref["score"] and back["domain"] == ref["domain"]
        assert back.features["vec"] == ds.features["vec"]
        assert summary == json.loads((out / "summary.json").read_text())
        assert summary["rows_seen"] == N_POOL and summary["rows_kept"] == len(ref) == len(back)
        assert summary["selector"]["fingerprint"] == f.fingerprint and len(summary["shards"]) == math.ceil(len(ref) / 7)
        assert summary["threshold"] == (threshold if "threshold" in how else f.calibrated_threshold(0.2))


def test_memory_does_not_grow_with_the_stream(data):
    """Peak Python/numpy allocation of a pass over N and 4N streamed rows: the same, give or take a byte a row.

    Holding one number per row seen (a float64 score, an int64 index, a bool of a mask) would add
    at least a byte per extra row. The rows are the real vectors cut to 16 numbers, streamed again
    and again (their width does not matter here, and 16 keeps the test quick).
    """
    x = data["x"][:, :16] / np.linalg.norm(data["x"][:, :16], axis=1, keepdims=True)
    f = fit_selector(x, x[:N_TARGET] * 0.5 + x[N_TARGET : 2 * N_TARGET] * 0.5, "got_d", vector_column="vec")
    threshold = f.calibrated_threshold(0.1)

    def peak(n: int) -> tuple[int, int]:
        def rows():
            for i in range(n):
                yield {"id": i, "vec": x[i % N_POOL]}

        run = StreamPass(f, IterableDataset.from_generator(rows), threshold=threshold, batch_size=500)
        tracemalloc.start()
        try:
            kept = sum(t.num_rows for t in run)
            return tracemalloc.get_traced_memory()[1], kept
        finally:
            tracemalloc.stop()

    n = 8_000
    small, kept_small = peak(n)
    large, kept_large = peak(4 * n)
    assert kept_large > kept_small > 0
    assert large - small < 3 * n, (small, large)  # under 1 byte per extra row


def test_write_selected_peak_rss_does_not_grow_with_the_stream(data, tmp_path):
    """Peak RSS (VmHWM) of a fresh process writing the kept rows of 50k and 200k streamed 384-d vectors.

    Arrow memory is not seen by tracemalloc: kept batches held until a shard filled grew the
    peak by about 160 MiB per 100k rows read (benchmarks/stream_pass.py runs the same child).
    """
    data["fitted"]["got_d"].save_pretrained(tmp_path / "selector")
    np.save(tmp_path / "vectors.npy", data["x"])
    peaks = {}
    for n in (50_000, 200_000):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stream_pass.py"), "--memory-child", str(tmp_path), str(n)],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks[200_000]["kept"] > peaks[50_000]["kept"] > 0
    assert peaks[200_000]["peak_kib"] < 1.1 * peaks[50_000]["peak_kib"], peaks


def test_bad_inputs_are_refused_in_one_line_before_any_row_is_scored(data, tmp_path):
    f = data["fitted"]["got_d"]
    ds = data["ds"]
    stream = ds.to_iterable_dataset()
    with pytest.raises(ValueError, match=r"^The 'k' parameter of FittedSelector.select must be None: one pass over a stream of unknown "
                                         r"length cannot know its k best rows \(use fraction=.*Got 10 instead\.$"):
        f.select(stream, k=10)
    with pytest.raises(ValueError, match=r"The 'fraction/threshold' parameter of StreamPass must be exactly one of them"):
        StreamPass(f, stream, fraction=0.1, threshold=0.0)
    with pytest.raises(ValueError, match=r"The 'fraction' parameter of write_selected must be a float in \(0"):
        write_selected(f, stream, tmp_path / "a", fraction=1.5)
    with pytest.raises(ValueError, match=r"^Column 'vec' not in the pool\. Current columns: \['text', 'domain'\]$"):
        f.select(ds.remove_columns("vec"), fraction=0.1)
    with pytest.raises(ValueError, match=r"The 'score_column' parameter of FittedSelector.select must be a column name the pool does not have"):
        f.select(ds.add_column("score", [0.0] * N_POOL), fraction=0.1)
    # A stream that declares no columns is checked on its first batch, before it is scored or written.
    taken = IterableDataset.from_generator(lambda: iter([{"vec": [0.0] * 4, INDEX_COLUMN: 7}]))
    with pytest.raises(ValueError, match=r"The 'pool' parameter of write_selected must be a column name the pool does not have "
                                         r"\('pool_index' would be overwritten"):
        write_selected(f, taken, tmp_path / "a", fraction=0.1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_a_vector_of_another_width_is_named_by_column_and_row_and_leaves_no_output(data, tmp_path):
    f = data["fitted"]["got_d"]
    dim = data["x"].shape[1]
    rows = [{"text": t, "vec": v} for t, v in zip(data["ds"]["text"], data["x"].tolist())]
    rows[150]["vec"] = rows[150]["vec"][:5]
    with pytest.raises(ValueError, match=rf"^The 'vec' parameter of write_selected must be vectors of the fit's width {dim} in every "
                                         r"row\. Got '5 numbers at pool row 150' instead\.$"):
        write_selected(f, iter(rows), tmp_path / "out", threshold=-1e9, batch_size=40, shard_rows=10)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()  # shards were written, then removed
    ragged = Dataset.from_dict({"text": ["a", "b"], "vec": [data["x"][0].tolist(), data["x"][1, :5].tolist()]})
    with pytest.raises(ValueError, match=r"The 'vec' parameter of FittedSelector\('got_d'\) must be a column of vectors of one width"):
        list(f.select(ragged, fraction=0.5))


def test_tsds_scores_only_its_fit_rows_and_says_what_to_use_instead(data):
    """Item 2: TSDS's p is a distribution over the rows its fit saw; a row outside has none (see stream_pass)."""
    ds = data["ds"]
    f = fit_selector(ds, data["target"], "tsds", vector_column="vec", budget=24)
    keys = choice_keys(f.score_rows(data["x"], np.arange(N_POOL)), np.arange(N_POOL), f.choice, f.seed)
    t = float(np.sort(keys[np.isfinite(keys)])[-10])
    # The fit's own Dataset, in one pass: the rows map + filter keep (sampling keys by pool position).
    assert [r["text"] for r in f.select(ds, threshold=t)] == _reference(ds, f, threshold=t)["text"]
    advice = r"fit on the whole pool you select from, or use method='got_d' or 'similarity' \(reduce 'mean' or 'max'\)"
    for call in (lambda: f.select(ds.to_iterable_dataset(), threshold=t), lambda: f.select(ds.select(range(100)), threshold=t),
                 lambda: StreamPass(f, iter([]), fraction=0.1)):
        with pytest.raises(ValueError, match=r"^The 'pool' parameter of .* must be the very Dataset this 'tsds' selector was fitted on.*"
                                             + advice):
            call()
    with pytest.raises(ValueError, match=r"The 'index' parameter of FittedSelector\('tsds'\).score_rows must be pool row indices in "
                                         rf"\[0, {N_POOL}\).*a row outside the fit has none; " + advice + r".*Got 240 instead"):
        f.score_rows(data["x"][:2], np.array([3, N_POOL]))


def test_the_cli_fits_from_yaml_then_applies_in_one_pass(tmp_path, capsys):
    rows = read_jsonl(SAMPLE / "pool.jsonl", 60)
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(SAMPLE / "target.jsonl", 12)))
    (tmp_path / "job.yaml").write_text("pool: {path: pool.jsonl}\ntarget: {path: target.jsonl}\nmethod: got_d\nparams: {eps: 0.1}\n"
                                       "embedding: {batch_size: 16}\ncache_dir: cache\n")
    assert main(["fit", "--config", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "sel")]) == 0
    f = FittedSelector.from_pretrained(tmp_path / "sel")
    assert f.method == "got_d" and f.params["eps"] == 0.1 and f.fit_info["n_fit"] == 60
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "sel"), str(tmp_path / "pool.jsonl"), str(tmp_path / "out"), "--fraction", "0.25",
                 "--batch-size", "16"]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert said["rows_seen"] == summary["rows_seen"] == 60 and said["rows_kept"] == summary["rows_kept"]
    assert summary["selector"]["fingerprint"] == f.fingerprint and summary["threshold"] == f.calibrated_threshold(0.25)
    back = load_dataset(str(tmp_path / "out"), split="train")
    # The fit rows are the pool: the calibrated 25% keeps the best quarter, give or take the row at the
    # boundary (batches of 16 texts pad otherwise than the fit's embedding: float32 rounding).
    scores = f.score_rows(embed([r["text"] for r in rows], cache_dir=tmp_path / "cache" / "embeddings", show_progress=False))
    assert abs(len(back) - 15) <= 1
    best = sorted(np.argsort(-scores, kind="stable")[: len(back)].tolist())
    assert back["pool_index"] == best and back["text"] == [rows[i]["text"] for i in best]
    np.testing.assert_allclose(back["score"], scores[best], rtol=1e-5, atol=1e-6)
    # Bad input: one line, exit 2, nothing written. An existing output without --overwrite too.
    for argv, line in (
        (["--threshold", "0", "--column", "body"], "Column 'body' not in the pool. Current columns: ['text', 'domain']"),
        (["--fraction", "0.1"], "already exists"),
        (["--fraction", "2"], "The 'fraction' parameter of hf-otselect apply must be a float in (0.0, 1.0]. Got 2.0 instead."),
    ):
        out = tmp_path / ("out" if "already exists" in line else "bad")
        assert main(["apply", str(tmp_path / "sel"), str(tmp_path / "pool.jsonl"), str(out), *argv]) == 2
        # datasets' own "Generating train split" bars (shown where stderr is not a terminal) are not ours
        err = [e for e in capsys.readouterr().err.strip().splitlines() if not e.startswith("Generating ")]
        assert len(err) == 1 and line in err[0], err
        assert not (tmp_path / "bad").exists()
    assert main(["fit", "--out", str(tmp_path / "sel"), f"pool.path={tmp_path / 'pool.jsonl'}", f"target.path={tmp_path / 'target.jsonl'}"]) == 2
    assert "already holds a saved selector" in capsys.readouterr().err
