"""The dataset card of a selection, and pushing a selection to the Hub.

The card's YAML header carries the full provenance of ``selection.json`` under ``hf_otselect:``,
so a user can read it back (:func:`config_from_card`) and rerun the very same job. Network calls go
through ``datasets``/``huggingface_hub`` only; the token comes from their usual sources (``HF_TOKEN``,
``huggingface-cli login``) and is never printed, logged or written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from huggingface_hub import DatasetCard

from ._checks import param_error, short_repr
from .config import SelectionConfig

logger = logging.getLogger(__name__)

__all__ = ["build_card", "check_repo_id", "config_from_card", "push"]

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


def _histogram(scores: Sequence[float], bins: int = 10) -> str:
    values = np.asarray(scores, dtype=np.float64)
    counts, edges = np.histogram(values, bins=bins)
    width = max(int(counts.max()), 1)
    lines = ["| score range | rows | |", "|---|---|---|"]
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"| {lo:.4g} to {hi:.4g} | {c} | {'#' * round(20 * c / width)} |")
    return "\n".join(lines)


def build_card(provenance: dict[str, Any], selected_scores: Sequence[float]) -> DatasetCard:
    """Make the dataset card of a selection.

    Parameters
    ----------
    provenance : dict
        The content of ``selection.json``.
    selected_scores : sequence of float
        Scores of the selected rows (for the histogram in the card body).
    """
    method = provenance["method"]
    meta = {
        "tags": ["data-selection", "hf_otselect", method],
        "hf_otselect": provenance,
    }
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
{_histogram(selected_scores)}

## Limitations
The selection inherits the pool's content, licences and biases; it is only as close to the target as
the pool allows, and the embedding model decides what "close" means.

## Reproduce
The YAML header of this card holds the full job configuration under `hf_otselect.config`:
`hf_otselect.hub.config_from_card("README.md")` returns it, and
`hf-otselect select --config <that config saved as YAML>` reruns the selection.
"""
    return DatasetCard(f"---\n{header}---\n{body}")


_CARD_HEADER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", re.DOTALL | re.MULTILINE)


def config_from_card(card: str | os.PathLike | DatasetCard) -> SelectionConfig:
    """Read the job configuration back from a card.

    Parameters
    ----------
    card : str, PathLike or DatasetCard
        The card's text (what ``README.md`` holds, starting with its ``---`` YAML header), the path
        of such a file, or a loaded :class:`~huggingface_hub.DatasetCard`.

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
    from .config import load_yaml, read_text_file

    if isinstance(card, DatasetCard):
        text, source = str(card.content), "The 'card' text"
    elif isinstance(card, os.PathLike) or (isinstance(card, str) and not _looks_like_card_text(card)):
        path = Path(card)
        text, source = read_text_file(path, "card"), f"The 'card' file {short_repr(str(path))}"
    elif isinstance(card, str):
        text, source = card, "The 'card' text"
    else:
        raise param_error("card", "config_from_card", "the card's text, its path or a DatasetCard", type(card).__name__, exc=TypeError)
    header = _CARD_HEADER.match(text.lstrip("\ufeff"))
    meta = load_yaml(header.group(1), f"{source} (YAML header)") if header else None
    meta = meta.get("hf_otselect") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise param_error("card", "config_from_card", "a card written by hf_otselect (YAML key 'hf_otselect.config')", "a card without it")
    return SelectionConfig.from_dict(meta["config"])


def _looks_like_card_text(card: str) -> bool:
    """A card's text starts with its ``---`` header or spans lines; a path does neither."""
    return card.lstrip("\ufeff \t\r\n").startswith("---") or "\n" in card


def push(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    split: str = "train",
    token: str | None = None,
) -> str:
    """Upload ``output_dir/selected`` and its card to the Hub dataset repository ``repo_id``.

    Returns the repository id. The token is passed to huggingface_hub and nowhere else.
    """
    from datasets import load_from_disk

    check_repo_id(repo_id)
    folder = Path(output_dir)
    if not (folder / "selected").is_dir() or not (folder / "selection.json").is_file():
        raise param_error("output_dir", "push", "a finished selection folder (with selected/ and selection.json)", str(folder))
    selected = load_from_disk(str(folder / "selected"))
    provenance = json.loads((folder / "selection.json").read_text(encoding="utf-8"))
    card = build_card(provenance, selected[provenance["config"]["score_column"]])
    logger.info("Pushing %d rows to the Hub dataset %s (split %s)", len(selected), repo_id, split)
    selected.push_to_hub(repo_id, split=split, private=private, token=token)
    card.push_to_hub(repo_id, repo_type="dataset", token=token)
    return repo_id
