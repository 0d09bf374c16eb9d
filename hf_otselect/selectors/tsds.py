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
Thm 3.1). Restricting to the ``L = max_K`` prefetched neighbours adds the constraint that the
``L``-th neighbour is the last (``Delta_iL = +inf``), so the result is the exact optimum of the
problem restricted to those neighbours. When several ``t`` are optimal (a flat piece), the largest
(the most concentrated plan) is returned.

Differences from the published code, on purpose: a query whose nearest neighbour alone takes its
whole budget gets ``1/M`` on that neighbour (the published loop fails there); every sum is float64;
``max_K``/``kde_K`` larger than the pool are clipped to the pool size with a logged warning instead
of a silent cap at ``N // 10``; pools of any size ``>= 1`` work; densities are taken over the whole
pool (the paper's definition), not only over the prefetched neighbours; densities are computed
with a radius search (the kernel is zero beyond ``h``) and only for the neighbours the solution can
reach (see :meth:`TSDSSelector.score`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np

from .. import knn
from .._checks import MAGNITUDE_RANGE, check_choice, check_float, check_int, param_error
from ..dist import LOCAL, Comm, PoolView
from .base import Selector, choose, register

logger = logging.getLogger(__name__)

_TIE_RTOL = 1e-6  # relative slack on the optimality test: float32 inputs make exact ties fuzzy
_FIRST_WIDTH = 128  # neighbours per query whose densities are computed before widening
_FLAT_DENSITY_PAIRS = 2e8  # "auto": exact density search while rows x pool stays under this


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


def _pair_sq_dist(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """float64 ``||a[rows] - b[cols]||^2`` for index pairs, in chunks (FAISS's float32 expansion
    ``|a|^2 + |b|^2 - 2ab`` loses the small distances that matter here)."""
    out = np.empty(rows.size, dtype=np.float64)
    for s in range(0, rows.size, chunk):
        diff = a[rows[s : s + chunk]].astype(np.float64) - b[cols[s : s + chunk]]
        out[s : s + chunk] = np.einsum("ij,ij->i", diff, diff)
    return out


@register("tsds")
class TSDSSelector(Selector):
    """TSDS selector: probabilities from the KNN-KDE (or KNN-Uniform) closed form.

    Parameters
    ----------
    alpha : float, default 0.5
        Weight of alignment versus diversity, in ``[0, 1]`` (paper: 0.075 instruction tuning,
        0.6 continued pre-training). 1 sends each query's mass to its nearest candidate; 0 spreads
        it over all ``max_K`` neighbours.
    C : float, default 5.0
        Distance scale ``> 0`` (5 suits unit-norm embeddings).
    sigma : float, default 0.75
        Kernel bandwidth ``h >= 0`` of the Epanechnikov density; 0 means KNN-Uniform.
    max_K : int, default 5000
        ``L``, neighbours prefetched per query; clipped to the pool size with a warning.
    kde_K : int, default 1000
        ``I``, most neighbours counted in a density; clipped to the pool size with a warning.
    kernel : {"kde", "uniform"}, default "kde"
        ``"uniform"`` ignores ``sigma`` (KNN-Uniform, Thm 3.1).
    replace : bool, default True
        :meth:`select` samples with replacement (multinomial, as the paper) or without
        (Gumbel-top-k).
    index : {"auto", "flat", "ivf", "hnsw"}, default "auto"
        FAISS index for the prefetch (see :func:`hf_otselect.knn.knn_search`; ``"auto"`` is flat
        up to ``knn.FLAT_MAX_BASE`` candidates, IVF above). Densities come from a radius search:
        exact (flat) under ``"flat"``, and under ``"auto"`` while one density batch costs at most
        ``_FLAT_DENSITY_PAIRS`` distance evaluations; otherwise over an IVF index.
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
    ``t*``, the mean neighbourhood size, the prefetch width used and timings.
    """

    choice = "sample"

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        C: float = 5.0,
        sigma: float = 0.75,
        max_K: int = 5000,
        kde_K: int = 1000,
        kernel: Literal["kde", "uniform"] = "kde",
        replace: bool = True,
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
        check_float(self.C, "C", owner, 0.0, low_open=True)
        check_float(self.sigma, "sigma", owner, 0.0)
        if self.sigma != 0:  # the density search squares it in float32 (a radius of 1e-300 is 0, 1e300 overflows)
            check_float(self.sigma, "sigma", f"{owner} (0 turns the density term off)", *MAGNITUDE_RANGE)
        check_int(self.max_K, "max_K", owner, 1)
        check_int(self.kde_K, "kde_K", owner, 1)
        check_choice(self.kernel, "kernel", owner, ["kde", "uniform"])
        if not isinstance(self.replace, bool):
            raise param_error("replace", owner, "a bool", self.replace, exc=TypeError)
        check_choice(self.index, "index", owner, ["auto", "flat", "ivf", "hnsw"])
        if self.nprobe is not None:
            check_int(self.nprobe, "nprobe", owner, 1)
        check_int(self.density_nprobe, "density_nprobe", owner, 1)
        check_int(self.seed, "seed", owner, 0)

    def fit(self, pool: PoolView, target: Any, *, comm: Comm | None = None) -> np.ndarray:
        """Score the whole pool in this process (one process only, for now); the state is the scores."""
        if (comm or LOCAL).world_size > 1:
            raise param_error("comm", f"{type(self).__name__}.fit", "a single process (the sharded fit is not built yet)", (comm or LOCAL).world_size)
        return self._score_all(np.asarray(pool.data), target)

    def score_batch(self, state: np.ndarray, rows: Any, index: np.ndarray) -> np.ndarray:
        """The fitted scores of these rows."""
        return state[index]

    def _score_all(self, candidates: Any, target: Any) -> np.ndarray:
        """Selection probabilities ``p`` of the candidates.

        Parameters
        ----------
        candidates : ndarray of shape (n_candidates, dim)
        target : ndarray of shape (n_target, dim)
            The ``M`` query examples.

        Returns
        -------
        ndarray of shape (n_candidates,), float64
            ``p_j = sum_i gamma_ij`` of the optimal plan: non-negative, sums to 1.

        Notes
        -----
        Densities are computed lazily: first for each query's nearest 128 neighbours, solving the
        problem on those; the width doubles (up to ``max_K``) only while the optimum is decided by
        some query reaching the end of its shortened list. Widening cannot change an optimum that
        did not touch those ends (all further breakpoints lie below ``t*``), so the result equals
        the one computed with all ``max_K`` densities.
        """
        self._check_params()
        candidates, target = self._check_pair(candidates, target)
        n, m = candidates.shape[0], target.shape[0]
        width_max = self._clipped("max_K", self.max_K, n)
        use_kde = self.kernel == "kde" and self.sigma > 0
        n_kde = self._clipped("kde_K", self.kde_K, n) if use_kde else 0
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        kind = ("flat" if n <= knn.FLAT_MAX_BASE else "ivf") if self.index == "auto" else self.index
        index = knn.build_index(candidates, index=kind, seed=self.seed)
        found = knn.knn_search(target, candidates, width_max, index=kind, nprobe=self.nprobe, seed=self.seed, prebuilt=index)
        timings["prefetch_s"] = time.perf_counter() - t0

        # FAISS's float32 distances fix the order; the prefix in use gets exact float64 distances
        # (computed lazily, as the prefix widens) and is re-sorted on them, ties by index.
        nbr = found.indices.copy()
        valid = found.valid
        dist = np.where(valid, np.sqrt(np.maximum(found.distances, 0.0)), np.inf).astype(np.float64)
        exact_upto = 0

        density = np.full(n, np.nan)  # filled lazily, only where the solution can reach
        t1 = time.perf_counter()
        width = min(width_max, _FIRST_WIDTH)
        ivf = index if kind == "ivf" else None
        density_kinds: set[str] = set()
        while True:
            if width > exact_upto:
                rows, cols = np.nonzero(valid[:, exact_upto:width])
                cols += exact_upto
                dist[rows, cols] = np.sqrt(_pair_sq_dist(target, candidates, rows, nbr[rows, cols]))
                exact_upto = width
                big = np.iinfo(np.int64).max
                order = np.lexsort((np.where(valid[:, :width], nbr[:, :width], big), dist[:, :width]), axis=1)
                nbr[:, :width] = np.take_along_axis(nbr[:, :width], order, axis=1)
                dist[:, :width] = np.take_along_axis(dist[:, :width], order, axis=1)
            sub_nbr, sub_valid = nbr[:, :width], valid[:, :width]
            if use_kde:
                need = np.unique(sub_nbr[sub_valid])
                need = need[np.isnan(density[need])]
                if need.size:
                    exact = self.index == "flat" or (self.index == "auto" and need.size * n <= _FLAT_DENSITY_PAIRS)
                    if not exact and ivf is None:
                        ivf = knn.build_index(candidates, index="ivf", seed=self.seed)
                    density_kinds.add("flat" if exact else "ivf")
                    density[need] = self._densities(candidates, need, n_kde, None if exact else ivf)
                inv = np.where(sub_valid, 1.0 / np.where(sub_valid, density[np.maximum(sub_nbr, 0)], 1.0), 1.0)
            else:
                inv = np.ones(sub_nbr.shape)
            truncated = valid[:, width:].any(axis=1) if width < width_max else np.zeros(m, dtype=bool)
            gamma, level, needs_more = knn_kde_allocation(dist[:, :width], inv, alpha=float(self.alpha), C=float(self.C), valid=sub_valid, truncated=truncated)
            if not needs_more:
                break
            width = min(width_max, 2 * width)
        timings["density_and_solve_s"] = time.perf_counter() - t1

        p = np.bincount(sub_nbr[sub_valid], weights=gamma[sub_valid], minlength=n)
        p = np.maximum(p, 0.0)
        p /= p.sum()  # 1 up to ~1e-16; makes sum(p) == 1 to the last bit choose() cares about
        support = (gamma > 0).sum(axis=1)
        self.diagnostics_ = {
            "level": level,
            "mean_neighbourhood": float(support.mean()),
            "max_neighbourhood": int(support.max()),
            "prefetch_width": int(width_max),
            "density_width": int(width),
            "n_densities": int(np.isfinite(density).sum()),
            "kde_K": int(n_kde),
            "index": kind,
            "density_index": "+".join(sorted(density_kinds)) or "none",
            "n_selected_support": int((p > 0).sum()),
            **timings,
        }
        logger.info(
            "TSDS: t*=%.3g, mean neighbourhood %.1f, %d densities, prefetch %.2fs, density+solve %.2fs",
            level, support.mean(), self.diagnostics_["n_densities"], timings["prefetch_s"], timings["density_and_solve_s"],
        )
        return p

    def _clipped(self, name: str, value: int, n: int) -> int:
        if value > n:
            logger.warning("TSDSSelector: %s=%d exceeds the %d candidates; using %d.", name, value, n, n)
            return n
        return int(value)

    def _densities(self, candidates: np.ndarray, rows: np.ndarray, n_kde: int, index: Any) -> np.ndarray:
        """Epanechnikov density ``rho`` of ``candidates[rows]`` over its ``n_kde`` nearest candidates.

        ``index``: None for an exact flat search, else a filled IVF index over ``candidates``.

        Only neighbours within ``h`` contribute, so a radius search with radius ``h^2`` (squared
        L2) finds them all; each block comes back nearest first, so the ``n_kde`` nearest are its
        first entries. The kernel is evaluated on float64 distances. ``rho >= 1`` (self).
        """
        h2 = float(self.sigma) ** 2
        kind = "flat" if index is None else "ivf"
        lims, _, nbrs = knn.radius_search(candidates[rows], candidates, h2, index=kind, nprobe=self.density_nprobe, seed=self.seed, prebuilt=index)
        counts = np.diff(lims)
        owner = np.repeat(np.arange(rows.size), counts)
        rank = np.arange(nbrs.size) - lims[owner]
        keep = rank < n_kde
        owner, nbrs = owner[keep], nbrs[keep]
        sq = _pair_sq_dist(candidates, candidates, rows[owner], nbrs)
        kern = np.maximum(0.0, 1.0 - sq / h2)
        rho = np.bincount(owner, weights=kern, minlength=rows.size)
        # The point itself is always within h; an approximate probe that misses it still counts it.
        return np.maximum(rho, 1.0)


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
    seed = check_int(seed, "seed", "sample_epochs", 0)
    children = np.random.SeedSequence(seed).spawn(n_epochs)
    return np.stack(
        [choose(p, k, mode="sample", seed=int(c.generate_state(1)[0]), replace=replace) for c in children]
    )
