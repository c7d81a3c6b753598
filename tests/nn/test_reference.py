"""bnkit's layer against the NumPy float64 reference (bnkit.reference), case by case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnkit.nn as bnn
from tests.cases import CASE_IDS, CASES, Case
from tests.nn.util import BNKIT_CLASSES, condition

reference = pytest.importorskip("bnkit.reference")
if not hasattr(reference, "batch_norm_train"):  # pragma: no cover - reference not written yet
    pytest.skip("bnkit.reference has no batch_norm_train yet", allow_module_level=True)


def _close(ours: torch.Tensor, expected: np.ndarray, cond: float) -> None:
    tolerance = max(1e-12, 64 * np.finfo(np.float64).eps * cond) * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=0, atol=tolerance)


def _layer(case: Case, **kwargs: object) -> bnn.BatchNormNd:
    layer = BNKIT_CLASSES[case.rank](
        case.channels,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        dtype=torch.float64,
        **kwargs,
    )
    if case.affine:
        gamma, beta = case.params()
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(gamma))
            layer.bias.copy_(torch.from_numpy(beta))
    return layer


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_matches_reference(case: Case, estimator: str) -> None:
    layer = _layer(case, running_var_estimator=estimator)
    gamma, beta = case.params()
    running_mean, running_var = np.zeros(case.channels), np.ones(case.channels)
    for step in range(3):
        x_np = case.input(step)
        x = torch.from_numpy(x_np).requires_grad_(True)
        cond = condition(x)
        y = layer(x)
        y_ref, cache = reference.batch_norm_train(x_np, gamma, beta, case.eps)
        _close(y, y_ref, cond)
        dy_np = np.random.default_rng(10 + step).standard_normal(x_np.shape)
        y.backward(torch.from_numpy(dy_np))
        dx, dgamma, dbeta = reference.batch_norm_backward(dy_np, cache)
        _close(x.grad, dx, cond)
        if case.affine:
            _close(layer.weight.grad, dgamma, cond)
            _close(layer.bias.grad, dbeta, cond)
            layer.weight.grad = layer.bias.grad = None
        stats = cache.stats
        running_mean, running_var = reference.update_running_stats(
            running_mean,
            running_var,
            stats.mean,
            stats.var,
            stats.count,
            case.momentum,
            step,
            unbiased=estimator == "unbiased",
        )
        _close(layer.running_mean, running_mean, cond)
        _close(layer.running_var, running_var, cond)
    layer.eval()
    x_np = case.input(7)
    expected = reference.batch_norm_eval(x_np, running_mean, running_var, gamma, beta, case.eps)
    _close(layer(torch.from_numpy(x_np)), expected, condition(torch.from_numpy(x_np)))
