"""The filters stage: which pool rows stay selectable before scoring.

:func:`apply_filters` runs the decontamination (a held-out set's near and n-gram duplicates out)
and then the source pre-filter (only the sources nearest the target stay), and narrows what the
selector scores to the rows left. Every filter that removes rows before scoring belongs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset

from .._checks import param_error
from ..fingerprints import digest, fingerprint_of
from ..request import Request
from .embedding import Embedded, embed_side, texts_of

__all__ = ["Filtered", "apply_filters"]


@dataclass
class Filtered:
    """The rows left selectable on this process, and what the filters reported.

    Attributes
    ----------
    keep_rows : ndarray of shape (n_kept,), int64
        This process's rows left (positions in its part), ascending.
    narrowed : bool
        True when a filter removed rows: ``candidates`` then holds the kept rows only and the
        choice numbers them ``0 .. n_kept - 1`` (one process: filters are refused for several).
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
    n_eligible = int(eligible.sum())
    if n_eligible < (1 if req.selector.replaces else req.k):
        raise param_error("k", req.owner, f"at most the {n_eligible} rows left after pre-filter and decontamination", req.k)
    if n_eligible == emb.n_pool:
        return Filtered(everything.keep_rows, False, emb.candidates, emb.key_parts, reports, extra_splits)
    keep_rows = np.flatnonzero(eligible)
    candidates = [emb.candidates[i] for i in keep_rows] if req.selector.needs_text else np.asarray(emb.candidates)[keep_rows]
    return Filtered(keep_rows, True, candidates, (*emb.key_parts, digest(keep_rows)), reports, extra_splits)


def _eligible(req: Request, emb: Embedded, reports: dict[str, Any], extra_splits: dict[str, Dataset]) -> np.ndarray:
    """The (n_local,) mask of rows left by the decontamination and the pre-filter."""
    f, dataset, pool_emb = req.filters, emb.part, emb.pool_embeddings
    eligible = np.ones(pool_emb.shape[0], dtype=bool)
    sources = list(dataset[f.source_column]) if f.source_column is not None else None
    if f.decontaminate is not None:
        from ..decontaminate import decontaminate

        held, dcol, ngram = f.decontaminate, f.decontaminate_column, f.decontaminate_ngram
        held_emb = embed_side(held, dcol, req.embed_kwargs, req.cache)
        emb.fingerprints["decontaminate"] = fingerprint_of(held, dcol)
        res = decontaminate(
            pool_emb, held_emb, radius=f.decontaminate_radius, ngram=ngram, sources=sources,
            candidate_texts=texts_of(dataset, req.column, "dataset") if ngram else None,
            heldout_texts=texts_of(held, dcol, "decontaminate") if ngram else None,
        )
        eligible &= ~res.dropped
        reports["decontamination"] = {**res.to_dict(), "source_column": f.source_column}
        rows = np.flatnonzero(res.dropped)
        reason = np.where(res.by_embedding & res.by_ngram, "embedding+ngram", np.where(res.by_embedding, "embedding", "ngram"))
        extra_splits["decontaminated"] = (
            dataset.select(rows).add_column("pool_index", rows.astype(np.int64))
            .add_column("reason", reason[rows].tolist()).add_column("nearest_distance", res.nearest_distance[rows])
        )
    if f.prefilter is not None:
        from ..prefilter import prefilter_sources

        ranking = prefilter_sources(pool_emb, sources, emb.target_embeddings, seed=req.seed, eligible=eligible, **f.prefilter)
        eligible &= ranking.mask
        reports["prefilter"] = {**ranking.to_dict(), "source_column": f.source_column}
        extra_splits["prefilter"] = ranking.to_dataset()
    return eligible
