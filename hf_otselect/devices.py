"""The one place a device name is checked and resolved (the encoder's, the OT solver's).

Kept apart from :mod:`hf_otselect.embed` so that the argument checks can resolve a device
without importing the encoder module (``_checks`` imports nothing of the package).
"""

from __future__ import annotations

from typing import Any

from ._checks import param_error

__all__ = ["check_solver_device", "resolve_device"]


def resolve_device(device: str | None, owner: str = "embed") -> str:
    """Return the torch device string to use: ``device`` checked, or CUDA when present, else CPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str):
        raise param_error("device", owner, "a str such as 'cpu', 'cuda' or 'cuda:1', or None", device, exc=TypeError)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise param_error("device", owner, "a torch device such as 'cpu', 'cuda' or 'cuda:1', or None", device) from err
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise param_error("device", owner, "'cpu' or None on this machine (CUDA is not available)", device)
        if dev.index is not None and dev.index >= n:
            raise param_error("device", owner, f"a CUDA device index below {n} (the visible GPUs)", device)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise param_error("device", owner, "'cpu' or None on this machine (MPS is not available)", device)
    elif dev.type == "meta":
        raise param_error("device", owner, "a device that holds data such as 'cpu' or 'cuda' ('meta' tensors have no values)", device)
    return device


def check_solver_device(selector: Any) -> None:
    """Refuse a selector ``device`` parameter naming a device this machine lacks (``cuda`` on CPU)."""
    device = getattr(selector, "device", None)
    if device is None or "device" not in selector.get_params():
        return  # None picks a device itself
    if type(device).__name__ == "device" and type(device).__module__ == "torch":
        device = str(device)  # a torch.device: checked by its name
    resolve_device(device, owner=type(selector).__name__)
