#!/usr/bin/env python
"""Continued pre-training ("pre-fine-tuning") of a masked or causal LM on a selected split.

GOT-D (Kang et al., ICLR 2024, Sec. 4) and TSDS (Liu et al., NeurIPS 2024) measure a selection by
warming a pre-trained LM up on it with its own pre-training objective before the target task. This
script does that step the way the transformers example scripts ``run_mlm.py`` / ``run_clm.py`` do:

- **Objective from the model.** ``model_kind=auto`` trains an encoder (a model type with a
  masked-LM head class and no decoder flag: BERT, RoBERTa, the bundled all-MiniLM-L6-v2...) with
  masked-LM loss, 15% of the tokens masked with BERT's 80/10/10 scheme (``run_mlm``), and a decoder
  (GPT-2, Llama... or any config with ``is_decoder``) with next-token loss (``run_clm``).
  A checkpoint saved without its MLM head (``BertModel``, as sentence-transformers encoders are)
  gets one from ``AutoModelForMaskedLM``: the output projection is tied to the pre-trained input
  word embeddings, the bias starts at zero, and the transform (dense + LayerNorm) starts as
  transformers initialises it (normal(0, ``initializer_range``) weights, zero biases, LayerNorm
  ones/zeros). The missing keys are logged and returned in ``initialised_head``.
- **Data.** A ``save_to_disk`` folder (a Dataset, or a DatasetDict split such as ``selected``), a
  parquet / jsonl / json / csv / txt file (or glob), or a Hub dataset id. Texts are tokenised with
  ``Dataset.map``, concatenated and cut into blocks of ``block_size`` tokens (the remainder
  dropped, as in the examples).
- **Validation.** ``validation_data``, or else ``validation_split_percentage`` of the training
  *rows*, drawn with the seed before tokenising, so no validation block holds a training token.
  A selection is sorted best first, hence a seeded draw rather than the examples' first N%.
- ``do_train`` / ``do_eval`` are honoured; training resumes from the last ``checkpoint-*`` in
  ``output_dir`` (``get_last_checkpoint``) unless ``resume_from_checkpoint`` names another;
  metrics go through ``Trainer.log_metrics`` / ``save_metrics`` (``train_results.json``,
  ``eval_results.json``, ``eval_before_results.json`` for the loss before training,
  ``all_results.json``) and ``trainer_state.json``.
- The model is any local path or Hub id; ``trust_remote_code`` is off unless asked for.

Run with a YAML (or JSON) file holding all arguments, or with CLI flags::

    python scripts/prefinetune.py configs/prefinetune.yaml
    python scripts/prefinetune.py --model_name_or_path gpt2 --train_data out/selected \\
        --output_dir warm --do_train --do_eval --max_steps 1000 --block_size 128

From Python (the benchmark does this), load the file as a module and call :func:`prefinetune`::

    spec = importlib.util.spec_from_file_location("prefinetune", "scripts/prefinetune.py")

Do not put ``scripts/`` on ``sys.path``: ``scripts/evaluate.py`` would then shadow the
``evaluate`` library.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

# Run as `python scripts/prefinetune.py`, Python puts scripts/ first on sys.path, where our
# scripts/evaluate.py would shadow the `evaluate` library: take that entry out.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

logger = logging.getLogger("hf_otselect.prefinetune")

_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}


@dataclass
class ModelArguments:
    """Which model to warm up."""

    model_name_or_path: str = field(metadata={"help": "Local folder or Hub id of the pre-trained LM; 'bundled' or 'sentence-transformers/all-MiniLM-L6-v2' = the packaged copy."})
    model_kind: str = field(
        default="auto",
        metadata={"help": "'causal', 'masked', or 'auto' (from the config's architectures)."},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the model repo (off by default)."})


@dataclass
class DataArguments:
    """Which texts, and how to cut them."""

    train_data: str | None = field(default=None, metadata={"help": "save_to_disk folder, parquet/jsonl/csv/txt file(s), or Hub dataset id."})
    text_column: str = field(default="text", metadata={"help": "Column holding the texts."})
    split: str = field(default="train", metadata={"help": "Split to read from a DatasetDict (e.g. 'selected') or the Hub."})
    validation_data: str | None = field(default=None, metadata={"help": "Held-out texts for the eval loss (same formats)."})
    validation_split: str = field(default="train", metadata={"help": "Split to read from validation_data."})
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Without validation_data: the share of training rows (seeded draw) held out for eval."},
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per block (capped at the model's positions)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masking rate for masked LMs."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Evaluate on at most N blocks (the first)."})
    eval_before_training: bool = field(default=True, metadata={"help": "With do_train and do_eval: also evaluate the model before training."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Dataset.map num_proc."})


def load_texts(spec: str, *, split: str = "train", text_column: str = "text", revision: str | None = None) -> Any:
    """Load a text dataset from a ``save_to_disk`` folder, data file(s) or a Hub id.

    Parameters
    ----------
    spec : str
        A folder written by ``save_to_disk`` (Dataset or DatasetDict), a folder holding one such
        folder per split (a job's ``scored/`` and ``selected/``), a file or glob ending in
        .parquet/.jsonl/.json/.csv/.txt, or a Hub dataset id.
    split : str, default "train"
        Split taken from a DatasetDict, a job folder or the Hub.
    text_column : str, default "text"
        Must exist; the error lists the columns that do.

    Returns
    -------
    datasets.Dataset
    """
    import datasets

    path = Path(spec)
    suffix = "".join(path.suffixes[-1:]).lower()
    if path.is_dir() and not (path / "dataset_dict.json").exists() and (path / split / "dataset_info.json").exists():
        path = path / split  # a job folder with one save_to_disk folder per split (scored/, selected/)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"The 'split' parameter of load_texts must be one of {sorted(ds)}. Got {split!r} instead.")
            ds = ds[split]
    elif suffix in _FILE_BUILDERS:
        ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=spec, split="train")
    else:
        ds = datasets.load_dataset(spec, split=split, revision=revision)
    if text_column not in ds.column_names:
        raise ValueError(f"Column '{text_column}' not in the dataset {spec}. Current columns: {ds.column_names}")
    return ds


def model_path(name: str) -> str:
    """``name``, or the bundled all-MiniLM-L6-v2 folder (``hf_otselect.DEFAULT_MODEL``) for ``'bundled'``
    or ``'sentence-transformers/all-MiniLM-L6-v2'``, so a config file runs offline on any install
    without naming a site-packages path."""
    from hf_otselect.bundled import resolve_model_name

    return resolve_model_name(name)


def resolve_kind(config: Any, kind: str) -> str:
    """'causal' or 'masked' for a model config.

    ``kind='auto'``: an architecture named ``*CausalLM`` / ``*LMHeadModel`` or a config with
    ``is_decoder`` is causal; ``*MaskedLM`` / ``*ForPreTraining`` is masked; otherwise the model
    type decides: a type with a masked-LM head class (``MODEL_FOR_MASKED_LM_MAPPING_NAMES``: BERT,
    RoBERTa, DistilBERT...) was pre-trained as an encoder and is masked, any other is causal.
    BERT also has a causal head class (``BertLMHeadModel``), but it needs ``is_decoder`` and is not
    how BERT checkpoints were trained, so a plain ``BertModel`` checkpoint is masked.
    """
    if kind not in ("auto", "causal", "masked"):
        raise ValueError(f"The 'model_kind' parameter of prefinetune must be one of ['auto', 'causal', 'masked']. Got {kind!r} instead.")
    if kind != "auto":
        return kind
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs or getattr(config, "is_decoder", False):
        return "causal"
    if "MaskedLM" in archs or "ForPreTraining" in archs:
        return "masked"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "masked" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal"


def load_model_and_tokenizer(model_args: ModelArguments) -> tuple[Any, Any, str, list[str]]:
    """The LM head model, its tokenizer, its kind ('causal' or 'masked') and the head weights
    the checkpoint lacked (initialised by transformers, see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    common = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
    name = model_path(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(name, **common)
    kind = resolve_kind(config, model_args.model_kind)
    tok = AutoTokenizer.from_pretrained(model_path(model_args.tokenizer_name_or_path or name), **common)
    if kind == "masked" and tok.mask_token is None:
        raise ValueError(f"The model {model_args.model_name_or_path} is trained as a masked LM but its tokenizer has no mask token.")
    if tok.pad_token is None:  # GPT-2-like tokenizers have no pad token; batches need one
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    model, info = auto.from_pretrained(name, config=config, output_loading_info=True, **common)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        logger.warning(
            "%s has no weights for %s; transformers initialised them (output projection tied to the input embeddings, "
            "biases zero, dense layers normal(0, %s), LayerNorm ones/zeros).",
            model_args.model_name_or_path, missing, getattr(config, "initializer_range", "?"),
        )
    return model, tok, kind, missing


def split_validation(train: Any, percentage: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``percentage`` % of the rows (at least one), drawn with ``seed``.

    Returns ``(train_rows, validation_rows)``; both are row subsets of ``train`` with no row in
    common, so the validation blocks built from them share no text with the training blocks.
    """
    if not 0.0 < percentage < 100.0:
        raise ValueError(f"The 'validation_split_percentage' parameter of prefinetune must be a float in (0, 100). Got {percentage} instead.")
    n_val = max(1, round(len(train) * percentage / 100.0))
    if n_val >= len(train):
        raise ValueError(f"validation_split_percentage={percentage} of {len(train)} rows leaves no training row; give validation_data.")
    parts = train.train_test_split(test_size=n_val, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def usable_block_size(block_size: int, tokenizer: Any, model: Any, name: str = "block_size") -> int:
    """``block_size`` capped by the tokenizer's ``model_max_length`` and the model's positions
    (``max_position_embeddings`` or ``n_positions``); a warning names ``name`` when it clips."""
    cap = min(
        int(getattr(tokenizer, "model_max_length", block_size) or block_size),
        int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or block_size),
    )
    if block_size > cap:
        logger.warning("%s=%d exceeds the model's maximum length %d; using %d.", name, block_size, cap, cap)
    return min(block_size, cap)


def tokenize_and_group(ds: Any, tokenizer: Any, *, text_column: str, block_size: int, kind: str, num_proc: int | None = None) -> Any:
    """Tokenise a text column with ``Dataset.map`` and regroup the tokens into equal blocks.

    Returns
    -------
    datasets.Dataset
        Columns ``input_ids``, ``attention_mask`` (and ``special_tokens_mask`` for masked LMs,
        ``labels`` = ``input_ids`` for causal LMs), every row exactly ``block_size`` long.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[text_column], return_special_tokens_mask=(kind == "masked"), verbose=False)

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenising")

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = {k: list(chain.from_iterable(batch[k])) for k in batch}
        total = (len(joined["input_ids"]) // block_size) * block_size
        out = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
        if kind == "causal":
            out["labels"] = [list(x) for x in out["input_ids"]]
        return out

    grouped = tokenized.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"grouping into blocks of {block_size}")
    if len(grouped) == 0:
        raise ValueError(f"The texts hold fewer than block_size={block_size} tokens in all; lower block_size or add texts.")
    return grouped


def make_collator(tokenizer: Any, kind: str, mlm_probability: float, seed: int) -> Any:
    """Causal: blocks as they are; masked: seeded BERT-style masking."""
    from transformers import DataCollatorForLanguageModeling, default_data_collator

    if kind == "causal":
        return default_data_collator
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)


def prefinetune(model_args: ModelArguments, data_args: DataArguments, training_args: Any) -> dict[str, Any]:
    """Warm a pre-trained LM up on a split with its own objective (``run_mlm`` / ``run_clm`` flow).

    Parameters
    ----------
    model_args : ModelArguments
    data_args : DataArguments
    training_args : transformers.TrainingArguments
        ``do_train`` / ``do_eval`` say what runs (at least one); ``output_dir`` receives the model,
        the tokenizer, the checkpoints and the ``*_results.json`` files of ``save_metrics``.

    Returns
    -------
    dict
        ``kind``, ``initialised_head``, ``n_train_rows``, ``n_validation_rows``, ``n_blocks``,
        ``n_eval_blocks``, ``block_size``, ``resumed_from`` (checkpoint path or None); with
        ``do_train``: ``global_steps``, ``train_loss``; with ``do_eval``: ``eval_loss_after``
        (and ``eval_loss_before`` when training too), their perplexities (inf on overflow).
    """
    import transformers
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("Nothing to do: pass --do_train and/or --do_eval (as run_mlm / run_clm).")
    if training_args.do_train and not data_args.train_data:
        raise ValueError("The 'train_data' parameter of prefinetune is needed with do_train.")
    if not (data_args.train_data or data_args.validation_data):
        raise ValueError("The 'validation_data' (or 'train_data' to hold a share out of) parameter of prefinetune is needed with do_eval.")
    if data_args.block_size < 2:
        raise ValueError(f"The 'block_size' parameter of prefinetune must be an int in [2, inf]. Got {data_args.block_size} instead.")
    if not 0.0 < data_args.mlm_probability < 1.0:
        raise ValueError(f"The 'mlm_probability' parameter of prefinetune must be a float in (0, 1). Got {data_args.mlm_probability} instead.")
    output_dir = Path(training_args.output_dir)
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and training_args.do_train and output_dir.is_dir():
        checkpoint = get_last_checkpoint(str(output_dir))
        if checkpoint is not None:
            logger.info("Checkpoint found, resuming training at %s (use another output_dir to start afresh).", checkpoint)

    # A head missing from the checkpoint is initialised from torch's global generator when the
    # model loads (before Trainer seeds anything): seed it so a run is repeatable.
    transformers.set_seed(training_args.seed)
    model, tok, kind, missing = load_model_and_tokenizer(model_args)
    block = usable_block_size(data_args.block_size, tok, model)
    train = val = None
    if data_args.train_data:
        train = load_texts(data_args.train_data, split=data_args.split, text_column=data_args.text_column)
        if data_args.max_train_samples is not None:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
    if training_args.do_eval:
        if data_args.validation_data:
            val = load_texts(data_args.validation_data, split=data_args.validation_split, text_column=data_args.text_column)
        else:
            train, val = split_validation(train, data_args.validation_split_percentage, training_args.seed)
    group = {"tokenizer": tok, "text_column": data_args.text_column, "block_size": block, "kind": kind,
             "num_proc": data_args.preprocessing_num_workers}
    train_blocks = tokenize_and_group(train, **group) if training_args.do_train else None
    eval_blocks = tokenize_and_group(val, **group) if val is not None else None
    if eval_blocks is not None and data_args.max_eval_blocks is not None:
        eval_blocks = eval_blocks.select(range(min(data_args.max_eval_blocks, len(eval_blocks))))
    logger.info("pre-fine-tuning a %s LM: %s training rows -> %s blocks of %d tokens; %s validation rows -> %s blocks",
                kind, len(train) if train is not None else 0, len(train_blocks) if train_blocks is not None else 0, block,
                len(val) if val is not None else 0, len(eval_blocks) if eval_blocks is not None else 0)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=make_collator(tok, kind, data_args.mlm_probability, training_args.seed),
        processing_class=tok,
    )
    results: dict[str, Any] = {
        "kind": kind, "model": model_args.model_name_or_path, "initialised_head": missing,
        "n_train_rows": len(train) if train is not None else 0, "n_validation_rows": len(val) if val is not None else 0,
        "n_blocks": len(train_blocks) if train_blocks is not None else 0,
        "n_eval_blocks": len(eval_blocks) if eval_blocks is not None else 0, "block_size": block,
        "resumed_from": checkpoint,
    }

    def evaluate(prefix: str) -> float:
        # A fresh collator with the same seed for every evaluation: a masked LM is scored on the
        # same masks before and after training, and training's own mask stream is left alone.
        train_collator = trainer.data_collator
        trainer.data_collator = make_collator(tok, kind, data_args.mlm_probability, training_args.seed)
        try:
            metrics = trainer.evaluate(metric_key_prefix=prefix)
        finally:
            trainer.data_collator = train_collator
        loss = float(metrics[f"{prefix}_loss"])
        metrics[f"{prefix}_samples"] = len(eval_blocks)
        metrics[f"{prefix}_perplexity"] = _perplexity(loss)
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        return loss

    if training_args.do_eval and training_args.do_train and data_args.eval_before_training and checkpoint is None:
        results["eval_loss_before"] = evaluate("eval_before")
        results["eval_perplexity_before"] = _perplexity(results["eval_loss_before"])
    if training_args.do_train:
        out = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = dict(out.metrics, train_samples=len(train_blocks))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(global_steps=int(out.global_step), train_loss=float(out.training_loss))
    if training_args.do_eval:
        results["eval_loss_after"] = evaluate("eval")
        results["eval_perplexity_after"] = _perplexity(results["eval_loss_after"])
    return results


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


#: Arguments naming files or folders: in a YAML/JSON file a relative one is read from the file's
#: folder, as in job YAMLs (outputs always; inputs when they exist there, else a Hub id or name).
_OUTPUT_ARGS = ("output_dir", "logging_dir")
_INPUT_ARGS = ("model_name_or_path", "tokenizer_name_or_path", "train_data", "validation_data", "perplexity_data",
               "task_train_data", "task_eval_data", "resume_from_checkpoint")


def parse_dataclasses(types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Instances of ``types`` from one YAML/JSON file (unknown keys refused) or from CLI flags.

    A relative path in the file is read from the file's folder, the rule of the job YAMLs
    (:func:`hf_otselect.config.path_from_file`), so a file runs the same from any working
    directory; paths given as CLI flags are read from the working directory.
    """
    from transformers import HfArgumentParser

    from hf_otselect.config import load_yaml, path_from_file

    parser = HfArgumentParser(types)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(os.path.abspath(argv[0]))
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text, str(path))
        if not isinstance(data, dict):
            raise ValueError(f"{str(path)!r} must hold a mapping of argument names to values. Got {type(data).__name__} instead.")
        import dataclasses

        from hf_otselect._suggest import did_you_mean

        known = [f.name for cls in types for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known), key=str)
        if unknown:
            raise ValueError(f"Unknown key {unknown[0]!r} in {str(path)!r}.{did_you_mean(unknown[0], known)} Keys are the "
                             f"fields of {', '.join(cls.__name__ for cls in types)}.")
        for key in _OUTPUT_ARGS + _INPUT_ARGS:
            if key in data:
                data[key] = path_from_file(data[key], path.parent, must_exist=key in _INPUT_ARGS)
        return parser.parse_dict(data, allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=argv)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, Any]:
    """``(ModelArguments, DataArguments, TrainingArguments)`` from a YAML/JSON file or CLI flags."""
    from transformers import TrainingArguments

    return parse_dataclasses((ModelArguments, DataArguments, TrainingArguments), argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the results dict (metrics are also saved in ``output_dir``)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_args(argv)
    return prefinetune(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
