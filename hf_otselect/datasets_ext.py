"""``Dataset.select_by_ot``: embed both sides, score, choose, and hand back datasets splits.

This is the glue of the flow in DESIGN.md. It never converts OT conventions or touches FAISS; it
calls :func:`hf_otselect.embed`, a registered selector and :func:`~hf_otselect.selectors.choose`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset

from ._checks import (
    check_cache_dir,
    check_embeddings,
    check_int,
    check_magnitude,
    check_seed,
    check_solver_device,
    nonfinite_rows,
    nonfinite_summary,
    param_error,
    short_repr,
)
from ._suggest import did_you_mean
from .cache import load_array, load_json, save_array, save_json
from .dist import LOCAL, Comm, PoolView, TextView, agree, shard_bounds
from .selectors import SelectionResult, Selector, get_selector

logger = logging.getLogger(__name__)

__all__ = ["SelectionRun", "best_first", "register_dataset_methods", "run_selection", "select_by_ot"]

Target = Dataset | Sequence[str] | np.ndarray
_EMBED_KEYS = ("model", "revision", "batch_size", "max_length", "pooling", "normalize", "device", "trust_remote_code",
               "shard_rows", "num_proc")


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
        ``"prefilter"`` (the source ranking, one row per source) and ``"decontaminated"`` (the
        dropped pool rows with ``pool_index``, reason and nearest held-out distance), when on.
    comm : Comm
        The processes that shared the pool.
    offset, n_pool : int
        Global index of this process's first row; rows of the whole pool.
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


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.shape, part.dtype.str)).encode())
            if part.size:  # memoryview cannot cast an empty array (an empty shard's vectors)
                h.update(memoryview(np.ascontiguousarray(part)).cast("B"))
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _texts_of(data: Dataset | Sequence[str], column: str, name: str) -> list[str]:
    if isinstance(data, Dataset):
        if column not in data.column_names:
            raise ValueError(f"The '{name}' dataset has no column {short_repr(column)}. Current columns: {data.column_names}")
        return list(data[column])
    return list(data)


def _json_default(value: Any) -> Any:
    """Canonical JSON for the values a stream row may hold beyond JSON's own types."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, np.ndarray):
        return {"array": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tobytes"):  # decoded images and the like: their pixels, not their repr
        return {type(value).__name__: hashlib.sha256(value.tobytes()).hexdigest()}
    return {type(value).__name__: str(value)}


class _StreamDigest:
    """A running SHA-256 over every row of a stream (canonical JSON, keys sorted), in order.

    Fed by the pass that reads the rows anyway (the embedding pass), so a streamed pool is
    fingerprinted by its full content, every column and row, at the cost of one JSON dump per row.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.rows = 0
        self.complete = False

    def wrap(self, rows: Any) -> Iterator[Any]:
        """Yield ``rows`` unchanged, hashing each; :attr:`complete` once the stream is exhausted."""
        for row in rows:
            self._hash.update(json.dumps(row, sort_keys=True, default=_json_default).encode("ascii"))
            self._hash.update(b"\n")  # JSON escapes newlines inside values: the separator is unambiguous
            self.rows += 1
            yield row
        self.complete = True

    def fingerprint(self, column: str) -> str:
        if not self.complete:
            raise RuntimeError("the stream was not read to its end; its fingerprint would cover part of it")
        return f"stream:{self._hash.hexdigest()}:{self.rows}:{column}"


def _fingerprint(data: Any, column: str) -> str:
    """What names the content of one side: every row and column (``column`` is the one embedded).

    A ``Dataset`` has datasets' own fingerprint (derived from its files' or its transforms'
    fingerprints); a stream is read once to the end and hashed row by row (see
    :class:`_StreamDigest`; :func:`run_selection` feeds it from the embedding pass instead).
    """
    if isinstance(data, Dataset):
        return f"{data._fingerprint}:{column}"
    if isinstance(data, np.ndarray):
        return "emb:" + _digest(data)
    if isinstance(data, IterableDataset):
        digest = _StreamDigest()
        for _ in digest.wrap(data):
            pass
        return digest.fingerprint(column)
    return "texts:" + _digest(list(data))


def content_fingerprint(data: Any) -> str:
    """A fingerprint of one side's content alone, the same wherever and however it was loaded.

    datasets' own fingerprint also covers where a file was read from and its cache folder, which
    differ between nodes for the same rows. A ``Dataset`` is hashed in full (its features and every
    column, as Arrow IPC batches: one pass over memory-mapped data, cheaper than embedding it); a
    stream by its declared features, file shards and first 64 rows (reading all of it on every
    process would cost a full pass per process); texts and arrays by content.
    """
    h = hashlib.sha256()
    if isinstance(data, Dataset):
        h.update(json.dumps(data.features.to_dict(), sort_keys=True, default=str).encode("utf-8"))
        for batch in data.with_format("arrow").iter(batch_size=16_384):
            for record in batch.combine_chunks().to_batches():
                h.update(record.serialize())
        return f"{len(data)} rows, sha256 {h.hexdigest()[:24]}"
    if isinstance(data, IterableDataset):
        features = data.features.to_dict() if data.features is not None else None
        h.update(json.dumps([features, data.n_shards], sort_keys=True, default=str).encode("utf-8"))
        head = _StreamDigest()  # the canonical row hashing of a full stream, over its first 64 rows
        for _ in head.wrap(data.take(64)):
            pass
        h.update(head.fingerprint("").encode("ascii"))
        return f"stream of {data.n_shards} file shard(s), first rows sha256 {h.hexdigest()[:24]}"
    if isinstance(data, np.ndarray):
        return f"array {data.shape}, {_digest(data)[:24]}"
    return f"{len(data)} texts, {_digest(list(data))[:24]}"


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
            ident[f"params.{key}"] = f"array {value.shape}, {_digest(value)[:24]}" if isinstance(value, np.ndarray) else value
    for key, value in embed_kwargs.items():
        if key not in ("device", "num_proc", "use_cache"):
            ident[f"embedding.{key}"] = _model_identity(value) if key == "model" else value
    for name, side in sides.items():
        if side is not None:
            ident[name] = content_fingerprint(side)
    return ident


def _check_target(target: Any, name: str) -> None:
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


def _embed_side(data: Any, column: str, embed_kwargs: dict[str, Any], cache_dir: Path) -> np.ndarray:
    from .embed import embed

    if isinstance(data, np.ndarray):
        return data
    return embed(data, column=column, cache_dir=cache_dir / "embeddings", **embed_kwargs)


def _embed_stream(pool: IterableDataset | Iterator[dict], column: str, embed_kwargs: dict[str, Any], cache_dir: Path) -> np.ndarray:
    """Spill a streamed pool's vectors to a memory-mapped file (bounded memory)."""
    from .embed import embed_to_file

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


_SCORES_CACHE_VERSION = 3  # bump when what a score entry holds changes for the same key (3: DSIR scores short rows)


def _scores_cached(
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
    """
    from . import __version__

    comm = comm or LOCAL
    params = {k: (_digest(v) if isinstance(v, np.ndarray) else v) for k, v in selector.get_params().items()}
    key = _digest(_SCORES_CACHE_VERSION, __version__, selector.name, type(selector).__qualname__, params, *key_parts)
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
    selector.diagnostics_ = {}
    view = TextView.of(candidates, comm) if selector.needs_text else PoolView.of(candidates, comm)
    state = selector.fit(view, target, comm=comm)
    parts = [np.asarray(selector.score_batch(state, rows, idx), dtype=np.float64) for idx, rows in view.blocks()]
    scores = np.concatenate(parts) if parts else np.zeros(0)
    info = dict(getattr(selector, "diagnostics_", {}))
    if not use_cache:
        return scores, info
    save_array(scores_path, scores, key=key)
    save_json(info_path, info, key=key)
    return scores, info


def _check_extras(
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
) -> dict[str, Any]:
    """Validate the pre-filter, guard and decontamination arguments before any work."""
    from ._checks import check_choice, check_float

    streamed = isinstance(dataset, IterableDataset)
    if source_column is not None:
        if not isinstance(source_column, str) or not source_column:
            raise param_error("source_column", owner, "None or a non-empty str", source_column, exc=TypeError)
        if not streamed and source_column not in dataset.column_names:
            raise ValueError(f"Column {short_repr(source_column)} (source_column) not in the dataset. Current columns: {dataset.column_names}")
    opts = None
    if prefilter is not None:
        from .prefilter import check_prefilter

        opts = check_prefilter(prefilter, owner)
        if source_column is None:
            raise param_error("source_column", owner, "the column naming each row's source when prefilter is set (or pass a DatasetDict / list of datasets)", None)
        if streamed:
            raise param_error("prefilter", owner, "None for a streamed pool (IterableDataset)", dict(opts))
    if dedup_radius is not None:
        dedup_radius = check_float(dedup_radius, "dedup_radius", owner, 0.0, 2.0, low_open=True)
    from .dedup import DEDUP_MODES

    check_choice(dedup_mode, "dedup_mode", owner, list(DEDUP_MODES))
    decontaminate_radius = check_float(decontaminate_radius, "decontaminate_radius", owner, 0.0, 2.0, low_open=True)
    if decontaminate_ngram is not None:
        decontaminate_ngram = check_int(decontaminate_ngram, "decontaminate_ngram", owner, 1)
    if decontaminate is not None:
        _check_target(decontaminate, "decontaminate")
        if streamed:
            raise param_error("decontaminate", owner, "None for a streamed pool (IterableDataset)", type(decontaminate).__name__)
        if isinstance(decontaminate, Dataset) and decontaminate_column not in decontaminate.column_names:
            raise ValueError(f"Column {short_repr(decontaminate_column)} not in the decontaminate dataset. Current columns: {decontaminate.column_names}")
        if isinstance(decontaminate, np.ndarray) and decontaminate_ngram is not None:
            raise param_error("decontaminate_ngram", owner, "None when the held-out set is given as embeddings (the n-gram test needs texts)", decontaminate_ngram)
    return {
        "source_column": source_column, "prefilter": opts, "dedup_radius": dedup_radius, "dedup_mode": dedup_mode,
        "decontaminate": decontaminate, "decontaminate_column": decontaminate_column,
        "decontaminate_radius": decontaminate_radius, "decontaminate_ngram": decontaminate_ngram,
        "filters": opts is not None or decontaminate is not None,
        "active": opts is not None or decontaminate is not None or dedup_radius is not None,
    }


def _apply_filters(
    dataset: Dataset,
    column: str,
    pool_emb: np.ndarray,
    target_emb: np.ndarray,
    extras: dict[str, Any],
    embed_kwargs: dict[str, Any],
    cache: Path,
    seed: int,
    reports: dict[str, Any],
    extra_splits: dict[str, Dataset],
    fingerprints: dict[str, str],
) -> np.ndarray:
    """Decontaminate, then pre-filter the sources; return the (n_pool,) mask of selectable rows."""
    n = pool_emb.shape[0]
    eligible = np.ones(n, dtype=bool)
    src_col = extras["source_column"]
    sources = list(dataset[src_col]) if src_col is not None else None
    held = extras["decontaminate"]
    if held is not None:
        from .decontaminate import decontaminate

        dcol, ngram = extras["decontaminate_column"], extras["decontaminate_ngram"]
        held_emb = _embed_side(held, dcol, embed_kwargs, cache)
        fingerprints["decontaminate"] = _fingerprint(held, dcol)
        res = decontaminate(
            pool_emb, held_emb, radius=extras["decontaminate_radius"], ngram=ngram, sources=sources,
            candidate_texts=_texts_of(dataset, column, "dataset") if ngram else None,
            heldout_texts=_texts_of(held, dcol, "decontaminate") if ngram else None,
        )
        eligible &= ~res.dropped
        reports["decontamination"] = {**res.to_dict(), "source_column": src_col}
        rows = np.flatnonzero(res.dropped)
        reason = np.where(res.by_embedding & res.by_ngram, "embedding+ngram", np.where(res.by_embedding, "embedding", "ngram"))
        extra_splits["decontaminated"] = (
            dataset.select(rows).add_column("pool_index", rows.astype(np.int64))
            .add_column("reason", reason[rows].tolist()).add_column("nearest_distance", res.nearest_distance[rows])
        )
    opts = extras["prefilter"]
    if opts is not None:
        from .prefilter import prefilter_sources

        ranking = prefilter_sources(pool_emb, sources, target_emb, seed=seed, eligible=eligible, **opts)
        eligible &= ranking.mask
        reports["prefilter"] = {**ranking.to_dict(), "source_column": src_col}
        extra_splits["prefilter"] = ranking.to_dataset()
    return eligible


def global_ranks(scores: np.ndarray, index: np.ndarray, q_scores: np.ndarray, q_index: np.ndarray, comm: Comm) -> np.ndarray:
    """Rank by score in the whole pool (1 = best, ties to the lower index) of a few query rows.

    Every process counts its own rows that beat each query (higher score, or the same score and a
    lower global index) and the counts are summed: O(n_queries) bytes, no scores leave a process.

    Parameters
    ----------
    scores, index : ndarray of shape (n,)
        This process's scores (NaN = unscored, never counted) and their global indices.
    q_scores, q_index : ndarray of shape (q,)
        The query rows, the same on every process.

    Returns
    -------
    ndarray of shape (q,), int64
    """
    ok = ~np.isnan(scores)
    neg, idx = -scores[ok], index[ok]
    order = np.lexsort((idx, neg))
    neg, idx = neg[order], idx[order]
    q_neg = -np.asarray(q_scores, dtype=np.float64)
    before = np.searchsorted(neg, q_neg, side="left")  # strictly higher scores
    # Among equal scores the indices are ascending: number each run of equal scores and search
    # (run, index) pairs as one monotone int64 key.
    run = np.cumsum(np.r_[True, neg[1:] != neg[:-1]]) if neg.size else np.zeros(0, dtype=np.int64)
    span = int(max(int(idx.max(initial=0)), int(np.max(q_index, initial=0))) + 1)
    key = run.astype(np.int64) * span + idx
    has_equal = (before < neg.size) & (neg[np.minimum(before, max(neg.size - 1, 0))] == q_neg) if neg.size else np.zeros(q_neg.size, bool)
    q_key = np.where(has_equal, run[np.minimum(before, max(neg.size - 1, 0))] if neg.size else 0, 0).astype(np.int64) * span + q_index
    tied = np.where(has_equal, np.searchsorted(key, q_key, side="left") - before, 0)
    return comm.all_reduce((before + tied).astype(np.int64)) + 1


def _shard_of(dataset: Dataset | IterableDataset, comm: Comm, owner: str) -> Dataset | IterableDataset:
    """This process's contiguous rows (the whole pool for one process)."""
    if comm.world_size == 1:
        return dataset
    if isinstance(dataset, IterableDataset):
        if dataset.n_shards < comm.world_size:
            raise param_error("dataset", owner, f"a stream with at least as many file shards as the {comm.world_size} processes",
                              f"{dataset.n_shards} shard(s)")
        return dataset.shard(num_shards=comm.world_size, index=comm.rank, contiguous=True)
    # Dataset.shard's own split, but an empty shard (more processes than rows) is legal here:
    # datasets refuses to select an empty range that starts at the end of the table.
    lo, hi = shard_bounds(len(dataset), comm.world_size, comm.rank)
    return dataset.select(range(lo, hi)) if hi > lo else dataset.select([])


def _stream_rows(pool: IterableDataset, offset: int, columns: dict[str, np.ndarray]) -> Iterator[dict]:
    for i, row in enumerate(pool):
        yield {**row, "pool_index": offset + i, **{name: values[i].item() for name, values in columns.items()}}


def take_rows(
    data: Dataset, rows: np.ndarray, columns: dict[str, np.ndarray] | None = None, *, drop: Sequence[str] = (), fingerprint: str | None = None,
) -> Dataset:
    """Rows of ``data`` (repeats allowed) as a new in-memory Dataset, plus per-row ``columns``, minus ``drop``.

    ``select`` followed by ``add_column`` would flatten an indices mapping through ``map``, which
    shows a "Flattening the indices" bar on every call; gathering the few chosen rows as one Arrow
    table does the same work silently. The features (class labels, images...) travel in the
    table's schema metadata.

    Parameters
    ----------
    data : Dataset
        The source rows.
    rows : ndarray of shape (q,), int
        Positions in ``data``.
    columns : dict of ndarray of shape (q,), optional
        Columns appended, in order.
    drop : sequence of str
        Columns of ``data`` left out.
    fingerprint : str, optional
        The new dataset's fingerprint (derive it from every input, so datasets' caches stay valid).

    Returns
    -------
    Dataset
        ``q`` rows.
    """
    import pyarrow as pa
    from datasets.table import InMemoryTable

    table = data.with_format("arrow")[np.asarray(rows, dtype=np.int64)]
    if drop:
        table = table.drop_columns(list(drop))
    for name, values in (columns or {}).items():
        table = table.append_column(name, pa.array(np.asarray(values)))
    return Dataset(InMemoryTable(table), fingerprint=fingerprint)


class _QuietBars:
    """datasets' progress bars off for a block, re-entrant and shared by threads.

    Flattening the indices mapping of a filtered, shuffled or re-selected pool (or of a
    DatasetDict's splits) before columns are added is our plumbing, not an operation the user asked
    for; its "Flattening the indices" bar on every call is noise. The setting the user chose is
    restored when the last block ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._restore = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        import datasets

        with self._lock:
            if self._depth == 0:
                self._restore = not datasets.are_progress_bars_disabled()
                datasets.disable_progress_bars()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._restore:
                    datasets.enable_progress_bars()


_quiet_bars = _QuietBars()


def _with_columns(part: Dataset | IterableDataset, offset: int, columns: dict[str, np.ndarray], fingerprint: str) -> Dataset:
    """``part`` plus ``pool_index`` and the given per-row columns (a stream is read once more)."""
    if isinstance(part, IterableDataset):
        return Dataset.from_generator(_stream_rows, gen_kwargs={"pool": part, "offset": offset, "columns": columns}, fingerprint=fingerprint)
    with _quiet_bars():  # a pool with an indices mapping is flattened by the first add_column
        out = part.add_column("pool_index", np.arange(offset, offset + len(part), dtype=np.int64))
        for name, values in columns.items():
            out = out.add_column(name, values)
    return out


def run_selection(
    dataset: Dataset | IterableDataset,
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
) -> SelectionRun:
    """Run one selection, this process's part of it, and return every product (see :func:`select_by_ot`).

    Every process of ``comm`` calls this with the whole pool and takes its contiguous shard
    (``Dataset.shard(contiguous=True)``): it embeds only that shard, the selector's fit talks to the
    other processes through ``comm``, and each process scores its own rows. ``scored`` and
    ``selected`` hold this process's rows only; ``result.indices`` (the chosen global rows) is the
    same on every process. ``embeddings=(pool_emb, target_emb)`` passes this shard's vectors in and
    skips the encoder.
    """
    owner = "select_by_ot"
    comm = comm or LOCAL
    t0 = time.perf_counter()
    if isinstance(dataset, DatasetDict) or (isinstance(dataset, (list, tuple)) and dataset and all(isinstance(d, Dataset) for d in dataset)):
        from .prefilter import combine_sources

        source_column = source_column or "source"
        with _quiet_bars():  # each filtered/shuffled split is flattened when its source column is added
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
    _check_target(target, "target")
    if negative_target is not None:
        _check_target(negative_target, "negative_target")
    target_column = target_column or column
    if isinstance(target, Dataset) and target_column not in target.column_names:
        raise ValueError(f"Column {short_repr(target_column)} not in the target dataset. Current columns: {target.column_names}")
    k = check_int(k, "k", owner, 1)
    seed = check_seed(seed, "seed", owner)
    if not isinstance(score_column, str) or not score_column:
        raise param_error("score_column", owner, "a non-empty str", score_column, exc=TypeError)
    embed_kwargs = dict(embedding or {})
    unknown = sorted(set(embed_kwargs) - set(_EMBED_KEYS))
    if unknown:
        raise param_error("embedding", owner, f"a dict with keys among {list(_EMBED_KEYS)}", unknown)

    extras = _check_extras(
        dataset, owner, source_column=source_column, prefilter=prefilter, dedup_radius=dedup_radius, dedup_mode=dedup_mode,
        decontaminate=decontaminate, decontaminate_column=decontaminate_column or target_column,
        decontaminate_radius=decontaminate_radius, decontaminate_ngram=decontaminate_ngram,
    )
    if extras["filters"] and comm.world_size > 1:
        raise param_error("prefilter/decontaminate", owner,
                          "off when several processes share the pool (they need every row's vector in one process)", "set")
    if not isinstance(method, Selector):
        from ._checks import check_choice
        from .selectors import available_selectors
        from .selectors.base import selector_class

        check_choice(method, "method", owner, available_selectors())
        accepted = selector_class(method).param_names()
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            own = own_keywords()
            err = param_error(
                ", ".join(unknown), owner,
                f"a keyword of select_by_ot ({', '.join(own)}), or of the {method!r} selector ({', '.join(accepted) or 'none'}); "
                f"encoder settings go as keywords of their own or in embedding={{...}} (keys {', '.join(_EMBED_KEYS)})",
                {key: params[key] for key in unknown},
            )
            raise TypeError(str(err) + did_you_mean(unknown[0], [*own, *accepted]))
    probe = get_selector(method, **params) if not isinstance(method, Selector) else method
    if dedup_radius is not None:
        from .dedup import resolve_dedup_mode

        resolve_dedup_mode(dedup_mode, probe.choice, probe.replaces, owner)
    if negative_target is not None and "negative_target" not in probe.get_params():
        raise param_error("negative_target", owner, f"None for method {probe.name!r} (only GOT-D uses one)", "a negative target")
    if not streamed:
        k = check_int(k, "k", owner, 1, None if probe.replaces else len(dataset))
    reserved = {score_column, "pool_index", "rank", "draw_order", "selected"}
    if score_column in (pool_columns or []) or score_column in ("pool_index", "rank", "draw_order", "selected"):
        raise param_error("score_column", owner, f"a name not already in the pool's columns {pool_columns} "
                          "nor one of 'pool_index', 'rank', 'draw_order', 'selected'", score_column)
    taken = sorted(reserved & set(pool_columns or []))
    if taken:
        raise param_error("dataset", owner, f"a pool without the columns {sorted(reserved)} that the selection adds "
                          "(re-selecting from a selection? drop them with remove_columns first)", taken)
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
    timings: dict[str, float] = {}
    part = _shard_of(dataset, comm, owner)
    # A stream is fingerprinted by its full content during the pass that embeds it (below).
    stream_digest = _StreamDigest() if streamed else None
    # The whole pool's (selection.json records it; every process has agreed it holds the same rows).
    fingerprints = {"pool": "" if streamed else _fingerprint(dataset, column), "target": _fingerprint(target, target_column)}

    pool_emb = target_emb = None
    selector = probe
    if "budget" in probe.get_params() and probe.get_params()["budget"] is None:  # TSDS sizes its neighbourhoods by k
        selector = probe = get_selector(probe.name, **{**probe.get_params(), "budget": k})
    t = time.perf_counter()
    if probe.needs_text:
        if isinstance(target, np.ndarray):
            raise param_error("target", owner, f"texts (a Dataset or list of str) for the text selector {probe.name!r}", "an embedding array", exc=TypeError)
        from .embed import check_texts

        target_side: Any = check_texts(_texts_of(target, target_column, "target"), column=target_column if isinstance(target, Dataset) else None,
                                       owner=f"{owner} (target)")
        if extras["active"]:  # the filters and the guard work on vectors; embed once (cached)
            if embeddings is not None:
                pool_emb, target_emb = embeddings
            else:
                pool_emb = (_embed_stream(stream_digest.wrap(part), column, embed_kwargs, cache) if stream_digest is not None
                            else _embed_side(part, column, embed_kwargs, cache))
                target_emb = _embed_side(target, target_column, embed_kwargs, cache)
        # The rules the encoder path applies (str, not blank), before the text selector reads a row.
        if stream_digest is not None:  # a stream: counted and checked in one pass, read again by the fit and the scoring
            from .stream_texts import StreamTexts

            candidates: Any = StreamTexts(part, column, owner=owner, rows=None if stream_digest.complete else stream_digest.wrap(part))
            fingerprints["pool"] = stream_digest.fingerprint(column)
        else:
            candidates = check_texts(_texts_of(part, column, "dataset"), column=column, owner=owner)
        key_parts: tuple[Any, ...] = (fingerprints["pool"], fingerprints["target"])
    elif not probe.needs_vectors and not extras["active"]:
        n_local = len(part) if stream_digest is None else sum(1 for _ in stream_digest.wrap(part))
        if stream_digest is not None:
            fingerprints["pool"] = stream_digest.fingerprint(column)
        candidates, target_side = np.zeros((n_local, 0), dtype=np.float32), None
        key_parts = (fingerprints["pool"], n_local)
    else:
        if embeddings is not None:
            pool_emb, target_emb = embeddings
        else:
            from .embed import check_texts

            # The (small) targets' texts are checked before the pool's encoder pass, not after it.
            for side, name in ((target, "target"), (negative_target, "negative_target")):
                if side is not None and not isinstance(side, np.ndarray):
                    named = target_column if isinstance(side, Dataset) else None
                    check_texts(_texts_of(side, target_column, name), column=named, owner=f"select_by_ot ({name})")
            # The pool first: its pass checks every row before the encoder loads (for either side).
            if stream_digest is not None:
                pool_emb = _embed_stream(stream_digest.wrap(part), column, embed_kwargs, cache)
                target_emb = _embed_side(target, target_column, embed_kwargs, cache)
            elif len(part) == 0:  # an empty shard (more processes than rows): it still joins every collective
                target_emb = _embed_side(target, target_column, embed_kwargs, cache)
                pool_emb = np.zeros((0, target_emb.shape[1]), dtype=np.float32)
            else:
                pool_emb = _embed_side(part, column, embed_kwargs, cache)
                target_emb = _embed_side(target, target_column, embed_kwargs, cache)
        if target_emb.shape[1] != pool_emb.shape[1]:
            raise param_error("target", owner, f"embeddings with {pool_emb.shape[1]} columns like the pool", f"shape {target_emb.shape}")
        if negative_target is not None:
            neg_emb = _embed_side(negative_target, target_column, embed_kwargs, cache)
            fingerprints["negative_target"] = _fingerprint(negative_target, target_column)
            selector = get_selector(probe.name, **{**probe.get_params(), "negative_target": neg_emb})
        if stream_digest is not None:
            # Fed by the embedding pass; vectors handed in need a pass of its own.
            fingerprints["pool"] = stream_digest.fingerprint(column) if stream_digest.complete else _fingerprint(part, column)
        candidates, target_side = pool_emb, target_emb
        key_parts = (_digest(np.asarray(pool_emb)), _digest(np.asarray(target_emb)))
    timings["embed_s"] = time.perf_counter() - t
    n_local = len(candidates) if pool_emb is None else pool_emb.shape[0]
    offset, n_pool = comm.exclusive_offset(n_local)
    if pool_emb is not None:  # vectors handed in (or an encoder that overflowed): refused by every method, on every process
        _check_finite_vectors(pool_emb, target_emb, offset, comm, owner, "embeddings" if embeddings is not None else "dataset")
    if not probe.replaces and k > n_pool:
        raise param_error("k", owner, f"an int in [1, {n_pool}] (the pool's rows)", k)
    key_parts = (*key_parts, comm.rank, comm.world_size, _digest(np.concatenate(comm.all_gather(np.frombuffer(
        bytes.fromhex(_digest(*key_parts)), dtype=np.uint8)))))

    eligible = None
    reports: dict[str, Any] = {}
    extra_splits: dict[str, Dataset] = {}
    if extras["filters"]:
        t = time.perf_counter()
        eligible = _apply_filters(part, column, pool_emb, target_emb, extras, embed_kwargs, cache, seed, reports, extra_splits, fingerprints)
        timings["filters_s"] = time.perf_counter() - t
        n_eligible = int(eligible.sum())
        if n_eligible < (1 if probe.replaces else k):
            raise param_error("k", owner, f"at most the {n_eligible} rows left after pre-filter and decontamination", k)
        if n_eligible == n_pool:
            eligible = None
    keep_rows = np.arange(n_local, dtype=np.int64) if eligible is None else np.flatnonzero(eligible)
    if eligible is not None:  # one process (filters are refused for several): the eligible rows are the pool
        candidates = [candidates[i] for i in keep_rows] if probe.needs_text else np.asarray(candidates)[keep_rows]
        key_parts = (*key_parts, _digest(keep_rows))

    t = time.perf_counter()
    sub_scores, info = _scores_cached(selector, candidates, target_side, cache, key_parts, comm, use_cache=caching)
    sub_index = (offset + keep_rows) if eligible is None else np.arange(keep_rows.size, dtype=np.int64)
    if dedup_radius is not None:
        from .dedup import guarded_choose

        guard_emb = pool_emb if eligible is None else np.asarray(pool_emb)[keep_rows]  # each process's own rows
        indices, reports["dedup"] = guarded_choose(selector, sub_scores, k, seed=seed, candidates=guard_emb, radius=dedup_radius,
                                                   mode=dedup_mode, index=sub_index, comm=comm)
    else:
        indices = selector.choose_rows(sub_scores, k, seed=seed, index=sub_index, comm=comm)
    scores = np.full(n_local, np.nan)
    scores[keep_rows] = sub_scores
    if eligible is not None:  # back to pool rows: excluded rows are not scored (NaN)
        indices = keep_rows[indices]
    timings["score_s"] = time.perf_counter() - t
    result = SelectionResult(indices=indices, scores=scores, info=info)

    t = time.perf_counter()
    index = np.arange(offset, offset + n_local, dtype=np.int64)
    # This process's chosen rows: pool order, a drawn-again row once per draw.
    draw = np.flatnonzero((indices >= offset) & (indices < offset + n_local))
    draw = draw[np.lexsort((draw, indices[draw]))]
    local = indices[draw] - offset
    chosen_scores = comm.all_reduce(np.bincount(draw, weights=scores[local], minlength=indices.size)) if comm.world_size > 1 else scores[indices - offset]
    ranks = global_ranks(scores, index, chosen_scores, indices, comm)
    times = np.bincount(local, minlength=n_local).astype(np.int64)
    # Every input of the rows written: the pool's full content, the scores, the counts, the column name.
    fp = _digest("scored", _SCORES_CACHE_VERSION, fingerprints["pool"], scores, times, score_column)
    scored = _with_columns(part, offset, {score_column: scores, "selected": times}, fp)
    columns = {"rank": ranks[draw]}
    if selector.choice != "top_k":
        columns["draw_order"] = draw.astype(np.int64) + 1
    # The score stays where it is (the chosen rows' own); take_rows also gives a process with no
    # chosen row (or an empty shard) its empty table.
    selected = take_rows(scored, local, columns, drop=("selected",), fingerprint=_digest("selected", fp, local, *columns.values()))
    timings["build_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return SelectionRun(
        scored, selected, result, selector, pool_emb, target_emb, fingerprints, timings,
        prefilter=reports.get("prefilter"), decontamination=reports.get("decontamination"), dedup=reports.get("dedup"),
        extra_splits=extra_splits, comm=comm, offset=offset, n_pool=n_pool,
    )


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
    seed : int
        Seed of the random choices (sampling selectors, random baseline).
    cache_dir : str or PathLike or None
        Embedding and score cache; default ``$HF_DATASETS_CACHE/hf_otselect``. The same call twice
        reads both back instead of recomputing.
    embedding : dict or None
        Encoder settings passed to :func:`hf_otselect.embed` (``model``, ``revision``,
        ``batch_size``, ``max_length``, ``pooling``, ``normalize``, ``device``, ``num_proc``,
        ``trust_remote_code``, and ``shard_rows``: rows per cached shard, the unit a killed run
        resumes from). Each can also be given as a keyword argument of its own (below).
    model, revision, batch_size, max_length, pooling, normalize, num_proc, shard_rows, trust_remote_code
        The same encoder settings as keyword arguments (a Hub id or local folder for ``model``;
        None keeps the default). Giving one both here and in ``embedding`` with different values
        is an error.
    device : str or None
        Device of the encoder (``"cpu"``, ``"cuda"``, ``"cuda:1"``); None picks CUDA when present.
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
        rows with ``pool_index``, ``reason``, ``nearest_distance``) when those ran.
    """
    given = {"model": model, "revision": revision, "batch_size": batch_size, "max_length": max_length, "pooling": pooling,
             "normalize": normalize, "num_proc": num_proc, "shard_rows": shard_rows, "device": device,
             "trust_remote_code": trust_remote_code or None}  # False is the default, not a setting
    embedding = _merge_embedding(embedding, {key: v for key, v in given.items() if v is not None})
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
    if return_scored:
        return DatasetDict({"scored": run.scored, "selected": selected, **run.extra_splits})
    return selected


def best_first(selected: Dataset) -> Dataset:
    """The selected rows in the one order every output uses: best (or first drawn) first.

    ``select_by_ot``, the job's ``selected/`` split and the pushed dataset all hand rows back in
    this order, so nobody has to ``sort("rank")``. The key is ``draw_order`` for sampling selectors
    (1 = first drawn) and ``rank`` otherwise (1 = best score in the pool, ties to the lower index).
    A split without either column (not a selection) is returned unchanged.

    Parameters
    ----------
    selected : Dataset
        Chosen rows (``n_selected`` rows) with ``rank`` and, for sampling selectors, ``draw_order``.

    Returns
    -------
    Dataset
        The same ``n_selected`` rows, reordered; row contents and columns unchanged.
    """
    key = "draw_order" if "draw_order" in selected.column_names else "rank"
    if key not in selected.column_names:
        return selected
    order = np.argsort(np.asarray(selected[key]), kind="stable")
    if np.array_equal(order, np.arange(order.size)):
        return selected
    return take_rows(selected, order, fingerprint=_digest("best_first", selected._fingerprint))


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
