"""The two commands of a fit-once, apply-anywhere run: fit a selector from a job config, apply one to a pool.

``hf-otselect fit`` reads the same YAML job as ``hf-otselect select`` (pool, target, method,
params, embedding, seed; ``k`` sizes TSDS's neighbourhoods as ``select`` does) and saves the
fitted selector with ``save_pretrained``. ``hf-otselect apply`` loads a saved or Hub selector
and runs :func:`~hf_otselect.stream_pass.write_selected` over a pool read as a stream.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ._checks import check_int, param_error
from .config import DataConfig, SelectionConfig

logger = logging.getLogger(__name__)

__all__ = ["apply_selector", "fit_from_config"]


def _check_save_folder(folder: Path, overwrite: bool, owner: str) -> None:
    """Write into a new or empty folder, or over a saved selector's files with ``overwrite`` (checked
    before the fit, by the rule save_pretrained applies: :func:`hf_otselect.fitted_io.check_save_folder`)."""
    from .fitted_io import check_save_folder, holds_saved_selector

    if not folder.exists():
        return
    if not folder.is_dir():
        raise param_error("save_directory", owner, "a folder path", str(folder))
    check_save_folder(folder, "save_directory", owner)
    entries = list(folder.iterdir())
    if entries and holds_saved_selector(folder) and not overwrite:
        raise FileExistsError(f"The 'save_directory' {str(folder)!r} already holds a saved selector. "
                              "Pass --overwrite to replace it, or choose another folder.")


def fit_from_config(config: SelectionConfig, save_directory: str | os.PathLike, *, sample: int | float | None = None,
                    vector_column: str | None = None, overwrite: bool = False) -> Path:
    """Fit the selector a job config describes and save it to ``save_directory``.

    Parameters
    ----------
    config : SelectionConfig
        ``pool``, ``target`` (and ``negative_target``), ``method``, ``params``, ``embedding``,
        ``seed``, ``score_column``, ``cache_dir``; ``k`` is TSDS's ``budget`` unless ``params``
        sets one. The output, report and Hub keys are not used.
    save_directory : str or PathLike
    sample : int, float or None
        Fit on a sample (see :func:`~hf_otselect.fitted.fit_selector`).
    vector_column : str, optional
        A pool column of precomputed vectors to fit on instead of embedding texts.
    overwrite : bool
        Replace a selector saved there before.

    Returns
    -------
    Path
        The folder written.
    """
    from ._checks import check_writable_folder
    from .fitted import _check_sample, fit_selector
    from .job import load_split

    owner = "hf-otselect fit"
    sample = _check_sample(sample, owner)
    folder = check_writable_folder(save_directory, "save_directory", owner)
    _check_save_folder(folder, overwrite, owner)
    e = config.embedding
    params = dict(config.params)
    if config.method == "tsds" and "budget" not in params:
        params["budget"] = config.k
    pool = load_split(config.pool, "pool")
    target = load_split(config.target, "target")
    negative = load_split(config.negative_target, "negative_target") if config.negative_target is not None else None
    fitted = fit_selector(
        pool, target, config.method, sample=sample, seed=config.seed, column=config.pool.column, target_column=config.target.column,
        vector_column=vector_column, score_column=config.score_column, negative_target=negative, model=e.model, revision=e.revision,
        pooling=e.pooling, max_length=e.max_length, normalize=e.normalize, batch_size=e.batch_size, device=e.device,
        trust_remote_code=e.trust_remote_code, encoder_backend=e.backend, quantize=e.quantize, cache_dir=config.cache_dir, **params,
    )
    fitted.save_pretrained(folder)
    logger.info("Saved %r to %s", fitted, folder)
    return folder


def apply_selector(selector: str | os.PathLike, pool: str, output_dir: str | os.PathLike, *, fraction: float | None = None,
                   threshold: float | None = None, split: str = "train", name: str | None = None, column: str | None = None,
                   vector_column: str | None = None, max_rows: int | None = None, batch_size: int = 1000, shard_rows: int = 100_000,
                   revision: str | None = None, device: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Apply a saved (folder) or Hub selector to a pool read as a stream, in one pass.

    Parameters
    ----------
    selector : str or PathLike
        A folder written by ``save_pretrained`` or a Hub model id ``user/name``.
    pool : str
        A data file or glob, a ``save_to_disk`` folder or a Hub dataset id.
    output_dir : str or PathLike
        Receives ``data/*.parquet`` (the kept rows) and ``summary.json``.
    fraction, threshold : float, optional
        Exactly one (see :func:`~hf_otselect.stream_pass.select_stream`).
    split, name, max_rows
        Which rows of ``pool`` (as in a job's ``pool:`` section).
    column, vector_column : str, optional
        Override the text or vector column the selector reads.
    batch_size, shard_rows, overwrite
        See :func:`~hf_otselect.stream_pass.write_selected`.
    revision, device
        Hub revision of ``selector``; where to embed and score.

    Returns
    -------
    dict
        The summary (also in ``output_dir/summary.json``).
    """
    from .fitted import FittedSelector
    from .job import load_split
    from .outdir import OutputFolder
    from .stream_pass import StreamPass, write_selected

    owner = "hf-otselect apply"
    if max_rows is not None:
        check_int(max_rows, "max_rows", owner, 1)
    OutputFolder(output_dir, overwrite=overwrite, owner=owner).check()  # before the selector or pool is read
    fitted = FittedSelector.from_pretrained(selector, revision=revision)
    settings = {k: v for k, v in (("column", column), ("vector_column", vector_column)) if v is not None}
    if settings:
        fitted = fitted.using(**settings)
    StreamPass(fitted, [], fraction=fraction, threshold=threshold, batch_size=batch_size, owner=owner)  # arguments, before any data
    data = load_split(DataConfig(path=pool, split=split, column=fitted.column, name=name, streaming=True, max_rows=max_rows), "pool")
    return write_selected(fitted, data, output_dir, fraction=fraction, threshold=threshold, batch_size=batch_size, shard_rows=shard_rows,
                          overwrite=overwrite, device=device, source=pool)
