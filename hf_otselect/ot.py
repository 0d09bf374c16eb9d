"""Entropic optimal transport dual potentials: the package's one boundary to OT code.

Every OT convention of the package lives here and nowhere else:

- **Cost**: ``C[i, j] = ||x_i - y_j||^2`` (squared Euclidean, *no* factor 1/2). GeomLoss uses
  ``||x - y||^2 / 2`` with ``eps = blur**p``; POT's ``ot.dist`` uses ours. Nothing outside this
  module converts between them.
- **Problem**: balanced entropic OT with KL regularisation to the product of the marginals,
  ``OT_eps(a, b) = min_P <C, P> + eps * KL(P | a b^T)`` subject to ``P 1 = a`` and ``P^T 1 = b``
  (Cuturi 2013; Peyre & Cuturi 2019, "Computational Optimal Transport", Eq. 4.2 / Prop. 4.4 in
  their numbering of the log-domain iterations).
- **Potentials**: ``f`` of shape ``(n,)`` lives on ``x`` (the first argument), ``g`` of shape
  ``(m,)`` on ``y``. The optimal plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``. The
  pair is defined up to ``(f + c, g - c)``; we return it as the iterations leave it (no shift).
- **eps** is absolute (in the units of ``C``) unless ``eps_mode="relative"``, where it is
  multiplied by the mean of ``C`` over all pairs (computed exactly in O((n + m) d)). The absolute
  value actually used is reported in :attr:`SinkhornResult.eps`.
- **Stopping**: the L1 error of the row marginal, ``sum_i |(P 1)_i - a_i|``, measured every
  iteration (it falls out of the ``f`` update at no extra cost); the column marginal is exact
  after each ``g`` update. Rounding puts a floor under that error which no formula predicts (in
  float32 it was 2e-8 at 50 x 10 and 2.6e-5 at 100k x 100, eps 0.1 relative), so the floor is
  found where it is met: an error below ``sqrt(finfo(dtype).eps)`` with no new minimum for
  ``STALL_ITERATIONS`` iterations has stalled. A float32 solve that stalls above ``tol`` is finished in float64 from where it stopped
  (the caller asked for more than float32 can give); one that stalls in float64 stops there,
  not converged. ``tol=0`` runs exactly ``max_iter`` iterations in the inputs' precision.

Why our own solver rather than GeomLoss or POT (measured on this machine, see PEERS.md and
``benchmarks/results/ot_scaling.md``): GeomLoss anneals eps on a fixed schedule and never checks
convergence, so its potentials can be far from the fixed point (rank agreement 0.894 at eps=0.01),
and its tensorized path needs the full N x M matrix plus autograd buffers; POT's log-domain solver
checks every 10 iterations and its lazy path is 5-10x slower. GOT-D's problem converges in 2-16
iterations, so checking each iteration and making each iteration cheap is what matters. We do it
in torch (CPU or CUDA). Every back end is one solver, :func:`sharded_sinkhorn`, which
reads the candidates through a :class:`~hf_otselect.dist.PoolView` (this process's rows, in
blocks) and talks to other processes only through a :class:`~hf_otselect.dist.Comm`: per
iteration an all-reduce of per-target (max, sum-exp) pairs or column sums, O(m) bytes whatever N
is (SwAV's distributed Sinkhorn pattern). :func:`sinkhorn_potentials` is that solver on one
process with the rows in memory. Its state for scoring is the target side alone: a row's
potential is the c-transform of ``g`` (:meth:`ShardedSinkhornResult.c_transform`).

**Scale**: costs are computed after shifting both clouds to the target mean when they sit far
from the origin (so ``|x|^2 + |y|^2 - 2 x.y`` does not cancel), and on ``x / s``, ``y / s`` with
``eps / s^2`` for a power of two ``s`` near the root mean cost (exact in floating point), so finite
vectors of any magnitude neither overflow nor underflow. ``eps`` must lie within
``EPS_RELATIVE_RANGE`` times the mean cost; outside it the solver refuses, naming ``eps``.

**Warm starts** (:func:`sharded_sinkhorn`'s ``eps_scaling`` and ``init_g``): a few passes at
coarser eps, or a given target potential such as a sample fit's ``g``, before the iterations at
the requested eps. The stopping rule is unchanged, so the potentials are the cold solve's within
``tol``; what changes is the number of passes, each one GEMM per block when no kernel is kept.
Measured (``benchmarks/results/ot_scaling.md``): they save passes where the cold start's first
iterations dominate (small eps, float32 600 x 50: 157 -> 131 with 8 coarse steps, 108 from a half
sample's ``g``), not where Sinkhorn's linear rate does (100k x 1k, eps 0.01).

**Over-relaxation** (:func:`sharded_sinkhorn`'s ``relaxation``; off by default, see
``DEFAULT_RELAXATION``): the no-kernel passes move each potential to ``(1 - omega) * old + omega *
update`` (Thibault et al. 2021; Lehmann et al. 2022), which shortens the linear rate itself. Same
fixed point and stopping rule (the error is then the row plus the column marginal error of the
relaxed plan); a relaxed step that would lower the dual objective falls back to plain Sinkhorn
for the rest of the solve, since global convergence is not guaranteed for ``omega > 1``.

The modes:

``"tensorized"``
    Keeps one ``(n, m)`` matrix (per process: its own rows): the Gibbs kernel with the current
    potentials absorbed,
    ``K_ij = exp((f_i + g_j - C_ij) / eps)``, and iterates on scalings ``u, v`` with two
    matrix-vector products per iteration (the stabilised scaling algorithm of Schmitzer 2019,
    "Stabilized sparse scaling algorithms for entropy regularized transport problems", Alg. 2).
    When a scaling leaves ``[exp(-tau), exp(tau)]`` it is absorbed into the potentials and the
    kernel is rebuilt by an exact log-domain iteration, so tiny eps never under- or overflows.
``"blocked"``
    Needs no ``(n, m)`` matrix: each iteration streams row blocks of ``x``, takes the cost block
    (``|x|^2 + |y|^2 - 2 x y^T``, one GEMM) and does both log-domain half-steps in one pass (row
    log-sum-exp for ``f``, then the column sums for ``g`` by one matrix-vector product on the same
    exponentials). The cost blocks of the first rows that fit ``memory_budget`` are kept from the
    first pass; the rest are recomputed each pass. Memory is O((n + m) d + block_size * m) plus
    that budget.
``"geomloss"``
    GeomLoss's ``SamplesLoss("sinkhorn", p=2, debias=False, potentials=True)`` (tensorized, eps
    annealed down to the target on its fixed schedule), converted to our conventions (GeomLoss's
    cost is ``C / 2``, so its ``blur**2`` is ``eps / 2`` and its potentials are half ours), then
    finished with the iterations above at the target eps until the marginal error is below
    ``tol``: GeomLoss alone stops without checking convergence. Needs the full ``(n, m)`` matrix
    and was 3-8x slower than ``"tensorized"`` here, so ``"auto"`` never picks it; it is there to
    cross-check our solver against a well-kept library.
``"auto"``
    ``"tensorized"`` when the ``(n, m)`` matrix fits ``memory_budget``, else ``"blocked"``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._checks import check_choice, check_float, check_int, param_error
from .dist import LOCAL, Comm, PoolView

logger = logging.getLogger(__name__)

Backend = Literal["auto", "tensorized", "blocked", "geomloss"]
EpsMode = Literal["absolute", "relative"]

# No pykeops back end: on CPU it compiled but ran ~50x slower than the tensorized path at 384-d
# (PEERS.md), CI cannot run it, and the blocked path already needs no (n, m) matrix.
BACKENDS = ("auto", "tensorized", "blocked", "geomloss")
EPS_MODES = ("absolute", "relative")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes allowed for the (n, m) kernel of the tensorized back end
_BLOCK_ELEMENTS = 1 << 23  # about 32 MB of float32 per cost block in the blocked pass
# Scalings are absorbed into the potentials once |log u| or |log v| exceeds this. With float32
# kernels, entries that underflowed (< e^-87 relative) stay negligible after scaling by e^tau.
_TAU = 40.0
# A marginal error below the square root of the dtype's epsilon (3e-4 in float32, 1.5e-8 in float64)
# with no new minimum for this many iterations has met its rounding floor. Above that level a flat
# error is a plateau of the iterations themselves (degenerate clouds stay near 0.1 for a hundred
# iterations and then fall), which more iterations do get past.
STALL_ITERATIONS = 50
# Valid eps, as a multiple of the mean cost between the clouds. Below 1e-8 the entropic term is
# smaller than the float32 rounding of the costs (6e-8 relative), so the potentials would be set by
# rounding; above 1e3 the costs shift the log-sum-exp terms (about log m) by less than 1e-3 of
# themselves, and float32 keeps less than four digits of the differences that rank the rows.
EPS_RELATIVE_RANGE = (1e-8, 1e3)
# Most coarse eps steps of eps-scaling (each costs one pass over the rows).
MAX_EPS_SCALING = 64
# GOT-D's over-relaxation of its no-kernel passes (sharded_sinkhorn's ``relaxation``; 1 = plain
# Sinkhorn). On the benchmark problem (benchmarks/results/ot_scaling.md, 100k x 1k) omega 1.4 took
# 9 passes against 17 at eps 0.01 but 4 against 3 at eps 0.1, GOT-D's default eps: a fixed omega
# overshoots where plain Sinkhorn is already fast, so the default stays plain; pass 1.4 for small eps.
DEFAULT_RELAXATION = 1.0
# The clouds are shifted to the target mean when |mean|^2 exceeds this multiple of the mean cost:
# |x|^2 + |y|^2 - 2 x.y then cancels at most this much. Unit-norm embeddings (|mean| <= 1, mean
# cost ~1-2) are never shifted, so their numbers are those of the plain formula.
_CENTER_RATIO = 4.0


@dataclass(frozen=True)
class SinkhornResult:
    """Converged (or last) state of an entropic OT solve.

    Attributes
    ----------
    f : ndarray of shape (n,), float64
        Dual potential on ``x`` (the first argument).
    g : ndarray of shape (m,), float64
        Dual potential on ``y`` (the second argument).
    cost : float
        The dual objective ``<f, a> + <g, b>``. At the fixed point it equals the entropic OT value
        ``min_P <C, P> + eps KL(P | a b^T)`` with ``C = ||x - y||^2`` (not debiased, >= 0).
    n_iter : int
        Sinkhorn iterations done (one iteration updates ``f`` then ``g``).
    converged : bool
        Whether ``marginal_error < tol`` was reached within ``max_iter``.
    marginal_error : float
        L1 row-marginal error ``sum_i |(P 1)_i - a_i|`` measured in the last iteration, before its
        final update (so the returned potentials are at least this accurate in practice).
    eps : float
        The absolute eps used (after ``eps_mode="relative"`` scaling).
    backend : str
        The back end that ran: ``"tensorized"``, ``"blocked"`` or ``"geomloss"``.
    precision : str
        ``"float32"`` or ``"float64"``: what the last iterations ran in (a float32 solve that stalled
        above ``tol`` is finished in float64).
    """

    f: np.ndarray
    g: np.ndarray
    cost: float
    n_iter: int
    converged: bool
    marginal_error: float
    eps: float
    backend: str
    precision: str = "float32"


def _as_float_array(x: Any, name: str, owner: str) -> np.ndarray:
    """Return ``x`` as a 2-D finite float32/float64 numpy array (float16/bfloat16 up-cast)."""
    if hasattr(x, "detach"):  # torch tensor, any float dtype including bfloat16
        t = x.detach().cpu()
        x = t.double().numpy() if str(t.dtype) == "torch.float64" else t.float().numpy()
    try:
        arr = np.asarray(x)
    except Exception as err:
        raise param_error(name, owner, "a 2-D float array of shape (n, dim)", type(x).__name__, exc=TypeError) from err
    if arr.dtype.kind == "V" or str(arr.dtype) == "bfloat16":  # ml_dtypes bfloat16
        arr = arr.astype(np.float32)
    if arr.dtype.kind not in "fiu":
        raise param_error(name, owner, "a 2-D float array of shape (n, dim)", f"an array of dtype {arr.dtype}", exc=TypeError)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise param_error(name, owner, "a non-empty 2-D float array of shape (n, dim)", f"an array of shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64 if arr.dtype == np.float64 else np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise param_error(name, owner, "finite (no NaN or Inf)", f"{bad} row(s) with NaN or Inf")
    return arr


def _as_weights(w: Any, n: int, name: str, owner: str) -> np.ndarray:
    """Return probability weights of length ``n`` (uniform when ``w`` is None), summing to 1."""
    if w is None:
        return np.full(n, 1.0 / n)
    arr = np.asarray(w, dtype=np.float64)
    if arr.shape != (n,) or not np.isfinite(arr).all() or (arr <= 0).any():
        raise param_error(name, owner, f"a positive finite array of shape ({n},)", f"an array of shape {arr.shape} with min {arr.min() if arr.size else None}")
    return arr / arr.sum()


def _resolve_device(device: Any, owner: str) -> Any:
    import torch

    if isinstance(device, str):  # the one resolver: 'cuda' on a machine without it is refused, named
        from .embed import resolve_device

        device = resolve_device(device, owner)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def mean_sq_distance(x: np.ndarray, y: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> float:
    """Mean of ``||x_i - y_j||^2`` over all pairs weighted by ``a_i b_j``, exactly, in O((n + m) d).

    Uses ``E||x - y||^2 = E||x||^2 + E||y||^2 - 2 <E x, E y>``.
    """
    a = np.full(len(x), 1.0 / len(x)) if a is None else a
    b = np.full(len(y), 1.0 / len(y)) if b is None else b
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mx, my = a @ x64, b @ y64
    return float(a @ (x64 * x64).sum(1) + b @ (y64 * y64).sum(1) - 2.0 * mx @ my)


@dataclass(frozen=True)
class ShardedSinkhornResult:
    """What a sharded solve leaves, identical on every process except ``f_local``.

    The state needs no candidate row: a row's potential is the c-transform of ``g_f``
    (:meth:`c_transform`), ``f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)``, which is the
    ``f`` the solve ended with.

    Attributes
    ----------
    y : ndarray of shape (m, dim)
        The target, as given (float32, or float64 when the pool is float64 too).
    b : ndarray of shape (m,), float64
        Target weights (sum 1).
    g : ndarray of shape (m,), float64
        Target potential after the last half-step (the column marginal is exact for it).
    g_f : ndarray of shape (m,), float64
        The target potential whose c-transform is the candidates' ``f`` (``g`` one half-step
        earlier).
    f_sum : float
        ``sum_i f_i`` over every candidate of every process.
    cost : float
        Dual value ``<a, f> + <b, g>`` (the entropic OT value at the fixed point, cost
        ``||x - y||^2``).
    n_global : int
        Candidates over all processes.
    n_iter, converged, marginal_error
        As in :class:`SinkhornResult` (the marginal error is summed over every process).
    eps : float
        The absolute eps used.
    kernel_kept : bool
        Whether each process kept its ``(n_local, m)`` kernel block (else recomputed per pass).
    center : ndarray of shape (dim,) or None
        The point both clouds were shifted by before computing costs (costs do not change).
    scale : float
        A power of two ``s``; the solve ran on ``x / s``, ``y / s`` with ``eps / s**2``, which
        is exact in floating point, and its potentials were multiplied back by ``s**2``.
    f_local : ndarray of shape (n_local,) or None
        This process's candidate potentials (dropped by callers that keep the result as state).
    precision : str
        ``"float32"`` or ``"float64"``: what the last iterations ran in.
    stalled : bool
        Whether the solve stopped because the error stopped falling (its rounding floor) above ``tol``.
    warm_passes : int
        Of ``n_iter``, the passes run at the coarser eps of eps-scaling (0 without it).
    relaxed_passes : int
        Of ``n_iter``, the passes whose over-relaxed potentials were kept for the next pass (0
        with ``relaxation=1`` or the kernel kept; fewer than the passes at ``eps`` minus one once
        the safeguard has fallen back to plain Sinkhorn).
    """

    y: np.ndarray
    b: np.ndarray
    g: np.ndarray
    g_f: np.ndarray
    f_sum: float
    cost: float
    n_global: int
    n_iter: int
    converged: bool
    marginal_error: float
    eps: float
    kernel_kept: bool
    center: np.ndarray | None
    scale: float
    f_local: np.ndarray | None = None
    precision: str = "float32"
    stalled: bool = False
    warm_passes: int = 0
    relaxed_passes: int = 0

    def c_transform(self, rows: Any, *, device: Any = None, block_rows: int | None = None) -> np.ndarray:
        """Potentials of any rows against the fitted target: ``-eps log sum_j b_j exp((g_j - C_ij)/eps)``.

        Parameters
        ----------
        rows : array_like of shape (n_rows, dim)
        device : str or torch.device, optional
        block_rows : int, optional
            Rows per GEMM (default about 2**23 / m).

        Returns
        -------
        ndarray of shape (n_rows,), float64
            With ``g_f`` this is the ``f`` of the solve for the rows it was fitted on.
        """
        import torch

        rows = np.asarray(rows)
        dtype = np.float64 if self.y.dtype == np.float64 and rows.dtype == np.float64 else np.float32
        dev = _resolve_device(device, "ShardedSinkhornResult.c_transform")
        prep = _prep(self.center, self.scale, dtype, dev)
        s2 = self.scale * self.scale
        eps = self.eps / s2
        with torch.no_grad():
            Y = prep(self.y)
            hg = torch.from_numpy((self.g_f / s2 + eps * np.log(self.b)) / eps).to(device=dev, dtype=Y.dtype)
            ny2 = (-(Y * Y).sum(1) / eps).unsqueeze(0)
            step = block_rows or max(1, _BLOCK_ELEMENTS // len(self.y))
            out = np.empty(len(rows))
            for s in range(0, len(rows), step):
                X = prep(np.ascontiguousarray(rows[s : s + step], dtype=dtype))
                S = torch.addmm(ny2, X, Y.T, alpha=2.0 / eps).add_(hg.unsqueeze(0))
                rmax = S.amax(1)
                lse = rmax + S.sub_(rmax.unsqueeze(1)).exp_().sum(1).log()
                out[s : s + step] = ((X * X).sum(1) - eps * lse).double().cpu().numpy() * s2
        return out


def _from_numpy(a: np.ndarray) -> Any:
    """``torch.from_numpy(np.ascontiguousarray(a))``, read-only arrays included.

    Read-only rows are common here (a memory-mapped embedding cache, an Arrow-backed column); torch
    warns on them because a tensor could write through. Every tensor made here is only read (or
    first converted to another dtype or device, which copies), so the warning would only alarm users.
    The warning filter is touched only for those arrays: this runs once per block per iteration.
    """
    import torch

    a = np.ascontiguousarray(a)
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(a)


def _prep(center: np.ndarray | None, scale: float, np_dtype: Any, device: Any) -> Any:
    """A function taking numpy rows to torch ``(rows - center) / scale`` in the compute dtype.

    The shift is done in float64 (so huge offsets cancel exactly); the division by a power of two
    is exact. With no shift and scale 1 the rows are passed through untouched.
    """
    import torch

    dt = torch.float64 if np_dtype == np.float64 else torch.float32
    inv = 1.0 / scale

    def prep(rows: np.ndarray) -> Any:
        if center is None:
            t = _from_numpy(rows).to(device=device, dtype=dt)
        else:
            t = (_from_numpy(rows).to(device=device, dtype=torch.float64) - _from_numpy(center).to(device)).to(dt)
        return t if inv == 1.0 else t * inv  # not in place: t may share the caller's memory

    return prep


def _frame(
    pool: PoolView, y: np.ndarray, a_local: np.ndarray | None, b: np.ndarray, np_dtype: Any, block: int, comm: Comm
) -> tuple[float, np.ndarray | None, float]:
    """Mean cost over all pairs (weights a, b), the shift and the power-of-two scale of the solve.

    One pass over this process's rows and one all-reduce of a scalar. Taken around the target mean
    ``c`` so that it is exact at any offset: ``E||x - y||^2 = E||x - c||^2 + E||y - c||^2``.
    """
    y64 = y.astype(np.float64)
    c = b @ y64
    acc, s = 0.0, 0
    for _, rows in pool.blocks(block, dtype=np_dtype):
        d = rows.astype(np.float64) - c
        sq = np.einsum("ij,ij->i", d, d)
        acc += float(sq.sum() / pool.n_global if a_local is None else a_local[s : s + len(rows)] @ sq)
        s += len(rows)
    dy = y64 - c
    mean_cost = float(comm.all_reduce(np.array([acc]), "sum")[0]) + float(b @ np.einsum("ij,ij->i", dy, dy))
    if mean_cost <= (64 * np.finfo(np.float64).eps) ** 2 * float(c @ c):
        # Identical clouds: what is left is the rounding of the weighted mean c (1/6 is inexact), not a
        # cost; how much is left depends on the BLAS's summation order, so it must not set eps's range.
        mean_cost = 0.0
    if not math.isfinite(mean_cost):
        return mean_cost, None, 1.0
    if not mean_cost > 0:  # every pair coincides: shifted to c, every cost is 0 in any dtype
        return 0.0, (c if float(c @ c) > 0 else None), 1.0
    center = c if float(c @ c) > _CENTER_RATIO * mean_cost else None
    scale = 2.0 ** round(0.5 * math.log2(mean_cost))
    return mean_cost, center, scale


def sharded_sinkhorn(
    pool: PoolView,
    target: Any,
    eps: float = 0.1,
    *,
    b: Any = None,
    a_local: Any = None,
    eps_mode: EpsMode = "absolute",
    tol: float = 1e-3,
    max_iter: int = 1000,
    device: Any = None,
    comm: Comm | None = None,
    keep_kernel: bool | None = None,
    memory_budget: int | None = None,
    block_rows: int | None = None,
    start: Literal["zeros", "geomloss"] = "zeros",
    eps_scaling: int = 0,
    eps_start: float | None = None,
    init_g: Any = None,
    relaxation: float = 1.0,
    owner: str = "sharded_sinkhorn",
    names: tuple[str, str, str] = ("eps", "candidates", "target"),
) -> ShardedSinkhornResult:
    """Entropic OT between a pool sharded over processes and a target held by every process.

    The same log-domain Sinkhorn as :func:`sinkhorn_potentials` (Peyre & Cuturi 2019, Sec. 4.4),
    distributed as SwAV does its Sinkhorn across GPUs: each process updates the potentials of its
    own rows (``f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps)``, a per-row c-transform), and the
    target update ``g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps)`` combines each process's
    per-target (max, sum-exp) pairs with all-reduces: O(m) bytes per iteration whatever N is.
    When every process's ``(n_local, m)`` kernel fits ``memory_budget`` it is kept and iterated on
    with two matrix-vector products per iteration (stabilised scaling); otherwise the cost blocks
    of the first rows that fit the budget are kept from the first pass and only the rows beyond
    them recompute theirs (one GEMM per block) in each log-domain pass. Costs are taken after shifting
    both clouds to the target mean when they sit far from the origin, and scaled by a power of two
    near the root mean cost, so finite vectors of any magnitude neither overflow nor underflow.

    Parameters
    ----------
    pool : PoolView
        This process's candidate rows (read in blocks; float64 data with a float64 target is
        computed in float64, anything else in float32).
    target : array_like of shape (m, dim)
        The whole target, identical on every process.
    eps : float, default 0.1
        Entropic regularisation (absolute, or a multiple of the mean cost when
        ``eps_mode="relative"``). It must lie within ``EPS_RELATIVE_RANGE`` times the mean cost.
    b : array_like of shape (m,), optional
        Target weights (uniform when omitted).
    a_local : array_like of shape (n_local,), optional
        Weights of this process's rows, normalised over all processes (uniform when omitted).
    eps_mode : {"absolute", "relative"}, default "absolute"
    tol : float, default 1e-3
        Stop when the L1 row-marginal error, summed over every process, is below ``tol``.
    max_iter : int, default 1000
    device : str or torch.device, optional
    comm : Comm, optional
        The process group (default: this process alone).
    keep_kernel : bool, optional
        Force keeping (True) or not (False) the kernel; by default it is kept when every
        process's block fits ``memory_budget`` (one all-reduce decides, so all take one path).
    memory_budget : int, optional
        Bytes per process for the kernel block, or without it for the cached cost blocks
        (default 1 GiB; 0 recomputes every block in every pass).
    block_rows : int, optional
        Rows per block (default about 2**23 / m).
    start : {"zeros", "geomloss"}, default "zeros"
        Starting potentials: zeros, or GeomLoss's annealed ones (one process only: GeomLoss needs
        every row in memory).
    eps_scaling : int, default 0
        Warm start by eps-scaling (Kosowsky & Yuille 1994; Schmitzer 2019; Chizat et al. 2018;
        GeomLoss's ``scaling``): when the kernel is not kept, this many log-domain passes at the
        geometric eps of :func:`eps_schedule` from ``eps_start`` down toward ``eps``, each from the
        potentials the last one left, before the iterations at ``eps``. They count in ``n_iter``
        (and ``warm_passes``); at least one pass is left for ``eps``; the stopping rule is the
        error at ``eps`` alone. Ignored with the kernel kept (a new eps would cost a pass to
        rebuild it). At most ``MAX_EPS_SCALING``.
    eps_start : float, optional
        The first (coarsest) absolute eps of eps-scaling; default the mean cost.
    init_g : array_like of shape (m,), optional
        Starting target potential (absolute units, cost ``||x - y||^2``), e.g. the ``g`` of a fit
        on a sample of the pool. The first pass takes ``f`` from it; only the start changes.
        Identical on every process. Refused with ``start="geomloss"``.
    relaxation : float in [1, 2), default 1.0
        Over-relaxation ``omega`` of the passes at ``eps`` when the kernel is not kept (Thibault,
        Chizat, Dossal & Papadakis 2021, "Overrelaxed Sinkhorn-Knopp algorithm for regularized
        optimal transport", Algorithms 14(5); Lehmann, von Renesse, Sambale & Uschmajew 2022, "A
        note on overrelaxation in the Sinkhorn algorithm", Optim. Lett. 16): each half-step moves
        a potential to ``(1 - omega) * old + omega * update`` in the log domain. The fixed point
        is Sinkhorn's, so the potentials are the plain solve's within ``tol``; the local rate
        improves (fewer passes) but global convergence is not guaranteed for ``omega > 1``.
        Safeguard: the first pass at ``eps`` is plain; a relaxed step is kept only if the dual
        objective ``<a, f> + <b, g> - eps (mass of the plan - 1)`` (concave, raised by every plain
        half-step) did not fall, else that pass's plain step is taken and the solve goes on with
        ``omega = 1`` (plain Sinkhorn, which converges from any start). Not the marginal error:
        that of a relaxed plan rises on its first passes even where relaxation halves the passes.
        The error checked against ``tol`` is the row plus the column L1 marginal error of the
        relaxed plan (the column one is 0 for a plain one). The returned potentials are always
        the last plain iteration's (``f`` is the c-transform of ``g_f``). ``1.0`` (the default)
        is plain Sinkhorn, iterate for iterate. Ignored with the kernel kept.
    owner, names : str, (str, str, str)
        Who is calling and what the caller calls ``eps``, the candidates and the target, for the
        error messages.

    Returns
    -------
    ShardedSinkhornResult

    Raises
    ------
    ValueError
        ``eps`` outside ``EPS_RELATIVE_RANGE`` times the mean cost (naming ``names[0]``), or a bad
        parameter; all before the iterations.
    """
    import torch

    comm = comm or LOCAL
    eps_name, x_name, y_name = names
    eps = check_float(eps, eps_name, owner, 0.0, low_open=True)
    check_choice(eps_mode, "eps_mode", owner, EPS_MODES)
    tol = check_float(tol, "tol", owner, 0.0)
    max_iter = check_int(max_iter, "max_iter", owner, 1)
    memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else check_int(memory_budget, "memory_budget", owner, 0)
    eps_scaling = check_int(eps_scaling, "eps_scaling", owner, 0, MAX_EPS_SCALING)
    relaxation = check_float(relaxation, "relaxation", owner, 1.0, 2.0, high_open=True)
    y = _as_float_array(target, y_name, owner)
    if y.shape[1] != pool.dim:
        raise param_error(y_name, owner, f"an array with {pool.dim} columns (the dimension of {x_name})", f"an array of shape {y.shape}")
    g0 = None if init_g is None else check_potential(init_g, len(y), "init_g", owner)
    if g0 is not None and start == "geomloss":
        raise param_error("init_g", owner, "None with backend='geomloss' (GeomLoss makes its own starting potentials)", "an array")
    pool_dtype = getattr(pool.data, "dtype", None)
    np_dtype = np.float64 if (pool_dtype == np.float64 and y.dtype == np.float64) else np.float32
    y = y.astype(np_dtype, copy=False)
    wb = _as_weights(b, len(y), "b", owner)
    n_global = int(pool.n_global)
    if a_local is not None:
        a_local = np.asarray(a_local, dtype=np.float64)
        a_local = a_local / float(comm.all_reduce(np.array([a_local.sum()]), "sum")[0])
    m = len(y)
    block = block_rows or max(1, _BLOCK_ELEMENTS // m)
    mean_cost, center, scale = _frame(pool, y, a_local, wb, np_dtype, block, comm)
    eps_abs = eps * mean_cost if eps_mode == "relative" else eps
    if eps_start is not None:
        eps_start = check_float(eps_start, "eps_start", owner, 0.0, low_open=True)
    if eps_mode == "relative" and not eps_abs > 0:
        raise param_error("eps_mode", owner, "'absolute' when all pairwise costs are 0", eps_mode)
    lo, hi = EPS_RELATIVE_RANGE
    if mean_cost > 0 and not lo * mean_cost <= eps_abs <= hi * mean_cost:
        if eps_mode == "relative":
            expected = f"a float in [{lo:g}, {hi:g}] with eps_mode='relative'"
        else:
            expected = (f"a float in [{lo * mean_cost:.3g}, {hi * mean_cost:.3g}] for these {x_name} and {y_name} "
                        f"({lo:g} to {hi:g} times their mean squared distance {mean_cost:.3g}; or pass a multiple "
                        "of it with eps_mode='relative')")
        raise param_error(eps_name, owner, expected, eps)
    dev = _resolve_device(device, "sharded_sinkhorn")
    init = None
    if start == "geomloss":
        if comm.world_size > 1:
            raise param_error("backend", owner, "not 'geomloss' in a multi-process run (GeomLoss needs every row)", start)
        xa = np.ascontiguousarray(pool.data, dtype=np_dtype)
        a_all = np.full(len(xa), 1.0 / len(xa)) if a_local is None else a_local
        init = _geomloss_init(xa, y, a_all, wb, eps_abs, dev)
    n_local = pool.n_local

    def kernel_fits(dtype: Any) -> bool:  # one all-reduce, so every process takes the same path
        fits = float(n_local * m * np.dtype(dtype).itemsize <= memory_budget)
        return bool(comm.all_reduce(np.array([fits]), "min")[0] > 0)

    auto_kernel = keep_kernel is None
    if auto_kernel:
        keep_kernel = kernel_fits(np_dtype)
    s2 = scale * scale
    logger.debug("Sharded Sinkhorn n_local=%d n=%d m=%d eps=%.4g kernel=%s scale=%g shifted=%s device=%s rank=%d/%d",
                 n_local, n_global, m, eps_abs, keep_kernel, scale, center is not None, dev, comm.rank, comm.world_size)
    prep = _prep(center, scale, np_dtype, dev)
    with torch.no_grad():
        Y = prep(y)
        dt = Y.dtype
        B = _from_numpy(wb).to(device=dev, dtype=dt)
        a = np.full(n_local, 1.0 / n_global) if a_local is None else a_local
        A = _from_numpy(a).to(device=dev, dtype=dt)
        if init is not None:
            init = tuple(torch.as_tensor(v).to(device=dev, dtype=dt) / s2 for v in init)  # type: ignore[assignment]
        elif g0 is not None:  # f only enters the first pass's error: the pass takes f from g
            init = (torch.zeros(n_local, dtype=dt, device=dev), _from_numpy(g0 / s2).to(device=dev, dtype=dt))
        schedule = eps_schedule(eps_abs, mean_cost if eps_start is None else eps_start, eps_scaling)
        solver = _ShardedSinkhorn(pool, prep, np_dtype, Y, B, A, eps_abs / s2, block, keep_kernel, comm, memory_budget,
                                  relaxation)
        f, g, g_f, it, err = solver.run(tol, max_iter, init, tuple(e / s2 for e in schedule))
        warm, relaxed = solver.warm_passes, solver.relaxed_passes
        if solver.stalled and np_dtype == np.float32 and it < max_iter:
            # float32 rounding floors the error above tol: go on in float64 from these potentials.
            logger.info("Sinkhorn: the float32 marginal error stalled at %.3g above tol %.3g after %d iterations; "
                        "finishing in float64", err, tol, it)
            np_dtype = np.float64
            if auto_kernel:
                keep_kernel = kernel_fits(np_dtype)
            prep = _prep(center, scale, np_dtype, dev)
            # The weights again from float64 (float32's 1/n does not sum to 1: a floor of its own).
            Y, B, A = prep(y.astype(np.float64)), _from_numpy(wb).to(dev), _from_numpy(a).to(dev)
            solver = _ShardedSinkhorn(pool, prep, np_dtype, Y, B, A, eps_abs / s2, block, keep_kernel, comm, memory_budget,
                                      relaxation)
            f, g, g_f, more, err = solver.run(tol, max_iter - it, (f, g))
            it += more
            relaxed += solver.relaxed_passes
        f64 = f.double().cpu().numpy() * s2
    g64 = g.double().cpu().numpy() * s2
    gf64 = g_f.double().cpu().numpy() * s2
    f_sum, a_dot_f = comm.all_reduce(np.array([f64.sum(), a @ f64]), "sum")
    return ShardedSinkhornResult(
        y=y, b=wb, g=g64, g_f=gf64, f_sum=float(f_sum), cost=float(a_dot_f + wb @ g64), n_global=n_global,
        n_iter=it, converged=bool(err < tol), marginal_error=float(err), eps=eps_abs, kernel_kept=keep_kernel,
        center=center, scale=scale, f_local=f64, precision=np.dtype(np_dtype).name,
        stalled=bool(solver.stalled and err >= tol), warm_passes=warm, relaxed_passes=relaxed,
    )


def check_potential(g: Any, m: int, name: str, owner: str) -> np.ndarray:
    """Return a starting target potential as a finite float64 array of shape ``(m,)``, or refuse it."""
    expected = f"None or a finite float array of shape ({m},) (target potentials, e.g. a sample fit's g)"
    try:
        arr = np.asarray(g, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise param_error(name, owner, expected, type(g).__name__, exc=TypeError) from err
    if arr.shape != (m,):
        raise param_error(name, owner, expected, f"an array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise param_error(name, owner, expected, f"{int((~np.isfinite(arr)).sum())} NaN or Inf value(s)")
    return arr


def eps_schedule(eps: float, start: float, steps: int) -> tuple[float, ...]:
    """The coarser eps values of eps-scaling: ``steps`` geometric steps from ``start`` down toward ``eps``.

    ``start * (eps / start) ** (k / steps)`` for ``k = 0 .. steps - 1`` (the next value would be
    ``eps`` itself); empty when ``steps == 0`` or ``start <= eps``.
    """
    if steps == 0 or not start > eps:
        return ()
    return tuple(start * (eps / start) ** (k / steps) for k in range(steps))


def _check_common(
    x: Any, y: Any, eps: Any, a: Any, b: Any, eps_mode: Any, backend: Any, tol: Any, max_iter: Any,
    block_size: Any, memory_budget: Any, owner: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, int, int | None, int]:
    check_choice(backend, "backend", owner, BACKENDS)
    check_choice(eps_mode, "eps_mode", owner, EPS_MODES)
    eps = check_float(eps, "eps", owner, 0.0, low_open=True)
    tol = check_float(tol, "tol", owner, 0.0)
    max_iter = check_int(max_iter, "max_iter", owner, 1)
    if block_size is not None:
        block_size = check_int(block_size, "block_size", owner, 1)
    memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else check_int(memory_budget, "memory_budget", owner, 0)
    xa = _as_float_array(x, "x", owner)
    ya = _as_float_array(y, "y", owner)
    if ya.shape[1] != xa.shape[1]:
        raise param_error("y", owner, f"an array with {xa.shape[1]} columns (the dimension of x)", f"an array of shape {ya.shape}")
    if xa.dtype != ya.dtype:  # compute in float64 only when both sides are float64
        xa, ya = xa.astype(np.float32), ya.astype(np.float32)
    wa = _as_weights(a, len(xa), "a", owner)
    wb = _as_weights(b, len(ya), "b", owner)
    return xa, ya, wa, wb, eps, max_iter, block_size, memory_budget  # type: ignore[return-value]


def sinkhorn_potentials(
    x: Any,
    y: Any,
    eps: float = 0.1,
    a: Any = None,
    b: Any = None,
    *,
    eps_mode: EpsMode = "absolute",
    backend: Backend = "auto",
    tol: float = 1e-3,
    max_iter: int = 1000,
    device: Any = None,
    block_size: int | None = None,
    memory_budget: int | None = None,
) -> SinkhornResult:
    """Solve balanced entropic OT between two point clouds and return its dual potentials.

    Log-domain Sinkhorn (Peyre & Cuturi 2019, Sec. 4.4: ``f_i = -eps log sum_j b_j
    exp((g_j - C_ij)/eps)``, then the same for ``g`` with the new ``f``) on the cost
    ``C_ij = ||x_i - y_j||^2``, stopped when the L1 row-marginal error is below ``tol``.

    Parameters
    ----------
    x : array_like of shape (n, dim)
        First cloud (float16/bfloat16/float32 computed in float32; float64 in float64 when ``y``
        is float64 too). A torch tensor is accepted.
    y : array_like of shape (m, dim)
        Second cloud, same ``dim``.
    eps : float, default 0.1
        Entropic regularisation, > 0: absolute, or a multiple of the mean cost when
        ``eps_mode="relative"``.
    a, b : array_like of shape (n,) and (m,), optional
        Positive weights, normalised to sum 1; uniform when omitted.
    eps_mode : {"absolute", "relative"}, default "absolute"
    backend : {"auto", "tensorized", "blocked", "geomloss"}, default "auto"
        See the module docstring. ``"auto"`` picks ``"tensorized"`` when ``n * m`` entries fit
        ``memory_budget`` bytes, else ``"blocked"``.
    tol : float, default 1e-3
        Stop when ``sum_i |(P 1)_i - a_i| < tol``.
    max_iter : int, default 1000
        Most iterations; reaching it without convergence emits a ``RuntimeWarning`` with figures.
    device : str or torch.device, optional
        Where to compute; CUDA when available, else CPU.
    block_size : int, optional
        Rows of ``x`` per block (default: about 2**23 / m).
    memory_budget : int, optional
        Bytes allowed for the tensorized kernel, or for the cost blocks that ``"blocked"`` keeps
        from its first pass (default 1 GiB; 0 recomputes every block in every pass).

    Returns
    -------
    SinkhornResult
        Potentials ``f`` (on ``x``) and ``g`` (on ``y``) as float64, the dual value and the
        solver figures.

    Raises
    ------
    ValueError, TypeError
        On a bad parameter (checked before any work).
    """
    owner = "sinkhorn_potentials"
    xa, ya, wa, wb, eps, max_iter, block_size, memory_budget = _check_common(
        x, y, eps, a, b, eps_mode, backend, tol, max_iter, block_size, memory_budget, owner
    )
    n, m = len(xa), len(ya)
    if backend == "auto":
        backend = "tensorized" if n * m * xa.dtype.itemsize <= memory_budget else "blocked"
    dev = _resolve_device(device, owner)
    # The in-memory back ends are the sharded solver on one process: "tensorized" keeps the
    # kernel, "blocked" recomputes it, "geomloss" starts from GeomLoss's potentials.
    r = sharded_sinkhorn(
        PoolView(xa), ya, eps, b=wb, a_local=wa, eps_mode=eps_mode, tol=tol, max_iter=max_iter, device=dev,
        keep_kernel=backend != "blocked", memory_budget=memory_budget, block_rows=block_size,
        start="geomloss" if backend == "geomloss" else "zeros",
        owner=owner, names=("eps", "x", "y"),
    )
    f, g, it, err, eps_abs = r.f_local, r.g, r.n_iter, r.marginal_error, r.eps
    converged = bool(err < tol)
    if not converged and tol > 0:
        warnings.warn(nonconvergence_message(r, tol, f"n={n}, m={m}, backend={backend}"), RuntimeWarning, stacklevel=2)
    cost = float(wa @ f + wb @ g)
    return SinkhornResult(f=f, g=g, cost=cost, n_iter=it, converged=converged, marginal_error=float(err), eps=eps_abs,
                          backend=backend, precision=r.precision)


def nonconvergence_message(r: ShardedSinkhornResult, tol: float, what: str) -> str:
    """The one warning text for a solve that ended with its marginal error at or above ``tol``."""
    head = f"Sinkhorn did not converge: L1 marginal error {r.marginal_error:.3g} >= tol {tol:.3g} after {r.n_iter} iterations"
    if r.stalled:
        return (f"{head} ({what}, eps={r.eps:.4g}): it stopped falling there, the floor {r.precision} rounding sets for "
                "this problem. Raise tol above it.")
    return f"{head} ({what}, eps={r.eps:.4g}). Raise max_iter or eps."



def ot_distance(x: Any, y: Any, a: Any = None, b: Any = None, **kwargs: Any) -> float:
    """Entropic OT value between two clouds (see :attr:`SinkhornResult.cost`).

    Parameters
    ----------
    x : array_like of shape (n, dim)
    y : array_like of shape (m, dim)
    a, b : array_like of shape (n,) and (m,), optional
    **kwargs
        Any keyword of :func:`sinkhorn_potentials` (``eps``, ``eps_mode``, ``backend``, ...);
        unknown keywords raise ``TypeError``.

    Returns
    -------
    float
        ``<f, a> + <g, b>`` at the converged potentials, cost ``||x - y||^2``.
    """
    allowed = {"eps", "eps_mode", "backend", "tol", "max_iter", "device", "block_size", "memory_budget"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise param_error("kwargs", "ot_distance", f"keywords among {sorted(allowed)}", unknown, exc=TypeError)
    return sinkhorn_potentials(x, y, a=a, b=b, **kwargs).cost


def _geomloss_init(
    x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, eps: float, device: Any, scaling: float = 0.5
) -> tuple[Any, Any]:
    """GeomLoss's annealed potentials for our problem, in our conventions (torch tensors).

    Our problem (cost ``C``, ``eps``) is twice GeomLoss's (cost ``C / 2``, ``eps / 2 = blur**2``):
    the plans are the same and the potentials scale by 2. With GeomLoss's default ``scaling=0.5``
    the annealing stops far from the fixed point (max potential error ~1-2 on small problems); it
    only approaches it as ``scaling`` nears 1, hence the finishing iterations in the caller.
    """
    import torch
    from geomloss import SamplesLoss

    dt = torch.float64 if x.dtype == np.float64 else torch.float32

    def t(v: np.ndarray) -> Any:
        return _from_numpy(v).to(device=device, dtype=dt)

    loss = SamplesLoss(
        "sinkhorn", p=2, blur=math.sqrt(eps / 2.0), scaling=scaling, debias=False, potentials=True, backend="tensorized"
    )
    with torch.no_grad():
        f_half, g_half = loss(t(a), t(x), t(b), t(y))
    return 2.0 * f_half.reshape(-1), 2.0 * g_half.reshape(-1)


class _StallWatch:
    """Tells when the marginal error has met its rounding floor (see ``STALL_ITERATIONS``).

    Every process sees the same (all-reduced) error, so every process stops at the same iteration.
    Off when ``tol == 0`` (the caller asked for exactly ``max_iter`` iterations).
    """

    def __init__(self, tol: float, machine_eps: float) -> None:
        self.active, self.best, self.since, self.hit = tol > 0, math.inf, 0, False
        self.level = math.sqrt(machine_eps)

    def __call__(self, err: float) -> bool:
        if not self.active:
            return False
        if err < self.best:
            self.best, self.since = err, 0
        else:
            self.since += 1
        self.hit = self.since >= STALL_ITERATIONS and self.best < self.level
        return self.hit


class _ShardedSinkhorn:
    """Log-domain Sinkhorn over this process's row blocks, reduced across processes per iteration.

    The rows come from a :class:`~hf_otselect.dist.PoolView` (read block by block, centred and
    scaled by ``prep``); ``f`` lives on them (``(n_local,)``, this process's own), ``g`` on the
    target and is the same on every process. Per iteration the only traffic is per-target: the
    column log-sums of the ``g`` update combine as (max, sum-exp) pairs through two all-reduces of
    ``m`` numbers (plus the marginal error), or, with the kernel kept, one all-reduce of the ``m``
    column sums and one of a scalar. Nothing depends on N.
    """

    def __init__(
        self, pool: PoolView, prep: Any, np_dtype: Any, Y: Any, B: Any, A: Any, eps: float, block: int,
        keep_kernel: bool, comm: Comm, cache_bytes: int = 0, relaxation: float = 1.0,
    ) -> None:
        import torch

        self.torch, self.pool, self.prep, self.np_dtype = torch, pool, prep, np_dtype
        self.Y, self.B, self.A, self.eps, self.comm = Y, B, A, eps, comm
        self.y2 = (Y * Y).sum(1)
        self.ny2 = (-self.y2 / eps).unsqueeze(0)
        self.loga, self.logb = A.log(), B.log()
        self.n, self.m = int(A.shape[0]), int(Y.shape[0])
        self.block = max(1, min(block, self.n))
        self.tiny = torch.finfo(Y.dtype).tiny * 1e6
        self.K = torch.empty((self.n, self.m), dtype=Y.dtype, device=Y.device) if keep_kernel else None
        self.x2 = torch.empty(self.n, dtype=Y.dtype, device=Y.device) if keep_kernel else None
        self.work = torch.empty((self.block, self.m), dtype=Y.dtype, device=Y.device)
        # Without the whole kernel, the score blocks of the first rows that fit ``cache_bytes`` are
        # kept from the first pass (same numbers); only the rows beyond them redo their GEMM.
        rows = 0 if keep_kernel else min(self.n, cache_bytes // max(1, self.m * Y.element_size()))
        self.cached = rows - rows % self.block if rows < self.n else self.n
        self.D = torch.empty((self.cached, self.m), dtype=Y.dtype, device=Y.device) if self.cached else None
        self.filled = 0
        self.d_eps = eps  # the eps the kept score blocks ``D`` were divided by (their first pass's)
        self.stalled = False
        self.relaxation = relaxation  # over-relaxation omega of the no-kernel passes (1: plain Sinkhorn)
        self.warm_passes = self.relaxed_passes = 0

    def set_eps(self, eps: float) -> None:
        """Iterate at another eps from now on (eps-scaling): the scores' column term follows it."""
        self.eps = eps
        self.ny2 = (-self.y2 / eps).unsqueeze(0)

    def _blocks(self) -> Iterator[tuple[int, int, Any]]:
        """``(s, e, X)``: local row range and the prepared rows, one pool block at a time."""
        s = 0
        for _, rows in self.pool.blocks(self.block, dtype=self.np_dtype):
            X = self.prep(rows)
            yield s, s + X.shape[0], X
            s += X.shape[0]

    def _scores(self, X: Any, out: Any) -> Any:
        """``D = (2 x y^T - |y|^2) / eps`` into ``out`` with one GEMM.

        ``D_ij - |x_i|^2 / eps = -C_ij / eps``; the row term ``|x_i|^2`` is constant along a row,
        so it is added to the row results instead of to every entry (one pass fewer per block).
        """
        return self.torch.addmm(self.ny2, X, self.Y.T, beta=1.0, alpha=2.0 / self.eps, out=out)

    def _reduce_columns(self, col_log: Any, extra: list[float]) -> tuple[Any, np.ndarray]:
        """Combine per-process column log-sums: log sum_p exp(col_p) as (max, sum-exp) pairs.

        ``col_log`` is ``(m,)`` or ``(k, m)`` (k potentials' column sums reduced together). Two
        all-reduces of its numbers (the second carries ``extra`` scalars to be summed).
        Returns the global column log-sums (torch, like ``col_log``) and the summed extras.
        """
        local = col_log.double().cpu().numpy().reshape(-1)
        k = local.size
        top = self.comm.all_reduce(local, "max")
        top = np.where(np.isfinite(top), top, 0.0)
        red = self.comm.all_reduce(np.concatenate([np.exp(local - top), np.asarray(extra, dtype=np.float64)]), "sum")
        with np.errstate(divide="ignore"):
            col = (top + np.log(red[:k])).reshape(col_log.shape)
        return self.torch.from_numpy(col).to(device=col_log.device, dtype=col_log.dtype), red[k:]

    def log_pass(
        self, f: Any, g: Any, omega: float = 1.0
    ) -> tuple[Any, Any, float, float, tuple[Any, Any, float, float] | None]:
        """One exact log-domain iteration: ``f`` from ``g``, then ``g`` from the new ``f``.

        Each block: one GEMM for the (shifted) scores, one exp for the row log-sum-exp; the column
        sums for ``g`` reuse those exponentials through a matrix-vector product (entries
        exp(S - rowmax) weighted by a_i / rowsum_i). Columns whose block sum underflowed are redone
        exactly. When the kernel is kept, the score block ``D`` is stored in it for
        :meth:`_rebuild_kernel`.

        With ``omega != 1`` the pass also makes the over-relaxed pair (see :meth:`run`):
        ``f_r = (1 - omega) f + omega f_new`` and ``g_r = (1 - omega) g + omega T_g(f_r)``, where
        ``T_g`` is the ``g`` update; the column sums for ``f_new`` and ``f_r`` come from the same
        exponentials (row weights times ``exp((f_r - f_new) / eps)``), one two-row product.

        Returns
        -------
        (f_new, g_new, err, dual, relaxed)
            The plain iteration, the L1 row-marginal error of the plan ``(f, g)`` summed over
            every process, the dual objective of ``(f_new, g_new)`` (NaN when the solver does not
            relax), and ``None`` or ``(f_r, g_r, column L1 marginal error of (f_r, g_r), dual
            objective of (f_r, g_r))``. The dual objective is ``<a, f> + <b, g> - eps (mass of
            the plan - 1)``, concave, raised by every plain half-step (Peyre & Cuturi 2019, Sec. 4.4).
        """
        torch, eps = self.torch, self.eps
        hg = (g + eps * self.logb) / eps  # (m,)
        f_new = torch.empty_like(f)
        relax = omega != 1.0
        f_rel = torch.empty_like(f) if relax else None
        col_log = torch.full((2 if relax else 1, self.m), -math.inf, dtype=g.dtype, device=g.device)
        err = torch.zeros((), dtype=torch.float64, device=g.device)
        for s, e, X in self._blocks():
            x2 = (X * X).sum(1)
            if self.K is not None:
                self.x2[s:e] = x2
                D = self._scores(X, self.K[s:e])
                S = torch.add(D, hg.unsqueeze(0), out=self.work[: e - s])
            elif e <= self.cached:
                if self.filled < e:
                    self._scores(X, self.D[s:e])
                    self.filled, self.d_eps = e, eps
                # D holds (2 x y^T - |y|^2) / d_eps; at another eps it is rescaled in the same add
                ratio = self.d_eps / eps
                S = torch.add(hg.unsqueeze(0), self.D[s:e], alpha=ratio, out=self.work[: e - s]) if ratio != 1.0 \
                    else torch.add(self.D[s:e], hg.unsqueeze(0), out=self.work[: e - s])
            else:
                S = self._scores(X, self.work[: e - s]).add_(hg.unsqueeze(0))
            # S_ij = (g_j + eps log b_j - C_ij) / eps + |x_i|^2 / eps
            rmax = S.amax(1)
            S.sub_(rmax.unsqueeze(1)).exp_()  # in (0, 1], max 1 per row
            rsum = S.sum(1)
            fb = x2 - eps * (rmax + rsum.log())
            f_new[s:e] = fb
            ab = self.A[s:e]
            err += (ab * torch.expm1((f[s:e] - fb) / eps).abs()).sum().double()
            # sum_i a_i exp((f_new_i - C_ij)/eps) = exp(-hg_j) * sum_i S_ij a_i / rsum_i
            if relax:
                fr = torch.lerp(f[s:e], fb, omega)  # (1 - omega) f + omega fb
                f_rel[s:e] = fr
                lw = (ab / rsum).log()
                lw = torch.stack([lw, lw + (fr - fb) / eps])
                top = lw.amax(1, keepdim=True)  # per-row-vector shift: exp((fr - fb)/eps) may be huge or tiny
                cs = (lw - top).exp() @ S
                blk = cs.log() + top - hg
                pots = (fb, fr)
            else:
                cs = ((ab / rsum) @ S).unsqueeze(0)
                blk = cs.log() - hg
                pots = (fb,)
            low = cs < self.tiny
            if bool(low.any()):
                for k, pot in enumerate(pots):
                    J = low[k].nonzero().squeeze(1)
                    if J.numel():
                        Cj = torch.addmm(self.y2[J].unsqueeze(0), X, self.Y[J].T, alpha=-2.0)
                        Cj.add_(x2.unsqueeze(1)).clamp_(min=0.0)
                        blk[k, J] = torch.logsumexp(self.loga[s:e].unsqueeze(1) + (pot.unsqueeze(1) - Cj) / eps, dim=0)
            col_log = torch.logaddexp(col_log, blk)
        duals = self.relaxation != 1.0  # the safeguard of run() compares dual objectives
        extra = [float(err)]
        if duals:
            A64 = self.A.double()
            extra += [float(A64 @ f_new.double())] + ([float(A64 @ f_rel.double())] if relax else [])
        col, sums = self._reduce_columns(col_log, extra)
        g_new = -eps * col[0]
        B64 = self.B.double()
        # the plain pair's plan has mass 1 (its columns are exact): its dual objective is <a, f> + <b, g>
        dual = float(sums[1] + B64 @ g_new.double()) if duals else math.nan
        if not relax:
            return f_new, g_new, float(sums[0]), dual, None
        tg = -eps * col[1]  # T_g(f_r)
        g_rel = torch.lerp(g, tg, omega)
        # column marginal of the plan (f_r, g_r): b_j exp((g_r - T_g(f_r))_j / eps), the same on every process
        z = (g_rel - tg).double() / eps
        col_err = float((B64 * torch.expm1(z).abs()).sum())
        dual_rel = float(sums[2] + B64 @ g_rel.double()) - eps * (float((B64 * z.exp()).sum()) - 1.0)
        return f_new, g_new, float(sums[0]), dual, (f_rel, g_rel, col_err, dual_rel)

    def _rebuild_kernel(self, f: Any, g: Any) -> None:
        """Turn the stored scores into ``K = exp((f_i + g_j - C_ij) / eps)`` in place."""
        eps = self.eps
        gs = (g / eps).unsqueeze(0)
        fs = (f - self.x2) / eps
        for s in range(0, self.n, self.block):
            e = min(s + self.block, self.n)
            self.K[s:e].add_(gs).add_(fs[s:e].unsqueeze(1)).exp_()

    def run(
        self, tol: float, max_iter: int, init: tuple[Any, Any] | None = None, schedule: tuple[float, ...] = ()
    ) -> tuple[Any, Any, Any, int, float]:
        """Iterate to ``tol`` or until the error stalls (``self.stalled``); returns ``(f, g, g_f, n_iter, err)``.

        ``g_f`` is the target potential whose c-transform ``f`` is (``g`` itself is one half-step
        later): a row's potential recomputed from ``g_f`` is the ``f`` returned here. Without the
        kernel, ``schedule`` (coarser eps values, decreasing) runs one log-domain pass at each
        before the iterations at ``self.eps``, each starting from the potentials the last left
        (eps-scaling); those passes count in ``n_iter`` and in ``self.warm_passes``. The stopping
        rule only looks at the error at ``self.eps``.
        """
        torch, eps = self.torch, self.eps
        dt, dev = self.Y.dtype, self.Y.device
        if init is None:
            f = torch.zeros(self.n, dtype=dt, device=dev)
            g = torch.zeros(self.m, dtype=dt, device=dev)
        else:
            f, g = (v.to(dtype=dt, device=dev) for v in init)
        err, it = math.inf, 0
        stall = _StallWatch(tol, torch.finfo(dt).eps)
        self.warm_passes = self.relaxed_passes = 0
        if self.K is None:
            target_eps = eps
            for coarse in schedule:
                if it >= max_iter - 1:  # leave at least one pass at the target eps
                    break
                self.set_eps(coarse)
                f, g, _, _, _ = self.log_pass(f, g)
                it += 1
            self.set_eps(target_eps)
            self.warm_passes = it
            g_f = g
            omega, col_err, first, dual = self.relaxation, 0.0, True, math.nan
            slack = 16.0 * float(torch.finfo(dt).eps)
            while it < max_iter:
                g_f = g
                # the first pass at this eps is plain: its incoming state was not made at this eps
                f_new, g_new, err, dual_new, relaxed = self.log_pass(f, g, 1.0 if first else omega)
                err += col_err  # the relaxed state's column error (0 for a plain one: its columns are exact)
                it += 1
                first = False
                if err < tol or stall(err):
                    break
                # Safeguard: a relaxed step is kept only if the dual objective did not fall (beyond
                # rounding of its two sums); else this pass's plain step is taken, plain from here on.
                if relaxed is not None and relaxed[3] >= dual - slack * (abs(dual) + abs(relaxed[3])):
                    f, g, col_err, dual = relaxed
                    self.relaxed_passes += 1
                    continue
                if relaxed is not None:
                    logger.debug("Sinkhorn: over-relaxation %.3g would lower the dual objective (%.6g -> %.6g) "
                                 "after %d passes; plain iterations from here", omega, dual, relaxed[3], it)
                    omega = 1.0
                f, g, col_err, dual = f_new, g_new, 0.0, dual_new
            if it > self.warm_passes:  # return the last plain iteration: f is the c-transform of g_f
                f, g = f_new, g_new
            self.stalled = stall.hit
            return f, g, g_f, it, err
        # Stabilised scaling (Schmitzer 2019, Alg. 2): plan = a_i u_i K_ij v_j b_j with K holding
        # the absorbed potentials; every process keeps its rows of K, v is global.
        u = torch.ones_like(f)
        v = torch.ones_like(g)
        g_f = g
        rebuild = True
        while it < max_iter:
            if rebuild:
                f, g = f + eps * u.log(), g + eps * v.log()
                u.fill_(1.0)
                v.fill_(1.0)
                g_f = g
                f, g, err, _, _ = self.log_pass(f, g)
                self._rebuild_kernel(f, g)
                rebuild = False
            else:
                r = self.K @ (v * self.B)
                u_new = 1.0 / r
                e_loc = float((self.A * (u * r - 1.0).abs()).sum())
                cs = ((u_new * self.A) @ self.K).double().cpu().numpy()
                red = self.comm.all_reduce(np.concatenate([cs, [e_loc]]), "sum")
                v_new = torch.from_numpy(1.0 / red[: self.m]).to(device=dev, dtype=dt)
                lu, lv = u_new.log(), v_new.log()
                big_loc = max(float(lu.abs().max()) if self.n else 0.0, float(lv.abs().max()))
                big = float(self.comm.all_reduce(np.array([big_loc if math.isfinite(big_loc) else math.inf]), "max")[0])
                if not math.isfinite(big) or big > _TAU:
                    rebuild = True  # keep the last bounded (u, v); redo this step exactly
                    continue
                g_f = g + eps * v.log()
                u, v, err = u_new, v_new, float(red[self.m])
            it += 1
            if err < tol or stall(err):
                break
        self.stalled = stall.hit
        return f + eps * u.log(), g + eps * v.log(), g_f, it, err


