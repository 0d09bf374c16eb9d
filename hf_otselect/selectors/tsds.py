"""TSDS: task-specific data selection by OT alignment plus a KDE diversity term.

Liu, Karbasi & Rekatsinas, "TSDS: Data Selection for Task-Specific Model Finetuning", NeurIPS 2024.

The problem (Section 3 of the paper), over a plan ``gamma`` of shape (M queries, N candidates)::

    min_{gamma >= 0, sum_j gamma_ij = 1/M}   (alpha / C) * sum_ij gamma_ij d_ij  +  (1 - alpha) * G(gamma)
    G_KDE(gamma) = M * max_ij rho_j * gamma_ij

with ``d_ij = ||y_i - x_j||`` (plain, not squared, L2) and ``rho_j`` the Epanechnikov kernel density
of candidate ``j`` over its ``I = kde_K`` nearest candidates (itself included, so ``rho_j >= 1``)::

    rho_j = sum_{x' in NN_I(x_j)} max(0, 1 - ||x_j - x'||^2 / h^2),    h = sigma.

``rho = 1`` everywhere (``sigma = 0`` or ``kernel="uniform"``) gives the KNN-Uniform regulariser.
The selection probabilities are ``p_j = sum_i gamma_ij``. The normalisation ``M * max`` is the one
under which the published solver's stopping rule ``alpha/C * cost >= (1 - alpha) * M`` is the
optimality condition; it reproduces the paper's toy example (see ``tests/test_tsds.py``).

Closed form (Theorems 3.1 / 3.2, derived here in our own words). Write ``w_ik = 1 / rho`` of query
``i``'s ``k``-th nearest candidate and ``W_ik = w_i1 + ... + w_ik``. For a level ``t`` every query
fills its neighbours in distance order with ``t * w_ik`` each until its budget ``1/M`` runs out::

    gamma_ik(t) = min(t * w_ik, max(0, 1/M - t * W_i,k-1)).                       (A)

The objective is convex and piecewise linear in ``t``; neighbour ``k`` of query ``i`` is full exactly
when ``t <= b_ik = 1 / (M W_ik)``, and going down past ``b_ik`` changes the slope by
``-(alpha/C) * Delta_ik`` with ``Delta_ik = W_ik (d_i,k+1 - d_ik) >= 0``. Starting from the slope
``(1 - alpha) M`` at large ``t``, the optimum ``t*`` is the first breakpoint (in decreasing ``t``)
where ``(alpha/C) * sum Delta >= (1 - alpha) M``. So each query spreads ``1/M`` over an adaptive
neighbourhood with mass proportional to ``1/rho`` (KNN-KDE, Thm 3.2) or uniformly (KNN-Uniform,
Thm 3.1). Restricting to ``L`` neighbours adds the constraint that the ``L``-th neighbour is the
last (``Delta_iL = +inf``): the sweep then stops at the first query to use up its list, whatever
``alpha``. So the lists grow (128, 256, ... up to ``max_K``) until no query's optimum reaches the
end of its list; only then is the result the optimum over the whole pool, and a warning with the
figures says when ``max_K`` was reached first. When several ``t`` are optimal (a flat piece), the
largest (the most concentrated plan) is returned.

Scale. The solution depends on ``alpha`` and ``C`` only through ``(1 - alpha) C / alpha``: a fixed
``C`` fixes each query's neighbourhood by the distance profile of the data alone, and on small
pools of unit-norm sentence embeddings the paper's ``C = 5`` spreads every query over a hundred
rows or more. By default (``C=None``) the scale is set from ``N``, the budget ``k`` and ``M`` so
that ``alpha = 0.5`` spreads each query over ``max(2, k / M)`` neighbours on average
(:func:`auto_scale`; reasoning in :class:`TSDSSelector`).

Differences from the published code, on purpose: a query whose nearest neighbour alone takes its
whole budget gets ``1/M`` on that neighbour (the published loop fails there); every sum is float64;
``max_K``/``kde_K`` larger than the pool are clipped to the pool size (the published code caps
them at ``N // 10``); pools of any size ``>= 1`` work; a query that uses up its list
widens it rather than piling its remaining mass on its last neighbour while the others go on;
densities are taken over the whole pool (the paper's definition), not only over the prefetched
neighbours, and only for the rows the solution can reach, each over at most ``kde_K`` neighbours
(see :meth:`TSDSSelector._densities`); ``C`` defaults to the scale above.

Sharded fit: every process searches its own rows, and the lists, the densities' neighbour lists
and the level are merged or computed identically on every process (:meth:`TSDSSelector.fit`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .. import knn
from .._checks import MAGNITUDE_RANGE, check_choice, check_embeddings, check_float, check_int, check_magnitude, check_seed, param_error
from ..dist import LOCAL, Comm, PoolView
from .base import Selector, choose, choose_keys, register

logger = logging.getLogger(__name__)

_TIE_RTOL = 1e-6  # relative slack on the optimality test: float32 inputs make exact ties fuzzy
_FIRST_WIDTH = 128  # neighbours per query in the first round; the lists double from there
_FLAT_DENSITY_PAIRS = 2e8  # "auto": exact density search while rows x shard stays under this
_KDE_FIRST = 32  # neighbours per density query in the first (usually final) pass
_MIN_SUPPORT = 2.0  # C=None: the smallest mean neighbourhood aimed at (see TSDSSelector's C)
_DENSITY_ELEMENTS = 2**23  # density rows x neighbour slots searched at once (~200 MiB of lists at the peak)
_EXACT_ELEMENTS = 2**20  # pool values per chunk of the exact float64 re-ranking
_TABLE_ROWS = 2**23  # pools up to this many rows keep the densities in a table by row number (64 MiB)
_F32_DENSITY_ERROR = 1e-5  # IVF densities take float32 distances while their rounding is below this x h^2


def knn_kde_allocation(
    dist: np.ndarray,
    inv_density: np.ndarray,
    *,
    alpha: float,
    C: float,
    valid: np.ndarray | None = None,
    truncated: np.ndarray | None = None,
) -> tuple[np.ndarray, float, bool]:
    """Exact KNN-KDE / KNN-Uniform transport plan over each query's sorted neighbours.

    Implements the water-filling closed form (A) in the module docstring (TSDS Thm 3.1 / 3.2).

    Parameters
    ----------
    dist : ndarray of shape (M, L)
        Plain L2 distances of each query's neighbours, non-decreasing along each row.
    inv_density : ndarray of shape (M, L)
        ``1 / rho`` of each neighbour, in ``(0, 1]``; all ones gives KNN-Uniform.
    alpha, C : float
        Trade-off in ``[0, 1]`` and cost scale ``> 0`` of the objective.
    valid : ndarray of shape (M, L), bool, optional
        False for padding slots (they must come after the valid ones in a row). Default all True.
    truncated : ndarray of shape (M,), bool, optional
        True where a row's list was cut short by the caller (more neighbours exist). If the
        optimum is decided by such a row's last slot the plan is not final: the third return value
        is then True and the caller should retry with longer lists.

    Returns
    -------
    gamma : ndarray of shape (M, L), float64
        The plan; each row sums to ``1/M``; zero on padding.
    level : float
        The optimal level ``t*``.
    needs_more : bool
        True when the answer may change with more neighbours (see ``truncated``).
    """
    d = np.asarray(dist, dtype=np.float64)
    w = np.asarray(inv_density, dtype=np.float64)
    m, width = d.shape
    valid = np.ones((m, width), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    truncated = np.zeros(m, dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool)
    count = valid.sum(axis=1)
    if (count == 0).any():
        raise param_error("valid", "knn_kde_allocation", "at least one neighbour per query", f"{int((count == 0).sum())} empty row(s)")
    w = np.where(valid, w, 0.0)
    d = np.where(valid, d, 0.0)
    cum_w = np.cumsum(w, axis=1)
    with np.errstate(divide="ignore"):
        breakpoint_t = np.where(valid, 1.0 / (m * cum_w), 0.0)
    slope_jump = np.zeros((m, width))
    slope_jump[:, :-1] = cum_w[:, :-1] * (d[:, 1:] - d[:, :-1])
    last = count - 1
    rows = np.arange(m)
    slope_jump[rows, last] = np.inf  # nobody spreads beyond its last neighbour
    slope_jump = np.where(valid, np.maximum(slope_jump, 0.0), 0.0)
    is_last = np.zeros((m, width), dtype=bool)
    is_last[rows, last] = True

    flat_b = breakpoint_t[valid]
    flat_jump = slope_jump[valid]
    flat_last = is_last[valid]
    flat_cut = (is_last & truncated[:, None])[valid]
    # Decreasing t; at equal t, real breakpoints before end-of-list markers.
    order = np.lexsort((flat_last, -flat_b))
    cum = np.cumsum(flat_jump[order])
    threshold = np.inf if alpha == 0 else (1.0 - alpha) * m * C / alpha
    stop = int(np.argmax(cum >= threshold * (1.0 - _TIE_RTOL)))  # exists: the markers are +inf
    level = float(flat_b[order][stop])
    needs_more = bool(flat_cut[order][stop])

    prev_w = cum_w - w
    gamma = np.minimum(level * w, np.maximum(0.0, 1.0 / m - level * prev_w))
    gamma = np.where(valid, gamma, 0.0)
    # Put the rounding remainder (about 1e-17) on each row's last filled slot so rows sum to 1/M.
    filled = np.maximum((gamma > 0).sum(axis=1) - 1, 0)
    gamma[rows, filled] += 1.0 / m - gamma.sum(axis=1)
    return gamma, level, needs_more


def auto_scale(dist: np.ndarray, inv_density: np.ndarray, valid: np.ndarray, support: float) -> float:
    """The ``C`` at which ``alpha = 0.5`` spreads each query over ``support`` neighbours on average.

    The solution depends on ``alpha`` and ``C`` only through ``lambda = (1 - alpha) C / alpha``
    (the stopping threshold is ``lambda * M``). At a level ``t`` query ``i`` spreads over
    ``1 + #{k : b_ik > t}`` neighbours (module docstring), so a mean of ``support`` means
    ``(support - 1) * M`` breakpoints above ``t``; the sweep stops there when ``lambda * M`` equals
    the slope accumulated over those breakpoints. That ``lambda`` is returned as ``C``
    (``alpha = 0.5`` makes them equal), so ``alpha`` keeps its meaning around it: above 0.5
    narrower neighbourhoods, below 0.5 wider ones.

    Parameters
    ----------
    dist, inv_density, valid : ndarray of shape (M, L)
        As for :func:`knn_kde_allocation`.
    support : float
        Wanted mean neighbourhood size, ``>= 1``.

    Returns
    -------
    float
        ``C > 0`` (the smallest positive float when every accumulated slope is 0, e.g. copies).
    """
    d = np.where(valid, np.asarray(dist, dtype=np.float64), 0.0)
    w = np.where(valid, np.asarray(inv_density, dtype=np.float64), 0.0)
    m = d.shape[0]
    cum_w = np.cumsum(w, axis=1)
    jump = np.zeros_like(d)
    jump[:, :-1] = cum_w[:, :-1] * np.maximum(d[:, 1:] - d[:, :-1], 0.0)
    real = valid.copy()
    real[np.arange(m), valid.sum(axis=1) - 1] = False  # a list's last slot opens nothing
    with np.errstate(divide="ignore"):
        b = np.where(real, 1.0 / (m * cum_w), 0.0)[real]
    order = np.argsort(-b, kind="stable")
    cum = np.cumsum(jump[real][order])
    # Stop at the first breakpoint strictly below the top (support - 1) * M (ties included: with
    # uniform densities every query's first breakpoint is the same 1/M): just past them, every
    # query whose breakpoints were passed has opened its next neighbour.
    want = int(round((support - 1.0) * m))
    if want <= 0 or cum.size == 0:
        return float(np.finfo(np.float64).tiny)
    b_sorted = b[order]
    past = int((b_sorted >= b_sorted[min(want, cum.size) - 1]).sum())
    # ... at the first one there whose slope step is positive (a zero step, between exact
    # copies, would let the sweep stop before it, inside the group just passed).
    rising = np.flatnonzero(cum[past:] > (cum[past - 1] if past else 0.0))
    lam = cum[past + rising[0]] / m if rising.size else cum[-1] / m
    return float(max(lam, np.finfo(np.float64).tiny))


def _exact_sq(queries: np.ndarray, qrow: np.ndarray, pool: PoolView, gidx: np.ndarray) -> np.ndarray:
    """float64 ``||queries[qrow] - pool[gidx]||^2`` per pair, reading pool rows in chunks of
    ``_EXACT_ELEMENTS`` values (20 bytes each at the peak: the float32 rows, their float64 copy
    and the queries' rows; 20 MiB).

    FAISS's float32 expansion ``|a|^2 + |b|^2 - 2ab`` loses the small distances that matter here
    (a copy is at distance 0, not 1e-4), hence the direct difference in float64.
    """
    out = np.empty(qrow.size, dtype=np.float64)
    chunk = max(1, min(16_384, _EXACT_ELEMENTS // queries.shape[1]))
    for s in range(0, qrow.size, chunk):
        diff = pool.read(gidx[s : s + chunk]).astype(np.float64)
        diff -= queries[qrow[s : s + chunk]]  # float64 arithmetic; no float64 copy of every query
        out[s : s + chunk] = np.einsum("ij,ij->i", diff, diff)
    return out


def _distinct_rows(vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)`` of the distinct rows of ``vecs`` (bit for bit), as ``np.unique`` over the
    rows' bytes gives them, without its two sorted copies of the rows.

    Each row's bits get a 64-bit multilinear hash (one random odd multiplier per column, mod 2^64),
    ``np.unique`` runs on the hashes, and every row is compared with its group's first row; on a
    collision (two different rows, one hash) the exact byte-wise ``np.unique`` decides instead.
    Groups come in the order of their first row (``first`` ascending), the same on every process
    for the same rows; rows that are all distinct give ``first == arange(n)``.
    """
    n = len(vecs)
    bits = np.ascontiguousarray(vecs).view(np.uint8).reshape(n, -1)
    if bits.shape[1] % 4 == 0:
        words = bits.view(np.uint32)
        mult = np.random.default_rng(0x75D5).integers(0, 2**63, size=words.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        key = np.empty(n, dtype=np.uint64)
        step = max(1, 2**20 // max(1, words.shape[1]))
        with np.errstate(over="ignore"):
            for s in range(0, n, step):
                key[s : s + step] = (words[s : s + step].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        if all(np.array_equal(words[s : s + step], words[first[inverse[s : s + step]]]) for s in range(0, n, step)):
            return _by_first_row(first, inverse)
    _, first, inverse = np.unique(bits.view(np.dtype((np.void, bits.shape[1]))).ravel(), return_index=True, return_inverse=True)
    return _by_first_row(first, inverse.ravel())


def _by_first_row(first: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber ``np.unique``'s groups (sorted by key) in the order of their first row."""
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse]


def _margin(k: int) -> int:
    """Extra neighbours each process fetches beyond ``k`` and drops after the exact float64 re-ranking,
    so that float32 near-ties at the cut decide nothing (the lists are then the same for any split)."""
    return max(16, k // 8)


def _row_order(key: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per row, the order of ``np.lexsort((idx, key))`` with padding (``idx < 0``) last among equals:
    by ``key``, ties to the lower ``idx``.

    A stable argsort by ``key`` first (the lists come nearly sorted, which it sorts in linear
    time, where lexsort takes ~40x longer), then lexsort only for the rows where it left a tie out
    of ``idx`` order.
    """
    idx = np.where(idx >= 0, idx, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    k, i = np.take_along_axis(key, order, 1), np.take_along_axis(idx, order, 1)
    tied = ((k[:, 1:] == k[:, :-1]) & (i[:, 1:] < i[:, :-1])).any(axis=1)
    if tied.any():
        order[tied] = np.lexsort((idx[tied], key[tied]), axis=1)
    return order


def _kernel_sums(sq: np.ndarray, n_kde: int, h2: float) -> np.ndarray:
    """Per row, the Epanechnikov kernel summed over the ``n_kde`` smallest of ``sq`` (picked by
    ``np.partition``, in no order): terms in the search's precision (float32: a term's rounding,
    ~6e-8, is below its distance's), computed in place, summed in float64."""
    if sq.shape[1] > n_kde:
        sq = np.partition(sq, n_kde - 1, axis=1)[:, :n_kde]
    kern = sq * sq.dtype.type(-1.0 / h2)
    kern += 1.0
    return np.maximum(kern, 0.0, out=kern).sum(axis=1, dtype=np.float64)


def _merge_lists(dist: np.ndarray, idx: np.ndarray, width: int, comm: Comm) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``width`` nearest over every process's list: by distance, ties to the lower index.

    ``dist`` float64 and ``idx`` int64 of shape (M, k) on every process (padding ``inf`` / ``-1``);
    the same (M, width) lists come back on every process.
    """
    if comm.world_size > 1:
        dist = np.concatenate(comm.all_gather(dist), axis=1)
        idx = np.concatenate(comm.all_gather(idx), axis=1)
    order = _row_order(dist, idx)[:, :width]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


class _RowValues:
    """A float per pool row (global row number) for the rows given one so far: the densities.

    Pools of at most ``_TABLE_ROWS`` rows keep a table over every row number, so a lookup is a
    gather (a round looks up M x L rows: a binary search each was a tenth of a dense pool's fit);
    larger pools keep the rows given a value, sorted, and search them (memory in the rows
    reached, not the pool). numpy has no hash map that would serve both.
    """

    def __init__(self, n: int) -> None:
        self.table = np.full(n, np.nan) if n <= _TABLE_ROWS else None
        self.keys, self.values = np.zeros(0, dtype=np.int64), np.zeros(0)
        self.size = 0

    def distinct(self, rows: np.ndarray) -> np.ndarray:
        """The distinct values of ``rows`` (row numbers), sorted."""
        if self.table is None:
            return np.unique(rows)
        seen = np.zeros(self.table.size, dtype=bool)
        seen[rows] = True
        return np.flatnonzero(seen)

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """Those of ``rows`` (distinct, sorted) that have no value yet."""
        if self.table is None:
            return np.setdiff1d(rows, self.keys, assume_unique=True)
        return rows[np.isnan(self.table[rows])]

    def add(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Give ``rows`` (distinct, none given a value before) their ``values``."""
        self.size += rows.size
        if self.table is not None:
            self.table[rows] = values
            return
        keys, values = np.concatenate([self.keys, rows]), np.concatenate([self.values, values])
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], values[order]

    def get(self, rows: np.ndarray) -> np.ndarray:
        """The values of ``rows`` (each given one), float64 of the same shape."""
        if self.table is not None:
            return self.table[rows]
        return self.values[np.searchsorted(self.keys, rows)]


@dataclass(frozen=True)
class TSDSState:
    """What :meth:`TSDSSelector.fit` returns: every row's probability follows from it.

    Attributes
    ----------
    neighbours : ndarray of shape (M, L), int64
        Each query's ``L`` nearest pool rows (global indices), nearest first (ties: lower index);
        ``-1`` pads a list an approximate index could not fill.
    distances : ndarray of shape (M, L), float64
        Their plain L2 distances (float64, ``inf`` on padding).
    rows : ndarray of shape (R,), int64
        The reached rows (every row in some list), sorted.
    probs : ndarray of shape (R,), float64
        ``p`` of the reached rows; every other row has ``p = 0``. Sums to 1.
    density : ndarray of shape (R,), float64
        ``rho`` of the reached rows (all ones for KNN-Uniform).
    level : float
        The optimal water level ``t*``.
    """

    neighbours: np.ndarray
    distances: np.ndarray
    rows: np.ndarray
    probs: np.ndarray
    density: np.ndarray
    level: float


class _Shard:
    """This process's rows and how to search them, without a second copy of the rows.

    ``"flat"`` searches the rows block by block (:func:`hf_otselect.knn.knn_blocks`: FAISS's brute
    force per block, the blocks' lists merged in its heaps); ``"ivf"`` is a
    :class:`hf_otselect.knn.RowIVF` (row numbers per list, the rows read when a list is scanned),
    built on first use and shared by the prefetch and the densities; only ``"hnsw"`` holds a FAISS
    copy of the rows.
    """

    def __init__(self, pool: PoolView, kind: str, seed: int) -> None:
        self.pool = pool
        self.kind = kind
        self.seed = seed
        self.max_sq_norm = 0.0  # of the rows read so far; every search or build reads them all
        self.empty = pool.n_local == 0
        self._hnsw = self._faiss_hnsw() if kind == "hnsw" and not self.empty else None
        self._ivf = None
        if kind == "ivf" and not self.empty:
            self.ivf()
        self._ahead: tuple[np.ndarray, str, knn.KnnResult] | None = None  # a wider search kept for the next round
        self.dense_kde = False  # whether most rows of the last density round needed their full kde_K list
        self.density_ivf = False  # set by a density round that searched by IVF
        # The last remembered list's global rows and exact distances, in the search's order: a
        # wider list from the same search starts with the narrower one, so its pairs are found
        # again in place instead of recomputed.
        self._remembered: tuple[np.ndarray, np.ndarray] | None = None

    def _blocks(self) -> Any:
        for _, rows in self.pool.blocks(knn.block_rows(self.pool.dim)):
            self.max_sq_norm = max(self.max_sq_norm, float(np.einsum("ij,ij->i", rows, rows).max()))
            yield rows

    def _read(self, local_rows: np.ndarray) -> np.ndarray:
        # Ascending local rows (the IVF lists and its training sample are): one gather, no reorder.
        return np.asarray(self.pool.data[local_rows], dtype=np.float32)

    def _faiss_hnsw(self) -> Any:
        return knn.index_from_blocks(self._blocks(), self.pool.n_local, self.pool.dim, read=self._read, index="hnsw", seed=self.seed)

    def ivf(self) -> knn.RowIVF:
        """The IVF index over the shard (row numbers only), built on first use."""
        if self._ivf is None:
            self._ivf = knn.RowIVF(self._blocks(), self.pool.n_local, self.pool.dim, read=self._read, seed=self.seed)
        return self._ivf

    def _search(self, queries: np.ndarray, k: int, kind: str, nprobe: int | None, ahead: int, ordered: bool = True) -> knn.KnnResult:
        """The ``k`` nearest shard rows (local numbers) by ``kind``.

        Asked to look ``ahead`` (> k), it searches that many in the same pass and keeps them; a
        later call with the same queries, the same kind and at most that many neighbours is
        answered from them. A longer list's first ``k`` are the ``k``-list of the same search:
        exact (ties to the lower row) for flat; for IVF the same probed lists, which the longer
        list's default ``nprobe`` can only widen. ``ordered=False`` (no look-ahead) may leave an
        IVF list unsorted.
        """
        kept = self._ahead
        if kept is not None and kept[0] is queries and kept[1] == kind and kept[2].indices.shape[1] >= k:
            found = kept[2]
        else:
            width = max(k, ahead)
            if kind == "flat":
                found = knn.knn_blocks(queries, self._blocks(), width)
            elif kind == "ivf":
                index = self.ivf()
                probe = knn.default_nprobe(index.nlist, width, index.ntotal) if nprobe is None else nprobe
                found = index.search(queries, width, probe, ordered=ordered or ahead > k)
            else:
                found = knn.search_index(self._hnsw, queries, width, index="hnsw", nprobe=nprobe)
            if ahead > k:  # (a density search in between keeps the prefetch's look-ahead)
                self._ahead = (queries, kind, found)
        return knn.KnnResult(found.distances[:, :k], found.indices[:, :k], found.metric, found.index)

    def nearest(self, queries: np.ndarray, k: int, *, kind: str, nprobe: int | None, remember: bool = False, ahead: int = 0,
                beyond: np.ndarray | None = None, ordered: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each query's ``k`` nearest shard rows by the ``kind`` search (the prefetch one, or IVF),
        re-ranked on exact float64 squared distances.

        Returns ``(sq, gidx, faiss_sq)`` of shape (q, k): float64 squared distances sorted
        ascending (ties: lower global index), global indices, and the search's float32 values in
        the same order; ``inf`` / ``-1`` pad where the shard has fewer rows or an IVF probe found fewer.
        ``remember``: keep this list's exact distances; the next remembering call with the same
        queries takes them for the pairs it finds in the same place (the first ``k`` of a wider
        list from the same search) instead of recomputing them.
        ``ahead``: the ``k`` the next call with these queries will likely ask for (see :meth:`_search`).
        ``beyond``: shape (q,); a pair whose search value is at least this gets ``inf`` instead of
        its exact distance (for a caller that drops every pair beyond a radius anyway).
        ``ordered=False``: the three arrays in the search's order, not re-sorted on the exact
        distances (for a caller that needs only each row's values).
        """
        q = len(queries)
        sq = np.full((q, k), np.inf)
        gidx = np.full((q, k), -1, dtype=np.int64)
        approx = np.full((q, k), np.inf)
        if self.empty or q == 0:
            return sq, gidx, approx
        kk = min(k, self.pool.n_local)
        found = self._search(queries, kk, kind, nprobe, min(ahead, self.pool.n_local), ordered=ordered)
        valid = found.valid
        gidx[:, :kk] = np.where(valid, found.indices + self.pool.offset, -1)
        if remember and self._remembered is not None and self._remembered[0].shape[0] == q:
            old_g, old_sq = self._remembered
            j = min(old_g.shape[1], kk)
            again = np.zeros(valid.shape, dtype=bool)
            again[:, :j] = (old_g[:, :j] == gidx[:, :j]) & valid[:, :j]
            sq[:, :j][again[:, :j]] = old_sq[:, :j][again[:, :j]]
            valid = valid & ~again
        rows, cols = np.nonzero(valid)
        if beyond is not None:
            near = found.distances[rows, cols] < beyond[rows]
            rows, cols = rows[near], cols[near]
        sq[rows, cols] = _exact_sq(queries, rows, self.pool, gidx[rows, cols])
        if remember:
            self._remembered = (gidx[:, :kk], sq[:, :kk])
        approx[:, :kk] = np.where(found.valid, found.distances, np.inf)
        return (sq, gidx, approx) if not ordered else self._ordered(sq, gidx, approx)

    def smallest(self, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        """Each query's ``k`` smallest squared distances to the shard's rows by the IVF search: its
        float32 values (clamped at 0), in no order, ``inf`` padding; no row read twice, no row numbers."""
        if self.empty or len(queries) == 0:
            return np.full((len(queries), k), np.inf, dtype=np.float32)
        kk = min(k, self.pool.n_local)
        found = self.ivf().smallest(queries, kk, nprobe)
        np.maximum(found, 0.0, out=found)
        return found if kk == k else np.pad(found, ((0, 0), (0, k - kk)), constant_values=np.inf)

    @staticmethod
    def _ordered(sq: np.ndarray, gidx: np.ndarray, approx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's three arrays sorted by ``sq``, ties to the lower global index."""
        order = _row_order(sq, gidx)
        return np.take_along_axis(sq, order, 1), np.take_along_axis(gidx, order, 1), np.take_along_axis(approx, order, 1)


@register("tsds")
class TSDSSelector(Selector):
    """TSDS selector: probabilities from the KNN-KDE (or KNN-Uniform) closed form.

    Parameters
    ----------
    alpha : float, default 0.5
        Weight of alignment versus diversity, in ``[0, 1]`` (paper: 0.075 instruction tuning,
        0.6 continued pre-training). 1 sends each query's mass to its nearest candidate; lower
        values spread it wider. 0 drops alignment altogether: the level falls until the first
        query's list is used up, so a query spreads over all ``max_K`` neighbours only when its
        densities are as low as those of the first one to run out (with uniform densities every
        query does; with varied densities most stop earlier); lists then grow to ``max_K`` and
        the cap warning fires.
    C : float or None, default None
        Distance scale ``> 0``. ``None`` sets it from the data, ``N``, ``k`` and ``M``: the scale at
        which ``alpha = 0.5`` spreads each query over ``s = max(2, k / M)`` neighbours on
        average (:func:`auto_scale`; ``k`` is ``budget``). The reasoning: the selection draws ``k``
        rows, about ``k / M`` per query, so a query's neighbourhood much wider than its share of
        draws dilutes the alignment (each draw lands far from its query), and one narrower than
        two rows gives up the diversity the method is for. A fixed ``C`` (the paper and its
        published code use 5 on their embeddings) instead fixes the neighbourhood by the
        distance profile alone, which on a small pool of unit-norm sentence embeddings spreads
        each query over ~100-170 rows, little closer to the target than random
        (``benchmarks/results/tsds_small_pool.md``).
    sigma : float, default 0.75
        Kernel bandwidth ``h >= 0`` of the Epanechnikov density; 0 means KNN-Uniform.
    max_K : int, default 5000
        ``L``, the most neighbours a query may spread over (the cap of the growing lists);
        clipped to the pool size (silently: every row is then a neighbour). Lists start at 128 and double only while
        some query's optimum reaches the end of its list; if that still holds at ``max_K``, the
        result is the optimum restricted to ``max_K`` neighbours and a warning gives the figures.
        5000 is the paper's value; with ``C=None`` the lists stay near ``2 s``, far below it.
    budget : int, optional
        ``k``, the rows the selection will draw; used only by ``C=None``. :meth:`select` passes
        its ``k``; a bare :meth:`fit` without it assumes 1% of the pool (at least 1).
    kde_K : int, default 1000
        ``I``, most neighbours counted in a density; clipped to the pool size (silently).
    kernel : {"kde", "uniform"}, default "kde"
        ``"uniform"`` ignores ``sigma`` (KNN-Uniform, Thm 3.1).
    replace : bool or None, default None
        How the ``k`` rows are drawn from ``p``. None: ``k`` distinct rows, drawn in proportion to
        ``p`` without replacement (Gumbel-top-k: the paper's draws with repeats skipped), when
        ``p`` reaches at least ``k`` rows; when it reaches fewer, the paper's ``k`` draws with
        replacement, with a warning giving the distinct count (a row drawn twice then appears
        twice, told apart by ``draw_order``). True: always the paper's rule (multinomial, any
        ``k``). False: always without replacement (an error when ``p`` reaches fewer than ``k``
        rows). A user asking for ``k`` rows expects ``k`` different rows, and the default gives
        them whenever the distribution allows; the paper's multiset stays one keyword away.
    index : {"auto", "flat", "ivf", "hnsw"}, default "auto"
        Search over each process's rows (see :func:`hf_otselect.knn.knn_search`; ``"auto"``
        is flat up to ``knn.FLAT_MAX_BASE`` rows per process, IVF above). Densities are searched
        exactly (flat) under ``"flat"``, and under ``"auto"`` while one density pass costs at most
        ``_FLAT_DENSITY_PAIRS`` distance evaluations; otherwise over an IVF index (the
        prefetch's when it is IVF). Flat and IVF keep no copy of the rows; HNSW does (FAISS's).
    nprobe : int, optional
        IVF lists visited per prefetch query (default :func:`hf_otselect.knn.default_nprobe`).
    density_nprobe : int, default 4
        IVF lists visited per density query. The kernel only reaches ``h``, so a candidate's
        kernel neighbours sit in its own or an adjacent list; the benchmark reports the density
        error this leaves.
    seed : int, default 0
        Seeds the IVF training; :meth:`select` takes its own sampling seed.

    Notes
    -----
    ``score`` returns ``p`` (non-negative, sums to 1) and records in ``diagnostics_`` the level
    ``t*``, the mean neighbourhood size, the list width used and timings.
    """

    choice = "sample"

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        C: float | None = None,
        sigma: float = 0.75,
        max_K: int = 5000,
        kde_K: int = 1000,
        budget: int | None = None,
        kernel: Literal["kde", "uniform"] = "kde",
        replace: bool | None = None,
        index: Literal["auto", "flat", "ivf", "hnsw"] = "auto",
        nprobe: int | None = None,
        density_nprobe: int = 4,
        seed: int = 0,
    ) -> None:
        self.alpha = alpha
        self.C = C
        self.sigma = sigma
        self.max_K = max_K
        self.kde_K = kde_K
        self.budget = budget
        self.kernel = kernel
        self.replace = replace
        self.index = index
        self.nprobe = nprobe
        self.density_nprobe = density_nprobe
        self.seed = seed
        self._check_params()
        self.diagnostics_ = {}

    def _check_params(self) -> None:
        owner = "TSDSSelector"
        check_float(self.alpha, "alpha", owner, 0.0, 1.0)
        if self.C is not None:
            check_float(self.C, "C", owner, 0.0, low_open=True)
        if self.budget is not None:
            check_int(self.budget, "budget", owner, 1)
        check_float(self.sigma, "sigma", owner, 0.0)
        if self.sigma != 0:  # the density search squares it in float32 (a radius of 1e-300 is 0, 1e300 overflows)
            check_float(self.sigma, "sigma", f"{owner} (0 turns the density term off)", *MAGNITUDE_RANGE)
        check_int(self.max_K, "max_K", owner, 1)
        check_int(self.kde_K, "kde_K", owner, 1)
        check_choice(self.kernel, "kernel", owner, ["kde", "uniform"])
        if self.replace is not None and not isinstance(self.replace, bool):
            raise param_error("replace", owner, "None (k distinct rows when p reaches k rows) or a bool", self.replace, exc=TypeError)
        check_choice(self.index, "index", owner, ["auto", "flat", "ivf", "hnsw"])
        if self.nprobe is not None:
            check_int(self.nprobe, "nprobe", owner, 1)
        check_int(self.density_nprobe, "density_nprobe", owner, 1)
        check_seed(self.seed, "seed", owner)

    def fit(self, pool: PoolView, target: Any, *, comm: Comm | None = None) -> TSDSState:
        """Neighbour lists, densities and water level over a (possibly sharded) pool.

        Parameters
        ----------
        pool : PoolView
            This process's rows; searched block by block (flat) or list by list (IVF of row
            numbers), and read by row for exact distances; never copied whole.
        target : ndarray of shape (M, dim)
            The queries, the same on every process.
        comm : Comm, optional
            The process group (default: this process alone). Every process gets the same state.

        Returns
        -------
        TSDSState

        Notes
        -----
        Each round searches every query's ``L`` nearest rows (``L`` starts at 128): each process
        searches its shard, re-ranks its ``L + margin`` best on exact float64 distances, and the
        lists merge by distance, ties to the lower global index (one all-gather of O(M x L)).
        The densities of newly reached rows follow (:meth:`_densities`, at most ``kde_K``
        neighbours per row), then the closed form. ``L`` doubles (up to ``max_K``) only while
        the optimum is decided by some query reaching the end of its list: more neighbours
        cannot change an optimum that did not touch those ends (every further breakpoint lies
        below ``t*``), so the result is the optimum over ``max_K`` neighbours.

        Memory per process: the shard itself (its pages, when memory-mapped) and no copy of it
        (except under ``index="hnsw"``): the flat search reads it block by block
        (:func:`hf_otselect.knn.knn_blocks`), the IVF index keeps one int64 row number per row
        (:class:`hf_otselect.knn.RowIVF`). On top, a fixed overhead: one block of rows
        (``knn.BLOCK_BYTES``, 24 MiB of float32 rows) with FAISS's distance tile
        (16 MiB), or one IVF list's rows with at most ``knn.BLOCK_ELEMENTS`` distances (16 MiB),
        or one exact re-ranking chunk (20 MiB). And what grows with M, not N: the merged lists
        (``M x L``, plus what each process contributes to one all-gather), the reached rows'
        vectors (``R x dim``, ``R <= M x L``) and one float64 density per reached row (for pools
        of at most ``_TABLE_ROWS`` = 2^23 rows, a table by row number instead: N x 9 bytes, 72 MiB
        at most). The density searches go in chunks of at most ``_DENSITY_ELEMENTS`` (2^23)
        neighbour slots, 24 bytes each (~200 MiB), plus an IVF search's own buffers (up to
        ``knn.WIDE_CHUNK`` = 2^24 candidates, 20 bytes each with the pick), whatever R and however
        dense the pool.
        Communication: O(M x L) per round for the lists, O(R x dim) for the reached vectors and
        O(R x kde_K) at most for the density lists (only distances within ``h``). With a flat
        index the state, hence every probability and every row chosen, is the same for any number
        of processes and any split (tested to 1e-12 under ``torchrun``); with IVF each process
        trains its own index, so the approximation depends on the split.
        """
        comm = comm or LOCAL
        self._check_params()
        owner = f"{type(self).__name__}.fit"
        target = check_embeddings(target, "target", owner, dim=pool.dim)
        check_magnitude(target, "target", owner)  # FAISS's float32 squared distances must stay finite
        n, m = int(pool.n_global), target.shape[0]
        cap = self._clipped("max_K", self.max_K, n)
        use_kde = self.kernel == "kde" and self.sigma > 0
        n_kde = self._clipped("kde_K", self.kde_K, n) if use_kde else 0
        timings = {"prefetch_s": 0.0, "density_s": 0.0, "solve_s": 0.0}
        budget = self.budget or getattr(self, "_select_k", None) or max(1, -(-n // 100))
        aim = max(_MIN_SUPPORT, budget / m)  # C=None: the mean neighbourhood aimed at

        t0 = time.perf_counter()
        kind = ("flat" if pool.n_local <= knn.FLAT_MAX_BASE else "ivf") if self.index == "auto" else self.index
        shard = _Shard(pool, kind, self.seed)
        timings["index_s"] = time.perf_counter() - t0

        known = _RowValues(n)  # the densities computed so far
        width = min(cap, _FIRST_WIDTH)
        while True:
            t0 = time.perf_counter()
            k_local = min(width + _margin(width), n)
            # A search fetches the lists of the next two rounds in the same pass: a pass reads the
            # whole shard, a longer list only costs heap slots (M x 4 L); up to max_K when that is
            # at most 5 L (the rounds to max_K in one pass for a quarter more slots).
            wider = cap if cap <= 5 * width else 4 * width
            ahead = min(wider + _margin(wider), n) if wider > width else 0
            sq, gidx, _ = shard.nearest(target, k_local, kind=kind, nprobe=self.nprobe, remember=True, ahead=ahead)
            dist, nbr = _merge_lists(np.sqrt(sq), gidx, width, comm)
            valid = nbr >= 0
            timings["prefetch_s"] += time.perf_counter() - t0

            reached = known.distinct(nbr[valid])
            t0 = time.perf_counter()
            if use_kde:
                if not known.size:  # first round: a pool as dense near the queries skips the short pass
                    shard.dense_kde = bool(np.median((dist < self.sigma).sum(axis=1)) >= _KDE_FIRST)
                new = known.missing(reached)
                if new.size:
                    known.add(new, self._densities(shard, new, n_kde, comm))
                rho_nbr = np.where(valid, known.get(np.maximum(nbr, 0)), 1.0)
            else:
                rho_nbr = np.ones(nbr.shape)
            timings["density_s"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            truncated = (valid.sum(axis=1) == width) & (width < n)
            scale = auto_scale(dist, 1.0 / rho_nbr, valid, aim) if self.C is None else float(self.C)
            gamma, level, needs_more = knn_kde_allocation(dist, 1.0 / rho_nbr, alpha=float(self.alpha), C=scale, valid=valid, truncated=truncated)
            timings["solve_s"] += time.perf_counter() - t0
            if not needs_more or width >= cap:
                break
            width = min(cap, 2 * width)
        at_end = int((truncated & (gamma[:, -1] > 0)).sum()) if needs_more else 0
        if needs_more:
            logger.warning(
                "TSDSSelector: the optimum still reaches the end of %d of %d queries' lists at max_K=%d "
                "(level %.3g, mean neighbourhood %.1f of %d); the result is the optimum over the %d nearest "
                "neighbours only. Raise max_K, or alpha, or lower C.",
                at_end, m, cap, level, float((gamma > 0).sum(axis=1).mean()), width, cap,
            )

        pos = np.searchsorted(reached, np.maximum(nbr, 0))
        p = np.bincount(pos[valid], weights=gamma[valid], minlength=reached.size)
        p = np.maximum(p, 0.0)
        p /= p.sum()  # 1 up to ~1e-16; makes sum(p) == 1 to the last bit choose() cares about
        density = known.get(reached) if use_kde else np.ones(reached.size)
        support = (gamma > 0).sum(axis=1)
        self.diagnostics_ = {
            "level": level,
            "mean_neighbourhood": float(support.mean()),
            "max_neighbourhood": int(support.max()),
            "width": int(width),
            "max_K": int(cap),
            "C": scale,
            "target_neighbourhood": float(aim) if self.C is None else None,
            "capped": bool(needs_more),
            "n_at_end": at_end,
            "n_densities": int(known.size),
            "kde_K": int(n_kde),
            "index": kind,
            "n_selected_support": int((p > 0).sum()),
            **timings,
        }
        logger.info(
            "TSDS: t*=%.3g, mean neighbourhood %.1f, width %d, %d densities, prefetch %.2fs, densities %.2fs",
            level, support.mean(), width, known.size, timings["prefetch_s"], timings["density_s"],
        )
        return TSDSState(neighbours=nbr, distances=dist, rows=reached, probs=p, density=density, level=level)

    def select(self, candidates: Any, target: Any, k: int, *, seed: int = 0) -> Any:
        """As :meth:`Selector.select`; ``k`` also sizes ``C=None``'s neighbourhoods unless ``budget`` is set."""
        self._select_k = k
        try:
            return super().select(candidates, target, k, seed=seed)
        finally:
            del self._select_k

    def choose_rows(self, scores: np.ndarray, k: int, *, seed: int = 0, index: np.ndarray | None = None, comm: Comm | None = None) -> np.ndarray:
        """``k`` rows drawn from ``p`` (see ``replace``): distinct by default when ``p`` reaches ``k`` rows.

        Parameters
        ----------
        scores : ndarray of shape (n,)
            This process's ``p``.
        k : int
            Rows to draw over all processes.
        seed : int
            Sampling seed (keys from ``(seed, global row index)``).
        index : ndarray of shape (n,), int, optional
            Global row indices of ``scores``.
        comm : Comm, optional
            The processes sharing the pool.

        Returns
        -------
        ndarray of shape (k,), int64
            Global rows in draw order, the same on every process.
        """
        if self.replace is not None:
            return choose(scores, k, mode="sample", seed=seed, replace=self.replace, index=index, comm=comm)
        comm = comm or LOCAL
        support = _support(scores, comm)
        if support >= k:
            return choose(scores, k, mode="sample", seed=seed, replace=False, index=index, comm=comm)
        rows = choose(scores, k, mode="sample", seed=seed, replace=True, index=index, comm=comm)
        logger.warning(
            "TSDS: p reaches only %d rows, fewer than k=%d, so the %d rows were drawn with replacement as the paper "
            "does: %d distinct (a row drawn again appears again; draw_order tells the draws apart). Lower alpha or "
            "raise C to spread p wider, or pass replace=True to always draw as the paper does.",
            support, k, k, np.unique(rows).size,
        )
        return rows

    def choice_keys(self, scores: np.ndarray, k: int, *, seed: int = 0, index: np.ndarray | None = None, comm: Comm | None = None) -> np.ndarray | None:
        """The Gumbel keys of drawing ``k`` distinct rows, or None when :meth:`choose_rows` draws with replacement."""
        replace = self.replace if self.replace is not None else _support(scores, comm or LOCAL) < k
        return choose_keys(scores, k, mode="sample", seed=seed, replace=replace, index=index, comm=comm)

    def score_batch(self, state: TSDSState, rows: Any, index: np.ndarray) -> np.ndarray:
        """``p`` of these rows, looked up by global index (0 for rows no query reached)."""
        index = np.asarray(index, dtype=np.int64)
        pos = np.minimum(np.searchsorted(state.rows, index), max(state.rows.size - 1, 0))
        hit = state.rows.size > 0
        return np.where(hit & (state.rows[pos] == index), state.probs[pos], 0.0) if hit else np.zeros(index.size)

    def _clipped(self, name: str, value: int, n: int) -> int:
        # A cap above the pool is no error: every row is a neighbour then. The defaults (5000 and
        # 1000, the paper's) exceed any small pool, so this is not worth a warning on every call.
        if value > n:
            logger.debug("TSDSSelector: %s=%d exceeds the %d candidates; using %d.", name, value, n, n)
            return n
        return int(value)

    def _densities(self, shard: _Shard, rows: np.ndarray, n_kde: int, comm: Comm) -> np.ndarray:
        """Epanechnikov density ``rho`` of the pool rows ``rows`` (sorted global indices).

        ``rho_j`` sums ``max(0, 1 - ||x_j - x'||^2 / h^2)`` over the ``kde_K`` rows ``x'`` nearest
        to ``x_j`` in the whole pool (itself included): no search returns more than ``kde_K``
        (+ a small margin) neighbours per row, whatever the data.

        Every process gets the rows' vectors from their owners (one all-gather of R x dim),
        groups exact copies (they share one density, found once), and finds each distinct
        vector's nearest rows in its own shard: first ``_KDE_FIRST``; only vectors whose
        ``_KDE_FIRST``-th neighbour still lies within ``h`` search again for ``kde_K`` (the kernel
        is zero beyond ``h``, so a shorter list that ends beyond ``h`` holds every row that counts);
        after a round where most rows searched again (a dense pool), later rounds search ``kde_K``
        at once. Distances are exact float64 under a flat search; under IVF, whose probe is
        itself the approximation, they are the search's float32 values, so that no row is read a
        second time, while their rounding (about ``2 eps32 (|x|^2 + |y|^2)`` per pair) stays below
        ``_F32_DENSITY_ERROR h^2``, i.e. moves a density by at most 1e-5 per neighbour; with a
        ``sigma`` closer to the data's float32 resolution they are exact float64 again.
        The per-process lists of squared distances within ``h`` merge, and the ``kde_K`` smallest
        are summed in ascending order, so the result does not depend on the split.
        """
        pool = shard.pool
        lo, hi = np.searchsorted(rows, [pool.offset, pool.offset + pool.n_local])
        vecs = pool.read(rows[lo:hi])
        if comm.world_size > 1:  # (each copy dropped as soon as the next exists: R x dim twice at most)
            parts = comm.all_gather(vecs)
            del vecs
            vecs = np.concatenate(parts)
            del parts
        first, inverse = _distinct_rows(vecs)
        uniq = vecs if first.size == len(vecs) else vecs[first]  # all distinct: first is 0..n-1, no copy
        del vecs  # (R x dim: the distinct rows are all the search needs)
        h2 = float(self.sigma) ** 2
        # "auto": exact while the search is small; once a round has taken IVF the later ones keep it
        # (a flat search for a few hundred rows of a dense pool, each kde_K wide, costs more).
        flat = shard.kind == "flat" and (self.index == "flat" or (not shard.density_ivf and uniq.shape[0] * pool.n_local <= _FLAT_DENSITY_PAIRS))
        shard.density_ivf = not flat
        # Under IVF, float32 distances (off by ~eps32 (|x|^2 + |y|^2) per pair) while that is small
        # against h^2; at a sigma near the data's float32 resolution, exact ones (copies must count).
        big = float(np.einsum("ij,ij->i", uniq, uniq).max(initial=0.0)) + shard.max_sq_norm
        exact = flat or 2 * float(np.finfo(np.float32).eps) * big > _F32_DENSITY_ERROR * h2
        if comm.world_size > 1:  # (max_sq_norm is the shard's: decide together)
            exact = bool(comm.all_reduce(np.array([exact], dtype=np.int64), op="max")[0])
        kind = "flat" if flat else "ivf"
        # (the margin is for re-ranking on exact distances; the search's own values need none)
        full_k = min(n_kde + (_margin(n_kde) if exact else 0), pool.n_global)
        # Rows in chunks of at most _DENSITY_ELEMENTS neighbour slots (of the pass they take), so
        # that the lists of a dense pool, every row kde_K wide, never exist for all rows at once.
        # Every process has the same uniq and takes the same (all-reduced) decisions, hence the
        # same chunks, and meets the collectives inside in step.
        rho = np.empty(uniq.shape[0])
        start = 0
        while start < uniq.shape[0]:
            step = max(1, _DENSITY_ELEMENTS // (full_k if shard.dense_kde else min(_KDE_FIRST, full_k)))
            rho[start : start + step] = self._density_chunk(shard, uniq[start : start + step], n_kde, full_k, kind, exact, comm)
            start += step
        # The row itself is always within h; an approximate probe that misses it still counts it.
        return np.maximum(rho, 1.0)[inverse]

    def _density_chunk(self, shard: _Shard, uniq: np.ndarray, n_kde: int, full_k: int, kind: str, exact: bool, comm: Comm,
                       full: bool = False) -> np.ndarray:
        """:meth:`_densities` of the distinct vectors ``uniq`` (the same on every process), before the
        floor at 1; ``full``: search ``full_k`` at once."""
        pool = shard.pool
        h2 = float(self.sigma) ** 2
        nprobe = None if kind == "flat" else self.density_nprobe
        short = min(_KDE_FIRST, full_k)
        first_k = full_k if full or shard.dense_kde else short  # after a dense round the short pass is wasted
        # The local lists of squared distances (in no order), then the merge. Pairs whose float32
        # distance exceeds h^2 by more than its rounding error are beyond h: no exact distance for
        # them (most pairs, on a spread pool). The prefetch has read every shard row by now, so
        # max_sq_norm is known.
        slack = 1e-5 * (np.einsum("ij,ij->i", uniq, uniq).astype(np.float64) + shard.max_sq_norm)

        def lists(queries: np.ndarray, k: int, beyond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(squared distances for the kernel, the search's values) of each query's k nearest, in no order."""
            if not exact:  # the IVF search's float32 values: no row read again, no row numbers
                values = shard.smallest(queries, k, nprobe)
                return values, values
            sq, _, approx = shard.nearest(queries, k, kind=kind, nprobe=nprobe, beyond=beyond, ordered=False)
            return sq, approx

        sq, approx = lists(uniq, first_k, h2 + slack)
        # Rows whose short list lies all within h on some process: they need the full one there,
        # and every process searches it for them, so that the merged rows line up.
        long = (approx < (h2 + slack)[:, None]).sum(axis=1) >= short if pool.n_local > short else np.zeros(len(uniq), dtype=bool)
        if comm.world_size > 1:
            long = comm.all_reduce(long.astype(np.int32), op="max").astype(bool)
        if short < full_k:
            shard.dense_kde = bool(long.sum() > 0.5 * len(uniq))
        if first_k == full_k:
            return self._merged_density(sq, n_kde, comm, exact)
        more = np.flatnonzero(long)
        if more.size * full_k > _DENSITY_ELEMENTS:  # too many full lists at once: in chunks, full at once
            step = max(1, _DENSITY_ELEMENTS // full_k)
            return np.concatenate([self._density_chunk(shard, uniq[s : s + step], n_kde, full_k, kind, exact, comm, full=True)
                                   for s in range(0, len(uniq), step)])
        rho = np.empty(len(uniq))
        rho[~long] = self._merged_density(sq[~long], n_kde, comm, exact)
        if more.size:
            rho[more] = self._merged_density(lists(uniq[more], full_k, h2 + slack[more])[0], n_kde, comm, exact)
        return rho

    def _merged_density(self, sq: np.ndarray, n_kde: int, comm: Comm, ascending: bool = True) -> np.ndarray:
        """Kernel sums over each row's ``n_kde`` smallest squared distances within ``h``, merged over
        the processes' lists ``sq`` (rows aligned across processes).

        ``ascending``: summed nearest first (an exact search: the same ``rho`` for any split);
        otherwise (an IVF search, whose neighbours depend on the split anyway) the ``n_kde``
        smallest are picked by ``np.partition`` and summed as they lie.
        """
        h2 = float(self.sigma) ** 2
        if not ascending and comm.world_size == 1:  # nothing to merge: the kernel is 0 beyond h
            return _kernel_sums(sq, n_kde, h2)
        sq = np.where(sq < h2, sq, np.inf)
        width = int((sq < np.inf).sum(axis=1).max(initial=0))
        width = int(comm.all_reduce(np.array([width], dtype=np.int64), op="max")[0]) if comm.world_size > 1 else width
        width = max(width, 1)
        # each row's distances within h first
        if ascending:
            sq = np.sort(sq, axis=1)[:, :width]
        elif width < sq.shape[1]:
            sq = np.partition(sq, width - 1, axis=1)[:, :width]
        rho = np.empty(sq.shape[0])
        step = max(1, 4_000_000 // (width * comm.world_size))
        for s in range(0, sq.shape[0], step):
            part = sq[s : s + step]
            if comm.world_size > 1:
                part = np.concatenate(comm.all_gather(np.ascontiguousarray(part)), axis=1)
            if ascending:
                kern = np.maximum(0.0, 1.0 - np.sort(part, axis=1)[:, :n_kde] / h2)
                # Sequential (cumsum) so trailing zeros never change the rounding: same rho for any split.
                rho[s : s + step] = np.cumsum(kern, axis=1)[:, -1]
            else:
                rho[s : s + step] = _kernel_sums(part, n_kde, h2)
        return rho


def sample_epochs(
    p: np.ndarray,
    k: int,
    n_epochs: int,
    *,
    replace: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Draw a fresh sample of ``k`` rows from ``p`` for each of ``n_epochs`` epochs.

    TSDS samples its training set from ``p``; resampling per epoch shows the model more of the
    distribution than one fixed draw. Epoch ``e`` uses a seed spawned from
    ``numpy.random.SeedSequence(seed)``, so epochs differ from each other and every run repeats.

    Parameters
    ----------
    p : ndarray of shape (n_candidates,)
        Probabilities (e.g. from :meth:`TSDSSelector.score`).
    k : int
        Rows per epoch.
    n_epochs : int
        Number of epochs, ``>= 1``.
    replace : bool
        With replacement (multinomial) or without (Gumbel-top-k); see
        :func:`hf_otselect.selectors.base.choose`.
    seed : int

    Returns
    -------
    ndarray of shape (n_epochs, k), int64
    """
    n_epochs = check_int(n_epochs, "n_epochs", "sample_epochs", 1)
    seed = check_seed(seed, "seed", "sample_epochs")
    children = np.random.SeedSequence(seed).spawn(n_epochs)
    return np.stack(
        [choose(p, k, mode="sample", seed=int(c.generate_state(1)[0]), replace=replace) for c in children]
    )


def _support(scores: np.ndarray, comm: Comm) -> int:
    """Rows with a positive ``p`` over every process (``replace=None`` draws distinct rows when they reach ``k``)."""
    return int(comm.all_reduce(np.array([(np.asarray(scores) > 0).sum()], dtype=np.int64))[0])
