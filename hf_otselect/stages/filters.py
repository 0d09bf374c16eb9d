"""The filters stage: which pool rows stay selectable before scoring.

:func:`apply_filters` runs the decontamination (a held-out set's near and n-gram duplicates out)
and then the source pre-filter (only the sources nearest the target stay), and narrows what the
selector scores to the rows left. Every filter that removes rows before scoring belongs here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, Features, IterableDataset, Value

from .._checks import param_error
from ..dist import Comm, RowSubset
from ..fingerprints import digest, fingerprint_of
from ..request import Request
from ..splits import take_rows
from .embedding import Embedded, embed_side, texts_of

__all__ = ["Filtered", "apply_filters", "kept_candidates"]


@dataclass
class Filtered:
    """The rows left selectable on this process, and what the filters reported.

    Attributes
    ----------
    keep_rows : ndarray of shape (n_kept,), int64
        This process's rows left (positions in its part), ascending.
    narrowed : bool
        True when a filter removed rows: ``candidates`` then holds the kept rows only and the
        choice numbers the kept rows of every process ``0 ..`` in pool order (this process's from
        ``kept_offset``), so its keys do not depend on how the pool is split.
    candidates
        What the selector scores (the embedding stage's, or its kept rows).
    key_parts : tuple
        The score cache key's content part (the kept rows added when narrowed).
    reports : dict
        ``"prefilter"`` / ``"decontamination"`` records for ``selection.json``, when they ran.
    extra_splits : dict of Dataset
        ``"prefilter"`` (the source ranking) and ``"decontaminated"`` (the dropped rows), when they ran.
    """

    keep_rows: np.ndarray
    narrowed: bool
    candidates: Any
    key_parts: tuple[Any, ...]
    reports: dict[str, Any] = field(default_factory=dict)
    extra_splits: dict[str, Dataset] = field(default_factory=dict)
    kept_offset: int = 0

    def pool_rows(self, chosen: np.ndarray, offset: int, comm: Comm) -> np.ndarray:
        """Chosen rows in the narrowed numbering back to global pool rows, the same on every process.

        Each process maps the chosen rows it holds; one all-reduce of ``len(chosen)`` integers
        gives every process the whole list.

        Parameters
        ----------
        chosen : ndarray of shape (k,), int64
        offset : int
            Global pool index of this process's first row.
        comm : Comm

        Returns
        -------
        ndarray of shape (k,), int64
        """
        mine = (chosen >= self.kept_offset) & (chosen < self.kept_offset + self.keep_rows.size)
        mapped = np.zeros(chosen.size, dtype=np.int64)
        mapped[mine] = offset + self.keep_rows[chosen[mine] - self.kept_offset]
        return comm.all_reduce(mapped) if comm.world_size > 1 else mapped


def apply_filters(req: Request, emb: Embedded) -> Filtered:
    """Decontaminate, then pre-filter the sources; keep the rows left (all of them when both are off).

    Parameters
    ----------
    req : Request
    emb : Embedded
        Its ``fingerprints`` gain the held-out set's when the decontamination runs.

    Returns
    -------
    Filtered
    """
    everything = Filtered(np.arange(emb.n_local, dtype=np.int64), False, emb.candidates, emb.key_parts)
    if not req.filters.filters:
        return everything
    reports: dict[str, Any] = {}
    extra_splits: dict[str, Dataset] = {}
    eligible = _eligible(req, emb, reports, extra_splits)
    n_eligible = int(req.comm.all_reduce(np.array([eligible.sum()], dtype=np.int64))[0])
    if n_eligible < (1 if req.selector.replaces else req.k):
        raise param_error("k", req.owner, f"at most the {n_eligible} rows left after pre-filter and decontamination", req.k)
    if n_eligible == emb.n_pool:
        return Filtered(everything.keep_rows, False, emb.candidates, emb.key_parts, reports, extra_splits)
    keep_rows = np.flatnonzero(eligible)
    candidates = kept_candidates(emb.candidates, keep_rows, req.selector.needs_text)
    kept_offset = req.comm.exclusive_offset(keep_rows.size)[0]
    return Filtered(keep_rows, True, candidates, (*emb.key_parts, digest(keep_rows)), reports, extra_splits, kept_offset)


def kept_candidates(candidates: Any, keep_rows: np.ndarray, needs_text: bool) -> Any:
    """What the selector scores once the filters narrowed this process's rows to ``keep_rows``.

    Vectors stay where they are (a :class:`~hf_otselect.dist.RowSubset` of the shard, read block
    by block): a copy of the kept rows would be a second shard in memory beside a memory-mapped
    one. Texts are listed (a text selector's fit reads them once).

    Parameters
    ----------
    candidates : array-like of shape (n_local, dim), or sequence of str
    keep_rows : ndarray of shape (n_kept,), int64
        Ascending positions in ``candidates``.
    needs_text : bool

    Returns
    -------
    RowSubset or list of str
    """
    return [candidates[i] for i in keep_rows] if needs_text else RowSubset(candidates, keep_rows)


def _eligible(req: Request, emb: Embedded, reports: dict[str, Any], extra_splits: dict[str, Dataset]) -> np.ndarray:
    """This process's (n_local,) mask of rows left by the decontamination and the pre-filter.

    ``emb.part`` is this process's part (a ``Dataset`` or a stream, read again for its source
    column and texts). Both filters are a fit shared through ``req.comm`` plus a per-row keep, so
    every process keeps the rows one process would; the reports hold whole-pool counts and the
    ``decontaminated`` split this process's dropped rows.
    """
    f, dataset, pool_emb, comm = req.filters, emb.part, emb.pool_embeddings, req.comm
    n = pool_emb.shape[0]
    eligible = np.ones(n, dtype=bool)
    sources = _column_of(dataset, f.source_column) if f.source_column is not None else None
    if f.decontaminate is not None:
        from ..decontaminate import decontaminate

        held, dcol, ngram = f.decontaminate, f.decontaminate_column, f.decontaminate_ngram
        held_emb = embed_side(held, dcol, req.embed_kwargs, req.cache)
        if held_emb.shape[1] != pool_emb.shape[1]:
            raise param_error("decontaminate", req.owner, f"embeddings with {pool_emb.shape[1]} columns like the pool (or texts, "
                              "embedded by the same model)", f"shape {held_emb.shape}")
        emb.fingerprints["decontaminate"] = fingerprint_of(held, dcol)
        texts = None
        if ngram:  # a stream's texts are read once more, in step with its rows
            texts = _column_of(dataset, req.column, lazy=True) if isinstance(dataset, IterableDataset) else texts_of(dataset, req.column, "dataset")
        res = decontaminate(
            pool_emb, held_emb, radius=f.decontaminate_radius, ngram=ngram, sources=sources, candidate_texts=texts,
            heldout_texts=texts_of(held, dcol, "decontaminate") if ngram else None, comm=comm,
        )
        eligible &= ~res.dropped
        reports["decontamination"] = {**res.to_dict(), "source_column": f.source_column}
        rows = np.flatnonzero(res.dropped)
        reason = np.where(res.by_embedding & res.by_ngram, "embedding+ngram", np.where(res.by_embedding, "embedding", "ngram"))
        extra_splits["decontaminated"] = _dropped_rows(dataset, rows, emb.offset, reason, res.nearest_distance)
    if f.prefilter is not None:
        from ..prefilter import prefilter_sources

        ranking = prefilter_sources(pool_emb, sources, emb.target_embeddings, seed=req.seed, eligible=eligible,
                                    index=emb.offset + np.arange(n, dtype=np.int64), comm=comm, **f.prefilter)
        eligible &= ranking.mask
        reports["prefilter"] = {**ranking.to_dict(), "source_column": f.source_column}
        extra_splits["prefilter"] = ranking.to_dataset()
    return eligible


def _column_of(data: Dataset | IterableDataset, name: str, lazy: bool = False) -> Any:
    """One column of this process's part: a list, or for a stream with ``lazy`` a one-pass iterator."""
    if not isinstance(data, IterableDataset):
        return list(data[name])
    values = (row[name] for row in data.select_columns([name]))
    return values if lazy else list(values)


def _dropped_rows(data: Dataset | IterableDataset, rows: np.ndarray, offset: int, reason: np.ndarray, nearest: np.ndarray) -> Dataset:
    """The ``decontaminated`` split of this process: rows ``rows`` of its part plus ``pool_index``, ``reason``, ``nearest_distance``.

    Every process writes its own rows into one split (:func:`hf_otselect.job._save_split`), so a
    process that dropped nothing still gives the pool's columns (a stream's first row names them
    when its features are unknown).
    """
    columns = {"pool_index": offset + rows.astype(np.int64), "reason": reason[rows], "nearest_distance": nearest[rows]}
    if not isinstance(data, IterableDataset):
        return take_rows(data, rows, columns)
    added = {"pool_index": Value("int64"), "reason": Value("string"), "nearest_distance": Value("float64")}
    wanted = dict(zip(rows.tolist(), range(rows.size)))
    head = itertools.islice(data, int(rows[-1]) + 1 if rows.size else 0)  # read the stream up to the last dropped row
    picked = [{**row, **{key: values[wanted[i]].item() for key, values in columns.items()}} for i, row in enumerate(head) if i in wanted]
    if data.features is not None:
        features = Features({**data.features, **added})
        return Dataset.from_dict({key: [row[key] for row in picked] for key in features}, features=features)
    if picked:
        return Dataset.from_list(picked)
    # No row dropped here: a 0-row table with the schema of a row like the others' (select([]) would
    # keep a 1-row table behind an empty indices mapping, which save_to_disk writes without columns).
    template = Dataset.from_list([{**next(iter(data), {}), "pool_index": 0, "reason": "", "nearest_distance": 0.0}])
    return take_rows(template, np.zeros(0, dtype=np.int64))
