"""Embedding pipeline: exact against an independent transformers forward, cache, resume, streams."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModel, AutoTokenizer

from hf_otselect.embed import DEFAULT_MODEL, embed, embed_to_file, iter_embeddings, load_encoder, make_text_units

# The module itself: the package attribute hf_otselect.embed is the function.
embed_mod = importlib.import_module("hf_otselect.embed")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """36 real texts of the bundled pool's domains, up to 400 chars (short keeps the tests fast)."""
    rows = [json.loads(line) for line in (REPO / "data" / "sample" / "pool.jsonl").open(encoding="utf-8")]
    short = [r["text"] for r in rows if len(r["text"]) <= 400]
    return short[:: len(short) // 36][:36]


@pytest.fixture(scope="module")
def reference():
    """An independent encoder: its own tokenizer/model objects, one padded batch, pooled by hand."""
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModel.from_pretrained(DEFAULT_MODEL).eval()

    def run(texts: list[str], *, max_length: int = 256, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        if pooling == "cls":
            v = h[:, 0]
        else:
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = (h * m).sum(1) / m.sum(1)
        if normalize:
            v = v / v.norm(dim=1, keepdim=True)
        return v.numpy()

    return run


@pytest.fixture
def forwards():
    """Rows seen by each forward pass of the shared encoder that `embed` uses on CPU."""
    _, model, _ = load_encoder(None, device="cpu")
    calls: list[int] = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    yield calls
    handle.remove()


def _kw(tmp_path: Path, **extra):
    return {"device": "cpu", "cache_dir": tmp_path / "cache", "show_progress": False, **extra}


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_matches_independent_forward_in_input_order(texts, reference, tmp_path, batch_size):
    texts = texts[:12] if batch_size == 1 else texts  # one forward per row: keep it short
    got = embed(texts, batch_size=batch_size, **_kw(tmp_path))
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, reference(texts), atol=1e-5, rtol=0)


def test_pooling_and_normalize_options_match_reference(texts, reference, tmp_path):
    cls = embed(texts, pooling="cls", normalize=False, max_length=32, **_kw(tmp_path))
    np.testing.assert_allclose(cls, reference(texts, pooling="cls", normalize=False, max_length=32), atol=1e-5, rtol=0)
    raw = embed(texts, normalize=False, **_kw(tmp_path))
    np.testing.assert_allclose(raw, reference(texts, normalize=False), atol=1e-4, rtol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_dataset_column_and_small_token_budget(texts, reference, tmp_path):
    ds = Dataset.from_dict({"label": list(range(len(texts))), "body": texts})
    got = embed(ds, "body", batch_size=8, max_batch_tokens=200, shard_rows=5, **_kw(tmp_path))
    np.testing.assert_allclose(got, reference(texts), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_identical_texts_are_encoded_once_and_every_copy_gets_the_vector(texts, tmp_path, forwards, use_cache):
    """Copies of a text (frequent in crawls) reach the encoder once; each copy gets its vector."""
    pool = [texts[i % 3] for i in range(12)] + texts[3:6]  # 3 texts 4 times each, then 3 distinct
    got = embed(pool, **_kw(tmp_path, use_cache=use_cache))
    assert sum(forwards) == 6
    np.testing.assert_array_equal(got, np.asarray([got[pool.index(t)] for t in pool]))
    np.testing.assert_allclose(got[:3], embed(texts[:3], **_kw(tmp_path / "other", use_cache=False)), rtol=0, atol=1e-6)


def test_second_call_does_no_forward_and_changed_settings_miss(texts, tmp_path, forwards):
    first = embed(texts, **_kw(tmp_path))
    assert sum(forwards) == len(texts)
    forwards.clear()
    again = embed(texts, **_kw(tmp_path))
    assert forwards == [] and np.array_equal(first, again)
    for changed in ({"max_length": 64}, {"pooling": "cls"}, {"normalize": False}):
        forwards.clear()
        embed(texts, **_kw(tmp_path, **changed))
        assert sum(forwards) == len(texts), changed
    forwards.clear()
    embed(texts, **_kw(tmp_path, use_cache=False))
    assert sum(forwards) == len(texts)


def test_interrupted_run_resumes_only_unfinished_shards(texts, tmp_path, forwards):
    full = embed(texts, shard_rows=8, **_kw(tmp_path, use_cache=False))
    _, model, _ = load_encoder(None, device="cpu")
    forwards.clear()

    def crash(mod, args, kwargs):
        if len(forwards) == 2:  # shard_rows=8, batch_size=64: one forward per shard
            raise KeyboardInterrupt("killed mid-way")

    handle = model.register_forward_pre_hook(crash, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            embed(texts, shard_rows=8, **_kw(tmp_path))
    finally:
        handle.remove()
    files = list((tmp_path / "cache").rglob("*"))
    names = sorted(p.name for p in files if p.is_file())
    assert not [n for n in names if n.startswith(".")]  # no half-written shard or checksum
    # 2 shards, each its text keys and its vectors, each file with its checksum
    assert sorted(n.split(".", 1)[1] for n in names) == sorted(["keys", "keys.check.json", "npy", "npy.check.json"] * 2)
    forwards.clear()
    resumed = embed(texts, shard_rows=8, **_kw(tmp_path))
    assert sum(forwards) == len(texts) - 16
    np.testing.assert_array_equal(resumed, full)


def test_stream_list_and_dataset_share_vectors_and_cache(texts, tmp_path, forwards):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    ds = load_dataset("json", data_files=str(path), split="train")
    stream = load_dataset("json", data_files=str(path), split="train", streaming=True)
    want = embed(ds, shard_rows=8, **_kw(tmp_path))
    forwards.clear()
    got = embed(stream, shard_rows=8, **_kw(tmp_path))
    assert forwards == []  # content-addressed shards: the stream reads the Dataset's
    np.testing.assert_array_equal(got, want)
    blocks = list(iter_embeddings(iter({"text": t} for t in texts), shard_rows=8, **_kw(tmp_path)))
    assert [len(b) for b in blocks] == [8, 8, 8, 8, 4]
    np.testing.assert_array_equal(np.concatenate(blocks), want)
    fresh = embed(stream, shard_rows=8, **_kw(tmp_path / "other"))  # a new cache: computed again
    np.testing.assert_allclose(fresh, want, atol=1e-6, rtol=0)
    out = embed_to_file(stream, tmp_path / "vecs.npy", shard_rows=8, **_kw(tmp_path / "third"))
    assert isinstance(out, np.memmap) and out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.glob("vecs.npy*")) == ["vecs.npy"]


def test_very_long_text_and_lone_surrogates(texts, reference, tmp_path):
    long = " ".join(texts) * (1_000_000 // len(" ".join(texts)) + 1)  # > 1 MB of real text
    got = embed([long, texts[0]], **_kw(tmp_path))
    np.testing.assert_allclose(got, reference([long, texts[0]]), atol=1e-5, rtol=0)
    bad = "caf\udce9 au lait, tr\udcc3s bien"  # what errors="surrogateescape" leaves behind
    np.testing.assert_array_equal(embed([bad], **_kw(tmp_path)),
                                  embed(["caf\ufffd au lait, tr\ufffds bien"], **_kw(tmp_path)))


def test_progress_bar_reports_rows_per_second(texts, tmp_path, capsys):
    embed(texts[:4], device="cpu", cache_dir=tmp_path, show_progress=True)
    assert "rows/s" in capsys.readouterr().err
    from datasets.utils import disable_progress_bars, enable_progress_bars

    disable_progress_bars()
    try:
        embed(texts[:4], device="cpu", cache_dir=tmp_path)
    finally:
        enable_progress_bars()
    assert "rows/s" not in capsys.readouterr().err


@pytest.mark.slow
def test_num_proc_workers_give_the_same_vectors(texts, tmp_path):
    one = embed(texts, **_kw(tmp_path, use_cache=False))
    two = embed(texts, num_proc=2, shard_rows=10, **_kw(tmp_path))
    np.testing.assert_allclose(two, one, atol=1e-6, rtol=0)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4


# -- bad input: each a clear error before any model work -----------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the input was checked")

    monkeypatch.setattr(embed_mod, "load_encoder", refuse)


@pytest.mark.parametrize(
    ("data", "kwargs", "exc", "words"),
    [
        (Dataset.from_dict({"txt": ["a"], "label": [1]}), {}, ValueError, ["'column'", "Current columns: ['txt', 'label']"]),
        (Dataset.from_dict({"text": ["a", None, "b", None]}), {}, TypeError, ["'data'", "'text'", "[1, 3]"]),
        (Dataset.from_dict({"text": [1, 2]}), {}, TypeError, ["'data'", "'text'", "int", "[0, 1]"]),
        (["fine", "", "ok", " \n\t"], {}, ValueError, ["'data'", "[1, 3]", "filter"]),
        (Dataset.from_dict({"text": ["x", "  "]}), {}, ValueError, ["'text'", "[1]", "dataset.filter"]),
        (Dataset.from_dict({"text": []}), {}, ValueError, ["'data'", "0 rows"]),
        ([], {}, ValueError, ["'data'", "empty"]),
        ("just a string", {}, TypeError, ["'data'"]),
        (["a"], {"pooling": "max"}, ValueError, ["'pooling'", "['mean', 'cls']"]),
        (["a"], {"batch_size": 0}, ValueError, ["'batch_size'"]),
        (["a"], {"max_length": 0}, ValueError, ["'max_length'"]),
        (["a"], {"model": "/no/such/model/folder"}, ValueError, ["'model'", "/no/such/model/folder"]),
        (["a"], {"device": "nonsense"}, ValueError, ["'device'"]),
    ],
)
def test_bad_input_fails_up_front_naming_the_argument(no_model, tmp_path, data, kwargs, exc, words):
    with pytest.raises(exc) as err:
        embed(data, cache_dir=tmp_path, show_progress=False, **kwargs)
    for w in words:
        assert w in str(err.value)


def test_bad_stream_rows_and_devices(no_model, tmp_path):
    with pytest.raises(ValueError, match="'column'.*Current columns: \\['body'\\]"):
        embed(iter([{"body": "a"}]), cache_dir=tmp_path)
    with pytest.raises(TypeError, match="row\\(s\\) \\[2\\]"):
        list(iter_embeddings(iter(["a", "b", None]), cache_dir=tmp_path, show_progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'device'.*CUDA is not available"):
            embed(["a"], device="cuda", cache_dir=tmp_path)


def test_missing_hub_model_offline_names_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'model'.*no-such-org/no-such-encoder"):
        load_encoder("no-such-org/no-such-encoder", device="cpu")


# -- GOT-D text units --------------------------------------------------------------------------


def test_text_units_split_accounts_for_every_character(texts):
    ds = Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    units = make_text_units(ds, chunk_chars=100, mode="split")
    assert units.column_names == ["text", "source_rows"]
    rebuilt: dict[int, str] = {}
    for unit, src in zip(units["text"], units["source_rows"]):
        assert len(src) == 1 and 1 <= len(unit) <= 100
        rebuilt[src[0]] = rebuilt.get(src[0], "") + unit
    assert [rebuilt[i] for i in range(len(texts))] == texts
    assert len(units) == sum(-(-len(t) // 100) for t in texts)


def test_text_units_concat_is_greedy_and_ordered(texts):
    texts = texts[:12] + [" ".join(texts[:4])] + texts[12:]  # one row longer than a unit
    ds = Dataset.from_dict({"text": texts})
    units = make_text_units(ds, chunk_chars=300, mode="concat")
    rows = [r for src in units["source_rows"] for r in src]
    long_rows = [i for i, t in enumerate(texts) if len(t) > 300]
    assert long_rows == [12]
    assert sorted(set(rows)) == list(range(len(texts))) and rows == sorted(rows)
    for unit, src in zip(units["text"], units["source_rows"]):
        if src[0] in long_rows:
            assert len(src) == 1 and len(unit) <= 300
        else:
            assert unit == " ".join(texts[r] for r in src) and len(unit) <= 300
    joined = [src for src in units["source_rows"] if src[0] not in long_rows]
    for a, b in zip(joined, joined[1:]):  # greedy: the next row would not have fitted
        if b[0] == a[-1] + 1:
            assert len(" ".join(texts[r] for r in a)) + 1 + len(texts[b[0]]) > 300
    with pytest.raises(ValueError, match="'mode'"):
        make_text_units(ds, mode="words")
    with pytest.raises(ValueError, match="'column'.*Current columns: \\['text'\\]"):
        make_text_units(ds, "body")


def test_a_sentence_transformer_instance_embeds_like_its_encode(tmp_path):
    from sentence_transformers import SentenceTransformer

    import hf_otselect

    st = SentenceTransformer(hf_otselect.DEFAULT_MODEL, device="cpu")
    texts = ["A protein binds its receptor.", "The film was long and slow.", "def f(x): return x"]
    got = hf_otselect.embed(texts, model=st, cache_dir=tmp_path, batch_size=2)
    ref = st.encode(texts, normalize_embeddings=True)  # the model's own pooling and length
    np.testing.assert_allclose(got, ref, atol=1e-6)
    cached = list(tmp_path.rglob("*.npy"))
    assert cached
    with torch.no_grad():  # a changed weight is another model: the cache must miss
        next(iter(st.parameters())).add_(0.01)
    changed = hf_otselect.embed(texts, model=st, cache_dir=tmp_path, batch_size=2)
    assert not np.allclose(changed, got)
    with pytest.raises(ValueError, match="'num_proc' parameter of embed"):
        hf_otselect.embed(texts, model=st, num_proc=2, cache_dir=tmp_path)


# -- issue 16: every field of the shard key, checked by counting the rows the encoder runs on -----


@pytest.fixture
def encoded(monkeypatch):
    """Rows handed to the encoder loop (any model, any cache helper): one entry per shard computed."""
    calls: list[int] = []
    real = embed_mod._encode

    def counting(texts, *args, **kwargs):
        calls.append(len(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(embed_mod, "_encode", counting)
    return calls


def _tiny_model(folder: Path, seed: int) -> Path:
    """A 1-layer BERT with the bundled tokenizer, weights drawn from ``seed``, saved to ``folder``."""
    from transformers import BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _plain_mean(folder: Path, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Independent forward of a local model: fresh objects, one padded batch, masked mean, L2."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    v = (h * m).sum(1) / m.sum(1)
    return (v / v.norm(dim=1, keepdim=True)).numpy()


def test_texts_split_differently_never_share_a_shard(texts, reference, tmp_path, encoded):
    """The shard hash length-prefixes each text: ["ab", "c"] and ["a", "bc"] are different shards."""
    a, b = texts[0], texts[1]
    first = [a, b]
    second = [a + b[:7], b[7:]]  # the same characters end to end, cut in another place
    assert "".join(first) == "".join(second)
    embed(first, **_kw(tmp_path, max_length=64))
    encoded.clear()
    got = embed(second, **_kw(tmp_path, max_length=64))
    assert encoded == [2]
    np.testing.assert_allclose(got, reference(second, max_length=64), atol=1e-5, rtol=0)
    encoded.clear()
    embed(["ab", "c"], **_kw(tmp_path))
    got = embed(["a", "bc"], **_kw(tmp_path))
    assert encoded == [2, 2]
    np.testing.assert_allclose(got, reference(["a", "bc"]), atol=1e-5, rtol=0)


def test_local_model_retrained_or_touched_in_place_is_recomputed(texts, tmp_path, encoded):
    """The file stamp (name, size, mtime) of a local model is in the key: stale vectors never return."""
    folder = _tiny_model(tmp_path / "enc", seed=0)
    rows = texts[:6]
    kw = _kw(tmp_path, max_length=128)
    old = embed(rows, model=str(folder), **kw)
    np.testing.assert_allclose(old, _plain_mean(folder, rows), atol=1e-5, rtol=0)
    encoded.clear()
    embed(rows, model=str(folder), **kw)
    assert encoded == []  # same files: read from the cache
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    embed(rows, model=str(folder), **kw)
    assert encoded == [len(rows)]
    encoded.clear()
    _tiny_model(folder, seed=1)  # retrained in place: same file names, same sizes
    assert weights.stat().st_size == stat.st_size
    new = embed(rows, model=str(folder), **kw)
    assert encoded == [len(rows)]
    np.testing.assert_allclose(new, _plain_mean(folder, rows), atol=1e-5, rtol=0)
    assert not np.allclose(new, old, atol=1e-3)


def test_every_field_of_the_shard_key_forces_a_recompute(texts, tmp_path, encoded, monkeypatch):
    """Change one input of the cache key at a time (model, revision, pooling, max_length, normalize,
    precision, a text): the encoder runs again on exactly the rows whose key changed."""
    import shutil

    rows = texts[:8]
    model_a = _tiny_model(tmp_path / "a", seed=0)
    # b: other weights, but every file with a's name, size and mtime: only the path tells them apart
    model_b = tmp_path / "b"
    shutil.copytree(_tiny_model(tmp_path / "b_src", seed=2), model_b)
    for f in model_a.iterdir():
        st = f.stat()
        assert (model_b / f.name).stat().st_size == st.st_size
        os.utime(model_b / f.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    base = {"model": str(model_a), "max_length": 128, "shard_rows": 4, **_kw(tmp_path)}
    embed(rows, **base)
    assert encoded == [4, 4]
    encoded.clear()
    embed(rows, **base)
    assert encoded == []
    changes = {
        "model": {"model": str(model_b)},
        "revision": {"revision": "another-branch"},
        "pooling": {"pooling": "cls"},
        "max_length": {"max_length": 32},
        "normalize": {"normalize": False},
    }
    for field, change in changes.items():
        encoded.clear()
        got = embed(rows, **{**base, **change})
        assert encoded == [4, 4], field
        if field == "model":
            np.testing.assert_allclose(got, _plain_mean(model_b, rows), atol=1e-5, rtol=0)
    encoded.clear()
    with monkeypatch.context() as m:
        m.setattr(embed_mod, "_precision", lambda dev: "bf16")  # as if this ran under bf16 autocast
        embed(rows, **base)
    assert encoded == [4, 4], "precision"
    encoded.clear()
    first = "X" if rows[5][0] != "X" else "Y"  # same length (and byte length): only the content differs
    changed = [*rows[:5], first + rows[5][1:], *rows[6:]]
    assert len(changed[5].encode()) == len(rows[5].encode()) and changed[5] != rows[5]
    got = embed(changed, **base)
    assert encoded == [1], "texts: only the changed text is encoded (one key per text)"
    np.testing.assert_allclose(got, _plain_mean(model_a, changed), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# encoder back ends: ONNX Runtime and OpenVINO, fp32 and int8 (hf_otselect/encoder_backends.py)

backends_mod = importlib.import_module("hf_otselect.encoder_backends")
_BACKEND_MODULES = {"onnx": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "nncf", "onnx", "onnxscript")}


def _need(backend: str) -> None:
    for module in _BACKEND_MODULES[backend]:
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory) -> Path:
    """One cache for the bundled model's exports, so the module exports it to ONNX once."""
    return tmp_path_factory.mktemp("exports")


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "quantize"), [("onnx", None), ("onnx", "int8"), ("openvino", None), ("openvino", "int8")])
def test_each_backend_matches_torch_fp32_on_real_texts(texts, export_cache, backend, quantize):
    """The bundled MiniLM through each back end, on 36 real texts: fp32 exports give the torch
    vectors to float32 rounding; int8 ones stay within cosine 0.99 on average (0.98 for each)."""
    _need(backend)
    ref = embed(texts, device="cpu", use_cache=False, show_progress=False)
    got = embed(texts, backend=backend, quantize=quantize, cache_dir=export_cache, use_cache=False, show_progress=False)
    assert got.dtype == np.float32 and got.shape == ref.shape
    cos = np.sum(got * ref, axis=1)  # both L2-normalised
    if quantize is None:
        assert cos.min() >= 0.9999, cos.min()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    else:
        assert cos.mean() >= 0.99 and cos.min() >= 0.98, (cos.mean(), cos.min())
        assert not np.allclose(got, ref, atol=1e-4)  # int8 really ran: not the fp32 numbers


@pytest.fixture
def exports(monkeypatch):
    """Calls of each export step (ONNX export, int8 quantisation, OpenVINO conversion), and no
    encoder kept in memory between calls, so every call goes to the export cache on disk."""
    calls: list[str] = []
    for step in ("_export_onnx", "_quantize_onnx", "_to_openvino"):
        real = getattr(backends_mod, step)

        def counting(*args, _real=real, _step=step, **kwargs):
            calls.append(_step)
            return _real(*args, **kwargs)

        monkeypatch.setattr(backends_mod, step, counting)
    monkeypatch.setattr(embed_mod, "_ENCODERS", {})
    return calls


def test_the_export_is_cached_and_a_changed_setting_or_model_exports_again(texts, tmp_path, exports, monkeypatch):
    _need("onnx")
    folder = _tiny_model(tmp_path / "enc", seed=0)
    rows = texts[:6]
    kw = {"model": str(folder), "max_length": 128, "use_cache": False, **_kw(tmp_path)}
    first = embed(rows, backend="onnx", **kw)
    np.testing.assert_allclose(first, _plain_mean(folder, rows), atol=1e-5, rtol=0)
    assert exports == ["_export_onnx"]
    monkeypatch.setattr(embed_mod, "_ENCODERS", {})  # a new process: only the files on disk remain
    np.testing.assert_array_equal(embed(rows, backend="onnx", **kw), first)
    assert exports == ["_export_onnx"], "the second call exported again"
    embed(rows, backend="onnx", quantize="int8", **kw)
    assert exports == ["_export_onnx", "_quantize_onnx"], "int8 quantises the cached fp32 export"
    monkeypatch.setattr(embed_mod, "_ENCODERS", {})
    embed(rows, backend="onnx", quantize="int8", **kw)
    assert exports == ["_export_onnx", "_quantize_onnx"]
    _tiny_model(folder, seed=1)  # retrained in place: the files' contents key the export
    exports.clear()
    new = embed(rows, backend="onnx", **kw)
    assert exports == ["_export_onnx"]
    np.testing.assert_allclose(new, _plain_mean(folder, rows), atol=1e-5, rtol=0)
    assert not np.allclose(new, first, atol=1e-3)


def test_a_damaged_export_is_exported_again(texts, tmp_path, exports, monkeypatch):
    _need("onnx")
    folder = _tiny_model(tmp_path / "enc", seed=0)
    kw = {"model": str(folder), "max_length": 128, "use_cache": False, "backend": "onnx", **_kw(tmp_path)}
    good = embed(texts[:4], **kw)
    (onnx_file,) = (tmp_path / "cache" / "exports").glob("*/model.onnx")
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    monkeypatch.setattr(embed_mod, "_ENCODERS", {})
    np.testing.assert_array_equal(embed(texts[:4], **kw), good)
    assert exports == ["_export_onnx", "_export_onnx"]


def test_the_vector_cache_key_covers_backend_and_precision(texts, tmp_path, encoded):
    """torch fp32, ONNX fp32 and ONNX int8 vectors of one model never stand in for each other."""
    _need("onnx")
    folder = _tiny_model(tmp_path / "enc", seed=0)
    rows = texts[:6]
    kw = {"model": str(folder), "max_length": 128, **_kw(tmp_path)}
    settings = [{}, {"backend": "onnx"}, {"backend": "onnx", "quantize": "int8"}]
    for s in settings:
        embed(rows, **kw, **s)
    assert encoded == [6, 6, 6]
    encoded.clear()
    for s in settings:
        embed(rows, **kw, **s)
    assert encoded == []  # each setting finds its own vectors
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name != "exports"]) == 3
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        embed(rows, backend="openvino", **kw)
        assert encoded == [6]


def test_a_missing_backend_package_is_one_line_naming_the_extra(no_model, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(backends_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "openvino") else real(name, *a))
    for backend in ("onnx", "openvino"):
        with pytest.raises(ImportError) as err:
            embed(["a"], backend=backend, cache_dir=tmp_path, show_progress=False)
        msg = str(err.value)
        assert "\n" not in msg and f"pip install 'hf_otselect[{backend}]'" in msg and "embed" in msg, msg
    assert embed_mod.check_embedding_settings(None, backend="torch") is None  # torch needs neither


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"backend": "onnxruntime"}, ValueError, ["'backend' parameter of embed", "['torch', 'onnx', 'openvino']", "'onnxruntime'"]),
        ({"quantize": "int4"}, ValueError, ["'quantize' parameter of embed", "[None, 'int8']"]),
        ({"quantize": "int8"}, ValueError, ["'quantize' parameter of embed", "backend='torch'"]),
        ({"backend": "onnx", "device": "cuda"}, ValueError, ["'device' parameter of embed", "'cpu' or None"]),
    ],
)
def test_bad_backend_settings_fail_up_front_in_the_template(no_model, tmp_path, kwargs, exc, words):
    with pytest.raises(exc) as err:
        embed(["a"], cache_dir=tmp_path, show_progress=False, **kwargs)
    for w in words:
        assert w in str(err.value)


def test_select_by_ot_runs_the_backend_it_is_given(texts, tmp_path, exports):
    """``select_by_ot(encoder_backend=...)`` reaches the encoder: the pool and target go through the ONNX
    export (one export, then its cache), and the scores are the torch run's to float32 rounding."""
    _need("onnx")
    from datasets import Dataset

    from hf_otselect import select_by_ot

    folder = _tiny_model(tmp_path / "enc", seed=0)
    pool = Dataset.from_dict({"text": texts[:24]})
    kw = {"model": str(folder), "max_length": 128, "device": "cpu", "return_scored": True}
    torch_run = select_by_ot(pool, texts[24:30], "similarity", 5, cache_dir=tmp_path / "a", **kw)
    assert exports == []
    onnx_run = select_by_ot(pool, texts[24:30], "similarity", 5, cache_dir=tmp_path / "b", encoder_backend="onnx", **kw)
    assert exports == ["_export_onnx"]
    np.testing.assert_allclose(onnx_run["scored"]["score"], torch_run["scored"]["score"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="'backend' parameter of embed"):
        select_by_ot(pool, texts[24:30], "similarity", 5, cache_dir=tmp_path / "c", embedding={"backend": "tensorrt"}, **kw)
    # GOT-D's own backend= (its solver) is not taken for the encoder's
    got = select_by_ot(pool, texts[24:30], "got_d", 5, cache_dir=tmp_path / "b", backend="tensorized", encoder_backend="onnx", **kw)
    assert len(got["selected"]) == 5 and exports == ["_export_onnx"]
