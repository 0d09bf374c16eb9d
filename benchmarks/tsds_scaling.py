"""TSDS scaling: time, peak memory and accuracy against pool size N and query count M.

Compares, in one run on the same data:

* ``peer``: the published TSDS pipeline (ZifanL/TSDS, float64 fix only), re-implemented here only
  as far as needed to time it: IVF (nlist = sqrt(N)/2, nprobe 10) prefetch of min(max_K, N/10)
  neighbours, a second IVF index over the union of the prefetched candidates searched with
  k = min(kde_K, N/10) for the densities, a dict lookup of the densities, and a Python heap loop
  for the water level.
* ``ours-<index>``: :class:`hf_otselect.selectors.tsds.TSDSSelector` with that prefetch index.

Data: the clustered 384-d set of ``/work/shared/PEERS.md`` (200 centres, unit rows; queries from
20 centres). ``--dup-frac`` replaces that fraction of the pool by near copies (noise 0.02) of other
rows, so that densities are not all 1. ``--pools clustered,dense`` adds a dense pool per size
(``pool`` column): 32-d unit rows all within a small cap, so nearly every pair lies within sigma
and every density counts kde_K rows (the case that cost the radius search 263 s at 20k rows);
only ``peer`` and ``ours-auto`` run on it, and not at 1M (there the reached rows' density lists,
R x kde_K, would not fit the machine). Every case runs in its own subprocess, which reports its peak
RSS. Accuracy columns: ``recall`` is recall@L of the approximate prefetch against exact search (100
queries), ``TV`` is the total-variation distance between the case's probabilities and those of
``ours-flat`` (exact throughout) when that ran at the same size.

``--cost`` runs instead the cost cases of issue 13 item 8 (the density step must cost about the
same whatever the data): 5,000 exact copies of one row against 5,000 distinct rows (384-d), and a
dense low-dimensional pool (20,000 rows, 32-d, nearly all pairs within sigma) against a spread one
(20,000 random unit rows, 32-d), at the paper's parameters (C = 5 fixed: every query spreads over
thousands of rows, the worst case for the density step), for this tree (``ours``) and, with
``--old-tree DIR`` (a ``git archive`` of an earlier commit), for that code (``old``).

Usage::

    .venv/bin/python benchmarks/tsds_scaling.py                 # full run, writes the results file
    .venv/bin/python benchmarks/tsds_scaling.py --sizes 10000 --out /tmp/x.md   # quick
    .venv/bin/python benchmarks/tsds_scaling.py --cost --old-tree /tmp/old   # cost cases
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import header, provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIM = 384


def make_data(n: int, m: int, dup_frac: float, folder: Path) -> tuple[Path, Path]:
    """PEERS.md's clustered data, written once per (n, dup_frac) as .npy files."""
    xp, yp = folder / f"x_{n}_{dup_frac}.npy", folder / f"y_{m}.npy"
    if not xp.exists():
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(200, DIM))
        labels = rng.integers(0, 200, n)
        x = np.empty((n, DIM), dtype=np.float32)
        for s in range(0, n, 100_000):
            block = centers[labels[s : s + 100_000]] * 0.5 + rng.normal(size=(len(labels[s : s + 100_000]), DIM))
            x[s : s + 100_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
        if dup_frac > 0:
            k = int(dup_frac * n)
            dst = rng.choice(n, k, replace=False)
            src = rng.choice(np.setdiff1d(np.arange(n), dst), k)
            near = x[src] + 0.02 / np.sqrt(DIM) * rng.normal(size=(k, DIM)).astype(np.float32)
            x[dst] = near / np.linalg.norm(near, axis=1, keepdims=True)
        np.save(xp, x)
    if not yp.exists():
        rng = np.random.default_rng(1)
        centers = np.random.default_rng(0).normal(size=(200, DIM))
        y = centers[rng.integers(0, 20, m)] * 0.5 + rng.normal(size=(m, DIM))
        np.save(yp, (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32))
    return xp, yp


def make_dense_data(n: int, m: int, folder: Path) -> tuple[Path, Path]:
    """A dense 32-d pool (unit rows in a cap of angular radius ~0.1) and ``m`` queries near its rows."""
    xp, yp = folder / f"xdense_{n}.npy", folder / f"ydense_{n}_{m}.npy"
    if not xp.exists():
        rng = np.random.default_rng(3)
        x = rng.normal(size=(1, 32)) + 0.1 * rng.normal(size=(n, 32))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = x[rng.integers(0, n, m)] + 0.05 * rng.normal(size=(m, 32))
        np.save(xp, x.astype(np.float32))
        np.save(yp, (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32))
    return xp, yp


def make_cost_data(name: str, folder: Path) -> tuple[Path, Path]:
    """The cost cases' pools (unit rows) and 200 queries near them."""
    xp, yp = folder / f"x_{name}.npy", folder / f"y_{name}.npy"
    rng = np.random.default_rng(2)
    if name in ("copies", "distinct"):
        x, _ = (np.load(p) for p in make_data(5000, 200, 0.0, folder))
        if name == "copies":
            x = np.repeat(x[:1], 5000, axis=0)
        y = x[rng.integers(0, 5000, 200)] + 0.3 / np.sqrt(DIM) * rng.normal(size=(200, DIM))
    else:
        dim = 32
        if name == "dense":  # all rows within a cap of angular radius ~0.2: nearly all pairs within sigma
            x = rng.normal(size=(1, dim)) + 0.1 * rng.normal(size=(20_000, dim))
        else:
            x = rng.normal(size=(20_000, dim))
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = x[rng.integers(0, 20_000, 200)] + 0.05 * rng.normal(size=(200, dim))
    np.save(xp, np.ascontiguousarray(x, dtype=np.float32))
    np.save(yp, (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32))
    return xp, yp


def run_cost(args: argparse.Namespace) -> None:
    """Issue 13 item 8: the same work on copies / distinct rows and dense / spread pools."""
    folder = Path(tempfile.mkdtemp(prefix="tsds_cost_"))
    # The paper's values (C = 5 fixed rather than the package's C=None): the worst case for the
    # density step, since at this scale every query spreads over thousands of rows.
    cfg = dict(alpha=0.5, C=5.0, sigma=0.75, max_K=5000, kde_K=1000)
    trees = [("ours", str(REPO), cfg)] + ([("old", args.old_tree, cfg)] if args.old_tree else [])
    if args.package_defaults:  # the package's default scale (C=None, sized from N, k = 1% of N, and M)
        trees.insert(1, ("ours, C=None", str(REPO), {**cfg, "C": None}))
    rows = []
    for name in ("copies", "distinct", "dense", "spread"):
        xp, yp = make_cost_data(name, folder)
        x = np.load(xp)
        sample = x[np.random.default_rng(0).integers(0, len(x), 2000)].astype(np.float64)
        within = float((((sample[:, None] - sample[None]) ** 2).sum(-1) < cfg["sigma"] ** 2).mean())
        for label, tree, conf in trees:
            case = dict(method="ours", index="auto", m=200, x=str(xp), y=str(yp), recall=False, tree=tree, mem_limit_gb=args.mem_limit_gb,
                        p_out=str(folder / f"p_{label.replace(' ', '_').replace(',', '').replace('=', '')}_{name}.npy"), **conf)
            res = spawn(case, args.timeout)
            rows.append(dict(tree=label, case=name, n=len(x), dim=x.shape[1], within=within, **res))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# TSDS cost whatever the data (issue 13 item 8)",
        "",
        *header(args.provenance),
        "The paper's parameters (alpha 0.5, C 5 fixed, sigma 0.75, max_K 5000, kde_K 1000, index auto), M = 200 queries,",
        f"each case in its own process (peak RSS of that process; address space capped at {args.mem_limit_gb:g} GB). `old` is the code before this change",
        "(radius search at h for the densities), `ours` this tree. 'pairs within sigma' is measured on",
        "2,000 sampled rows." + (" `ours, C=None` is this tree at the package's default scale (C sized from N, a budget k of"
                                 " 1% of N, and M; see TSDSSelector)." if args.package_defaults else ""),
        "",
        "| code | case | N | dim | pairs within sigma | wall s | CPU s | peak RSS GB | width | densities |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tree']} | {r['case']} | {r['n']:,} | {r['dim']} | {r['within']:.4f} | {r['error']} | | | | |")
            continue
        d = r.get("diag", {})
        lines.append(f"| {r['tree']} | {r['case']} | {r['n']:,} | {r['dim']} | {r['within']:.4f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {d.get('width', d.get('density_width', ''))} | {d.get('n_densities', '')} |")
    Path(args.out).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------- peer
def _peer_ivf(data: np.ndarray, nprobe: int = 10):
    import faiss

    nlist = max(1, int(np.sqrt(data.shape[0])) // 2)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(data.shape[1]), data.shape[1], nlist)
    index.train(data)
    index.add(data)
    index.nprobe = nprobe
    return index


def peer_scores(x: np.ndarray, y: np.ndarray, max_k: int, kde_k: int, sigma: float, alpha: float, c: float) -> np.ndarray:
    """The published pipeline's work, step for step, in our own code (float64 sums)."""
    n, m = len(x), len(y)
    max_k, kde_k = min(max_k, n // 10), min(kde_k, n // 10)  # the published silent caps
    sq, nbr = _peer_ivf(x).search(y, max_k)
    order = np.argsort(sq, axis=1)
    dist = np.sqrt(np.maximum(np.take_along_axis(sq, order, 1), 0)).astype(np.float64)
    nbr = np.take_along_axis(nbr, order, 1)
    union = list(set(nbr.ravel().tolist()))
    feats = x[union]
    sq2, _ = _peer_ivf(feats).search(feats, kde_k)
    kern = 1.0 - sq2.astype(np.float64) / sigma**2
    kde = np.where(kern > 0, kern, 0.0).sum(1)
    lookup = dict(zip(union, kde.tolist()))
    dens = np.array([[lookup[j] for j in row] for row in nbr.tolist()])
    # Heap water-filling: repeatedly open the query whose filled weight is smallest.
    heap = [(1.0 / dens[i, 0], 0, i) for i in range(m)]
    heapq.heapify(heap)
    wsum = [dist[i, 0] / dens[i, 0] for i in range(m)]
    last = [0] * m
    cost = np.zeros(m)
    total, level = 0.0, 0.0
    while heap:
        level, k, i = heapq.heappop(heap)
        total -= cost[i]
        cost[i] = dist[i, k + 1] * level - wsum[i]
        total += cost[i]
        if alpha / c * total >= (1 - alpha) * m:
            break
        last[i] = k
        if k < max_k - 2:
            heapq.heappush(heap, (level + 1.0 / dens[i, k + 1], k + 1, i))
            wsum[i] += dist[i, k + 1] / dens[i, k + 1]
    p = np.zeros(n)
    for i in range(m):
        share = 1.0 / (m * level * dens[i, : last[i] + 1])
        np.add.at(p, nbr[i, : last[i] + 1], share)
        p[nbr[i, last[i] + 1]] += max(1.0 / m - share.sum(), 0.0)
    return p / p.sum()


# ----------------------------------------------------------------------------------------- child
def run_case(case: dict) -> dict:
    """Run one case in this process; return timings, peak RSS and accuracy figures."""
    sys.path.insert(0, case.get("tree", str(REPO)))
    x = np.load(case["x"])
    y = np.load(case["y"])[: case["m"]]
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Each side's imports before the clock (FAISS for the peer; our package, which loads datasets,
    # ~1 s): the clock times the selection, not a Python start-up.
    import faiss  # noqa: F401

    from hf_otselect.selectors.tsds import TSDSSelector

    out: dict = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    if case["method"] == "peer":
        p = peer_scores(x, y, case["max_K"], case["kde_K"], case["sigma"], case["alpha"], case["C"])
    else:
        sel = TSDSSelector(alpha=case["alpha"], C=case["C"], sigma=case["sigma"], max_K=case["max_K"], kde_K=case["kde_K"], index=case["index"])
        p = sel.score(x, y)
        out["diag"] = {k: v for k, v in sel.diagnostics_.items() if k in ("prefetch_s", "density_s", "solve_s", "index_s", "density_and_solve_s", "mean_neighbourhood", "n_densities", "width", "density_width", "index", "density_index")}
    out["seconds"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = usage.ru_utime + usage.ru_stime - cpu0
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["data_rss_gb"] = rss_data
    np.save(case["p_out"], p)
    if case.get("recall"):  # prefetch recall of the approximate index, 100 queries, k = L
        from hf_otselect import knn

        q = y[:100]
        width = min(case["max_K"], len(x))
        exact = knn.knn_search(q, x, width, index="flat")
        approx = knn.knn_search(q, x, width, index=case["index"])
        out["recall"] = knn.recall_at_k(approx.indices, exact.indices)
    return out


def spawn(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    limit = case.get("mem_limit_gb")

    def cap_memory() -> None:  # address-space cap, so a runaway case fails instead of swapping the shared machine
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (int(limit * 2**30), int(limit * 2**30)))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=cap_memory)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tsds_scaling.md"))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    ap.add_argument("--dup-frac", type=float, default=0.1)
    ap.add_argument("--pools", default="clustered", help="comma list of 'clustered' and 'dense' (see the docstring)")
    ap.add_argument("--cost", action="store_true", help="run the cost cases (copies/distinct, dense/spread) instead")
    ap.add_argument("--old-tree", help="with --cost: a directory holding an earlier hf_otselect to time too")
    ap.add_argument("--package-defaults", action="store_true", help="with --cost: also time the package's default C=None")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0, help="with --cost: address-space cap per case")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    args.provenance = provenance(seeds={"data (pool, queries, cost cases, dense pool)": [0, 1, 2, 3]})  # taken at the start: the commit and load the run began with
    if args.cost:
        if args.out == ap.get_default("out"):
            args.out = str(REPO / "benchmarks" / "results" / "tsds_cost.md")
        run_cost(args)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="tsds_bench_"))
    peer_cfg = dict(alpha=0.5, C=5.0, sigma=0.75, max_K=5000, kde_K=1000)  # PEERS.md settings
    goal_cfg = dict(alpha=0.5, C=5.0, sigma=0.75, max_K=1000, kde_K=1000)  # issue goal: L = 1000
    pools = args.pools.split(",")
    plan = []
    for n in sizes:
        if "dense" in pools and n < 1_000_000:
            plan += [("peer", 200, peer_cfg, "ivf", n, "dense", False), ("ours-auto", 200, peer_cfg, "auto", n, "dense", False)]
        for dup in ((0.0, args.dup_frac) if "clustered" in pools else ()):
            if n >= 1_000_000 and dup == 0.0:
                continue
            big = n >= 1_000_000
            if not big:
                plan += [("peer", 200, peer_cfg, "ivf", n, dup, False), ("ours-flat", 200, peer_cfg, "flat", n, dup, False),
                         ("ours-auto", 200, peer_cfg, "auto", n, dup, False), ("ours-ivf", 200, peer_cfg, "ivf", n, dup, dup > 0)]
                if n <= 10_000 and dup > 0:  # HNSW with k in the thousands is slow; shown once
                    plan.append(("ours-hnsw", 200, peer_cfg, "hnsw", n, dup, True))
                if dup > 0:
                    plan += [("peer", 1000, goal_cfg, "ivf", n, dup, False), ("ours-flat", 1000, goal_cfg, "flat", n, dup, False),
                             ("ours-ivf", 1000, goal_cfg, "ivf", n, dup, False)]
            else:
                plan += [("ours-ivf", 200, goal_cfg, "ivf", n, dup, False), ("ours-ivf", 1000, goal_cfg, "ivf", n, dup, True),
                         ("peer", 1000, goal_cfg, "ivf", n, dup, False)]
    rows = []
    for method, m, cfg, index, n, dup, recall in plan:
        xp, yp = make_dense_data(n, m, folder) if dup == "dense" else make_data(n, 1000, dup, folder)
        case = dict(method="peer" if method == "peer" else "ours", index=index, m=m, x=str(xp), y=str(yp), recall=recall,
                    p_out=str(folder / f"p_{method}_{n}_{m}_{dup}_{cfg['max_K']}.npy"), **cfg)
        res = spawn(case, args.timeout)
        rows.append(dict(method=method, n=n, m=m, dup=dup, max_K=cfg["max_K"], p_out=case["p_out"], **res))
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:  # after all cases, so rows that ran before ours-flat get their TV too
        ref = folder / f"p_ours-flat_{r['n']}_{r['m']}_{r['dup']}_{r['max_K']}.npy"
        if "error" not in r and ref.exists() and r["method"] != "ours-flat":
            r["tv"] = 0.5 * float(np.abs(np.load(r["p_out"]) - np.load(ref)).sum())
        peer = folder / f"p_peer_{r['n']}_{r['m']}_{r['dup']}_{r['max_K']}.npy"
        if "error" not in r and peer.exists() and r["method"] != "peer":
            r["tv_peer"] = 0.5 * float(np.abs(np.load(r["p_out"]) - np.load(peer)).sum())
    write_report(rows, args)


def speedups(rows: list[dict]) -> list[str]:
    """Peer CPU s / ours CPU s per (N, M, pool), against ours-auto (ours-ivf where auto did not run)."""
    out = []
    for r in rows:
        if r["method"] != "peer" or "error" in r:
            continue
        same = {o["method"]: o for o in rows if "error" not in o and (o["n"], o["m"], o["dup"], o["max_K"]) == (r["n"], r["m"], r["dup"], r["max_K"])}
        ours = same.get("ours-auto") or same.get("ours-ivf")
        if ours:
            name = "ours-auto" if "ours-auto" in same else "ours-ivf"
            out.append(f"| {r['n']:,} | {r['m']} | {r['max_K']} | {r['dup']} | {name} | {r['cpu_seconds'] / ours['cpu_seconds']:.1f}x | "
                       f"{r['seconds'] / ours['seconds']:.1f}x |")
    return ["", "Speed-up in this run (peer / ours):", "", "| N | M | max_K | pool (dup) | ours | CPU s | wall s |", "|---|---|---|---|---|---|---|", *out] if out else []


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "# TSDS scaling",
        "",
        *header(args.provenance),
        "Compare ratios within this run (the 2 CPU cores may be shared with other jobs); CPU s is",
        "user+system time of the case's process, a load-independent measure (about 2x the wall time",
        "on 2 idle cores when both are busy).  ",
        "alpha 0.5, C 5, sigma 0.75, kde_K 1000; PEERS.md data (clustered, unit rows, 384-d);",
        "dup = fraction of the pool replaced by near copies (noise 0.02), or 'dense' for the dense 32-d pool. See the script's docstring.",
        "",
        "| method | N | M | max_K | dup | wall s | CPU s | peak RSS GB (data) | TV vs ours-flat | TV vs peer | prefetch recall | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['n']:,} | {r['m']} | {r['max_K']} | {r['dup']} | {r['error']} | | | | | | |")
            continue
        d = r.get("diag", {})
        note = ""
        if d:
            note = (f"index {d.get('index_s', 0):.1f} s + prefetch {d['prefetch_s']:.1f} s ({d['index']}), densities "
                    f"{d.get('density_s', 0):.1f} s + solve {d.get('solve_s', 0):.1f} s ({d['n_densities']:,} densities, "
                    f"width {d.get('width', d.get('density_width'))}), mean neighbourhood {d['mean_neighbourhood']:.0f}")
        tv = f"{r['tv']:.4f}" if "tv" in r else ""
        tv_peer = f"{r['tv_peer']:.4f}" if "tv_peer" in r else ""
        rec = f"{r['recall']:.4f}" if "recall" in r else ""
        lines.append(f"| {r['method']} | {r['n']:,} | {r['m']} | {r['max_K']} | {r['dup']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} ({r['data_rss_gb']:.2f}) | {tv} | {tv_peer} | {rec} | {note} |")
    lines += speedups(rows)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
