"""Decontamination: planted copies and light paraphrases of held-out rows go, unrelated rows stay."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from hf_otselect.config import load_config
from hf_otselect.datasets_ext import run_selection, select_by_ot
from hf_otselect.decontaminate import decontaminate, fit_heldout, word_ngrams
from hf_otselect.dist import LOCAL
from hf_otselect.embed import embed
from hf_otselect.job import run_job
from tests.conftest import REPO, SAMPLE, read_jsonl

from ._thread_comm import contiguous_bounds, run_ranks
from .workers.filters_sharded import problem as filters_problem
from .workers.filters_sharded import run as filters_run

EMB = {"max_length": 64}


def _paraphrases(texts: list[str]) -> list[tuple[str, str]]:
    """(kind, text): exact copies, case changes and whitespace changes of held-out rows."""
    out = []
    for i, t in enumerate(texts):
        kind = ("copy", "upper", "lower-spaced", "newlines")[i % 4]
        words = t.split()
        variant = {
            "copy": t,
            "upper": t.upper(),
            "lower-spaced": "   ".join(w.lower() for w in words) + "  ",
            "newlines": "\n".join(" ".join(words[j : j + 5]) for j in range(0, len(words), 5)),
        }[kind]
        out.append((kind, variant))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("decon_cache")


@pytest.fixture(scope="module")
def data(cache):
    heldout = [r["text"] for r in read_jsonl(SAMPLE / "target_eval.jsonl")]
    unrelated = read_jsonl(SAMPLE / "pool.jsonl", 150)
    same_domain = [{"text": r["text"], "domain": "chemprot_dev"} for r in read_jsonl(SAMPLE / "target.jsonl", 40)]
    planted = [{"text": t, "domain": "planted"} for _, t in _paraphrases(heldout[:24])]
    # n-gram only: 15 words of a held-out row inside a long unrelated text
    news = [r["text"] for r in unrelated if r["domain"] == "news"][:3]
    long_rows = [t for t in heldout[30:] if len(t.split()) >= 25][:3]
    spliced = [{"text": f"{n} {' '.join(h.split()[5:20])} {n}", "domain": "spliced"} for n, h in zip(news, long_rows)]
    pool = Dataset.from_list(unrelated + same_domain + planted + spliced)
    emb = embed(pool, cache_dir=cache / "embeddings", **EMB)
    held_emb = embed(heldout, cache_dir=cache / "embeddings", **EMB)
    return pool, heldout, emb, held_emb


def test_word_ngrams_normalise_case_and_whitespace():
    a = word_ngrams("The  quick\nbrown FOX jumps", 3)
    assert a == {("the", "quick", "brown"), ("quick", "brown", "fox"), ("brown", "fox", "jumps")}
    assert word_ngrams("Short text", 13) == {("short", "text")}  # shorter than n: the whole text
    assert word_ngrams("   ", 13) == set()


def test_planted_copies_and_paraphrases_are_removed_unrelated_rows_are_not(data):
    pool, heldout, emb, held_emb = data
    domain = np.asarray(pool["domain"])
    res = decontaminate(emb, held_emb, radius=0.3, candidate_texts=pool["text"], heldout_texts=heldout, ngram=13, sources=domain)
    planted, spliced = domain == "planted", domain == "spliced"
    assert res.dropped[planted].all()
    assert res.by_embedding[planted].all()  # every copy/paraphrase is also caught by distance alone
    assert res.dropped[spliced].all() and res.by_ngram[spliced].all()
    assert not res.dropped[~(planted | spliced)].any()  # same-domain ChemProt rows included
    assert res.by_source == {"planted": 24, "spliced": 3}
    summary = res.to_dict()
    assert summary["dropped"] == 27 and summary["n_heldout"] == len(heldout) and summary["ngram"] == 13
    # each copy's nearest held-out row is the one it was made from
    assert res.nearest_index[np.flatnonzero(planted)].tolist() == list(range(24))
    # an independent nearest-distance computation agrees
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    d = np.sqrt(np.maximum(2 - 2 * unit(emb.astype(np.float64)) @ unit(held_emb.astype(np.float64)).T, 0)).min(axis=1)
    assert np.allclose(res.nearest_distance, d, atol=1e-3)


def test_ngram_test_alone_and_embedding_test_alone(data):
    pool, heldout, emb, held_emb = data
    domain = np.asarray(pool["domain"])
    only_ngram = decontaminate(emb, held_emb, radius=1e-3, candidate_texts=pool["text"], heldout_texts=heldout, ngram=13)
    # with a tiny radius, copies still go by n-gram (case/whitespace normalised) when long enough
    long_enough = np.array([len(t.split()) >= 13 or d == "planted" for t, d in zip(pool["text"], domain)])
    assert only_ngram.by_ngram[(domain == "planted") & long_enough].all()
    assert only_ngram.by_ngram[domain == "spliced"].all()
    no_ngram = decontaminate(emb, held_emb, radius=0.3, ngram=None)
    assert not no_ngram.by_ngram.any() and no_ngram.dropped[domain == "planted"].all()


def test_select_by_ot_never_selects_dropped_rows(data, cache):
    pool, heldout, emb, held_emb = data
    # similarity to the held-out set itself: the planted rows would be its first choices
    dd = select_by_ot(
        pool, heldout, "similarity", 30, cache_dir=cache, embedding=EMB, return_scored=True,
        decontaminate=heldout, source_column="domain",
    )
    selected, scored, dropped = dd["selected"], dd["scored"], dd["decontaminated"]
    assert not {"planted", "spliced"} & set(selected["domain"])
    assert set(dropped["domain"]) == {"planted", "spliced"} and len(dropped) == 27
    for row in list(selected) + list(dropped):  # indices still point into the original pool
        assert pool[row["pool_index"]]["text"] == row["text"]
    scores = np.asarray(scored["score"], dtype=float)
    assert np.isnan(scores[dropped["pool_index"]]).all() and np.isfinite(np.delete(scores, dropped["pool_index"])).all()
    # without decontamination the same call does pick planted rows: the test can fail
    plain = select_by_ot(pool, heldout, "similarity", 30, cache_dir=cache, embedding=EMB)
    assert "planted" in set(plain["domain"])
    run = run_selection(pool, heldout, "got_d", 10, cache_dir=cache, embeddings=(emb, held_emb), decontaminate=held_emb, decontaminate_ngram=None, source_column="domain")
    assert run.decontamination["by_source"] == {"planted": 24} and run.decontamination["ngram"] is None
    assert not set(run.result.indices.tolist()) & set(np.flatnonzero(np.asarray(pool["domain"]) == "planted").tolist())


def test_bad_decontamination_arguments_fail_up_front(data, cache):
    pool, heldout, _, held_emb = data
    with pytest.raises(ValueError, match=r"'decontaminate_radius' parameter of select_by_ot must be a float in \(0.0, 2.0\]"):
        select_by_ot(pool, heldout, k=3, decontaminate=heldout, decontaminate_radius=3.0, cache_dir=cache)
    with pytest.raises(ValueError, match="'decontaminate_ngram' parameter of select_by_ot must be None when the held-out set is given as embeddings"):
        select_by_ot(pool, heldout, k=3, decontaminate=held_emb, cache_dir=cache)
    with pytest.raises(ValueError, match="'decontaminate' parameter of select_by_ot must be a non-empty"):
        select_by_ot(pool, heldout, k=3, decontaminate=[], cache_dir=cache)
    with pytest.raises(ValueError, match="Column 'sentence' not in the decontaminate dataset"):
        select_by_ot(pool, heldout, k=3, decontaminate=Dataset.from_dict({"text": ["a"]}), decontaminate_column="sentence", cache_dir=cache)
    # Vectors of another width than the pool's: named as the user's argument, expected and given the right way round.
    with pytest.raises(ValueError, match=r"'decontaminate' parameter of select_by_ot must be embeddings with 384 columns like the pool.*Got 'shape \(2, 5\)'"):
        select_by_ot(pool, heldout, k=3, decontaminate=np.zeros((2, 5), dtype=np.float32), decontaminate_ngram=None, cache_dir=cache, embedding=EMB)


def test_yaml_job_runs_all_three_and_records_them(tmp_path):
    """configs/pipeline.yaml (pre-filter, decontamination, guard) on a small slice of the sample."""
    rows = read_jsonl(SAMPLE / "pool.jsonl", 120)
    evals = read_jsonl(SAMPLE / "target_eval.jsonl", 20)
    rows += [{"text": r["text"].upper(), "domain": "biomedical"} for r in evals[:4]]
    rows += [{"text": rows[0]["text"], "domain": rows[0]["domain"]}] * 30  # one text 30 times
    pool_path = tmp_path / "pool.jsonl"
    pool_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in evals), encoding="utf-8")
    config = load_config(REPO / "configs" / "pipeline.yaml", [
        f"pool.path={pool_path}", f"target.path={SAMPLE / 'target.jsonl'}", "target.max_rows=20",
        f"decontaminate.path={eval_path}", "prefilter.keep=3", "prefilter.sample_size=40", "k=15",
        "embedding.max_length=64", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", "report=false",
    ])
    out = run_job(config)
    prov = json.loads((out / "selection.json").read_text())
    assert prov["prefilter"]["keep"] == 3 and len(prov["prefilter"]["ranking"]) == 6
    assert prov["prefilter"]["source_column"] == "domain" and prov["config"]["prefilter"]["sample_size"] == 40
    assert prov["decontamination"]["dropped"] >= 4 and prov["decontamination"]["by_source"].get("biomedical", 0) >= 4
    assert prov["dedup"]["mode"] == "greedy" and prov["dedup"]["radius"] == 0.2
    selected = load_from_disk(str(out / "selected"))
    assert len(selected) == 15 and len(set(selected["text"])) == 15
    assert set(selected["domain"]) <= set(prov["prefilter"]["kept_sources"])
    assert not {r["text"].upper() for r in evals} & set(selected["text"])
    assert load_from_disk(str(out / "prefilter"))["source"] == [r["source"] for r in prov["prefilter"]["ranking"]]
    assert len(load_from_disk(str(out / "decontaminated"))) == prov["decontamination"]["dropped"]


# -- several processes and streams: a per-row test against a fixed state, counts all-reduced --

def _filters():
    p = filters_problem()
    return p, filters_run(p, LOCAL, 0, len(p["x"]))[0]


def _brute(p: dict) -> np.ndarray:
    """Nearest held-out distance per row, every pair in float64 (independent of FAISS)."""
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    x, h = unit(p["x"]), unit(p["heldout"])
    return np.sqrt(((x[:, None, :] - h[None]) ** 2).sum(axis=2)).min(axis=1)


def test_the_per_row_test_is_exact_and_independent_of_blocks_and_of_one_pass_inputs():
    p, ref = _filters()
    assert ref.to_dict()["dropped_by_embedding"] == 12 and ref.to_dict()["dropped_by_ngram"] == 6
    np.testing.assert_allclose(ref.nearest_distance, _brute(p), rtol=0, atol=1e-12)
    assert np.array_equal(ref.by_embedding, _brute(p) <= 0.3)
    for block_rows in (1, 7, None):
        again = decontaminate(p["x"], p["heldout"], radius=0.3, candidate_texts=p["texts"], heldout_texts=p["held_texts"],
                              ngram=13, sources=p["labels"], block_rows=block_rows)
        assert np.array_equal(again.dropped, ref.dropped) and np.array_equal(again.nearest_index, ref.nearest_index)
        assert np.array_equal(again.nearest_distance, ref.nearest_distance)  # bit for bit: nothing depends on the batch
        assert again.to_dict() == ref.to_dict()
    state = fit_heldout(p["heldout"], radius=0.3, heldout_texts=p["held_texts"], ngram=13)
    one = [state.flag(p["x"][i : i + 1], p["texts"][i : i + 1]) for i in range(len(p["x"]))]
    assert np.concatenate([f[0] | f[1] for f in one]).tolist() == ref.dropped.tolist()


@pytest.mark.parametrize("world", [2, 3, 5])
def test_several_processes_drop_the_rows_one_does_and_count_them_by_all_reduce(world):
    p, ref = _filters()
    n = len(p["x"])
    outs = run_ranks(world, lambda comm: filters_run(p, comm, *contiguous_bounds(n, world, comm.rank))[0])
    for r in outs:  # every process reports the whole pool's counts
        assert r.to_dict() == ref.to_dict()
    assert ref.by_source == {"far": 10, "mid": 4, "near": 3, "tiny": 1}
    for name in ("dropped", "nearest_distance", "nearest_index", "by_ngram"):
        assert np.array_equal(np.concatenate([getattr(r, name) for r in outs]), getattr(ref, name)), name
    lo, hi = contiguous_bounds(n, world, 0)
    alone = decontaminate(p["x"][lo:hi], p["heldout"], candidate_texts=p["texts"][lo:hi], heldout_texts=p["held_texts"],
                          sources=p["labels"][lo:hi])
    assert alone.by_source != ref.by_source  # one shard alone counts less: the totals are the all-reduce's


def test_bad_lengths_are_named_up_front():
    p, _ = _filters()
    with pytest.raises(ValueError, match=r"'sources' parameter of decontaminate must be one label per candidate \(535\)"):
        decontaminate(p["x"], p["heldout"], ngram=None, sources=p["labels"][:3])
    with pytest.raises(ValueError, match=r"'candidate_texts' parameter of decontaminate must be one text per candidate \(535\)"):
        decontaminate(p["x"], p["heldout"], candidate_texts=iter(p["texts"][:-1]), heldout_texts=p["held_texts"])


@pytest.mark.slow
def test_torchrun_two_and_three_processes_decontaminate_as_one_does(torchrun_filters):
    p, ref = _filters()
    for world, out in torchrun_filters.items():
        assert out["world_size"] == world
        assert out["decontamination"] == ref.to_dict(), world
        assert out["dropped"] == ref.dropped.tolist(), world
        assert out["nearest_distance"] == ref.nearest_distance.tolist(), world


@pytest.mark.slow
def test_torchrun_job_with_prefilter_and_decontamination_selects_what_one_process_does(tmp_path):
    """A real job (encoder, 13-gram test, pre-filter) at 1, 2 and 3 processes, in memory and streamed."""
    import subprocess
    import sys

    rows = read_jsonl(SAMPLE / "pool.jsonl", 150)
    evals = read_jsonl(SAMPLE / "target_eval.jsonl", 20)
    rows[40:40] = [{"text": r["text"].upper(), "domain": "biomedical"} for r in evals[:4]]  # planted copies, mid-pool
    rows[100:100] = [{"text": rows[0]["text"] + " " + " ".join(evals[5]["text"].split()[:14]), "domain": "news"}]  # a 13-gram
    folder = tmp_path / "pool"
    folder.mkdir()
    for i, lo in enumerate(range(0, len(rows), 26)):  # 6 files: a stream splits over 2 and 3 processes
        (folder / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[lo : lo + 26]), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}
    outs = {}
    for world in (1, 2, 3):
        for streamed in (False, True):
            out = tmp_path / f"out-{world}-{streamed}"
            config = {
                "pool": {"path": str(folder / "part-*.jsonl"), "column": "text", "streaming": streamed},
                "target": {"path": str(SAMPLE / "target.jsonl"), "column": "text", "max_rows": 20},
                "method": "got_d", "k": 15, "seed": 0, "output_dir": str(out), "cache_dir": str(tmp_path / f"cache-{world}"),
                "report": False, "embedding": {"max_length": 32}, "source_column": "domain",
                "prefilter": {"keep": 3, "sample_size": 40},
                "decontaminate": {"path": str(tmp_path / "eval.jsonl"), "column": "text", "radius": 0.3, "ngram": 13},
            }
            (tmp_path / "job.json").write_text(json.dumps(config), encoding="utf-8")  # YAML is a superset of JSON
            launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
            proc = subprocess.run([*launch, "-m", "hf_otselect.cli", "select", "--config", str(tmp_path / "job.json")],
                                  capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr[-3000:]
            prov = json.loads((out / "selection.json").read_text())
            outs[world, streamed] = {
                "selected": list(load_from_disk(str(out / "selected"))["pool_index"]),
                "scores": np.asarray(load_from_disk(str(out / "scored"))["score"], dtype=float),
                "decontaminated": list(load_from_disk(str(out / "decontaminated"))["pool_index"]),
                "ranking": list(load_from_disk(str(out / "prefilter"))["source"]),
                "prefilter": prov["prefilter"], "decontamination": prov["decontamination"], "processes": prov["processes"],
            }
    ref = outs[1, False]
    assert ref["decontamination"]["dropped"] == len(ref["decontaminated"]) >= 5
    assert {40, 41, 42, 43, 100} <= set(ref["decontaminated"])  # the planted copies and the 13-gram row
    assert ref["decontamination"]["by_source"].get("biomedical", 0) >= 4 and ref["decontamination"]["dropped_by_ngram"] >= 1
    assert ref["ranking"] == [r["source"] for r in ref["prefilter"]["ranking"]] and len(ref["selected"]) == 15
    for (world, streamed), got in outs.items():
        assert got["processes"] == world
        for key in ("selected", "decontaminated", "ranking", "decontamination"):
            assert got[key] == ref[key], (key, world, streamed)
        # The same sample and decisions; the encoder pads each process's batches differently, so the
        # vectors (and the divergences on them) agree to float32 rounding, not bit for bit.
        strip = lambda pre: {**pre, "ranking": [{**r, "sinkhorn_divergence": None} for r in pre["ranking"]]}  # noqa: E731
        assert strip(got["prefilter"]) == strip(ref["prefilter"]), (world, streamed)
        np.testing.assert_allclose([r["sinkhorn_divergence"] for r in got["prefilter"]["ranking"]],
                                   [r["sinkhorn_divergence"] for r in ref["prefilter"]["ranking"]], rtol=1e-6)
        scale = np.nanmax(np.abs(ref["scores"]))
        np.testing.assert_allclose(got["scores"], ref["scores"], rtol=0, atol=1e-6 * scale, equal_nan=True)


@pytest.mark.parametrize("known_features", [True, False])
def test_a_streamed_process_that_drops_nothing_still_writes_the_pool_columns(known_features, tmp_path):
    """Every process's ``decontaminated`` rows go into one split: a 0-row part must have the others' columns."""
    from datasets import Features, IterableDataset, Value

    p = filters_problem()
    n = 120
    clean = np.flatnonzero(~decontaminate(p["x"], p["heldout"], ngram=None).dropped)[:n]
    x = p["x"][clean]
    x[100:103] = p["heldout"][:3]  # copies, all in the second process's rows
    rows = [{"text": p["texts"][i], "domain": p["labels"][i]} for i in clean]

    def gen(shards):
        for shard in shards:
            yield from shard

    features = Features({"text": Value("string"), "domain": Value("string")}) if known_features else None

    def stream():  # one per rank, as each process has its own (threads iterating one object race)
        return IterableDataset.from_generator(gen, gen_kwargs={"shards": [rows[i : i + 30] for i in range(0, n, 30)]}, features=features)

    assert (stream().features is not None) is known_features

    def rank(comm):
        lo, hi = contiguous_bounds(n, 2, comm.rank)
        r = run_selection(stream(), p["target"], "similarity", 5, comm=comm, cache_dir=tmp_path / str(known_features), embeddings=(x[lo:hi], p["target"]),
                          source_column="domain", decontaminate=p["heldout"], decontaminate_ngram=None)
        return r.extra_splits["decontaminated"], r.decontamination

    (mine, decon), (theirs, _) = run_ranks(2, rank)
    assert decon["dropped"] == 3 and len(mine) == 0 and list(theirs["pool_index"]) == [100, 101, 102]
    assert mine.features == theirs.features and list(theirs.features) == ["text", "domain", "pool_index", "reason", "nearest_distance"]
