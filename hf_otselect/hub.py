"""The dataset card of a selection, and pushing a selection to the Hub.

The card's YAML header carries the provenance of ``selection.json`` under ``hf_otselect:``, so a
user can read it back (:func:`config_from_card`) and rerun the same job. What leaves the machine is
made public first (:func:`public_provenance`): absolute local paths become relative to the working
directory, or ``<local>/<file name>`` outside it, so no home directory or user name is published
(the job's local card and ``selection.json`` keep the paths as given).

:func:`push` uploads the selected rows as parquet shards, the card and ``selection.json`` in one
commit through ``huggingface_hub``; the card's header holds both our fields and the ``configs`` /
``dataset_info`` metadata that ``Dataset.push_to_hub`` writes. The token comes from the usual
sources (``HF_TOKEN``, ``hf auth login``) or ``token=`` and is never printed, logged or written.
Each request has a timeout and 429 / 5xx answers are retried (:mod:`hf_otselect._hub_http`); a
failure is one :class:`HubError` line with any token redacted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from huggingface_hub import DatasetCard

from ._checks import param_error, short_repr
from ._hub_http import DEFAULT_RETRIES, HubError, check_retries, hub_call, resolve_timeout
from ._redact import remember_secret
from .config import SelectionConfig

logger = logging.getLogger(__name__)

__all__ = ["HubError", "build_card", "check_repo_id", "config_from_card", "public_provenance", "push"]

_METHODS = {
    "got_d": "GOT-D (Kang et al., ICLR 2024): candidates ranked by the gradient of the entropic OT distance "
    "to the target with respect to their mass (the Sinkhorn dual potential); the most negative first, i.e. "
    "the rows that move the pool's distribution toward the target most.",
    "tsds": "TSDS (Liu et al., NeurIPS 2024): OT alignment to the target plus a kernel-density diversity term, "
    "solved in closed form over k-nearest neighbours; rows are sampled from the resulting probabilities.",
    "random": "Uniform random sample of the pool (a baseline).",
    "similarity": "Top-k cosine similarity of each row to the target embeddings (a baseline).",
    "dsir": "DSIR (Xie et al., 2023): importance resampling with hashed n-gram features (a baseline).",
}


def check_repo_id(repo_id: Any) -> str:
    """Validate a Hub repository id (``user/name``) before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise param_error("repo_id", "push", "a repository id of the form 'user/name'", repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise param_error("repo_id", "push", "a valid Hub repository id of the form 'user/name'", repo_id) from err
    return repo_id


def _histogram(scores: Sequence[float] | None, bins: int = 10, counted: tuple[Sequence[int], Sequence[float]] | None = None) -> str:
    if counted is not None:  # (counts, edges), counted where the rows live
        counts, edges = np.asarray(counted[0], dtype=np.int64), np.asarray(counted[1], dtype=np.float64)
        if not counts.size:
            return "(no selected rows)"
    else:
        counts, edges = np.histogram(np.asarray(scores, dtype=np.float64), bins=bins)
    width = max(int(counts.max()), 1)
    lines = ["| score range | rows | |", "|---|---|---|"]
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"| {lo:.4g} to {hi:.4g} | {c} | {'#' * round(20 * c / width)} |")
    return "\n".join(lines)


# An absolute POSIX path (or ~/...) inside any string: a slash not preceded by a name character, a
# colon (URLs) or another slash. Hub ids ("user/name") and fractions ("1/2") do not match.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:~/|/)(?:[\w.+@=,~-]+/)*[\w.+@=,~-]*")
# Buckets of the Hub's ``size_categories`` field (number of rows).
_SIZE_BUCKETS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                 (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")


def _public_path(raw: str, cwd: Path) -> str:
    if raw in ("/", "~/"):
        return raw
    path = Path(os.path.expanduser(raw))
    try:
        rel = path.relative_to(cwd)
        return rel.as_posix() if rel.parts else "."
    except ValueError:
        pass
    home = Path.home()
    name = path.name
    # The last component alone, unless it is the home folder itself (which names the user).
    return "<local>" if not name or path == home or path == home.parent else f"<local>/{name}"


def public_provenance(provenance: Any, *, cwd: str | os.PathLike | None = None) -> Any:
    """A copy of ``provenance`` fit to publish: no absolute local path in any string.

    Every absolute path (``/...`` or ``~/...``) found in a string, at any depth of dicts and
    lists, becomes relative to ``cwd`` (default: the working directory) when it lies inside it,
    and ``<local>/<last component>`` otherwise (``<local>`` for the home folder itself). Data
    paths, cache folders and local model folders are all caught by this one rule; relative
    paths, Hub ids and URLs are left as they are.

    Parameters
    ----------
    provenance : dict, list or scalar
        Typically the content of ``selection.json``.
    cwd : path, optional
        The folder relative paths are taken from.
    """
    base = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if isinstance(provenance, dict):
        return {k: public_provenance(v, cwd=base) for k, v in provenance.items()}
    if isinstance(provenance, (list, tuple)):
        return [public_provenance(v, cwd=base) for v in provenance]
    if isinstance(provenance, str):
        if provenance.startswith(("/", "~/")) and " /" not in provenance and "\n" not in provenance:
            # The whole string is one path (it may hold spaces, which end a path inside prose).
            return _public_path(provenance, base)
        return _ABS_PATH.sub(lambda m: _public_path(m.group(0), base), provenance)
    return provenance


def _size_category(n_rows: int) -> str:
    for bound, name in _SIZE_BUCKETS:
        if n_rows < bound:
            return name
    return "n>1B"


def _hub_dataset_id(path: Any) -> str | None:
    """``path`` when it names a Hub dataset (not a local file, folder or glob), else None."""
    if not isinstance(path, str) or not path or path.startswith((".", "/", "~", "<")) or "*" in path:
        return None
    if path.lower().endswith(_DATA_SUFFIXES) or path.count("/") > 1 or Path(path).exists():
        return None
    return path


def card_metadata(provenance: dict[str, Any], *, license: str = "unknown") -> dict[str, Any]:
    """The Hub's standard card fields for a selection: license, size, sources, tasks, tags.

    ``license`` is the user's to state (a selection inherits the pool's licences; ``unknown`` by
    default). ``size_categories`` comes from the number of selected rows. ``source_datasets`` names
    the pool, where the rows come from, when it is a Hub dataset id (a local file names nothing
    others can find, so it is left out).
    ``task_categories`` are the two objectives the selection serves (``scripts/prefinetune.py``).
    """
    cfg = provenance.get("config", {})
    sources = [s for s in (_hub_dataset_id(cfg.get("pool", {}).get("path")),) if s]
    meta: dict[str, Any] = {
        "license": license,
        "size_categories": [_size_category(int(provenance["rows"]["selected"]))],
        "task_categories": ["text-generation", "fill-mask"],
        "tags": ["data-selection", "hf_otselect", provenance["method"]],
    }
    if sources:
        meta["source_datasets"] = sources
    return meta


def build_card(
    provenance: dict[str, Any],
    selected_scores: Sequence[float] | None,
    *,
    histogram: tuple[Sequence[int], Sequence[float]] | None = None,
    metadata: dict[str, Any] | None = None,
    license: str = "unknown",
    public: bool = False,
) -> DatasetCard:
    """Make the dataset card of a selection.

    The header holds :func:`card_metadata`, then ``metadata`` (e.g. the ``configs`` and
    ``dataset_info`` of the pushed split), then the provenance under ``hf_otselect``.

    Parameters
    ----------
    provenance : dict
        The content of ``selection.json``.
    selected_scores : sequence of float or None
        Scores of the selected rows (for the histogram in the card body); None with ``histogram``.
    histogram : (counts, edges), optional
        That histogram already counted (10 bins; a job counts it where its rows live and sums the
        counts over its processes, so no process gathers the selected rows' scores).
    metadata : dict, optional
        More header fields; they override the standard ones of the same name.
    license : str, default "unknown"
        The card's ``license`` field.
    public : bool, default False
        Pass the provenance (and so the prose) through :func:`public_provenance`. The job's local
        card keeps its paths, so :func:`config_from_card` reruns the job on the same machine;
        :func:`push` always publishes the public card.
    """
    if public:
        provenance = public_provenance(provenance)
    method = provenance["method"]
    meta = {**card_metadata(provenance, license=license), **(metadata or {}), "hf_otselect": provenance}
    header = yaml.safe_dump(meta, sort_keys=True, allow_unicode=True)
    ot = provenance.get("ot_distance", {})
    rows = provenance["rows"]
    cfg = provenance["config"]
    body = f"""
# Selection made with hf_otselect

{rows['selected']} rows ({rows['selected_unique']} distinct) chosen from a pool of {rows['pool']} rows
(`{cfg['pool']['path']}`) for the target `{cfg['target']['path']}`.

## Method
{_METHODS.get(method, method)}

Parameters: `{json.dumps(provenance['params'], sort_keys=True)}`; seed {provenance['seed']};
encoder {provenance['model']}.

## What the selection did
- OT distance target to pool: {ot.get('target_pool')}
- OT distance target to selection: {ot.get('target_selection')}

Lower means closer to the target. These are entropic OT costs between embeddings, not a measure of
downstream quality: evaluate a model trained on the selection before trusting it.

## Scores of the selected rows
{_histogram(selected_scores, counted=histogram)}

{_fit_section(provenance.get("fitted_selector"))}## Limitations
The selection inherits the pool's content, licences and biases; it is only as close to the target as
the pool allows, and the embedding model decides what "close" means.

## Reproduce
The YAML header of this card holds the full job configuration under `hf_otselect.config`:
`hf_otselect.hub.config_from_card("README.md")` returns it, and
`hf-otselect select --config <that config saved as YAML>` reruns the selection.
"""
    return DatasetCard(f"---\n{header}---\n{body}")


def _fit_section(kept: dict[str, Any] | None) -> str:
    """The card's paragraph on the fit the job kept (``selector/``), empty when it kept none."""
    if not kept or not kept.get("saved"):
        return ""
    return (f"## The fitted selector\nThe fit is kept in `{kept['path']}/` of the job's output folder: "
            f"`hf_otselect.FittedSelector.from_pretrained(\"{kept['path']}\")` scores {kept['scores']} as this "
            "selection did (`ds.map(fitted, batched=True)`), and `fitted.push_to_hub(repo_id)` shares it.\n\n")


_CARD_HEADER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", re.DOTALL | re.MULTILINE)


def config_from_card(
    card: str | os.PathLike | DatasetCard, *, trust_remote_code: bool = False, repo_id: str | None = None,
) -> SelectionConfig:
    """Read the job configuration back from a card.

    A card is untrusted (anyone can edit one), so two settings are never replayed from it alone:
    ``embedding.trust_remote_code`` (it runs the model repository's own code) and the push target
    (``push_to_hub`` / ``hub.repo_id``: where the selected rows would be sent). The caller passes
    them; a card that asks for either is read with a warning that says what was left out.

    Parameters
    ----------
    card : str, PathLike or DatasetCard
        The card's text (what ``README.md`` holds, starting with its ``---`` YAML header), the path
        of such a file, or a loaded :class:`~huggingface_hub.DatasetCard`. At most
        :data:`hf_otselect.config.MAX_YAML_BYTES` (1 MiB) of UTF-8 in each form.
    trust_remote_code : bool, default False
        Replay the card's ``embedding.trust_remote_code: true``; without it the config says false.
    repo_id : str, optional
        Push the rerun's selection to this repository (``push_to_hub`` on, ``hub.repo_id`` this);
        without it the config pushes nothing, whatever the card says.

    Returns
    -------
    SelectionConfig
        The validated job configuration recorded under ``hf_otselect.config``.

    Notes
    -----
    The header is untrusted input: it is parsed with :func:`hf_otselect.config.load_yaml` (no
    anchors or aliases, no duplicate keys, bounded size and depth), never with the card library's
    own unbounded ``yaml.safe_load``.
    """
    from .config import check_text_size, load_yaml, read_text_file

    if not isinstance(trust_remote_code, bool):
        raise param_error("trust_remote_code", "config_from_card", "a bool", trust_remote_code, exc=TypeError)
    if repo_id is not None:
        check_repo_id(repo_id)
    if isinstance(card, DatasetCard):
        text, source = str(card.content), "The 'card' text"
    elif isinstance(card, os.PathLike) or (isinstance(card, str) and not _looks_like_card_text(card)):
        path = Path(card)
        text, source = read_text_file(path, "card"), f"The 'card' file {short_repr(str(path))}"
    elif isinstance(card, str):
        text, source = card, "The 'card' text"
    else:
        raise param_error("card", "config_from_card", "the card's text, its path or a DatasetCard", type(card).__name__, exc=TypeError)
    check_text_size(text, source)  # the rule a file meets, for the text and the loaded card too
    header = _CARD_HEADER.match(text.lstrip("\ufeff"))
    meta = load_yaml(header.group(1), f"{source} (YAML header)") if header else None
    meta = meta.get("hf_otselect") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise param_error("card", "config_from_card", "a card written by hf_otselect (YAML key 'hf_otselect.config')", "a card without it")
    config = SelectionConfig.from_dict(meta["config"])
    if config.embedding.trust_remote_code and not trust_remote_code:
        logger.warning("%s asks for embedding.trust_remote_code=true (it runs the model repository's own code); not "
                       "replayed: pass trust_remote_code=True to config_from_card if you trust that code.", source)
        config.embedding.trust_remote_code = False
    if (config.push_to_hub or config.hub.repo_id) and repo_id is None:
        logger.warning("%s pushes the selection to %s (push_to_hub=%s); not replayed: pass repo_id='user/name' to "
                       "config_from_card to push.", source, short_repr(config.hub.repo_id), str(config.push_to_hub).lower())
    config.push_to_hub, config.hub.repo_id = repo_id is not None, repo_id
    return config.validate()


def _looks_like_card_text(card: str) -> bool:
    """A card's text starts with its ``---`` header or spans lines; a path does neither."""
    return card.lstrip("\ufeff \t\r\n").startswith("---") or "\n" in card



def load_selection(output_dir: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The selected split and the provenance of a finished job folder.

    Both layouts are read: one ``DatasetDict`` saved with ``save_to_disk`` (``dataset_dict.json``
    with ``scored`` and ``selected`` splits, loadable with ``load_from_disk(output_dir)``) and the
    earlier two folders ``scored/`` and ``selected/``. ``selection.json`` sits beside either.

    Returns
    -------
    (datasets.Dataset, dict)
    """
    from datasets import load_from_disk

    folder = Path(output_dir)
    expected = "a finished selection folder (a DatasetDict with a 'selected' split, or selected/, and selection.json)"
    if not (folder / "selection.json").is_file():
        raise param_error("output_dir", "push", expected, str(folder))
    if (folder / "dataset_dict.json").is_file():
        splits = load_from_disk(str(folder))
        if "selected" not in splits:
            raise param_error("output_dir", "push", expected, f"{folder} with splits {sorted(splits)}")
        selected = splits["selected"]
    elif (folder / "selected").is_dir():
        selected = load_from_disk(str(folder / "selected"))
    else:
        raise param_error("output_dir", "push", expected, str(folder))
    return selected, json.loads((folder / "selection.json").read_text(encoding="utf-8"))


def _parquet_shards(dataset: Any, split: str, folder: Path, max_shard_size: int) -> tuple[list[Path], Any, int]:
    """Write ``dataset`` as ``data/{split}-00000-of-00003.parquet (numbered)`` shards, as ``push_to_hub`` names them.

    Returns the shard files, the split's ``SplitInfo`` (bytes in Arrow, rows) and the parquet bytes.
    """
    from datasets.splits import SplitInfo

    dataset = dataset.flatten_indices(keep_in_memory=True)
    n_bytes = int(dataset.data.nbytes)
    n_shards = max(1, min(len(dataset), n_bytes // max_shard_size + 1))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_shards):
        path = folder / "data" / f"{split}-{i:05d}-of-{n_shards:05d}.parquet"
        dataset.shard(n_shards, i, contiguous=True).to_parquet(str(path))
        files.append(path)
    info = SplitInfo(name=split, num_bytes=n_bytes, num_examples=len(dataset))
    return files, info, sum(p.stat().st_size for p in files)


def _split_metadata(features: Any, split_info: Any, parquet_bytes: int, data_pattern: str) -> dict[str, Any]:
    """``configs`` and ``dataset_info`` header fields for one split, made by the very ``datasets``
    helpers ``push_to_hub`` uses, so the Hub viewer and ``load_dataset`` read them as usual."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    info = DatasetInfo(config_name="default", features=features, splits=SplitDict(), download_size=parquet_bytes,
                       dataset_size=split_info.num_bytes)
    info.splits.add(split_info)
    info.size_in_bytes = parquet_bytes + split_info.num_bytes
    data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [{"split": split_info.name, "path": data_pattern}]}}).to_dataset_card_data(data)
    return {k: v for k, v in data.to_dict().items() if k in ("configs", "dataset_info")}


def push(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    split: str = "train",
    token: str | None = None,
    license: str = "unknown",
    max_shard_size: int | str = "500MB",
    timeout: float | None = None,
    retries: int = DEFAULT_RETRIES,
) -> str:
    """Upload a finished selection to the Hub dataset repository ``repo_id`` in one commit.

    The commit holds the selected rows as ``data/{split}-*.parquet`` shards (the names
    ``Dataset.push_to_hub`` gives them), ``selection.json`` and one ``README.md``: the card's
    prose with a header that merges the Hub's standard fields (license, size category, source
    datasets, task categories), the ``configs`` / ``dataset_info`` that ``push_to_hub`` would
    write, and the provenance. Everything uploaded goes through :func:`public_provenance`, so no
    absolute local path leaves the machine. Files under ``data/`` from an earlier push that this
    one does not rewrite are deleted in the same commit: the repository then holds exactly this
    selection.

    We write the shards and the card ourselves rather than calling ``Dataset.push_to_hub`` and
    then uploading the card: that is two commits, and the second replaced the README the first
    wrote together with its ``configs`` / ``dataset_info``. One commit also leaves no moment when
    the repository has data without its card.

    Parameters
    ----------
    output_dir : path
        A job's output folder (see :func:`load_selection` for the two layouts read).
    repo_id : str
        ``user/name`` of the dataset repository (created when missing).
    private : bool, default True
        Visibility when the repository is created.
    split : str, default "train"
        Split name of the pushed rows.
    token : str, optional
        Passed to ``huggingface_hub`` only; defaults to its usual sources.
    license : str, default "unknown"
        The card's ``license`` field (a selection inherits the pool's licences).
    max_shard_size : int or str, default "500MB"
        Largest parquet shard, in Arrow bytes, as in ``push_to_hub``.
    timeout : float, optional
        Seconds each Hub request may wait to connect, send or receive; default
        ``$HF_HUB_DOWNLOAD_TIMEOUT``, else 60.
    retries : int, default 3
        Tries after the first of a request the Hub answered with 429 or 5xx (1, 2, 4 s apart).

    Returns
    -------
    str
        The repository id.

    Raises
    ------
    HubError
        A request got no answer within ``timeout``, the Hub could not be reached, or it refused a
        step (after the retries, for 429 / 5xx): one line, with no token in it.
    """
    from datasets.utils.py_utils import convert_file_size_to_int
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    remember_secret(token)
    check_repo_id(repo_id)
    timeout = resolve_timeout(timeout, "push")
    retries = check_retries(retries, "push")
    if not isinstance(split, str) or not re.fullmatch(r"\w+(\.\w+)*", split):
        raise param_error("split", "push", "a split name of letters, digits, '_' and '.'", split)
    shard_bytes = convert_file_size_to_int(max_shard_size)
    from .datasets_ext import best_first

    selected, provenance = load_selection(output_dir)
    selected = best_first(selected)  # a folder written before selected/ was saved in this order
    provenance = public_provenance(provenance)
    scores = selected[provenance["config"]["score_column"]]
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_otselect_push_") as tmp:
        staging = Path(tmp)
        files, split_info, parquet_bytes = _parquet_shards(selected, split, staging, shard_bytes)
        metadata = _split_metadata(selected.features, split_info, parquet_bytes, f"data/{split}-*")
        card = build_card(provenance, scores, metadata=metadata, license=license, public=True)
        uploads = {p.relative_to(staging).as_posix(): str(p) for p in files}
        uploads["README.md"] = str(card).encode("utf-8")
        uploads["selection.json"] = (json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode("utf-8")
        logger.info("Pushing %d rows (%d parquet shards) and the card to the Hub dataset %s, split %s",
                    len(selected), len(files), repo_id, split)
        call = functools.partial(hub_call, endpoint=api.endpoint, timeout=timeout, retries=retries)
        call("create_repo", lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True))
        files_there = call("list_repo_files", lambda: api.list_repo_files(repo_id, repo_type="dataset"))
        stale = [f for f in files_there if f.startswith("data/") and f not in uploads]

        def commit() -> Any:  # fresh operations on each try: an operation records its own upload
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src) for name, src in uploads.items()]
            operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
            return api.create_commit(repo_id, operations=operations, repo_type="dataset",
                                     commit_message=f"Selection of {len(selected)} rows by hf_otselect ({provenance['method']})")

        call("the commit", commit)
    return repo_id
