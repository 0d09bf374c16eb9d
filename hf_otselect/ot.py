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
  after each ``g`` update.

Why our own solver rather than GeomLoss or POT (measured on this machine, see PEERS.md and
``benchmarks/results/ot_scaling.md``): GeomLoss anneals eps on a fixed schedule and never checks
convergence, so its potentials can be far from the fixed point (rank agreement 0.894 at eps=0.01),
and its tensorized path needs the full N x M matrix plus autograd buffers; POT's log-domain solver
checks every 10 iterations and its lazy path is 5-10x slower. GOT-D's problem converges in 2-16
iterations, so checking each iteration and making each iteration cheap is what matters. We do it
in torch (CPU or CUDA) with two back ends:

``"tensorized"``
    Keeps one ``(n, m)`` matrix: the Gibbs kernel with the current potentials absorbed,
    ``K_ij = exp((f_i + g_j - C_ij) / eps)``, and iterates on scalings ``u, v`` with two
    matrix-vector products per iteration (the stabilised scaling algorithm of Schmitzer 2019,
    "Stabilized sparse scaling algorithms for entropy regularized transport problems", Alg. 2).
    When a scaling leaves ``[exp(-tau), exp(tau)]`` it is absorbed into the potentials and the
    kernel is rebuilt by an exact log-domain iteration, so tiny eps never under- or overflows.
``"blocked"``
    Needs no ``(n, m)`` matrix: each iteration streams row blocks of ``x``, recomputes the cost
    block with one GEMM (``|x|^2 + |y|^2 - 2 x y^T``) and does both log-domain half-steps in one
    pass (row log-sum-exp for ``f``, then the column sums for ``g`` by one matrix-vector product
    on the same exponentials). Memory is O((n + m) d + block_size * m).
``"keops"``
    The same log-domain iteration with symbolic pykeops reductions (optional; needs ``pykeops``).
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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._checks import check_choice, check_float, check_int, param_error

logger = logging.getLogger(__name__)

Backend = Literal["auto", "tensorized", "blocked", "keops", "geomloss"]
EpsMode = Literal["absolute", "relative"]

BACKENDS = ("auto", "tensorized", "blocked", "keops", "geomloss")
EPS_MODES = ("absolute", "relative")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes allowed for the (n, m) kernel of the tensorized back end
_BLOCK_ELEMENTS = 1 << 23  # about 32 MB of float32 per cost block in the blocked pass
# Scalings are absorbed into the potentials once |log u| or |log v| exceeds this. With float32
# kernels, entries that underflowed (< e^-87 relative) stay negligible after scaling by e^tau.
_TAU = 40.0


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
        The back end that ran: ``"tensorized"``, ``"blocked"``, ``"keops"`` or ``"geomloss"``.
    """

    f: np.ndarray
    g: np.ndarray
    cost: float
    n_iter: int
    converged: bool
    marginal_error: float
    eps: float
    backend: str


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


def _resolve_device(device: Any) -> Any:
    import torch

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


def _check_common(
    x: Any, y: Any, eps: Any, a: Any, b: Any, eps_mode: Any, backend: Any, tol: Any, max_iter: Any,
    block_size: Any, memory_budget: Any, owner: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, int, int | None, int]:
    check_choice(backend, "backend", owner, BACKENDS)
    check_choice(eps_mode, "eps_mode", owner, EPS_MODES)
    eps = check_float(eps, "eps", owner, 0.0, low_open=True)
    tol = check_float(tol, "tol", owner, 0.0, low_open=True)
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
    backend : {"auto", "tensorized", "blocked", "keops", "geomloss"}, default "auto"
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
        Bytes allowed for the tensorized kernel (default 1 GiB).

    Returns
    -------
    SinkhornResult
        Potentials ``f`` (on ``x``) and ``g`` (on ``y``) as float64, the dual value and the
        solver figures.

    Raises
    ------
    ValueError, TypeError
        On a bad parameter (checked before any work), or ``ImportError`` for ``backend="keops"``
        without pykeops.
    """
    owner = "sinkhorn_potentials"
    xa, ya, wa, wb, eps, max_iter, block_size, memory_budget = _check_common(
        x, y, eps, a, b, eps_mode, backend, tol, max_iter, block_size, memory_budget, owner
    )
    if backend == "keops":
        try:
            import pykeops  # noqa: F401
        except ImportError as err:
            raise ImportError("backend='keops' needs pykeops: `pip install pykeops` (and a C++ compiler).") from err
    eps_abs = eps
    if eps_mode == "relative":
        eps_abs = eps * mean_sq_distance(xa, ya, wa, wb)
        if not eps_abs > 0:  # identical single points: no scale to be relative to
            raise param_error("eps_mode", owner, "'absolute' when all pairwise costs are 0", eps_mode)
    n, m = len(xa), len(ya)
    itemsize = xa.dtype.itemsize
    if backend == "auto":
        backend = "tensorized" if n * m * itemsize <= memory_budget else "blocked"
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // m)
    dev = _resolve_device(device)
    logger.debug("Sinkhorn n=%d m=%d dim=%d eps=%.4g backend=%s device=%s", n, m, xa.shape[1], eps_abs, backend, dev)
    if backend == "keops":
        f, g, it, err = _solve_keops(xa, ya, wa, wb, eps_abs, tol, max_iter, dev)
    else:
        init = _geomloss_init(xa, ya, wa, wb, eps_abs, dev) if backend == "geomloss" else None
        f, g, it, err = _solve_torch(xa, ya, wa, wb, eps_abs, tol, max_iter, dev, block_size, backend != "blocked", init)
    converged = bool(err < tol)
    if not converged:
        warnings.warn(
            f"Sinkhorn did not converge: L1 marginal error {err:.3g} >= tol {tol:.3g} after {it} iterations "
            f"(eps={eps_abs:.4g}, n={n}, m={m}, backend={backend}). Raise max_iter or eps.",
            RuntimeWarning,
            stacklevel=2,
        )
    cost = float(wa @ f + wb @ g)
    return SinkhornResult(f=f, g=g, cost=cost, n_iter=it, converged=converged, marginal_error=float(err), eps=eps_abs, backend=backend)


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
        return torch.from_numpy(v).to(device=device, dtype=dt)

    loss = SamplesLoss(
        "sinkhorn", p=2, blur=math.sqrt(eps / 2.0), scaling=scaling, debias=False, potentials=True, backend="tensorized"
    )
    with torch.no_grad():
        f_half, g_half = loss(t(a), t(x), t(b), t(y))
    return 2.0 * f_half.reshape(-1), 2.0 * g_half.reshape(-1)


def _solve_torch(
    x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, eps: float, tol: float, max_iter: int,
    device: Any, block_size: int, keep_kernel: bool, init: tuple[Any, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Run Sinkhorn in torch from ``init`` potentials (zeros when None); float64 numpy out."""
    import torch

    dt = torch.float64 if x.dtype == np.float64 else torch.float32
    with torch.no_grad():
        X = torch.from_numpy(x).to(device=device, dtype=dt)
        Y = torch.from_numpy(y).to(device=device, dtype=dt)
        A = torch.from_numpy(a).to(device=device, dtype=dt)
        B = torch.from_numpy(b).to(device=device, dtype=dt)
        solver = _TorchSinkhorn(X, Y, A, B, eps, block_size, keep_kernel)
        f, g, it, err = solver.run(tol, max_iter, init)
    return f.double().cpu().numpy(), g.double().cpu().numpy(), it, err


class _TorchSinkhorn:
    """Log-domain Sinkhorn in torch, streaming row blocks; optionally keeps the stabilised kernel."""

    def __init__(self, X: Any, Y: Any, A: Any, B: Any, eps: float, block_size: int, keep_kernel: bool) -> None:
        import torch

        self.torch = torch
        self.X, self.Y, self.A, self.B, self.eps = X, Y, A, B, eps
        self.x2 = (X * X).sum(1)
        self.y2 = (Y * Y).sum(1)
        self.ny2 = (-self.y2 / eps).unsqueeze(0)
        self.loga, self.logb = A.log(), B.log()
        self.n, self.m = X.shape[0], Y.shape[0]
        self.block = min(block_size, self.n)
        self.tiny = torch.finfo(X.dtype).tiny * 1e6
        self.K = torch.empty((self.n, self.m), dtype=X.dtype, device=X.device) if keep_kernel else None
        self.work = torch.empty((self.block, self.m), dtype=X.dtype, device=X.device)

    def _scores(self, s: int, e: int, out: Any) -> Any:
        """``D[s:e] = (2 x y^T - |y|^2) / eps`` into ``out`` with one GEMM.

        ``D_ij - |x_i|^2 / eps = -C_ij / eps``; the row term ``|x_i|^2`` is constant along a row,
        so it is added to the row results instead of to every entry (one pass fewer per block).
        """
        inv = 1.0 / self.eps
        return self.torch.addmm(self.ny2, self.X[s:e], self.Y.T, beta=1.0, alpha=2.0 * inv, out=out)

    def log_pass(self, f: Any, g: Any) -> tuple[Any, Any, float]:
        """One exact log-domain iteration: ``f`` from ``g``, then ``g`` from the new ``f``.

        Each block: one GEMM for the (shifted) scores, one exp for the row log-sum-exp; the column
        sums for ``g`` reuse those exponentials through a matrix-vector product (entries
        exp(S - rowmax) weighted by a_i / rowsum_i). Columns whose block sum underflowed are redone
        exactly. When the kernel is kept, the score block ``D`` is stored in it for
        :meth:`_rebuild_kernel`. Returns (f_new, g_new, L1 row-marginal error of the plan (f, g)).
        """
        torch, eps = self.torch, self.eps
        hg = (g + eps * self.logb) / eps  # (m,)
        f_new = torch.empty_like(f)
        col_log = torch.full((self.m,), -math.inf, dtype=f.dtype, device=f.device)
        err = torch.zeros((), dtype=torch.float64, device=f.device)
        for s in range(0, self.n, self.block):
            e = min(s + self.block, self.n)
            if self.K is not None:
                D = self._scores(s, e, self.K[s:e])
                S = torch.add(D, hg.unsqueeze(0), out=self.work[: e - s])
            else:
                S = self._scores(s, e, self.work[: e - s]).add_(hg.unsqueeze(0))
            # S_ij = (g_j + eps log b_j - C_ij) / eps + |x_i|^2 / eps
            rmax = S.amax(1)
            S.sub_(rmax.unsqueeze(1)).exp_()  # in (0, 1], max 1 per row
            rsum = S.sum(1)
            fb = self.x2[s:e] - eps * (rmax + rsum.log())
            f_new[s:e] = fb
            ab = self.A[s:e]
            err += (ab * torch.expm1((f[s:e] - fb) / eps).abs()).sum().double()
            # sum_i a_i exp((f_new_i - C_ij)/eps) = exp(-hg_j) * sum_i S_ij a_i / rsum_i
            cs = (ab / rsum) @ S
            blk = cs.log() - hg
            low = cs < self.tiny
            if bool(low.any()):
                J = low.nonzero().squeeze(1)
                Cj = torch.addmm(self.y2[J].unsqueeze(0), self.X[s:e], self.Y[J].T, alpha=-2.0)
                Cj.add_(self.x2[s:e].unsqueeze(1)).clamp_(min=0.0)
                blk[J] = torch.logsumexp(self.loga[s:e].unsqueeze(1) + (fb.unsqueeze(1) - Cj) / eps, dim=0)
            col_log = torch.logaddexp(col_log, blk)
        g_new = -eps * col_log
        return f_new, g_new, float(err)

    def _rebuild_kernel(self, f: Any, g: Any) -> None:
        """Turn the stored scores into ``K = exp((f_i + g_j - C_ij) / eps)`` in place."""
        eps = self.eps
        gs = (g / eps).unsqueeze(0)
        fs = (f - self.x2) / eps
        for s in range(0, self.n, self.block):
            e = min(s + self.block, self.n)
            self.K[s:e].add_(gs).add_(fs[s:e].unsqueeze(1)).exp_()

    def run(self, tol: float, max_iter: int, init: tuple[Any, Any] | None = None) -> tuple[Any, Any, int, float]:
        torch, eps = self.torch, self.eps
        if init is None:
            f = torch.zeros(self.n, dtype=self.X.dtype, device=self.X.device)
            g = torch.zeros(self.m, dtype=self.X.dtype, device=self.X.device)
        else:
            f, g = (v.to(dtype=self.X.dtype, device=self.X.device) for v in init)
        err, it = math.inf, 0
        if self.K is None:
            while it < max_iter:
                f, g, err = self.log_pass(f, g)
                it += 1
                if err < tol:
                    break
            return f, g, it, err
        # Stabilised scaling: plan = a_i u_i K_ij v_j b_j with K holding the absorbed potentials.
        u = torch.ones_like(f)
        v = torch.ones_like(g)
        rebuild = True
        while it < max_iter:
            if rebuild:
                f, g = f + eps * u.log(), g + eps * v.log()
                u.fill_(1.0)
                v.fill_(1.0)
                f, g, err = self.log_pass(f, g)
                self._rebuild_kernel(f, g)
                rebuild = False
            else:
                r = self.K @ (v * self.B)
                u_new = 1.0 / r
                e_new = float((self.A * (u * r - 1.0).abs()).sum())
                v_new = 1.0 / ((u_new * self.A) @ self.K)
                lu, lv = u_new.log(), v_new.log()
                big = max(float(lu.abs().max()), float(lv.abs().max()))
                if not math.isfinite(big) or big > _TAU:
                    rebuild = True  # keep the last bounded (u, v); redo this step exactly
                    continue
                u, v, err = u_new, v_new, e_new
            it += 1
            if err < tol:
                break
        return f + eps * u.log(), g + eps * v.log(), it, err


def _solve_keops(
    x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, eps: float, tol: float, max_iter: int, device: Any
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Log-domain Sinkhorn with symbolic pykeops log-sum-exp reductions (no (n, m) matrix)."""
    import torch
    from pykeops.torch import LazyTensor

    dt = torch.float64 if x.dtype == np.float64 else torch.float32
    X = torch.from_numpy(x).to(device=device, dtype=dt)
    Y = torch.from_numpy(y).to(device=device, dtype=dt)
    loga = torch.from_numpy(np.log(a)).to(device=device, dtype=dt)
    logb = torch.from_numpy(np.log(b)).to(device=device, dtype=dt)
    A = torch.from_numpy(a).to(device=device, dtype=dt)
    xi, yj = LazyTensor(X[:, None, :]), LazyTensor(Y[None, :, :])
    C = ((xi - yj) ** 2).sum(-1)  # symbolic (n, m) cost
    f = torch.zeros(len(x), dtype=dt, device=device)
    g = torch.zeros(len(y), dtype=dt, device=device)
    err, it = math.inf, 0
    with torch.no_grad():
        while it < max_iter:
            hj = LazyTensor(((g + eps * logb) / eps)[None, :, None])
            f_new = -eps * (hj - C / eps).logsumexp(dim=1).view(-1)
            err = float((A * torch.expm1((f - f_new) / eps).abs()).sum())
            f = f_new
            hi = LazyTensor(((f + eps * loga) / eps)[:, None, None])
            g = -eps * (hi - C / eps).logsumexp(dim=0).view(-1)
            it += 1
            if err < tol:
                break
    return f.double().cpu().numpy(), g.double().cpu().numpy(), it, err

