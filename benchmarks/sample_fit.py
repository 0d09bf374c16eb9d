"""Sample fits of GOT-D against the full fit, and the bytes the choose step moves (issue 20).

Fidelity. ``fit_selector(pool, target, "got_d", sample=s)`` for ``s`` = 0.1%, 1%, 10% and 100% of
the pool, each sample drawn as a row count ``ceil(fraction x N)`` (keys from the seed and the
global row index, :func:`hf_otselect.fitted.sample_mask`); every fit then scores every row of the
pool. Against the full fit (``sample=None``, fitted first) each sample fit reports:

- the top-k overlap ``|top_k(sample fit) & top_k(full fit)| / k`` at k = 1% and 10% of N (ties
  to the lower row index, as :func:`hf_otselect.selectors.choose` breaks them);
- the Spearman correlation of the two score vectors (``scipy.stats.spearmanr``);
- ``W(target, 0.5 pool + 0.5 selection)``: the entropic OT distance
  (:func:`hf_otselect.ot.ot_distance`, eps 0.1 absolute, cost ``||x - y||^2``, as in
  ``benchmarks/quality.py``) between the target and the mixture that puts half its mass on the
  pool and half on the selected rows, each uniform. Past ``--w-rows`` rows a side is a seeded
  uniform subsample of it (the same pool rows for every fit);
- the fit's wall time (``fit_selector`` alone: the Sinkhorn solve over the sample and the
  calibration pass over it) and the process's peak RSS during the fit (``VmHWM``, reset before
  each fit through ``/proc/self/clear_refs``), next to the RSS held before it.

Data: (a) the clustered unit vectors of ``benchmarks/scale_out.py`` (200 centres, 384-d; the
target is M = 1,000 rows drawn near 20 of the centres), written once to a ``.npy`` under
``--work-dir`` in blocks and stored as ``--dtype`` (float16 by default: a 4M pool is 3.1 GB on disk
instead of 6.1), then memory-mapped afresh for each fit and each scoring pass; (b) the real mixed
text pool of ``benchmarks/quality.py`` (its loaders, its seed, its embedding cache under its work
folder) against ``--text-targets``.

Cost of choosing. Exact top-k at k = N / 10 over 2 processes (an in-process 2-rank group that
counts the bytes each rank puts into every collective, ``tests/_thread_comm.py``), on seeded
normal scores: :func:`hf_otselect.threshold.top_k_cut` (rounds of all-reduced counts) against
:func:`hf_otselect.selectors.choose` in top-k mode, which gathers every process's best k
(score, index) pairs. Both must keep the same rows as one full sort.

    nice -n 19 env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sample_fit.py --work-dir /tmp/sample_fit \\
        --sizes 1000000 4000000 --out benchmarks/results/sample_fit.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _provenance import header, provenance  # noqa: E402

logger = logging.getLogger("hf_otselect.benchmarks.sample_fit")

FRACTIONS = (0.001, 0.01, 0.1, 1.0)
TOP_FRACTIONS = (0.01, 0.1)
OT_EPS = 0.1  # GOT-D's default, and the OT column of benchmarks/quality.py
SCORE_BLOCK = 65_536


# ----------------------------------------------------------------------------------------------
# measuring


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its peak since the last reset (``VmHWM``), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Set ``VmHWM`` back to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def sample_size(fraction: float, n: int) -> int:
    """Rows of a sample of ``fraction`` of ``n`` rows: ``ceil(fraction x n)``, at least 1."""
    return max(1, math.ceil(fraction * n - 1e-9))


def best_rows(scores: np.ndarray) -> np.ndarray:
    """Row indices by descending score, ties to the lower index (what ``choose`` keeps first)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def top_overlap(order_a: np.ndarray, order_b: np.ndarray, k: int) -> float:
    """``|first k of a & first k of b| / k``."""
    return float(np.intersect1d(order_a[:k], order_b[:k], assume_unique=True).size / k)


def score_all(fitted: Any, data: Any) -> np.ndarray:
    """Every row's score, read in blocks (a memory map stays on disk)."""
    return np.concatenate([fitted.score_rows(np.asarray(data[s:s + SCORE_BLOCK], dtype=np.float32))
                           for s in range(0, len(data), SCORE_BLOCK)])


def mixture_w(pool_rows: np.ndarray, selected: np.ndarray | None, target: np.ndarray) -> float:
    """``W(target, 0.5 pool + 0.5 selection)``, each part uniform (entropic, eps 0.1); no selection: ``W(target, pool)``."""
    from hf_otselect.ot import ot_distance

    if selected is None:
        return float(ot_distance(pool_rows, target, eps=OT_EPS, max_iter=2000))
    x = np.concatenate([pool_rows, selected]).astype(np.float32)
    a = np.concatenate([np.full(len(pool_rows), 0.5 / len(pool_rows)), np.full(len(selected), 0.5 / len(selected))])
    return float(ot_distance(x, target, a=a, eps=OT_EPS, max_iter=2000))


def read_rows(data: Any, index: np.ndarray) -> np.ndarray:
    """Rows by index as float32, read in index order (a memory map reads fastest so)."""
    return np.asarray(data[np.sort(index)], dtype=np.float32)


def fidelity(name: str, open_pool: Callable[[], Any], target: np.ndarray, n: int, fractions: tuple[float, ...],
             seed: int, w_rows: int) -> list[dict[str, Any]]:
    """Fit on each sample, score every row, compare with the full fit (see the module docstring)."""
    from scipy.stats import spearmanr

    from hf_otselect import fit_selector

    rng = np.random.default_rng(seed)
    pool_pick = np.sort(rng.choice(n, min(n, w_rows), replace=False))
    pool = open_pool()
    pool_rows = read_rows(pool, pool_pick)
    del pool
    ks = {f: sample_size(f, n) for f in TOP_FRACTIONS}
    sel_picks = {f: np.sort(np.random.default_rng([seed, i]).choice(k, min(k, w_rows), replace=False))
                 for i, (f, k) in enumerate(ks.items())}

    def fit(sample: int | None) -> tuple[Any, float, float, float]:
        pool = open_pool()
        before = rss_gib()
        reset_peak()
        t = time.perf_counter()
        fitted = fit_selector(pool, target, "got_d", sample=sample, seed=seed, eps=OT_EPS)
        seconds = time.perf_counter() - t
        peak = rss_gib("VmHWM")
        del pool
        return fitted, seconds, before, peak

    def scores_of(fitted: Any) -> np.ndarray:
        pool = open_pool()
        try:
            return score_all(fitted, pool)
        finally:
            del pool

    whole = fit(None)
    reference = scores_of(whole[0])
    full_order = best_rows(reference)
    rows = []
    for fraction in fractions:
        m = sample_size(fraction, n)
        if m < n:
            fitted, seconds, before, peak = fit(m)
            scores = scores_of(fitted)
            order = best_rows(scores)
        else:  # sample=N keeps every row (sample_mask): the reference fit itself
            (fitted, seconds, before, peak), scores, order = whole, reference, full_order
        row = {"data": name, "n": n, "fraction": fraction, "n_fit": int(fitted.fit_info["n_fit"]), "fit_s": seconds,
               "rss_before_gib": before, "peak_rss_gib": peak, "n_iter": int(fitted.fit_info["diagnostics"].get("n_iter", 0)),
               "backend": fitted.fit_info["diagnostics"].get("backend"), "spearman": float(spearmanr(reference, scores).statistic)}
        pool = open_pool()
        for f, k in ks.items():
            row[f"overlap@{f:g}"] = top_overlap(order, full_order, k)
            row[f"w@{f:g}"] = mixture_w(pool_rows, read_rows(pool, order[:k][sel_picks[f]]), target)
        del pool
        rows.append(row)
        logger.info("%s n=%d sample %g (%d rows): overlap %.4f / %.4f, spearman %.4f, fit %.1f s, peak %.2f GiB", name, n,
                    fraction, row["n_fit"], row["overlap@0.01"], row["overlap@0.1"], row["spearman"], seconds, peak)
    context = {"data": name, "n": n, "k": ks, "w_rows": w_rows, "target_size": len(target),
               "w_pool_alone": mixture_w(pool_rows, None, target), "w_rows_pool": len(pool_rows),
               "w_rows_selection": {f: len(p) for f, p in sel_picks.items()}}
    return [context, *rows]


def synthetic(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fidelity on ``n`` clustered vectors memory-mapped from ``--work-dir``."""
    from scale_out import make_pool, make_target

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"pool_{n}_{args.dtype}.npy"
    t = time.perf_counter()
    make_pool(path, n, seed=args.seed, dtype=args.dtype)
    logger.info("pool %s ready in %.1f s", path, time.perf_counter() - t)
    target = make_target(work / "target.npy", seed=args.seed)
    return fidelity(f"clustered {args.dtype}", lambda: np.load(path, mmap_mode="r"), target, n, args.fractions, args.seed, args.w_rows)


def text(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fidelity on the real mixed text pool of ``benchmarks/quality.py`` against ``--text-targets``."""
    import quality

    from hf_otselect.embed import embed

    cfg = quality.Config(data_dir=args.data_dir, work_dir=args.text_work_dir, n_per_source=args.text_n_per_source,
                         n_target=args.text_n_target, targets=tuple(args.text_targets))
    rng = np.random.default_rng(cfg.seed)  # quality.run's draws: the same pool and targets
    raw = quality.load_raw(Path(cfg.data_dir), rng)
    pool = quality.build_pool(raw, cfg, rng)
    targets = quality.build_targets(raw, cfg, pool["text"], rng)

    def emb(texts: list[str]) -> np.ndarray:
        return embed(texts, cache_dir=Path(cfg.work_dir) / "embed_cache", max_length=cfg.embed_max_length, device=cfg.device,
                     show_progress=False)

    x = emb(pool["text"])
    out = []
    for name in cfg.targets:
        y = emb(targets[name]["select"])
        out += fidelity(f"text -> {name}", lambda: x, y, len(x), args.fractions, args.seed, args.w_rows)
    return out


# ----------------------------------------------------------------------------------------------
# the cost of choosing


def choose_cost(n: int, world: int, seed: int) -> dict[str, Any]:
    """Bytes each process sends to choose the top N / 10 of ``n`` scores: threshold rounds vs gathering."""
    from hf_otselect.selectors import choose
    from hf_otselect.threshold import top_k_cut
    from tests._thread_comm import contiguous_bounds, run_ranks

    scores = np.random.default_rng(seed).standard_normal(n)
    k = n // 10

    def run(comm: Any) -> dict[str, Any]:
        lo, hi = contiguous_bounds(n, world, comm.rank)
        mine, index = scores[lo:hi], np.arange(lo, hi, dtype=np.int64)
        comm.bytes_sent = 0
        t = time.perf_counter()
        cut = top_k_cut(mine, k, index=index, comm=comm)
        kept = index[cut.keeps(mine, index)]
        cut_s, cut_bytes = time.perf_counter() - t, comm.bytes_sent
        comm.bytes_sent = 0
        t = time.perf_counter()
        gathered = choose(mine, k, mode="top_k", index=index, comm=comm)
        return {"kept": kept, "gathered": gathered, "cut_bytes": cut_bytes, "cut_s": cut_s,
                "gather_bytes": comm.bytes_sent, "gather_s": time.perf_counter() - t}

    per_rank = run_ranks(world, run)
    truth = np.sort(best_rows(scores)[:k])
    same = np.array_equal(np.sort(np.concatenate([r["kept"] for r in per_rank])), truth) and all(
        np.array_equal(np.sort(r["gathered"]), truth) for r in per_rank)
    total = {key: sum(r[key] for r in per_rank) for key in ("cut_bytes", "gather_bytes")}
    return {
        "n": n, "k": k, "processes": world, "same_rows_as_full_sort": bool(same),
        # Each collective of the stand-in group hands every process the others' buffers whole.
        "cut_sent": max(r["cut_bytes"] for r in per_rank), "cut_received": max(total["cut_bytes"] - r["cut_bytes"] for r in per_rank),
        "gather_sent": max(r["gather_bytes"] for r in per_rank),
        "gather_received": max(total["gather_bytes"] - r["gather_bytes"] for r in per_rank),
        "cut_s": max(r["cut_s"] for r in per_rank), "gather_s": max(r["gather_s"] for r in per_rank),
    }


# ----------------------------------------------------------------------------------------------
# the page


def smallest_reaching(rows: list[dict[str, Any]], key: str, level: float) -> str:
    """The smallest sample fraction whose ``key`` is at least ``level`` (and every larger one's too)."""
    ok = None
    for r in sorted(rows, key=lambda r: -r["fraction"]):
        if r[key] < level:
            break
        ok = r["fraction"]
    return "none" if ok is None else f"{ok:.1%}"


def render(res: dict[str, Any]) -> str:
    prov = res["provenance"]
    lines = ["# Sample fits of GOT-D against the full fit, and the bytes of choosing", "", *header(prov), "",
             f"Total wall time {res['total_s'] / 60:.1f} min; `uptime` at the end: `{res['uptime_end']}`.", ""]
    for m in res.get("merged", []):
        lines += ["The sections of an earlier run of this script come first; it was:  ", *header(m["provenance"]),
                  f"Total wall time {m['total_s'] / 60:.1f} min; `uptime` at the end: `{m['uptime_end']}`.", ""]
    lines += [
        "Every sample is `ceil(fraction x N)` rows drawn by `fit_selector(..., sample=<rows>)` (keys from the seed and the",
        "global row index); each fit then scores every row. Overlap = shared rows of the two top-k / k (ties to the lower",
        "index); Spearman of the two score vectors; W = entropic OT distance (eps 0.1, cost ||x-y||^2,",
        "`hf_otselect.ot.ot_distance`) between the target and 0.5 pool + 0.5 selection (each part uniform; a part larger",
        f"than {res['args']['w_rows']:,} rows is a seeded subsample of that many). Fit s = `fit_selector` alone (Sinkhorn on the sample +",
        "the calibration pass over it); the 100% row is the reference fit itself (`sample=None`; a sample of N rows is every",
        "row, the same path); peak RSS = the process's VmHWM during the fit (reset before it), which counts the",
        "pages of the memory-mapped pool the fit read; RSS before = what the process held when the fit began.", ""]
    for part in res["fidelity"]:
        ctx, rows = part[0], part[1:]
        k = {float(f): v for f, v in ctx["k"].items()}
        lines += [f"## {ctx['data']}, N = {ctx['n']:,}, target {ctx['target_size']:,} rows", "",
                  f"k = {k[0.01]:,} (1%) and {k[0.1]:,} (10%). W(target, pool) (its {ctx['w_rows_pool']:,}-row "
                  f"subsample): {ctx['w_pool_alone']:.4f}.", "",
                  "| sample | rows fitted | overlap k=1% | overlap k=10% | Spearman | W, k=1% | W, k=10% | fit s | iterations | RSS before GiB | peak RSS GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['fraction']:.1%} | {r['n_fit']:,} | {r['overlap@0.01']:.4f} | {r['overlap@0.1']:.4f} | "
                         f"{r['spearman']:.5f} | {r['w@0.01']:.4f} | {r['w@0.1']:.4f} | {r['fit_s']:.2f} | {r['n_iter']} | "
                         f"{r['rss_before_gib']:.2f} | {r['peak_rss_gib']:.2f} |")
        lines += ["", f"Smallest sample whose overlap is >= 0.9 (and stays so above it): k=1% {smallest_reaching(rows, 'overlap@0.01', 0.9)}, "
                  f"k=10% {smallest_reaching(rows, 'overlap@0.1', 0.9)}. Goal (overlap >= 0.95 at a 10% sample): "
                  + ", ".join(f"k={f:.0%} {'met' if r['overlap@' + format(f, 'g')] >= 0.95 else 'NOT met'} ({r['overlap@' + format(f, 'g')]:.4f})"
                              for r in rows if r["fraction"] == 0.1 for f in TOP_FRACTIONS) + ".", ""]
    if res["choose"]:
        lines += ["## The cost of choosing: exact top-k at k = N/10 over 2 processes", "",
                  "Seeded normal scores split contiguously over an in-process 2-rank group that counts the bytes each rank",
                  "contributes to every collective (each rank receives the other's contribution whole). Threshold =",
                  "`threshold.top_k_cut` (16 rounds of 16 all-reduced counts for the k-th key, 16 more for the tied indices,",
                  "and two all-reduces of 3 integers in all); gather = `selectors.choose(mode='top_k')`, the path that all-gathers each rank's",
                  "best k (score, index) pairs. Bytes per process (the larger rank).", "",
                  "| N | k | threshold: sent | threshold: received | gather: sent | gather: received | gather / threshold | threshold s | gather s | same rows as a full sort |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in res["choose"]:
            lines.append(f"| {c['n']:,} | {c['k']:,} | {c['cut_sent']:,} B | {c['cut_received']:,} B | {c['gather_sent']:,} B | "
                         f"{c['gather_received']:,} B | {c['gather_sent'] / c['cut_sent']:,.0f}x | {c['cut_s']:.2f} | {c['gather_s']:.2f} | "
                         f"{'yes' if c['same_rows_as_full_sort'] else 'NO'} |")
        lines.append("")
    if res.get("notes"):
        lines += ["## Reading", "", *res["notes"], ""]
    if res.get("not_run"):
        lines += ["## Not run", "", *res["not_run"], ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import quality

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="/tmp/hf_otselect_sample_fit", help="where the clustered pools are written")
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 4_000_000], help="clustered pool sizes")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage of the clustered pools")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--w-rows", type=int, default=10_000, help="largest part of a W mixture before subsampling")
    p.add_argument("--text-targets", nargs="*", default=["chemprot", "sciie"], choices=list(quality.TARGET_DOMAIN),
                   help="targets of the real text pool (none: skip it)")
    p.add_argument("--text-n-per-source", type=int, default=quality.Config.n_per_source)
    p.add_argument("--text-n-target", type=int, default=quality.Config.n_target)
    p.add_argument("--text-work-dir", default=quality.Config.work_dir, help="benchmarks/quality.py's work folder (embedding cache)")
    p.add_argument("--data-dir", default=str(quality.DEFAULT_DATA))
    p.add_argument("--choose-sizes", type=int, nargs="*", default=[1_000_000, 4_000_000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", default=None, help="a JSON this script wrote: write its page again (with --not-run lines "
                   "when given), running nothing")
    p.add_argument("--merge", default=None, help="a JSON this script wrote earlier: its sections come first on the page, "
                   "its provenance with them")
    p.add_argument("--not-run", nargs="*", default=[], help="lines for the page's 'Not run' section")
    p.add_argument("--note", nargs="*", default=[], help="lines for the page's 'Reading' section (with --render)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sample_fit.md"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import subprocess

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text(encoding="utf-8"))
        res["not_run"] = list(args.not_run) or res.get("not_run", [])
        res["notes"] = list(args.note) or res.get("notes", [])
        return _write(res, Path(args.out))
    t = time.perf_counter()
    prov = provenance(seeds={"data, samples, W subsamples, choose scores": args.seed}, argv=argv and [__file__, *argv])
    res: dict[str, Any] = {"provenance": prov, "args": vars(args), "fidelity": [], "choose": []}
    for n in args.sizes:
        res["fidelity"].append(synthetic(n, args))
    if args.text_targets:
        flat = text(args)
        res["fidelity"] += [flat[i:i + 1 + len(args.fractions)] for i in range(0, len(flat), 1 + len(args.fractions))]
    for n in args.choose_sizes:
        res["choose"].append(choose_cost(n, 2, args.seed))
    res["not_run"] = list(args.not_run)
    if args.merge:
        prev = json.loads(Path(args.merge).read_text(encoding="utf-8"))
        res["fidelity"], res["choose"] = prev["fidelity"] + res["fidelity"], prev["choose"] + res["choose"]
        res["merged"] = [*prev.get("merged", []), {"provenance": prev["provenance"], "total_s": prev["total_s"], "uptime_end": prev["uptime_end"]}]
    res["total_s"] = time.perf_counter() - t
    res["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return _write(res, Path(args.out))


def _write(res: dict[str, Any], out: Path) -> dict[str, Any]:
    """The page and its JSON (``out`` with the suffix ``.json``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(res), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    logger.info("wrote %s and %s", out, out.with_suffix(".json"))
    return res


if __name__ == "__main__":
    main()
