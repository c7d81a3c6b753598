"""fold: exact outputs, an honest report, the original untouched, exportable results."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnkit
from bnkit.tools import ChannelAffine, FoldReport, fold
from tests.helpers import relative_error
from tests.tools.models import (
    ScaledBatchNorm2d,
    batch_norm_types,
    bnkit_bn,
    randomize,
    resnet,
    torch_bn,
)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def _check_exact(folded: nn.Module, model: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        expected = model.eval()(x)
        actual = folded(x)
    assert actual.dtype == expected.dtype
    assert relative_error(actual.numpy(), expected.numpy()) < TOLERANCE[x.dtype]


@pytest.mark.parametrize("bn", [torch_bn, bnkit_bn], ids=["torch", "bnkit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet_folds_completely_and_exactly(bn: object, dtype: torch.dtype) -> None:
    model = resnet(bn, dtype=dtype)
    folded, report = fold(model, return_report=True)
    assert report.method == "fx"
    assert len(report.folded) == len(report) == 8
    assert report["layer2.shortcut.1"].target == "layer2.shortcut.0"
    assert report["head_bn"].action == "into_consumer"  # flatten -> BN1d -> Linear
    assert report["head_bn"].target == "fc1"
    assert report["fc1_bn"].action == "into_producer"
    assert batch_norm_types(folded) == []
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())
    assert not folded.training
    assert folded.fold_report is report
    _check_exact(folded, model, torch.randn(5, 3, 8, 8, dtype=dtype))


def test_fold_leaves_the_original_untouched() -> None:
    model = resnet().train()
    model.layer1.bn2.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    parameters = list(model.parameters())
    folded = fold(model, example_input=torch.randn(2, 3, 8, 8))
    assert folded is not model
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert list(model.parameters()) == parameters
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert batch_norm_types(model).count("BatchNorm2d") == 6


class Mixed(nn.Module):
    """One batch norm layer per case of the report."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)  # after a padded conv: folds into it
        self.bn2 = nn.BatchNorm2d(4)  # before a zero-padded conv: cannot fold into it
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)  # conv3's output has a second user
        self.bn4 = nn.BatchNorm2d(4)  # before an unpadded conv: folds into it
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.bn5 = nn.BatchNorm2d(4)  # before a reflect-padded conv: folds into it
        self.conv5 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.shared = nn.BatchNorm2d(4)  # called twice
        self.no_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.head = nn.BatchNorm1d(4)  # BN -> Linear
        self.fc = nn.Linear(4, 2)
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.conv2(self.bn2(F.relu(x)))
        y = self.conv3(x)
        x = self.bn3(y) + y
        x = self.conv4(self.bn4(F.relu(x)))
        x = self.conv5(self.bn5(torch.tanh(x)))
        x = self.no_stats(self.shared(self.shared(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.head(x))


def test_report_says_what_was_folded_and_why_not() -> None:
    model = randomize(Mixed())
    folded, report = fold(model, return_report=True)
    actions = {entry.name: (entry.action, entry.target) for entry in report}
    assert actions == {
        "bn1": ("into_producer", "conv1"),
        "bn2": ("affine", None),
        "bn3": ("affine", None),
        "bn4": ("into_consumer", "conv4"),
        "bn5": ("into_consumer", "conv5"),
        "shared": ("affine", None),
        "no_stats": ("kept", None),
        "head": ("into_consumer", "fc"),
        "unused": ("unused", None),
    }
    assert [e.name for e in report.folded] == ["bn1", "bn4", "bn5", "head"]
    assert "'conv2' (Conv2d) zero-pads its input" in report["bn2"].reason
    assert "not into the layer before (it is a relu() call" in report["bn2"].reason
    assert "the output of 'conv3' also goes to" in report["bn3"].reason
    assert "called at 2 places" in report["shared"].reason
    assert "track_running_stats=False" in report["no_stats"].reason
    assert str(report).startswith("fold (fx): 4 of 9 folded\n  bn1: folded into 'conv1'")
    assert "bn2: replaced by a per-channel affine: not into" in str(report)
    assert isinstance(folded.get_submodule("bn2"), ChannelAffine)
    assert isinstance(folded.get_submodule("no_stats"), nn.BatchNorm2d)
    assert len(report.not_folded) == 5
    with pytest.raises(KeyError, match="no batch norm layer named 'nope'"):
        report["nope"]
    _check_exact(folded, model, torch.randn(4, 3, 6, 6))


def test_a_zero_shift_folds_even_into_a_padded_conv() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 2.0)  # running_mean 0 and beta 0: shift is 0
    folded, report = fold(model, return_report=True)
    assert report["1"].action == "into_consumer"
    _check_exact(folded, model, torch.randn(2, 3, 5, 5))


def test_bn_after_bn_both_fold_into_the_conv() -> None:
    model = randomize(nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)))
    folded, report = fold(model, return_report=True)
    assert [(e.action, e.target) for e in report] == [("into_producer", "0")] * 2
    _check_exact(folded, model, torch.randn(4, 2, 7))


def test_extras_that_change_eval_outputs_are_kept() -> None:
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 1), ScaledBatchNorm2d(3, output_power=2)))
    folded, report = fold(model, return_report=True)
    assert report["1"].action == "kept"
    assert "output_power=2 changes its eval output" in report["1"].reason
    _check_exact(folded, model, torch.randn(2, 2, 3, 3))


HAS_ACTIVATION = "activation" in inspect.signature(bnkit.nn.BatchNormNd.__init__).parameters


@pytest.mark.skipif(not HAS_ACTIVATION, reason="bnkit layers without activation=")
@pytest.mark.parametrize(
    ("activation", "param", "module"),
    [("relu", None, "ReLU()"), ("leaky_relu", 0.2, "LeakyReLU"), ("elu", None, "ELU")],
)
def test_a_fused_activation_follows_the_folded_layer(
    activation: str, param: float | None, module: str
) -> None:
    def bn(channels: int) -> nn.Module:
        return bnkit.BatchNorm2d(channels, activation=activation, activation_param=param)

    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn(3), nn.Conv2d(3, 3, 1)))
    folded, report = fold(model, return_report=True)
    assert report["1"].action == "into_producer"
    assert f"then its activation as {module}" in report["1"].reason
    _check_exact(folded, model, torch.randn(2, 2, 5, 5))
    # no layer before: an affine map and the activation (not into the layer after)
    model = randomize(nn.Sequential(nn.Tanh(), bn(2), nn.Conv2d(2, 3, 1)))
    folded, report = fold(model, return_report=True)
    assert report["1"].action == "affine"
    assert "its activation comes between it and the next layer" in report["1"].reason
    _check_exact(folded, model, torch.randn(2, 2, 5, 5))
    # module order, when the forward cannot be traced
    untraceable = _Untraceable(
        nn.Sequential(nn.Conv1d(2, 3, 1), bnkit.BatchNorm1d(3, activation=activation))
    )
    randomize(untraceable)
    folded, report = fold(untraceable, return_report=True)
    assert (report.method, report["body.1"].action) == ("module order", "into_producer")
    _check_exact(folded, untraceable, torch.randn(2, 2, 5))


class _Untraceable(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) if x.sum() > 0 else self.body(-x)


def test_eval_neutral_extras_fold() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4),
        bnkit.BatchNorm1d(4, frozen=True, running_var_estimator="biased", single_sample="running"),
    )
    randomize(model)
    folded, report = fold(model, return_report=True)
    assert report["1"].action == "into_producer"
    _check_exact(folded, model, torch.randn(5, 3))


def test_example_input_keeps_a_linear_on_3d_inputs_unfolded() -> None:
    # Linear(8, 4) on (N, 4, 8) gives (N, 4, 4): BatchNorm1d(4) normalizes dimension 1, the
    # Linear's features are the last one. Same sizes, different channels: only the shapes
    # tell, so example_input is needed.
    model = randomize(nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)))
    x = torch.randn(3, 4, 8)
    folded, report = fold(model, example_input=x, return_report=True)
    assert report["1"].action == "affine"
    assert "last dimension of a 3D tensor" in report["1"].reason
    _check_exact(folded, model, x)


def test_untraceable_forward_falls_back_to_module_order() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3, bias=False),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.BatchNorm2d(4),
                nn.Conv2d(4, 4, 1),
                nn.BatchNorm2d(4),
                nn.BatchNorm2d(4),
            )
            self.padded = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1))
            self.extra = nn.BatchNorm2d(2)
            self.no_stats = nn.BatchNorm2d(2, track_running_stats=False)

        def forward(self, x: Tensor) -> Tensor:
            x = self.features(x)
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = x * 1.0
            return self.no_stats(self.extra(self.padded(x)))

    model = randomize(Untraceable())
    folded, report = fold(model, return_report=True)
    assert report.method == "module order"
    assert report.trace_error is not None
    assert "TraceError" in report.trace_error
    assert [(e.name, e.action, e.target) for e in report] == [
        ("features.1", "into_producer", "features.0"),
        ("features.3", "into_consumer", "features.4"),
        ("features.5", "into_producer", "features.4"),
        ("features.6", "into_producer", "features.4"),
        ("padded.1", "affine", None),
        ("extra", "affine", None),
        ("no_stats", "kept", None),
    ]
    assert "zero-pads" in report["padded.1"].reason
    assert "not inside an nn.Sequential" in report["extra"].reason
    assert type(folded) is Untraceable
    assert "could not trace" in str(report)
    _check_exact(folded, model, torch.randn(2, 3, 7, 7))


def test_a_batch_norm_model_becomes_an_affine_map() -> None:
    model = randomize(nn.BatchNorm1d(3))
    folded, report = fold(model, return_report=True)
    assert isinstance(folded, ChannelAffine)
    assert report[""].action == "affine"
    assert str(report[""]).startswith("<root>: replaced")
    _check_exact(folded, model, torch.randn(4, 3))


def test_fold_returns_the_model_with_its_report_attached() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    folded = fold(model)
    assert isinstance(folded.fold_report, FoldReport)
    assert folded.fold_report.folded[0].name == "1"


# --- random conv configurations -------------------------------------------------------


@st.composite
def conv_configs(draw: st.DrawFn, *, transposed: bool) -> dict[str, object]:
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    config: dict[str, object] = {
        "dims": dims,
        "in_channels": groups * draw(st.integers(1, 3)),
        "out_channels": groups * draw(st.integers(1, 3)),
        "kernel_size": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "padding": draw(st.integers(0, 1)),
        "dilation": draw(st.integers(1, 2)),
        "groups": groups,
        "bias": draw(st.booleans()),
    }
    if not transposed:
        config["padding_mode"] = draw(
            st.sampled_from(["zeros", "reflect", "replicate", "circular"])
        )
    return config


def _conv(config: dict[str, object], *, transposed: bool, dtype: torch.dtype) -> nn.Module:
    kwargs = dict(config)
    dims = kwargs.pop("dims")
    kind = {
        (False, 1): nn.Conv1d,
        (False, 2): nn.Conv2d,
        (False, 3): nn.Conv3d,
        (True, 1): nn.ConvTranspose1d,
        (True, 2): nn.ConvTranspose2d,
        (True, 3): nn.ConvTranspose3d,
    }[(transposed, dims)]
    return kind(**kwargs).to(dtype)


def _bn(dims: object, channels: int, dtype: torch.dtype) -> _BatchNorm:
    layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)
    return layer.to(dtype)


def _input(config: dict[str, object], channels: int, dtype: torch.dtype) -> Tensor:
    dims = int(config["dims"])
    size = 6  # > the widest dilated kernel (5)
    return torch.randn(2, channels, *([size] * dims), dtype=dtype)


@given(
    config=conv_configs(transposed=False) | conv_configs(transposed=True),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_conv_then_bn_folds_exactly(
    config: dict[str, object], dtype: torch.dtype, seed: int
) -> None:
    torch.manual_seed(seed)
    transposed = "padding_mode" not in config
    conv = _conv(config, transposed=transposed, dtype=dtype)
    model = randomize(nn.Sequential(conv, _bn(config["dims"], conv.out_channels, dtype)), seed)
    folded, report = fold(model, return_report=True)
    assert report["1"].action == "into_producer"
    _check_exact(folded, model, _input(config, conv.in_channels, dtype))


@given(
    config=conv_configs(transposed=False),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_bn_then_conv_folds_exactly_where_there_is_no_zero_padding(
    config: dict[str, object], dtype: torch.dtype, seed: int
) -> None:
    torch.manual_seed(seed)
    conv = _conv(config, transposed=False, dtype=dtype)
    bn = _bn(config["dims"], conv.in_channels, dtype)
    model = randomize(nn.Sequential(nn.Tanh(), bn, conv), seed)
    folded, report = fold(model, return_report=True)
    zero_padded = config["padding"] != 0 and config["padding_mode"] == "zeros"
    assert report["1"].action == ("affine" if zero_padded else "into_consumer")
    _check_exact(folded, model, _input(config, conv.in_channels, dtype))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_paddings(padding: str) -> None:
    for kernel, foldable in ((1, True), (3, padding == "valid")):
        model = randomize(
            nn.Sequential(nn.ReLU(), nn.BatchNorm2d(2), nn.Conv2d(2, 2, kernel, padding=padding))
        )
        folded, report = fold(model, return_report=True)
        assert report["1"].folded is foldable
        _check_exact(folded, model, torch.randn(2, 2, 5, 5))


# --- export ----------------------------------------------------------------------------


@pytest.mark.slow
def test_folded_resnet_exports_with_torch_export() -> None:
    model = resnet()
    folded = fold(model)
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(folded, (x,))
    _check_exact(program.module(), model, x)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("batch_norm" in op for op in ops)


@pytest.mark.slow
def test_folded_resnet_exports_to_onnx() -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = resnet()
    folded = fold(model)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notices
        program = torch.onnx.export(folded, (x,), dynamo=True, verbose=False)
    assert program is not None
    proto = program.model_proto
    assert "BatchNormalization" not in {node.op_type for node in proto.graph.node}
    session = ReferenceEvaluator(proto)
    (output,) = session.run(None, {proto.graph.input[0].name: x.numpy()})
    expected = model.eval()(x).detach().numpy()
    assert relative_error(output, expected) < 1e-5


def test_bn_affine_module() -> None:
    affine = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0]))
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(
        affine(x),
        x * torch.tensor([2.0, 3.0]).view(1, 2, 1) + torch.tensor([1.0, -1.0]).view(1, 2, 1),
    )
    assert set(affine.state_dict()) == {"scale", "shift"}
    assert repr(affine) == "ChannelAffine(2)"
    assert copy.deepcopy(affine)(x).shape == x.shape


def test_a_folded_model_folds_again_as_it_is() -> None:
    model = randomize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4), nn.ReLU()))
    once = fold(model)
    twice, report = fold(once, return_report=True)
    assert (report.method, len(report)) == ("fx", 0)
    assert isinstance(twice.get_submodule("1"), ChannelAffine)  # traced as one call
    _check_exact(twice, model, torch.randn(3, 4))
