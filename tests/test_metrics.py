"""Our offline `evaluate` metric modules against scikit-learn and a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from hf_otselect import metrics


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _labels(seed: int, n: int = 200, n_classes: int = 4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_equals_sklearn(seed):
    pred, ref = _labels(seed)
    acc = metrics.load("accuracy")
    assert acc.compute(predictions=pred, references=ref)["accuracy"] == pytest.approx(accuracy_score(ref, pred), abs=1e-12)
    w = np.random.default_rng(seed).random(pred.size)
    got = acc.compute(predictions=pred, references=ref, sample_weight=w)["accuracy"]
    assert got == pytest.approx(accuracy_score(ref, pred, sample_weight=w), abs=1e-12)


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_f1_equals_sklearn(average):
    pred, ref = _labels(3)
    got = metrics.load("f1").compute(predictions=pred, references=ref, average=average)["f1"]
    assert got == pytest.approx(f1_score(ref, pred, average=average), abs=1e-12)


def test_f1_binary_and_per_class():
    pred, ref = _labels(4, n_classes=2)
    f1 = metrics.load("f1")
    assert f1.compute(predictions=pred, references=ref)["f1"] == pytest.approx(f1_score(ref, pred), abs=1e-12)
    per = f1.compute(predictions=pred, references=ref, average=None)["f1"]
    np.testing.assert_allclose(per, f1_score(ref, pred, average=None))


def test_metric_batches_accumulate_like_one_call():
    pred, ref = _labels(5)
    acc = metrics.load("accuracy")
    for lo in range(0, pred.size, 64):
        acc.add_batch(predictions=pred[lo : lo + 64], references=ref[lo : lo + 64])
    assert acc.compute()["accuracy"] == pytest.approx(accuracy_score(ref, pred), abs=1e-12)


def test_token_perplexity_is_exp_of_token_weighted_mean_nll():
    rng = np.random.default_rng(0)
    n_tok = rng.integers(1, 50, 30)
    per_token = rng.random(30) * 4
    nll = per_token * n_tok
    out = metrics.load("token_perplexity").compute(nll=nll, n_tokens=n_tok)
    assert out["n_tokens"] == int(n_tok.sum())
    assert out["perplexity"] == pytest.approx(math.exp(np.dot(per_token, n_tok) / n_tok.sum()), rel=1e-12)
    with pytest.raises(ValueError, match="n_tokens"):
        metrics.load("token_perplexity").compute(nll=[1.0], n_tokens=[0])


def test_load_offline_uses_the_bundled_modules_and_refuses_unknown_names():
    for name in metrics.LOCAL_METRICS:
        assert (metrics.local_path(name) / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="'name' parameter"):
        metrics.load("bleu")


def test_load_falls_back_to_ours_when_the_hub_fails(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = evaluate.load
    tried = []

    def fake_load(path, **kw):
        tried.append(path)
        if path == "accuracy":
            raise ConnectionError("no network")
        return real(path, **kw)

    monkeypatch.setattr(evaluate, "load", fake_load)
    acc = metrics.load("accuracy")
    assert tried == ["accuracy", str(metrics.local_path("accuracy"))]
    assert acc.compute(predictions=[1, 0], references=[1, 1])["accuracy"] == 0.5
