"""Reading and writing the splits of a selection: this process's rows, the scored and selected splits.

``shard_of`` cuts this process's rows out of the pool; :func:`with_columns` adds ``pool_index``
and per-row columns to them (the splits stage, :mod:`hf_otselect.stages.splits`, builds the
scored and selected splits with it); :func:`take_rows` gathers chosen rows as one Arrow table;
:func:`best_first` puts a selection in the one order every output uses.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from datasets import Dataset, IterableDataset

from ._checks import param_error
from .dist import Comm, shard_bounds
from .fingerprints import digest

__all__ = ["best_first", "quiet_bars", "shard_of", "take_rows", "with_columns"]


def shard_of(dataset: Dataset | IterableDataset, comm: Comm, owner: str) -> Dataset | IterableDataset:
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


quiet_bars = _QuietBars()


def with_columns(part: Dataset | IterableDataset, offset: int, columns: dict[str, np.ndarray], fingerprint: str) -> Dataset:
    """``part`` plus ``pool_index`` and the given per-row columns (a stream is read once more)."""
    if isinstance(part, IterableDataset):
        return Dataset.from_generator(_stream_rows, gen_kwargs={"pool": part, "offset": offset, "columns": columns}, fingerprint=fingerprint)
    with quiet_bars():  # a pool with an indices mapping is flattened by the first add_column
        out = part.add_column("pool_index", np.arange(offset, offset + len(part), dtype=np.int64))
        for name, values in columns.items():
            out = out.add_column(name, values)
    return out


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
    return take_rows(selected, order, fingerprint=digest("best_first", selected._fingerprint))
