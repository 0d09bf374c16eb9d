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
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import knn
from ._checks import check_choice, check_embeddings, check_float, check_int, param_error, unit_rows64
from .selectors.base import Selector, choose

logger = logging.getLogger(__name__)

__all__ = ["DEDUP_MODES", "epanechnikov_density", "greedy_distinct", "guarded_choose", "resolve_dedup_mode"]

DEDUP_MODES = ("auto", "greedy", "kde")


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(unit_rows64(x), dtype=np.float32)  # normalised in float64: any finite scale


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


def epanechnikov_density(candidates: np.ndarray, rows: np.ndarray, radius: float) -> np.ndarray:
    """Epanechnikov kernel density of ``candidates[rows]`` over all candidates (unit-normalised).

    Parameters
    ----------
    candidates : ndarray of shape (n_candidates, dim)
        Normalised to unit length inside.
    rows : ndarray of shape (n_rows,), int
        The rows whose density is wanted.
    radius : float
        Bandwidth ``h > 0`` (plain Euclidean distance on unit vectors).

    Returns
    -------
    ndarray of shape (n_rows,), float64
        ``rho_j = sum_{||x_j - x'|| < h} (1 - ||x_j - x'||^2 / h^2)``, at least 1 (the row itself).
    """
    unit = _unit(check_embeddings(candidates, "candidates", "epanechnikov_density"))
    radius = check_float(radius, "radius", "epanechnikov_density", 0.0, low_open=True)
    rows = np.asarray(rows, dtype=np.int64)
    h2 = radius * radius
    lims, _, nbrs = knn.radius_search(unit[rows], unit, h2, index="flat")
    owner = np.repeat(np.arange(rows.size), np.diff(lims))
    rho = np.zeros(rows.size)
    # float64 kernel, as TSDS does, over fixed-size chunks of neighbour pairs: a heavily duplicated
    # pool has millions of pairs, and one (pairs, dim) difference array would not fit in memory.
    for s in range(0, nbrs.size, _PAIR_CHUNK):
        o = owner[s : s + _PAIR_CHUNK]
        diff = unit[rows[o]].astype(np.float64) - unit[nbrs[s : s + _PAIR_CHUNK]]
        sq = np.einsum("ij,ij->i", diff, diff)
        rho += np.bincount(o, weights=np.maximum(0.0, 1.0 - sq / h2), minlength=rows.size)
    return np.maximum(rho, 1.0)


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
    unit = _unit(np.asarray(candidates))
    h2 = radius * radius
    prefix = min(order.size, max(2 * k, 64))
    while True:
        lims, _, nbrs = knn.radius_search(unit[order[:prefix]], unit[order[:prefix]], h2, index="flat")
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
        if len(taken) == k or prefix == order.size:
            break
        prefix = min(order.size, 2 * prefix)
    last = taken[-1] if taken else -1
    n_skipped = int(last + 1 - len(taken)) if len(taken) == k else int(prefix - len(taken))
    n_refilled = 0
    if len(taken) < k:
        n_refilled = k - len(taken)
        logger.warning("dedup: only %d candidates are more than %.3g apart; %d near-duplicates fill the budget of %d.", len(taken), radius, n_refilled, k)
        chosen_set = set(taken)
        taken += [p for p in range(prefix) if p not in chosen_set][:n_refilled]
    return order[np.asarray(taken, dtype=np.int64)], n_skipped, n_refilled


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
    candidates: np.ndarray,
    radius: float,
    mode: str = "auto",
) -> tuple[np.ndarray, dict[str, Any]]:
    """``selector.choose_rows(scores, k, seed=seed)`` with the near-duplicate guard.

    Parameters
    ----------
    selector : Selector
        Its ``choice`` and ``replaces`` decide the rule under ``mode="auto"``.
    scores : ndarray of shape (n_candidates,)
    k : int
    seed : int
    candidates : ndarray of shape (n_candidates, dim)
        The embeddings the radius applies to.
    radius : float
        ``h > 0``.
    mode : {"auto", "greedy", "kde"}

    Returns
    -------
    indices : ndarray of shape (k,), int64
        As ``choose_rows`` would return them (best or first drawn first).
    info : dict
        ``mode``, ``radius`` and what the guard did: rows ``skipped`` / ``refilled`` (greedy), or
        ``weighting`` (kde: ``"guard"`` with the density range, or ``"selector"`` when the
        selector's own density is the one weighting, with its ``selector_bandwidth``).
    """
    owner = "guarded_choose"
    scores = np.asarray(scores, dtype=np.float64)
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
        return selector.choose_rows(scores, k, seed=seed), info
    if rule == "kde":
        info["weighting"] = "guard"
        # Densities only where the selector puts mass: rows it can never draw need none.
        if selector.choice == "sample":
            support = np.flatnonzero(scores > 0)
        else:
            support = np.flatnonzero(np.isfinite(scores))
        rho = np.ones(scores.size)
        rho[support] = epanechnikov_density(candidates, support, radius)
        weighted = scores / rho if selector.choice == "sample" else scores - np.log(rho)
        info.update(rows_with_neighbours=int((rho > 1.0 + 1e-9).sum()), max_density=float(rho.max()))
        return selector.choose_rows(weighted, k, seed=seed), info
    # The selector's own order over every row it could take: the full top-k order, or the seeded
    # draw order (sampling without replacement) over every drawable row.
    if selector.choice == "top_k":  # -inf: a row the selector never chooses (DSIR's rows without a token)
        n_order = int((scores > -np.inf).sum())
    else:
        n_order = int((scores > 0).sum()) if selector.choice == "sample" else int(np.isfinite(scores).sum())
    order = choose(scores, n_order, mode=selector.choice, seed=seed, replace=False)
    chosen, skipped, refilled = greedy_distinct(order, candidates, k, radius)
    info.update(skipped=skipped, refilled=refilled)
    return chosen, info
