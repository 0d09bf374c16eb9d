"""Run a selection job from a :class:`~hf_otselect.config.SelectionConfig`.

Outputs go to one folder (see DESIGN.md)::

    <output_dir>/
      scored/           every pool row + pool_index, score, rank (datasets save_to_disk)
      selected/         the chosen rows, best first
      selection.json    provenance: method, params, model, fingerprints, version, seed, OT distances, timings
      embeddings/       pool.npy, target.npy (when save_embeddings)
      prefilter/        the source ranking (when the pre-filter ran)
      decontaminated/   the pool rows removed as too close to the held-out split (when it removed any)
      README.md         the dataset card pushed with the selection
      report.html       and its PNGs (when report)

Everything is written to ``<output_dir>.partial/`` first and renamed into place only when complete,
so a crashed job never leaves an output that looks finished. A rerun clears the partial folder and
starts again; the embedding and score caches make that cheap (finished shards are not recomputed).

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE > 1``), each rank embeds a contiguous
shard of the pool and saves it to the partial folder; rank 0 gathers the shards in order, scores,
chooses and writes, so the selection equals the one-process run.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk

from . import __version__
from ._checks import param_error
from .config import DataConfig, SelectionConfig
from .datasets_ext import SelectionRun, run_selection
from .embed import cache_root

logger = logging.getLogger(__name__)

__all__ = ["load_split", "output_paths", "run_job"]

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_split(spec: DataConfig, name: str = "pool") -> Dataset | IterableDataset:
    """Load the split a :class:`DataConfig` points at (file, ``save_to_disk`` folder or Hub id)."""
    path = Path(spec.path)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if spec.split not in data:
                raise ValueError(f"The '{name}.split' {spec.split!r} is not in {str(path)!r}. Splits: {list(data)}")
            data = data[spec.split]
        if spec.streaming:
            data = data.to_iterable_dataset()
    else:
        suffix = "".join(Path(spec.path.replace("*", "x")).suffixes[-1:]).lower()
        if suffix in _FORMATS:
            if not glob.glob(spec.path):
                raise FileNotFoundError(f"The '{name}.path' file {spec.path!r} does not exist.")
            kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
            try:
                data = load_dataset(_FORMATS[suffix], data_files=spec.path, split="train", streaming=spec.streaming, **kwargs)
            except StopIteration as err:  # datasets' json builder on a file without a single row
                raise param_error(f"{name}.path", "the job config", "a data file with at least one row", spec.path) from err
        else:
            try:
                data = load_dataset(spec.path, spec.name, split=spec.split, streaming=spec.streaming)
            except ConnectionError as err:  # offline, or the Hub unreachable: say which setting, one line
                raise param_error(f"{name}.path", "the job config", "a data file, a save_to_disk folder or a Hub dataset id "
                                  f"that can be reached ({err})", spec.path) from err
    if spec.max_rows is not None:
        data = data.take(spec.max_rows) if isinstance(data, IterableDataset) else data.select(range(min(spec.max_rows, len(data))))
    return data


def output_paths(output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(final folder, partial folder)."""
    out = Path(output_dir).resolve()
    return out, out.with_name(out.name + ".partial")


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _embedding_kwargs(config: SelectionConfig) -> dict[str, Any]:
    e = config.embedding
    return {
        "model": e.model, "revision": e.revision, "batch_size": e.batch_size, "max_length": e.max_length,
        "pooling": e.pooling, "normalize": e.normalize, "device": e.device, "trust_remote_code": e.trust_remote_code,
        "shard_rows": e.shard_rows,
    }


def _distributed_embeddings(config: SelectionConfig, pool: Any, target: Any, partial: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Each rank embeds its contiguous pool shard; rank 0 returns the gathered arrays, others None."""
    from accelerate import PartialState

    from .embed import embed, embed_to_file

    state = PartialState(cpu=config.embedding.device in (None, "cpu") and not _cuda_available())
    rank, world = state.process_index, state.num_processes
    kwargs = _embedding_kwargs(config)
    if kwargs["device"] is None and state.device.type == "cuda":
        kwargs["device"] = str(state.device)
    cache = cache_root(config.cache_dir) / "embeddings"
    shard_dir = partial / "rank_embeddings"
    if state.is_main_process:
        shard_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    if isinstance(pool, IterableDataset):
        from datasets.distributed import split_dataset_by_node

        # Contiguous file shards per rank keep the gathered order equal to the stream's order only
        # when every rank gets whole shards; split_dataset_by_node does that when n_shards % world == 0.
        if pool.n_shards % world:
            raise ValueError(
                f"The streamed pool has {pool.n_shards} file shard(s), not a multiple of the {world} processes; "
                "give it a multiple of the process count in files, or run with streaming: false."
            )
        part = split_dataset_by_node(pool, rank=rank, world_size=world)
        embed_to_file(part, shard_dir / f"{rank:05d}.npy", column=config.pool.column, cache_dir=cache, **kwargs)
    else:
        part = pool.shard(num_shards=world, index=rank, contiguous=True)
        np.save(shard_dir / f"{rank:05d}.npy", embed(part, column=config.pool.column, cache_dir=cache, **kwargs), allow_pickle=False)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    pool_emb = np.concatenate([np.load(shard_dir / f"{r:05d}.npy", allow_pickle=False) for r in range(world)])
    target_emb = embed(target, column=config.target.column, cache_dir=cache, **kwargs)
    shutil.rmtree(shard_dir)
    return pool_emb, target_emb


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


def _ot_distances(run: SelectionRun, info: dict[str, Any]) -> dict[str, float | None]:
    if run.pool_embeddings is None or run.target_embeddings is None:
        return {"target_pool": None, "target_selection": None}
    from .ot import ot_distance

    pool = np.asarray(run.pool_embeddings)
    target = np.asarray(run.target_embeddings)
    to_pool = info.get("ot_distance")
    filtered = bool(np.isnan(run.result.scores).any())  # pre-filter/decontamination left rows unscored
    eligible_pool = to_pool if filtered else None
    if to_pool is None or filtered:
        to_pool = ot_distance(pool, target)
    chosen = np.unique(run.result.indices)
    out = {"target_pool": float(to_pool), "target_selection": float(ot_distance(pool[chosen], target))}
    if filtered:  # the selector's own figure is over the rows left selectable
        out["target_eligible_pool"] = None if eligible_pool is None else float(eligible_pool)
    return out


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


def run_job(config: SelectionConfig) -> Path | None:
    """Run a selection job; return the output folder (None on ranks other than 0).

    Raises
    ------
    FileExistsError
        ``output_dir`` exists and ``overwrite`` is false (checked before any work).
    """
    t0 = time.perf_counter()
    config.validate()
    out, partial = output_paths(config.output_dir)
    rank, world = _world()
    if out.exists() and not config.overwrite:
        raise FileExistsError(f"The 'output_dir' {str(out)!r} already exists. Pass overwrite=true to replace it.")
    if config.push_to_hub:
        from .hub import check_repo_id

        check_repo_id(config.hub.repo_id)
    pool = load_split(config.pool, "pool")
    target = load_split(config.target, "target")
    negative = load_split(config.negative_target, "negative_target") if config.negative_target else None
    if isinstance(target, IterableDataset):
        target = Dataset.from_list(list(target))
    if isinstance(negative, IterableDataset):
        negative = Dataset.from_list(list(negative))
    heldout = load_split(config.decontaminate, "decontaminate") if config.decontaminate else None
    if isinstance(heldout, IterableDataset):
        heldout = Dataset.from_list(list(heldout))
    if rank == 0:
        if partial.exists():
            logger.info("Removing the partial output of an earlier run: %s", partial)
            shutil.rmtree(partial)
        partial.mkdir(parents=True)

    embeddings = None
    if world > 1:
        embeddings = _distributed_embeddings(config, pool, target, partial)
        if embeddings is None:
            return None

    run = run_selection(
        pool, target, config.method, config.k, column=config.pool.column, target_column=config.target.column,
        negative_target=negative, score_column=config.score_column, seed=config.seed, cache_dir=config.cache_dir,
        embedding=_embedding_kwargs(config), embeddings=embeddings, **_pipeline_kwargs(config, heldout), **config.params,
    )
    if run.pool_embeddings is None and (config.report or config.save_embeddings):
        from .embed import embed

        cache = cache_root(config.cache_dir) / "embeddings"
        kw = _embedding_kwargs(config)
        run.pool_embeddings = embed(pool, column=config.pool.column, cache_dir=cache, **kw)
        run.target_embeddings = embed(target, column=config.target.column, cache_dir=cache, **kw)

    t = time.perf_counter()
    run.scored.save_to_disk(str(partial / "scored"))
    run.selected.save_to_disk(str(partial / "selected"))
    for name, split in run.extra_splits.items():  # prefilter/ (source ranking), decontaminated/ (dropped rows)
        if len(split):  # datasets 5.2 saves a 0-row split that load_from_disk cannot read (IndexError)
            split.save_to_disk(str(partial / name))
    if config.save_embeddings and run.pool_embeddings is not None:
        (partial / "embeddings").mkdir()
        np.save(partial / "embeddings" / "pool.npy", np.asarray(run.pool_embeddings), allow_pickle=False)
        np.save(partial / "embeddings" / "target.npy", np.asarray(run.target_embeddings), allow_pickle=False)
    run.timings["write_s"] = time.perf_counter() - t
    distances = _ot_distances(run, run.result.info)
    run.timings["job_s"] = time.perf_counter() - t0
    # One JSON round trip: the card's YAML and selection.json hold plain types only.
    provenance = json.loads(json.dumps(_provenance(config, run, distances, len(run.scored)), default=str))
    (partial / "selection.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    from .hub import build_card

    build_card(provenance, run.selected[config.score_column]).save(str(partial / "README.md"))
    if config.report:
        from .report import write_report

        write_report(partial, columns=config.report_columns)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    logger.info("Selection written to %s (%d of %d rows)", out, len(run.selected), len(run.scored))
    if config.push_to_hub:
        from .hub import push

        push(out, config.hub.repo_id, private=config.hub.private, split=config.hub.split)
    return out
