"""convert and to_torch: state, modes and outputs survive the round trip."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import bnkit
from bnkit.errors import ConfigError
from bnkit.tools import AnyRankBatchNorm, convert, to_torch
from tests.tools.models import ScaledBatchNorm2d, batch_norm_types, bnkit_bn, resnet

HAS_ACTIVATION = "activation" in inspect.signature(bnkit.nn.BatchNormNd.__init__).parameters


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.slow
def test_convert_keeps_objects_state_and_outputs(dtype: torch.dtype) -> None:
    model = resnet(dtype=dtype)
    model.layer1.bn1.weight.requires_grad_(False)
    reference = copy.deepcopy(model)
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    before = _state(model)

    converted = convert(model)

    assert converted is model
    assert set(batch_norm_types(model)) == {"BatchNorm1d", "BatchNorm2d"}
    assert all(isinstance(m, bnkit.nn.BatchNormNd) for m in model.modules() if _is_bn(m))
    for name, parameter in model.named_parameters():
        assert parameter is parameters[name], name  # the same objects: optimizers keep working
    for name, buffer in model.named_buffers():
        assert buffer is buffers[name], name
    _assert_same_state(before, _state(model))
    assert not model.layer1.bn1.weight.requires_grad
    assert model.layer1.bn1.bias.requires_grad
    assert model.stem_bn.weight.dtype == dtype

    x = torch.randn(6, 3, 8, 8, dtype=dtype)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=tolerance, atol=tolerance)
    model.train()
    reference.train()
    torch.testing.assert_close(model(x), reference(x), rtol=tolerance, atol=tolerance)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def test_convert_keeps_each_modules_mode() -> None:
    model = resnet().train()
    model.layer1.bn2.eval()
    model.head_bn.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    convert(model)
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.slow
def test_an_optimizer_built_before_convert_trains_the_converted_model() -> None:
    model = resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    convert(model)
    weight = model.stem_bn.weight.detach().clone()
    optimizer.zero_grad()
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(weight, model.stem_bn.weight)


def test_extras_go_to_every_layer_and_rebuild_bnkit_layers() -> None:
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6, momentum=None, eps=1e-3),
        bnkit.BatchNorm1d(6, single_sample="running"),
    )
    existing = model[2]
    weight = existing.weight
    convert(model, running_var_estimator="biased", skip_nonfinite=False)
    first, second = model[1], model[2]
    assert isinstance(first, bnkit.BatchNorm1d)
    assert (first.momentum, first.eps) == (None, 1e-3)
    for layer in (first, second):
        assert layer.running_var_estimator == "biased"
        assert layer.skip_nonfinite is False
    assert second is not existing
    assert second.single_sample == "running"  # kept from the old layer
    assert second.weight is weight


def test_without_extras_bnkit_layers_are_left_as_they_are() -> None:
    model = nn.Sequential(bnkit.BatchNorm2d(3), nn.BatchNorm2d(3))
    layer = model[0]
    convert(model)
    assert model[0] is layer


def test_convert_frozen_extra_freezes() -> None:
    model = convert(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), frozen=True)
    model.train()(torch.randn(8, 3))
    assert model[1].frozen
    assert int(model[1].num_batches_tracked) == 0


def test_a_root_batch_norm_is_returned_converted() -> None:
    layer = nn.BatchNorm3d(2)
    converted = convert(layer)
    assert isinstance(converted, bnkit.BatchNorm3d)
    assert converted.weight is layer.weight


def test_sync_batch_norm_becomes_any_rank_and_back() -> None:
    torch.manual_seed(0)
    sync = nn.SyncBatchNorm(5)
    with torch.no_grad():
        sync.running_mean.uniform_(-1, 1)
        sync.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Identity(), sync)
    reference = copy.deepcopy(model)
    convert(model)
    assert type(model[1]) is AnyRankBatchNorm
    for shape in [(4, 5), (4, 5, 3), (4, 5, 3, 3), (2, 5, 2, 2, 2), (2, 5, 2, 1, 2, 2)]:
        x = torch.randn(shape)
        for train in (False, True):
            model.train(train)
            reference.train(train)
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(bnkit.errors.ShapeError, match="2 or more dimensions"):
        model(torch.randn(5))
    with pytest.raises(bnkit.errors.ShapeError, match="expected 5 channels"):
        model(torch.randn(4, 3))
    back = to_torch(model)
    assert type(back[1]) is nn.SyncBatchNorm
    # the running statistics went through the same training steps, computed two ways
    for (key, a), (_, b) in zip(
        reference.state_dict().items(), back.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=key)


def test_a_module_at_two_paths_stays_one_module() -> None:
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    convert(model)
    assert model[0] is model[2]
    assert isinstance(model[0], bnkit.BatchNorm1d)


def test_hooks_move_with_the_layer() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    calls = []
    handle = model[0].register_forward_hook(lambda *args: calls.append(1))
    convert(model)
    model(torch.randn(4, 3))
    assert calls == [1]
    handle.remove()
    model(torch.randn(4, 3))
    assert calls == [1]


def test_an_unknown_extra_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    with pytest.raises(ConfigError, match=r"convert: cannot build BatchNorm1d for '1'.*colour"):
        convert(model, colour="red")
    with pytest.raises(ConfigError, match="single_sample"):
        convert(model, single_sample="sometimes")


def test_lazy_layers() -> None:
    model = nn.Sequential(nn.LazyBatchNorm1d())
    with pytest.raises(ConfigError, match=r"'0' .* has not seen an input yet"):
        convert(model)
    model(torch.randn(4, 3))  # now a BatchNorm1d(3)
    assert batch_norm_types(convert(model)) == ["BatchNorm1d"]
    assert isinstance(model[0], bnkit.BatchNorm1d)


def test_subclasses_of_torch_layers_are_left_alone() -> None:
    class Custom(nn.BatchNorm2d):
        pass

    model = nn.Sequential(Custom(3))
    convert(model)
    assert type(model[0]) is Custom


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_torch_round_trip(dtype: torch.dtype) -> None:
    original = resnet(dtype=dtype)
    original.layer2.bn1.eval()
    reference = copy.deepcopy(original)
    model = to_torch(convert(original, running_var_estimator="biased"))
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules() if _is_bn(m))
    _assert_same_state(reference.state_dict(), model.state_dict())
    assert {n: m.training for n, m in model.named_modules()} == {
        n: m.training for n, m in reference.named_modules()
    }
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=tolerance, atol=tolerance)
    assert model.fc1_bn.weight.dtype == dtype


def test_to_torch_shares_parameters_and_turns_frozen_layers_to_eval() -> None:
    model = nn.Sequential(bnkit.BatchNorm2d(3, frozen=True), bnkit.BatchNorm1d(2)).train()
    weight = model[0].weight
    to_torch(model)
    assert type(model[0]) is nn.BatchNorm2d
    assert model[0].weight is weight
    assert not model[0].training  # frozen: kept in eval so train() on the parent is needed
    assert model[1].training
    root = to_torch(bnkit.BatchNorm3d(4))
    assert type(root) is nn.BatchNorm3d


def test_to_torch_refuses_extras_that_change_eval_outputs() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4, output_power=2, single_sample="running")
    )
    with pytest.raises(
        ConfigError, match=r"'1' \(ScaledBatchNorm2d\(4\)\) uses output_power=2, which changes"
    ):
        to_torch(model)
    assert type(model[1]) is ScaledBatchNorm2d  # nothing modified
    # with the extra at its default, the layer is plain batch norm in eval mode
    model[1].output_power = 1
    assert type(to_torch(model)[1]) is nn.BatchNorm2d


@pytest.mark.skipif(not HAS_ACTIVATION, reason="bnkit layers without activation=")
def test_to_torch_refuses_a_fused_activation() -> None:
    model = nn.Sequential(bnkit.BatchNorm1d(3, activation="relu"))
    with pytest.raises(ConfigError, match=r"'0' \(BatchNorm1d\(3\)\) uses activation='relu'"):
        to_torch(model)


def test_convert_rebuilds_a_subclass_with_its_own_extras() -> None:
    model = nn.Sequential(ScaledBatchNorm2d(4, output_power=3))
    convert(model, running_var_estimator="biased")
    assert type(model[0]) is ScaledBatchNorm2d
    assert model[0].output_power == 3
    assert model[0].running_var_estimator == "biased"


def test_affine_false_and_no_bias_layers() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3, bias=False))
    model.train()
    reference = copy.deepcopy(model)
    convert(model)
    assert model[0].weight is None
    assert model[1].bias is None
    x = torch.randn(8, 3, dtype=torch.float32)
    torch.testing.assert_close(model(x), reference(x))
    to_torch(model)
    assert model[0].weight is None
    assert model[1].bias is None
    assert bnkit_bn(1, 3).affine


def test_a_failed_convert_modifies_nothing() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    )
    with pytest.raises(ConfigError, match=r"'1\.0' \(BatchNorm1d\(3\)\)"):
        convert(model, frozen=True)  # the second layer has no statistics to freeze to
    assert batch_norm_types(model) == ["BatchNorm1d", "BatchNorm1d"]
    assert all(type(m) is nn.BatchNorm1d for m in model.modules() if _is_bn(m))


def test_synchronized_layers_round_trip_through_sync_batch_norm() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.SyncBatchNorm(4))
    model = convert(model, sync=True)
    assert all(layer.sync for layer in model)
    back = to_torch(model)
    assert [type(layer) for layer in back] == [torch.nn.SyncBatchNorm, torch.nn.SyncBatchNorm]
