"""Bad input to the reference: a bnkit.errors type (a ValueError) saying what and where."""

from __future__ import annotations

import numpy as np
import pytest

from bnkit import errors
from bnkit import reference as ref

X = np.arange(24.0).reshape(4, 3, 2)
ONES, ZEROS = np.ones(3), np.zeros(3)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (
            lambda: ref.batch_norm_train(np.ones(5), [1.0], [0.0]),
            errors.ShapeError,
            ["batch_norm_train", "(N, C)", "1D input of shape (5,)"],
        ),
        (
            lambda: ref.batch_norm_train(X, np.ones(4), ZEROS),
            errors.ShapeError,
            ["gamma of shape (3,)", "3 channels", "got shape (4,)"],
        ),
        (
            lambda: ref.batch_norm_train(X, ONES, np.zeros((3, 1))),
            errors.ShapeError,
            ["beta of shape (3,)", "got shape (3, 1)"],
        ),
        (
            lambda: ref.batch_norm_train(np.ones((1, 3)), ONES, ZEROS),
            errors.SingleValueError,
            ["at least two values per feature", "got one", "(1, 3)", "variance", "evaluation"],
        ),
        (
            lambda: ref.batch_norm_train(np.ones((0, 3, 2)), ONES, ZEROS),
            errors.EmptyBatchError,
            ["got none", "(0, 3, 2)"],
        ),
        (
            lambda: ref.batch_norm_train(X, ONES, ZEROS, eps=0.0),
            errors.ConfigError,
            ["eps > 0", "got 0.0"],
        ),
        (
            lambda: ref.batch_norm_train(X, ONES, ZEROS, eps=float("nan")),
            errors.ConfigError,
            ["eps > 0", "nan"],
        ),
        (
            lambda: ref.batch_norm_train(X, ONES, ZEROS, mask=np.ones((4, 3), dtype=bool)),
            errors.ShapeError,
            ["mask of shape (N, *spatial) = (4, 2)", "(4, 3, 2)", "got (4, 3)"],
        ),
        (
            lambda: ref.batch_norm_train(X, ONES, ZEROS, mask=np.ones((4, 2))),
            errors.ShapeError,
            ["boolean mask", "float64"],
        ),
        (
            lambda: ref.batch_norm_train(
                X, ONES, ZEROS, mask=np.eye(4, 2, dtype=bool) & np.eye(4, 2, dtype=bool)[::-1]
            ),
            errors.EmptyBatchError,
            ["valid values", "got none"],
        ),
        (
            lambda: ref.ghost_batch_norm_train(X, ONES, ZEROS, 0),
            errors.ConfigError,
            ["ghost_batch_size >= 1", "got 0"],
        ),
        (
            lambda: ref.ghost_batch_norm_train(X, ONES, ZEROS, 2.5),  # type: ignore[arg-type]
            errors.ConfigError,
            ["integer ghost_batch_size", "2.5"],
        ),
        (
            lambda: ref.ghost_batch_norm_train(np.ones((5, 3)), ONES, ZEROS, 2),
            errors.SingleValueError,
            ["ghost batch 3 of 3", "(1, 3)"],
        ),
        (
            lambda: ref.update_running_stats(ZEROS, ONES, ZEROS, ONES, 4, momentum=1.5),
            errors.ConfigError,
            ["momentum in [0, 1]", "or None", "got 1.5"],
        ),
        (
            lambda: ref.update_running_stats(ZEROS, ONES, ZEROS, ONES, 4, momentum=-0.1),
            errors.ConfigError,
            ["momentum in [0, 1]", "got -0.1"],
        ),
        (
            lambda: ref.update_running_stats(ZEROS, ONES, np.zeros(2), ONES, 4),
            errors.ShapeError,
            ["batch_mean of shape (3,)", "got shape (2,)"],
        ),
        (
            lambda: ref.batch_renorm_train(X, ONES, ZEROS, ZEROS, ONES, 0.5, 1.0),
            errors.ConfigError,
            ["r_max >= 1", "0.5"],
        ),
        (
            lambda: ref.batch_renorm_train(X, ONES, ZEROS, ZEROS, ONES, 2.0, -1.0),
            errors.ConfigError,
            ["d_max >= 0", "-1.0"],
        ),
        (
            lambda: ref.renorm_limits(10, warmup_steps=-1),
            errors.ConfigError,
            ["warmup_steps >= 0", "-1"],
        ),
        (
            lambda: ref.batch_norm_eval(X, np.zeros(2), ONES, ONES, ZEROS),
            errors.ShapeError,
            ["batch_norm_eval", "mean of shape (3,)"],
        ),
        (
            lambda: ref.BatchNorm(3).forward(np.ones((4, 5))),
            errors.ShapeError,
            ["BatchNorm(3", "3 channels", "got shape (4, 5)"],
        ),
        (
            lambda: ref.BatchNorm(3).forward(np.ones((1, 3))),
            errors.SingleValueError,
            ["BatchNorm(3", "got one", "(1, 3)"],
        ),
        (
            lambda: ref.BatchNorm(3, momentum=2.0),
            errors.ConfigError,
            ["BatchNorm(3)", "momentum in [0, 1]", "got 2.0"],
        ),
        (
            lambda: ref.BatchNorm(3, eps=-1e-5),
            errors.ConfigError,
            ["BatchNorm(3)", "eps > 0"],
        ),
        (
            lambda: ref.BatchNorm(3, running_var_estimator="sample"),
            errors.ConfigError,
            ["'unbiased', 'biased'", "'sample'"],
        ),
        (
            lambda: ref.BatchNorm(0),
            errors.ConfigError,
            ["num_features >= 1", "got 0"],
        ),
        (
            lambda: ref.merge_stats([]),
            errors.ShapeError,
            ["at least one shard"],
        ),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, error, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as raised:
        call()
    assert isinstance(raised.value, ValueError)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_backward_before_forward_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="before forward"):
        ref.BatchNorm(2).backward(np.ones((3, 2)))


def test_a_failed_training_step_leaves_the_running_statistics_alone() -> None:
    bn = ref.BatchNorm(3)
    bn.forward(X)
    before = bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked
    with pytest.raises(errors.SingleValueError):
        bn.forward(np.ones((1, 3)))
    np.testing.assert_array_equal(bn.running_mean, before[0])
    np.testing.assert_array_equal(bn.running_var, before[1])
    assert bn.num_batches_tracked == before[2]
