"""An in-process process group for tests: ``world`` threads exchanging numpy arrays through a barrier.

It keeps :class:`hf_otselect.dist.Comm`'s contract (every rank calls the same collectives in the
same order; ``bytes_sent`` counts what a rank puts on the wire) so that sharded fits can be run
with 2 or 3 ranks in one test process. The real ``torch.distributed`` group is exercised by the
``torchrun`` tests; this one makes the fast tests multi-rank too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from hf_otselect.dist import Comm, PoolView


class _Hub:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[Any] = [None] * world


class ThreadComm(Comm):
    """Collectives among threads sharing one :class:`_Hub`."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        super().__init__()
        self.hub, self.rank, self.world_size = hub, rank, hub.world

    def _exchange(self, x: Any) -> list[Any]:
        if x is not None:
            x = np.array(x, copy=True)
            self.bytes_sent += x.nbytes
        self.hub.slots[self.rank] = x
        self.hub.barrier.wait()
        values = list(self.hub.slots)
        self.hub.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values

    def all_reduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        stacked = np.stack(self._exchange(np.asarray(x)))
        return {"sum": np.sum, "max": np.max, "min": np.min}[op](stacked, axis=0)

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        return self._exchange(np.asarray(x))

    def broadcast(self, x: np.ndarray | None, src: int = 0) -> np.ndarray:
        return np.array(self._exchange(x if self.rank == src else None)[src], copy=True)

    def barrier(self) -> None:
        self.hub.barrier.wait()


def run_ranks(world: int, fn: Callable[[ThreadComm], Any], comm_class: type[ThreadComm] = ThreadComm) -> list[Any]:
    """Run ``fn(comm)`` on ``world`` threads (``comm_class`` instances); their results in rank order (errors re-raised)."""
    from datasets.utils.tqdm import tqdm

    # Threads stand in for processes here, so they share what processes would not: datasets'
    # progress-bar class. tqdm's thread_map deletes the class lock it created on exit, which races
    # with another thread's thread_map ("type object 'tqdm' has no attribute '_lock'"); a lock made
    # before the threads start is reused and never deleted.
    tqdm.get_lock()
    hub = _Hub(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(comm_class(hub, rank))
        except BaseException as err:  # noqa: BLE001  re-raised in the caller
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def shard(data: np.ndarray, comm: Comm) -> PoolView:
    """This rank's contiguous near-equal share of ``data`` as a PoolView (rank 0 may get more)."""
    bounds = np.linspace(0, len(data), comm.world_size + 1).astype(int)
    return PoolView.of(data[bounds[comm.rank] : bounds[comm.rank + 1]], comm)


def contiguous_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows of ``rank`` in ``datasets``' contiguous sharding (the first ``n % world`` get one more)."""
    div, mod = divmod(n, world)
    start = div * rank + min(rank, mod)
    return start, start + div + (rank < mod)
