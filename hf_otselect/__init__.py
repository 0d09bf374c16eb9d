"""hf_otselect: optimal-transport data selection for Hugging Face datasets.

``import hf_otselect`` adds ``select_by_ot`` to ``datasets.Dataset``, ``IterableDataset`` and ``DatasetDict`` and
registers the selectors; torch, transformers and faiss load only when first needed (the
modules import them inside the functions that use them).
"""

from __future__ import annotations

from .config import SelectionConfig, load_config
from .datasets_ext import register_dataset_methods, select_by_ot
from .embed import DEFAULT_MODEL, embed, iter_embeddings
from .fitted import FittedSelector, fit_selector
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
from .stream_pass import StreamPass, write_selected

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "DSIRSelector",
    "FittedSelector",
    "GOTDSelector",
    "RandomSelector",
    "SelectionConfig",
    "SelectionResult",
    "Selector",
    "SimilaritySelector",
    "StreamPass",
    "TSDSSelector",
    "__version__",
    "available_selectors",
    "choose",
    "embed",
    "fit_selector",
    "get_selector",
    "iter_embeddings",
    "load_config",
    "select_by_ot",
    "write_selected",
]

register_dataset_methods()
