"""The scoring stage: fit the selector over every process's rows, score this process's, cache both.

The fit is the selector's ``fit`` over a view of this process's rows (collectives through
``comm``), the score its ``score_batch`` per block: the same two calls
:func:`hf_otselect.fit_selector` and :meth:`FittedSelector.score_rows` make, so the job and a
fitted selector score a row with one function. The stage keeps its own cache of the scores
(:func:`scores_cached`), keyed by everything that decides them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import load_array, load_json, save_array, save_json
from ..dist import LOCAL, Comm, PoolView, TextView
from ..fingerprints import digest
from ..request import Request
from ..selectors import Selector
from .embedding import Embedded
from .filters import Filtered

logger = logging.getLogger(__name__)

__all__ = ["SCORES_CACHE_VERSION", "Scored", "score_stage", "scores_cached"]

SCORES_CACHE_VERSION = 3  # bump when what a score entry holds changes for the same key (3: DSIR scores short rows)


@dataclass
class Scored:
    """This process's scores.

    Attributes
    ----------
    scores : ndarray of shape (n_local,), float64
        Every row of this process (NaN where a filter removed the row).
    kept_scores : ndarray of shape (n_kept,), float64
        The scores of the rows the filters left (what the choice reads).
    kept_index : ndarray of shape (n_kept,), int64
        Their indices in the choice's numbering (global rows; ``0 .. n_kept - 1`` when narrowed).
    info : dict
        The selector's diagnostics.
    """

    scores: np.ndarray
    kept_scores: np.ndarray
    kept_index: np.ndarray
    info: dict[str, Any]


def score_stage(req: Request, emb: Embedded, flt: Filtered) -> Scored:
    """Fit and score the rows the filters left (read back from the cache when it holds them).

    Parameters
    ----------
    req : Request
    emb : Embedded
    flt : Filtered

    Returns
    -------
    Scored
    """
    kept, info = scores_cached(emb.selector, flt.candidates, emb.target_side, req.cache, flt.key_parts, req.comm, use_cache=req.caching)
    index = np.arange(flt.keep_rows.size, dtype=np.int64) if flt.narrowed else emb.offset + flt.keep_rows
    scores = np.full(emb.n_local, np.nan)
    scores[flt.keep_rows] = kept
    return Scored(scores, kept, index, info)


def scores_cached(
    selector: Selector, candidates: Any, target: Any, cache_dir: Path, key_parts: tuple[Any, ...], comm: Comm | None = None,
    *, use_cache: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """This process's scores, once per (pool, target, selector and its parameters); reruns read them back.

    The key covers everything that decides the stored scores and diagnostics: the package version
    (the scoring code), the selector's name and class, every parameter (arrays by content), and
    ``key_parts`` (the candidates' and target's content: vector digests, or text fingerprints, and
    the process layout). Both files are verified on read (:mod:`hf_otselect.cache`); a damaged one
    is logged, removed and the scores recomputed. The fit is collective, so every process reads
    the cache only when every process finds a sound entry (one all-reduce decides); otherwise all
    of them fit again.

    Returns
    -------
    scores : ndarray of shape (n_candidates,), float64
    info : dict
        The selector's diagnostics.
    """
    from .. import __version__

    comm = comm or LOCAL
    params = {k: (digest(v) if isinstance(v, np.ndarray) else v) for k, v in selector.get_params().items()}
    key = digest(SCORES_CACHE_VERSION, __version__, selector.name, type(selector).__qualname__, params, *key_parts)
    folder = cache_dir / "scores" / key
    scores_path, info_path = folder / "scores.npy", folder / "info.json"
    # Each file is bound to this key (cache.py): an entry of another method, pool or target moved,
    # copied or swapped into this folder is a miss, never another method's scores.
    scores = load_array(scores_path, key=key, dtype=np.float64, ndim=1, rows=len(candidates)) if use_cache else None
    info = load_json(info_path, key=key) if scores is not None else None
    hit = scores is not None and isinstance(info, dict)
    if int(comm.all_reduce(np.array([hit], dtype=np.int64), op="min")[0]):
        logger.info("Scores read from the cache (%s)", folder)
        return scores, info
    scores, info = fit_and_score(selector, candidates, target, comm)
    if use_cache:
        save_array(scores_path, scores, key=key)
        save_json(info_path, info, key=key)
    return scores, info


def fit_and_score(selector: Selector, candidates: Any, target: Any, comm: Comm) -> tuple[np.ndarray, dict[str, Any]]:
    """The selector's fit over every process's rows, then ``score_batch`` over this process's blocks.

    Returns
    -------
    scores : ndarray of shape (n_candidates,), float64
    info : dict
    """
    selector.diagnostics_ = {}
    view = TextView.of(candidates, comm) if selector.needs_text else PoolView.of(candidates, comm)
    state = selector.fit(view, target, comm=comm)
    parts = [np.asarray(selector.score_batch(state, rows, idx), dtype=np.float64) for idx, rows in view.blocks()]
    scores = np.concatenate(parts) if parts else np.zeros(0)
    return scores, dict(getattr(selector, "diagnostics_", {}))
