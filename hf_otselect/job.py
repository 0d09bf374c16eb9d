"""Run a selection job from a :class:`~hf_otselect.config.SelectionConfig`.

Outputs go to one folder (see DESIGN.md), which ``datasets.load_from_disk(output_dir)`` reads as a
``DatasetDict`` with the splits ``scored`` and ``selected``::

    <output_dir>/
      dataset_dict.json  the two splits below
      scored/            every pool row + pool_index, score, selected (times chosen), in pool order
      selected/          the chosen rows best (or first drawn) first + pool_index, score, rank (by
                         score in the pool, 1 = best), draw_order (sampling selectors)
      selection.json     provenance: method, params, model, fingerprints, version, seed, OT distances, timings
      embeddings/        pool.npy (pool-RANK-of-WORLD.npy per process), target.npy (when save_embeddings)
      prefilter/         the source ranking (when the pre-filter ran)
      decontaminated/    the pool rows removed as too close to the held-out split (when it removed any)
      README.md          the dataset card pushed with the selection
      selector/          the fit, kept: FittedSelector.from_pretrained(<output_dir>/selector) scores any
                         dataset or stream as this job scored the pool (save_pretrained files; absent
                         for a selector it cannot rebuild, see fitted_selector in selection.json)
      report_data/       the report's summaries, reduced over the processes, and its keyed sample (when report)
      report.html        and its PNGs (when report)

Everything is written to ``<output_dir>.partial/`` first and renamed into place only when complete,
so a crashed job never leaves an output that looks finished. Only a folder this package wrote is
ever removed or replaced, and one job at a time writes a given folder (see :mod:`hf_otselect.outdir`).
A rerun clears the partial folder and starts again; the embedding and score caches make that cheap (finished shards are not recomputed).

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE > 1``) each process takes a contiguous
shard of the pool, embeds it, joins the selector's fit through collectives (no process holds the
pool's vectors or scores), scores and writes its own rows; the rows chosen are the same for any
number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset, load_from_disk

from . import __version__, report_data
from ._checks import param_error, short_repr
from .config import SelectionConfig
from .datasets_ext import SelectionRun, _shard_of, best_first, run_selection
from .dist import Comm, agree, check_shared_folder, get_comm
from .embed import cache_root
from .outdir import OutputFolder
from .inputs import load_split

logger = logging.getLogger(__name__)

__all__ = ["load_split", "output_paths", "run_job"]




def write_best_first(folder: Path) -> None:
    """Rewrite a saved ``selected`` split (``save_to_disk`` folder) best first (see :func:`best_first`).

    A multi-process job saves each process's rows in pool order; the chosen rows are few (``k``),
    so process 0 reads them back (memory-mapped), orders them and saves them again in their place.
    """
    saved = load_from_disk(str(folder))
    ordered = best_first(saved)
    if ordered is saved:
        return
    staging = folder.with_name(f".{folder.name}-best-first")
    ordered.save_to_disk(str(staging))
    del saved, ordered
    shutil.rmtree(folder)
    os.replace(staging, folder)

def output_paths(output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(final folder, partial folder): ``~`` expanded, a symbolic link at the end never followed."""
    folder = OutputFolder(output_dir, overwrite=False)
    return folder.final, folder.partial


def _embedding_kwargs(config: SelectionConfig) -> dict[str, Any]:
    e = config.embedding
    return {
        "model": e.model, "revision": e.revision, "batch_size": e.batch_size, "max_length": e.max_length,
        "pooling": e.pooling, "normalize": e.normalize, "device": e.device, "trust_remote_code": e.trust_remote_code,
        "shard_rows": e.shard_rows,
        # Only when set, so a torch job's kwargs and selection.json stay as they were.
        **({"backend": e.backend, "quantize": e.quantize} if (e.backend, e.quantize) != ("torch", None) else {}),
    }


def _save_split(split: Dataset, folder: Path, comm: Comm) -> int:
    """Write this process's rows of a split into one ``save_to_disk`` folder shared by all processes.

    Each process saves its rows on its own, then moves its Arrow files into ``folder`` under names
    that put them in rank order; process 0 writes the ``state.json`` that lists every file, so
    ``load_from_disk`` reads the processes' rows in pool order as one dataset. ``datasets`` has no
    writer for one split written by several processes, hence this. Returns the split's total rows.
    """
    own = folder.with_name(f".{folder.name}-{comm.rank:05d}")
    split.save_to_disk(str(own))
    files = sorted(own.glob("data-*.arrow"))
    counts = np.concatenate(comm.all_gather(np.array([len(files), len(split)], dtype=np.int64)[None, :]))
    if comm.is_main:
        folder.mkdir()
    comm.barrier()
    names = [f"data-{comm.rank:05d}-{i:05d}-of-{comm.world_size:05d}.arrow" for i in range(len(files))]
    for src, name in zip(files, names):
        os.replace(src, folder / name)
    comm.barrier()
    if comm.is_main:
        state = json.loads((own / "state.json").read_text(encoding="utf-8"))
        state["_data_files"] = [{"filename": f"data-{r:05d}-{i:05d}-of-{comm.world_size:05d}.arrow"}
                                for r in range(comm.world_size) for i in range(int(counts[r, 0]))]
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(own / "dataset_info.json", folder / "dataset_info.json")
    shutil.rmtree(own)
    return int(counts[:, 1].sum())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"array_shape": list(value.shape)}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def selection_ot_distance(pool: Any, offset: int, indices: np.ndarray, target: np.ndarray, comm: Comm) -> float:
    """Entropic OT value between the target and the selection, solved sharded where the rows live.

    Each process keeps its own chosen rows, weighted by how many times each was chosen (a row
    drawn twice weighs twice: the selection as the multiset a model trains on), and the one
    Sinkhorn solve runs across the processes (:func:`hf_otselect.ot.sharded_sinkhorn`: O(m) bytes
    per iteration, no vector leaves its process). With one process, or rows chosen once each, it is
    :func:`hf_otselect.ot.ot_distance` between the target and the chosen rows, to the solver's
    tolerance (exactly so on one process).

    Parameters
    ----------
    pool : array_like of shape (n_local, dim)
        This process's pool vectors (a memory map is read only at the chosen rows).
    offset : int
        Global index of this process's first row.
    indices : ndarray of shape (k,), int
        The chosen global rows, the same on every process (repeats allowed).
    target : ndarray of shape (m, dim)
        The target's vectors, the same on every process.
    comm : Comm
        The processes sharing the pool; every process calls this.

    Returns
    -------
    float
        ``<f, a> + <g, b>`` at the converged potentials (cost ``||x - y||^2``, ``eps=0.1``), the
        same on every process.
    """
    import warnings

    from .dist import PoolView
    from .ot import nonconvergence_message, sharded_sinkhorn

    rows, draws = np.unique(np.asarray(indices, dtype=np.int64), return_counts=True)
    n_local = int(np.shape(pool)[0])
    mine = (rows >= offset) & (rows < offset + n_local)
    chosen = np.asarray(pool[rows[mine] - offset]).reshape(-1, np.shape(pool)[1])
    result = sharded_sinkhorn(PoolView.of(chosen, comm), target, a_local=draws[mine].astype(np.float64), comm=comm,
                              owner="selection_ot_distance", names=("eps", "selection", "target"))
    if not result.converged:
        warnings.warn(nonconvergence_message(result, 1e-3, f"selection of {rows.size} rows, m={len(target)}"), RuntimeWarning, stacklevel=2)
    return float(result.cost)


def _ot_distances(run: SelectionRun, info: dict[str, Any]) -> dict[str, float | None]:
    """OT distance of the target to the pool and to the selection (every process calls this).

    The pool side comes from the selector (GOT-D solves it) or, with one process, is computed; the
    selection side is one solve sharded over the processes' own chosen rows
    (:func:`selection_ot_distance`: nothing gathered).
    """
    if run.pool_embeddings is None or run.target_embeddings is None:
        return {"target_pool": None, "target_selection": None}
    from .ot import ot_distance

    comm = run.comm
    target = np.asarray(run.target_embeddings)
    to_pool = info.get("ot_distance")
    # pre-filter/decontamination left rows unscored (on some process: every process decides alike)
    filtered = bool(comm.all_reduce(np.array([np.isnan(run.result.scores).any()], dtype=np.int64), op="max")[0])
    eligible_pool = to_pool if filtered else None
    if (to_pool is None or filtered) and comm.world_size == 1:
        to_pool = ot_distance(np.asarray(run.pool_embeddings), target)
    selection = selection_ot_distance(run.pool_embeddings, run.offset, run.result.indices, target, comm)
    out = {"target_pool": None if to_pool is None else float(to_pool), "target_selection": selection}
    if filtered:  # the selector's own figure is over the rows left selectable
        out["target_eligible_pool"] = None if eligible_pool is None else float(eligible_pool)
    return out


def _report_data(config: SelectionConfig, run: SelectionRun) -> report_data.ReportData:
    """The report's and the card's summaries of this process's rows, reduced over the processes (all call this).

    Read from this process's ``scored`` rows and vectors where they are: counts, extremes and
    histograms all-reduced, at most ``report_sample_rows`` keyed rows gathered (see
    :mod:`hf_otselect.report_data`). Without a report only the card's figures are needed, so the
    sample is the smallest allowed.
    """
    scored = run.scored
    pool = run.pool_embeddings
    vectors = None
    if config.report and pool is not None:
        local = np.asarray(pool)
        vectors = lambda index: local[index - run.offset]  # noqa: E731 - this process's rows start at run.offset
    text_column = config.pool.column if config.report and config.pool.column in scored.column_names else None
    columns = list(config.report_columns) if config.report else []
    blocks = report_data.dataset_blocks(scored, score_column=config.score_column, text_column=text_column, columns=columns, vectors=vectors)
    return report_data.summarize(blocks, columns=columns, seed=config.seed, sample_rows=config.report_sample_rows if config.report else 2,
                                 comm=run.comm, target=run.target_embeddings if vectors is not None else None)


def _provenance(config: SelectionConfig, run: SelectionRun, distances: dict[str, Any], n_pool: int) -> dict[str, Any]:
    import datasets
    import torch
    import transformers

    from .embed import DEFAULT_MODEL

    model = config.embedding.model or DEFAULT_MODEL
    return {
        "hf_otselect_version": __version__,
        "method": run.selector.name,
        "params": _jsonable(run.selector.get_params()),
        "k": config.k,
        "seed": config.seed,
        "model": model if config.embedding.model else "sentence-transformers/all-MiniLM-L6-v2 (bundled)",
        "model_revision": config.embedding.revision,
        "embedding": _jsonable(_embedding_kwargs(config)),
        "fingerprints": run.fingerprints,
        "processes": run.comm.world_size,
        "rows": {"pool": n_pool, "target": int(len(run.target_embeddings)) if run.target_embeddings is not None else None,
                 "selected": int(len(run.result.indices)), "selected_unique": int(np.unique(run.result.indices).size)},
        "ot_distance": distances,
        "selector_info": _jsonable(run.result.info),
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        "versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                     "transformers": transformers.__version__, "datasets": datasets.__version__},
        "config": _jsonable(config.to_dict()),
        # Present only when they ran (the report shows a section per key it finds).
        **{key: value for key, value in (("prefilter", run.prefilter), ("decontamination", run.decontamination), ("dedup", run.dedup)) if value is not None},
    }


def _save_fit(run: SelectionRun, folder: Path) -> dict[str, Any]:
    """Write the job's fit into the output (process 0, inside the partial folder); what selection.json records of it.

    Not written for a selector a :class:`~hf_otselect.fitted.FittedSelector` cannot rebuild (a
    user's own class, chunked GOT-D), nor for TSDS or round-robin similarity after a filter
    renumbered the rows they score by (their state is keyed by the fit's rows, no longer
    ``pool_index``). TSDS and round-robin score only the pool's own rows, by ``pool_index``.
    """
    fitted = run.fitted
    if fitted is None:
        return {"saved": False, "why": "the selector cannot be rebuilt from its name and parameters (own class, or chunked GOT-D)"}
    if fitted.index_bound and fitted.fit_info["n_pool"] != run.n_pool:
        return {"saved": False, "why": f"{fitted.method} scores by the fit's row numbers, which a filter renumbered"}
    fitted.save_pretrained(folder)
    rows = ("the pool's own rows only, by pool_index (with_indices=True): its scores are looked up by the fit's rows"
            if fitted.index_bound else "any row")
    return {"saved": True, "path": folder.name, "fingerprint": fitted.fingerprint, "scores": rows}


def _pipeline_kwargs(config: SelectionConfig, heldout: Dataset | None) -> dict[str, Any]:
    """The pre-filter, guard and decontamination arguments of run_selection, from the config."""
    kwargs: dict[str, Any] = {"source_column": config.source_column}
    if config.prefilter is not None:
        kwargs["prefilter"] = dataclasses.asdict(config.prefilter)
    if config.dedup is not None:
        kwargs.update(dedup_radius=config.dedup.radius, dedup_mode=config.dedup.mode)
    if config.decontaminate is not None:
        d = config.decontaminate
        kwargs.update(decontaminate=heldout, decontaminate_column=d.column, decontaminate_radius=d.radius, decontaminate_ngram=d.ngram)
    return kwargs


def _check_pool_columns(config: SelectionConfig, pool: Dataset | IterableDataset) -> None:
    """Columns the job will read or add, checked on the loaded pool before any embedding."""
    columns = pool.column_names
    if columns is None:  # a stream without declared features: its first row tells
        first = next(iter(pool.take(1)), None)
        columns = list(first) if first is not None else []
    owner = "SelectionConfig"
    taken = [c for c in ("pool_index", "rank", "draw_order", "selected", config.score_column) if c in columns]
    if taken:
        raise param_error("pool.path", owner, "a pool without the columns a selection adds ('pool_index', 'rank', 'draw_order', 'selected', "
                          f"score_column {short_repr(config.score_column)}); re-selecting from a selection? remove them first, "
                          f"e.g. dataset.remove_columns({taken}), or set score_column to a new name", f"columns {columns}")
    if config.report:
        missing = [c for c in config.report_columns if c not in columns]
        if missing:
            raise param_error("report_columns", owner, f"columns of the pool (it has {short_repr(columns)}), or [] to show none",
                              config.report_columns)


#: Settings that name a place or a device of one process: they may differ between processes (another
#: mount point, node-local cache, one GPU each). The output folder is checked to be one folder instead.
_PER_PROCESS = ("output_dir", "cache_dir", "embedding.device", "params.device")


def _job_identity(config: SelectionConfig) -> dict[str, Any]:
    """The job's settings as flat dotted keys (``pool.path``, ``params.eps``...), less :data:`_PER_PROCESS`."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif prefix not in _PER_PROCESS:
            flat[prefix] = value

    walk("", config.to_dict())
    return flat


def run_job(config: SelectionConfig) -> Path | None:
    """Run a selection job; return the output folder (None on processes other than 0).

    Under ``torchrun`` / ``accelerate launch`` every process runs this: each embeds and scores its
    contiguous shard of the pool, the fit talks through collectives, each writes its own rows of
    ``scored`` and ``selected``, and process 0 writes ``selection.json``, the card and the report.
    The output folder must be shared by all processes (one file system): this is checked before any
    work, as is that every process was given the same job (settings, pool and target content).

    Raises
    ------
    FileExistsError
        ``output_dir`` exists and ``overwrite`` is false, or it (or its ``.partial``) is a link, a
        file, or a folder this package did not write; or another job holds its lock
        (:class:`~hf_otselect.outdir.OutputFolderBusy`). All checked before any work.
    ValueError
        ``output_dir`` is empty, the working directory, a home or root folder or above one.
    hf_otselect.dist.JobMismatch
        (a ``ValueError``, on every process) the processes were given different settings, pool or target.
    hf_otselect.dist.FolderNotShared
        (an ``OSError``, on every process) ``output_dir`` is not one folder every process sees.
    hf_otselect.dist.CollectiveError
        (a ``ConnectionError``) another process failed, or did not answer within ``dist_timeout_s``.
    """
    t0 = time.perf_counter()
    config.validate()
    comm = get_comm(config.embedding.device, timeout_s=config.dist_timeout_s)
    agree(comm, _job_identity(config), "the job")  # before any work: one job, or none (one line on every process)
    folder = OutputFolder(config.output_dir, overwrite=config.overwrite)
    folder.check(leftovers=comm.is_main)  # see hf_otselect/outdir.py: a job deletes only what it wrote
    config.check_environment()
    if config.push_to_hub:
        from .hub import check_repo_id

        check_repo_id(config.hub.repo_id)
    if not comm.is_main:  # process 0 alone clears leftovers, holds the lock and renames into place
        return _run_job(config, folder, comm, t0)
    with folder.locked():  # one writer per output folder, for the whole job
        return _run_job(config, folder, comm, t0)


def _run_job(config: SelectionConfig, folder: OutputFolder, comm: Comm, t0: float) -> Path | None:
    out, partial = folder.final, folder.partial
    pool = load_split(config.pool, "pool")
    _check_pool_columns(config, pool)
    target = load_split(config.target, "target")
    negative = load_split(config.negative_target, "negative_target") if config.negative_target else None
    if isinstance(target, IterableDataset):
        target = Dataset.from_list(list(target))
    if isinstance(negative, IterableDataset):
        negative = Dataset.from_list(list(negative))
    heldout = load_split(config.decontaminate, "decontaminate") if config.decontaminate else None
    if isinstance(heldout, IterableDataset):
        heldout = Dataset.from_list(list(heldout))
    if comm.is_main:
        folder.begin()  # clears an earlier run's partial folder (only if ours), creates it
    comm.barrier()
    # Every process writes its rows into the partial folder process 0 created: it must be one folder.
    # On failure process 0's lock block removes the partial folder; the others wrote nothing.
    check_shared_folder(comm, partial)

    embedding = _embedding_kwargs(config)
    if embedding["device"] is None and getattr(comm, "device", None) is not None and comm.device.type == "cuda":
        embedding["device"] = str(comm.device)  # one GPU per process
    run = run_selection(
        pool, target, config.method, config.k, column=config.pool.column, target_column=config.target.column,
        negative_target=negative, score_column=config.score_column, seed=config.seed, cache_dir=config.cache_dir,
        embedding=embedding, comm=comm, **_pipeline_kwargs(config, heldout), **config.params,
    )
    if run.pool_embeddings is None and (config.report or config.save_embeddings):
        from .embed import embed

        cache = cache_root(config.cache_dir) / "embeddings"
        part = _shard_of(pool, comm, "run_job")
        run.target_embeddings = embed(target, column=config.target.column, cache_dir=cache, **embedding)
        empty = isinstance(part, Dataset) and len(part) == 0  # an empty shard: more processes than rows
        run.pool_embeddings = (np.zeros((0, run.target_embeddings.shape[1]), dtype=np.float32) if empty
                               else embed(part, column=config.pool.column, cache_dir=cache, **embedding))

    t = time.perf_counter()
    n_scored = _save_split(run.scored, partial / "scored", comm)
    n_selected = _save_split(run.selected, partial / "selected", comm)
    dropped = run.extra_splits.get("decontaminated")
    if dropped is not None and (run.decontamination or {}).get("dropped", 0):  # each process its own rows (a 0-row split is unreadable)
        _save_split(dropped, partial / "decontaminated", comm)
    if comm.is_main:  # best (or first drawn) first, as select_by_ot returns them
        write_best_first(partial / "selected")
    if config.save_embeddings and run.pool_embeddings is not None:
        (partial / "embeddings").mkdir(exist_ok=True)
        name = "pool.npy" if comm.world_size == 1 else f"pool-{comm.rank:05d}-of-{comm.world_size:05d}.npy"
        np.save(partial / "embeddings" / name, np.asarray(run.pool_embeddings), allow_pickle=False)
    run.timings["write_s"] = time.perf_counter() - t
    distances = _ot_distances(run, run.result.info)
    t = time.perf_counter()
    summary = _report_data(config, run)  # every process: its rows' summaries, reduced; the sample, gathered
    run.timings["report_data_s"] = time.perf_counter() - t
    comm.barrier()
    if not comm.is_main:
        comm.close()
        return None
    (partial / "dataset_dict.json").write_text(json.dumps({"splits": ["scored", "selected"]}), encoding="utf-8")
    if "prefilter" in run.extra_splits:  # the source ranking: the same on every process
        run.extra_splits["prefilter"].save_to_disk(str(partial / "prefilter"))
    if config.save_embeddings and run.target_embeddings is not None:
        np.save(partial / "embeddings" / "target.npy", np.asarray(run.target_embeddings), allow_pickle=False)
    kept_fit = _save_fit(run, partial / "selector")
    run.timings["job_s"] = time.perf_counter() - t0
    # One JSON round trip: the card's YAML and selection.json hold plain types only.
    provenance = json.loads(json.dumps(_provenance(config, run, distances, n_scored), default=str))
    provenance["fitted_selector"] = kept_fit
    provenance["rows"]["selected"] = n_selected
    (partial / "selection.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    from .hub import build_card

    card_histogram = (summary.summary["selected"]["card_counts"], summary.summary["selected"]["card_edges"])
    build_card(provenance, None, histogram=card_histogram).save(str(partial / "README.md"))
    if config.report:
        from .report import write_report

        report_data.save(summary, partial)
        write_report(partial, columns=config.report_columns)
    folder.commit()  # manifest, old output aside, os.replace into place, old output removed
    if config.report:
        logger.info("Report: %s", out / "report.html")
    logger.info("Selection written to %s (%d of %d rows; load_from_disk(%r) gives the scored and selected splits)",
                out, n_selected, n_scored, str(out))
    if config.push_to_hub:
        from .hub import push

        push(out, config.hub.repo_id, private=config.hub.private, split=config.hub.split)
    comm.close()
    return out
