"""Baselines against independent computations and planted ground truths."""

from __future__ import annotations

import csv
import inspect
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics.pairwise import cosine_similarity

from hf_otselect.selectors.baselines import (
    DSIRSelector,
    RandomSelector,
    SimilaritySelector,
    dsir_chunk_ngrams,
    dsir_ngrams,
    ngrams_per_chunk,
)
from hf_otselect.selectors.base import get_selector


def _clusters(seed: int = 0, n_per: int = 40, n_clusters: int = 5, dim: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 3
    labels = np.repeat(np.arange(n_clusters), n_per)
    x = (centres[labels] + rng.normal(size=(labels.size, dim))).astype(np.float32)
    return x, labels, centres, rng


# ----------------------------------------------------------------------------------------- random
def test_random_is_a_seeded_uniform_subset():
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    sel = RandomSelector()
    a = sel.select(x, x[:3], 30, seed=3).indices
    assert sorted(a.tolist()) == list(range(30))  # k = n: a permutation
    assert np.array_equal(a, sel.select(x, x[:3], 30, seed=3).indices)
    assert not np.array_equal(a, sel.select(x, x[:3], 30, seed=4).indices)
    # Uniformity: over 3000 seeds, the first draw is uniform on the 30 rows (chi-square test).
    first = [sel.select(x, x[:3], 1, seed=s).indices[0] for s in range(3000)]
    counts = np.bincount(first, minlength=30)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_random_with_replacement_allows_k_above_n():
    x = np.zeros((5, 2), dtype=np.float32)
    idx = RandomSelector(replace=True).select(x, x, 50, seed=0).indices
    assert idx.shape == (50,) and set(idx.tolist()) <= set(range(5)) and len(set(idx.tolist())) == 5


# ------------------------------------------------------------------------------------- similarity
def test_similarity_mean_and_max_equal_sklearn_cosine():
    x, _, _, rng = _clusters()
    y = rng.normal(size=(7, x.shape[1])).astype(np.float32)
    cos = cosine_similarity(x.astype(np.float64), y.astype(np.float64))
    for block in (3, 16384):
        np.testing.assert_allclose(SimilaritySelector(reduce="mean", block_size=block).score(x, y), cos.mean(1), atol=1e-6)
        np.testing.assert_allclose(SimilaritySelector(reduce="max", block_size=block).score(x, y), cos.max(1), atol=1e-6)


def _round_robin_reference(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Plain loop: each target point in turn offers its next nearest candidate; repeats skipped."""
    cos = cosine_similarity(x.astype(np.float64), y.astype(np.float64))
    lists = [sorted(range(len(x)), key=lambda i: (-cos[i, j], i)) for j in range(len(y))]
    seen: list[int] = []
    for r in range(len(x)):
        for j in range(len(y)):
            if lists[j][r] not in seen:
                seen.append(lists[j][r])
    return seen


@pytest.mark.parametrize("block", [7, 16384])
def test_round_robin_top_k_reproduces_the_reference_order(block):
    x, _, _, rng = _clusters(n_per=12)
    y = rng.normal(size=(4, x.shape[1])).astype(np.float32)
    ref = _round_robin_reference(x, y)
    sel = SimilaritySelector(reduce="round_robin", block_size=block)
    for k in (1, 4, 9, len(x)):
        assert sel.select(x, y, k).indices.tolist() == ref[:k]


def test_round_robin_rounds_are_knn_tapt_unions_and_truncation_is_exact_on_its_prefix():
    x, _, _, rng = _clusters(n_per=20)
    y = rng.normal(size=(5, x.shape[1])).astype(np.float32)
    cos = cosine_similarity(x, y)
    full = SimilaritySelector(reduce="round_robin").score(x, y)
    for r in (1, 3, 6):
        union = set(np.argsort(-cos, axis=0, kind="stable")[:r].ravel().tolist())
        top = np.argsort(-full, kind="stable")[: len(union)]
        assert set(top.tolist()) == union
    short = SimilaritySelector(reduce="round_robin", n_neighbors=6)
    s = short.score(x, y)
    reached = short.diagnostics_["n_reached"]
    assert np.array_equal(np.argsort(-s, kind="stable")[:reached], np.argsort(-full, kind="stable")[:reached])
    rest = np.argsort(-s, kind="stable")[reached:]  # the others follow by max cosine
    assert np.all(np.diff(cos.max(1)[rest]) <= 1e-6)


def test_similarity_finds_the_planted_cluster():
    x, labels, centres, rng = _clusters(n_per=40)
    y = (centres[2] + rng.normal(size=(10, x.shape[1]))).astype(np.float32)
    for reduce in ("mean", "max", "round_robin"):
        idx = get_selector("similarity", reduce=reduce).select(x, y, 40).indices
        assert (labels[idx] == 2).mean() >= 0.95, reduce


# ------------------------------------------------------------------------------------------- DSIR
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def _rows(name: str) -> list[dict]:
    with (SAMPLE / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _exact_log_weights(cands: list[str], target: list[str], delta: float = 1e-8) -> np.ndarray:
    """The DSIR log weight from unhashed n-gram dictionaries (equal to the hashed one without collisions)."""
    tgt = Counter(g for t in target for g in dsir_ngrams(t))
    raw = Counter(g for t in cands for g in dsir_ngrams(t))
    nt, nr = sum(tgt.values()), sum(raw.values())
    out = []
    for t in cands:
        c = Counter(dsir_ngrams(t))
        out.append(sum(v * (np.log(tgt[g] / nt + delta) - np.log(raw[g] / nr + delta)) for g, v in c.items()))
    return np.array(out)


def test_dsir_ngrams_match_the_reference_tokeniser():
    nltk = pytest.importorskip("nltk.tokenize")
    text = "Aspirin (ASA) inhibits COX-1; it's 2.5x stronger!  Über café."
    words = nltk.WordPunctTokenizer().tokenize(text.lower())
    assert dsir_ngrams(text, 1) == words
    assert dsir_ngrams(text, 2) == words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _bucket(gram: str, buckets: int) -> int:
    """scikit-learn's HashingVectorizer index: |signed MurmurHash3 (seed 0)| mod n_features."""
    from sklearn.utils import murmurhash3_32

    return abs(murmurhash3_32(gram, seed=0)) % buckets


def _clean_rows(texts: list[str], others: list[str], bucket) -> np.ndarray:
    """Rows of ``texts`` none of whose n-grams shares a bucket with another n-gram of the corpus."""
    grams = {g for t in texts + others for g in dsir_ngrams(t)}
    owners = Counter(bucket(g) for g in grams)
    return np.array([all(owners[bucket(g)] == 1 for g in dsir_ngrams(t)) for t in texts])


def test_dsir_log_weights_equal_a_direct_computation():
    pool = [r["text"] for r in _rows("pool.jsonl")[:120]]
    target = [r["text"] for r in _rows("target.jsonl")[:40]]
    buckets = 5000
    got = DSIRSelector(num_buckets=buckets, chunk_tokens=None).score(pool, target)
    # Same formula with dictionaries keyed by bucket: equal whatever the collisions.
    tgt = Counter(_bucket(g, buckets) for t in target for g in dsir_ngrams(t))
    raw = Counter(_bucket(g, buckets) for t in pool for g in dsir_ngrams(t))
    nt, nr = sum(tgt.values()), sum(raw.values())
    ref = [
        sum(v * (np.log(tgt[b] / nt + 1e-8) - np.log(raw[b] / nr + 1e-8)) for b, v in Counter(_bucket(g, buckets) for g in dsir_ngrams(t)).items())
        for t in pool
    ]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-7)
    # With many buckets, texts free of collisions get the exact (unhashed) n-gram weight.
    buckets = 2**24
    clean = _clean_rows(pool, target, lambda g: _bucket(g, buckets))
    assert clean.mean() > 0.8
    got = DSIRSelector(num_buckets=buckets, chunk_tokens=None).score(pool, target)
    np.testing.assert_allclose(got[clean], _exact_log_weights(pool, target)[clean], rtol=1e-9, atol=1e-6)


def test_dsir_scores_long_rows_per_chunk_and_short_rows_from_their_own_ngrams():
    """Score = log weight of the scored n-grams per chunk's worth of n-grams; direct computation.

    Long rows: the mean over complete chunks of the chunk's log weight. Short rows: the sum over
    their own n-grams times G(chunk) / G(row), G = number of uni+bigrams. Empty rows: never chosen.
    """
    pool = [r["text"] for r in _rows("pool.jsonl")[:150]] + ["", " \n "]
    target = [r["text"] for r in _rows("target.jsonl")[:40]]
    chunk, buckets = 30, 5000
    sel = DSIRSelector(num_buckets=buckets, chunk_tokens=chunk)
    got = sel.score(pool, target)
    # the models are fitted on whole rows, as without chunks
    tgt = Counter(_bucket(g, buckets) for t in target for g in dsir_ngrams(t))
    raw = Counter(_bucket(g, buckets) for t in pool for g in dsir_ngrams(t))
    nt, nr = sum(tgt.values()), sum(raw.values())
    logw = {b: np.log(tgt[b] / nt + 1e-8) - np.log(raw[b] / nr + 1e-8) for b in set(tgt) | set(raw)}
    expected, lengths = [], []
    for t in pool:
        words = re.findall(r"\w+|[^\w\s]+", t.lower())
        lengths.append(len(words))
        pieces = [words[i : i + chunk] for i in range(0, len(words) - chunk + 1, chunk)]
        per_chunk = [sum(logw[_bucket(g, buckets)] for g in dsir_ngrams(" ".join(p))) for p in pieces]
        if per_chunk:
            expected.append(np.mean(per_chunk))
        elif words:  # G(L) = L unigrams + (L - 1) bigrams, G(30) = 59
            expected.append(sum(logw[_bucket(g, buckets)] for g in dsir_ngrams(t)) * 59 / (2 * len(words) - 1))
        else:
            expected.append(-np.inf)
    expected, lengths = np.array(expected), np.array(lengths)
    short = (lengths > 0) & (lengths < chunk)
    assert 10 < short.sum() < len(pool) - 30  # both kinds present, so the test has power
    np.testing.assert_array_equal(np.isinf(got), lengths == 0)
    np.testing.assert_allclose(got[lengths > 0], expected[lengths > 0], rtol=1e-9, atol=1e-7)
    assert ngrams_per_chunk(30, 2) == 59 and ngrams_per_chunk(1, 3) == 1 and ngrams_per_chunk(0, 2) == 0
    assert dsir_chunk_ngrams("a b c d e", 1, 2) == ["a", "b", "c", "d"]  # the tail "e" does not count
    assert dsir_chunk_ngrams("a b", 2, 5) == ["a", "b", "a b"]  # shorter than a chunk: its own n-grams
    assert sel.diagnostics_["rows_below_chunk"] == int((lengths < chunk).sum()) and sel.diagnostics_["chunk_tokens"] == chunk
    # short rows are chosen like any other; empty ones never; more than the rows with a token is refused
    n_ok = len(pool) - 2
    for resample in (True, False):
        s = DSIRSelector(num_buckets=buckets, chunk_tokens=chunk, resample=resample)
        res = s.select(pool, target, n_ok, seed=0)
        assert len(set(res.indices.tolist())) == n_ok and (lengths[res.indices] > 0).all()
        if not resample:  # top-k follows the scores
            np.testing.assert_array_equal(res.indices, np.lexsort((np.arange(len(pool)), -res.scores))[:n_ok])
        with pytest.raises(ValueError, match=f"The 'k' parameter of DSIRSelector.select must be at most the {n_ok} rows with at least one word or punctuation token"):
            s.select(pool, target, n_ok + 1, seed=0)


def test_dsir_matches_the_data_selection_package(tmp_path):
    ds = pytest.importorskip("data_selection")
    # Recent nltk tokenises with the `regex` engine, whose \w also takes combining marks (U+0333
    # in one pool text); the stdlib `re` we use (as older nltk did) splits them off. Keep the texts
    # on which the two tokenisers agree, so both fit the same n-gram totals.
    wpt = ds.hashed_ngram_dsir.wpt
    agree = [t for t in (r["text"] for r in _rows("pool.jsonl")) if wpt.tokenize(t.lower()) == dsir_ngrams(t, 1)]
    pool = agree[:60]
    target = [r["text"] for r in _rows("target.jsonl")[:30]]
    assert all(wpt.tokenize(t.lower()) == dsir_ngrams(t, 1) for t in target)
    for name, texts in (("raw", pool), ("tgt", target)):
        with (tmp_path / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    buckets = 2**21
    ref = ds.HashedNgramDSIR(
        [str(tmp_path / "raw.jsonl")], [str(tmp_path / "tgt.jsonl")], str(tmp_path / "cache"),
        num_proc=1, num_buckets=buckets, min_example_length=0,
    )
    ref.fit_importance_estimator(num_tokens_to_fit="all")
    ref.compute_importance_weights()
    theirs = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")
    # The two hash functions (their SHA-256, our MurmurHash3) collide on different n-grams; on the
    # texts where neither collides, both equal the exact n-gram weight, hence each other.
    ours = DSIRSelector(num_buckets=buckets, chunk_tokens=None).score(pool, target)
    sha = ds.hashed_ngram_dsir.hash_buckets
    clean = _clean_rows(pool, target, lambda g: _bucket(g, buckets)) & _clean_rows(pool, target, lambda g: sha(g, buckets))
    assert clean.sum() >= 30
    np.testing.assert_allclose(ours[clean], theirs[clean], rtol=1e-9, atol=1e-6)
    assert stats.spearmanr(ours, theirs).statistic > 0.99
    # Default length rule (chunks of 100 tokens, the package's default min_example_length). The rows
    # the package drops by default (per-example length metadata < 100) are where we differ on
    # purpose: we score them from their own n-grams, scaled to one chunk, i.e. the package's
    # whole-row weight times G(100) / G(L) (199 uni+bigrams in a chunk, 2L - 1 in the row).
    lengths = np.load(tmp_path / "cache" / "perexample_metadata" / "0.npy")
    assert inspect.signature(ds.HashedNgramDSIR).parameters["min_example_length"].default == 100
    dropped = lengths < 100
    assert 0 < (dropped & clean).sum() and 0 < dropped.sum() < len(pool)
    chunked = DSIRSelector(num_buckets=buckets)
    scored = chunked.score(pool, target)
    assert np.isfinite(scored).all() and chunked.diagnostics_["rows_below_chunk"] == int(dropped.sum())
    np.testing.assert_allclose(scored[dropped & clean], (theirs * 199 / (2 * lengths - 1))[dropped & clean], rtol=1e-9, atol=1e-6)


def test_dsir_prefers_the_target_domain_and_resampling_is_deterministic():
    rows = _rows("pool.jsonl")
    pool = [r["text"] for r in rows]
    domain = np.array([r["domain"] for r in rows])
    target = [r["text"] for r in _rows("target.jsonl")]  # ChemProt sentences, median 32 tokens
    # Whole rows (plain sums): the shortest fragments win, movie-review snippets (median 20 tokens).
    whole = DSIRSelector(chunk_tokens=None).select(pool, target, 50, seed=0)
    assert (domain[whole.indices] == "movie_reviews").mean() > 0.8
    # Every score on the scale of one 100-token chunk (short rows length-normalised): biomedical
    # language (abstracts and citation sentences from papers) is the majority. Measured: 55 of 100,
    # 33 movie snippets (made of n-grams rare in the pool, which the delta smoothing penalises
    # less than domain terms unseen in a 150-sentence target; see the class docstring).
    sel = DSIRSelector()
    res = sel.select(pool, target, 100, seed=0)
    assert np.isin(domain[res.indices], ["biomedical", "citations"]).mean() >= 0.5
    assert (domain[res.indices] == "movie_reviews").mean() < 0.4
    assert np.array_equal(res.indices, sel.select(pool, target, 100, seed=0).indices)
    top = DSIRSelector(resample=False).select(pool, target, 100).indices
    assert np.array_equal(top, np.argsort(-res.scores, kind="stable")[:100])
    # (the seed's effect on draws: test_dsir_resampling_draws_proportionally_to_the_weights)


def test_dsir_resampling_draws_proportionally_to_the_weights():
    # Unigrams only: raw frequencies are uniform, target ones 3:2:1:1, so w is proportional to
    # (3, 2, 1, 1). Draw the first row 3000 times and compare its frequencies with w / sum(w).
    sel = DSIRSelector(ngrams=1, num_buckets=64, chunk_tokens=None)
    pool = ["alpha", "beta", "gamma", "delta"]
    target = ["alpha alpha alpha beta beta gamma delta"]
    logw = sel.score(pool, target)
    p = np.exp(logw - logw.max())
    p /= p.sum()
    np.testing.assert_allclose(p, np.array([3, 2, 1, 1]) / 7, rtol=1e-6)
    assert p.min() > 0.02  # every row has a visible share, so the test has power
    firsts = np.bincount([sel.select(pool, target, 1, seed=s).indices[0] for s in range(3000)], minlength=4)
    assert stats.chisquare(firsts, 3000 * p).pvalue > 1e-3


def test_dsir_parameter_errors():
    with pytest.raises(ValueError, match="'num_buckets' parameter of DSIRSelector"):
        DSIRSelector(num_buckets=0).score(["a"], ["a"])
    with pytest.raises(TypeError, match="'candidates' parameter"):
        DSIRSelector().score(["a", 3], ["a"])
    with pytest.raises(ValueError, match="'target' parameter"):
        DSIRSelector().score(["a b"], ["   "])


# DSIR on short texts, real data (shared/data, SOURCES.md): headlines, tweet-like comments, phrases.
def _ag_news(data: Path, start: int, n: int) -> tuple[list[str], list[str]]:
    """AG News test rows ``start..start+n``: (titles, title + description)."""
    with (data / "ag_news" / "test.csv").open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[start : start + n]
    return [r[1] for r in rows], [f"{r[1]} {r[2]}" for r in rows]


def _short_pool(data: Path) -> tuple[list[str], np.ndarray]:
    """150 news headlines, 150 SST-2 movie phrases, the Jigsaw comments of at most 40 words of one file."""
    news, _ = _ag_news(data, 1000, 150)
    with (data / "sst2" / "test.tsv").open(encoding="utf-8") as fh:
        movie = [r[0] for r in list(csv.reader(fh, delimiter="\t"))[1:151]]
    with (data / "jigsaw_toxic_pools" / "test.a.ok.200.csv").open(encoding="utf-8") as fh:
        comments = [r["comment_text"] for r in csv.DictReader(fh) if len(r["comment_text"].split()) <= 40]
    return news + movie + comments, np.array(["news"] * 150 + ["movie"] * 150 + ["comment"] * len(comments))


@pytest.mark.slow
def test_dsir_on_a_pool_of_short_texts_takes_the_target_domain_as_similarity_does(shared_data, tmp_path):
    """Every row is shorter than the 100-token chunk (medians 7, 20, 25 tokens): DSIR scores each from
    its own n-grams, and its share of news for a 200-headline target is within 0.1 of cosine
    similarity's (measured: DSIR 0.93 / 0.87 / 0.62, similarity 0.90 / 0.81 / 0.64 at k = 40 / 75 /
    150; headlines and comments only: 0.98 / 0.95 / 0.71 against 0.93 / 0.91 / 0.75). Before, DSIR
    refused: 'k must be at most the 0 rows with at least chunk_tokens=100 tokens'."""
    from hf_otselect.embed import embed

    pool, domain = _short_pool(shared_data)
    target, _ = _ag_news(shared_data, 5000, 200)
    assert max(len(dsir_ngrams(t, 1)) for t in pool) < 100
    vectors = embed(pool + target, max_length=64, cache_dir=tmp_path, show_progress=False)
    for keep in (np.arange(len(pool)), np.flatnonzero(domain != "movie")):
        texts, dom, x = [pool[i] for i in keep], domain[keep], vectors[keep]
        sel = DSIRSelector()
        scores = sel.score(texts, target)
        assert np.isfinite(scores).all() and sel.diagnostics_["rows_below_chunk"] == len(texts)
        for k in (40, 75, 150):
            dsir = (dom[DSIRSelector().select(texts, target, k, seed=0).indices] == "news").mean()
            sim = (dom[SimilaritySelector().select(x, vectors[len(pool) :], k).indices] == "news").mean()
            assert dsir >= sim - 0.1, (len(texts), k, dsir, sim)


def test_dsir_in_a_mixed_pool_neither_long_nor_short_rows_win_by_length(shared_data):
    """AG News items (median 48 tokens, under a chunk) + IMDB reviews (186) + PubMedQA abstracts (252):
    each target takes its own domain (measured 0.98 / 0.95 / 1.0). Before, the headline target got
    only reviews and abstracts (the news rows were never chosen); on whole rows (plain sums) the
    abstract target gets mostly news (the shortest rows)."""
    _, news = _ag_news(shared_data, 0, 150)
    headlines, _ = _ag_news(shared_data, 5000, 100)
    reviews = [p.read_text(encoding="utf-8").replace("<br />", " ") for p in sorted((shared_data / "imdb" / "train" / "pos").glob("*.txt"))[:200]]
    abstracts = [" ".join(v["CONTEXTS"]) for v in list(json.loads((shared_data / "pubmedqa" / "ori_pqal.json").read_text()).values())[:200]]
    pool = news + reviews[:150] + abstracts[:150]
    domain = np.array(["news"] * 150 + ["reviews"] * 150 + ["abstracts"] * 150)
    tokens = np.array([len(dsir_ngrams(t, 1)) for t in pool])
    assert np.median(tokens[domain == "news"]) < 100 < np.median(tokens[domain != "news"])
    for name, target in (("news", headlines), ("reviews", reviews[150:]), ("abstracts", abstracts[150:])):
        for resample in (True, False):
            idx = DSIRSelector(resample=resample).select(pool, target, 60, seed=0).indices
            assert (domain[idx] == name).mean() >= 0.9, (name, resample, np.unique(domain[idx], return_counts=True))
    whole = DSIRSelector(chunk_tokens=None).select(pool, abstracts[150:], 60, seed=0).indices
    assert (domain[whole] == "abstracts").mean() < 0.5  # the length effect the chunk scale removes


@pytest.mark.parametrize("pool,target", [
    (["Stocks rally as oil prices fall"], ["Oil prices fall again"]),  # a one-row pool
    (["Oil", "rally", "!", "film"], ["Oil prices fall", "Oil rally"]),  # one token each
    (["Wall St. Bears Claw Back Into the Black (Reuters)", "what a film !", "ok"], ["Stocks end higher (Reuters)"]),
])
def test_dsir_works_on_the_shortest_pools(pool, target):
    for resample in (True, False):
        res = DSIRSelector(resample=resample).select(pool, target, len(pool), seed=0)
        assert sorted(res.indices.tolist()) == list(range(len(pool))) and np.isfinite(res.scores).all()
        assert DSIRSelector(resample=resample).select(pool, target, 1, seed=0).indices[0] == int(np.argmax(res.scores))


# ------------------------------------------------------------------------- DSIR on a streamed pool
@pytest.mark.parametrize("world", [1, 2, 3])
def test_dsir_on_a_streamed_pool_gives_the_in_memory_weights_and_rows(world):
    """Each rank reads its file shards of a stream through StreamTexts (one pass counts and checks,
    then the fit's and the scoring's passes): the n-gram counts all-reduce to the in-memory pool's,
    every row's weight is the in-memory weight bit for bit, and the same rows come out."""
    from datasets import Dataset

    from hf_otselect.dist import TextView
    from hf_otselect.stream_texts import StreamTexts
    from tests._thread_comm import run_ranks
    from tests.conftest import SAMPLE, read_jsonl

    rows = read_jsonl(SAMPLE / "pool.jsonl", 150)
    texts, target = [r["text"] for r in rows], [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 20)]
    sel = DSIRSelector(batch_size=16)  # several blocks per rank: the view's slices continue one pass
    expected = sel.score(texts, target)
    chosen = sel.choose_rows(expected, 12, seed=4)

    def part(comm):
        stream = Dataset.from_list(rows).to_iterable_dataset(num_shards=6)  # one per rank, as each process has its own
        mine = stream.shard(num_shards=comm.world_size, index=comm.rank, contiguous=True) if comm.world_size > 1 else stream
        view = TextView.of(StreamTexts(mine, "text", owner="test"), comm)
        state = DSIRSelector(batch_size=16).fit(view, target, comm=comm)
        blocks = list(view.blocks(16))
        scores = np.concatenate([DSIRSelector().score_batch(state, t, i) for i, t in blocks]) if blocks else np.zeros(0)
        index = np.concatenate([i for i, _ in blocks]) if blocks else np.zeros(0, dtype=np.int64)
        return scores, index, sel.choose_rows(scores, 12, seed=4, index=index, comm=comm)

    ranks = run_ranks(world, part)
    assert np.array_equal(np.concatenate([r[1] for r in ranks]), np.arange(150))
    assert np.array_equal(np.concatenate([r[0] for r in ranks]), expected)
    assert all(r[2].tolist() == chosen.tolist() for r in ranks)


def test_stream_texts_checks_every_row_before_a_fit_and_reads_slices_in_passes():
    from datasets import Dataset

    from hf_otselect.stream_texts import StreamTexts

    stream = Dataset.from_list([{"text": f"row {i}"} for i in range(10)]).to_iterable_dataset(num_shards=2)
    texts = StreamTexts(stream, "text", owner="select_by_ot")
    assert len(texts) == 10 and texts[2:5] == ["row 2", "row 3", "row 4"] and texts[5:7] == ["row 5", "row 6"]
    assert texts[0:2] == ["row 0", "row 1"] and texts[-1] == "row 9"  # a new pass from the start
    bad = Dataset.from_list([{"text": "ok"}] * 5 + [{"text": "  "}]).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"select_by_ot must hold non-empty texts in column 'text'.*row\(s\) \[5\]"):
        StreamTexts(bad, "text", owner="select_by_ot")


def test_dsir_selects_from_a_streamed_pool_what_it_selects_in_memory(tmp_path):
    """run_selection with a streamed pool (formerly refused: 'an in-memory Dataset for the text
    selector') at 1, 2 and 3 ranks: the in-memory pool's chosen rows, scores and selected split."""
    from datasets import Dataset

    from hf_otselect.datasets_ext import run_selection
    from tests._thread_comm import run_ranks
    from tests.conftest import SAMPLE, read_jsonl

    pool = Dataset.from_list(read_jsonl(SAMPLE / "pool.jsonl", 120))
    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 20)]

    def runs(data, world, name):
        def part(comm):
            # each rank its own stream object, as each process has (threads sharing one race inside datasets)
            r = run_selection(data() if callable(data) else data, target, "dsir", 12, seed=3, cache_dir=tmp_path / name, comm=comm)
            return r.result.indices.tolist(), r.result.scores, r.selected.to_dict()

        ranks = run_ranks(world, part)
        merged = {key: sum((r[2][key] for r in ranks), []) for key in ranks[0][2]}
        return ranks[0][0], np.concatenate([r[1] for r in ranks]), merged

    one = runs(pool, 1, "m1")
    assert len(one[0]) == 12 and np.isfinite(one[1]).all()
    for world in (1, 2, 3):
        got = runs(lambda: pool.to_iterable_dataset(num_shards=6), world, f"s{world}")
        assert got[0] == one[0] and np.array_equal(got[1], one[1]) and got[2] == one[2], world


def test_dsir_with_the_guard_embeds_a_stream_once_and_selects_the_in_memory_rows(tmp_path):
    """DSIR + guard on a stream without vectors handed in: the encoder pass fingerprints the stream,
    the text pass counts it, and the rows, scores and fingerprint equal the in-memory pool's."""
    from datasets import Dataset

    from hf_otselect.datasets_ext import run_selection
    from tests.conftest import SAMPLE, read_jsonl

    rows = read_jsonl(SAMPLE / "pool.jsonl", 30)
    pool = Dataset.from_list(rows + rows[:6])  # six texts twice: the guard skips the second copies
    target = [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 10)]
    kw = {"seed": 1, "dedup_radius": 0.2, "embedding": {"max_length": 32}, "resample": False}
    mem = run_selection(pool, target, "dsir", 20, cache_dir=tmp_path / "m", **kw)
    streamed = run_selection(pool.to_iterable_dataset(num_shards=2), target, "dsir", 20, cache_dir=tmp_path / "s", **kw)
    texts = [pool[int(i)]["text"] for i in mem.result.indices]
    assert len(set(texts)) == 20 and mem.dedup["mode"] == "greedy" and mem.dedup["skipped"] > 0
    assert streamed.result.indices.tolist() == mem.result.indices.tolist() and streamed.dedup == mem.dedup
    assert np.array_equal(streamed.result.scores, mem.result.scores)
    assert streamed.fingerprints["pool"].startswith("stream:") and streamed.fingerprints["pool"].endswith(":36:text")
