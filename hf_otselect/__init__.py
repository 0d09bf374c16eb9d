"""hf_otselect: optimal-transport data selection for Hugging Face datasets.

``import hf_otselect`` adds ``select_by_ot`` to ``datasets.Dataset`` and ``IterableDataset`` and
registers the selectors; torch, transformers and faiss load only when first needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import SelectionConfig, load_config
from .datasets_ext import register_dataset_methods, select_by_ot
from .selectors import (
    DSIRSelector,
    GOTDSelector,
    RandomSelector,
    SelectionResult,
    Selector,
    SimilaritySelector,
    TSDSSelector,
    available_selectors,
    choose,
    get_selector,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "DSIRSelector",
    "GOTDSelector",
    "RandomSelector",
    "SelectionConfig",
    "SelectionResult",
    "Selector",
    "SimilaritySelector",
    "TSDSSelector",
    "__version__",
    "available_selectors",
    "choose",
    "embed",
    "get_selector",
    "iter_embeddings",
    "load_config",
    "select_by_ot",
]

# Names served from modules that import torch/transformers, loaded on first access (PEP 562).
_LAZY = {"embed": ".embed", "iter_embeddings": ".embed", "DEFAULT_MODEL": ".embed"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hf_otselect' has no attribute {name!r}")


register_dataset_methods()
