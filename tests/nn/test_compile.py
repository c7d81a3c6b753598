"""torch.compile: the same results as eager, with no graph breaks."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch

import bnkit.nn as bnn

# torch._dynamo instantiates torch.autograd.Function while tracing any custom autograd
# Function, which emits a DeprecationWarning from inside torch (pytorch/pytorch#128439,
# fixed upstream by #186421). Warnings are errors in this test run, so allow that one.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*should not be instantiated.*:DeprecationWarning"),
    pytest.mark.slow,  # torch.compile takes seconds per model
]


def _model(**options: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        bnn.BatchNorm2d(6, **options),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 5 * 5, 8),
        bnn.BatchNorm1d(8, **options),
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": None, "running_var_estimator": "biased"}, {"skip_nonfinite": False}],
    ids=["default", "cumulative-biased", "no-skip"],
)
def test_compiled_model_matches_eager(options: dict[str, Any]) -> None:
    torch._dynamo.reset()
    eager = _model(**options)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        training = step < 2
        eager.train(training)
        compiled_module.train(training)
        x = torch.randn(4, 3, 5, 5, generator=g)
        y_eager, y_compiled = eager(x), compiled(x)
        assert torch.allclose(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
        # Not y.square().sum(): after a training-mode BN with beta = 0 that sum is N * C
        # whatever the input, so every gradient before it would be rounding noise.
        target = torch.randn(y_eager.shape, generator=g)
        (y_eager - target).square().sum().backward()
        (y_compiled - target).square().sum().backward()
        # The biases before a training-mode BN have a zero gradient up to rounding, which
        # differs between kernels: differences are measured against the largest gradient.
        scale = max(1.0, *(float(p.grad.abs().max()) for p in eager.parameters()))
        for (name, p_eager), p_compiled in zip(
            eager.named_parameters(), compiled_module.parameters(), strict=True
        ):
            close = torch.allclose(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5 * scale)
            assert close, name
        for (name, b_eager), b_compiled in zip(
            eager.named_buffers(), compiled_module.buffers(), strict=True
        ):
            assert torch.allclose(b_compiled.double(), b_eager.double(), rtol=1e-5, atol=1e-6), name
    assert int(compiled_module[1].num_batches_tracked) == 2


def test_compiled_skip_nonfinite_leaves_stats_without_graph_break() -> None:
    torch._dynamo.reset()
    layer = bnn.BatchNorm1d(3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(5, 3))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(5, 3)
    bad[0, 0] = float("nan")
    compiled(bad)  # no warning under compile, but the statistics are still protected
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_compiling_before_any_eager_call_traces_without_graph_breaks() -> None:
    """A process whose first batch norm call is compiled (fullgraph=True) must not trace
    the loading of the native code (a lock and an extension's init, which Dynamo cannot
    trace): the express path declines compiled calls before it loads anything."""
    script = """
import warnings
import torch
import bnkit
from bnkit.kernels import native
warnings.filterwarnings("ignore", ".*should not be instantiated.*", DeprecationWarning)
assert native.load_error() is None and native.build_seconds() is None  # nothing loaded yet
layer = bnkit.BatchNorm2d(4)
compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
x = torch.randn(8, 4, 16, 16)
torch.testing.assert_close(compiled(x), bnkit.BatchNorm2d(4)(x))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
