"""Downstream benchmark: does a selection make the pretrained encoder better at the target task?

A scaled-down "Don't Stop Pretraining" experiment (Gururangan et al. 2020) as GOT-D (Kang et al.,
ICLR 2024, Sec. 4.1, Table 2) and TSDS (Liu et al., NeurIPS 2024, Sec. 5) run it: select ``k``
pool texts for a target task, continue masked-LM pre-training of a pretrained encoder on them,
then measure the encoder on the task.

- **Pool**: the mixed real pool of ``benchmarks/quality.py`` (built by importing its
  ``load_raw``/``build_pool``; 10 sources, ``--n-per-source`` units each). The target task's own
  train and test texts are removed from the raw pool documents first (for ChemProt that empties
  the ``chemprot`` source, for AG News the ``ag_news`` one, for IMDB the ``imdb`` one), and any unit
  equal to a target text is dropped after clipping; the run refuses a pool of fewer than 8
  sources or 4,000 units unless ``--smoke``.
- **Selections** (``hf_otselect.datasets_ext.run_selection``, public selectors with the package
  defaults, the pool vectors passed in): ``got_d``, ``got_d+pf`` (GOT-D after the source
  pre-filter, 2 sources kept), ``tsds``, ``similarity``, ``dsir``, ``random``, and ``none`` (no
  warm-up). The target side is ``--n-target`` texts of the task's train split.
- **Warm-up**: ``scripts/prefinetune.py`` continues MLM training of the encoder
  (``hf_otselect.DEFAULT_MODEL``, all-MiniLM-L6-v2 saved as a ``BertModel``: prefinetune loads it
  with ``AutoModelForMaskedLM``, i.e. ``BertForMaskedLM``: the decoder is tied to the pretrained
  word embeddings, the decoder bias is zero and the prediction-head transform (dense + LayerNorm)
  is initialised by transformers, normal(0, 0.02) / ones / zeros, from the warm-up seed). Every
  selector and budget gets the same ``--warm-steps`` steps, batch, learning rate and block size
  (default 20 steps of 8 blocks of 128 tokens, lr 1e-4: sized so the default run fits 60 minutes
  on 2 CPU cores; raise them on a GPU).
- **Measures** per warmed-up encoder:
  ``mlm``: masked-LM cross-entropy on ``--n-mlm-eval`` held-out test texts of the task, with
  masks fixed by ``--mask-seed`` (15% of the non-special tokens of each text, all replaced by
  ``[MASK]``; the same positions for every model); ``probe``: macro-F1 of a scikit-learn logistic
  regression on frozen mean-pooled last-layer features (train: up to ``--n-probe-train`` labelled
  train rows, test: up to ``--n-probe-test`` rows of the test split); ``ft`` (with ``--finetune``):
  macro-F1 after full fine-tuning with ``scripts/evaluate.py`` on ``--n-finetune-train`` train
  rows, scored on the probe's test rows, at the largest budget on the ``--finetune-targets``
  (default AG News and IMDB: on 2 cores a few hundred rows teach those; ChemProt and SciERC need
  thousands of rows and several epochs before the classifier leaves the majority class).
  ChemProt's and SciERC's classification rows keep their entity markers, which say which entity
  pair the label is about; the texts selected for and the MLM texts drop them (see :func:`plain`). The ``none`` row's MLM loss uses the freshly initialised head (it has
  seen no MLM step), so it measures the head's initialisation more than the encoder: compare
  ``none`` on the probe, and the selectors with each other on MLM loss.
- **Seeds**: ``--seeds`` warm-up seeds per cell (training order, masks, head initialisation); the
  selection seed is the same seed (it changes random's and TSDS's draws; GOT-D, similarity and
  DSIR are top-k and deterministic). Tables give mean ± std (ddof 1) and mark a difference to
  random (``r``) and to similarity (``s``) when it exceeds two standard errors,
  ``2 * sqrt(s_a^2 / n_a + s_b^2 / n_b)``: ``+`` better, ``-`` worse.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/downstream.py                      # default run
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/downstream.py --target /path/to/task_folder
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/downstream.py --smoke               # CI-size run

A target is a built-in name (``chemprot``, ``sciie``, ``ag_news``, ``imdb``, ``amazon``) or a
folder holding ``train.jsonl`` and ``test.jsonl`` (or ``.txt`` as the scibert files) with ``text``
and ``label`` fields. Embeddings, selections and per-model measures are cached under ``--work-dir``;
a warmed-up model is deleted once measured.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("hf_otselect.benchmarks.downstream")


sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks' shared modules, as quality.py imports _provenance
import quality as Q  # noqa: E402
from _provenance import header, provenance  # noqa: E402

BUILTIN = ("chemprot", "sciie", "ag_news", "imdb", "amazon")
SELECTORS = ("got_d", "got_d+pf", "tsds", "similarity", "dsir", "random")
ALL_ROWS = ("none",) + SELECTORS


@dataclass
class Config:
    """Every knob of a run (recorded in the results)."""

    data_dir: str = str(Q.DEFAULT_DATA)
    work_dir: str = "/tmp/hf_otselect_downstream"
    out_dir: str = str(REPO / "benchmarks" / "results")
    name: str = "downstream"
    targets: tuple[str, ...] = ("ag_news", "imdb")
    selectors: tuple[str, ...] = SELECTORS
    budgets: tuple[int, ...] = (200, 800)
    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "bundled"
    n_per_source: int = 500
    max_chars: int = 500
    n_target: int = 200
    n_mlm_eval: int = 200
    n_probe_train: int = 800
    n_probe_test: int = 400
    warm_lr: float = 1e-4  # DSP's DAPT/TAPT learning rate (Gururangan et al. 2020, App. B)
    # 20 steps of 8 blocks (~20k tokens, about one pass over a k = 200 selection), sized for the default
    # run (2 targets, 2 budgets, 6 selectors + none, 3 seeds: 78 models) to aim at 60 min on 2 cores.
    warm_steps: int = 20
    batch_size: int = 8
    block_size: int = 128
    mask_seed: int = 1234
    prefilter_keep: int = 2
    # DSIR puts every score on the scale of a chunk of this many tokens (rows shorter than a chunk are
    # scored from their own n-grams, length-normalised); 32 as in quality.py.
    dsir_chunk_tokens: int = 32
    finetune: bool = False
    finetune_targets: tuple[str, ...] = ("ag_news", "imdb")
    n_finetune_train: int = 300
    finetune_epochs: float = 3.0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 16
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    embed_max_length: int = 128
    smoke: bool = False
    note: str = ""
    min_sources: int = 8
    min_units: int = 4000
    pool: dict[str, Any] | None = field(default=None, repr=False)  # injected pool (tests): {"text", "source"}


# ----------------------------------------------------------------------------------------------
# targets


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file as they are: ChemProt's and SciERC's entity markers stay (see ``plain``)."""
    rows = [r for r in Q._jsonl(path) if str(r.get("text", "")).strip()]
    if rows and not {"text", "label"} <= set(rows[0]):
        raise ValueError(f"{path} needs fields 'text' and 'label'. Current fields: {sorted(rows[0])}")
    return [{"text": r["text"], "label": r["label"]} for r in rows]


def plain(text: str) -> str:
    """``text`` without ChemProt's / SciERC's entity markers (``<< >>``, ``[[ ]]``).

    The markers say which entity pair a relation label is about (the same sentence comes once per
    pair, with different labels), so the classification measures keep them; the texts selected for
    and the MLM texts drop them, as the pool's copies of these corpora do.
    """
    return Q._MARKERS.sub(" ", text)


def _split_file(folder: Path, split: str) -> Path:
    for ext in (".jsonl", ".txt", ".json"):
        if (folder / f"{split}{ext}").exists():
            return folder / f"{split}{ext}"
    raise ValueError(f"The 'target' parameter of downstream must be a folder with {split}.jsonl (text, label). Got {str(folder)!r} instead.")


def builtin_rows(name: str, data_dir: Path, amazon_target_texts: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``{"train": rows, "test": rows}`` (``text``, ``label``) of a built-in DSP task.

    ChemProt / SciERC: the scibert files. AG News: the alps training rows (train) and the original
    ``test.csv`` (test, class indices mapped through ``classes.txt``). IMDB: ``train`` / ``test``
    reviews, label from the folder. Amazon: the reviews of quality.py's target half with at least one
    helpfulness vote, label ``helpful`` when at least half the votes are (the DSP task's rule), split
    70/30 in the seeded order of that half.
    """
    d = data_dir
    if name in ("chemprot", "sciie"):
        sub = "chemprot" if name == "chemprot" else "sciie"
        return {s: _read_rows(d / sub / f"{s}.txt") for s in ("train", "test")}
    if name == "ag_news":
        with (d / "ag_news_alps" / "dev.tsv").open(encoding="utf-8") as fh:
            train = [{"text": a.replace(" #39;", "'"), "label": b.strip()} for a, b in
                     (line.rstrip("\n").split("\t")[:2] for line in fh if "\t" in line)]
        classes = (d / "ag_news" / "classes.txt").read_text(encoding="utf-8").split()
        with (d / "ag_news" / "test.csv").open(encoding="utf-8", newline="") as fh:
            test = [{"text": r[2].replace(" #39;", "'"), "label": classes[int(r[0]) - 1]} for r in csv.reader(fh)]
        return {"train": train, "test": test}
    if name == "imdb":
        return {s: [{"text": t, "label": lab} for lab in ("pos", "neg") for t in Q._imdb(d / "imdb" / s / lab)]
                for s in ("train", "test")}
    if name == "amazon":
        with gzip.open(d / "amazon_musical_instruments" / "reviews_Musical_Instruments_5.json.gz", "rt", encoding="utf-8") as fh:
            voted = {r["reviewText"]: ("helpful" if r["helpful"][0] >= 0.5 * r["helpful"][1] else "unhelpful")
                     for r in map(json.loads, fh) if r.get("helpful", [0, 0])[1] >= 1}
        rows = [{"text": t, "label": voted[t]} for t in amazon_target_texts if t in voted]
        cut = int(0.7 * len(rows))
        return {"train": rows[:cut], "test": rows[cut:]}
    raise ValueError(f"The 'target' parameter of downstream must be one of {list(BUILTIN)} or a folder. Got {name!r} instead.")


def prepare_target(spec: str, cfg: Config, work: Path, amazon_target_texts: list[str]) -> dict[str, Any]:
    """Materialise a target as jsonl files and pick its seeded subsets.

    Returns
    -------
    dict
        ``name``, ``n_train`` / ``n_test``, ``select`` (``n_target`` train texts to select for, markers
        dropped), ``mlm`` (``n_mlm_eval`` test texts, markers dropped), ``probe_train`` /
        ``probe_test`` / ``ft_train`` (paths of jsonl files with the classification rows, markers
        kept), ``exclude`` (every train and test text: raw, without markers, and clipped).
    """
    if spec in BUILTIN:
        name, rows = spec, builtin_rows(spec, Path(cfg.data_dir), amazon_target_texts)
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise ValueError(f"The 'target' parameter of downstream must be one of {list(BUILTIN)} or a folder. Got {spec!r} instead.")
        name, rows = folder.name, {s: _read_rows(_split_file(folder, s)) for s in ("train", "test")}
    for s in ("train", "test"):
        rows[s] = [r for r in rows[s] if r["text"].strip()]
        if len(rows[s]) < 2:
            raise ValueError(f"Target {name} has {len(rows[s])} usable {s} rows; at least 2 needed.")
    rng = np.random.default_rng(cfg.seed)
    tr = [rows["train"][i] for i in rng.permutation(len(rows["train"]))]
    labels = sorted({str(r["label"]) for r in tr[: min(cfg.n_probe_train, cfg.n_finetune_train)]})
    if len(labels) < 2:
        raise ValueError(f"Target {name} needs at least 2 distinct labels among its first "
                         f"{min(cfg.n_probe_train, cfg.n_finetune_train)} (shuffled) train rows to train a probe. Got {labels} instead.")
    te = [rows["test"][i] for i in rng.permutation(len(rows["test"]))]
    clip = lambda t: Q.clip(t, cfg.max_chars)  # noqa: E731
    folder = work / "targets" / name
    _write_jsonl(folder / "probe_train.jsonl", tr[: cfg.n_probe_train])
    _write_jsonl(folder / "probe_test.jsonl", te[: cfg.n_probe_test])
    _write_jsonl(folder / "ft_train.jsonl", tr[: cfg.n_finetune_train])
    select = Q._unique([clip(plain(r["text"])) for r in tr])[: cfg.n_target]
    # Held-out MLM texts: test rows after the probe's test rows when there are enough, so the two
    # measures do not share texts on the larger tasks.
    rest = te[cfg.n_probe_test:] if len(te) - cfg.n_probe_test >= cfg.n_mlm_eval else te
    mlm = Q._unique([clip(plain(r["text"])) for r in rest])[: cfg.n_mlm_eval]
    exclude = {r["text"] for r in rows["train"] + rows["test"]}
    exclude |= {plain(t) for t in exclude}
    exclude |= {clip(t) for t in exclude}
    return {"name": name, "n_train": len(rows["train"]), "n_test": len(rows["test"]), "select": select, "mlm": mlm,
            "probe_train": folder / "probe_train.jsonl", "probe_test": folder / "probe_test.jsonl",
            "ft_train": folder / "ft_train.jsonl", "exclude": exclude,
            "labels": sorted({str(r["label"]) for r in tr})}


# ----------------------------------------------------------------------------------------------
# pool


def build_pool(cfg: Config, raw: dict[str, Any], exclude: set[str]) -> dict[str, Any]:
    """quality.py's pool with every document / unit that is a target text removed.

    Returns ``{"text": [...], "source": ndarray of str}``; ``raw`` is not modified.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    raw = dict(raw, pool={s: [d for d in docs if d not in exclude and Q.clip(d, cfg.max_chars) not in exclude]
                          for s, docs in raw["pool"].items()})
    qcfg = Q.Config(n_per_source=cfg.n_per_source, max_chars=cfg.max_chars, seed=cfg.seed)
    pool = Q.build_pool(raw, qcfg, rng)
    keep = [i for i, t in enumerate(pool["text"]) if t not in exclude]
    return {"text": [pool["text"][i] for i in keep], "source": pool["source"][keep]}


def check_pool(pool: dict[str, Any], cfg: Config, target: str) -> None:
    n_src, n = len(set(pool["source"].tolist())), len(pool["text"])
    if not cfg.smoke and (n_src < cfg.min_sources or n < cfg.min_units):
        raise ValueError(f"The pool for target {target} has {n} units from {n_src} sources; "
                         f"at least {cfg.min_units} units from {cfg.min_sources} sources are needed (raise --n-per-source).")


# ----------------------------------------------------------------------------------------------
# selection, warm-up, measures


def select(name: str, pool: dict[str, Any], pool_emb: np.ndarray, tgt: dict[str, Any], tgt_emb: np.ndarray, k: int,
           seed: int, cfg: Config, cache: Path) -> np.ndarray:
    """Pool rows chosen by ``name`` (best or first drawn first), through ``run_selection``; cached."""
    import datasets

    from hf_otselect.datasets_ext import run_selection

    # A DSIR selection cached before short rows were scored (they were never chosen) is not reused.
    rule = ["dsir: short rows from their own n-grams"] if name.startswith("dsir") else []
    key = Q._key("sel", name, pool["text"], tgt["select"], k, seed, cfg.prefilter_keep, cfg.dsir_chunk_tokens, *rule)
    path = cache / f"{key}.json"
    if path.exists():
        return np.asarray(json.loads(path.read_text())["indices"], dtype=np.int64)
    base = name.split("+")[0]
    method = (Q.make_selector(base, len(pool["text"]), seed=seed, dsir_chunk_tokens=cfg.dsir_chunk_tokens)
              if base in ("tsds", "dsir") else base)
    extra: dict[str, Any] = {}
    if name.endswith("+pf"):
        extra = {"source_column": "source", "prefilter": {"keep": cfg.prefilter_keep}}
    ds = datasets.Dataset.from_dict({"text": pool["text"], "source": pool["source"].tolist()})
    run = run_selection(ds, datasets.Dataset.from_dict({"text": tgt["select"]}), method, k, seed=seed,
                        embeddings=(pool_emb, tgt_emb), **extra)
    idx = np.asarray(run.result.indices, dtype=np.int64)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"selector": name, "k": k, "seed": seed, "indices": idx.tolist()}))
    return idx


def _training_args(out: Path, cfg: Config, seed: int, *, lr: float, batch_size: int, max_steps: int = -1, epochs: float = 1.0) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), do_train=True, per_device_train_batch_size=batch_size, per_device_eval_batch_size=32,
        learning_rate=lr, max_steps=max_steps, num_train_epochs=epochs, lr_scheduler_type="linear", warmup_steps=0.1,  # < 1: a ratio of the steps
        weight_decay=0.01, save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], seed=seed,
        data_seed=seed, disable_tqdm=True, use_cpu=cfg.device == "cpu", dataloader_num_workers=0,
    )


def warm_up(texts: list[str], seed: int, cfg: Config, out: Path) -> dict[str, Any]:
    """Continue MLM training of ``cfg.model`` on ``texts`` for ``warm_steps`` steps (scripts/prefinetune.py)."""
    import datasets

    pre = Q._load_script("prefinetune")
    # Training runs a fixed number of steps anyway; a tiny selection (smoke runs) may hold fewer
    # tokens than one block, so repeat it until it surely fills a few blocks.
    while sum(map(len, texts)) < 16 * cfg.block_size:
        texts = texts + texts
    data = out.with_name(out.name + "-data")
    shutil.rmtree(data, ignore_errors=True)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(data))
    t0 = time.perf_counter()
    res = pre.prefinetune(
        pre.ModelArguments(model_name_or_path=cfg.model, model_kind="masked"),
        pre.DataArguments(train_data=str(data), block_size=cfg.block_size),
        _training_args(out, cfg, seed, lr=cfg.warm_lr, batch_size=cfg.batch_size, max_steps=cfg.warm_steps),
    )
    shutil.rmtree(data, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def fixed_masks(tok: Any, texts: list[str], block_size: int, seed: int, rate: float = 0.15) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each text (truncated to ``block_size``) and the positions masked in it.

    At least one position per text; drawn with ``seed`` from the non-special tokens, so every model
    sharing the tokenizer is scored on the very same masks.
    """
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for t in texts:
        enc = tok(t, truncation=True, max_length=block_size, return_special_tokens_mask=True)
        cand = [i for i, s in enumerate(enc["special_tokens_mask"]) if not s]
        if not cand:
            continue
        n = max(1, int(round(rate * len(cand))))
        ids.append(list(enc["input_ids"]))
        masks.append(sorted(rng.choice(cand, size=n, replace=False).tolist()))
    return ids, masks


def _masked_head(model: Any) -> Any:
    """The MLM head as one module applied per position (``cls`` of BERT, ``lm_head`` of RoBERTa), or None.

    The head (a per-token transform and the vocabulary projection) is most of an MLM evaluation's
    cost; applied to the ~15% masked positions only, the loss is the same for a fraction of the work.
    A model whose head is spread over several modules (DistilBERT) returns None: full logits then.
    """
    heads = [m for _, m in model.named_children() if m is not model.base_model]
    return heads[0] if len(heads) == 1 else None


def mlm_loss(model: Any, tok: Any, ids: list[list[int]], masks: list[list[int]], batch_size: int = 16,
             masked_only: bool = True) -> float:
    """Token-weighted mean cross-entropy of the masked positions (every masked token -> [MASK]).

    With ``masked_only`` the head runs on the masked positions' hidden states only (see
    :func:`_masked_head`); the result equals the full-logits loss up to float rounding.
    """
    import torch

    head = _masked_head(model) if masked_only else None
    total, count = 0.0, 0
    model.eval()
    for b in range(0, len(ids), batch_size):
        chunk, mchunk = ids[b : b + batch_size], masks[b : b + batch_size]
        width = max(map(len, chunk))
        x = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(x)
        labels = torch.full_like(x, -100)
        for r, (seq, pos) in enumerate(zip(chunk, mchunk)):
            x[r, : len(seq)] = torch.tensor(seq)
            att[r, : len(seq)] = 1
            labels[r, pos] = x[r, pos]
            x[r, pos] = tok.mask_token_id
        with torch.inference_mode():
            if head is None:
                logits, target = model(input_ids=x, attention_mask=att).logits.flatten(0, 1), labels.flatten()
            else:
                hidden = model.base_model(input_ids=x, attention_mask=att).last_hidden_state
                sel = labels != -100
                logits, target = head(hidden[sel]), labels[sel]
        nll = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum", ignore_index=-100)
        total += float(nll)
        count += int((labels != -100).sum())
    return total / count


def mean_pooled(encoder: Any, tok: Any, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Mean of the last hidden states over the attended tokens, float32 ``(n, hidden)``."""
    import torch

    out = []
    encoder.eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    for b in range(0, len(texts), batch_size):
        batch = [texts[i] for i in order[b : b + batch_size]]
        enc = tok(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.inference_mode():
            h = encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).float().numpy())
    feats = np.concatenate(out) if out else np.zeros((0, 1), np.float32)
    res = np.empty_like(feats)
    res[order] = feats
    return res


def probe_f1(encoder: Any, tok: Any, tgt: dict[str, Any], cfg: Config) -> float:
    """Macro-F1 of a logistic regression on frozen mean-pooled features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = Q._jsonl(tgt["probe_train"]), Q._jsonl(tgt["probe_test"])
    xtr = mean_pooled(encoder, tok, [r["text"] for r in tr], cfg.block_size)
    xte = mean_pooled(encoder, tok, [r["text"] for r in te], cfg.block_size)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=cfg.seed))
    clf.fit(xtr, [str(r["label"]) for r in tr])
    return float(f1_score([str(r["label"]) for r in te], clf.predict(xte), average="macro"))


def finetune_f1(model_dir: Path, tgt: dict[str, Any], seed: int, cfg: Config, out: Path) -> float:
    """Macro-F1 after full fine-tuning with scripts/evaluate.py (``n_finetune_train`` rows; the probe's test rows)."""
    ev = Q._load_script("evaluate")
    res = ev.evaluate_model(
        ev.EvalArguments(model_name_or_path=str(model_dir), task_train_data=str(tgt["ft_train"]),
                         task_eval_data=str(tgt["probe_test"]), max_length=cfg.block_size),
        _training_args(out, cfg, seed, lr=cfg.finetune_lr, batch_size=cfg.finetune_batch_size, epochs=cfg.finetune_epochs),
    )
    return float(res["task"]["macro_f1"])


def measure(model_dir: str, tgt: dict[str, Any], seed: int, cfg: Config, *, masked: Any, finetune: bool, out: Path) -> dict[str, float]:
    """``mlm`` / ``probe`` (and ``ft``) of one encoder; ``masked`` = (ids, masks) of the MLM texts."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    pre = Q._load_script("prefinetune")
    path = pre.model_path(model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    import transformers

    transformers.set_seed(seed)  # the 'none' row's head is initialised here, from the seed
    mlm_model = AutoModelForMaskedLM.from_pretrained(path)
    # One load serves both: the probe reads the same encoder's hidden states (``base_model``).
    res = {"mlm": mlm_loss(mlm_model, tok, *masked), "probe": probe_f1(mlm_model.base_model, tok, tgt, cfg)}
    del mlm_model
    if finetune:
        t0 = time.perf_counter()
        res["ft"] = finetune_f1(Path(path), tgt, seed, cfg, out / "ft")
        res["ft_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------------------------
# the run


def run(cfg: Config) -> dict[str, Any]:
    """Run every target x budget x selector x seed; returns the results dict (rows: one per model)."""
    import torch
    from transformers import AutoTokenizer

    from hf_otselect.embed import embed

    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    raw = None
    amazon_target: list[str] = []
    if cfg.pool is None:
        raw = Q.load_raw(Path(cfg.data_dir), np.random.default_rng(cfg.seed))
        amazon_target = raw["target"]["amazon"]
    tok = AutoTokenizer.from_pretrained(Q._load_script("prefinetune").model_path(cfg.model))

    def emb(texts: list[str]) -> np.ndarray:
        return embed(texts, cache_dir=work / "embed_cache", max_length=cfg.embed_max_length, device=cfg.device, show_progress=False)

    rows: list[dict[str, Any]] = []
    pools: dict[str, Any] = {}
    timing = {"embed": 0.0, "select": 0.0, "warm": 0.0, "measure": 0.0, "finetune": 0.0}
    for spec in cfg.targets:
        tgt = prepare_target(spec, cfg, work, amazon_target)
        name = tgt["name"]
        if cfg.pool is not None:
            pool = {"text": list(cfg.pool["text"]), "source": np.asarray(cfg.pool["source"])}
            keep = [i for i, t in enumerate(pool["text"]) if t not in tgt["exclude"]]
            pool = {"text": [pool["text"][i] for i in keep], "source": pool["source"][keep]}
        else:
            pool = build_pool(cfg, raw, tgt["exclude"])
        check_pool(pool, cfg, name)
        pools[name] = {"n_units": len(pool["text"]), "sources": {str(s): int(n) for s, n in zip(*np.unique(pool["source"], return_counts=True))},
                       "n_train": tgt["n_train"], "n_test": tgt["n_test"], "labels": tgt["labels"],
                       "n_select": len(tgt["select"]), "n_mlm": len(tgt["mlm"])}
        t0 = time.perf_counter()
        pool_emb, tgt_emb = emb(pool["text"]), emb(tgt["select"])
        timing["embed"] += time.perf_counter() - t0
        masked = fixed_masks(tok, tgt["mlm"], cfg.block_size, cfg.mask_seed)
        cells = [("none", 0)] + [(s, k) for k in cfg.budgets for s in cfg.selectors]
        for sel, k in cells:
            for seed in cfg.seeds:
                ft = cfg.finetune and name in cfg.finetune_targets and k in (0, max(cfg.budgets))
                t0 = time.perf_counter()
                idx = None if sel == "none" else select(sel, pool, pool_emb, tgt, tgt_emb, k, seed, cfg, work / "selections")
                timing["select"] += time.perf_counter() - t0
                key = Q._key("measure", cfg.model, name, tgt["mlm"], tgt["select"], None if idx is None else idx.tolist(),
                             pool["text"] if idx is not None else None, seed, cfg.warm_steps, cfg.warm_lr, cfg.batch_size,
                             cfg.block_size, cfg.mask_seed, cfg.n_probe_train, cfg.n_probe_test, ft,
                             (cfg.n_finetune_train, cfg.finetune_epochs, cfg.finetune_lr, cfg.finetune_batch_size) if ft else None)
                cache = work / "measures" / f"{key}.json"
                if cache.exists():
                    row = json.loads(cache.read_text())
                else:
                    out = work / "models" / key
                    warm_res: dict[str, Any] = {}
                    model_dir = cfg.model
                    if idx is not None:
                        t0 = time.perf_counter()
                        warm_res = warm_up([pool["text"][i] for i in idx], seed, cfg, out)
                        timing["warm"] += time.perf_counter() - t0
                        model_dir = str(out)
                    t0 = time.perf_counter()
                    m = measure(model_dir, tgt, seed, cfg, masked=masked, finetune=ft, out=out)
                    row = {"target": name, "selector": sel, "k": k, "seed": seed, **m,
                           "warm_s": warm_res.get("seconds", 0.0), "measure_s": time.perf_counter() - t0,
                           "warm_train_loss": warm_res.get("train_loss"),
                           "initialised_head": warm_res.get("initialised_head"),
                           "in_domain_sources": None if idx is None else {str(s): int(n) for s, n in zip(*np.unique(pool["source"][idx], return_counts=True))}}
                    timing["finetune"] += row.get("ft_s", 0.0)
                    timing["measure"] += row["measure_s"] - row.get("ft_s", 0.0)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    cache.write_text(json.dumps(row))
                    shutil.rmtree(out, ignore_errors=True)  # ~90 MB per model: keep the measures only
                rows.append(row)
                logger.info("%s k=%d %s seed %d: mlm %.3f probe %.3f%s", name, k, sel, seed, row["mlm"], row["probe"],
                            f" ft {row['ft']:.3f}" if "ft" in row else "")
    return {"config": {k: v for k, v in asdict(cfg).items() if k != "pool"}, "pools": pools, "rows": rows,
            "timing": timing, "total_seconds": time.perf_counter() - t_start}


# ----------------------------------------------------------------------------------------------
# statistics and reporting

HIGHER_IS_BETTER = {"mlm": False, "probe": True, "ft": True}


def stats(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, int, str], tuple[float, float, int]]:
    """(target, k, selector) -> (mean, std with ddof 1 (nan for one seed), n)."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        if r.get(metric) is not None:
            groups.setdefault((r["target"], r["k"], r["selector"]), []).append(float(r[metric]))
    return {g: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), len(v)) for g, v in groups.items()}


def compare(a: tuple[float, float, int], b: tuple[float, float, int], higher_better: bool) -> tuple[float, float, str]:
    """``(a - b, 2 standard errors, mark)``: mark ``+`` when a beats b by more than 2 SE, ``-`` when it
    loses by more, ``=`` within; ``?`` without a std on both sides (one seed)."""
    d = a[0] - b[0]
    se2 = 2 * math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2]) if a[2] > 1 and b[2] > 1 else float("nan")
    if se2 != se2:
        return d, se2, "?"
    if abs(d) <= se2:
        return d, se2, "="
    return d, se2, "+" if (d > 0) == higher_better else "-"


def tables(res: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per metric, one row per (target, k, selector): mean, std, n, marks vs random and similarity."""
    out: dict[str, list[dict[str, Any]]] = {}
    for metric, hib in HIGHER_IS_BETTER.items():
        st = stats(res["rows"], metric)
        if not st:
            continue
        lines = []
        for (t, k, s), v in sorted(st.items(), key=lambda x: (x[0][0], x[0][1], ALL_ROWS.index(x[0][2]) if x[0][2] in ALL_ROWS else 99)):
            kk = max(res["config"]["budgets"]) if k == 0 else k
            marks = {}
            for ref, short in (("random", "r"), ("similarity", "s")):
                if s != ref and (t, kk, ref) in st:
                    marks[short] = compare(v, st[(t, kk, ref)], hib)
            lines.append({"target": t, "k": k, "selector": s, "mean": v[0], "std": v[1], "n": v[2], "marks": marks})
        out[metric] = lines
    return out


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (target, k, metric) comparison of got_d / got_d+pf / tsds against random, similarity, dsir."""
    out = []
    for metric, hib in HIGHER_IS_BETTER.items():
        st = stats(res["rows"], metric)
        for (t, k, s), v in sorted(st.items()):
            if s not in ("got_d", "got_d+pf", "tsds"):
                continue
            for ref in ("random", "similarity", "dsir"):
                if (t, k, ref) in st:
                    d, se2, mark = compare(v, st[(t, k, ref)], hib)
                    out.append({"metric": metric, "target": t, "k": k, "selector": s, "vs": ref, "diff": d, "two_se": se2, "mark": mark})
    return out


def _fmt(m: float, s: float, nd: int = 3) -> str:
    return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s == s else "")


def write_markdown(res: dict[str, Any], path: Path, *, label: str = "") -> None:
    cfg = res["config"]
    prov = res.get("provenance") or provenance()
    L = [f"# Downstream benchmark: warming all-MiniLM-L6-v2 up on each selection{label}", "",
         *header(prov), f"Device: {cfg['device']}, torch threads {cfg['threads']}  ",
         f"Wall time: {res['total_seconds'] / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in res["timing"].items()) + "); "
         f"without the fine-tuning: {(res['total_seconds'] - res['timing'].get('finetune', 0.0)) / 60:.1f} min", "",
         f"Warm-up: {cfg['warm_steps']} MLM steps for every selector and budget, batch {cfg['batch_size']} blocks of {cfg['block_size']} tokens, "
         f"lr {cfg['warm_lr']} (linear, 10% warm-up); seeds {list(cfg['seeds'])}. Selection target: {cfg['n_target']} train texts.  ",
         f"mlm: masked-LM loss on the held-out texts (lower is better); probe: macro-F1 of logistic regression on frozen mean-pooled "
         f"features ({cfg['n_probe_train']} train rows at most, {cfg['n_probe_test']} test rows at most); ft: macro-F1 after fine-tuning "
         f"on {cfg['n_finetune_train']} train rows ({cfg['finetune_epochs']} epochs, batch {cfg['finetune_batch_size']}, lr {cfg['finetune_lr']}), "
         "scored on the probe's test rows. ChemProt and SciERC keep their entity markers for probe and ft, and drop them for selection and MLM.  ",
         "Marks: r / s = difference to random / similarity at the same k; `+` better by more than 2 standard errors, `-` worse by more, "
         "`=` within 2 SE, `?` one seed only (no noise estimate). `none` (no warm-up, k 0) is compared with the largest budget; "
         "its mlm uses an untrained head, so only its probe is comparable.", ""]
    for name, p in res["pools"].items():
        L.append(f"- {name}: pool {p['n_units']} units ({', '.join(f'{s} {n}' for s, n in p['sources'].items())}); task train "
                 f"{p['n_train']} / test {p['n_test']} rows, {len(p['labels'])} labels; {p['n_mlm']} MLM texts.")
    L.append("")
    for metric, lines in tables(res).items():
        L += [f"## {metric}", "", "| target | k | selector | mean ± std (n) | vs random | vs similarity |", "|---|---|---|---|---|---|"]
        for r in lines:
            m = {x: f"{r['marks'][x][2]} ({r['marks'][x][0]:+.3f}" + (f", 2SE {r['marks'][x][1]:.3f})" if r["marks"][x][1] == r["marks"][x][1] else ")")
                 for x in r["marks"]}
            L.append(f"| {r['target']} | {r['k']} | {r['selector']} | {_fmt(r['mean'], r['std'])} ({r['n']}) | {m.get('r', '')} | {m.get('s', '')} |")
        L.append("")
    v = verdicts(res)
    L += ["## Where GOT-D and TSDS beat random, similarity and DSIR", "",
          "Every comparison: difference (selector minus reference; for mlm negative is better) and two standard errors.", ""]
    for mark, word in (("+", "Better by more than 2 SE"), ("-", "Worse by more than 2 SE"), ("=", "Within 2 SE (no claim)"),
                       ("?", "One seed, no noise estimate (no claim)")):
        hits = [x for x in v if x["mark"] == mark]
        L.append(f"- **{word}** ({len(hits)} of {len(v)}): " + ("; ".join(
            f"{x['selector']} vs {x['vs']}, {x['target']} k={x['k']} {x['metric']} {x['diff']:+.3f}"
            + (f" (2SE {x['two_se']:.3f})" if x["two_se"] == x["two_se"] else "") for x in hits) or "none"))
    L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = Config()
    for f in ("data_dir", "work_dir", "out_dir", "name", "model", "device"):
        p.add_argument("--" + f.replace("_", "-"), default=getattr(d, f))
    p.add_argument("--target", "--targets", dest="targets", nargs="+", default=list(d.targets),
                   help=f"built-in names {list(BUILTIN)} or folders with train.jsonl/test.jsonl (text, label)")
    p.add_argument("--selectors", nargs="+", default=list(d.selectors), choices=list(SELECTORS))
    p.add_argument("--budgets", type=int, nargs="+", default=list(d.budgets))
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    for f in ("n_per_source", "max_chars", "n_target", "n_mlm_eval", "n_probe_train", "n_probe_test", "n_finetune_train", "finetune_batch_size", "warm_steps",
              "batch_size", "block_size", "mask_seed", "prefilter_keep", "seed", "threads", "embed_max_length"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    for f in ("warm_lr", "finetune_epochs", "finetune_lr"):
        p.add_argument("--" + f.replace("_", "-"), type=float, default=getattr(d, f))
    p.add_argument("--finetune", action="store_true", help="also fine-tune at the largest budget on --finetune-targets")
    p.add_argument("--finetune-targets", nargs="+", default=list(d.finetune_targets))
    p.add_argument("--note", default="", help="said in the results page's title (e.g. 'reduced run')")
    p.add_argument("--smoke", action="store_true", help="CI size: one built-in target, k 20, one seed, few steps")
    a = vars(p.parse_args(argv))
    for f in ("targets", "selectors", "budgets", "seeds", "finetune_targets"):
        a[f] = tuple(a[f])
    cfg = Config(**a)
    if cfg.smoke:
        given = set(argv if argv is not None else sys.argv[1:])
        small = {"targets": ("sciie",), "budgets": (20,), "seeds": (0,), "n_per_source": 30, "n_target": 20,
                 "n_mlm_eval": 20, "n_probe_train": 60, "n_probe_test": 60, "warm_steps": 2, "block_size": 64}
        for f, v in small.items():
            if "--" + f.replace("_", "-") not in given and not (f == "targets" and "--target" in given):
                setattr(cfg, f, v)
    for f in ("budgets", "seeds"):
        if not getattr(cfg, f):
            raise ValueError(f"The '--{f}' parameter of downstream must be a non-empty list. Got [] instead.")
    if min(cfg.budgets) < 1:
        raise ValueError(f"The '--budgets' parameter of downstream must be ints >= 1. Got {list(cfg.budgets)} instead.")
    lowest = {"n_per_source": 1, "max_chars": 1, "n_target": 1, "n_mlm_eval": 1, "n_probe_train": 2, "n_probe_test": 1,
              "n_finetune_train": 2, "warm_steps": 1, "batch_size": 1, "finetune_batch_size": 1, "block_size": 2,
              "threads": 1, "embed_max_length": 2, "prefilter_keep": 1}
    for f, low in lowest.items():
        if getattr(cfg, f) < low:
            raise ValueError(f"The '--{f.replace('_', '-')}' parameter of downstream must be an int >= {low}. Got {getattr(cfg, f)} instead.")
    for f in ("warm_lr", "finetune_epochs", "finetune_lr"):
        v = getattr(cfg, f)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"The '--{f.replace('_', '-')}' parameter of downstream must be a finite float > 0. Got {v} instead.")
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    Q.setup_run(logger)
    cfg = parse_args(argv)
    # Taken before the run: the commit and load it started with.
    prov = provenance(argv=None if argv is None else [__file__, *argv], seeds={"warm-up, selection": list(cfg.seeds), "data": cfg.seed})
    import datasets

    datasets.disable_progress_bars()
    res = run(cfg)
    res["provenance"] = prov
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.name}.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    write_markdown(res, out / f"{cfg.name}.md", label=f" ({cfg.note})" if cfg.note else "")
    logger.info("wrote %s", out / f"{cfg.name}.md")
    return res


if __name__ == "__main__":
    main()
