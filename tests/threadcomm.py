"""A test double of :class:`hf_otselect.dist.Comm`: ``world`` processes played by threads.

It lets the collective code paths (fits, choose, ranks) run at world sizes 1..8 in milliseconds,
with the same call contract as the torch.distributed one (every "process" calls every collective in
the same order). Real multi-process runs (torchrun, gloo) are tested in ``test_distributed.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from hf_otselect.dist import Comm


class _Hub:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[Any] = [None] * world


class ThreadComm(Comm):
    def __init__(self, hub: _Hub, rank: int) -> None:
        super().__init__()
        self.hub, self.rank, self.world_size = hub, rank, hub.world

    def _exchange(self, x: Any) -> list[Any]:
        self.hub.barrier.wait()
        self.hub.slots[self.rank] = x
        self.hub.barrier.wait()
        out = list(self.hub.slots)
        self.hub.barrier.wait()
        return out

    def all_reduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        parts = self._exchange(np.array(x, copy=True))
        self.bytes_sent += np.asarray(x).nbytes
        fn = {"sum": np.sum, "max": np.max, "min": np.min}[op]
        return fn(np.stack(parts), axis=0).astype(np.asarray(x).dtype)

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        self.bytes_sent += np.asarray(x).nbytes
        return [np.array(p, copy=True) for p in self._exchange(np.array(x, copy=True))]

    def broadcast(self, x: np.ndarray | None, src: int = 0) -> np.ndarray:
        return np.array(self._exchange(x)[src], copy=True)

    def barrier(self) -> None:
        self.hub.barrier.wait()


def run_world(world: int, fn: Callable[[Comm], Any]) -> list[Any]:
    """Run ``fn(comm)`` on ``world`` threads; return each rank's result (re-raising the first error)."""
    hub = _Hub(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(hub, rank))
        except BaseException as err:  # surface it in the test thread
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


def contiguous_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows of ``rank`` in ``datasets``' contiguous sharding (the first ``n % world`` get one more)."""
    div, mod = divmod(n, world)
    start = div * rank + min(rank, mod)
    return start, start + div + (rank < mod)
