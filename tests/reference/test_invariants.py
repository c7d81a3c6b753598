"""Properties batch normalization must have, on the case table and on hypothesis' inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnkit import reference as ref
from tests.cases import CASE_IDS, CASES, Case
from tests.helpers import condition


def feature_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


@st.composite
def inputs(draw: st.DrawFn, min_values: int = 2) -> np.ndarray:
    """A float64 input of shape (N, C, *spatial) with at least min_values per feature."""
    spatial = draw(st.lists(st.integers(1, 3), max_size=3))
    n = draw(st.integers(1, 8))
    while n * int(np.prod(spatial)) < min_values:
        n += 1
    c = draw(st.integers(1, 4))
    elements = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float64, (n, c, *spatial), elements=elements))


def spread(x: np.ndarray) -> np.ndarray:
    return x.std(axis=feature_axes(x))


# ----------------------------------------------------------------------- the Z-transform


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_training_output_has_mean_zero_and_variance_one(case: Case) -> None:
    x = case.input()
    y, cache = ref.batch_norm_train(x, np.ones(case.channels), np.zeros(case.channels), case.eps)
    assert cache.stats is not None
    axes = feature_axes(x)
    tolerance = 1e-14 * max(1.0, condition(x))
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=tolerance)
    # exactly var / (var + eps): eps keeps it just under 1
    var = cache.stats.var
    np.testing.assert_allclose(y.var(axis=axes), var / (var + case.eps), rtol=tolerance)


@given(inputs())
def test_output_moments_on_any_input(x: np.ndarray) -> None:
    assume(np.all(spread(x) > 1e-3))
    c = x.shape[1]
    y, cache = ref.batch_norm_train(x, np.ones(c), np.zeros(c))
    assert cache.stats is not None
    var = cache.stats.var
    np.testing.assert_allclose(y.mean(axis=feature_axes(x)), 0.0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=feature_axes(x)), var / (var + 1e-5), rtol=1e-9)


@given(inputs(), st.floats(0.01, 100.0), st.floats(-1e3, 1e3), st.data())
def test_per_feature_affine_change_of_input_leaves_output_unchanged(
    x: np.ndarray, scale: float, shift: float, data: st.DataObject
) -> None:
    """y(a * x + b) = sign(a) * y(x) per feature, exactly when eps scales with a**2.

    (x - mu) / sqrt(var + eps) is invariant to shifts, and to scaling by a when eps
    becomes a**2 * eps; with eps fixed the invariance is approximate, to eps / var.
    """
    c = x.shape[1]
    signs = np.array(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=c, max_size=c)))
    b = shift * np.linspace(-1.0, 1.0, c)
    view = (1, c) + (1,) * (x.ndim - 2)
    gamma, beta = np.linspace(0.5, 1.5, c), np.linspace(-1.0, 1.0, c)
    eps = 1e-3
    y, _ = ref.batch_norm_train(x, gamma, beta, eps)
    changed = (scale * signs).reshape(view) * x + b.reshape(view)
    y_changed, _ = ref.batch_norm_train(changed, gamma, beta, eps * scale**2)
    x_hat = (y - beta.reshape(view)) / gamma.reshape(view)
    expected = gamma.reshape(view) * signs.reshape(view) * x_hat + beta.reshape(view)
    tolerance = 1e-14 * max(1.0, condition(x, eps), condition(changed, eps * scale**2))
    np.testing.assert_allclose(y_changed, expected, atol=tolerance)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradient_is_orthogonal_to_constants_and_to_x_hat(case: Case) -> None:
    """Shifting or scaling a feature's input changes nothing (up to eps), so
    sum_i dx_i = 0 and sum_i dx_i * x_hat_i = (eps share) for every feature."""
    x, (gamma, beta) = case.input(), case.params()
    dy = np.random.default_rng(1).normal(size=case.shape)
    _, cache = ref.batch_norm_train(x, gamma, beta, case.eps)
    dx, _, _ = ref.batch_norm_backward(dy, cache)
    axes = feature_axes(x)
    scale = np.abs(dx).sum(axis=axes)
    np.testing.assert_allclose(dx.sum(axis=axes), 0.0, atol=1e-10 * scale.max() + 1e-300)
    assert cache.stats is not None
    # d/dt y(x + t * (x - mu)) = -eps / (var + eps) * (gamma * x_hat) * ... ; exact identity:
    # sum_i dx_i * (x_i - mu) = eps / (var + eps) * sum_i (gamma * dy_i) * (x_i - mu) / sigma
    centered = x - cache.stats.mean.reshape((1, -1) + (1,) * (x.ndim - 2))
    var = cache.stats.var
    lhs = (dx * centered).sum(axis=axes)
    rhs = case.eps / (var + case.eps) * gamma * (dy * cache.x_hat).sum(axis=axes)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-6, atol=1e-10 * np.abs(dx * centered).sum())


# ----------------------------------------------------------------------- the variants


@given(inputs(), st.integers(0, 4))
def test_ghost_batch_at_least_the_batch_is_plain_batch_norm(x: np.ndarray, extra: int) -> None:
    c = x.shape[1]
    gamma, beta = np.linspace(0.5, 2.0, c), np.linspace(-1.0, 1.0, c)
    y, cache = ref.batch_norm_train(x, gamma, beta)
    y_ghost, ghost = ref.ghost_batch_norm_train(x, gamma, beta, x.shape[0] + extra)
    assert len(ghost.chunks) == 1
    np.testing.assert_array_equal(y_ghost, y)
    dy = np.cos(np.arange(x.size)).reshape(x.shape)
    for mine, plain in zip(
        ref.ghost_batch_norm_backward(dy, ghost), ref.batch_norm_backward(dy, cache), strict=True
    ):
        np.testing.assert_array_equal(mine, plain)


@given(inputs(), st.integers(2, 5))
def test_ghost_batches_are_normalized_independently(x: np.ndarray, size: int) -> None:
    c = x.shape[1]
    per_sample = int(np.prod(x.shape[2:]))
    n = x.shape[0]
    assume(all(min(size, n - s) * per_sample >= 2 for s in range(0, n, size)))
    y, cache = ref.ghost_batch_norm_train(x, np.ones(c), np.zeros(c), size)
    for number, start in enumerate(range(0, n, size)):
        expected, _ = ref.batch_norm_train(x[start : start + size], np.ones(c), np.zeros(c))
        np.testing.assert_array_equal(y[start : start + size], expected)
        assert cache.chunks[number].x_hat.shape[0] == min(size, n - start)
    whole = ref.batch_stats(x)
    assert cache.stats.count == whole.count
    np.testing.assert_allclose(cache.stats.mean, whole.mean, rtol=1e-12, atol=1e-12 * 1e4)
    np.testing.assert_allclose(cache.stats.m2, whole.m2, rtol=1e-10, atol=1e-6)


@given(inputs())
def test_all_ones_mask_equals_no_mask(x: np.ndarray) -> None:
    c = x.shape[1]
    gamma, beta = np.full(c, 1.5), np.full(c, -0.5)
    mask = np.ones((x.shape[0], *x.shape[2:]), dtype=bool)
    y, cache = ref.batch_norm_train(x, gamma, beta)
    y_masked, masked = ref.batch_norm_train(x, gamma, beta, mask=mask)
    np.testing.assert_array_equal(y_masked, y)
    dy = np.sin(np.arange(x.size)).reshape(x.shape)
    for mine, plain in zip(
        ref.batch_norm_backward(dy, masked), ref.batch_norm_backward(dy, cache), strict=True
    ):
        np.testing.assert_array_equal(mine, plain)


@given(inputs(min_values=3), st.data())
def test_masked_statistics_ignore_what_is_masked(x: np.ndarray, data: st.DataObject) -> None:
    """Masked positions can hold anything: statistics and valid outputs do not move."""
    positions = (x.shape[0], *x.shape[2:])
    mask = data.draw(hnp.arrays(np.bool_, positions))
    assume(mask.sum() >= 2)
    c = x.shape[1]
    y, cache = ref.batch_norm_train(x, np.ones(c), np.zeros(c), mask=mask)
    garbage = np.where(np.expand_dims(mask, 1), x, 1e6)
    y_garbage, cache_garbage = ref.batch_norm_train(garbage, np.ones(c), np.zeros(c), mask=mask)
    assert cache.stats is not None
    assert cache_garbage.stats is not None
    np.testing.assert_array_equal(cache.stats.mean, cache_garbage.stats.mean)
    valid = np.broadcast_to(np.expand_dims(mask, 1), x.shape)
    np.testing.assert_array_equal(y[valid], y_garbage[valid])
    # the statistics are those of the valid values alone
    values = np.moveaxis(x, 1, -1)[mask]  # (valid count, C)
    np.testing.assert_allclose(cache.stats.mean, values.mean(axis=0), rtol=1e-12, atol=1e-8)
    np.testing.assert_allclose(cache.stats.var, values.var(axis=0), rtol=1e-9, atol=1e-6)


@given(inputs(), st.data())
def test_renorm_without_room_is_plain_batch_norm(x: np.ndarray, data: st.DataObject) -> None:
    c = x.shape[1]
    gamma, beta = np.linspace(-2.0, 2.0, c), np.linspace(0.0, 1.0, c)
    running_mean = data.draw(hnp.arrays(np.float64, (c,), elements=st.floats(-10, 10)))
    running_var = data.draw(hnp.arrays(np.float64, (c,), elements=st.floats(0.01, 100)))
    y, cache = ref.batch_norm_train(x, gamma, beta)
    y_renorm, renorm = ref.batch_renorm_train(x, gamma, beta, running_mean, running_var, 1.0, 0.0)
    np.testing.assert_allclose(y_renorm, y, rtol=1e-12, atol=1e-12)
    dy = np.cos(np.arange(x.size)).reshape(x.shape)
    for mine, plain in zip(
        ref.batch_renorm_backward(dy, renorm), ref.batch_norm_backward(dy, cache), strict=True
    ):
        np.testing.assert_allclose(mine, plain, rtol=1e-12, atol=1e-12 * np.abs(plain).max())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unclipped_renorm_normalizes_with_the_population_statistics(case: Case) -> None:
    """When r and d are inside their limits, training normalizes exactly as inference."""
    x, (gamma, beta) = case.input(), case.params()
    stats = ref.batch_stats(x)
    running_mean = stats.mean + 0.1 * np.sqrt(stats.var)
    running_var = stats.var * 1.5
    y, cache = ref.batch_renorm_train(x, gamma, beta, running_mean, running_var, 1e9, 1e9, case.eps)
    expected = ref.batch_norm_eval(x, running_mean, running_var, gamma, beta, case.eps)
    np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    assert np.all(cache.r < 1.0)
    assert np.all(cache.d < 0)


def test_renorm_clips_r_and_d() -> None:
    x = np.array([[0.0, 10.0], [2.0, 12.0], [4.0, 14.0], [6.0, 16.0]])  # var 5, means 3 and 13
    _, cache = ref.batch_renorm_train(x, [1, 1], [0, 0], [3.0, 0.0], [500.0, 5.0], 2.0, 1.5, 0.0001)
    np.testing.assert_allclose(cache.r, [0.5, 1.0], rtol=1e-4)  # 0.1 clipped to 1 / r_max
    np.testing.assert_allclose(cache.d, [0.0, 1.5])  # 13 / sqrt(5) clipped to d_max


def test_renorm_schedule() -> None:
    assert ref.renorm_limits(4999) == (1.0, 0.0)
    assert ref.renorm_limits(5000) == (1.0, 0.0)
    assert ref.renorm_limits(15000, warmup_steps=5000, r_max_steps=25000, d_max_steps=10000) == (
        2.0,
        5.0,
    )
    assert ref.renorm_limits(40000) == (3.0, 5.0)
    assert ref.renorm_limits(0, 2.0, 1.0, 0, 0, 0) == (2.0, 1.0)
    limits = [ref.renorm_limits(step) for step in range(0, 50000, 1000)]
    assert all(a <= b for a, b in itertools.pairwise(limits))  # never shrinks


# ----------------------------------------------------------------------- merging shards


@given(inputs(), st.data())
def test_merged_shard_statistics_equal_the_whole_batch(x: np.ndarray, data: st.DataObject) -> None:
    n = x.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=4)))
    bounds = [0, *cuts, n]
    shards = [ref.batch_stats(x[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = ref.merge_stats(shards)
    whole = ref.batch_stats(x)
    assert merged.count == whole.count
    scale = max(1.0, float(np.abs(x).max()))
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-12, atol=1e-12 * scale**2 * x.size)


def test_merge_is_exact_far_from_zero() -> None:
    """Where sum-of-squares formulas lose every digit, (count, mean, M2) loses none."""
    rng = np.random.default_rng(0)
    x = 1e8 + rng.normal(size=(1000, 2))
    shards = [ref.batch_stats(part) for part in np.array_split(x, 7)]
    merged, whole = ref.merge_stats(shards), ref.batch_stats(x)
    # the inputs themselves are rounded at 1.5e-8 (float64 at 1e8): both agree to that
    np.testing.assert_allclose(merged.var, whole.var, rtol=1e-7)
    assert abs(merged.var[0] - 1.0) < 0.2


def test_running_statistics_cumulative_average_is_the_mean_of_batch_statistics() -> None:
    rng = np.random.default_rng(0)
    bn = ref.BatchNorm(3, momentum=None)
    batches = [rng.normal(loc=2.0, scale=3.0, size=(5, 3, 2)) for _ in range(7)]
    for x in batches:
        bn.forward(x)
    means = [x.mean(axis=(0, 2)) for x in batches]
    variances = [x.var(axis=(0, 2), ddof=1) for x in batches]
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=1e-12)
    assert bn.num_batches_tracked == 7


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_running_statistics_exponential_average(momentum: float) -> None:
    batch_mean, batch_var = np.array([1.0, -2.0]), np.array([4.0, 0.5])
    mean, var = ref.update_running_stats([0.5, 0.5], [2.0, 2.0], batch_mean, batch_var, 5, momentum)
    np.testing.assert_allclose(mean, (1 - momentum) * 0.5 + momentum * batch_mean)
    np.testing.assert_allclose(var, (1 - momentum) * 2.0 + momentum * batch_var * 5 / 4)
    _, biased = ref.update_running_stats(
        [0.5, 0.5], [2.0, 2.0], batch_mean, batch_var, 5, momentum, unbiased=False
    )
    np.testing.assert_allclose(biased, (1 - momentum) * 2.0 + momentum * batch_var)
