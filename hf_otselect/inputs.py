"""Reading a job's input splits: a data file, a ``save_to_disk`` folder or a Hub dataset id.

Its own module so that the job and the report (which reads the target back for its texts) both
import it without importing each other.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from ._checks import check_json_lines, param_error, short_repr
from .config import DataConfig

__all__ = ["load_split"]

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_split(spec: DataConfig, name: str = "pool") -> Dataset | IterableDataset:
    """Load the split a :class:`DataConfig` points at (file, ``save_to_disk`` folder or Hub id)."""
    path = Path(spec.path)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if spec.split not in data:
                raise ValueError(f"The '{name}.split' {short_repr(spec.split)} is not in {str(path)!r}. Splits: {list(data)}")
            data = data[spec.split]
        if spec.streaming:
            data = data.to_iterable_dataset()
    else:
        suffix = "".join(Path(spec.path.replace("*", "x")).suffixes[-1:]).lower()
        if suffix in _FORMATS:
            if not glob.glob(spec.path):
                raise FileNotFoundError(f"The '{name}.path' file {short_repr(spec.path)} does not exist.")
            kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
            if spec.streaming and _FORMATS[suffix] == "json":  # a stream meets a bad line mid-embedding: look first
                check_json_lines(spec.path, f"{name}.path", spec.max_rows)
            try:
                data = load_dataset(_FORMATS[suffix], data_files=spec.path, split="train", streaming=spec.streaming, **kwargs)
            except StopIteration as err:  # datasets' json builder on a file without a single row
                raise param_error(f"{name}.path", "the job config", "a data file with at least one row", spec.path) from err
            except DatasetGenerationError as err:  # a malformed row: say which file (and line, for JSON)
                if _FORMATS[suffix] == "json":
                    check_json_lines(spec.path, f"{name}.path")
                cause = " ".join(str(err.__cause__ or err).split())
                raise ValueError(f"The '{name}.path' file(s) {short_repr(spec.path)} could not be read as {_FORMATS[suffix]}: {cause}") from err
        else:
            try:
                data = load_dataset(spec.path, spec.name, split=spec.split, streaming=spec.streaming)
            except ConnectionError as err:  # offline, or the Hub unreachable: say which setting, one line
                raise param_error(f"{name}.path", "the job config", "a data file, a save_to_disk folder or a Hub dataset id "
                                  f"that can be reached ({err})", spec.path) from err
    if spec.max_rows is not None:
        data = data.take(spec.max_rows) if isinstance(data, IterableDataset) else data.select(range(min(spec.max_rows, len(data))))
    return data
