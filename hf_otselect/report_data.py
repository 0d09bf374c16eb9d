"""What the report and the card read: reduced summaries and a bounded, keyed sample of the rows.

Computed where the rows live. Each process passes blocks of its own rows (:class:`RowBlock`) and
the processes' :class:`~hf_otselect.dist.Comm`; counts, extremes, histograms and per-value counts
are all-reduced, and at most ``sample_rows`` rows (with their vectors and texts) are all-gathered.
No process ever holds a per-row array of the whole pool, so memory does not grow with ``N``
beyond this process's own block.

The sample is two keyed samples, each row's key a uniform of ``(seed, global row index)``
(:func:`~hf_otselect.selectors.base.row_uniforms`), so the same rows come out for any number of
processes and for a job or a finished output folder:

- the *pool sample*: the rows with the smallest pool keys, a uniform sample of the pool;
- the *chosen sample*: the distinct selected rows with the smallest chosen keys, at most half of
  ``sample_rows`` (the pool sample gets the rest).

Each sampled row gets its exact rank (by score in the whole pool, 1 = best, ties to the lower
index, unscored last: the package's one tie rule) from all-reduced counts of better rows.

A job writes the result into ``<output_dir>/report_data/`` (:func:`save`); ``write_report`` reads
it (:func:`load`), or computes it from a finished folder with one process (:func:`from_folder`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_int
from .dist import LOCAL, Comm
from .selectors.base import row_uniforms
from .threshold import rows_above

__all__ = ["DEFAULT_SAMPLE_ROWS", "REPORT_DATA", "ReportData", "RowBlock", "dataset_blocks", "from_folder", "load", "pool_vector_files", "sample_keys", "save", "summarize"]

#: Rows the report's sample holds at most unless told otherwise (vectors, texts, scores, ranks).
DEFAULT_SAMPLE_ROWS = 20_000
REPORT_DATA = "report_data"
SUMMARY_FILE, VECTORS_FILE, TARGET_FILE = "summary.json", "vectors.npy", "target.npy"
HIST_BINS, CARD_BINS = 50, 10
#: Distinct values per report column one process sends; beyond, its rarest are pooled ("truncated").
MAX_CATEGORY_VALUES = 10_000
TEXT_CHARS = 400  # characters of a sampled row's text kept
BLOCK_ROWS = 65_536
_POOL_STREAM, _CHOSEN_STREAM = 31, 32  # key streams of the two samples (SeedSequence([seed, stream]))


@dataclass
class RowBlock:
    """A block of one process's rows.

    Attributes
    ----------
    index : ndarray of shape (b,), int64
        Global row indices (``pool_index``).
    score : ndarray of shape (b,), float64
        The rows' scores (NaN: unscored, e.g. removed by a filter).
    draws : ndarray of shape (b,), int64
        Times each row was chosen (0: not selected).
    columns : dict of str to list
        The report columns' values, ``b`` each.
    fetch : callable
        ``fetch(positions)`` -> ``(texts or None, vectors of shape (len(positions), dim) or None)`` for
        rows of this block (positions in ``[0, b)``): called only for sampled rows.
    """

    index: np.ndarray
    score: np.ndarray
    draws: np.ndarray
    columns: dict[str, list[Any]]
    fetch: Callable[[np.ndarray], tuple[list[str] | None, np.ndarray | None]]


@dataclass
class ReportData:
    """The reduced summaries (``summary``, JSON-able) and the sample's vectors, row-aligned with it.

    ``summary["sample"]`` holds per sampled row: ``pool_index``, ``score``, ``rank``, ``draws``,
    ``in_pool_sample``, ``in_chosen_sample``, ``text`` and ``columns``. ``vectors`` is
    ``(n_sample, dim)`` float32 or None (no vectors were available); ``target`` the target's
    vectors ``(m, dim)`` or None.
    """

    summary: dict[str, Any]
    vectors: np.ndarray | None
    target: np.ndarray | None


def _key_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def sample_keys(seed: int, index: np.ndarray, *, chosen: bool) -> np.ndarray:
    """The keys that drew rows into the pool sample (``chosen=False``) or the chosen sample: ``(n,)`` uniforms of (seed, index).

    The smallest keys of a sample are a uniform sub-sample of it, so a consumer that needs fewer
    rows (a plot, a solve) takes the rows with the smallest keys.
    """
    return row_uniforms(_key_seed(seed, _CHOSEN_STREAM if chosen else _POOL_STREAM), np.asarray(index, dtype=np.int64))


class _Smallest:
    """The ``cap`` rows with the smallest keys seen so far (key, index, score, draws): bounded memory."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.key = np.zeros(0)
        self.rows = np.zeros((0, 3))  # index, score, draws (exact in float64 up to 2**53 rows)

    def add(self, key: np.ndarray, index: np.ndarray, score: np.ndarray, draws: np.ndarray) -> None:
        self.key = np.concatenate([self.key, key])
        self.rows = np.concatenate([self.rows, np.stack([index, score, draws], axis=1).astype(np.float64)])
        if self.key.size > self.cap:
            keep = np.argpartition(self.key, self.cap - 1)[: self.cap] if self.cap else np.zeros(0, dtype=np.int64)
            self.key, self.rows = self.key[keep], self.rows[keep]

    def merged(self, comm: Comm, cap: int) -> np.ndarray:
        """The global ``cap`` smallest keys' rows (every process gets the same), sorted by index."""
        keys = np.concatenate(comm.all_gather(self.key))
        rows = np.concatenate(comm.all_gather(self.rows))
        keep = np.lexsort((rows[:, 0], keys))[:cap]
        rows = rows[keep]
        return rows[np.argsort(rows[:, 0], kind="stable")]


def _gather_json(comm: Comm, value: Any) -> list[Any]:
    data = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8)
    return [json.loads(bytes(part).decode("utf-8")) for part in comm.all_gather(data)]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float | None:
    """``np.median(np.repeat(values, weights))`` without the repeat (integer weights)."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    if not values.size:
        return None
    order = np.argsort(values, kind="stable")
    values, cum = values[order], np.cumsum(weights[order])
    total = int(cum[-1])
    lo, hi = (total - 1) // 2, total // 2
    return float((values[np.searchsorted(cum, lo, side="right")] + values[np.searchsorted(cum, hi, side="right")]) / 2)


def _category(value: Any) -> str:
    return "(missing)" if value is None else str(value)


def _cap_counts(counts: Counter) -> tuple[dict[str, int], int]:
    """At most :data:`MAX_CATEGORY_VALUES` values; the rows of the rest are returned as one number."""
    if len(counts) <= MAX_CATEGORY_VALUES:
        return dict(counts), 0
    kept = dict(counts.most_common(MAX_CATEGORY_VALUES))
    return kept, sum(counts.values()) - sum(kept.values())


def summarize(
    blocks: Callable[[], Iterator[RowBlock]],
    *,
    columns: Sequence[str] = (),
    seed: int = 0,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    comm: Comm | None = None,
    target: np.ndarray | None = None,
) -> ReportData:
    """Reduce a selection's rows to the report's summaries and keyed sample (every process calls this).

    Two passes over this process's blocks: the first reduces counts, extremes and per-value
    counts and keeps this process's candidates for the samples; the second, with the global
    extremes known, counts the histograms, the rows better than each sampled row, and reads the
    sampled rows' texts and vectors.

    Parameters
    ----------
    blocks : callable
        Returns a fresh iterator of this process's :class:`RowBlock` (called twice).
    columns : sequence of str
        Report columns whose per-value pool and selection counts are reduced.
    seed : int, default 0
        Seed of the samples' keys.
    sample_rows : int, default 20000
        Rows the sample holds at most (``>= 2``).
    comm : Comm, optional
        The processes sharing the rows (default: this one alone).
    target : ndarray of shape (m, dim), optional
        Kept with the result for the report.

    Returns
    -------
    ReportData
        The same on every process.
    """
    comm = comm or LOCAL
    sample_rows = check_int(sample_rows, "report_sample_rows", "the report", 2)
    pool_seed, chosen_seed = _key_seed(seed, _POOL_STREAM), _key_seed(seed, _CHOSEN_STREAM)
    pool_keep, chosen_keep = _Smallest(sample_rows), _Smallest(sample_rows // 2)
    sums = np.zeros(6)  # rows, scored rows, sum of scores, rows scoring 0, draws, distinct selected
    sel_sum = 0.0
    lows = np.full(2, np.inf)  # pool min, selected min
    highs = np.full(3, -np.inf)  # pool max, selected max, max of the unselected scored rows
    pool_counts = {c: Counter() for c in columns}
    sel_counts = {c: Counter() for c in columns}
    for b in blocks():
        finite = np.isfinite(b.score)
        sel = b.draws > 0
        f = b.score[finite]
        sums += [b.index.size, f.size, f.sum(), (b.score == 0).sum(), b.draws.sum(), sel.sum()]
        sel_sum += float((b.score[sel] * b.draws[sel]).sum())
        if f.size:
            lows[0], highs[0] = min(lows[0], f.min()), max(highs[0], f.max())
        if sel.any():
            lows[1], highs[1] = min(lows[1], b.score[sel].min()), max(highs[1], b.score[sel].max())
        if (finite & ~sel).any():
            highs[2] = max(highs[2], b.score[finite & ~sel].max())
        for c in columns:
            values = [_category(v) for v in b.columns[c]]
            pool_counts[c].update(values)
            for v, d in zip((values[i] for i in np.flatnonzero(sel)), b.draws[sel].tolist()):
                sel_counts[c][v] += d
        pool_keep.add(row_uniforms(pool_seed, b.index), b.index, b.score, b.draws)
        chosen_keep.add(row_uniforms(chosen_seed, b.index[sel]), b.index[sel], b.score[sel], b.draws[sel])
    sums = comm.all_reduce(sums, "sum")
    lows, highs = comm.all_reduce(lows, "min"), comm.all_reduce(highs, "max")
    n_rows, n_scored, total, n_zero, draws_total, distinct = (float(v) for v in sums)
    sel_sum = float(comm.all_reduce(np.array([sel_sum]), "sum")[0])
    composition: dict[str, Any] = {}
    for c in columns:
        parts = _gather_json(comm, [_cap_counts(pool_counts[c]), _cap_counts(sel_counts[c])])
        pool_c, sel_c, rest_rows = Counter(), Counter(), [0, 0]
        for (p, p_rest), (s, s_rest) in parts:
            pool_c.update(p)
            sel_c.update(s)
            rest_rows[0] += p_rest
            rest_rows[1] += s_rest
        composition[c] = {"pool": dict(sorted(pool_c.items())), "selected": dict(sorted(sel_c.items())), "pooled_rows": rest_rows}

    chosen = chosen_keep.merged(comm, sample_rows // 2)
    pooled = pool_keep.merged(comm, sample_rows - len(chosen))
    union = np.unique(np.concatenate([chosen[:, 0], pooled[:, 0]])).astype(np.int64)
    rows = np.concatenate([chosen, pooled])
    first = np.unique(rows[:, 0].astype(np.int64), return_index=True)[1]
    u_score, u_draws = rows[first, 1], rows[first, 2].astype(np.int64)
    in_chosen, in_pool = np.isin(union, chosen[:, 0].astype(np.int64)), np.isin(union, pooled[:, 0].astype(np.int64))

    edges = np.histogram_bin_edges(np.array([lows[0], highs[0]]), bins=HIST_BINS) if n_scored else np.zeros(0)
    card_edges = np.histogram_bin_edges(np.array([lows[1], highs[1]]), bins=CARD_BINS) if distinct and np.isfinite(lows[1]) else np.zeros(0)
    hist = np.zeros((2, HIST_BINS))  # pool, selected (by draws)
    at_or_above = np.zeros(1)  # scored rows at or above the lowest selected score (top-k's threshold)
    card = np.zeros(CARD_BINS)
    better = np.zeros(union.size, dtype=np.int64)
    ties = np.array([-1.0, -np.inf])  # max index of selected rows at the lowest selected score; -(min index of unselected at the top unselected score)
    got_index: list[np.ndarray] = []
    got_text: list[str | None] = []
    got_cols: dict[str, list[str]] = {c: [] for c in columns}
    vec_parts: list[np.ndarray] = []
    for b in blocks():
        finite = np.isfinite(b.score)
        sel = b.draws > 0
        if edges.size:
            hist[0] += np.histogram(b.score[finite], edges)[0]
            hist[1] += np.histogram(b.score[finite & sel], edges, weights=b.draws[finite & sel])[0]
            at_or_above += (b.score[finite] >= lows[1]).sum()
        if card_edges.size:
            card += np.histogram(b.score[sel], card_edges, weights=b.draws[sel])[0]
        at = sel & (b.score == lows[1])
        if at.any():
            ties[0] = max(ties[0], b.index[at].max())
        at = finite & ~sel & (b.score == highs[2])
        if at.any():
            ties[1] = max(ties[1], -b.index[at].min())
        better += rows_above(b.score, b.index, u_score, union)
        mine = np.flatnonzero(np.isin(b.index, union))
        if mine.size:
            t, v = b.fetch(mine)
            got_index.append(b.index[mine])
            got_text.extend([None if s is None else str(s)[:TEXT_CHARS] for s in t] if t is not None else [None] * mine.size)
            for c in columns:
                got_cols[c].extend(_category(b.columns[c][i]) for i in mine)
            vec_parts.append(np.asarray(v, dtype=np.float32) if v is not None else np.zeros((mine.size, 0), dtype=np.float32))
    hist = comm.all_reduce(hist, "sum")
    at_or_above = comm.all_reduce(at_or_above, "sum")
    card = comm.all_reduce(card, "sum")
    better = comm.all_reduce(better, "sum")
    ties = comm.all_reduce(ties, "max")

    # the sampled rows, gathered (at most sample_rows of them) and put in global index order
    local_index = np.concatenate(got_index) if got_index else np.zeros(0, dtype=np.int64)
    widths = comm.all_reduce(np.array([max((p.shape[1] for p in vec_parts), default=0)]), "max")
    width = int(widths[0])
    local_vec = (np.concatenate([p if p.shape[1] == width else np.zeros((p.shape[0], width), np.float32) for p in vec_parts])
                 if vec_parts else np.zeros((0, width), dtype=np.float32))
    all_index = np.concatenate(comm.all_gather(local_index.astype(np.int64)))
    meta = _gather_json(comm, {"text": got_text, "columns": got_cols})
    order = np.argsort(all_index, kind="stable")
    if not np.array_equal(all_index[order], union):
        raise RuntimeError("The report's sampled rows were not all found in the processes' blocks.")
    vectors = np.concatenate(comm.all_gather(local_vec))[order] if width else None
    text = [t for m in meta for t in m["text"]]
    values = {c: [v for m in meta for v in m["columns"][c]] for c in columns}
    sample = {
        "pool_index": union.tolist(), "score": u_score.tolist(), "rank": (better + 1).tolist(), "draws": u_draws.tolist(),
        "in_pool_sample": in_pool.tolist(), "in_chosen_sample": in_chosen.tolist(),
        "text": [text[i] for i in order], "columns": {c: [values[c][i] for i in order] for c in columns},
    }
    finite_or_none = lambda x: float(x) if np.isfinite(x) else None  # noqa: E731
    top_k = bool(draws_total == distinct and (highs[2] < lows[1] or (highs[2] == lows[1] and -ties[1] > ties[0])
                                              or not np.isfinite(highs[2])))
    summary = {
        "format": 1, "seed": seed, "sample_rows": sample_rows, "rows": int(n_rows), "scored_rows": int(n_scored),
        "score": {"min": finite_or_none(lows[0]), "max": finite_or_none(highs[0]), "sum": total,
                  "mean": total / n_scored if n_scored else None, "zero_rows": int(n_zero),
                  "hist_edges": edges.tolist(), "hist_pool": hist[0].astype(np.int64).tolist(),
                  "hist_selected": hist[1].astype(np.int64).tolist()},
        "selected": {"draws": int(draws_total), "distinct": int(distinct), "min": finite_or_none(lows[1]),
                     "max": finite_or_none(highs[1]), "mean": sel_sum / draws_total if draws_total else None,
                     "card_edges": card_edges.tolist(), "card_counts": card.astype(np.int64).tolist()},
        "choice": "top_k" if top_k else "sampled", "at_or_above_threshold": int(at_or_above[0]),
        "pool_sample_rows": int(in_pool.sum()), "chosen_sample_rows": int(in_chosen.sum()),
        "composition": composition, "sample": sample,
    }
    sc = np.asarray(sample["score"])
    summary["score"]["median"], summary["score"]["median_exact"] = _median_of(sc[in_pool], int(n_scored), int(n_rows))
    sel_med = _weighted_median(sc[in_chosen], u_draws[in_chosen])
    summary["selected"]["median"], summary["selected"]["median_exact"] = sel_med, bool(in_chosen.sum() == distinct)
    return ReportData(summary, vectors, None if target is None else np.asarray(target, dtype=np.float32))


def _median_of(pool_scores: np.ndarray, n_scored: int, n_rows: int) -> tuple[float | None, bool]:
    """The pool's median score: exact when the pool sample holds every row, else the sample's."""
    finite = pool_scores[np.isfinite(pool_scores)]
    if not finite.size:
        return None, False
    return float(np.median(finite)), bool(pool_scores.size == n_rows)


def save(data: ReportData, folder: str | Path) -> Path:
    """Write ``data`` into ``folder/report_data/`` (JSON and ``.npy``, no pickle); return that folder."""
    out = Path(folder) / REPORT_DATA
    out.mkdir(exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(data.summary, sort_keys=True) + "\n", encoding="utf-8")
    for name, array in ((VECTORS_FILE, data.vectors), (TARGET_FILE, data.target)):
        if array is not None:
            np.save(out / name, np.asarray(array, dtype=np.float32), allow_pickle=False)
        else:
            (out / name).unlink(missing_ok=True)
    return out


def load(folder: str | Path) -> ReportData | None:
    """The report data a job saved in ``folder`` (None when it saved none)."""
    base = Path(folder) / REPORT_DATA
    if not (base / SUMMARY_FILE).is_file():
        return None
    summary = json.loads((base / SUMMARY_FILE).read_text(encoding="utf-8"))
    arrays = [np.load(base / name, allow_pickle=False) if (base / name).is_file() else None for name in (VECTORS_FILE, TARGET_FILE)]
    return ReportData(summary, *arrays)


def pool_vector_files(folder: str | Path) -> list[Path]:
    """The saved pool vectors of an output folder: ``pool.npy``, or one ``pool-RANK-of-WORLD.npy`` per process in rank order."""
    emb = Path(folder) / "embeddings"
    if (emb / "pool.npy").is_file():
        return [emb / "pool.npy"]
    parts = sorted(emb.glob("pool-*-of-*.npy"))
    worlds = {p.stem.rsplit("-of-", 1)[1] for p in parts}
    if len(worlds) != 1 or len(parts) != int(next(iter(worlds))):
        return []  # none, or an incomplete set: the report says the vectors are missing
    return parts


class _Vectors:
    """Rows of several ``.npy`` files read as one array by global row, by positioned reads of those rows only.

    Not memory-mapped: the kernel's read-ahead and fault-around would map the neighbours of every
    row read into this process, so a sample spread over the pool would map most of the file.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths, shapes, self.offsets, self.dtypes = list(paths), [], [], []
        for path in self.paths:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                if fortran or len(shape) != 2:  # not a row-major matrix: refused as not matching the run
                    shape = (0, -1)
                shapes.append(shape)
                self.offsets.append(fh.tell())
                self.dtypes.append(np.dtype(dtype))
        self.starts = np.cumsum([0] + [s[0] for s in shapes])
        self.rows = int(self.starts[-1])
        dims = {s[1] for s in shapes}
        self.dim = int(dims.pop()) if len(dims) == 1 else -1

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (global) as ``(len(index), dim)`` float32."""
        index = np.asarray(index, dtype=np.int64)
        part = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((index.size, self.dim), dtype=np.float32)
        for p in np.unique(part):
            dtype, at = self.dtypes[p], np.flatnonzero(part == p)
            width = self.dim * dtype.itemsize
            fd = os.open(self.paths[p], os.O_RDONLY)
            try:
                for t in at:
                    raw = os.pread(fd, width, self.offsets[p] + int(index[t] - self.starts[p]) * width)
                    out[t] = np.frombuffer(raw, dtype=dtype)
            finally:
                os.close(fd)
        return out


def dataset_blocks(
    scored: Any, *, score_column: str, text_column: str | None, columns: Sequence[str] = (),
    vectors: Callable[[np.ndarray], np.ndarray] | None = None, draws_of: tuple[np.ndarray, np.ndarray] | None = None,
) -> Callable[[], Iterator[RowBlock]]:
    """Blocks of :data:`BLOCK_ROWS` rows of a scored split (a ``datasets.Dataset``, this process's rows).

    Parameters
    ----------
    scored : Dataset
        Rows with ``pool_index``, the score column and ``selected`` (times chosen).
    vectors : callable, optional
        ``vectors(global_index)`` -> ``(len, dim)`` float32: the rows' vectors, read only for sampled rows.
    draws_of : (ndarray, ndarray), optional
        ``(pool_index, times chosen)`` sorted by index, for splits without a ``selected`` column.
    """
    wanted = list(dict.fromkeys(["pool_index", score_column, *(["selected"] if draws_of is None else []), *columns]))

    def draws_by_index(index: np.ndarray) -> np.ndarray:
        assert draws_of is not None
        if not draws_of[0].size:
            return np.zeros(index.size, dtype=np.int64)
        pos = np.clip(np.searchsorted(draws_of[0], index), 0, draws_of[0].size - 1)
        return np.where(draws_of[0][pos] == index, draws_of[1][pos], 0).astype(np.int64)

    def blocks() -> Iterator[RowBlock]:
        for start in range(0, len(scored), BLOCK_ROWS):
            part = scored.select_columns(wanted).with_format("arrow")[start : start + BLOCK_ROWS]
            index = part.column("pool_index").to_numpy().astype(np.int64)
            draws = part.column("selected").to_numpy().astype(np.int64) if draws_of is None else draws_by_index(index)
            score = part.column(score_column).to_numpy(zero_copy_only=False).astype(np.float64)

            def fetch(pos: np.ndarray, start: int = start, index: np.ndarray = index) -> tuple[list[str] | None, np.ndarray | None]:
                texts = None
                if text_column is not None:  # this block's texts, read as one Arrow column; only the sampled rows decoded
                    column = scored.select_columns([text_column]).with_format("arrow")[start : start + BLOCK_ROWS].column(0)
                    texts = [None if t is None else str(t) for t in column.take(pos).to_pylist()]
                return texts, None if vectors is None else vectors(index[pos])

            yield RowBlock(index, score, draws, {c: part.column(c).to_pylist() for c in columns}, fetch)

    return blocks


def from_folder(
    folder: str | Path, *, score_column: str, text_column: str | None, columns: Sequence[str] = (), seed: int = 0,
    sample_rows: int = DEFAULT_SAMPLE_ROWS, notes: list[str] | None = None,
) -> ReportData:
    """Compute the report data of a finished output folder with this process alone, in bounded memory.

    ``scored/`` is read in blocks of :data:`BLOCK_ROWS` rows (memory-mapped Arrow), the saved pool
    vectors (``embeddings/pool.npy`` or the per-process ``pool-RANK-of-WORLD.npy``) memory-mapped and
    read only at the sampled rows. A ``notes`` list receives why vectors are left out, if they are.
    """
    from datasets import load_from_disk

    folder = Path(folder)
    scored = load_from_disk(str(folder / "scored"))
    draws_of = None
    if "selected" not in scored.column_names:  # folders written by hand or by old versions: count the selected split
        chosen = np.asarray(load_from_disk(str(folder / "selected")).with_format("numpy", columns=["pool_index"])[:]["pool_index"])
        draws_of = np.unique(chosen.astype(np.int64), return_counts=True)
    vectors: _Vectors | None = None
    files = pool_vector_files(folder)
    target_path = folder / "embeddings" / "target.npy"
    target = np.load(target_path, allow_pickle=False) if target_path.is_file() else None
    if files and target is not None:
        vectors = _Vectors(files)
        if vectors.rows != len(scored) or target.ndim != 2 or vectors.dim != target.shape[1]:
            if notes is not None:
                notes.append(f"The saved embeddings do not match the run (pool {vectors.rows} x {vectors.dim}, target "
                             f"{tuple(target.shape)}, {len(scored)} pool rows), so the embedding-based parts are left out.")
            vectors, target = None, None
    else:
        target = None
    if vectors is None and notes is not None and not any("embeddings" in n for n in notes):
        notes.append("No saved embeddings (embeddings/pool.npy or its per-process pool-RANK-of-WORLD.npy files, and "
                     "embeddings/target.npy; the job ran with save_embeddings: false and report: false), so the projection, "
                     "budget curve, near-duplicate rate, nearest target examples and transported mass are left out.")
    blocks = dataset_blocks(scored, score_column=score_column, text_column=text_column, columns=columns,
                            vectors=None if vectors is None else vectors.take, draws_of=draws_of)
    return summarize(blocks, columns=columns, seed=seed, sample_rows=sample_rows, target=target)
