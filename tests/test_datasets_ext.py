from __future__ import annotations

import collections

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, load_dataset

import hf_otselect
from hf_otselect import available_selectors, select_by_ot
from hf_otselect.datasets_ext import register_dataset_methods
from tests.conftest import SAMPLE, read_jsonl

EMB = {"max_length": 64}


@pytest.fixture(scope="module")
def pool() -> Dataset:
    rows = read_jsonl(SAMPLE / "pool.jsonl")
    per_domain = collections.defaultdict(list)
    for row in rows:
        if len(per_domain[row["domain"]]) < 12:
            per_domain[row["domain"]].append(row)
    return Dataset.from_list([r for group in per_domain.values() for r in group])


@pytest.fixture(scope="module")
def target() -> list[str]:
    return [r["text"] for r in read_jsonl(SAMPLE / "target.jsonl", 20)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("method", sorted(available_selectors()))
def test_every_selector_returns_k_rows_with_scores(pool, target, cache, method):
    out = pool.select_by_ot(target, method=method, k=6, cache_dir=cache, embedding=EMB)
    assert isinstance(out, Dataset)
    assert len(out) == 6
    sampled = ["draw_order"] if method in ("tsds", "random", "dsir") else []
    assert out.column_names == ["text", "domain", "pool_index", "score", "rank", *sampled]
    assert np.isfinite(out["score"]).all()
    for row in out:  # the index really points back into the pool
        assert pool[row["pool_index"]]["text"] == row["text"]


def test_return_scored_is_consistent(pool, target, cache):
    dd = select_by_ot(pool, target, "got_d", 10, cache_dir=cache, embedding=EMB, return_scored=True, score_column="gain")
    assert isinstance(dd, DatasetDict) and set(dd) == {"scored", "selected"}
    scored, selected = dd["scored"], dd["selected"]
    assert len(scored) == len(pool) and scored["pool_index"] == list(range(len(pool)))
    assert sum(scored["selected"]) == 10
    assert {i for i, t in zip(scored["pool_index"], scored["selected"]) if t} == set(selected["pool_index"])
    # top-k: the selection is exactly ranks 1..k, best first, and scores decrease
    assert selected["rank"] == list(range(1, 11))
    assert selected["gain"] == sorted(selected["gain"], reverse=True)
    assert min(selected["gain"]) >= max(s for s, t in zip(scored["gain"], scored["selected"]) if not t)


def test_same_call_twice_hits_the_score_cache(pool, target, cache, monkeypatch):
    from hf_otselect.selectors.got_d import GOTDSelector

    first = select_by_ot(pool, target, "got_d", 5, cache_dir=cache, embedding=EMB)
    calls = []
    original = GOTDSelector.fit
    monkeypatch.setattr(GOTDSelector, "fit", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = select_by_ot(pool, target, "got_d", 5, cache_dir=cache, embedding=EMB)
    assert calls == []
    assert first["pool_index"] == second["pool_index"]
    select_by_ot(pool, target, "got_d", 5, cache_dir=cache, embedding=EMB, eps=0.3)  # other params: a miss
    assert calls == [1]


def test_encoder_settings_work_as_keywords_and_agree_with_the_embedding_dict(pool, target, cache):
    by_kw = select_by_ot(pool, target, "similarity", 6, cache_dir=cache, max_length=64, batch_size=8, num_proc=1)
    by_dict = select_by_ot(pool, target, "similarity", 6, cache_dir=cache, embedding={"max_length": 64, "batch_size": 8, "num_proc": 1})
    assert by_kw["pool_index"] == by_dict["pool_index"]
    with pytest.raises(ValueError, match="'max_length' parameter of select_by_ot must be the same value as embedding"):
        select_by_ot(pool, target, "similarity", 6, cache_dir=cache, max_length=32, embedding={"max_length": 64})


def test_an_unknown_keyword_names_the_selector_keywords_and_the_embedding_dict(pool, target, cache):
    with pytest.raises(TypeError, match=r"'pooling_mode' parameter of select_by_ot .*eps.*embedding=\{\.\.\.\}"):
        select_by_ot(pool, target, "got_d", 6, cache_dir=cache, pooling_mode="cls")


def test_solver_device_goes_to_the_solver_and_device_to_the_encoder(pool, target, cache, monkeypatch):
    from hf_otselect.selectors.got_d import GOTDSelector

    seen = []
    original = GOTDSelector.fit
    monkeypatch.setattr(GOTDSelector, "fit", lambda self, *a, **k: seen.append(self.device) or original(self, *a, **k))
    select_by_ot(pool, target, "got_d", 6, cache_dir=cache, embedding=EMB, device="cpu", solver_device="cpu", eps=0.11)
    assert seen == ["cpu"]
    with pytest.raises(ValueError, match="'solver_device' parameter of select_by_ot"):
        select_by_ot(pool, target, "similarity", 6, cache_dir=cache, embedding=EMB, solver_device="cpu")


def test_disable_caching_is_honoured(pool, target, tmp_path):
    import datasets

    datasets.disable_caching()
    try:
        select_by_ot(pool, target, "similarity", 6, cache_dir=tmp_path, embedding=EMB)
    finally:
        datasets.enable_caching()
    assert not list(tmp_path.rglob("*.npy"))  # neither vectors nor scores were cached
    select_by_ot(pool, target, "similarity", 6, cache_dir=tmp_path, embedding=EMB)
    assert list(tmp_path.rglob("*.npy"))


def test_target_as_embeddings_equals_target_as_text(pool, target, cache):
    emb = hf_otselect.embed(target, cache_dir=cache / "embeddings", **EMB)
    by_text = select_by_ot(pool, target, "similarity", 8, cache_dir=cache, embedding=EMB)
    by_emb = select_by_ot(pool, emb, "similarity", 8, cache_dir=cache, embedding=EMB)
    assert by_text["pool_index"] == by_emb["pool_index"]


def test_streamed_pool_gives_the_in_memory_selection(pool, target, cache, tmp_path):
    path = tmp_path / "pool.jsonl"
    pool.to_json(str(path))
    stream = load_dataset("json", data_files=str(path), split="train", streaming=True)
    in_memory = select_by_ot(pool, target, "got_d", 7, cache_dir=cache, embedding=EMB, return_scored=True)
    streamed = stream.select_by_ot(target, method="got_d", k=7, cache_dir=cache, embedding=EMB, return_scored=True)
    assert streamed["selected"]["pool_index"] == in_memory["selected"]["pool_index"]
    assert streamed["selected"]["text"] == in_memory["selected"]["text"]
    np.testing.assert_allclose(streamed["scored"]["score"], in_memory["scored"]["score"], rtol=1e-6, atol=1e-9)


def test_bad_arguments_fail_before_work(pool, target, cache):
    with pytest.raises(ValueError, match=r"Column 'body' not in the dataset. Current columns: \['text', 'domain'\]"):
        select_by_ot(pool, target, "got_d", 5, column="body", cache_dir=cache)
    with pytest.raises(ValueError, match=r"The 'k' parameter of select_by_ot must be an int in \[1, 72\]"):
        select_by_ot(pool, target, "got_d", len(pool) + 1, cache_dir=cache)
    with pytest.raises(TypeError, match=r"'k' parameter .* Got 2.5 instead"):
        select_by_ot(pool, target, "got_d", 2.5, cache_dir=cache)
    with pytest.raises(ValueError, match="'target'.*empty"):
        select_by_ot(pool, [], "got_d", 5, cache_dir=cache)
    with pytest.raises(ValueError, match="'dataset'.*0 rows"):
        select_by_ot(pool.select([]), target, "got_d", 5, cache_dir=cache)
    with pytest.raises(ValueError, match="'method'"):
        select_by_ot(pool, target, "magic", 5, cache_dir=cache)
    with pytest.raises(ValueError, match="'negative_target'.*only GOT-D"):
        select_by_ot(pool, target, "similarity", 5, negative_target=target, cache_dir=cache)
    with pytest.raises(ValueError, match="'score_column'"):
        select_by_ot(pool, target, "got_d", 5, score_column="domain", cache_dir=cache)
    with pytest.raises(ValueError, match="'embedding'"):
        select_by_ot(pool, target, "got_d", 5, embedding={"modle": "x"}, cache_dir=cache)
    with pytest.raises(ValueError, match="'target'.*384 columns"):
        select_by_ot(pool, np.ones((3, 5), np.float32), "got_d", 5, cache_dir=cache, embedding=EMB)


def test_registration_never_overwrites(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(Dataset, "select_by_ot", sentinel, raising=False)
    register_dataset_methods()
    assert Dataset.select_by_ot is sentinel


def test_got_d_prefers_the_target_domain_on_real_data(target, cache):
    """Planted truth on real text: a ChemProt target draws from the biomedical science domains.

    ChemProt rows are single biomedical sentences; SciCite citation sentences are mostly biomedical
    single sentences too, so both count as the target's domain. News, reviews and code must not come.
    """
    rows = read_jsonl(SAMPLE / "pool.jsonl")
    per_domain = collections.defaultdict(list)
    for row in rows:
        if len(per_domain[row["domain"]]) < 40:
            per_domain[row["domain"]].append(row)
    pool = Dataset.from_list([r for group in per_domain.values() for r in group])
    picked = select_by_ot(pool, target, "got_d", 20, cache_dir=cache, embedding=EMB)
    counts = collections.Counter(picked["domain"])
    assert counts["biomedical"] + counts["citations"] == 20, counts


def test_a_streamed_pool_leaves_no_working_file_behind(pool, target, tmp_path):
    path = tmp_path / "pool.jsonl"
    pool.to_json(str(path))
    stream = load_dataset("json", data_files=str(path), split="train", streaming=True)
    cache = tmp_path / "cache"
    stream.select_by_ot(target, method="similarity", k=3, cache_dir=cache, embedding=EMB)
    assert list((cache / "streams").glob("*")) == []
    assert list((cache / "embeddings").rglob("*.npy"))  # the content cache itself stays


# -- issue 16: every field of the score cache key, checked by counting fits -------------------------

# One other valid value for every constructor parameter of every selector. A new parameter with no
# entry here fails the test below, so the table (and the cache key) cannot silently fall behind.
_OTHER_VALUE = {
    "got_d": {"eps": 0.3, "eps_mode": "relative", "negative_weight": 0.5, "backend": "blocked", "tol": 1e-4,
              "max_iter": 50, "chunk_size": 30, "seed": 1, "device": "cpu", "eps_scaling": 3, "relaxation": 1.2,
              "init_g": np.linspace(-0.1, 0.1, 20)},  # one start per target row (20)
    "tsds": {"alpha": 0.3, "C": 2.0, "sigma": 0.5, "max_K": 20, "kde_K": 10, "kernel": "uniform", "replace": False,
             "index": "flat", "nprobe": 2, "density_nprobe": 2, "seed": 1, "budget": 50},
    "similarity": {"reduce": "max", "n_neighbors": 3, "block_size": 7},
    "dsir": {"ngrams": 1, "num_buckets": 500, "smoothing": 1e-4, "resample": False, "batch_size": 16, "chunk_tokens": 20},
    "random": {"replace": True},
}


@pytest.fixture
def fits(monkeypatch):
    """Names of the selectors whose ``fit`` ran (a fit = the scores were computed, not read)."""
    from hf_otselect.selectors import get_selector

    calls: list[str] = []
    for name in available_selectors():
        cls = type(get_selector(name))
        real = cls.fit
        monkeypatch.setattr(cls, "fit", lambda self, *a, _real=real, **kw: calls.append(self.name) or _real(self, *a, **kw))
    return calls


@pytest.mark.parametrize("method", sorted(available_selectors()))
def test_every_selector_parameter_is_in_the_score_cache_key(pool, target, tmp_path, fits, method):
    from hf_otselect.selectors import get_selector

    cache = tmp_path / "cache"
    params = get_selector(method).get_params()
    missing = sorted(set(params) - set(_OTHER_VALUE[method]) - {"negative_target"})
    assert not missing, f"no other value listed for {method} parameters {missing}"
    select_by_ot(pool, target, method, 6, cache_dir=cache, embedding=EMB)
    assert fits == [method]
    fits.clear()
    select_by_ot(pool, target, method, 6, cache_dir=cache, embedding=EMB)
    assert fits == []  # the same call: read from the cache
    needs_text = get_selector(method).needs_text
    pool_emb = None if needs_text else hf_otselect.embed(pool, cache_dir=cache / "embeddings", **EMB)
    target_emb = None if needs_text else hf_otselect.embed(target, cache_dir=cache / "embeddings", **EMB)
    for name, value in _OTHER_VALUE[method].items():
        fits.clear()
        # a Selector instance: select_by_ot's own `seed` is the choice's, not the selector's
        changed = get_selector(method, **{name: value})
        got = select_by_ot(pool, target, changed, 6, cache_dir=cache, embedding=EMB, return_scored=True)
        assert fits == [method], f"{method}: changing {name} read stale scores"
        # the scores are those of an uncached run with the changed parameter
        fresh = get_selector(method, **{name: value})
        want = fresh.score(pool["text"], target) if needs_text else fresh.score(pool_emb, target_emb)
        np.testing.assert_allclose(got["scored"]["score"], want, rtol=1e-6, atol=1e-9, err_msg=f"{method} {name}")


def test_pool_target_and_negative_target_are_in_the_score_cache_key(pool, target, tmp_path, fits):
    cache = tmp_path / "cache"
    kw = {"cache_dir": cache, "embedding": EMB}
    select_by_ot(pool, target, "got_d", 6, **kw)
    edited = pool.map(lambda row, i: {"text": row["text"] + " Edited." if i == 3 else row["text"]}, with_indices=True)
    for name, args in [("pool", (edited, target)), ("target", (pool, target[:-1]))]:
        fits.clear()
        select_by_ot(*args, "got_d", 6, **kw)
        assert fits == ["got_d"], name
    fits.clear()
    neg = [r["text"] for r in pool.select(range(5))]
    select_by_ot(pool, target, "got_d", 6, negative_target=neg, **kw)
    assert fits == ["got_d"]
    fits.clear()
    select_by_ot(pool, target, "got_d", 6, negative_target=neg[:-1], **kw)
    assert fits == ["got_d"], "negative target"
    fits.clear()  # dsir keys on the texts themselves
    select_by_ot(pool, target, "dsir", 6, **kw)
    select_by_ot(edited, target, "dsir", 6, **kw)
    select_by_ot(pool, target[:-1], "dsir", 6, **kw)
    assert fits == ["dsir"] * 3


@pytest.mark.parametrize("method", ["got_d", "tsds"])
def test_k_and_seed_reuse_the_scores_and_still_choose_afresh(pool, target, tmp_path, fits, method):
    """k and seed decide the choice, not the scores: a cache hit, and the rows of an uncached run.

    Except TSDS's k, which is its budget (it sizes the neighbourhoods when C is None): a new k is a
    new problem and must be solved again.
    """
    from hf_otselect.selectors import get_selector

    cache = tmp_path / "cache"
    select_by_ot(pool, target, method, 6, cache_dir=cache, embedding=EMB)
    pool_emb = hf_otselect.embed(pool, cache_dir=cache / "embeddings", **EMB)
    target_emb = hf_otselect.embed(target, cache_dir=cache / "embeddings", **EMB)
    fresh = get_selector(method, **({"budget": 6} if method == "tsds" else {}))
    scores = fresh.score(pool_emb, target_emb)
    if method == "tsds":
        fits.clear()
        select_by_ot(pool, target, method, 9, cache_dir=cache, embedding=EMB)
        assert fits == ["tsds"]  # the budget changed
    for k, seed in ([(6, 1), (6, 7)] if method == "tsds" else [(9, 0), (6, 1), (4, 7)]):
        fits.clear()
        got = select_by_ot(pool, target, method, k, seed=seed, cache_dir=cache, embedding=EMB)
        assert fits == []
        if method == "got_d":  # top-k by a plain sort: higher score first, ties to the lower row
            want = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        else:
            want = fresh.choose_rows(scores, k, seed=seed).tolist()
        assert got["pool_index"] == want, (k, seed)
