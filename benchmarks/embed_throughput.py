"""Rows/s of each CPU encoder back end of ``hf_otselect.embed`` and of sentence-transformers ``encode``.

Texts: the first ``--n`` AG News test descriptions (``shared/data/ag_news/test.csv``, column 3);
model: the bundled all-MiniLM-L6-v2 (max_length 256, masked mean, L2-normalised, batch 64); one
process, ``--threads`` threads for every runtime. Variants: torch fp32 (today's default), ONNX
Runtime fp32 and int8, OpenVINO fp32 and int8 (``backend=``/``quantize=``), and
sentence-transformers' own ``encode`` (torch). Each is warmed up first (the export, cached, and
the model load stay out of the rate), then timed with ``use_cache=False``; the variants run in
turn, ``--repeats`` rounds, rate = median. For each: the cosine of its vectors to torch fp32, and
the overlap of the GOT-D top-100 (pool: the texts, target: the first 200 SciERC test sentences,
``shared/data/sciie/test.txt``, both embedded by that variant) with torch fp32's top-100.

    nice -n 19 env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_throughput.py --n 1000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import header, provenance  # noqa: E402

from hf_otselect.embed import DEFAULT_MODEL, embed, load_encoder  # noqa: E402
from hf_otselect.selectors import get_selector  # noqa: E402

DATA = Path(os.environ.get("HF_OTSELECT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
VARIANTS = {"torch fp32": ("torch", None), "ONNX fp32": ("onnx", None), "ONNX int8": ("onnx", "int8"),
            "OpenVINO fp32": ("openvino", None), "OpenVINO int8": ("openvino", "int8"), "st encode": None}


def load_texts(n: int) -> list[str]:
    with (DATA / "ag_news" / "test.csv").open(encoding="utf-8", newline="") as fh:
        return [row[2].strip() for row, _ in zip(csv.reader(fh), range(n))]


def load_target(n: int = 200) -> list[str]:
    with (DATA / "sciie" / "test.txt").open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line, _ in zip(fh, range(n))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--cache-dir", type=Path, default=None, help="exports cache (default: the package's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "embed_throughput.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts, target = load_texts(args.n), load_target()
    tok, _, _ = load_encoder(None, device="cpu")
    ntok = [len(x) for x in tok(texts, truncation=True, max_length=256)["input_ids"]]
    prov = provenance()  # after set_num_threads, so the header records the threads used
    kw = {"device": "cpu", "show_progress": False, "batch_size": 64, "max_length": 256, "cache_dir": args.cache_dir}

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(DEFAULT_MODEL, device="cpu")
    st.max_seq_length = 256

    def run(name: str, rows: list[str], use_cache: bool = False) -> np.ndarray:
        if VARIANTS[name] is None:
            return st.encode(rows, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        backend, quantize = VARIANTS[name]
        return embed(rows, backend=backend, quantize=quantize, use_cache=use_cache, **kw)

    names, skipped = [], {}
    for name in VARIANTS:
        try:
            run(name, texts[:64])  # warm-up: export (cached) and load
            names.append(name)
        except ImportError as err:
            skipped[name] = str(err)
    times: dict[str, list[float]] = {n: [] for n in names}
    vectors: dict[str, np.ndarray] = {}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name in names:
            t = time.perf_counter()
            vectors[name] = run(name, texts)
            times[name].append(time.perf_counter() - t)
            print(f"{name}: {len(texts) / times[name][-1]:.1f} rows/s", flush=True)
    load_after = os.getloadavg()

    selector = get_selector("got_d")
    ref = vectors["torch fp32"]
    picks: dict[str, np.ndarray] = {}
    for name in names:
        tvec = run(name, target, use_cache=True)
        picks[name] = selector.select(vectors[name], tvec, args.k).indices
    base_rate = len(texts) / statistics.median(times["torch fp32"])
    lines = [
        "# Embedding throughput: CPU encoder back ends vs sentence-transformers `encode`", "",
        *header(prov), "",
        f"- Load average (1/5/15 min) before the timed runs {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} cores (this process at niceness "
        f"{os.nice(0)}): compare the ratios within this run, not the absolute rates.",
        f"- Texts: the first {args.n} AG News test descriptions (`shared/data/ag_news/test.csv`, 3rd column), "
        f"{np.mean(ntok):.1f} tokens on average (min {min(ntok)}, max {max(ntok)}, with [CLS]/[SEP]).",
        "- Model: bundled all-MiniLM-L6-v2; max_length 256, masked mean pooling, L2-normalised, batch_size 64; "
        "`embed` with `use_cache=False` (every row encoded), the export done and cached before timing.",
        f"- Top-{args.k} overlap: GOT-D (default settings) on the {args.n} texts as the pool against the first 200 "
        "SciERC test sentences (`shared/data/sciie/test.txt`) as the target, both embedded by the variant; "
        f"share of torch fp32's top-{args.k} it also selects.", "",
        f"| variant | rows/s | vs torch fp32 | cosine to torch fp32 (min / mean) | top-{args.k} overlap |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        rate = len(texts) / statistics.median(times[name])
        cos = np.sum(vectors[name] * ref, axis=1)
        overlap = len(set(picks[name].tolist()) & set(picks["torch fp32"].tolist())) / args.k
        lines.append(f"| {name} | {rate:.1f} | **{rate / base_rate:.2f}x** | {cos.min():.4f} / {cos.mean():.4f} | {overlap:.2f} |")
    lines += ["", "Per-round rows/s (medians above): " + "; ".join(
        f"{n} {[round(len(texts) / t, 1) for t in times[n]]}" for n in names)]
    for name, why in skipped.items():
        lines.append(f"- {name}: not run ({why})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
