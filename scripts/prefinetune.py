#!/usr/bin/env python
"""Continued pre-training ("pre-fine-tuning") of a causal or masked LM on a selected split.

GOT-D (Kang et al., ICLR 2024, Sec. 4) and TSDS (Liu et al., NeurIPS 2024) measure a selection by
warming a pre-trained LM up on it with its own pre-training objective before the target task; this
script does that step with ``transformers.Trainer``:

- the data is a ``save_to_disk`` folder (a Dataset, or a DatasetDict whose ``train`` split is
  used), a parquet / jsonl / json / csv / txt file (or glob), or a Hub dataset id;
- texts are tokenised with ``Dataset.map``, concatenated and cut into blocks of ``block_size``
  tokens (the remainder is dropped, as in the transformers language-modelling examples);
- causal LMs learn next-token prediction on the blocks; masked LMs learn to recover 15% masked
  tokens (BERT's 80/10/10 scheme, via ``DataCollatorForLanguageModeling``, seeded);
- the model is any local path or Hub id; ``trust_remote_code`` is off unless asked for.

Run with a YAML (or JSON) file holding all arguments, or with CLI flags::

    python scripts/prefinetune.py configs/prefinetune.yaml
    python scripts/prefinetune.py --model_name_or_path gpt2 --train_data out/selected \\
        --output_dir warm --max_steps 1000 --block_size 128

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

    model_name_or_path: str = field(metadata={"help": "Local folder or Hub id of the pre-trained LM."})
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

    train_data: str = field(metadata={"help": "save_to_disk folder, parquet/jsonl/csv/txt file(s), or Hub dataset id."})
    text_column: str = field(default="text", metadata={"help": "Column holding the texts."})
    split: str = field(default="train", metadata={"help": "Split to read from a DatasetDict or the Hub."})
    validation_data: str | None = field(default=None, metadata={"help": "Optional held-out texts for eval loss."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masking rate for masked LMs."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Evaluate on at most N blocks (the first)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Dataset.map num_proc."})


def load_texts(spec: str, *, split: str = "train", text_column: str = "text", revision: str | None = None) -> Any:
    """Load a text dataset from a ``save_to_disk`` folder, data file(s) or a Hub id.

    Parameters
    ----------
    spec : str
        A folder written by ``save_to_disk`` (Dataset or DatasetDict), a file or glob ending in
        .parquet/.jsonl/.json/.csv/.txt, or a Hub dataset id.
    split : str, default "train"
        Split taken from a DatasetDict or the Hub.
    text_column : str, default "text"
        Must exist; the error lists the columns that do.

    Returns
    -------
    datasets.Dataset
    """
    import datasets

    path = Path(spec)
    suffix = "".join(path.suffixes[-1:]).lower()
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


def resolve_kind(config: Any, kind: str) -> str:
    """'causal' or 'masked' for a model config (``kind='auto'`` reads ``config.architectures``)."""
    if kind not in ("auto", "causal", "masked"):
        raise ValueError(f"The 'model_kind' parameter must be one of ['auto', 'causal', 'masked']. Got {kind!r} instead.")
    if kind != "auto":
        return kind
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs or getattr(config, "is_decoder", False):
        return "causal"
    if "MaskedLM" in archs or "ForPreTraining" in archs:
        return "masked"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "masked"
    return "causal"


def load_model_and_tokenizer(model_args: ModelArguments) -> tuple[Any, Any, str]:
    """The LM head model, its tokenizer and its kind ('causal' or 'masked')."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    common = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **common)
    kind = resolve_kind(config, model_args.model_kind)
    tok = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_args.model_name_or_path, **common)
    if tok.pad_token is None:  # GPT-2-like tokenizers have no pad token; batches need one
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    model = auto.from_pretrained(model_args.model_name_or_path, config=config, **common)
    if kind == "masked" and tok.mask_token is None:
        raise ValueError(f"The model {model_args.model_name_or_path} is masked but its tokenizer has no mask token.")
    return model, tok, kind


def usable_block_size(block_size: int, tokenizer: Any, model: Any) -> int:
    """``block_size`` capped by the tokenizer's and the model's maximum lengths."""
    cap = min(
        int(getattr(tokenizer, "model_max_length", block_size) or block_size),
        int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or block_size),
    )
    if block_size > cap:
        logger.warning("block_size=%d exceeds the model's maximum length %d; using %d.", block_size, cap, cap)
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
    """Warm a pre-trained LM up on a split with its own objective and save it.

    Parameters
    ----------
    model_args : ModelArguments
    data_args : DataArguments
    training_args : transformers.TrainingArguments
        ``output_dir`` receives the model, the tokenizer and ``prefinetune_results.json``.

    Returns
    -------
    dict
        ``kind``, ``n_train_rows``, ``n_blocks``, ``block_size``, ``train_loss`` (mean over
        training), ``eval_loss_before`` / ``eval_loss_after`` (on ``validation_data``, or on the
        training blocks when none is given), their perplexities, and ``output_dir``.
    """
    import transformers
    from transformers import Trainer

    if data_args.block_size < 2:
        raise ValueError(f"The 'block_size' parameter of prefinetune must be an int in [2, inf]. Got {data_args.block_size} instead.")
    if not 0.0 < data_args.mlm_probability < 1.0:
        raise ValueError(f"The 'mlm_probability' parameter of prefinetune must be a float in (0, 1). Got {data_args.mlm_probability} instead.")
    model, tok, kind = load_model_and_tokenizer(model_args)
    block = usable_block_size(data_args.block_size, tok, model)
    train = load_texts(data_args.train_data, split=data_args.split, text_column=data_args.text_column)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    n_rows = len(train)
    train_blocks = tokenize_and_group(train, tok, text_column=data_args.text_column, block_size=block, kind=kind, num_proc=data_args.preprocessing_num_workers)
    if data_args.validation_data:
        val = load_texts(data_args.validation_data, split="train", text_column=data_args.text_column)
        eval_blocks = tokenize_and_group(val, tok, text_column=data_args.text_column, block_size=block, kind=kind)
    else:
        eval_blocks = train_blocks
    if data_args.max_eval_blocks is not None:
        eval_blocks = eval_blocks.select(range(min(data_args.max_eval_blocks, len(eval_blocks))))
    logger.info("pre-fine-tuning a %s LM on %d rows -> %d blocks of %d tokens", kind, n_rows, len(train_blocks), block)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=make_collator(tok, kind, data_args.mlm_probability, training_args.seed),
        processing_class=tok,
    )

    def eval_loss() -> float:
        # Same seed before each evaluation: a masked LM sees the same masks before and after.
        transformers.set_seed(training_args.seed)
        return float(trainer.evaluate()["eval_loss"])

    before = eval_loss()
    train_out = trainer.train()
    after = eval_loss()
    trainer.save_model(training_args.output_dir)
    results = {
        "kind": kind,
        "model": model_args.model_name_or_path,
        "train_data": data_args.train_data,
        "n_train_rows": n_rows,
        "n_blocks": len(train_blocks),
        "block_size": block,
        "global_steps": int(train_out.global_step),
        "train_loss": float(train_out.training_loss),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "eval_perplexity_before": math.exp(before),
        "eval_perplexity_after": math.exp(after),
        "output_dir": str(training_args.output_dir),
    }
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(training_args.output_dir) / "prefinetune_results.json", "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return results


def parse_dataclasses(types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Instances of ``types`` from one YAML/JSON file (unknown keys refused) or from CLI flags."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(types)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]), allow_extra_keys=False)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]), allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=argv)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, Any]:
    """``(ModelArguments, DataArguments, TrainingArguments)`` from a YAML/JSON file or CLI flags."""
    from transformers import TrainingArguments

    return parse_dataclasses((ModelArguments, DataArguments, TrainingArguments), argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the results dict (also written to the output folder)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_args(argv)
    return prefinetune(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
