"""The selection report: what was selected and why, before anyone trains on it.

:func:`write_report` reads a job's output folder (``selection.json`` and ``report_data/``: the
reduced summaries and the bounded, keyed sample of rows the job computed where its rows lived, see
:mod:`hf_otselect.report_data`) and writes into it

- ``report.html``: a self-contained page (inline CSS, no script, no network) that shows the pool's
  score distribution with the selection threshold, a 2-D projection of pool / target / selection,
  the make-up of the selection by categorical columns, the budget curve (OT distance between the
  target and the pool warmed with the top-k, against k, for the run's ranking and a random one),
  the near-duplicate rate of the selection, a sample of selected rows with their nearest target
  examples and the method's reason for choosing them, and the provenance from ``selection.json``;
- ``report_files/*.png``: the figures the page shows (matplotlib, Agg canvas);
- ``report.json``: every number the page shows, so users and tests can check them.

The report never reads a per-row array of the whole pool: histograms, extremes, means and per-value
counts cover every row (summed where the rows live); projections, examples, near-duplicates and
the budget curve use the sample (at most ``sample_rows`` rows, default 20,000), and say so when the
sample is not the whole pool. A folder without ``report_data/`` (a job run with ``report: false``)
gets it computed here from ``scored/`` and the saved embeddings (``embeddings/pool.npy`` or the
per-process ``pool-RANK-of-WORLD.npy``), in blocks. The OT figures are computed with
:mod:`hf_otselect.ot` under its conventions (cost ``||x - y||^2``). Without vectors the page says so
and leaves the embedding-based parts out.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import report_data
from ._checks import check_float, check_int, check_seed, param_error
from .report_data import ReportData

logger = logging.getLogger(__name__)

__all__ = ["budget_curve", "near_duplicate_pairs", "write_report"]

MAX_SCATTER_POOL = 5000  # pool points drawn in the projection (a deterministic sample beyond)
MAX_CURVE_POOL = 2000  # pool points behind each budget-curve OT solve (weighted sample beyond)
MAX_CURVE_TARGET = 1000  # target points behind each budget-curve OT solve
MAX_DUPLICATE_ROWS = 20000  # selected rows compared pairwise (exact below, a sample above)
MAX_PLAN_PAIRS = 200_000_000  # pool x target pairs beyond which the GOT-D plan is not re-solved
CURVE_EPS = 0.1  # ot.py's default, which the job's selection.json OT distances use too
MAX_CATEGORIES = 20  # categories shown per column; the rest are pooled as "(other)"
TEXT_CHARS = 400
TARGET_TEXT_CHARS = 200
N_NEAREST = 3
N_TOP_PAIRS = 5
_OWNER = "write_report"


# ----------------------------------------------------------------------------------------------
# Reusable computations (numpy in, numpy/python out)
# ----------------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def near_duplicate_pairs(
    embeddings: np.ndarray, threshold: float = 0.95, *, block_size: int = 1024, top: int = N_TOP_PAIRS
) -> dict[str, Any]:
    """Count the pairs of rows whose cosine similarity is above ``threshold``, exactly.

    All ``n (n - 1) / 2`` pairs are compared by blockwise matrix products, so memory stays at
    ``block_size * n`` floats whatever ``n``.

    Parameters
    ----------
    embeddings : ndarray of shape (n, dim)
        One row per (distinct) selected example; normalised to unit length here.
    threshold : float, default 0.95
        A pair counts when its cosine is strictly greater.
    block_size : int, default 1024
        Rows per block of the product.
    top : int, default 5
        How many of the most similar pairs above the threshold to return.

    Returns
    -------
    dict
        ``rows`` (n), ``pairs_total``, ``pairs_above``, ``pair_rate`` (pairs_above / pairs_total, 0
        when n < 2), ``rows_with_partner`` (rows in at least one counted pair), ``row_rate``
        (rows_with_partner / n) and ``top_pairs``: a list of ``(i, j, cosine)`` with ``i < j``,
        most similar first.
    """
    x = _unit_rows(embeddings)
    n = len(x)
    pairs_above = 0
    has_partner = np.zeros(n, dtype=bool)
    best: list[tuple[float, int, int]] = []
    for s in range(0, n, block_size):
        e = min(n, s + block_size)
        sims = x[s:e] @ x.T  # (block, n)
        # keep only j > i: the strict upper triangle of the full matrix
        sims[np.arange(e - s)[:, None] >= (np.arange(n)[None, :] - s)] = -np.inf
        hit_i, hit_j = np.nonzero(sims > threshold)
        pairs_above += int(hit_i.size)
        has_partner[hit_i + s] = True
        has_partner[hit_j] = True
        if top and hit_i.size:
            vals = sims[hit_i, hit_j]
            keep = np.argsort(-vals, kind="stable")[:top]
            best.extend((float(vals[t]), int(hit_i[t] + s), int(hit_j[t])) for t in keep)
            best = sorted(best, key=lambda p: (-p[0], p[1], p[2]))[:top]
    total = n * (n - 1) // 2
    return {
        "rows": n,
        "pairs_total": total,
        "pairs_above": pairs_above,
        "pair_rate": pairs_above / total if total else 0.0,
        "rows_with_partner": int(has_partner.sum()),
        "row_rate": float(has_partner.sum() / n) if n else 0.0,
        "top_pairs": [(i, j, c) for c, i, j in best],
    }


def budget_curve(
    pool: np.ndarray,
    target: np.ndarray,
    ranking: np.ndarray,
    ks: Sequence[int],
    *,
    max_pool: int = MAX_CURVE_POOL,
    max_target: int = MAX_CURVE_TARGET,
    seed: int = 0,
    **ot_kwargs: Any,
) -> dict[str, Any]:
    """OT distance between the target and the pool warmed with the first ``k`` rows of a ranking.

    The warmed pool is the pool plus its ``k`` best-ranked rows added once more (the data a model
    sees when it is pre-fine-tuned on the selection after pre-training on the pool, GOT-D Sec. 2).
    It is passed to :func:`hf_otselect.ot.sinkhorn_potentials` as weights on the pool's points
    (weight 1 per pool row, +1 per added row), so the value is exact and each ``k`` costs one solve
    on at most ``n + k`` points. A pool larger than ``max_pool`` is replaced by a seeded uniform sample
    whose rows weigh ``n / max_pool`` each, more than ``max_pool`` added rows by a seeded sample of
    ``max_pool`` of them weighing ``k / max_pool`` each, and a target larger than ``max_target`` by
    a seeded sample.

    Parameters
    ----------
    pool : ndarray of shape (n, dim)
    target : ndarray of shape (m, dim)
    ranking : ndarray of shape (n,), int
        Pool rows, best first (a permutation of ``range(n)``).
    ks : sequence of int
        Budgets, each in ``[0, n]``.
    max_pool, max_target : int
        Sample sizes beyond which the clouds are subsampled.
    seed : int, default 0
        Seed of the subsamples.
    **ot_kwargs
        Passed to :func:`~hf_otselect.ot.sinkhorn_potentials` (``eps``, ``eps_mode``, ...).

    Returns
    -------
    dict
        ``k`` (list of int), ``distance`` (list of float: the entropic OT value, cost
        ``||x - y||^2``), ``converged`` (all solves converged; the solver's warnings are
        silenced and summed up here), ``pool_rows_used`` and
        ``target_rows_used`` (sizes of the samples, equal to n and m when not subsampled).
    """
    from .ot import sinkhorn_potentials

    n, m = len(pool), len(target)
    rng = np.random.default_rng(seed)
    if n > max_pool:
        base = np.sort(rng.choice(n, size=max_pool, replace=False))
        base_weight = n / max_pool
    else:
        base, base_weight = np.arange(n), 1.0
    tgt = target if m <= max_target else target[np.sort(rng.choice(m, size=max_target, replace=False))]
    ranking = np.asarray(ranking, dtype=np.int64)
    distances: list[float] = []
    converged = True
    for k in ks:
        weight = np.zeros(n)
        weight[base] += base_weight
        added = ranking[:k]
        if k > max_pool:  # many added rows: a seeded sample of them, weighted k / max_pool each
            added = np.random.default_rng([seed, k]).choice(added, size=max_pool, replace=False)
        np.add.at(weight, added, k / len(added) if len(added) else 1.0)
        support = np.flatnonzero(weight)
        with warnings.catch_warnings():  # non-convergence is reported through `converged`
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sinkhorn_potentials(pool[support], tgt, a=weight[support], **ot_kwargs)
        distances.append(float(res.cost))
        converged &= res.converged
    return {"k": [int(k) for k in ks], "distance": distances, "converged": bool(converged),
            "pool_rows_used": int(len(base)), "target_rows_used": int(len(tgt))}


# ----------------------------------------------------------------------------------------------
# Reading the run: selection.json plus the report data (reduced summaries and a keyed sample)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the report reads: ``selection.json`` and the :class:`~hf_otselect.report_data.ReportData`.

    The per-row arrays are those of the bounded sample (at most ``sample_rows`` rows, in pool
    order), never of the whole pool; whole-pool figures come from ``summary``.
    """

    folder: Path
    prov: dict[str, Any]
    score_column: str
    text_column: str | None
    data: ReportData
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        sample = self.data.summary["sample"]
        self.index = np.asarray(sample["pool_index"], dtype=np.int64)  # (s,) sorted
        self.scores = np.asarray(sample["score"], dtype=np.float64)
        self.ranks = np.asarray(sample["rank"], dtype=np.int64)
        self.draws = np.asarray(sample["draws"], dtype=np.int64)
        self.in_pool = np.asarray(sample["in_pool_sample"], dtype=bool)
        self.in_chosen = np.asarray(sample["in_chosen_sample"], dtype=bool)
        self.texts: list[str | None] = list(sample["text"])
        self.columns: dict[str, list[str]] = dict(sample["columns"])

    @property
    def summary(self) -> dict[str, Any]:
        return self.data.summary

    @property
    def n(self) -> int:
        """Rows of the whole pool."""
        return int(self.summary["rows"])

    @property
    def draws_total(self) -> int:
        """Rows of the selection (draws, repeats counted)."""
        return int(self.summary["selected"]["draws"])

    @property
    def distinct(self) -> int:
        return int(self.summary["selected"]["distinct"])

    @property
    def pool_emb(self) -> np.ndarray | None:
        """The sampled rows' vectors ``(s, dim)`` (None without vectors)."""
        return self.data.vectors if self.data.target is not None else None

    @property
    def target_emb(self) -> np.ndarray | None:
        return self.data.target if self.data.vectors is not None else None

    def chosen_by_rank(self) -> np.ndarray:
        """Sample positions of the chosen sample, best-ranked first."""
        pos = np.flatnonzero(self.in_chosen)
        return pos[np.argsort(self.ranks[pos], kind="stable")]

    def text(self, pos: int) -> str:
        t = self.texts[pos]
        return "" if t is None else t


def _load_run(folder: Path, columns: Sequence[str] | None, seed: int | None, sample_rows: int | None) -> tuple[_Run, list[str], int]:
    """``selection.json`` and the report data: the job's ``report_data/`` when it answers the request, else computed from the folder."""
    if not (folder / "selection.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a selection output folder: missing ['selection.json'].")
    prov = json.loads((folder / "selection.json").read_text(encoding="utf-8"))
    config = prov.get("config") or {}
    score_column = config.get("score_column", "score")
    if columns is None:
        columns = prov.get("report_columns", config.get("report_columns")) or []
    columns = list(columns)
    data = report_data.load(folder)
    saved = data.summary if data is not None else {}
    job_seed = prov.get("seed") if isinstance(prov.get("seed"), int) and not isinstance(prov.get("seed"), bool) else 0
    want_seed = seed if seed is not None else saved.get("seed", job_seed)
    want_rows = sample_rows if sample_rows is not None else saved.get("sample_rows", report_data.DEFAULT_SAMPLE_ROWS)
    notes: list[str] = []
    if (data is not None and saved.get("seed") == want_seed and saved.get("sample_rows") == want_rows
            and set(columns) <= set(saved.get("composition", {}))):
        if data.vectors is None or data.target is None:
            notes.append("The job had no vectors to sample (a text selector that embedded nothing), so the projection, "
                         "budget curve, near-duplicate rate, nearest target examples and transported mass are left out.")
        return _Run(folder, prov, score_column, (config.get("pool") or {}).get("column", "text"), data, notes), columns, int(want_seed)
    # No report data saved (report: false), or another seed, sample size or columns asked for: from the folder.
    from datasets import load_from_disk

    missing = [p for p in ("scored", "selected") if not (folder / p).exists()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a selection output folder: missing {missing}.")
    names = load_from_disk(str(folder / "scored")).column_names  # memory-mapped: the schema only
    for name in ("pool_index", score_column, *columns):
        if name not in names:
            raise ValueError(f"Column {name!r} not in the scored split. Current columns: {names}")
    text_column = (config.get("pool") or {}).get("column", "text")
    if text_column not in names:
        text_column = None
    data = report_data.from_folder(folder, score_column=score_column, text_column=text_column, columns=columns,
                                   seed=want_seed, sample_rows=want_rows, notes=notes)
    return _Run(folder, prov, score_column, text_column, data, notes), columns, int(want_seed)


def _target_texts(run: _Run) -> list[str] | None:
    """The target's texts when its source (config.target) still loads and matches the embeddings."""
    spec = (run.prov.get("config") or {}).get("target")
    if not spec or not spec.get("path") or run.target_emb is None:  # e.g. a target passed as vectors
        return None
    from .config import DataConfig
    from .inputs import load_split

    try:
        data = load_split(DataConfig(**spec), "target")
        column = spec.get("column", "text")
        if hasattr(data, "with_format") and hasattr(data, "__len__"):  # a map-style Dataset: bulk read
            texts = [str(t) for t in data.with_format("arrow")[column].to_pylist()]
        else:
            texts = [str(row[column]) for row in data]
    except Exception as err:  # noqa: BLE001 - the texts are optional: a moved file, an offline Hub or a
        # loader bug must not fail the job that calls the report before renaming its output into place
        logger.warning("Target texts not reloaded from %r: %r", spec.get("path"), err)
        run.notes.append(f"The target's texts could not be read back from {spec.get('path')!r} ({err}); target rows are shown by index.")
        return None
    if len(texts) != len(run.target_emb):
        run.notes.append(f"The target source now has {len(texts)} rows, not the {len(run.target_emb)} embedded; target rows are shown by index.")
        return None
    return texts


# ----------------------------------------------------------------------------------------------
# Sections: each returns (numbers for report.json, html fragment)
# ----------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "n/a" if not math.isfinite(x) else format(float(x), ".6g")
    return str(x)


def _num(key: str, x: Any) -> str:
    """A number on the page, tagged so tests can find it by id."""
    return f'<span class="num" id="{_esc(key)}">{_esc(_fmt(x))}</span>'


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    # Figure + its own Agg canvas: no pyplot, so no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, assets: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(assets / name, format="png")
    return f'<img src="report_files/{_esc(name)}" alt="{_esc(name)}">'


def _score_section(run: _Run, top_k: bool, assets: Path) -> tuple[dict[str, Any], str]:
    s, sel = run.summary["score"], run.summary["selected"]
    out: dict[str, Any] = {
        "column": run.score_column, "choice": "top_k" if top_k else "sampled",
        "pool_min": s["min"], "pool_max": s["max"], "pool_mean": s["mean"], "pool_median": s["median"],
        "selected_min": sel["min"], "selected_max": sel["max"], "selected_mean": sel["mean"], "selected_median": sel["median"],
        "pool_median_exact": s["median_exact"], "selected_median_exact": sel["median_exact"],
    }
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.asarray(s["hist_edges"])
    if edges.size:  # the histograms were counted where the rows live, then summed: no row is read here
        ax.stairs(s["hist_pool"], edges, fill=True, color="#9aa5b1", label=f"pool ({run.n} rows)")
    draws = run.draws_total
    if top_k:
        out["threshold"] = sel["min"]
        out["n_at_or_above_threshold"] = int(run.summary["at_or_above_threshold"])
        if edges.size:
            ax.stairs(s["hist_selected"], edges, fill=True, color="#1f6fb4", label=f"selected ({draws} rows)")
        ax.axvline(out["threshold"], color="#c0392b", ls="--", label=f"threshold {_fmt(out['threshold'])}")
        text = (f"Top-k choice: the {_num('selected-rows', draws)} rows with the highest <code>{_esc(run.score_column)}</code> "
                f"were selected; the threshold (lowest selected score) is {_num('score-threshold', out['threshold'])}, "
                f"and {_num('score-at-or-above', out['n_at_or_above_threshold'])} pool rows score at or above it (ties included).")
    else:
        out["n_zero"] = int(s["zero_rows"])
        out["draws"] = draws
        out["distinct_selected"] = run.distinct
        if edges.size:
            ax.stairs(s["hist_selected"], edges, fill=True, color="#1f6fb4", alpha=0.8, label=f"selected draws ({draws})")
        ax.set_yscale("log")
        text = (f"Sampled choice (the selection is not the k best-ranked rows): rows were drawn with probability "
                f"proportional to <code>{_esc(run.score_column)}</code>. {_num('selected-rows', draws)} draws, "
                f"{_num('selected-distinct', out['distinct_selected'])} distinct rows; "
                f"{_num('score-zero', out['n_zero'])} of {run.n} pool rows have score 0 and can never be drawn.")
    if not (s["median_exact"] and sel["median_exact"]):
        text += (f" The histograms, extremes and means cover every row; the medians are those of the report's keyed sample "
                 f"({run.summary['pool_sample_rows']} pool rows, {run.summary['chosen_sample_rows']} distinct selected rows).")
    ax.set_xlabel(run.score_column + " (higher = select)", parse_math=False)
    ax.set_ylabel("rows")
    ax.legend(loc="best", fontsize=8)
    img = _save(fig, assets, "scores.png")
    stats = _table(["", "min", "median", "mean", "max"], [
        ["pool", _num("score-pool-min", out["pool_min"]), _num("score-pool-median", out["pool_median"]),
         _num("score-pool-mean", out["pool_mean"]), _num("score-pool-max", out["pool_max"])],
        ["selected", _num("score-selected-min", out["selected_min"]), _num("score-selected-median", out["selected_median"]),
         _num("score-selected-mean", out["selected_mean"]), _num("score-selected-max", out["selected_max"])],
    ], raw=True)
    return out, f"<p>{text}</p>{img}{stats}"


def _keyed_first(run: _Run, pos: np.ndarray, limit: int, chosen: bool) -> np.ndarray:
    """At most ``limit`` of these sample positions: those with the smallest sample keys (a uniform sub-sample), in pool order."""
    if pos.size <= limit:
        return pos
    keys = report_data.sample_keys(run.summary["seed"], run.index[pos], chosen=chosen)
    return np.sort(pos[np.argsort(keys, kind="stable")[:limit]])


def _projection_section(run: _Run, seed: int, assets: Path) -> tuple[dict[str, Any], str]:
    assert run.pool_emb is not None and run.target_emb is not None
    shown = _keyed_first(run, np.flatnonzero(run.in_pool), MAX_SCATTER_POOL, chosen=False)
    chosen = _keyed_first(run, np.flatnonzero(run.in_chosen), MAX_SCATTER_POOL, chosen=True)
    fit = np.concatenate([run.pool_emb[shown], run.target_emb])
    method = "PCA"
    try:
        import umap  # optional: used only when installed
    except ImportError:
        umap = None
    if umap is not None:
        reducer = umap.UMAP(n_components=2, random_state=seed).fit(fit)
        method, ratio = "UMAP", None
    else:
        from sklearn.decomposition import PCA

        from threadpoolctl import threadpool_limits

        # The d x d covariance route is exact and far cheaper than an SVD of the (n, d) data. One
        # BLAS thread: once torch's OpenMP pool has run, a multi-threaded OpenBLAS eigh of 384 x 384
        # was measured here at 4.7 s against 0.05 s single-threaded.
        with threadpool_limits(limits=1, user_api="blas"):
            reducer = PCA(n_components=2, svd_solver="covariance_eigh").fit(fit)
        ratio = [float(r) for r in reducer.explained_variance_ratio_]
    p_pool, p_tgt, p_sel = (reducer.transform(a) for a in (run.pool_emb[shown], run.target_emb, run.pool_emb[chosen]))
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    ax.scatter(p_pool[:, 0], p_pool[:, 1], s=5, c="#b8c2cc", label=f"pool ({len(shown)} shown)", linewidths=0)
    ax.scatter(p_tgt[:, 0], p_tgt[:, 1], s=14, c="#e67e22", marker="^", label=f"target ({len(p_tgt)})", linewidths=0)
    ax.scatter(p_sel[:, 0], p_sel[:, 1], s=9, c="#1f6fb4", label=f"selected ({len(chosen)} shown)", linewidths=0)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.legend(loc="best", fontsize=8, markerscale=2)
    img = _save(fig, assets, "projection.png")
    n = run.n
    out = {"method": method, "explained_variance_ratio": ratio, "pool_points": int(len(shown)),
           "selected_points": int(len(chosen)), "target_points": int(len(p_tgt)), "pool_subsampled": bool(len(shown) < n)}
    text = f"{_esc(method)} of the embeddings, fitted on the pool points shown and the target."
    if ratio is not None:
        kept = ratio[0] + ratio[1]
        out["explained_variance_total"] = float(kept)
        text += (f" Explained variance: {_num('pca-var-1', ratio[0])} and {_num('pca-var-2', ratio[1])}, so this picture "
                 f"keeps {100 * kept:.1f}% of the spread of the embeddings")
        if kept < 0.5:
            text += (" and drops the rest: points that overlap here can be far apart, and separate clusters can look "
                     "mixed. Judge closeness by the OT distances and the nearest-target cosines of this page, not by this "
                     "picture; installing <code>umap-learn</code> switches it to UMAP, which keeps neighbourhoods instead.")
        else:
            text += "."
    else:
        text += (" UMAP keeps each point's neighbours close but not distances or cluster sizes: read the picture as "
                 "'which points sit together', not 'how far'.")
    if out["pool_subsampled"]:
        text += (f" The pool has {n} rows: a keyed uniform sample of {len(shown)} is drawn (each row's key a uniform of "
                 f"seed {run.summary['seed']} and its row index, the same for any number of processes).")
    if len(chosen) < run.distinct:
        text += f" Likewise {len(chosen)} of the {run.distinct} selected rows."
    return out, f"<p>{text}</p>{img}"


def _composition_section(run: _Run, column: str, assets: Path, index: int) -> tuple[dict[str, Any], str]:
    counts = run.summary["composition"][column]  # per-value counts summed over the processes
    pool_counts, sel_counts = Counter(counts["pool"]), Counter(counts["selected"])
    pooled_pool, pooled_sel = counts.get("pooled_rows", [0, 0])
    n_pool, n_sel = sum(pool_counts.values()) + pooled_pool, sum(sel_counts.values()) + pooled_sel
    order = sorted(pool_counts, key=lambda v: (-sel_counts.get(v, 0), -pool_counts[v], v))
    shown, rest = order[:MAX_CATEGORIES], order[MAX_CATEGORIES:]
    rows = [{"value": v, "pool": pool_counts[v], "pool_frac": pool_counts[v] / n_pool,
             "selected": sel_counts.get(v, 0), "selected_frac": sel_counts.get(v, 0) / n_sel if n_sel else 0.0} for v in shown]
    if rest or pooled_pool:
        p, q = sum(pool_counts[v] for v in rest) + pooled_pool, sum(sel_counts.get(v, 0) for v in rest) + pooled_sel
        many = f"{len(rest)}" if not pooled_pool else f"over {len(rest)}"
        rows.append({"value": f"(other: {many} values)", "pool": p, "pool_frac": p / n_pool,
                     "selected": q, "selected_frac": q / n_sel if n_sel else 0.0})
    fig = _figure(7.0, 0.9 + 0.35 * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [100 * r["pool_frac"] for r in rows], height=0.4, color="#9aa5b1", label="pool")
    ax.barh(y + 0.2, [100 * r["selected_frac"] for r in rows], height=0.4, color="#1f6fb4", label="selected")
    # Data values and column names are the user's text, not mathtext: "$x^$" would fail the render.
    ax.set_yticks(y, [_truncate(r["value"], 30) for r in rows], fontsize=8, parse_math=False)
    ax.invert_yaxis()
    ax.set_xlabel(f"% of rows, by '{column}'", parse_math=False)
    ax.legend(loc="lower right", fontsize=8)
    img = _save(fig, assets, f"composition_{index}.png")
    body = [[_esc(r["value"]), _num(f"comp-{index}-{i}-pool", r["pool"]), f"{100 * r['pool_frac']:.1f}%",
             _num(f"comp-{index}-{i}-selected", r["selected"]), f"{100 * r['selected_frac']:.1f}%",
             _fmt(r["selected_frac"] / r["pool_frac"]) if r["pool_frac"] else "n/a"] for i, r in enumerate(rows)]
    table = _table([_esc(column), "pool rows", "pool %", "selected rows", "selected %", "selected % / pool %"], body, raw=True)
    return {"column": column, "pool_rows": n_pool, "selected_rows": n_sel, "values": rows}, f"<h3>{_esc(column)}</h3>{img}{table}"


def _curve_ks(k: int, n: int) -> list[int]:
    """A handful of budgets around the run's k: 0, k/4, k/2, k, 2k, 4k (clipped to the pool)."""
    return sorted({min(n, v) for v in (0, k // 4, k // 2, k, 2 * k, 4 * k)})


def _budget_section(run: _Run, seed: int, top_k: bool, assets: Path) -> tuple[dict[str, Any], str]:
    """The budget curve on the report's sample, as weights on its rows (exact when the sample holds the pool).

    The warmed pool of a ranking at budget ``k'`` is the pool plus its top-``k'`` rows once more.
    The pool is the pool sample (``P``, at most :data:`MAX_CURVE_POOL` rows by key), each row
    weighing ``n / |P|``. The added rows are strata of known size: with a top-k selection, the top
    ``min(k', k)`` rows are those of the chosen sample (a uniform sample of the selection) ranked
    that high, weighing ``min(k', k)`` in all; the rows ranked ``k + 1 .. k'`` (and, for a sampled
    selection, all of the top ``k'``) are the pool sample's rows ranked there, ``n / |P|`` each.
    The random ranking adds the first ``min(k', |P|)`` rows of a seeded permutation of ``P``,
    weighing ``k'`` in all.
    """
    from .ot import sinkhorn_potentials

    assert run.pool_emb is not None and run.target_emb is not None
    k, n = run.draws_total, run.n
    ks = _curve_ks(k, n)
    pool = _keyed_first(run, np.flatnonzero(run.in_pool), MAX_CURVE_POOL, chosen=False)
    chosen = _keyed_first(run, np.flatnonzero(run.in_chosen), MAX_CURVE_POOL, chosen=True)
    unit = n / pool.size
    base = np.zeros(run.index.size)
    base[pool] = unit
    perm = pool[np.random.default_rng(seed).permutation(pool.size)]
    m = len(run.target_emb)
    tgt = run.target_emb if m <= MAX_CURVE_TARGET else run.target_emb[np.sort(np.random.default_rng(seed).choice(m, size=MAX_CURVE_TARGET, replace=False))]

    def method_added(kk: int) -> np.ndarray:
        add = np.zeros(run.index.size)
        low = 0
        if top_k:  # the selection is the top k: its uniform sample stands for the top min(kk, k)
            low = min(kk, run.distinct)
            inside = chosen[run.ranks[chosen] <= low]
            if inside.size:
                add[inside] += low / inside.size
        rest = pool[(run.ranks[pool] > low) & (run.ranks[pool] <= kk)]
        add[rest] += unit
        return add

    def random_added(kk: int) -> np.ndarray:
        add = np.zeros(run.index.size)
        first = perm[: min(kk, perm.size)]
        if first.size:
            add[first] += kk / first.size
        return add

    converged = True

    def solve(weights: np.ndarray) -> float:
        nonlocal converged
        support = np.flatnonzero(weights)
        with warnings.catch_warnings():  # non-convergence is reported through `converged`
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sinkhorn_potentials(run.pool_emb[support], tgt, a=weights[support], eps=CURVE_EPS)
        converged &= res.converged
        return float(res.cost)

    ours = [solve(base + method_added(kk)) for kk in ks]
    rand = ours[:1] + [solve(base + random_added(kk)) for kk in ks[1:]]  # k = 0 is the unwarmed pool for both
    method = str(run.prov.get("method", "method"))
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(ks, ours, "o-", color="#1f6fb4", label=f"{method} ranking")
    ax.plot(ks, rand, "s--", color="#9aa5b1", label=f"random ranking (seed {seed})")
    ax.axvline(k, color="#c0392b", ls=":", label=f"selected k = {k}")
    ax.set_xlabel("k (top-k rows added to the pool once more)")
    ax.set_ylabel("OT distance to the target")
    ax.legend(loc="best", fontsize=8)
    img = _save(fig, assets, "budget_curve.png")
    exact = pool.size == n and (not top_k or chosen.size == run.distinct)
    out = {"k": ks, "method": ours, "random": rand, "converged": converged, "computed_on": "pool" if exact else "sample",
           "pool_rows_used": int(pool.size), "selected_rows_used": int(chosen.size) if top_k else 0,
           "target_rows_used": int(len(tgt)), "eps": CURVE_EPS, "eps_mode": "absolute"}
    body = [[_fmt(kk), _num(f"curve-method-{i}", a), _num(f"curve-random-{i}", b)] for i, (kk, a, b) in enumerate(zip(ks, ours, rand))]
    text = (f"Entropic OT distance (hf_otselect.ot, cost ||x&minus;y||&sup2;, &epsilon; = {CURVE_EPS} absolute) between the target and "
            "the pool warmed with the top-k rows of each ranking (the pool plus those rows once more), from the "
            "run's one scoring pass (the <code>rank</code> column). Lower means the warmed pool is closer to the target.")
    if exact:
        text += " Computed on the whole pool: every row is in the report's sample."
    else:
        text += (f" Computed on the report's sample, not the whole pool of {n} rows: the pool is a keyed uniform sample of "
                 f"{pool.size} rows, weighted {unit:.3g} each")
        text += (f"; the top min(k, {run.distinct}) rows are a keyed sample of {chosen.size} selected rows weighted to "
                 f"their number, and the rows ranked below the selection those of the pool sample." if top_k else
                 "; the added rows are the pool sample's rows of those ranks, weighted alike.")
    if out["target_rows_used"] < m:
        text += f" The target is sampled to {out['target_rows_used']} of {m} rows."
    if not converged:
        text += " <strong>Some Sinkhorn solves did not reach the tolerance; the values are approximate.</strong>"
    return out, f"<p>{text}</p>{img}" + _table(["k", f"{_esc(method)} ranking", "random ranking"], body, raw=True)


def _duplicates_section(run: _Run, threshold: float) -> tuple[dict[str, Any], str]:
    assert run.pool_emb is not None
    compared = _keyed_first(run, np.flatnonzero(run.in_chosen), MAX_DUPLICATE_ROWS, chosen=True)
    res = near_duplicate_pairs(run.pool_emb[compared], threshold)
    pairs = [(int(compared[i]), int(compared[j]), c) for i, j, c in res.pop("top_pairs")]
    out = {**res, "threshold": threshold, "repeated_draws": run.draws_total - run.distinct,
           "distinct_selected": run.distinct, "sampled": bool(compared.size < run.distinct),
           "top_pairs": [{"a": int(run.index[a]), "b": int(run.index[b]), "cosine": c} for a, b, c in pairs]}
    text = (f"Pairs of distinct selected rows with cosine similarity above {_num('dup-threshold', threshold)}: "
            f"{_num('dup-pairs', res['pairs_above'])} of {_num('dup-pairs-total', res['pairs_total'])} pairs "
            f"({_num('dup-pair-rate', res['pair_rate'])}); {_num('dup-rows', res['rows_with_partner'])} of "
            f"{res['rows']} rows have at least one near-duplicate (rate {_num('dup-row-rate', res['row_rate'])}).")
    if out["repeated_draws"]:
        text += f" The selection also repeats rows: {_num('dup-repeats', out['repeated_draws'])} extra draws of rows already drawn."
    if out["sampled"]:
        text += f" Computed exactly on a keyed sample of {compared.size} of the {run.distinct} distinct selected rows."
    rows = [[_fmt(int(run.index[a])), _fmt(int(run.index[b])), _fmt(c), _esc(_truncate(run.text(a), TARGET_TEXT_CHARS)),
             _esc(_truncate(run.text(b), TARGET_TEXT_CHARS))] for a, b, c in pairs]
    table = _table(["pool_index", "pool_index", "cosine", "text", "text"], rows, raw=True) if rows else ""
    return out, f"<p>{text}</p>{table}"


def _got_d_plan(run: _Run) -> tuple[dict[str, Any] | None, Any]:
    """Re-solve the GOT-D problem (the sampled pool rows as ``x``, target as ``y``) for the plan's rows.

    The sample is the whole pool when the pool fits in it; beyond, the plan is that of the
    sample's rows (stated on the page). Uses the run's ``eps``/``eps_mode``/``tol``/``max_iter``
    params when recorded (else ot.py's defaults). The agreement of ``-f`` with the run's scores
    (Spearman) is reported so a reader sees whether the recomputed plan is the one that ranked the
    rows (GOT-D's chunked mode, a negative target or a sample rank by other potentials).
    """
    assert run.pool_emb is not None and run.target_emb is not None
    if run.index.size * len(run.target_emb) > MAX_PLAN_PAIRS:
        run.notes.append(f"The GOT-D plan is not re-solved for the examples: {run.index.size} x {len(run.target_emb)} pairs is over the report's limit of {MAX_PLAN_PAIRS}.")
        return None, None
    from scipy.stats import spearmanr

    from .ot import EPS_MODES, sinkhorn_potentials

    params = run.prov.get("params") or {}
    kw: dict[str, Any] = {}
    if isinstance(params.get("eps"), (int, float)) and not isinstance(params.get("eps"), bool):
        kw["eps"] = float(params["eps"])
    if params.get("eps_mode") in EPS_MODES:
        kw["eps_mode"] = params["eps_mode"]
    if isinstance(params.get("tol"), float):
        kw["tol"] = params["tol"]
    if isinstance(params.get("max_iter"), int) and not isinstance(params.get("max_iter"), bool):
        kw["max_iter"] = params["max_iter"]
    res = sinkhorn_potentials(run.pool_emb, run.target_emb, **kw)
    rho = spearmanr(-res.f, run.scores).statistic
    info = {"eps": res.eps, "n_iter": res.n_iter, "converged": res.converged, "spearman_minus_f_vs_score": float(rho),
            "pool_rows": int(run.index.size), "whole_pool": bool(run.index.size == run.n)}
    return info, res


def _plan_row(run: _Run, res: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ``i`` (a sample position) of the plan ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` (ot.py's convention), and its costs."""
    assert run.pool_emb is not None and run.target_emb is not None
    x = run.pool_emb[i].astype(np.float64)
    cost = ((run.target_emb.astype(np.float64) - x) ** 2).sum(axis=1)
    n, m = run.index.size, len(run.target_emb)
    plan = np.exp((res.f[i] + res.g - cost) / res.eps) / (n * m)
    return plan, cost


def _examples_section(
    run: _Run, n_examples: int, columns: Sequence[str], top_k: bool
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str]:
    # the chosen sample's rows from best- to lowest-ranked (the selection order for top-k), then
    # evenly spaced ones along that order
    order = run.chosen_by_rank()
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(n_examples, len(order))).round().astype(int))] if n_examples else order[:0]
    if not len(picks):
        return [], None, ""
    method = run.prov.get("method")
    have_emb = run.pool_emb is not None and run.target_emb is not None
    target_texts = _target_texts(run) if have_emb else None
    plan_info, plan = _got_d_plan(run) if (have_emb and method == "got_d") else (None, None)
    if have_emb:
        sims = _unit_rows(run.pool_emb[picks]) @ _unit_rows(run.target_emb).T
    total = run.summary["score"]["sum"]
    n_plan = run.index.size
    examples: list[dict[str, Any]] = []
    blocks: list[str] = []
    for t, p in enumerate(picks.tolist()):
        i = int(run.index[p])
        ex: dict[str, Any] = {"pool_index": i, "rank": int(run.ranks[p]), "score": float(run.scores[p]),
                              "text": _truncate(run.text(p), TEXT_CHARS)}
        facts = [f"pool_index {_fmt(i)}", f"rank {_num(f'ex-{t}-rank', ex['rank'])}",
                 f"{_esc(run.score_column)} {_num(f'ex-{t}-score', ex['score'])}"]
        if columns:
            ex["columns"] = {c: run.columns[c][p] for c in columns}
            facts += [f"{_esc(c)}: {_esc(v)}" for c, v in ex["columns"].items()]
        why = ""
        if not top_k:
            ex["draws"] = int(run.draws[p])
            ex["probability"] = float(run.scores[p] / total) if total > 0 else None
            why = (f"Drawn {_num(f'ex-{t}-draws', ex['draws'])} time(s) of {run.draws_total}; selection probability "
                   f"{_num(f'ex-{t}-prob', ex['probability'])} (its score over the pool's total; expected draws "
                   f"{_fmt(ex['probability'] * run.draws_total) if ex['probability'] is not None else 'n/a'}).")
        nearest_rows: list[list[str]] = []
        if have_emb:
            near = np.argsort(-sims[t], kind="stable")[:N_NEAREST]
            ex["nearest_target"] = [{"target_index": int(j), "cosine": float(sims[t, j]),
                                     "text": _truncate(target_texts[j], TARGET_TEXT_CHARS) if target_texts else None} for j in near]
            if plan is not None:
                plan_row, cost = _plan_row(run, plan, p)
                mass = float(plan_row.sum())
                ex["got_d"] = {"potential_f": float(plan.f[p]), "mass": mass,
                               "mean_cost": float((plan_row * cost).sum() / mass) if mass > 0 else None}
                top = np.argsort(-plan_row, kind="stable")[:N_NEAREST]
                ex["got_d"]["top_recipients"] = [{"target_index": int(j), "mass_share": float(plan_row[j] / mass),
                                                   "cost": float(cost[j])} for j in top]
                why = (f"GOT-D ranks rows by how much adding a little more of them would shrink the OT distance from the "
                       f"pool to the target; this row's value is {_num(f'ex-{t}-f', -plan.f[p])} (higher is better; it is &minus;f, "
                       f"the negated dual potential). In the transport plan its mass {_num(f'ex-{t}-mass', mass)} (1/n = {_fmt(1 / n_plan)}) "
                       f"goes at a mean squared distance of {_num(f'ex-{t}-meancost', ex['got_d']['mean_cost'])} mostly to target rows "
                       + ", ".join(f"{r['target_index']} ({100 * r['mass_share']:.1f}%)" for r in ex["got_d"]["top_recipients"]) + ".")
            for r in ex["nearest_target"]:
                nearest_rows.append([_fmt(r["target_index"]), _fmt(r["cosine"]), _esc(r["text"]) if r["text"] is not None else "<em>(text unavailable)</em>"])
        block = (f'<div class="example"><div class="facts">{" &middot; ".join(facts)}</div>'
                 f'<blockquote>{_esc(ex["text"])}</blockquote>')
        if why:
            block += f'<p class="why">{why}</p>'
        if nearest_rows:
            block += _table(["nearest target row", "cosine", "target text"], nearest_rows, raw=True)
        blocks.append(block + "</div>")
        examples.append(ex)
    intro = (f"{len(picks)} of the {run.distinct} distinct selected rows, evenly spaced from the best- to the "
             f"lowest-ranked" + ("" if len(order) == run.distinct else f" of a keyed sample of {len(order)} of them")
             + f". Texts are cut at {TEXT_CHARS} characters.")
    if plan_info is not None:
        intro += (f" The GOT-D plan is re-solved from the embeddings (&epsilon; = {_num('plan-eps', plan_info['eps'])}, "
                  f"{plan_info['n_iter']} iterations, converged: {plan_info['converged']}); its &minus;f agrees with the run's "
                  f"scores at Spearman {_num('plan-spearman', plan_info['spearman_minus_f_vs_score'])}. Each row's mass "
                  "is its row sum of the plan P<sub>ij</sub> = a<sub>i</sub> b<sub>j</sub> exp((f<sub>i</sub> + g<sub>j</sub> &minus; C<sub>ij</sub>)/&epsilon;) "
                  "(1/n at convergence, balanced OT).")
        if not plan_info["whole_pool"]:
            intro += (f" The pool has {run.n} rows, more than the report's sample: the plan is that of the {n_plan} sampled "
                      "pool rows against the target, so n above is the sample's size.")
        intro += (" Why the target rows a row sends its mass to can differ from its nearest target rows (the table): "
                  "the plan must give every target row exactly its share, so pool rows compete for the target rows they "
                  "are close to. A target row that many pool rows sit near is shared among them, and a row's mass also "
                  "goes to target rows that few pool rows cover. A row scores high when it covers such a target region that "
                  "the pool lacks; a row near only well-covered target rows scores lower even if its nearest cosine is high. "
                  "To get more rows like the top ones, add data near the target rows they send mass to.")
    return examples, plan_info, f"<p>{intro}</p>" + "".join(blocks)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for k in sorted(value):
            yield from _flatten(value[k], f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def _provenance_table(value: Any) -> str:
    rows = [[_esc(k), _esc(v if isinstance(v, str) else json.dumps(v))] for k, v in _flatten(value)]
    return _table(["key", "value"], rows, raw=True)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, raw: bool = False) -> str:
    cell = (lambda s: s) if raw else _esc
    thead = "".join(f"<th>{cell(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#1d2630;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #d5dbe1;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #d5dbe1;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f1f4f7}img{max-width:100%;display:block;margin:.5em 0}
.example{border:1px solid #d5dbe1;border-radius:6px;padding:.6em .9em;margin:.8em 0}
.facts{font-size:.85em;color:#52606d}blockquote{margin:.5em 0;padding-left:.8em;border-left:3px solid #1f6fb4}
.note{background:#fff8e1;border:1px solid #f0d58c;padding:.5em .8em;border-radius:4px}code{background:#f1f4f7;padding:0 .2em}
"""


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def write_report(
    output_dir: str | os.PathLike,
    *,
    columns: Sequence[str] | None = None,
    n_examples: int = 10,
    duplicate_threshold: float = 0.95,
    seed: int | None = None,
    sample_rows: int | None = None,
) -> Path:
    """Write ``report.html``, its figures and ``report.json`` into a selection output folder.

    Parameters
    ----------
    output_dir : str or path
        A job's output folder (``scored/``, ``selected/``, ``selection.json``; ``embeddings/``
        optional).
    columns : sequence of str, optional
        Categorical pool columns whose make-up in the selection is compared with the pool's
        (e.g. ``["domain"]``). None reads ``report_columns`` from ``selection.json``.
    n_examples : int, default 10
        Selected rows explained on the page (evenly spaced through the selection), ``>= 0``.
    duplicate_threshold : float, default 0.95
        Cosine above which two selected rows count as near-duplicates, in ``[-1, 1]``.
    seed : int, optional
        Seed of the keyed sample and of the budget curve's random ranking. None: the seed the job
        drew its report sample with (``report_data/``), else ``selection.json``'s seed.
    sample_rows : int, optional
        Rows the report reads at most (vectors, texts, ranks), ``>= 2``; every other figure comes
        from reduced summaries. None: the job's ``report_sample_rows``, else 20,000. A seed or size
        other than the job's (or a folder without ``report_data/``) recomputes the summaries from
        ``scored/`` and the saved embeddings, in blocks, with memory bounded by this size.

    Returns
    -------
    Path
        The path of ``report.html``.

    Raises
    ------
    FileNotFoundError
        ``output_dir`` is not a selection output folder.
    ValueError, TypeError
        On a bad parameter or a column that is not in the scored split (checked before any work).
    """
    n_examples = check_int(n_examples, "n_examples", _OWNER, 0)
    duplicate_threshold = check_float(duplicate_threshold, "duplicate_threshold", _OWNER, -1.0, 1.0)
    if seed is not None:
        seed = check_seed(seed, "seed", _OWNER)
    if sample_rows is not None:
        sample_rows = check_int(sample_rows, "sample_rows", _OWNER, 2)
    if columns is not None and (isinstance(columns, str) or not all(isinstance(c, str) for c in columns)):
        raise param_error("columns", _OWNER, "a sequence of column names (str) or None", columns, exc=TypeError)
    folder = Path(output_dir)
    run, columns, seed = _load_run(folder, columns, seed, sample_rows)
    if run.draws_total == 0:
        raise ValueError(f"The selected split in {str(folder)!r} is empty: nothing to report.")
    assets = folder / "report_files"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir()

    top_k = run.summary["choice"] == "top_k"
    have_emb = run.pool_emb is not None
    prov = run.prov
    numbers: dict[str, Any] = {"method": prov.get("method"), "k": prov.get("k"), "seed": seed,
                               "sample_rows": run.summary["sample_rows"],
                               "rows": {"pool": run.n, "selected": run.draws_total,
                                        "target": None if run.target_emb is None else int(len(run.target_emb))}}
    sections: list[tuple[str, str]] = []
    numbers["score"], frag = _score_section(run, top_k, assets)
    sections.append(("Scores", frag))
    if have_emb:
        numbers["projection"], frag = _projection_section(run, seed, assets)
        sections.append(("Pool, target and selection in 2-D", frag))
    numbers["composition"] = {}
    if columns:
        frags = []
        for i, col in enumerate(columns):
            numbers["composition"][col], frag = _composition_section(run, col, assets, i)
            frags.append(frag)
        sections.append(("Composition", "".join(frags)))
    if have_emb:
        numbers["budget_curve"], frag = _budget_section(run, seed, top_k, assets)
        sections.append(("Budget curve", frag))
        numbers["near_duplicates"], frag = _duplicates_section(run, duplicate_threshold)
        sections.append(("Near-duplicates in the selection", frag))
    numbers["examples"], plan_info, frag = _examples_section(run, n_examples, columns, top_k)
    if plan_info is not None:
        numbers["got_d_plan"] = plan_info
    if frag:
        sections.append(("Why these rows", frag))
    ot = prov.get("ot_distance") or {}
    if ot:
        numbers["ot_distance"] = ot
    for key, title in (("prefilter", "Pre-filter"), ("decontamination", "Decontamination")):
        if key in prov:
            sections.append((title, _provenance_table(prov[key])))
    sections.append(("Provenance (selection.json)", _provenance_table({k: v for k, v in prov.items() if k not in ("prefilter", "decontamination")})))
    numbers["notes"] = list(run.notes)

    summary = (f"<p><strong>{_esc(prov.get('method', '?'))}</strong> selected {_num('summary-selected', run.draws_total)} of "
               f"{_num('summary-pool', run.n)} pool rows" + (f" for a target of {_num('summary-target', len(run.target_emb))} rows" if run.target_emb is not None else "")
               + ".")
    if ot.get("target_pool") is not None and ot.get("target_selection") is not None:
        summary += (f" OT distance to the target (from selection.json): pool {_num('ot-target-pool', ot['target_pool'])}, "
                    f"selection {_num('ot-target-selection', ot['target_selection'])}.")
    summary += "</p>"
    notes = "".join(f'<p class="note">{_esc(n)}</p>' for n in run.notes)
    toc = "".join(f'<li><a href="#s{i}">{_esc(t)}</a></li>' for i, (t, _) in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{_esc(t)}</h2>{f}' for i, (t, f) in enumerate(sections))
    title = f"Selection report: {prov.get('method', '?')}, {run.draws_total} of {run.n} rows"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>Selection report</h1>{summary}{notes}<ul>{toc}</ul>{body}</body></html>\n")
    out = folder / "report.html"
    out.write_text(page, encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(numbers, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
    # Inside a job the folder is still <output_dir>.partial: the job logs the final path itself.
    (logger.debug if folder.name.endswith(".partial") else logger.info)("Report written to %s", out)
    from .outdir import record_written

    record_written(folder, [out, folder / "report.json", assets])  # ours: a later overwrite may replace them
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
