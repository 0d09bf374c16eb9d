"""Run-to-run spread of the quality benchmark's perplexities, on a reduced configuration.

``quality.py`` trains models, so its perplexities could move between cold reruns of the same
command (fresh ``--work-dir``: tokenizer, pre-training and warm-ups all redone) with the same seed
(on this CPU machine two cold runs of the full default agreed to the last digit: ``quality.md``'s
notes), and they do move with another seed. This script measures both on a reduced set-up (by default 100 units
per source, targets chemprot and sciie, k = 100, GOT-D and one random selection, duplicate test
and pre-filter off): each run is its own ``quality.py`` process, and the table gives every run's
perplexities and, per cell, the spread (max - min) over the same-seed reruns and over the seeds.
The figures are for this reduced configuration, not for ``quality.md``'s full one.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_spread.py --out benchmarks/results/quality_spread.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import header, provenance  # noqa: E402

HERE = Path(__file__).resolve().parent
REDUCED = ["--n-per-source", "100", "--targets", "chemprot", "sciie", "--budgets", "100", "--selectors", "got_d",
           "random", "--random-seeds", "0", "--dup-copies", "2", "--prefilter-keep", "0", "--guard-radius", "0",
           "--n-prompts", "5"]


def one_run(seed: int, threads: int, data_dir: str | None, scratch: Path, tag: str) -> dict:
    """One cold ``quality.py`` process (fresh work dir); returns its results JSON."""
    work, out = scratch / f"work-{tag}", scratch / f"out-{tag}"
    cmd = [sys.executable, str(HERE / "quality.py"), *REDUCED, "--seed", str(seed), "--threads", str(threads),
           "--work-dir", str(work), "--out-dir", str(out), "--name", "run"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    res = json.loads((out / "run.json").read_text(encoding="utf-8"))
    res["wall_s"] = time.perf_counter() - t
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=2, help="cold runs of the first seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--scratch", default=None, help="keep the runs' work dirs and JSONs here (default: a temporary folder)")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: tabulate the finished runs under --scratch (out-<tag>/run.json), e.g. runs "
                        "started by hand side by side with the command each JSON records")
    args = p.parse_args(argv)
    prov = provenance(seeds={"runs": args.seeds, "cold repeats of the first": args.repeats},
                      argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    plan = [(args.seeds[0], f"s{args.seeds[0]}r{r}") for r in range(args.repeats)] + [(s, f"s{s}") for s in args.seeds[1:]]
    runs: list[tuple[int, str, dict]] = []
    if args.collect:
        for js in sorted(Path(args.scratch).glob("out-*/run.json")):
            res = json.loads(js.read_text(encoding="utf-8"))
            runs.append((res["config"]["seed"], js.parent.name[4:], res))
        runs.sort(key=lambda r: (r[0] != args.seeds[0], r[1]))
        write(runs, args, prov, len(plan))
        return
    with tempfile.TemporaryDirectory(prefix="quality_spread_") as tmp:
        scratch = Path(args.scratch or tmp)
        for seed, tag in plan:  # the table is rewritten after every run, so a cut-short session keeps what ran
            runs.append((seed, tag, one_run(seed, args.threads, args.data_dir, scratch, tag)))
            write(runs, args, prov, len(plan))


def write(runs: list[tuple[int, str, dict]], args: argparse.Namespace, prov: dict, planned: int) -> None:
    """Render the table of the runs so far (to stdout and ``--out``)."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for _, tag, res in runs:
        for row in res["rows"]:
            name = "pretrained" if row["selector"] == "pretrained" else f"{row['selector']} k={row['k']}"
            cells.setdefault((row["target"], name), {})[tag] = row["ppl"]
    tags = [tag for _, tag, _ in runs]
    same = [tag for seed, tag, _ in runs if seed == args.seeds[0]]
    L = ["# Quality benchmark: run-to-run spread of the perplexities (reduced configuration)", "", *header(prov),
         f"Each run: `quality.py {' '.join(REDUCED)} --seed S --threads {args.threads}` in its own process with a fresh "
         f"work dir (tokenizer, pre-training, warm-ups redone). Runs {', '.join(same)}: the same seed "
         f"{args.seeds[0]}; the others: other seeds. Wall time per run: "
         + ", ".join(f"{tag} {res.get('wall_s', res['total_seconds']):.0f} s" for _, tag, res in runs) + ".  ",
         *(f"Run {tag}: `{res['provenance']['command']}` at commit {res['provenance']['commit']}, load at start "
           f"`{res['provenance']['load_at_start']}`  " for _, tag, res in runs if "provenance" in res),
         "Reduced set-up (100 units per source, 2 targets, k = 100): the spreads say how much a rerun moves a "
         "perplexity here, not the size of `quality.md`'s own figures."
         + (f" Only {len(runs)} of the {planned} planned runs had finished when this was written." if len(runs) < planned else ""), "",
         f"| target | model | {' | '.join(tags)} | spread, same seed | spread, all runs |",
         "|---|---|" + "---|" * len(tags) + "---|---|"]
    for (target, name), by in cells.items():
        vals = [by.get(t, float("nan")) for t in tags]
        s_same = max(by[t] for t in same if t in by) - min(by[t] for t in same if t in by)
        s_all = np.nanmax(vals) - np.nanmin(vals)
        L.append(f"| {target} | {name} | {' | '.join(f'{v:.1f}' for v in vals)} | {s_same:.1f} | {s_all:.1f} |")
    text = "\n".join(L) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
