"""Exact top-k as a score threshold, found by rounds of all-reduced counts (no scores gathered).

Every process holds the keys of its own rows. The ``k``-th largest key over all processes is
found digit by digit: keys are mapped to unsigned 64-bit integers in the same order, and each
round every process counts its keys in the 16 buckets of the next 4 bits below the prefix found so
far; one all-reduce of those 16 counts per rank sought says which bucket holds the rank. Sixteen
rounds give the exact key. Ties at that key go to the lower global index, found the same way
over the tied rows' indices. Each round moves ``16 x n_ranks`` integers whatever ``n`` and ``k``:
no process receives any other process's keys.

The result is a :class:`Cut`: a row is kept when its key is above the cut's key, or equal to it
with a global index at most the cut's index. That is what a full stable sort (descending key,
ties to the lower index) keeps in its first ``k`` rows, for any split of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_int, param_error
from .dist import LOCAL, Comm

__all__ = ["Cut", "descending_ranks_values", "order_bits", "rows_above", "top_k_cut"]

_SIGN = np.uint64(1 << 63)
_DIGIT = 4  # bits decided per round: 16 counts per rank sought


def order_bits(keys: np.ndarray) -> np.ndarray:
    """float64 keys as uint64 in the same order (-0.0 and 0.0 equal; NaN refused by callers).

    Parameters
    ----------
    keys : ndarray of shape (n,)

    Returns
    -------
    ndarray of shape (n,), uint64
        ``a < b`` exactly when ``keys[a] < keys[b]`` (IEEE 754 order, -inf lowest).
    """
    bits = (np.asarray(keys, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _from_bits(bits: np.ndarray) -> np.ndarray:
    """The inverse of :func:`order_bits`."""
    bits = np.asarray(bits, dtype=np.uint64)
    return np.where(bits & _SIGN, bits & ~_SIGN, ~bits).view(np.float64)


def rank_values(sorted_local: np.ndarray, ranks: np.ndarray, comm: Comm) -> np.ndarray:
    """The ``ranks[j]``-th smallest (1-based) of the uint64 values held across processes.

    Parameters
    ----------
    sorted_local : ndarray of shape (n_local,), uint64
        This process's values, sorted ascending.
    ranks : ndarray of shape (q,), int
        Ranks sought, in ``[1, n_global]``, the same on every process.
    comm : Comm

    Returns
    -------
    ndarray of shape (q,), uint64
        The same on every process. Each of the 16 rounds all-reduces ``(q, 16)`` counts.
    """
    need = np.asarray(ranks, dtype=np.int64).copy()
    prefix = np.zeros(need.size, dtype=np.uint64)
    digits = np.arange(1 << _DIGIT, dtype=np.uint64)
    for shift in range(64 - _DIGIT, -1, -_DIGIT):
        starts = prefix[:, None] + (digits << np.uint64(shift))[None, :]  # the low `shift + 4` bits of prefix are 0
        last = prefix | np.uint64((1 << (shift + _DIGIT)) - 1)
        edges = np.searchsorted(sorted_local, starts.ravel(), side="left").reshape(starts.shape)
        ends = np.searchsorted(sorted_local, last, side="right")
        counts = np.diff(np.concatenate([edges, ends[:, None]], axis=1), axis=1).astype(np.int64)
        counts = comm.all_reduce(counts) if comm.world_size > 1 else counts
        cum = np.cumsum(counts, axis=1)
        bucket = np.argmax(cum >= need[:, None], axis=1)
        rows = np.arange(need.size)
        need -= cum[rows, bucket] - counts[rows, bucket]
        prefix += bucket.astype(np.uint64) << np.uint64(shift)
    return prefix


def descending_ranks_values(keys: np.ndarray, ranks: np.ndarray, comm: Comm | None = None) -> np.ndarray:
    """The ``ranks[j]``-th largest key (1-based) over every process's keys, float64 ``(q,)``."""
    comm = comm or LOCAL
    desc = np.sort(~order_bits(keys))  # larger key, smaller value
    return _from_bits(~rank_values(desc, np.asarray(ranks, dtype=np.int64), comm))


@dataclass(frozen=True)
class Cut:
    """An exact top-k boundary: keep ``key > value``, or ``key == value`` and ``index <= index_cut``.

    Attributes
    ----------
    value : float
        The ``k``-th largest key.
    index_cut : int
        The largest global index kept among the rows whose key equals ``value``.
    k : int
        How many rows the cut keeps over every process.
    """

    value: float
    index_cut: int
    k: int

    def keeps(self, keys: np.ndarray, index: np.ndarray) -> np.ndarray:
        """bool ``(n,)``: which of these rows (keys and global indices) the top-k holds."""
        keys = np.asarray(keys, dtype=np.float64)
        return (keys > self.value) | ((keys == self.value) & (np.asarray(index, dtype=np.int64) <= self.index_cut))


def top_k_cut(keys: np.ndarray, k: int, *, index: np.ndarray | None = None, comm: Comm | None = None, owner: str = "top_k_cut") -> Cut:
    """The :class:`Cut` that keeps the ``k`` largest keys, ties to the lower global index.

    Parameters
    ----------
    keys : ndarray of shape (n_local,)
        This process's keys (higher = keep); NaN is refused.
    k : int
        Rows to keep over every process, in ``[1, n_global]``.
    index : ndarray of shape (n_local,), int, optional
        Their global indices (default ``arange(n_local)``: one process).
    comm : Comm, optional

    Returns
    -------
    Cut
        The same on every process; ``cut.keeps(keys, index)`` marks exactly ``k`` rows in all.
    """
    comm = comm or LOCAL
    keys = np.asarray(keys, dtype=np.float64)
    index = np.arange(keys.size, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if index.shape != keys.shape:
        raise param_error("index", owner, f"an int array of shape {keys.shape} like the keys", f"shape {index.shape}")
    n_nan, n = (int(v) for v in comm.all_reduce(np.array([np.isnan(keys).sum(), keys.size], dtype=np.int64)))
    if n_nan:
        raise param_error("scores", owner, "free of NaN", f"{n_nan} NaN value(s)")
    k = check_int(k, "k", owner, 1, n)
    value = float(descending_ranks_values(keys, np.array([k]), comm)[0])
    above = int(comm.all_reduce(np.array([(keys > value).sum()], dtype=np.int64))[0])
    tied = np.sort(index[keys == value].astype(np.uint64))
    index_cut = int(rank_values(tied, np.array([k - above]), comm)[0])
    return Cut(value, index_cut, k)


def rows_above(score: np.ndarray, index: np.ndarray, q_score: np.ndarray, q_index: np.ndarray) -> np.ndarray:
    """Per query row, how many of these rows rank above it: a higher score, or the same score and a lower index.

    NaN scores rank last (below every number; among themselves by index). This is the count one
    process adds to a global rank (sum it over processes, plus 1): no score leaves the process.

    Parameters
    ----------
    score, index : ndarray of shape (n,)
        These rows' scores and global indices.
    q_score, q_index : ndarray of shape (q,)
        The query rows.

    Returns
    -------
    ndarray of shape (q,), int64
    """
    key = -np.asarray(score, dtype=np.float64)  # ascending key = descending score; numpy sorts NaN last
    order = np.lexsort((index, key))
    key, idx = key[order], np.asarray(index, dtype=np.int64)[order]
    q_key = -np.asarray(q_score, dtype=np.float64)
    better = np.searchsorted(key, q_key, side="left")  # strictly better scores (NaN keys are greatest)
    # One group per distinct key of the sorted keys (the NaNs at the end: one group).
    nan = np.isnan(key)
    new_group = np.r_[True, (key[1:] != key[:-1]) & ~(nan[1:] & nan[:-1])] if key.size else np.zeros(0, dtype=bool)
    start = np.flatnonzero(new_group)
    uniq = key[start]
    group = np.searchsorted(uniq, q_key, side="left")
    inside = group < uniq.size
    same = np.zeros(q_key.size, dtype=bool)
    same[inside] = (uniq[group[inside]] == q_key[inside]) | (np.isnan(uniq[group[inside]]) & np.isnan(q_key[inside]))
    if same.any():  # ties: rows of the same key with a lower index. Sorted (key, index) pairs as one
        # monotone int64 (group number x span + index), searched for every tied query at once (a loop
        # per query cost a second per 100k tied rows: TSDS scores most rows exactly 0).
        span = int(max(int(idx.max(initial=0)), int(np.max(q_index, initial=0)))) + 1
        run = np.cumsum(new_group, dtype=np.int64) - 1
        better[same] = np.searchsorted(run * span + idx, group[same].astype(np.int64) * span + np.asarray(q_index, dtype=np.int64)[same], side="left")
    return better.astype(np.int64)
