"""Reading a job's input splits: a data file, a ``save_to_disk`` folder or a Hub dataset id.

Its own module so that the job and the report (which reads the target back for its texts) both
import it without importing each other.

``split`` is honoured for every kind of source, with ``datasets``' split syntax (``train``,
``train[:100]``, ``train[10%:]``, ``train+test``). Data files, and a folder written by
``Dataset.save_to_disk``, are one split named ``train``; a folder of data files has the splits
``datasets`` finds in its file names; a ``save_to_disk`` ``DatasetDict`` has its own. A split that
does not exist, and a slice of a stream (``datasets`` streams whole splits only), are refused
naming the setting and the splits there are.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from datasets import (Dataset, DatasetDict, IterableDataset, ReadInstruction, concatenate_datasets, load_dataset,
                      load_dataset_builder, load_from_disk)
from datasets.exceptions import DatasetGenerationError

from ._checks import check_json_lines, param_error, short_repr
from .config import DataConfig

__all__ = ["load_split"]

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}
_OWNER = "the job config"
# The one split a data file (or a glob of them) and a single saved Dataset load as.
_ONE_SPLIT = "train"


def _split_error(spec: DataConfig, name: str, available: list[str] | None, why: str = "", *, whole: bool = False) -> ValueError:
    """``The 'pool.split' parameter of the job config must be a split of 'x.jsonl': one of ['train'] ...``.

    ``whole``: only whole splits will do (a stream), so no slice is offered.
    """
    if whole:
        expected = f"a whole split of {short_repr(spec.path)} when it is streamed" + (f": one of {available}" if available else "")
    elif available:
        first = available[0]
        expected = (f"a split of {short_repr(spec.path)}: one of {available}, or a slice of one such as "
                    f"'{first}[:100]' or '{first}[10%:]'")
    else:
        expected = f"a split of {short_repr(spec.path)}, optionally sliced ('train', 'train[:100]', 'train[10%:]')"
    return param_error(f"{name}.split", _OWNER, f"{expected} ({why.rstrip('.')})" if why else expected, spec.split)


def _split_names(spec: DataConfig, name: str, available: list[str] | None) -> tuple[list[str], bool]:
    """The split names ``spec.split`` reads and whether it slices any, checked against ``available``.

    Parameters
    ----------
    spec : DataConfig
        The source; its ``split`` is read with ``datasets``' syntax (``train[:2]+test``).
    name : str
        The config section (``pool``, ``target``...), named in errors as ``'<name>.split'``.
    available : list of str or None
        The splits the source has; None when they are unknown before loading (a Hub id).

    Returns
    -------
    tuple of (list of str, bool)
        The split names, in order, and whether any part has a slice.

    Raises
    ------
    ValueError
        A malformed spec, a split not in ``available``, or a slice of a streamed source.
    """
    if available is not None and spec.split in available:  # a whole split, whatever characters its name holds
        return [spec.split], False
    try:
        ReadInstruction.from_spec(spec.split)
    except (ValueError, TypeError):
        raise _split_error(spec, name, available, "not a split name or slice datasets reads") from None
    parts = [part.strip() for part in re.split(r"\+", spec.split)]
    names = [re.split(r"[\[(]", part, maxsplit=1)[0].strip() for part in parts]
    sliced = any("[" in part for part in parts)
    missing = [n for n in names if available is not None and n not in available]
    if missing:
        raise _split_error(spec, name, available, f"no split {', '.join(map(repr, missing))} there")
    return names, sliced


def _refuse_stream_slice(spec: DataConfig, name: str, sliced: bool, available: list[str] | None) -> None:
    """``datasets`` streams whole splits only (``Bad split: train[:2]``): say so by setting."""
    if sliced and spec.streaming:
        raise _split_error(spec, name, available, "datasets streams whole splits only; use max_rows (--max-rows) for the "
                           "first rows, or streaming=false to slice", whole=True)


def _select_split(splits: dict[str, Dataset], spec: DataConfig, name: str) -> Dataset:
    """The rows of ``spec.split`` (whole, sliced or added splits) of loaded splits, sliced as ``load_dataset`` slices.

    One path for every source read whole (data files, folders, ``save_to_disk``), so that each
    refuses a missing split or an impossible slice in the same words.
    """
    available = list(splits)
    if spec.split in splits:
        return splits[spec.split]
    _split_names(spec, name, available)
    try:
        slices = ReadInstruction.from_spec(spec.split).to_absolute({k: len(v) for k, v in splits.items()})
    except ValueError as err:  # e.g. pct1_dropremainder rounding of a split under 100 rows
        raise _split_error(spec, name, available, " ".join(str(err).split())) from None
    parts = [splits[s.splitname].select(range(s.from_, s.to)) for s in slices]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


# Bytes the json builder reads per table when streaming: datasets' own default (JsonConfig.chunksize),
# passed explicitly so that how far a stream reads and how far it is checked first agree.
_STREAM_CHUNK_BYTES = 10 << 20


def _check_json_files(files: list[str], argument: str, max_rows: int | None) -> None:
    """:func:`check_json_lines` on the ``.json``/``.jsonl`` files in reading order, as far as a stream of ``max_rows`` rows reads.

    The json builder parses a file by tables of ``_STREAM_CHUNK_BYTES`` and pulls one table beyond
    the one that holds its last row: so the check goes two tables past the ``max_rows``-th row, in
    that file or the next, and a stream of the first rows of a huge file is not scanned to its end.
    Compressed and other files are left to ``datasets``.
    """
    files = [f for f in files if f.lower().endswith((".json", ".jsonl")) and not Path(f).is_dir()]  # (a FIFO is read too)
    check_json_lines(files, argument, max_rows, tail_bytes=2 * _STREAM_CHUNK_BYTES)


def _from_disk(path: Path, spec: DataConfig, name: str) -> Dataset | IterableDataset:
    """A ``save_to_disk`` folder: a ``DatasetDict``'s split, or the one split of a saved ``Dataset``."""
    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        splits = dict(data)
    else:  # one split: 'train', or the name it was saved under
        splits = {_ONE_SPLIT: data}
        if data.split is not None:
            splits.setdefault(str(data.split), data)
    data = _select_split(splits, spec, name)
    return data.to_iterable_dataset() if spec.streaming else data


def _from_files(spec: DataConfig, name: str, suffix: str) -> Dataset | IterableDataset:
    """A data file or glob (one format): the split ``train``, sliced as ``spec.split`` says."""
    if not glob.glob(spec.path):
        raise FileNotFoundError(f"The '{name}.path' file {short_repr(spec.path)} does not exist.")
    _, sliced = _split_names(spec, name, [_ONE_SPLIT])
    _refuse_stream_slice(spec, name, sliced, [_ONE_SPLIT])
    kind = _FORMATS[suffix]
    kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if spec.streaming and kind == "json":  # a stream meets a bad line mid-embedding: look first, as far as it reads
        _check_json_files(sorted(glob.glob(spec.path)), f"{name}.path", spec.max_rows)
        kwargs["chunksize"] = _STREAM_CHUNK_BYTES
    try:
        if spec.streaming:
            return load_dataset(kind, data_files=spec.path, split=spec.split, streaming=True, **kwargs)
        return _select_split(dict(load_dataset(kind, data_files=spec.path, **kwargs)), spec, name)
    except StopIteration as err:  # datasets' json builder on a file without a single row
        raise param_error(f"{name}.path", _OWNER, "a data file with at least one row", spec.path) from err
    except DatasetGenerationError as err:  # a malformed row: say which file (and line, for JSON)
        if kind == "json":
            check_json_lines(spec.path, f"{name}.path")
        cause = " ".join(str(err.__cause__ or err).split())
        raise ValueError(f"The '{name}.path' file(s) {short_repr(spec.path)} could not be read as {kind}: {cause}") from err


def _from_folder(path: Path, spec: DataConfig, name: str) -> Dataset | IterableDataset:
    """A folder of data files: the splits ``datasets`` finds there; JSON files checked line by line."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError

    try:
        builder = load_dataset_builder(spec.path, spec.name)
    except (EmptyDatasetError, DataFilesNotFoundError) as err:
        raise param_error(f"{name}.path", _OWNER, "a folder holding data files (.jsonl, .csv, .parquet...), a save_to_disk "
                          f"folder or a Hub dataset id ({' '.join(str(err).split())})", spec.path) from None
    data_files = dict(builder.config.data_files or {})
    available = [str(k) for k in data_files] or None
    names, sliced = _split_names(spec, name, available)
    _refuse_stream_slice(spec, name, sliced, available)
    files = [str(f) for n in names for f in data_files.get(n, [])]
    is_json = builder.name == "json"
    if spec.streaming and is_json:  # as for one file: a stream would meet the bad line mid-run
        _check_json_files(files, f"{name}.path", spec.max_rows)
    try:
        if spec.streaming:
            return load_dataset(spec.path, spec.name, split=spec.split, streaming=True,
                                **({"chunksize": _STREAM_CHUNK_BYTES} if is_json else {}))
        return _select_split(dict(load_dataset(spec.path, spec.name)), spec, name)
    except DatasetGenerationError as err:  # a malformed row: say which file (and line, for JSON)
        if is_json:  # read whole, datasets generates every split, so the bad line may be in any of them
            _check_json_files([str(f) for split_files in data_files.values() for f in split_files], f"{name}.path", None)
        cause = " ".join(str(err.__cause__ or err).split())
        raise ValueError(f"The '{name}.path' folder {short_repr(spec.path)} could not be read as {builder.name}: {cause}") from err


def _from_hub(spec: DataConfig, name: str) -> Dataset | IterableDataset:
    """A Hub dataset id: its splits are known only once it is reached."""
    _, sliced = _split_names(spec, name, None)
    _refuse_stream_slice(spec, name, sliced, None)
    try:
        return load_dataset(spec.path, spec.name, split=spec.split, streaming=spec.streaming)
    except ConnectionError as err:  # offline, or the Hub unreachable: say which setting, one line
        raise param_error(f"{name}.path", _OWNER, "a data file, a save_to_disk folder or a Hub dataset id "
                          f"that can be reached ({err})", spec.path) from err
    except ValueError as err:  # datasets' 'Unknown split "x". Should be one of [...]' / 'Bad split: x. Available splits: [...]'
        if not str(err).startswith(("Unknown split", "Bad split")):
            raise
        raise _split_error(spec, name, None, " ".join(str(err).split())) from None


def load_split(spec: DataConfig, name: str = "pool") -> Dataset | IterableDataset:
    """Load the split a :class:`DataConfig` points at (file, folder of files, ``save_to_disk`` folder or Hub id).

    Parameters
    ----------
    spec : DataConfig
        ``path``, ``split`` (``datasets``' syntax: ``train``, ``train[:100]``, ``train[10%:]``;
        data files are the one split ``train``), ``name``, ``streaming`` and ``max_rows``.
    name : str
        The config section it comes from (``pool``, ``target``...), named in errors as
        ``'<name>.path'`` / ``'<name>.split'``.

    Returns
    -------
    Dataset or IterableDataset
        An ``IterableDataset`` when ``spec.streaming``; at most ``spec.max_rows`` rows.

    Raises
    ------
    ValueError
        A split the source does not have, a slice of a stream, a malformed file (naming the file
        and, for JSON, the line) or a Hub id that cannot be reached.
    FileNotFoundError
        A data file or glob that matches nothing.
    """
    path = Path(spec.path)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        data = _from_disk(path, spec, name)
    else:
        suffix = "".join(Path(spec.path.replace("*", "x")).suffixes[-1:]).lower()
        if suffix in _FORMATS and not path.is_dir():
            data = _from_files(spec, name, suffix)
        elif path.is_dir():
            data = _from_folder(path, spec, name)
        else:
            data = _from_hub(spec, name)
    if spec.max_rows is not None:
        data = data.take(spec.max_rows) if isinstance(data, IterableDataset) else data.select(range(min(spec.max_rows, len(data))))
    return data
