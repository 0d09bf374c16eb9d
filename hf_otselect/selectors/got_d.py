"""GOT-D: select the candidates whose mass moves the pool toward the target (Kang et al. 2024).

Kang, Just, Sun, Jahagirdar, Zhang, Du, Kim, Jia. "Get more for less: Principled Data Selection
for Warming Up Fine-Tuning in LLMs", ICLR 2024. Sec. 3.2: the gradient of the entropic OT distance
``OT(mu_pool, mu_target)`` with respect to the mass of candidate ``j`` is its dual potential
``f_j`` (up to a constant shared by all candidates); the *calibrated gradient* (their Eq. 3) is

    grad_j = f_j - sum_{k != j} f_k / (N - 1),

and the candidates with the most negative calibrated gradient are selected: adding their mass
lowers the OT distance to the target the most, i.e. they fill what the pool lacks relative to the
target (a distribution *shift*, not a nearest-neighbour match). ``score`` returns ``-grad`` so that
higher means "select". The OT problem and every convention (cost ``||x - y||^2``, eps) live in
:mod:`hf_otselect.ot`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._checks import check_choice, check_embeddings, check_float, check_int, check_seed, param_error
from ..dist import LOCAL, Comm, PoolView
from ..ot import DEFAULT_RELAXATION, EPS_MODES, MAX_EPS_SCALING, ShardedSinkhornResult, check_potential, nonconvergence_message, sharded_sinkhorn
from .base import Selector, register

logger = logging.getLogger(__name__)

#: Solver modes of GOT-D's sharded fit.
BACKENDS = ("auto", "tensorized", "blocked", "geomloss")


def calibrated_gradient(f: np.ndarray) -> np.ndarray:
    """Kang et al. 2024, Eq. 3: ``f_j - sum_{k != j} f_k / (N - 1)``.

    Parameters
    ----------
    f : ndarray of shape (n,)
        Candidate dual potentials.

    Returns
    -------
    ndarray of shape (n,), float64
        The calibrated gradient (rank-equivalent to ``f``); zeros when ``n == 1``.
    """
    f = np.asarray(f, dtype=np.float64)
    n = f.size
    if n == 1:
        return np.zeros(1)
    return f - (f.sum() - f) / (n - 1)


@register("got_d")
class GOTDSelector(Selector):
    """GOT-D selector: negated calibrated OT gradient, higher = select.

    Parameters
    ----------
    eps : float, default 0.1
        Entropic regularisation of the OT problem, absolute or relative (see ``eps_mode``). The
        authors used 0.1 absolute on unnormalised 768-d embeddings. Measured on L2-normalised
        all-MiniLM-L6-v2 embeddings of real texts (``benchmarks/results/got_d_eps.md``: a 3,600-
        text pool of 6 domains, each domain's held-out texts as target, k = 300): every absolute
        eps <= 0.1 gives the same lowest OT distance selection <-> target (1.2526 at eps 0.05;
        similarity top-k 1.284, random 1.738), larger eps drift toward similarity (0.3: 1.270,
        1.0: 1.281), and Sinkhorn needs 5 iterations at 0.1 against 60 at 0.01. Hence 0.1
        absolute (relative 0.05 selects the same there).
    eps_mode : {"absolute", "relative"}, default "absolute"
        ``"relative"`` multiplies ``eps`` by the mean pairwise cost between candidates and target.
    negative_target : ndarray of shape (n_negative, dim), optional
        Examples to move *away* from (e.g. toxic texts). The score becomes
        ``score_target - negative_weight * score_negative``, where each term is the negated
        calibrated gradient against that set: candidates that would move the pool toward the
        negative set are pushed down.
    negative_weight : float, default 1.0
        Weight of the negative term, >= 0.
    backend : {"auto", "tensorized", "blocked", "geomloss"}, default "auto"
        How :func:`hf_otselect.ot.sharded_sinkhorn` runs: ``"tensorized"`` keeps each process's
        ``(n_local, n_target)`` kernel, ``"blocked"`` recomputes it every iteration, ``"auto"``
        keeps it when it fits 1 GiB per process; ``"geomloss"`` starts from GeomLoss's potentials
        (one process only).
    tol : float, default 1e-3
        L1 marginal error at which Sinkhorn stops. Below what float32 reaches on this problem, the
        solve is finished in float64; below float64's floor it stops there with a warning; 0 runs
        exactly ``max_iter`` iterations (see :mod:`hf_otselect.ot`, Stopping).
    max_iter : int, default 2000
        Most Sinkhorn iterations (the authors' cap).
    chunk_size : int, optional
        When given, the pool is split into seeded random chunks of at most this many candidates,
        each solved against the whole target, and each candidate is scored by its calibrated
        gradient *within its chunk*. This is a different problem from the global one (each chunk
        is its own pool; scores of different chunks are comparable only because the chunks are
        random samples of the same pool). Measured top-300 overlap with the global selection on
        the 3,600-text pool above: 0.980 with 2 chunks, 0.973 with 4, 0.966 with 8 (mean over 6
        targets; minimum 0.957).
        Chunked scores are not invariant to the order of the candidates (the chunks are). One
        process only: a multi-process :meth:`fit` refuses it (the chunks come from one permutation
        of the whole pool), and the sharded global solve is what scales.
    seed : int, default 0
        Seed of the chunk assignment (only used with ``chunk_size``).
    eps_scaling : int, default 0
        Warm start by eps-scaling when the kernel is not kept (``backend="blocked"``, or ``"auto"``
        beyond 1 GiB per process): this many log-domain passes at geometrically decreasing eps,
        from the mean cost down toward ``eps``, each starting from the last one's potentials,
        before the iterations at ``eps`` (eps-scaling: Kosowsky & Yuille 1994, "The invisible hand
        algorithm"; Schmitzer 2019, "Stabilized sparse scaling algorithms..."; Chizat et al. 2018,
        "Scaling algorithms for unbalanced optimal transport problems"; GeomLoss's ``scaling``). The passes count in ``n_iter``; the stopping rule is the marginal
        error at ``eps`` alone, so the potentials are today's within ``tol``. Ignored when the
        kernel is kept (a step of eps would cost a pass over the rows to rebuild it). Off by
        default: on the clustered 384-d problem of ``benchmarks/results/ot_scaling.md`` the
        iterations at ``eps`` are set by Sinkhorn's linear rate, not by the cold start, so the
        coarse passes saved none (see that page).
    init_g : array_like of shape (n_target,), optional
        Starting target potential ``g`` (cost ``||x - y||^2``, absolute units), e.g. a sample
        fit's: ``fit_selector(pool, target, sample=0.01).state.target.results[0].g``. Used for
        the target only (not the negative target), in every chunk. Only the start changes; the
        stopping rule and the fixed point are the same.
    relaxation : float in [1, 2), default ``DEFAULT_RELAXATION`` (1.0: plain Sinkhorn)
        Over-relaxation ``omega`` of the Sinkhorn passes when the kernel is not kept (as for
        ``eps_scaling``): each half-step moves a potential to ``(1 - omega) * old + omega *
        update`` in the log domain (Thibault et al. 2021, "Overrelaxed Sinkhorn-Knopp algorithm
        for regularized optimal transport"; Lehmann et al. 2022, "A note on overrelaxation in the
        Sinkhorn algorithm"). Same fixed point, so the same scores within ``tol``; fewer passes
        where Sinkhorn's linear rate sets them: 1.4 took 9 passes against 17 at eps 0.01 on 100k
        x 1k, but 4 against 3 at eps 0.1 (``benchmarks/results/ot_scaling.md``), hence off by
        default. Safeguarded: a relaxed step that would lower the dual objective is replaced by
        the plain one and the solve goes on plain (see :func:`hf_otselect.ot.sharded_sinkhorn`).
    device : str, optional
        Torch device for the solver.

    Attributes
    ----------
    diagnostics_ : dict
        ``ot_distance`` (entropic OT value candidates <-> target, cost ``||x - y||^2``; in
        chunked mode the mean over chunks), ``n_iter``, ``converged``, ``marginal_error``, ``eps``
        (absolute value used), ``backend``, ``n_chunks``, ``processes``; with a negative target
        also ``negative_ot_distance``, ``negative_n_iter`` and ``negative_converged``.
    target_potentials_ : ndarray of shape (n_target,) or None
        Target dual potentials ``g`` after the last fit (global mode only). Candidate potentials
        are not kept (they are as many as the pool); :meth:`score_batch` recomputes them.
    """

    any_magnitude = True  # costs are shifted to the target mean and rescaled by a power of two (ot.py)

    def __init__(
        self,
        *,
        eps: float = 0.1,
        eps_mode: str = "absolute",
        negative_target: np.ndarray | None = None,
        negative_weight: float = 1.0,
        backend: str = "auto",
        tol: float = 1e-3,
        max_iter: int = 2000,
        chunk_size: int | None = None,
        seed: int = 0,
        eps_scaling: int = 0,
        init_g: Any = None,
        relaxation: float = DEFAULT_RELAXATION,
        device: Any = None,
    ) -> None:
        self.eps = eps
        self.eps_mode = eps_mode
        self.negative_target = negative_target
        self.negative_weight = negative_weight
        self.backend = backend
        self.tol = tol
        self.max_iter = max_iter
        self.chunk_size = chunk_size
        self.seed = seed
        self.eps_scaling = eps_scaling
        self.init_g = init_g
        self.relaxation = relaxation
        self.device = device
        self.diagnostics_ = {}

    def _validate(self) -> None:
        owner = type(self).__name__
        check_float(self.eps, "eps", owner, 0.0, low_open=True)
        check_choice(self.eps_mode, "eps_mode", owner, EPS_MODES)
        check_choice(self.backend, "backend", owner, BACKENDS)
        check_float(self.negative_weight, "negative_weight", owner, 0.0)
        check_float(self.tol, "tol", owner, 0.0)
        check_int(self.max_iter, "max_iter", owner, 1)
        check_seed(self.seed, "seed", owner)
        check_int(self.eps_scaling, "eps_scaling", owner, 0, MAX_EPS_SCALING)
        check_float(self.relaxation, "relaxation", owner, 1.0, 2.0, high_open=True)
        if self.init_g is not None and self.backend == "geomloss":
            raise param_error("init_g", owner, "None with backend='geomloss' (GeomLoss makes its own starting potentials)", "an array")
        if self.chunk_size is not None:
            check_int(self.chunk_size, "chunk_size", owner, 2)

    def _solve(
        self, pool: PoolView, target: np.ndarray, comm: Comm, target_name: str, init_g: np.ndarray | None = None
    ) -> ShardedSinkhornResult:
        """Target potentials of one OT problem pool <-> ``target`` (every process, same result)."""
        keep = {"auto": None, "tensorized": True, "blocked": False, "geomloss": True}[self.backend]
        res = sharded_sinkhorn(
            pool, target, self.eps, eps_mode=self.eps_mode, tol=self.tol, max_iter=self.max_iter, device=self.device,
            comm=comm, keep_kernel=keep, start="geomloss" if self.backend == "geomloss" else "zeros",
            eps_scaling=self.eps_scaling, init_g=init_g, relaxation=self.relaxation, owner=type(self).__name__, names=("eps", "candidates", target_name),
        )
        if not (np.isfinite(res.g_f).all() and math.isfinite(res.f_sum)):  # never let NaN reach choose
            raise param_error("eps", type(self).__name__, f"large enough for finite OT potentials against '{target_name}' "
                              "(raise it, or pass a multiple of the mean cost with eps_mode='relative')", self.eps)
        if not res.converged and self.tol > 0:
            what = f"{type(self).__name__} against '{target_name}', n={res.n_global}, m={len(res.g)}"
            warnings.warn(nonconvergence_message(res, self.tol, what), RuntimeWarning, stacklevel=3)
        return replace(res, f_local=None)  # the state keeps nothing of size n

    def _fit_direction(
        self, pool: PoolView, target: np.ndarray, comm: Comm, target_name: str, init_g: np.ndarray | None = None
    ) -> _Direction:
        """Solve the global problem, or one problem per seeded chunk (one process only)."""
        n = pool.n_global
        if self.chunk_size is None or self.chunk_size >= n:
            return _Direction((self._solve(pool, target, comm, target_name, init_g),), None)
        # Chunks are drawn from one permutation of the whole pool (as before the sharded fit); a
        # sharded pool has no such permutation, so multi-process runs refuse chunk_size in fit.
        perm = np.random.default_rng(self.seed).permutation(n)
        n_chunks = -(-n // self.chunk_size)
        chunk_of = np.empty(n, dtype=np.int64)
        results = []
        for c, rows in enumerate(np.array_split(perm, n_chunks)):  # near-equal sizes, each <= chunk_size
            chunk_of[rows] = c
            results.append(self._solve(PoolView(pool.read(rows)), target, LOCAL, target_name, init_g))
        return _Direction(tuple(results), chunk_of)

    def fit(self, pool: PoolView, target: Any, *, comm: Comm | None = None) -> GOTDState:
        """Solve entropic OT pool <-> target over the sharded pool; keep only what scoring needs.

        Parameters
        ----------
        pool : PoolView
            This process's candidate rows.
        target : ndarray of shape (n_target, dim)
            The whole target, on every process.
        comm : Comm, optional
            The process group (default: this process alone).

        Returns
        -------
        GOTDState
            The target potentials ``g`` (whose c-transform gives each row's ``f``), ``sum_i f_i``
            and ``N`` for the calibrated gradient, for the target and the negative target; the
            same on every process. With ``chunk_size`` (one process only) one such triple per
            chunk and the chunk of each row.
        """
        comm = comm or LOCAL
        owner = type(self).__name__
        self._validate()
        if self.chunk_size is not None and comm.world_size > 1:
            raise param_error(
                "chunk_size", f"{owner}.fit", "None in a multi-process run (chunks come from one permutation of the "
                "whole pool, which no process holds; the sharded global solve replaces them)", self.chunk_size,
            )
        target = check_embeddings(target, "target", owner, dim=pool.dim)
        negative = None
        if self.negative_target is not None:
            negative = check_embeddings(self.negative_target, "negative_target", owner, dim=pool.dim)
        init_g = None if self.init_g is None else check_potential(self.init_g, len(target), "init_g", owner)
        if pool.n_global == 0:
            raise param_error("candidates", owner, "a non-empty pool (n_candidates >= 1)", "0 rows")
        pos = self._fit_direction(pool, target, comm, "target", init_g)
        neg = self._fit_direction(pool, negative, comm, "negative_target") if negative is not None else None
        self.target_potentials_ = pos.results[0].g if pos.chunk_of is None else None
        self.diagnostics_ = pos.diagnostics(comm.world_size)
        if neg is not None:
            nd = neg.diagnostics(comm.world_size)
            self.diagnostics_.update({"negative_ot_distance": nd["ot_distance"], "negative_n_iter": nd["n_iter"],
                                      "negative_converged": nd["converged"]})
        logger.info("GOT-D fitted on %d candidates (%d processes): OT distance %.4g, %d iterations",
                    pool.n_global, comm.world_size, self.diagnostics_["ot_distance"], self.diagnostics_["n_iter"])
        return GOTDState(pos, neg, float(self.negative_weight), self.device)

    def score_batch(self, state: GOTDState, rows: Any, index: np.ndarray) -> np.ndarray:
        """Negated calibrated gradient of each row, from the fitted state alone.

        Parameters
        ----------
        state : GOTDState
        rows : ndarray of shape (b, dim)
        index : ndarray of shape (b,), int64
            Global row indices (used only to find a row's chunk in ``chunk_size`` mode).

        Returns
        -------
        ndarray of shape (b,), float64
            ``-grad`` against the target, minus ``negative_weight`` times the same against the
            negative target when there is one.
        """
        rows = np.asarray(rows)
        score = state.target.score(rows, index, state.device)
        if state.negative is not None:
            score = score - state.negative_weight * state.negative.score(rows, index, state.device)
        return score


@dataclass(frozen=True)
class _Direction:
    """Fitted OT against one target set: one result, or one per chunk with each row's chunk."""

    results: tuple[ShardedSinkhornResult, ...]
    chunk_of: np.ndarray | None

    def score(self, rows: np.ndarray, index: np.ndarray, device: Any) -> np.ndarray:
        """``-grad_j`` of Kang et al. Eq. 3 for these rows, ``f_j`` being the c-transform of ``g``."""
        if self.chunk_of is None:
            return _negated_gradient(self.results[0], rows, device)
        chunk = self.chunk_of[np.asarray(index, dtype=np.int64)]
        out = np.empty(len(rows))
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = _negated_gradient(self.results[c], rows[sel], device)
        return out

    def diagnostics(self, world_size: int) -> dict[str, Any]:
        r = self.results
        return {"ot_distance": float(np.mean([x.cost for x in r])), "n_iter": int(max(x.n_iter for x in r)),
                "converged": bool(all(x.converged for x in r)), "marginal_error": float(max(x.marginal_error for x in r)),
                "eps": float(np.mean([x.eps for x in r])), "backend": "tensorized" if all(x.kernel_kept for x in r) else "blocked",
                "n_chunks": len(r), "processes": int(world_size),
                "precision": "float64" if any(x.precision == "float64" for x in r) else "float32"}


def _negated_gradient(res: ShardedSinkhornResult, rows: np.ndarray, device: Any) -> np.ndarray:
    """``-(f_j - (sum_k f_k - f_j) / (N - 1))`` with ``f_j`` the c-transform of ``g`` (Eq. 3)."""
    n = res.n_global
    if n == 1:
        return np.zeros(len(rows))
    f = res.c_transform(rows, device=device)
    return -(f - (res.f_sum - f) / (n - 1))


@dataclass(frozen=True)
class GOTDState:
    """What :meth:`GOTDSelector.fit` leaves: O(n_target) numbers per target set (no candidate row).

    Attributes
    ----------
    target : _Direction
        Fitted OT against the target (``g``, ``sum f``, ``N``; per chunk in chunked mode).
    negative : _Direction or None
        The same against the negative target.
    negative_weight : float
    device : str or None
        Where :meth:`GOTDSelector.score_batch` computes the c-transforms.
    """

    target: _Direction
    negative: _Direction | None
    negative_weight: float
    device: Any = None
