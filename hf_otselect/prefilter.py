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
    mask : ndarray of shape (n_candidates,), bool
        True for the rows of kept sources.
    params : dict
        ``keep``, ``max_distance``, ``sample_size``, ``eps``, ``seed`` as used, ``chunk_rows``
        (``m``, the rows of every sample) and ``distance`` (``"sinkhorn_divergence"``).
    """

    sources: list[str]
    distances: list[float]
    rows: list[int]
    sampled: list[int]
    chunks: list[int]
    kept: list[bool]
    mask: np.ndarray
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``selection.json`` records under ``prefilter``)."""
        ranking = [
            {"rank": i + 1, "source": s, "sinkhorn_divergence": d, "rows": r, "sampled": m, "chunks": c, "kept": k}
            for i, (s, d, r, m, c, k) in enumerate(zip(self.sources, self.distances, self.rows, self.sampled, self.chunks, self.kept))
        ]
        return {
            **self.params,
            "ranking": ranking,
            "kept_sources": [s for s, k in zip(self.sources, self.kept) if k],
            "rows_kept": int(self.mask.sum()),
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


def _source_seed(seed: int, name: str) -> np.random.Generator:
    # One generator per source, keyed by its name: adding or dropping another source leaves this
    # source's sample unchanged, and the result does not depend on the order sources appear in.
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


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
    **ot_kwargs: Any,
) -> PrefilterResult:
    """Rank sources by their Sinkhorn divergence to the target on equal-size samples; keep the nearest.

    ``S(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2`` (Feydy et al. 2019, Eq. 3), each
    source on disjoint chunks of ``m = min(sample_size, smallest eligible source)`` rows, averaged
    (see the module docstring for why both).

    Parameters
    ----------
    candidates : ndarray of shape (n_candidates, dim)
        Pool embeddings.
    sources : sequence of shape (n_candidates,)
        Source of each row (converted to ``str``).
    target : ndarray of shape (n_target, dim)
        Target embeddings; a target larger than ``sample_size`` is sampled (without replacement).
        The same target sample serves every source.
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
    eligible : ndarray of shape (n_candidates,), bool, optional
        Rows allowed at all (e.g. after decontamination); others are neither sampled nor kept, and
        do not count towards the smallest source.
    **ot_kwargs
        Further keywords of :func:`hf_otselect.ot.ot_distance` (``tol``, ``max_iter``, ``backend``...).

    Returns
    -------
    PrefilterResult
    """
    from .ot import ot_distance

    owner = "prefilter_sources"
    candidates = check_embeddings(candidates, "candidates", owner)
    target = check_embeddings(target, "target", owner, dim=candidates.shape[1])
    opts = check_prefilter({"keep": keep, "max_distance": max_distance, "sample_size": sample_size, "eps": eps}, owner)
    seed = check_seed(seed, "seed", owner)
    labels = np.asarray([str(s) for s in sources], dtype=object)
    n = candidates.shape[0]
    if labels.shape != (n,):
        raise param_error("sources", owner, f"one label per candidate ({n})", f"{labels.size} labels")
    eligible = np.ones(n, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    names = sorted(set(labels[eligible].tolist()))
    if not names:
        raise param_error("candidates", owner, "at least one eligible row", "none")
    size = opts["sample_size"]
    members = {name: np.flatnonzero((labels == name) & eligible) for name in names}
    m = min(size, min(idx.size for idx in members.values()))
    if m < size:
        logger.info("prefilter: every source is compared on chunks of %d rows (the smallest eligible source's size)", m)

    def ot(x: np.ndarray, y: np.ndarray) -> float:
        return float(ot_distance(x, y, eps=opts["eps"], **ot_kwargs))

    tgt = target if len(target) <= size else target[np.sort(_source_seed(seed, "\x00target").choice(len(target), size, replace=False))]
    tgt_self = ot(tgt, tgt)
    dist, rows, sampled, chunks = {}, {}, {}, {}
    for name in names:
        idx = members[name]
        n_chunks = min(min(idx.size, size) // m, MAX_CHUNKS)
        perm = _source_seed(seed, name).permutation(idx)[: n_chunks * m].reshape(n_chunks, m)
        values = []
        for chunk in perm:
            x = candidates[np.sort(chunk)]
            values.append(ot(x, tgt) - 0.5 * (ot(x, x) + tgt_self))
        dist[name] = float(np.mean(values))
        rows[name], sampled[name], chunks[name] = int(idx.size), int(n_chunks * m), int(n_chunks)
        logger.info("prefilter: source %r, %d rows, Sinkhorn divergence %.4g (mean of %d chunks of %d rows)", name, idx.size, dist[name], n_chunks, m)
    order = sorted(names, key=lambda s: (dist[s], s))
    kept = [
        (opts["keep"] is None or i < opts["keep"]) and (opts["max_distance"] is None or dist[s] <= opts["max_distance"])
        for i, s in enumerate(order)
    ]
    mask = np.isin(labels, [s for s, k in zip(order, kept) if k]) & eligible
    return PrefilterResult(
        sources=order, distances=[dist[s] for s in order], rows=[rows[s] for s in order],
        sampled=[sampled[s] for s in order], chunks=[chunks[s] for s in order], kept=kept, mask=mask,
        params={**opts, "seed": seed, "chunk_rows": int(m), "distance": "sinkhorn_divergence"},
    )
