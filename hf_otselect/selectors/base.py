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

from .._checks import check_choice, check_embeddings, check_int, param_error

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
    implement :meth:`score`. Diagnostics of the last :meth:`score` call go into ``diagnostics_``.

    Class attributes
    ----------------
    name : str
        Registry key, e.g. ``"got_d"``.
    needs_text : bool
        When True, :meth:`score` takes sequences of strings instead of embedding arrays.
    choice : {"top_k", "sample", "log_sample"}
        How :meth:`select` turns scores into rows: stable top-k, or seeded sampling from the
        scores read as probabilities (``"sample"``) or as log-weights (``"log_sample"``).
    """

    name: ClassVar[str] = ""
    needs_text: ClassVar[bool] = False
    choice: ClassVar[ChoiceMode] = "top_k"

    diagnostics_: dict[str, Any]

    @abstractmethod
    def score(self, candidates: Any, target: Any) -> np.ndarray:
        """Score every candidate against the target.

        Parameters
        ----------
        candidates : ndarray of shape (n_candidates, dim), or sequence of str if ``needs_text``
        target : ndarray of shape (n_target, dim), or sequence of str if ``needs_text``

        Returns
        -------
        ndarray of shape (n_candidates,), float64
            Higher means "select".
        """

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
        n = len(candidates)
        if n == 0:  # said plainly, rather than as "k must be in [1, 0]"
            raise param_error("candidates", f"{type(self).__name__}.select", "a non-empty array or sequence (n_candidates >= 1)", "0 rows")
        k = check_int(k, "k", f"{type(self).__name__}.select", 1, None if self.replaces else n)
        seed = check_int(seed, "seed", f"{type(self).__name__}.select", 0)
        self.diagnostics_ = {}
        scores = np.asarray(self.score(candidates, target), dtype=np.float64)
        return SelectionResult(indices=self.choose_rows(scores, k, seed=seed), scores=scores, info=dict(self.diagnostics_))

    @property
    def replaces(self) -> bool:
        """Whether :meth:`choose_rows` samples with replacement (then any ``k >= 1`` is allowed)."""
        return bool(getattr(self, "replace", False)) and self.choice == "sample"

    def choose_rows(self, scores: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
        """Turn this selector's scores into ``k`` row indices with :func:`choose`, its way."""
        return choose(scores, k, mode=self.choice, seed=seed, replace=self.replaces)

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


def get_selector(method: str | Selector, **params: Any) -> Selector:
    """Return a selector instance by registry name (or pass an instance through unchanged)."""
    if isinstance(method, Selector):
        if params:
            raise param_error("params", "get_selector", "empty when an instance is given", sorted(params))
        return method
    check_choice(method, "method", "get_selector", available_selectors())
    cls = _REGISTRY[method]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise param_error("params", f"get_selector({method!r})", f"keyword(s) among {sorted(accepted)}", unknown)
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


def choose(
    scores: np.ndarray,
    k: int,
    *,
    mode: ChoiceMode = "top_k",
    seed: int = 0,
    replace: bool = False,
) -> np.ndarray:
    """Choose ``k`` rows from per-row scores.

    Parameters
    ----------
    scores : ndarray of shape (n,)
        Higher means "select". For ``mode="sample"`` they are read as unnormalised probabilities
        (non-negative, positive sum).
    k : int
        How many rows.
    mode : {"top_k", "sample", "log_sample"}
        ``"top_k"``: the ``k`` highest scores, ties broken by the lower index, so the result is the
        same on every run. ``"sample"``: ``k`` draws from ``scores / scores.sum()`` with a
        ``numpy.random.Generator`` seeded by ``seed``; with ``replace=False`` this is the
        Gumbel-top-k trick (exactly sampling without replacement, proportional to the scores).
        ``"log_sample"``: the scores are log-weights (``-inf`` = never); Gumbel-top-k on them
        directly, so weights that would underflow in ``exp`` are still drawn in proportion
        (without replacement only).
    seed : int
        Seed for ``mode="sample"``.
    replace : bool
        Sample with replacement (as the TSDS paper does) when True.

    Returns
    -------
    ndarray of shape (k,), int64
        Row indices, best (or first drawn) first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise param_error("scores", "choose", "a non-empty 1-D array", f"an array of shape {scores.shape}")
    if np.isnan(scores).any():
        raise param_error("scores", "choose", "free of NaN", f"{int(np.isnan(scores).sum())} NaN value(s)")
    check_choice(mode, "mode", "choose", ["top_k", "sample", "log_sample"])
    n = scores.size
    k = check_int(k, "k", "choose", 1, None if (mode == "sample" and replace) else n)
    if mode == "top_k":
        return descending_order(scores)[:k]
    if mode == "log_sample":
        if replace:
            raise param_error("replace", "choose(mode='log_sample')", "False", replace)
        if np.isposinf(scores).any():
            raise param_error("scores", "choose(mode='log_sample')", "log-weights below +inf", "+inf")
        support = int(np.isfinite(scores).sum())
        if k > support:
            raise param_error("k", "choose(mode='log_sample')", f"at most the {support} rows with a finite log-weight", k)
        # Gumbel-top-k (Kool et al. 2019): k draws without replacement, proportional to exp(scores).
        return descending_order(scores + np.random.default_rng(seed).gumbel(size=n))[:k]
    if (scores < 0).any() or not np.isfinite(scores).all() or scores.sum() <= 0:
        raise param_error("scores", "choose(mode='sample')", "finite, non-negative with a positive sum", "other values")
    rng = np.random.default_rng(seed)
    p = scores / scores.sum()
    if replace:
        return rng.choice(n, size=k, replace=True, p=p).astype(np.int64)
    support = int((p > 0).sum())
    if k > support:
        raise param_error("k", "choose(mode='sample', replace=False)", f"at most the {support} rows with positive probability", k)
    # Gumbel-top-k: argsort of log p + Gumbel noise samples k rows without replacement with
    # probabilities proportional to p (Kool et al. 2019); rows with p = 0 get -inf and never come.
    with np.errstate(divide="ignore"):
        keys = np.log(p) + rng.gumbel(size=n)
    return descending_order(keys)[:k]


def as_texts(values: Sequence[Any], name: str, owner: str) -> list[str]:
    """Validate a sequence of texts for text-based selectors (non-empty, all str)."""
    values = list(values)
    if not values:
        raise param_error(name, owner, "a non-empty sequence of str", values)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise param_error(name, owner, "a sequence of str", f"{type(v).__name__} at position {i}", exc=TypeError)
    return values
