"""Accuracy as an ``evaluate`` metric module, computed with scikit-learn.

Shipped with hf_otselect because ``evaluate.load("accuracy")`` fetches its script from the Hub and
so fails offline; ``evaluate.load(<this folder>)`` works anywhere. Same inputs and output as the
Hub module: ``compute(predictions=..., references=..., normalize=True, sample_weight=None)`` ->
``{"accuracy": float}``.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Accuracy: the fraction of predictions equal to the reference labels."
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_INPUTS = """
predictions (list of int): predicted labels.
references (list of int): true labels.
normalize (bool, default True): the fraction correct; False gives the count.
sample_weight (list of float, optional): per-example weights.
Returns {"accuracy": float}.
"""


class Accuracy(evaluate.Metric):
    """Accuracy via ``sklearn.metrics.accuracy_score``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight))}
