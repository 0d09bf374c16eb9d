"""A selector's fitted state as named arrays plus JSON scalars, and back (for safetensors files).

One pair of functions per registered method: :func:`state_to_arrays` flattens what
``Selector.fit`` returned into ``{name: ndarray}`` and a JSON-able dict of scalars;
:func:`state_from_arrays` rebuilds the very same object, so ``score_batch`` on a loaded state
gives the same bits as on the fitted one. No pickle: arrays go to safetensors, scalars to JSON.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from ._checks import param_error

__all__ = ["state_from_arrays", "state_to_arrays"]

_SINKHORN_SCALARS = ("f_sum", "cost", "n_global", "n_iter", "converged", "marginal_error", "eps", "kernel_kept", "scale", "precision", "stalled")
_SINKHORN_ARRAYS = ("y", "b", "g", "g_f", "center")


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value JSON writes back the same."""
    return value.item() if isinstance(value, np.generic) else value


def _gotd_out(state: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"negative_weight": state.negative_weight, "directions": []}
    for name, direction in (("target", state.target), ("negative", state.negative)):
        if direction is None:
            continue
        if direction.chunk_of is not None or len(direction.results) != 1:
            raise param_error("chunk_size", "FittedSelector", "None (a chunked fit scores rows by their chunk, which a new row has not)", "a chunked fit")
        res = direction.results[0]
        meta["directions"].append(name)
        meta[name] = {s: _plain(getattr(res, s)) for s in _SINKHORN_SCALARS}
        for a in _SINKHORN_ARRAYS:
            value = getattr(res, a)
            if value is not None:
                arrays[f"{name}.{a}"] = np.ascontiguousarray(value)
    return arrays, meta


def _gotd_in(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
    from .ot import ShardedSinkhornResult
    from .selectors.got_d import GOTDState, _Direction

    built: dict[str, Any] = {"target": None, "negative": None}
    for name in meta["directions"]:
        res = ShardedSinkhornResult(**{a: arrays.get(f"{name}.{a}") for a in _SINKHORN_ARRAYS}, **meta[name])
        built[name] = _Direction((res,), None)
    return GOTDState(built["target"], built["negative"], float(meta["negative_weight"]), None)


def _dataclass_out(state: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, meta = {}, {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = np.ascontiguousarray(value)
        else:
            meta[f.name] = _plain(value)
    return arrays, meta


def _similarity_in(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
    from .selectors.baselines import _SimilarityState

    return _SimilarityState(**arrays, **meta)


def _tsds_in(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
    from .selectors.tsds import TSDSState

    return TSDSState(**arrays, **meta)


def state_to_arrays(method: str, state: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Flatten a fitted state of ``method`` into named arrays and JSON scalars.

    Parameters
    ----------
    method : str
        Registry name of the selector that fitted ``state``.
    state
        What its ``fit`` returned.

    Returns
    -------
    arrays : dict of str to ndarray
    meta : dict
        JSON-serialisable scalars.
    """
    if method == "got_d":
        return _gotd_out(state)
    if method in ("similarity", "tsds"):
        return _dataclass_out(state)
    if method == "dsir":
        return {"log_ratio": np.ascontiguousarray(state)}, {}
    if method == "random":
        return {}, {}
    raise param_error("method", "FittedSelector", "one of ['dsir', 'got_d', 'random', 'similarity', 'tsds']", method)


def state_from_arrays(method: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
    """Rebuild the state :func:`state_to_arrays` flattened (same types, same bits)."""
    if method == "got_d":
        return _gotd_in(arrays, meta)
    if method == "similarity":
        return _similarity_in(arrays, meta)
    if method == "tsds":
        return _tsds_in(arrays, meta)
    if method == "dsir":
        return arrays["log_ratio"]
    if method == "random":
        return None
    raise param_error("method", "FittedSelector", "one of ['dsir', 'got_d', 'random', 'similarity', 'tsds']", method)
