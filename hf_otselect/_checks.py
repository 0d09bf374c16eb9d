"""Up-front parameter checks with one message template.

Every public entry point validates its arguments here before doing any expensive work, so a bad
value fails fast with a message of the form::

    The 'k' parameter of select_by_ot must be an int in [1, 5000]. Got 0 instead.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


# reprlib bounds the work as well as the text: it visits at most ``maxlist``/``maxdict`` items per
# level and ``maxlevel`` levels, so a value with a billion shared leaves (YAML aliases) is shown in
# microseconds; a plain repr() would expand all of it before any truncation could happen.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 8, 8, 8, 8
_SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 200, 60, 200

#: A lone UTF-16 surrogate: valid in a Python str, not encodable as UTF-8 (tokenizers and
#: vectorizers fail on it); texts get U+FFFD in its place.
LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, in bounded time whatever the value's size."""
    shown = _SHORT.repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def param_error(name: str, owner: str, expected: str, got: Any, *, exc: type = ValueError) -> Exception:
    """Build the standard error for a bad parameter (returned, so callers ``raise`` it)."""
    return exc(f"The '{name}' parameter of {owner} must be {expected}. Got {short_repr(got)} instead.")


def check_int(value: Any, name: str, owner: str, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int in ``[low, high]``; bools and floats are refused."""
    lo = "-inf" if low is None else str(low)
    hi = "inf" if high is None else str(high)
    expected = f"an int in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise param_error(name, owner, expected, value, exc=TypeError)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise param_error(name, owner, expected, value)
    return value


# Seeds feed SplitMix64 as one uint64 (selectors/base.row_uniforms) and numpy's SeedSequence.
SEED_MAX = 2**64 - 1


def check_seed(value: Any, name: str, owner: str) -> int:
    """Return ``value`` as a seed: an int in [0, 2**64 - 1] (larger ones have no uint64 to become)."""
    return check_int(value, name, owner, 0, SEED_MAX)


def check_float(
    value: Any,
    name: str,
    owner: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float in the given (half-)open or closed interval."""
    lb = "(" if low_open else "["
    rb = ")" if high_open else "]"
    expected = f"a float in {lb}{'-inf' if low is None else low}, {'inf' if high is None else high}{rb}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise param_error(name, owner, expected, value, exc=TypeError)
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        raise param_error(name, owner, expected, value)
    return value


def check_choice(value: Any, name: str, owner: str, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        from ._suggest import did_you_mean

        raise ValueError(str(param_error(name, owner, f"one of {choices}", value)) + did_you_mean(value, choices))
    return value


def check_embeddings(x: Any, name: str, owner: str, *, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array of shape ``(n, dim)`` with ``n >= 1``.

    Refuses non-2-D input, empty input, zero-width vectors, NaN/Inf and a dimension other than
    ``dim`` (when given).
    float16/bfloat16-like inputs are up-cast to float32.
    """
    if hasattr(x, "detach"):  # a torch tensor: accept it, but hand numpy on
        x = x.detach().float().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as err:  # ragged lists and the like
        raise param_error(name, owner, "a 2-D float array of shape (n, dim)", type(x).__name__, exc=TypeError) from err
    if arr.dtype.kind not in "fiu":
        raise param_error(name, owner, "a 2-D float array of shape (n, dim)", f"an array of dtype {arr.dtype}", exc=TypeError)
    if arr.ndim != 2:
        raise param_error(name, owner, "a 2-D float array of shape (n, dim)", f"an array of shape {arr.shape}")
    if arr.shape[0] == 0:
        raise param_error(name, owner, "a non-empty array of shape (n >= 1, dim)", f"an array of shape {arr.shape}")
    if arr.shape[1] == 0:
        raise param_error(name, owner, "vectors of at least one dimension, shape (n, dim >= 1)", f"an array of shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise param_error(name, owner, f"an array with {dim} columns (the other side's dimension)", f"an array of shape {arr.shape}")
    original = arr
    with np.errstate(over="ignore"):  # values beyond float32 are reported below, by name
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        if np.isfinite(original).all():  # finite float64 values beyond float32's range became Inf in the cast
            top = float(max(np.max(original), -np.min(original)))
            raise param_error(name, owner, f"values within float32's range (|value| <= {_F32_MAX:.3g}; "
                              "rescale the vectors, e.g. normalise them)", f"largest |value| {top:.3g}")
        raise param_error(name, owner, "finite (no NaN or Inf)", nonfinite_summary(*nonfinite_rows(arr)))
    return arr


def nonfinite_rows(x: Any, *, offset: int = 0, show: int = 10, block_rows: int = 65536) -> tuple[int, list[int]]:
    """Count the rows of ``x`` (n, dim) holding NaN or Inf, block by block (a memory map stays on disk).

    Returns the count and the first ``show`` such rows, numbered from ``offset``.
    """
    count, first = 0, []
    for start in range(0, x.shape[0], block_rows):
        bad = np.flatnonzero(~np.isfinite(np.asarray(x[start:start + block_rows])).all(axis=1))
        count += int(bad.size)
        first.extend(int(i) + start + offset for i in bad[: max(show - len(first), 0)])
    return count, first


def nonfinite_summary(count: int, first: list[int]) -> str:
    """``'2 row(s) with NaN or Inf: rows [1, 7]'`` (the message part that names the rows)."""
    more = ", ..." if count > len(first) else ""
    return f"{count} row(s) with NaN or Inf: rows [{', '.join(map(str, first))}{more}]"


_F32_MAX = float(np.finfo(np.float32).max)
# The distance-based selectors that do not rescale (TSDS: FAISS and its float32 distances) compute squared
# distances in float32. With the largest |value| inside this range, squared norms and distances stay
# between float32's smallest normal number (1.2e-38) and its largest (3.4e38) for any dimension up to
# ~10^8; outside it they overflow to Inf or flush to 0 (every distance equal, ties everywhere).
MAGNITUDE_RANGE = (1e-15, 1e15)


def check_magnitude(x: np.ndarray, name: str, owner: str) -> float:
    """Refuse embeddings whose largest |value| lies outside :data:`MAGNITUDE_RANGE`.

    An all-zero array passes (identical rows are valid input). Returns the largest |value|.
    Reads ``x`` twice (max and min), with no copy.
    """
    top = float(max(np.max(x), -np.min(x))) if x.size else 0.0
    lo, hi = MAGNITUDE_RANGE
    if top != 0.0 and not lo <= top <= hi:
        raise param_error(name, owner, f"embeddings whose largest |value| lies in [{lo:g}, {hi:g}] (distances are "
                          "computed in float32; rescale the vectors, e.g. normalise them)", f"largest |value| {top:.3g}")
    return top


def check_writable_folder(folder: str | os.PathLike, name: str, owner: str) -> Path:
    """Refuse a folder that could not be created or written: a file in its path, or no write permission.

    The folder need not exist; its nearest existing ancestor must be a folder this process may
    write into. Nothing is created. Returns the folder with ``~`` expanded.
    """
    check_path_type(folder, name, owner)
    folder = Path(folder).expanduser()
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise param_error(name, owner, f"a folder path (its part {short_repr(str(probe))} is a file)", str(folder))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"The '{name}' parameter of {owner} must be a folder this process can write. "
                              f"Got {short_repr(str(folder))} instead ({short_repr(str(probe))} is not writable).")
    return folder


# The folders the package writes below its cache root (embed shards, scores, a stream's vectors).


def check_path_type(value: Any, name: str, owner: str) -> None:
    """Refuse a path parameter that is neither a ``str`` nor an ``os.PathLike`` (``cache_dir=5``)."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
        raise param_error(name, owner, "a folder path (str or os.PathLike) or None", value, exc=TypeError)


def check_json_lines(files: str | list[str], name: str, max_rows: int | None = None, *, tail_bytes: int = 0) -> None:
    """Refuse JSON-lines data files with a malformed line, naming the file and the line.

    Reads ``files`` (a glob pattern, whose matches are sorted as ``datasets`` orders them, or the
    paths in reading order) line by line with the standard ``json`` parser, stopping after
    ``max_rows`` rows when given and then ``tail_bytes`` bytes more (a reader that parses by blocks
    reads past its last row). A ``.json`` file that is one JSON document (an array or object)
    passes as a whole, its rows counted. Used before a streamed pool is embedded (the stream would
    meet the bad line mid-run) and to explain a failed load.

    Raises
    ------
    ValueError
        ``The 'pool.path' file 'x.jsonl' has a malformed JSON line 7: ...``.
    """
    import glob
    import json

    left, tail = max_rows, None  # rows still to read; then the bytes still to read past the last of them
    for path in sorted(glob.glob(files)) if isinstance(files, str) else files:
        if tail is not None and tail <= 0:
            return
        if path.endswith(".json"):
            try:
                with open(path, "rb") as fh:
                    doc = json.load(fh)
            except (ValueError, UnicodeDecodeError):
                pass  # JSON lines fail with "Extra data": the line scan below names the line
            else:  # one JSON document (an array, or a single row)
                if tail is not None:
                    tail -= os.path.getsize(path)
                elif left is not None:
                    left -= len(doc) if isinstance(doc, list) else 1
                    tail = tail_bytes if left <= 0 else None
                continue
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if tail is not None:
                    if tail <= 0:
                        return
                    tail -= len(raw)
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except UnicodeDecodeError as err:
                    raise ValueError(f"The '{name}' file {short_repr(path)} has a line that is not UTF-8: line {lineno} "
                                     f"(byte offset {err.start} in the line).") from None
                except ValueError as err:
                    raise ValueError(f"The '{name}' file {short_repr(path)} has a malformed JSON line {lineno}: "
                                     f"{' '.join(str(err).split())}. Fix or remove that line.") from None
                if not isinstance(row, dict):
                    raise ValueError(f"The '{name}' file {short_repr(path)} has a JSON line {lineno} that is not an "
                                     f"object (got {type(row).__name__}); each line must be one row like {{\"text\": ...}}.")
                if left is not None and tail is None:
                    left -= 1
                    if left <= 0:
                        if tail_bytes <= 0:
                            return
                        tail = tail_bytes


def unit_rows64(x: Any) -> np.ndarray:
    """Rows divided by their L2 norm in float64 (zero rows stay zero): exact for any finite float32.

    float32 norms overflow from magnitudes ~1e19 on (the square passes float32's 3.4e38) and
    flush to 0 below ~1e-19, which would turn every cosine into 0 and every unit vector into the
    zero vector; float64 holds the square of any float32.
    """
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
