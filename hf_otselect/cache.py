"""Checked cache files: written atomically with their key and a checksum beside them, both verified on read.

Every file the package caches (embedding shards, scores and their diagnostics) goes through
:func:`save_array` / :func:`save_json` / :func:`write_checked` and comes back through
:func:`load_array` / :func:`load_json` / :func:`read_checked`, always with the *key* the caller
files it under. A write puts a small JSON sidecar ``<file>.check.json`` beside the file: the key,
the file's name, the byte count and a SHA-256 over the key, the name and the bytes; then the file
itself, each through a temporary file in the same folder and ``os.replace``, so a killed writer
leaves either the old entry, a sidecar without its file (a miss), or both complete.

A read checks, before the bytes are used: that a sidecar exists, that it was written for the key
and the file name asked for (so a file moved, copied or swapped with its own valid sidecar, under
another key or name, is not taken for this one: the sidecar verifies identity, not only bytes),
the length (a cut file) and the digest (bytes changed with the ``.npy`` header intact, or a sidecar
whose key was edited). Any failure is logged, both files are removed, and the caller gets ``None``
and recomputes. A damaged or misplaced entry is never used and never a permanent failure.

Why a sidecar and not a hash inside the name: the key of an entry is known before its content,
and looking an entry up by key must not list a folder of thousands of shards. Why SHA-256 from
``hashlib`` rather than a CRC or BLAKE2b: it is in the standard library, runs on the CPU's SHA
instructions where they exist (half BLAKE2b's time or less on a 6 MB shard here, see
``benchmarks/results/cache_overhead.md``), and also resists deliberate edits.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_path_type, check_writable_folder

logger = logging.getLogger(__name__)

__all__ = ["CACHE_SUBFOLDERS", "cache_root", "check_cache_dir", "discard", "load_array", "load_json", "read_checked", "save_array", "save_json", "sidecar", "write_checked"]

_ALGO = "sha256"
CACHE_SUBFOLDERS = ("embeddings", "scores", "streams")


def sidecar(path: str | os.PathLike) -> Path:
    """The checksum file of a cached file: ``<path>.check.json``."""
    path = Path(path)
    return path.with_name(path.name + ".check.json")


def _digest(key: str, name: str, data: bytes) -> str:
    """SHA-256 over the key, the file name and the bytes (each identity field length-prefixed)."""
    h = hashlib.sha256()
    for field in (key.encode("utf-8"), name.encode("utf-8")):
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    h.update(data)
    return h.hexdigest()


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"A cache entry's key must be a non-empty str. Got {key!r} instead.")
    return key


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_checked(path: str | os.PathLike, data: bytes, *, key: str) -> None:
    """Write ``data`` to ``path`` atomically under ``key``, its sidecar first (see the module docstring).

    Parameters
    ----------
    path : path
        The cached file.
    data : bytes
        Its content.
    key : str
        What the entry is for (a digest of every input of what it stores); a read must ask for
        the same key, or the entry is a miss.
    """
    path = Path(path)
    key = _check_key(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    check = {"algorithm": _ALGO, "key": key, "name": path.name, "digest": _digest(key, path.name, data), "bytes": len(data)}
    _atomic_write(sidecar(path), json.dumps(check).encode())
    _atomic_write(path, data)


def discard(path: str | os.PathLike, reason: str) -> None:
    """Log that the cached ``path`` is damaged and remove it with its sidecar (best effort)."""
    path = Path(path)
    logger.warning("Discarding the damaged cache entry %s (%s); it will be recomputed.", path, reason)
    for p in (path, sidecar(path)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:  # a read-only cache: the entry stays unused, the run goes on
            logger.warning("Could not remove %s (%s)", p, err)


def read_checked(path: str | os.PathLike, *, key: str) -> bytes | None:
    """The bytes of a cached file if it was written under ``key`` and matches its checksum; else ``None``.

    A damaged or misplaced entry (no sidecar, unreadable sidecar, another key or file name, wrong
    length or digest) is logged and removed.
    """
    path = Path(path)
    key = _check_key(key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        discard(path, f"unreadable: {err}")
        return None
    try:
        check = json.loads(sidecar(path).read_text(encoding="utf-8"))
        want, size = str(check["digest"]), int(check["bytes"])
        written_key, written_name = check["key"], check["name"]
        if check["algorithm"] != _ALGO:
            raise ValueError(f"checksum algorithm {check['algorithm']!r}")
    except FileNotFoundError:
        discard(path, "no checksum beside it")
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        discard(path, f"unreadable checksum: {type(err).__name__}")
        return None
    if written_key != key or written_name != path.name:
        discard(path, f"it was written as {written_name!r} under another key ({str(written_key)[:16]}..., not "
                      f"{key[:16]}...): a moved, copied or swapped file")
        return None
    if len(data) != size:
        discard(path, f"{len(data)} bytes where {size} were written")
        return None
    if _digest(key, path.name, data) != want:
        discard(path, "its checksum does not match its bytes")
        return None
    return data


def save_array(path: str | os.PathLike, array: np.ndarray, *, key: str) -> None:
    """Save ``array`` as a checked ``.npy`` file under ``key`` (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_checked(path, buf.getvalue(), key=key)


def load_array(path: str | os.PathLike, *, key: str, dtype: np.dtype | type | None = None, ndim: int | None = None,
               rows: int | None = None) -> np.ndarray | None:
    """Load a checked ``.npy`` file; ``None`` when absent, damaged, under another key, or not the expected kind.

    Parameters
    ----------
    path : path
        The cached file.
    key : str
        The key it must have been written under (see :func:`write_checked`).
    dtype, ndim, rows : optional
        What the caller expects; an array of another dtype, rank or row count is discarded too.

    Returns
    -------
    ndarray or None
    """
    data = read_checked(path, key=key)
    if data is None:
        return None
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as err:
        discard(path, f"not a .npy array: {err}")
        return None
    if (dtype is not None and arr.dtype != np.dtype(dtype)) or (ndim is not None and arr.ndim != ndim) or (
        rows is not None and (arr.ndim == 0 or arr.shape[0] != rows)
    ):
        discard(path, f"an array of dtype {arr.dtype} and shape {arr.shape}, not the one expected")
        return None
    return arr


def save_json(path: str | os.PathLike, obj: Any, *, key: str) -> None:
    """Save ``obj`` as a checked JSON file under ``key`` (NumPy scalars written as numbers)."""
    write_checked(path, json.dumps(obj, default=float).encode("utf-8"), key=key)


def load_json(path: str | os.PathLike, *, key: str) -> Any | None:
    """Load a checked JSON file; ``None`` when absent, damaged or under another key."""
    data = read_checked(path, key=key)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        discard(path, f"not JSON: {type(err).__name__}")
        return None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The package's cache folder: ``cache_dir`` if given, else ``$HF_DATASETS_CACHE/hf_otselect``.

    Never the current folder. Embeddings go to ``embeddings/`` below it, scores to ``scores/``.
    """
    if cache_dir is not None:
        return Path(cache_dir)
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_otselect"


def check_cache_dir(cache_dir: Any, owner: str, subfolders: Iterable[str] = CACHE_SUBFOLDERS) -> Path:
    """The cache root (``cache_dir``, else ``$HF_DATASETS_CACHE/hf_otselect``), checked before any work.

    The root and each of its ``subfolders`` that already exists must be a folder this process can
    write: a read-only ``scores/`` under a writable cache would otherwise fail only once the
    scores are computed, and throw them away. Nothing is created.

    Raises
    ------
    TypeError
        ``cache_dir`` is not a path.
    ValueError, PermissionError
        From :func:`check_writable_folder`, naming the folder at fault.
    """
    if cache_dir is not None:
        check_path_type(cache_dir, "cache_dir", owner)  # before cache_root's Path() meets it
    root = check_writable_folder(cache_root(cache_dir), "cache_dir", owner)
    for sub in subfolders:
        if os.path.lexists(root / sub):
            check_writable_folder(root / sub, "cache_dir", owner)
    return root
