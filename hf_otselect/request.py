"""One selection request: every argument checked up front, before any row is embedded or scored.

:func:`build_request` turns the arguments of :func:`~hf_otselect.pipeline.run_selection` into a
frozen :class:`Request`, raising in the package's one template on the first bad value, and then
has every process of the group agree that they run the same selection
(:func:`hf_otselect.dist.agree`). The stages read the request; none of them re-checks an argument.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset

from ._checks import check_choice, check_embeddings, check_float, check_int, check_magnitude, check_seed, param_error, short_repr
from ._suggest import did_you_mean
from .cache import check_cache_dir
from .devices import check_solver_device
from .dist import LOCAL, Comm, agree
from .fingerprints import content_fingerprint, digest
from .selectors import Selector, get_selector

__all__ = ["EMBED_KEYS", "Filters", "Request", "Target", "build_request"]

Target = Dataset | Sequence[str] | np.ndarray
#: The encoder settings ``embedding={...}`` accepts (see :func:`hf_otselect.embed`).
EMBED_KEYS = ("model", "revision", "batch_size", "max_length", "pooling", "normalize", "device", "trust_remote_code",
              "shard_rows", "num_proc", "backend", "quantize")
_ADDED = ("pool_index", "rank", "draw_order", "selected")  # columns the selection adds to the pool's


@dataclass(frozen=True)
class Filters:
    """The pre-filter, decontamination and near-duplicate guard settings, checked.

    Attributes
    ----------
    source_column : str or None
        Column naming each row's source.
    prefilter : dict or None
        The source pre-filter's options (:func:`hf_otselect.prefilter.check_prefilter`).
    dedup_radius : float or None
        The near-duplicate guard's radius (None: off).
    dedup_mode : str
    decontaminate : Dataset, list of str, ndarray or None
        The held-out set.
    decontaminate_column : str
    decontaminate_radius : float
    decontaminate_ngram : int or None
    """

    source_column: str | None = None
    prefilter: dict[str, Any] | None = None
    dedup_radius: float | None = None
    dedup_mode: str = "auto"
    decontaminate: Any = None
    decontaminate_column: str = "text"
    decontaminate_radius: float = 0.3
    decontaminate_ngram: int | None = 13

    @property
    def filters(self) -> bool:
        """Whether a stage removes pool rows before scoring (pre-filter or decontamination)."""
        return self.prefilter is not None or self.decontaminate is not None

    @property
    def active(self) -> bool:
        """Whether any of the three is on (they work on vectors: the pool is embedded for them)."""
        return self.filters or self.dedup_radius is not None


@dataclass(frozen=True)
class Request:
    """One selection, every argument checked (what every stage reads).

    Attributes
    ----------
    dataset : Dataset or IterableDataset
        The whole pool (several sources already concatenated with their source column).
    target, negative_target : Dataset, list of str, ndarray or None
    selector : Selector
        The selector that scores (TSDS's ``budget`` set to ``k`` when it was None).
    k, seed : int
    column, target_column, score_column : str
    embed_kwargs : dict
        Encoder settings (``use_cache=False`` when datasets' caching is off).
    embeddings : tuple of ndarray or None
        This process's pool vectors and the target's, handed in (the encoder is skipped).
    filters : Filters
    cache : Path
        The cache root.
    caching : bool
        Whether the caches are read and written (``datasets.disable_caching()`` turns them off).
    comm : Comm
    owner : str
        The name errors are raised under.
    """

    dataset: Dataset | IterableDataset
    target: Any
    negative_target: Any
    selector: Selector
    k: int
    seed: int
    column: str
    target_column: str
    score_column: str
    embed_kwargs: dict[str, Any]
    embeddings: tuple[np.ndarray, np.ndarray] | None
    filters: Filters
    cache: Path
    caching: bool
    comm: Comm
    owner: str = "select_by_ot"

    @property
    def streamed(self) -> bool:
        """Whether the pool is a stream (``IterableDataset``)."""
        return isinstance(self.dataset, IterableDataset)


def build_request(
    dataset: Dataset | IterableDataset | DatasetDict | Sequence[Dataset],
    target: Target,
    method: str | Selector = "got_d",
    k: int = 100,
    *,
    column: str = "text",
    target_column: str | None = None,
    negative_target: Target | None = None,
    score_column: str = "score",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    embedding: dict[str, Any] | None = None,
    embeddings: tuple[np.ndarray, np.ndarray] | None = None,
    source_column: str | None = None,
    prefilter: dict[str, Any] | None = None,
    dedup_radius: float | None = None,
    dedup_mode: str = "auto",
    decontaminate: Target | None = None,
    decontaminate_column: str | None = None,
    decontaminate_radius: float = 0.3,
    decontaminate_ngram: int | None = 13,
    comm: Comm | None = None,
    **params: Any,
) -> Request:
    """Check every argument of a selection (see :func:`hf_otselect.select_by_ot`) and return the request.

    Raises before any encoder pass, in the template ``The 'k' parameter of select_by_ot must be
    ... Got X instead.``; with several processes, every process raises together when they were
    not given the same selection (:func:`hf_otselect.dist.agree`).

    Returns
    -------
    Request
    """
    owner = "select_by_ot"
    comm = comm or LOCAL
    if isinstance(dataset, DatasetDict) or (isinstance(dataset, (list, tuple)) and dataset and all(isinstance(d, Dataset) for d in dataset)):
        from .prefilter import combine_sources
        from .splits import quiet_bars

        source_column = source_column or "source"
        with quiet_bars():  # each filtered/shuffled split is flattened when its source column is added
            dataset = combine_sources(dataset, source_column)
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise param_error("dataset", owner, "a datasets.Dataset, IterableDataset, DatasetDict or list of Dataset", type(dataset).__name__, exc=TypeError)
    streamed = isinstance(dataset, IterableDataset)
    if not streamed:
        if len(dataset) == 0:
            raise param_error("dataset", owner, "a non-empty Dataset", "a Dataset with 0 rows")
        if column not in dataset.column_names:
            raise ValueError(f"Column {short_repr(column)} not in the dataset. Current columns: {dataset.column_names}")
    pool_columns = _column_names(dataset)
    if streamed and pool_columns is not None and column not in pool_columns:
        raise ValueError(f"Column {short_repr(column)} not in the dataset. Current columns: {pool_columns}")
    check_target(target, "target")
    if negative_target is not None:
        check_target(negative_target, "negative_target")
    target_column = target_column or column
    if isinstance(target, Dataset) and target_column not in target.column_names:
        raise ValueError(f"Column {short_repr(target_column)} not in the target dataset. Current columns: {target.column_names}")
    k = check_int(k, "k", owner, 1)
    seed = check_seed(seed, "seed", owner)
    if not isinstance(score_column, str) or not score_column:
        raise param_error("score_column", owner, "a non-empty str", score_column, exc=TypeError)
    embed_kwargs = dict(embedding or {})
    unknown = sorted(set(embed_kwargs) - set(EMBED_KEYS))
    if unknown:
        raise param_error("embedding", owner, f"a dict with keys among {list(EMBED_KEYS)}", unknown)
    filters = _check_filters(
        dataset, owner, source_column=source_column, prefilter=prefilter, dedup_radius=dedup_radius, dedup_mode=dedup_mode,
        decontaminate=decontaminate, decontaminate_column=decontaminate_column or target_column,
        decontaminate_radius=decontaminate_radius, decontaminate_ngram=decontaminate_ngram,
    )
    probe = _selector(method, params, owner)
    if dedup_radius is not None:
        from .dedup import resolve_dedup_mode

        resolve_dedup_mode(dedup_mode, probe.choice, probe.replaces, owner)
    if negative_target is not None and "negative_target" not in probe.get_params():
        raise param_error("negative_target", owner, f"None for method {probe.name!r} (only GOT-D uses one)", "a negative target")
    if not streamed:
        k = check_int(k, "k", owner, 1, None if probe.replaces else len(dataset))
    _check_added_columns(score_column, pool_columns, owner)
    check_solver_device(probe)
    if not probe.needs_text and not probe.any_magnitude:  # the user's own vectors, before the pool's encoder pass
        for side, name in ((target, "target"), (negative_target, "negative_target")):
            if isinstance(side, np.ndarray):
                check_magnitude(check_embeddings(side, name, owner), name, owner)
    cache = check_cache_dir(cache_dir, owner)
    from datasets import is_caching_enabled

    caching = is_caching_enabled()  # datasets.disable_caching() turns our caches off too
    if not caching:
        embed_kwargs["use_cache"] = False
    if comm.world_size > 1:  # every process runs this one selection, or none starts (one line, on every process)
        agree(comm, _identity(probe, k, seed, {"column": column, "target_column": target_column, "score_column": score_column},
                              embed_kwargs, embeddings is not None,
                              {"pool": dataset, "target": target, "negative_target": negative_target}), "the selection")
    if "budget" in probe.get_params() and probe.get_params()["budget"] is None:  # TSDS sizes its neighbourhoods by k
        probe = get_selector(probe.name, **{**probe.get_params(), "budget": k})
    return Request(dataset, target, negative_target, probe, k, seed, column, target_column, score_column, embed_kwargs,
                   embeddings, filters, cache, caching, comm, owner)


def check_target(target: Any, name: str) -> None:
    """Refuse a target side that is empty, of the wrong type, or (as vectors) not 2-D and finite."""
    if isinstance(target, np.ndarray):
        check_embeddings(target, name, "select_by_ot")  # 2-D, non-empty, no NaN/Inf: before the pool is embedded
    if isinstance(target, (Dataset, np.ndarray)):
        if len(target) == 0:
            raise param_error(name, "select_by_ot", "a non-empty Dataset, list of str or (n, dim) array", f"an empty {type(target).__name__}")
        return
    if isinstance(target, (str, bytes)) or not isinstance(target, Sequence):
        raise param_error(name, "select_by_ot", "a Dataset, a list of str or an (n, dim) array", type(target).__name__, exc=TypeError)
    if len(target) == 0:
        raise param_error(name, "select_by_ot", "a non-empty Dataset, list of str or (n, dim) array", "an empty list")


def _column_names(dataset: Dataset | IterableDataset) -> list[str] | None:
    """The pool's columns; for a stream without declared features (``from_generator``), its first row's.

    None only for an empty stream. Reading one row costs one row (the stream is read again later).
    """
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if isinstance(first, dict) else None


def _selector(method: str | Selector, params: dict[str, Any], owner: str) -> Selector:
    """The selector instance; an unknown keyword names select_by_ot's own and the method's."""
    if isinstance(method, Selector):
        return method
    from .selectors import available_selectors
    from .selectors.base import selector_class

    check_choice(method, "method", owner, available_selectors())
    accepted = selector_class(method).param_names()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        from .datasets_ext import own_keywords  # select_by_ot's signature is the list shown

        own = own_keywords()
        err = param_error(
            ", ".join(unknown), owner,
            f"a keyword of select_by_ot ({', '.join(own)}), or of the {method!r} selector ({', '.join(accepted) or 'none'}); "
            f"encoder settings go as keywords of their own or in embedding={{...}} (keys {', '.join(EMBED_KEYS)})",
            {key: params[key] for key in unknown},
        )
        raise TypeError(str(err) + did_you_mean(unknown[0], [*own, *accepted]))
    return get_selector(method, **params)


def _check_added_columns(score_column: str, pool_columns: list[str] | None, owner: str) -> None:
    """The columns the selection adds must not be in the pool already."""
    reserved = {score_column, *_ADDED}
    if score_column in (pool_columns or []) or score_column in _ADDED:
        raise param_error("score_column", owner, f"a name not already in the pool's columns {pool_columns} "
                          "nor one of 'pool_index', 'rank', 'draw_order', 'selected'", score_column)
    taken = sorted(reserved & set(pool_columns or []))
    if taken:
        raise param_error("dataset", owner, f"a pool without the columns {sorted(reserved)} that the selection adds "
                          "(re-selecting from a selection? drop them with remove_columns first)", taken)


def _check_filters(
    dataset: Dataset | IterableDataset,
    owner: str,
    *,
    source_column: str | None,
    prefilter: Any,
    dedup_radius: Any,
    dedup_mode: Any,
    decontaminate: Any,
    decontaminate_column: str,
    decontaminate_radius: Any,
    decontaminate_ngram: Any,
) -> Filters:
    """Validate the pre-filter, guard and decontamination arguments before any work."""
    if source_column is not None:
        if not isinstance(source_column, str) or not source_column:
            raise param_error("source_column", owner, "None or a non-empty str", source_column, exc=TypeError)
        columns = _column_names(dataset)
        if columns is not None and source_column not in columns:
            raise ValueError(f"Column {short_repr(source_column)} (source_column) not in the dataset. Current columns: {columns}")
    opts = None
    if prefilter is not None:
        from .prefilter import check_prefilter

        opts = check_prefilter(prefilter, owner)
        if source_column is None:
            raise param_error("source_column", owner, "the column naming each row's source when prefilter is set (or pass a DatasetDict / list of datasets)", None)
    if dedup_radius is not None:
        dedup_radius = check_float(dedup_radius, "dedup_radius", owner, 0.0, 2.0, low_open=True)
    from .dedup import DEDUP_MODES

    check_choice(dedup_mode, "dedup_mode", owner, list(DEDUP_MODES))
    decontaminate_radius = check_float(decontaminate_radius, "decontaminate_radius", owner, 0.0, 2.0, low_open=True)
    if decontaminate_ngram is not None:
        decontaminate_ngram = check_int(decontaminate_ngram, "decontaminate_ngram", owner, 1)
    if decontaminate is not None:
        check_target(decontaminate, "decontaminate")
        if isinstance(decontaminate, Dataset) and decontaminate_column not in decontaminate.column_names:
            raise ValueError(f"Column {short_repr(decontaminate_column)} not in the decontaminate dataset. Current columns: {decontaminate.column_names}")
        if isinstance(decontaminate, np.ndarray) and decontaminate_ngram is not None:
            raise param_error("decontaminate_ngram", owner, "None when the held-out set is given as embeddings (the n-gram test needs texts)", decontaminate_ngram)
    return Filters(source_column, opts, dedup_radius, dedup_mode, decontaminate, decontaminate_column, decontaminate_radius, decontaminate_ngram)


def _model_identity(model: Any) -> str | None:
    """A name for the encoder that is the same in every process: a loaded model by its weights."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return None if model is None else os.fspath(model)
    from .embed import _sentence_transformer_identity, is_sentence_transformer

    if is_sentence_transformer(model):
        return f"a SentenceTransformer, weights sha256 {_sentence_transformer_identity(model)['weights'][:24]}"
    return type(model).__qualname__


def _identity(
    probe: Selector, k: int, seed: int, columns: dict[str, str], embed_kwargs: dict[str, Any], vectors_given: bool,
    sides: dict[str, Any],
) -> dict[str, Any]:
    """What every process of one selection must agree on (see :func:`hf_otselect.dist.agree`).

    Devices and worker counts are left out: each process has its own GPU, and neither changes a
    score. Arrays among the parameters are compared by content.
    """
    ident: dict[str, Any] = {"method": probe.name, "selector class": type(probe).__qualname__, "k": k, "seed": seed,
                             **columns, "vectors passed in (embeddings=)": vectors_given}
    for key, value in probe.get_params().items():
        if key != "device":
            ident[f"params.{key}"] = f"array {value.shape}, {digest(value)[:24]}" if isinstance(value, np.ndarray) else value
    for key, value in embed_kwargs.items():
        if key not in ("device", "num_proc", "use_cache"):
            ident[f"embedding.{key}"] = _model_identity(value) if key == "model" else value
    for name, side in sides.items():
        if side is not None:
            ident[name] = content_fingerprint(side)
    return ident
