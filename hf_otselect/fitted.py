"""The fitted selector: fit once on a pool (or a sample of it), then score and filter any dataset.

``fit_selector(pool, target, method=...)`` runs a registered selector's ``fit`` and keeps what it
returns (a state whose size does not grow with the pool), the encoder's identity, the method's
parameters and a score calibration. The result, a :class:`FittedSelector`, is

- a batched ``datasets`` map: ``ds.map(fitted, batched=True)`` adds the score column, embedding the
  batch's texts itself or reading a vector column; its fingerprint is that of its content, so a
  second identical map is read from datasets' cache and a different fit misses it;
- a filter: ``ds.filter(fitted.keep(fraction=0.01), batched=True, with_indices=True)``;
- a file: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (safetensors + JSON + card,
  see :mod:`hf_otselect.fitted_io`).

A row's score is ``score_batch(state, row, index)`` of the selector, the function
``select_by_ot`` scores with, so a full fit gives the scores of ``select_by_ot``. GOT-D's score of
any row is the calibrated gradient (Kang et al. 2024, Eq. 3) of the row's potential, the
c-transform of the fitted target potentials: the out-of-sample extension of an entropic potential
(as in Pooladian & Niles-Weed 2021, "Entropic estimation of optimal transport maps"). A sample
fit's gradient uses the sample's mean potential: ``-(N / (N - 1)) (f_j - mean_sample f)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._checks import (check_choice, check_embeddings, check_float, check_int, check_seed, nonfinite_rows, nonfinite_summary, param_error,
                      short_repr)
from .fingerprints import digest as _digest
from .dist import LOCAL, Comm, PoolView, TextView
from .selectors.base import row_gumbels, row_uniforms
from .threshold import Cut, descending_ranks_values, top_k_cut

logger = logging.getLogger(__name__)

__all__ = ["FittedSelector", "Keep", "choice_keys", "fit_selector", "sample_mask"]

#: Fractions of rows kept at which the calibration stores the key threshold of the fit rows.
CALIBRATION_FRACTIONS = np.unique(np.concatenate([[1e-4, 2e-4, 5e-4], np.arange(1, 1001) / 1000]))
_SAMPLE_STREAM = 0x53414D50  # seeds the sample's keys apart from the choice keys of the same seed
_INDEX_BOUND = "scores looked up by pool row index"
#: What to use instead when rows outside an index-bound fit (TSDS, round-robin) need scores.
OUT_OF_FIT = ("fit on the whole pool you select from, or use method='got_d' or 'similarity' (reduce 'mean' or 'max'), "
               "whose scores extend to any row")
_IMPORTED_IN = os.getpid()  # a forked worker has another pid (see _restore)


def choice_keys(scores: np.ndarray, index: np.ndarray, choice: str, seed: int) -> np.ndarray:
    """The keys a filter keeps the largest of: what :func:`~hf_otselect.selectors.choose` ranks.

    Parameters
    ----------
    scores : ndarray of shape (n,)
    index : ndarray of shape (n,), int
        Global row indices (the sampling keys depend on ``(seed, index)`` alone).
    choice : {"top_k", "sample", "log_sample"}
    seed : int

    Returns
    -------
    ndarray of shape (n,), float64
        The score (top-k), ``log p + Gumbel`` (sampling without replacement, Kool et al. 2019) or
        ``log w + Gumbel`` (log-weights); ``-inf`` for a row that can never be drawn.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if choice == "top_k":
        return scores
    noise = row_gumbels(seed, np.asarray(index, dtype=np.int64))
    if choice == "log_sample":
        return scores + noise
    with np.errstate(divide="ignore"):
        return np.log(scores) + noise


def sample_mask(index: np.ndarray, sample: int | float | None, n_global: int, seed: int, comm: Comm | None = None) -> np.ndarray:
    """Which of these global rows a sample fit reads: the same rows for any number of processes.

    Row ``i``'s key is ``row_uniforms(s, i)`` with ``s`` derived from ``seed``: a float ``sample``
    keeps the rows with key below it (each row with that probability), an int keeps the ``sample``
    rows with the smallest keys (exactly, by :func:`~hf_otselect.threshold.top_k_cut`).

    Parameters
    ----------
    index : ndarray of shape (n_local,), int
    sample : int, float or None
        None: every row.
    n_global : int
    seed : int
    comm : Comm, optional

    Returns
    -------
    ndarray of shape (n_local,), bool
    """
    index = np.asarray(index, dtype=np.int64)
    if sample is None or (isinstance(sample, numbers.Integral) and sample >= n_global) or (not isinstance(sample, numbers.Integral) and sample >= 1.0):
        return np.ones(index.size, dtype=bool)
    u = row_uniforms(int(np.random.SeedSequence([seed, _SAMPLE_STREAM]).generate_state(1)[0]), index)
    if isinstance(sample, numbers.Integral):
        return top_k_cut(-u, int(sample), index=index, comm=comm, owner="fit_selector").keeps(-u, index)
    return u < float(sample)


def _index_bound(method: str, params: dict[str, Any]) -> bool:
    """Scores that are a lookup by pool row (TSDS's probabilities, round-robin positions)."""
    return method == "tsds" or (method == "similarity" and params.get("reduce") == "round_robin")


def _check_sample(sample: Any, owner: str) -> int | float | None:
    if sample is None:
        return None
    if isinstance(sample, numbers.Integral) and not isinstance(sample, bool):
        return check_int(sample, "sample", owner, 1)
    if isinstance(sample, numbers.Real) and not isinstance(sample, bool):
        return check_float(sample, "sample", owner, 0.0, 1.0, low_open=True)
    raise param_error("sample", owner, "None, a row count (int >= 1) or a fraction in (0, 1]", sample, exc=TypeError)


def _check_got_d_rows(n_fit: int, sample: int | float | None, owner: str) -> None:
    """Refuse a GOT-D fit on fewer than 2 rows: its calibrated gradient ``-(N / (N - 1)) (f_j - mean f)``
    (Kang et al. 2024, Eq. 3) is undefined at N = 1, and would score every row 0."""
    if n_fit >= 2:
        return
    if sample is None:
        raise param_error("pool", owner, "at least 2 rows for method 'got_d' (its gradient compares a row with the others)", f"{n_fit} row(s)")
    raise param_error("sample", owner, f"a sample of at least 2 rows for method 'got_d' (its gradient compares a row with the "
                      f"others; this one draws {n_fit} of the pool's rows)", sample)


def _local_rows(pool: Any, comm: Comm, owner: str) -> tuple[Any, int]:
    """This process's contiguous part of the pool (as ``Dataset.shard(contiguous=True)`` cuts it) and its length."""
    from datasets import Dataset, IterableDataset

    if isinstance(pool, IterableDataset):
        if comm.world_size > 1:
            if pool.n_shards < comm.world_size:
                raise param_error("pool", owner, f"a stream with at least as many file shards as the {comm.world_size} processes", f"{pool.n_shards} shard(s)")
            pool = pool.shard(num_shards=comm.world_size, index=comm.rank, contiguous=True)
        return pool, sum(1 for _ in pool)
    if isinstance(pool, Dataset):
        part = pool.shard(num_shards=comm.world_size, index=comm.rank, contiguous=True) if comm.world_size > 1 else pool
        return part, len(part)
    if isinstance(pool, np.ndarray) or (isinstance(pool, Sequence) and not isinstance(pool, (str, bytes))):
        n = len(pool)
        sizes = [n // comm.world_size + (r < n % comm.world_size) for r in range(comm.world_size)]
        start = sum(sizes[: comm.rank])
        return pool[start : start + sizes[comm.rank]], sizes[comm.rank]
    raise param_error("pool", owner, "a Dataset, IterableDataset, list of str or (n, dim) array", type(pool).__name__, exc=TypeError)


def _take(part: Any, keep: np.ndarray, column: str, vector_column: str | None, needs_text: bool, owner: str) -> Any:
    """The kept rows of this process's part: texts (list of str) or float32 vectors."""
    from datasets import Dataset, IterableDataset

    if isinstance(part, (Dataset, IterableDataset)):
        name = column if (needs_text or vector_column is None) else vector_column
        names = part.column_names
        if names is not None and name not in names:
            raise ValueError(f"Column {short_repr(name)} not in the pool. Current columns: {names}")
        if isinstance(part, Dataset):
            values = part.select_columns([name]).select(np.flatnonzero(keep))[name]
        else:
            values = [row[name] for row, k in zip(part, keep) if k]
        return list(values) if name == column else np.asarray(values, dtype=np.float32)
    if isinstance(part, np.ndarray):
        return part[keep]
    return [t for t, k in zip(part, keep) if k]


def _in_place(part: Any, keep: np.ndarray) -> bool:
    """Whether the fit can read this process's array rows where they are: every row kept, float16/32.

    Copying them (``part[keep]``, then a float32 cast) would hold the whole pool in memory, twice
    for a float16 memory map; the solver reads a :class:`~hf_otselect.dist.PoolView` in blocks.
    """
    return (isinstance(part, np.ndarray) and part.ndim == 2 and len(part) > 0
            and part.dtype in (np.float16, np.float32) and bool(keep.all()))


def _checked_in_blocks(part: np.ndarray, owner: str) -> np.ndarray:
    """``part`` itself after the checks of :func:`check_embeddings`, done block by block.

    float16 and float32 values are finite in float32 exactly when they are finite, so the
    finiteness check is the whole of it (the shape and dtype are what :func:`_in_place` admitted).
    """
    count, first = nonfinite_rows(part)
    if count:
        raise param_error("pool", owner, "finite (no NaN or Inf)", nonfinite_summary(count, first))
    return part


def _side(data: Any, column: str, vector_column: str | None, needs_text: bool, name: str, owner: str) -> Any:
    """A target side as texts or vectors (a Dataset's vector column when the pool uses one)."""
    from datasets import Dataset

    if isinstance(data, Dataset):
        col = column if (needs_text or vector_column is None or vector_column not in data.column_names) else vector_column
        if col not in data.column_names:
            raise ValueError(f"Column {short_repr(col)} not in the {name} dataset. Current columns: {data.column_names}")
        values = data[col]
        return list(values) if col == column else np.asarray(values, dtype=np.float32)
    if isinstance(data, np.ndarray):
        if needs_text:
            raise param_error(name, owner, "texts (a Dataset or list of str) for a text selector", "an embedding array", exc=TypeError)
        return check_embeddings(data, name, owner)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and len(data) > 0:
        return list(data)
    raise param_error(name, owner, "a non-empty Dataset, list of str or (n, dim) array", type(data).__name__, exc=TypeError)


def encoder_record(*, model: str | None, revision: str | None, pooling: str, max_length: int, normalize: bool,
                   batch_size: int, trust_remote_code: bool, backend: str | None = "torch",
                   quantize: str | None = None) -> dict[str, Any]:
    """The encoder settings a fitted selector keeps and embeds with (JSON values).

    ``backend`` and ``quantize`` are kept only for a CPU back end: a torch fit's record (and so
    its fingerprint) is the one written before back ends were recorded.
    """
    record = {"model": model, "revision": revision, "pooling": pooling, "max_length": max_length, "normalize": normalize,
              "batch_size": batch_size, "trust_remote_code": bool(trust_remote_code)}
    if backend not in (None, "torch"):
        record.update(backend=backend, quantize=quantize)
    return record


def _check_map_settings(owner: str, *, column: Any, vector_column: Any, score_column: Any, device: Any = None, seed: Any = 0) -> None:
    """Refuse map settings of the wrong type, and a score column that would overwrite a column the map reads."""
    for name, value in (("column", column), ("score_column", score_column)):
        if not isinstance(value, str) or not value:
            raise param_error(name, owner, "a non-empty str", value, exc=TypeError)
    if vector_column is not None and (not isinstance(vector_column, str) or not vector_column):
        raise param_error("vector_column", owner, "a non-empty str, or None (embed the text column)", vector_column, exc=TypeError)
    if score_column in (column, vector_column):
        raise param_error("score_column", owner, f"a column other than the one the scores are computed from ({score_column!r} "
                          "would be overwritten by the scores)", score_column)
    check_seed(seed, "seed", owner)
    if device is not None:
        from .devices import resolve_device

        resolve_device(device, owner)


def fit_selector(
    pool: Any,
    target: Any,
    method: str = "got_d",
    *,
    sample: int | float | None = None,
    seed: int = 0,
    column: str = "text",
    target_column: str | None = None,
    vector_column: str | None = None,
    score_column: str = "score",
    negative_target: Any = None,
    model: str | None = None,
    revision: str | None = None,
    pooling: str = "mean",
    max_length: int = 256,
    normalize: bool = True,
    batch_size: int = 64,
    device: str | None = None,
    trust_remote_code: bool = False,
    encoder_backend: str = "torch",
    quantize: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    comm: Comm | None = None,
    **params: Any,
) -> FittedSelector:
    """Fit a selector once, on the whole pool or a sample of it, and keep the fit.

    Every process of ``comm`` passes the whole pool and fits on its contiguous part (as
    ``Dataset.shard(contiguous=True)`` cuts it); every process gets the same fitted selector.

    Parameters
    ----------
    pool : Dataset, IterableDataset, list of str or ndarray of shape (n_pool, dim)
        The candidate pool (a stream is read twice: to count its rows, then to take the sample).
    target : Dataset, list of str or ndarray of shape (n_target, dim)
    method : {"got_d", "tsds", "similarity", "dsir", "random"}
    sample : int, float or None
        Fit on a sample: ``sample`` rows (int) or each row with probability ``sample`` (float in
        (0, 1]), drawn by keys from ``(seed, global row index)`` (:func:`sample_mask`), so every
        number of processes fits on the same rows. None fits on every row. The scores of rows
        outside the sample are the same function of the state as those inside; TSDS and the
        round-robin similarity, whose scores are a lookup by fit row, refuse a sample.
    seed : int
        Seed of the sample and of the sampling methods' keys (:meth:`FittedSelector.keep`).
    column, target_column : str
        Text columns of the pool and of a target Dataset (default: ``column``).
    vector_column : str or None
        A column of precomputed vectors (in the pool, and in the target when it has it); the map
        then reads this column instead of embedding ``column``.
    score_column : str
        The column ``ds.map(fitted, batched=True)`` adds.
    negative_target : Dataset, list of str, ndarray or None
        GOT-D only: examples to move away from.
    model, revision, pooling, max_length, normalize, batch_size, device, trust_remote_code, quantize
        The encoder settings (see :func:`hf_otselect.embed`); ``model=None`` is the bundled
        all-MiniLM-L6-v2. The fitted selector records all but ``device`` and embeds with them.
    encoder_backend : {"torch", "onnx", "openvino"}
        :func:`hf_otselect.embed`'s ``backend`` (named as in :func:`select_by_ot`: GOT-D's
        ``backend=`` is its solver). The fitted selector records a CPU back end and maps with it,
        so its vectors, and scores, are the ones the fit was made with.
    cache_dir : path, optional
        Embedding cache of the fit (see :func:`hf_otselect.embed`).
    comm : Comm, optional
        The process group (default: this process alone).
    **params
        The selector's parameters (e.g. ``eps=0.1``). TSDS's ``budget`` (the number of rows its
        neighbourhoods are sized for; ``select_by_ot`` passes its ``k``) defaults to 1% of the fit rows.

    Returns
    -------
    FittedSelector
    """
    from .selectors import get_selector
    from .selectors.base import available_selectors

    owner = "fit_selector"
    comm = comm or LOCAL
    check_choice(method, "method", owner, available_selectors())
    sample = _check_sample(sample, owner)
    seed = check_seed(seed, "seed", owner)
    _check_map_settings(owner, column=column, vector_column=vector_column, score_column=score_column, device=device)
    if params.get("chunk_size") is not None:
        raise param_error("chunk_size", owner, "None (chunked GOT-D scores a row by its chunk, which a row outside the fit has not; "
                          "the global fit, or sample=, is what scales)", params["chunk_size"])
    if negative_target is not None and method != "got_d":
        raise param_error("negative_target", owner, f"None for method {method!r} (only GOT-D uses one)", "a negative target")
    if _index_bound(method, params) and sample is not None and not (isinstance(sample, float) and sample >= 1.0):
        raise param_error("sample", owner, f"None for method {method!r}{' (reduce=round_robin)' if method == 'similarity' else ''}: its "
                          f"scores are looked up by the rows its fit saw, and a row outside the fit has none ({OUT_OF_FIT})", sample)
    selector = get_selector(method, **params)  # unknown keywords and bad values fail here, before any embedding
    encoder = encoder_record(model=model, revision=revision, pooling=pooling, max_length=max_length, normalize=normalize,
                             batch_size=batch_size, trust_remote_code=trust_remote_code, backend=encoder_backend, quantize=quantize)
    from .embed import check_embedding_settings

    check_embedding_settings(model, owner=owner, batch_size=batch_size, max_length=max_length, pooling=pooling, normalize=normalize,
                             revision=revision, device=device, trust_remote_code=trust_remote_code, backend=encoder_backend, quantize=quantize)

    part, n_local = _local_rows(pool, comm, owner)
    offset, n_pool = comm.exclusive_offset(n_local)
    if n_pool == 0:
        raise param_error("pool", owner, "a non-empty pool", "0 rows")
    index = np.arange(offset, offset + n_local, dtype=np.int64)
    keep = sample_mask(index, sample, n_pool, seed, comm)
    fit_index = index[keep]
    if method == "got_d":  # before any embedding: Eq. 3's gradient needs a second fit row
        _check_got_d_rows(int(comm.all_reduce(np.array([keep.sum()], dtype=np.int64))[0]), sample, owner)
    needs_text, needs_vectors = selector.needs_text, selector.needs_vectors
    embedded = False

    def vectors_of(values: Any, name: str) -> np.ndarray:
        nonlocal embedded
        if isinstance(values, np.ndarray):
            return check_embeddings(values, name, owner) if len(values) else values.astype(np.float32)
        from .embed import embed

        embedded = True
        if not values:
            return np.zeros((0, 0), dtype=np.float32)
        return embed(values, model=model, revision=revision, pooling=pooling, max_length=max_length, normalize=normalize,
                     batch_size=batch_size, device=device, trust_remote_code=trust_remote_code, backend=encoder_backend,
                     quantize=quantize, cache_dir=cache_dir)

    target_side = _side(target, target_column or column, vector_column, needs_text, "target", owner)
    if needs_vectors and not needs_text:
        target_side = vectors_of(target_side, "target")
        if negative_target is not None:
            neg = vectors_of(_side(negative_target, target_column or column, vector_column, False, "negative_target", owner), "negative_target")
            selector = get_selector(method, **{**params, "negative_target": neg})
    if not needs_vectors:
        rows: Any = np.zeros((int(keep.sum()), 0), dtype=np.float32)
    elif needs_text:
        rows = _take(part, keep, column, vector_column, needs_text, owner)
    else:
        if _in_place(part, keep):
            rows = _checked_in_blocks(part, owner)  # a memory map stays on disk: the fit reads it in blocks
        else:
            rows = vectors_of(_take(part, keep, column, vector_column, needs_text, owner), "pool")
        dims = comm.all_reduce(np.array([rows.shape[1] if len(rows) else 0], dtype=np.int64), op="max")
        if not len(rows):
            rows = np.zeros((0, int(dims[0])), dtype=np.float32)
    view = TextView.of(rows, comm) if needs_text else PoolView.of(rows, comm)
    if method == "tsds" and params.get("budget") is None:
        selector = get_selector(method, **{**params, "budget": max(1, -(-view.n_global // 100))})
    state = selector.fit(view, target_side, comm=comm)
    fitted, _ = FittedSelector.from_fit(
        selector, state, view, target_side, fit_index=fit_index, n_pool=n_pool, sample=sample, seed=seed,
        encoder=encoder if (embedded or model is not None) else None, pool_fingerprint=getattr(pool, "_fingerprint", None),
        column=column, vector_column=vector_column, score_column=score_column, device=params.get("device", device), comm=comm,
    )
    return fitted


class FittedSelector:
    """A selector's fit, usable on any dataset, stream or process later: a ``datasets`` map and filter.

    Built by :func:`fit_selector` or :meth:`from_pretrained`; not meant to be constructed by hand.

    Attributes
    ----------
    method : str
        The registry name (``"got_d"``...).
    params : dict
        The selector's parameters (JSON values; GOT-D's negative target lives in the state).
    selector : Selector
        The selector instance whose ``score_batch`` scores.
    state
        What the selector's ``fit`` returned (O(n_target) numbers; TSDS: O(n_target x max_K)).
    encoder : dict or None
        ``model`` (None: the bundled all-MiniLM-L6-v2), ``revision``, ``pooling``, ``max_length``,
        ``normalize``, ``batch_size``, ``trust_remote_code``, and ``backend`` / ``quantize`` when
        a CPU back end embedded (:func:`encoder_record`); None when the fit read vectors only.
    calibration : dict
        ``fractions`` (q,) and ``thresholds`` (q,): keeping the rows whose key is at least
        ``thresholds[j]`` keeps the best ``fractions[j]`` of the fit rows (ties may add a few).
    fit_info : dict
        ``n_pool``, ``n_fit`` (the sample size), ``sample``, ``target_size``, ``target_fingerprint``,
        ``pool_fingerprint``, ``processes`` and the selector's diagnostics.
    seed : int
        Seed of the sampling methods' keys.
    column, vector_column, score_column : str
        What the map reads (texts, or vectors when ``vector_column`` is set) and writes.
    device : str or None
        Where the map embeds and scores (None: CUDA when present).
    """

    def __init__(self, *, method: str, params: dict[str, Any], state: Any, encoder: dict[str, Any] | None, calibration: dict[str, np.ndarray],
                 fit_info: dict[str, Any], seed: int, column: str, vector_column: str | None, score_column: str, device: str | None = None) -> None:
        from .selectors import get_selector

        self.method, self.params, self.state = method, dict(params), state
        self.encoder, self.calibration, self.fit_info = encoder, calibration, fit_info
        self.seed, self.column, self.vector_column, self.score_column, self.device = seed, column, vector_column, score_column, device
        extra = {}
        if method == "got_d" and state.negative is not None:
            extra["negative_target"] = state.negative.results[0].y
        self.selector = get_selector(method, **self.params, **extra)

    @classmethod
    def from_fit(
        cls, selector: Any, state: Any, view: PoolView | TextView, target: Any, *, fit_index: np.ndarray | None = None,
        n_pool: int | None = None, sample: int | float | None = None, seed: int = 0, encoder: dict[str, Any] | None = None,
        pool_fingerprint: str | None = None, column: str = "text", vector_column: str | None = None, score_column: str = "score",
        device: str | None = None, comm: Comm | None = None, scores: np.ndarray | None = None,
    ) -> tuple[FittedSelector, np.ndarray]:
        """Wrap a registered selector's fit, then score the fit rows through it and calibrate on them.

        The one place a fit becomes a :class:`FittedSelector`: :func:`fit_selector` and the job's
        scoring stage (:mod:`hf_otselect.stages.scoring`) both call it right after ``selector.fit``.
        Collective: every process of ``comm`` calls it with its part of ``view``; the calibration's
        quantiles come from all-reduced counts (:func:`~hf_otselect.threshold.descending_ranks_values`),
        no score is gathered.

        Parameters
        ----------
        selector : Selector
            A registered selector (its class rebuilt from its parameters scores as it does).
        state
            What ``selector.fit(view, target, comm=comm)`` returned.
        view : PoolView or TextView
            The fit rows, this process's part.
        target : ndarray of shape (n_target, dim), list of str or None
            The target as the fit read it (its size and fingerprint are recorded).
        fit_index : ndarray of shape (n_local,), int, optional
            The fit rows' global pool indices, which the sampling keys of the calibration read
            (default: the view's indices).
        n_pool : int, optional
            Rows of the pool the fit was drawn from (default: the view's ``n_global``).
        sample, seed, encoder, pool_fingerprint, column, vector_column, score_column, device
            Recorded as :func:`fit_selector` documents them.
        comm : Comm, optional
        scores : ndarray of shape (n_local,), optional
            The fit rows' scores when already known (a cached run): calibrate on them, score nothing.

        Returns
        -------
        fitted : FittedSelector
        scores : ndarray of shape (n_local,), float64
            The fit rows' scores (this process's), by :meth:`score_rows`.
        """
        comm = comm or LOCAL
        diagnostics = dict(getattr(selector, "diagnostics_", {}))
        fit_info = {
            "n_pool": int(view.n_global if n_pool is None else n_pool), "n_fit": int(view.n_global), "sample": sample,
            "processes": int(comm.world_size), "target_size": int(len(target)) if target is not None else 0,
            "dim": None if selector.needs_text else int(view.dim),
            "target_fingerprint": _digest(target if isinstance(target, np.ndarray) else list(target or [])),
            "pool_fingerprint": pool_fingerprint, "diagnostics": diagnostics,
        }
        fitted = cls(method=selector.name, params={k: v for k, v in selector.get_params().items() if k not in ("negative_target", "device", "init_g")},
                     state=state, encoder=encoder, calibration={}, fit_info=fit_info, seed=seed, column=column,
                     vector_column=vector_column, score_column=score_column, device=device)
        if fit_index is None:
            fit_index = view.offset + np.arange(view.n_local, dtype=np.int64)
        if scores is None:
            parts = [fitted.score_rows(rows, idx) for idx, rows in view.blocks()]
            scores = np.concatenate(parts) if parts else np.zeros(0)
        n_fit = max(1, int(view.n_global))
        ranks = np.clip(np.ceil(CALIBRATION_FRACTIONS * n_fit), 1, n_fit).astype(np.int64)
        keys = choice_keys(scores, fit_index, fitted.choice, seed)
        fitted.calibration = {"fractions": CALIBRATION_FRACTIONS.copy(), "thresholds": descending_ranks_values(keys, ranks, comm)}
        return fitted, scores

    # ------------------------------------------------------------------ scoring
    @property
    def choice(self) -> str:
        """How rows are chosen: ``"top_k"`` by score, or by sampling keys (see :func:`choice_keys`)."""
        return self.selector.choice

    @property
    def index_bound(self) -> bool:
        """Whether scores are a lookup by the fit pool's row index (TSDS, round-robin similarity)."""
        return _index_bound(self.method, self.params)

    def score_rows(self, rows: Any, index: np.ndarray | None = None, *, device: str | None = None) -> np.ndarray:
        """Scores of rows: vectors ``(b, dim)`` (texts for DSIR), higher = select.

        Parameters
        ----------
        rows : ndarray of shape (b, dim), or list of str for DSIR
        index : ndarray of shape (b,), int, optional
            Global row indices; needed by TSDS and the round-robin similarity, whose scores are
            looked up by the fit pool's row.
        device : str, optional
            Where GOT-D's c-transforms run (default: the selector's device).

        Returns
        -------
        ndarray of shape (b,), float64
        """
        owner = f"FittedSelector({self.method!r}).score_rows"
        if rows is None or not hasattr(rows, "__len__"):
            raise param_error("rows", owner, "an array of vectors (b, dim), or a list of texts for DSIR", rows, exc=TypeError)
        n = len(rows)
        if index is None:
            if self.index_bound:
                raise param_error("index", f"FittedSelector({self.method!r}).score_rows", f"the rows' pool indices ({_INDEX_BOUND}; "
                                  "in a map pass with_indices=True)", None)
            index = np.arange(n, dtype=np.int64)
        index = np.asarray(index)
        if index.shape != (n,) or (index.size and index.dtype.kind not in "iu"):
            raise param_error("index", owner, f"an int array of shape ({n},), one pool index per row", f"{index.dtype} array of shape {index.shape}")
        index = index.astype(np.int64, copy=False)
        if self.index_bound and index.size and (index.min() < 0 or index.max() >= self.fit_info["n_pool"]):
            raise param_error("index", f"FittedSelector({self.method!r}).score_rows", f"pool row indices in [0, {self.fit_info['n_pool']}) "
                              f"({_INDEX_BOUND}: a row outside the fit has none; {OUT_OF_FIT})",
                              int(index.max()) if index.max() >= self.fit_info["n_pool"] else int(index.min()))
        state = self.state
        if self.method == "got_d":
            state = replace(state, device=device or self.device)
        if not self.selector.needs_text and self.selector.needs_vectors:
            rows = np.asarray(rows)
            dim = self.fit_info.get("dim")
            if rows.ndim != 2 or (dim is not None and rows.shape[1] != dim):
                raise param_error("rows", "FittedSelector.score_rows", f"a 2-D array of shape (b, {dim or 'dim'}) like the fit's rows",
                                  f"shape {rows.shape}")
            if n:  # NaN or Inf would score NaN, and a filter would then drop the row without a word
                rows = check_embeddings(rows, self.vector_column or "rows", owner)
        return np.asarray(self.selector.score_batch(state, rows, index), dtype=np.float64)

    def _rows_of(self, batch: dict[str, Any], device: str | None) -> Any:
        """The batch's texts (DSIR), its vector column, or its texts embedded with the fit's encoder."""
        if self.selector.needs_text:
            return self._column(batch, self.column)
        if not self.selector.needs_vectors:
            return np.zeros((len(next(iter(batch.values()))) if batch else 0, 0), dtype=np.float32)
        if self.vector_column is not None:
            values = self._column(batch, self.vector_column)
            try:
                return np.asarray(values, dtype=np.float32)
            except (ValueError, TypeError):  # ragged rows or non-numbers: numpy's "inhomogeneous shape" names neither
                widths = sorted({len(v) if hasattr(v, "__len__") else -1 for v in values})
                raise param_error(self.vector_column, f"FittedSelector({self.method!r})", "a column of vectors of one width "
                                  f"(the fit's: {self.fit_info.get('dim')})", f"rows of widths {widths[:5]}") from None
        if self.encoder is None:
            raise param_error("vector_column", f"FittedSelector({self.method!r})", "the name of a column of precomputed vectors "
                              "(this fit read vectors, so it records no encoder to embed texts with; set it with .using(vector_column=...))", None)
        from .embed import embed

        texts = self._column(batch, self.column)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        enc = self.encoder
        # A fit embedded by a CPU back end maps with it (absent in fits made with torch, and in
        # selectors saved before back ends were recorded).
        backend, quantize = enc.get("backend", "torch"), enc.get("quantize")
        return embed(texts, model=enc["model"], revision=enc["revision"], pooling=enc["pooling"], max_length=enc["max_length"],
                     normalize=enc["normalize"], batch_size=enc["batch_size"], trust_remote_code=enc["trust_remote_code"],
                     device=device if backend == "torch" else None, backend=backend, quantize=quantize,
                     use_cache=False, show_progress=False)

    @staticmethod
    def _column(batch: dict[str, Any], name: str) -> Any:
        if name not in batch:
            raise ValueError(f"Column {short_repr(name)} not in the batch. Current columns: {list(batch)}")
        return batch[name]

    def __call__(self, batch: dict[str, Any], *extra: Any) -> dict[str, np.ndarray]:
        """Score one batch: the map function of ``ds.map(fitted, batched=True)``.

        ``with_indices=True`` passes the rows' indices (needed by TSDS and round-robin); with
        ``with_rank=True`` the batch is embedded and scored on GPU ``rank % n_gpus`` (one encoder
        per GPU), on the CPU where there is none.

        Returns
        -------
        dict
            ``{score_column: float64 (b,)}``.
        """
        index, rank = _index_and_rank(extra)
        device = self.device
        if rank is not None and device is None:
            device = _rank_device(rank)
        if self.score_column in batch:
            raise param_error("score_column", f"FittedSelector({self.method!r})", "a column name the dataset does not have "
                              f"({self.score_column!r} would be overwritten; remove it first, or pick another with "
                              "fitted.using(score_column=...))", self.score_column)
        rows = self._rows_of(batch, device)
        return {self.score_column: self.score_rows(rows, index, device=device)}

    # ------------------------------------------------------------------ choosing
    def keep(self, *, k: int | None = None, fraction: float | None = None, threshold: float | None = None,
             scores: np.ndarray | None = None, index: np.ndarray | None = None, comm: Comm | None = None, seed: int | None = None) -> Keep:
        """A predicate for ``ds.filter(pred, batched=True, with_indices=True)`` on a scored dataset.

        It reads the score column and keeps the rows whose key (:func:`choice_keys`: the score for
        top-k methods; ``log p + Gumbel(seed, global index)`` for TSDS and random, ``log w + Gumbel``
        for DSIR with ``resample``) is among the largest. Exactly one of:

        - ``k``: the ``k`` best rows, ties to the lower global index; needs ``scores`` (this
          process's score column) so that the boundary is exact (found by all-reduced counts,
          :func:`~hf_otselect.threshold.top_k_cut`). For the sampling methods this is sampling
          without replacement, the rows ``choose(..., replace=False)`` gives.
        - ``fraction``: with ``scores``, the best ``ceil(fraction x n)`` rows exactly; without
          (a stream of unknown length), the rows at or above the calibration threshold of that
          fraction: the best ``fraction`` of the fit rows, so about that fraction of a stream
          distributed like them, decided row by row in one pass.
        - ``threshold``: the rows whose key is at least ``threshold``, row by row.

        Parameters
        ----------
        k : int, optional
        fraction : float in (0, 1], optional
        threshold : float, optional
        scores : ndarray of shape (n_local,), optional
            This process's scores of the dataset to filter (``ds[score_column]``).
        index : ndarray of shape (n_local,), int, optional
            Their global indices (default ``arange(n_local)``; give them when processes split it).
        comm : Comm, optional
            The processes sharing the dataset (default: this process alone).
        seed : int, optional
            Seed of the sampling keys (default: the fit's ``seed``).

        Returns
        -------
        Keep
        """
        owner = "FittedSelector.keep"
        given = [name for name, v in (("k", k), ("fraction", fraction), ("threshold", threshold)) if v is not None]
        if len(given) != 1:
            raise param_error("k/fraction/threshold", owner, "exactly one of them", given or None)
        seed = self.seed if seed is None else check_seed(seed, "seed", owner)
        if k is not None:
            k = check_int(k, "k", owner, 1)
        if fraction is not None:
            fraction = check_float(fraction, "fraction", owner, 0.0, 1.0, low_open=True)
        if threshold is not None:
            threshold = check_float(threshold, "threshold", owner)
            return Keep(self.score_column, self.choice, seed, threshold, None)
        if scores is None:
            if k is not None:
                raise param_error("scores", owner, "this process's scores of the dataset to filter when k is given (an exact top-k "
                                  "needs them; for a stream of unknown length use fraction= or threshold=)", None)
            return Keep(self.score_column, self.choice, seed, self.calibrated_threshold(fraction), None)
        comm = comm or LOCAL
        try:
            scores = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError):
            raise param_error("scores", owner, "this process's scores, a 1-D float array", type(scores).__name__, exc=TypeError) from None
        if scores.ndim != 1:
            raise param_error("scores", owner, "this process's scores, a 1-D float array", f"an array of shape {scores.shape}")
        n_nan = int(comm.all_reduce(np.array([np.isnan(scores).sum()], dtype=np.int64))[0])
        if n_nan:
            raise param_error("scores", owner, "scores free of NaN (score the rows again: a NaN score has no rank)", f"{n_nan} NaN value(s)")
        index = np.arange(scores.size, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        if k is None:
            n = int(comm.all_reduce(np.array([scores.size], dtype=np.int64))[0])
            k = max(1, math.ceil(fraction * n))
        keys = choice_keys(scores, index, self.choice, seed)
        support = int(comm.all_reduce(np.array([np.isfinite(keys).sum()], dtype=np.int64))[0])
        if k > support:  # a key of -inf is a row that is never drawn (p = 0) or too short to score (DSIR)
            raise param_error("k" if fraction is None else "fraction", owner, f"at most the {support} rows that can be chosen "
                              "(the others have probability 0 or no score)", k if fraction is None else fraction)
        cut = top_k_cut(keys, k, index=index, comm=comm, owner=owner)
        return Keep(self.score_column, self.choice, seed, None, cut)

    def select(self, pool: Any, *, fraction: float | None = None, threshold: float | None = None, k: int | None = None,
               batch_size: int = 1000) -> Any:
        """The rows of ``pool`` this selector keeps, lazily, in one pass (see :mod:`hf_otselect.stream_pass`).

        Each batch is embedded (or its vector column read), scored and filtered; nothing per row is
        kept but the rows passed on, so memory does not grow with the pool. ``k`` is refused (a
        stream of unknown length has no known ``k`` best rows); TSDS and round-robin accept only
        the Dataset they were fitted on. :func:`hf_otselect.write_selected` writes the kept rows to
        Parquet shards with a summary instead.

        Parameters
        ----------
        pool : Dataset or IterableDataset
        fraction : float in (0, 1], optional
            Keep the rows at or above the calibrated threshold of this fraction of the fit rows.
        threshold : float, optional
            Keep the rows whose key is at least this.
        k : None
        batch_size : int

        Returns
        -------
        IterableDataset
            ``pool.map(self, batched=True, with_indices=True).filter(self.keep(...), batched=True,
            with_indices=True)``, in pool order.
        """
        from .stream_pass import select_stream

        return select_stream(self, pool, fraction=fraction, threshold=threshold, k=k, batch_size=batch_size)

    def calibrated_threshold(self, fraction: float) -> float:
        """The key at or above which the best ``fraction`` of the fit rows lie.

        Exact at the calibration's fractions (0.0001, 0.0002, 0.0005 and every 0.001), linear in
        the fraction between two of them (``-inf`` from a fraction whose rows include some that are
        never drawn: then every row passes).
        """
        fraction = check_float(fraction, "fraction", "FittedSelector.calibrated_threshold", 0.0, 1.0, low_open=True)
        return float(np.interp(fraction, self.calibration["fractions"], self.calibration["thresholds"]))

    def using(self, **settings: Any) -> FittedSelector:
        """A copy with other map settings: ``column``, ``vector_column``, ``score_column``, ``device``, ``seed``."""
        allowed = ("column", "vector_column", "score_column", "device", "seed")
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise param_error(", ".join(unknown), "FittedSelector.using", f"one of {list(allowed)}", unknown, exc=TypeError)
        merged = {name: getattr(self, name) for name in allowed} | settings
        _check_map_settings("FittedSelector.using", **merged)
        out = FittedSelector.__new__(FittedSelector)
        out.__dict__.update(self.__dict__)
        out.__dict__.update(settings)
        return out

    # ------------------------------------------------------------------ identity and files
    def to_payload(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Every number of the fit as named arrays, and every setting as JSON (what the files hold)."""
        from .fitted_io import payload_of

        return payload_of(self)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the payload: the fit's state, parameters, encoder, calibration and map settings."""
        from .fitted_io import payload_bytes

        return hashlib.sha256(payload_bytes(self)).hexdigest()

    def __reduce__(self) -> tuple[Any, tuple[bytes, str | None]]:
        # datasets fingerprints a map by pickling its function: the content, not the object's id,
        # so an identical fit hits the cache and another one misses. The device stays out of it.
        from .fitted_io import payload_bytes

        return _restore, (payload_bytes(self), None)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``fitted_selector.json``, ``state.safetensors`` and a ``README.md`` card to a folder."""
        from .fitted_io import save_folder

        save_folder(self, save_directory)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                        device: str | None = None) -> FittedSelector:
        """Load a fitted selector from a folder or a Hub model repository id, verifying its checksums."""
        from .fitted_io import load

        fitted = load(source, revision=revision, token=token)
        fitted.device = device
        return fitted

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None, commit_message: str | None = None) -> str:
        """Upload the folder :meth:`save_pretrained` writes to a Hub model repository, in one commit."""
        from .fitted_io import push

        return push(self, repo_id, private=private, token=token, commit_message=commit_message)

    def __repr__(self) -> str:
        return (f"FittedSelector(method={self.method!r}, n_fit={self.fit_info['n_fit']}, n_pool={self.fit_info['n_pool']}, "
                f"target_size={self.fit_info['target_size']}, fingerprint={self.fingerprint[:12]})")


def _restore(payload: bytes, device: str | None) -> FittedSelector:
    """Rebuild a fitted selector from :func:`~hf_otselect.fitted_io.payload_bytes` (pickling by content).

    In a process forked from the one that imported this module (``ds.map(..., num_proc=n)``
    forks its workers) torch's CPU thread pool, started in the parent, does not survive the fork:
    the first parallel op would wait for it forever. Such a worker runs torch on one thread (it is
    one of ``n`` processes anyway).
    """
    from .fitted_io import from_payload_bytes

    if os.getpid() != _IMPORTED_IN and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

    fitted = from_payload_bytes(payload)
    fitted.device = device
    return fitted


def _index_and_rank(extra: tuple[Any, ...]) -> tuple[np.ndarray | None, int | None]:
    """datasets passes ``indices`` (a list, batched) and/or ``rank`` (an int or None) after the batch."""
    index = rank = None
    for value in extra:
        if isinstance(value, (list, tuple, range, np.ndarray)):
            index = np.asarray(value, dtype=np.int64)
        elif value is None or isinstance(value, numbers.Integral):
            rank = None if value is None else int(value)
        else:
            raise TypeError(f"FittedSelector was called with an argument it does not take ({type(value).__name__}); "
                            "use ds.map(fitted, batched=True[, with_indices=True][, with_rank=True]).")
    return index, rank


def _rank_device(rank: int) -> str | None:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return None


@dataclass(frozen=True)
class Keep:
    """The predicate :meth:`FittedSelector.keep` returns: ``ds.filter(keep, batched=True, with_indices=True)``.

    Rows are kept by their key (:func:`choice_keys` of the score column and the global index):
    ``key >= threshold``, or the exact :class:`~hf_otselect.threshold.Cut` of a top-k.
    """

    score_column: str
    choice: str
    seed: int
    threshold: float | None
    cut: Cut | None

    @property
    def needs_index(self) -> bool:
        """Whether the filter must pass ``with_indices=True`` (sampling keys, or ties of an exact top-k)."""
        return self.choice != "top_k" or self.cut is not None

    def __call__(self, batch: dict[str, Any], *extra: Any) -> list[bool]:
        index, _ = _index_and_rank(extra)
        scores = np.asarray(FittedSelector._column(batch, self.score_column), dtype=np.float64)
        if index is None:
            if self.needs_index:
                raise param_error("with_indices", "Dataset.filter(FittedSelector.keep(...))", "True (the keys of sampling methods and "
                                  "the ties of an exact top-k depend on each row's global index)", False)
            index = np.zeros(scores.size, dtype=np.int64)
        keys = choice_keys(scores, index, self.choice, self.seed)
        kept = self.cut.keeps(keys, index) if self.cut is not None else keys >= self.threshold
        return kept.tolist()
