"""The stages of one selection, in the order :func:`hf_otselect.pipeline.run_selection` runs them.

``embedding`` (this process's rows and the target as vectors or texts), ``filters`` (rows left
selectable: :func:`~hf_otselect.stages.filters.apply_filters`), ``scoring`` (fit + per-row score,
cached), ``choosing`` (exact top-k by a threshold of all-reduced counts, or draws with
replacement), ``splits`` (this process's scored and selected splits). The request they all read
is built by :mod:`hf_otselect.request`. Each module holds one stage; importing this package
imports none of them.
"""
