"""Every analytic backward of the reference against central finite differences (float64)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from bnkit import reference as ref
from tests.cases import CASE_IDS, CASES, Case
from tests.helpers import numerical_gradient, per_feature_step, relative_error

TOLERANCE = 1e-6
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def check_gradients(
    forward: Forward,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray],
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    dy: np.ndarray,
) -> None:
    """Compare (dx, dgamma, dbeta) with the finite differences of L = sum(dy * forward)."""
    dx, dgamma, dbeta = grads
    numeric_dx = numerical_gradient(
        lambda x_: float(np.sum(dy * forward(x_, gamma, beta))), x, per_feature_step(x)
    )
    numeric_dgamma = numerical_gradient(
        lambda g_: float(np.sum(dy * forward(x, g_, beta))), gamma, 1e-3
    )
    numeric_dbeta = numerical_gradient(
        lambda b_: float(np.sum(dy * forward(x, gamma, b_))), beta, 1e-3
    )
    assert relative_error(dx, numeric_dx) < TOLERANCE
    assert relative_error(dgamma, numeric_dgamma) < TOLERANCE
    assert relative_error(dbeta, numeric_dbeta) < TOLERANCE


def upstream(case: Case) -> np.ndarray:
    return np.random.default_rng(7).normal(size=case.shape)


def random_mask(case: Case, seed: int = 3) -> np.ndarray:
    """About a quarter of the positions masked out, at least two valid per feature."""
    rng = np.random.default_rng(seed)
    mask = rng.random((case.shape[0], *case.shape[2:])) > 0.25
    mask.reshape(-1)[:2] = True
    return mask


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_train_backward(case: Case) -> None:
    x, (gamma, beta), dy = case.input(), case.params(), upstream(case)
    _, cache = ref.batch_norm_train(x, gamma, beta, case.eps)

    def forward(x_: np.ndarray, g_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        return ref.batch_norm_train(x_, g_, b_, case.eps)[0]

    check_gradients(forward, ref.batch_norm_backward(dy, cache), x, gamma, beta, dy)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eval_backward(case: Case) -> None:
    x, (gamma, beta), dy = case.input(), case.params(), upstream(case)
    rng = np.random.default_rng(5)
    mean, var = rng.normal(size=case.channels), rng.uniform(0.5, 2.0, size=case.channels)
    layer = ref.BatchNorm(case.channels, eps=case.eps)
    layer.gamma, layer.beta, layer.running_mean, layer.running_var = gamma, beta, mean, var
    layer.forward(x, training=False)
    dx = layer.backward(dy)
    assert layer.dgamma is not None
    assert layer.dbeta is not None

    def forward(x_: np.ndarray, g_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        return ref.batch_norm_eval(x_, mean, var, g_, b_, case.eps)

    check_gradients(forward, (dx, layer.dgamma, layer.dbeta), x, gamma, beta, dy)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_masked_backward(case: Case) -> None:
    x, (gamma, beta), dy = case.input(), case.params(), upstream(case)
    mask = random_mask(case)
    _, cache = ref.batch_norm_train(x, gamma, beta, case.eps, mask=mask)

    def forward(x_: np.ndarray, g_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        return ref.batch_norm_train(x_, g_, b_, case.eps, mask=mask)[0]

    check_gradients(forward, ref.batch_norm_backward(dy, cache), x, gamma, beta, dy)


GHOST_CASES = [c for c in CASES if c.shape[0] >= (4 if c.rank > 2 else 5)]


def ghost_size(case: Case) -> int:
    """A ghost batch size < N, leaving an uneven last chunk where the batch allows."""
    n = case.shape[0]
    if case.rank > 2:
        return 3 if n % 3 else 2
    # chunks of two samples have x_hat = +-1 and a near-zero gradient: too flat to test
    return next(k for k in (3, 5, 4, 6) if k < n and n % k != 1)


def ghost_mask(case: Case, size: int) -> np.ndarray:
    """A random mask that leaves every ghost batch at least two valid values per feature."""
    mask = random_mask(case)
    for start in range(0, case.shape[0], size):
        chunk = mask[start : start + size].reshape(-1)
        chunk[:2] = True
    return mask


@pytest.mark.parametrize("case", GHOST_CASES, ids=[c.id for c in GHOST_CASES])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.slow
def test_ghost_backward(case: Case, masked: bool) -> None:
    x, (gamma, beta), dy = case.input(), case.params(), upstream(case)
    size = ghost_size(case)
    mask = ghost_mask(case, size) if masked else None
    _, cache = ref.ghost_batch_norm_train(x, gamma, beta, size, case.eps, mask=mask)
    assert len(cache.chunks) > 1

    def forward(x_: np.ndarray, g_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        return ref.ghost_batch_norm_train(x_, g_, b_, size, case.eps, mask=mask)[0]

    check_gradients(forward, ref.ghost_batch_norm_backward(dy, cache), x, gamma, beta, dy)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("limits", [(1.5, 0.5), (3.0, 5.0)], ids=["clipped", "loose"])
def test_renorm_backward_holds_r_and_d_constant(case: Case, limits: tuple[float, float]) -> None:
    """The renorm gradient is that of x -> gamma * (x_hat_B(x) * r + d) + beta, r, d fixed."""
    x, (gamma, beta), dy = case.input(), case.params(), upstream(case)
    rng = np.random.default_rng(11)
    # Population statistics away from the batch's, so that the clipping is exercised.
    running_mean = rng.normal(size=case.channels) * 2 + case.loc
    running_var = rng.uniform(0.1, 10.0, size=case.channels) * case.scale**2
    r_max, d_max = limits
    _, cache = ref.batch_renorm_train(
        x, gamma, beta, running_mean, running_var, r_max, d_max, case.eps
    )
    r, d = cache.r, cache.d
    view = (1, -1) + (1,) * (case.rank - 2)

    def forward(x_: np.ndarray, g_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        x_hat_b, _ = ref.batch_norm_train(x_, np.ones_like(g_), np.zeros_like(b_), case.eps)
        return g_.reshape(view) * (x_hat_b * r.reshape(view) + d.reshape(view)) + b_.reshape(view)

    check_gradients(forward, ref.batch_renorm_backward(dy, cache), x, gamma, beta, dy)
