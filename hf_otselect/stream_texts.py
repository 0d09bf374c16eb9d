"""One text column of a streamed pool as the sequence a text selector's view reads.

A text selector (DSIR) reads the pool through :class:`hf_otselect.dist.TextView`: its length, and
slices of consecutive rows in ascending order (the fit's blocks, then the scoring's). A stream has
neither a length nor random access, so :class:`StreamTexts` reads it once to count and check its
rows (the rules the encoder applies, :func:`hf_otselect.embed.check_texts`) and then serves each
slice from the open iterator, reopening the stream only when a pass starts again. Memory stays at
one block of texts; the stream is read once per pass (count, fit, score).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from .embed import _check_texts

__all__ = ["StreamTexts"]

_CHECK_ROWS = 4096  # texts checked at once in the counting pass


class StreamTexts(Sequence[str]):
    """The ``column`` texts of ``stream`` (this process's rows of a streamed pool), read in order.

    Parameters
    ----------
    stream : iterable of dict
        An ``IterableDataset`` (or anything iterable again from its start) yielding rows.
    column : str
        The text column.
    owner : str
        Function named in an error message.
    rows : iterable of dict, optional
        What the counting pass reads instead of ``stream`` (the same rows, e.g. wrapped by a
        digest that fingerprints the stream on the way).

    Raises
    ------
    TypeError, ValueError
        A value that is not a str, or a blank one, named by its row (during the counting pass,
        before any fit).
    """

    def __init__(self, stream: Iterable[dict[str, Any]], column: str, *, owner: str, rows: Iterable[dict[str, Any]] | None = None) -> None:
        self._stream, self._column, self._owner = stream, column, owner
        n, batch = 0, []
        for row in stream if rows is None else rows:
            batch.append(row[column])
            if len(batch) == _CHECK_ROWS:
                _check_texts(batch, n, column, owner)
                n, batch = n + len(batch), []
        _check_texts(batch, n, column, owner)
        self._n = n + len(batch)
        self._rows: Iterator[dict[str, Any]] | None = None
        self._pos = 0

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, key: int) -> str: ...

    @overload
    def __getitem__(self, key: slice) -> list[str]: ...

    def __getitem__(self, key: int | slice) -> str | list[str]:
        """Texts ``[start, stop)`` (step 1), cleaned as :func:`~hf_otselect.embed.check_texts` does."""
        if isinstance(key, int):
            i = key + self._n if key < 0 else key
            if not 0 <= i < self._n:
                raise IndexError("StreamTexts index out of range")
            return self[i : i + 1][0]
        start, stop, step = key.indices(self._n)
        if step != 1:
            raise IndexError("StreamTexts reads consecutive rows only (slice step 1)")
        if self._rows is None or start < self._pos:  # a new pass: from the stream's start
            self._rows, self._pos = iter(self._stream), 0
        texts: list[str] = []
        for row in self._rows:
            if self._pos >= start:
                texts.append(row[self._column])
            self._pos += 1
            if self._pos >= stop:
                break
        return _check_texts(texts, start, self._column, self._owner)
