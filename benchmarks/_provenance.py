"""What every results file in ``benchmarks/results/`` states about the run that made it.

One call, :func:`provenance`, gathers the command line (as it can be pasted from the repository
root), ``git rev-parse HEAD`` and whether the tree had uncommitted changes, the UTC date, the
library versions, the thread counts and the machine load; :func:`header` renders it as the
Markdown lines a results file starts with. The benchmark scripts call these themselves, so no
figure is published without them. Seeds are passed in by the script (they are its own knobs).

    from _provenance import header, provenance
    prov = provenance(seeds={"data": 0})
    lines = ["# Title", "", *header(prov), ""]
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Distributions whose version can change a figure (absent ones are reported as such).
PACKAGES = ("numpy", "scipy", "torch", "transformers", "datasets", "faiss-cpu", "faiss-gpu", "POT", "geomloss",
            "pykeops", "sentence-transformers", "scikit-learn")

#: Environment variables that set thread counts or offline mode, recorded when set.
ENV_VARS = ("HF_HUB_OFFLINE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """The command as run from the repository root: env settings, ``.venv/bin/python``, script, args."""
    argv = sys.argv if argv is None else argv
    script = script or argv[0]
    try:
        rel = str(Path(script).resolve().relative_to(REPO))
    except ValueError:
        rel = script
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("HF_OTSELECT_SHARED_DATA", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")
                   if k in os.environ)
    return " ".join(p for p in (env, ".venv/bin/python", shlex.join([rel, *argv[1:]])) if p)


def versions() -> dict[str, str | None]:
    """Python and the installed version of each of :data:`PACKAGES` (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def threads() -> dict[str, Any]:
    """CPU count, this process's CPU affinity, torch's intra-op threads (if torch is loaded), env."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_allowed"] = len(os.sched_getaffinity(0))
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    info.update({k: os.environ[k] for k in ENV_VARS if k in os.environ})
    return info


def provenance(*, seeds: dict[str, Any] | None = None, argv: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a results file must state about its run, as a JSON-ready dict.

    Parameters
    ----------
    seeds : dict, optional
        The script's seeds by role (``{"data": 0, "random": [0, 1, 2]}``).
    argv : list of str, optional
        The command line; default ``sys.argv``.
    extra : dict, optional
        Anything else to record (device, data folder...).
    """
    load = Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else None
    return {
        "command": command_line(argv),
        "commit": _git("rev-parse", "HEAD") or None,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
        "versions": versions(),
        "threads": threads(),
        "seeds": dict(seeds or {}),
        "load_at_start": load,
        **(extra or {}),
    }


def header(prov: dict[str, Any]) -> list[str]:
    """Markdown lines (each ending in two spaces, a line break) for the top of a results file."""
    ver = ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v is not None)
    thr = ", ".join(f"{k} {v}" for k, v in prov["threads"].items())
    lines = [
        f"Command: `{prov['command']}`  ",
        f"Commit: {prov['commit']}{' (with uncommitted changes)' if prov['dirty'] else ''}; date {prov['date_utc']} UTC  ",
        f"Machine: {prov['machine']}; threads: {thr}; load at start: `{prov['load_at_start']}`  ",
        f"Versions: {ver}  ",
    ]
    if prov["seeds"]:
        lines.append("Seeds: " + ", ".join(f"{k} {v}" for k, v in prov["seeds"].items()) + "  ")
    return lines
