"""Near-duplicate guard: a duplicated candidate must not take the budget many times.

Two rules, both on L2-normalised embeddings with a radius ``h`` (Euclidean; on unit vectors
``||x - y||^2 = 2 (1 - cos)``, so ``h = 0.2`` means cosine similarity above 0.98):

``"greedy"`` (top-k selectors and sampling without replacement)
    Walk the candidates in the selector's own order (stable top-k: descending score, ties by
    index; sampling: the seeded Gumbel-top-k draw order of :func:`~hf_otselect.selectors.choose`)
    and skip any candidate within ``h`` of one already taken, until ``k`` are taken. The result is
    deterministic, has exactly ``k`` rows, and holds at most one row of each near-duplicate cluster
    (if the pool has fewer than ``k`` mutually distant rows, the skipped ones fill the rest, in
    order, with a warning). Chosen for top-k selectors because their scores (GOT-D's signed
    calibrated gradients, cosine similarities, DSIR's log-weights) are not densities: dividing them
    by a kernel density has no meaning, while the greedy skip is exact and keeps the ranking.

``"kde"`` (sampling with replacement, e.g. TSDS with replace=True)
    TSDS's diversity device (Liu et al., NeurIPS 2024, Sec. 3): the Epanechnikov kernel density
    ``rho_j = sum_{||x_j - x'|| < h} (1 - ||x_j - x'||^2 / h^2)`` over the pool (itself included,
    so ``rho_j >= 1``), and the sampling probabilities become ``p_j / rho_j`` (renormalised; for
    log-weights ``s_j - log rho_j``). ``c`` exact copies of a row each get ``rho = c``, so together
    they keep the mass of one copy: duplicates are drawn in proportion, not ``c`` times as often.
    With replacement a row may be drawn again by design, so the greedy skip (which would have to
    refuse repeats too) does not apply; the density weighting does.

    **One density weighting.** TSDS with its own kernel density (``kernel="kde"``, ``sigma > 0``,
    its default) already puts mass proportional to ``1 / rho_j`` on each neighbour (Thm 3.2, see
    :mod:`hf_otselect.selectors.tsds`). Dividing by a second density would count every copy twice
    (``c`` copies would end at about ``1/c`` of one row's mass, not one). So for such a TSDS the
    guard leaves the probabilities as they are and the selector's own density is the one
    weighting (``info["weighting"] == "selector"``). What copies end up with then: ``c`` exact
    copies of a row that has no other pool row within ``sigma`` together receive exactly the mass
    the row alone receives in the pool without the copies (each copy has ``rho = c``, so the
    query's water-filling sees the group as one row of weight 1; valid while ``c <= kde_K``, the
    most neighbours a TSDS density counts). With other rows within ``sigma`` (density ``r`` from
    them) the group gets about ``c (1 + r) / (c + r)`` times the row's mass (exactly so at an
    unchanged level ``t*``), between 1x and ``(1 + r)``x. Rows closer than ``dedup_radius`` but farther than ``sigma`` are not
    down-weighted; the guard warns when ``dedup_radius > sigma``. For KNN-Uniform TSDS
    (``sigma = 0`` or ``kernel="uniform"``) the guard's density is the one weighting
    (``info["weighting"] == "guard"``).

``"auto"`` picks greedy for ``top_k`` and for sampling without replacement, kde for sampling with
replacement. Neighbours come from :func:`hf_otselect.knn.radius_search` (exact, flat index).

**Several processes, streamed pools.** Each process holds its own rows (a streamed pool's are a
memory map) and :func:`guarded_choose` returns the same rows for any number of processes. Greedy:
the skip only ever looks at a prefix of the order, so the prefix's ``p``-th key is found by rounds
of all-reduced counts (:func:`hf_otselect.threshold.top_k_cut`) and only those ``p`` rows' vectors
are gathered; ``p`` doubles while the prefix holds fewer than ``k`` distinct rows, exactly as on one
process. KDE: the density is a sum over neighbours, found by every process among its own rows and
summed in ascending distance after one exchange of the lists (:func:`epanechnikov_density`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from . import knn
from ._checks import check_choice, check_float, check_int, nonfinite_rows, nonfinite_summary, param_error, unit_rows64
from .dist import LOCAL, Comm
from .selectors.base import Selector, choose_keys
from .threshold import top_k_cut

logger = logging.getLogger(__name__)

__all__ = ["DEDUP_MODES", "epanechnikov_density", "greedy_distinct", "guarded_choose", "resolve_dedup_mode"]

DEDUP_MODES = ("auto", "greedy", "kde")


def resolve_dedup_mode(mode: str, choice: str, replaces: bool, owner: str) -> str:
    """The rule ``mode`` means for a selector choosing by ``choice`` (see the module docstring)."""
    check_choice(mode, "dedup_mode", owner, list(DEDUP_MODES))
    if mode == "auto":
        return "kde" if (choice != "top_k" and replaces) else "greedy"
    if mode == "kde" and choice == "top_k":
        raise param_error("dedup_mode", owner, "'greedy' or 'auto' for a top-k selector (its scores are not probabilities)", mode)
    if mode == "greedy" and replaces:
        raise param_error("dedup_mode", owner, "'kde' or 'auto' for a selector sampling with replacement", mode)
    return mode


_PAIR_CHUNK = 1 << 15  # neighbour pairs per float64 difference block (~100 MB at 384-d)
_UNIT_BLOCK = 1 << 16  # rows normalised at once (a memory-mapped pool is read block by block)
_QUERY_ROWS = 4096  # density rows each process adds to one round of the sharded search
_LIST_ELEMENTS = 1 << 22  # padded neighbour-list entries per all-gather (32 MiB of float64)


def _unit(x: Any) -> np.ndarray:
    """float32 unit rows, normalised in float64 block by block (any finite scale; no float64 copy of ``x``)."""
    out = np.empty(np.shape(x), dtype=np.float32)
    for s in range(0, out.shape[0], _UNIT_BLOCK):
        out[s : s + _UNIT_BLOCK] = unit_rows64(x[s : s + _UNIT_BLOCK])
    return out


def _within(queries: np.ndarray, unit: np.ndarray, index: Any, h2: float) -> np.ndarray:
    """Each query's squared distances to this process's rows strictly within ``h2``, ascending.

    FAISS finds the pairs with a margin over ``h2`` (its float32 expansion errs by ~1e-6 on unit
    vectors); the float64 difference of the two float32 rows then decides, so the distances, and
    which pairs count, do not depend on how FAISS blocked its products.

    Returns
    -------
    ndarray of shape (n_queries, width), float64
        ``inf`` pads the shorter lists.
    """
    q = len(queries)
    if index is None or q == 0:
        return np.full((q, 0), np.inf)
    lims, _, nbrs = knn.radius_search(queries, unit, h2 * (1.0 + 1e-3) + 1e-5, index="flat", prebuilt=index)
    owner = np.repeat(np.arange(q), np.diff(lims))
    sq = np.empty(nbrs.size)
    # float64 kernel, as TSDS does, over fixed-size chunks of neighbour pairs: a heavily duplicated
    # pool has millions of pairs, and one (pairs, dim) difference array would not fit in memory.
    for s in range(0, nbrs.size, _PAIR_CHUNK):
        diff = queries[owner[s : s + _PAIR_CHUNK]].astype(np.float64) - unit[nbrs[s : s + _PAIR_CHUNK]]
        sq[s : s + _PAIR_CHUNK] = np.einsum("ij,ij->i", diff, diff)
    inside = sq < h2
    owner, sq = owner[inside], sq[inside]
    order = np.lexsort((sq, owner))
    owner, sq = owner[order], sq[order]
    counts = np.bincount(owner, minlength=q)
    out = np.full((q, int(counts.max(initial=0))), np.inf)
    out[owner, np.arange(sq.size) - (np.cumsum(counts) - counts)[owner]] = sq
    return out


def _kernel_sums(sq: np.ndarray, h2: float, comm: Comm) -> np.ndarray:
    """``sum max(0, 1 - d^2 / h^2)`` over every process's lists of each query, float64 ``(n_queries,)``.

    The lists are merged and summed in ascending distance, one term after the other (cumsum), so
    the sum is a function of the set of distances alone: the same for any split of the rows.
    """
    width = int(comm.all_reduce(np.array([sq.shape[1]], dtype=np.int64), op="max")[0])
    width = max(width, 1)
    sq = np.concatenate([sq, np.full((sq.shape[0], width - sq.shape[1]), np.inf)], axis=1)
    out = np.empty(sq.shape[0])
    step = max(1, _LIST_ELEMENTS // (width * comm.world_size))
    for s in range(0, sq.shape[0], step):
        part = np.concatenate(comm.all_gather(np.ascontiguousarray(sq[s : s + step])), axis=1)
        part = np.sort(part, axis=1)
        out[s : s + step] = np.cumsum(np.maximum(0.0, 1.0 - part / h2), axis=1)[:, -1]
    return out


def epanechnikov_density(candidates: Any, rows: np.ndarray, radius: float, *, comm: Comm | None = None) -> np.ndarray:
    """Epanechnikov kernel density of ``candidates[rows]`` over every process's candidates (unit-normalised).

    Parameters
    ----------
    candidates : array_like of shape (n_local, dim)
        This process's rows (every row with one process; a memory map is read block by block).
        Normalised to unit length inside.
    rows : ndarray of shape (n_rows,), int
        Positions in ``candidates`` of the rows whose density is wanted.
    radius : float
        Bandwidth ``h > 0`` (plain Euclidean distance on unit vectors).
    comm : Comm, optional
        The processes sharing the pool (default: this process alone); every process calls this.

    Returns
    -------
    ndarray of shape (n_rows,), float64
        ``rho_j = sum_{||x_j - x'|| < h} (1 - ||x_j - x'||^2 / h^2)`` over the rows ``x'`` of every
        process, at least 1 (the row itself).

    Notes
    -----
    In rounds of at most ``_QUERY_ROWS`` wanted rows per process, their unit vectors are
    all-gathered (``n_rows x dim`` in all, never the pool's), every process finds their neighbours
    among its own rows (exact float64 distances, see :func:`_within`), and the per-process lists of
    squared distances within ``h`` are all-gathered and summed in ascending order. The density is
    then the same, bit for bit, for any number of processes and any split of the rows.
    """
    owner = "epanechnikov_density"
    comm = comm or LOCAL
    radius = check_float(radius, "radius", owner, 0.0, low_open=True)
    if np.ndim(candidates) != 2:
        raise param_error("candidates", owner, "a 2-D float array of shape (n, dim)", f"an array of shape {np.shape(candidates)}")
    unit = _unit(candidates)
    if not np.isfinite(unit).all():
        raise param_error("candidates", owner, "finite (no NaN or Inf)", nonfinite_summary(*nonfinite_rows(unit)))
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= unit.shape[0]):
        raise param_error("rows", owner, f"positions in [0, {unit.shape[0]})", f"values from {rows.min()} to {rows.max()}")
    h2 = radius * radius
    index = knn.build_index(unit, index="flat") if unit.shape[0] else None
    rounds = int(comm.all_reduce(np.array([-(-rows.size // _QUERY_ROWS)], dtype=np.int64), op="max")[0])
    rho = np.empty(rows.size)
    for r in range(rounds):
        mine = rows[r * _QUERY_ROWS : (r + 1) * _QUERY_ROWS]
        parts = comm.all_gather(unit[mine])
        start = sum(len(p) for p in parts[: comm.rank])
        sums = _kernel_sums(_within(np.concatenate(parts), unit, index, h2), h2, comm)
        rho[r * _QUERY_ROWS : r * _QUERY_ROWS + mine.size] = sums[start : start + mine.size]
    return np.maximum(rho, 1.0)


def _greedy(prefix_rows: Callable[[int], np.ndarray], n_order: int, k: int, radius: float) -> tuple[np.ndarray, int, int]:
    """The greedy skip over the first rows of an order of ``n_order`` rows (see :func:`greedy_distinct`).

    ``prefix_rows(p)`` returns the unit vectors of the order's first ``p`` rows, ``(p, dim)``
    float32. Returns the taken positions in the order, the skipped and the refilled counts.
    """
    h2 = radius * radius
    prefix = min(n_order, max(2 * k, 64))
    while True:
        unit = prefix_rows(prefix)
        lims, _, nbrs = knn.radius_search(unit, unit, h2, index="flat")
        # A plain loop: each decision depends on the ones before it (no vectorised form).
        blocked = np.zeros(prefix, dtype=bool)
        taken: list[int] = []
        for pos in range(prefix):
            if blocked[pos]:
                continue
            taken.append(pos)
            if len(taken) == k:
                break
            blocked[nbrs[lims[pos] : lims[pos + 1]]] = True
        if len(taken) == k or prefix == n_order:
            break
        prefix = min(n_order, 2 * prefix)
    last = taken[-1] if taken else -1
    n_skipped = int(last + 1 - len(taken)) if len(taken) == k else int(prefix - len(taken))
    n_refilled = 0
    if len(taken) < k:
        n_refilled = k - len(taken)
        logger.warning("dedup: only %d candidates are more than %.3g apart; %d near-duplicates fill the budget of %d.", len(taken), radius, n_refilled, k)
        chosen_set = set(taken)
        taken += [p for p in range(prefix) if p not in chosen_set][:n_refilled]
    return np.asarray(taken, dtype=np.int64), n_skipped, n_refilled


def greedy_distinct(order: np.ndarray, candidates: np.ndarray, k: int, radius: float) -> tuple[np.ndarray, int, int]:
    """Take candidates in ``order``, skipping any within ``radius`` of one already taken.

    Parameters
    ----------
    order : ndarray of shape (n_order,), int
        Candidate rows, most wanted first (each at most once).
    candidates : ndarray of shape (n_candidates, dim)
        Normalised to unit length inside.
    k : int
        Rows to take, ``1 <= k <= n_order``.
    radius : float
        Skip radius ``h > 0`` (Euclidean on unit vectors; strict ``<``, as FAISS's range search).

    Returns
    -------
    chosen : ndarray of shape (k,), int64
        In ``order``'s order; exactly ``k`` rows.
    n_skipped : int
        Candidates passed over as near-duplicates before ``k`` distinct ones were found.
    n_refilled : int
        Skipped candidates put back (in order) because fewer than ``k`` distinct ones exist.

    Notes
    -----
    Neighbours are searched only within a prefix of ``order`` (first ``2k``, doubled while too
    few distinct rows are found): a candidate can only be blocked by one taken before it. The
    search is exact (flat) and costs ``O(prefix^2 dim)``.
    """
    order = np.asarray(order, dtype=np.int64)
    k = check_int(k, "k", "greedy_distinct", 1, order.size)
    radius = check_float(radius, "radius", "greedy_distinct", 0.0, low_open=True)
    rows = np.asarray(candidates)
    taken, n_skipped, n_refilled = _greedy(lambda p: _unit(rows[order[:p]]), order.size, k, radius)
    return order[taken], n_skipped, n_refilled


class _GatheredPrefix:
    """The first rows of the selector's order over every process: keys, global indices, unit vectors.

    Each call with a longer prefix ``p`` finds the ``p``-th key by all-reduced counts
    (:func:`~hf_otselect.threshold.top_k_cut`) and all-gathers only the rows it adds: the vectors
    of ``p`` rows in all, whatever the pool's size.
    """

    def __init__(self, keys: np.ndarray, index: np.ndarray, candidates: Any, comm: Comm) -> None:
        self._keys, self._index, self._candidates, self._comm = keys, index, candidates, comm
        self._held = np.zeros(keys.size, dtype=bool)
        self.keys = np.zeros(0)
        self.index = np.zeros(0, dtype=np.int64)
        self.vectors = np.zeros((0, np.shape(candidates)[1]), dtype=np.float32)

    def __call__(self, p: int) -> np.ndarray:
        comm = self._comm
        cut = top_k_cut(self._keys, p, index=self._index, comm=comm, owner="guarded_choose")
        new = np.flatnonzero(cut.keeps(self._keys, self._index) & ~self._held)
        self._held[new] = True
        vectors = _unit(self._candidates[new]) if new.size else np.zeros((0, self.vectors.shape[1]), dtype=np.float32)
        keys = np.concatenate([self.keys, *comm.all_gather(self._keys[new])])
        index = np.concatenate([self.index, *comm.all_gather(self._index[new])])
        vectors = np.concatenate([self.vectors, *comm.all_gather(vectors)])
        order = np.lexsort((index, -keys))  # choose's order: descending key, ties to the lower index
        self.keys, self.index, self.vectors = keys[order], index[order], vectors[order]
        return self.vectors


def _own_density_bandwidth(selector: Selector) -> float | None:
    """The bandwidth of the density ``selector`` already divides its scores by, or None."""
    from .selectors.tsds import TSDSSelector

    if isinstance(selector, TSDSSelector) and selector.kernel == "kde" and selector.sigma > 0:
        return float(selector.sigma)
    return None


def guarded_choose(
    selector: Selector,
    scores: np.ndarray,
    k: int,
    *,
    seed: int,
    candidates: Any,
    radius: float,
    mode: str = "auto",
    index: np.ndarray | None = None,
    comm: Comm | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``selector.choose_rows(scores, k, seed=seed, index=index, comm=comm)`` with the near-duplicate guard.

    Every process passes its own rows (scores, vectors, global indices) and gets the same ``k``
    global rows back, the rows one process holding the whole pool would choose. Greedy gathers the
    vectors of the order's prefix the skip reaches (about ``2k`` rows; :class:`_GatheredPrefix`),
    KDE exchanges the support rows' vectors and their neighbour distances
    (:func:`epanechnikov_density`); neither gathers the pool.

    Parameters
    ----------
    selector : Selector
        Its ``choice`` and ``replaces`` decide the rule under ``mode="auto"``.
    scores : ndarray of shape (n_local,)
        This process's scores.
    k : int
        Rows to choose over every process.
    seed : int
    candidates : array_like of shape (n_local, dim)
        This process's embeddings (the radius applies to them; a memory map is read in blocks).
    radius : float
        ``h > 0``.
    mode : {"auto", "greedy", "kde"}
    index : ndarray of shape (n_local,), int, optional
        The rows' global indices (default ``arange(n_local)``: one process).
    comm : Comm, optional
        The processes sharing the pool (default: this process alone).

    Returns
    -------
    indices : ndarray of shape (k,), int64
        Global rows as ``choose_rows`` would return them (best or first drawn first), the same on
        every process.
    info : dict
        ``mode``, ``radius`` and what the guard did over the whole pool: rows ``skipped`` /
        ``refilled`` (greedy), or ``weighting`` (kde: ``"guard"`` with the density range, or
        ``"selector"`` when the selector's own density is the one weighting, with its
        ``selector_bandwidth``).
    """
    owner = "guarded_choose"
    comm = comm or LOCAL
    scores = np.asarray(scores, dtype=np.float64)
    index = np.arange(scores.size, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if index.shape != scores.shape:
        raise param_error("index", owner, f"an int array of shape {scores.shape} like the scores", f"shape {index.shape}")
    if np.shape(candidates)[:1] != scores.shape:
        raise param_error("candidates", owner, f"an array with {scores.size} rows, one per score", f"shape {np.shape(candidates)}")
    radius = check_float(radius, "dedup_radius", owner, 0.0, low_open=True)
    rule = resolve_dedup_mode(mode, selector.choice, selector.replaces, owner)
    info: dict[str, Any] = {"mode": rule, "radius": radius}
    own_bandwidth = _own_density_bandwidth(selector)
    if rule == "kde" and own_bandwidth is not None:
        # The selector's scores already carry a 1/density factor: a second one would count each
        # copy twice (see "One density weighting" in the module docstring).
        if radius > own_bandwidth:
            logger.warning(
                "dedup: %s already weights by its own density with bandwidth %.3g < dedup_radius %.3g; rows between "
                "%.3g and %.3g apart are not down-weighted. Set sigma >= dedup_radius to cover them.",
                type(selector).__name__, own_bandwidth, radius, own_bandwidth, radius,
            )
        info.update(weighting="selector", selector_bandwidth=own_bandwidth)
        return selector.choose_rows(scores, k, seed=seed, index=index, comm=comm), info
    if rule == "kde":
        info["weighting"] = "guard"
        # Densities only where the selector puts mass: rows it can never draw need none.
        if selector.choice == "sample":
            support = np.flatnonzero(scores > 0)
        else:
            support = np.flatnonzero(np.isfinite(scores))
        rho = np.ones(scores.size)
        rho[support] = epanechnikov_density(candidates, support, radius, comm=comm)
        weighted = scores / rho if selector.choice == "sample" else scores - np.log(rho)
        crowded = int(comm.all_reduce(np.array([(rho > 1.0 + 1e-9).sum()], dtype=np.int64))[0])
        top = float(comm.all_reduce(np.array([rho.max(initial=1.0)]), op="max")[0])
        info.update(rows_with_neighbours=crowded, max_density=top)
        return selector.choose_rows(weighted, k, seed=seed, index=index, comm=comm), info
    # The selector's own order over every row it could take (the full top-k order, or the seeded
    # draw order without replacement), of which only the prefix the skip reaches is gathered.
    keys = choose_keys(scores, k, mode=selector.choice, seed=seed, replace=False, index=index, comm=comm)
    n_order = int(comm.all_reduce(np.array([(keys > -np.inf).sum()], dtype=np.int64))[0])  # -inf: never taken
    if not 1 <= k <= n_order:
        raise param_error("k", owner, f"an int in [1, {n_order}] (the rows the selector can take)", k)
    prefix = _GatheredPrefix(keys, index, candidates, comm)
    taken, skipped, refilled = _greedy(prefix, n_order, k, radius)
    info.update(skipped=skipped, refilled=refilled)
    return prefix.index[taken], info
