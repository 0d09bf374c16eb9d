"""The fitted selector: a datasets map and filter, files and Hub artifact, sample fits, exact cuts.

Real data: the first rows of the bundled sample pool and target (data/sample), embedded with the
bundled encoder (the vectors ``select_by_ot`` scores, read back from the same embedding cache).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, IterableDataset

from hf_otselect import FittedSelector, embed, fit_selector, select_by_ot
from hf_otselect.fitted import choice_keys, sample_mask
from hf_otselect.fitted_io import payload_bytes
from hf_otselect.selectors import choose
from hf_otselect.selectors.base import descending_order
from hf_otselect.threshold import top_k_cut
from tests._thread_comm import run_ranks
from tests.conftest import REPO, SAMPLE, read_jsonl
from tests.test_hub import FAKE_TOKEN, SERVER_LIFETIME_S, LocalHub

N_POOL, N_TARGET, K = 240, 30, 24
METHODS = {
    "got_d": {},
    "similarity": {},
    "round_robin": {"reduce": "round_robin"},
    "dsir": {"chunk_tokens": 8},
    "tsds": {"budget": K},
    "random": {},
}


def _method(name: str) -> str:
    return "similarity" if name == "round_robin" else name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pool and target texts of the sample data, their vectors, and one cache folder for every call."""
    cache = tmp_path_factory.mktemp("cache")
    pool = [r["text"] for r in read_jsonl(SAMPLE / "pool.jsonl", N_POOL)]
    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", N_TARGET)]
    # embed() keys its cache by the texts, so these are the very vectors select_by_ot scores.
    x = embed(pool, cache_dir=cache / "embeddings", show_progress=False)
    y = embed(target, cache_dir=cache / "embeddings", show_progress=False)
    ds = Dataset.from_dict({"text": pool, "vec": x.tolist()})
    return {"cache": cache, "pool": pool, "target": target, "x": x, "y": y, "ds": ds}


def _fit(data, name: str, **kw):
    return fit_selector(data["ds"], data["target"], _method(name), vector_column="vec", cache_dir=data["cache"], **{**METHODS[name], **kw})


@pytest.fixture(scope="module")
def fitted(data):
    return {name: _fit(data, name) for name in METHODS}


@pytest.mark.parametrize("name", list(METHODS))
def test_the_map_gives_the_scores_of_select_by_ot_on_a_dataset_and_a_stream(data, fitted, name):
    ref = select_by_ot(data["ds"].remove_columns("vec"), data["target"], _method(name), K, return_scored=True,
                       cache_dir=data["cache"], **METHODS[name])["scored"]
    ref = np.asarray(ref["score"])
    f = fitted[name]
    on_dataset = np.asarray(data["ds"].map(f, batched=True, batch_size=50, with_indices=True)["score"])
    stream = IterableDataset.from_generator(lambda: iter(data["ds"]))
    on_stream = np.array([row["score"] for row in stream.map(f, batched=True, batch_size=50, with_indices=True)])
    if name == "got_d":  # the c-transform's GEMM blocks differ from the job's: float32 rounding
        np.testing.assert_allclose(on_dataset, ref, rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(on_dataset, ref)
    np.testing.assert_array_equal(on_stream, on_dataset)


def test_the_map_embeds_texts_itself_with_the_fitted_encoder(data):
    f = fit_selector(data["pool"], data["target"], "got_d", cache_dir=data["cache"])
    assert f.encoder["model"] is None and f.encoder["max_length"] == 256
    rows = data["ds"].select(range(60)).remove_columns("vec")
    ref = f.score_rows(data["x"][:60])
    got = np.asarray(rows.map(f, batched=True, batch_size=20)["score"])
    # Batches of 20 texts pad differently from the 240-text shard: float32 rounding in the encoder
    # (measured 2.4e-7 at most, on scores up to 0.3).
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_a_second_identical_map_is_read_from_the_cache_and_another_fit_is_not(data, fitted, tmp_path):
    ds = Dataset.from_dict({"text": data["pool"], "vec": data["x"].tolist()}).flatten_indices(cache_file_name=str(tmp_path / "base.arrow"))
    first = ds.map(fitted["got_d"], batched=True)
    again = ds.map(FittedSelector.from_pretrained(_saved(fitted["got_d"], tmp_path / "saved")), batched=True)
    assert again._fingerprint == first._fingerprint
    assert again.cache_files == first.cache_files  # read back, not recomputed
    other = ds.map(_fit(data, "got_d", eps=0.2), batched=True)
    assert other._fingerprint != first._fingerprint and other.cache_files != first.cache_files
    renamed = ds.map(fitted["got_d"].using(score_column="s"), batched=True)
    assert renamed._fingerprint != first._fingerprint


def test_the_map_travels_to_worker_processes_and_takes_a_rank(data, fitted):
    f = fitted["got_d"]
    ref = f.score_rows(data["x"])
    # num_proc pickles the function for its workers: by content (the payload), not by object.
    workers = np.asarray(data["ds"].map(f, batched=True, batch_size=60, num_proc=2)["score"])
    np.testing.assert_allclose(workers, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    ranked = np.asarray(data["ds"].map(f, batched=True, with_rank=True, with_indices=True)["score"])  # CPU here: rank picks no GPU
    np.testing.assert_allclose(ranked, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def _saved(f: FittedSelector, folder: Path) -> Path:
    f.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(METHODS))
def test_save_then_load_scores_bit_for_bit(data, fitted, name, tmp_path):
    f = fitted[name]
    g = FittedSelector.from_pretrained(_saved(f, tmp_path))
    rows = data["pool"] if name == "dsir" else data["x"]
    index = np.arange(N_POOL)
    assert np.array_equal(g.score_rows(rows, index), f.score_rows(rows, index))
    assert g.fingerprint == f.fingerprint
    np.testing.assert_array_equal(g.calibration["thresholds"], f.calibration["thresholds"])
    card = (tmp_path / "README.md").read_text()
    assert f"`{_method(name)}`" in card and f"{N_TARGET} rows" in card and "Calibration" in card


def test_a_tampered_or_foreign_file_is_refused_in_one_line(fitted, tmp_path):
    folder = _saved(fitted["got_d"], tmp_path / "a")
    state = bytearray((folder / "state.safetensors").read_bytes())
    state[-3] ^= 1  # one bit of a potential
    (folder / "state.safetensors").write_bytes(bytes(state))
    with pytest.raises(ValueError, match=r"^Refusing to load .*state\.safetensors does not match the checksum[^\n]*$"):
        FittedSelector.from_pretrained(folder)

    folder = _saved(fitted["got_d"], tmp_path / "b")
    config = json.loads((folder / "fitted_selector.json").read_text())
    config["params"]["eps"] = 0.5
    (folder / "fitted_selector.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"fitted_selector\.json does not match its checksum"):
        FittedSelector.from_pretrained(folder)

    config["format_version"] = 99
    (folder / "fitted_selector.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"format version 99, and this hf_otselect reads version 1"):
        FittedSelector.from_pretrained(folder)


def test_push_to_the_hub_then_load_by_repo_id_scores_the_same(data, fitted, tmp_path):
    f = fitted["got_d"]
    folder = _saved(f, tmp_path / "local")
    np.save(tmp_path / "x.npy", data["x"])
    script = textwrap.dedent(f"""
        import numpy as np
        from hf_otselect import FittedSelector
        FittedSelector.from_pretrained({str(folder)!r}).push_to_hub("user/fitted")
        g = FittedSelector.from_pretrained("user/fitted")
        np.save({str(tmp_path / 'hub.npy')!r}, g.score_rows(np.load({str(tmp_path / 'x.npy')!r})))
    """)
    with LocalHub(FAKE_TOKEN) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(TRANSFORMERS_OFFLINE="0", HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=SERVER_LIFETIME_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = hub.repos["user/fitted"]["files"]
    assert sorted(files) == ["README.md", "fitted_selector.json", "state.safetensors"]
    assert files["state.safetensors"] == (folder / "state.safetensors").read_bytes()
    assert np.array_equal(np.load(tmp_path / "hub.npy"), f.score_rows(data["x"]))
    assert FAKE_TOKEN not in proc.stderr + proc.stdout


@pytest.mark.parametrize("name", list(METHODS))
def test_keep_k_fraction_and_threshold_keep_what_a_full_sort_keeps(data, fitted, name):
    f = fitted[name]
    scored = data["ds"].map(f, batched=True, with_indices=True)
    scores = np.asarray(scored["score"])
    keys = choice_keys(scores, np.arange(N_POOL), f.choice, f.seed)

    def kept(pred) -> np.ndarray:
        return np.flatnonzero(scored.map(lambda b, i: {"k": pred(b, i)}, batched=True, with_indices=True)["k"])

    k = min(K, int(np.isfinite(keys).sum()))  # TSDS reaches few rows of so small a pool
    by_k = kept(f.keep(k=k, scores=scores))
    assert np.array_equal(by_k, np.sort(descending_order(keys)[:k]))
    if f.choice != "top_k":  # sampling without replacement: the rows choose() draws
        assert np.array_equal(by_k, np.sort(choose(scores, k, mode=f.choice, seed=f.seed, replace=False)))
    with pytest.raises(ValueError, match="The 'k' parameter of FittedSelector.keep must be at most the"):
        f.keep(k=int(np.isfinite(keys).sum()) + 1, scores=scores) if not np.isfinite(keys).all() else f.keep(k=N_POOL + 1, scores=scores)
    frac = min(0.25, k / N_POOL)
    assert np.array_equal(kept(f.keep(fraction=frac, scores=scores)), np.sort(descending_order(keys)[: math.ceil(frac * N_POOL)]))
    t = float(np.sort(keys[np.isfinite(keys)])[-10])
    assert np.array_equal(kept(f.keep(threshold=t)), np.flatnonzero(keys >= t))
    # Without scores (a stream): the calibration of the fit rows, which here are these rows.
    calibrated = kept(f.keep(fraction=0.1))
    assert set(descending_order(keys)[: math.ceil(0.1 * N_POOL)]) <= set(calibrated)
    assert len(calibrated) == int((keys >= keys[descending_order(keys)[math.ceil(0.1 * N_POOL) - 1]]).sum())


def test_keep_works_inside_dataset_filter_and_refuses_a_missing_index(data, fitted):
    f = fitted["tsds"]
    scored = data["ds"].map(f, batched=True, with_indices=True)
    pred = f.keep(k=10, scores=np.asarray(scored["score"]))
    out = scored.filter(pred, batched=True, with_indices=True)
    assert len(out) == 10
    with pytest.raises(ValueError, match="The 'with_indices' parameter of Dataset.filter"):
        scored.filter(pred, batched=True)
    with pytest.raises(ValueError, match="The 'scores' parameter of FittedSelector.keep"):
        f.keep(k=K)
    with pytest.raises(ValueError, match="The 'k/fraction/threshold' parameter"):
        f.keep(k=K, fraction=0.1)


def test_index_bound_methods_refuse_a_sample_and_rows_outside_their_fit(data, fitted):
    with pytest.raises(ValueError, match="The 'sample' parameter of fit_selector must be None for method 'tsds'.*method='got_d'"):
        fit_selector(data["x"], data["y"], "tsds", sample=0.5)
    with pytest.raises(ValueError, match="The 'index' parameter"):
        fitted["tsds"].score_rows(data["x"][:3], np.array([0, 1, N_POOL]))
    with pytest.raises(ValueError, match="with_indices=True"):
        data["ds"].map(fitted["tsds"], batched=True)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises((ValueError, TypeError), match="The 'sample' parameter of fit_selector"):
            fit_selector(data["x"], data["y"], "got_d", sample=bad)


@pytest.mark.parametrize("sample", [60, 0.3])
def test_a_sample_fit_reads_the_same_rows_and_selects_the_same_rows_at_any_world_size(data, sample):
    x, y = data["x"], data["y"]

    def fit(comm):
        f = fit_selector(x, y, "got_d", sample=sample, seed=3, comm=comm)
        n = x.shape[0]
        lo = sum(n // comm.world_size + (r < n % comm.world_size) for r in range(comm.rank))
        idx = np.arange(lo, lo + n // comm.world_size + (comm.rank < n % comm.world_size))
        scores = f.score_rows(x[idx])
        cut = f.keep(k=K, scores=scores, index=idx, comm=comm).cut
        return f, np.flatnonzero(sample_mask(np.arange(n), sample, n, 3)), cut

    one = run_ranks(1, fit)[0]
    ref_cut = one[2]
    assert one[0].fit_info["n_fit"] == (60 if sample == 60 else len(one[1]))
    # The sample fit is the fit of the sampled rows alone (their mean potential calibrates the gradient).
    alone = fit_selector(x[one[1]], y, "got_d")
    np.testing.assert_allclose(one[0].score_rows(x), alone.score_rows(x), rtol=1e-6)
    for world in (2, 3):
        for f, rows, cut in run_ranks(world, fit):
            assert np.array_equal(rows, one[1]) and f.fit_info["n_fit"] == one[0].fit_info["n_fit"]
            ref = one[0].score_rows(x)  # the sharded solve sums in another order: float32 rounding
            np.testing.assert_allclose(f.score_rows(x), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
            assert cut.k == ref_cut.k and cut.index_cut == ref_cut.index_cut  # the same K rows are kept


def test_a_full_fit_reads_a_memory_map_in_place_and_refuses_its_nan_rows(data, tmp_path, monkeypatch):
    """A whole-pool fit of a float16/float32 memory map hands the solver the map itself, read in
    blocks: copying it (the sample path's ``part[keep]`` and a float32 cast) held the pool in memory."""
    from hf_otselect.selectors.got_d import GOTDSelector

    path = tmp_path / "pool.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=data["x"].shape)
    mm[:] = data["x"]
    mm.flush()
    pool = np.load(path, mmap_mode="r")
    seen = []
    fit = GOTDSelector.fit
    monkeypatch.setattr(GOTDSelector, "fit", lambda self, view, target, comm=None: seen.append(view.data) or fit(self, view, target, comm=comm))
    mapped = fit_selector(pool, data["y"], "got_d")
    assert np.shares_memory(seen[-1], pool)  # the fit read the file, not a copy of it
    in_memory = fit_selector(np.asarray(pool, dtype=np.float32), data["y"], "got_d")  # the same values as float32
    np.testing.assert_array_equal(mapped.score_rows(data["x"]), in_memory.score_rows(data["x"]))
    sampled = fit_selector(pool, data["y"], "got_d", sample=60)  # a sample is still taken out (60 rows)
    assert not np.shares_memory(seen[-1], pool) and len(seen[-1]) == 60
    bad = np.lib.format.open_memmap(tmp_path / "bad.npy", mode="w+", dtype=np.float32, shape=data["x"].shape)
    bad[:] = data["x"]
    bad[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"The 'pool' parameter of fit_selector must be finite \(no NaN or Inf\)\. "
                                         r"Got '2 row\(s\) with NaN or Inf: rows \[3, 7\]' instead\."):
        fit_selector(bad, data["y"], "got_d")
    assert sampled.fit_info["n_fit"] == 60
    # Read in place on some processes and empty on another, the processes still meet in the same collectives.
    ref = mapped.score_rows(data["x"])
    for world in (2, 3):
        for scores in run_ranks(world, lambda comm: fit_selector(pool, data["y"], "got_d", comm=comm).score_rows(data["x"])):
            np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    two = run_ranks(3, lambda comm: fit_selector(pool[:2], data["y"], "got_d", comm=comm).score_rows(data["x"]))
    ref = fit_selector(pool[:2], data["y"], "got_d").score_rows(data["x"])  # summed in another order: float32 rounding
    np.testing.assert_allclose(two[2], ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_a_stream_pool_fits_like_the_dataset(data):
    stream = IterableDataset.from_generator(lambda: iter(data["ds"]))
    a = fit_selector(stream, data["y"], "got_d", vector_column="vec", sample=100)
    b = fit_selector(data["ds"], data["y"], "got_d", vector_column="vec", sample=100)
    assert a.fit_info["n_fit"] == b.fit_info["n_fit"] == 100 and a.fit_info["n_pool"] == N_POOL
    assert np.array_equal(a.score_rows(data["x"]), b.score_rows(data["x"]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_top_k_cut_equals_a_full_sort_with_ties_and_moves_bytes_independent_of_n(world):
    sent = {}
    for n in (1_000, 100_000):
        keys = np.random.default_rng(n).integers(0, 50, size=n).astype(np.float64)  # many ties
        k = n // 2
        parts = np.array_split(np.arange(n), world)

        def cut(comm):
            c = top_k_cut(keys[parts[comm.rank]], k, index=parts[comm.rank], comm=comm)
            return c, int(c.keeps(keys[parts[comm.rank]], parts[comm.rank]).sum()), comm.bytes_sent

        out = run_ranks(world, cut)
        expected = np.zeros(n, dtype=bool)
        expected[descending_order(keys)[:k]] = True
        got = np.concatenate([o[0].keeps(keys[p], p) for o, p in zip(out, parts)])
        assert np.array_equal(got, expected) and sum(o[1] for o in out) == k
        sent[n] = [o[2] for o in out]
    assert sent[1_000] == sent[100_000]


def test_the_fingerprint_covers_the_fit(data, fitted):
    a = fitted["got_d"].fingerprint
    assert a == hashlib.sha256(payload_bytes(fitted["got_d"])).hexdigest()
    assert _fit(data, "got_d", sample=0.5).fingerprint != a


@pytest.mark.slow
def test_torchrun_one_two_and_three_processes_fit_the_same_sample_and_keep_the_same_rows(tmp_path):
    outs = {}
    for world in (1, 2, 3):
        out = tmp_path / f"w{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(REPO / "tests" / "workers" / "fitted_sample.py"), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[world] = json.loads(out.read_text())
    ref = outs[1]
    assert 0 < ref["n_fit"] < 440 and len(ref["kept"]) == 40
    for world in (2, 3):
        got = outs[world]
        assert got["n_fit"] == ref["n_fit"]
        assert sorted(got["kept"]) == sorted(ref["kept"])
        np.testing.assert_allclose(got["scores"], ref["scores"], rtol=0, atol=1e-6 * np.abs(ref["scores"]).max())
        assert got["bytes"]["2000"] == got["bytes"]["20000"] > 0  # the cut's traffic does not grow with N


def test_the_calibrated_threshold_keeps_at_least_the_fraction_of_the_fit_rows_with_undrawable_rows(data, fitted):
    f = fitted["tsds"]  # rows outside every query's neighbour list have probability 0: never drawn
    keys = choice_keys(f.score_rows(data["x"], np.arange(N_POOL)), np.arange(N_POOL), f.choice, f.seed)
    assert np.isneginf(keys).any() and np.isfinite(keys).any()
    for fraction in np.linspace(0.0005, 1.0, 997):  # mostly between the calibration's grid points
        t = f.calibrated_threshold(float(fraction))
        assert not math.isnan(t)
        assert (keys >= t).sum() >= math.ceil(fraction * N_POOL) - 1  # linear between grid points: within a row


def test_rows_of_another_width_and_a_file_as_folder_are_refused_in_our_terms(tmp_path, data, fitted):
    f = fitted["got_d"]
    with pytest.raises(ValueError, match=r"The 'rows' parameter of FittedSelector.score_rows must be a 2-D array of shape "
                                         rf"\(b, {data['x'].shape[1]}\) like the fit's rows\. Got 'shape \(3, 4\)'"):
        f.score_rows(data["x"][:3, :4])
    target = tmp_path / "a_file"
    target.write_text("mine")
    with pytest.raises(ValueError, match=r"The 'save_directory' parameter of FittedSelector.save_pretrained must be a folder path"):
        f.save_pretrained(target)
    assert target.read_text() == "mine"
    f.save_pretrained(tmp_path / "again")
    f.save_pretrained(tmp_path / "again")  # over its own files: whole files, no temporaries left
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["README.md", "fitted_selector.json", "state.safetensors"]
    assert np.array_equal(FittedSelector.from_pretrained(tmp_path / "again").score_rows(data["x"]), f.score_rows(data["x"]))


def test_the_cards_measured_fidelity_is_the_benchmark_pages(data, tmp_path):
    """The figures a sample fit's card quotes are those of benchmarks/results/sample_fit.json (a
    rerun of the benchmark that changes them fails here until the card follows), and the card says
    which fraction it quotes, for a GOT-D sample fit only."""
    from hf_otselect.fitted_io import MEASURED_FIDELITY

    page = json.loads((REPO / "benchmarks" / "results" / "sample_fit.json").read_text())
    measured = {}
    for block in page["fidelity"]:
        for row in block[1:]:
            measured[(row["data"], row["n"], row["fraction"])] = (row["overlap@0.01"], row["overlap@0.1"], row["spearman"])
    sources = {"1M clustered 384-d vectors, 1,000 targets": ("clustered float16", 1_000_000),
               "3,888-row mixed text pool, ChemProt target": ("text -> chemprot", 3888)}
    assert set(MEASURED_FIDELITY) == set(sources)
    for name, by_fraction in MEASURED_FIDELITY.items():
        for fraction, figures in by_fraction.items():
            want = measured[(*sources[name], fraction)]
            np.testing.assert_allclose(figures, want, rtol=0, atol=5e-5, err_msg=f"{name} at {fraction}")  # quoted to 4 places
    full = _fit(data, "got_d")
    full.save_pretrained(tmp_path / "full")
    assert "its scores are the full fit's" in (tmp_path / "full" / "README.md").read_text()
    part = _fit(data, "got_d", sample=0.1)  # 24 of 240 rows: quotes the 10% rows
    part.save_pretrained(tmp_path / "part")
    card = (tmp_path / "part" / "README.md").read_text()
    assert "| 1M clustered 384-d vectors, 1,000 targets | 10.0% | 0.996 | 1.000 | 1.0000 |" in card
    assert "not on this pool" in card
    other = _fit(data, "similarity", sample=0.1)
    other.save_pretrained(tmp_path / "other")
    assert "No sample-fit fidelity has been measured" in (tmp_path / "other" / "README.md").read_text()


def test_a_got_d_fit_on_fewer_than_2_rows_is_refused_before_any_embedding(data, monkeypatch):
    """Eq. 3's gradient -(N/(N-1))(f_j - mean f) has no second row at N = 1: it scored every row 0."""
    monkeypatch.setattr(sys.modules["hf_otselect.embed"], "embed", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(ValueError, match=r"^The 'sample' parameter of fit_selector must be a sample of at least 2 rows for "
                                         r"method 'got_d' .*this one draws 1 of the pool's rows\)\. Got 1 instead\.$"):
        fit_selector(data["pool"], data["target"], "got_d", sample=1)
    with pytest.raises(ValueError, match=r"'sample' parameter .* this one draws 0 of the pool's rows\)\. Got 0\.0001 instead"):
        fit_selector(data["pool"], data["target"], "got_d", sample=1e-4)
    with pytest.raises(ValueError, match=r"^The 'pool' parameter of fit_selector must be at least 2 rows for method 'got_d'"):
        fit_selector(data["x"][:1], data["y"], "got_d")
    two = fit_selector(data["x"], data["y"], "got_d", sample=2)  # two rows are enough
    assert two.fit_info["n_fit"] == 2 and np.ptp(two.score_rows(data["x"][:20])) > 0


@pytest.mark.parametrize("name", ["got_d", "similarity", "dsir"])
def test_select_by_ot_hands_back_its_fit_and_a_rerun_reads_it_from_the_cache(data, name, monkeypatch):
    texts = data["ds"].remove_columns("vec")
    kw = {"return_scored": True, "cache_dir": data["cache"], **METHODS[name]}
    dd, fitted = select_by_ot(texts, data["target"], _method(name), K, return_fitted=True, **kw)
    assert isinstance(fitted, FittedSelector) and fitted.fit_info["n_fit"] == N_POOL
    ref = np.asarray(dd["scored"]["score"])
    got = np.asarray(data["ds"].map(fitted.using(vector_column="vec"), batched=True)["score"])
    # The job's vectors are these (one embedding cache): the one scoring path, GOT-D within 1e-6.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max() if name == "got_d" else 0)
    from hf_otselect.selectors.base import selector_class

    monkeypatch.setattr(selector_class(_method(name)), "fit", lambda *a, **k: pytest.fail("fitted again"))
    again = select_by_ot(texts, data["target"], _method(name), K, return_fitted=True, **kw)[1]
    assert again.fingerprint == fitted.fingerprint
    # The key covers the scores only: another score column is still a hit, and the fit it hands
    # back is wrapped with this run's settings.
    renamed = select_by_ot(texts, data["target"], _method(name), K, return_fitted=True, **{**kw, "score_column": "s2"})[1]
    assert renamed.score_column == "s2" and renamed.fingerprint != fitted.fingerprint
    np.testing.assert_array_equal(renamed.score_rows(data["x"][:5] if name != "dsir" else data["pool"][:5]),
                                  fitted.score_rows(data["x"][:5] if name != "dsir" else data["pool"][:5]))


def test_return_fitted_is_refused_for_a_selector_it_cannot_rebuild(data):
    from hf_otselect.selectors.got_d import GOTDSelector

    class Mine(GOTDSelector):
        pass

    for method, params in ((Mine(), {}), ("got_d", {"chunk_size": 100})):
        with pytest.raises(ValueError, match=r"^The 'return_fitted' parameter of select_by_ot must be False for a selector"):
            select_by_ot(data["ds"], data["target"], method, K, return_fitted=True, **params)


def test_a_fit_embedded_by_a_cpu_back_end_maps_with_it_after_a_save(data, tmp_path):
    """A fit whose vectors came from ONNX int8 records the back end (fit_selector and the job's
    fit alike); loaded from disk, its map embeds through ONNX int8 again, so it scores the rows as
    the fit saw them: the scores of int8 vectors, not of torch ones."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tests.test_embed import _tiny_model

    model = str(_tiny_model(tmp_path / "enc", seed=0))
    pool, target = data["pool"][:80], data["target"]
    enc = {"model": model, "max_length": 64, "encoder_backend": "onnx", "quantize": "int8"}
    # backend= stays GOT-D's solver: both in one call
    f = fit_selector(pool, target, "got_d", cache_dir=tmp_path / "cache", backend="tensorized", **enc)
    assert f.params["backend"] == "tensorized"
    assert (f.encoder["backend"], f.encoder["quantize"]) == ("onnx", "int8")
    g = FittedSelector.from_pretrained(_saved(f, tmp_path / "saved"))
    assert g.encoder == f.encoder and "onnx back end int8" in (tmp_path / "saved" / "README.md").read_text()
    texts = pool[:40]
    got = np.asarray(Dataset.from_dict({"text": texts}).map(g, batched=True, batch_size=40)["score"])
    kw = {"model": model, "max_length": 64, "cache_dir": tmp_path / "cache", "use_cache": False, "show_progress": False}
    int8 = f.score_rows(embed(texts, backend="onnx", quantize="int8", **kw))
    fp32 = f.score_rows(embed(texts, **kw))
    np.testing.assert_allclose(got, int8, rtol=0, atol=1e-6 * np.abs(int8).max())
    assert np.abs(fp32 - int8).max() > 100 * 1e-6 * np.abs(int8).max()  # the back end is what made them
    # The job's fit (select_by_ot) records it the same way.
    _, fitted = select_by_ot(Dataset.from_dict({"text": pool}), target, "got_d", 8, return_fitted=True, cache_dir=tmp_path / "cache",
                             model=model, max_length=64, encoder_backend="onnx", quantize="int8")
    assert fitted.encoder == f.encoder
    # And `hf-otselect fit` from a YAML job's `embedding:` block.
    from hf_otselect.cli import main

    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pool))
    (tmp_path / "target.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in target))
    (tmp_path / "job.yaml").write_text(f"pool: {{path: {tmp_path / 'pool.jsonl'}}}\ntarget: {{path: {tmp_path / 'target.jsonl'}}}\n"
                                       f"method: got_d\ncache_dir: {tmp_path / 'cache'}\n"
                                       f"embedding: {{model: {model}, max_length: 64, backend: onnx, quantize: int8}}\n")
    assert main(["fit", "--config", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "cli")]) == 0
    assert FittedSelector.from_pretrained(tmp_path / "cli").encoder == f.encoder
