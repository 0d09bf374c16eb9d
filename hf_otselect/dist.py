"""The sharding boundary: collectives between processes, and this process's view of the pool.

Every fit talks to other processes only through a :class:`Comm` (all-reduce, all-gather, broadcast)
and reads the pool only through a :class:`PoolView` (blocks of this process's rows with their global
row indices). A single process is :data:`LOCAL`: world size 1, no process group, the same code path.

Under ``torchrun`` or ``accelerate launch`` :func:`get_comm` returns a :class:`TorchComm` over the
process group that accelerate's ``PartialState`` initialises (gloo on CPU, NCCL on GPU). We wrap
``torch.distributed`` rather than call it from each selector because the selectors speak numpy at
their boundary and need three things it lacks: all-gather of arrays whose first dimension differs
per process, float64/int64 round trips through NCCL (which needs device tensors), and a byte
counter for the communication benchmark.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["LOCAL", "Comm", "PoolView", "TextView", "TorchComm", "get_comm"]

ReduceOp = Literal["sum", "max", "min"]

#: Rows per block a fit reads at once unless told otherwise (16k x 384 float32 = 24 MiB): large enough
#: for fast matrix products, small enough that the per-block temporaries do not rival a shard.
DEFAULT_BLOCK_ROWS = 16_384


class Comm:
    """Collectives of one process among ``world_size``; this base class is the single-process one.

    Every method takes and returns numpy arrays and is called by every process in the same order
    (the usual collective contract). ``bytes_sent`` counts what this process put on the wire.
    """

    rank: int = 0
    world_size: int = 1

    def __init__(self) -> None:
        self.bytes_sent = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: np.ndarray, op: ReduceOp = "sum") -> np.ndarray:
        """Element-wise reduction of ``x`` (same shape on every process) across processes."""
        return np.array(x, copy=True)

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        """Every process's ``x``, in rank order; the first dimension may differ per process."""
        return [np.array(x, copy=True)]

    def broadcast(self, x: np.ndarray | None, src: int = 0) -> np.ndarray:
        """Process ``src``'s array on every process (others may pass None)."""
        if x is None:
            raise ValueError("broadcast on a single process needs the array itself.")
        return np.array(x, copy=True)

    def barrier(self) -> None:
        """Wait until every process reaches this point."""

    def close(self) -> None:
        """Leave the process group (no collective may follow); nothing for one process."""

    def exclusive_offset(self, count: int) -> tuple[int, int]:
        """(sum of ``count`` over lower ranks, sum over all ranks): where this process's rows start."""
        counts = np.concatenate(self.all_gather(np.array([count], dtype=np.int64)))
        return int(counts[: self.rank].sum()), int(counts.sum())


class TorchComm(Comm):
    """Collectives over an initialised ``torch.distributed`` process group."""

    def __init__(self, device: Any = None) -> None:
        import torch
        import torch.distributed as tdist

        super().__init__()
        self._dist = tdist
        self._torch = torch
        self.rank = tdist.get_rank()
        self.world_size = tdist.get_world_size()
        backend = tdist.get_backend()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
        self.device = torch.device(device)

    def _tensor(self, x: np.ndarray) -> Any:
        # A copy: on CPU ``from_numpy(...).to("cpu")`` shares the caller's memory, and the in-place
        # collectives would overwrite the caller's array (``all_reduce(x)`` changing ``x``).
        t = self._torch.from_numpy(np.array(x, copy=True, order="C")).to(self.device)
        self.bytes_sent += t.numel() * t.element_size()
        return t

    def all_reduce(self, x: np.ndarray, op: ReduceOp = "sum") -> np.ndarray:
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX, "min": self._dist.ReduceOp.MIN}
        t = self._tensor(np.asarray(x))
        self._dist.all_reduce(t, op=ops[op])
        return t.cpu().numpy()

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x)
        n = self._tensor(np.array([x.shape[0] if x.ndim else 1], dtype=np.int64))
        sizes = [self._torch.zeros_like(n) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, n)
        lengths = [int(s.item()) for s in sizes]
        padded = np.zeros((max(lengths), *x.shape[1:]), dtype=x.dtype)
        padded[: x.shape[0]] = x
        t = self._tensor(padded)
        out = [self._torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(out, t)
        return [o.cpu().numpy()[:length] for o, length in zip(out, lengths)]

    def broadcast(self, x: np.ndarray | None, src: int = 0) -> np.ndarray:
        meta = np.zeros(34, dtype=np.int64)  # dtype code, ndim, up to 32 dims
        if self.rank == src:
            assert x is not None
            x = np.ascontiguousarray(x)
            meta[0], meta[1] = _DTYPES.index(x.dtype.str), x.ndim
            meta[2 : 2 + x.ndim] = x.shape
        m = self._tensor(meta)
        self._dist.broadcast(m, src=src)
        meta = m.cpu().numpy()
        shape = tuple(int(v) for v in meta[2 : 2 + meta[1]])
        buf = x if self.rank == src else np.empty(shape, dtype=np.dtype(_DTYPES[meta[0]]))
        t = self._tensor(buf)
        self._dist.broadcast(t, src=src)
        return t.cpu().numpy()

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        """Destroy the process group (idempotent; :func:`get_comm` also does it at exit)."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


_DTYPES = ["<f8", "<f4", "<i8", "<i4", "|b1", "<u8", "|u1"]

#: The single-process communicator.
LOCAL = Comm()


def get_comm(device: Any = None) -> Comm:
    """The communicator of this process.

    :data:`LOCAL` unless ``WORLD_SIZE > 1`` (set by ``torchrun`` / ``accelerate launch``); then the
    process group is initialised through accelerate's ``PartialState`` (gloo on CPU, NCCL when this
    process has a GPU) and a :class:`TorchComm` is returned.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LOCAL
    import torch.distributed as tdist

    if not tdist.is_initialized():
        from accelerate import PartialState

        state = PartialState(cpu=device in (None, "cpu") and not _cuda_available())
        # A group we start, we also end: if it outlives ``main``, gloo's threads are torn down during
        # interpreter shutdown and the process aborts ("terminate called without an active
        # exception", exit -6) after its work is done, so a script that never calls ``close()``
        # would still fail its launcher. A group the caller started stays the caller's.
        atexit.register(state.destroy_process_group)
    return TorchComm(device=None if device in (None, "cpu") else device)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class _RowsView:
    """This process's contiguous rows of the pool (``offset`` onwards, ``n_global`` in all)."""

    data: Any
    offset: int = 0
    n_global: int | None = None

    def __post_init__(self) -> None:
        if self.n_global is None:
            self.n_global = self.offset + len(self.data)

    @property
    def n_local(self) -> int:
        return len(self.data)

    def _spans(self, block_rows: int | None) -> Iterator[tuple[np.ndarray, int, int]]:
        step = block_rows or DEFAULT_BLOCK_ROWS
        for s in range(0, self.n_local, step):
            e = min(s + step, self.n_local)
            yield np.arange(self.offset + s, self.offset + e, dtype=np.int64), s, e

    @classmethod
    def of(cls, data: Any, comm: Comm | None = None) -> Any:
        """This process's block ``data`` placed after the lower ranks' rows (one all-gather)."""
        comm = comm or LOCAL
        offset, total = comm.exclusive_offset(len(data))
        return cls(data, offset, total)


@dataclass
class PoolView(_RowsView):
    """This process's contiguous rows of the pool, read in blocks.

    Rows ``offset .. offset + n_local - 1`` of the global pool (``n_global`` rows in all) live in
    ``data``: an in-memory array, a ``np.memmap`` or anything sliceable to ``(b, dim)`` float arrays
    (e.g. an Arrow-backed column wrapper). A fit never needs the rows in memory at once.

    Attributes
    ----------
    data : array-like of shape (n_local, dim)
    offset : int
        Global index of the first local row.
    n_global : int
        Rows of the whole pool (every process's rows).
    """

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    def blocks(self, block_rows: int | None = None, dtype: Any = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(global_index, rows)``: int64 ``(b,)`` and ``dtype`` (float32) ``(b, dim)`` per block."""
        for index, s, e in self._spans(block_rows):
            yield index, np.ascontiguousarray(self.data[s:e], dtype=dtype)

    def read(self, global_index: np.ndarray) -> np.ndarray:
        """Rows by global index (all of them local), float32 ``(len(global_index), dim)``."""
        local = np.asarray(global_index, dtype=np.int64) - self.offset
        if local.size and (local.min() < 0 or local.max() >= self.n_local):
            raise IndexError("PoolView.read: a global index outside this process's rows.")
        order = np.argsort(local, kind="stable")  # memmaps read fastest in order
        out = np.empty((local.size, self.dim), dtype=np.float32)
        out[order] = self.data[local[order]]
        return out


@dataclass
class TextView(_RowsView):
    """This process's contiguous texts of the pool, for text selectors (DSIR); as :class:`PoolView`."""

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Yield ``(global_index, texts)`` per block."""
        for index, s, e in self._spans(block_rows):
            yield index, list(self.data[s:e])
