"""Baseline selectors: uniform random, cosine similarity (mean / max / kNN round-robin) and DSIR.

They share the interface of the OT selectors (:class:`~hf_otselect.selectors.base.Selector`), so a
benchmark can swap any of them in by name: ``get_selector("random")``, ``"similarity"``, ``"dsir"``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import numpy as np

from .._checks import check_choice, check_float, check_int, param_error
from .base import Selector, as_texts, register

logger = logging.getLogger(__name__)

SimilarityReduce = Literal["mean", "max", "round_robin"]


def _progress_disabled() -> bool:
    from datasets.utils.logging import is_progress_bar_enabled

    return not is_progress_bar_enabled()


@register("random")
class RandomSelector(Selector):
    """Uniform random selection, the floor every method must beat.

    Every candidate gets the same score (1.0), and :func:`~hf_otselect.selectors.base.choose` in
    ``"sample"`` mode turns equal scores into a seeded uniform draw: without replacement the
    Gumbel-top-k order of equal probabilities is a uniform random permutation, so ``select(k)`` is a
    uniform ``k``-subset in uniformly random order.

    Parameters
    ----------
    replace : bool, default False
        Draw with replacement (then any ``k >= 1`` is allowed).
    """

    choice = "sample"

    def __init__(self, *, replace: bool = False) -> None:
        self.replace = replace

    def _check_params(self) -> None:
        if not isinstance(self.replace, bool):
            raise param_error("replace", type(self).__name__, "a bool", self.replace, exc=TypeError)

    def score(self, candidates: Any, target: Any) -> np.ndarray:
        """Return ones of shape (n_candidates,), float64, after validating the embedding pair.

        Parameters
        ----------
        candidates : ndarray of shape (n_candidates, dim)
        target : ndarray of shape (n_target, dim)
            Not used for the score; validated so that every vector selector refuses the same bad
            inputs.
        """
        self._check_params()
        candidates, _ = self._check_pair(candidates, target)
        self.diagnostics_ = {}
        return np.ones(candidates.shape[0], dtype=np.float64)


@register("similarity")
class SimilaritySelector(Selector):
    """Cosine similarity to the target: mean, max, or the per-target kNN round-robin.

    With unit-normalised rows :math:`\\hat x_i` (candidates) and :math:`\\hat y_j` (target, ``m``
    points), the scores are

    - ``"mean"``: :math:`s_i = \\frac1m \\sum_j \\hat x_i^\\top \\hat y_j`, the cosine to the target's
      mean direction (up to its norm);
    - ``"max"``: :math:`s_i = \\max_j \\hat x_i^\\top \\hat y_j`, the similarity to the closest target
      point;
    - ``"round_robin"``: the kNN selection of TAPT (Gururangan et al. 2020, "Don't Stop Pretraining",
      Sec. 5, kNN-TAPT): every target point ranks the candidates by cosine; then in rounds
      ``r = 0, 1, ...`` each target point ``j = 0..m-1`` in turn offers its ``r``-th nearest
      candidate, and a candidate offered before is skipped. The position of candidate ``i`` in that
      sequence is :math:`p_i = \\min_j (r_j(i)\\, m + j)`, with :math:`r_j(i)` its rank for target
      point ``j``. After ``R`` complete rounds the sequence holds exactly the union of every target
      point's ``R`` nearest candidates, i.e. kNN-TAPT with ``R`` neighbours. The score is
      ``1 + (L m - p_i)`` (>= 2), so top-k by score is the round-robin order. Each target point's
      list is kept to depth ``L = n_neighbors`` (memory ``O(m L)``); candidates in no list come after
      all others, ordered by their max cosine (score in ``[-1, 1]``).

    Similarities are computed in blocks of ``block_size`` candidate rows (torch float32 matmul), so
    memory stays ``O(block_size * m + m * L)`` whatever the pool size.

    Parameters
    ----------
    reduce : {"mean", "max", "round_robin"}, default "mean"
    n_neighbors : int or None, default None
        Depth ``L`` of each target point's neighbour list for ``"round_robin"``. None means
        ``min(n_candidates, max(1, 2**24 // n_target))``: the exact order of the whole pool for
        small problems, bounded memory (~200 MB of lists) for large ones.
    block_size : int, default 16384
        Candidate rows per similarity block.
    """

    def __init__(
        self,
        *,
        reduce: SimilarityReduce = "mean",
        n_neighbors: int | None = None,
        block_size: int = 16384,
    ) -> None:
        self.reduce = reduce
        self.n_neighbors = n_neighbors
        self.block_size = block_size

    def _check_params(self) -> int:
        """Validate the parameters; return the block size."""
        owner = type(self).__name__
        check_choice(self.reduce, "reduce", owner, ["mean", "max", "round_robin"])
        block = check_int(self.block_size, "block_size", owner, 1)
        if self.n_neighbors is not None:
            check_int(self.n_neighbors, "n_neighbors", owner, 1)
        return block

    def score(self, candidates: Any, target: Any) -> np.ndarray:
        """Score every candidate by cosine similarity to the target (see the class docstring).

        Parameters
        ----------
        candidates : ndarray of shape (n_candidates, dim)
        target : ndarray of shape (n_target, dim)

        Returns
        -------
        ndarray of shape (n_candidates,), float64
        """
        block = self._check_params()
        candidates, target = self._check_pair(candidates, target)
        import torch

        n, m = candidates.shape[0], target.shape[0]
        y = _unit_rows(torch.from_numpy(target))
        self.diagnostics_ = {"reduce": self.reduce}
        if self.reduce == "mean":
            # The mean of cosines is the cosine-weighted dot with the mean target direction.
            centre = y.double().mean(dim=0)
            out = np.empty(n, dtype=np.float64)
            for lo in range(0, n, block):
                x = _unit_rows(torch.tensor(candidates[lo : lo + block])).double()  # a copy: the pool may be a read-only memmap
                out[lo : lo + block] = (x @ centre).numpy()
            return out

        depth = 0
        if self.reduce == "round_robin":
            depth = min(n, self.n_neighbors if self.n_neighbors is not None else max(1, 2**24 // m))
        best = np.empty(n, dtype=np.float64)
        top_val = torch.empty((m, 0), dtype=torch.float32)
        top_idx = torch.empty((m, 0), dtype=torch.int64)
        from tqdm.auto import tqdm

        blocks = range(0, n, block)
        for lo in tqdm(blocks, desc="similarity", unit="block", disable=_progress_disabled() or len(blocks) < 4):
            x = _unit_rows(torch.tensor(candidates[lo : lo + block]))
            sim = y @ x.T  # (m, b)
            best[lo : lo + sim.shape[1]] = sim.max(dim=0).values.double().numpy()
            if depth:
                idx = torch.arange(lo, lo + sim.shape[1], dtype=torch.int64).expand(m, -1)
                vals = torch.cat([top_val, sim], dim=1)
                ids = torch.cat([top_idx, idx], dim=1)
                keep = min(depth, vals.shape[1])
                top_val, pos = torch.topk(vals, keep, dim=1, largest=True, sorted=False)
                top_idx = torch.gather(ids, 1, pos)
        if not depth:
            return best

        # Order every list by (descending cosine, ascending candidate index): the ranks r_j(i).
        vals_np, ids_np = top_val.numpy(), top_idx.numpy()
        by_id = np.argsort(ids_np, axis=1, kind="stable")
        by_val = np.argsort(-np.take_along_axis(vals_np, by_id, axis=1), axis=1, kind="stable")
        order = np.take_along_axis(by_id, by_val, axis=1)  # row j: list positions, nearest first
        rank_in_row = np.empty_like(order)
        np.put_along_axis(rank_in_row, order, np.arange(order.shape[1])[None, :].repeat(m, axis=0), axis=1)
        # Position in the round-robin sequence: p = r * m + j; a candidate keeps its first position.
        pos = rank_in_row.astype(np.int64) * m + np.arange(m, dtype=np.int64)[:, None]
        first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, ids_np.ravel(), pos.ravel())
        reached = first < np.iinfo(np.int64).max
        out = best.copy()
        out[reached] = 1.0 + float(depth * m) - first[reached].astype(np.float64)
        self.diagnostics_.update({"n_neighbors": int(depth), "n_reached": int(reached.sum())})
        if not reached.all():
            logger.info(
                "round_robin: %d of %d candidates are in no target point's %d-neighbour list; they "
                "follow the others, ordered by max cosine.",
                int((~reached).sum()),
                n,
                depth,
            )
        return out


def _unit_rows(x: Any) -> Any:
    """Rows divided by their L2 norm (zero rows stay zero), float32 torch tensor."""
    import torch

    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


# Word-punct tokenisation as in the DSIR reference code (nltk's WordPunctTokenizer): runs of word
# characters, or runs of other non-space characters. Written as a stdlib regex so nltk is not
# needed. (Recent nltk compiles the same pattern with the `regex` engine, whose \w also matches
# combining marks such as U+0333; the two differ only on such rare characters.)
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def dsir_ngrams(text: str, ngrams: int = 2) -> list[str]:
    """The DSIR feature tokens of one text: lower-cased word-punct unigrams up to ``ngrams``-grams.

    Parameters
    ----------
    text : str
    ngrams : int, default 2
        Largest n-gram order; 2 means unigrams and bigrams (the paper's setting).

    Returns
    -------
    list of str
        Unigrams, then bigrams (space-joined), and so on.
    """
    words = _WORDPUNCT.findall(text.lower())
    out = list(words)
    for order in range(2, ngrams + 1):
        out.extend(" ".join(words[i : i + order]) for i in range(len(words) - order + 1))
    return out


@register("dsir")
class DSIRSelector(Selector):
    """Data Selection with Importance Resampling on hashed n-grams (Xie et al., NeurIPS 2023).

    DSIR (Sec. 4 of the paper) maps every text to hashed n-gram counts :math:`z \\in \\mathbb N^B`
    (lower-cased word-punct unigrams and bigrams, hashed into ``B = num_buckets`` buckets), fits a
    bag-of-n-grams (multinomial) model to the target and one to the raw pool by maximum likelihood,
    :math:`\\hat p(b) = c(b) / \\sum_{b'} c(b')`, and gives each raw text the log importance weight

    .. math:: \\log w_i = \\sum_b z_{ib} \\,(\\log(\\hat p_{tgt}(b) + \\delta) - \\log(\\hat p_{raw}(b) + \\delta)),

    with smoothing ``delta = smoothing`` (1e-8, as in the authors' ``data-selection`` package).
    ``k`` texts are then resampled without replacement with probability proportional to
    :math:`w_i` by the Gumbel-top-k trick (``resample=True``, the paper) or taken as the ``k``
    largest weights (``resample=False``, the package's ``top_k`` option).

    :meth:`score` returns :math:`\\log w_i`, and :func:`choose` samples in ``"log_sample"`` mode, on
    the log weights directly: log weights of real texts differ by thousands, so ``exp`` would
    underflow and leave most rows with probability zero.

    Why not call the ``data-selection`` package (1.0.3, which does install here)? It reads and writes
    jsonl files, keeps its state with pickle, resamples with the global numpy RNG, hashes every
    n-gram with SHA-256 in pure Python into a dense per-document array, and by default drops texts
    under 100 tokens. We compute the same quantities in memory: hashing with scikit-learn's
    ``HashingVectorizer`` (MurmurHash3, sparse counts), the rest in a few numpy lines. The hash
    function differs, so bucket collisions differ; without collisions both give the exact n-gram
    weights (tests check both against a direct dictionary computation).

    Parameters
    ----------
    ngrams : int, default 2
        Largest n-gram order (2: unigrams + bigrams).
    num_buckets : int, default 10000
        Number of hash buckets ``B`` (the paper's value).
    smoothing : float, default 1e-8
        ``delta`` added to both bucket probabilities before the log.
    resample : bool, default True
        Gumbel-top-k importance resampling (True) or deterministic top-k by weight (False).
    batch_size : int, default 4096
        Texts hashed per batch (bounds memory for large pools).
    """

    needs_text = True

    def __init__(
        self,
        *,
        ngrams: int = 2,
        num_buckets: int = 10000,
        smoothing: float = 1e-8,
        resample: bool = True,
        batch_size: int = 4096,
    ) -> None:
        self.ngrams = ngrams
        self.num_buckets = num_buckets
        self.smoothing = smoothing
        self.resample = resample
        self.batch_size = batch_size

    def _check_params(self) -> None:
        owner = type(self).__name__
        check_int(self.ngrams, "ngrams", owner, 1, 5)
        check_int(self.num_buckets, "num_buckets", owner, 1, 2**31 - 1)
        check_float(self.smoothing, "smoothing", owner, 0.0, low_open=True)
        check_int(self.batch_size, "batch_size", owner, 1)
        if not isinstance(self.resample, bool):
            raise param_error("resample", owner, "a bool", self.resample, exc=TypeError)

    def featurize(self, texts: list[str]) -> Any:
        """Hashed n-gram counts, a scipy CSR matrix of shape (len(texts), num_buckets), float64."""
        from sklearn.feature_extraction.text import HashingVectorizer

        ngrams = self.ngrams
        vec = HashingVectorizer(
            n_features=self.num_buckets,
            analyzer=lambda t: dsir_ngrams(t, ngrams),
            alternate_sign=False,
            norm=None,
            dtype=np.float64,
        )
        return vec.transform(texts)

    def score(self, candidates: Any, target: Any) -> np.ndarray:
        """Log importance weights of the candidates (see the class docstring).

        Parameters
        ----------
        candidates : sequence of str, length n_candidates
            The raw pool; its n-gram distribution is the "raw" model.
        target : sequence of str
            Target texts; their n-gram distribution is the "target" model.

        Returns
        -------
        ndarray of shape (n_candidates,), float64
            :math:`\\log w_i`; higher means "select".
        """
        self._check_params()
        owner = f"{type(self).__name__}.score"
        candidates = as_texts(candidates, "candidates", owner)
        target = as_texts(target, "target", owner)
        from tqdm.auto import tqdm

        tgt_counts = np.asarray(self.featurize(target).sum(axis=0)).ravel()
        if tgt_counts.sum() == 0:
            raise param_error("target", owner, "texts with at least one word or punctuation token", "only empty texts")
        n, bs = len(candidates), self.batch_size
        blocks = [self.featurize(candidates[lo : lo + bs]) for lo in tqdm(
            range(0, n, bs), desc="dsir: hashing", unit="batch", disable=_progress_disabled() or n <= bs
        )]
        raw_counts = np.zeros(self.num_buckets, dtype=np.float64)
        for feats in blocks:
            raw_counts += np.asarray(feats.sum(axis=0)).ravel()
        if raw_counts.sum() == 0:
            raise param_error("candidates", owner, "texts with at least one word or punctuation token", "only empty texts")
        delta = float(self.smoothing)
        log_diff = np.log(tgt_counts / tgt_counts.sum() + delta) - np.log(raw_counts / raw_counts.sum() + delta)
        out = np.concatenate([feats @ log_diff for feats in blocks])
        self.diagnostics_ = {
            "num_buckets": int(self.num_buckets),
            "target_ngrams": int(tgt_counts.sum()),
            "raw_ngrams": int(raw_counts.sum()),
            "resample": bool(self.resample),
        }
        return out.astype(np.float64)

    @property
    def choice(self) -> str:  # type: ignore[override]
        """``"log_sample"`` (Gumbel-top-k on the log weights) when ``resample``, else ``"top_k"``."""
        return "log_sample" if self.resample else "top_k"


__all__ = ["DSIRSelector", "RandomSelector", "SimilaritySelector", "dsir_ngrams"]
