"""Up-front parameter checks with one message template.

Every public entry point validates its arguments here before doing any expensive work, so a bad
value fails fast with a message of the form::

    The 'k' parameter of select_by_ot must be an int in [1, 5000]. Got 0 instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np


def param_error(name: str, owner: str, expected: str, got: Any, *, exc: type = ValueError) -> Exception:
    """Build the standard error for a bad parameter (returned, so callers ``raise`` it)."""
    shown = repr(got)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return exc(f"The '{name}' parameter of {owner} must be {expected}. Got {shown} instead.")


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
        raise param_error(name, owner, f"one of {choices}", value)
    return value


def check_embeddings(x: Any, name: str, owner: str, *, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array of shape ``(n, dim)`` with ``n >= 1``.

    Refuses non-2-D input, empty input, NaN/Inf and a dimension other than ``dim`` (when given).
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
    if dim is not None and arr.shape[1] != dim:
        raise param_error(name, owner, f"an array with {dim} columns (the other side's dimension)", f"an array of shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise param_error(name, owner, "finite (no NaN or Inf)", f"{bad} row(s) with NaN or Inf")
    return arr
