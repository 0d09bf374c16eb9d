"""The embedding cache: one vector per text, found by the text's content, kept in append-only shards.

One folder per encoder identity and setting (``<cache>/embeddings/<settings key[:20]>/``) holds
shards, each two checked files (see :mod:`hf_otselect.cache`)::

    <id>.keys    the shard's text keys, 16 bytes a row (the first half of SHA-256 of the UTF-8 text)
    <id>.npy     their float32 vectors, (rows, dim): row i is the vector of key i

Why this layout:

- **Keyed by each text.** A vector depends on its text and the encoder settings only (the settings
  name the folder), so a pool reordered, cut to a subset, grown to a superset, or split over any
  number of processes finds every vector already computed, and a text repeated in a pool is
  encoded once.
- **Append-only shards, no shared index file.** New vectors are written as they are computed, up to
  ``shard_rows`` new texts a shard (the unit of resume: a killed run loses only the shards in
  flight), and a shard is never updated. Processes writing into one cache (torchrun ranks, two
  jobs) never read-modify-write a common file, so they need no lock (file locks are unreliable
  on the network filesystems a multi-node cache lives on). The ``.keys`` file is written before the ``.npy`` file; the vectors file is the
  commit (a shard counts only when both exist).
- **The index is the union of the ``.keys`` files**: 16 bytes per cached text, 1/96 of a 384-d
  float32 vector. It is read when a store opens (a ``.keys`` file once per process; a second store
  on an unchanged folder reuses the sorted index), sorted, and searched by bisection; the hits then
  read only the shards that hold them, each once for a sized pool. Measured
  (``benchmarks/results/embed_cache_reuse.md``, a loaded 2-core machine): 1M cached texts open in
  1.5 s cold, 0.01 s warm, so a cache of 10M costs some 15 s at the start of a process even for a
  small pool; merging the ``.keys`` files of a large cache into one would cut that, not needed at
  the sizes we run.
- **Bound to its key.** A shard's id is a digest of the settings key and its text keys (the same
  chunk recomputed after a crash lands under the same name), and both files are written under the
  cache key ``embeddings/<settings key>/<id>``: a shard moved, copied or swapped under another name
  or into another settings folder is a miss, recomputed, never another shard's vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cache import discard, load_array, read_checked, save_array, sidecar, write_checked

logger = logging.getLogger(__name__)

__all__ = ["VectorStore", "text_keys"]

_KEY_BYTES = 16
_KEY_DTYPE = f"S{_KEY_BYTES}"  # fixed width: numpy compares, sorts and bisects them as 16-byte strings
_LOADED_BYTES = 256 << 20  # shards kept in memory after their checksum was verified (an LRU)
# path -> ((inode, size, mtime_ns), keys): a .keys file is read and verified once per process.
_KEYS_READ: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}
# folder -> (shard ids, rows per shard, sorted keys, their shard, their row): the next store on an
# unchanged folder (the target after the pool) reuses the sorted index.
_INDEX: dict[str, tuple[list[str], list[int], np.ndarray, np.ndarray, np.ndarray]] = {}


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """The cache key of each text: the first 16 bytes of SHA-256 of its UTF-8 bytes.

    Parameters
    ----------
    texts : sequence of str
        ``n`` texts (already cleaned: lone surrogates replaced).

    Returns
    -------
    ndarray of shape (n,), dtype ``S16``
    """
    sha = hashlib.sha256
    return np.array([sha(t.encode("utf-8")).digest()[:_KEY_BYTES] for t in texts], dtype=_KEY_DTYPE)


class VectorStore:
    """The vectors cached for one encoder setting: look texts up by key, read their rows, add new ones.

    Parameters
    ----------
    folder : Path
        The setting's folder (created on the first write).
    settings_key : str
        Digest of the encoder identity and every setting that changes the vectors.
    """

    def __init__(self, folder: Path, settings_key: str) -> None:
        self.folder, self.settings_key = Path(folder), settings_key
        self._dead: set[int] = set()
        self._loaded: OrderedDict[int, np.ndarray] = OrderedDict()
        shards = self._complete_shards()
        built = _INDEX.get(str(self.folder))
        # Reused while the folder lists exactly the shards it was built from: a new shard rebuilds
        # it, and so does one whose .keys file was found damaged (removed and left out) once it
        # is written again. A shard id names its keys, so a shard written again keeps its entries.
        if built is None or built[0] != shards:
            ids, rows, keys = [], [], []
            for sid in shards:
                k = self._read_keys(sid)
                if k is not None:
                    ids.append(sid)
                    rows.append(k.size)
                    keys.append(k)
            all_keys = np.concatenate(keys) if keys else np.empty(0, dtype=_KEY_DTYPE)
            shard = np.repeat(np.arange(len(ids), dtype=np.int32), rows)
            row = np.concatenate([np.arange(r, dtype=np.int32) for r in rows]) if rows else np.empty(0, dtype=np.int32)
            order = np.argsort(all_keys, kind="stable")
            built = (ids, rows, all_keys[order], shard[order], row[order])
            _INDEX[str(self.folder)] = built
        self._ids, self._rows, self._keys, self._shard, self._row = built

    def _entry_key(self, sid: str) -> str:
        return f"embeddings/{self.settings_key}/{sid}"

    def _complete_shards(self) -> list[str]:
        try:
            names = set(os.listdir(self.folder))
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".keys") and not n.startswith(".") and n[:-5] + ".npy" in names)

    def _read_keys(self, sid: str) -> np.ndarray | None:
        path = self.folder / f"{sid}.keys"
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen = _KEYS_READ.get(str(path))
        if seen is not None and seen[0] == stamp:
            return seen[1]
        data = read_checked(path, key=self._entry_key(sid))
        if data is None:
            return None
        if len(data) % _KEY_BYTES:
            discard(path, f"{len(data)} bytes, not a whole number of {_KEY_BYTES}-byte keys")
            return None
        keys = np.frombuffer(data, dtype=_KEY_DTYPE)
        _KEYS_READ[str(path)] = (stamp, keys)
        return keys

    def __len__(self) -> int:
        """Texts in the index (a text cached twice counts twice)."""
        return int(self._keys.size)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each key's vector is: ``(shard, row)``, both ``(n,)`` int, ``shard == -1`` for a miss."""
        shard = np.full(keys.size, -1, dtype=np.int64)
        row = np.zeros(keys.size, dtype=np.int64)
        if self._keys.size == 0 or keys.size == 0:
            return shard, row
        pos = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
        hit = self._keys[pos] == keys
        if self._dead:
            hit &= ~np.isin(self._shard[pos], list(self._dead))
        shard[hit], row[hit] = self._shard[pos[hit]], self._row[pos[hit]]
        return shard, row

    def _vectors(self, s: int) -> np.ndarray | None:
        """The verified vectors of shard ``s`` (kept in a small LRU); None when damaged or misplaced."""
        if s in self._loaded:
            self._loaded.move_to_end(s)
            return self._loaded[s]
        sid = self._ids[s]
        arr = load_array(self.folder / f"{sid}.npy", key=self._entry_key(sid), dtype=np.float32, ndim=2, rows=self._rows[s])
        if arr is None:  # discarded (logged): its keys go too, so the folder holds no half shard
            self._dead.add(s)
            for p in (self.folder / f"{sid}.keys", sidecar(self.folder / f"{sid}.keys")):
                with contextlib.suppress(OSError):
                    p.unlink()
            return None
        self._loaded[s] = arr
        while sum(a.nbytes for a in self._loaded.values()) > _LOADED_BYTES and len(self._loaded) > 1:
            self._loaded.popitem(last=False)
        return arr

    def fill(self, keys: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        """Copy the cached vectors of ``keys`` into ``out``; return ``(out, found)``.

        Parameters
        ----------
        keys : ndarray of shape (n,), ``S16``
        out : ndarray of shape (n, dim), float32, or None
            Allocated here from the first shard read when None.

        Returns
        -------
        out : ndarray of shape (n, dim) or None
            None when nothing was found and nothing given.
        found : ndarray of shape (n,), bool
            The rows filled. A shard that fails its check is discarded (logged) and its rows
            reported as not found, to be recomputed.
        """
        shard, row = self.lookup(keys)
        found = shard >= 0
        order = np.argsort(shard, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for rows in np.split(order, bounds):
            if rows.size == 0 or shard[rows[0]] < 0:
                continue
            vecs = self._vectors(int(shard[rows[0]]))
            if vecs is None:
                found[rows] = False
                continue
            if out is None:
                out = np.empty((keys.size, vecs.shape[1]), dtype=np.float32)
            out[rows] = vecs[row[rows]]
        return out, found

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Write a new shard: the ``(m,)`` keys, then their ``(m, dim)`` float32 vectors (the commit).

        The index of this store does not grow (it is what the folder held when it was opened);
        the next store opened on the folder finds the shard.
        """
        sid = hashlib.sha256(self.settings_key.encode() + keys.tobytes()).hexdigest()[:40]
        key = self._entry_key(sid)
        write_checked(self.folder / f"{sid}.keys", keys.tobytes(), key=key)
        save_array(self.folder / f"{sid}.npy", np.ascontiguousarray(vectors, dtype=np.float32), key=key)
