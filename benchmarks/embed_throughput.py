"""Rows/s of ``hf_otselect.embed`` against sentence-transformers ``encode`` on the same texts.

Texts: the first 2,000 AG News test descriptions (``/work/shared/data/ag_news/test.csv``, column
3), the same model (the bundled all-MiniLM-L6-v2), the same process, fp32 on CPU with 2 threads.
Runs are interleaved (peer, ours, plain loop; repeated) so a change in machine load hits all
alike; the ratio is of the medians. Agreement is the cosine between our vectors and ``encode``'s.
When CUDA is present a bf16 run on the GPU is added.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/embed_throughput.py
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import header, provenance  # noqa: E402

from hf_otselect.embed import DEFAULT_MODEL, embed, load_encoder  # noqa: E402

DATA = Path(os.environ.get("HF_OTSELECT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_texts(n: int) -> list[str]:
    with (DATA / "ag_news" / "test.csv").open(encoding="utf-8", newline="") as fh:
        return [row[2].strip() for row, _ in zip(csv.reader(fh), range(n))]


def plain_loop(texts: list[str], tok, model, device: str, batch_size: int = 64) -> np.ndarray:
    """The usual transformers loop: batches in input order, padded to each batch's longest row."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
            out.append(v.cpu().numpy())
    return np.concatenate(out)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(device: str, texts: list[str], repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(DEFAULT_MODEL, device=device)
    st.max_seq_length = 256
    tok, model, _ = load_encoder(None, device=device)
    ours_kw = {"device": device, "use_cache": False, "show_progress": False, "batch_size": 64}
    st.encode(texts[:64], batch_size=64, normalize_embeddings=True)  # warm-up both
    embed(texts[:64], **ours_kw)
    times: dict[str, list[float]] = {"encode": [], "embed": [], "plain": []}
    for _ in range(repeats):
        t, ref = timed(lambda: st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True))
        times["encode"].append(t)
        t, ours = timed(lambda: embed(texts, **ours_kw))
        times["embed"].append(t)
        t, plain = timed(lambda: plain_loop(texts, tok, model, device))
        times["plain"].append(t)
    with tempfile.TemporaryDirectory() as tmp:
        embed(texts, device=device, cache_dir=tmp, show_progress=False)
        t_cached, cached = timed(lambda: embed(texts, device=device, cache_dir=tmp, show_progress=False))
    if device == "cpu":  # fp32 on CPU is deterministic: the cache hands back the very same numbers
        assert np.array_equal(cached, ours)
    cos = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    return {"rate": rate, "all": {k: [round(len(texts) / x, 1) for x in v] for k, v in times.items()},
            "cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "maxabs": float(np.abs(ours - ref).max()),
            "plain_maxabs": float(np.abs(plain - ref).max()), "cached_rate": len(texts) / t_cached,
            "precision": "fp32" if device == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "embed_throughput.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = load_texts(args.n)
    tok, _, _ = load_encoder(None, device="cpu")
    ntok = [len(x) for x in tok(texts, truncation=True, max_length=256)["input_ids"]]
    prov = provenance()  # after set_num_threads, so the header records the threads used
    load_before = os.getloadavg()
    results = {"cpu": run("cpu", texts, args.repeats)}
    if torch.cuda.is_available():
        results["cuda"] = run("cuda", texts, args.repeats)
    load_after = os.getloadavg()

    lines = [
        "# Embedding throughput: `hf_otselect.embed` vs sentence-transformers `encode`",
        "",
        *header(prov),
        "",
        f"- Load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)} "
        "(the 2 cores are shared with other jobs: compare the ratios, measured interleaved in one run)",
        f"- Texts: the first {args.n} AG News test descriptions (`shared/data/ag_news/test.csv`, 3rd column), "
        f"{np.mean(ntok):.1f} tokens on average (min {min(ntok)}, max {max(ntok)}, with [CLS]/[SEP]).",
        "- Model: bundled all-MiniLM-L6-v2; max_length 256, masked mean pooling, L2-normalised; batch_size 64 for all.",
        "- `embed` run with `use_cache=False` (every row encoded); `plain loop` = transformers forward in input order, 64 rows a batch.",
        "",
        "| device | precision | `encode` rows/s | `embed` rows/s | ratio embed/encode | plain loop rows/s | `embed` from cache rows/s | cosine embed vs encode (min / mean) | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dev, r in results.items():
        rate = r["rate"]
        lines.append(
            f"| {dev} | {r['precision']} | {rate['encode']:.1f} | {rate['embed']:.1f} | **{rate['embed'] / rate['encode']:.2f}x** | "
            f"{rate['plain']:.1f} | {r['cached_rate']:.0f} | {r['cos_min']:.7f} / {r['cos_mean']:.7f} | {r['maxabs']:.1e} |")
    lines += ["", "Per-repeat rows/s (medians above):", ""]
    for dev, r in results.items():
        for k, v in r["all"].items():
            lines.append(f"- {dev} {k}: {v}")
    if "cuda" not in results:
        lines += ["", "No CUDA device here, so no bf16 run."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
