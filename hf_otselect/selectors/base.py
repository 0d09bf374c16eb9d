"""The selector interface, the name registry and the one shared way to choose rows from scores.

A selector *scores*: ``score(candidates, target) -> (n_candidates,)`` with higher meaning "select".
:func:`choose` *chooses*: stable top-k by score, or seeded sampling when the scores are
probabilities (TSDS). Selectors see arrays only (or texts, for those that declare ``needs_text``);
they never touch datasets, files or the Hub.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from .._checks import LONE_SURROGATES, check_choice, check_embeddings, check_int, check_magnitude, check_seed, param_error
from .._suggest import did_you_mean
from ..devices import check_solver_device
from ..dist import LOCAL, Comm, PoolView, TextView
from ..threshold import top_k_cut

ChoiceMode = Literal["top_k", "sample", "log_sample"]

_REGISTRY: dict[str, type[Selector]] = {}


@dataclass(frozen=True)
class SelectionResult:
    """What :meth:`Selector.select` returns.

    Attributes
    ----------
    indices : ndarray of shape (k,), int64
        Chosen candidate rows, best first (for sampling: in draw order; with replacement a row may
        appear more than once).
    scores : ndarray of shape (n_candidates,), float64
        The score of every candidate; higher means "select".
    info : dict
        Method-specific diagnostics (e.g. the OT distance, solver iterations), JSON-serialisable.
    """

    indices: np.ndarray
    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class Selector(ABC):
    """Base class of every selector.

    Subclasses set ``name`` (the registry key), store their constructor parameters unchanged and
    implement :meth:`fit` (the small global state, computed through collectives over a sharded pool)
    and :meth:`score_batch` (a pure per-row function of that state). :meth:`score` on in-memory
    arrays is the two in a row. Diagnostics of the last fit go into ``diagnostics_``.

    Class attributes
    ----------------
    name : str
        Registry key, e.g. ``"got_d"``.
    needs_text : bool
        When True, :meth:`score` takes sequences of strings instead of embedding arrays.
    needs_vectors : bool
        When False, the scores use neither vectors nor texts (random): pipelines skip the encoder
        and hand :meth:`fit` a zero-width view.
    choice : {"top_k", "sample", "log_sample"}
        How :meth:`select` turns scores into rows: stable top-k, or seeded sampling from the
        scores read as probabilities (``"sample"``) or as log-weights (``"log_sample"``).
    any_magnitude : bool
        True when the selector scores vectors of any finite magnitude correctly (cosine and random
        ignore it; GOT-D shifts and rescales its costs exactly); otherwise :meth:`_check_pair`
        refuses vectors outside :data:`~hf_otselect._checks.MAGNITUDE_RANGE`.
    """

    name: ClassVar[str] = ""
    needs_text: ClassVar[bool] = False
    needs_vectors: ClassVar[bool] = True
    choice: ClassVar[ChoiceMode] = "top_k"
    any_magnitude: ClassVar[bool] = False

    diagnostics_: dict[str, Any]

    @abstractmethod
    def fit(self, pool: PoolView | TextView, target: Any, *, comm: Comm | None = None) -> Any:
        """Compute the small global state that every row's score needs.

        Parameters
        ----------
        pool : PoolView (TextView if ``needs_text``)
            This process's rows of the pool, read in blocks with their global indices; a fit never
            needs them in memory at once.
        target : ndarray of shape (n_target, dim), or sequence of str if ``needs_text``
            The whole target, on every process.
        comm : Comm, optional
            The only channel to the other processes (default: this process alone). Every process
            calls ``fit`` and gets the same state.

        Returns
        -------
        state
            A selector-specific object whose size does not grow with ``n_candidates`` (TSDS keeps
            O(n_target x max_K) neighbour lists). Diagnostics go into ``diagnostics_``.
        """

    @abstractmethod
    def score_batch(self, state: Any, rows: Any, index: np.ndarray) -> np.ndarray:
        """Score a block of rows from the fitted state alone (a pure per-row function).

        Parameters
        ----------
        state
            What :meth:`fit` returned.
        rows : ndarray of shape (b, dim), or list of str if ``needs_text``
        index : ndarray of shape (b,), int64
            The rows' global indices (a row's score may depend on its index, never on other rows).

        Returns
        -------
        ndarray of shape (b,), float64
            Higher means "select".
        """

    def score(self, candidates: Any, target: Any) -> np.ndarray:
        """Score every candidate against the target: :meth:`fit` then :meth:`score_batch`.

        Parameters
        ----------
        candidates : ndarray of shape (n_candidates, dim), or sequence of str if ``needs_text``
        target : ndarray of shape (n_target, dim), or sequence of str if ``needs_text``

        Returns
        -------
        ndarray of shape (n_candidates,), float64
            Higher means "select".
        """
        self.check_params()
        if self.needs_text:
            candidates, target = as_texts(candidates, "candidates", f"{type(self).__name__}.score"), as_texts(target, "target", f"{type(self).__name__}.score")
            view: PoolView | TextView = TextView(candidates)
        else:
            candidates, target = self._check_pair(candidates, target)
            view = PoolView(candidates)
        state = self.fit(view, target)
        parts = [np.asarray(self.score_batch(state, rows, idx), dtype=np.float64) for idx, rows in view.blocks()]
        return np.concatenate(parts) if parts else np.zeros(0)

    def select(self, candidates: Any, target: Any, k: int, *, seed: int = 0) -> SelectionResult:
        """Score the candidates and choose ``k`` of them (see :func:`choose`).

        Parameters
        ----------
        candidates, target
            As for :meth:`score`.
        k : int
            Number of rows to choose, in ``[1, n_candidates]`` (sampling with replacement allows
            any ``k >= 1``).
        seed : int, default 0
            Seed of the random generator used for ties-free sampling; top-k ignores it.
        """
        if hasattr(candidates, "__len__") and len(candidates) == 0:  # said plainly, rather than as "k must be in [1, 0]"
            raise param_error("candidates", f"{type(self).__name__}.select", "a non-empty array or sequence (n_candidates >= 1)", "0 rows")
        # The candidates' form before k: a 3-D array's len() is no row count to check k against.
        owner = f"{type(self).__name__}.score"
        candidates = as_texts(candidates, "candidates", owner) if self.needs_text else check_embeddings(candidates, "candidates", owner)
        n = len(candidates)
        k = check_int(k, "k", f"{type(self).__name__}.select", 1, None if self.replaces else n)
        seed = check_seed(seed, "seed", f"{type(self).__name__}.select")
        self.diagnostics_ = {}
        scores = np.asarray(self.score(candidates, target), dtype=np.float64)
        return SelectionResult(indices=self.choose_rows(scores, k, seed=seed), scores=scores, info=dict(self.diagnostics_))

    @property
    def replaces(self) -> bool:
        """Whether :meth:`choose_rows` samples with replacement (then any ``k >= 1`` is allowed)."""
        return bool(getattr(self, "replace", False)) and self.choice == "sample"

    def choose_rows(self, scores: np.ndarray, k: int, *, seed: int = 0, index: np.ndarray | None = None, comm: Comm | None = None) -> np.ndarray:
        """Turn this selector's scores into ``k`` global row indices with :func:`choose`, its way."""
        return choose(scores, k, mode=self.choice, seed=seed, replace=self.replaces, index=index, comm=comm)

    def choice_keys(self, scores: np.ndarray, k: int, *, seed: int = 0, index: np.ndarray | None = None, comm: Comm | None = None) -> np.ndarray | None:
        """The keys whose exact top-``k`` is :meth:`choose_rows`'s choice, or None when it draws with replacement.

        Checks what :meth:`choose_rows` checks (a subclass that refuses more overrides both), so a
        pipeline can keep each process's rows above a threshold of these keys
        (:func:`hf_otselect.threshold.top_k_cut`) instead of gathering them.

        Returns
        -------
        ndarray of shape (n,), float64, or None
        """
        return choose_keys(scores, k, mode=self.choice, seed=seed, replace=self.replaces, index=index, comm=comm)

    def check_params(self) -> None:
        """Validate the stored constructor parameters; raise with the shared message template.

        :func:`get_selector` calls this right after construction, so a bad value (``eps=-1``,
        an unknown back end) fails before any embedding or scoring. Subclasses override it; the
        default runs the private ``_check_params`` / ``_validate`` hooks the built-in selectors
        already define (they also run them inside :meth:`score`), and does nothing otherwise.
        """
        for hook in ("_check_params", "_validate"):
            fn = getattr(self, hook, None)
            if callable(fn):
                fn()
        check_solver_device(self)  # 'cuda' on a machine without it: here, not as a torch assert mid-fit

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's keyword parameters, in order."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters, by name (as stored, unchanged)."""
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if not isinstance(v, np.ndarray))
        return f"{type(self).__name__}({params})"

    def _check_pair(self, candidates: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validate an embedding pair: float32, 2-D, finite, non-empty, same dimension."""
        owner = f"{type(self).__name__}.score"
        candidates = check_embeddings(candidates, "candidates", owner)
        target = check_embeddings(target, "target", owner, dim=candidates.shape[1])
        if not self.any_magnitude:  # squared distances in float32 must neither overflow nor flush to 0
            check_magnitude(candidates, "candidates", owner)
            check_magnitude(target, "target", owner)
        return candidates, target


def register(name: str) -> Callable[[type[Selector]], type[Selector]]:
    """Class decorator: make a selector available as ``get_selector(name)`` / ``method=name``."""

    def wrap(cls: type[Selector]) -> type[Selector]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"A selector named {name!r} is already registered ({_REGISTRY[name].__name__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_selectors() -> list[str]:
    """Names of the registered selectors, sorted."""
    return sorted(_REGISTRY)


def selector_class(method: str) -> type[Selector]:
    """The registered class of ``method`` (a registry name)."""
    check_choice(method, "method", "get_selector", available_selectors())
    return _REGISTRY[method]


def get_selector(method: str | Selector, **params: Any) -> Selector:
    """Return a selector instance by registry name (or pass an instance through unchanged)."""
    if isinstance(method, Selector):
        if params:
            raise param_error("params", "get_selector", "empty when an instance is given", sorted(params))
        return method
    cls = selector_class(method)
    accepted = set(cls.param_names())
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(str(param_error("params", f"get_selector({method!r})", f"keyword(s) among {sorted(accepted)}", unknown))
                         + did_you_mean(unknown[0], accepted))
    selector = cls(**params)
    selector.check_params()  # bad values fail here, before the caller embeds or scores anything
    return selector


def descending_order(keys: np.ndarray) -> np.ndarray:
    """Row indices by descending key, ties broken by the lower index, NaN last.

    The one tie rule of the package: top-k, Gumbel-top-k and the ranks of the scored split all
    order rows this way, so the same scores give the same order on every run.

    Parameters
    ----------
    keys : ndarray of shape (n,)

    Returns
    -------
    ndarray of shape (n,), int64
    """
    keys = np.asarray(keys, dtype=np.float64)
    # lexsort sorts by the last key first: descending key (NaN, negated, still sorts last), then index.
    return np.lexsort((np.arange(keys.size), -keys)).astype(np.int64)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014), element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_uniforms(seed: int, index: np.ndarray) -> np.ndarray:
    """Uniform numbers in (0, 1), one per global row index, from a counter-based generator.

    The number of row ``i`` depends on ``(seed, i)`` alone, so any process can draw its own rows'
    numbers without another's stream, and the same rows come out for any number of processes (a
    ``numpy.random.Generator`` stream would depend on how rows are split). SplitMix64 mixes the seed
    into a stream offset and then the offset row counter, as in its original use for parallel streams.

    Parameters
    ----------
    seed : int
    index : ndarray of shape (n,), int
        Global row indices.

    Returns
    -------
    ndarray of shape (n,), float64
    """
    base = _splitmix64(np.array([seed], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        bits = _splitmix64(np.asarray(index, dtype=np.int64).astype(np.uint64) + base)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def row_gumbels(seed: int, index: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise per global row index (see :func:`row_uniforms`)."""
    return -np.log(-np.log(row_uniforms(seed, index)))


def choose(
    scores: np.ndarray,
    k: int,
    *,
    mode: ChoiceMode = "top_k",
    seed: int = 0,
    replace: bool = False,
    index: np.ndarray | None = None,
    comm: Comm | None = None,
) -> np.ndarray:
    """Choose ``k`` rows from per-row scores, the same rows for any number of processes.

    Each process passes the scores of its own rows and their global indices; every process gets
    back the same ``k`` global indices. Nothing of size ``n`` crosses processes: top-k finds the
    exact cut by rounds of all-reduced counts and gathers only the ``k`` chosen (key, index) pairs
    (:func:`top_k`), sampling derives each row's random key from ``(seed, global index)``
    (:func:`row_uniforms`), and sampling with replacement exchanges one integer mass per process.

    Parameters
    ----------
    scores : ndarray of shape (n,)
        This process's scores; higher means "select". For ``mode="sample"`` they are read as
        unnormalised probabilities (non-negative, positive sum over all processes).
    k : int
        How many rows, over all processes.
    mode : {"top_k", "sample", "log_sample"}
        ``"top_k"``: the ``k`` highest scores, ties broken by the lower global index.
        ``"sample"`` without replacement: Gumbel-top-k on ``log(scores)`` (Kool et al. 2019:
        exactly sampling without replacement in proportion to the scores); with replacement:
        ``k`` inverse-CDF draws, the probabilities quantised to integers so that the cumulative
        sums (and so the rows drawn) are exact for any split of the rows: a row's mass is
        ``floor(score / max_score * floor(2**62 / n_global))``, so a row below ``2**-62 * n_global``
        of the largest score is never drawn. ``"log_sample"``: the scores are log-weights
        (``-inf`` = never); Gumbel-top-k on them directly (without replacement only).
    seed : int
        Seed of the sampling modes.
    replace : bool
        Sample with replacement (as the TSDS paper does).
    index : ndarray of shape (n,), int, optional
        Global row indices of ``scores`` (default ``arange(n)``: one process holding every row).
    comm : Comm, optional
        The process group (default: this process alone).

    Returns
    -------
    ndarray of shape (k,), int64
        Global row indices, best (or first drawn) first; identical on every process.
    """
    comm = comm or LOCAL
    keys = choose_keys(scores, k, mode=mode, seed=seed, replace=replace, index=index, comm=comm)
    index = np.arange(np.size(scores), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if keys is None:
        return _draw_with_replacement(np.asarray(scores, dtype=np.float64), index, int(k), seed, int(comm.all_reduce(np.array([index.size], dtype=np.int64))[0]), comm)
    return top_k(keys, index, int(k), comm)


def choose_keys(
    scores: np.ndarray,
    k: int,
    *,
    mode: ChoiceMode = "top_k",
    seed: int = 0,
    replace: bool = False,
    index: np.ndarray | None = None,
    comm: Comm | None = None,
) -> np.ndarray | None:
    """The keys :func:`choose` takes the exact top-``k`` of (None: it draws with replacement), checked as it checks.

    Parameters
    ----------
    scores, k, mode, seed, replace, index, comm
        As :func:`choose`.

    Returns
    -------
    ndarray of shape (n,), float64, or None
        The scores (``"top_k"``), ``log(scores) + Gumbel`` (``"sample"`` without replacement,
        ``-inf`` for a zero probability) or ``scores + Gumbel`` (``"log_sample"``); the Gumbel
        noise of a row comes from ``(seed, global index)`` alone (:func:`row_gumbels`).
    """
    comm = comm or LOCAL
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise param_error("scores", "choose", "a 1-D array", f"an array of shape {scores.shape}")
    index = np.arange(scores.size, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if index.shape != scores.shape:
        raise param_error("index", "choose", f"an int array of shape {scores.shape} like the scores", f"shape {index.shape}")
    check_choice(mode, "mode", "choose", ["top_k", "sample", "log_sample"])
    seed = check_seed(seed, "seed", "choose")
    n_nan, n = (int(v) for v in comm.all_reduce(np.array([np.isnan(scores).sum(), scores.size], dtype=np.int64)))
    if n == 0:
        raise param_error("scores", "choose", "a non-empty 1-D array", "0 rows")
    if n_nan:
        raise param_error("scores", "choose", "free of NaN", f"{n_nan} NaN value(s)")
    k = check_int(k, "k", "choose", 1, None if (mode == "sample" and replace) else n)
    if mode == "top_k":
        return scores
    if mode == "log_sample":
        if replace:
            raise param_error("replace", "choose(mode='log_sample')", "False", replace)
        if np.isposinf(scores).any():
            raise param_error("scores", "choose(mode='log_sample')", "log-weights below +inf", "+inf")
        support = int(comm.all_reduce(np.array([np.isfinite(scores).sum()], dtype=np.int64))[0])
        if k > support:
            raise param_error("k", "choose(mode='log_sample')", f"at most the {support} rows with a finite log-weight", k)
        return scores + row_gumbels(seed, index)
    bad = int((scores < 0).any() or not np.isfinite(scores).all())
    total, bad = comm.all_reduce(np.array([scores.sum() if not bad else 0.0, bad], dtype=np.float64))
    if bad or total <= 0:
        raise param_error("scores", "choose(mode='sample')", "finite, non-negative with a positive sum", "other values")
    if replace:
        return None
    support = int(comm.all_reduce(np.array([(scores > 0).sum()], dtype=np.int64))[0])
    if k > support:
        raise param_error("k", "choose(mode='sample', replace=False)", f"at most the {support} rows with positive probability", k)
    with np.errstate(divide="ignore"):  # p = 0 gives -inf and never comes
        return np.log(scores) + row_gumbels(seed, index)


def top_k(keys: np.ndarray, index: np.ndarray, k: int, comm: Comm) -> np.ndarray:
    """Global indices of the ``k`` largest keys (ties: lower global index), best first, on every process.

    Several processes find the exact cut by rounds of all-reduced counts
    (:func:`~hf_otselect.threshold.top_k_cut`), each keeps its own rows above it, and the ``k``
    chosen (key, index) pairs are gathered to order them: ``k`` pairs in all, where each process
    used to send its best ``k``.
    """
    if comm.world_size == 1:
        return index[_order(keys, index)[:k]]
    mine = top_k_cut(keys, k, index=index, comm=comm, owner="choose").keeps(keys, index)
    return order_chosen(keys[mine], index[mine], comm)


def order_chosen(keys: np.ndarray, index: np.ndarray, comm: Comm) -> np.ndarray:
    """Every process's chosen rows, best first (descending key, ties to the lower index), on every process.

    Parameters
    ----------
    keys, index : ndarray of shape (q_local,)
        This process's chosen rows: their keys and global indices.
    comm : Comm

    Returns
    -------
    ndarray of shape (q,), int64
        ``q`` is the chosen rows of every process (the gather moves ``q`` pairs in all).
    """
    if comm.world_size == 1:
        return np.asarray(index, dtype=np.int64)[_order(keys, index)]
    k_all = np.concatenate(comm.all_gather(np.asarray(keys, dtype=np.float64)))
    i_all = np.concatenate(comm.all_gather(np.asarray(index, dtype=np.int64)))
    return i_all[_order(k_all, i_all)]


def _order(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Positions by descending key, ties to the lower global index, NaN last."""
    return np.lexsort((index, -np.asarray(keys, dtype=np.float64))).astype(np.int64)


def _draw_with_replacement(scores: np.ndarray, index: np.ndarray, k: int, seed: int, n: int, comm: Comm) -> np.ndarray:
    """``k`` inverse-CDF draws over integer masses; exact, so any split of the rows draws the same."""
    top = float(comm.all_reduce(np.array([scores.max(initial=0.0)]), op="max")[0])
    unit = float((1 << 62) // n)
    order = np.argsort(index, kind="stable")  # the cumulative sum runs in global row order
    mass = np.floor(scores[order] / top * unit).astype(np.int64)
    offset, total = comm.exclusive_offset(int(mass.sum()))
    draws = np.random.default_rng(seed).integers(0, total, size=k, dtype=np.int64)
    mine = np.flatnonzero((draws >= offset) & (draws < offset + int(mass.sum())))
    rows = index[order][np.searchsorted(np.cumsum(mass), draws[mine] - offset, side="right")]
    if comm.world_size == 1:
        return rows.astype(np.int64)
    which = np.concatenate(comm.all_gather(mine.astype(np.int64)))
    got = np.concatenate(comm.all_gather(rows.astype(np.int64)))
    out = np.empty(k, dtype=np.int64)
    out[which] = got
    return out


def as_texts(values: Sequence[Any], name: str, owner: str) -> list[str]:
    """Validate a sequence of texts for text-based selectors (non-empty, all str); lone surrogates
    become U+FFFD, as in :func:`hf_otselect.embed`.

    A lone str, bytes or mapping is refused: ``list()`` would read it as its characters or keys.
    """
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        got = f"a lone {type(values).__name__}" if values is not None else None
        raise param_error(name, owner, "a sequence of str (a list of texts, or a Dataset column)", got, exc=TypeError)
    values = list(values)
    if not values:
        raise param_error(name, owner, "a non-empty sequence of str", values)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise param_error(name, owner, "a sequence of str", f"{type(v).__name__} at position {i}", exc=TypeError)
    return [LONE_SURROGATES.sub("\ufffd", v) for v in values]  # as embed() does: UTF-8 cannot encode them
