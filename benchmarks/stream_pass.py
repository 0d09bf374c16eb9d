"""One pass over a stream (issue 20): what selection adds to embedding, and memory as the stream grows.

(a) Speed. The first 2,000 AG News test descriptions (``/work/shared/data/ag_news/test.csv``), a
GOT-D selector fitted on them against 200 SciERC training sentences (``sciie/train.txt``), the
bundled encoder. "embed" runs the pass's own embedding step alone over the same batches
(``fitted._rows_of``: the same call, settings and batch size); "pass" is the whole
:class:`~hf_otselect.StreamPass` (batches read from a Dataset, embedded, scored, filtered at
``fraction=0.1``). Runs interleave (embed, pass; repeated) so a change in machine load hits both;
the overhead is of the medians, in wall time and in process CPU time.

(b) Memory. A stream of N rows of precomputed 384-d vectors (the 2,000 AG News vectors again and
again), generated on the fly as Arrow tables and read as an ``IterableDataset`` (nothing is
written but the kept rows), through :func:`~hf_otselect.write_selected` at ``fraction=0.01``.
Each N runs in a fresh process; its peak RSS (``VmHWM``) is taken after the fit is loaded and
after the pass.

    nice -n 19 .venv/bin/python benchmarks/stream_pass.py [--texts 2000] [--repeats 2] [--sizes 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import header, provenance  # noqa: E402
from embed_throughput import DATA, load_texts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stream_pass.md"
BATCH = 256
DIM = 384


def _target(n: int) -> list[str]:
    rows = (json.loads(line) for line in (DATA / "sciie" / "train.txt").open(encoding="utf-8"))
    return [r["text"] for r, _ in zip(rows, range(n))]


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def speed(texts: list[str], fitted, repeats: int) -> dict:
    from datasets import Dataset

    from hf_otselect import StreamPass

    ds = Dataset.from_dict({"text": texts})
    batches = [texts[s : s + BATCH] for s in range(0, len(texts), BATCH)]
    fitted._rows_of({"text": batches[0]}, None)  # the encoder loaded once, outside the timings
    runs: dict[str, list[tuple[float, float]]] = {"embed": [], "pass": []}
    kept = 0
    for _ in range(repeats):
        runs["embed"].append(_timed(lambda: [fitted._rows_of({"text": b}, None) for b in batches]))
        run = StreamPass(fitted, ds, fraction=0.1, batch_size=BATCH)
        runs["pass"].append(_timed(lambda: sum(t.num_rows for t in run)))
        kept = run.rows_kept
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    return {"runs": runs, "median": med, "kept": kept, "rows": len(texts)}


def _stream(vectors: np.ndarray, n: int):
    """An IterableDataset of n rows (id, 384-d float32 vector) made on the fly as Arrow tables."""
    import pyarrow as pa
    from datasets import Features, IterableDataset, List, Value
    from datasets.info import DatasetInfo
    from datasets.iterable_dataset import ArrowExamplesIterable

    def tables(n: int, block: int):
        for s in range(0, n, block):
            i = np.arange(s, min(n, s + block))
            vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors[i % len(vectors)].ravel()), DIM)
            yield s, pa.table({"id": pa.array(i), "vec": vec})

    feats = Features({"id": Value("int64"), "vec": List(Value("float32"), length=DIM)})
    return IterableDataset(ArrowExamplesIterable(tables, {"n": n, "block": 8192}), info=DatasetInfo(features=feats))


def _peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM, which starts afresh at exec; ``ru_maxrss`` carries the parent's over)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(folder: Path, n: int) -> None:
    from hf_otselect import FittedSelector, write_selected

    fitted = FittedSelector.from_pretrained(folder / "selector").using(vector_column="vec")
    vectors = np.load(folder / "vectors.npy")
    before = _peak_rss_kib()
    t = time.perf_counter()
    summary = write_selected(fitted, _stream(vectors, n), folder / f"out-{n}", fraction=0.01, batch_size=4096, shard_rows=50_000)
    print(json.dumps({"n": n, "before_kib": before, "peak_kib": _peak_rss_kib(),
                      "seconds": time.perf_counter() - t, "seen": summary["rows_seen"], "kept": summary["rows_kept"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--memory-child", nargs=2, metavar=("FOLDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(Path(args.memory_child[0]), int(args.memory_child[1]))
        return

    from hf_otselect import embed, fit_selector

    prov = provenance(seeds={"none": "no randomness (GOT-D is top-k)"})
    texts, target = load_texts(args.texts), _target(200)
    with tempfile.TemporaryDirectory(prefix="stream_pass_") as tmp:
        folder = Path(tmp)
        fitted = fit_selector(texts, target, "got_d", cache_dir=folder / "cache")
        sp = speed(texts, fitted, args.repeats)
        vectors = embed(texts, cache_dir=folder / "cache" / "embeddings", show_progress=False)
        np.save(folder / "vectors.npy", vectors)
        fitted.save_pretrained(folder / "selector")
        mem = []
        for n in args.sizes:
            proc = subprocess.run([sys.executable, __file__, "--memory-child", str(folder), str(n)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))})
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            mem.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    load_end = Path("/proc/loadavg").read_text().strip()

    (ew, ec), (pw, pc) = sp["median"]["embed"], sp["median"]["pass"]
    lines = ["# One pass over a stream: selection's cost over embedding, and memory as N grows", "", *header(prov),
             f"Load at end: `{load_end}`  ", "",
             "## (a) Speed: embed + score + filter against embed alone, same rows", "",
             f"{sp['rows']} AG News test descriptions, batches of {BATCH}, bundled all-MiniLM-L6-v2 on CPU, GOT-D fitted on them "
             f"against 200 SciERC sentences, `fraction=0.1` (kept {sp['kept']}). Medians of {args.repeats} interleaved runs.", "",
             "| | wall s | rows/s (wall) | CPU s | rows/s (CPU) |", "|---|---|---|---|---|",
             f"| embed alone | {ew:.2f} | {sp['rows'] / ew:.0f} | {ec:.2f} | {sp['rows'] / ec:.0f} |",
             f"| embed + score + filter (StreamPass) | {pw:.2f} | {sp['rows'] / pw:.0f} | {pc:.2f} | {sp['rows'] / pc:.0f} |",
             "", f"Selection adds **{100 * (pw / ew - 1):+.1f}%** wall time, **{100 * (pc / ec - 1):+.1f}%** CPU time "
             "(goal: at most +10%). Every run (wall s, CPU s): "
             + "; ".join(f"{k}: " + ", ".join(f"({w:.2f}, {c:.2f})" for w, c in v) for k, v in sp["runs"].items()), "",
             "## (b) Memory: peak RSS of a pass over N streamed 384-d vectors", "",
             "Fresh process per N; `write_selected(..., fraction=0.01, batch_size=4096, shard_rows=50000)` over an IterableDataset "
             "made on the fly (the AG News vectors repeated).", "",
             "| N | rows kept | seconds | rows/s | peak RSS before the pass (MiB) | peak RSS after (MiB) |", "|---|---|---|---|---|---|"]
    for m in mem:
        lines.append(f"| {m['n']:,} | {m['kept']:,} | {m['seconds']:.1f} | {m['seen'] / m['seconds']:,.0f} | {m['before_kib'] / 1024:.0f} | "
                     f"{m['peak_kib'] / 1024:.0f} |")
    if len(mem) >= 2:
        a, b = mem[0]["peak_kib"], mem[-1]["peak_kib"]
        lines += ["", f"Peak RSS at {mem[-1]['n']:,} rows is **{100 * (b / a - 1):+.1f}%** of that at {mem[0]['n']:,} (goal: within 10%)."]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
