""":class:`TritonKernel`: the :class:`bnkit.kernels.Kernel` protocol on the Triton
primitives, with autograd functions that mirror :mod:`bnkit.kernels.cpu`'s."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnkit.distributed import all_reduce_sum
from bnkit.kernels import activation as act
from bnkit.kernels import portable
from bnkit.kernels.gpu import primitives as prim
from bnkit.kernels.stats import BatchStats, compute_dtype, input_gradient_coefficients

__all__ = ["KERNEL", "TritonKernel", "supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def supports(x: Tensor, mask: Tensor | None = None) -> bool:
    """Whether the Triton kernels take x (and mask): a plain, non-empty (N, C, *) tensor
    of a floating dtype on a CUDA device (on the CPU under ``TRITON_INTERPRET=1``), not
    inside a ``torch.func`` transform; a mask of shape (N, *spatial) on the same device."""
    if type(x) not in _PLAIN_TYPES or x.dtype not in _DTYPES or x.layout != torch.strided:
        return False
    if x.dim() < 2 or x.numel() == 0 or _is_functorch_wrapped(x):
        return False
    if x.device.type != ("cpu" if prim.interpreting() else "cuda"):
        return False
    if mask is None:
        return True
    return (
        type(mask) in _PLAIN_TYPES
        and mask.device == x.device
        and mask.shape == x.shape[:1] + x.shape[2:]
        and not _is_functorch_wrapped(mask)
    )


def _parameter_gradients(
    ctx: Any, weight: Tensor | None, sum_g_x_hat: Tensor, sum_g: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """(dweight, dbias) where requested: sum(g' * x_hat) and sum(g')."""
    grad_w = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_w = sum_g_x_hat.to(weight.dtype)
    grad_b = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = sum_g.to(ctx.bias_dtype)
    return grad_w, grad_b


def _global(ctx: Any, sum_g: Tensor, sum_g_x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """The backward pass's two per-channel sums over every process of a synchronized
    layer (one collective; every process takes part, whatever it needs), for dx. The
    parameter gradients stay this process's sums, as torch's SyncBatchNorm gives them."""
    if ctx.group is None:
        return sum_g, sum_g_x_hat
    both = all_reduce_sum(torch.stack([sum_g, sum_g_x_hat]), ctx.group)
    return both[0], both[1]


class _Normalize(torch.autograd.Function):
    """Training normalization with batch statistics: forward one affine pass, backward
    one reduction pass and one dx pass (Triton). Saves what
    :class:`portable._NormalizeWithBatchStats` saves, so a double backward
    (``create_graph=True``) runs the portable backward. With a process ``group`` the
    statistics are the group's, and the backward sums its reductions over the group."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor,
        shifted_mean: Tensor,
        invstd: Tensor,
        count: Tensor,
        eps: float,
        mask: Tensor | None = None,
        group: Any = None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, shift, shifted_mean, invstd, count, mask)
        ctx.eps = eps
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        return prim.affine(x, shift, alpha, beta)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            grads = portable._NormalizeWithBatchStats.backward(ctx, grad_output)
            return (*grads[:8], None, None)
        x, weight, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        sum_g, sum_gc = prim.backward_reduce(grad_output, x, shift, shifted_mean)
        sum_g_x_hat = sum_gc * invstd
        all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = alpha * (g - mean(g) - x_hat * mean(g * x_hat)), with
            # x_hat = ((x - shift) - shifted_mean) * invstd: g * alpha + (x - shift) * k1 + k0.
            alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
            k1, k0 = input_gradient_coefficients(
                alpha, all_g, all_g_x_hat, count, invstd, shifted_mean
            )
            dx = prim.backward_input(grad_output, x, shift, alpha, k1, k0, mask=mask)
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *([None] * 7))


class _NormalizeActivate(torch.autograd.Function):
    """y = act((x - shift) * alpha + beta') with batch statistics, in one node, as
    :class:`portable._NormalizeActivate`.

    ``save_input`` True (always for relu, and where
    :func:`bnkit.kernels.activation.invertible` says the output does not give x_hat back):
    saves x and recomputes z = (x - shift) * alpha + beta' bit for bit for the slope.
    Otherwise (identity, leaky_relu, elu) saves only y and O(C) values; the backward
    recovers z = act^-1(y) and act'(z) from y, and x_hat = (z - bias) / weight, the
    division folded into per-channel coefficients.
    Double backward is not supported. With a process ``group``, as :class:`_Normalize`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor,
        shifted_mean: Tensor,
        invstd: Tensor,
        count: Tensor,
        mask: Tensor | None,
        activation: str,
        param: float | None,
        save_input: bool,
        group: Any = None,
    ) -> Tensor:
        ctx.group = group
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        y = prim.affine(x, shift, alpha, beta, activation, param)
        if not save_input:
            # The portable kernel's rule: gamma = 0, |beta| >> |gamma| or a saturated elu
            # output make x_hat = (act^-1(y) - beta) / gamma inexact; this call then keeps
            # its input. One host synchronization.
            save_input = not act.invertible(y, weight, bias, activation, param)
        if save_input:
            ctx.save_for_backward(x, weight, bias, shift, shifted_mean, invstd, count, mask)
        else:
            ctx.save_for_backward(y, weight, bias, invstd, count, mask)
        ctx.save_input = save_input
        ctx.activation, ctx.param = activation, param
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            act.refuse_double_backward()
        need_input = bool(ctx.needs_input_grad[0])
        name, param = ctx.activation, ctx.param
        dx = None
        if ctx.save_input:
            x, weight, bias, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
            alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
            sum_g, sum_gc = prim.backward_reduce(
                grad_output, x, shift, shifted_mean, name, param, False, alpha, beta
            )
            sum_g_x_hat = sum_gc * invstd
            all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
            if need_input:
                k1, k0 = input_gradient_coefficients(
                    alpha, all_g, all_g_x_hat, count, invstd, shifted_mean
                )
                dx = prim.backward_input(
                    grad_output, x, shift, alpha, k1, k0, name, param, False, mask, alpha, beta
                )
        else:
            y, weight, bias, invstd, count, mask = ctx.saved_tensors
            dtype = invstd.dtype
            scale = None if weight is None else weight.to(dtype)
            centre = torch.zeros_like(invstd) if bias is None else bias.to(dtype)
            zero = torch.zeros_like(invstd)
            # sum_gc = sum(g' * (z - bias)) = weight * sum(g' * x_hat)
            sum_g, sum_gc = prim.backward_reduce(grad_output, y, centre, zero, name, param, True)
            sum_g_x_hat = sum_gc if scale is None else sum_gc / scale
            all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
            if need_input:
                # dx = alpha * g' + x_hat * k1 + k0, x_hat * k1 = (z - bias) * (k1 / weight)
                alpha = invstd if scale is None else invstd * scale
                per_unit = None if scale is None else 1.0 / scale
                k1, k0 = input_gradient_coefficients(alpha, all_g, all_g_x_hat, count, per_unit)
                dx = prim.backward_input(
                    grad_output, y, centre, alpha, k1, k0, name, param, True, mask
                )
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *([None] * 9))


class TritonKernel(portable.PortableKernel):
    """:class:`bnkit.kernels.Kernel` with Triton kernels for CUDA tensors (CPU tensors
    under ``TRITON_INTERPRET=1``), synchronized layers included; what it does not handle
    (see :func:`supports`) it hands to :class:`portable.PortableKernel`. The running statistics are
    updated by the portable kernel's torch operations on (C,) vectors (no host sync)."""

    def batch_stats(self, x: Tensor, mask: Tensor | None = None) -> BatchStats:
        if not supports(x, mask):
            return super().batch_stats(x, mask)
        return prim.batch_stats(x, mask)

    def normalize_batch(
        self,
        x: Tensor,
        stats: BatchStats,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None = None,
        group: Any = None,
    ) -> Tensor:
        if not supports(x, mask):
            return super().normalize_batch(x, stats, weight, bias, eps, mask, group)
        invstd = torch.rsqrt(stats.var + eps)
        output: Tensor = _Normalize.apply(  # type: ignore[no-untyped-call]
            x, weight, bias, stats.shift, stats.shifted_mean, invstd, stats.count, eps, mask, group
        )
        return output

    def normalize_batch_activation(
        self,
        x: Tensor,
        stats: BatchStats,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None,
        group: Any,
        activation: str,
        param: float | None,
        memory_efficient: bool,
    ) -> Tensor:
        if not supports(x, mask) or activation not in prim.ACTIVATION_CODES:
            return super().normalize_batch_activation(
                x, stats, weight, bias, eps, mask, group, activation, param, memory_efficient
            )
        invstd = torch.rsqrt(stats.var + eps)
        # or, decided from the output: not invertible (see _NormalizeActivate.forward)
        save_input = activation == "relu" or not memory_efficient
        output: Tensor = _NormalizeActivate.apply(  # type: ignore[no-untyped-call]
            x,
            weight,
            bias,
            stats.shift,
            stats.shifted_mean,
            invstd,
            stats.count,
            mask,
            activation,
            param,
            save_input,
            group,
        )
        return output

    def normalize_population(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, mean, var, weight, bias)
        )
        if differentiable or not supports(x):
            return super().normalize_population(x, mean, var, weight, bias, eps)
        dtype = compute_dtype(x.dtype)
        alpha = torch.rsqrt(var.to(dtype) + eps)
        if weight is not None:
            alpha = alpha * weight.to(dtype)
        beta = torch.zeros_like(alpha) if bias is None else bias.to(dtype)
        return prim.affine(x, mean.to(dtype), alpha, beta)


KERNEL = TritonKernel()
