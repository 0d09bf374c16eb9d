"""Checked cache files: written atomically with a checksum beside them, verified on every read.

Every file the package caches (embedding shards, scores and their diagnostics) goes through
:func:`save_array` / :func:`save_json` and comes back through :func:`load_array` /
:func:`load_json`. A write puts the checksum in a small JSON sidecar ``<file>.check.json``
(SHA-256 of the file's bytes and their count) and then the file itself, each through a
temporary file in the same folder and ``os.replace``, so a killed writer leaves either the old
entry, a sidecar without its file (a miss), or both complete. A read hashes the bytes it loads
and compares them with the sidecar: a missing sidecar, a different length (a cut file) or a
different digest (bytes changed with the ``.npy`` header intact) is logged, both files are
removed, and the caller gets ``None`` and recomputes. A damaged entry is never used and never a
permanent failure.

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
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["discard", "load_array", "load_json", "read_checked", "save_array", "save_json", "sidecar", "write_checked"]

_ALGO = "sha256"


def sidecar(path: str | os.PathLike) -> Path:
    """The checksum file of a cached file: ``<path>.check.json``."""
    path = Path(path)
    return path.with_name(path.name + ".check.json")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def write_checked(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, its checksum first (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check = {"algorithm": _ALGO, "digest": _digest(data), "bytes": len(data)}
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


def read_checked(path: str | os.PathLike) -> bytes | None:
    """The bytes of a cached file if they match their checksum; ``None`` when absent or damaged.

    A damaged entry (no sidecar, unreadable sidecar, wrong length or digest) is logged and removed.
    """
    path = Path(path)
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
        if check["algorithm"] != _ALGO:
            raise ValueError(f"checksum algorithm {check['algorithm']!r}")
    except FileNotFoundError:
        discard(path, "no checksum beside it")
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        discard(path, f"unreadable checksum: {type(err).__name__}")
        return None
    if len(data) != size:
        discard(path, f"{len(data)} bytes where {size} were written")
        return None
    if _digest(data) != want:
        discard(path, "its checksum does not match its bytes")
        return None
    return data


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save ``array`` as a checked ``.npy`` file (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_checked(path, buf.getvalue())


def load_array(path: str | os.PathLike, *, dtype: np.dtype | type | None = None, ndim: int | None = None,
               rows: int | None = None) -> np.ndarray | None:
    """Load a checked ``.npy`` file; ``None`` when absent, damaged, or not the expected kind.

    Parameters
    ----------
    path : path
        The cached file.
    dtype, ndim, rows : optional
        What the caller expects; an array of another dtype, rank or row count is discarded too.

    Returns
    -------
    ndarray or None
    """
    data = read_checked(path)
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


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Save ``obj`` as a checked JSON file (NumPy scalars written as numbers)."""
    write_checked(path, json.dumps(obj, default=float).encode("utf-8"))


def load_json(path: str | os.PathLike) -> Any | None:
    """Load a checked JSON file; ``None`` when absent or damaged."""
    data = read_checked(path)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        discard(path, f"not JSON: {type(err).__name__}")
        return None
