"""What names a side's content: digests of arrays and values, a stream's running hash, fingerprints.

The score cache keys, the split fingerprints, the agreement between processes and the fitted
selector's record all name content through these functions, so one rule decides what "the same
pool" means everywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset

__all__ = ["StreamDigest", "content_fingerprint", "digest", "fingerprint_of"]


def digest(*parts: Any) -> str:
    """A 128-bit BLAKE2b hex digest of values (arrays by shape, dtype and bytes; others as sorted JSON)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.shape, part.dtype.str)).encode())
            if part.size:  # memoryview cannot cast an empty array (an empty shard's vectors)
                h.update(memoryview(np.ascontiguousarray(part)).cast("B"))
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _json_default(value: Any) -> Any:
    """Canonical JSON for the values a stream row may hold beyond JSON's own types."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, np.ndarray):
        return {"array": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tobytes"):  # decoded images and the like: their pixels, not their repr
        return {type(value).__name__: hashlib.sha256(value.tobytes()).hexdigest()}
    return {type(value).__name__: str(value)}


class StreamDigest:
    """A running SHA-256 over every row of a stream (canonical JSON, keys sorted), in order.

    Fed by the pass that reads the rows anyway (the embedding pass), so a streamed pool is
    fingerprinted by its full content, every column and row, at the cost of one JSON dump per row.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.rows = 0
        self.complete = False

    def wrap(self, rows: Any) -> Iterator[Any]:
        """Yield ``rows`` unchanged, hashing each; :attr:`complete` once the stream is exhausted."""
        for row in rows:
            self._hash.update(json.dumps(row, sort_keys=True, default=_json_default).encode("ascii"))
            self._hash.update(b"\n")  # JSON escapes newlines inside values: the separator is unambiguous
            self.rows += 1
            yield row
        self.complete = True

    def fingerprint(self, column: str) -> str:
        if not self.complete:
            raise RuntimeError("the stream was not read to its end; its fingerprint would cover part of it")
        return f"stream:{self._hash.hexdigest()}:{self.rows}:{column}"


def fingerprint_of(data: Any, column: str) -> str:
    """What names the content of one side: every row and column (``column`` is the one embedded).

    A ``Dataset`` has datasets' own fingerprint (derived from its files' or its transforms'
    fingerprints); a stream is read once to the end and hashed row by row (see
    :class:`StreamDigest`; the embedding stage feeds it from its own pass instead).
    """
    if isinstance(data, Dataset):
        return f"{data._fingerprint}:{column}"
    if isinstance(data, np.ndarray):
        return "emb:" + digest(data)
    if isinstance(data, IterableDataset):
        stream = StreamDigest()
        for _ in stream.wrap(data):
            pass
        return stream.fingerprint(column)
    return "texts:" + digest(list(data))


def content_fingerprint(data: Any) -> str:
    """A fingerprint of one side's content alone, the same wherever and however it was loaded.

    datasets' own fingerprint also covers where a file was read from and its cache folder, which
    differ between nodes for the same rows. A ``Dataset`` is hashed in full (its features and every
    column, as Arrow IPC batches: one pass over memory-mapped data, cheaper than embedding it); a
    stream by its declared features, file shards and first 64 rows (reading all of it on every
    process would cost a full pass per process); texts and arrays by content.
    """
    h = hashlib.sha256()
    if isinstance(data, Dataset):
        h.update(json.dumps(data.features.to_dict(), sort_keys=True, default=str).encode("utf-8"))
        for batch in data.with_format("arrow").iter(batch_size=16_384):
            for record in batch.combine_chunks().to_batches():
                h.update(record.serialize())
        return f"{len(data)} rows, sha256 {h.hexdigest()[:24]}"
    if isinstance(data, IterableDataset):
        features = data.features.to_dict() if data.features is not None else None
        h.update(json.dumps([features, data.n_shards], sort_keys=True, default=str).encode("utf-8"))
        head = StreamDigest()  # the canonical row hashing of a full stream, over its first 64 rows
        for _ in head.wrap(data.take(64)):
            pass
        h.update(head.fingerprint("").encode("ascii"))
        return f"stream of {data.n_shards} file shard(s), first rows sha256 {h.hexdigest()[:24]}"
    if isinstance(data, np.ndarray):
        return f"array {data.shape}, {digest(data)[:24]}"
    return f"{len(data)} texts, {digest(list(data))[:24]}"

