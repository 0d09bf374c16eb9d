"""hf_otselect.knn: exact search against brute force, padding never a neighbour, ANN recall."""

from __future__ import annotations

import numpy as np
import pytest

from hf_otselect import knn


def _clustered(n: int, dim: int = 16, n_centers: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, dim)) * 4
    return (centers[rng.integers(0, n_centers, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _brute_sq(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    q64, b64 = q.astype(np.float64), b.astype(np.float64)
    return ((q64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)


def test_flat_matches_brute_force_l2_and_ip():
    base = _clustered(300, seed=1)
    queries = _clustered(7, seed=2)
    res = knn.knn_search(queries, base, 10, index="flat")
    sq = _brute_sq(queries, base)
    expected = np.argsort(sq, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(res.indices, expected)
    np.testing.assert_allclose(res.distances, np.take_along_axis(sq, expected, 1), rtol=1e-4, atol=1e-3)
    assert res.index == "flat" and res.valid.all()
    dist, ind = knn.knn_search(queries, base, 5, metric="ip")  # tuple unpacking
    ip = queries.astype(np.float64) @ base.T.astype(np.float64)
    np.testing.assert_array_equal(ind, np.argsort(-ip, axis=1, kind="stable")[:, :5])


def test_k_larger_than_base_is_clipped_never_padding():
    base = _clustered(6, seed=3)
    res = knn.knn_search(base[:2], base, 50)
    assert res.indices.shape == (2, 6)
    assert (res.indices >= 0).all() and np.isfinite(res.distances).all()
    # Every base row appears exactly once per query.
    np.testing.assert_array_equal(np.sort(res.indices, axis=1), np.tile(np.arange(6), (2, 1)))


def test_ivf_padding_is_masked():
    base = _clustered(2000, seed=4)
    # 40 lists, 1 probed: a list holds far fewer than 1000 rows, so FAISS pads each row.
    res = knn.knn_search(base[:5], base, 1000, index="ivf", nlist=40, nprobe=1)
    assert not res.valid.all()
    assert (res.indices[~res.valid] == -1).all()
    assert np.isposinf(res.distances[~res.valid]).all()
    assert (res.indices[res.valid] >= 0).all() and np.isfinite(res.distances[res.valid]).all()
    # Valid slots come first in each row, nearest first.
    for row_valid, row_dist, c in zip(res.valid, res.distances, res.counts):
        assert row_valid[:c].all() and not row_valid[c:].any()
        assert np.all(np.diff(row_dist[:c]) >= 0)
    # Each query finds itself at distance ~0 first.
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(5))


@pytest.mark.parametrize("kind, kwargs", [("ivf", {"nprobe": 8}), ("hnsw", {})])
def test_approximate_recall_on_clustered_data(kind, kwargs):
    base = _clustered(5000, seed=5)
    queries = _clustered(50, seed=6)
    exact = knn.knn_search(queries, base, 10, index="flat")
    approx = knn.knn_search(queries, base, 10, index=kind, **kwargs)
    assert approx.index == kind
    assert knn.recall_at_k(approx.indices, exact.indices) >= 0.9


def test_recall_at_k_counts_hits_not_padding():
    exact = np.array([[0, 1], [2, 3]])
    assert knn.recall_at_k(np.array([[1, 0], [3, -1]]), exact) == 0.75
    assert knn.recall_at_k(np.array([[-1, -1], [-1, -1]]), exact) == 0.0


def test_radius_search_exact_l2_and_ip():
    base = _clustered(400, seed=7)
    queries = np.vstack([base[:3], _clustered(4, seed=8)])
    sq = _brute_sq(queries, base)
    radius = float(np.quantile(sq, 0.05))
    lims, dist, ind = knn.radius_search(queries, base, radius)
    assert lims.shape == (8,) and lims[0] == 0 and lims[-1] == ind.size == dist.size
    for i in range(len(queries)):
        got = ind[lims[i] : lims[i + 1]]
        want = np.nonzero(sq[i] < radius)[0]
        # float32 vs float64 may disagree only for points within rounding of the radius
        border = np.abs(sq[i] - radius) < 1e-3 * radius
        assert set(got) - set(np.nonzero(border)[0]) == set(want) - set(np.nonzero(border)[0])
        assert np.all(np.diff(dist[lims[i] : lims[i + 1]]) >= 0)
        assert (got >= 0).all()
    # A base row is its own neighbour at distance 0.
    assert ind[lims[0]] == 0 and dist[lims[0]] <= 1e-3
    ip = queries.astype(np.float64) @ base.T.astype(np.float64)
    thr = float(np.quantile(ip, 0.97))
    lims, dist, ind = knn.radius_search(queries, base, thr, metric="ip", batch_size=3)
    for i in range(len(queries)):
        assert set(ind[lims[i] : lims[i + 1]]) == set(np.nonzero(ip[i] > thr)[0])
        assert np.all(np.diff(dist[lims[i] : lims[i + 1]]) <= 0)


def test_radius_search_empty_result():
    base = _clustered(50, seed=9)
    lims, dist, ind = knn.radius_search(base[:2] + 1000.0, base, 1.0)
    np.testing.assert_array_equal(lims, [0, 0, 0])
    assert dist.size == 0 and ind.size == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda b: knn.knn_search(b, b, 0), "'k' parameter of knn_search"),
        (lambda b: knn.knn_search(b, b, 3, metric="cosine"), "'metric' parameter"),
        (lambda b: knn.knn_search(b, b, 3, index="lsh"), "'index' parameter"),
        (lambda b: knn.knn_search(b[:, :3], b, 3), "'queries' parameter"),
        (lambda b: knn.knn_search(b, b, 3, device="tpu"), "'device' parameter"),
        (lambda b: knn.radius_search(b, b, 0.0), "'radius' parameter of radius_search"),
        (lambda b: knn.radius_search(b, b, 1.0, index="hnsw"), "'index' parameter"),
    ],
)
def test_bad_parameters_raise(call, match):
    base = _clustered(20, seed=10)
    with pytest.raises((ValueError, TypeError), match=match):
        call(base)


def _ties_reference(q: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Exact float64 neighbours, ties to the lower row (a stable sort)."""
    return np.argsort(_brute_sq(q, b), axis=1, kind="stable")[:, :k]


def _planted_ties(seed: int = 8) -> tuple[np.ndarray, np.ndarray]:
    # Integer coordinates make every float32 distance exact, so copies and equidistant rows tie
    # exactly; the copies sit far apart in the base so they straddle the search blocks.
    rng = np.random.default_rng(seed)
    base = rng.integers(-3, 4, size=(500, 6)).astype(np.float32)
    base[[3, 97, 250, 251, 499]] = base[10]
    queries = np.vstack([base[10:11], rng.integers(-3, 4, size=(29, 6))]).astype(np.float32)
    return queries, base


@pytest.mark.parametrize("block_rows", [1, 7, 64, 16_384])
def test_knn_blocks_equals_the_flat_index_ties_to_the_lower_row(monkeypatch, block_rows):
    """Blockwise search (no copy of the base) gives a flat index's lists, planted exact ties included,
    at every block size (the caller's blocks sliced where larger)."""
    queries, base = _planted_ties()
    monkeypatch.setattr(knn, "BLOCK_BYTES", 4 * base.shape[1] * block_rows)
    assert knn.block_rows(base.shape[1]) == block_rows
    chunks = [base[:123], base[123:124], base[124:400], base[400:]]
    res = knn.knn_blocks(queries, iter(chunks), 40)
    ref = _ties_reference(queries, base, 40)
    np.testing.assert_array_equal(res.indices, ref)
    np.testing.assert_array_equal(res.indices[0, :6], [3, 10, 97, 250, 251, 499])  # the planted copies, in order
    np.testing.assert_array_equal(res.distances, np.take_along_axis(_brute_sq(queries, base), ref, 1).astype(np.float32))
    flat = knn.knn_search(queries, base, 40, index="flat", device="cpu")
    np.testing.assert_array_equal(res.indices, flat.indices)


def test_knn_blocks_pads_beyond_the_base():
    queries, base = _planted_ties()
    res = knn.knn_blocks(queries[:2], iter([base[:3], base[3:5]]), 8)
    assert (res.indices[:, 5:] == -1).all() and np.isposinf(res.distances[:, 5:]).all() and res.valid[:, :5].all()
    np.testing.assert_array_equal(np.sort(res.indices[:, :5], axis=1), np.tile(np.arange(5), (2, 1)))


def test_row_ivf_is_exact_with_every_list_probed_and_recalls_as_faiss_ivf():
    """IVF lists of row numbers: the same centroids as IndexIVFFlat, so the same recall, without the copy."""
    base = _clustered(3000, seed=9)
    queries = _clustered(25, seed=10)
    ivf = knn.RowIVF(iter([base[:1000], base[1000:]]), len(base), base.shape[1], read=lambda r: base[r], nlist=30, seed=0)
    assert ivf.members.size == len(base) and ivf.starts[-1] == len(base)
    assert ivf.members.dtype == np.int64 and not hasattr(ivf, "vectors")
    faiss_ivf = knn.build_index(base, index="ivf", nlist=30, seed=0)  # the same seeded training
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 30), faiss_ivf.quantizer.reconstruct_n(0, 30))
    exact = _ties_reference(queries, base, 20)
    np.testing.assert_array_equal(ivf.search(queries, 20, nprobe=30).indices, exact)
    ours = ivf.search(queries, 20, nprobe=3)
    theirs = knn.knn_search(queries, base, 20, index="ivf", nlist=30, nprobe=3, device="cpu")
    assert knn.recall_at_k(ours.indices, exact) == pytest.approx(knn.recall_at_k(theirs.indices, exact), abs=0.01)
    # A probe that visits fewer than k rows pads, as FAISS does, masked.
    few = ivf.search(queries[:3], 1000, nprobe=1)
    assert not few.valid.all() and np.isposinf(few.distances[~few.valid]).all()
    for row_valid, row_ind in zip(few.valid, few.indices):
        assert row_valid[: row_valid.sum()].all() and np.unique(row_ind[row_valid]).size == row_valid.sum()


@pytest.mark.parametrize("k", [50, 250, 900])  # heaps; most candidates (argpartition); more than all (padding)
@pytest.mark.parametrize("chunk, rows", [(None, None), (1500, 4)])  # one chunk, one block; several of each
def test_row_ivf_unordered_search_keeps_the_same_neighbours(monkeypatch, k, chunk, rows):
    if chunk:  # chunks of ~5 queries, picked 4 rows at a time, blocks narrower and wider than k
        monkeypatch.setattr(knn, "WIDE_CHUNK", chunk)
        monkeypatch.setattr(knn, "WIDE_ROWS", rows)
    base = _clustered(2000, seed=11)
    queries = _clustered(30, seed=12)
    ivf = knn.RowIVF(iter([base]), len(base), base.shape[1], read=lambda r: base[r], nlist=20, seed=0)
    wide = []
    real = knn.RowIVF._search_wide
    monkeypatch.setattr(knn.RowIVF, "_search_wide", lambda *a, **kw: wide.append(1) or real(*a, **kw))
    ordered, loose = ivf.search(queries, k, nprobe=3), ivf.search(queries, k, nprobe=3, ordered=False)
    assert bool(wide) == (k > 50)  # ~300 candidates per query: k of most of them takes the wide path
    assert not np.array_equal(ordered.indices, loose.indices)  # not nearest first
    assert (~ordered.valid).any() or k < 900
    for a, b, da, db in zip(ordered.indices, loose.indices, ordered.distances, loose.distances):
        np.testing.assert_array_equal(np.sort(a), np.sort(b))
        np.testing.assert_allclose(np.sort(da), np.sort(db), rtol=1e-6, atol=1e-6)
    # The values alone (a kernel sum's search): the same distances, without the row numbers.
    values = ivf.smallest(queries, k, nprobe=3)
    assert values.shape == (len(queries), k) and values.dtype == np.float32
    np.testing.assert_allclose(np.sort(values, axis=1), np.sort(loose.distances, axis=1), rtol=1e-6, atol=1e-6)


def test_row_ivf_searches_on_one_blas_thread_and_gives_the_threads_back(monkeypatch):
    """Each list's GEMM is small: the search runs BLAS on one thread (no spinning pool between
    them), and the caller's BLAS threads are as before afterwards."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    base = _clustered(2000, seed=11)
    ivf = knn.RowIVF(iter([base]), len(base), base.shape[1], read=lambda r: base[r], nlist=20, seed=0)
    seen = []
    real = knn.RowIVF._probed_lists

    def spy(self, probe):
        seen.append(blas_threads())
        yield from real(self, probe)

    monkeypatch.setattr(knn.RowIVF, "_probed_lists", spy)
    before = blas_threads()
    ivf.search(base[:30], 20, nprobe=3)
    ivf.search(base[:30], 250, nprobe=3, ordered=False)
    ivf.smallest(base[:30], 250, nprobe=3)
    assert len(seen) == 3 and all(s == {1} for s in seen)
    assert blas_threads() == before
