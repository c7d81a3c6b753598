"""torch's conv/linear + batch norm fusion utilities against bnkit layers: a layer with a
fused activation is refused (folding it would drop the activation), a plain one is folded
exactly as torch's layer is, and the guard follows the layer through its changes."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnkit
from bnkit import tools
from bnkit.errors import BatchNormError, DTypeError, FusionError

with warnings.catch_warnings():  # importing it scripts torch.utils.mkldnn: deprecated in torch
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.fx.experimental.optimization import fuse

ACTIVATIONS = ["relu", "leaky_relu", "elu"]
TORCH_ACTIVATIONS = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2), "elu": nn.ELU(0.7)}
PARAMS = {"relu": None, "leaky_relu": 0.2, "elu": 0.7}
TOL = {"rtol": 1e-9, "atol": 1e-9}

# (conv, batch norm, input shape): one of each rank, and a Linear.
CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), bnkit.BatchNorm1d, (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d, (2, 3, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3), bnkit.BatchNorm3d, (2, 3, 5, 5, 5)),
    "linear": (lambda: nn.Linear(3, 4), bnkit.BatchNorm1d, (6, 3)),
}


def _pair(case: str, **options: Any) -> tuple[nn.Sequential, torch.Tensor]:
    """An eval (layer, bnkit batch norm) pair in float64 with non-trivial statistics, and
    an input for it."""
    torch.manual_seed(0)
    make_layer, kind, shape = CASES[case]
    bn = kind(4, dtype=torch.float64, **options)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(make_layer().double(), bn).eval()
    return model, torch.randn(*shape, dtype=torch.float64)


def _fuse_pair(model: nn.Sequential) -> nn.Module:
    layer, bn = model[0], model[1]
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, bn)
    return fuse_conv_bn_eval(layer, bn)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_fusion_refuses_a_fused_activation(case: str, activation: str) -> None:
    model, _ = _pair(case, activation=activation)
    name = f"{type(model[1]).__name__}(4, activation='{activation}')"
    with pytest.raises(FusionError) as caught:
        _fuse_pair(model)
    message = str(caught.value)
    assert message.startswith(name + ":")
    assert "drop its fused activation" in message
    assert "bnkit.tools.fold" in message
    assert "bnkit.tools.to_torch" in message
    assert isinstance(caught.value, BatchNormError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", [None, "identity"])
def test_torch_fusion_folds_a_layer_without_activation_exactly(
    case: str, activation: str | None
) -> None:
    model, x = _pair(case, activation=activation)
    assert type(model[1].eps) is float
    fused = _fuse_pair(model)
    assert type(fused) is type(model[0])
    torch.testing.assert_close(fused(x), model(x), **TOL)


def test_tensor_arithmetic_with_the_guarded_eps_raises_in_either_order() -> None:
    eps = bnkit.BatchNorm2d(3, activation="relu").eps
    var = torch.ones(3)
    for compute in (
        lambda: var + eps,
        lambda: eps + var,
        lambda: torch.add(var, eps),
        lambda: torch.rsqrt(var + eps),
    ):
        with pytest.raises(FusionError, match=r"BatchNorm2d\(3, activation='relu'\)"):
            compute()


def test_the_eps_of_a_fused_activation_still_behaves_as_the_float() -> None:
    fused = bnkit.BatchNorm2d(3, eps=1e-3, activation="leaky_relu")
    plain = bnkit.BatchNorm2d(3, eps=1e-3)
    eps = fused.eps
    assert type(eps) is not float
    assert isinstance(eps, float)
    assert type(float(eps)) is float
    assert float(eps) == 1e-3
    assert eps == 1e-3
    assert eps < 1.0
    assert hash(eps) == hash(1e-3)
    assert eps * 2 == 2e-3
    assert 1 + eps == 1.001
    assert abs(eps - plain.eps) == 0
    assert repr(eps) == str(eps) == "0.001"
    assert f"{eps:.1e}" == "1.0e-03"
    assert fused.extra_repr() == plain.extra_repr() + ", activation='leaky_relu'"
    assert "eps=0.001" in repr(fused)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    assert type(fused.eps) is not float  # loading state leaves the guard


def test_switching_the_activation_after_construction_flips_the_guard() -> None:
    model, x = _pair("conv2d")
    bn = model[1]
    fuse_conv_bn_eval(model[0], bn)  # no activation: fine
    bn.activation = "elu"
    with pytest.raises(FusionError, match=r"activation='elu'"):
        fuse_conv_bn_eval(model[0], bn)
    bn.activation = "relu"  # the message follows the activation
    with pytest.raises(FusionError, match=r"activation='relu'"):
        fuse_conv_bn_eval(model[0], bn)
    bn.eps = 1e-3  # a new eps is guarded too
    assert bn.eps == 1e-3
    with pytest.raises(FusionError):
        fuse_conv_bn_eval(model[0], bn)
    bn.activation = "identity"
    assert type(bn.eps) is float
    assert bn.eps == 1e-3
    torch.testing.assert_close(fuse_conv_bn_eval(model[0], bn)(x), model(x), **TOL)


def test_a_guarded_eps_passed_to_a_plain_layer_is_plain() -> None:
    guarded = bnkit.BatchNorm2d(3, activation="relu").eps
    plain = bnkit.BatchNorm2d(3, eps=guarded)
    assert type(plain.eps) is float
    assert plain.eps == 1e-5
    other = bnkit.BatchNorm2d(3)
    other.eps = guarded
    assert type(other.eps) is float


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_layer_computes_with_its_eps_and_activation(activation: str) -> None:
    model, x = _pair("conv2d", activation=activation, activation_param=PARAMS[activation])
    bn = model[1]
    bn.eps = 0.5  # large enough to matter
    reference = nn.BatchNorm2d(4, eps=0.5, dtype=torch.float64).eval()
    reference.load_state_dict(bn.state_dict())
    torch_activation = TORCH_ACTIVATIONS[activation]
    expected = torch_activation(reference(model[0](x)))
    torch.testing.assert_close(model(x), expected, **TOL)
    bn.train()
    reference.train()
    torch.testing.assert_close(model(x), torch_activation(reference(model[0](x))), **TOL)


def _round_trips(layer: nn.Module) -> list[nn.Module]:
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return [
        copy.deepcopy(layer),
        pickle.loads(pickle.dumps(layer)),
        torch.load(buffer, weights_only=False),
    ]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_copies_and_pickles_keep_the_guard(activation: str) -> None:
    model, x = _pair("conv2d", activation=activation)
    for copied in _round_trips(model):
        assert isinstance(copied[1], bnkit.BatchNorm2d)
        assert copied[1].eps == model[1].eps
        with pytest.raises(FusionError, match=rf"BatchNorm2d\(4, activation='{activation}'\)"):
            fuse_conv_bn_eval(copied[0], copied[1])
        torch.testing.assert_close(copied(x), model(x), **TOL)
        copied[1].activation = None
        assert type(copied[1].eps) is float


def test_copies_of_a_plain_layer_stay_plain() -> None:
    model, x = _pair("conv2d")
    for copied in _round_trips(model):
        assert type(copied[1].eps) is float
        torch.testing.assert_close(fuse_conv_bn_eval(copied[0], copied[1])(x), model(x), **TOL)


def test_a_layer_pickled_without_the_guard_gets_it_when_loaded() -> None:
    # As pickled by a bnkit without the guard: a plain eps and no plain copy.
    layer = bnkit.BatchNorm2d(4, activation="relu")
    state = dict(layer.__dict__, eps=1e-5)
    del state["_eps"]
    loaded = bnkit.BatchNorm2d.__new__(bnkit.BatchNorm2d)
    loaded.__setstate__(state)
    assert type(loaded.eps) is not float
    assert loaded.eps == 1e-5
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(loaded.eval()(x), layer.eval()(x))
    with pytest.raises(FusionError):
        fuse_conv_bn_eval(nn.Conv2d(4, 4, 1).eval(), loaded)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_tools_fold_keeps_the_activation(activation: str) -> None:
    model, x = _pair("conv2d", activation=activation, activation_param=PARAMS[activation])
    folded, report = tools.fold(model, return_report=True)
    assert report["1"].action == "into_producer"
    kinds = [type(m) for m in folded.modules()][1:]
    assert kinds == [nn.Conv2d, type(TORCH_ACTIVATIONS[activation])]
    torch.testing.assert_close(folded(x), model(x), **TOL)
    assert type(model[1].eps) is not float  # the model itself is left as it was


def test_convert_and_freeze_keep_working_with_a_fused_activation() -> None:
    model, x = _pair("conv2d", activation="relu")
    expected = model(x)
    tools.freeze(model)
    converted = tools.convert(model, single_sample="running")
    assert converted[1].single_sample == "running"
    with pytest.raises(FusionError):
        fuse_conv_bn_eval(converted[0], converted[1])
    torch.testing.assert_close(converted(x), expected, **TOL)
    with pytest.raises(BatchNormError, match="activation='relu'"):
        tools.to_torch(converted)  # torch's layer cannot express the activation


def test_to_torch_gives_a_plain_eps() -> None:
    model, x = _pair("conv2d", eps=1e-3)
    back = tools.to_torch(model)
    assert type(back[1]) is nn.BatchNorm2d
    assert type(back[1].eps) is float
    torch.testing.assert_close(fuse_conv_bn_eval(back[0], back[1])(x), back(x), **TOL)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_fx_fuse_does_not_fold_a_bnkit_layer(activation: str | None) -> None:
    """torch.fx.experimental.optimization.fuse matches torch's exact layer classes. Its own
    trace runs into bnkit's forward, which refuses the proxy; from a graph with the bnkit
    layer as a leaf it leaves the layer unfused, so the function is unchanged."""
    model, x = _pair("conv2d", activation=activation)
    with pytest.raises(DTypeError, match="Proxy"):
        fuse(model)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, bnkit.BatchNorm2d) or super().is_leaf_module(m, qualified_name)

    graph_module = torch.fx.GraphModule(model, Tracer().trace(model))
    fused = fuse(graph_module, no_trace=True)
    assert any(isinstance(m, bnkit.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), **TOL)


@pytest.mark.parametrize(
    ("training", "memory_efficient"),
    # Training with memory_efficient=True: the invertibility check, which reads the data,
    # is skipped while tracing (the traced graph keeps the input).
    [(False, True), (True, True), (True, False), (False, False)],
)
def test_export_with_a_fused_activation(training: bool, memory_efficient: bool) -> None:
    model, x = _pair("conv2d", activation="leaky_relu", memory_efficient=memory_efficient)
    model.train(training)
    expected = copy.deepcopy(model)(x)
    exported = torch.export.export(copy.deepcopy(model), (x,)).module()
    torch.testing.assert_close(exported(x), expected, **TOL)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*should not be instantiated.*:DeprecationWarning")
@pytest.mark.parametrize(
    ("training", "memory_efficient"),
    [(False, True), (True, True), (True, False)],
)
def test_compile_with_a_fused_activation_has_no_graph_break(
    training: bool, memory_efficient: bool
) -> None:
    torch._dynamo.reset()
    model, x = _pair("conv2d", activation="elu", memory_efficient=memory_efficient)
    model.train(training)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_compiled, y_eager = compiled(x_compiled), eager(x_eager)
    torch.testing.assert_close(y_compiled, y_eager, **TOL)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var, **TOL)
    if training:  # the gradients too, memory-efficient or not
        y_compiled.square().sum().backward()
        y_eager.square().sum().backward()
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, **TOL)
