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

Several processes must run one job. Before any work they compare what each was given
(:func:`agree`: the resolved settings and the content of the pool and target, all-gathered), and
every collective of a group this module starts has a timeout (``timeout_s``, default
:data:`DEFAULT_TIMEOUT_S`, or ``HF_OTSELECT_DIST_TIMEOUT``): a process that waits on another that
crashed, hangs or runs another job fails with one line (:class:`CollectiveError`), never hangs.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT_S", "LOCAL", "CollectiveError", "Comm", "FolderNotShared", "JobMismatch", "PoolView", "RowSubset", "TextView", "TorchComm",
           "agree", "check_shared_folder", "get_comm", "process_rank", "resolve_timeout", "shard_bounds", "sum_counts"]

ReduceOp = Literal["sum", "max", "min"]

#: Rows per block a fit reads at once unless told otherwise (16k x 384 float32 = 24 MiB): large enough
#: for fast matrix products, small enough that the per-block temporaries do not rival a shard.
DEFAULT_BLOCK_ROWS = 16_384

#: Seconds a collective waits for the other processes before it fails (torch's own gloo default). A
#: collective also waits while a slower process finishes its share of the work (embedding its shard),
#: so this bounds the imbalance between processes as well as a crash or a hang.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "HF_OTSELECT_DIST_TIMEOUT"


class CollectiveError(ConnectionError):
    """A collective that did not complete: another process timed out, crashed or left the job."""


class FolderNotShared(OSError):
    """A folder every process must see (the output folder) is not the same folder on every process."""


class JobMismatch(ValueError):
    """The processes of one job were given different jobs (settings, pool or target)."""


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

    def __init__(self, device: Any = None, timeout_s: float | None = None) -> None:
        import torch
        import torch.distributed as tdist

        super().__init__()
        self.timeout_s = timeout_s  # None: a group the caller started, with the caller's timeout
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

    def _call(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one ``torch.distributed`` collective; its failure becomes one :class:`CollectiveError` line."""
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            raise CollectiveError(_collective_failure(name, self.rank, self.world_size, self.timeout_s,
                                                      time.monotonic() - t0, str(err))) from err

    def all_reduce(self, x: np.ndarray, op: ReduceOp = "sum") -> np.ndarray:
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX, "min": self._dist.ReduceOp.MIN}
        t = self._tensor(np.asarray(x))
        self._call("all_reduce", self._dist.all_reduce, t, op=ops[op])
        return t.cpu().numpy()

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x)
        n = self._tensor(np.array([x.shape[0] if x.ndim else 1], dtype=np.int64))
        sizes = [self._torch.zeros_like(n) for _ in range(self.world_size)]
        self._call("all_gather", self._dist.all_gather, sizes, n)
        lengths = [int(s.item()) for s in sizes]
        padded = np.zeros((max(lengths), *x.shape[1:]), dtype=x.dtype)
        padded[: x.shape[0]] = x
        t = self._torch.from_numpy(padded).to(self.device)  # our own buffer: no second copy (see _tensor)
        self.bytes_sent += t.numel() * t.element_size()
        del padded
        out = [self._torch.empty_like(t) for _ in range(self.world_size)]
        self._call("all_gather", self._dist.all_gather, out, t)
        return [o.cpu().numpy()[:length] for o, length in zip(out, lengths)]

    def broadcast(self, x: np.ndarray | None, src: int = 0) -> np.ndarray:
        meta = np.zeros(34, dtype=np.int64)  # dtype code, ndim, up to 32 dims
        if self.rank == src:
            assert x is not None
            x = np.ascontiguousarray(x)
            meta[0], meta[1] = _DTYPES.index(x.dtype.str), x.ndim
            meta[2 : 2 + x.ndim] = x.shape
        m = self._tensor(meta)
        self._call("broadcast", self._dist.broadcast, m, src=src)
        meta = m.cpu().numpy()
        shape = tuple(int(v) for v in meta[2 : 2 + meta[1]])
        buf = x if self.rank == src else np.empty(shape, dtype=np.dtype(_DTYPES[meta[0]]))
        t = self._tensor(buf)
        self._call("broadcast", self._dist.broadcast, t, src=src)
        return t.cpu().numpy()

    def barrier(self) -> None:
        self._call("barrier", self._dist.barrier)

    def close(self) -> None:
        """Destroy the process group (idempotent; :func:`get_comm` also does it at exit)."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


_DTYPES = ["<f8", "<f4", "<i8", "<i4", "|b1", "<u8", "|u1"]

#: The single-process communicator.
LOCAL = Comm()


def get_comm(device: Any = None, timeout_s: float | None = None) -> Comm:
    """The communicator of this process.

    :data:`LOCAL` unless ``WORLD_SIZE > 1`` (set by ``torchrun`` / ``accelerate launch``); then the
    process group is initialised through accelerate's ``PartialState`` (gloo on CPU, NCCL when this
    process has a GPU) and a :class:`TorchComm` is returned.

    Parameters
    ----------
    device : str or None
        The device of the collectives' tensors (None: CPU for gloo, this process's GPU for NCCL).
    timeout_s : float or None
        Seconds any collective waits for the other processes before it fails with a
        :class:`CollectiveError` (None: ``$HF_OTSELECT_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`).
        Applies to a group this function starts; a group the caller started keeps its own timeout.
        Under NCCL, torch's watchdog ends a process whose collective times out (it cannot raise).
    """
    global _STARTED_TIMEOUT_S
    timeout_s = resolve_timeout(timeout_s, "timeout_s", "get_comm")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LOCAL
    import torch.distributed as tdist

    if not tdist.is_initialized():
        from datetime import timedelta

        from accelerate import PartialState

        # ``timeout`` goes to torch.distributed.init_process_group: the rendezvous and, for gloo,
        # every collective of the group.
        state = PartialState(cpu=device in (None, "cpu") and not _cuda_available(), timeout=timedelta(seconds=timeout_s))
        _STARTED_TIMEOUT_S = timeout_s
        # A group we start, we also end: if it outlives ``main``, gloo's threads are torn down during
        # interpreter shutdown and the process aborts ("terminate called without an active
        # exception", exit -6) after its work is done, so a script that never calls ``close()``
        # would still fail its launcher. A group the caller started stays the caller's.
        atexit.register(state.destroy_process_group)
    elif _STARTED_TIMEOUT_S is not None and _STARTED_TIMEOUT_S != timeout_s:
        logger.warning("The process group is already up with a %.0f s timeout; timeout_s=%.0f is not applied.",
                       _STARTED_TIMEOUT_S, timeout_s)
    return TorchComm(device=None if device in (None, "cpu") else device, timeout_s=_STARTED_TIMEOUT_S)


_STARTED_TIMEOUT_S: float | None = None  # the timeout of the group get_comm started, if it did


def resolve_timeout(value: Any, name: str = "timeout_s", owner: str = "get_comm") -> float:
    """``value`` as seconds > 0; None reads ``$HF_OTSELECT_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`."""
    import math
    import numbers

    from ._checks import param_error

    if value is None:
        env = os.environ.get(TIMEOUT_ENV)
        if env is None or not env.strip():
            return DEFAULT_TIMEOUT_S
        try:
            value = float(env)
        except ValueError:
            raise param_error(TIMEOUT_ENV, "the environment", "a number of seconds > 0", env) from None
        name, owner = TIMEOUT_ENV, "the environment"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise param_error(name, owner, "a number of seconds > 0", value, exc=TypeError)
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise param_error(name, owner, "a finite number of seconds > 0", value)
    return float(value)


def _collective_failure(op: str, rank: int, world: int, timeout_s: float | None, elapsed: float, cause: str) -> str:
    """One line for a failed collective: what happened, what to look at, and the backend's words."""
    import re

    cause = re.sub(r"^\[[^\]]*\]\s*", "", cause.strip().splitlines()[0] if cause.strip() else "")[:200]
    low = cause.lower()
    limit = "the group's timeout" if timeout_s is None else f"the {timeout_s:g} s timeout"
    if "timed out" in low or "timeout" in low:
        why = (f"no answer from the other processes within {limit}: one of them crashed, hangs, runs another job or is "
               f"still working (raise dist_timeout_s / ${TIMEOUT_ENV} if a process legitimately needs longer)")
    elif "closed" in low or "reset" in low or "broken pipe" in low or "connection" in low:
        why = "another process left the job (its own error is in its log)"
    else:
        why = "the collective failed"
    return f"Process {rank} of {world}: {op} between the processes failed after {elapsed:.1f} s: {why}. [{cause}]"


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process as its launcher set them, before any process group exists.

    ``torchrun`` and ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE`` in each process's
    environment; a process started alone (or with values that are not integers) is ``(0, 1)``.
    What logging needs at start-up, where :func:`get_comm` would be too early.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 and 0 <= rank < world else (0, 1)


def sum_counts(counts: Mapping[str, int], comm: Comm) -> dict[str, int]:
    """Per-name counts summed over the processes, for the names any process counted, sorted by name.

    Two collectives of O(names) bytes (the names as JSON, all-gathered; the counts, all-reduced),
    never per row: how per-source tallies of a filter reach the card on every process.

    Parameters
    ----------
    counts : mapping of str to int
        This process's counts (names it did not see may be absent).
    comm : Comm

    Returns
    -------
    dict of str to int
        The same dict on every process.
    """
    local = {str(name): int(value) for name, value in counts.items()}
    if comm.world_size == 1:
        return dict(sorted(local.items()))
    mine = json.dumps(sorted(local)).encode("utf-8")
    names = sorted({name for part in comm.all_gather(np.frombuffer(mine, dtype=np.uint8)) for name in json.loads(bytes(part).decode("utf-8"))})
    totals = comm.all_reduce(np.array([local.get(name, 0) for name in names], dtype=np.int64))
    return {name: int(v) for name, v in zip(names, totals)}


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of process ``rank`` in a contiguous split of ``n`` rows (``Dataset.shard``'s split).

    The first ``n % world`` processes take one row more; with more processes than rows the last
    ones take none (an empty shard is legal: the process still joins every collective).
    """
    div, mod = divmod(int(n), int(world))
    lo = div * rank + min(rank, mod)
    return lo, lo + div + (1 if rank < mod else 0)


def agree(comm: Comm, identity: dict[str, Any], what: str = "the job") -> None:
    """Check that every process was given the same ``identity``; raise on every process if not.

    Every process all-gathers the others' ``identity`` (a small dict of settings and content
    fingerprints, as JSON) and compares it with process 0's, so every process raises the same
    :class:`JobMismatch` together, naming the first setting that differs and on which rank, before
    any work: a process with another pool, seed, method or ``k`` would otherwise mix rows of two
    jobs into one output, or wait forever in a collective the others never call.
    """
    if comm.world_size == 1:
        return
    from ._checks import short_repr

    mine = json.dumps(identity, sort_keys=True, default=str).encode("utf-8")
    gathered = [json.loads(bytes(g).decode("utf-8")) for g in comm.all_gather(np.frombuffer(mine, dtype=np.uint8))]
    ref, unset = gathered[0], object()
    diffs = [(key, rank, other.get(key, unset), ref.get(key, unset))
             for rank, other in enumerate(gathered[1:], 1) for key in sorted(set(ref) | set(other))
             if ref.get(key, unset) != other.get(key, unset)]
    if not diffs:
        return
    key, rank, theirs, ours = diffs[0]
    more = ""
    if len(diffs) > 1:  # the rest, a group of settings under one name once (another method: "params.*")
        groups: dict[tuple[str, int], set[str]] = {}
        for other_key, other_rank, _, _ in diffs[1:]:
            groups.setdefault((other_key.split(".")[0], other_rank), set()).add(other_key)
        others = sorted(f"{min(keys) if len(keys) == 1 else head + '.*'} on rank {r}" for (head, r), keys in groups.items())
        more = f" (also {', '.join(others[:6])}{', ...' if len(others) > 6 else ''})"
    def shown(value: Any) -> str:
        return "(unset)" if value is unset else short_repr(value, 160)

    raise JobMismatch(f"Processes disagree on {what}: rank {rank} has {key}={shown(theirs)} while rank 0 has "
                      f"{shown(ours)}{more}; every process must run the same job.")


def check_shared_folder(comm: Comm, folder: Path, name: str = "output_dir", wait_s: float = 5.0) -> None:
    """Check that ``folder`` is one folder every process sees; raise on every process if not.

    Process 0 (which created ``folder``) writes a file of a fresh random name in it; every process
    looks for it (up to ``wait_s`` seconds, for network file systems that cache lookups) and the
    answers are all-gathered; process 0 then removes the file. A node-local folder, or a path that
    names another folder on another process, would otherwise lose or mix the processes' rows.
    """
    if comm.world_size == 1:
        return
    import secrets
    import socket

    nonce = np.zeros(16, dtype=np.uint8)
    probe: Path | None = None
    if comm.is_main:
        nonce = np.frombuffer(secrets.token_bytes(16), dtype=np.uint8).copy()
        probe = folder / f".shared-check-{bytes(nonce).hex()}"
        probe.write_bytes(bytes(nonce))
    nonce = comm.broadcast(nonce if comm.is_main else None, src=0)
    path = folder / f".shared-check-{bytes(nonce).hex()}"
    deadline = time.monotonic() + wait_s
    seen = False
    while True:
        try:
            seen = path.read_bytes() == bytes(nonce)
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    where = json.dumps([bool(seen), str(folder), socket.gethostname()]).encode("utf-8")
    answers = [json.loads(bytes(a).decode("utf-8")) for a in comm.all_gather(np.frombuffer(where, dtype=np.uint8))]
    if probe is not None:
        probe.unlink(missing_ok=True)
    blind = [(rank, a) for rank, a in enumerate(answers) if not a[0]]
    if blind:
        rank, (_, theirs, host) = blind[0]
        also = f" (nor do ranks {[r for r, _ in blind[1:]]})" if len(blind) > 1 else ""
        raise FolderNotShared(
            f"The '{name}' must be on a filesystem every process sees: rank {rank} (host {host}) does not see the file "
            f"rank 0 (host {answers[0][2]}) wrote in {answers[0][1]!r} (rank {rank} looked in {theirs!r}){also}. "
            "Give a folder on a file system shared by every node, under the same path.")


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


class RowSubset:
    """Rows ``rows`` of ``base``, read only when sliced: what the filters leave of a shard, without a copy.

    A decontaminated or pre-filtered shard keeps most of its rows; copying them (``base[rows]``)
    would put a second shard in memory next to the memory map. This reads a slice's rows from
    ``base`` when it is asked for, so a :class:`PoolView` over it reads block by block as over the
    shard itself.

    Parameters
    ----------
    base : array-like of shape (n, dim)
        An array or ``np.memmap`` (anything indexable by an ascending int array).
    rows : ndarray of shape (n_rows,), int
        Positions in ``base``, ascending.
    """

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.rows.size), *np.shape(self.base)[1:])

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # (rows, columns): the rows here, the rest on what they read
            return self[key[0]][(slice(None), *key[1:])]
        return np.asarray(self.base[self.rows[key]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class TextView(_RowsView):
    """This process's contiguous texts of the pool, for text selectors (DSIR); as :class:`PoolView`."""

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Yield ``(global_index, texts)`` per block."""
        for index, s, e in self._spans(block_rows):
            yield index, list(self.data[s:e])
