"""The embedding stage: this process's pool rows and the target as the selector reads them.

Vectors for the vector selectors (cached encoder passes, a stream spilled to a memory-mapped file,
an empty shard given the target's width), texts for the text selectors, nothing for random. The
stage also names what it read (fingerprints, and the key parts of the score cache), numbers this
process's rows globally and refuses non-finite vectors on every process at once.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset

from .._checks import nonfinite_rows, nonfinite_summary, param_error, short_repr
from ..dist import Comm
from ..fingerprints import StreamDigest, digest, fingerprint_of
from ..request import Request
from ..selectors import Selector, get_selector
from ..splits import shard_of

logger = logging.getLogger(__name__)

__all__ = ["Embedded", "embed_side", "embed_stage", "texts_of"]


@dataclass
class Embedded:
    """What the embedding stage read, for this process.

    Attributes
    ----------
    part : Dataset or IterableDataset
        This process's contiguous rows of the pool.
    candidates
        What the selector scores: vectors ``(n_local, dim)``, texts, or a zero-width array (random).
    target_side
        The target as the selector reads it (vectors, texts, or None for random).
    pool_embeddings, target_embeddings : ndarray or None
        The vectors (None when nothing was embedded).
    selector : Selector
        The request's selector, holding the negative target's vectors when there is one.
    fingerprints : dict
        Of the whole pool, the target (and the negative target).
    key_parts : tuple
        The score cache key's content part: what was scored, and how the rows are split.
    n_local, offset, n_pool : int
        This process's rows, the global index of its first, the pool's rows.
    """

    part: Dataset | IterableDataset
    candidates: Any
    target_side: Any
    pool_embeddings: np.ndarray | None
    target_embeddings: np.ndarray | None
    selector: Selector
    fingerprints: dict[str, str]
    key_parts: tuple[Any, ...]
    n_local: int
    offset: int
    n_pool: int


def embed_stage(req: Request) -> Embedded:
    """Embed (or read) this process's rows and the target; number the rows; refuse bad vectors.

    Parameters
    ----------
    req : Request

    Returns
    -------
    Embedded
    """
    part = shard_of(req.dataset, req.comm, req.owner)
    # A stream is fingerprinted by its full content during the pass that embeds it.
    stream = StreamDigest() if req.streamed else None
    # The whole pool's (selection.json records it; every process has agreed it holds the same rows).
    fingerprints = {"pool": "" if req.streamed else fingerprint_of(req.dataset, req.column), "target": fingerprint_of(req.target, req.target_column)}
    probe = req.selector
    if probe.needs_text:
        pool_emb, target_emb, candidates, target_side = _texts(req, part, stream)
        if stream is not None:
            fingerprints["pool"] = stream.fingerprint(req.column)
        key_parts: tuple[Any, ...] = (fingerprints["pool"], fingerprints["target"])
    elif not probe.needs_vectors and not req.filters.active:
        n_local = len(part) if stream is None else sum(1 for _ in stream.wrap(part))
        if stream is not None:
            fingerprints["pool"] = stream.fingerprint(req.column)
        pool_emb = target_emb = target_side = None
        candidates = np.zeros((n_local, 0), dtype=np.float32)
        key_parts = (fingerprints["pool"], n_local)
    else:
        pool_emb, target_emb = _vectors(req, part, stream)
        if req.negative_target is not None:
            neg_emb = embed_side(req.negative_target, req.target_column, req.embed_kwargs, req.cache)
            fingerprints["negative_target"] = fingerprint_of(req.negative_target, req.target_column)
            probe = get_selector(probe.name, **{**probe.get_params(), "negative_target": neg_emb})
        if stream is not None:
            # Fed by the embedding pass; vectors handed in need a pass of its own.
            fingerprints["pool"] = stream.fingerprint(req.column) if stream.complete else fingerprint_of(part, req.column)
        candidates, target_side = pool_emb, target_emb
        key_parts = (digest(np.asarray(pool_emb)), digest(np.asarray(target_emb)))
    comm = req.comm
    n_local = len(candidates) if pool_emb is None else pool_emb.shape[0]
    offset, n_pool = comm.exclusive_offset(n_local)
    if pool_emb is not None:  # vectors handed in (or an encoder that overflowed): refused by every method, on every process
        _check_finite_vectors(pool_emb, target_emb, offset, comm, req.owner, "embeddings" if req.embeddings is not None else "dataset")
    if not probe.replaces and req.k > n_pool:
        raise param_error("k", req.owner, f"an int in [1, {n_pool}] (the pool's rows)", req.k)
    # The layout and every process's content: a process reads its scores back only for the same split of the same pool.
    everyone = digest(np.concatenate(comm.all_gather(np.frombuffer(bytes.fromhex(digest(*key_parts)), dtype=np.uint8))))
    key_parts = (*key_parts, comm.rank, comm.world_size, everyone)
    return Embedded(part, candidates, target_side, pool_emb, target_emb, probe, fingerprints, key_parts, n_local, offset, n_pool)


def _texts(req: Request, part: Dataset | IterableDataset, stream: StreamDigest | None) -> tuple[Any, Any, Any, list[str]]:
    """A text selector's pool and target texts (and vectors when a filter or the guard needs them).

    A stream's texts are a :class:`~hf_otselect.stream_texts.StreamTexts`: one pass counts and
    checks them (and fingerprints the stream, unless the encoder pass already did), then the fit
    and the scoring read it again; DSIR's fit is additive counts, so nothing else changes.
    """
    from ..embed import check_texts

    owner, column, target_column = req.owner, req.column, req.target_column
    if isinstance(req.target, np.ndarray):
        raise param_error("target", owner, f"texts (a Dataset or list of str) for the text selector {req.selector.name!r}", "an embedding array", exc=TypeError)
    target_side = check_texts(texts_of(req.target, target_column, "target"), column=target_column if isinstance(req.target, Dataset) else None,
                              owner=f"{owner} (target)")
    pool_emb = target_emb = None
    if req.filters.active:  # the filters and the guard work on vectors; embed once (cached)
        if req.embeddings is not None:
            pool_emb, target_emb = req.embeddings
        else:
            pool_emb = (_embed_stream(stream.wrap(part), column, req.embed_kwargs, req.cache) if stream is not None
                        else embed_side(part, column, req.embed_kwargs, req.cache))
            target_emb = embed_side(req.target, target_column, req.embed_kwargs, req.cache)
    # The rules the encoder path applies (str, not blank), before the text selector reads a row.
    if stream is not None:
        from ..stream_texts import StreamTexts

        candidates: Any = StreamTexts(part, column, owner=owner, rows=None if stream.complete else stream.wrap(part))
    else:
        candidates = check_texts(texts_of(part, column, "dataset"), column=column, owner=owner)
    return pool_emb, target_emb, candidates, target_side


def _vectors(req: Request, part: Dataset | IterableDataset, stream: StreamDigest | None) -> tuple[np.ndarray, np.ndarray]:
    """This process's pool vectors and the target's: handed in, or embedded (the pool first)."""
    if req.embeddings is not None:
        pool_emb, target_emb = req.embeddings
    else:
        from ..embed import check_texts

        kw, cache, column, target_column = req.embed_kwargs, req.cache, req.column, req.target_column
        # The (small) targets' texts are checked before the pool's encoder pass, not after it.
        for side, name in ((req.target, "target"), (req.negative_target, "negative_target")):
            if side is not None and not isinstance(side, np.ndarray):
                named = target_column if isinstance(side, Dataset) else None
                check_texts(texts_of(side, target_column, name), column=named, owner=f"select_by_ot ({name})")
        # The pool first: its pass checks every row before the encoder loads (for either side).
        if stream is not None:
            pool_emb = _embed_stream(stream.wrap(part), column, kw, cache)
            target_emb = embed_side(req.target, target_column, kw, cache)
        elif len(part) == 0:  # an empty shard (more processes than rows): it still joins every collective
            target_emb = embed_side(req.target, target_column, kw, cache)
            pool_emb = np.zeros((0, target_emb.shape[1]), dtype=np.float32)
        else:
            pool_emb = embed_side(part, column, kw, cache)
            target_emb = embed_side(req.target, target_column, kw, cache)
    if target_emb.shape[1] != pool_emb.shape[1]:
        raise param_error("target", req.owner, f"embeddings with {pool_emb.shape[1]} columns like the pool", f"shape {target_emb.shape}")
    return pool_emb, target_emb


def texts_of(data: Dataset | Sequence[str], column: str, name: str) -> list[str]:
    """The texts of one side: a Dataset's ``column`` (named when missing), or the list itself."""
    if isinstance(data, Dataset):
        if column not in data.column_names:
            raise ValueError(f"The '{name}' dataset has no column {short_repr(column)}. Current columns: {data.column_names}")
        return list(data[column])
    return list(data)


def embed_side(data: Any, column: str, embed_kwargs: dict[str, Any], cache_dir: Path) -> np.ndarray:
    """One side as vectors: an array as given, otherwise embedded with the cache under ``cache_dir``."""
    from ..embed import embed

    if isinstance(data, np.ndarray):
        return data
    return embed(data, column=column, cache_dir=cache_dir / "embeddings", **embed_kwargs)


def _embed_stream(pool: IterableDataset | Iterator[dict], column: str, embed_kwargs: dict[str, Any], cache_dir: Path) -> np.ndarray:
    """Spill a streamed pool's vectors to a memory-mapped file (bounded memory)."""
    from ..embed import embed_to_file

    folder = cache_dir / "streams"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.npy"
    vectors = embed_to_file(pool, path, column=column, cache_dir=cache_dir / "embeddings", **embed_kwargs)
    # The shards are cached by content already; this file is a working copy. Unlinking it now keeps
    # the mapping valid (POSIX) and frees the space when the array is dropped, so no run leaves it.
    try:
        os.unlink(path)
    except OSError:  # a platform that refuses to unlink a mapped file: leave it in the cache folder
        logger.debug("Could not unlink the stream working copy %s", path)
    return vectors


def _check_finite_vectors(pool_emb: Any, target_emb: Any, offset: int, comm: Comm, owner: str, name: str) -> None:
    """Refuse NaN/Inf in the pool's (this process's rows, numbered globally) or the target's vectors.

    One all-reduce decides, so every process raises together rather than one leaving the others
    waiting in the fit's collectives.
    """
    count, first = nonfinite_rows(pool_emb, offset=offset)
    t_count, t_first = nonfinite_rows(target_emb)
    totals = comm.all_reduce(np.array([count, t_count], dtype=np.int64)) if comm.world_size > 1 else (count, t_count)
    where = "" if name == "embeddings" else " (the encoder's output for the pool)"
    if int(totals[0]):
        shown = nonfinite_summary(int(totals[0]), first) if first else f"{int(totals[0])} row(s) with NaN or Inf on other processes"
        raise param_error(name, owner, f"pool vectors that are finite (no NaN or Inf){where}", shown)
    if int(totals[1]):
        raise param_error(name, owner, "target vectors that are finite (no NaN or Inf)", nonfinite_summary(t_count, t_first))
