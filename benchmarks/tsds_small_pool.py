"""TSDS on a small mixed real pool: is its selection clearly closer to the target than random?

Issue 14 item 1. Pool: 7 sources x 150 units (``--n-per-source``) of real text from
``/work/shared/data`` (ag_news, imdb, chemprot, csabstruct, wikitext2, scicite, humaneval; the units
of ``benchmarks/quality.py``), embedded with all-MiniLM-L6-v2 through :func:`hf_otselect.embed.embed`.
Targets: held-out rows of ChemProt (its source is in the pool) and of SciERC, Amazon reviews and
non-toxic Jigsaw comments (sources not in the pool: "unseen"), plus AG News and IMDB test rows.

For each selector and target, ``k = 100`` rows are chosen and the pool "warmed" with them is
compared with the target: entropic OT (eps 0.1, cost ``||x - y||^2``, :func:`hf_otselect.ot.ot_distance`)
between the target (uniform) and the mixture ``0.5 * pool + 0.5 * selection`` (pool rows
``0.5 / N`` each, selected rows ``0.5 / k`` each, with multiplicity). Sampled selectors (TSDS,
random) are averaged over ``--seeds`` draws. ``gap`` = ``(OT_tsds - OT_similarity) /
(OT_random - OT_similarity)``: 0 is as close as similarity, 1 no better than random; the goal is
``gap <= 0.25``.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tsds_small_pool.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tsds_small_pool.py --tsds max_K=5000 --out /tmp/x.md   # other TSDS params
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import quality as q  # noqa: E402  (its data loading and text units)
from _provenance import header, provenance  # noqa: E402

SOURCES = ("ag_news", "imdb", "chemprot", "csabstruct", "wikitext2", "scicite", "humaneval")
TARGETS = ("chemprot", "sciie", "amazon", "jigsaw_ok", "ag_news", "imdb")
UNSEEN = ("sciie", "amazon", "jigsaw_ok")


def warmed_ot(pool_emb: np.ndarray, sel: np.ndarray, tgt_emb: np.ndarray) -> float:
    """Entropic OT between the target and ``0.5 * pool + 0.5 * selection`` (module docstring)."""
    from hf_otselect.ot import ot_distance

    n, k = len(pool_emb), len(sel)
    x = np.vstack([pool_emb, pool_emb[sel]])
    a = np.concatenate([np.full(n, 0.5 / n), np.full(k, 0.5 / k)])
    return float(ot_distance(x, tgt_emb, a=a, eps=0.1, max_iter=5000))


def parse_params(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("HF_OTSELECT_SHARED_DATA", "/work/shared/data"))
    ap.add_argument("--work-dir", default="/tmp/hf_otselect_tsds_small")
    ap.add_argument("--n-per-source", type=int, default=150)
    ap.add_argument("--n-target", type=int, default=150)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tsds", nargs="*", default=[], help="TSDS parameters as key=json (defaults otherwise)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tsds_small_pool.md"))
    args = ap.parse_args()
    prov = provenance(seeds={"data": 0, "sampled selectors": list(range(args.seeds))})
    sys.path.insert(0, str(REPO))
    from hf_otselect.embed import embed
    from hf_otselect.selectors import get_selector

    cfg = q.Config(data_dir=args.data_dir, n_per_source=args.n_per_source, n_target=args.n_target, n_eval=0, targets=TARGETS)
    rng = np.random.default_rng(0)
    raw = q.load_raw(Path(args.data_dir), rng)
    raw["pool"] = {s: raw["pool"][s] for s in SOURCES}
    saved = dict(q.DOMAIN)
    q.DOMAIN.clear()
    q.DOMAIN.update({s: saved[s] for s in SOURCES})
    pool = q.build_pool(raw, cfg, rng)
    targets = q.build_targets(raw, cfg, pool["text"], rng)

    def emb(texts: list[str]) -> np.ndarray:
        return embed(texts, cache_dir=Path(args.work_dir) / "embed_cache", show_progress=False)

    pool_emb = emb(pool["text"])
    n = len(pool_emb)
    tsds_params = parse_params(args.tsds)
    rows = []
    for name in TARGETS:
        tgt = emb(targets[name]["select"])
        res: dict[str, Any] = {"target": name}
        sim = get_selector("similarity").select(pool_emb, tgt, args.k).indices
        res["similarity"] = warmed_ot(pool_emb, sim, tgt)
        res["random"] = float(np.mean([warmed_ot(pool_emb, np.random.default_rng(s).choice(n, args.k, replace=False), tgt) for s in range(args.seeds)]))
        sel = get_selector("tsds", **{"budget": args.k, "replace": True, **tsds_params})  # the paper's draws, as recorded
        t0 = time.perf_counter()
        p = sel.score(pool_emb, tgt)
        res["tsds_s"] = time.perf_counter() - t0
        res["tsds"] = float(np.mean([warmed_ot(pool_emb, sel.choose_rows(p, args.k, seed=s), tgt) for s in range(args.seeds)]))
        res["gap"] = (res["tsds"] - res["similarity"]) / (res["random"] - res["similarity"])
        res["support"] = int((p > 0).sum())
        res["diag"] = {key: sel.diagnostics_.get(key) for key in ("width", "max_K", "mean_neighbourhood", "n_at_end", "capped", "C")}
        rows.append(res)
        print(json.dumps(res), flush=True)

    lines = [
        "# TSDS on a small mixed real pool (issue 14 item 1)",
        "",
        *header(prov),
        f"Pool: {n} rows ({len(SOURCES)} sources x {args.n_per_source}: {', '.join(SOURCES)}), all-MiniLM-L6-v2; "
        f"{args.n_target} target rows each; k = {args.k}; TSDS parameters {tsds_params or 'defaults'}; "
        f"sampled selectors averaged over {args.seeds} seeds.  ",
        "OT = entropic OT (eps 0.1) of the target vs 0.5 pool + 0.5 selection; lower is closer. "
        "gap = (TSDS - similarity) / (random - similarity); goal <= 0.25. Unseen = the target's source is not in the pool.",
        "",
        "| target | unseen | similarity | random | TSDS | gap | TSDS support | width / max_K | mean neighbourhood | TSDS s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["diag"]
        lines.append(f"| {r['target']} | {'yes' if r['target'] in UNSEEN else 'no'} | {r['similarity']:.4f} | {r['random']:.4f} | {r['tsds']:.4f} | "
                     f"{r['gap']:.3f} | {r['support']} | {d['width']} / {d['max_K']} | {d['mean_neighbourhood']:.1f} | {r['tsds_s']:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
