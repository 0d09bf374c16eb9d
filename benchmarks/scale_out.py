"""Scale-out benchmark: GOT-D and TSDS fits over a sharded, memory-mapped pool, 1 vs 2 processes.

Each process maps the same ``.npy`` file and reads only its contiguous rows, in blocks (a
:class:`~hf_otselect.dist.PoolView` over a memmap); the fits talk through gloo collectives. Per run
it records wall time of fit, scoring pass and choice, each process's peak RSS, the bytes each
process sent per Sinkhorn iteration (``Comm.bytes_sent``), and the report's time and how much it
raised each process's peak RSS (:mod:`hf_otselect.report_data` on every process, then the page).

    .venv/bin/python benchmarks/scale_out.py --work-dir /tmp/scale --sizes 1000000 4000000 \
        --procs 1 2 --out benchmarks/results/scale_out.md

A method may carry the filters and the guard: ``--methods got_d+decontam+guard tsds+guard`` runs
the decontamination (a planted held-out set) before the fit and the near-duplicate guard at the
choice, the way the job's stages do.

The pool is clustered unit vectors (the PEERS.md recipe: 200 centres, 384-d), written block by
block, so making it never holds it in memory either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM, M, CENTRES = 384, 1000, 200


def make_pool(path: Path, n: int, seed: int = 0, block: int = 250_000, dtype: str = "float32") -> None:
    """Write ``n`` clustered unit rows to ``path`` (``.npy``, stored as ``dtype``) block by block."""
    if path.exists():
        old = np.load(path, mmap_mode="r")
        if old.shape == (n, DIM) and old.dtype == dtype:
            return
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CENTRES, DIM))
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, DIM))
    for s in range(0, n, block):
        e = min(s + block, n)
        x = centres[rng.integers(0, CENTRES, e - s)] * 0.5 + rng.normal(size=(e - s, DIM))
        out[s:e] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
    out.flush()
    del out
    os.replace(tmp, path)


def make_target(path: Path, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CENTRES, DIM))
    rng = np.random.default_rng(seed + 1)
    y = centres[rng.integers(0, 20, M)] * 0.5 + rng.normal(size=(M, DIM))
    y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
    np.save(path, y)
    return y


#: Held-out rows planted for ``+decontam``: copies of pool rows at fixed positions, moved by this much noise.
HELDOUT, HELDOUT_NOISE = 1000, 0.01
#: The guard's radius for ``+guard`` (the job's ``dedup_radius``).
GUARD_RADIUS = 0.2


def planted_heldout(data: np.memmap) -> tuple[np.ndarray, np.ndarray]:
    """A held-out set planted in the pool: rows ``linspace(0, n - 1, HELDOUT)`` plus small noise (and those rows).

    The rows are read from the file (``pread``), not through the memory map: touching them through
    the map would fault in the pages around them, the other processes' shards included, and count
    them in this process's RSS (a job embeds its held-out set; it never reads another shard).
    """
    rows = np.unique(np.linspace(0, data.shape[0] - 1, HELDOUT).astype(np.int64))
    width = DIM * data.dtype.itemsize
    fd = os.open(data.filename, os.O_RDONLY)
    try:
        raw = b"".join(os.pread(fd, width, data.offset + int(r) * width) for r in rows)
    finally:
        os.close(fd)
    x = np.frombuffer(raw, dtype=data.dtype).reshape(rows.size, DIM).astype(np.float64)
    x += np.random.default_rng(5).normal(scale=HELDOUT_NOISE / np.sqrt(DIM), size=(rows.size, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), rows


def worker(pool_path: str, target_path: str, spec: str, out: str) -> None:
    """One process's part (run directly, or under torchrun).

    ``spec`` is a method, optionally with ``+decontam`` (drop the rows within the job's default
    radius of a planted held-out set, then fit and score the rows left, as the filters stage does)
    and ``+guard`` (choose through the near-duplicate guard, as the choosing stage does).
    """
    from hf_otselect.decontaminate import decontaminate
    from hf_otselect.dedup import guarded_choose
    from hf_otselect.dist import PoolView, get_comm
    from hf_otselect.selectors import get_selector
    from hf_otselect.stages.filters import Filtered, kept_candidates

    method, *extras = spec.split("+")
    comm = get_comm()
    data = np.load(pool_path, mmap_mode="r")
    n = data.shape[0]
    div, mod = divmod(n, comm.world_size)
    lo = div * comm.rank + min(comm.rank, mod)
    hi = lo + div + (comm.rank < mod)
    view = PoolView(data[lo:hi], lo, n)
    target = np.load(target_path)
    params = {"eps": 0.1} if method == "got_d" else {}
    selector = get_selector(method, **params)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    comm.barrier()
    t0 = time.perf_counter()
    flt, dropped = None, 0
    if "decontam" in extras:
        heldout, planted = planted_heldout(data)
        res = decontaminate(view.data, heldout, ngram=None, comm=comm)
        dropped = res.totals["dropped"]
        keep = np.flatnonzero(~res.dropped)
        kept_offset, n_kept = comm.exclusive_offset(keep.size)
        flt = Filtered(keep, True, kept_candidates(view.data, keep, False), (), kept_offset=kept_offset)
        fit_view = PoolView(flt.candidates, kept_offset, n_kept)
    else:
        fit_view = view
    t_filter = time.perf_counter()
    state = selector.fit(fit_view, target, comm=comm)
    t1 = time.perf_counter()
    fit_bytes = comm.bytes_sent
    kept_scores = np.concatenate([selector.score_batch(state, rows, idx) for idx, rows in fit_view.blocks()])
    t2 = time.perf_counter()
    index = np.arange(fit_view.offset, fit_view.offset + fit_view.n_local)
    guard = {}
    if "guard" in extras:
        chosen, guard = guarded_choose(selector, kept_scores, 1000, seed=0, candidates=fit_view.data, radius=GUARD_RADIUS, index=index, comm=comm)
    else:
        chosen = selector.choose_rows(kept_scores, 1000, seed=0, index=index, comm=comm)
    if flt is not None:
        chosen = flt.pool_rows(np.asarray(chosen, dtype=np.int64), lo, comm)
        scores = np.full(view.n_local, np.nan)
        scores[flt.keep_rows] = kept_scores
    else:
        scores = kept_scores
    comm.barrier()
    t3 = time.perf_counter()
    report = _report(view, scores, chosen, target, spec, out, comm)
    info = dict(selector.diagnostics_)
    n_iter = int(info.get("n_iter", 0) or 0)
    row = {
        "method": spec, "n": n, "procs": comm.world_size, "rank": comm.rank, "filter_s": t_filter - t0, "fit_s": t1 - t_filter,
        "score_s": t2 - t1, "choose_s": t3 - t2, "total_s": t3 - t0,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_fit_gb": rss0 / 2**20, "shard_gb": (hi - lo) * DIM * 4 / 2**30, "n_iter": n_iter,
        "fit_bytes": fit_bytes, "bytes_per_iter": fit_bytes / n_iter if n_iter else None, "dropped": dropped,
        "guard": {k: v for k, v in guard.items() if isinstance(v, (int, float, str))},
        "chosen_sha": hashlib.sha256(np.ascontiguousarray(chosen, dtype=np.int64).tobytes()).hexdigest()[:16],
        **report,
    }
    rows = comm.all_gather(np.frombuffer(json.dumps(row).encode().ljust(2048), dtype=np.uint8))
    if comm.is_main:
        with open(out, "a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(bytes(r).decode().strip() + "\n")
    comm.close()


def _report(view, scores: np.ndarray, chosen: np.ndarray, target: np.ndarray, method: str, out: str, comm) -> dict:
    """The job's report after the choice: summaries where the rows live (every process), then the page (process 0).

    Returns this process's report time and how much the report raised its peak RSS (0 when the
    report's peak stays under the fit's), the figures the issue's goal is stated in.
    """
    from hf_otselect import report_data
    from hf_otselect.report import write_report

    lo = view.offset
    draws = np.isin(np.arange(lo, lo + scores.size), chosen).astype(np.int64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    comm.barrier()
    t0 = time.perf_counter()

    def blocks():
        for idx, rows in view.blocks():
            yield report_data.RowBlock(idx, scores[idx - lo], draws[idx - lo], {}, lambda pos, rows=rows: (None, np.asarray(rows[pos])))

    data = report_data.summarize(blocks, seed=0, comm=comm, target=target)
    t1 = time.perf_counter()
    if comm.is_main:
        folder = Path(out).with_name(f"report_{method}_{view.n_global}_{comm.world_size}")
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        base = method.split("+")[0]
        prov = {"method": base, "k": int(chosen.size), "seed": 0, "params": {"eps": 0.1} if base == "got_d" else {},
                "rows": {"pool": view.n_global, "target": int(len(target)), "selected": int(chosen.size)},
                "config": {"score_column": "score", "report_columns": []}}
        (folder / "selection.json").write_text(json.dumps(prov), encoding="utf-8")
        report_data.save(data, folder)
        write_report(folder)
    comm.barrier()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"report_data_s": t1 - t0, "report_page_s": t2 - t1, "report_s": t2 - t0,
            "report_added_gb": (peak - before) / 2**20, "report_sample_rows": int(data.summary["sample_rows"])}


def run(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    target = work / "target.npy"
    make_target(target)
    raw = work / "rows.jsonl"
    raw.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads))}
    for n in args.sizes:
        pool = work / f"pool_{n}.npy"
        make_pool(pool, n)
        for method in args.methods:
            for procs in args.procs:
                env["OMP_NUM_THREADS"] = str(max(1, args.threads // procs))
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                       __file__, "--worker", str(pool), str(target), method, str(raw)]
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{method} n={n} procs={procs} failed:\n{proc.stderr[-4000:]}")
                print(f"{method} n={n:,} procs={procs}: {time.perf_counter() - t:.1f} s launched", flush=True)
    return [json.loads(line) for line in raw.read_text().splitlines()]


def render(rows: list[dict], args: argparse.Namespace) -> str:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Scale-out: sharded GOT-D and TSDS fits, 1 vs 2 processes",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Commit: `{commit}`; python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}; "
        f"{os.cpu_count()} cores, OMP threads {args.threads} split between the processes.",
        "",
        f"Pool: clustered unit vectors, {DIM}-d, memory-mapped; target M = {M}; GOT-D eps 0.1; TSDS defaults; k = 1000.",
        "",
        "Report (after the choice; sample of at most 20,000 rows): summaries reduced where the rows live, then the page on",
        "process 0. 'report adds GB' is how far the report raised a process's peak RSS above its peak before the report.",
        "",
        "`+decontam`: a held-out set of 1,000 planted near-copies of pool rows (noise 0.01) is fitted and every row tested",
        "(the job's default radius 0.3, n-gram test off), then the rows left are fitted and scored through a lazy subset of",
        "the shard, as the filters stage does. `+guard`: the choice goes through the near-duplicate guard (radius 0.2,",
        "mode auto: greedy for both methods here). 'filter s' is the decontamination; 'dropped' the rows it removed.",
        "",
        "| method | N | procs | filter s | fit s | score s | choose s | total s | peak RSS / proc GB | shard GB | iters | bytes/iter/proc | dropped | same rows as 1 proc | report s | report % of total | report adds GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["n"], r["procs"]), []).append(r)
    for (method, n, procs), rs in sorted(by.items()):
        worst = max(rs, key=lambda r: r["total_s"])
        one = by.get((method, n, 1), rs)[0]
        same = "yes" if rs[0]["chosen_sha"] == one["chosen_sha"] else "NO"  # all k chosen rows, in order
        bpi = max((r["bytes_per_iter"] or 0) for r in rs)
        lines.append(
            f"| {method} | {n:,} | {procs} | {worst.get('filter_s', 0.0):.1f} | {worst['fit_s']:.1f} | {worst['score_s']:.1f} | "
            f"{worst['choose_s']:.2f} | {worst['total_s']:.1f} | {max(r['peak_rss_gb'] for r in rs):.2f} | {worst['shard_gb']:.2f} | "
            f"{worst['n_iter']} | {bpi:,.0f} | {worst.get('dropped', 0):,} | {same} | {max(r['report_s'] for r in rs):.1f} | {100 * max(r['report_s'] for r in rs) / worst['total_s']:.1f}% | "
            f"{max(r['report_added_gb'] for r in rs):.3f} |"
        )
    lines += ["", *_projection(by)]
    return "\n".join(lines) + "\n"


#: Assumed interconnect for the projection (NCCL ring all-reduce over InfiniBand-class links).
_LINK_BYTES_S, _LINK_LATENCY_S = 10e9, 20e-6


def _projection(by: dict) -> list[str]:
    """What 1B rows on 64 processes would take at the costs measured here (a model, stated)."""
    p, rows = 64, 1_000_000_000 / 64
    out = ["## Projection: 1B rows on 64 processes (a model, not a measurement)", "",
           "Model: a process's fit + score time is a + b x (its rows), with a and b taken from the two largest",
           "2-process runs of each method here (one run: a = 0); each of 64 processes holds 1B / 64 = 15.6M rows.",
           "GOT-D adds, per Sinkhorn iteration, a ring all-reduce of the measured bytes "
           f"(2 (P-1)/P x bytes / {_LINK_BYTES_S / 1e9:.0f} GB/s + 2 (P-1) x {_LINK_LATENCY_S * 1e6:.0f} us, assumed links).",
           "These are this CPU's costs; a GPU runs the same per-row work (GEMM + exp) one to two orders of",
           "magnitude faster, but no GPU was measured here.", "",
           "| method | runs used | fixed a (s) | per row b (s) | all-reduce per iteration | projected, 64 processes |",
           "|---|---|---|---|---|---|"]
    for method in sorted({m for m, _, _ in by}):
        runs = sorted((rs[0] for (m, _, procs), rs in by.items() if m == method and procs == 2), key=lambda r: r["n"])
        if not runs:
            continue
        pts = [(r["n"] / r["procs"], max(x["fit_s"] + x["score_s"] for x in by[(method, r["n"], 2)])) for r in runs[-2:]]
        if len(pts) == 2 and pts[1][0] > pts[0][0]:
            b = (pts[1][1] - pts[0][1]) / (pts[1][0] - pts[0][0])
            a = pts[0][1] - b * pts[0][0]
        else:
            a, b = 0.0, pts[-1][1] / pts[-1][0]
        r = runs[-1]
        comm = 0.0
        if method.startswith("got_d") and r["bytes_per_iter"]:
            comm = 2 * (p - 1) / p * r["bytes_per_iter"] / _LINK_BYTES_S + 2 * (p - 1) * _LINK_LATENCY_S
        total = a + b * rows + r["n_iter"] * comm
        used = " and ".join(f"{int(n * 2):,}" for n, _ in pts)
        out.append(f"| {method} | N = {used} | {a:.1f} | {b:.2e} | {comm * 1e3:.2f} ms | {total / 60:.1f} min |")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["got_d", "tsds"],
                        help="methods, each optionally with +decontam and/or +guard (e.g. got_d+decontam+guard)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    text = render(run(args), args)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
