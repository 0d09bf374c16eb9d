"""Baseline selectors: uniform random, cosine similarity (mean / max / kNN round-robin) and DSIR.

They share the interface of the OT selectors (:class:`~hf_otselect.selectors.base.Selector`), so a
benchmark can swap any of them in by name: ``get_selector("random")``, ``"similarity"``, ``"dsir"``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._checks import LONE_SURROGATES, check_choice, check_float, check_int, param_error, unit_rows64
from ..dist import LOCAL, Comm, PoolView, TextView
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
    needs_vectors = False
    any_magnitude = True

    def __init__(self, *, replace: bool = False) -> None:
        self.replace = replace

    def _check_params(self) -> None:
        if not isinstance(self.replace, bool):
            raise param_error("replace", type(self).__name__, "a bool", self.replace, exc=TypeError)

    def fit(self, pool: PoolView | TextView, target: Any, *, comm: Comm | None = None) -> None:
        """Nothing to fit: every row scores the same."""
        self.diagnostics_ = {}

    def score_batch(self, state: None, rows: Any, index: np.ndarray) -> np.ndarray:
        """Ones of shape (b,), float64: :func:`choose` turns equal scores into a uniform draw."""
        return np.ones(len(index), dtype=np.float64)


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

    any_magnitude = True  # cosines of rows normalised in float64: any finite magnitude

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

    def fit(self, pool: PoolView | TextView, target: Any, *, comm: Comm | None = None) -> _SimilarityState:
        """Unit target rows, their mean direction, and for ``"round_robin"`` the merged neighbour lists.

        For ``"round_robin"`` every process keeps, per target point, its best ``L`` rows by
        (cosine, lower global index); the lists are gathered and merged, so the state is
        ``O(n_target * L)`` whatever the pool size, and the same for any number of processes.
        """
        comm = comm or LOCAL
        self._check_params()
        y = unit_rows64(np.asarray(target))
        m = y.shape[0]
        state = _SimilarityState(target=y, centre=y.mean(axis=0))
        self.diagnostics_ = {"reduce": self.reduce}
        if self.reduce != "round_robin":
            return state
        import torch

        depth = min(int(pool.n_global), self.n_neighbors if self.n_neighbors is not None else max(1, 2**24 // m))
        if pool.n_global > 2**32:
            raise param_error("candidates", "SimilaritySelector(reduce='round_robin')", "at most 2**32 rows", pool.n_global)
        keys = torch.empty((m, 0), dtype=torch.int64)
        yt = torch.from_numpy(y.astype(np.float32))
        from tqdm.auto import tqdm

        for idx, rows in tqdm(pool.blocks(self.block_size), desc="similarity", unit="block",
                              total=-(-pool.n_local // self.block_size), disable=_progress_disabled() or pool.n_local < 4 * self.block_size):
            sim = yt @ torch.from_numpy(unit_rows64(rows).astype(np.float32)).T  # (m, b)
            keys = torch.cat([keys, _rank_keys(sim, torch.from_numpy(idx))], dim=1)
            keys = torch.topk(keys, min(depth, keys.shape[1]), dim=1).values
        if comm.world_size > 1:  # merge every process's lists: each keeps at most `depth` per target
            parts = comm.all_gather(keys.numpy())
            keys = torch.topk(torch.from_numpy(np.concatenate(parts, axis=1)), min(depth, sum(p.shape[1] for p in parts)), dim=1).values
        keys = torch.sort(keys, dim=1, descending=True).values.numpy()  # row j: nearest first, ties to the lower index
        ids = (np.int64(0xFFFFFFFF) - (keys & np.int64(0xFFFFFFFF))).astype(np.int64)
        # Position in the round-robin sequence: p = r * m + j; a row keeps its first position.
        pos = np.arange(keys.shape[1], dtype=np.int64)[None, :] * m + np.arange(m, dtype=np.int64)[:, None]
        flat_ids, flat_pos = ids.ravel(), pos.ravel()
        order = np.lexsort((flat_pos, flat_ids))
        first_of = np.ones(order.size, dtype=bool)
        first_of[1:] = flat_ids[order][1:] != flat_ids[order][:-1]
        state.reached = flat_ids[order][first_of]
        state.first = flat_pos[order][first_of]
        state.depth = int(keys.shape[1])
        self.diagnostics_.update({"n_neighbors": state.depth, "n_reached": int(state.reached.size)})
        if state.reached.size < pool.n_global:
            logger.info("round_robin: %d of %d candidates are in no target point's %d-neighbour list; they "
                        "follow the others, ordered by max cosine.", pool.n_global - state.reached.size, pool.n_global, state.depth)
        return state

    def score_batch(self, state: _SimilarityState, rows: Any, index: np.ndarray) -> np.ndarray:
        """Cosine scores of a block (see the class docstring), float64 ``(b,)``."""
        x = unit_rows64(rows)
        if self.reduce == "mean":
            # Row-wise products summed along the row: the same bits for a row in any block
            # (a matrix-vector product may round differently with the block's shape).
            return (x * state.centre).sum(axis=1)
        import torch

        y = torch.from_numpy(state.target.astype(np.float32))
        best = np.concatenate([(torch.from_numpy(x[s : s + self.block_size].astype(np.float32)) @ y.T).max(dim=1).values.double().numpy()
                               for s in range(0, x.shape[0], self.block_size)]) if x.shape[0] else np.zeros(0)
        if self.reduce == "max" or state.reached is None:
            return best
        at = np.searchsorted(state.reached, index)
        hit = at < state.reached.size
        hit[hit] = state.reached[at[hit]] == index[hit]
        best[hit] = 1.0 + float(state.depth * state.target.shape[0]) - state.first[at[hit]].astype(np.float64)
        return best


@dataclass
class _SimilarityState:
    """Fitted similarity state: unit target rows (m, dim) float64, their mean, round-robin positions."""

    target: np.ndarray
    centre: np.ndarray
    reached: np.ndarray | None = None  # sorted global indices in some neighbour list
    first: np.ndarray | None = None  # their first round-robin position
    depth: int = 0




def _rank_keys(sim: Any, index: Any) -> Any:
    """int64 keys ordering (cosine desc, global index asc): float32 bits above, inverted index below."""
    import torch

    bits = sim.contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed-int order
    return (bits << 32) | (0xFFFFFFFF - index.to(torch.int64)).expand(sim.shape[0], -1)


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
    return _ngrams_of(_WORDPUNCT.findall(text.lower()), ngrams)


def _ngrams_of(words: list[str], ngrams: int) -> list[str]:
    out = list(words)
    for order in range(2, ngrams + 1):
        out.extend(" ".join(words[i : i + order]) for i in range(len(words) - order + 1))
    return out


def dsir_chunk_ngrams(text: str, ngrams: int, chunk_tokens: int) -> list[str]:
    """The n-grams DSIR scores a text by: those of its complete ``chunk_tokens``-token chunks.

    None cross a chunk boundary, and tokens after the last complete chunk are left out. A text
    shorter than one chunk is its own (only) chunk: all its n-grams (see :class:`DSIRSelector`).
    """
    words = _WORDPUNCT.findall(text.lower())
    if len(words) < chunk_tokens:
        return _ngrams_of(words, ngrams)
    out: list[str] = []
    for start in range(0, len(words) - chunk_tokens + 1, chunk_tokens):
        out.extend(_ngrams_of(words[start : start + chunk_tokens], ngrams))
    return out


def ngrams_per_chunk(tokens: int, ngrams: int) -> int:
    """Number of n-grams (orders 1..``ngrams``) of a text of ``tokens`` tokens: sum of max(0, tokens - o + 1)."""
    return sum(max(0, tokens - order + 1) for order in range(1, ngrams + 1))


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

    **Length.** :math:`\\log w_i` is a sum over the row's n-grams, so its size grows with the row's
    length: with a small target most n-grams of the pool are unseen in it (each costs about
    :math:`\\log \\delta - \\log \\hat p_{raw}`), and whole rows ranked by it favour the shortest
    fragments (47 of 50 picks for a ChemProt target were movie-review snippets of median 8 words).
    The paper scores equal-length examples (raw documents cut into chunks of 128 words, Xie et al.
    2023, Sec. 5 / App. J). Here each row is cut into consecutive chunks of ``chunk_tokens``
    word-punct tokens (default 100, the reference package's ``min_example_length``) and every score
    is put on the scale of one chunk: the paper's log weight of the n-grams the row is scored by,
    divided by how many chunks' worth of n-grams they are,

    .. math:: s_i = \\frac{G(c)}{|N_i|} \\sum_{g \\in N_i} \\big(\\log(\\hat p_{tgt}(g) + \\delta) - \\log(\\hat p_{raw}(g) + \\delta)\\big),

    with :math:`G(c)` the n-grams of one ``c``-token chunk (``ngrams_per_chunk``: 199 for
    uni+bigrams of 100 tokens) and :math:`N_i` the row's scored n-grams (bucket counts, with
    multiplicity):

    - a row of one chunk or more: the n-grams of its complete chunks (none across chunks; tokens
      after the last complete chunk do not count), so :math:`s_i` is the mean log weight of its
      chunks, exactly;
    - a row shorter than one chunk (a headline, a tweet, a one-row pool): all its own n-grams,
      so :math:`s_i` is :math:`G(c)` times its mean log weight per n-gram, the length-normalised
      log-likelihood ratio of Moore & Lewis (2010, "Intelligent selection of language model
      training data"), on the same scale as a chunk of a long row; the package would drop it;
    - a row without a single token: ``-inf``, never chosen (``k`` above the other rows is refused).

    No row wins or loses by its length alone: a news-headline target over AG News + IMDB +
    PubMedQA takes news, not the long reviews the former rule (short rows never chosen) took.
    ``diagnostics_["rows_below_chunk"]`` counts the rows scored from their own n-grams.
    ``chunk_tokens=None`` scores whole rows by the plain sum (the paper's formula, no length
    normalisation). The pool and target models are fitted on whole rows. What remains: with a small
    target, a short row made of n-grams that are rare in the pool is penalised less than one with
    n-grams common in the pool but unseen in the target (the :math:`\\delta` smoothing), so generic
    short snippets can still score well; a larger target helps.

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
    chunk_tokens : int or None, default 100
        Tokens per scoring chunk, the scale every score is put on (see "Length" above); rows
        shorter than a chunk are scored from their own n-grams. None scores whole rows (plain sum).
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
        chunk_tokens: int | None = 100,
    ) -> None:
        self.ngrams = ngrams
        self.num_buckets = num_buckets
        self.smoothing = smoothing
        self.resample = resample
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens

    def _check_params(self) -> None:
        owner = type(self).__name__
        check_int(self.ngrams, "ngrams", owner, 1, 5)
        check_int(self.num_buckets, "num_buckets", owner, 1, 2**31 - 1)
        check_float(self.smoothing, "smoothing", owner, 0.0, low_open=True)
        check_int(self.batch_size, "batch_size", owner, 1)
        if self.chunk_tokens is not None:
            check_int(self.chunk_tokens, "chunk_tokens", owner, 1)
        if not isinstance(self.resample, bool):
            raise param_error("resample", owner, "a bool", self.resample, exc=TypeError)

    def featurize(self, texts: list[str], *, chunked: bool = False) -> Any:
        """Hashed n-gram counts, a scipy CSR matrix of shape (len(texts), num_buckets), float64.

        ``chunked=True`` counts the n-grams a row is scored by (:func:`dsir_chunk_ngrams`): those of
        its complete ``chunk_tokens`` chunks, or all of them for a row shorter than one chunk.
        """
        from sklearn.feature_extraction.text import HashingVectorizer

        ngrams, chunk = self.ngrams, self.chunk_tokens
        if chunked and chunk is not None:
            analyzer = lambda t: dsir_chunk_ngrams(t, ngrams, chunk)  # noqa: E731
        else:
            analyzer = lambda t: dsir_ngrams(t, ngrams)  # noqa: E731
        vec = HashingVectorizer(
            n_features=self.num_buckets,
            analyzer=analyzer,
            alternate_sign=False,
            norm=None,
            dtype=np.float64,
        )
        return vec.transform(texts)

    def fit(self, pool: PoolView | TextView, target: Any, *, comm: Comm | None = None) -> np.ndarray:
        """Hashed n-gram counts of target and pool (the pool's summed across processes).

        Returns
        -------
        ndarray of shape (num_buckets,), float64
            :math:`\\log(p_{target} + \\delta) - \\log(p_{raw} + \\delta)` per bucket, the log
            importance weight of one n-gram; a row's weight is the sum over its n-grams.
        """
        comm = comm or LOCAL
        self._check_params()
        owner = f"{type(self).__name__}.fit"
        target = as_texts(target, "target", owner)
        from tqdm.auto import tqdm

        tgt_counts = np.asarray(self.featurize(target).sum(axis=0)).ravel()
        if tgt_counts.sum() == 0:
            raise param_error("target", owner, "texts with at least one word or punctuation token", "only empty texts")
        raw_counts = np.zeros(self.num_buckets, dtype=np.float64)
        short = 0
        n_blocks = -(-pool.n_local // self.batch_size)
        for _, texts in tqdm(pool.blocks(self.batch_size), total=n_blocks, desc="dsir: hashing", unit="batch",
                             disable=_progress_disabled() or n_blocks <= 1):
            raw_counts += np.asarray(self.featurize(texts).sum(axis=0)).ravel()
            if self.chunk_tokens is not None:
                short += sum(len(_WORDPUNCT.findall(t.lower())) < self.chunk_tokens for t in texts)
        raw_counts = comm.all_reduce(raw_counts)  # O(num_buckets) bytes, once
        if raw_counts.sum() == 0:
            raise param_error("candidates", owner, "texts with at least one word or punctuation token", "only empty texts")
        short, n_rows = (int(v) for v in comm.all_reduce(np.array([short, pool.n_local], dtype=np.int64)))
        if 2 * short > n_rows:
            logger.info("DSIR: %d of %d pool rows have fewer than chunk_tokens=%d tokens; each is scored from "
                        "its own n-grams, scaled to one chunk.", short, n_rows, self.chunk_tokens)
        delta = float(self.smoothing)
        self.diagnostics_ = {
            "num_buckets": int(self.num_buckets),
            "target_ngrams": int(tgt_counts.sum()),
            "raw_ngrams": int(raw_counts.sum()),
            "resample": bool(self.resample),
            "chunk_tokens": self.chunk_tokens,
            "rows_below_chunk": short,
        }
        return np.log(tgt_counts / tgt_counts.sum() + delta) - np.log(raw_counts / raw_counts.sum() + delta)

    def score_batch(self, state: np.ndarray, rows: Any, index: np.ndarray) -> np.ndarray:
        """Log importance weights :math:`\\log w_i` of a block of texts, float64 ``(b,)``; higher means "select".

        With ``chunk_tokens`` set: the log weight of the row's scored n-grams (its complete chunks,
        or the whole row when shorter than one chunk) per chunk's worth of n-grams (see "Length"
        in the class docstring). ``-inf`` for a row without a single token (never chosen), in both modes.
        """
        texts = [LONE_SURROGATES.sub("\ufffd", t) for t in rows]
        if self.chunk_tokens is None:
            counts = self.featurize(texts)
            total = np.asarray(counts @ state, dtype=np.float64)
            return np.where(counts.getnnz(axis=1) > 0, total, -np.inf)  # a row without a token has no weight
        counts = self.featurize(texts, chunked=True)
        total = np.asarray(counts @ state, dtype=np.float64)
        # Chunks' worth of n-grams: exactly the number of complete chunks for a row of one chunk or more.
        chunks = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel() / ngrams_per_chunk(self.chunk_tokens, self.ngrams)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(chunks > 0, total / np.where(chunks > 0, chunks, 1.0), -np.inf)

    def choose_rows(self, scores: np.ndarray, k: int, *, seed: int = 0, index: np.ndarray | None = None, comm: Comm | None = None) -> np.ndarray:
        """As :meth:`Selector.choose_rows`; a ``k`` above the rows with at least one token is refused."""
        self._check_k(scores, k, comm or LOCAL)
        return super().choose_rows(scores, k, seed=seed, index=index, comm=comm)

    def choice_keys(self, scores: np.ndarray, k: int, *, seed: int = 0, index: np.ndarray | None = None, comm: Comm | None = None) -> np.ndarray | None:
        """As :meth:`Selector.choice_keys`, refusing what :meth:`choose_rows` refuses."""
        self._check_k(scores, k, comm or LOCAL)
        return super().choice_keys(scores, k, seed=seed, index=index, comm=comm)

    def _check_k(self, scores: np.ndarray, k: int, comm: Comm) -> None:
        """Refuse a ``k`` above the rows with at least one token (the others score ``-inf``)."""
        scores = np.asarray(scores, dtype=np.float64)
        n_ok, n = (int(v) for v in comm.all_reduce(np.array([np.isfinite(scores).sum(), scores.size], dtype=np.int64)))
        owner = f"{type(self).__name__}.select"
        k = check_int(k, "k", owner, 1, n)
        if k > n_ok:
            raise param_error("k", owner, f"at most the {n_ok} rows with at least one word or punctuation token", k)

    @property
    def choice(self) -> str:  # type: ignore[override]
        """``"log_sample"`` (Gumbel-top-k on the log weights) when ``resample``, else ``"top_k"``."""
        return "log_sample" if self.resample else "top_k"


__all__ = ["DSIRSelector", "RandomSelector", "SimilaritySelector", "dsir_chunk_ngrams", "dsir_ngrams", "ngrams_per_chunk"]
