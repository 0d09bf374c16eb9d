"""``Dataset.select_by_ot``: the methods hf_otselect adds to ``Dataset``, ``IterableDataset`` and ``DatasetDict``.

:func:`select_by_ot` merges the encoder keywords and hands the selection to
:func:`hf_otselect.pipeline.run_selection`, which runs it as named stages (request, embedding,
filters, scoring, choosing, splits). The names other modules import from here (``run_selection``,
``SelectionRun``, ``best_first``, ``take_rows``, ``global_ranks``, ``content_fingerprint``...)
are re-exported from the modules that now hold them.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset

from ._checks import param_error

# _StreamDigest, _digest, _fingerprint and _shard_of: private names fitted.py, job.py and the
# benchmarks import from here, re-exported from the modules that hold them now.
from .fingerprints import StreamDigest as _StreamDigest
from .fingerprints import content_fingerprint
from .fingerprints import digest as _digest
from .fingerprints import fingerprint_of as _fingerprint
from .pipeline import SelectionRun, run_selection
from .request import EMBED_KEYS as _EMBED_KEYS
from .request import Target
from .selectors import Selector
from .splits import best_first, take_rows
from .splits import shard_of as _shard_of
from .stages.choosing import global_ranks
from .stages.scoring import wrappable

logger = logging.getLogger(__name__)

__all__ = [
    "SelectionRun", "best_first", "content_fingerprint", "global_ranks", "register_dataset_methods", "run_selection",
    "select_by_ot", "take_rows",
]


def select_by_ot(
    dataset: Dataset | IterableDataset,
    target: Target,
    method: str | Selector = "got_d",
    k: int = 100,
    *,
    column: str = "text",
    target_column: str | None = None,
    negative_target: Target | None = None,
    score_column: str = "score",
    return_scored: bool = False,
    return_fitted: bool = False,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    embedding: dict[str, Any] | None = None,
    source_column: str | None = None,
    prefilter: dict[str, Any] | None = None,
    dedup_radius: float | None = None,
    dedup_mode: str = "auto",
    decontaminate: Target | None = None,
    decontaminate_column: str | None = None,
    decontaminate_radius: float = 0.3,
    decontaminate_ngram: int | None = 13,
    model: Any = None,
    revision: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    num_proc: int | None = None,
    shard_rows: int | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    encoder_backend: str | None = None,
    quantize: str | None = None,
    solver_device: str | None = None,
    **params: Any,
) -> Dataset | DatasetDict:
    """Select the ``k`` pool rows that best serve the target.

    Parameters
    ----------
    dataset : Dataset, IterableDataset, DatasetDict or list of Dataset
        The candidate pool (``n_candidates`` rows). A streamed pool is embedded shard by shard into
        a memory-mapped file, so memory stays bounded by the embedding matrix. A ``DatasetDict`` or
        list of datasets is one pool of several sources: the members are concatenated in order
        (``pool_index`` points into that concatenation) with a column ``source_column`` (default
        ``"source"``) holding the split name (or ``"0"``, ``"1"``... for a list).
    target : Dataset, list of str, or ndarray of shape (n_target, dim)
        The target examples, as text or already embedded (with the same encoder as the pool).
    method : str or Selector
        ``"got_d"`` (default), ``"tsds"``, ``"random"``, ``"similarity"``, ``"dsir"``, or an instance.
    k : int
        How many rows to select, in ``[1, n_candidates]`` (any ``k >= 1`` for sampling with
        replacement).
    column : str
        Text column of the pool (and of the target unless ``target_column`` is given).
    target_column : str or None
        Text column of a target Dataset.
    negative_target : Dataset, list of str, ndarray or None
        Examples to move away from (GOT-D).
    score_column : str
        Name of the added score column (higher = select).
    return_scored : bool
        Return ``DatasetDict(scored=..., selected=...)`` instead of the selected rows alone.
    return_fitted : bool
        Also return the fit, as a :class:`~hf_otselect.FittedSelector`: ``(selection, fitted)``.
        ``fitted`` scores any row as this selection scored the pool (``pool.map(fitted,
        batched=True)`` gives the score column), keeps its calibration (quantiles of the pool's
        scores) and saves with ``save_pretrained``. Refused for a selector it cannot rebuild (an
        instance of your own :class:`Selector` class, chunked GOT-D).
    seed : int
        Seed of the random choices (sampling selectors, random baseline).
    cache_dir : str or PathLike or None
        Embedding and score cache; default ``$HF_DATASETS_CACHE/hf_otselect``. The same call twice
        reads both back instead of recomputing.
    embedding : dict or None
        Encoder settings passed to :func:`hf_otselect.embed` (``model``, ``revision``,
        ``batch_size``, ``max_length``, ``pooling``, ``normalize``, ``device``, ``num_proc``,
        ``trust_remote_code``, ``backend``, ``quantize``, and ``shard_rows``: rows per cached shard, the unit a killed run
        resumes from). Each can also be given as a keyword argument of its own (below).
    model, revision, batch_size, max_length, pooling, normalize, num_proc, shard_rows, trust_remote_code
        The same encoder settings as keyword arguments (a Hub id or local folder for ``model``;
        None keeps the default). Giving one both here and in ``embedding`` with different values
        is an error.
    device : str or None
        Device of the encoder (``"cpu"``, ``"cuda"``, ``"cuda:1"``); None picks CUDA when present.
    encoder_backend : {"torch", "onnx", "openvino"} or None
        CPU inference back end of the encoder (None: torch), ``embedding["backend"]``. ONNX Runtime
        and OpenVINO run an export of the same model, made once and cached (extras
        ``hf_otselect[onnx]`` / ``hf_otselect[openvino]``). Not GOT-D's ``backend=`` (its solver).
    quantize : {"int8"} or None
        Weight quantisation of an ONNX or OpenVINO back end (None: float32).
    solver_device : str or None
        Device of the OT solver (GOT-D's ``device``); None follows the data.
    source_column : str or None
        Column naming each row's source (``domain``...): what the pre-filter ranks and what the
        decontamination counts are broken down by.
    prefilter : dict or None
        Source pre-filter (Kang et al. 2024; :mod:`hf_otselect.prefilter`), run before scoring:
        ``sample_size`` rows (default 10,000) are sampled from each source, each sample's OT
        distance to the target is computed, and only the ``keep`` nearest sources (default 2)
        and/or those with distance at most ``max_distance`` stay selectable; ``eps`` (default 0.1)
        is the entropic regularisation. Needs ``source_column`` (or a multi-source pool).
    dedup_radius : float or None
        Near-duplicate guard (:mod:`hf_otselect.dedup`): no two selected rows closer than this
        (Euclidean distance of L2-normalised embeddings, in ``(0, 2]``; ``0.2`` is cosine 0.98), or
        for sampling with replacement, probabilities divided by the Epanechnikov density of that
        radius. None (default) turns the guard off.
    dedup_mode : {"auto", "greedy", "kde"}
        ``"auto"``: greedy skip for top-k selectors and sampling without replacement, KDE
        weighting for sampling with replacement (TSDS's default).
    decontaminate : Dataset, list of str, ndarray or None
        A "never train on this" set (e.g. the target's evaluation split); pool rows within
        ``decontaminate_radius`` of one of its rows, or sharing a ``decontaminate_ngram``-word
        n-gram with it, are removed before scoring (:mod:`hf_otselect.decontaminate`).
    decontaminate_column : str or None
        Text column of a ``decontaminate`` Dataset (default: ``target_column``).
    decontaminate_radius : float
        Embedding distance threshold (Euclidean on unit vectors), default 0.3 (cosine 0.955).
    decontaminate_ngram : int or None
        Word n-gram length of the exact-overlap test (default 13, lower-cased, whitespace-split);
        None turns it off (required when ``decontaminate`` is an array).
    **params
        Keyword arguments of the selector (e.g. ``eps=0.1`` for GOT-D).

    Returns
    -------
    Dataset or DatasetDict
        The selected rows (every original column, plus ``pool_index`` back into the pool, the score
        column, ``rank``: the row's rank by score in the whole pool, 1 = best, ties to the lower
        index, and for sampling selectors ``draw_order``: 1 = first drawn), best (or first drawn)
        first; or both splits when ``return_scored``: ``scored`` is every pool row with
        ``pool_index``, the score and ``selected`` (times chosen). Rows removed by the pre-filter
        or the decontamination stay in ``scored`` with a NaN score; with ``return_scored`` the dict also holds ``prefilter`` (the source
        ranking: source, ot_distance, rows, sampled, kept) and ``decontaminated`` (the dropped
        rows with ``pool_index``, ``reason``, ``nearest_distance``) when those ran. With
        ``return_fitted``: the tuple ``(that, fitted)``.
    """
    given = {"model": model, "revision": revision, "batch_size": batch_size, "max_length": max_length, "pooling": pooling,
             "normalize": normalize, "num_proc": num_proc, "shard_rows": shard_rows, "device": device,
             "backend": encoder_backend, "quantize": quantize,
             "trust_remote_code": trust_remote_code or None}  # False is the default, not a setting
    embedding = _merge_embedding(embedding, {key: v for key, v in given.items() if v is not None})
    for name, flag in (("return_scored", return_scored), ("return_fitted", return_fitted)):
        if not isinstance(flag, bool):
            raise param_error(name, "select_by_ot", "a bool", flag, exc=TypeError)
    if return_fitted and not (wrappable(method) if isinstance(method, Selector) else params.get("chunk_size") is None):
        raise param_error("return_fitted", "select_by_ot", "False for a selector a FittedSelector cannot rebuild (an instance of "
                          "your own Selector class, or chunked GOT-D, whose scores are a row's chunk)", return_fitted)
    if solver_device is not None:
        from .selectors.base import selector_class

        names = method.param_names() if isinstance(method, Selector) else selector_class(method).param_names()
        if "device" not in names:
            raise param_error("solver_device", "select_by_ot", f"None for method {getattr(method, 'name', method)!r} (it runs no solver on a device)", solver_device)
        params["device"] = solver_device
    run = run_selection(
        dataset, target, method, k, column=column, target_column=target_column,
        negative_target=negative_target, score_column=score_column, seed=seed,
        cache_dir=cache_dir, embedding=embedding, source_column=source_column, prefilter=prefilter,
        dedup_radius=dedup_radius, dedup_mode=dedup_mode, decontaminate=decontaminate,
        decontaminate_column=decontaminate_column, decontaminate_radius=decontaminate_radius,
        decontaminate_ngram=decontaminate_ngram, **params,
    )
    selected = best_first(run.selected)  # one process holds every row here
    out = DatasetDict({"scored": run.scored, "selected": selected, **run.extra_splits}) if return_scored else selected
    return (out, run.fitted) if return_fitted else out


def own_keywords() -> list[str]:
    """``select_by_ot``'s own keyword arguments (besides ``dataset``, ``target``, ``method``, ``k``), in order."""
    skip = {"dataset", "target", "method", "k", "params"}
    return [name for name in inspect.signature(select_by_ot).parameters if name not in skip]


def _merge_embedding(embedding: dict[str, Any] | None, given: dict[str, Any]) -> dict[str, Any]:
    """``embedding`` plus the encoder settings given as keyword arguments; a disagreement is an error."""
    if embedding is not None and not isinstance(embedding, dict):
        raise param_error("embedding", "select_by_ot", f"None or a dict with keys among {list(_EMBED_KEYS)}", type(embedding).__name__, exc=TypeError)
    merged = dict(embedding or {})
    for key, value in given.items():
        if key in merged and merged[key] != value:
            raise param_error(key, "select_by_ot", f"the same value as embedding[{key!r}] ({merged[key]!r}) when both are given", value)
        merged[key] = value
    return merged


def _method(self: Dataset | IterableDataset, target: Target, method: str | Selector = "got_d", k: int = 100, **kwargs: Any) -> Dataset | DatasetDict:
    return select_by_ot(self, target, method, k, **kwargs)


_method.__doc__ = select_by_ot.__doc__
_method.__name__ = "select_by_ot"


def _dict_method(
    self: DatasetDict, target: Target, method: str | Selector = "got_d", k: int = 100, *, split: str | None = None, **kwargs: Any,
) -> Dataset | DatasetDict:
    """``DatasetDict.select_by_ot``: select from every split as one pool, or from one named split.

    Parameters
    ----------
    target, method, k, **kwargs
        As :func:`select_by_ot`.
    split : str or None
        None (default): the splits are one pool of several sources, concatenated in the dict's
        order; ``pool_index`` points into that concatenation and the column ``source_column``
        (default ``"source"``) holds each row's split name, exactly as ``select_by_ot(dataset_dict)``.
        A split name: that split alone is the pool (``dd.select_by_ot(t, split="train")`` is
        ``dd["train"].select_by_ot(t)``), e.g. to keep a test split out of the pool.

    Returns
    -------
    Dataset or DatasetDict
        As :func:`select_by_ot`.
    """
    if split is None:
        return select_by_ot(self, target, method, k, **kwargs)
    if split not in self:
        raise param_error("split", "DatasetDict.select_by_ot", f"None (every split) or one of {list(self)}", split)
    return select_by_ot(self[split], target, method, k, **kwargs)


_dict_method.__name__ = "select_by_ot"


def register_dataset_methods() -> None:
    """Add ``select_by_ot`` to ``Dataset``, ``IterableDataset`` and ``DatasetDict``, never replacing an attribute."""
    for cls, method in ((Dataset, _method), (IterableDataset, _method), (DatasetDict, _dict_method)):
        existing = getattr(cls, "select_by_ot", None)
        if existing is None:
            cls.select_by_ot = method  # type: ignore[attr-defined]
        elif existing is not method:
            logger.warning("%s already has a 'select_by_ot' attribute; hf_otselect left it alone.", cls.__name__)
