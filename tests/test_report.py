"""The selection report: its numbers against independent computations, and the page in a browser."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from hf_otselect.ot import sinkhorn_potentials
from hf_otselect.report import budget_curve, near_duplicate_pairs, write_report
from tests.conftest import REPO

DOMAINS = ("news", "bio", "code")
NASTY = '<script>alert("x")</script> & <b>bold</b>'


def _ranks(scores: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.arange(scores.size), -scores))
    ranks = np.empty(scores.size, dtype=np.int64)
    ranks[order] = np.arange(1, scores.size + 1)
    return ranks


def _make_run(
    folder: Path, *, method: str = "similarity", sampled: bool = False, n: int = 300, m: int = 40, k: int = 30, dim: int = 64
) -> dict:
    """A job output folder built by hand: clustered pool in three domains, a target near 'bio',
    a top-k (or sampled) selection, and one planted near-duplicate pair inside the selection."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, dim))
    domain = rng.integers(0, 3, n)
    pool = (centers[domain] + rng.normal(size=(n, dim))).astype(np.float32)
    target = (centers[1] + rng.normal(size=(m, dim))).astype(np.float32)
    texts = [f"pool row {i} about {DOMAINS[d]}" for i, d in enumerate(domain)]
    target_texts = [f"target row {j}" for j in range(m)]
    t = target.mean(0)
    if sampled:
        raw = np.maximum(0.0, pool @ t / np.linalg.norm(t) - 1.0)
        scores = raw / raw.sum()
        chosen = np.random.default_rng(0).choice(n, size=k, replace=True, p=scores)
    else:
        scores = (pool @ t).astype(np.float64)
        chosen = np.lexsort((np.arange(n), -scores))[:k]
    # planted duplicate: the second and fifth distinct selected rows get (almost) the same vector
    uniq = list(dict.fromkeys(chosen.tolist()))
    a, b = uniq[1], uniq[4]
    pool[b] = pool[a] * 1.5 + 1e-3
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)  # unit rows, as the bundled encoder gives
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    texts[a] = NASTY
    if method == "got_d":  # scores as GOT-D ranks them: -f of the pool x target problem
        scores = -sinkhorn_potentials(pool, target, eps=0.1).f
        chosen = np.lexsort((np.arange(n), -scores))[:k]
    ranks = _ranks(scores)
    scored = Dataset.from_dict({"text": texts, "domain": [DOMAINS[d] for d in domain],
                                "pool_index": np.arange(n), "score": scores, "rank": ranks})
    folder.mkdir(parents=True)
    scored.save_to_disk(str(folder / "scored"))
    scored.select(chosen).save_to_disk(str(folder / "selected"))
    (folder / "embeddings").mkdir()
    np.save(folder / "embeddings" / "pool.npy", pool, allow_pickle=False)
    np.save(folder / "embeddings" / "target.npy", target, allow_pickle=False)
    target_path = folder.parent / "target.jsonl"
    target_path.write_text("".join(json.dumps({"text": s}) + "\n" for s in target_texts), encoding="utf-8")
    prov = {
        "method": method, "params": {"eps": 0.1} if method == "got_d" else {}, "k": k, "seed": 0,
        "rows": {"pool": n, "target": m, "selected": k},
        "ot_distance": {"target_pool": 1.25, "target_selection": 0.75},
        "config": {"score_column": "score", "pool": {"path": "pool.jsonl", "column": "text"},
                   "target": {"path": str(target_path), "column": "text"}, "report_columns": ["domain"]},
        "prefilter": {"ranking": [{"source": "bio", "ot": 0.5}, {"source": "news<&>", "ot": 0.9}]},
    }
    (folder / "selection.json").write_text(json.dumps(prov), encoding="utf-8")
    return {"pool": pool, "target": target, "scores": scores, "chosen": chosen, "domain": domain,
            "dup": (min(a, b), max(a, b)), "target_texts": target_texts, "texts": texts}


def _page_number(page: str, key: str) -> float:
    match = re.search(rf'<span class="num" id="{re.escape(key)}">([^<]*)</span>', page)
    assert match, f"no number {key!r} on the page"
    return float(match.group(1))


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("topk") / "out"
    truth = _make_run(folder)
    path = write_report(folder)
    return folder, truth, path.read_text(encoding="utf-8"), json.loads((folder / "report.json").read_text())


# --------------------------------------------------------------------------- helpers


def _pot_ot(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    """Independent reference: POT's entropic OT value (KL to a b^T, cost ||x - y||^2, float64)."""
    ot = pytest.importorskip("ot")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(ot.solve(ot.dist(x, y), reg=eps, reg_type="KL", tol=1e-10, max_iter=20_000).value)



def test_near_duplicate_pairs_equal_brute_force_across_blocks():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(57, 8)).astype(np.float32)
    x[10] = x[3] * 2  # exact duplicate direction
    x[40] = x[3] + 1e-3
    x[50] = x[20] * 0.5
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit.astype(np.float64) @ unit.T.astype(np.float64)
    brute = [(i, j) for i, j in itertools.combinations(range(57), 2) if cos[i, j] > 0.9]
    got = near_duplicate_pairs(x, 0.9, block_size=7, top=10)
    assert got["pairs_above"] == len(brute) == 4  # (3,10), (3,40), (10,40), (20,50)
    assert got["pairs_total"] == 57 * 56 // 2
    assert got["rows_with_partner"] == len({p for pair in brute for p in pair}) == 5
    assert sorted((i, j) for i, j, _ in got["top_pairs"]) == brute
    assert got["top_pairs"][0][2] >= got["top_pairs"][-1][2]
    assert near_duplicate_pairs(x[:1], 0.9)["pair_rate"] == 0.0


def test_budget_curve_equals_ot_on_the_explicitly_warmed_pool():
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(60, 5)).astype(np.float32)
    target = rng.normal(size=(20, 5)).astype(np.float32) + 1.0
    ranking = rng.permutation(60)
    got = budget_curve(pool, target, ranking, [0, 5, 60], eps=0.5)
    for k, value in zip([0, 5, 60], got["distance"]):
        warmed = np.concatenate([pool, pool[ranking[:k]]])
        assert value == pytest.approx(_pot_ot(warmed, target, 0.5), rel=1e-4)
    assert got["converged"] and got["pool_rows_used"] == 60 and got["target_rows_used"] == 20
    # a pool larger than max_pool is a weighted sample: n / max_pool per sampled row
    sub = budget_curve(pool, target, ranking, [0, 40], eps=0.5, max_pool=30, max_target=10, seed=2)
    assert sub["pool_rows_used"] == 30 and sub["target_rows_used"] == 10
    assert sub == budget_curve(pool, target, ranking, [0, 40], eps=0.5, max_pool=30, max_target=10, seed=2)


# --------------------------------------------------------------------------- the page's numbers


def test_top_k_numbers_match_the_files(topk_run):
    folder, truth, page, numbers = topk_run
    scores, chosen = truth["scores"], truth["chosen"]
    threshold = np.sort(scores)[::-1][len(chosen) - 1]  # the k-th best score
    assert numbers["score"]["choice"] == "top_k"
    assert numbers["score"]["threshold"] == pytest.approx(threshold)
    assert _page_number(page, "score-threshold") == pytest.approx(threshold, rel=1e-5)
    assert _page_number(page, "selected-rows") == len(chosen)
    assert numbers["score"]["pool_median"] == pytest.approx(np.median(scores))
    # composition: counts from the raw domain labels
    pool_counts = Counter(DOMAINS[d] for d in truth["domain"])
    sel_counts = Counter(DOMAINS[truth["domain"][i]] for i in chosen)
    values = {r["value"]: r for r in numbers["composition"]["domain"]["values"]}
    assert {v: r["pool"] for v, r in values.items()} == dict(pool_counts)
    assert {v: r["selected"] for v, r in values.items() if r["selected"]} == dict(sel_counts)
    for i, row in enumerate(numbers["composition"]["domain"]["values"]):
        assert _page_number(page, f"comp-0-{i}-selected") == row["selected"]
    # the planted pair is the only near-duplicate
    dup = numbers["near_duplicates"]
    assert dup["pairs_above"] == 1 and _page_number(page, "dup-pairs") == 1
    assert (dup["top_pairs"][0]["a"], dup["top_pairs"][0]["b"]) == truth["dup"]
    assert dup["pairs_total"] == len(chosen) * (len(chosen) - 1) // 2
    assert dup["rows_with_partner"] == 2
    # the OT distances shown are selection.json's
    assert _page_number(page, "ot-target-pool") == 1.25 and _page_number(page, "ot-target-selection") == 0.75


def test_budget_curve_of_the_report_is_recomputable(topk_run):
    folder, truth, page, numbers = topk_run
    curve = numbers["budget_curve"]
    k = len(truth["chosen"])
    assert curve["k"] == [0, k // 4, k // 2, k, 2 * k, 4 * k]
    assert curve["method"][0] == pytest.approx(_pot_ot(truth["pool"], truth["target"], 0.1), rel=1e-4)
    assert curve["method"][0] == pytest.approx(curve["random"][0], rel=1e-6)
    warmed = np.concatenate([truth["pool"], truth["pool"][truth["chosen"]]])
    assert curve["method"][3] == pytest.approx(_pot_ot(warmed, truth["target"], 0.1), rel=1e-4)
    # the ranking was built towards the target: warming with it gets closer than random does
    assert curve["method"][-1] < curve["random"][-1] and curve["method"][-1] < curve["method"][0]
    assert _page_number(page, "curve-method-3") == pytest.approx(curve["method"][3], rel=1e-5)


def test_examples_show_nearest_targets_and_escape_text(topk_run):
    folder, truth, page, numbers = topk_run
    examples = numbers["examples"]
    assert len(examples) == 10 and examples[0]["rank"] == 1 and examples[-1]["rank"] == len(truth["chosen"])
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    for ex in examples:
        cos = unit(truth["target"]) @ unit(truth["pool"][ex["pool_index"]])
        j = int(np.argmax(cos))
        assert ex["nearest_target"][0]["target_index"] == j
        assert ex["nearest_target"][0]["cosine"] == pytest.approx(cos[j], rel=1e-5)
        assert ex["nearest_target"][0]["text"] == truth["target_texts"][j]
        assert ex["text"] == truth["texts"][ex["pool_index"]]
    assert NASTY not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<script" not in page
    assert "news&lt;&amp;&gt;" in page  # the pre-filter section, shown generically
    for name in ("scores.png", "projection.png", "composition_0.png", "budget_curve.png"):
        assert (folder / "report_files" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="report_files/{name}"' in page


def test_sampled_selection_reports_probabilities_and_draws(tmp_path):
    folder = tmp_path / "out"
    truth = _make_run(folder, method="tsds", sampled=True)
    numbers = json.loads(write_report(folder, n_examples=4).with_name("report.json").read_text())
    chosen, p = truth["chosen"], truth["scores"]
    assert numbers["score"]["choice"] == "sampled"
    assert "threshold" not in numbers["score"]
    assert numbers["score"]["n_zero"] == int((p == 0).sum()) > 0
    assert numbers["score"]["distinct_selected"] == np.unique(chosen).size < len(chosen)
    assert numbers["near_duplicates"]["repeated_draws"] == len(chosen) - np.unique(chosen).size
    counts = Counter(chosen.tolist())
    for ex in numbers["examples"]:
        assert ex["draws"] == counts[ex["pool_index"]]
        assert ex["probability"] == pytest.approx(p[ex["pool_index"]])


def test_got_d_examples_carry_the_transport_plan_of_pot(tmp_path):
    ot = pytest.importorskip("ot")
    folder = tmp_path / "out"
    truth = _make_run(folder, method="got_d", n=120, m=25, k=12)
    numbers = json.loads(write_report(folder, n_examples=3).with_name("report.json").read_text())
    assert numbers["got_d_plan"]["spearman_minus_f_vs_score"] == pytest.approx(1.0)
    pool, target = truth["pool"].astype(np.float64), truth["target"].astype(np.float64)
    plan = ot.sinkhorn(np.full(120, 1 / 120), np.full(25, 1 / 25), ot.dist(pool, target), 0.1,
                       method="sinkhorn_log", stopThr=1e-12, numItermax=10000)
    for ex in numbers["examples"]:
        row = plan[ex["pool_index"]]
        assert ex["got_d"]["mass"] == pytest.approx(1 / 120, rel=1e-2)
        top = ex["got_d"]["top_recipients"]
        assert [r["target_index"] for r in top] == list(np.argsort(-row, kind="stable")[:3])
        assert top[0]["mass_share"] == pytest.approx(row.max() / row.sum(), rel=1e-2)


def test_projection_states_its_explained_variance_and_the_examples_speak_plainly(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "umap", None)  # the PCA path, whether or not umap-learn is installed
    folder = tmp_path / "out"
    truth = _make_run(folder, method="got_d", n=120, m=25, k=12)
    page = write_report(folder, n_examples=3).read_text(encoding="utf-8")
    numbers = json.loads((folder / "report.json").read_text())
    proj = numbers["projection"]
    # independent: the top two eigenvalues of the covariance of the points the PCA was fitted on
    fit = np.concatenate([truth["pool"], truth["target"]]).astype(np.float64)
    eig = np.linalg.eigvalsh(np.cov(fit, rowvar=False))[::-1]
    assert proj["method"] == "PCA"
    np.testing.assert_allclose(proj["explained_variance_ratio"], eig[:2] / eig.sum(), rtol=1e-4)
    assert proj["explained_variance_total"] == pytest.approx(eig[:2].sum() / eig.sum(), rel=1e-4)
    assert f"keeps {100 * eig[:2].sum() / eig.sum():.1f}% of the spread" in page
    if eig[:2].sum() / eig.sum() < 0.5:
        assert "Judge closeness by the OT distances" in page
    for jargon in ("potential f =", "calibrated gradient"):
        assert jargon not in page
    assert "pool rows compete for the target rows" in page
    for ex in numbers["examples"]:  # the value shown is the row's score direction: -f
        assert _page_number(page, f"ex-{numbers['examples'].index(ex)}-f") == pytest.approx(-ex["got_d"]["potential_f"], rel=1e-5)


def test_large_pools_are_subsampled_deterministically_and_the_page_says_so(tmp_path, monkeypatch):
    import hf_otselect.report as report

    monkeypatch.setattr(report, "MAX_DUPLICATE_ROWS", 20)
    folder = tmp_path / "out"
    truth = _make_run(folder)
    page = write_report(folder, n_examples=0, sample_rows=100).read_text(encoding="utf-8")
    first = json.loads((folder / "report.json").read_text())
    assert first["sample_rows"] == 100
    # the chosen sample takes the 30 selected rows (at most half), the pool sample the other 70
    assert first["projection"]["pool_points"] == 70 and first["projection"]["pool_subsampled"]
    assert first["projection"]["selected_points"] == 30
    assert "keyed uniform sample of 70" in page
    curve = first["budget_curve"]
    assert curve["computed_on"] == "sample" and curve["pool_rows_used"] == 70 and curve["selected_rows_used"] == 30
    assert "Computed on the report's sample, not the whole pool of 300 rows" in page
    # whole-pool figures still cover every row: they come from the reduced summaries
    assert first["score"]["pool_max"] == pytest.approx(truth["scores"].max())
    assert first["score"]["pool_mean"] == pytest.approx(truth["scores"].mean())
    assert first["score"]["selected_median_exact"] and not first["score"]["pool_median_exact"]
    dup = first["near_duplicates"]
    assert dup["sampled"] and dup["rows"] == 20 and dup["pairs_total"] == 190
    assert "keyed sample of 20 of the 30" in page
    write_report(folder, n_examples=0, sample_rows=100)
    assert json.loads((folder / "report.json").read_text()) == first  # same seed, same numbers
    write_report(folder, n_examples=0, sample_rows=100, seed=1)
    again = json.loads((folder / "report.json").read_text())
    assert again["budget_curve"]["random"] != first["budget_curve"]["random"]
    assert again["score"]["pool_max"] == first["score"]["pool_max"]


def test_duplicate_threshold_and_examples_follow_the_arguments(tmp_path):
    folder = tmp_path / "out"
    truth = _make_run(folder)
    numbers = json.loads(write_report(folder, n_examples=3, duplicate_threshold=-1.0).with_name("report.json").read_text())
    k = len(truth["chosen"])
    assert numbers["near_duplicates"]["pairs_above"] == k * (k - 1) // 2  # every cosine is above -1
    assert [ex["rank"] for ex in numbers["examples"]] == [1, 15, 30]  # positions 0, 14.5 (rounds to even), 29


def test_the_cli_writes_the_report(tmp_path, capsys):
    from hf_otselect.cli import main

    folder = tmp_path / "out"
    _make_run(folder)
    assert main(["report", str(folder), "--columns", "domain"]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "report.html")
    assert json.loads((folder / "report.json").read_text())["composition"]["domain"]["selected_rows"] == 30
    assert main(["report", str(folder), "--columns", "nope"]) == 2
    assert "Column 'nope' not in the scored split" in capsys.readouterr().err


def test_without_embeddings_the_page_says_so(tmp_path):
    folder = tmp_path / "out"
    truth = _make_run(folder)
    shutil.rmtree(folder / "embeddings")
    page = write_report(folder, columns=["domain"], n_examples=2).read_text(encoding="utf-8")
    numbers = json.loads((folder / "report.json").read_text())
    assert "save_embeddings: false" in page
    assert "budget_curve" not in numbers and "projection" not in numbers and "near_duplicates" not in numbers
    assert numbers["score"]["threshold"] == pytest.approx(np.sort(truth["scores"])[::-1][29])
    assert "nearest_target" not in numbers["examples"][0]
    assert sorted(p.name for p in (folder / "report_files").iterdir()) == ["composition_0.png", "scores.png"]


def test_bad_arguments_are_refused_before_work(tmp_path):
    folder = tmp_path / "out"
    _make_run(folder)
    with pytest.raises(ValueError, match=r"Column 'source' not in the scored split. Current columns: \['text', 'domain'"):
        write_report(folder, columns=["source"])
    with pytest.raises(ValueError, match="The 'n_examples' parameter of write_report"):
        write_report(folder, n_examples=-1)
    with pytest.raises(ValueError, match="The 'duplicate_threshold' parameter of write_report"):
        write_report(folder, duplicate_threshold=1.5)
    with pytest.raises(TypeError, match="The 'columns' parameter of write_report"):
        write_report(folder, columns="domain")
    with pytest.raises(ValueError, match=r"The 'sample_rows' parameter of write_report must be an int in \[2, inf\]. Got 1 instead"):
        write_report(folder, sample_rows=1)
    with pytest.raises(FileNotFoundError, match="not a selection output folder"):
        write_report(tmp_path)
    assert not (folder / "report.html").exists()


# --------------------------------------------------------------------------- the page in a browser

_MEASURE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) img.setAttribute("data-natural-width", String(img.naturalWidth));
  document.body.setAttribute("data-measured", "yes");
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            try:
                subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=True)
            except (OSError, subprocess.SubprocessError):
                break
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("headless Chromium is not installed and could not be installed (needs root and apt-get: "
                    "`apt-get install -y chromium`)")
    return exe


def test_the_page_renders_in_headless_chromium_with_its_images(topk_run, tmp_path):
    exe = _chromium()
    folder, _, page, _ = topk_run
    # a copy next to the real page (so the relative image links resolve) with a measuring script
    probe = folder / "report_probe.html"
    probe.write_text(page.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    try:
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        probe.unlink()
    dom = proc.stdout
    assert 'data-measured="yes"' in dom, proc.stderr[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == page.count("<img ") == 4
    assert all(w > 100 for w in widths), widths


# --------------------------------------------------------------------------- a real job


@pytest.mark.slow
def test_report_of_a_real_job(tmp_path):
    from datasets import load_from_disk

    from hf_otselect.config import load_config
    from hf_otselect.job import run_job

    config = load_config(REPO / "configs" / "demo.yaml", [
        f"pool.path={REPO / 'data/sample/pool.jsonl'}", f"target.path={REPO / 'data/sample/target.jsonl'}",
        "pool.max_rows=200", "target.max_rows=40", "k=20", "embedding.max_length=64",
        f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", "report=true",
    ])
    out = run_job(config)
    page = (out / "report.html").read_text(encoding="utf-8")
    numbers = json.loads((out / "report.json").read_text())
    scored = load_from_disk(str(out / "scored"))
    selected = load_from_disk(str(out / "selected"))
    prov = json.loads((out / "selection.json").read_text())
    scores = np.asarray(scored[prov["config"]["score_column"]])
    assert numbers["score"]["threshold"] == pytest.approx(min(selected[prov["config"]["score_column"]]))
    assert numbers["score"]["pool_max"] == pytest.approx(scores.max())
    assert numbers["composition"]["domain"]["selected_rows"] == len(selected) == 20
    assert sum(r["selected"] for r in numbers["composition"]["domain"]["values"]) == 20
    assert dict(Counter(selected["domain"])) == {r["value"]: r["selected"] for r in numbers["composition"]["domain"]["values"] if r["selected"]}
    assert _page_number(page, "ot-target-pool") == pytest.approx(prov["ot_distance"]["target_pool"], rel=1e-5)
    pool = np.load(out / "embeddings" / "pool.npy")
    target = np.load(out / "embeddings" / "target.npy")
    assert numbers["budget_curve"]["method"][0] == pytest.approx(_pot_ot(pool, target, 0.1), rel=1e-4)
    assert numbers["examples"][0]["nearest_target"][0]["text"]  # the target texts were read back
    assert numbers["got_d_plan"]["spearman_minus_f_vs_score"] > 0.99


# --------------------------------------------------------------------------- bounded reads, several processes


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": str(REPO)}


def _large_run(folder: Path, n: int, *, dim: int = 384, m: int = 50, k: int = 200) -> None:
    """An output folder of ``n`` pool rows (memory-mapped vectors written in blocks; a similarity top-k)."""
    rng = np.random.default_rng(0)
    (folder / "embeddings").mkdir(parents=True)
    target = rng.normal(size=(m, dim)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    np.save(folder / "embeddings" / "target.npy", target)
    pool = np.lib.format.open_memmap(folder / "embeddings" / "pool.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    scores = np.empty(n)
    t = target.mean(0)
    for s in range(0, n, 50_000):
        x = rng.normal(size=(min(50_000, n - s), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        pool[s : s + len(x)] = x
        scores[s : s + len(x)] = x @ t
    pool.flush()
    del pool
    chosen = np.lexsort((np.arange(n), -scores))[:k]
    draws = np.zeros(n, dtype=np.int64)
    draws[chosen] = 1
    scored = Dataset.from_dict({"text": [f"row {i}" for i in range(n)], "domain": [DOMAINS[i % 3] for i in range(n)],
                                "pool_index": np.arange(n), "score": scores, "selected": draws})
    scored.save_to_disk(str(folder / "scored"))
    scored.select(chosen).save_to_disk(str(folder / "selected"))
    prov = {"method": "similarity", "params": {}, "k": k, "seed": 0, "rows": {"pool": n, "target": m, "selected": k},
            "config": {"score_column": "score", "pool": {"path": "pool.jsonl", "column": "text"}, "report_columns": ["domain"]}}
    (folder / "selection.json").write_text(json.dumps(prov), encoding="utf-8")


@pytest.mark.slow
def test_the_reports_peak_memory_does_not_grow_with_the_pool(tmp_path):
    # Today the report loads every vector (pool.npy whole) and N-sized score, rank and category arrays:
    # its peak grows with N. Now it reads reduced summaries and at most sample_rows rows.
    peaks, seconds, numbers = {}, {}, {}
    sizes = (60_000, 240_000)
    for n in sizes:
        folder = tmp_path / f"out{n}"
        _large_run(folder, n)
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "report_memory.py"), str(folder), "{}"],
                              capture_output=True, text=True, env=_env(), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks[n], seconds[n] = got["peak_rss_gb"], got["report_s"]
        numbers[n] = json.loads((folder / "report.json").read_text())
        shutil.rmtree(folder)
    pool_growth = (sizes[1] - sizes[0]) * 384 * 4 / 2**30  # what reading the vectors whole adds
    growth = peaks[sizes[1]] - peaks[sizes[0]]
    assert growth < 0.25 * pool_growth, (peaks, pool_growth, seconds)
    for n in sizes:
        assert numbers[n]["budget_curve"]["computed_on"] == "sample" and numbers[n]["projection"]["pool_subsampled"]
        assert numbers[n]["composition"]["domain"]["pool_rows"] == n  # whole-pool counts still cover every row


@pytest.mark.parametrize("world", [2, 3])
def test_the_report_data_is_the_same_for_any_number_of_processes(world):
    from hf_otselect.report_data import RowBlock, summarize
    from tests._thread_comm import contiguous_bounds, run_ranks

    rng = np.random.default_rng(0)
    n = 1000
    scores = rng.integers(0, 20, n).astype(np.float64)  # many ties: ranks break them by the lower index
    scores[[5, 700]] = np.nan  # unscored rows rank last
    draws = np.zeros(n, dtype=np.int64)
    draws[np.lexsort((np.arange(n), -np.nan_to_num(scores, nan=-np.inf)))[:40]] = 1
    vectors = rng.normal(size=(n, 4)).astype(np.float32)
    domain = [DOMAINS[i % 3] for i in range(n)]

    def blocks_of(lo, hi):
        def blocks():
            for s in range(lo, hi, 97):
                e = min(hi, s + 97)
                yield RowBlock(np.arange(s, e), scores[s:e], draws[s:e], {"domain": domain[s:e]},
                               lambda pos, s=s: ([f"text {s + p}" for p in pos], vectors[s + pos]))
        return blocks

    one = summarize(blocks_of(0, n), columns=["domain"], sample_rows=100)
    many = run_ranks(world, lambda comm: summarize(blocks_of(*contiguous_bounds(n, world, comm.rank)), columns=["domain"],
                                                   sample_rows=100, comm=comm))
    for got in many:
        assert json.dumps(got.summary, sort_keys=True) == json.dumps(one.summary, sort_keys=True)
        assert np.array_equal(got.vectors, one.vectors)
    s = one.summary
    index = np.asarray(s["sample"]["pool_index"])
    assert len(index) <= 100 and s["chosen_sample_rows"] == 40 and s["pool_sample_rows"] == 60
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.lexsort((np.arange(n), -scores))] = np.arange(1, n + 1)  # the package's tie rule, NaN last
    assert s["sample"]["rank"] == ranks[index].tolist()
    assert np.array_equal(one.vectors, vectors[index]) and s["sample"]["text"] == [f"text {i}" for i in index]
    assert s["choice"] == "top_k" and s["selected"]["min"] == np.sort(scores[draws > 0])[0]
    assert s["at_or_above_threshold"] == int((scores >= s["selected"]["min"]).sum())
    assert s["composition"]["domain"]["pool"] == dict(Counter(domain))
    finite = scores[np.isfinite(scores)]
    assert s["score"]["hist_pool"] == np.histogram(finite, bins=50)[0].tolist()
    assert s["score"]["mean"] == pytest.approx(finite.mean())


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """The same job with its report, run by one process and by two (torchrun, gloo): both folders and the second's stderr."""
    from tests.conftest import SAMPLE, read_jsonl

    tmp = tmp_path_factory.mktemp("world")
    rows = read_jsonl(SAMPLE / "pool.jsonl")[::18][:80]  # every domain
    (tmp / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    base = ["select", "--config", str(REPO / "configs" / "demo.yaml"), f"pool.path={tmp / 'pool.jsonl'}",
            f"target.path={SAMPLE / 'target.jsonl'}", "target.max_rows=20", "k=10", "embedding.max_length=32",
            f"cache_dir={tmp / 'cache'}", "report=true", "report_columns=[domain]"]
    one = subprocess.run([sys.executable, "-m", "hf_otselect.cli", *base, f"output_dir={tmp / 'one'}"],
                         capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "hf_otselect.cli", *base, f"output_dir={tmp / 'two'}"],
                         capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp)
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp / "one", tmp / "two", two.stderr


@pytest.mark.slow
def test_a_two_process_report_has_every_section_of_a_one_process_report(one_and_two_processes):
    # Today the report looks only for embeddings/pool.npy while two processes write pool-RANK-of-WORLD.npy:
    # the projection, budget curve and near-duplicates vanish and the page blames save_embeddings.
    one, two, _ = one_and_two_processes
    n1, n2 = (json.loads((f / "report.json").read_text()) for f in (one, two))
    page = (two / "report.html").read_text(encoding="utf-8")
    assert set(n2) == set(n1) and {"projection", "budget_curve", "near_duplicates", "got_d_plan"} <= set(n2)
    assert "save_embeddings: false" not in page and not n2["notes"]  # (the key itself is in the provenance table)
    for name in ("projection.png", "budget_curve.png"):
        assert f'src="report_files/{name}"' in page and (two / "report_files" / name).is_file()
    # the same keyed sample, ranks and reduced counts for one process and two
    s1, s2 = (json.loads((f / "report_data" / "summary.json").read_text()) for f in (one, two))
    for key in ("pool_index", "rank", "draws", "in_pool_sample", "in_chosen_sample", "text", "columns"):
        assert s2["sample"][key] == s1["sample"][key], key
    assert s2["composition"] == s1["composition"] and n2["composition"] == n1["composition"]
    assert s2["score"]["hist_pool"] == s1["score"]["hist_pool"]
    assert n2["score"]["threshold"] == pytest.approx(n1["score"]["threshold"], rel=1e-5)
    np.testing.assert_allclose(n2["budget_curve"]["method"], n1["budget_curve"]["method"], rtol=1e-4)
    assert [e["pool_index"] for e in n2["examples"]] == [e["pool_index"] for e in n1["examples"]]
    # a finished two-process folder read again by `hf-otselect report` (another sample size, so from the
    # folder): the per-process pool-RANK-of-WORLD.npy files are read at the sampled rows
    assert sorted(p.name for p in (two / "embeddings").glob("pool*.npy")) == ["pool-00000-of-00002.npy", "pool-00001-of-00002.npy"]
    again = json.loads(write_report(two, sample_rows=30).with_name("report.json").read_text())
    assert {"projection", "budget_curve", "near_duplicates"} <= set(again) and not again["notes"]
    assert again["budget_curve"]["computed_on"] == "sample" and again["composition"] == n2["composition"]
    # the card's histogram, counted where the rows live and summed, is that of the selected rows' scores
    from datasets import load_from_disk

    from hf_otselect.hub import _histogram

    for folder in (one, two):
        selected = load_from_disk(str(folder / "selected"))
        assert _histogram(np.asarray(selected["score"], dtype=np.float64)) in (folder / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_two_process_job_prints_each_info_line_once(one_and_two_processes):
    # Today both processes log the whole job at INFO: every line comes twice.
    _, _, stderr = one_and_two_processes
    info = [line for line in stderr.splitlines() if line.startswith("INFO ")]
    assert any("Selection written to" in line for line in info)
    twice = {line: c for line, c in Counter(info).items() if c > 1}
    assert not twice, twice
    assert not [line for line in stderr.splitlines() if line.startswith("[rank 1/2] INFO")]


def test_the_rows_ranked_above_each_query_are_counted_exactly_with_ties_and_nan():
    from hf_otselect.threshold import rows_above as _better_counts

    rng = np.random.default_rng(3)
    n = 3_000
    score = rng.integers(0, 6, n).astype(np.float64) / 5  # many exact ties (TSDS scores most rows 0)
    score[rng.random(n) < 0.05] = np.nan
    index = rng.permutation(10 * n)[:n]
    q = rng.choice(n, 400, replace=False)
    q_score, q_index = score[q].copy(), index[q].copy()
    q_score[:50], q_index[:50] = rng.random(50), rng.integers(0, 10 * n, 50)  # queries from elsewhere too
    key, q_key = np.where(np.isnan(score), np.inf, -score), np.where(np.isnan(q_score), np.inf, -q_score)
    brute = ((key[None, :] < q_key[:, None]) | ((key[None, :] == q_key[:, None]) & (index[None, :] < q_index[:, None]))).sum(axis=1)
    np.testing.assert_array_equal(_better_counts(score, index, q_score, q_index), brute)
