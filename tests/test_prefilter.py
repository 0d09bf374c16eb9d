"""Source pre-filter: real domains, the target's own domain ranks first, seeded and reachable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from hf_otselect.datasets_ext import run_selection, select_by_ot
from hf_otselect.dist import LOCAL
from hf_otselect.embed import embed
from hf_otselect.prefilter import MAX_CHUNKS, check_prefilter, combine_sources, prefilter_sources

from ._thread_comm import contiguous_bounds, run_ranks
from .workers.filters_sharded import problem as filters_problem
from .workers.filters_sharded import run as filters_run

EMB = {"max_length": 64}
N_PER_DOMAIN = 50


def _jsonl_texts(path: Path, n: int, skip: int = 0) -> list[str]:
    out, seen = [], set()
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            if text not in seen:  # ChemProt repeats a sentence once per entity pair
                seen.add(text)
                out.append(text)
    return out[skip : skip + n]


def _domains(root: Path) -> DatasetDict:
    with (root / "ag_news" / "test.csv").open(encoding="utf-8") as fh:
        news = [row[2] for row, _ in zip(csv.reader(fh), range(N_PER_DOMAIN))]
    with (root / "sst2" / "train.tsv").open(encoding="utf-8") as fh:
        sst = [row[0] for row in csv.reader(fh, delimiter="\t")][1:][:N_PER_DOMAIN]
    parts = {
        "news": news,
        "chemprot": _jsonl_texts(root / "chemprot" / "train.txt", N_PER_DOMAIN),
        "movies": sst,
        "cs": _jsonl_texts(root / "sciie" / "train.txt", N_PER_DOMAIN),
    }
    return DatasetDict({name: Dataset.from_dict({"text": texts}) for name, texts in parts.items()})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("prefilter_cache")


@pytest.fixture(scope="module")
def real(shared_data, cache):
    sources = _domains(shared_data)
    pool = combine_sources(sources, "domain")
    target = Dataset.from_dict({"text": _jsonl_texts(shared_data / "chemprot" / "dev.txt", 40)})
    pool_emb = embed(pool, "text", cache_dir=cache / "embeddings", **EMB)
    target_emb = embed(target, "text", cache_dir=cache / "embeddings", **EMB)
    return sources, pool, target, pool_emb, target_emb


def test_target_domain_ranks_first_and_is_stable_under_a_seed(real):
    _, pool, _, pool_emb, target_emb = real
    labels = pool["domain"]
    a = prefilter_sources(pool_emb, labels, target_emb, keep=1, sample_size=30, seed=0)
    b = prefilter_sources(pool_emb, labels, target_emb, keep=1, sample_size=30, seed=0)
    assert a.sources[0] == "chemprot"
    assert a.sources == b.sources and a.distances == b.distances  # same seed, same ranking
    assert a.distances == sorted(a.distances)
    assert a.kept == [True, False, False, False]
    assert a.mask.sum() == N_PER_DOMAIN and set(np.asarray(labels)[a.mask]) == {"chemprot"}
    assert a.sampled == [30] * 4 and a.rows == [N_PER_DOMAIN] * 4
    for seed in (1, 2):  # another sample, same winner
        assert prefilter_sources(pool_emb, labels, target_emb, keep=1, sample_size=30, seed=seed).sources[0] == "chemprot"


def test_ranking_agrees_with_exact_ot(real):
    """Independent check: POT's exact (unregularised) OT on the same rows gives the same winner."""
    ot = pytest.importorskip("ot")
    _, pool, _, pool_emb, target_emb = real
    labels = np.asarray(pool["domain"])
    ours = prefilter_sources(pool_emb, labels, target_emb, keep=4, sample_size=N_PER_DOMAIN)
    exact = {}
    for name in ours.sources:
        x = pool_emb[labels == name].astype(np.float64)
        exact[name] = ot.emd2([], [], ot.dist(x, target_emb.astype(np.float64)))
    assert min(exact, key=exact.get) == ours.sources[0] == "chemprot"


def _clusters(rng: np.random.Generator, centers: np.ndarray, n: int, shift: float = 0.0) -> np.ndarray:
    """n unit rows from a 4-cluster Gaussian mixture; ``shift`` moves every row along axis 0."""
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, centers.shape[1]))
    x[:, 0] += shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_a_small_on_target_source_beats_a_large_shifted_one(seed):
    """Planted truth: 100 rows drawn from the target's own distribution against 2,000 shifted rows.

    Before equal-size samples and the debiased divergence, plain OT on all 100 vs all 2,000 rows
    ranked the small source last in each of these 5 seeds (the fewer points a cloud has, the
    larger its empirical OT value to anything).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 16))
    target = _clusters(rng, centers, 500)
    near, far = _clusters(rng, centers, 100), _clusters(rng, centers, 2000, shift=1.0)
    pool = np.vstack([far, near])  # the large source first, so order cannot explain the win
    labels = ["shifted"] * len(far) + ["on_target"] * len(near)
    r = prefilter_sources(pool, labels, target, keep=1, seed=seed)
    assert r.sources == ["on_target", "shifted"] and r.kept == [True, False]
    assert r.params["chunk_rows"] == 100 and r.params["distance"] == "sinkhorn_divergence"
    assert r.sampled == [100, 100 * MAX_CHUNKS] and r.chunks == [1, MAX_CHUNKS]
    assert r.mask.sum() == 100 and not r.mask[: len(far)].any()


def test_divergence_matches_pot_and_is_zero_on_the_target_itself():
    """Independent check with POT's ``ot.solve`` (KL-regularised value, same cost and eps)."""
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 8))
    target = _clusters(rng, centers, 40)
    a, b = _clusters(rng, centers, 40), _clusters(rng, centers, 40, shift=0.5)
    pool = np.vstack([a, b, target])
    labels = ["a"] * 40 + ["b"] * 40 + ["copy"] * 40
    r = prefilter_sources(pool, labels, target, keep=None, max_distance=10.0, eps=0.5, tol=1e-7)
    assert r.chunks == [1, 1, 1] and r.sampled == [40, 40, 40]

    def pot(x, y):
        return ot.solve(ot.dist(x, y), reg=0.5, reg_type="KL", tol=1e-12, max_iter=20_000).value

    expected = {name: pot(x, target) - 0.5 * (pot(x, x) + pot(target, target)) for name, x in (("a", a), ("b", b))}
    got = dict(zip(r.sources, r.distances))
    assert r.sources[0] == "copy" and abs(got["copy"]) < 1e-9  # S(b, b) = 0: the debiasing at work
    for name in ("a", "b"):
        assert got[name] == pytest.approx(expected[name], rel=1e-6)


def test_every_source_is_compared_on_chunks_of_the_smallest_size():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7 + 25 + 300, 4)).astype(np.float32)
    labels = ["tiny"] * 7 + ["mid"] * 25 + ["big"] * 300
    r = prefilter_sources(x, labels, x[:50], keep=3, sample_size=100)
    got = {s: (m, c) for s, m, c in zip(r.sources, r.sampled, r.chunks)}
    # chunks of 7 rows; mid: 25 // 7 = 3 chunks; big: at most sample_size rows -> 100 // 7 = 14
    assert r.params["chunk_rows"] == 7
    assert got == {"tiny": (7, 1), "mid": (21, 3), "big": (98, 14)}
    # rows left out up front do not make the chunks smaller
    eligible = np.asarray(labels) != "tiny"
    assert prefilter_sources(x, labels, x[:50], keep=2, sample_size=100, eligible=eligible).params["chunk_rows"] == 25


def test_keep_and_max_distance(real):
    _, pool, _, pool_emb, target_emb = real
    labels = pool["domain"]
    full = prefilter_sources(pool_emb, labels, target_emb, keep=None, max_distance=100.0, sample_size=20)
    assert all(full.kept) and full.mask.all()
    cut = (full.distances[1] + full.distances[2]) / 2
    two = prefilter_sources(pool_emb, labels, target_emb, keep=None, max_distance=cut, sample_size=20)
    assert two.kept == [True, True, False, False]
    both = prefilter_sources(pool_emb, labels, target_emb, keep=1, max_distance=cut, sample_size=20)
    assert both.kept == [True, False, False, False]
    # rows excluded up front are neither sampled nor kept
    eligible = np.asarray(labels) != "chemprot"
    rest = prefilter_sources(pool_emb, labels, target_emb, keep=1, sample_size=20, eligible=eligible)
    assert "chemprot" not in rest.sources and not rest.mask[~eligible].any()


def test_select_by_ot_with_a_source_column(real, cache):
    _, pool, target, _, _ = real
    dd = select_by_ot(
        pool, target, "similarity", 10, cache_dir=cache, embedding=EMB, return_scored=True,
        source_column="domain", prefilter={"keep": 1, "sample_size": 30},
    )
    selected, scored, ranking = dd["selected"], dd["scored"], dd["prefilter"]
    assert set(selected["domain"]) == {"chemprot"}
    assert ranking["source"][0] == "chemprot" and ranking["kept"] == [True, False, False, False]
    for row in selected:  # pool_index still points into the whole pool
        assert pool[row["pool_index"]]["text"] == row["text"]
    scores = np.asarray(scored["score"], dtype=float)
    domains = np.asarray(scored["domain"])
    assert np.isnan(scores[domains != "chemprot"]).all() and np.isfinite(scores[domains == "chemprot"]).all()
    assert sum(np.asarray(scored["selected"])[domains != "chemprot"]) == 0  # dropped rows are never chosen
    assert sorted(selected["rank"]) == list(range(1, 11))  # ranks count scored rows only


def test_a_datasetdict_pool_is_one_pool_of_sources(real, cache):
    sources, pool, target, pool_emb, target_emb = real
    run = run_selection(sources, target, "got_d", 8, cache_dir=cache, embeddings=(pool_emb, target_emb), prefilter={"keep": 2, "sample_size": 30})
    assert run.scored["source"] == pool["domain"]  # split names, in order
    assert run.prefilter["source_column"] == "source" and run.prefilter["kept_sources"][0] == "chemprot"
    assert run.prefilter["rows_kept"] == 2 * N_PER_DOMAIN
    assert set(run.selected["source"]) <= set(run.prefilter["kept_sources"])


def test_bad_prefilter_arguments_fail_up_front(real, cache):
    _, pool, target, _, _ = real
    with pytest.raises(ValueError, match="'prefilter' parameter of select_by_ot must be a mapping with keys among"):
        select_by_ot(pool, target, k=3, source_column="domain", prefilter={"top": 2}, cache_dir=cache)
    with pytest.raises(ValueError, match="'prefilter.keep' parameter of select_by_ot must be an int in \\[1, inf\\]"):
        select_by_ot(pool, target, k=3, source_column="domain", prefilter={"keep": 0}, cache_dir=cache)
    with pytest.raises(ValueError, match="'source_column' parameter of select_by_ot must be the column"):
        select_by_ot(pool, target, k=3, prefilter={"keep": 1}, cache_dir=cache)
    with pytest.raises(ValueError, match="Column 'src' \\(source_column\\) not in the dataset"):
        select_by_ot(pool, target, k=3, source_column="src", prefilter={"keep": 1}, cache_dir=cache)
    with pytest.raises(ValueError, match="sets 'keep' or 'max_distance'"):
        check_prefilter({"keep": None}, "x")
    with pytest.raises(ValueError, match="'source_column' parameter of combine_sources"):
        combine_sources(DatasetDict({"a": pool}), "domain")


def test_a_list_pool_names_its_members_by_position(real):
    sources = real[0]
    combined = combine_sources([sources["news"], sources["cs"]])
    assert combined["source"] == ["0"] * N_PER_DOMAIN + ["1"] * N_PER_DOMAIN
    assert list(combined["text"]) == list(sources["news"]["text"]) + list(sources["cs"]["text"])
    with pytest.raises(TypeError, match="'dataset' parameter of combine_sources must be a DatasetDict or a list of Dataset"):
        combine_sources(["a", "b"])


# -- several processes and streams: the keyed sample, the same ranking and rows for any world size --

def _sharded(world: int, fn):
    """``fn(comm, lo, hi)`` on ``world`` thread-ranks, each over its contiguous uneven rows."""
    return run_ranks(world, lambda comm: fn(comm, *contiguous_bounds(N_FILTERS, world, comm.rank)))


N_FILTERS = len(filters_problem()["x"])


@pytest.fixture(scope="module")
def one_process():
    p = filters_problem()
    return p, filters_run(p, LOCAL, 0, N_FILTERS)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_several_processes_rank_and_keep_what_one_does(one_process, world):
    """The same sample, divergences (bit for bit), kept sources and rows at 1, 2, 3 and 5 processes."""
    p, (_, ref) = one_process
    assert dict(zip(ref.sources, ref.chunks)) == {"near": 2, "mid": 3, "far": 3, "tiny": 1} and ref.params["chunk_rows"] == 24
    outs = _sharded(world, lambda comm, lo, hi: filters_run(p, comm, lo, hi)[1])
    for r in outs:
        assert r.to_dict() == ref.to_dict()  # distances exactly: every solve has the same inputs in the same order
    assert np.concatenate([r.mask for r in outs]).tolist() == ref.mask.tolist()


def test_the_sample_is_keyed_by_global_index_and_the_keep_is_per_row(one_process):
    """A pool read in another row order, with its global indices, gives the same ranking; keep() is the mask."""
    p, (dec, ref) = one_process
    perm = np.random.default_rng(5).permutation(N_FILTERS)
    x, labels = p["x"][perm], np.asarray(p["labels"])[perm]
    moved = prefilter_sources(x, labels, p["target"], keep=2, sample_size=80, seed=3, eligible=~dec.dropped[perm], index=perm)
    assert moved.to_dict() == ref.to_dict()
    assert np.array_equal(moved.mask, ref.mask[perm])
    assert np.array_equal(ref.keep(p["labels"]) & ~dec.dropped, ref.mask)
    other = prefilter_sources(p["x"], p["labels"], p["target"], keep=2, sample_size=80, seed=4, eligible=~dec.dropped)
    assert other.distances != ref.distances  # the seed picks the sample: the test can fail


def test_what_the_processes_exchange_does_not_grow_with_the_pool():
    """Bytes sent by the fit at N and 4N stay under one bound set by the sample: counts, keys and sampled rows only."""
    rng = np.random.default_rng(0)
    target = rng.normal(size=(30, 8)).astype(np.float32)

    def sent(n: int) -> int:
        x = rng.normal(size=(n, 8)).astype(np.float32)
        labels = np.array(["a", "b", "c"])[np.arange(n) % 3]

        def fit(comm):
            lo, hi = contiguous_bounds(n, 2, comm.rank)
            prefilter_sources(x[lo:hi], labels[lo:hi], target, keep=1, sample_size=20, max_iter=20, tol=0, comm=comm)
            return comm.bytes_sent

        return max(run_ranks(2, fit))

    # a rank sends at most: per sampled row its (source, key, index) triple, index and 8 float32s;
    # plus the names, the counts and the OT values (a few hundred bytes)
    bound = 3 * 20 * (3 * 8 + 8 + 8 * 4) + 1_000
    assert sent(600) < bound and sent(2400) < bound and sent(9600) < bound


def test_a_process_with_no_rows_or_no_eligible_rows_still_joins(one_process):
    p, (dec, ref) = one_process

    def fn(comm):
        lo, hi = (0, N_FILTERS) if comm.rank == 1 else (0, 0)
        eligible = ~dec.dropped[lo:hi]
        return prefilter_sources(p["x"][lo:hi], p["labels"][lo:hi], p["target"], keep=2, sample_size=80, seed=3,
                                 eligible=eligible, index=np.arange(lo, hi), comm=comm)

    outs = run_ranks(3, fn)
    assert all(o.to_dict() == ref.to_dict() for o in outs)
    with pytest.raises(ValueError, match="at least one eligible row"):
        run_ranks(2, lambda comm: prefilter_sources(p["x"][:5], p["labels"][:5], p["target"], eligible=np.zeros(5, bool), comm=comm))


@pytest.mark.slow
def test_torchrun_two_and_three_processes_prefilter_as_one_does(torchrun_filters, one_process):
    _, (_, ref) = one_process
    for world, out in torchrun_filters.items():
        assert out["world_size"] == world
        assert out["prefilter"] == json.loads(json.dumps(ref.to_dict())), world
        assert out["mask"] == ref.mask.tolist(), world


# -- the pipeline: pre-filter and decontamination in run_selection, several processes, streams --

@pytest.mark.parametrize("method", ["got_d", "similarity", "random"])
def test_run_selection_filters_select_the_same_rows_for_any_world_size_and_for_a_stream(method, tmp_path):
    """Decontamination then pre-filter inside run_selection at 1, 2, 3 processes, in memory and streamed."""
    p = filters_problem()
    pool = Dataset.from_dict({"text": p["texts"], "domain": p["labels"], "row": list(range(N_FILTERS))})

    def run(world: int, streamed: bool) -> list:
        def rank(comm):
            if streamed:
                data = pool.to_iterable_dataset(num_shards=6)
                part = data.shard(num_shards=world, index=comm.rank, contiguous=True) if world > 1 else data
                rows = [r["row"] for r in part]
            else:
                data, rows = pool, list(range(*contiguous_bounds(N_FILTERS, world, comm.rank)))
            r = run_selection(data, p["target"], method, 20, seed=2, comm=comm, cache_dir=tmp_path / f"c{world}{streamed}",
                              embeddings=(p["x"][rows], p["target"]), source_column="domain",
                              prefilter={"keep": 2, "sample_size": 80}, decontaminate=p["heldout"], decontaminate_ngram=None)
            return (r.result.indices.tolist(), r.prefilter, r.decontamination, list(r.extra_splits["decontaminated"]["pool_index"]),
                    np.asarray(r.scored["score"], dtype=float), list(r.selected["pool_index"]))
        return run_ranks(world, rank)

    ref = run(1, False)[0]
    indices, prefilter, decon, dropped, scores, selected = ref
    assert len(indices) == 20 and set(np.asarray(p["labels"])[indices]) <= set(prefilter["kept_sources"])
    assert not set(indices) & set(dropped) and decon["dropped"] == len(dropped) > 0
    assert np.isnan(scores[dropped]).all()
    for world, streamed in ((1, True), (2, False), (2, True), (3, False), (3, True)):
        ranks = run(world, streamed)
        for r in ranks:
            assert r[0] == indices and r[1] == prefilter and r[2] == decon, (world, streamed)
        assert sum((r[3] for r in ranks), []) == dropped, (world, streamed)  # each process its own dropped rows
        assert sum((r[5] for r in ranks), []) == selected, (world, streamed)
        merged = np.concatenate([r[4] for r in ranks])
        assert np.array_equal(np.isnan(merged), np.isnan(scores))
        # GOT-D's reductions sum in another order across processes: within 1e-6 of the score scale
        np.testing.assert_allclose(merged, scores, rtol=0, atol=1e-6 * np.nanmax(np.abs(scores)), equal_nan=True)
