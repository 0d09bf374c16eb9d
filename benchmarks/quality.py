"""Quality benchmark: which selector warms a small LM up best for a target task, on real text.

Pool (every row tagged with its source and coarse domain), built from ``/work/shared/data``:

=============  ==========  =====================================================================
source         domain      text unit
=============  ==========  =====================================================================
ag_news        news        ``ag_news_alps/dev.tsv`` descriptions
imdb           reviews     ``imdb/train/{pos,neg}`` reviews (``<br />`` removed)
amazon         reviews     ``reviewText`` of a seeded half of the Musical Instruments reviews
chemprot       biomed      ``chemprot/train.txt`` sentences, entity markers removed, deduplicated
pubmedqa       biomed      PubMedQA abstracts (``CONTEXTS`` joined)
csabstruct     cs          ``csabstruct/train.jsonl`` abstracts (sentences joined)
wikitext2      wiki        WikiText-2 valid/test paragraphs (headings dropped, ``@-@`` undone)
scicite        citation    ``scicite/train.txt`` citation sentences
humaneval      code        prompt + canonical solution, split into consecutive chunks
jigsaw         comments    ``jigsaw_toxic_pools/train.a.{ok,bad}`` (half non-toxic, half toxic)
=============  ==========  =====================================================================

Every text is whitespace-collapsed and cut to at most ``--max-chars`` characters (default 500) at a
word boundary (code is split into chunks of that size instead, so that solutions are not lost):
about one sentence to one paragraph, so long documents and short snippets weigh alike (GOT-D,
Kang et al. 2024, App. C, uses ~1,000-character units for the same reason). ``--n-per-source``
units are drawn per source (seeded).

Targets (held-out rows, never in the pool): ChemProt ``test`` (biomed), SciERC ``test`` (cs),
AG News ``test.csv`` (news, rows whose text is in the pool removed), IMDB ``test`` (reviews),
the other half of Amazon (reviews), and non-toxic Jigsaw ``test.{a,b}.ok`` (comments). Each target
gives ``--n-target`` texts to select for and a disjoint ``--n-eval`` texts to measure perplexity on.

For every selector (got_d, tsds, similarity, dsir, random with several seeds) x target x budget:

(a) ``domain``: fraction of the selection from the target's domain (with multiplicity);
(b) ``OT``: entropic OT distance selection <-> target (:func:`hf_otselect.ot.ot_distance`,
    eps 0.1 absolute, cost ``||x - y||^2`` on the L2-normalised all-MiniLM-L6-v2 embeddings);
(c) ``ppl``: perplexity on the target's evaluation texts of a small GPT-2 (``--n-layer`` layers,
    width ``--n-embd``, byte-level BPE of ``--vocab-size`` tokens trained on the pool) first
    pre-trained on the whole pool (cached under ``--work-dir``), then warmed up on the selection
    with ``scripts/prefinetune.py`` for ``ceil(k * --warm-steps-per-row)`` steps (equal compute for
    every selector at a budget), measured with ``scripts/evaluate.py``'s ``causal_perplexity``.
    The "pretrained" row is the model without warm-up.

Also: the TSDS duplicate test (Liu et al. 2024, Sec. 5: 1% of the pool copied ``--dup-copies``
times; the share of each selection taken by duplicated content, with and without the near-duplicate
guard of :mod:`hf_otselect.dedup`; the paper's 1000 copies run out of 24 GiB in the guard's kernel
density, so the default is 100), and GOT-D's toxicity set-up
(Kang et al. 2024, Sec. 4.2) at small scale: target = non-toxic Jigsaw comments, negative target =
toxic ones (``got_d_neg``); the toxic fraction of every selection and of the warmed-up model's
continuations of RealToxicityPrompts prompts, scored by a TF-IDF + logistic-regression classifier
trained on Jigsaw rows in neither the pool nor the targets (its held-out accuracy is reported).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py                 # default run (~26 min, 2 busy CPU cores)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --scale 4 --device cuda   # bigger run

Everything is seeded (``--seed``); the embeddings go through :func:`hf_otselect.embed.embed` with a
cache under ``--work-dir``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import header, provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("HF_OTSELECT_SHARED_DATA", REPO.parent / "shared" / "data"))
logger = logging.getLogger("hf_otselect.benchmarks.quality")

DOMAIN = {
    "ag_news": "news", "imdb": "reviews", "amazon": "reviews", "chemprot": "biomed", "pubmedqa": "biomed",
    "csabstruct": "cs", "wikitext2": "wiki", "scicite": "citation", "humaneval": "code", "jigsaw": "comments",
}
TARGET_DOMAIN = {
    "chemprot": "biomed", "sciie": "cs", "ag_news": "news", "imdb": "reviews", "amazon": "reviews", "jigsaw_ok": "comments",
}
SELECTORS = ("got_d", "tsds", "similarity", "dsir", "random")
OT_EPS = 0.1


@dataclass
class Config:
    """Every knob of a run (recorded in the results)."""

    data_dir: str = str(DEFAULT_DATA)
    work_dir: str = "/tmp/hf_otselect_quality"
    out_dir: str = str(REPO / "benchmarks" / "results")
    n_per_source: int = 400
    n_target: int = 150
    n_eval: int = 100
    max_chars: int = 500
    budgets: tuple[int, ...] = (100, 400)
    selectors: tuple[str, ...] = SELECTORS
    targets: tuple[str, ...] = tuple(TARGET_DOMAIN)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    dup_frac: float = 0.01
    dup_copies: int = 100
    guard_radius: float = 0.2
    prefilter_keep: int = 2
    vocab_size: int = 8192
    n_layer: int = 2
    n_embd: int = 128
    block_size: int = 128
    pretrain_epochs: float = 3.0
    pretrain_lr: float = 2e-3
    warm_lr: float = 1e-3
    warm_steps_per_row: float = 0.1
    batch_size: int = 16
    n_prompts: int = 50
    gen_tokens: int = 20
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    scale: float = 1.0
    embed_max_length: int = 128
    # DSIR puts every score on the scale of a chunk of this many tokens: longer rows by their
    # complete chunks, shorter ones from their own n-grams, length-normalised (this pool's units are
    # at most max_chars = 500 characters, median 35-105 tokens per source). 32 dates from when
    # shorter rows were never chosen (it left 80% of the units eligible, 100 left 20%). 0 scores
    # whole rows (plain sums).
    dsir_chunk_tokens: int = 32
    name: str = "quality"


# ----------------------------------------------------------------------------------------------
# data


def clip(text: str, max_chars: int) -> str:
    """Collapse whitespace and cut to at most ``max_chars`` characters at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[: cut if cut > max_chars // 2 else max_chars]


def chunks(text: str, max_chars: int) -> list[str]:
    """Consecutive pieces of at most ``max_chars`` characters, cut at newlines/spaces where possible."""
    out, text = [], text.strip()
    while text:
        if len(text) <= max_chars:
            out.append(text)
            break
        cut = max(text.rfind("\n", 0, max_chars), text.rfind(" ", 0, max_chars))
        cut = cut if cut > max_chars // 2 else max_chars
        out.append(text[:cut].rstrip())
        text = text[cut:].strip()
    return [c for c in out if c.strip()]


_MARKERS = re.compile(r"<< | >>|\[\[ | \]\]")


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _unique(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    return [t for t in texts if t and not (t in seen or seen.add(t))]


def _jigsaw(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [row["comment_text"] for row in csv.DictReader(fh)]


def _imdb(folder: Path) -> list[str]:
    files = sorted(folder.glob("*.txt"), key=lambda p: int(p.name.split("_")[0]))
    return [p.read_text(encoding="utf-8").replace("<br />", " ") for p in files]


def _wiki_paragraphs(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        out.append(line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", "."))
    return out


def load_raw(data_dir: Path, rng: np.random.Generator) -> dict[str, dict[str, list[str]]]:
    """Per source: ``pool`` documents; per target: ``target`` documents; plus Jigsaw extras.

    Returns
    -------
    dict
        ``{"pool": {source: [text, ...]}, "target": {target: [...]}, "jigsaw": {...}}`` where the
        Jigsaw entry holds ``pool_ok``, ``pool_bad``, ``negative``, ``clf_train_ok``,
        ``clf_train_bad``, ``clf_test_ok``, ``clf_test_bad`` (disjoint files).
    """
    d = data_dir
    pool: dict[str, list[str]] = {}
    target: dict[str, list[str]] = {}
    with (d / "ag_news_alps" / "dev.tsv").open(encoding="utf-8") as fh:
        pool["ag_news"] = [line.split("\t")[0].replace(" #39;", "'") for line in fh if line.strip()]
    with (d / "ag_news" / "test.csv").open(encoding="utf-8", newline="") as fh:
        in_pool = set(pool["ag_news"])
        target["ag_news"] = [r[2].replace(" #39;", "'") for r in csv.reader(fh) if r[2] not in in_pool]
    pool["imdb"] = _imdb(d / "imdb" / "train" / "pos") + _imdb(d / "imdb" / "train" / "neg")
    target["imdb"] = _imdb(d / "imdb" / "test" / "pos") + _imdb(d / "imdb" / "test" / "neg")
    with gzip.open(d / "amazon_musical_instruments" / "reviews_Musical_Instruments_5.json.gz", "rt", encoding="utf-8") as fh:
        reviews = [r["reviewText"] for r in map(json.loads, fh) if len(r.get("reviewText", "")) >= 20]
    order = rng.permutation(len(reviews))
    half = len(reviews) // 2
    pool["amazon"] = [reviews[i] for i in order[:half]]
    target["amazon"] = [reviews[i] for i in order[half:]]
    pool["chemprot"] = _unique([_MARKERS.sub(" ", r["text"]) for r in _jsonl(d / "chemprot" / "train.txt")])
    target["chemprot"] = _unique([_MARKERS.sub(" ", r["text"]) for r in _jsonl(d / "chemprot" / "test.txt")])
    target["sciie"] = _unique([_MARKERS.sub(" ", r["text"]) for r in _jsonl(d / "sciie" / "test.txt")])
    pqa = json.loads((d / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    pool["pubmedqa"] = [" ".join(v["CONTEXTS"]) for _, v in sorted(pqa.items())]
    pool["csabstruct"] = [" ".join(r["sentences"]) for r in _jsonl(d / "csabstruct" / "train.jsonl")]
    pool["wikitext2"] = _wiki_paragraphs(d / "wikitext2" / "valid.txt") + _wiki_paragraphs(d / "wikitext2" / "test.txt")
    pool["scicite"] = [r["text"] for r in _jsonl(d / "scicite" / "train.txt")]
    with gzip.open(d / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        pool["humaneval"] = [r["prompt"] + r["canonical_solution"] for r in map(json.loads, fh)]
    j = d / "jigsaw_toxic_pools"
    jig = {
        "pool_ok": _jigsaw(j / "train.a.ok.1k.csv"),
        "pool_bad": _jigsaw(j / "train.a.bad.1k.csv"),
        "negative": _jigsaw(j / "test.a.bad.200.csv") + _jigsaw(j / "test.b.bad.200.csv"),
        "clf_train_ok": _jigsaw(j / "train.b.ok.1k.csv"),
        "clf_train_bad": _jigsaw(j / "train.b.bad.1k.csv") + _jigsaw(j / "train.c.bad.1k.csv"),
        "clf_test_ok": _jigsaw(j / "test.c.ok.200.csv"),
        "clf_test_bad": _jigsaw(j / "test.c.bad.200.csv"),
    }
    target["jigsaw_ok"] = _jigsaw(j / "test.a.ok.200.csv") + _jigsaw(j / "test.b.ok.200.csv")
    prompts = []
    for p in sorted((d / "realtoxicityprompts_challenging").glob("rtp_*.txt")):
        prompts += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"pool": pool, "target": target, "jigsaw": jig, "prompts": prompts}


def build_pool(raw: dict[str, Any], cfg: Config, rng: np.random.Generator) -> dict[str, Any]:
    """Sample ``n_per_source`` clipped units per source; returns texts, source, domain, toxic flag."""
    texts, source, toxic = [], [], []
    for src in DOMAIN:
        if src == "jigsaw":
            half = cfg.n_per_source // 2
            for flag, key, n in ((0, "pool_ok", cfg.n_per_source - half), (1, "pool_bad", half)):
                docs = raw["jigsaw"][key]
                units = _unique([clip(docs[i], cfg.max_chars) for i in rng.permutation(len(docs))])[:n]
                texts += units
                source += [src] * len(units)
                toxic += [flag] * len(units)
            continue
        docs = raw["pool"][src]
        if src == "humaneval":
            units = [c for doc in docs for c in chunks(doc, cfg.max_chars)]
            units = _unique([units[i] for i in rng.permutation(len(units))])[: cfg.n_per_source]
        else:
            units = _unique([clip(docs[i], cfg.max_chars) for i in rng.permutation(len(docs))])[: cfg.n_per_source]
        texts += units
        source += [src] * len(units)
        toxic += [0] * len(units)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    return {
        "text": [texts[i] for i in keep],
        "source": np.array([source[i] for i in keep]),
        "domain": np.array([DOMAIN[source[i]] for i in keep]),
        "toxic": np.array([toxic[i] for i in keep], dtype=np.int64),
    }


def build_targets(raw: dict[str, Any], cfg: Config, pool_texts: list[str], rng: np.random.Generator) -> dict[str, dict[str, list[str]]]:
    """Per target: ``select`` (n_target) and ``eval`` (n_eval) texts, disjoint, none in the pool."""
    in_pool = set(pool_texts)
    out = {}
    for name in cfg.targets:
        docs = raw["target"][name]
        units = _unique([clip(docs[i], cfg.max_chars) for i in rng.permutation(len(docs))])
        units = [u for u in units if u.strip() and u not in in_pool]
        need = cfg.n_target + cfg.n_eval
        if len(units) < need:
            raise ValueError(f"Target {name} has {len(units)} usable texts; {need} needed.")
        out[name] = {"select": units[: cfg.n_target], "eval": units[cfg.n_target : need]}
    return out


# ----------------------------------------------------------------------------------------------
# selection


def make_selector(name: str, n_pool: int, negative: np.ndarray | None = None, seed: int = 0,
                  dsir_chunk_tokens: int | None = 100) -> Any:
    """The selector under test, with its package defaults (pool-size caps for TSDS; DSIR's chunk
    length, which must fit the pool's unit length, from ``Config.dsir_chunk_tokens``)."""
    from hf_otselect.selectors import get_selector

    if name == "dsir":
        return get_selector("dsir", chunk_tokens=dsir_chunk_tokens or None)
    if name == "tsds":
        return get_selector("tsds", max_K=min(5000, n_pool), kde_K=min(1000, n_pool), seed=seed, replace=True)  # the paper's draws, as recorded
    if name == "got_d_neg":
        return get_selector("got_d", negative_target=negative)
    return get_selector(name)


def run_selectors(names: list[str], pool_emb: np.ndarray, pool_text: list[str], tgt_emb: np.ndarray, tgt_text: list[str],
                  budgets: tuple[int, ...], random_seeds: tuple[int, ...], negative: np.ndarray | None = None,
                  seed: int = 0, guard_radius: float = 0.0, sources: np.ndarray | None = None,
                  prefilter_keep: int = 0, dsir_chunk_tokens: int | None = 100) -> list[dict[str, Any]]:
    """Score once per selector, then choose every budget (random: every seed).

    ``guard_radius > 0`` adds, for every selector, ``<name>+guard`` rows chosen through
    :func:`hf_otselect.dedup.guarded_choose` (the near-duplicate guard). ``prefilter_keep > 0``
    (with ``sources``) adds ``got_d+pf``: :func:`hf_otselect.prefilter.prefilter_sources` keeps the
    ``prefilter_keep`` sources nearest the target by OT, and GOT-D selects among their rows only.

    Returns
    -------
    list of dict
        ``selector`` (random rows are ``random/s<seed>``), ``k``, ``indices`` (int64 array, rows of
        the pool), ``seconds`` (scoring + choosing), ``info`` (the selector's diagnostics).
    """
    out = []
    jobs = [(name, None) for name in names]
    if prefilter_keep > 0 and sources is not None and "got_d" in names:
        jobs.append(("got_d", "pf"))
    for name, variant in jobs:
        sel = make_selector(name, len(pool_text), negative, seed, dsir_chunk_tokens)
        t0 = time.perf_counter()
        rows = np.arange(len(pool_text))
        info: dict[str, Any] = {}
        if variant == "pf":
            from hf_otselect.prefilter import prefilter_sources

            pf = prefilter_sources(pool_emb, sources, tgt_emb, keep=prefilter_keep, seed=seed)
            rows = np.flatnonzero(pf.mask)
            info["prefilter"] = pf.to_dict()
        if sel.needs_text:
            scores = sel.score([pool_text[i] for i in rows], tgt_text)
        elif pool_emb is None and name == "random":  # random reads no vectors (selection-only runs embed nothing)
            scores = sel.score(np.zeros((len(rows), 1), np.float32), np.zeros((1, 1), np.float32))
        else:
            scores = sel.score(pool_emb[rows], tgt_emb)
        scores = np.asarray(scores, dtype=np.float64)
        info.update(getattr(sel, "diagnostics_", {}) or {})
        t_score = time.perf_counter() - t0
        seeds = random_seeds if name == "random" else (seed,)
        base = "random/s{}" if name == "random" else name + ("+pf" if variant == "pf" else "")
        for k in budgets:
            for s in seeds:
                label = base.format(s)
                t1 = time.perf_counter()
                idx = rows[np.asarray(sel.choose_rows(scores, k, seed=s), dtype=np.int64)]
                out.append({"selector": label, "k": int(k), "indices": idx, "seconds": t_score + time.perf_counter() - t1, "info": info})
                if guard_radius > 0 and variant is None:
                    from hf_otselect.dedup import guarded_choose

                    t1 = time.perf_counter()
                    g_idx, g_info = guarded_choose(sel, scores, k, seed=s, candidates=pool_emb, radius=guard_radius)
                    out.append({"selector": label + "+guard", "k": int(k), "indices": np.asarray(g_idx, dtype=np.int64),
                                "seconds": t_score + time.perf_counter() - t1, "info": {**info, "guard": g_info}})
    return out


def ot_to_target(sel_emb: np.ndarray, tgt_emb: np.ndarray) -> float:
    """Entropic OT distance (eps 0.1 absolute, cost ||x - y||^2) between a selection and the target."""
    from hf_otselect.ot import ot_distance

    return float(ot_distance(sel_emb, tgt_emb, eps=OT_EPS, max_iter=2000))


# ----------------------------------------------------------------------------------------------
# language model


def _load_script(name: str) -> Any:
    """scripts/<name>.py as a module; scripts/ never goes on sys.path (evaluate.py would shadow a library)."""
    mod_name = f"hf_otselect_script_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _training_args(out: Path, cfg: Config, *, lr: float, max_steps: int = -1, epochs: float = 1.0, batch: int,
                   warmup: float = 0.0, do_eval: bool = False) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        learning_rate=lr, max_steps=max_steps, num_train_epochs=epochs, lr_scheduler_type="linear", warmup_steps=warmup,
        do_train=True, do_eval=do_eval, weight_decay=0.01, save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], seed=cfg.seed,
        data_seed=cfg.seed, disable_tqdm=True, use_cpu=cfg.device == "cpu", dataloader_num_workers=0,
    )


def pretrain(pool_text: list[str], cfg: Config, work: Path) -> tuple[Path, dict[str, Any]]:
    """Train the tokenizer and the small GPT-2 on the whole pool, once (cached by configuration)."""
    import datasets
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    key = _key("pretrain", "validation 5%", sorted(pool_text), cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.block_size,
               cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size, cfg.seed)
    out = work / f"pretrained-{key}"
    done = out / "prefinetune_results.json"
    if done.exists():
        logger.info("pre-trained model cached at %s", out)
        return out, json.loads(done.read_text())
    init = work / f"init-{key}"
    shutil.rmtree(init, ignore_errors=True)
    init.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(pool_text, vocab_size=cfg.vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=cfg.block_size)
    tok.save_pretrained(init)
    import torch

    torch.manual_seed(cfg.seed)  # transformers initialises weights from torch's global generator
    conf = GPT2Config(vocab_size=len(tok), n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=max(1, cfg.n_embd // 64), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      architectures=["GPT2LMHeadModel"])
    GPT2LMHeadModel(conf).save_pretrained(init)
    data = work / f"pool-{key}"
    datasets.Dataset.from_dict({"text": pool_text}).save_to_disk(str(data))
    args = _training_args(out, cfg, lr=cfg.pretrain_lr, epochs=cfg.pretrain_epochs, batch=2 * cfg.batch_size, warmup=0.05,
                          do_eval=True)  # eval loss on a held-out 5% of the pool (prefinetune's default share)
    return out, _prefinetune(init, data, cfg, args, max_eval_blocks=32)


def _prefinetune(model: Path, data: Path, cfg: Config, args: Any, *, max_eval_blocks: int) -> dict[str, Any]:
    """scripts/prefinetune.py's ``prefinetune`` on a saved text dataset; results (with seconds) saved next to the model."""
    pre = _load_script("prefinetune")
    t0 = time.perf_counter()
    res = pre.prefinetune(
        pre.ModelArguments(model_name_or_path=str(model), model_kind="causal"),
        pre.DataArguments(train_data=str(data), block_size=cfg.block_size, max_eval_blocks=max_eval_blocks),
        args,
    )
    res["seconds"] = time.perf_counter() - t0
    (Path(args.output_dir) / "prefinetune_results.json").write_text(json.dumps(res, indent=2))
    return res


def warm_up(base: Path, texts: list[str], k: int, cfg: Config, work: Path) -> tuple[Path, dict[str, Any]]:
    """Warm ``base`` up on ``texts`` for ``ceil(k * warm_steps_per_row)`` steps (cached by content)."""
    import datasets

    steps = max(1, math.ceil(k * cfg.warm_steps_per_row))
    # Training cycles over the data for a fixed number of steps anyway; a tiny selection (smoke
    # runs) may hold fewer tokens than one block, so repeat it until it surely fills a few blocks.
    while sum(map(len, texts)) < 16 * cfg.block_size:
        texts = texts + texts
    out = work / "warm" / _key("warm", str(base), texts, steps, cfg.warm_lr, cfg.batch_size, cfg.seed)
    done = out / "prefinetune_results.json"
    if done.exists():
        return out, json.loads(done.read_text())
    data = out.with_name(out.name + "-data")
    shutil.rmtree(data, ignore_errors=True)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(data))
    res = _prefinetune(base, data, cfg, _training_args(out, cfg, lr=cfg.warm_lr, max_steps=steps, batch=cfg.batch_size),
                       max_eval_blocks=4)
    shutil.rmtree(data, ignore_errors=True)
    return out, res


def load_lm(path: Path, cfg: Config) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).to(cfg.device)
    model.eval()
    return model, tok


def perplexity(model: Any, tok: Any, texts: list[str], cfg: Config) -> float:
    ev = _load_script("evaluate")
    return float(ev.causal_perplexity(model, tok, texts, block_size=cfg.block_size, batch_size=32)["perplexity"])


def generate(model: Any, tok: Any, prompts: list[str], cfg: Config) -> list[str]:
    """Sampled continuations (top-k 50) of ``gen_tokens`` tokens, the prompt cut off; seeded."""
    import torch

    gen = []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt")["input_ids"][:, -(cfg.block_size - cfg.gen_tokens):].to(model.device)
        # generate() samples from torch's global generator: reseed it per prompt so every model sees
        # the same random stream (the benchmark's only use of global RNG state).
        torch.manual_seed(cfg.seed * 100_003 + i)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                                 max_new_tokens=cfg.gen_tokens, pad_token_id=tok.pad_token_id)
        gen.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return gen


def toxicity_classifier(jig: dict[str, list[str]], seed: int) -> tuple[Any, float]:
    """TF-IDF (word 1-2-grams) + logistic regression on Jigsaw rows outside pool/targets; held-out accuracy."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    x = jig["clf_train_ok"] + jig["clf_train_bad"]
    y = [0] * len(jig["clf_train_ok"]) + [1] * len(jig["clf_train_bad"])
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                        LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    clf.fit(x, y)
    xt = jig["clf_test_ok"] + jig["clf_test_bad"]
    yt = np.array([0] * len(jig["clf_test_ok"]) + [1] * len(jig["clf_test_bad"]))
    return clf, float((clf.predict(xt) == yt).mean())


# ----------------------------------------------------------------------------------------------
# the run


def run(cfg: Config) -> dict[str, Any]:
    """Run the whole benchmark; returns the results dict (also written as JSON/markdown/PNGs)."""
    import torch

    from hf_otselect.embed import embed

    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    raw = load_raw(Path(cfg.data_dir), rng)
    pool = build_pool(raw, cfg, rng)
    targets = build_targets(raw, cfg, pool["text"], rng)
    n_pool = len(pool["text"])
    logger.info("pool: %d units from %d sources; targets: %s", n_pool, len(set(pool["source"])), list(targets))

    def emb(texts: list[str]) -> np.ndarray:
        return embed(texts, cache_dir=work / "embed_cache", max_length=cfg.embed_max_length, device=cfg.device,
                     show_progress=False)

    t0 = time.perf_counter()
    pool_emb = emb(pool["text"])
    tgt_emb = {name: emb(t["select"]) for name, t in targets.items()}
    neg_texts = [clip(t, cfg.max_chars) for t in raw["jigsaw"]["negative"]][: cfg.n_target]
    neg_emb = emb(neg_texts)
    t_embed = time.perf_counter() - t0

    base, pre_res = pretrain(pool["text"], cfg, work)
    base_model, tok = load_lm(base, cfg)
    clf, clf_acc = toxicity_classifier(raw["jigsaw"], cfg.seed)
    prompts = [raw["prompts"][i] for i in np.sort(rng.choice(len(raw["prompts"]), cfg.n_prompts, replace=False))]

    def gen_toxicity(model: Any) -> dict[str, float]:
        texts = [t if t.strip() else "." for t in generate(model, tok, prompts, cfg)]
        p = clf.predict_proba(texts)[:, 1]
        return {"gen_toxic_frac": float((p > 0.5).mean()), "gen_toxic_prob": float(p.mean())}

    def measure(path: Path, texts: list[str], toxicity: bool) -> dict[str, float]:
        """Perplexity on ``texts`` (and generation toxicity), cached next to the model."""
        cache = path / f"eval-{_key(texts, toxicity, prompts, cfg.gen_tokens, cfg.block_size, cfg.seed)}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        model = base_model if path == base else load_lm(path, cfg)[0]
        out = {"ppl": perplexity(model, tok, texts, cfg)}
        if toxicity:
            out.update(gen_toxicity(model))
        cache.write_text(json.dumps(out))
        return out

    rows: list[dict[str, Any]] = []
    for name, t in targets.items():
        row = {"target": name, "k": 0, "selector": "pretrained", "domain_frac": float("nan"), "ot": float("nan"),
               "select_s": 0.0, "warm_s": 0.0, **measure(base, t["eval"], name == "jigsaw_ok")}
        if name == "jigsaw_ok":
            row["toxic_frac"] = float("nan")
        rows.append(row)

    for name, t in targets.items():
        names = list(cfg.selectors) + (["got_d_neg"] if name == "jigsaw_ok" and "got_d" in cfg.selectors else [])
        sels = run_selectors(names, pool_emb, pool["text"], tgt_emb[name], t["select"], cfg.budgets, cfg.random_seeds,
                             negative=neg_emb, seed=cfg.seed, sources=pool["source"], prefilter_keep=cfg.prefilter_keep,
                             dsir_chunk_tokens=cfg.dsir_chunk_tokens)
        for s in sels:
            idx = s["indices"]
            sel_texts = [pool["text"][i] for i in idx]
            path, wres = warm_up(base, sel_texts, s["k"], cfg, work)
            row = {"target": name, "k": s["k"], "selector": s["selector"],
                   "domain_frac": float((pool["domain"][idx] == TARGET_DOMAIN[name]).mean()),
                   "ot": ot_to_target(pool_emb[idx], tgt_emb[name]), **measure(path, t["eval"], name == "jigsaw_ok"),
                   "select_s": s["seconds"], "warm_s": wres.get("seconds", 0.0), "distinct": int(len(np.unique(idx))),
                   "sources": {str(a): int(b) for a, b in zip(*np.unique(pool["source"][idx], return_counts=True))}}
            if name == "jigsaw_ok":
                row["toxic_frac"] = float(pool["toxic"][idx].mean())
            if "prefilter" in s["info"]:
                row["prefilter_kept"] = s["info"]["prefilter"]["kept_sources"]
            rows.append(row)
            logger.info("%s k=%d %s: domain %.2f OT %.3f ppl %.1f", name, s["k"], s["selector"], row["domain_frac"], row["ot"], row["ppl"])

    dup_rows = duplicate_test(pool, pool_emb, targets, tgt_emb, cfg, rng)
    res = {"config": asdict(cfg), "n_pool": n_pool, "pool_sources": {s: int((pool["source"] == s).sum()) for s in DOMAIN},
           "pretrain": pre_res, "classifier_accuracy": clf_acc, "embed_seconds": t_embed, "rows": rows,
           "duplicates": dup_rows, "prompts": len(prompts), "total_seconds": time.perf_counter() - t_start}
    return res


def duplicate_test(pool: dict[str, Any], pool_emb: np.ndarray, targets: dict[str, Any], tgt_emb: dict[str, np.ndarray],
                   cfg: Config, rng: np.random.Generator) -> list[dict[str, Any]]:
    """TSDS duplicate test: ``dup_frac`` of the pool repeated ``dup_copies`` times; share of each selection on them."""
    n = len(pool["text"])
    dup = np.sort(rng.choice(n, max(1, round(cfg.dup_frac * n)), replace=False))
    extra = np.repeat(dup, cfg.dup_copies - 1)
    rows_of = np.concatenate([np.arange(n), extra])  # augmented row -> original row
    is_dup = np.isin(rows_of, dup)
    aug_emb = pool_emb[rows_of]
    aug_text = [pool["text"][i] for i in rows_of]
    out = []
    for name, t in targets.items():
        sels = run_selectors(list(cfg.selectors), aug_emb, aug_text, tgt_emb[name], t["select"], cfg.budgets,
                             cfg.random_seeds, seed=cfg.seed, guard_radius=cfg.guard_radius, dsir_chunk_tokens=cfg.dsir_chunk_tokens)
        for s in sels:
            idx = s["indices"]
            out.append({"target": name, "k": s["k"], "selector": s["selector"], "dup_share": float(is_dup[idx].mean()),
                        "distinct": int(len(np.unique(rows_of[idx]))), "select_s": s["seconds"],
                        "domain_frac": float((pool["domain"][rows_of[idx]] == TARGET_DOMAIN[name]).mean())})
    out.append({"pool_dup_share": float(is_dup.mean()), "n_aug": int(len(rows_of)), "n_dup_rows": int(len(dup))})
    return out


def selection_only(cfg: Config) -> dict[str, Any]:
    """The selection half of :func:`run` (same pool, same targets): who is chosen, no LM training.

    Reports, per target x budget x selector, the share of the target's domain, the sources and the
    median length (word-punct tokens) of the chosen rows. DSIR runs three times: with
    ``cfg.dsir_chunk_tokens``, with the package default (100) and on whole rows (plain sums),
    labelled ``dsir``, ``dsir[chunk=100]`` and ``dsir[whole rows]``. Embeddings (and
    the OT column of the full run) are computed only when a vector selector is asked for.
    """
    from hf_otselect.selectors.baselines import dsir_ngrams

    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)  # the same draws as run(): same pool, same targets
    raw = load_raw(Path(cfg.data_dir), rng)
    pool = build_pool(raw, cfg, rng)
    targets = build_targets(raw, cfg, pool["text"], rng)
    tokens = np.array([len(dsir_ngrams(t, 1)) for t in pool["text"]])
    pool_emb, tgt_emb = None, {}
    if any(s_ not in ("dsir", "random") for s_ in cfg.selectors):
        from hf_otselect.embed import embed

        def emb(texts: list[str]) -> np.ndarray:
            return embed(texts, cache_dir=Path(cfg.work_dir) / "embed_cache", max_length=cfg.embed_max_length,
                         device=cfg.device, show_progress=False)

        pool_emb = emb(pool["text"])
        tgt_emb = {name: emb(t["select"]) for name, t in targets.items()}
    rows: list[dict[str, Any]] = []
    for name, t in targets.items():
        variants = [(s_, cfg.dsir_chunk_tokens if s_ == "dsir" else None, s_) for s_ in cfg.selectors]
        if "dsir" in cfg.selectors:
            variants += [("dsir", 100, "dsir[chunk=100]"), ("dsir", 0, "dsir[whole rows]")]
        for sel_name, chunk, label in variants:
            sels = run_selectors([sel_name], pool_emb, pool["text"], tgt_emb.get(name), t["select"], cfg.budgets,
                                 cfg.random_seeds, seed=cfg.seed, dsir_chunk_tokens=chunk)
            for r in sels:
                idx = r["indices"]
                rows.append({"target": name, "k": r["k"], "selector": r["selector"].replace(sel_name, label, 1),
                             "domain_frac": float((pool["domain"][idx] == TARGET_DOMAIN[name]).mean()),
                             "median_tokens": float(np.median(tokens[idx])),
                             "rows_below_chunk": r["info"].get("rows_below_chunk", 0),
                             "sources": {str(a): int(b) for a, b in zip(*np.unique(pool["source"][idx], return_counts=True))}})
                logger.info("%s k=%d %s: domain %.2f", name, r["k"], rows[-1]["selector"], rows[-1]["domain_frac"])
    return {"config": asdict(cfg), "n_pool": len(pool["text"]), "rows": rows,
            "pool_sources": {s_: int((pool["source"] == s_).sum()) for s_ in DOMAIN},
            "pool_median_tokens": {s_: float(np.median(tokens[pool["source"] == s_])) for s_ in DOMAIN},
            "total_seconds": time.perf_counter() - t_start}


def write_selection_markdown(res: dict[str, Any], command: str, path: Path) -> None:
    """The selection-only results: one table per budget."""
    cfg = res["config"]
    stats = {k: _agg(res["rows"], k) for k in ("domain_frac", "median_tokens")}
    prov = provenance(seeds={"pool, random selections": cfg.get("seed")})
    prov["command"] = command
    L = ["# Quality benchmark, selection only: which rows each selector takes (no LM training)", "",
         *header(prov), f"Wall time: {res['total_seconds']:.0f} s", "",
         f"Pool: {res['n_pool']} units (≤ {cfg['max_chars']} chars), the pool of `quality.md` (same seed) — median word-punct "
         "tokens per source: " + ", ".join(f"{s_} {m:.0f}" for s_, m in res["pool_median_tokens"].items()) + ".  ",
         f"DSIR: `dsir` scores rows per chunk of {cfg['dsir_chunk_tokens']} tokens (`Config.dsir_chunk_tokens`), "
         "`dsir[chunk=100]` with the package default, `dsir[whole rows]` by plain sums over whole rows. "
         "Rows shorter than one chunk are scored from their own n-grams, scaled to one chunk; 'below chunk' counts them.", ""]
    for k in cfg["budgets"]:
        L += [f"## Budget k = {k}", "", "| target | selector | domain frac | median tokens | below chunk | top sources |", "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if r["k"] != k or (r["selector"].startswith("random/s") and not r["selector"].endswith("s0")):
                continue
            sel = re.sub(r"^random/s\d+", "random", r["selector"])
            dm, ds = stats["domain_frac"][(r["target"], k, sel)]
            top = ", ".join(f"{a} {b}" for a, b in sorted(r["sources"].items(), key=lambda x: -x[1])[:3])
            L.append(f"| {r['target']} | {sel} | {_fmt(dm, ds, 2)} | {r['median_tokens']:.0f} | {r['rows_below_chunk']} | {top} |")
        L.append("")
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# reporting


def _agg(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, int, str], tuple[float, float]]:
    """(target, k, selector) -> (mean, std); random seeds pooled under 'random'."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        if key not in r or "selector" not in r:
            continue
        sel = re.sub(r"^random/s\d+", "random", r["selector"])
        groups.setdefault((r["target"], r["k"], sel), []).append(r[key])
    return {g: (float(np.mean(v)), float(np.std(v)) if len(v) > 1 else float("nan")) for g, v in groups.items()}


def _fmt(m: float, s: float, nd: int) -> str:
    if m != m:
        return "–"
    return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s == s else "")


def write_markdown(res: dict[str, Any], command: str, load: str, path: Path) -> None:
    cfg = res["config"]
    rows = res["rows"]
    order = ["pretrained", "got_d", "got_d+pf", "got_d_neg", "tsds", "similarity", "dsir", "random"]
    stats = {k: _agg(rows, k) for k in ("domain_frac", "ot", "ppl", "select_s", "toxic_frac", "gen_toxic_frac", "gen_toxic_prob")}
    prov = res.get("provenance")
    if prov is not None:  # runs since issue 16: the header of benchmarks/_provenance.py
        head = header(prov) + [f"Device {cfg['device']}, torch threads {cfg['threads']}  "]  # the seeds are in header()
    else:  # older JSONs: what that run recorded (its commit was read from its markdown header)
        head = [f"Command: `{command}`  ", f"Commit: {res.get('commit', 'not recorded')}; date {res.get('date', 'not recorded')} UTC; versions: not recorded by this run  ",
                f"Machine: {os.cpu_count()} CPUs visible, torch threads {cfg['threads']}, device {cfg['device']}; "
                f"load at start: `{load}`; seeds: data, model init and warm-up {cfg['seed']}, random selections "
                f"{list(cfg['random_seeds'])}  "]
    L = ["# Quality benchmark: selectors x targets x budgets on real text", "", *head,
         f"Total wall time: {res['total_seconds'] / 60:.1f} min (embedding {res['embed_seconds']:.0f} s, pre-training "
         f"{res['pretrain'].get('seconds', float('nan')):.0f} s)", "",
         f"Pool: {res['n_pool']} units (≤ {cfg['max_chars']} chars) — " + ", ".join(f"{s} {n}" for s, n in res["pool_sources"].items()) + ".  ",
         f"Targets: {', '.join(cfg['targets'])}; {cfg['n_target']} texts to select for, {cfg['n_eval']} disjoint texts for perplexity.  ",
         f"LM: GPT-2, {cfg['n_layer']} layers, width {cfg['n_embd']}, byte-level BPE {cfg['vocab_size']}, blocks of {cfg['block_size']}; "
         f"pre-trained {cfg['pretrain_epochs']} epochs on the pool (eval loss {res['pretrain']['eval_loss_before']:.2f} → "
         f"{res['pretrain']['eval_loss_after']:.2f}); warm-up ceil({cfg['warm_steps_per_row']}·k) steps, batch {cfg['batch_size']}, lr {cfg['warm_lr']}.  ",
         f"random: mean ± std over seeds {list(cfg['random_seeds'])}. OT: entropic, eps {OT_EPS}, cost ‖x−y‖² on unit all-MiniLM-L6-v2 embeddings. "
         "ppl: lower is better; the `pretrained` row has no warm-up.", ""]
    for k in cfg["budgets"]:
        L += [f"## Budget k = {k} ({100 * k / res['n_pool']:.1f}% of the pool)", "",
              "| target | selector | domain frac | OT(sel, target) | ppl | Δppl vs pretrained | select s |", "|---|---|---|---|---|---|---|"]
        for t in cfg["targets"]:
            base = stats["ppl"][(t, 0, "pretrained")][0]
            for s in order:
                kk = 0 if s == "pretrained" else k
                if (t, kk, s) not in stats["ppl"]:
                    continue
                pm, ps = stats["ppl"][(t, kk, s)]
                L.append(f"| {t} | {s} | {_fmt(*stats['domain_frac'][(t, kk, s)], 2)} | {_fmt(*stats['ot'][(t, kk, s)], 3)} | "
                         f"{_fmt(pm, ps, 1)} | {pm - base:+.1f} | {_fmt(*stats['select_s'][(t, kk, s)], 2)} |")
        L.append("")
    L += ["`got_d+pf`: GOT-D after the source pre-filter (`hf_otselect.prefilter.prefilter_sources`, the "
          f"{cfg['prefilter_keep']} sources nearest the target by OT kept); its select time includes the pre-filter.", ""]
    L += ["## Winners (perplexity)", "",
          "Best selector per target and budget; 'within noise' when its margin over the runner-up is below twice "
          "random's seed std at that cell.", "", "| target | k | best | ppl | runner-up | ppl | random std | verdict |", "|---|---|---|---|---|---|---|---|"]
    wins: dict[str, int] = {}
    for k in cfg["budgets"]:
        for t in cfg["targets"]:
            cells = sorted((stats["ppl"][(t, k, s)][0], s) for s in order if (t, k, s) in stats["ppl"] and s != "pretrained")
            if len(cells) < 2:
                continue
            sd = stats["ppl"].get((t, k, "random"), (0, float("nan")))[1]
            clear = sd == sd and cells[1][0] - cells[0][0] > 2 * sd
            if clear:
                wins[cells[0][1]] = wins.get(cells[0][1], 0) + 1
            L.append(f"| {t} | {k} | {cells[0][1]} | {cells[0][0]:.1f} | {cells[1][1]} | {cells[1][0]:.1f} | {sd:.2f} | "
                     f"{'clear' if clear else 'within noise'} |")
    L += ["", "Clear wins: " + (", ".join(f"{s} {n}" for s, n in sorted(wins.items(), key=lambda x: -x[1])) or "none"), ""]
    # mean over targets
    L += ["## Mean over targets", "", "| k | selector | domain frac | OT | mean Δppl vs pretrained |", "|---|---|---|---|---|"]
    for k in cfg["budgets"]:
        for s in order[1:]:
            cells = [t for t in cfg["targets"] if (t, k, s) in stats["ppl"]]
            if not cells:
                continue
            d = np.mean([stats["ppl"][(t, k, s)][0] - stats["ppl"][(t, 0, "pretrained")][0] for t in cells])
            L.append(f"| {k} | {s}{'' if len(cells) == len(cfg['targets']) else ' (' + ', '.join(cells) + ')'} | "
                     f"{np.mean([stats['domain_frac'][(t, k, s)][0] for t in cells]):.2f} | "
                     f"{np.mean([stats['ot'][(t, k, s)][0] for t in cells]):.3f} | {d:+.2f} |")
    L.append("")
    if "jigsaw_ok" in cfg["targets"]:
        L += ["## Toxicity (target: non-toxic Jigsaw; `got_d_neg` also moves away from toxic Jigsaw)", "",
              f"Classifier: TF-IDF 1-2-grams + logistic regression trained on Jigsaw train.b.ok / train.{{b,c}}.bad, "
              f"held-out accuracy {res['classifier_accuracy']:.3f} on test.c (200 ok + 200 toxic). "
              f"Generations: {res['prompts']} RealToxicityPrompts 'challenging' prompts, {cfg['gen_tokens']} sampled tokens (top-k 50, seeded). "
              f"The pool's comments are half toxic ({(res['pool_sources']['jigsaw'] // 2)} rows, {100 * (res['pool_sources']['jigsaw'] // 2) / res['n_pool']:.1f}% of the pool).", "",
              "| k | selector | toxic frac of selection | comments-domain frac | generations toxic (p>0.5) | mean toxic prob | ppl |", "|---|---|---|---|---|---|---|"]
        for k in cfg["budgets"]:
            for s in order:
                kk = 0 if s == "pretrained" else k
                key = ("jigsaw_ok", kk, s)
                if key not in stats["gen_toxic_frac"] or (s == "pretrained" and k != cfg["budgets"][0]):
                    continue
                L.append(f"| {kk} | {s} | {_fmt(*stats['toxic_frac'][key], 3)} | {_fmt(*stats['domain_frac'][key], 2)} | "
                         f"{_fmt(*stats['gen_toxic_frac'][key], 3)} | {_fmt(*stats['gen_toxic_prob'][key], 3)} | {_fmt(*stats['ppl'][key], 1)} |")
        L.append("")
    dup = res["duplicates"]
    meta = dup[-1]
    dstats = {k: _agg(dup[:-1], k) for k in ("dup_share", "distinct", "domain_frac")}
    L += [f"## TSDS duplicate test ({meta['n_dup_rows']} pool rows = {100 * cfg['dup_frac']:.0f}% copied {cfg['dup_copies']}x; "
          f"augmented pool {meta['n_aug']} rows, {100 * meta['pool_dup_share']:.1f}% of them duplicated content)", "",
          "Share of the selection that is duplicated content (copies or their originals), mean over targets; distinct = distinct "
          "original rows selected (mean over targets).", "",
          (f"`+guard`: the same scores chosen through `hf_otselect.dedup.guarded_choose` (radius {cfg['guard_radius']})."
           if cfg["guard_radius"] > 0 else "Near-duplicate guard off (`--guard-radius 0`)."), "",
          "| k | selector | dup share | distinct rows | domain frac |", "|---|---|---|---|---|"]
    for k in cfg["budgets"]:
        for s in [x + g for x in order[1:] for g in ("", "+guard")]:
            cells = [t for t in cfg["targets"] if (t, k, s) in dstats["dup_share"]]
            if not cells:
                continue
            L.append(f"| {k} | {s} | {np.mean([dstats['dup_share'][(t, k, s)][0] for t in cells]):.3f} | "
                     f"{np.mean([dstats['distinct'][(t, k, s)][0] for t in cells]):.0f} | "
                     f"{np.mean([dstats['domain_frac'][(t, k, s)][0] for t in cells]):.2f} |")
    L += ["", f"![perplexity change and domain fraction]({path.stem}_ppl_domain.png)", "",
          f"![duplicate share]({path.stem}_duplicates.png)", ""]
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


def plot(res: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    sels = [s for s in ("got_d", "got_d+pf", "tsds", "similarity", "dsir", "random") if s.split("+")[0] in cfg["selectors"]]
    ppl, dom = _agg(res["rows"], "ppl"), _agg(res["rows"], "domain_frac")
    paths = []
    fig, axes = plt.subplots(2, len(cfg["budgets"]), figsize=(6 * len(cfg["budgets"]), 7.5), squeeze=False)
    x = np.arange(len(cfg["targets"]))
    w = 0.8 / len(sels)
    for j, k in enumerate(cfg["budgets"]):
        for i, s in enumerate(sels):
            base = np.array([ppl[(t, 0, "pretrained")][0] for t in cfg["targets"]])
            m = np.array([ppl.get((t, k, s), (np.nan, np.nan))[0] for t in cfg["targets"]])
            e = np.array([ppl.get((t, k, s), (np.nan, np.nan))[1] for t in cfg["targets"]])
            axes[0, j].bar(x + i * w, 100 * (m / base - 1), w, yerr=np.nan_to_num(100 * e / base), label=s)
            axes[1, j].bar(x + i * w, [dom.get((t, k, s), (np.nan,))[0] for t in cfg["targets"]], w, label=s)
        for r, lab in ((0, "ppl change vs pre-trained (%)"), (1, "fraction from target domain")):
            axes[r, j].set_xticks(x + 0.4 - w / 2, cfg["targets"], rotation=20)
            axes[r, j].set_ylabel(lab)
            axes[r, j].set_title(f"k = {k}")
            axes[r, j].axhline(0, color="k", lw=0.5)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{name}_ppl_domain.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    dstats = _agg(res["duplicates"][:-1], "dup_share")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    dsels = [s for s in sels if s != "got_d+pf"]
    bars = [(k, g) for k in cfg["budgets"] for g in ("", "+guard")]
    bw = 0.8 / len(bars)
    for i, (k, g) in enumerate(bars):
        vals = [np.mean([dstats[(t, k, s + g)][0] for t in cfg["targets"] if (t, k, s + g) in dstats] or [np.nan]) for s in dsels]
        ax.bar(np.arange(len(dsels)) + i * bw, vals, bw, label=f"k = {k}{' with guard' if g else ''}")
    ax.axhline(res["duplicates"][-1]["pool_dup_share"], color="k", ls="--", lw=0.8, label="share in pool")
    ax.set_xticks(np.arange(len(dsels)) + 0.4 - bw / 2, dsels)
    ax.set_ylabel("share of selection on duplicated content")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{name}_duplicates.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = Config()
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--work-dir", default=d.work_dir, help="cache: embeddings, pre-trained and warmed-up models")
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--name", default=d.name, help="file stem of the results (<name>.md, .json, PNGs)")
    for f in ("n_per_source", "n_target", "n_eval", "max_chars", "dup_copies", "vocab_size", "n_layer", "n_embd",
              "block_size", "batch_size", "n_prompts", "gen_tokens", "seed", "threads", "embed_max_length"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    p.add_argument("--prefilter-keep", type=int, default=d.prefilter_keep, help="0 disables the got_d+pf arm")
    p.add_argument("--guard-radius", type=float, default=d.guard_radius, help="0 disables the +guard rows of the duplicate test")
    for f in ("dup_frac", "pretrain_epochs", "pretrain_lr", "warm_lr", "warm_steps_per_row", "scale"):
        p.add_argument("--" + f.replace("_", "-"), type=float, default=getattr(d, f))
    p.add_argument("--budgets", type=int, nargs="+", default=list(d.budgets))
    p.add_argument("--selectors", nargs="+", default=list(d.selectors), choices=list(SELECTORS))
    p.add_argument("--targets", nargs="+", default=list(d.targets), choices=list(TARGET_DOMAIN))
    p.add_argument("--random-seeds", type=int, nargs="+", default=list(d.random_seeds))
    p.add_argument("--device", default=d.device)
    p.add_argument("--dsir-chunk-tokens", type=int, default=d.dsir_chunk_tokens, help="DSIR's chunk length (0: whole rows)")
    p.add_argument("--from-json", default=None, help="only re-render the markdown and plots of a finished run's JSON")
    p.add_argument("--selection-only", action="store_true",
                   help="only choose rows (domain share, sources, lengths; no LM training), written to <name>.md/.json")
    a = vars(p.parse_args(argv))
    a.pop("from_json")
    a.pop("selection_only")
    for f in ("budgets", "selectors", "targets", "random_seeds"):
        a[f] = tuple(a[f])
    cfg = Config(**a)
    if cfg.scale != 1.0:  # bigger runs (GPU): more pool, bigger budgets, a wider and deeper model
        s = cfg.scale
        cfg.n_per_source = int(cfg.n_per_source * s)
        cfg.budgets = tuple(int(b * s) for b in cfg.budgets)
        cfg.n_embd = int(cfg.n_embd * min(s, 4) // 64 * 64) or cfg.n_embd
        cfg.n_layer = int(cfg.n_layer * min(s, 3))
    return cfg


def setup_run(log: logging.Logger) -> None:
    """What a benchmark run sets first: INFO logs for ``log``, quiet libraries, offline, no tokenizer threads."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("transformers", "datasets", "hf_otselect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_run(logger)
    cfg = parse_args(argv)
    args = sys.argv[1:] if argv is None else list(argv)
    if "--from-json" in args:
        src = Path(args[args.index("--from-json") + 1])
        res = json.loads(src.read_text(encoding="utf-8"))
        write_markdown(res, res["command"], res["load"], src.with_suffix(".md"))
        res["plots"] = [str(p) for p in plot(res, src.parent, src.stem)]
        return res
    import datasets
    import torch

    torch.set_num_threads(cfg.threads)
    prov = provenance(seeds={"data, model init, warm-up": cfg.seed, "random selections": list(cfg.random_seeds)},
                      argv=[str(Path(__file__)), *(sys.argv[1:] if argv is None else argv)])
    load, command = prov["load_at_start"] or "n/a", prov["command"]
    datasets.disable_progress_bars()
    if "--selection-only" in args:
        res = selection_only(cfg)
        res["command"] = command.strip()
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cfg.name}.json").write_text(json.dumps(res, indent=1, default=float), encoding="utf-8")
        write_selection_markdown(res, command.strip(), out / f"{cfg.name}.md")
        logger.info("wrote %s", out / f"{cfg.name}.md")
        return res
    res = run(cfg)
    res["command"], res["load"], res["provenance"] = command, load, prov
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.name}.json").write_text(json.dumps(res, indent=1, default=float), encoding="utf-8")
    write_markdown(res, command.strip(), load, out / f"{cfg.name}.md")
    res["plots"] = [str(p) for p in plot(res, out, cfg.name)]
    logger.info("wrote %s", out / f"{cfg.name}.md")
    return res


if __name__ == "__main__":
    main()
