"""Pick GOT-D's default eps by measurement on real text embeddings (all-MiniLM-L6-v2, L2-normalised).

Pool: ``--n-pool`` (600) texts from each of 6 domains (chemprot, sciie, ag_news, imdb, amazon,
wikitext2); target: ``--n-target`` (200) held-out texts of one domain (never in the pool); each
domain is the target in turn. Everything is built here from ``/work/shared/data`` (see
:func:`build_inputs`; texts clipped to 500 characters with ``quality.py``'s loaders) and embedded
with :func:`hf_otselect.embed` (bundled all-MiniLM-L6-v2, max_length 128, masked mean pooling,
L2-normalised), cached under ``--work-dir``, so a rerun of the same commit gives the same table.

For each eps we report, averaged over the 6 targets: the fraction of the top-k picks from the
target's domain, the entropic OT distance selection <-> target at a fixed reference eps (0.05
absolute, so the columns are comparable), Sinkhorn iterations and seconds; the same for
similarity top-k and for random selections (measured over ``--random-seeds``, not assumed); and
the chunked mode's overlap with the global top-k.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/got_d_eps.py --out benchmarks/results/got_d_eps.md
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import quality  # noqa: E402  (its data loaders: the same cleaning as the quality benchmark)
from _provenance import header, provenance  # noqa: E402

from hf_otselect.embed import embed  # noqa: E402
from hf_otselect.ot import ot_distance  # noqa: E402
from hf_otselect.selectors.got_d import GOTDSelector  # noqa: E402

DOMAINS = ("chemprot", "sciie", "ag_news", "imdb", "amazon", "wikitext2")
MAX_CHARS = 500


def _documents(data: Path, rng: np.random.Generator) -> dict[str, tuple[list[str], list[str]]]:
    """Per domain: (pool-side documents, held-out target-side documents), from disjoint files."""
    def marked(path: Path) -> list[str]:
        return quality._unique([quality._MARKERS.sub(" ", r["text"]) for r in quality._jsonl(path)])

    with (data / "ag_news_alps" / "dev.tsv").open(encoding="utf-8") as fh:
        ag_pool = [line.split("\t")[0].replace(" #39;", "'") for line in fh if line.strip()]
    with (data / "ag_news" / "test.csv").open(encoding="utf-8", newline="") as fh:
        seen = set(ag_pool)
        ag_target = [r[2].replace(" #39;", "'") for r in csv.reader(fh) if r[2] not in seen]
    with gzip.open(data / "amazon_musical_instruments" / "reviews_Musical_Instruments_5.json.gz", "rt", encoding="utf-8") as fh:
        reviews = [r["reviewText"] for r in map(json.loads, fh) if len(r.get("reviewText", "")) >= 20]
    order = rng.permutation(len(reviews))
    half = len(reviews) // 2
    return {
        "chemprot": (marked(data / "chemprot" / "train.txt"), marked(data / "chemprot" / "test.txt")),
        "sciie": (marked(data / "sciie" / "train.txt"), marked(data / "sciie" / "test.txt")),
        "ag_news": (ag_pool, ag_target),
        "imdb": (quality._imdb(data / "imdb" / "train" / "pos") + quality._imdb(data / "imdb" / "train" / "neg"),
                 quality._imdb(data / "imdb" / "test" / "pos") + quality._imdb(data / "imdb" / "test" / "neg")),
        "amazon": ([reviews[i] for i in order[:half]], [reviews[i] for i in order[half:]]),
        "wikitext2": (quality._wiki_paragraphs(data / "wikitext2" / "valid.txt"),
                      quality._wiki_paragraphs(data / "wikitext2" / "test.txt")),
    }


def build_inputs(data: Path, work: Path, *, n_pool: int, n_target: int, seed: int) -> dict[str, np.ndarray]:
    """Texts drawn (seeded) and embedded (cached): ``emb`` (n, 384), ``domain`` (n,), ``role`` (n,: 0 pool, 1 target)."""
    rng = np.random.default_rng(seed)
    docs = _documents(data, rng)
    texts: list[str] = []
    domain: list[int] = []
    role: list[int] = []
    for d, name in enumerate(DOMAINS):
        pool_side, target_side = docs[name]
        pool_units = quality._unique([quality.clip(pool_side[i], MAX_CHARS) for i in rng.permutation(len(pool_side))])
        pool_units = [u for u in pool_units if u.strip()][:n_pool]
        in_pool = set(pool_units)
        tgt_units = quality._unique([quality.clip(target_side[i], MAX_CHARS) for i in rng.permutation(len(target_side))])
        tgt_units = [u for u in tgt_units if u.strip() and u not in in_pool][:n_target]
        if len(pool_units) < n_pool or len(tgt_units) < n_target:
            raise ValueError(f"{name}: {len(pool_units)} pool / {len(tgt_units)} target texts, {n_pool} / {n_target} needed")
        texts += pool_units + tgt_units
        domain += [d] * (n_pool + n_target)
        role += [0] * n_pool + [1] * n_target
    emb = embed(texts, max_length=128, cache_dir=work / "embeddings", device="cpu", show_progress=False)
    return {"emb": emb, "domain": np.array(domain), "role": np.array(role)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(quality.DEFAULT_DATA))
    p.add_argument("--work-dir", default="/tmp/hf_otselect_got_d_eps", help="embedding cache")
    p.add_argument("--n-pool", type=int, default=600)
    p.add_argument("--n-target", type=int, default=200)
    p.add_argument("--k", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="draws the texts")
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    prov = provenance(seeds={"texts": args.seed, "random": args.random_seeds, "chunked GOT-D": 0},
                      argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    t0 = time.perf_counter()
    data = build_inputs(Path(args.data_dir), Path(args.work_dir), n_pool=args.n_pool, n_target=args.n_target, seed=args.seed)
    embed_s = time.perf_counter() - t0
    emb, dom, role = data["emb"], data["domain"], data["role"]
    pool, pdom = emb[role == 0], dom[role == 0]
    targets = [emb[(role == 1) & (dom == d)] for d in range(len(DOMAINS))]
    k = args.k
    cost = np.mean([((pool[:, None] - t[None]) ** 2).sum(-1).mean() for t in targets])
    out = ["# GOT-D: choosing the default eps on real text embeddings", "", *header(prov),
           f"Torch threads in the run: {torch.get_num_threads()}; texts drawn and embedded in {embed_s:.0f} s "
           "(cached under --work-dir after the first run).", "",
           f"Data ({args.data_dir}): pool = {args.n_pool} texts from each of {', '.join(DOMAINS)} ({len(pool):,}); "
           f"target = {args.n_target} held-out texts of one domain, each domain in turn; k = {k}. "
           f"Mean pool<->target cost {cost:.3f}. \"OT(sel, target)\" = entropic OT value between the {k} picks and the "
           "target at a fixed eps 0.05 (lower = closer to the target distribution). Means over the 6 targets; "
           "seconds are wall time on shared cores (noisy), iterations are not.", "",
           "| eps_mode | eps | in-domain frac | OT(sel, target) @0.05 | iters | seconds | in-domain per target |",
           "|---|---|---|---|---|---|---|"]

    def emit(line: str) -> None:
        out.append(line)
        print(line, flush=True)

    for line in out:
        print(line)
    grid = [("absolute", e) for e in (0.01, 0.03, 0.1, 0.3, 1.0)] + [("relative", e) for e in (0.01, 0.05, 0.1, 0.3)]
    for mode, eps in grid:
        fr, od, it, sec = [], [], [], []
        for d, tgt in enumerate(targets):
            t = time.perf_counter()
            res = GOTDSelector(eps=eps, eps_mode=mode).select(pool, tgt, k)
            sec.append(time.perf_counter() - t)
            fr.append(float((pdom[res.indices] == d).mean()))
            od.append(ot_distance(pool[res.indices], tgt, eps=0.05))
            it.append(res.info["n_iter"])
        label = f"**{eps} (default)**" if (mode, eps) == ("absolute", 0.1) else str(eps)
        emit(f"| {mode} | {label} | {np.mean(fr):.3f} | {np.mean(od):.4f} | {np.mean(it):.1f} | {np.mean(sec):.3f} | "
             f"{' '.join(f'{v:.2f}' for v in fr)} |")
    fr, od = [], []
    for d, tgt in enumerate(targets):  # similarity top-k: mean cosine to the target, ties to the lower row
        s = pool @ tgt.mean(0)
        idx = np.lexsort((np.arange(len(s)), -s))[:k]
        fr.append(float((pdom[idx] == d).mean()))
        od.append(ot_distance(pool[idx], tgt, eps=0.05))
    emit(f"| similarity top-k (mean cosine) | - | {np.mean(fr):.3f} | {np.mean(od):.4f} | - | - | {' '.join(f'{v:.2f}' for v in fr)} |")
    fr_r, od_r = [], []  # random: measured, per seed and target
    for s in args.random_seeds:
        for d, tgt in enumerate(targets):
            idx = np.random.default_rng(s).choice(len(pool), k, replace=False)
            fr_r.append(float((pdom[idx] == d).mean()))
            od_r.append(ot_distance(pool[idx], tgt, eps=0.05))
    per = np.asarray(fr_r).reshape(len(args.random_seeds), len(targets)).mean(0)
    emit(f"| random (seeds {args.random_seeds}) | - | {np.mean(fr_r):.3f} ± {np.std(fr_r):.3f} | {np.mean(od_r):.4f} ± "
         f"{np.std(od_r):.4f} | - | - | {' '.join(f'{v:.2f}' for v in per)} |")
    emit("")
    emit(f"## Chunked mode vs the global problem (same pool and targets, eps 0.1, k = {k})")
    emit("")
    emit("| chunk_size | n_chunks | top-k overlap with global (mean over 6 targets) |")
    emit("|---|---|---|")
    glob = [set(GOTDSelector().select(pool, tgt, k).indices.tolist()) for tgt in targets]
    for cs in (1800, 900, 450):
        ov = [len(g & set(GOTDSelector(chunk_size=cs, seed=0).select(pool, tgt, k).indices.tolist())) / k
              for g, tgt in zip(glob, targets)]
        emit(f"| {cs} | {-(-len(pool) // cs)} | {np.mean(ov):.3f} (min {np.min(ov):.3f}) |")
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
