"""Files of a fitted selector: safetensors + JSON + a model card, verified on load; the Hub push.

A folder (or Hub model repository) holds three files:

- ``fitted_selector.json``: the format name and version, the method, its parameters, the encoder,
  the fit's sizes and fingerprints, the map settings, the SHA-256 of ``state.safetensors``, and
  the SHA-256 of this JSON's own canonical body (``checksum``);
- ``state.safetensors``: every array of the fitted state and the calibration;
- ``README.md``: the card (method, parameters, target, encoder, calibration, sample size, and the
  measured fidelity of sample fits).

Loading refuses, in one line, a format or version it does not read and a file whose checksum
differs, and names its ``source`` when that is no folder and no Hub repository it can read.
Saving writes only into a new or empty folder, or over a saved selector (:func:`check_save_folder`):
a folder holding files of the user's own is left alone. No pickle anywhere; JSON floats are written
with ``repr`` so they read back bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import check_writable_folder, param_error, short_repr

if TYPE_CHECKING:
    from .fitted import FittedSelector

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "build_card", "check_save_folder", "from_payload_bytes", "holds_saved_selector", "load",
           "payload_bytes", "payload_of", "push", "save_folder"]

FORMAT = "hf_otselect.fitted_selector"
FORMAT_VERSION = 1
CONFIG_FILE, STATE_FILE, CARD_FILE = "fitted_selector.json", "state.safetensors", "README.md"


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _canonical(config: dict[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, default=_json_value, separators=(",", ":")).encode("utf-8")


def payload_of(fitted: FittedSelector) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The fit as named arrays (state and calibration) and a JSON config (everything else)."""
    from . import __version__
    from .fitted_state import state_to_arrays

    arrays, state_meta = state_to_arrays(fitted.method, fitted.state)
    arrays = {f"state.{k}": v for k, v in arrays.items()}
    arrays["calibration.fractions"] = np.asarray(fitted.calibration["fractions"], dtype=np.float64)
    arrays["calibration.thresholds"] = np.asarray(fitted.calibration["thresholds"], dtype=np.float64)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hf_otselect_version": __version__,
        "method": fitted.method, "params": fitted.params, "encoder": fitted.encoder, "state": state_meta,
        "fit": fitted.fit_info, "seed": fitted.seed, "column": fitted.column, "vector_column": fitted.vector_column,
        "score_column": fitted.score_column,
    }
    return arrays, json.loads(_canonical(config))


def payload_bytes(fitted: FittedSelector) -> bytes:
    """One deterministic byte string of the whole fit: what its fingerprint hashes and pickling carries."""
    from safetensors.numpy import save

    arrays, config = payload_of(fitted)
    head = _canonical(config)
    return struct.pack("<Q", len(head)) + head + save(arrays)


def _build(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> FittedSelector:
    from .fitted import FittedSelector
    from .fitted_state import state_from_arrays

    state_arrays = {k[len("state."):]: v for k, v in arrays.items() if k.startswith("state.")}
    return FittedSelector(
        method=config["method"], params=config["params"], state=state_from_arrays(config["method"], state_arrays, config["state"]),
        encoder=config["encoder"], calibration={"fractions": arrays["calibration.fractions"], "thresholds": arrays["calibration.thresholds"]},
        fit_info=config["fit"], seed=config["seed"], column=config["column"], vector_column=config["vector_column"],
        score_column=config["score_column"],
    )


def from_payload_bytes(payload: bytes) -> FittedSelector:
    """The inverse of :func:`payload_bytes`."""
    from safetensors.numpy import load as load_arrays

    (size,) = struct.unpack("<Q", payload[:8])
    config = json.loads(payload[8 : 8 + size])
    return _build(load_arrays(payload[8 + size :]), config)


# What save_folder leaves behind only if it is stopped between writing a file and renaming it.
_TEMPORARIES = frozenset(f".{name}.tmp" for name in (CONFIG_FILE, STATE_FILE, CARD_FILE))


def holds_saved_selector(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a selector :func:`save_folder` wrote: a ``fitted_selector.json`` of this format.

    Its checksums are not verified (a damaged save may be written over); only its ``format``
    field is read, so that a file of the same name that someone else wrote does not pass.
    """
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, a folder, unreadable, not UTF-8 or not JSON
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _interrupted_save(folder: Path, names: list[str]) -> bool:
    """Whether ``names`` (the folder's entries) are what :func:`save_folder` leaves when stopped before its JSON.

    It writes ``state.safetensors``, then ``README.md``, then ``fitted_selector.json``: stopped
    early, the folder holds a state file whose header names the calibration arrays, perhaps the
    card, and nothing else. A ``README.md`` alone is never taken for one.
    """
    if STATE_FILE not in names or not set(names) <= {STATE_FILE, CARD_FILE} | _TEMPORARIES:
        return False
    try:
        with open(folder / STATE_FILE, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size)) if size <= 1 << 24 else None
    except (OSError, ValueError, struct.error):
        return False
    return isinstance(header, dict) and {"calibration.fractions", "calibration.thresholds"} <= header.keys()


def check_save_folder(folder: str | os.PathLike, name: str = "save_directory", owner: str = "FittedSelector.save_pretrained") -> Path:
    """Refuse a folder holding files of its own: only a new or empty folder, or a saved selector, is written into.

    Writing a selector replaces ``fitted_selector.json``, ``state.safetensors`` and ``README.md``;
    in a folder that holds other files and no saved selector those could be the user's own (a
    ``README.md``), so the folder is left alone. A saved selector's folder, or what an interrupted
    save left, is written over (other files, if any, are not touched).

    Parameters
    ----------
    folder : str or PathLike
        Where a selector is about to be saved.
    name, owner : str
        The parameter and the function named in the error.

    Returns
    -------
    Path
        ``folder`` with ``~`` expanded.

    Raises
    ------
    FileExistsError
        ``folder`` holds files and no saved selector.
    """
    folder = check_writable_folder(folder, name, owner)
    if not folder.is_dir():
        return folder
    names = sorted(p.name for p in folder.iterdir())
    theirs = [n for n in names if n not in _TEMPORARIES]
    if theirs and not holds_saved_selector(folder) and not _interrupted_save(folder, names):
        shown = ", ".join(theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
        raise param_error(name, owner, "a new or empty folder, or one holding a saved selector (whose files are replaced); "
                          f"this one holds files that are not a saved selector ({shown}); it is left alone: choose another folder",
                          str(folder), exc=FileExistsError)
    return folder


def save_folder(fitted: FittedSelector, folder: str | os.PathLike) -> Path:
    """Write the three files of the module docstring into ``folder`` (created when missing).

    Parameters
    ----------
    fitted : FittedSelector
    folder : str or PathLike
        A new or empty folder, or one holding a saved selector (its files are replaced).

    Returns
    -------
    Path
        The folder written.

    Raises
    ------
    FileExistsError
        ``folder`` holds files and no saved selector (see :func:`check_save_folder`): nothing is written.
    ValueError
        ``folder`` is a file, or a file lies in its path.
    """
    from safetensors.numpy import save

    folder = check_save_folder(folder, "save_directory", "FittedSelector.save_pretrained")
    folder.mkdir(parents=True, exist_ok=True)
    arrays, config = payload_of(fitted)
    state = save(arrays)
    config["files"] = {STATE_FILE: hashlib.sha256(state).hexdigest()}
    config["checksum"] = hashlib.sha256(_canonical(config)).hexdigest()
    # Each file whole or absent (a temporary file renamed); the JSON, which names the state's checksum, last.
    for name, data in ((STATE_FILE, state), (CARD_FILE, build_card(fitted).encode("utf-8")),
                       (CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True, default=_json_value) + "\n").encode("utf-8"))):
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
    return folder


def _refuse(source: Any, why: str) -> ValueError:
    return ValueError(f"Refusing to load the fitted selector from {source}: {why}.")


def _read_folder(folder: Path, source: Any) -> FittedSelector:
    from safetensors.numpy import load as load_arrays

    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        state = (folder / STATE_FILE).read_bytes()
    except FileNotFoundError as err:
        raise _refuse(source, f"{Path(err.filename).name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _refuse(source, f"{CONFIG_FILE} is not valid JSON") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise _refuse(source, f"{CONFIG_FILE} is not a {FORMAT} file")
    if config.get("format_version") != FORMAT_VERSION:
        raise _refuse(source, f"it is format version {config.get('format_version')!r}, and this hf_otselect reads version {FORMAT_VERSION}")
    recorded = config.pop("checksum", None)
    if recorded != hashlib.sha256(_canonical(config)).hexdigest():
        raise _refuse(source, f"{CONFIG_FILE} does not match its checksum (the file was changed or damaged)")
    if config.get("files", {}).get(STATE_FILE) != hashlib.sha256(state).hexdigest():
        raise _refuse(source, f"{STATE_FILE} does not match the checksum in {CONFIG_FILE} (the file was changed or damaged)")
    config.pop("files")
    return _build(load_arrays(state), config)


_SOURCE_EXPECTED = "an existing folder holding a saved selector, or a Hub model repository id 'user/name'"


def _not_found(source: str, why: str) -> ValueError:
    """``The 'source' parameter of FittedSelector.from_pretrained must be ... ('x/y' is neither: why). Got 'x/y' instead.``"""
    return param_error("source", "FittedSelector.from_pretrained", f"{_SOURCE_EXPECTED} ({short_repr(source)} is neither: {why})", source)


def _download(source: str, revision: str | None, token: str | None) -> list[str]:
    """The config and state files of the Hub repository ``source``; not finding them is said by argument."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    files = []
    for name in (CONFIG_FILE, STATE_FILE):
        try:
            files.append(hf_hub_download(source, name, revision=revision, token=token))
        except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE) or the Hub unreachable, and not in the local cache
            raise _not_found(source, "no such local folder; offline or the Hub unreachable, and no copy in the local Hub "
                             "cache") from None
        except GatedRepoError:
            raise _not_found(source, "a gated Hub repository: accept its conditions on the Hub and pass a token") from None
        except RepositoryNotFoundError:
            raise _not_found(source, "no such local folder, and no Hub model repository of that id, or a private one and no "
                             "token that may read it") from None
        except RevisionNotFoundError:
            raise param_error("revision", "FittedSelector.from_pretrained", f"a branch, tag or commit of the Hub repository "
                              f"{source!r}", revision) from None
        except EntryNotFoundError:  # the repository exists and lacks a file of a saved selector
            raise _not_found(source, f"a Hub repository without {name}, so not a saved selector") from None
    return files


def load(source: str | os.PathLike, *, revision: str | None = None, token: str | None = None) -> FittedSelector:
    """A fitted selector from a folder, or from a Hub model repository ``user/name``.

    Parameters
    ----------
    source : str or PathLike
        A folder written by :func:`save_folder`, or a Hub model repository id (a string that is
        no existing folder); the Hub is asked only for the latter.
    revision, token : str, optional
        The Hub revision and token.

    Returns
    -------
    FittedSelector

    Raises
    ------
    TypeError
        ``source`` is neither a ``str`` nor an ``os.PathLike``.
    ValueError
        ``source`` is no folder and no Hub repository that can be read (offline and not cached,
        no such repository, or one without a saved selector), or its files fail their checks.
    """
    owner = "FittedSelector.from_pretrained"
    if isinstance(source, bool) or not isinstance(source, (str, os.PathLike)):
        raise param_error("source", owner, f"a str or os.PathLike: {_SOURCE_EXPECTED}", source, exc=TypeError)
    raw = os.fspath(source)
    if not isinstance(raw, str) or not raw.strip():
        raise param_error("source", owner, _SOURCE_EXPECTED, source, exc=TypeError if isinstance(raw, bytes) else ValueError)
    path = Path(os.path.expanduser(raw))
    if path.is_dir():
        return _read_folder(path, source)
    if path.exists():
        raise param_error("source", owner, f"{_SOURCE_EXPECTED} (the folder that holds {CONFIG_FILE}, not a file)", raw)
    if not isinstance(source, str):
        raise _not_found(raw, f"no such folder; a {type(source).__name__} is read as a local folder, never as a Hub id")
    if raw.count("/") != 1 or raw.startswith((".", "/", "~")):
        raise _not_found(raw, "no such folder, and not of the form of a Hub repository id 'user/name'")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise _not_found(source, "no such folder, and not a valid Hub repository id") from None
    files = _download(source, revision, token)
    if Path(files[0]).parent != Path(files[1]).parent:
        raise _refuse(source, "its files came from different revisions")
    return _read_folder(Path(files[0]).parent, source)


def push(fitted: FittedSelector, repo_id: str, *, private: bool = True, token: str | None = None, commit_message: str | None = None) -> str:
    """Upload the saved folder to the Hub model repository ``repo_id`` (created when missing), one commit."""
    from huggingface_hub import HfApi

    from .hub import check_repo_id

    check_repo_id(repo_id)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_otselect_fitted_") as tmp:
        save_folder(fitted, tmp)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                          commit_message=commit_message or f"Fitted {fitted.method} selector by hf_otselect")
    logger.info("Pushed the fitted %s selector to %s", fitted.method, repo_id)
    return repo_id


#: GOT-D sample fits against the full fit, as measured by ``benchmarks/sample_fit.py``
#: (``benchmarks/results/sample_fit.md``; ``tests/test_fitted.py`` checks these against its JSON):
#: data -> sample fraction -> (top-1% overlap, top-10% overlap, Spearman of the scores).
MEASURED_FIDELITY: dict[str, dict[float, tuple[float, float, float]]] = {
    "1M clustered 384-d vectors, 1,000 targets": {
        0.001: (0.939, 0.99948, 0.99919), 0.01: (0.9796, 0.9999, 0.99994), 0.1: (0.9958, 0.99997, 1.0),
    },
    "3,888-row mixed text pool, ChemProt target": {
        0.001: (0.7179, 0.9434, 0.98091), 0.01: (0.9231, 0.9769, 0.99829), 0.1: (0.9231, 0.9846, 0.99971),
    },
}


def fidelity_section(fitted: FittedSelector) -> str:
    """The card's account of how far a sample fit's choice is from the full fit's.

    A full fit needs none. A GOT-D sample fit quotes the measured overlaps at the benchmark's
    sample fraction nearest this one (measured there, not on this pool: said so). Other methods
    have no measurement to quote, and the card says that rather than guessing.
    """
    info = fitted.fit_info
    if info["n_fit"] == info["n_pool"]:
        return "Fitted on every row of its pool: its scores are the full fit's."
    fraction = info["n_fit"] / max(info["n_pool"], 1)
    if fitted.method != "got_d":
        return (f"Fitted on {fraction:.3%} of its pool. No sample-fit fidelity has been measured for "
                f"`{fitted.method}`; compare with a full fit on a slice of your pool before relying on it.")
    rows = []
    for data, by_fraction in MEASURED_FIDELITY.items():
        near = min(by_fraction, key=lambda f: abs(np.log(f) - np.log(fraction)))
        top1, top10, rho = by_fraction[near]
        rows.append(f"| {data} | {near:.1%} | {top1:.3f} | {top10:.3f} | {rho:.4f} |")
    table = "\n".join(rows)
    return f"""Fitted on {info['n_fit']} of {info['n_pool']} rows ({fraction:.3%}). Measured on hf_otselect's
benchmark (`benchmarks/results/sample_fit.md`, not on this pool), GOT-D sample fits of the nearest
fraction kept these shares of the full fit's choice:

| benchmark data | sample | top-1% overlap | top-10% overlap | Spearman |
|---|---|---|---|---|
{table}"""


def build_card(fitted: FittedSelector) -> str:
    """The ``README.md`` of a fitted selector: what it is, how it was fitted and how to use it."""
    info, enc = fitted.fit_info, fitted.encoder
    rows = "\n".join(f"| {f:g} | {fitted.calibrated_threshold(f):.6g} |" for f in (0.001, 0.01, 0.1, 0.5))
    encoder = "none recorded (fitted on precomputed vectors; map with a vector column)" if enc is None else (
        f"`{enc['model'] or 'sentence-transformers/all-MiniLM-L6-v2 (bundled with hf_otselect)'}`, revision {enc['revision'] or 'default'}, "
        f"{enc['pooling']} pooling, max_length {enc['max_length']}, normalize {enc['normalize']}"
        + (f", {enc['backend']} back end{' int8' if enc.get('quantize') else ''}" if "backend" in enc else ""))
    sample = "the whole pool" if info["n_fit"] == info["n_pool"] else f"{info['n_fit']} of {info['n_pool']} rows (sample={info['sample']!r})"
    params = json.dumps(fitted.params, sort_keys=True, default=_json_value)
    keyed = "its score" if fitted.choice == "top_k" else "a sampling key from (seed, global row index) and its score"
    return f"""---
library_name: hf_otselect
tags:
- data-selection
- optimal-transport
- {fitted.method}
---
# Fitted `{fitted.method}` data selector

Fitted with hf_otselect `fit_selector`; load it with
`hf_otselect.FittedSelector.from_pretrained(...)` and score any dataset or stream with
`ds.map(fitted, batched=True)`, then filter with `ds.filter(fitted.keep(fraction=0.01), batched=True, with_indices=True)`.

| | |
|---|---|
| method | `{fitted.method}` |
| parameters | `{params}` |
| target | {info['target_size']} rows, fingerprint `{info['target_fingerprint'][:16]}` |
| fitted on | {sample}, {info['processes']} process(es), seed {fitted.seed} |
| encoder | {encoder} |
| map | reads `{fitted.vector_column or fitted.column}`, writes `{fitted.score_column}` |

## Calibration

A row is kept by {keyed}. Keeping the rows whose key is at least the threshold keeps this
fraction of the fit rows:

| fraction kept | key threshold |
|---|---|
{rows}

## Sample fidelity

{fidelity_section(fitted)}

## Fit diagnostics

```json
{json.dumps(info.get('diagnostics', {}), indent=2, sort_keys=True, default=_json_value)}
```
"""
