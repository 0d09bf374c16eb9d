"""Smoke and planted-case tests of benchmarks/downstream.py (the scaled-down DSP experiment).

The pipeline runs end to end on a tiny BERT built here (no download) and a planted pool: the
target is one synthetic "domain" with a vocabulary of its own, and the pool holds a few texts of
that domain among many of other vocabularies. Warming the encoder up on the in-domain texts must
then lower the target's MLM loss more than warming it up on a random draw, and far more than no
warm-up at all.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import REPO, SHARED_DATA, load_benchmark


ds = load_benchmark("downstream")

DOMAINS = {
    "chem": (["enzyme", "kinase", "inhibitor", "receptor", "protein", "ligand", "substrate", "molecule", "compound", "binding"],
             ["inhibits", "activates"]),
    "sport": (["football", "match", "goal", "striker", "league", "referee", "stadium", "season", "coach", "penalty"], ["wins", "loses"]),
    "cook": (["butter", "garlic", "oven", "recipe", "flour", "sauce", "onion", "pepper", "kitchen", "salad"], ["bakes", "fries"]),
    "code": (["function", "variable", "compiler", "pointer", "integer", "module", "syntax", "thread", "buffer", "kernel"], ["returns", "throws"]),
}


def _texts(domain: str, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    words, verbs = DOMAINS[domain]
    out = []
    for _ in range(n):
        v = verbs[int(rng.integers(2))]
        body = " ".join(rng.choice(words, size=12))
        out.append((f"the {body} {v} the {' '.join(rng.choice(words, size=6))}", v))
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, width-32 BERT saved as a bare ``BertModel`` (no MLM head, like the bundled encoder),
    with a word-level vocabulary of the planted texts: a small output layer keeps a step cheap."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + sorted({"the"} | {w for ws, vs in DOMAINS.values() for w in ws + vs})
    wp = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    torch.manual_seed(0)
    conf = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, architectures=["BertModel"])
    BertModel(conf).save_pretrained(path)
    tok.save_pretrained(path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path)("the enzyme inhibits")["input_ids"] == [2, words.index("the"), words.index("enzyme"), words.index("inhibits"), 3]
    return path


def test_compare_is_two_standard_errors():
    # Independent reference: the plain formula 2 * sqrt(s_a^2/n_a + s_b^2/n_b).
    a, b = (1.0, 0.3, 3), (0.5, 0.4, 3)
    d, se2, mark = ds.compare(a, b, higher_better=True)
    assert d == pytest.approx(0.5) and se2 == pytest.approx(2 * math.sqrt(0.09 / 3 + 0.16 / 3))
    assert mark == "="  # 0.5 < 2 SE = 0.577
    assert ds.compare((1.2, 0.3, 3), b, higher_better=True)[2] == "+"  # 0.7 > 0.577
    assert ds.compare((1.0, 0.01, 3), (0.5, 0.01, 3), higher_better=False)[2] == "-"  # loss went up: worse
    assert ds.compare((0.4, 0.01, 3), (0.5, 0.01, 3), higher_better=False)[2] == "+"
    assert ds.compare((0.5, 0.2, 3), (0.45, 0.2, 3), higher_better=True)[2] == "="
    assert ds.compare((0.5, float("nan"), 1), (0.4, 0.1, 3), higher_better=True)[2] == "?"
    rows = [{"target": "t", "k": 5, "selector": "random", "seed": s, "mlm": v} for s, v in enumerate((1.0, 2.0, 4.0))]
    (m, s, n), = ds.stats(rows, "mlm").values()
    assert (m, n) == (pytest.approx(7 / 3), 3) and s == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))


def test_planted_pipeline(tmp_path, tiny_bert):
    rng = np.random.default_rng(0)
    task = tmp_path / "planted_chem"
    task.mkdir()
    for split, n in (("train", 60), ("test", 60)):
        with (task / f"{split}.jsonl").open("w") as fh:
            for text, label in _texts("chem", n, rng):
                fh.write(json.dumps({"text": text, "label": label}) + "\n")
    train_texts = [json.loads(line)["text"] for line in (task / "train.jsonl").open()]
    pool = [(t, "chem") for t, _ in _texts("chem", 24, rng)]
    for dom in ("sport", "cook", "code"):
        pool += [(t, dom) for t, _ in _texts(dom, 60, rng)]
    pool += [(t, "chem") for t in train_texts[:5]]  # the task's own train texts: must be excluded
    cfg = ds.Config(
        work_dir=str(tmp_path / "work"), out_dir=str(tmp_path / "out"), targets=(str(task),), model=str(tiny_bert),
        budgets=(24,), seeds=(0,), n_target=30, n_mlm_eval=40, n_probe_train=60, n_probe_test=60, warm_steps=25,
        warm_lr=3e-3, batch_size=8, block_size=32, threads=2, smoke=True, dsir_chunk_tokens=4, pool={"text": [t for t, _ in pool], "source": [s for _, s in pool]},
    )
    res = ds.run(cfg)
    info = res["pools"]["planted_chem"]
    assert info["n_units"] == len(pool) - 5 and info["sources"]["chem"] == 24

    rows = {(r["selector"], r["k"]): r for r in res["rows"]}
    assert set(rows) == {("none", 0)} | {(s, 24) for s in ds.SELECTORS}
    assert rows[("got_d", 24)]["initialised_head"]  # the MLM head was built by prefinetune, not loaded
    # similarity picks the planted in-domain rows; random draws about 24 * 24/204 of them.
    for s in ("similarity", "got_d"):
        assert rows[(s, 24)]["in_domain_sources"].get("chem", 0) >= 20
    assert rows[("random", 24)]["in_domain_sources"].get("chem", 0) <= 12
    # The expected direction on the planted case: warming up on the in-domain selections lowers the
    # target's MLM loss below both a random draw (mostly other vocabularies) and no warm-up.
    mlm = {s: rows[(s, k)]["mlm"] for s, k in rows}
    for s in ("similarity", "got_d"):
        assert mlm[s] < mlm["random"] - 0.3 and mlm[s] < mlm["none"] - 0.3, mlm
    assert all(0.0 <= r["probe"] <= 1.0 for r in res["rows"])

    tabs = ds.tables(res)
    assert set(tabs) == {"mlm", "probe"}  # no fine-tuning in the smoke run
    for lines in tabs.values():
        assert len(lines) == 1 + len(ds.SELECTORS)
        assert all(line["n"] == 1 for line in lines)
        assert {line["selector"] for line in lines} == set(ds.ALL_ROWS)
    v = ds.verdicts(res)
    assert len(v) == 2 * 3 * 3 and {x["mark"] for x in v} == {"?"}  # one seed: no claim is made
    out = tmp_path / "out" / "downstream.md"
    ds.write_markdown(res, out)
    text = out.read_text()
    assert "## mlm" in text and "## probe" in text and "One seed, no noise estimate" in text

    # A rerun is served from the measure cache (same numbers, no model trained).
    again = ds.run(cfg)
    assert [r["mlm"] for r in again["rows"]] == [r["mlm"] for r in res["rows"]]
    assert again["timing"]["warm"] == 0.0


def test_smoke_defaults_and_bad_args():
    cfg = ds.parse_args(["--smoke"])
    assert cfg.budgets == (20,) and cfg.seeds == (0,) and cfg.targets == ("sciie",) and not cfg.finetune
    cfg = ds.parse_args(["--smoke", "--target", "imdb", "--budgets", "5"])
    assert cfg.targets == ("imdb",) and cfg.budgets == (5,)
    with pytest.raises(ValueError, match="'--budgets' parameter"):
        ds.parse_args(["--budgets", "0"])
    with pytest.raises(ValueError, match="'target' parameter"):
        ds.prepare_target("no_such_task", ds.Config(), REPO, [])
    # warm_steps 0 would make Trainer train by epochs instead: every knob is checked up front.
    for flag, bad in (("--warm-steps", "0"), ("--batch-size", "0"), ("--block-size", "1"), ("--n-probe-train", "1"),
                      ("--warm-lr", "0"), ("--finetune-lr", "nan"), ("--finetune-epochs", "-1")):
        with pytest.raises(ValueError, match=f"'{flag}' parameter of downstream must be .*Got {bad}"):
            ds.parse_args([flag, bad])


def test_folder_target_needs_two_labels_and_its_fields(tmp_path):
    task = tmp_path / "task"
    ds._write_jsonl(task / "train.jsonl", [{"text": f"row {i}", "label": "a"} for i in range(30)])
    ds._write_jsonl(task / "test.jsonl", [{"text": f"test {i}", "label": "a"} for i in range(10)])
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        ds.prepare_target(str(task), ds.Config(), tmp_path / "work", [])
    (task / "test.jsonl").write_text(json.dumps({"text": "no label"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs fields 'text' and 'label'"):
        ds.prepare_target(str(task), ds.Config(), tmp_path / "work", [])
    ds._write_jsonl(task / "train.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(30)])
    ds._write_jsonl(task / "test.jsonl", [{"text": f"test {i}", "label": i % 2} for i in range(10)])
    tgt = ds.prepare_target(str(task), ds.Config(), tmp_path / "work", [])
    assert tgt["name"] == "task" and tgt["labels"] == ["0", "1"] and len(tgt["select"]) == 30


@pytest.mark.skipif(not (SHARED_DATA / "SOURCES.md").exists(), reason="shared data not present")
@pytest.mark.parametrize("name,gone", [("chemprot", "chemprot"), ("ag_news", "ag_news"), ("imdb", "imdb"), ("sciie", None)])
def test_real_pool_excludes_the_target(tmp_path, name, gone):
    cfg = ds.Config(data_dir=str(SHARED_DATA), work_dir=str(tmp_path))
    raw = ds.Q.load_raw(SHARED_DATA, np.random.default_rng(cfg.seed))
    tgt = ds.prepare_target(name, cfg, tmp_path, raw["target"]["amazon"])
    pool = ds.build_pool(cfg, raw, tgt["exclude"])
    ds.check_pool(pool, cfg, name)  # >= 8 sources and >= 4,000 units
    assert not set(pool["text"]) & tgt["exclude"]
    assert (gone is None) == (len(set(pool["source"].tolist())) == len(ds.Q.DOMAIN))
    if gone:
        assert gone not in set(pool["source"].tolist())
    assert len(tgt["select"]) == cfg.n_target and len(tgt["mlm"]) == cfg.n_mlm_eval
    assert len(ds.Q._jsonl(tgt["probe_train"])) == min(cfg.n_probe_train, tgt["n_train"])
    assert len(ds.Q._jsonl(tgt["ft_train"])) == min(cfg.n_finetune_train, tgt["n_train"])


@pytest.mark.skipif(not (SHARED_DATA / "SOURCES.md").exists(), reason="shared data not present")
def test_relation_tasks_keep_entity_markers_for_classification_only(tmp_path):
    """SciERC holds one sentence per entity pair, told apart only by the markers: the probe and
    fine-tuning rows keep them, the texts selected for and the MLM texts do not, and the pool loses
    both forms of every target text."""
    cfg = ds.Config(data_dir=str(SHARED_DATA), work_dir=str(tmp_path))
    tgt = ds.prepare_target("sciie", cfg, tmp_path, [])
    probe = ds.Q._jsonl(tgt["probe_train"])
    assert sum("<<" in r["text"] and "[[" in r["text"] for r in probe) == len(probe)
    marked = ds.Q._MARKERS
    assert not any(marked.search(t) for t in tgt["select"] + tgt["mlm"])
    raw = ds.Q._jsonl(SHARED_DATA / "sciie" / "train.txt")[0]["text"]
    assert raw in tgt["exclude"] and ds.plain(raw) in tgt["exclude"] and ds.plain(raw) != raw


def test_mlm_loss_on_masked_positions_equals_full_logits(tiny_bert):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    assert ds._masked_head(model) is model.cls
    texts = [t for t, _ in _texts("chem", 20, np.random.default_rng(3))] + ["the enzyme"]
    masked = ds.fixed_masks(tok, texts, 32, seed=5)
    fast = ds.mlm_loss(model, tok, *masked, batch_size=8)
    full = ds.mlm_loss(model, tok, *masked, batch_size=8, masked_only=False)
    assert math.isclose(fast, full, rel_tol=1e-5) and fast > 0
    # A different mask gives a different loss: the masked positions are what is scored.
    assert not math.isclose(fast, ds.mlm_loss(model, tok, *ds.fixed_masks(tok, texts, 32, seed=6)), rel_tol=1e-4)


def test_finetune_goes_through_evaluate_script(tmp_path, tiny_bert):
    rng = np.random.default_rng(1)
    rows = [{"text": t, "label": lab} for t, lab in _texts("chem", 40, rng)]
    for name, part in (("probe_train", rows[:24]), ("probe_test", rows[24:])):
        ds._write_jsonl(tmp_path / f"{name}.jsonl", part)
    tgt = {"ft_train": tmp_path / "probe_train.jsonl", "probe_test": tmp_path / "probe_test.jsonl"}
    cfg = ds.Config(block_size=32, batch_size=8, finetune_epochs=1.0)
    f1 = ds.finetune_f1(tiny_bert, tgt, 0, cfg, tmp_path / "ft")
    saved = json.loads((tmp_path / "ft" / "evaluation.json").read_text())
    assert f1 == saved["task"]["macro_f1"] and saved["task"]["n_eval"] == 16 and 0.0 <= f1 <= 1.0
