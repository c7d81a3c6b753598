"""lint: each finding on a model that has it, none on a clean one, no side effects."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import bnkit
from bnkit.tools import CHECKS, Finding, lint
from tests.tools.models import ResNet, resnet, torch_bn


def _codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.path, f.code) for f in findings]


def test_a_clean_model_has_no_findings() -> None:
    model = resnet().eval()
    assert lint(model, torch.randn(16, 3, 8, 8)) == []
    assert lint(model.train()) == []


def test_redundant_bias_found_through_the_traced_graph() -> None:
    class WithBias(ResNet):
        def __init__(self) -> None:
            super().__init__(torch_bn)
            self.layer1.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)  # feeds bn2 only
            self.fc1 = nn.Linear(16, 16, bias=True)  # -> fc1_bn

    model = WithBias().eval()
    findings = lint(model, torch.randn(16, 3, 8, 8))
    assert _codes(findings) == [("layer1.conv2", "redundant-bias"), ("fc1", "redundant-bias")]
    assert "feeds batch norm 'layer1.bn2'" in findings[0].problem
    assert findings[0].fix == "construct 'layer1.conv2' with bias=False"
    # fc2 has a bias too, but feeds no batch norm


def test_a_bias_whose_output_is_used_elsewhere_is_not_redundant() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    assert lint(Residual()) == []


def test_redundant_bias_found_by_module_order_when_tracing_fails() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU())

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) if x.sum() > 0 else -self.body(x)

    assert _codes(lint(Untraceable())) == [("body.0", "redundant-bias")]


def test_a_linear_on_3d_input_is_not_a_channel_bias() -> None:
    # Linear(8, 4) on (N, 4, 8): its bias is per last dimension, batch norm per dimension 1
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    assert _codes(lint(model, torch.randn(16, 4, 8))) == []
    assert _codes(lint(model)) == [("0", "redundant-bias")]  # without shapes: assumed (N, C)


def test_small_batches() -> None:
    model = resnet()
    findings = lint(model, torch.randn(2, 3, 4, 4))
    small = [f for f in findings if f.code == "small-batch"]
    # layer2 halves 4x4 to 2x2: 2 * 2 * 2 = 8 values, enough; the heads see 2 values
    assert [f.path for f in small] == ["head_bn", "fc1_bn"]
    assert (
        small[0].problem
        == "a training batch gives it 2 values per channel (input of shape (2, 16))"
    )
    one = lint(model, torch.randn(1, 3, 4, 4))
    assert "1 value per channel" in next(f for f in one if f.path == "head_bn").problem
    assert [f.path for f in lint(model, torch.randn(2, 3, 4, 4), min_values_per_channel=9)][:1] == [
        "layer2.bn1"
    ]


def test_frozen_layers_need_no_batch() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bnkit.BatchNorm1d(4, frozen=True))
    assert lint(model, torch.randn(2, 3)) == []


def test_lint_changes_nothing() -> None:
    model = resnet().train()
    model.layer1.bn1.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    lint(model, torch.randn(4, 3, 8, 8))
    assert {n: m.training for n, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.999])
def test_keras_momentum(momentum: float) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=momentum))
    (finding,) = lint(model)
    assert (finding.path, finding.code) == ("0", "keras-momentum")
    assert finding.fix == f"use momentum={round(1 - momentum, 6)}"


@pytest.mark.parametrize("momentum", [None, 0.0, 0.01, 0.1, 0.5, 1.0])
def test_torch_momentum_is_fine(momentum: float | None) -> None:
    assert lint(nn.Sequential(nn.BatchNorm1d(3, momentum=momentum))) == []


def test_train_mode_at_inference() -> None:
    model = resnet().eval()
    model.layer2.bn2.train()
    assert _codes(lint(model)) == [("layer2.bn2", "train-mode-at-inference")]
    model.layer2.bn2 = bnkit.BatchNorm2d(16, frozen=True).train()  # frozen: harmless
    assert lint(model) == []


def test_no_running_stats() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert _codes(lint(model)) == [("0", "no-running-stats")]


@pytest.mark.parametrize(
    ("buffer", "value", "text"),
    [
        ("running_mean", math.nan, "running_mean is not finite"),
        ("running_var", math.inf, "running_var is not finite"),
        ("running_var", -1.0, "running_var is negative"),
    ],
)
def test_nonfinite_stats(buffer: str, value: float, text: str) -> None:
    model = resnet().eval()
    getattr(model.layer1.bn1, buffer)[2] = value
    (finding,) = lint(model)
    assert (finding.path, finding.code, finding.problem) == ("layer1.bn1", "nonfinite-stats", text)


def test_findings_read_as_one_line() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.99))
    findings = lint(model)
    assert sorted({f.code for f in findings}) == ["keras-momentum", "redundant-bias"]
    for finding in findings:
        text = str(finding)
        assert "\n" not in text
        assert text.startswith(f"{finding.path}: [{finding.code}] {finding.problem}. ")
        assert text.endswith(f"Fix: {finding.fix}.")
        assert finding.code in CHECKS
    assert str(lint(nn.BatchNorm1d(2, momentum=0.9))[0]).startswith("<model>: [keras-momentum]")
