"""Selectors: one interface (:mod:`.base`), registered by name.

Importing this package registers every built-in selector. Heavy libraries (torch, faiss, geomloss)
are imported inside the methods that need them, not here.
"""

from .base import SelectionResult, Selector, available_selectors, choose, get_selector, register
from .baselines import DSIRSelector, RandomSelector, SimilaritySelector
from .got_d import GOTDSelector
from .tsds import TSDSSelector

__all__ = [
    "DSIRSelector",
    "GOTDSelector",
    "RandomSelector",
    "SelectionResult",
    "Selector",
    "SimilaritySelector",
    "TSDSSelector",
    "available_selectors",
    "choose",
    "get_selector",
    "register",
]
