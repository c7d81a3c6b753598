"""Batch norm fused with an activation: same function as BN then the activation module,
exact gradients whether the backward works from the output or the input, and the memory
it saves for the backward pass (deterministic byte counts, not timings)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import bnkit
from bnkit import errors
from bnkit.bench.memory import bn_act, saved_bytes, stack

TORCH_ACTIVATIONS = {
    "relu": lambda: torch.nn.ReLU(),
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.01),
    "elu": lambda: torch.nn.ELU(),
    "identity": lambda: torch.nn.Identity(),
}
ACTIVATIONS = list(TORCH_ACTIVATIONS)


def twins(
    activation: str, memory_efficient: bool, dtype: torch.dtype, rank: int = 4, **extras: Any
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """bnkit's fused layer, and bnkit's plain layer followed by torch's activation module."""
    cls = {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d}[rank]
    torch.manual_seed(0)
    fused = cls(4, activation=activation, memory_efficient=memory_efficient, **extras)
    plain = cls(4, **extras)
    fused, plain = fused.to(dtype), plain.to(dtype)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5).mul_(torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype))
        fused.bias.uniform_(-1.0, 1.0)
    plain.load_state_dict(fused.state_dict())
    return fused, torch.nn.Sequential(plain, TORCH_ACTIVATIONS[activation]())


def compare(
    fused: torch.nn.Module,
    unfused: torch.nn.Module,
    x: torch.Tensor,
    tolerance: float,
    **kwargs: Any,
) -> None:
    a, b = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    y_fused = fused(a, **kwargs)
    y_plain = unfused[0](b, **kwargs)
    y_plain = unfused[1](y_plain)
    dy = torch.randn_like(y_plain)
    y_fused.backward(dy)
    y_plain.backward(dy)
    torch.testing.assert_close(y_fused, y_plain, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(a.grad, b.grad, rtol=tolerance, atol=tolerance)
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            getattr(fused, name).grad,
            getattr(unfused[0], name).grad,
            rtol=tolerance,
            atol=tolerance,
        )
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(unfused[0], name))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["efficient", "plain"])
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
def test_fused_equals_batch_norm_then_activation(
    activation: str, memory_efficient: bool, dtype: torch.dtype, tolerance: float
) -> None:
    fused, unfused = twins(activation, memory_efficient, dtype)
    for step in range(3):
        x = 2.0 + 3.0 * torch.randn(8, 4, 5, 5, dtype=dtype)
        fused.zero_grad()
        unfused.zero_grad()
        compare(fused, unfused, x, tolerance)
        del step
    fused.eval()
    unfused.eval()
    x = torch.randn(2, 4, 5, 5, dtype=dtype)
    torch.testing.assert_close(fused(x), unfused(x), rtol=tolerance, atol=tolerance)


def test_fused_equals_torch_batch_norm_and_relu() -> None:
    """Against torch's own layers too: BatchNorm2d then ReLU, float32, several steps."""
    torch.manual_seed(0)
    ours = bnkit.BatchNorm2d(6, activation="relu")
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(6), torch.nn.ReLU())
    theirs[0].load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(4, 6, 7, 7)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(a), theirs(b)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, theirs[0].running_var)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["efficient", "plain"])
@pytest.mark.slow
def test_gradcheck(activation: str, memory_efficient: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.7, -1.2, 1.5], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, -0.4, 0.3], dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return bnkit.functional.batch_norm(
            x,
            None,
            None,
            weight,
            bias,
            True,
            activation=activation,
            memory_efficient=memory_efficient,
        )

    assert torch.autograd.gradcheck(f, (x, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "relu"])
def test_gamma_zero_keeps_the_input_and_stays_exact(activation: str) -> None:
    """gamma = 0 (or tiny next to beta) cannot be inverted: the call keeps its input."""
    fused, unfused = twins(activation, True, torch.float64)
    with torch.no_grad():
        for layer in (fused, unfused[0]):
            layer.weight[1] = 0.0
            layer.weight[2] = 1e-5  # |beta| / |gamma| > 1000 unless beta is tiny
            layer.bias[2] = 0.5
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    compare(fused, unfused, x, 1e-12)
    # what it saved: the input (and the output for the next layer), not the output alone
    probe = x.clone().requires_grad_(True)
    assert saved_bytes(lambda: fused(probe)) >= x.numel() * x.element_size()


def test_fused_activation_composes_with_ghost_mask_and_renorm() -> None:
    options = {"ghost_batch_size": 3, "renorm": bnkit.Renorm(2.0, 1.0, 0, 0, 0)}
    fused, unfused = twins("leaky_relu", True, torch.float64, rank=3, **options)
    with torch.no_grad():
        for layer in (fused, unfused[0]):
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(2.0)
    x = torch.randn(7, 4, 6, dtype=torch.float64)
    mask = torch.rand(7, 6) > 0.3
    mask[:, :2] = True
    compare(fused, unfused, x, 1e-12, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_and_channels_last(dtype: torch.dtype) -> None:
    layer = bnkit.BatchNorm2d(4, activation="leaky_relu")
    reference = copy.deepcopy(layer)
    x = torch.randn(4, 4, 6, 6).to(memory_format=torch.channels_last)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), reference(x), rtol=0, atol=0.05)
    y.float().sum().backward()
    assert layer.weight.grad is not None


def test_memory_efficient_double_backward_is_refused_with_a_clear_error() -> None:
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = bnkit.BatchNorm1d(3, activation="elu").double()(x)
    with pytest.raises(RuntimeError, match="memory_efficient=True does not keep"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu"])
@pytest.mark.parametrize("ghosts", [None, 3])
def test_double_backward_and_func_grad_through_a_fused_activation(
    activation: str, ghosts: int | None
) -> None:
    """With its input kept (memory_efficient=False, or relu) a fused layer has a double
    backward (gradgradcheck) and the Hessian of torch's BN + activation pair; under
    torch.func.grad, which runs backward passes under autograd, the layer keeps its input
    whatever memory_efficient says."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    kwargs = {"ghost_batch_size": ghosts} if ghosts else {}
    layer = bnkit.BatchNorm1d(
        3, activation=activation, memory_efficient=False, track_running_stats=False,
        dtype=torch.float64, **kwargs,
    )  # fmt: skip
    torch.nn.init.normal_(layer.weight, generator=generator)
    torch.nn.init.normal_(layer.bias, generator=generator)
    assert torch.autograd.gradgradcheck(layer, (x,))
    if ghosts:
        return
    pair = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64),
        {"relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(0.01), "elu": torch.nn.ELU()}[
            activation
        ],
    )
    pair[0].load_state_dict(layer.state_dict(), strict=False)
    cube = lambda module: lambda v: module(v).pow(3).sum()  # noqa: E731
    torch.testing.assert_close(
        torch.func.hessian(cube(layer))(x.detach()), torch.func.hessian(cube(pair))(x.detach())
    )
    lean = bnkit.BatchNorm1d(3, activation=activation, track_running_stats=False).double()
    lean.load_state_dict(layer.state_dict())
    torch.testing.assert_close(
        torch.func.grad(cube(lean))(x.detach()), torch.func.grad(cube(pair))(x.detach())
    )


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"activation": "gelu"}, "unknown activation='gelu'; expected None or one of"),
        ({"activation": "leaky_relu", "activation_param": 0.0}, "negative slope of leaky_relu"),
        ({"activation": "elu", "activation_param": -1.0}, "alpha of elu"),
        ({"activation": "relu", "activation_param": 0.1}, "takes no activation_param"),
        ({"activation_param": 0.1}, "needs an activation"),
        ({"activation": "relu", "memory_efficient": "yes"}, "memory_efficient to be True"),
    ],
)
def test_bad_activation_options(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(errors.ConfigError, match=words) as raised:
        bnkit.BatchNorm2d(8, **kwargs)
    assert "BatchNorm2d(8)" in str(raised.value)


# ------------------------------------------------------------------- saved-for-backward bytes


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu"])
def test_layer_saves_at_most_half_of_torch(activation: str) -> None:
    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    tensor = x.numel() * x.element_size()
    theirs = saved_bytes(lambda: bn_act("torch", activation, 16)(x))
    ours = saved_bytes(lambda: bn_act("bnkit", activation, 16)(x))
    per_channel = 16 * 8 * 8  # a few (C,) vectors: statistics, parameters
    assert theirs >= 2 * tensor  # torch keeps the input and the activation's tensor
    assert ours <= theirs / 2 + per_channel


@pytest.mark.slow
def test_leaky_relu_stack_saves_at_most_sixty_percent_of_torch() -> None:
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    theirs = saved_bytes(lambda: stack("torch", "leaky_relu", 16)(x))
    ours = saved_bytes(lambda: stack("bnkit", "leaky_relu", 16)(x))
    assert ours <= 0.6 * theirs
    # and the same function: outputs to 1e-5, gradients to 1e-4 (float32)
    ours_model, theirs_model = stack("bnkit", "leaky_relu", 16), stack("torch", "leaky_relu", 16)
    a, b = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    ya, yb = ours_model(a), theirs_model(b)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_relu_stack_saves_no_less_than_its_outputs() -> None:
    """ReLU is not invertible: within a stack the fused relu keeps z next to the y the
    following convolution keeps, so it saves less than torch's pair only by what torch's
    last ReLU output costs. This pins the documented limitation."""
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    tensor = x.numel() * x.element_size()
    theirs = saved_bytes(lambda: stack("torch", "relu", 16)(x))
    ours = saved_bytes(lambda: stack("bnkit", "relu", 16)(x))
    assert theirs - tensor <= ours <= theirs
