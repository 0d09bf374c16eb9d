"""The scoring stage: fit the selector over every process's rows, score this process's, cache both.

The fit is the selector's ``fit`` over a view of this process's rows (collectives through
``comm``). A registered selector's fit then becomes a :class:`~hf_otselect.fitted.FittedSelector`
(:meth:`~hf_otselect.fitted.FittedSelector.from_fit`, as :func:`hf_otselect.fit_selector` makes
it) and the rows are scored through its ``score_rows``: the job, ``fit_selector`` and a saved
selector's ``ds.map(fitted, batched=True)`` score a row on one path, and the job keeps its fit
(the YAML job saves it). The stage embeds nothing itself (the embedding stage did, with its
cache), and keeps its own cache of the scores and of the fit (:func:`scores_cached`), keyed by
everything that decides them.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import load_array, load_json, save_array, save_json
from ..dist import LOCAL, Comm, PoolView, TextView
from ..fitted_io import CARD_FILE, CONFIG_FILE, STATE_FILE
from ..fingerprints import digest
from ..fitted import FittedSelector, encoder_record
from ..request import Request
from ..selectors import Selector
from ..selectors.base import available_selectors, selector_class
from .embedding import Embedded
from .filters import Filtered

logger = logging.getLogger(__name__)

__all__ = ["SCORES_CACHE_VERSION", "Scored", "score_stage", "scores_cached"]

SCORES_CACHE_VERSION = 4  # bump when what a score entry holds changes for the same key (3: DSIR scores short rows; 4: the fit)


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
        Their indices in the choice's numbering (global rows; when narrowed, the kept rows of every
        process numbered ``0 ..`` in pool order).
    info : dict
        The selector's diagnostics.
    fitted : FittedSelector or None
        The fit, usable on any row later (:meth:`~hf_otselect.fitted.FittedSelector.save_pretrained`);
        None for a selector that cannot be wrapped (see :func:`wrappable`).
    """

    scores: np.ndarray
    kept_scores: np.ndarray
    kept_index: np.ndarray
    info: dict[str, Any]
    fitted: FittedSelector | None = None


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
    kept, info, fitted = scores_cached(emb.selector, flt.candidates, emb.target_side, req.cache, flt.key_parts, req.comm,
                                       use_cache=req.caching, wrap=_wrap_settings(req, emb))
    index = flt.kept_offset + np.arange(flt.keep_rows.size, dtype=np.int64) if flt.narrowed else emb.offset + flt.keep_rows
    scores = np.full(emb.n_local, np.nan)
    scores[flt.keep_rows] = kept
    return Scored(scores, kept, index, info, fitted)


def wrappable(selector: Selector) -> bool:
    """Whether a fit of ``selector`` can become a :class:`~hf_otselect.fitted.FittedSelector`.

    A fitted selector rebuilds its selector from the registry name and parameters, so it holds
    only an instance of a registered class itself (a user's own :class:`Selector` subclass keeps
    the direct ``fit`` + ``score_batch`` path), and chunked GOT-D (``chunk_size``) scores a row by
    the chunk it was dealt, which only the fit's own rows have (``fit_selector`` refuses it too).
    """
    name = getattr(selector, "name", None)
    if name not in available_selectors() or type(selector) is not selector_class(name):
        return False
    return getattr(selector, "chunk_size", None) is None


def _wrap_settings(req: Request, emb: Embedded) -> dict[str, Any] | None:
    """What the fitted selector records besides the fit: its encoder, seed and columns (None: not wrappable)."""
    selector = emb.selector
    if not wrappable(selector):
        return None
    encoder = None
    if selector.needs_vectors and not selector.needs_text and req.embeddings is None:
        from ..embed import embed

        defaults = {name: p.default for name, p in inspect.signature(embed).parameters.items()}
        given = req.embed_kwargs
        keys = ("model", "revision", "pooling", "max_length", "normalize", "batch_size", "trust_remote_code", "backend", "quantize")
        encoder = encoder_record(**{key: given.get(key, defaults[key]) for key in keys})
    return {"encoder": encoder, "seed": req.seed, "column": req.column, "score_column": req.score_column,
            "pool_fingerprint": emb.fingerprints.get("pool"), "device": getattr(selector, "device", None)}


def scores_cached(
    selector: Selector, candidates: Any, target: Any, cache_dir: Path, key_parts: tuple[Any, ...], comm: Comm | None = None,
    *, use_cache: bool = True, wrap: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any], FittedSelector | None]:
    """This process's scores, once per (pool, target, selector and its parameters); reruns read them back.

    The key covers everything that decides the stored scores and diagnostics: the package version
    (the scoring code), the selector's name and class, every parameter (arrays by content), and
    ``key_parts`` (the candidates' and target's content: vector digests, or text fingerprints, and
    the process layout). Both files are verified on read (:mod:`hf_otselect.cache`); a damaged one
    is logged, removed and the scores recomputed. The fit is collective, so every process reads
    the cache only when every process finds a sound entry (one all-reduce decides); otherwise all
    of them fit again. With ``wrap`` (the settings :func:`_wrap_settings` gives) the entry also
    holds the fit (``selector/``, read back by ``from_pretrained``, which verifies its checksums,
    and bound to the key by its fingerprint in ``fitted.json``); a hit wraps its state with this
    run's settings and calibrates it on the cached scores.

    Returns
    -------
    scores : ndarray of shape (n_candidates,), float64
    info : dict
        The selector's diagnostics.
    fitted : FittedSelector or None
        None without ``wrap``.
    """
    from .. import __version__

    comm = comm or LOCAL
    params = {k: (digest(v) if isinstance(v, np.ndarray) else v) for k, v in selector.get_params().items()}
    key = digest(SCORES_CACHE_VERSION, __version__, selector.name, type(selector).__qualname__, params, *key_parts)
    folder = cache_dir / "scores" / key
    scores_path, info_path, fitted_path = folder / "scores.npy", folder / "info.json", folder / "fitted.json"
    # Each file is bound to this key (cache.py): an entry of another method, pool or target moved,
    # copied or swapped into this folder is a miss, never another method's scores.
    scores = load_array(scores_path, key=key, dtype=np.float64, ndim=1, rows=len(candidates)) if use_cache else None
    info = load_json(info_path, key=key) if scores is not None else None
    cached = _cached_fit(folder, fitted_path, key) if isinstance(info, dict) and wrap is not None else None
    hit = scores is not None and isinstance(info, dict) and (wrap is None or cached is not None)
    if int(comm.all_reduce(np.array([hit], dtype=np.int64), op="min")[0]):
        logger.info("Scores read from the cache (%s)", folder)
        if wrap is None:
            return scores, info, None
        # The entry keeps the fit's state; this run's encoder, seed and columns (which the key
        # leaves out: they do not change the scores) wrap it, calibrated on the cached scores.
        cached.selector.diagnostics_ = info
        view = TextView.of(candidates, comm) if selector.needs_text else PoolView.of(candidates, comm)
        fitted, _ = FittedSelector.from_fit(cached.selector, cached.state, view, target, comm=comm, scores=scores, **wrap)
        return scores, info, fitted
    scores, info, fitted = fit_and_score(selector, candidates, target, comm, wrap)
    if use_cache:
        save_array(scores_path, scores, key=key)
        save_json(info_path, info, key=key)
        if fitted is not None:
            # The entry's own fit, rewritten: a damaged save's files are not a saved selector, which
            # save_pretrained would rightly leave alone, so they go first (those files only).
            for name in (CONFIG_FILE, STATE_FILE, CARD_FILE):
                (folder / "selector" / name).unlink(missing_ok=True)
            fitted.save_pretrained(folder / "selector")
            save_json(fitted_path, {"fingerprint": fitted.fingerprint}, key=key)
    return scores, info, fitted


def _cached_fit(folder: Path, fitted_path: Path, key: str) -> FittedSelector | None:
    """The entry's fitted selector when it is sound and this key's (None: a miss, fit again)."""
    bound = load_json(fitted_path, key=key)
    if not isinstance(bound, dict):
        return None
    try:
        fitted = FittedSelector.from_pretrained(folder / "selector")
    except (OSError, ValueError) as err:
        logger.warning("The cached fit in %s is unreadable (%s); fitting again", folder, err)
        return None
    return fitted if fitted.fingerprint == bound.get("fingerprint") else None


def fit_and_score(
    selector: Selector, candidates: Any, target: Any, comm: Comm, wrap: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any], FittedSelector | None]:
    """The selector's fit over every process's rows, then the scores of this process's blocks.

    With ``wrap`` the fit becomes a :class:`~hf_otselect.fitted.FittedSelector` and the rows are
    scored through its ``score_rows`` (calibrated on them, by all-reduced counts); without (a
    user's own selector class, chunked GOT-D: see :func:`wrappable`) through the selector's
    ``score_batch`` directly.

    Returns
    -------
    scores : ndarray of shape (n_candidates,), float64
    info : dict
    fitted : FittedSelector or None
    """
    selector.diagnostics_ = {}
    view = TextView.of(candidates, comm) if selector.needs_text else PoolView.of(candidates, comm)
    state = selector.fit(view, target, comm=comm)
    if wrap is not None:
        fitted, scores = FittedSelector.from_fit(selector, state, view, target, comm=comm, **wrap)
        return scores, dict(fitted.fit_info["diagnostics"]), fitted
    # Direct path: a selector a FittedSelector cannot rebuild from its name and parameters.
    parts = [np.asarray(selector.score_batch(state, rows, idx), dtype=np.float64) for idx, rows in view.blocks()]
    scores = np.concatenate(parts) if parts else np.zeros(0)
    return scores, dict(getattr(selector, "diagnostics_", {})), None
