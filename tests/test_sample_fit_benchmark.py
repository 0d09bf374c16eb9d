"""benchmarks/sample_fit.py at a tiny size: every figure on its page is what a direct computation gives.

The script runs end to end (clustered pool written to disk, fits, page and JSON); the test then
refits the pool itself with ``fit_selector`` and recomputes the overlaps, the Spearman correlations
and the OT distances of the mixtures, and checks the choose-step byte counts against their shape
(the threshold's do not grow with N; gathering moves each process's k pairs).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from hf_otselect import fit_selector
from hf_otselect.ot import ot_distance
from tests.conftest import SHARED_DATA, load_benchmark

sf = load_benchmark("sample_fit")
N, FRACTIONS = 3000, ("0.01", "0.1", "1.0")


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.lexsort((np.arange(scores.size), -scores))[:k]  # ties to the lower row, as choose breaks them


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("sample_fit")
    argv = ["--work-dir", str(work), "--sizes", str(N), "--fractions", *FRACTIONS, "--w-rows", str(N), "--text-targets",
            "--choose-sizes", "4000", "40000", "--out", str(work / "page.md")]
    return work, sf.main(argv)


def test_the_fidelity_rows_are_the_fits_recomputed(run):
    work, res = run
    page = (work / "page.md").read_text()
    assert json.loads((work / "page.json").read_text())["fidelity"] == json.loads(json.dumps(res["fidelity"], default=str))
    ctx, *rows = res["fidelity"][0]
    assert [r["fraction"] for r in rows] == [float(f) for f in FRACTIONS]
    pool = np.load(work / f"pool_{N}_float16.npy")
    x = pool.astype(np.float32)
    target = np.load(work / "target.npy")
    full = fit_selector(pool, target, "got_d", eps=0.1).score_rows(x)
    ks = {0.01: math.ceil(0.01 * N), 0.1: math.ceil(0.1 * N)}
    assert {float(f): k for f, k in ctx["k"].items()} == ks
    assert ctx["w_pool_alone"] == pytest.approx(ot_distance(x, target, eps=0.1), rel=1e-6)
    for r in rows:
        m = math.ceil(r["fraction"] * N)
        assert r["n_fit"] == m
        scores = fit_selector(pool, target, "got_d", sample=m if m < N else None, eps=0.1).score_rows(x)
        assert r["spearman"] == pytest.approx(spearmanr(full, scores).statistic, abs=1e-12)
        for f, k in ks.items():
            chosen = _top(scores, k)
            assert r[f"overlap@{f:g}"] == len(set(chosen) & set(_top(full, k))) / k
            mix = np.concatenate([x, x[np.sort(chosen)]])
            a = np.concatenate([np.full(N, 0.5 / N), np.full(k, 0.5 / k)])
            assert r[f"w@{f:g}"] == pytest.approx(ot_distance(mix, target, a=a, eps=0.1), rel=1e-6)
        assert r["fit_s"] > 0 and r["peak_rss_gib"] >= r["rss_before_gib"] > 0
        assert (f"| {r['fraction']:.1%} | {m:,} | {r['overlap@0.01']:.4f} | {r['overlap@0.1']:.4f} | {r['spearman']:.5f} | "
                f"{r['w@0.01']:.4f} | {r['w@0.1']:.4f} |") in page
    sf.main(["--render", str(work / "page.json"), "--not-run", "4M: not run.", "--out", str(work / "again.md")])
    assert (work / "again.md").read_text() == page.rstrip("\n") + "\n\n## Not run\n\n4M: not run.\n"  # the same page, from its JSON
    whole = rows[-1]
    assert whole["overlap@0.01"] == whole["overlap@0.1"] == 1.0 and whole["spearman"] == pytest.approx(1.0, abs=1e-12)
    # GOT-D's best rows move the pool toward the target: the mixture is nearer to it than the pool.
    assert whole["w@0.1"] < ctx["w_pool_alone"] and whole["w@0.01"] < ctx["w_pool_alone"]


def test_the_choose_rows_count_the_bytes_of_both_ways(run):
    _, res = run
    small, large = res["choose"]
    for c in (small, large):
        assert c["same_rows_as_full_sort"] and c["k"] == c["n"] // 10 and c["processes"] == 2
        assert c["gather_sent"] > c["cut_sent"]  # gathering the chosen (score, index) pairs moves more than the cut
        assert c["cut_received"] == c["cut_sent"]  # two ranks, each all-reduce buffer the same size
    assert small["cut_sent"] == large["cut_sent"] < 8 * 1024  # the threshold's rounds do not grow with N
    assert large["gather_sent"] > 2 * small["gather_sent"]  # gathering grows with k (= N / 10)


def test_the_smallest_sample_reaching_a_level_needs_every_larger_sample_to_reach_it():
    rows = [{"fraction": f, "o": o} for f, o in ((0.001, 0.95), (0.01, 0.85), (0.1, 0.93), (1.0, 1.0))]
    assert sf.smallest_reaching(rows, "o", 0.9) == "10.0%"
    assert sf.smallest_reaching(rows, "o", 0.8) == "0.1%"
    assert sf.smallest_reaching(rows[:3], "o", 0.99) == "none"


@pytest.mark.skipif(not (SHARED_DATA / "SOURCES.md").exists(), reason="shared data not present")
def test_the_text_pool_runs_on_quality_benchmark_pool(tmp_path):
    res = sf.main(["--work-dir", str(tmp_path), "--sizes", "--fractions", "0.1", "1.0", "--text-targets", "chemprot",
                   "--text-n-per-source", "12", "--text-n-target", "10", "--text-work-dir", str(tmp_path / "q"),
                   "--data-dir", str(SHARED_DATA), "--choose-sizes", "--out", str(tmp_path / "page.md")])
    (ctx, *rows), = res["fidelity"]
    assert ctx["data"] == "text -> chemprot" and ctx["n"] == 12 * 10 and ctx["target_size"] == 10
    assert [r["n_fit"] for r in rows] == [12, 120] and rows[-1]["overlap@0.1"] == 1.0
    assert "## text -> chemprot, N = 120, target 10 rows" in (tmp_path / "page.md").read_text()
