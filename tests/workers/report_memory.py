"""Write the report of an output folder and print its peak RSS and time as one JSON line.

    python tests/workers/report_memory.py OUTPUT_DIR '{"n_examples": 3}'

The imports the report needs come first, so the growth of the peak during ``write_report`` is the
report's own (what a test compares at N and 4N rows). The peak is this address space's high-water
mark (``VmHWM``), not ``ru_maxrss``: Linux keeps ``ru_maxrss`` across ``execve``, so a child of a
large test process would start from its parent's peak.
"""

from __future__ import annotations

import json
import sys
import time


def _peak_gb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    folder, kwargs = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    import matplotlib.figure  # noqa: F401 - the imports write_report makes, done before the baseline
    import scipy.stats  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    from datasets import load_from_disk  # noqa: F401

    import hf_otselect.ot  # noqa: F401
    from hf_otselect.report import write_report

    before = _peak_gb()
    t0 = time.perf_counter()
    write_report(folder, **kwargs)
    seconds = time.perf_counter() - t0
    peak = _peak_gb()
    print(json.dumps({"peak_rss_gb": peak, "before_gb": before, "report_s": seconds}))


if __name__ == "__main__":
    main()
