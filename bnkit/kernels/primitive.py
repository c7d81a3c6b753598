"""A kernel from four primitives: the autograd functions the C loops (:mod:`.cpu`) and
the Triton kernels (:mod:`.gpu`) share.

Both native kernels implement the same four passes over memory, with the same meaning
(:class:`Primitives`): per-channel statistics, the affine map fused with an activation,
the backward pass's two reductions, and the input gradient. :class:`PrimitiveKernel`
builds the :class:`bnkit.kernels.pipeline.Kernel` protocol on any such set, so the
autograd formulas (which tensors are saved, the memory-efficient inversion of a fused
activation, the reductions summed over a process group, the hand-over to the portable
kernel for a double backward) are written once, here, for every device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bnkit.distributed import all_reduce_sum
from bnkit.kernels import activation as act
from bnkit.kernels import portable
from bnkit.kernels.stats import BatchStats, compute_dtype, input_gradient_coefficients

__all__ = ["PrimitiveKernel", "Primitives"]


@dataclass(frozen=True)
class Primitives:
    """One device's passes over memory. Each takes and returns tensors in the input's
    memory format; per-channel vectors and sums are in the compute dtype.

    Attributes:
        name: what runs them, for messages ("C loops", "Triton").
        supports: whether the passes take ``(x, mask)`` at all.
        batch_stats: ``(x, mask) -> BatchStats``, one read of x.
        affine: ``(x, shift, alpha, beta, activation, param) -> y``,
            y = act((x - shift) * alpha + beta); one read, one write.
        backward_reduce: ``(g, src, shift, shifted_mean, activation, param, from_output,
            z_alpha, z_beta) -> (sum g', sum g' * (v - shift - shifted_mean))`` with
            g' = g * act'(z); src is x (z = (x - shift) * z_alpha + z_beta) or, with
            ``from_output``, the output y of the fused activation (v = z = act^-1(y)).
        backward_input: ``(g, src, shift, alpha, k1, k0, activation, param, from_output,
            mask, z_alpha, z_beta) -> dx = g' * alpha + (v - shift) * k1 + k0`` (g' * alpha
            where ``mask`` is False).
        masked_activation: whether ``backward_input`` takes a mask with an activation.
    """

    name: str
    supports: Callable[[Tensor, Tensor | None], bool]
    batch_stats: Callable[..., BatchStats]
    affine: Callable[..., Tensor]
    backward_reduce: Callable[..., tuple[Tensor, Tensor]]
    backward_input: Callable[..., Tensor]
    masked_activation: bool


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


class _FastNormalize(torch.autograd.Function):
    """Training normalization with batch statistics: forward one affine pass, backward
    one reduction pass and one dx pass, by the ``prims`` of the tensor's device. Saves what
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
        mask: Tensor | None,
        group: Any,
        prims: Primitives,
    ) -> Tensor:
        ctx.prims = prims
        ctx.save_for_backward(x, weight, shift, shifted_mean, invstd, count, mask)
        ctx.eps = eps
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        return prims.affine(x, shift, alpha, beta)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            grads = portable._NormalizeWithBatchStats.backward(ctx, grad_output)
            return (*grads[:8], None, None, None)
        x, weight, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        sum_g, sum_gc = ctx.prims.backward_reduce(grad_output, x, shift, shifted_mean)
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
            dx = ctx.prims.backward_input(grad_output, x, shift, alpha, k1, k0, mask=mask)
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *([None] * 8))


class _FastNormalizeActivate(torch.autograd.Function):
    """y = act((x - shift) * alpha + beta') with batch statistics, in one node, as
    :class:`portable._NormalizeActivate`.

    ``save_input`` True (always for relu, and where
    :func:`bnkit.kernels.activation.invertible` says the output does not give x_hat back):
    saves x and recomputes z = (x - shift) * alpha + beta' bit for bit for the slope.
    Otherwise (identity, leaky_relu, elu) saves only y and O(C) values; the backward
    recovers z = act^-1(y) and act'(z) from y, and x_hat = (z - bias) / weight, the
    division folded into per-channel coefficients.
    Double backward is not supported. With a process ``group``, as :class:`_FastNormalize`.
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
        group: Any,
        prims: Primitives,
    ) -> Tensor:
        ctx.prims, ctx.group = prims, group
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        y = prims.affine(x, shift, alpha, beta, activation, param)
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
            sum_g, sum_gc = ctx.prims.backward_reduce(
                grad_output, x, shift, shifted_mean, name, param, False, alpha, beta
            )
            sum_g_x_hat = sum_gc * invstd
            all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
            if need_input:
                k1, k0 = input_gradient_coefficients(
                    alpha, all_g, all_g_x_hat, count, invstd, shifted_mean
                )
                dx = ctx.prims.backward_input(
                    grad_output, x, shift, alpha, k1, k0, name, param, False, mask, alpha, beta
                )
        else:
            y, weight, bias, invstd, count, mask = ctx.saved_tensors
            dtype = invstd.dtype
            scale = None if weight is None else weight.to(dtype)
            centre = torch.zeros_like(invstd) if bias is None else bias.to(dtype)
            zero = torch.zeros_like(invstd)
            # sum_gc = sum(g' * (z - bias)) = weight * sum(g' * x_hat)
            sum_g, sum_gc = ctx.prims.backward_reduce(
                grad_output, y, centre, zero, name, param, True
            )
            sum_g_x_hat = sum_gc if scale is None else sum_gc / scale
            all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
            if need_input:
                # dx = alpha * g' + x_hat * k1 + k0, x_hat * k1 = (z - bias) * (k1 / weight)
                alpha = invstd if scale is None else invstd * scale
                per_unit = None if scale is None else 1.0 / scale
                k1, k0 = input_gradient_coefficients(alpha, all_g, all_g_x_hat, count, per_unit)
                dx = ctx.prims.backward_input(
                    grad_output, y, centre, alpha, k1, k0, name, param, True, mask
                )
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *([None] * 10))


class PrimitiveKernel(portable.PortableKernel):
    """:class:`bnkit.kernels.pipeline.Kernel` on a device's :class:`Primitives`; what they
    do not take (see ``Primitives.supports``) it hands to
    :class:`bnkit.kernels.portable.PortableKernel`, as it does the running statistics'
    update (torch operations on (C,) vectors, no host synchronization)."""

    def __init__(self, prims: Primitives) -> None:
        self.prims = prims

    def batch_stats(self, x: Tensor, mask: Tensor | None = None) -> BatchStats:
        if not self.prims.supports(x, mask):
            return super().batch_stats(x, mask)
        return self.prims.batch_stats(x, mask)

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
        if not self.prims.supports(x, mask):
            return super().normalize_batch(x, stats, weight, bias, eps, mask, group)
        invstd = torch.rsqrt(stats.var + eps)
        output: Tensor = _FastNormalize.apply(  # type: ignore[no-untyped-call]
            x,
            weight,
            bias,
            stats.shift,
            stats.shifted_mean,
            invstd,
            stats.count,
            eps,
            mask,
            group,
            self.prims,
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
        masked = mask is not None and not self.prims.masked_activation
        if masked or not self.prims.supports(x, mask):
            return super().normalize_batch_activation(
                x, stats, weight, bias, eps, mask, group, activation, param, memory_efficient
            )
        invstd = torch.rsqrt(stats.var + eps)
        # or, decided from the output: not invertible (see _FastNormalizeActivate.forward)
        save_input = activation == "relu" or not memory_efficient
        output: Tensor = _FastNormalizeActivate.apply(  # type: ignore[no-untyped-call]
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
            self.prims,
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
        if differentiable or not self.prims.supports(x, None):
            return super().normalize_population(x, mean, var, weight, bias, eps)
        dtype = compute_dtype(x.dtype)
        alpha = torch.rsqrt(var.to(dtype) + eps)
        if weight is not None:
            alpha = alpha * weight.to(dtype)
        beta = torch.zeros_like(alpha) if bias is None else bias.to(dtype)
        return self.prims.affine(x, mean.to(dtype), alpha, beta)
