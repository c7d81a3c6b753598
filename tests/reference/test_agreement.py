"""The reference against an independent implementation and against PyTorch.

- ``tests/reference/naive.py`` implements the equations a second way: agreement to 1e-8.
- ``torch.nn.functional.batch_norm`` and ``torch.nn.BatchNorm*d``: float64 to 1e-10, and
  float32 to float32 precision; forward, backward and running statistics over several steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnkit import reference as ref
from tests.cases import CASE_IDS, CASES, Case
from tests.helpers import condition, relative_error
from tests.reference import naive

TORCH_MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
TORCH_MODULES[5] = torch.nn.BatchNorm3d


# ------------------------------------------------------------------ independent implementation


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(x, gamma, beta, dy, eps) with shapes and values drawn by hypothesis."""
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 4))
    shape = (n, c, *spatial)
    if n * int(np.prod(spatial)) < 2:  # training needs two values per feature
        shape = (n + 1, c, *spatial)
    values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
    x = draw(hnp.arrays(np.float64, shape, elements=values))
    dy = draw(hnp.arrays(np.float64, shape, elements=st.floats(-10, 10)))
    # no subnormal parameters: float32 flushes them to zero, which is not a bnkit question
    parameters = st.floats(-3, 3, allow_subnormal=False)
    gamma = draw(hnp.arrays(np.float64, (c,), elements=parameters))
    beta = draw(hnp.arrays(np.float64, (c,), elements=parameters))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return x, gamma, beta, dy, eps


def close(actual: np.ndarray, expected: np.ndarray, tol: float) -> bool:
    """Relative agreement, with an absolute floor at tol times the expected scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return bool(np.all(np.abs(actual - expected) <= tol * scale))


@given(batches())
def test_forward_and_backward_match_an_independent_implementation(
    batch: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float],
) -> None:
    x, gamma, beta, dy, eps = batch
    y, cache = ref.batch_norm_train(x, gamma, beta, eps)
    y_naive, means, variances = naive.forward(x, gamma, beta, eps)
    assert close(y, y_naive, 1e-8)
    assert cache.stats is not None
    assert close(cache.stats.mean, means, 1e-10)
    assert close(cache.stats.var, variances, 1e-10)

    dx, dgamma, dbeta = ref.batch_norm_backward(dy, cache)
    dx_naive, dgamma_naive, dbeta_naive = naive.backward(dy, x, gamma, eps)
    # dx is a difference of terms of size |dy| * |gamma| / std: measure against that scale
    scale = float(np.abs(dy).max() * max(1.0, np.abs(gamma).max())) / np.sqrt(eps)
    assert np.abs(dx - dx_naive).max() <= 1e-8 * max(1.0, scale)
    assert close(dgamma, dgamma_naive, 1e-8)
    assert close(dbeta, dbeta_naive, 1e-8)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_table_matches_an_independent_implementation(case: Case) -> None:
    x, (gamma, beta) = case.input(), case.params()
    dy = np.random.default_rng(2).normal(size=case.shape)
    y, cache = ref.batch_norm_train(x, gamma, beta, case.eps)
    assert relative_error(y, naive.forward(x, gamma, beta, case.eps)[0]) < 1e-8
    for mine, theirs in zip(
        ref.batch_norm_backward(dy, cache), naive.backward(dy, x, gamma, case.eps), strict=True
    ):
        assert relative_error(mine, theirs) < 1e-8


# ---------------------------------------------------------------------------------- PyTorch


def torch_train_step(
    case: Case,
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    dy: np.ndarray,
    dtype: torch.dtype,
) -> dict[str, np.ndarray]:
    """One training step of torch's functional batch norm: outputs, grads, running stats."""
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    weight = torch.tensor(gamma, dtype=dtype, requires_grad=True)
    bias = torch.tensor(beta, dtype=dtype, requires_grad=True)
    running_mean = torch.zeros(case.channels, dtype=dtype)
    running_var = torch.ones(case.channels, dtype=dtype)
    momentum = 0.1 if case.momentum is None else case.momentum
    y = torch.nn.functional.batch_norm(
        xt, running_mean, running_var, weight, bias, True, momentum, case.eps
    )
    y.backward(torch.tensor(dy, dtype=dtype))
    assert xt.grad is not None
    assert weight.grad is not None
    assert bias.grad is not None
    return {
        "y": y.detach().double().numpy(),
        "dx": xt.grad.double().numpy(),
        "dgamma": weight.grad.double().numpy(),
        "dbeta": bias.grad.double().numpy(),
        "running_mean": running_mean.double().numpy(),
        "running_var": running_var.double().numpy(),
    }


def reference_train_step(
    case: Case, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dy: np.ndarray
) -> dict[str, np.ndarray]:
    y, cache = ref.batch_norm_train(x, gamma, beta, case.eps)
    dx, dgamma, dbeta = ref.batch_norm_backward(dy, cache)
    assert cache.stats is not None
    momentum = 0.1 if case.momentum is None else case.momentum
    running_mean, running_var = ref.update_running_stats(
        np.zeros(case.channels),
        np.ones(case.channels),
        cache.stats.mean,
        cache.stats.var,
        cache.stats.count,
        momentum,
    )
    return {
        "y": y,
        "dx": dx,
        "dgamma": dgamma,
        "dbeta": dbeta,
        "running_mean": running_mean,
        "running_var": running_var,
    }


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_functional_in_float64(case: Case) -> None:
    x, (gamma, beta) = case.input(), case.params()
    dy = np.random.default_rng(4).normal(size=case.shape)
    expected = torch_train_step(case, x, gamma, beta, dy, torch.float64)
    actual = reference_train_step(case, x, gamma, beta, dy)
    for name, value in actual.items():
        assert relative_error(value, expected[name]) < 1e-10, name


def float32_tolerance(x: np.ndarray) -> float:
    """float32 rounding, amplified by how far the values sit from their mean."""
    return 1e-5 * max(1.0, condition(x))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_functional_in_float32(case: Case) -> None:
    x = case.input().astype(np.float32).astype(np.float64)  # the values float32 can hold
    gamma, beta = (p.astype(np.float32).astype(np.float64) for p in case.params())
    dy = np.random.default_rng(4).normal(size=case.shape).astype(np.float32).astype(np.float64)
    expected = torch_train_step(case, x, gamma, beta, dy, torch.float32)
    actual = reference_train_step(case, x, gamma, beta, dy)
    tolerance = float32_tolerance(x)
    for name in ("y", "dgamma", "dbeta", "running_mean", "running_var"):
        assert relative_error(actual[name], expected[name]) < tolerance, name
    # dx is a difference of terms of size |gamma * dy| / sigma that may cancel to almost
    # nothing (with two values per feature it is O(eps)): measure against those terms.
    axes = (0, *range(2, case.rank))
    view = (1, -1) + (1,) * (case.rank - 2)
    terms = np.abs(gamma.reshape(view) * dy) / np.sqrt(x.var(axis=axes) + case.eps).reshape(view)
    assert np.abs(actual["dx"] - expected["dx"]).max() < tolerance * terms.max()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.slow
def test_layer_matches_torch_module_over_training_and_test(case: Case, estimator: str) -> None:
    """Five training steps then evaluation: the reference layer tracks torch's module."""
    torch_bn = TORCH_MODULES[case.rank](
        case.channels, eps=case.eps, momentum=case.momentum, affine=case.affine
    ).double()
    bn = ref.BatchNorm(
        case.channels,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        running_var_estimator=estimator,
    )
    gamma, beta = case.params()
    bn.gamma, bn.beta = gamma.copy(), beta.copy()
    if case.affine:
        with torch.no_grad():
            torch_bn.weight.copy_(torch.from_numpy(gamma))
            torch_bn.bias.copy_(torch.from_numpy(beta))
    axes = (0, *range(2, case.rank))
    biased_var = np.ones(case.channels)  # the definition, for the estimator torch lacks
    for step in range(5):
        x = case.input(seed=step)
        y = bn.forward(x)
        y_torch = torch_bn(torch.from_numpy(x)).detach().numpy()
        assert relative_error(y, y_torch) < 1e-10
        assert relative_error(bn.running_mean, torch_bn.running_mean.numpy()) < 1e-10
        m = 1.0 / (step + 1) if case.momentum is None else case.momentum
        biased_var = (1 - m) * biased_var + m * x.var(axis=axes)
        expected_var = torch_bn.running_var.numpy() if estimator == "unbiased" else biased_var
        assert relative_error(bn.running_var, expected_var) < 1e-10
    assert bn.num_batches_tracked == int(torch_bn.num_batches_tracked)

    torch_bn.eval()
    single = case.input(seed=99)[:1]
    expected = ref.batch_norm_eval(
        single, torch_bn.running_mean.numpy(), expected_var, gamma, beta, case.eps
    )
    if estimator == "unbiased":
        expected = torch_bn(torch.from_numpy(single)).detach().numpy()
    assert relative_error(bn.forward(single, training=False), expected) < 1e-10


@given(batches(), st.sampled_from([torch.float64, torch.float32]))
@pytest.mark.slow
def test_matches_torch_on_drawn_inputs(
    batch: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], dtype: torch.dtype
) -> None:
    x, gamma, beta, dy, eps = batch
    if dtype == torch.float32:  # compare on the values float32 can hold
        x, gamma, beta, dy = (a.astype(np.float32).astype(np.float64) for a in (x, gamma, beta, dy))
    case = Case(x.shape, eps=eps)
    expected = torch_train_step(case, x, gamma, beta, dy, dtype)
    actual = reference_train_step(case, x, gamma, beta, dy)
    unit = 1e-13 if dtype == torch.float64 else 1e-6  # a few units of rounding
    # errors grow with how far the values sit from their mean, relative to sqrt(var + eps)
    tolerance = unit * max(1.0, condition(x, eps))
    gain = max(1.0, float(np.abs(gamma).max()))
    axes = (0, *range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    terms = np.abs(gamma.reshape(view) * dy) / np.sqrt(x.var(axis=axes) + eps).reshape(view)
    scale = {
        "y": gain * max(1.0, condition(x, eps)) + float(np.abs(beta).max()),
        "dx": 10 * float(terms.max()),
        "dgamma": float(np.abs(dy).sum()) * max(1.0, condition(x, eps)),
        "dbeta": float(np.abs(dy).sum()),
        "running_mean": max(1.0, float(np.abs(x).max())),
        "running_var": max(1.0, float(np.abs(x).max()) ** 2),
    }
    # below the smallest normal number, precision is absolute (subnormal gradients)
    tiny = float(np.finfo(np.float64).tiny)
    for name, value in actual.items():
        error = float(np.abs(value - expected[name]).max())
        allowed = tolerance * scale[name] + tiny
        assert error <= allowed, (name, error, allowed)
