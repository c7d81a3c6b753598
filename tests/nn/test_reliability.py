"""Regression tests: silent wrong results and crashes found by an adversarial pass.

Each test names the defect it guards against; every one failed before its fix.
"""

from __future__ import annotations

import pytest
import torch

import bnkit

DTYPES_TOL = [(torch.float32, 1e-4), (torch.float64, 1e-10)]


def _grads(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    assert x.grad is not None
    return [x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]


@pytest.mark.parametrize(("dtype", "tol"), DTYPES_TOL)
@pytest.mark.parametrize("shape", [(1000, 2), (50, 2, 20)])
def test_saturated_memory_efficient_elu_has_exact_finite_gradients(
    dtype: torch.dtype, tol: float, shape: tuple[int, ...]
) -> None:
    # A pre-activation so low that elu's output rounds to exactly -alpha: inverting it
    # gave log1p(-1) = -inf, and 0 * -inf made the channel's gradients NaN.
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype)
    x.view(-1)[0] = -1e4
    layers = []
    for memory_efficient in (True, False):
        layer = bnkit.BatchNorm1d(2, activation="elu", memory_efficient=memory_efficient)
        layer = layer.to(dtype)
        with torch.no_grad():
            layer.weight.fill_(3.0)
        layers.append(layer)
    reference = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.ELU()).to(dtype)
    with torch.no_grad():
        reference[0].weight.fill_(3.0)
    efficient, exact, expected = (_grads(layer, x) for layer in (*layers, reference))
    for got, want, oracle in zip(efficient, exact, expected, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(got, oracle, rtol=tol * 10, atol=tol * 10)


def test_saturated_elu_in_bfloat16_is_finite() -> None:
    # bfloat16 saturates from z of about -5.5: a bias of -3 on N(0, 1) data suffices.
    torch.manual_seed(0)
    layer = bnkit.BatchNorm2d(3, activation="elu")
    with torch.no_grad():
        layer.bias.fill_(-3.0)
    x = torch.randn(8, 3, 6, 6).to(torch.bfloat16).requires_grad_()
    layer(x).float().sum().backward()
    assert x.grad is not None
    assert layer.weight.grad is not None
    assert torch.isfinite(x.grad.float()).all()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("how", ["eval", "frozen", "single_sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elu_without_batch_statistics_has_finite_gradients_for_large_inputs(
    how: str, dtype: torch.dtype
) -> None:
    # torch.where(z > 0, z, expm1(z)) overflowed in the branch not taken (z > 88.7 in
    # float32) and back-propagated 0 * inf = NaN.
    layer = bnkit.BatchNorm1d(2, activation="elu", single_sample="running").to(dtype)
    x = torch.tensor([[1e3, -1.0]], dtype=dtype)
    if how == "eval":
        layer.eval()
        x = x.repeat(4, 1)
    elif how == "frozen":
        layer.freeze()
    x.requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None
    scale = 1 / torch.sqrt(torch.tensor(1 + layer.eps, dtype=dtype))  # running var 1
    slope = torch.stack([torch.ones_like(scale), torch.exp(-scale)])  # elu' at z = 1e3, -1
    torch.testing.assert_close(x.grad[0], slope * scale)


@pytest.mark.parametrize("shape", [(40, 3, 50), (600, 3), (8, 3, 10, 10)])
def test_mask_bytes_other_than_one_count_once(shape: tuple[int, ...]) -> None:
    # A bool tensor viewing bytes of 2 (uint8 data viewed as bool) was counted twice per
    # position by the C loops' count of valid values.
    torch.manual_seed(0)
    x = torch.randn(*shape)
    raw = torch.randint(0, 2, shape[:1] + shape[2:], dtype=torch.uint8) * 2
    raw.view(-1)[0] = 2
    layer = bnkit.BatchNorm1d if len(shape) < 4 else bnkit.BatchNorm2d
    odd, plain = layer(3), layer(3)
    odd_out = odd(x, raw.view(torch.bool))
    plain_out = plain(x, raw != 0)
    torch.testing.assert_close(odd_out, plain_out, rtol=0, atol=0)
    torch.testing.assert_close(odd.running_var, plain.running_var, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (32, 16, 8, 8), (64, 8)])
@pytest.mark.parametrize("create_graph", [False, True])
def test_eval_backward_after_changing_running_stats_raises_as_torch(
    shape: tuple[int, ...], create_graph: bool
) -> None:
    # The express paths read the running statistics at backward time: a double backward
    # after an in-place change used the new values (off by 7.4) where torch raises.
    channels = shape[1]
    for module in (torch.nn, bnkit):
        layer = getattr(module, "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d")(channels)
        layer.eval()
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        with torch.no_grad():
            layer.running_var.fill_(0.01)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y.pow(2).sum(), x, create_graph=create_graph)


@pytest.mark.parametrize("pattern", ["relu_inplace", "add_inplace"])
def test_large_outputs_can_be_changed_in_place(pattern: str) -> None:
    # Outputs of 16 MB and more were views made inside a custom autograd Function, so
    # ReLU(inplace=True) or ResNet's `out += identity` after the layer raised.
    torch.manual_seed(0)
    x = torch.randn(16, 64, 64, 64)  # 16 MiB of float32
    identity = torch.randn_like(x)

    def step(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_()
        out = layer(xi)
        if pattern == "relu_inplace":
            out = torch.nn.functional.relu(out, inplace=True)
        else:
            out += identity
        out.square().mean().backward()
        assert xi.grad is not None
        return out.detach(), xi.grad

    got_out, got_grad = step(bnkit.BatchNorm2d(64))
    want_out, want_grad = step(torch.nn.BatchNorm2d(64))
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("training", [True, False])
def test_meta_tensors_in_train_and_eval(training: bool) -> None:
    # The non-finite monitor called .item() on the meta tensor saying whether the batch
    # was recorded; meta tensors are how large models are built before loading weights.
    layer = bnkit.BatchNorm2d(3, device="meta").train(training)
    out = layer(torch.empty(2, 3, 4, 4, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (2, 3, 4, 4)
