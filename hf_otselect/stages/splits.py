"""The splits stage: this process's ``scored`` and ``selected`` splits from the scores and the choice."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from ..fingerprints import digest
from ..request import Request
from ..splits import take_rows, with_columns
from .choosing import Chosen, global_ranks
from .embedding import Embedded
from .scoring import SCORES_CACHE_VERSION, Scored

__all__ = ["build_splits"]


def build_splits(req: Request, emb: Embedded, scored: Scored, chosen: Chosen) -> tuple[Dataset, Dataset]:
    """This process's ``scored`` and ``selected`` splits (see :class:`~hf_otselect.pipeline.SelectionRun`).

    ``selected`` holds this process's chosen rows in pool order (a row drawn twice, twice), with
    ``rank`` (by score in the whole pool, 1 = best, ties to the lower index) and, for sampling
    selectors, ``draw_order`` (1 = first drawn). The ranks are counted by every process over its
    own rows (:func:`~hf_otselect.stages.choosing.global_ranks`): O(k) numbers, no scores gathered.

    Returns
    -------
    scored, selected : Dataset
    """
    comm, offset, n_local, scores, indices = req.comm, emb.offset, emb.n_local, scored.scores, chosen.indices
    index = np.arange(offset, offset + n_local, dtype=np.int64)
    # This process's chosen rows: pool order, a drawn-again row once per draw.
    draw = np.flatnonzero((indices >= offset) & (indices < offset + n_local))
    draw = draw[np.lexsort((draw, indices[draw]))]
    local = indices[draw] - offset
    chosen_scores = comm.all_reduce(np.bincount(draw, weights=scores[local], minlength=indices.size)) if comm.world_size > 1 else scores[indices - offset]
    ranks = global_ranks(scores, index, chosen_scores, indices, comm)
    times = np.bincount(local, minlength=n_local).astype(np.int64)
    # Every input of the rows written: the pool's full content, the scores, the counts, the column name.
    fp = digest("scored", SCORES_CACHE_VERSION, emb.fingerprints["pool"], scores, times, req.score_column)
    scored_split = with_columns(emb.part, offset, {req.score_column: scores, "selected": times}, fp)
    columns = {"rank": ranks[draw]}
    if emb.selector.choice != "top_k":
        columns["draw_order"] = draw.astype(np.int64) + 1
    # The score stays where it is (the chosen rows' own); take_rows also gives a process with no
    # chosen row (or an empty shard) its empty table.
    selected = take_rows(scored_split, local, columns, drop=("selected",), fingerprint=digest("selected", fp, local, *columns.values()))
    return scored_split, selected
