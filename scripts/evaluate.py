#!/usr/bin/env python
"""Evaluate a (warmed-up) LM on the target: held-out perplexity and downstream fine-tuning.

Two measurements, each optional, as in GOT-D (Kang et al., ICLR 2024, Sec. 4) and TSDS (Liu et al.,
NeurIPS 2024, Sec. 5):

1. **Target perplexity** on held-out target text (``perplexity_data``).

   - Causal LM: each text is tokenised and cut into windows of ``block_size`` tokens; every token
     after the first of a window is predicted from the ones before it. Perplexity is
     ``exp(sum of token NLLs / number of predicted tokens)`` over the whole set (the token-weighted
     corpus perplexity, computed by our ``token_perplexity`` metric module).
   - Masked LM: pseudo-perplexity (Salazar et al., ACL 2020, "Masked Language Model Scoring",
     Eq. 1-2): each token of a window (special tokens excepted) is masked in turn and scored by
     ``log P(w_t | W without t)``; ``PPPL = exp(-sum of those log-probs / number of tokens)``. It
     is deterministic (no random masks) and costs one forward pass per token.

2. **Downstream task**: fine-tune the model with a fresh classification head on labelled target
   data (``task_train_data``) and report accuracy and macro-F1 on ``task_eval_data``, computed
   with ``evaluate`` modules (the Hub ones when online, our bundled scikit-learn ones offline:
   :func:`hf_otselect.metrics.load`).

Results are returned by :func:`evaluate_model` and written the way ``Trainer.save_metrics``
writes them, like ``prefinetune.py``'s: ``eval_results.json`` and ``all_results.json`` hold the
flat numbers (``eval_perplexity``, ``eval_mean_nll``, ``eval_n_tokens``, ``eval_accuracy``,
``eval_macro_f1``...), and ``evaluation.json`` the full nested record (method, kind, block size,
labels...). Each file is rewritten (atomically) after each measurement, so a perplexity already
computed survives a failure of the downstream fine-tuning. ``block_size`` and ``max_length`` are clipped to what the
model can take (its position embeddings and the tokenizer's ``model_max_length``), with a warning;
the results record the values used.

Run with a YAML/JSON file or CLI flags (``HfArgumentParser``)::

    python scripts/evaluate.py --model_name_or_path warm --perplexity_data target_eval.jsonl \\
        --task_train_data target.jsonl --task_eval_data target_eval.jsonl --output_dir eval \\
        --num_train_epochs 3

From Python, load this file with ``importlib.util.spec_from_file_location`` (never put
``scripts/`` on ``sys.path``: this file's name would shadow the ``evaluate`` library).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as `python scripts/evaluate.py`, Python puts scripts/ first on sys.path, where this very file
# would shadow the `evaluate` library: take that entry out before anything imports it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def _load_prefinetune() -> Any:
    """scripts/prefinetune.py as a module (its data and model loading helpers are shared)."""
    name = "hf_otselect_script_prefinetune"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / "prefinetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_pre = _load_prefinetune()
logger = logging.getLogger("hf_otselect.evaluate")


@dataclass
class EvalArguments:
    """What to evaluate and on which data."""

    model_name_or_path: str = field(metadata={"help": "Local folder or Hub id of the (warmed-up) LM."})
    model_kind: str = field(default="auto", metadata={"help": "'causal', 'masked' or 'auto'."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the model repo (off by default)."})
    perplexity_data: str | None = field(default=None, metadata={"help": "Held-out target texts for perplexity."})
    text_column: str = field(default="text", metadata={"help": "Column holding the texts."})
    block_size: int = field(default=128, metadata={"help": "Tokens per perplexity window."})
    batch_size: int = field(default=16, metadata={"help": "Windows (or masked copies) per forward pass."})
    max_perplexity_texts: int | None = field(default=None, metadata={"help": "Use only the first N texts."})
    task_train_data: str | None = field(default=None, metadata={"help": "Labelled target data to fine-tune on."})
    task_eval_data: str | None = field(default=None, metadata={"help": "Labelled target data to score."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_length: int = field(default=128, metadata={"help": "Truncation length for classification (clipped to the model's positions)."})


def _windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Right-padded (batch, width) id tensor and its attention mask."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids, mask


def causal_perplexity(model: Any, tokenizer: Any, texts: list[str], *, block_size: int = 128, batch_size: int = 16) -> dict[str, Any]:
    """Token-weighted perplexity of a causal LM on ``texts``.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : its tokenizer
    texts : list of str
    block_size : int
        Window length; a text longer than this is cut into consecutive windows, each scored from
        its own start.
    batch_size : int

    Returns
    -------
    dict
        ``perplexity`` = exp(mean NLL per predicted token), ``mean_nll``, ``n_tokens``, and
        ``per_text_nll`` / ``per_text_tokens`` (lists, one entry per text).
    """
    import torch

    from hf_otselect import metrics

    windows, owner = [], []
    for t, text in enumerate(texts):
        for w in _windows(tokenizer(text, verbose=False)["input_ids"], block_size):
            if len(w) >= 2:
                windows.append(w)
                owner.append(t)
    nll = [0.0] * len(texts)
    n_tok = [0] * len(texts)
    model.eval()
    with torch.inference_mode():
        for lo in range(0, len(windows), batch_size):
            batch = windows[lo : lo + batch_size]
            ids, mask = _pad(batch, tokenizer.pad_token_id)
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
            # Token t+1 is predicted from tokens <= t; padding positions are not scored.
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (loss * mask[:, 1:]).sum(dim=1)
            for i, w in enumerate(batch):
                nll[owner[lo + i]] += float(loss[i])
                n_tok[owner[lo + i]] += len(w) - 1
    out = metrics.load("token_perplexity", keep_in_memory=True).compute(nll=nll, n_tokens=n_tok)
    return dict(out, per_text_nll=nll, per_text_tokens=n_tok)


def pseudo_perplexity(model: Any, tokenizer: Any, texts: list[str], *, block_size: int = 128, batch_size: int = 16) -> dict[str, Any]:
    """Pseudo-perplexity of a masked LM (Salazar et al. 2020, Eq. 1-2).

    Each text is cut into windows of ``block_size - n_special`` word pieces, wrapped in the
    tokenizer's special tokens; every non-special position is masked in turn and scored.

    Returns
    -------
    dict
        ``perplexity`` = exp(-sum log P(w_t | rest) / N), ``mean_nll``, ``n_tokens``, and per-text
        lists as for :func:`causal_perplexity`.
    """
    import torch

    from hf_otselect import metrics

    n_special = len(tokenizer("", verbose=False)["input_ids"])
    size = block_size - n_special
    if size < 1:
        raise ValueError(f"The 'block_size' parameter of pseudo_perplexity must be an int in [{n_special + 1}, inf]. Got {block_size} instead.")
    # One row per (window, masked position): (token ids with that position masked, position, true id, text).
    # The single-sequence template (e.g. [CLS] ... [SEP]), read off a probe: the special tokens
    # before and after the content. (transformers 5 tokenizers no longer expose
    # build_inputs_with_special_tokens.)
    probe = tokenizer("a", return_special_tokens_mask=True, verbose=False)
    content = [i for i, s in enumerate(probe["special_tokens_mask"]) if not s]
    prefix = probe["input_ids"][: content[0]]
    suffix = probe["input_ids"][content[-1] + 1 :]
    rows: list[tuple[list[int], int, int, int]] = []
    for t, text in enumerate(texts):
        for piece in _windows(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], size):
            full = prefix + piece + suffix
            for pos in range(len(prefix), len(prefix) + len(piece)):
                masked = list(full)
                masked[pos] = tokenizer.mask_token_id
                rows.append((masked, pos, full[pos], t))
    nll = [0.0] * len(texts)
    n_tok = [0] * len(texts)
    model.eval()
    with torch.inference_mode():
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo : lo + batch_size]
            ids, mask = _pad([r[0] for r in batch], tokenizer.pad_token_id)
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
            pos = torch.tensor([r[1] for r in batch])
            true = torch.tensor([r[2] for r in batch])
            logp = torch.log_softmax(logits[torch.arange(len(batch)), pos], dim=-1)[torch.arange(len(batch)), true]
            for i, r in enumerate(batch):
                nll[r[3]] -= float(logp[i])
                n_tok[r[3]] += 1
    out = metrics.load("token_perplexity", keep_in_memory=True).compute(nll=nll, n_tokens=n_tok)
    return dict(out, per_text_nll=nll, per_text_tokens=n_tok)


def finetune_classifier(eval_args: EvalArguments, training_args: Any) -> dict[str, Any]:
    """Fine-tune the model with a new classification head; accuracy and macro-F1 on the eval set.

    Labels (any type) are mapped to ids in sorted order of the union of train and eval labels.
    The head's initial weights follow ``training_args.seed`` (``transformers.set_seed``).

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1``, ``n_train``, ``n_eval``, ``labels``.
    """
    import numpy as np
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from hf_otselect import metrics

    load = _pre.load_texts
    train = load(eval_args.task_train_data, text_column=eval_args.text_column)
    test = load(eval_args.task_eval_data, text_column=eval_args.text_column)
    for name, ds in (("task_train_data", train), ("task_eval_data", test)):
        if eval_args.label_column not in ds.column_names:
            raise ValueError(f"Column '{eval_args.label_column}' not in {name}. Current columns: {ds.column_names}")
    labels = sorted(set(train[eval_args.label_column]) | set(test[eval_args.label_column]), key=str)
    label2id = {lab: i for i, lab in enumerate(labels)}
    common = {"revision": eval_args.revision, "trust_remote_code": eval_args.trust_remote_code}
    name = _pre.model_path(eval_args.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(_pre.model_path(eval_args.tokenizer_name_or_path or name), **common)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    transformers.set_seed(training_args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        name,
        num_labels=len(labels),
        id2label={i: str(lab) for i, lab in enumerate(labels)},
        label2id={str(lab): i for i, lab in enumerate(labels)},
        **common,
    )
    model.config.pad_token_id = tok.pad_token_id
    # Longer inputs than the position embeddings would index past them (an IndexError mid-training).
    max_length = _pre.usable_block_size(eval_args.max_length, tok, model, name="max_length")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tok(batch[eval_args.text_column], truncation=True, max_length=max_length, verbose=False)
        enc["labels"] = [label2id[lab] for lab in batch[eval_args.label_column]]
        return enc

    train_enc = train.map(encode, batched=True, remove_columns=train.column_names, desc="encoding task train")
    test_enc = test.map(encode, batched=True, remove_columns=test.column_names, desc="encoding task eval")
    accuracy, f1 = metrics.load("accuracy", keep_in_memory=True), metrics.load("f1", keep_in_memory=True)

    def compute_metrics(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        guess = np.argmax(logits, axis=-1)
        return {
            "accuracy": accuracy.compute(predictions=guess, references=pred.label_ids)["accuracy"],
            "macro_f1": f1.compute(predictions=guess, references=pred.label_ids, average="macro")["f1"],
        }

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_enc,
        eval_dataset=test_enc,
        data_collator=DataCollatorWithPadding(tok),
        processing_class=tok,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    scores = trainer.evaluate()
    return {
        "accuracy": float(scores["eval_accuracy"]),
        "macro_f1": float(scores["eval_macro_f1"]),
        "n_train": len(train),
        "n_eval": len(test),
        "labels": [str(lab) for lab in labels],
        "max_length": max_length,
    }


def evaluate_model(eval_args: EvalArguments, training_args: Any) -> dict[str, Any]:
    """Run the measurements asked for and write them to ``output_dir`` (see the module docstring).

    Parameters
    ----------
    eval_args : EvalArguments
    training_args : transformers.TrainingArguments
        Used for the downstream fine-tuning (epochs, learning rate, seed, ...).

    Returns
    -------
    dict
        ``{"model": ..., "perplexity": {...}, "task": {...}}`` with the parts that were asked for.
        The file is written after each part, so a failure in the task keeps the perplexity.
    """
    if not eval_args.perplexity_data and not (eval_args.task_train_data and eval_args.task_eval_data):
        raise ValueError("Nothing to evaluate: give perplexity_data, or task_train_data and task_eval_data.")
    if bool(eval_args.task_train_data) != bool(eval_args.task_eval_data):
        raise ValueError("The task needs both task_train_data and task_eval_data.")
    for name in ("block_size", "batch_size", "max_length"):
        if getattr(eval_args, name) < 2:
            raise ValueError(f"The '{name}' parameter of evaluate_model must be an int in [2, inf]. Got {getattr(eval_args, name)} instead.")
    results: dict[str, Any] = {"model": eval_args.model_name_or_path}
    if eval_args.perplexity_data:
        model_args = _pre.ModelArguments(
            model_name_or_path=eval_args.model_name_or_path,
            model_kind=eval_args.model_kind,
            tokenizer_name_or_path=eval_args.tokenizer_name_or_path,
            revision=eval_args.revision,
            trust_remote_code=eval_args.trust_remote_code,
        )
        model, tok, kind, _ = _pre.load_model_and_tokenizer(model_args)
        ds = _pre.load_texts(eval_args.perplexity_data, text_column=eval_args.text_column)
        texts = ds[eval_args.text_column][: eval_args.max_perplexity_texts]
        block = _pre.usable_block_size(eval_args.block_size, tok, model)
        fn = causal_perplexity if kind == "causal" else pseudo_perplexity
        ppl = fn(model, tok, texts, block_size=block, batch_size=eval_args.batch_size)
        results["perplexity"] = {
            "kind": kind,
            "method": "token_perplexity" if kind == "causal" else "pseudo_perplexity",
            "perplexity": ppl["perplexity"],
            "mean_nll": ppl["mean_nll"],
            "n_tokens": ppl["n_tokens"],
            "n_texts": len(texts),
            "block_size": block,
        }
        logger.info("target perplexity (%s): %.3f over %d tokens", results["perplexity"]["method"], ppl["perplexity"], ppl["n_tokens"])
        _save(results, training_args.output_dir)
    if eval_args.task_train_data:
        results["task"] = finetune_classifier(eval_args, training_args)
        logger.info("downstream: accuracy %.4f, macro-F1 %.4f", results["task"]["accuracy"], results["task"]["macro_f1"])
    _save(results, training_args.output_dir)
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``results`` as ``Trainer.save_metrics`` names eval metrics: ``eval_<name>``."""
    parts = {"perplexity": ("perplexity", "mean_nll", "n_tokens", "n_texts"), "task": ("accuracy", "macro_f1", "n_train", "n_eval")}
    return {f"eval_{name}": results[part][name] for part, names in parts.items() if part in results for name in names}


def _save(results: dict[str, Any], output_dir: str | os.PathLike) -> None:
    """Write ``evaluation.json`` (nested) and the ``save_metrics`` files, each never half written.

    ``eval_results.json`` and ``all_results.json`` have ``Trainer.save_metrics``'s layout (a flat
    object, keys sorted, indent 4), so they read like the files ``prefinetune.py`` writes.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = flat_metrics(results)
    for name, content in (("evaluation.json", json.dumps(results, indent=2)),
                          ("eval_results.json", json.dumps(flat, indent=4, sort_keys=True)),
                          ("all_results.json", json.dumps(flat, indent=4, sort_keys=True))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, out / name)


def parse_args(argv: list[str] | None = None) -> tuple[EvalArguments, Any]:
    """Dataclasses from one YAML/JSON file, or from CLI flags (``HfArgumentParser``)."""
    from transformers import TrainingArguments

    return _pre.parse_dataclasses((EvalArguments, TrainingArguments), argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the results dict (also written to ``output_dir``)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return evaluate_model(*parse_args(argv))


if __name__ == "__main__":
    main()
