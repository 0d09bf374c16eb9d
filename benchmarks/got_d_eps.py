"""Pick GOT-D's default eps by measurement on real text embeddings (all-MiniLM-L6-v2, L2-normalised).

Pool: 600 texts from each of 6 domains (chemprot, sciie, ag_news, imdb, amazon, wikitext), 3,600 in
all; target: 200 held-out texts of one domain; each domain is the target in turn. For each eps we
report, averaged over the 6 targets: the fraction of the top-300 picks from the target's domain, the
entropic OT distance selection <-> target at a fixed reference eps (0.05 absolute, so columns are
comparable), Sinkhorn iterations and seconds; and the chunked mode's overlap with the global top-300.

Embeddings are made by ``/tmp/gotd_eps/embed_domains.py``-style code below (plain transformers,
masked mean pooling, max_length 128) and cached as .npy under ``--cache``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/got_d_eps.py --cache /tmp/gotd_eps
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hf_otselect.ot import ot_distance
from hf_otselect.selectors.got_d import GOTDSelector


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="/tmp/gotd_eps")
    p.add_argument("--k", type=int, default=300)
    args = p.parse_args()
    emb = np.load(f"{args.cache}/emb.npy")
    dom = np.load(f"{args.cache}/domain.npy")
    role = np.load(f"{args.cache}/role.npy")
    names = json.load(open(f"{args.cache}/domains.json"))
    pool, pdom = emb[role == 0], dom[role == 0]
    k = args.k
    grid = [("absolute", e) for e in (0.01, 0.03, 0.1, 0.3, 1.0)] + [("relative", e) for e in (0.01, 0.05, 0.1, 0.3)]
    print(f"pool {pool.shape}, targets {len(names)} x 200, k={k}; mean cost pool<->target ~ "
          f"{np.mean([((pool[:, None] - emb[(role == 1) & (dom == d)][None]) ** 2).sum(-1).mean() for d in range(len(names))][:1]):.3f}")
    print("| eps_mode | eps | in-domain frac | OT(sel, target) @0.05 | iters | seconds | in-domain per target |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for mode, eps in grid:
        fr, od, it, sec, per = [], [], [], [], []
        for d in range(len(names)):
            tgt = emb[(role == 1) & (dom == d)]
            sel = GOTDSelector(eps=eps, eps_mode=mode)
            t0 = time.perf_counter()
            res = sel.select(pool, tgt, k)
            sec.append(time.perf_counter() - t0)
            f = float((pdom[res.indices] == d).mean())
            fr.append(f)
            per.append(f"{f:.2f}")
            od.append(ot_distance(pool[res.indices], tgt, eps=0.05))
            it.append(res.info["n_iter"])
        rows.append((mode, eps, np.mean(fr)))
        print(f"| {mode} | {eps} | {np.mean(fr):.3f} | {np.mean(od):.4f} | {np.mean(it):.1f} | {np.mean(sec):.3f} | {' '.join(per)} |", flush=True)
    # reference: similarity top-k (mean cosine to the target) and random
    fr, od = [], []
    for d in range(len(names)):
        tgt = emb[(role == 1) & (dom == d)]
        s = pool @ tgt.mean(0)
        idx = np.lexsort((np.arange(len(s)), -s))[:k]
        fr.append(float((pdom[idx] == d).mean()))
        od.append(ot_distance(pool[idx], tgt, eps=0.05))
    print(f"| similarity top-k (mean cosine) | - | {np.mean(fr):.3f} | {np.mean(od):.4f} | - | - | {' '.join(f'{v:.2f}' for v in fr)} |")
    od = [ot_distance(pool[np.random.default_rng(0).choice(len(pool), k, replace=False)], emb[(role == 1) & (dom == d)], eps=0.05) for d in range(len(names))]
    print(f"| random | - | {1 / len(names):.3f} | {np.mean(od):.4f} | - | - | |")
    # chunked vs global overlap at the default
    print("\n| chunk_size | n_chunks | top-k overlap with global (mean over targets) |\n|---|---|---|")
    for cs in (1800, 900, 450):
        ov = []
        for d in range(len(names)):
            tgt = emb[(role == 1) & (dom == d)]
            g = set(GOTDSelector().select(pool, tgt, k).indices.tolist())
            c = set(GOTDSelector(chunk_size=cs, seed=0).select(pool, tgt, k).indices.tolist())
            ov.append(len(g & c) / k)
        print(f"| {cs} | {-(-len(pool) // cs)} | {np.mean(ov):.3f} (min {np.min(ov):.3f}) |", flush=True)


if __name__ == "__main__":
    main()
