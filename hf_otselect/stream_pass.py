"""One pass over a stream: a fitted selector scores, filters and writes the rows it keeps.

A pool of any length (an ``IterableDataset``, a ``Dataset`` or any iterable of dict rows) is read
once, in batches: each batch is embedded (or its vector column read), scored by
:meth:`~hf_otselect.fitted.FittedSelector.score_rows` and filtered by the predicate of
:meth:`~hf_otselect.fitted.FittedSelector.keep`, and only the kept rows go on. Nothing per row is
held but the batch in hand and the kept rows not yet written, so memory does not grow with the
pool. A stream has no known length, so the rows are kept by a threshold decided row by row:
``threshold=`` on the key (the score for top-k methods), or ``fraction=``, the threshold at which
the fit's calibration keeps that fraction of the fit rows (about that fraction of a stream
distributed like them). An exact ``k`` best needs every score first and is refused here.

- :func:`select_stream` (and :meth:`FittedSelector.select`) returns the lazy ``IterableDataset``
  ``pool.map(fitted, batched=True, with_indices=True).filter(keep, batched=True, with_indices=True)``.
- :class:`StreamPass` iterates the kept rows as Arrow tables and counts the rows it has seen.
- :func:`write_selected` writes them as Parquet shards into an output folder, with
  ``summary.json``, whole or not at all (:class:`~hf_otselect.outdir.OutputFolder`)::

      <output_dir>/data/train-00000.parquet ...   the kept rows + score column + pool_index
      <output_dir>/summary.json                    rows seen and kept, threshold, selector fingerprint

  ``datasets.load_dataset(output_dir, split="train")`` reads the kept rows back.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import check_float, check_int, param_error, short_repr

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import IterableDataset

    from .fitted import FittedSelector, Keep

logger = logging.getLogger(__name__)

__all__ = ["INDEX_COLUMN", "StreamPass", "select_stream", "write_selected"]

#: The column :func:`write_selected` adds: each kept row's position in the pool (0-based).
INDEX_COLUMN = "pool_index"
SUMMARY_FILE = "summary.json"
DATA_FOLDER = "data"


def _keep_of(fitted: FittedSelector, k: Any, fraction: Any, threshold: Any, owner: str) -> Keep:
    """The row-by-row predicate of a single pass: ``fraction=`` or ``threshold=``, never ``k=``."""
    if k is not None:
        raise param_error("k", owner, "None: one pass over a stream of unknown length cannot know its k best rows (use fraction=, "
                          "kept by the fit's calibration, or threshold=; an exact top-k of a Dataset is "
                          "ds.filter(fitted.keep(k=..., scores=...)))", k)
    given = [name for name, v in (("fraction", fraction), ("threshold", threshold)) if v is not None]
    if len(given) != 1:
        raise param_error("fraction/threshold", owner, "exactly one of them", given or None)
    if fraction is not None:
        return fitted.keep(fraction=check_float(fraction, "fraction", owner, 0.0, 1.0, low_open=True))
    return fitted.keep(threshold=check_float(threshold, "threshold", owner))


def _check_fit_pool(fitted: FittedSelector, pool: Any, owner: str) -> None:
    """TSDS and round-robin scores are looked up by fit row: only the fit pool itself may be passed."""
    from .fitted import OUT_OF_FIT

    if not fitted.index_bound:
        return
    fit_pool = fitted.fit_info.get("pool_fingerprint")
    if fit_pool is None or getattr(pool, "_fingerprint", None) != fit_pool:
        raise param_error("pool", owner, f"the very Dataset this {fitted.method!r} selector was fitted on: its scores are looked up by "
                          f"the rows its fit saw, and a row outside the fit has none ({OUT_OF_FIT})",
                          f"a pool with fingerprint {getattr(pool, '_fingerprint', None)}")


def _read_columns(fitted: FittedSelector) -> list[str]:
    """The columns the score of a row reads: texts, a vector column, or none (random)."""
    if fitted.selector.needs_text:
        return [fitted.column]
    if not fitted.selector.needs_vectors:
        return []
    return [fitted.vector_column or fitted.column]


def _check_columns(fitted: FittedSelector, names: list[str] | None, added: tuple[str, ...], owner: str) -> None:
    """The pool has the columns the score reads and none of those the pass adds (known names only)."""
    if names is None:
        return
    for name in _read_columns(fitted):
        if name not in names:
            raise ValueError(f"Column {short_repr(name)} not in the pool. Current columns: {names}")
    for name in added:
        if name in names:
            raise param_error("score_column" if name == fitted.score_column else "pool", owner,
                              f"a column name the pool does not have ({name!r} would be overwritten; "
                              "rename it, or pick another score column with fitted.using(score_column=...))", name)


def _pool_names(pool: Any) -> list[str] | None:
    from datasets import Dataset, IterableDataset

    if isinstance(pool, (Dataset, IterableDataset)):
        return pool.column_names
    return None


def select_stream(fitted: FittedSelector, pool: Any, *, fraction: float | None = None, threshold: float | None = None,
                  k: int | None = None, batch_size: int = 1000) -> IterableDataset:
    """The rows of ``pool`` a fitted selector keeps, lazily, in one pass.

    Parameters
    ----------
    fitted : FittedSelector
    pool : Dataset or IterableDataset
        Rows with the selector's text column (or its vector column, ``(dim,)`` per row).
    fraction : float in (0, 1], optional
        Keep the rows at or above the calibrated threshold of this fraction of the fit rows
        (:meth:`FittedSelector.calibrated_threshold`): about this fraction of a stream distributed
        like the fit rows.
    threshold : float, optional
        Keep the rows whose key (:func:`~hf_otselect.fitted.choice_keys`) is at least this.
    k : None
        Refused: a single pass over a stream of unknown length cannot know its ``k`` best rows.
    batch_size : int
        Rows embedded and scored together.

    Returns
    -------
    IterableDataset
        ``pool.map(fitted, batched=True, with_indices=True).filter(fitted.keep(...), batched=True,
        with_indices=True)``: the kept rows with the score column, in pool order; nothing is
        read until it is iterated.
    """
    from datasets import Dataset, IterableDataset

    owner = "FittedSelector.select"
    keep = _keep_of(fitted, k, fraction, threshold, owner)
    batch_size = check_int(batch_size, "batch_size", owner, 1)
    if not isinstance(pool, (Dataset, IterableDataset)):
        raise param_error("pool", owner, "a Dataset or IterableDataset (for any iterable of dict rows, use StreamPass or "
                          "write_selected)", type(pool).__name__, exc=TypeError)
    _check_fit_pool(fitted, pool, owner)
    _check_columns(fitted, pool.column_names, (fitted.score_column,), owner)
    stream = pool.to_iterable_dataset() if isinstance(pool, Dataset) else pool
    scored = stream.map(fitted, batched=True, batch_size=batch_size, with_indices=True)
    return scored.filter(keep, batched=True, batch_size=batch_size, with_indices=True)


class StreamPass:
    """One pass of a fitted selector over a pool: iterate it for the kept rows, batch by batch.

    Every argument is checked when the pass is built, before any row is read. Iterating yields
    ``pyarrow.Table`` batches of the kept rows (every pool column, then the score column and
    :data:`INDEX_COLUMN`), in pool order; :attr:`rows_seen` and :attr:`rows_kept` count as it goes.
    A pass can be iterated once.

    Parameters
    ----------
    fitted : FittedSelector
    pool : Dataset, IterableDataset or iterable of dict
        Any iterable of rows (dicts with the same keys) is read in batches of ``batch_size``.
    fraction, threshold, k
        As in :func:`select_stream` (exactly one of ``fraction`` and ``threshold``).
    batch_size : int
        Rows embedded and scored together.
    device : str, optional
        Where to embed and score (default: the selector's, or CUDA when present).

    Attributes
    ----------
    keep : Keep
        The predicate; ``keep.threshold`` is the key threshold used.
    rows_seen, rows_kept : int
    """

    def __init__(self, fitted: FittedSelector, pool: Any, *, fraction: float | None = None, threshold: float | None = None,
                 k: int | None = None, batch_size: int = 1000, device: str | None = None, owner: str = "StreamPass") -> None:
        from datasets import Dataset, IterableDataset

        self.keep = _keep_of(fitted, k, fraction, threshold, owner)
        self.batch_size = check_int(batch_size, "batch_size", owner, 1)
        if isinstance(pool, (str, bytes, dict)) or not isinstance(pool, (Dataset, IterableDataset, Iterable)):
            raise param_error("pool", owner, "a Dataset, IterableDataset or iterable of dict rows", type(pool).__name__, exc=TypeError)
        _check_fit_pool(fitted, pool, owner)
        self.names = _pool_names(pool)
        _check_columns(fitted, self.names, (fitted.score_column, INDEX_COLUMN), owner)
        self.fitted, self.pool, self.device, self.owner = fitted, pool, device or fitted.device, owner
        self.features = getattr(pool, "features", None)
        self.rows_seen = self.rows_kept = 0
        self._started = False

    def _batches(self) -> Iterator[pa.Table]:
        import pyarrow as pa
        from datasets import Dataset, IterableDataset

        if isinstance(self.pool, (Dataset, IterableDataset)):
            yield from self.pool.with_format("arrow").iter(batch_size=self.batch_size)
            return
        rows = iter(self.pool)
        schema = None
        while chunk := list(itertools.islice(rows, self.batch_size)):
            if not all(isinstance(r, dict) for r in chunk):
                bad = next(r for r in chunk if not isinstance(r, dict))
                raise param_error("pool", self.owner, "an iterable of dict rows", f"a row of type {type(bad).__name__}", exc=TypeError)
            if schema is None:
                table = pa.Table.from_pylist(chunk)
                schema = table.schema
                self.names = table.column_names
                _check_columns(self.fitted, self.names, (self.fitted.score_column, INDEX_COLUMN), self.owner)
            else:
                try:
                    table = pa.Table.from_pylist(chunk, schema=schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as err:
                    raise param_error("pool", self.owner, f"rows of one shape (the first rows' columns {schema.names})",
                                      f"a row near position {self.rows_seen} ({' '.join(str(err).split())})") from None
            yield table

    def _rows(self, table: pa.Table) -> Any:
        """What the selector scores: the batch's texts, its vectors ``(b, dim)``, or nothing (random)."""
        fitted = self.fitted
        names = _read_columns(fitted)
        if not names:
            return np.zeros((table.num_rows, 0), dtype=np.float32)
        name = names[0]
        if name not in table.column_names:
            raise ValueError(f"Column {short_repr(name)} not in the pool. Current columns: {table.column_names}")
        if fitted.selector.needs_text or fitted.vector_column is None:
            return fitted._rows_of({name: table.column(name).to_pylist()}, self.device)
        return vectors_of_column(table.column(name), name, fitted.fit_info.get("dim"), self.rows_seen, self.owner)

    def __iter__(self) -> Iterator[pa.Table]:
        import pyarrow as pa

        if self._started:
            raise RuntimeError("A StreamPass is iterated once; build another for a second pass.")
        self._started = True
        for table in self._batches():
            if self.names is None:  # a stream that declares no columns: its first batch tells
                self.names = table.column_names
                _check_columns(self.fitted, self.names, (self.fitted.score_column, INDEX_COLUMN), self.owner)
            n = table.num_rows
            index = np.arange(self.rows_seen, self.rows_seen + n, dtype=np.int64)
            scores = self.fitted.score_rows(self._rows(table), index, device=self.device)
            mask = np.asarray(self.keep({self.fitted.score_column: scores}, index), dtype=bool)
            self.rows_seen += n
            if not mask.any():
                continue
            kept = table.filter(pa.array(mask))
            kept = kept.append_column(self.fitted.score_column, pa.array(scores[mask], type=pa.float64()))
            kept = kept.append_column(INDEX_COLUMN, pa.array(index[mask], type=pa.int64()))
            self.rows_kept += kept.num_rows
            yield kept


def vectors_of_column(column: pa.ChunkedArray | pa.Array, name: str, dim: int | None, offset: int, owner: str) -> np.ndarray:
    """A list column of one batch as float32 ``(b, dim)``: every row a vector of the fit's width.

    Parameters
    ----------
    column : pyarrow (chunked) array of list, large_list or fixed_size_list of numbers
    name : str
        The column's name (for messages).
    dim : int or None
        The fit's width (None: the first row's).
    offset : int
        The batch's first pool position (messages name the row).
    owner : str

    Returns
    -------
    ndarray of shape (b, dim), float32
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type)) or not (
        pa.types.is_floating(array.type.value_type) or pa.types.is_integer(array.type.value_type)
    ):
        raise param_error(name, owner, "a column of number lists (one vector per row)", f"a column of type {array.type}")
    if array.null_count:
        first = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise param_error(name, owner, "a vector in every row", f"no vector at pool row {offset + first}")
    n = len(array)
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if dim is None else int(dim)
    wrong = np.flatnonzero(lengths != width)
    if wrong.size:
        row = int(wrong[0])
        raise param_error(name, owner, f"vectors of the fit's width {width} in every row", f"{int(lengths[row])} numbers at pool row {offset + row}")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(n, width)


def _output_features(features: Any, score_column: str) -> Any:
    """The pool's features plus the score and index columns (None when the pool declares none)."""
    if features is None:
        return None
    from datasets import Features, Value

    return Features({**features, score_column: Value("float64"), INDEX_COLUMN: Value("int64")})


def write_selected(fitted: FittedSelector, pool: Any, output_dir: str | os.PathLike, *, fraction: float | None = None,
                   threshold: float | None = None, k: int | None = None, batch_size: int = 1000, shard_rows: int = 100_000,
                   overwrite: bool = False, device: str | None = None, source: str | None = None) -> dict[str, Any]:
    """Apply a fitted selector to a pool in one pass and write the kept rows as Parquet shards.

    The output folder is written aside and put in place only when complete (see
    :mod:`hf_otselect.outdir`: never a half-written output, one writer at a time, only a folder
    this package wrote is replaced, and only with ``overwrite``). A rerun after a crash starts the
    pass again. Memory holds one batch, whatever the pool's length: the kept rows of each batch go
    straight into the open shard (one Parquet row group each).

    Parameters
    ----------
    fitted : FittedSelector
    pool : Dataset, IterableDataset or iterable of dict
    output_dir : str or PathLike
    fraction, threshold, k, batch_size, device
        As in :class:`StreamPass`.
    shard_rows : int
        Kept rows per Parquet file.
    overwrite : bool
        Replace an existing output this package wrote.
    source : str, optional
        How the summary names the pool (e.g. its path).

    Returns
    -------
    dict
        The summary written to ``summary.json``: ``rows_seen``, ``rows_kept``, ``fraction``,
        ``threshold`` (the key threshold used), ``selector`` (method, fingerprint, ...), the
        shard files and the seconds taken.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import __version__
    from .outdir import OutputFolder

    owner = "write_selected"
    shard_rows = check_int(shard_rows, "shard_rows", owner, 1)
    folder = OutputFolder(output_dir, overwrite=bool(overwrite), owner=owner)
    run = StreamPass(fitted, pool, fraction=fraction, threshold=threshold, k=k, batch_size=batch_size, device=device, owner=owner)
    folder.check()
    features = _output_features(run.features, fitted.score_column)
    started = time.perf_counter()
    with folder.locked():
        partial = folder.begin()
        data = partial / DATA_FOLDER
        data.mkdir()
        shards: list[str] = []
        # Each kept batch goes straight into the open shard's writer: holding kept batches until a
        # shard is full made the process's memory grow with the rows read (allocator pages pinned).
        shard: dict[str, Any] = {"writer": None, "rows": 0}

        def close() -> None:
            shard["writer"].close()
            name = f"train-{len(shards):05d}.parquet"
            os.replace(data / f".{name}.tmp", data / name)
            shards.append(f"{DATA_FOLDER}/{name}")
            shard.update(writer=None, rows=0)

        def write(table: pa.Table) -> None:
            table = table.cast(features.arrow_schema) if features is not None else table.replace_schema_metadata(None)
            while True:
                if shard["writer"] is None:
                    shard["writer"] = pq.ParquetWriter(data / f".train-{len(shards):05d}.parquet.tmp", table.schema)
                take = min(shard_rows - shard["rows"], table.num_rows)
                shard["writer"].write_table(table.slice(0, take))
                shard["rows"] += take
                table = table.slice(take)
                if shard["rows"] == shard_rows:
                    close()
                if not table.num_rows:
                    return

        empty: pa.Table | None = _empty_table(features)
        for table in run:
            empty = table.slice(0, 0)
            write(table)
        if shard["writer"] is not None:
            close()
        elif not shards and empty is not None:  # no row kept: one empty file with the columns
            write(empty)
            close()
        elapsed = time.perf_counter() - started
        summary = {
            "rows_seen": run.rows_seen, "rows_kept": run.rows_kept,
            "kept_fraction": run.rows_kept / run.rows_seen if run.rows_seen else None,
            "fraction": fraction, "threshold": run.keep.threshold,
            "selector": {"method": fitted.method, "fingerprint": fitted.fingerprint, "choice": fitted.choice, "seed": run.keep.seed,
                         "n_fit": fitted.fit_info["n_fit"], "target_fingerprint": fitted.fit_info["target_fingerprint"],
                         "reads": _read_columns(fitted), "score_column": fitted.score_column},
            "pool": source, "batch_size": run.batch_size, "shards": shards, "seconds": round(elapsed, 3),
            "hf_otselect_version": __version__,
        }
        (partial / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        final = folder.commit()
    logger.info("Kept %d of %d rows (threshold %s) in %s", run.rows_kept, run.rows_seen, run.keep.threshold, final)
    return summary


def _empty_table(features: Any) -> pa.Table | None:
    """A table of no rows with the output's columns (None when the pool declares no features)."""
    return None if features is None else features.arrow_schema.empty_table()

