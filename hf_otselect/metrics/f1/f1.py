"""F1 score as an ``evaluate`` metric module, computed with scikit-learn.

Shipped with hf_otselect because ``evaluate.load("f1")`` fetches its script from the Hub and so
fails offline. Same inputs and output as the Hub module: ``compute(predictions=..., references=...,
labels=None, pos_label=1, average="binary", sample_weight=None)`` -> ``{"f1": float}`` (an array
of per-class scores when ``average=None``).
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = "F1: the harmonic mean of precision and recall (per class, then averaged as asked)."
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_INPUTS = """
predictions (list of int): predicted labels.
references (list of int): true labels.
labels (list of int, optional): the labels to include when average != "binary".
pos_label (int, default 1): the positive class when average == "binary".
average ({"binary", "micro", "macro", "weighted", "samples", None}, default "binary").
sample_weight (list of float, optional): per-example weights.
Returns {"f1": float} (or a list of per-class floats when average is None).
"""


class F1(evaluate.Metric):
    """F1 via ``sklearn.metrics.f1_score``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average, sample_weight=sample_weight)
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
