"""The keyword-only extras: running_var_estimator, single_sample, skip_nonfinite, frozen."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import bnkit.nn as bnn
from bnkit.errors import ConfigError, NonFiniteStatsWarning, SingleValueError, format_shape
from bnkit.functional import NonFiniteMonitor, batch_norm
from tests.nn.util import assert_matches, clone_input, twin_layers

F64 = torch.float64


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- running_var_estimator ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4)])
def test_biased_estimator_stores_the_biased_variance(shape: tuple[int, ...]) -> None:
    rank = len(shape)
    theirs, ours = twin_layers(rank, 3, F64, bnkit_kwargs={"running_var_estimator": "biased"})
    n = shape[0] * int(torch.tensor(shape[2:]).prod())
    for seed in range(3):
        x = _randn(*shape, seed=seed) * 3 + 1
        y_theirs, y_ours = theirs(x), ours(x)
        assert_matches(y_ours, y_theirs)  # the output does not depend on the estimator
    assert_matches(ours.running_mean, theirs.running_mean)
    # Each update adds momentum * var_B; torch adds momentum * n/(n-1) * var_B. Starting
    # from running_var = 1: ours - (1-m)^k = (n-1)/n * (theirs - (1-m)^k).
    decay = 0.9**3
    assert_matches(ours.running_var - decay, (theirs.running_var - decay) * (n - 1) / n)


def test_biased_estimator_with_momentum_one_is_the_batch_variance() -> None:
    layer = bnn.BatchNorm2d(4, momentum=1.0, running_var_estimator="biased", dtype=F64)
    x = _randn(3, 4, 5, 2) * 2 - 7
    layer(x)
    assert_matches(layer.running_var, x.var(dim=(0, 2, 3), correction=0))
    assert_matches(layer.running_mean, x.mean(dim=(0, 2, 3)))


# --- single_sample -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_single_sample_raise_is_the_default(shape: tuple[int, ...]) -> None:
    layer = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}[
        len(shape)
    ](3)
    with pytest.raises(SingleValueError) as info:
        layer(torch.randn(shape))
    message = str(info.value)
    assert message.startswith(f"{type(layer).__name__}(3): ")
    assert format_shape(shape) in message
    for option in ("'raise'", "'running'", "'identity'"):
        assert option in message
    assert isinstance(info.value, ValueError)  # what torch raises
    assert int(layer.num_batches_tracked) == 0


def test_single_sample_running_normalizes_with_running_stats() -> None:
    layer = bnn.BatchNorm1d(3, single_sample="running", dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    layer(_randn(8, 3) * 2 + 1)  # a normal batch: running statistics move
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = clone_input(_randn(1, 3, seed=1))
    y = layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key  # nothing updated, not even the counter
    layer.eval()
    x_eval = clone_input(x)
    y_eval = layer(x_eval)
    assert torch.equal(y, y_eval)
    y.sum().backward()
    y_eval.sum().backward()
    assert torch.equal(x.grad, x_eval.grad)


def test_single_sample_identity_returns_the_input() -> None:
    layer = bnn.BatchNorm2d(3, single_sample="identity")
    x = clone_input(torch.randn(1, 3, 1, 1))
    y = layer(x)
    assert torch.equal(y, x)
    assert y is not x  # a copy: an in-place op after the layer must not change x
    y.mul_(2)
    assert not torch.equal(y, x)
    dy = torch.randn(1, 3, 1, 1)
    layer(x).backward(dy)
    assert torch.equal(x.grad, dy)
    assert layer.weight.grad is None
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3))
    # Batches with more than one value per channel are normalized as usual.
    z = torch.randn(2, 3, 1, 1)
    assert not torch.equal(layer(z), z)


def test_single_sample_running_needs_running_stats() -> None:
    with pytest.raises(ConfigError, match=r"BatchNorm1d\(3\): single_sample='running'"):
        bnn.BatchNorm1d(3, track_running_stats=False, single_sample="running")
    with pytest.raises(SingleValueError, match="there are none"):
        batch_norm(torch.randn(1, 3), None, None, training=True, single_sample="running")


def test_single_sample_in_eval_mode_needs_no_option() -> None:
    theirs, ours = twin_layers(2, 3, F64)
    theirs.eval()
    ours.eval()
    x = _randn(1, 3)
    assert_matches(ours(x), theirs(x))


# --- skip_nonfinite ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_batch_is_skipped_and_warned_once(bad: float) -> None:
    layer = bnn.BatchNorm2d(3, dtype=F64)
    layer(_randn(4, 3, 2, 2))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _randn(4, 3, 2, 2, seed=1)
    x[2, 1, 0, 1] = bad
    with pytest.warns(NonFiniteStatsWarning, match=r"^BatchNorm2d\(3\): .*\(4, 3, 2, 2\)"):
        y = layer(x)
    assert not torch.isfinite(y[:, 1]).all()  # the batch's output is computed as usual
    assert torch.isfinite(y[:, 0]).all()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per layer: no second warning
    assert int(layer.num_batches_tracked) == 1
    # A finite batch afterwards updates normally.
    layer(_randn(4, 3, 2, 2, seed=2))
    assert int(layer.num_batches_tracked) == 2


def test_skipped_batches_do_not_count_in_the_cumulative_average() -> None:
    layer = bnn.BatchNorm1d(2, momentum=None, dtype=F64)
    batches = [_randn(5, 2, seed=s) * (s + 1) for s in range(3)]
    bad = _randn(5, 2, seed=9)
    bad[0, 0] = float("nan")
    layer(batches[0])
    with pytest.warns(NonFiniteStatsWarning):
        layer(bad)
    layer(batches[1])
    layer(batches[2])
    assert int(layer.num_batches_tracked) == 3
    assert_matches(layer.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    assert_matches(layer.running_var, torch.stack([b.var(0) for b in batches]).mean(0))


def test_skip_nonfinite_false_behaves_like_torch() -> None:
    theirs, ours = twin_layers(2, 3, F64, bnkit_kwargs={"skip_nonfinite": False})
    x = _randn(6, 3)
    x[1, 2] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_theirs, y_ours = theirs(x), ours(x)
    assert torch.equal(torch.isnan(y_ours), torch.isnan(y_theirs))
    assert torch.equal(torch.isnan(ours.running_var), torch.isnan(theirs.running_var))
    assert torch.isnan(ours.running_var[2])
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def test_functional_skip_warns_and_keeps_stats() -> None:
    mean, var, count = torch.zeros(2), torch.ones(2), torch.tensor(0)
    x = torch.randn(4, 2)
    x[0, 0] = float("inf")
    with pytest.warns(NonFiniteStatsWarning, match=r"^batch_norm: "):
        batch_norm(x, mean, var, training=True, num_batches_tracked=count)
    assert torch.equal(mean, torch.zeros(2))
    assert torch.equal(var, torch.ones(2))
    assert int(count) == 0


class _FakeEvent:
    """Stands in for a CUDA event: the copy completes when the test says so."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_deferred_flags_warn_once_their_copy_is_done() -> None:
    """The bookkeeping of the non-blocking (CUDA) path, driven by hand."""
    monitor = NonFiniteMonitor("BatchNorm2d(8)", once=True)
    event = _FakeEvent()
    monitor._pending.append((torch.tensor(False), event, (2, 8, 4, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.poll()  # copy not finished: nothing to say yet
    assert len(monitor._pending) == 1
    event.done = True
    with pytest.warns(NonFiniteStatsWarning, match=r"\(2, 8, 4, 4\)"):
        monitor.poll()
    assert monitor.warned
    assert not monitor._pending
    # flush() waits for pending copies; a recorded (True) flag says nothing.
    monitor2 = NonFiniteMonitor("x", once=True)
    monitor2._pending.append((torch.tensor(True), _FakeEvent(), (1, 1)))
    monitor2.flush()
    assert not monitor2._pending
    assert not monitor2.warned


def test_layer_with_monitor_state_copies_and_pickles() -> None:
    layer = bnn.BatchNorm1d(3)
    layer._nonfinite_monitor._pending.append((torch.tensor(True), _FakeEvent(), (2, 3)))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._nonfinite_monitor._pending == []
        assert clone.skip_nonfinite
        clone(torch.randn(4, 3))


# --- frozen --------------------------------------------------------------------------------


def test_frozen_layer_uses_and_keeps_population_stats() -> None:
    layer = bnn.BatchNorm2d(3, dtype=F64)
    for seed in range(3):
        layer(_randn(4, 3, 3, 3, seed=seed) * 2 + 1)
    assert layer.freeze() is layer
    assert "frozen=True" in repr(layer)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = clone_input(_randn(2, 3, 3, 3, seed=5))
    y = layer(x)  # train mode, frozen
    assert layer.training
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    reference = copy.deepcopy(layer).unfreeze().eval()
    x_eval = clone_input(x)
    y_eval = reference(x_eval)
    assert torch.equal(y, y_eval)
    y.sum().backward()
    y_eval.sum().backward()
    assert torch.equal(x.grad, x_eval.grad)
    assert layer.weight.grad is not None  # affine parameters still train
    layer(_randn(1, 3, 1, 1))  # one value per channel is fine: no batch statistics
    assert layer.unfreeze() is layer
    layer(_randn(4, 3, 3, 3))
    assert int(layer.num_batches_tracked) == 4


def test_frozen_constructor_and_errors() -> None:
    layer = bnn.BatchNorm1d(3, frozen=True)
    assert layer.frozen
    layer(torch.randn(5, 3))
    assert int(layer.num_batches_tracked) == 0
    with pytest.raises(ConfigError, match=r"BatchNorm1d\(3\): cannot freeze"):
        bnn.BatchNorm1d(3, track_running_stats=False, frozen=True)
    with pytest.raises(ConfigError, match="cannot freeze"):
        bnn.BatchNorm1d(3, track_running_stats=False).freeze()


def test_extras_appear_in_repr_only_when_not_default() -> None:
    layer = bnn.BatchNorm2d(
        4, running_var_estimator="biased", single_sample="identity", skip_nonfinite=False
    )
    text = repr(layer)
    assert text.startswith("BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, ")
    assert "running_var_estimator='biased'" in text
    assert "single_sample='identity'" in text
    assert "skip_nonfinite=False" in text
    assert "frozen" not in text


def test_leaving_train_mode_reports_pending_flags() -> None:
    layer = bnn.BatchNorm1d(3)
    layer._nonfinite_monitor._pending.append((torch.tensor(False), _FakeEvent(), (2, 3)))
    with pytest.warns(NonFiniteStatsWarning, match=r"^BatchNorm1d\(3\): .*\(2, 3\)"):
        layer.eval()
    assert not layer._nonfinite_monitor._pending
