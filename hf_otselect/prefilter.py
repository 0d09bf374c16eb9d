"""Source pre-filter: rank the pool's sources by OT distance to the target, keep the nearest.

Kang et al., "Get more for less", ICLR 2024 (set-up of the domain-adaptation experiments):
before the GOT-D selection proper, a sample of each candidate domain (10k rows) is compared with
the target by OT distance, and only the nearest domains (2 of 7) go on to the expensive selection.
The pool is then smaller, and rows from far-off sources cannot take the budget.

Here a *source* is the value of a column (``domain``, ``source``...) or one member of a
``DatasetDict`` / list of datasets (:func:`combine_sources` concatenates those into one
``Dataset`` with a column naming each row's source).

Two things keep the ranking from favouring large sources:

- **Debiased distance.** Each source is scored by the Sinkhorn divergence (Genevay et al. 2018;
  Feydy et al. 2019, "Interpolating between optimal transport and MMD using Sinkhorn divergences",
  Eq. 3): ``S(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2``, with ``OT_eps`` from
  :func:`hf_otselect.ot.ot_distance` (cost ``||x - y||^2``). The plain ``OT_eps`` is not zero
  between a cloud and itself, and its self-term depends on how many points the cloud has; ``S``
  removes it, is >= 0 and is 0 when the two samples are equal.
- **Equal-size samples.** Every source is compared on samples of the same number of rows,
  ``m = min(sample_size, smallest eligible source)``: an empirical OT value computed on fewer
  points is biased upward (its expectation falls as the sample grows), so a small source scored on
  all of its 100 rows loses against a large one scored on 10,000 even when it is the nearer one.
  A source larger than ``m`` is split into disjoint random chunks of ``m`` rows (at most
  ``sample_size`` rows and :data:`MAX_CHUNKS` chunks in all) and its divergence is the mean over
  the chunks: the bias is the same for every source (each estimate uses ``m`` rows) and the larger
  sources' extra rows lower the variance instead of the bias.

The random sample is keyed: each row's key comes from ``(seed, source, global row index)``
(:func:`hf_otselect.selectors.base.row_uniforms`), a source's sample is its rows with the smallest
keys, and its chunks follow key order. So the fit is the same for any number of processes and for a
streamed pool: the processes exchange per-source counts, keys and the sampled vectors only
(bounded by ``sample_size`` rows per source, not by the pool), and a row is kept when its source is.

No OT convention is handled here; the solver and its cost live in :mod:`hf_otselect.ot`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

from ._checks import check_embeddings, check_float, check_int, check_seed, param_error
from .dist import LOCAL, Comm, sum_counts
from .selectors.base import row_uniforms

logger = logging.getLogger(__name__)

__all__ = ["MAX_CHUNKS", "PREFILTER_KEYS", "PrefilterResult", "check_prefilter", "combine_sources", "prefilter_sources"]

#: Keys of the ``prefilter`` mapping accepted by :func:`hf_otselect.select_by_ot`, with defaults
#: (the paper's numbers: 10k rows sampled per source, the 2 nearest sources kept).
PREFILTER_KEYS: dict[str, Any] = {"keep": 2, "max_distance": None, "sample_size": 10_000, "eps": 0.1}

#: Most chunks of ``m`` rows averaged per source. Averaging c chunks divides the variance of a
#: source's estimate by about c; past 16 the gain is small next to the cost (two OT solves per
#: chunk), which matters when the smallest source is tiny and ``sample_size / m`` is large.
MAX_CHUNKS = 16


@dataclass(frozen=True)
class PrefilterResult:
    """The ranking of the sources and the rows it keeps.

    Attributes
    ----------
    sources : list of str
        Source names, nearest first (ties by name).
    distances : list of float
        Sinkhorn divergence of each source to the target (mean over its chunks), same order.
    rows : list of int
        Rows of each source in the pool (after any earlier exclusion), same order.
    sampled : list of int
        Rows of each source used for its distance (``chunks * chunk_rows``), same order.
    chunks : list of int
        Disjoint chunks of ``chunk_rows`` rows the divergence is averaged over, same order.
    kept : list of bool
        Whether each source goes on to the selection, same order.
    mask : ndarray of shape (n_local,), bool
        True for this process's rows of kept sources (eligible ones).
    params : dict
        ``keep``, ``max_distance``, ``sample_size``, ``eps``, ``seed`` as used, ``chunk_rows``
        (``m``, the rows of every sample) and ``distance`` (``"sinkhorn_divergence"``).
    rows_kept : int
        Eligible rows of the kept sources in the whole pool (every process's).
    """

    sources: list[str]
    distances: list[float]
    rows: list[int]
    sampled: list[int]
    chunks: list[int]
    kept: list[bool]
    mask: np.ndarray
    params: dict[str, Any]
    rows_kept: int

    @property
    def kept_sources(self) -> list[str]:
        """The kept sources, nearest first."""
        return [s for s, k in zip(self.sources, self.kept) if k]

    def keep(self, sources: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Per-row keep for any rows (a stream's batch, another shard): True where the source is kept.

        Parameters
        ----------
        sources : sequence of shape (n,)
            Each row's source (converted to ``str``).

        Returns
        -------
        ndarray of shape (n,), bool
        """
        return np.isin(np.asarray([str(s) for s in sources], dtype=object), self.kept_sources)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``selection.json`` records under ``prefilter``)."""
        ranking = [
            {"rank": i + 1, "source": s, "sinkhorn_divergence": d, "rows": r, "sampled": m, "chunks": c, "kept": k}
            for i, (s, d, r, m, c, k) in enumerate(zip(self.sources, self.distances, self.rows, self.sampled, self.chunks, self.kept))
        ]
        return {
            **self.params,
            "ranking": ranking,
            "kept_sources": self.kept_sources,
            "rows_kept": int(self.rows_kept),
        }

    def to_dataset(self) -> Dataset:
        """The ranking as a small ``Dataset`` (one row per source)."""
        return Dataset.from_list(self.to_dict()["ranking"])


def check_prefilter(prefilter: Any, owner: str) -> dict[str, Any]:
    """Validate a ``prefilter`` mapping up front and return it with defaults filled in.

    Unknown keys are refused; ``keep`` (int >= 1 or None), ``max_distance`` (float > 0 or None),
    ``sample_size`` (int >= 1) and ``eps`` (float > 0); at least one of ``keep`` and
    ``max_distance`` must be set.
    """
    if hasattr(prefilter, "__dataclass_fields__"):
        prefilter = asdict(prefilter)
    if not isinstance(prefilter, Mapping):
        raise param_error("prefilter", owner, f"None or a mapping with keys among {list(PREFILTER_KEYS)}", type(prefilter).__name__, exc=TypeError)
    unknown = sorted(set(prefilter) - set(PREFILTER_KEYS))
    if unknown:
        raise param_error("prefilter", owner, f"a mapping with keys among {list(PREFILTER_KEYS)}", unknown)
    opts = {**PREFILTER_KEYS, **prefilter}
    if opts["keep"] is not None:
        opts["keep"] = check_int(opts["keep"], "prefilter.keep", owner, 1)
    if opts["max_distance"] is not None:
        opts["max_distance"] = check_float(opts["max_distance"], "prefilter.max_distance", owner, 0.0, low_open=True)
    if opts["keep"] is None and opts["max_distance"] is None:
        raise param_error("prefilter", owner, "a mapping that sets 'keep' or 'max_distance' (or both)", dict(prefilter))
    opts["sample_size"] = check_int(opts["sample_size"], "prefilter.sample_size", owner, 1)
    opts["eps"] = check_float(opts["eps"], "prefilter.eps", owner, 0.0, low_open=True)
    return opts


def combine_sources(sources: DatasetDict | Sequence[Dataset], column: str = "source") -> Dataset:
    """Concatenate several datasets into one pool with a column naming each row's source.

    Parameters
    ----------
    sources : DatasetDict or sequence of Dataset
        One dataset per source; a ``DatasetDict``'s split names become the source names, a list's
        members are named ``"0"``, ``"1"``...
    column : str
        Name of the added source column; it must not exist in any member.

    Returns
    -------
    Dataset
        The members in order (``pool_index`` of a selection points into this concatenation).
    """
    owner = "combine_sources"
    if isinstance(sources, DatasetDict):
        named = list(sources.items())
    elif isinstance(sources, Sequence) and not isinstance(sources, (str, bytes)) and all(isinstance(d, Dataset) for d in sources):
        named = [(str(i), d) for i, d in enumerate(sources)]
    else:
        raise param_error("dataset", owner, "a DatasetDict or a list of Dataset", type(sources).__name__, exc=TypeError)
    if not named:
        raise param_error("dataset", owner, "at least one source", "none")
    parts = []
    for name, data in named:
        if column in data.column_names:
            raise param_error("source_column", owner, f"a name not already in source {name!r}'s columns {data.column_names}", column)
        parts.append(data.add_column(column, [name] * len(data)))
    return concatenate_datasets(parts)


def _source_key(seed: int, name: str) -> int:
    # One key stream per source, from the seed and the source's name: a row's key depends on
    # (seed, source, global index) alone, so every process (and a stream) draws the same sample.
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]).generate_state(1, np.uint64)[0])


def _target_sample(target: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The target rows every source is compared with: all of them, or ``size`` seeded ones (in order)."""
    if len(target) <= size:
        return target
    rng = np.random.default_rng([seed, zlib.crc32(b"\x00target")])
    return target[np.sort(rng.choice(len(target), size, replace=False))]


def _smallest_keys(keys: np.ndarray, index: np.ndarray, want: int) -> np.ndarray:
    """Positions of the ``want`` smallest ``(key, global index)`` pairs, in that order."""
    return np.lexsort((index, keys))[:want]


def prefilter_sources(
    candidates: np.ndarray,
    sources: Sequence[Any] | np.ndarray,
    target: np.ndarray,
    *,
    keep: int | None = 2,
    max_distance: float | None = None,
    sample_size: int = 10_000,
    eps: float = 0.1,
    seed: int = 0,
    eligible: np.ndarray | None = None,
    index: np.ndarray | None = None,
    comm: Comm | None = None,
    **ot_kwargs: Any,
) -> PrefilterResult:
    """Rank sources by their Sinkhorn divergence to the target on equal-size samples; keep the nearest.

    ``S(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2`` (Feydy et al. 2019, Eq. 3), each
    source on disjoint chunks of ``m = min(sample_size, smallest eligible source)`` rows, averaged
    (see the module docstring for why both).

    A fit over this process's rows and a per-row keep. Each eligible row of source ``s`` gets the
    key ``row_uniforms(key(seed, s), global index)``; a source's sample is its rows with the
    smallest keys (ties to the lower index), cut into chunks in key order. The processes exchange
    only per-source counts, the sampled keys and the sampled vectors (at most ``sample_size`` rows
    per source): the same sample, distances and kept sources for any number of processes and for
    a streamed pool, whose rows are read once. The OT solves are spread over the processes and
    their values all-reduced, so every process takes the same decision.

    Parameters
    ----------
    candidates : ndarray of shape (n_local, dim)
        This process's pool embeddings (an array or ``np.memmap``; a process may have none).
    sources : sequence of shape (n_local,)
        Source of each row (converted to ``str``).
    target : ndarray of shape (n_target, dim)
        Target embeddings, the same on every process; a target larger than ``sample_size`` is
        sampled (without replacement, seeded). The same target sample serves every source.
    keep : int or None, default 2
        Keep the ``keep`` nearest sources (paper: 2 of 7).
    max_distance : float or None
        Keep only sources whose divergence is at most this. With ``keep`` too, both must hold.
    sample_size : int, default 10_000
        Most rows used per source (paper: 10k). Every chunk has ``min(sample_size, smallest
        eligible source)`` rows; at most :data:`MAX_CHUNKS` chunks per source.
    eps : float, default 0.1
        Entropic regularisation of :func:`hf_otselect.ot.ot_distance` (absolute).
    seed : int
        Seeds the per-source samples.
    eligible : ndarray of shape (n_local,), bool, optional
        Rows allowed at all (e.g. after decontamination); others are neither sampled nor kept, and
        do not count towards the smallest source.
    index : ndarray of shape (n_local,), int, optional
        Global row index of each local row (default: this process's rows follow the lower ranks').
    comm : Comm, optional
        The processes sharing the pool (default: this one alone).
    **ot_kwargs
        Further keywords of :func:`hf_otselect.ot.ot_distance` (``tol``, ``max_iter``, ``backend``...).

    Returns
    -------
    PrefilterResult
        The same ranking on every process; ``mask`` covers this process's rows.
    """
    from .ot import ot_distance

    owner = "prefilter_sources"
    comm = comm or LOCAL
    target = check_embeddings(target, "target", owner)
    dim = target.shape[1]
    n = len(candidates)
    candidates = check_embeddings(candidates, "candidates", owner, dim=dim) if n else np.zeros((0, dim), dtype=np.float32)
    opts = check_prefilter({"keep": keep, "max_distance": max_distance, "sample_size": sample_size, "eps": eps}, owner)
    seed = check_seed(seed, "seed", owner)
    labels = np.asarray([str(s) for s in sources], dtype=object)
    if labels.shape != (n,):
        raise param_error("sources", owner, f"one label per candidate ({n})", f"{labels.size} labels")
    eligible = np.ones(n, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    if index is None:
        index = comm.exclusive_offset(n)[0] + np.arange(n, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    members = {name: np.flatnonzero((labels == name) & eligible) for name in sorted(set(labels[eligible].tolist()))}
    rows = sum_counts({name: idx.size for name, idx in members.items()}, comm)
    names = list(rows)
    if not names:
        raise param_error("candidates", owner, "at least one eligible row", "none")
    size = opts["sample_size"]
    m = min(size, min(rows.values()))
    if m < size:
        logger.info("prefilter: every source is compared on chunks of %d rows (the smallest eligible source's size)", m)
    chunks = {name: min(min(rows[name], size) // m, MAX_CHUNKS) for name in names}

    # Each process's candidates for every source's sample: its own smallest keys (a superset of its
    # share of the global cut), then the global cut from the gathered (source, key, index) triples.
    mine = []
    for j, name in enumerate(names):
        if name in members:
            key = row_uniforms(_source_key(seed, name), index[members[name]])
            sel = _smallest_keys(key, index[members[name]], chunks[name] * m)
            mine.append(np.column_stack([np.full(sel.size, j, np.float64), key[sel], index[members[name][sel]].astype(np.float64)]))
    triples = np.concatenate(comm.all_gather(np.concatenate(mine) if mine else np.zeros((0, 3))))
    sample = {}  # source -> its sampled global rows, in key order
    for j, name in enumerate(names):
        t = triples[triples[:, 0] == j]
        sample[name] = t[_smallest_keys(t[:, 1], t[:, 2], chunks[name] * m), 2].astype(np.int64)
    local = np.flatnonzero(np.isin(index, np.concatenate(list(sample.values()))))
    gathered_index = np.concatenate(comm.all_gather(index[local]))
    gathered = np.concatenate(comm.all_gather(np.ascontiguousarray(candidates[local], dtype=np.float32)))
    where = dict(zip(gathered_index.tolist(), range(gathered_index.size)))

    tgt = _target_sample(target, size, seed)
    samples: list[tuple[str, np.ndarray]] = []  # (source, one chunk's vectors, rows in index order)
    for name in names:
        for c in range(chunks[name]):
            chunk = np.sort(sample[name][c * m : (c + 1) * m])
            samples.append((name, gathered[[where[i] for i in chunk.tolist()]]))

    def ot(x: np.ndarray, y: np.ndarray) -> float:
        return float(ot_distance(x, y, eps=opts["eps"], **ot_kwargs))

    # Solve j runs on process j % world; the others add 0.0, so every process gets the same values.
    tasks = [(tgt, tgt)] + [pair for _, x in samples for pair in ((x, tgt), (x, x))]
    values = np.zeros(len(tasks))
    for j, (x, y) in enumerate(tasks):
        if j % comm.world_size == comm.rank:
            values[j] = ot(x, y)
    values = comm.all_reduce(values) if comm.world_size > 1 else values
    tgt_self = values[0]
    divergence: dict[str, list[float]] = {name: [] for name in names}
    for c, (name, _) in enumerate(samples):
        divergence[name].append(values[1 + 2 * c] - 0.5 * (values[2 + 2 * c] + tgt_self))
    dist = {name: float(np.mean(v)) for name, v in divergence.items()}
    for name in names:
        logger.info("prefilter: source %r, %d rows, Sinkhorn divergence %.4g (mean of %d chunks of %d rows)", name, rows[name], dist[name], chunks[name], m)
    order = sorted(names, key=lambda s: (dist[s], s))
    kept = [
        (opts["keep"] is None or i < opts["keep"]) and (opts["max_distance"] is None or dist[s] <= opts["max_distance"])
        for i, s in enumerate(order)
    ]
    kept_sources = [s for s, k in zip(order, kept) if k]
    mask = np.isin(labels, kept_sources) & eligible
    return PrefilterResult(
        sources=order, distances=[dist[s] for s in order], rows=[rows[s] for s in order],
        sampled=[chunks[s] * m for s in order], chunks=[chunks[s] for s in order], kept=kept, mask=mask,
        params={**opts, "seed": seed, "chunk_rows": int(m), "distance": "sinkhorn_divergence"},
        rows_kept=sum(rows[s] for s in kept_sources),
    )
