"""Seconds and peak memory of entropic OT dual potentials against N, ours vs POT and GeomLoss.

Methods: ``tensorized`` / ``blocked`` = ``sinkhorn_potentials`` on in-memory arrays (kernel kept /
recomputed); ``sharded`` = ``sharded_sinkhorn`` on one process reading a memory-mapped ``.npy``
through a ``PoolView`` (kernel kept when it fits the 1 GiB budget), ``sharded_recompute`` the same
with the kernel recomputed every pass (no budget at all), ``sharded_halfcache`` with a budget for
half the cost blocks (kept from the first pass; the other half recomputed); ``sharded_scaled`` the
no-kernel one warm-started by eps-scaling (``eps_scaling=3``: passes at geometric eps from the mean
cost down), ``sharded_sampleg`` the no-kernel one started from the ``g`` of a fit on a 1% sample
(``fitted.sample_mask``, seed 0; the sample fit's seconds are included); ``sharded_relaxed`` the
no-kernel one over-relaxed (``relaxation=RELAXATION``), ``sharded_relaxed_scaled``
that and ``eps_scaling=3``; ``sharded_2proc`` = two gloo
processes under ``torchrun``, each with half the rows, reporting the bytes one process sent per
Sinkhorn iteration (``Comm.bytes_sent``) at N and at N / 4.

Problem (PEERS.md): N candidates x 1,000 targets, 384-d float32 unit rows, clustered; cost
||x - y||^2 (no 1/2), uniform weights, eps absolute, stop at L1 marginal error < 1e-3.
Each configuration runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own.
"agree" is the Spearman correlation of the candidate potentials with a float64 reference run to
tol 1e-9: POT ``sinkhorn_log`` (numpy float64, stopThr 1e-10) at N = 10k, and our own
tensorized back end in float64 at N >= 100k, where POT float64 would not finish in the time
budget (the tests pin our float64 duals to POT's within 1e-6).

    .venv/bin/python benchmarks/ot_scaling.py --sizes 10000 100000 --out benchmarks/results/ot_scaling.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _provenance import header, provenance  # noqa: E402

M_TARGET = 1000
EPS_SCALING = 3  # sharded_scaled's coarse steps
SAMPLE = 0.01  # sharded_sampleg's sample fraction
RELAXATION = 1.4  # sharded_relaxed's omega


def problem(n: int) -> tuple[np.ndarray, np.ndarray]:
    """PEERS.md's recipe, drawn in 10k-row slices (same random stream) so that making the data
    does not dominate the subprocess's peak memory."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(200, 384))
    labels = rng.integers(0, 200, n)
    x = np.empty((n, 384), np.float32)
    for s in range(0, n, 10000):
        part = centers[labels[s : s + 10000]] * 0.5 + rng.normal(size=(len(labels[s : s + 10000]), 384))
        x[s : s + 10000] = part / np.linalg.norm(part, axis=1, keepdims=True)
    y = centers[rng.integers(0, 20, M_TARGET)] * 0.5 + rng.normal(size=(M_TARGET, 384))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x, y.astype(np.float32)


def child(method: str, n: int, eps: float, out: str) -> None:
    """Run one configuration; write f to ``out`` and print a JSON line of figures."""
    import geomloss  # noqa: F401  every library is imported before timing, for all methods alike
    import ot
    import torch

    import hf_otselect.ot

    if method == "sharded_2proc":
        sharded_child(n, eps, out)
        return
    x, y = problem(n)
    info: dict = {}
    if method.startswith("sharded"):
        mm = out + ".pool.npy"
        np.save(mm, x)
        del x
        x = np.load(mm, mmap_mode="r")
    t0 = time.perf_counter()
    if method.startswith("sharded"):
        from hf_otselect.dist import PoolView

        # sharded_recompute: no budget, every block redone per pass; sharded_halfcache: a budget
        # for half the cost blocks, the other half redone per pass (the path just beyond the budget)
        budget = {"sharded_recompute": 0, "sharded_scaled": 0, "sharded_sampleg": 0, "sharded_relaxed": 0,
                  "sharded_relaxed_scaled": 0, "sharded_halfcache": n * M_TARGET * 4 // 2}.get(method)
        warm: dict = {}
        if method.startswith("sharded_relaxed"):
            warm = {"relaxation": RELAXATION}
        if method.endswith("_scaled"):
            warm["eps_scaling"] = EPS_SCALING
        elif method == "sharded_sampleg":
            from hf_otselect.fitted import sample_mask

            keep = sample_mask(np.arange(n, dtype=np.int64), SAMPLE, n, 0)
            fit = hf_otselect.ot.sharded_sinkhorn(PoolView(np.ascontiguousarray(x[keep])), y, eps)
            warm = {"init_g": fit.g}
            info["sample_seconds"] = time.perf_counter() - t0
            info["sample_iter"] = fit.n_iter
        r = hf_otselect.ot.sharded_sinkhorn(PoolView(x), y, eps, keep_kernel=None if budget is None else False,
                                            memory_budget=budget, **warm)
        f = r.f_local
        info.update({"n_iter": r.n_iter, "warm_passes": r.warm_passes, "relaxed_passes": r.relaxed_passes,
                     "err": r.marginal_error})
    elif method in ("tensorized", "blocked", "reference"):
        sinkhorn_potentials = hf_otselect.ot.sinkhorn_potentials
        if method == "reference":
            r = sinkhorn_potentials(x.astype(np.float64), y.astype(np.float64), eps, backend="tensorized",
                                    tol=1e-9, max_iter=100000, memory_budget=1 << 34)
        else:
            r = sinkhorn_potentials(x, y, eps, backend=method)
        f = r.f
        info = {"n_iter": r.n_iter, "err": r.marginal_error}
    elif method in ("pot", "pot_ref"):
        if method == "pot_ref":
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            C = ot.dist(x64, y64)
            a, b = np.full(n, 1 / n), np.full(M_TARGET, 1 / M_TARGET)
            _, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", log=True, stopThr=1e-10, numItermax=100000)
            f = eps * log["log_u"]
        else:  # as in PEERS.md: torch float32, full matrix, stopThr 1e-3
            X, Y = torch.from_numpy(x), torch.from_numpy(y)
            C = ot.dist(X, Y)
            a, b = torch.full((n,), 1 / n), torch.full((M_TARGET,), 1 / M_TARGET)
            _, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", log=True, stopThr=1e-3, numItermax=100000)
            f = (eps * log["log_u"]).double().numpy()
            info = {"n_iter": int(log["niter"])}
    elif method == "geomloss":
        from geomloss import SamplesLoss

        # GeomLoss's cost is ||x - y||^2 / 2 and eps = blur^2: the same plan needs eps / 2.
        loss = SamplesLoss("sinkhorn", p=2, blur=(eps / 2) ** 0.5, scaling=0.5, debias=False,
                           potentials=True, backend="tensorized")
        F, _ = loss(torch.from_numpy(x), torch.from_numpy(y))
        f = 2.0 * F.detach().double().reshape(-1).numpy()
    else:
        raise SystemExit(f"unknown method {method}")
    sec = time.perf_counter() - t0
    np.save(out, np.asarray(f, dtype=np.float64), allow_pickle=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"method": method, "n": n, "eps": eps, "seconds": sec, "peak_gib": rss, **info}))


def sharded_child(n: int, eps: float, out: str) -> None:
    """Under torchrun: this process's half of the rows; rank 0 prints seconds and bytes/iteration."""
    import torch  # noqa: F401

    from hf_otselect.dist import PoolView, get_comm
    from hf_otselect.ot import sharded_sinkhorn

    comm = get_comm()
    figures = {}
    for size in (n // 4, n):
        x, y = problem(size)
        bounds = np.linspace(0, size, comm.world_size + 1).astype(int)
        view = PoolView.of(x[bounds[comm.rank] : bounds[comm.rank + 1]], comm)
        comm.barrier()
        before, t0 = comm.bytes_sent, time.perf_counter()
        r = sharded_sinkhorn(view, y, eps, comm=comm)
        figures[size] = (time.perf_counter() - t0, comm.bytes_sent - before, r.n_iter)
        f = np.concatenate(comm.all_gather(r.f_local))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if comm.rank == 0:
        np.save(out, f, allow_pickle=False)
        sec, sent, it = figures[n]
        sec4, sent4, it4 = figures[n // 4]
        print(json.dumps({"method": "sharded_2proc", "n": n, "eps": eps, "seconds": sec, "peak_gib": rss, "n_iter": it,
                          "bytes_per_iter": sent / it, "bytes_per_iter_quarter_n": sent4 / it4}))


def run_one(method: str, n: int, eps: float, tmp: str, timeout: int) -> dict:
    out = os.path.join(tmp, f"{method}_{n}_{eps}.npy")
    cmd = [sys.executable, __file__, "--child", method, str(n), str(eps), out]
    if method == "sharded_2proc":
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "eps": eps, "error": f"timeout {timeout}s"}
    if p.returncode != 0:
        return {"method": method, "n": n, "eps": eps, "error": p.stderr.strip().splitlines()[-1][:120]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["f"] = out
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    from scipy.stats import spearmanr

    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--peers-max-n", type=int, default=100000, help="largest N for POT/GeomLoss")
    p.add_argument("--blocked-only-n", type=int, nargs="*", default=[], help="extra sizes, blocked back end only")
    p.add_argument("--methods", nargs="+", default=["tensorized", "blocked", "sharded", "sharded_halfcache", "sharded_recompute",
                                                    "sharded_scaled", "sharded_sampleg", "sharded_relaxed", "sharded_relaxed_scaled",
                                                    "sharded_2proc", "pot", "geomloss"])
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--out", default="benchmarks/results/ot_scaling.md")
    args = p.parse_args()
    prov = provenance(seeds={"data": 0, "sample": 0})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(set(args.sizes) | set(args.blocked_only_n)):
            for eps in args.eps:
                only_blocked = n in args.blocked_only_n and n not in args.sizes
                methods = ["blocked"] if only_blocked else ["tensorized", "blocked", "sharded", "sharded_halfcache", "sharded_recompute",
                                                            "sharded_scaled", "sharded_sampleg", "sharded_relaxed",
                                                            "sharded_relaxed_scaled", "sharded_2proc"]
                if n <= args.peers_max_n and not only_blocked:
                    methods += ["pot", "geomloss"]
                ref = None
                if not only_blocked:
                    ref = run_one("pot_ref" if n <= 10000 else "reference", n, eps, tmp, args.timeout)
                for m in methods:
                    if m not in args.methods:
                        continue
                    r = run_one(m, n, eps, tmp, args.timeout)
                    if ref and "f" in ref and "f" in r:
                        r["agree"] = float(spearmanr(np.load(ref["f"]), np.load(r["f"])).statistic)
                    r["ref"] = ref["method"] if ref else "-"
                    rows.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "f"}), flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Entropic OT potentials: seconds and peak memory against N",
        "",
        *header(prov),
        f"`uptime` after the run: `{load}` (2 cores shared: only ratios within this run mean something).  ",
        "",
        "Problem of PEERS.md (N x 1,000, 384-d unit rows, cost ||x-y||^2, stop at L1 marginal error < 1e-3).",
        "Peak = ru_maxrss of the configuration's own subprocess (includes ~0.3 GiB of torch).",
        "agree = Spearman of candidate potentials vs the float64 reference (see the script docstring).",
        "",
        "bytes/iter = what one of the two processes sent per Sinkhorn iteration (setup included), at N and at N/4.",
        "",
        "iterations = passes over the rows (the no-kernel paths do one GEMM per block per pass), warm-up",
        "passes at coarser eps included and counted in parentheses, as are the over-relaxed passes kept;",
        "sharded_sampleg's seconds include its 1% sample fit.",
        "",
        "| N | eps | method | seconds | peak GiB | iterations | agree | bytes/iter (N, N/4) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['eps']} | {r['method']} | {r['error']} | | | | |")
            continue
        agree = f"{r['agree']:.6f}" if "agree" in r else "-"
        sent = f"{r['bytes_per_iter']:.0f}, {r['bytes_per_iter_quarter_n']:.0f}" if "bytes_per_iter" in r else "-"
        notes = ([f"{r['warm_passes']} at coarser eps"] if r.get("warm_passes") else []) + \
            ([f"{r['relaxed_passes']} relaxed"] if r.get("relaxed_passes") else [])
        its = str(r.get("n_iter", "-")) + (f" ({', '.join(notes)})" if notes else "")
        if "sample_seconds" in r:
            its += f"; sample fit {r['sample_seconds']:.2f} s, {r['sample_iter']} it."
        lines.append(f"| {r['n']} | {r['eps']} | {r['method']} | {r['seconds']:.2f} | {r['peak_gib']:.2f} | {its} | {agree} | {sent} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
