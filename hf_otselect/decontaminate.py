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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import knn
from ._checks import check_embeddings, check_float, check_int, param_error, unit_rows64

logger = logging.getLogger(__name__)

__all__ = ["DecontaminationResult", "decontaminate", "word_ngrams"]


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
class DecontaminationResult:
    """Which candidates are dropped and why.

    Attributes
    ----------
    dropped : ndarray of shape (n_candidates,), bool
        True for removed rows.
    by_embedding : ndarray of shape (n_candidates,), bool
        Within ``radius`` of a held-out row.
    by_ngram : ndarray of shape (n_candidates,), bool
        Sharing an ``n``-gram with a held-out row (all False when the n-gram test is off).
    nearest_distance : ndarray of shape (n_candidates,), float64
        Euclidean distance (unit vectors) to the nearest held-out row.
    nearest_index : ndarray of shape (n_candidates,), int64
        That held-out row.
    by_source : dict
        Dropped rows per source (empty when no sources were given).
    params : dict
        ``radius``, ``ngram``, ``n_heldout``.
    """

    dropped: np.ndarray
    by_embedding: np.ndarray
    by_ngram: np.ndarray
    nearest_distance: np.ndarray
    nearest_index: np.ndarray
    by_source: dict[str, int]
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``selection.json`` records under ``decontamination``)."""
        return {
            **self.params,
            "dropped": int(self.dropped.sum()),
            "dropped_by_embedding": int(self.by_embedding.sum()),
            "dropped_by_ngram": int(self.by_ngram.sum()),
            "dropped_by_both": int((self.by_embedding & self.by_ngram).sum()),
            "by_source": dict(self.by_source),
        }


def decontaminate(
    candidates: np.ndarray,
    heldout: np.ndarray,
    *,
    radius: float = 0.3,
    candidate_texts: Sequence[str] | None = None,
    heldout_texts: Sequence[str] | None = None,
    ngram: int | None = 13,
    sources: Sequence[Any] | None = None,
) -> DecontaminationResult:
    """Flag candidates too close to a held-out ("never train on this") set.

    Parameters
    ----------
    candidates : ndarray of shape (n_candidates, dim)
        Pool embeddings (normalised to unit length inside).
    heldout : ndarray of shape (n_heldout, dim)
        Embeddings of the held-out rows, same encoder.
    radius : float, default 0.3
        Drop a candidate whose nearest held-out row is closer than this (Euclidean on unit vectors,
        ``<=``); ``0 < radius <= 2``.
    candidate_texts, heldout_texts : sequence of str, optional
        Texts for the n-gram test; both needed when ``ngram`` is set.
    ngram : int or None, default 13
        Word n-gram length of the exact-overlap test; None turns it off.
    sources : sequence of shape (n_candidates,), optional
        Source label of each candidate, for the per-source count.

    Returns
    -------
    DecontaminationResult
    """
    owner = "decontaminate"
    candidates = check_embeddings(candidates, "candidates", owner)
    heldout = check_embeddings(heldout, "heldout", owner, dim=candidates.shape[1])
    radius = check_float(radius, "radius", owner, 0.0, 2.0, low_open=True)
    n = candidates.shape[0]
    if ngram is not None:
        ngram = check_int(ngram, "ngram", owner, 1)
        if candidate_texts is None or heldout_texts is None:
            raise param_error("ngram", owner, "None when the texts are not given", ngram)
        if len(candidate_texts) != n:
            raise param_error("candidate_texts", owner, f"one text per candidate ({n})", f"{len(candidate_texts)} texts")
    if sources is not None and len(sources) != n:
        raise param_error("sources", owner, f"one label per candidate ({n})", f"{len(sources)} labels")

    unit = lambda x: np.ascontiguousarray(unit_rows64(x), dtype=np.float32)  # noqa: E731 - float64 norms: any finite scale
    found = knn.knn_search(unit(candidates), unit(heldout), 1, index="flat")
    nearest = np.sqrt(np.maximum(found.distances[:, 0].astype(np.float64), 0.0))
    by_embedding = nearest <= radius
    by_ngram = np.zeros(n, dtype=bool)
    if ngram is not None:
        banned: set[tuple[str, ...]] = set()
        for text in heldout_texts:  # type: ignore[union-attr]
            banned |= word_ngrams(str(text), ngram)
        by_ngram = np.fromiter((not banned.isdisjoint(word_ngrams(str(t), ngram)) for t in candidate_texts), dtype=bool, count=n)  # type: ignore[union-attr]
    dropped = by_embedding | by_ngram
    by_source: dict[str, int] = {}
    if sources is not None:
        by_source = dict(sorted(Counter(str(s) for s, d in zip(sources, dropped) if d).items()))
    logger.info("decontaminate: %d of %d candidates dropped (%d by embedding, %d by %s-gram)",
                int(dropped.sum()), n, int(by_embedding.sum()), int(by_ngram.sum()), ngram)
    return DecontaminationResult(
        dropped=dropped, by_embedding=by_embedding, by_ngram=by_ngram, nearest_distance=nearest,
        nearest_index=found.indices[:, 0].copy(), by_source=by_source,
        params={"radius": radius, "ngram": ngram, "n_heldout": int(heldout.shape[0])},
    )
