"""Steps that run a fitted selector inside other data engines; each is an optional extra.

- :mod:`hf_otselect.integrations.datatrove`: a datatrove filter step
  (``pip install 'hf_otselect[datatrove]'``).

Nothing here is imported by ``import hf_otselect``; import the module of the engine you use.
"""
