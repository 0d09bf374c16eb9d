"""Near-duplicate guard: 1% of the pool injected 100 times must not take the budget 100 times."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from datasets import Dataset

from hf_otselect.datasets_ext import run_selection, select_by_ot
from hf_otselect.dedup import epanechnikov_density, greedy_distinct, guarded_choose, resolve_dedup_mode
from hf_otselect.embed import embed
from hf_otselect.selectors import get_selector
from tests.conftest import SAMPLE, read_jsonl

EMB = {"max_length": 64}
N_POOL = 200
N_DUP, COPIES = 2, 100  # 1% of the pool, each text 100 times
K = 20
RADIUS = 0.2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dedup_cache")


@pytest.fixture(scope="module")
def clean(cache):
    rows = read_jsonl(SAMPLE / "pool.jsonl", N_POOL)
    pool = Dataset.from_list(rows)
    target = Dataset.from_list(read_jsonl(SAMPLE / "target.jsonl", 30))
    return pool, target, embed(pool, cache_dir=cache / "embeddings", **EMB), embed(target, cache_dir=cache / "embeddings", **EMB)


def _run(pool, target, pool_emb, target_emb, method, cache, **kw):
    return run_selection(pool, target, method, K, cache_dir=cache, embeddings=(pool_emb, target_emb), **kw)


def _injected(clean, method, cache, **params):
    """The clean pool plus its ``N_DUP`` best-ranked rows (for ``method``) repeated ``COPIES`` times.

    Copies of a text get that text's vector (the encoder is deterministic per text; the test
    below checks it on real copies).
    """
    pool, target, pool_emb, target_emb = clean
    base = _run(pool, target, pool_emb, target_emb, method, cache, **params)
    dup_rows = [int(i) for i in dict.fromkeys(base.result.indices.tolist())][:N_DUP]
    extra = np.repeat(dup_rows, COPIES - 1)
    big = Dataset.from_list(pool.to_list() + [pool[int(i)] for i in extra])
    big_emb = np.concatenate([pool_emb, pool_emb[extra]])
    return base, big, big_emb, {pool[i]["text"] for i in dup_rows}


def test_copies_of_a_text_embed_identically(clean, cache):
    pool = clean[0]
    texts = [pool[0]["text"]] * 3 + [pool[1]["text"]]
    emb = embed(texts, cache_dir=cache / "embeddings", **EMB)
    assert np.abs(emb[:3] - emb[0]).max() < 1e-5


@pytest.mark.parametrize("method", ["got_d", "similarity", "random", "dsir"])
def test_guard_keeps_each_duplicated_text_at_most_once(clean, cache, method):
    pool, target, pool_emb, target_emb = clean
    base, big, big_emb, dup_texts = _injected(clean, method, cache)
    off = _run(big, target, big_emb, target_emb, method, cache)
    on = _run(big, target, big_emb, target_emb, method, cache, dedup_radius=RADIUS)
    on_counts = collections.Counter(on.selected["text"])
    assert len(on.selected) == K and len(set(on.result.indices.tolist())) == K
    assert max(on_counts.values()) == 1  # no text twice, injected or not
    assert on.dedup["mode"] == "greedy" and on.dedup["radius"] == RADIUS
    if method in ("got_d", "similarity"):  # without the guard the copies do take the budget
        off_counts = collections.Counter(off.selected["text"])
        assert sum(off_counts[t] for t in dup_texts) > N_DUP
    # the rest of the selection stays in spirit: overlap with the clean pool's guarded selection
    clean_on = _run(pool, target, pool_emb, target_emb, method, cache, dedup_radius=RADIUS)
    overlap = len(set(on.selected["text"]) & set(clean_on.selected["text"])) / K
    # measured: 1.0, 0.9, 0.8, 1.0 (dsir: the 198 copies shift its pool n-gram model, so other weights move too)
    floor = {"similarity": 1.0, "got_d": 0.9, "dsir": 0.8, "random": 1.0}[method]  # the floors are the measured values
    assert overlap >= floor, (method, overlap)
    # determinism: the same call gives the same rows, pool_index points into the pool
    again = _run(big, target, big_emb, target_emb, method, cache, dedup_radius=RADIUS)
    assert again.result.indices.tolist() == on.result.indices.tolist()
    for row in on.selected:
        assert big[row["pool_index"]]["text"] == row["text"]


def test_similarity_guard_is_exact_on_the_clean_ranking(clean, cache):
    """Similarity scores each row on its own, so with the guard the selection equals the greedy
    rule applied by hand to the clean ranking (copies are skipped, nothing else changes)."""
    pool, target, pool_emb, target_emb = clean
    base, big, big_emb, _ = _injected(clean, "similarity", cache)
    on = _run(big, target, big_emb, target_emb, "similarity", cache, dedup_radius=RADIUS)
    unit = pool_emb / np.linalg.norm(pool_emb, axis=1, keepdims=True)
    taken: list[int] = []
    for i in np.lexsort((np.arange(N_POOL), -base.result.scores)):
        if all(np.sum((unit[i] - unit[j]) ** 2) >= RADIUS**2 for j in taken):
            taken.append(int(i))
        if len(taken) == K:
            break
    assert on.selected.select(np.argsort(on.selected["rank"]))["text"] == [pool[i]["text"] for i in taken]


def _density_by_loop(x: np.ndarray, h: float) -> np.ndarray:
    """Epanechnikov density of every row over all rows, one row at a time (no index, no package code)."""
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    rho = np.empty(len(unit))
    for j in range(len(unit)):
        sq = ((unit - unit[j]) ** 2).sum(axis=1)
        rho[j] = np.clip(1.0 - sq / (h * h), 0.0, None).sum()
    return rho


def test_tsds_kde_guard_draws_duplicates_in_proportion(clean, cache):
    """KNN-Uniform TSDS (no density of its own): the guard's density is the one weighting, so a
    text copied 100 times keeps about the mass of one copy instead of taking 100 times the draws."""
    pool, target, pool_emb, target_emb = clean
    # KNN-Uniform: no TSDS density of its own; C fixed at the scale this test was set up with
    params = {"alpha": 0.5, "C": 5.0, "sigma": 0.0, "max_K": 200, "kde_K": 50, "replace": True}  # the paper's draws
    base, big, big_emb, dup_texts = _injected(clean, "tsds", cache, **params)
    sel = get_selector("tsds", **params)
    p_clean = sel.score(pool_emb, target_emb)
    p_big = sel.score(big_emb, target_emb)
    rho = _density_by_loop(big_emb, RADIUS)
    guarded = p_big / rho
    guarded /= guarded.sum()
    texts = np.asarray(big["text"])
    for t in dup_texts:
        copies = texts == t
        assert copies.sum() == COPIES and np.allclose(rho[copies], COPIES, rtol=1e-3)
        one = p_clean[np.flatnonzero(np.asarray(pool["text"]) == t)[0]]
        # unguarded the cluster holds far more than one copy's mass; guarded, about one copy's
        assert p_big[copies].sum() > 1.5 * guarded[copies].sum()
        assert guarded[copies].sum() == pytest.approx(one, rel=0.6)
    run = _run(big, target, big_emb, target_emb, "tsds", cache, dedup_radius=RADIUS, **params)
    assert run.dedup["mode"] == "kde" and run.dedup["weighting"] == "guard"
    assert run.dedup["max_density"] == pytest.approx(rho.max(), rel=1e-5)
    assert len(run.result.indices) == K
    # p / rho as the guard passes it (not renormalised: the draws quantise score / max score, and a
    # renormalised copy can round across a draw's boundary)
    assert run.result.indices.tolist() == sel.choose_rows(p_big / rho, K, seed=0).tolist()


def test_tsds_with_its_own_density_is_weighted_once():
    """Default TSDS divides by its own density already; the guard must not divide again.

    Planted: 300 random unit rows in 64-d (no two within sigma = 0.75 of each other), 40 queries
    near the first 40 rows; the row TSDS gives most mass is copied to 50 copies. TSDS's closed form
    then gives the 50 copies together exactly the mass the row had alone in the clean pool and
    every other row its clean mass; the guard leaves that as it is. Dividing by the guard's
    density as well (the former behaviour) left the copies 0.02x of one row's mass.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = (x[:40] + 0.05 * rng.normal(size=(40, 64))).astype(np.float32)
    x = x.astype(np.float32)
    sq = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(sq, np.inf)
    sel = get_selector("tsds", C=5.0, replace=True)  # the paper's draws; kernel="kde", sigma=0.75; a fixed scale, so both pools solve the same problem
    assert np.sqrt(sq.min()) > sel.sigma  # the planted condition: no neighbour within sigma
    p_clean = sel.score(x, queries)
    j, copies = int(np.argmax(p_clean)), 50
    big = np.vstack([x, np.repeat(x[j : j + 1], copies - 1, axis=0)])
    group = np.r_[j, np.arange(len(x), len(big))]
    p_big = sel.score(big, queries)
    assert p_big[group].sum() == pytest.approx(p_clean[j], rel=1e-9)  # 1x the mass of one row
    others = np.setdiff1d(np.arange(len(x)), [j])
    assert np.allclose(p_big[others], p_clean[others], rtol=1e-9, atol=1e-15)
    idx, info = guarded_choose(sel, p_big, K, seed=3, candidates=big, radius=RADIUS)
    assert info == {"mode": "kde", "radius": RADIUS, "weighting": "selector", "selector_bandwidth": sel.sigma}
    assert idx.tolist() == sel.choose_rows(p_big, K, seed=3).tolist()
    # and the guard still weights once where TSDS does not: sigma = 0 gets the guard's density
    uniform = get_selector("tsds", sigma=0.0, replace=True)
    p_uni = uniform.score(big, queries)
    rho = _density_by_loop(big, RADIUS)
    assert np.allclose(rho[group], copies) and np.allclose(rho[others], 1.0)
    idx, info = guarded_choose(uniform, p_uni, K, seed=3, candidates=big, radius=RADIUS)
    assert info["weighting"] == "guard" and info["max_density"] == pytest.approx(copies, rel=1e-6)
    assert idx.tolist() == uniform.choose_rows(p_uni / rho, K, seed=3).tolist()


def test_a_radius_beyond_sigma_warns(caplog):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    sel = get_selector("tsds", sigma=0.1, max_K=50, kde_K=50, replace=True)
    p = sel.score(x, x[:5])
    with caplog.at_level("WARNING", logger="hf_otselect.dedup"):
        guarded_choose(sel, p, 5, seed=0, candidates=x, radius=0.3)
    assert "bandwidth 0.1 < dedup_radius 0.3" in caplog.text


def test_epanechnikov_density_matches_a_direct_sum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    x[5] = x[4]
    h = 0.9
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    from scipy.spatial.distance import cdist

    d2 = cdist(unit.astype(np.float64), unit.astype(np.float64), "sqeuclidean")
    expected = np.clip(1 - d2 / h**2, 0, None).sum(axis=1)
    rows = np.array([0, 4, 5, 77])
    assert np.allclose(epanechnikov_density(x, rows, h), expected[rows], rtol=1e-5)
    assert epanechnikov_density(x, rows, h)[1] >= 2.0  # a copy counts fully


def test_greedy_distinct_against_a_reference_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(300)
    h = 0.5
    chosen, skipped, refilled = greedy_distinct(order, x, 40, h)
    ref: list[int] = []
    for i in order:
        if all(np.sum((unit[i] - unit[j]) ** 2) >= h * h for j in ref):
            ref.append(int(i))
        if len(ref) == 40:
            break
    assert chosen.tolist() == ref and refilled == 0
    assert skipped == int(np.flatnonzero(order == ref[-1])[0]) + 1 - 40
    # fewer distinct rows than k: exact k all the same, the skipped ones fill in order
    same = np.repeat(x[:3], 10, axis=0)
    out, _, refilled = greedy_distinct(np.arange(30), same, 5, 0.1)
    assert out.tolist() == [0, 10, 20, 1, 2] and refilled == 2


def test_modes_and_bad_arguments(clean, cache):
    pool, target, pool_emb, target_emb = clean
    assert resolve_dedup_mode("auto", "top_k", False, "x") == "greedy"
    assert resolve_dedup_mode("auto", "sample", True, "x") == "kde"
    assert resolve_dedup_mode("auto", "sample", False, "x") == "greedy"
    with pytest.raises(ValueError, match="'dedup_mode' parameter of select_by_ot must be 'greedy' or 'auto' for a top-k selector"):
        select_by_ot(pool, target, "got_d", 3, dedup_radius=0.2, dedup_mode="kde", cache_dir=cache)
    with pytest.raises(ValueError, match="'dedup_mode' parameter of select_by_ot must be 'kde' or 'auto'"):
        select_by_ot(pool, target, "tsds", 3, dedup_radius=0.2, dedup_mode="greedy", cache_dir=cache, replace=True)
    with pytest.raises(ValueError, match=r"'dedup_radius' parameter of select_by_ot must be a float in \(0.0, 2.0\]"):
        select_by_ot(pool, target, "got_d", 3, dedup_radius=0.0, cache_dir=cache)
    with pytest.raises(ValueError, match="'dedup_mode' parameter of select_by_ot must be one of"):
        select_by_ot(pool, target, "got_d", 3, dedup_radius=0.2, dedup_mode="off", cache_dir=cache)
    sel = get_selector("similarity")
    idx, info = guarded_choose(sel, sel.score(pool_emb, target_emb), K, seed=0, candidates=pool_emb, radius=1e-4)
    # a radius below every pairwise distance changes nothing
    assert idx.tolist() == sel.choose_rows(sel.score(pool_emb, target_emb), K).tolist() and info["skipped"] == 0


# -- several processes: the same rows as one process, only the prefix's vectors exchanged --

def _planted(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit rows in 8-d where every 5th row has 6 near-copies (within 0.05) placed across the pool."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    for j in range(0, n, 5):  # near-copies land at scattered positions, so they cross shard borders
        for c in rng.choice(n, 6, replace=False):
            if c % 5:
                x[c] = x[j] + 0.01 * rng.normal(size=8)
    scores = np.round(rng.random(n), 2)  # ties: the lower global index must win on every split
    return x.astype(np.float32), scores


def _guard_split(world: int, selector, scores, x, k, **kw):
    from tests._thread_comm import contiguous_bounds, run_ranks

    def part(comm):
        lo, hi = contiguous_bounds(len(scores), world, comm.rank)
        idx, info = guarded_choose(selector, scores[lo:hi], k, seed=5, candidates=x[lo:hi], index=np.arange(lo, hi),
                                   comm=comm, **kw)
        return idx.tolist(), info, comm.bytes_sent

    return run_ranks(world, part)


def _reference_greedy(order: np.ndarray, x: np.ndarray, k: int, h: float) -> list[int]:
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    taken: list[int] = []
    for i in order:
        if all(np.sum((unit[i] - unit[j]) ** 2) >= h * h for j in taken):
            taken.append(int(i))
        if len(taken) == k:
            break
    return taken


@pytest.mark.parametrize("method,params", [("similarity", {}), ("tsds", {"replace": False}), ("dsir", {})])
def test_greedy_guard_gives_the_one_process_rows_on_two_and_three(method, params):
    """Top-k, sampling without replacement and log-weight sampling: the reference skip over the
    selector's full order (one process, plain loop), and the same rows, skip counts and info for
    1, 2 and 3 ranks."""
    from hf_otselect.selectors.base import choose

    x, scores = _planted(400)
    sel = get_selector(method, **params)
    if sel.choice == "sample":
        scores = scores * (scores > 0.3)  # rows the sampler never draws
    elif sel.choice == "log_sample":
        scores = np.where(scores > 0.9, -np.inf, np.log(scores + 0.01))
    k, h = 40, 0.2
    n_order = int((scores > 0).sum()) if sel.choice == "sample" else int((scores > -np.inf).sum())
    order = choose(scores, n_order, mode=sel.choice, seed=5)
    ref = _reference_greedy(order, x, k, h)
    one = _guard_split(1, sel, scores, x, k, radius=h)[0]
    assert one[0] == ref and one[1]["skipped"] > 0 and one[1]["refilled"] == 0
    assert one[1]["skipped"] == int(np.flatnonzero(order == ref[-1])[0]) + 1 - k
    for world in (2, 3):
        ranks = _guard_split(world, sel, scores, x, k, radius=h)
        assert all(r[:2] == one[:2] for r in ranks), world


def test_greedy_guard_exchanges_the_prefix_not_the_pool():
    """Bytes each rank sends for the same k at N and 4N: the threshold rounds and the prefix's
    vectors, not O(N) (a gather of every row's vector would send 4x as much at 4N)."""
    sel = get_selector("similarity")
    sent = {}
    for n in (2_000, 8_000):
        x, scores = _planted(n, seed=1)
        ranks = _guard_split(2, sel, scores, x, 20, radius=0.2)
        sent[n] = max(r[2] for r in ranks)
        assert ranks[0][:2] == _guard_split(1, sel, scores, x, 20, radius=0.2)[0][:2]
    assert sent[8_000] < 1.2 * sent[2_000] and sent[2_000] < 2_000 * 8 * 4 / 4  # a quarter of one shard's vectors


def test_greedy_guard_refills_alike_on_every_split():
    x = np.repeat(np.eye(8, dtype=np.float32)[:3], 10, axis=0)  # 3 distinct rows, 10 copies each
    scores = np.linspace(1.0, 0.0, 30)
    sel = get_selector("similarity")
    one = _guard_split(1, sel, scores, x, 5, radius=0.1)[0]
    assert one[0] == [0, 1, 2, 3, 4][:0] + [0, 10, 20, 1, 2] and one[1]["refilled"] == 2
    for world in (2, 3):
        assert all(r[:2] == one[:2] for r in _guard_split(world, sel, scores, x, 5, radius=0.1))


def test_sharded_density_is_the_one_process_density_bit_for_bit():
    from tests._thread_comm import contiguous_bounds, run_ranks

    x, _ = _planted(300, seed=2)
    h = 0.6
    rows = np.arange(0, 300, 3)
    one = epanechnikov_density(x, rows, h)
    # the package's float32 unit rows, every pair's kernel summed directly in float64
    u = (x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    direct = [np.clip(1.0 - ((u - u[j]) ** 2).sum(axis=1) / h**2, 0.0, None).sum() for j in rows]
    assert np.allclose(one, direct, rtol=1e-12)
    assert (one > 3).sum() >= 20  # the planted near-copies count
    for world in (2, 3):
        def part(comm, world=world):
            lo, hi = contiguous_bounds(300, world, comm.rank)
            mine = rows[(rows >= lo) & (rows < hi)] - lo
            return epanechnikov_density(x[lo:hi], mine, h, comm=comm)

        assert np.array_equal(np.concatenate(run_ranks(world, part)), one), world


def test_kde_guard_gives_the_one_process_draws_on_two_and_three():
    x, scores = _planted(300, seed=3)
    p = scores * (scores > 0.2)
    sel = get_selector("tsds", sigma=0.0, replace=True)  # KNN-Uniform: the guard's density weights
    one = _guard_split(1, sel, p, x, 30, radius=0.3)[0]
    rho = _density_by_loop(x, 0.3)
    assert one[1]["weighting"] == "guard" and one[1]["max_density"] == pytest.approx(rho[p > 0].max(), rel=1e-6)
    assert one[0] == sel.choose_rows(p / epanechnikov_density(x, np.arange(300), 0.3) * (p > 0) + 0.0, 30, seed=5).tolist()
    for world in (2, 3):
        assert all(r[:2] == one[:2] for r in _guard_split(world, sel, p, x, 30, radius=0.3)), world


@pytest.fixture(scope="module")
def crowded(clean):
    """100 clean rows plus 20 copies of 4 of them, scattered: 120 rows, 6 file shards of 20 when streamed."""
    pool, target, pool_emb, target_emb = clean
    rng = np.random.default_rng(7)
    rows = list(range(100)) + [int(i) for i in np.repeat([3, 41, 68, 90], 5)]
    order = np.asarray(rows)[rng.permutation(len(rows))]
    return pool.select(order.tolist()), target, np.ascontiguousarray(pool_emb[order]), target_emb


@pytest.mark.parametrize("method,params", [("got_d", {}), ("tsds", {"replace": False, "C": 5.0}), ("dsir", {}),
                                           ("tsds", {"sigma": 0.0, "replace": True, "C": 5.0})])
def test_the_guard_in_the_pipeline_gives_the_same_rows_on_any_split_streamed_or_not(crowded, tmp_path, method, params):
    """run_selection with the guard (greedy for top-k and draws without replacement, KDE for draws
    with replacement) at 1, 2 and 3 ranks, on the in-memory pool and on the same rows streamed:
    the same chosen rows and the same guard figures everywhere; greedy keeps one copy per text."""
    from tests._thread_comm import contiguous_bounds, run_ranks

    pool, target, emb, temb = crowded

    def runs(data, world, name):
        def part(comm):
            lo, hi = contiguous_bounds(len(pool), world, comm.rank)
            # each rank its own stream object, as each process has (threads sharing one race inside datasets)
            r = run_selection(data() if callable(data) else data, target, method, 15, seed=2, cache_dir=tmp_path / name, comm=comm,
                              embeddings=(emb[lo:hi], temb), dedup_radius=RADIUS, **params)
            return r.result.indices.tolist(), r.dedup

        return run_ranks(world, part)

    one = runs(pool, 1, "m1")[0]
    if one[1]["mode"] == "greedy":
        texts = [pool[i]["text"] for i in one[0]]
        assert len(set(texts)) == len(texts) and one[1]["refilled"] == 0
    else:
        assert one[1]["weighting"] == "guard" and one[1]["max_density"] >= 5
    for data, label in ((pool, "m"), (lambda: pool.to_iterable_dataset(num_shards=6), "s")):
        for world in (1, 2, 3):
            if (label, world) != ("m", 1):
                assert all(r == one for r in runs(data, world, f"{label}{world}")), (label, world)


@pytest.mark.slow
def test_torchrun_two_and_three_processes_guard_dsir_and_measure_as_one_does(tmp_path):
    """Real processes (torchrun, gloo): the guard in both modes, DSIR with and without it, each on
    the in-memory and the streamed pool, choose at 2 and 3 processes what one process chooses,
    with the same guard figures; the selection's OT distance, solved sharded, agrees to 1e-6."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    rows = read_jsonl(SAMPLE / "pool.jsonl", 100)
    rng = np.random.default_rng(11)
    order = rng.permutation(list(range(100)) + [int(i) for i in np.repeat([3, 41, 68, 90], 5)])
    vecs = rng.normal(size=(100, 16))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    near = vecs[rng.choice([3, 41, 68, 90, 7, 12, 55, 80], 20)] + 0.3 * rng.normal(size=(20, 16))
    for f in range(6):  # 6 file shards of 20 rows: 1, 2 and 3 processes split the stream as the rows
        chunk = order[20 * f : 20 * (f + 1)]
        (tmp_path / f"pool-{f}.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in chunk), encoding="utf-8")
    targets = read_jsonl(SAMPLE / "target.jsonl", 20)
    (tmp_path / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in targets), encoding="utf-8")
    np.save(tmp_path / "emb.npy", np.concatenate([vecs[order], near / np.linalg.norm(near, axis=1, keepdims=True)]).astype(np.float32))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}
    outs = {}
    for world in (1, 2, 3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(REPO / "tests" / "workers" / "guard_dsir.py"), str(tmp_path), str(tmp_path / f"w{world}.json"),
               str(tmp_path / f"cache{world}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[world] = json.loads((tmp_path / f"w{world}.json").read_text())["results"]
    ref = outs[1]
    assert ref["memory:got_d+greedy"]["dedup"]["skipped"] > 0 and ref["memory:tsds+kde"]["dedup"]["max_density"] >= 5
    for world in (1, 2, 3):
        for name, res in outs[world].items():
            base = ref["memory:" + name.split(":")[1]]
            assert res["indices"] == base["indices"] and res["dedup"] == base["dedup"], (world, name)
            assert res["selection_ot"] == pytest.approx(base["selection_ot"], rel=1e-6), (world, name)


def test_a_rank_holding_no_rows_still_joins_the_guard():
    """More processes than rows: a rank with an empty shard joins every collective of both modes."""
    from tests._thread_comm import run_ranks

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    x[3] = x[1]  # row 3 copies row 1
    s = np.array([0.5, 0.9, 0.1, 0.8, 0.3])
    bounds = [(0, 3), (3, 3), (3, 5)]
    for sel, k in ((get_selector("similarity"), 3), (get_selector("tsds", sigma=0.0, replace=True), 4)):
        one = guarded_choose(sel, s, k, seed=1, candidates=x, radius=0.1)
        assert (one[1].get("skipped"), one[1].get("max_density")) in ((1, None), (None, 2.0))
        got = run_ranks(3, lambda c: guarded_choose(sel, s[slice(*bounds[c.rank])], k, seed=1, candidates=x[slice(*bounds[c.rank])],
                                                    radius=0.1, index=np.arange(*bounds[c.rank]), comm=c))
        assert all(g[0].tolist() == one[0].tolist() and g[1] == one[1] for g in got)


@pytest.mark.slow
def test_a_two_process_job_with_the_guard_writes_the_one_process_output(tmp_path):
    """The YAML job (formerly refused with several processes) under torchrun: the same scored and
    selected splits, the same guard record, and the selection's OT distance to the solver's tolerance."""
    import json
    import subprocess
    import sys

    from datasets import load_from_disk

    from tests.conftest import REPO
    from tests.test_distributed import _env, _job_overrides

    outs = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        overrides = _job_overrides(tmp_path, out, tmp_path / "cache")  # writes pool.jsonl: 80 rows of every domain
        pool_file = tmp_path / "pool.jsonl"
        lines = pool_file.read_text(encoding="utf-8").splitlines(keepends=True)
        pool_file.write_text("".join(lines + lines[::2]), encoding="utf-8")  # every other row twice: the guard has copies to skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), "-m", "hf_otselect.cli",
               "select", "--config", str(REPO / "configs" / "demo.yaml"), *overrides, "dedup.radius=0.2", "method=got_d"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[world] = (load_from_disk(str(out)), json.loads((out / "selection.json").read_text()))
    (one, meta1), (two, meta2) = outs[1], outs[2]
    assert meta1["dedup"]["skipped"] > 0 and meta2["dedup"] == meta1["dedup"] and meta2["processes"] == 2
    for split in ("scored", "selected"):
        a, b = one[split].to_dict(), two[split].to_dict()
        score = a.pop("score"), b.pop("score")  # GOT-D's reductions sum in another order across processes
        assert a == b and np.allclose(score[0], score[1], rtol=0, atol=1e-6 * np.abs(score[0]).max()), split
    assert meta2["ot_distance"]["target_selection"] == pytest.approx(meta1["ot_distance"]["target_selection"], rel=1e-6)
