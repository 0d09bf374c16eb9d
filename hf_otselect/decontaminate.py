"""Decontamination: drop pool rows that are (near) copies of a "never train on this" set.

Two tests, either of which drops a row:

* **Embedding distance.** A candidate whose nearest row of the held-out set (exact FAISS k-NN,
  :func:`hf_otselect.knn.knn_search`, on L2-normalised embeddings) is closer than ``radius``
  (Euclidean; ``||x - y||^2 = 2 (1 - cos)`` on unit vectors, so ``0.3`` means cosine similarity
  above 0.955). Catches copies and light paraphrases.
* **Long exact n-grams** (optional). A candidate sharing a word ``n``-gram (default 13) with a
  held-out row, after lower-casing and splitting on whitespace. 13-grams are the overlap test
  used to decontaminate LM training data (GPT-3, Brown et al. 2020, App. C). A text with fewer
  than ``n`` words contributes its whole word sequence as its one gram, so short held-out rows
  are still matched when a candidate equals them up to case and spacing.

The dropped rows are reported with the reason and the nearest distance, and counted per source.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from . import knn
from ._checks import check_embeddings, check_float, check_int, param_error, unit_rows64
from .dist import DEFAULT_BLOCK_ROWS, LOCAL, Comm, sum_counts

logger = logging.getLogger(__name__)

__all__ = ["RERANK", "DecontaminationResult", "HeldOut", "decontaminate", "fit_heldout", "word_ngrams"]


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lower-cased, whitespace-split word ``n``-grams of ``text`` (the whole text if shorter).

    Parameters
    ----------
    text : str
    n : int
        Gram length, ``>= 1``.

    Returns
    -------
    set of tuple of str
        Empty for a text with no words.
    """
    words = text.lower().split()
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class HeldOut:
    """The state of a decontamination: what a row is compared with (independent of the pool's size).

    Attributes
    ----------
    vectors : ndarray of shape (n_heldout, dim), float64
        The held-out embeddings, unit length.
    grams : frozenset of tuple of str
        Their word ``ngram``-grams (empty when the n-gram test is off).
    radius : float
    ngram : int or None
    """

    vectors: np.ndarray
    grams: frozenset[tuple[str, ...]]
    radius: float
    ngram: int | None

    def flag(self, vectors: np.ndarray, texts: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-row tests of a batch of rows: a pure function of each row and this state.

        FAISS's exact float32 search proposes the :data:`RERANK` nearest held-out rows; their
        distances are recomputed row by row in float64 and the nearest (ties to the lower held-out
        index) is taken, so a row's answer does not depend on which rows share its batch, its shard
        or its process.

        Parameters
        ----------
        vectors : ndarray of shape (b, dim)
        texts : sequence of str of length b, optional
            Needed when the n-gram test is on.

        Returns
        -------
        by_embedding, by_ngram : ndarray of shape (b,), bool
        nearest_distance : ndarray of shape (b,), float64
        nearest_index : ndarray of shape (b,), int64
        """
        b = len(vectors)
        if b == 0:
            return np.zeros(0, bool), np.zeros(0, bool), np.zeros(0), np.zeros(0, np.int64)
        unit = unit_rows64(np.asarray(vectors))
        found = knn.knn_search(np.ascontiguousarray(unit, dtype=np.float32), np.ascontiguousarray(self.vectors, dtype=np.float32),
                               min(RERANK, len(self.vectors)), index="flat")
        ids = found.indices
        exact = np.stack([np.sqrt(np.square(unit - self.vectors[ids[:, j]]).sum(axis=1)) for j in range(ids.shape[1])], axis=1)
        best = np.lexsort((ids, exact), axis=1)[:, 0]
        rows = np.arange(b)
        nearest, nearest_index = exact[rows, best], ids[rows, best]
        by_ngram = np.zeros(b, dtype=bool)
        if self.ngram is not None:
            if texts is None or len(texts) != b:
                raise param_error("candidate_texts", "decontaminate", f"one text per candidate ({b})", "none" if texts is None else f"{len(texts)} texts")
            by_ngram = np.fromiter((not self.grams.isdisjoint(word_ngrams(str(t), self.ngram)) for t in texts), dtype=bool, count=b)
        return nearest <= self.radius, by_ngram, nearest, nearest_index


#: Held-out rows FAISS proposes per candidate before the exact float64 re-rank (see :meth:`HeldOut.flag`).
RERANK = 4


def fit_heldout(
    heldout: np.ndarray, *, radius: float = 0.3, heldout_texts: Sequence[str] | None = None, ngram: int | None = 13,
    owner: str = "decontaminate",
) -> HeldOut:
    """Check the held-out side and build the state every process holds (the same on each).

    Parameters
    ----------
    heldout : ndarray of shape (n_heldout, dim)
    radius : float
        ``0 < radius <= 2`` (Euclidean on unit vectors).
    heldout_texts : sequence of str, optional
        Needed when ``ngram`` is set.
    ngram : int or None

    Returns
    -------
    HeldOut
    """
    heldout = check_embeddings(heldout, "heldout", owner)
    radius = check_float(radius, "radius", owner, 0.0, 2.0, low_open=True)
    grams: set[tuple[str, ...]] = set()
    if ngram is not None:
        ngram = check_int(ngram, "ngram", owner, 1)
        if heldout_texts is None:
            raise param_error("ngram", owner, "None when the texts are not given", ngram)
        for text in heldout_texts:
            grams |= word_ngrams(str(text), ngram)
    return HeldOut(vectors=unit_rows64(heldout), grams=frozenset(grams), radius=radius, ngram=ngram)


@dataclass(frozen=True)
class DecontaminationResult:
    """Which candidates are dropped and why.

    The arrays cover this process's rows; the counts (``totals``, ``by_source``) the whole pool.

    Attributes
    ----------
    dropped : ndarray of shape (n_local,), bool
        True for removed rows.
    by_embedding : ndarray of shape (n_local,), bool
        Within ``radius`` of a held-out row.
    by_ngram : ndarray of shape (n_local,), bool
        Sharing an ``n``-gram with a held-out row (all False when the n-gram test is off).
    nearest_distance : ndarray of shape (n_local,), float64
        Euclidean distance (unit vectors) to the nearest held-out row.
    nearest_index : ndarray of shape (n_local,), int64
        That held-out row.
    by_source : dict
        Dropped rows per source in the whole pool (empty when no sources were given).
    params : dict
        ``radius``, ``ngram``, ``n_heldout``.
    totals : dict
        ``dropped``, ``dropped_by_embedding``, ``dropped_by_ngram``, ``dropped_by_both`` in the
        whole pool (all-reduced).
    """

    dropped: np.ndarray
    by_embedding: np.ndarray
    by_ngram: np.ndarray
    nearest_distance: np.ndarray
    nearest_index: np.ndarray
    by_source: dict[str, int]
    params: dict[str, Any]
    totals: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``selection.json`` records under ``decontamination``)."""
        return {**self.params, **self.totals, "by_source": dict(self.by_source)}


def decontaminate(
    candidates: np.ndarray,
    heldout: np.ndarray,
    *,
    radius: float = 0.3,
    candidate_texts: Iterable[str] | None = None,
    heldout_texts: Sequence[str] | None = None,
    ngram: int | None = 13,
    sources: Iterable[Any] | None = None,
    comm: Comm | None = None,
    block_rows: int | None = None,
) -> DecontaminationResult:
    """Flag candidates too close to a held-out ("never train on this") set.

    A fit (:func:`fit_heldout`: the held-out vectors and n-gram set, the same on every process) and
    a per-row test (:meth:`HeldOut.flag`) over this process's rows in blocks; the only collective is
    the all-reduce of the counts. So the rows dropped are the same for any number of processes and
    for a streamed pool (``candidate_texts`` and ``sources`` are read once, in step with the rows).

    Parameters
    ----------
    candidates : ndarray of shape (n_local, dim)
        This process's pool embeddings (an array or ``np.memmap``; normalised to unit length inside).
    heldout : ndarray of shape (n_heldout, dim)
        Embeddings of the held-out rows, same encoder.
    radius : float, default 0.3
        Drop a candidate whose nearest held-out row is closer than this (Euclidean on unit vectors,
        ``<=``); ``0 < radius <= 2``.
    candidate_texts : iterable of str, optional
        This process's texts, in row order (a list, or a stream's column read once).
    heldout_texts : sequence of str, optional
        Texts for the n-gram test; both needed when ``ngram`` is set.
    ngram : int or None, default 13
        Word n-gram length of the exact-overlap test; None turns it off.
    sources : iterable of length n_local, optional
        Source label of each candidate, for the per-source count.
    comm : Comm, optional
        The processes sharing the pool (default: this one alone).
    block_rows : int, optional
        Rows tested at once (default :data:`hf_otselect.dist.DEFAULT_BLOCK_ROWS`).

    Returns
    -------
    DecontaminationResult
    """
    owner = "decontaminate"
    comm = comm or LOCAL
    n = len(candidates)
    if ngram is not None and candidate_texts is None:
        raise param_error("ngram", owner, "None when the texts are not given", ngram)
    for name, given in (("candidate_texts", candidate_texts if ngram is not None else None), ("sources", sources)):
        if isinstance(given, Sized) and len(given) != n:
            raise param_error(name, owner, f"one {'text' if name == 'candidate_texts' else 'label'} per candidate ({n})", f"{len(given)} given")
    state = fit_heldout(heldout, radius=radius, heldout_texts=heldout_texts, ngram=ngram, owner=owner)
    dim = state.vectors.shape[1]
    if n:
        check_embeddings(candidates[:1], "candidates", owner, dim=dim)
    step = block_rows or DEFAULT_BLOCK_ROWS
    texts = iter(candidate_texts) if candidate_texts is not None else None
    parts = []
    for s in range(0, n, step):
        block = check_embeddings(candidates[s : s + step], "candidates", owner, dim=dim)
        batch = list(islice(texts, len(block))) if texts is not None and state.ngram is not None else None
        parts.append(state.flag(block, batch))
    if texts is not None and state.ngram is not None and next(texts, None) is not None:
        raise param_error("candidate_texts", owner, f"one text per candidate ({n})", "more texts")
    by_embedding, by_ngram, nearest, nearest_index = (np.concatenate(p) for p in zip(*parts)) if parts else state.flag(np.zeros((0, dim)))
    dropped = by_embedding | by_ngram
    by_source: dict[str, int] = {}
    if sources is not None:
        labels = [str(x) for x in sources]
        if len(labels) != n:
            raise param_error("sources", owner, f"one label per candidate ({n})", f"{len(labels)} labels")
        by_source = sum_counts(Counter(s for s, d in zip(labels, dropped) if d), comm)
    counts = np.array([dropped.sum(), by_embedding.sum(), by_ngram.sum(), (by_embedding & by_ngram).sum(), n], dtype=np.int64)
    counts = comm.all_reduce(counts) if comm.world_size > 1 else counts
    totals = dict(zip(("dropped", "dropped_by_embedding", "dropped_by_ngram", "dropped_by_both"), (int(c) for c in counts[:4])))
    logger.info("decontaminate: %d of %d candidates dropped (%d by embedding, %d by %s-gram)",
                totals["dropped"], int(counts[4]), totals["dropped_by_embedding"], totals["dropped_by_ngram"], state.ngram)
    return DecontaminationResult(
        dropped=dropped, by_embedding=by_embedding, by_ngram=by_ngram, nearest_distance=nearest,
        nearest_index=nearest_index, by_source=by_source,
        params={"radius": state.radius, "ngram": state.ngram, "n_heldout": int(state.vectors.shape[0])}, totals=totals,
    )
