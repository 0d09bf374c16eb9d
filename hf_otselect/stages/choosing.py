"""The choosing stage: the rows each process keeps, without gathering scores.

For a top-k choice (GOT-D, similarity, DSIR, and the sampling methods drawing without replacement,
whose Gumbel keys make the draw a top-k; Kool et al. 2019) every process computes its rows' keys
(:meth:`Selector.choice_keys`), the exact cut is found by rounds of all-reduced counts
(:func:`hf_otselect.threshold.top_k_cut`, ties to the lower global index), and each process keeps
its own rows above it: :func:`keep_top_k` receives 16 x P numbers per round whatever N and k are.
Draws with replacement (TSDS ``replace=True``, random with replacement) keep the selector's own
:meth:`Selector.choose_rows`. The near-duplicate guard chooses through
:func:`hf_otselect.dedup.guarded_choose` (each process passes its own rows; the same rows for any
number of processes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dist import Comm, RowSubset
from ..request import Request
from ..selectors import Selector
from ..selectors.base import order_chosen
from ..threshold import rows_above, top_k_cut
from .embedding import Embedded
from .filters import Filtered
from .scoring import Scored

__all__ = ["Chosen", "choose_stage", "global_ranks", "keep_top_k"]


@dataclass
class Chosen:
    """The chosen rows.

    Attributes
    ----------
    indices : ndarray of shape (k,), int64
        Global pool rows, best (or first drawn) first, the same on every process (a row drawn
        twice appears twice).
    reports : dict
        ``"dedup"``: what the near-duplicate guard did, when it ran.
    """

    indices: np.ndarray
    reports: dict[str, Any] = field(default_factory=dict)


def choose_stage(req: Request, emb: Embedded, flt: Filtered, scored: Scored) -> Chosen:
    """Choose ``req.k`` rows from the scores of the rows the filters left.

    Parameters
    ----------
    req : Request
    emb : Embedded
    flt : Filtered
    scored : Scored

    Returns
    -------
    Chosen
    """
    selector, k, seed, comm = emb.selector, req.k, req.seed, req.comm
    reports: dict[str, Any] = {}
    if req.filters.dedup_radius is not None:
        from ..dedup import guarded_choose

        guard_emb = RowSubset(emb.pool_embeddings, flt.keep_rows) if flt.narrowed else emb.pool_embeddings  # this process's rows, lazily
        indices, reports["dedup"] = guarded_choose(selector, scored.kept_scores, k, seed=seed, candidates=guard_emb,
                                                   radius=req.filters.dedup_radius, mode=req.filters.dedup_mode,
                                                   index=scored.kept_index, comm=comm)
    else:
        keys = selector.choice_keys(scored.kept_scores, k, seed=seed, index=scored.kept_index, comm=comm) if _keys_agree(selector) else None
        if keys is None:  # draws with replacement (or a selector that chooses its own way): its own path
            indices = selector.choose_rows(scored.kept_scores, k, seed=seed, index=scored.kept_index, comm=comm)
        else:
            mine = keep_top_k(keys, k, scored.kept_index, comm)
            indices = order_chosen(keys[mine], scored.kept_index[mine], comm)
    if flt.narrowed:  # back to pool rows: the choice numbered the rows left 0 .. n_kept - 1 over every process
        indices = flt.pool_rows(np.asarray(indices, dtype=np.int64), emb.offset, comm)
    return Chosen(np.asarray(indices, dtype=np.int64), reports)


def _keys_agree(selector: Selector) -> bool:
    """Whether the selector's keys describe its choice: a subclass overriding ``choose_rows`` alone does not say."""
    cls = type(selector)
    return cls.choose_rows is Selector.choose_rows or cls.choice_keys is not Selector.choice_keys


def keep_top_k(keys: np.ndarray, k: int, index: np.ndarray, comm: Comm) -> np.ndarray:
    """Which of this process's rows are among the ``k`` largest keys of every process (ties: lower index).

    Parameters
    ----------
    keys : ndarray of shape (n_local,), float64
        This process's keys (no NaN).
    k : int
        Rows kept over every process.
    index : ndarray of shape (n_local,), int64
        Their global indices.
    comm : Comm

    Returns
    -------
    ndarray of shape (n_local,), bool
        Exactly ``k`` True over every process: what a full stable sort keeps. Each process sends
        and receives O(P) numbers per round, none of them another process's keys.
    """
    return top_k_cut(keys, k, index=index, comm=comm, owner="select_by_ot").keeps(keys, index)


def global_ranks(scores: np.ndarray, index: np.ndarray, q_scores: np.ndarray, q_index: np.ndarray, comm: Comm) -> np.ndarray:
    """Rank by score in the whole pool (1 = best, ties to the lower index) of a few query rows.

    Every process counts its own rows that beat each query (higher score, or the same score and a
    lower global index) and the counts are summed: O(n_queries) bytes, no scores leave a process.

    Parameters
    ----------
    scores, index : ndarray of shape (n,)
        This process's scores (NaN = unscored, never counted) and their global indices.
    q_scores, q_index : ndarray of shape (q,)
        The query rows, the same on every process.

    Returns
    -------
    ndarray of shape (q,), int64
    """
    ok = ~np.isnan(scores)
    return comm.all_reduce(rows_above(scores[ok], index[ok], q_scores, q_index)) + 1
