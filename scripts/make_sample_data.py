"""Build the bundled sample data in ``data/sample/`` from the shared offline datasets.

The demo (``make demo``) and several tests select from this pool. Every source is a permissively
licensed copy (Apache-2.0 or MIT mirror repositories; see ``data/sample/NOTICE.md``). The output is
deterministic: the same inputs and seed give byte-identical files.

Usage::

    python scripts/make_sample_data.py --shared ../shared/data --out data/sample
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import re
from pathlib import Path

PER_DOMAIN = 300
N_TARGET = 150
N_TARGET_EVAL = 100
SEED = 0

_MARKERS = re.compile(r"<< | >>|\[\[ | \]\]")


def _clean_relation_text(text: str) -> str:
    """Drop ChemProt's entity markers (``<< chemical >>``, ``[[ protein ]]``): annotation, not text."""
    return _MARKERS.sub("", text).strip()


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_domains(shared: Path) -> dict[str, list[str]]:
    """Read each pool domain's texts, in file order."""
    pubmed = json.loads((shared / "pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    biomed = [" ".join(v["CONTEXTS"]) for v in pubmed.values()]
    cs = [" ".join(r["sentences"]) for r in _jsonl(shared / "csabstruct/train.jsonl")]
    citations = [r["text"].replace("\n", " ") for r in _jsonl(shared / "scicite/train.txt")]
    with (shared / "ag_news_alps/dev.tsv").open(encoding="utf-8") as fh:
        news = [row[0] for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    with (shared / "sst2/test.tsv").open(encoding="utf-8") as fh:
        reviews = [row["sentence"] for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    with gzip.open(shared / "humaneval/HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        code = [r["prompt"] + r["canonical_solution"] for r in map(json.loads, fh)]
    return {
        "biomedical": biomed,
        "cs_abstracts": cs,
        "citations": citations,
        "news": news,
        "movie_reviews": reviews,
        "code": code,
    }


def _first_per_text(rows) -> list[dict]:
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["text"], row)
    return list(first.values())


def _sample(texts: list[str], n: int, rng: random.Random) -> list[str]:
    unique = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
    return unique if len(unique) <= n else rng.sample(unique, n)


def build(shared: Path, out: Path) -> None:
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    pool = []
    for domain, texts in load_domains(shared).items():
        for text in _sample(texts, PER_DOMAIN, rng):
            pool.append({"text": text, "domain": domain})
    rng.shuffle(pool)
    _write(out / "pool.jsonl", pool)

    # ChemProt holds one row per entity pair, so a sentence can repeat: keep its first row only.
    dev = _first_per_text({"text": _clean_relation_text(r["text"]), "label": r["label"]} for r in _jsonl(shared / "chemprot/dev.txt"))
    test = _first_per_text({"text": _clean_relation_text(r["text"]), "label": r["label"]} for r in _jsonl(shared / "chemprot/test.txt"))
    _write(out / "target.jsonl", rng.sample(dev, N_TARGET))
    _write(out / "target_eval.jsonl", rng.sample(test, N_TARGET_EVAL))


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "sample")
    args = parser.parse_args()
    build(args.shared, args.out)


if __name__ == "__main__":
    main()
