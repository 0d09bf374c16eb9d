"""The stages of one selection, in the order :func:`hf_otselect.pipeline.run_selection` runs them.

``embedding`` (this process's rows and the target as vectors or texts), ``filters`` (rows left
selectable), ``scoring`` (fit + per-row score, cached), ``choosing`` (exact top-k by a threshold,
or draws). Each module holds one stage; importing this package imports none of them.
"""
