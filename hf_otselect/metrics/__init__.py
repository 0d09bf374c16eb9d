"""Metric modules for the ``evaluate`` library, shipped as package data so they work offline.

``evaluate`` 0.4.6 ships no metric scripts: ``evaluate.load("accuracy")`` downloads one from the
Hub and fails without network access. Each folder here holds a small ``evaluate.Metric`` module
(``<name>/<name>.py``) computing with scikit-learn/numpy, which ``evaluate.load(<folder>)`` reads.
:func:`load` prefers the Hub module when the Hub may be used and falls back to ours.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .._checks import check_choice

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent
# Ours, by name. "token_perplexity" has no Hub twin with the same inputs (the Hub "perplexity" runs
# a model itself), so it is always ours.
LOCAL_METRICS = ("accuracy", "f1", "token_perplexity")
_HUB_TWINS = ("accuracy", "f1")


def local_path(name: str) -> Path:
    """The folder of our module ``name`` (pass it to ``evaluate.load``)."""
    check_choice(name, "name", "hf_otselect.metrics.local_path", list(LOCAL_METRICS))
    return METRICS_DIR / name


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of evaluate
        pass
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


def load(name: str, *, prefer_hub: bool = True, **kwargs: Any) -> Any:
    """Load an ``evaluate`` metric: the Hub module when online, ours otherwise.

    Parameters
    ----------
    name : {"accuracy", "f1", "token_perplexity"}
    prefer_hub : bool, default True
        Try ``evaluate.load(name)`` first (accuracy and f1 only). Skipped when ``HF_HUB_OFFLINE``
        is set; any failure falls back to our module with a log message.
    **kwargs
        Passed to ``evaluate.load`` (e.g. ``experiment_id``, ``cache_dir``).

    Returns
    -------
    evaluate.EvaluationModule
        Same ``compute`` inputs and outputs whichever module was loaded.
    """
    import evaluate

    path = local_path(name)
    if prefer_hub and name in _HUB_TWINS and not _hub_offline():
        try:
            return evaluate.load(name, **kwargs)
        except Exception as err:  # no network, Hub down, missing script: ours computes the same
            logger.info("evaluate.load(%r) failed (%s); using the bundled module %s", name, err, path)
    return evaluate.load(str(path), **kwargs)


__all__ = ["LOCAL_METRICS", "METRICS_DIR", "load", "local_path"]
