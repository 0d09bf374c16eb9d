""""Did you mean ...?" for a misspelt key or keyword (the closest known name, by difflib)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["did_you_mean"]


def did_you_mean(word: Any, known: Iterable[Any]) -> str:
    """``" Did you mean 'method'?"`` for the known name closest to ``word``, or ``""`` when none is close.

    Parameters
    ----------
    word : Any
        The unknown name as given (non-strings get no suggestion).
    known : iterable of str
        The names that exist.

    Returns
    -------
    str
        A sentence to append to an error message (with its leading space), or the empty string.
        Matching ignores case; the suggestion is spelt as in ``known``.
    """
    if not isinstance(word, str):
        return ""
    names = {name.lower(): name for name in known if isinstance(name, str)}
    close = difflib.get_close_matches(word.lower(), list(names), n=1, cutoff=0.6)
    return f" Did you mean {names[close[0]]!r}?" if close else ""
