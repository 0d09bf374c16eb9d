"""Run under torchrun by tests/test_distributed.py: one process late to (or gone from) a collective.

Usage: torchrun ... tests/workers/late_rank.py MODE OUT_PREFIX
MODE ``late``: the last process sleeps 120 s before the collective the others wait in (the timeout
comes from ``$HF_OTSELECT_DIST_TIMEOUT``). MODE ``crash``: the last process raises instead. Every
process that returns from the collective writes ``OUT_PREFIX<rank>.json``: the error's type and
message (or ``ok``) and the seconds it waited.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from hf_otselect.dist import get_comm


def main() -> None:
    mode, out_prefix = sys.argv[1:3]
    comm = get_comm()
    comm.barrier()  # everyone is up; the clock starts here
    if comm.rank == comm.world_size - 1:
        if mode == "crash":
            raise RuntimeError("this process failed on its own")
        time.sleep(120)
    t0 = time.monotonic()
    try:
        comm.all_gather(np.arange(3.0))
        result = {"ok": True}
    except Exception as err:  # noqa: BLE001 - recorded for the test to judge
        result = {"error": type(err).__name__, "message": str(err)}
    result["waited_s"] = time.monotonic() - t0
    with open(f"{out_prefix}{comm.rank}.json", "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    if "error" in result:
        sys.exit(1)
    comm.close()


if __name__ == "__main__":
    main()
