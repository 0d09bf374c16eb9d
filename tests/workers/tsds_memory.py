"""Fit TSDS over a memory-mapped pool and print its peak RSS growth as one JSON line.

    python tests/workers/tsds_memory.py POOL.npy TARGET.npy '{"sigma": 0.5}'

Imports and the small target come first, so the growth of ``VmHWM`` (this address space's
high-water mark; see ``report_memory.py`` for why not ``ru_maxrss``) during the fit is the fit's
own: the shard's pages read through the memmap plus whatever the search keeps besides.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from report_memory import _peak_gb  # the sibling worker (this folder is on sys.path when run as a script)


def main() -> None:
    pool_path, target_path = sys.argv[1], sys.argv[2]
    params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    import faiss  # noqa: F401 - loaded before the baseline, as every other import the fit makes

    from hf_otselect.dist import PoolView
    from hf_otselect.selectors.tsds import TSDSSelector

    pool = np.load(pool_path, mmap_mode="r")
    target = np.load(target_path)
    sel = TSDSSelector(**params)
    sel.fit(PoolView(pool[:64]), target)  # warms the libraries' own allocations (BLAS, FAISS)
    before = _peak_gb()
    t0 = time.perf_counter()
    sel.fit(PoolView(pool), target)
    print(json.dumps({"peak_gb": _peak_gb(), "before_gb": before, "fit_s": time.perf_counter() - t0,
                      "shard_gb": pool.nbytes / 2**30, "index": sel.diagnostics_["index"]}))


if __name__ == "__main__":
    main()
