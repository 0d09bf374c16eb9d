"""One selection as named stages: request -> embed -> filters -> fit/score -> choose -> splits.

Each stage lives in the module of its responsibility (:mod:`hf_otselect.request`,
:mod:`hf_otselect.stages`); :func:`run_selection` only runs them in order and times them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset

from .dist import LOCAL, Comm
from .fitted import FittedSelector
from .request import Target, build_request
from .selectors import SelectionResult, Selector
from .stages.choosing import choose_stage
from .stages.embedding import embed_stage
from .stages.filters import apply_filters
from .stages.scoring import score_stage
from .stages.splits import build_splits

__all__ = ["SelectionRun", "run_selection"]


@dataclass
class SelectionRun:
    """Everything one selection produced (what a job writes and records).

    Attributes
    ----------
    scored : Dataset
        This process's pool rows with ``pool_index``, the score column (NaN where a filter removed
        the row) and ``selected`` (how many times the row was chosen).
    selected : Dataset
        This process's chosen rows in pool order (a row drawn twice appears twice), with
        ``pool_index``, the score column, ``rank`` (by score in the whole pool, 1 = best, ties to
        the lower index) and, for sampling selectors, ``draw_order`` (1 = first drawn).
    result : SelectionResult
        ``indices``: the chosen global rows, best (or first drawn) first, the same on every
        process; ``scores``: this process's scores; ``info``: the selector's diagnostics.
    selector : Selector
        The selector instance that scored.
    pool_embeddings, target_embeddings : ndarray or None
        The vectors scored (None for text selectors).
    fingerprints : dict
        Fingerprints of pool and target (and negative target).
    timings : dict
        Seconds per stage.
    prefilter, decontamination, dedup : dict or None
        What the source pre-filter, the decontamination and the near-duplicate guard did (None
        when off); ``selection.json`` records them under the same keys.
    extra_splits : dict of Dataset
        ``"prefilter"`` (the source ranking, one row per source, the same on every process) and
        ``"decontaminated"`` (this process's dropped pool rows with ``pool_index``, reason and
        nearest held-out distance), when on.
    comm : Comm
        The processes that shared the pool.
    offset, n_pool : int
        Global index of this process's first row; rows of the whole pool.
    fitted : FittedSelector or None
        The fit as a :class:`~hf_otselect.fitted.FittedSelector` (the same on every process), its
        calibration from the scored rows; None for a selector it cannot wrap (a user's own
        :class:`Selector` class, chunked GOT-D).
    """

    scored: Dataset
    selected: Dataset
    result: SelectionResult
    selector: Selector
    pool_embeddings: np.ndarray | None
    target_embeddings: np.ndarray | None
    fingerprints: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    prefilter: dict[str, Any] | None = None
    decontamination: dict[str, Any] | None = None
    dedup: dict[str, Any] | None = None
    extra_splits: dict[str, Dataset] = field(default_factory=dict)
    comm: Comm = LOCAL
    offset: int = 0
    n_pool: int = 0
    fitted: FittedSelector | None = None


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def run_selection(
    dataset: Dataset | IterableDataset, target: Target, method: str | Selector = "got_d", k: int = 100, **options: Any,
) -> SelectionRun:
    """Run one selection, this process's part of it, and return every product (see :func:`select_by_ot`).

    Every process of ``comm=`` calls this with the whole pool and takes its contiguous shard
    (``Dataset.shard(contiguous=True)``): it embeds only that shard, the selector's fit talks to the
    other processes through ``comm``, and each process scores its own rows and keeps its own chosen
    rows. ``scored`` and ``selected`` hold this process's rows only; ``result.indices`` (the chosen
    global rows) is the same on every process. ``embeddings=(pool_emb, target_emb)`` passes this
    shard's vectors in and skips the encoder. ``options`` are :func:`~hf_otselect.request.build_request`'s.
    """
    timings: dict[str, float] = {}
    with _timed(timings, "total_s"):
        req = build_request(dataset, target, method, k, **options)
        with _timed(timings, "embed_s"):
            emb = embed_stage(req)
        with _timed(timings, "filters_s"):
            flt = apply_filters(req, emb)
        with _timed(timings, "score_s"):
            scored = score_stage(req, emb, flt)
        with _timed(timings, "choose_s"):
            chosen = choose_stage(req, emb, flt, scored)
        with _timed(timings, "build_s"):
            scored_split, selected = build_splits(req, emb, scored, chosen)
    if not req.filters.filters:
        del timings["filters_s"]
    reports = {**flt.reports, **chosen.reports}
    return SelectionRun(
        scored_split, selected, SelectionResult(chosen.indices, scored.scores, scored.info), emb.selector,
        emb.pool_embeddings, emb.target_embeddings, emb.fingerprints, timings,
        prefilter=reports.get("prefilter"), decontamination=reports.get("decontamination"), dedup=reports.get("dedup"),
        extra_splits=flt.extra_splits, comm=req.comm, offset=emb.offset, n_pool=emb.n_pool, fitted=scored.fitted,
    )
