"""A fitted selector as a datatrove filter step: keep the documents ``FittedSelector.keep`` keeps.

Fit once (:func:`hf_otselect.fit_selector`), publish it (``push_to_hub``), then filter a corpus of
any size in one streaming pass on datatrove, locally or on Slurm::

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from hf_otselect.integrations.datatrove import FittedSelectorFilter

    LocalPipelineExecutor([
        JsonlReader("corpus/"),
        FittedSelectorFilter("user/my-selector", fraction=0.1),
        JsonlWriter("selected/"),
    ], tasks=8).run()

Needs the optional extra: ``pip install 'hf_otselect[datatrove]'``. ``import hf_otselect`` does
not import this module, and this module is the only one that imports datatrove.
"""

from __future__ import annotations

import logging
import numbers
import os
from typing import Any

import numpy as np

from .._checks import check_float, check_int, param_error, short_repr
from ..fitted import FittedSelector, Keep

try:
    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.writers.disk_base import DiskWriter
except ImportError as err:  # the extra is missing (or datatrove is broken: its own message follows)
    raise ImportError(f"hf_otselect.integrations.datatrove needs datatrove, which could not be imported ({err}). "
                      "Install it with: pip install 'hf_otselect[datatrove]'") from err

logger = logging.getLogger(__name__)

__all__ = ["FittedSelectorFilter"]

_OWNER = "FittedSelectorFilter"


class FittedSelectorFilter(BaseFilter):
    """Keep the documents a fitted selector keeps, scoring them in batches.

    Each batch of ``batch_size`` documents is embedded with the fit's encoder (or read from the
    vector field the fit names, from each document's metadata; DSIR reads the text), scored by the
    fitted state, and kept when its key (:func:`~hf_otselect.fitted.choice_keys`) is at least the
    threshold: exactly the rows ``ds.map(fitted, batched=True).filter(fitted.keep(...),
    batched=True, with_indices=True)`` keeps on the same rows. Every document's score is written to
    its metadata under the fit's ``score_column``, kept or not (an ``exclusion_writer`` records it).

    Only the modes that decide a document by itself are offered, since a task sees its own
    documents once and never the others: ``threshold=``, and ``fraction=`` through the fit's
    calibration (the key at or above which the best ``fraction`` of the fit rows lie, so about that
    fraction of a corpus distributed like them). An exact ``k`` needs every score of the corpus
    first and is refused: use ``select_by_ot``, or ``keep(k=..., scores=...)`` on a scored Dataset.

    **The index of a document.** The top-k methods (GOT-D, similarity, DSIR without ``resample``)
    keep by score alone, so no index is needed and any number of tasks, with any split of the
    files, keeps the same documents. The sampling methods (TSDS, random, DSIR with ``resample``)
    key each row by ``(seed, global row index)``, and the scores of TSDS and the round-robin
    similarity are looked up by the fit pool's row index. For them ``index_key`` must name where
    each document carries its global row index: a metadata field, or ``"id"`` for the document's
    id (an int, or a str of decimal digits); a document whose index is ``i`` gets the key row ``i``
    of the Dataset gets under ``with_indices=True``. The position of a document within its task is
    never used: it changes with the number of tasks.

    Parameters
    ----------
    selector : FittedSelector, str or os.PathLike
        A fitted selector, or a folder / Hub model repository id for
        :meth:`FittedSelector.from_pretrained` (loaded once here; the step then travels to the
        tasks with the fit's content, never the token).
    fraction : float in (0, 1], optional
        Keep the documents whose key reaches the calibration threshold of this fraction.
    threshold : float, optional
        Keep the documents whose key is at least this.
    k : None
        Refused (see above); present so the refusal says what to use instead.
    index_key : str, optional
        Where a document's global row index is: a metadata field, or ``"id"``. Required by the
        sampling and index-bound methods; given to the others, it is passed on and unused.
    seed : int, optional
        Seed of the sampling keys (default: the fit's).
    device : str, optional
        Where batches are embedded and scored (default: the selector's device, else CUDA when
        present; every task of a node then shares its first GPU).
    batch_size : int
        Documents scored per call (the encoder is costly per call, cheap per row).
    revision, token : str, optional
        For loading ``selector`` from the Hub.
    exclusion_writer : DiskWriter, optional
        Writes the dropped documents (datatrove's ``BaseFilter`` option).
    """

    name = "🎯 hf_otselect fitted selector"

    def __init__(
        self,
        selector: FittedSelector | str | os.PathLike,
        *,
        fraction: float | None = None,
        threshold: float | None = None,
        k: int | None = None,
        index_key: str | None = None,
        seed: int | None = None,
        device: str | None = None,
        batch_size: int = 256,
        revision: str | None = None,
        token: str | None = None,
        exclusion_writer: DiskWriter | None = None,
    ) -> None:
        if k is not None:
            raise param_error("k", _OWNER, "None (an exact top-k needs every document's score before the first is kept, and a task "
                              "sees only its own; use fraction= or threshold=, or select_by_ot / keep(k=, scores=) on a Dataset)", k)
        given = [name for name, value in (("fraction", fraction), ("threshold", threshold)) if value is not None]
        if len(given) != 1:
            raise param_error("fraction/threshold", _OWNER, "exactly one of them", given or None)
        if fraction is not None:
            fraction = check_float(fraction, "fraction", _OWNER, 0.0, 1.0, low_open=True)
        batch_size = check_int(batch_size, "batch_size", _OWNER, 1)
        if index_key is not None and (not isinstance(index_key, str) or not index_key):
            raise param_error("index_key", _OWNER, "None, 'id' or the name of a metadata field", index_key, exc=TypeError)
        super().__init__(exclusion_writer=exclusion_writer, batch_size=batch_size)

        if isinstance(selector, FittedSelector):
            if revision is not None or token is not None:
                raise param_error("revision/token", _OWNER, "None when selector is a FittedSelector (they load one from the Hub)",
                                  "revision" if token is None else "a token", exc=TypeError)
            fitted = selector
        elif isinstance(selector, (str, os.PathLike)):
            fitted = FittedSelector.from_pretrained(selector, revision=revision, token=token)
        else:
            raise param_error("selector", _OWNER, "a FittedSelector, a folder or a Hub model repository id", type(selector).__name__,
                              exc=TypeError)
        if index_key is None and (fitted.choice != "top_k" or fitted.index_bound):
            why = "its scores are looked up by the fit pool's row" if fitted.index_bound else "it keeps rows by keys from (seed, global row index)"
            raise param_error("index_key", _OWNER, f"'id' or the metadata field holding each document's global row index for method "
                              f"{fitted.method!r} ({why}; a document's position within its task changes with the number of tasks)", None)
        self.fitted = fitted
        self.device = device if device is not None else fitted.device
        self.index_key = index_key
        self.rule: Keep = fitted.keep(fraction=fraction, seed=seed) if fraction is not None else fitted.keep(threshold=threshold, seed=seed)
        logger.info("%s keeps the documents whose %s key is at least %r%s", _OWNER, fitted.method, self.rule.threshold,
                    "" if fraction is None else f" (the best {fraction:g} of the {fitted.fit_info['n_fit']} fit rows)")

    def filter(self, doc: Document) -> bool:
        """Whether to keep one document (prefer ``batch_size`` > 1: the encoder runs once per batch)."""
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool]:
        """Score a batch of documents and say which to keep; the scores go to their metadata.

        Parameters
        ----------
        batch : list of Document, length b

        Returns
        -------
        list of bool, length b
        """
        fitted = self.fitted if self.fitted.device == self.device else self.fitted.using(device=self.device)
        columns: dict[str, Any] = {fitted.column: [doc.text for doc in batch]}
        if fitted.vector_column is not None and fitted.selector.needs_vectors and not fitted.selector.needs_text:
            columns[fitted.vector_column] = [_field(doc, fitted.vector_column) for doc in batch]
        extra = () if self.index_key is None else (np.array([_row_index(doc, self.index_key) for doc in batch], dtype=np.int64),)
        scores = fitted(columns, *extra)[fitted.score_column]
        for doc, score in zip(batch, scores):
            doc.metadata[fitted.score_column] = float(score)
        return self.rule({fitted.score_column: scores}, *extra)


def _field(doc: Document, name: str) -> Any:
    if name not in doc.metadata:
        raise ValueError(f"Column {short_repr(name)} not in the metadata of document {short_repr(doc.id)}. "
                         f"Current fields: {sorted(doc.metadata)}")
    return doc.metadata[name]


def _row_index(doc: Document, key: str) -> int:
    """A document's global row index: its id (``key == "id"``) or a metadata field, an int >= 0."""
    value = doc.id if key == "id" else _field(doc, key)
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        where = "id" if key == "id" else f"metadata field {key!r}"
        raise ValueError(f"The {where} of document {short_repr(doc.id)} must be its global row index (an int >= 0, or a str of "
                         f"decimal digits). Got {short_repr(value)} instead.")
    return int(value)
