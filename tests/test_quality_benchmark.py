"""Smoke and invariant tests of benchmarks/quality.py, so the quality benchmark cannot rot.

The module is loaded from its file (benchmarks/ is not a package); it in turn loads scripts/*.py
by path, never through sys.path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, load_benchmark


q = load_benchmark("quality")
needs_data = pytest.mark.skipif(not (SHARED_DATA / "SOURCES.md").exists(), reason="shared data not present")


def test_clip_and_chunks():
    text = "alpha  beta\n gamma " * 40
    c = q.clip(text, 50)
    assert len(c) <= 50 and "  " not in c and "\n" not in c
    assert " ".join(text.split()).startswith(c)
    assert q.clip("short text", 50) == "short text"
    code = "def f(x):\n    return x + 1\n" * 30
    parts = q.chunks(code, 100)
    assert all(len(p) <= 100 for p in parts)
    # Nothing but whitespace is lost at the cuts.
    assert "".join(parts).replace(" ", "").replace("\n", "") == code.replace(" ", "").replace("\n", "")


@needs_data
def test_pool_and_targets_are_tagged_and_disjoint():
    cfg = q.Config(data_dir=str(SHARED_DATA), n_per_source=12, n_target=10, n_eval=5, max_chars=300)
    rng = np.random.default_rng(0)
    raw = q.load_raw(SHARED_DATA, rng)
    pool = q.build_pool(raw, cfg, rng)
    n = len(pool["text"])
    assert n == 12 * len(q.DOMAIN)
    assert set(pool["source"]) == set(q.DOMAIN)
    assert all(q.DOMAIN[s] == d for s, d in zip(pool["source"], pool["domain"]))
    assert all(0 < len(t) <= 300 for t in pool["text"])
    assert len(set(pool["text"])) == n
    # Half of the Jigsaw rows are toxic, and only Jigsaw rows are.
    assert pool["toxic"][pool["source"] == "jigsaw"].sum() == 6
    assert pool["toxic"][pool["source"] != "jigsaw"].sum() == 0
    targets = q.build_targets(raw, cfg, pool["text"], rng)
    assert set(targets) == set(q.TARGET_DOMAIN)
    in_pool = set(pool["text"])
    for t in targets.values():
        assert len(t["select"]) == 10 and len(t["eval"]) == 5
        assert not set(t["select"]) & set(t["eval"])
        assert not (set(t["select"]) | set(t["eval"])) & in_pool
    # Same seed, same pool (reproducible).
    rng2 = np.random.default_rng(0)
    assert q.build_pool(q.load_raw(SHARED_DATA, rng2), cfg, rng2)["text"] == pool["text"]


def test_duplicate_test_planted():
    """Target = a duplicated row: similarity fills a small budget with its copies; shares are exact."""
    gen = np.random.default_rng(3)
    n, copies = 100, 50
    emb = gen.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pool = {"text": [f"row {i} text" for i in range(n)], "domain": np.array(["news"] * n), "source": np.array(["ag_news"] * n)}
    cfg = q.Config(selectors=("similarity", "random"), budgets=(10, 40), random_seeds=(0, 1), dup_frac=0.01,
                   dup_copies=copies, targets=("ag_news",))
    dup_row = int(np.random.default_rng(11).choice(n, 1, replace=False)[0])  # what duplicate_test draws with seed 11
    tgt = (emb[dup_row] + 0.01 * gen.normal(size=(5, 8))).astype(np.float32)
    rows = q.duplicate_test(pool, emb, {"ag_news": {"select": ["x"] * 5}}, {"ag_news": tgt}, cfg, np.random.default_rng(11))
    meta = rows[-1]
    assert meta["n_aug"] == n + copies - 1 and meta["n_dup_rows"] == 1
    assert meta["pool_dup_share"] == pytest.approx(copies / (n + copies - 1))
    by = {(r["selector"], r["k"]): r for r in rows[:-1]}
    assert by[("similarity", 10)]["dup_share"] == 1.0 and by[("similarity", 10)]["distinct"] == 1
    assert by[("similarity", 40)]["dup_share"] == 1.0
    plain = {("similarity", 10), ("similarity", 40), ("random/s0", 10), ("random/s1", 10), ("random/s0", 40), ("random/s1", 40)}
    assert set(by) == plain | {(s + "+guard", k) for s, k in plain}
    # The near-duplicate guard keeps one row of the duplicated cluster: exactly 1 of k.
    assert by[("similarity+guard", 10)]["dup_share"] == pytest.approx(0.1)
    assert by[("similarity+guard", 40)]["dup_share"] == pytest.approx(1 / 40)
    assert by[("similarity+guard", 40)]["distinct"] == 40
    for key in (("random/s0", 40), ("random/s1", 40)):
        assert 0.0 <= by[key]["dup_share"] < 1.0 and by[key]["domain_frac"] == 1.0


@needs_data
@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    """The whole benchmark on a tiny configuration: files written, every cell present, values in range."""
    argv = ["--data-dir", str(SHARED_DATA), "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"),
            "--n-per-source", "8", "--n-target", "6", "--n-eval", "4", "--budgets", "4", "8", "--targets", "jigsaw_ok",
            "--random-seeds", "0", "1", "--dup-copies", "5", "--n-prompts", "2", "--gen-tokens", "4",
            "--pretrain-epochs", "1", "--vocab-size", "400", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
            "--embed-max-length", "32"]
    res = q.main(argv)
    out = tmp_path / "out"
    md = (out / "quality.md").read_text()
    assert md.startswith("# Quality benchmark") and "Command: `" in md and "load at start" in md
    assert (out / "quality_ppl_domain.png").stat().st_size > 0 and (out / "quality_duplicates.png").stat().st_size > 0
    saved = json.loads((out / "quality.json").read_text())
    assert saved["n_pool"] == 80 == res["n_pool"]
    rows = res["rows"]
    sels = {(r["selector"], r["k"]) for r in rows}
    for k in (4, 8):
        for s in ("got_d", "got_d_neg", "got_d+pf", "tsds", "similarity", "dsir", "random/s0", "random/s1"):
            assert (s, k) in sels
    assert ("pretrained", 0) in sels
    for r in rows:
        assert np.isfinite(r["ppl"]) and r["ppl"] > 1
        assert 0.0 <= r["gen_toxic_frac"] <= 1.0
        if r["selector"] != "pretrained":
            assert 0.0 <= r["domain_frac"] <= 1.0 and 0.0 <= r["toxic_frac"] <= 1.0 and r["ot"] > 0
            assert sum(r["sources"].values()) == r["k"]
    # The toxicity classifier (trained on Jigsaw rows outside pool and targets) beats chance on held-out rows.
    assert res["classifier_accuracy"] > 0.6
    dup = res["duplicates"]
    assert dup[-1]["n_aug"] == 80 + 1 * 4
    assert all(0.0 <= r["dup_share"] <= 1.0 for r in dup[:-1])
    assert {r["selector"] for r in dup[:-1]} >= {"got_d+guard", "tsds+guard", "dsir+guard", "random/s1+guard"}
    # The pre-filter keeps 2 of the 10 sources, so GOT-D+pf draws from at most 2 sources.
    assert all(len(r["sources"]) <= 2 for r in rows if r["selector"] == "got_d+pf")


@needs_data
def test_selection_only_reports_the_dsir_variants(tmp_path):
    """--selection-only: no LM, no embeddings for text selectors; DSIR's three length rules side by side."""
    argv = ["--data-dir", str(SHARED_DATA), "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"),
            "--selection-only", "--selectors", "dsir", "random", "--targets", "sciie", "--n-per-source", "20",
            "--n-target", "10", "--n-eval", "2", "--budgets", "5", "--random-seeds", "0", "--dsir-chunk-tokens", "8",
            "--name", "sel"]
    res = q.main(argv)
    md = (tmp_path / "out" / "sel.md").read_text()
    assert "Command: `" in md and "Commit: " in md
    by = {r["selector"]: r for r in res["rows"]}
    assert set(by) == {"dsir", "dsir[chunk=100]", "dsir[whole rows]", "random/s0"}
    assert by["dsir[whole rows]"]["rows_below_chunk"] == 0 < by["dsir"]["rows_below_chunk"] < by["dsir[chunk=100]"]["rows_below_chunk"]
    assert all(sum(r["sources"].values()) == 5 for r in res["rows"])
    assert not (tmp_path / "work" / "embed_cache").exists()  # text selectors embed nothing
