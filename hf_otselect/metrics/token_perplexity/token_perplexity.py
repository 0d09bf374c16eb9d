"""Corpus perplexity from per-text summed token losses, as an ``evaluate`` metric module.

The Hub "perplexity" module loads a model itself; this one only aggregates what an evaluation loop
already has: for every text, the summed negative log-likelihood (natural log) of its predicted
tokens and their number. The result is the token-weighted corpus perplexity

    exp( sum_i nll_i / sum_i n_tokens_i ),

the exponential of the mean NLL per token (Jelinek et al. 1977), the figure ``scripts/evaluate.py``
reports for causal LMs (and, from masked-token losses, for masked LMs).
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Token-weighted corpus perplexity: exp(total NLL / total predicted tokens)."
_CITATION = "Jelinek, Mercer, Bahl, Baker. Perplexity - a measure of the difficulty of speech recognition tasks. JASA 62, 1977."
_INPUTS = """
nll (list of float): summed negative log-likelihood (nats) of each text's predicted tokens.
n_tokens (list of int): number of predicted tokens of each text (>= 0, positive in total).
Returns {"perplexity": float, "mean_nll": float, "n_tokens": int}.
"""


class TokenPerplexity(evaluate.Metric):
    """exp(sum nll / sum n_tokens)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"nll": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, n_tokens):
        nll = np.asarray(nll, dtype=np.float64)
        n_tokens = np.asarray(n_tokens, dtype=np.int64)
        if (n_tokens < 0).any() or n_tokens.sum() <= 0:
            raise ValueError(f"The 'n_tokens' parameter of token_perplexity must be non-negative with a positive sum. Got {n_tokens.tolist()[:10]} instead.")
        if not np.isfinite(nll).all():
            raise ValueError("The 'nll' parameter of token_perplexity must be finite. Got non-finite values instead.")
        mean = float(nll.sum() / n_tokens.sum())
        return {"perplexity": math.exp(mean), "mean_nll": mean, "n_tokens": int(n_tokens.sum())}
