"""Nearest-neighbour and radius search over embeddings: the only module that imports FAISS.

Conventions (read these before using the results):

* ``metric="l2"`` distances are **squared** Euclidean distances, as FAISS reports them; take
  ``np.sqrt`` for plain distances. ``metric="ip"`` values are inner products (higher = closer).
* :func:`knn_search` never hands back FAISS's padding as a neighbour. ``k`` larger than the base is
  clipped to the base size (so no column is all padding), and where an approximate index finds
  fewer than ``k`` neighbours for a row (an IVF probe that visits too few points), the missing slots
  hold index ``-1`` and distance ``+inf`` (``-inf`` for ``"ip"``); :attr:`KnnResult.valid` masks
  them. Valid neighbours always come first in a row, sorted nearest first.
* :func:`radius_search` returns FAISS's flat ``(lims, distances, indices)`` layout, each query's
  results sorted nearest first; exact with the flat index (the default for every base size).
* :func:`knn_blocks` and :class:`RowIVF` search rows they never copy (e.g. a memory-mapped shard):
  the exact search takes the base block by block (FAISS's brute-force ``faiss.knn`` per block, the
  blocks' results merged in FAISS's C++ heaps), and the IVF index keeps row numbers in its lists,
  not vectors, reading each probed list's rows when it scans it. Memory: the queries' lists plus
  one block of rows (or of one list's distances), never a copy of the base.

FAISS is imported inside the functions so that ``import hf_otselect`` stays cheap. A GPU is used
for k-NN when the installed FAISS has one (``faiss.get_num_gpus() > 0``) unless ``device="cpu"``;
FAISS's GPU indexes do not implement range search, so :func:`radius_search` always runs on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_limits

from ._checks import check_choice, check_embeddings, check_float, check_int, check_seed, param_error

logger = logging.getLogger(__name__)

Metric = Literal["l2", "ip"]
IndexKind = Literal["auto", "flat", "ivf", "hnsw"]

#: Bases up to this many rows use the exact flat index under ``index="auto"``.
FLAT_MAX_BASE = 200_000
# FAISS marks an empty result slot with this index and with +-FLT_MAX as the distance.
_FAISS_EMPTY = -1


@dataclass(frozen=True)
class KnnResult:
    """Neighbours of each query, nearest first.

    Attributes
    ----------
    distances : ndarray of shape (n_queries, k), float32
        Squared L2 distances (``metric="l2"``) or inner products (``metric="ip"``). Padding slots
        hold ``+inf`` (l2) or ``-inf`` (ip).
    indices : ndarray of shape (n_queries, k), int64
        Rows of the base; padding slots hold ``-1``.
    metric : {"l2", "ip"}
    index : str
        The index actually used: ``"flat"``, ``"ivf"`` or ``"hnsw"``.

    Unpacks as ``distances, indices = knn_search(...)``.
    """

    distances: np.ndarray
    indices: np.ndarray
    metric: str
    index: str

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask of shape (n_queries, k): True where the slot is a real neighbour."""
        return self.indices >= 0

    @property
    def counts(self) -> np.ndarray:
        """Number of real neighbours per query, shape (n_queries,)."""
        return self.valid.sum(axis=1)

    def __iter__(self):  # tuple-style unpacking
        return iter((self.distances, self.indices))


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a hard dependency
        raise ImportError("hf_otselect.knn needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12).") from err
    return faiss


def _use_gpu(device: str | None) -> bool:
    check_choice(device, "device", "knn_search", [None, "cpu", "cuda"])
    faiss = _faiss()
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and n_gpus == 0:
        raise param_error("device", "knn_search", "'cpu' or None when FAISS has no GPU", device)
    return n_gpus > 0 and device != "cpu"


def default_nlist(n_base: int) -> int:
    """IVF list count for a base of ``n_base`` rows: about ``sqrt(n)``, at least 1.

    ``sqrt(n)`` (rather than FAISS's usual ``4 sqrt(n)``) keeps k-means training and assignment
    affordable on a few CPU cores; recall is then tuned with ``nprobe``.
    """
    return int(max(1, min(n_base // 39, round(np.sqrt(n_base)))))


def default_nprobe(nlist: int, k: int = 1, n_base: int = 0) -> int:
    """IVF lists probed per query by default.

    ``max(8, nlist // 64)`` (15 at a million rows), raised to ``ceil(4 * k * nlist / n_base)`` so
    the probed lists hold about four times the ``k`` rows asked for (an IVF probe that visits
    fewer rows than ``k`` cannot fill the row). ``benchmarks/tsds_scaling.py`` reports the recall
    this gives.
    """
    probe = max(8, nlist // 64)
    if n_base > 0:
        probe = max(probe, -(-4 * k * nlist // n_base))
    return min(probe, nlist)


def build_index(
    base: np.ndarray,
    *,
    metric: Metric = "l2",
    index: Literal["flat", "ivf", "hnsw"] = "flat",
    nlist: int | None = None,
    hnsw_m: int = 32,
    seed: int = 0,
    gpu: bool = False,
) -> Any:
    """Build and fill a FAISS index over ``base`` (float32, C-contiguous, shape (n, dim)).

    IVF is trained on at most ``40 * nlist`` rows (FAISS asks for at least 39 per centroid) drawn
    with a ``numpy.random.Generator(seed)``, with 10 seeded k-means iterations (FAISS's default is 25; fewer keeps the build affordable on
    a few cores, and the recall that results is measured in ``benchmarks/tsds_scaling.py``), so the
    same inputs give the same index.
    """
    n, dim = base.shape
    return index_from_blocks(iter([base]), n, dim, read=lambda rows: base[rows], metric=metric, index=index, nlist=nlist, hnsw_m=hnsw_m, seed=seed, gpu=gpu)


def index_from_blocks(
    blocks: Iterable[np.ndarray],
    n: int,
    dim: int,
    *,
    read: Callable[[np.ndarray], np.ndarray],
    metric: Metric = "l2",
    index: Literal["flat", "ivf", "hnsw"] = "flat",
    nlist: int | None = None,
    hnsw_m: int = 32,
    seed: int = 0,
    gpu: bool = False,
) -> Any:
    """Build a FAISS index over ``n`` rows handed over in blocks, never holding them all at once.

    Parameters
    ----------
    blocks : iterable of ndarray of shape (b, dim), float32
        The rows, in order; they are added one block at a time (the index keeps its own copy,
        which is all the memory a flat or IVF index needs).
    n, dim : int
        Row count and dimension.
    read : callable
        ``read(sorted_row_numbers) -> (len, dim)`` float32 rows; used for the IVF training sample
        (at most ``40 * nlist`` rows, drawn as in :func:`build_index`).
    metric, index, nlist, hnsw_m, seed, gpu
        As for :func:`build_index`.
    """
    faiss = _faiss()
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if index == "flat":
        idx = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    elif index == "hnsw":
        idx = faiss.IndexHNSWFlat(dim, hnsw_m, faiss_metric)
        idx.hnsw.efConstruction = 64
    else:
        nlist = default_nlist(n) if nlist is None else nlist
        quantizer = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        idx = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
        idx.cp.seed = seed % 2**31  # FAISS keeps a C int; the row sample below takes the full seed
        idx.cp.niter = 10
        n_train = min(n, 40 * nlist)
        rng = np.random.default_rng(seed)
        rows = np.arange(n) if n_train == n else np.sort(rng.choice(n, n_train, replace=False))
        idx.train(np.ascontiguousarray(read(rows), dtype=np.float32))
    if gpu and index != "hnsw":  # FAISS has no GPU HNSW; flat and IVF move over
        idx = faiss.index_cpu_to_all_gpus(idx)
    for block in blocks:
        idx.add(np.ascontiguousarray(block, dtype=np.float32))
    return idx


def _check_common(queries: Any, base: Any, metric: str, index: str, owner: str, kinds: list[str]):
    base = check_embeddings(base, "base", owner)
    queries = check_embeddings(queries, "queries", owner, dim=base.shape[1])
    check_choice(metric, "metric", owner, ["l2", "ip"])
    check_choice(index, "index", owner, kinds)
    return queries, base


def knn_search(
    queries: Any,
    base: Any,
    k: int,
    *,
    metric: Metric = "l2",
    index: IndexKind = "auto",
    nprobe: int | None = None,
    nlist: int | None = None,
    ef_search: int | None = None,
    device: Literal["cpu", "cuda"] | None = None,
    seed: int = 0,
    prebuilt: Any = None,
) -> KnnResult:
    """The ``k`` nearest rows of ``base`` for each query.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, dim)
    base : ndarray of shape (n_base, dim)
    k : int
        Neighbours per query, ``>= 1``; values above ``n_base`` are clipped to ``n_base``.
    metric : {"l2", "ip"}
        Squared Euclidean distance or inner product (cosine on unit rows).
    index : {"auto", "flat", "ivf", "hnsw"}
        ``"flat"`` is exact. ``"auto"`` picks flat for ``n_base <= FLAT_MAX_BASE`` (200,000) and
        IVF above. ``"ivf"``: ``IndexIVFFlat`` with ``nlist`` lists (:func:`default_nlist`);
        ``"hnsw"``: ``IndexHNSWFlat`` (32 links, efConstruction 64), CPU only.
    nprobe : int, optional
        IVF lists visited per query (default :func:`default_nprobe`).
    nlist : int, optional
        IVF list count.
    ef_search : int, optional
        HNSW search depth (default ``max(64, 2 * k)``).
    device : {"cpu", "cuda"}, optional
        None uses a GPU when FAISS has one; ``"cpu"`` forces CPU.
    seed : int
        Seeds the IVF training sample and k-means.
    prebuilt : faiss.Index, optional
        An index already filled with ``base`` (from :func:`build_index`), reused instead of
        building a new one; ``index`` is then only reported.

    Returns
    -------
    KnnResult
        ``distances`` and ``indices`` of shape (n_queries, min(k, n_base)), nearest first, with
        padding masked as described in the module docstring.
    """
    owner = "knn_search"
    queries, base = _check_common(queries, base, metric, index, owner, ["auto", "flat", "ivf", "hnsw"])
    k = check_int(k, "k", owner, 1)
    seed = check_seed(seed, "seed", owner)
    n = base.shape[0]
    k = min(k, n)
    kind = ("flat" if n <= FLAT_MAX_BASE else "ivf") if index == "auto" else index
    if nlist is not None:
        nlist = check_int(nlist, "nlist", owner, 1, n)
    gpu = _use_gpu(device)
    idx = prebuilt if prebuilt is not None else build_index(base, metric=metric, index=kind, nlist=nlist, seed=seed, gpu=gpu)
    if nprobe is not None:
        nprobe = check_int(nprobe, "nprobe", owner, 1)
    if ef_search is not None:
        ef_search = check_int(ef_search, "ef_search", owner, 1)
    logger.debug("knn_search: %d queries, base %d, k=%d, %s/%s, gpu=%s", len(queries), n, k, kind, metric, gpu)
    return search_index(idx, queries, k, index=kind, metric=metric, nprobe=nprobe, ef_search=ef_search)


def search_index(
    idx: Any,
    queries: np.ndarray,
    k: int,
    *,
    index: Literal["flat", "ivf", "hnsw"],
    metric: Metric = "l2",
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> KnnResult:
    """The ``k`` nearest rows of a filled index (from :func:`build_index` / :func:`index_from_blocks`).

    The core of :func:`knn_search` for callers that built the index themselves (e.g. over one
    process's shard). ``k`` must not exceed the rows in the index; ``nprobe`` / ``ef_search``
    default as in :func:`knn_search`. Same return conventions (padding masked).
    """
    n = int(idx.ntotal)
    if index == "ivf":
        n_lists = int(getattr(idx, "nlist", 0) or default_nlist(n))
        idx.nprobe = min(default_nprobe(n_lists, k, n) if nprobe is None else nprobe, n_lists)
    elif index == "hnsw":
        idx.hnsw.efSearch = max(64, 2 * k) if ef_search is None else ef_search
    dist, ind = idx.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    ind = np.asarray(ind, dtype=np.int64)
    dist = np.asarray(dist, dtype=np.float32)
    pad = ind == _FAISS_EMPTY
    if pad.any():
        # FAISS puts empty slots last in each row with +-FLT_MAX; mark them unmistakably.
        dist = dist.copy()
        dist[pad] = np.inf if metric == "l2" else -np.inf
        logger.info("knn_search: %d of %d neighbour slots unfilled by the %s index (masked as -1).", int(pad.sum()), pad.size, index)
    return KnnResult(distances=dist, indices=ind, metric=metric, index=index)


def radius_search(
    queries: Any,
    base: Any,
    radius: float,
    *,
    metric: Metric = "l2",
    index: Literal["auto", "flat", "ivf"] = "auto",
    nprobe: int | None = None,
    nlist: int | None = None,
    seed: int = 0,
    prebuilt: Any = None,
    batch_size: int = 20_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row of ``base`` within ``radius`` of each query.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, dim)
    base : ndarray of shape (n_base, dim)
    radius : float
        For ``metric="l2"`` a **squared** Euclidean distance: rows with ``dist < radius`` (strict,
        as FAISS) are returned, so ``radius > 0``. For ``metric="ip"``: rows with inner product
        ``> radius``.
    metric : {"l2", "ip"}
    index : {"auto", "flat", "ivf"}
        ``"auto"`` and ``"flat"`` are exact (brute force, every base size). ``"ivf"`` visits only
        ``nprobe`` lists and can miss neighbours that fall in other lists.
    nprobe, nlist, seed, prebuilt
        As for :func:`knn_search`.
    batch_size : int
        Queries per FAISS call; bounds the peak size of one result batch.

    Returns
    -------
    lims : ndarray of shape (n_queries + 1,), int64
        Query ``i``'s results are ``distances[lims[i]:lims[i+1]]`` / ``indices[...]``.
    distances : ndarray of shape (lims[-1],), float32
        Squared L2 distances (or inner products), each query's block sorted nearest first.
    indices : ndarray of shape (lims[-1],), int64
        Rows of ``base``; never ``-1``.
    """
    owner = "radius_search"
    queries, base = _check_common(queries, base, metric, index, owner, ["auto", "flat", "ivf"])
    radius = check_float(radius, "radius", owner, 0.0 if metric == "l2" else None, low_open=True)
    seed = check_seed(seed, "seed", owner)
    batch_size = check_int(batch_size, "batch_size", owner, 1)
    kind = "flat" if index == "auto" else index
    if nlist is not None:
        nlist = check_int(nlist, "nlist", owner, 1, base.shape[0])
    idx = prebuilt if prebuilt is not None else build_index(base, metric=metric, index=kind, nlist=nlist, seed=seed)
    if kind == "ivf":
        probe = default_nprobe(idx.nlist) if nprobe is None else check_int(nprobe, "nprobe", owner, 1)
        idx.nprobe = min(probe, idx.nlist)
    lims_parts, dist_parts, ind_parts = [np.zeros(1, dtype=np.int64)], [], []
    offset = 0
    for start in range(0, len(queries), batch_size):
        lims, dist, ind = idx.range_search(queries[start : start + batch_size], radius)
        lims_parts.append(np.asarray(lims[1:], dtype=np.int64) + offset)
        offset += int(lims[-1])
        dist_parts.append(np.asarray(dist, dtype=np.float32))
        ind_parts.append(np.asarray(ind, dtype=np.int64))
    lims = np.concatenate(lims_parts)
    dist = np.concatenate(dist_parts) if dist_parts else np.zeros(0, np.float32)
    ind = np.concatenate(ind_parts) if ind_parts else np.zeros(0, np.int64)
    # Sort each query's block nearest first (ties by base row) in one vectorised lexsort.
    owner_row = np.repeat(np.arange(len(queries)), np.diff(lims))
    key = dist if metric == "l2" else -dist
    order = np.lexsort((ind, key, owner_row))
    return lims, dist[order], ind[order]


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact neighbours (``exact``, shape (m, k)) found in ``approx`` (shape (m, k')).

    Padding (``-1``) in ``approx`` never counts as a hit.
    """
    approx = np.asarray(approx)
    exact = np.asarray(exact)
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise param_error("approx", "recall_at_k", "a 2-D array with as many rows as exact", f"shapes {approx.shape} and {exact.shape}")
    m = exact.shape[0]
    # Row-wise set intersection via sorting; offset rows so they never collide.
    big = int(max(approx.max(initial=0), exact.max(initial=0))) + 2
    rows = np.arange(m, dtype=np.int64)[:, None] * big
    a = np.where(approx >= 0, approx + rows, -1).ravel()
    e = (exact + rows).ravel()
    hits = np.isin(e, a[a >= 0]).sum()
    return float(hits) / e.size


#: Distances (queries x rows) computed at once by :class:`RowIVF` (16 MiB of float32).
BLOCK_ELEMENTS = 2**22
#: Candidates laid out at once by :meth:`RowIVF`'s wide search (64 MiB of float32), and the rows
#: of one of its blocks picked at once (the rows of a block about as wide as each other).
WIDE_CHUNK = 4 * BLOCK_ELEMENTS
WIDE_ROWS = 256
#: Bytes of float32 rows searched at once by :func:`knn_blocks` (16,384 rows at 384-d). A block
#: holds the same bytes at any dimension: at a low one a fixed row count would make each block's
#: own top-k, not its GEMM, the cost of the search.
BLOCK_BYTES = 24 * 2**20


def block_rows(dim: int) -> int:
    """Rows of ``dim`` float32 values in :data:`BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // (4 * int(dim)))


def _heap_result(heap: Any, index: str) -> KnnResult:
    dist, ind = heap.D, heap.I
    dist[ind == _FAISS_EMPTY] = np.inf  # FAISS pads with FLT_MAX; mark it unmistakably
    return KnnResult(distances=dist, indices=ind, metric="l2", index=index)


def knn_blocks(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int) -> KnnResult:
    """Exact ``k`` nearest rows of a base handed over block by block, without a copy of the base.

    Each block is searched by FAISS's brute force (``faiss.knn``: the GEMM and fused top-k of its
    flat index, no index object) and its lists merge into one heap per query (``faiss.ResultHeap``).
    A heap keeps the row it holds on an exact tie and rows come in ascending order, so ties go to
    the lower row and the result is that of a flat L2 index over the whole base.

    Parameters
    ----------
    queries : ndarray of shape (q, dim), float32
    blocks : iterable of ndarray of shape (b_i, dim)
        The base rows in order (e.g. a memory-mapped shard read block by block); rows are numbered
        from 0 across the blocks. Blocks above :func:`block_rows` rows are searched in slices.
    k : int
        Neighbours per query, ``>= 1``; slots beyond the base are padding (``-1`` / ``inf``).

    Returns
    -------
    KnnResult
        Shape (q, k), squared L2 distances nearest first, as :func:`search_index` over a flat index.
    """
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k)
    step = block_rows(queries.shape[1])
    start = 0
    for block in blocks:
        for s in range(0, len(block), step):
            part = np.ascontiguousarray(block[s : s + step], dtype=np.float32)
            dist, ind = faiss.knn(queries, part, min(k, len(part)))
            heap.add_result(dist, np.where(ind >= 0, ind + (start + s), _FAISS_EMPTY))
        start += len(block)
    heap.finalize()
    return _heap_result(heap, "flat")


def _one_blas_thread() -> Any:
    """A context in which BLAS runs on one thread, for :class:`RowIVF`'s searches: each GEMM (one
    list's rows against the queries that probe it) is too small for OpenBLAS's threads to gain
    on, and its waiting threads spin through the numpy work in between (one BLAS thread: a 1M-row
    TSDS fit on two cores took 28-30 CPU s, not 41, and less wall time; a dense pool's 4.6-4.8,
    not 6.2-6.7).
    Splitting the queries over threads instead gained a fifth of the 1M fit's wall time for a
    quarter more CPU time, and nothing on the dense pool (the two cores share memory bandwidth)."""
    return threadpool_limits(limits=1, user_api="blas")


def _augmented(queries: np.ndarray) -> np.ndarray:
    """``[-2 q, 1]`` per query row: times a list's ``[x, |x|^2]`` rows, one GEMM gives ``|x|^2 - 2 q.x``."""
    out = np.empty((len(queries), queries.shape[1] + 1), dtype=np.float32)
    np.multiply(queries, -2.0, out=out[:, :-1])
    out[:, -1] = 1.0
    return out


class RowIVF:
    """An L2 inverted-file (IVF) index whose lists hold row numbers, not rows: the vectors stay where they are.

    The centroids are trained as :func:`build_index` trains ``IndexIVFFlat`` (the same seeded sample
    of at most ``40 * nlist`` rows, 10 seeded k-means iterations, so the same centroids), and each
    row goes to its nearest centroid's list, block by block. A search scans list by list: the rows
    of one list are read once (through ``read``) for every query that probes it, one GEMM gives
    their distances, and FAISS's heaps keep each query's best ``k``. Memory: the centroids and one
    int64 row number per row (8 bytes, against ``4 * dim`` for ``IndexIVFFlat``'s copy), plus one
    list's rows and at most :data:`BLOCK_ELEMENTS` distances while searching.

    Parameters
    ----------
    blocks : iterable of ndarray of shape (b, dim), float32
        The rows in order (read once, to fill the lists).
    n, dim : int
        Row count and dimension.
    read : callable
        ``read(sorted_row_numbers) -> (len, dim)`` float32 rows (row numbers from 0).
    nlist : int, optional
        List count (default :func:`default_nlist`).
    seed : int
        Seeds the training sample and k-means.
    """

    def __init__(self, blocks: Iterable[np.ndarray], n: int, dim: int, *, read: Callable[[np.ndarray], np.ndarray],
                 nlist: int | None = None, seed: int = 0) -> None:
        faiss = _faiss()
        self.read = read
        self.ntotal = int(n)
        self.nlist = default_nlist(n) if nlist is None else int(nlist)
        self.quantizer = faiss.IndexFlatL2(dim)
        clus = faiss.Clustering(dim, self.nlist)
        clus.seed = seed % 2**31
        clus.niter = 10
        n_train = min(n, 40 * self.nlist)
        rows = np.arange(n) if n_train == n else np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
        clus.train(np.ascontiguousarray(read(rows), dtype=np.float32), self.quantizer)
        assign = np.empty(n, dtype=np.int64)
        start = 0
        for block in blocks:
            _, lists = self.quantizer.search(np.ascontiguousarray(block, dtype=np.float32), 1)
            assign[start : start + len(block)] = lists[:, 0]
            start += len(block)
        self.members = np.argsort(assign, kind="stable")  # rows grouped by list, ascending within each
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=self.nlist))])

    def search(self, queries: np.ndarray, k: int, nprobe: int, *, ordered: bool = True) -> KnnResult:
        """Each query's ``k`` nearest rows among those of its ``nprobe`` nearest lists.

        Returns a :class:`KnnResult` of shape (q, k), nearest first, padded (``-1`` / ``inf``) where
        the probed lists hold fewer than ``k`` rows; ``ordered=False`` leaves each row's ``k``
        unsorted (the same set: the sort is a fifth of a wide search). Distances are float32
        ``|q|^2 + |x|^2 - 2 q.x`` (the expansion of FAISS's flat index), so they can differ from
        ``IndexIVFFlat``'s in the last bits.
        """
        queries, probe, reach = self._probe(queries, nprobe)
        with _one_blas_thread():
            if not ordered and len(queries) and 2 * k >= np.median(reach):
                dist, ind = self._search_wide(queries, k, probe, reach, ids=True)
                return KnnResult(distances=dist, indices=ind, metric="l2", index="ivf")
            return self._search_heaps(queries, k, probe, ordered)

    def smallest(self, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        """The distances of ``search(queries, k, nprobe, ordered=False)`` without the row numbers.

        For a caller that needs only each query's values (a kernel sum): a search that keeps most
        of each query's candidates then picks them with ``np.partition``, with no int64 row number
        per candidate to lay out and gather.

        Returns
        -------
        ndarray of shape (q, k), float32
            Each query's ``k`` smallest squared distances, in no order, ``inf`` where the probed
            lists hold fewer than ``k`` rows.
        """
        queries, probe, reach = self._probe(queries, nprobe)
        with _one_blas_thread():
            if len(queries) and 2 * k >= np.median(reach):
                return self._search_wide(queries, k, probe, reach, ids=False)[0]
            return self._search_heaps(queries, k, probe, ordered=False).distances

    def _probe(self, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 queries, their ``nprobe`` nearest lists (q, nprobe) and their candidates per query."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, probe = self.quantizer.search(queries, min(int(nprobe), self.nlist))
        return queries, probe, np.diff(self.starts)[probe].sum(axis=1)

    def _search_heaps(self, queries: np.ndarray, k: int, probe: np.ndarray, ordered: bool) -> KnnResult:
        """:meth:`search` through FAISS's heaps: one per query, fed list by list."""
        nprobe = probe.shape[1]
        heap = _faiss().ResultHeap(len(queries), k)
        # One GEMM per list gives |x|^2 - 2 q.x: the queries (times -2) carry a last coordinate 1
        # and the list's rows their squared norm. |q|^2 is the same along a query's row, so it is
        # added after the heaps have chosen.
        for rows, vecs, slots in self._probed_lists(probe):
            who = slots // nprobe
            step = max(1, BLOCK_ELEMENTS // rows.size)
            for s in range(0, who.size, step):
                qs = who[s : s + step]
                heap.add_result_subset(qs, _augmented(queries[qs]) @ vecs.T, rows)
        if ordered:
            heap.finalize()
        heap.D += np.einsum("ij,ij->i", queries, queries)[:, None]
        return _heap_result(heap, "ivf")

    def _probed_lists(self, probe: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per non-empty list that ``probe`` (q, nprobe) names: its row numbers, its rows with their
        squared norm as a last column (read once), and the flat ``probe`` slots that name it."""
        flat = probe.ravel()
        by_list = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[by_list], np.arange(self.nlist + 1))
        for lst in np.flatnonzero(np.diff(bounds)):
            rows = self.members[self.starts[lst] : self.starts[lst + 1]]
            if rows.size == 0:
                continue
            vecs = np.empty((rows.size, self.quantizer.d + 1), dtype=np.float32)
            vecs[:, :-1] = self.read(rows)
            vecs[:, -1] = np.einsum("ij,ij->i", vecs[:, :-1], vecs[:, :-1])
            yield rows, vecs, by_list[bounds[lst] : bounds[lst + 1]]

    def _search_wide(self, queries: np.ndarray, k: int, probe: np.ndarray, reach: np.ndarray, *,
                     ids: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The unordered search where ``k`` is most of each query's candidates: ``(distances, rows)``
        of shape (q, k) (``rows`` None unless ``ids``).

        A heap then takes nearly every candidate, at ``log k`` steps each. Here each query's
        candidates are laid side by side and the ``k`` smallest are picked by ``np.argpartition``,
        or ``np.partition`` without ``ids``: the same set as the heaps but at exact ties. Queries
        go in chunks of about :data:`WIDE_CHUNK` candidates, ordered by their nearest list so that
        a chunk reads few lists, in one buffer reused from chunk to chunk; within a chunk, rows
        sorted by candidate count are picked in blocks of :data:`WIDE_ROWS`, each only as wide as
        its widest row (padding the whole chunk to its widest row was a third more to fill and
        partition on a dense pool).
        """
        q = len(queries)
        dist = np.full((q, k), np.inf, dtype=np.float32)
        ind = np.full((q, k), _FAISS_EMPTY, dtype=np.int64) if ids else None
        order = np.argsort(probe[:, 0], kind="stable")
        buf = np.empty(0, dtype=np.float32)
        start = 0
        while start < q:
            stop = start + max(1, int(np.searchsorted(np.cumsum(reach[order[start:]]), WIDE_CHUNK, side="right")))
            qs = order[start:stop]
            qs = qs[np.argsort(reach[qs], kind="stable")]
            blocks = [(a, min(a + WIDE_ROWS, qs.size)) for a in range(0, qs.size, WIDE_ROWS)]
            cols = [max(int(reach[qs[b - 1]]), k) for _, b in blocks]  # each block's widest row
            if buf.size < qs.size * cols[-1]:
                buf = np.empty(qs.size * cols[-1], dtype=np.float32)
            d = buf[: qs.size * cols[-1]].reshape(qs.size, cols[-1])
            for (a, b), w in zip(blocks, cols):
                d[a:b, :w] = np.inf
            found = self._lay_out(queries, qs, probe, d, ids)
            for (a, b), w in zip(blocks, cols):
                part, who = d[a:b, :w], qs[a:b]
                if ids and w > k:
                    at = np.argpartition(part, k - 1, axis=1)[:, :k]
                    dist[who], ind[who] = np.take_along_axis(part, at, 1), np.take_along_axis(found[a:b], at, 1)
                    continue
                if w > k:
                    part.partition(k - 1, axis=1)
                dist[who] = part[:, :k]
                if ids:
                    ind[who] = found[a:b, :k]
            start = stop
        dist += np.einsum("ij,ij->i", queries, queries)[:, None]  # (padding stays inf)
        return dist, ind

    def _lay_out(self, queries: np.ndarray, qs: np.ndarray, probe: np.ndarray, d: np.ndarray, ids: bool) -> np.ndarray | None:
        """Write the candidates of queries ``qs`` into the rows of ``d`` (one row per query, its
        probed lists side by side; padding as ``d`` holds it): ``|x|^2 - 2 q.x`` per candidate,
        and return their row numbers laid out the same way (``-1`` padding) if ``ids``."""
        nprobe, width = probe.shape[1], d.shape[1]
        sizes = np.diff(self.starts)[probe[qs]]
        offset = np.cumsum(sizes, axis=1) - sizes  # where each probed list's candidates start
        found = np.full(d.shape, _FAISS_EMPTY, dtype=np.int64) if ids else None
        for rows, vecs, slot in self._probed_lists(probe[qs]):
            who = slot // nprobe
            # A query's candidates from one list fill one run of its row: as windows of the flat
            # buffer, one index per (query, list) copies each run whole (an index per candidate
            # was 8 bytes read and a scattered write per 4-byte value).
            at = who * width + offset[who, slot % nprobe]
            sliding_window_view(d.ravel(), rows.size, writeable=True)[at] = _augmented(queries[qs[who]]) @ vecs.T
            if ids:
                sliding_window_view(found.ravel(), rows.size, writeable=True)[at] = rows
        return found
