"""The portable kernel: batch normalization in plain torch operations, for any device.

Numerics (why it is written this way):

- Statistics are computed on ``x - shift`` with ``shift`` = the channel's first value
  (``x[0, c, 0, ...]``). For data far from zero (a channel at 1e4 with spread 1e-2) that
  subtraction is exact in the input's dtype, so the mean and variance of the difference
  are as accurate as for centred data. The variance is then the exact two-pass one (the
  mean, then the mean squared deviation from it): never E[x^2] - E[x]^2. A sample of the
  data is a good enough shift: if it lies t standard deviations from the mean, the
  rounding error grows only by a factor of about t.
- The normalization is ``(x - shift) * alpha + beta'`` with alpha = weight / sqrt(var + eps)
  and beta' = bias - shifted_mean * alpha: every term is of the order of the output. The
  usual folded form ``x * alpha + (bias - mean * alpha)`` (torch's CPU kernel) adds two
  terms of size |x| * alpha and loses about eps_machine * |x| / std of accuracy, i.e.
  percent-level errors in float32 for the data above. Likewise inference uses
  ``(x - running_mean) * alpha + bias``.
- float16 and bfloat16 inputs are promoted to float32 inside each operation; statistics,
  accumulation and the affine map run in float32 and only the output is rounded back.
  Alternatives considered: accumulating float32 input in float64 fixes the statistics but
  not the folded normalization, costs a float64 copy of the input, and float64 is slow or
  missing on many GPUs (and absent on MPS).

Gradients: training-mode normalization is one :class:`torch.autograd.Function` with the
analytic backward (it saves the input and per-channel statistics only, like torch's own
kernel). Its backward is written in differentiable operations and, when a double backward
is requested, recomputes the statistics from the input so that second derivatives include
their dependence on it. Inference-mode normalization is composed operations that autograd
differentiates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from bnkit.distributed import all_reduce_sum
from bnkit.kernels import activation as act
from bnkit.kernels.stats import BatchStats, compute_dtype, input_gradient_coefficients

__all__ = ["KERNEL", "PortableKernel", "batch_stats", "transformed"]


_interpreters = torch._C._functorch.peek_interpreter_stack


def transformed() -> bool:
    """Whether a ``torch.func`` transform or forward-mode AD (``torch.autograd.forward_ad``)
    is active: the calls this kernel takes whatever the tensors, since only its autograd
    functions have vmap and forward-mode rules."""
    return _interpreters() is not None or forward_ad._current_level >= 0


def _channel_view(x: Tensor) -> list[int]:
    """Shape that broadcasts a (C,) vector against x (N, C, *): [1, C, 1, ...]."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def _output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format torch's batch norm gives its output: channels-last for a
    channels-last 4D or 5D input, contiguous for anything else (and inside torch.func
    transforms, which cannot query other memory formats of their tensors)."""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return torch.contiguous_format
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    if (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def _in_place(*operands: Tensor) -> bool:
    """Whether a tensor made inside this kernel may be reused in place: not under a
    torch.func transform or with a batched ``operand`` (batched gradients), where it may
    be unbatched while what it is combined with is batched."""
    if torch.compiler.is_compiling():
        return True
    functorch = torch._C._functorch
    return functorch.peek_interpreter_stack() is None and not any(
        functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t)
        for t in operands
    )


def _affine_terms(
    shifted_mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-channel (alpha, beta') such that y = (x - shift) * alpha + beta'."""
    alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
    beta = -shifted_mean * alpha
    if bias is not None:
        beta = beta + bias.to(invstd.dtype)
    return alpha, beta


def _two_pass_moments(
    shifted: Tensor, dims: list[int], view: list[int], *, in_place: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance: the mean first, then the mean squared deviation
    from it (exact two-pass; several times faster than torch.var_mean's Welford on CPU)."""
    mean = shifted.mean(dims)  # (C,)
    # in place: the caller's scratch becomes the deviations (no second input-sized tensor)
    reuse = in_place and _in_place()
    deviation = shifted.sub_(mean.view(view)) if reuse else shifted - mean.view(view)
    # mul_ rather than square_: square_ has no vmap batching rule.
    squared = deviation.mul_(deviation) if reuse else deviation * deviation
    return mean, squared.mean(dims)


def batch_stats(x: Tensor, mask: Tensor | None = None) -> BatchStats:
    """Per-channel (count, shift, shifted_mean, biased var) of x (N, C, *), no autograd graph.

    With ``mask`` (bool, (N, *spatial), True = valid) the statistics run over the valid
    positions only. Padding may hold anything (NaN included): it is selected away with
    ``torch.where``, never multiplied by zero.

    Example:
        >>> x = 1e4 + 1e-2 * torch.randn(64, 3)
        >>> stats = batch_stats(x)
        >>> bool((stats.var.sqrt() / 1e-2 - 1).abs().max() < 0.5)
        True
    """
    x = x.detach()
    if mask is not None:
        return _masked_batch_stats(x, mask)
    dtype = compute_dtype(x.dtype)
    channels = x.shape[1]
    view = _channel_view(x)
    first = (0, slice(None)) + (0,) * (x.dim() - 2)
    shift = x[first].to(dtype).clone()  # (C,)
    # Mixed-dtype subtraction promotes half inputs to float32 without a separate copy.
    shifted = x - shift.view(view)  # (N, C, *) in the compute dtype
    shifted_mean, var = _two_pass_moments(shifted, _reduce_dims(x), view)  # (C,), (C,)
    count = torch.full((channels,), x.numel() // max(channels, 1), dtype=dtype, device=x.device)
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)


def _valid(mask: Tensor) -> Tensor:
    """A (N, *spatial) mask as (N, 1, *spatial), broadcasting against (N, C, *spatial)."""
    return mask.unsqueeze(1)


def _masked_moments(
    shifted: Tensor, valid: Tensor, count: Tensor, dims: list[int], view: list[int]
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the valid entries of ``shifted``, two passes."""
    zero = shifted.new_zeros(())
    mean = torch.where(valid, shifted, zero).sum(dims) / count  # (C,)
    deviation = torch.where(valid, shifted - mean.view(view), zero)  # (N, C, *)
    return mean, (deviation * deviation).sum(dims) / count


def _masked_batch_stats(x: Tensor, mask: Tensor) -> BatchStats:
    """Masked statistics: the shift is the valid values' mean from a first pass (no sample
    of the data is known to be valid without a host synchronization), then two passes."""
    dtype = compute_dtype(x.dtype)
    view = _channel_view(x)
    dims = _reduce_dims(x)
    valid = _valid(mask)  # (N, 1, *)
    count = valid.to(dtype).sum(dims).expand(x.shape[1]).clone()  # (C,)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    shift = torch.where(valid, x.to(dtype), zero).sum(dims) / count  # (C,)
    shifted_mean, var = _masked_moments(x - shift.view(view), valid, count, dims, view)
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)


class _NormalizeWithBatchStats(torch.autograd.Function):
    """y = (x - shift - shifted_mean) * invstd * weight + bias, with the batch statistics
    treated as functions of x in the backward pass.

    With a mask, the statistics are functions of the valid entries only: every output
    (padding included) goes through the same affine map, and the paths through the mean
    and variance reach the valid inputs only.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
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
    ) -> Tensor:
        view = _channel_view(x)
        alpha, beta = _affine_terms(shifted_mean, invstd, weight, bias)
        # x - shift is the one new tensor; scaling and shifting it in place keeps a single
        # input-sized tensor alive, as torch's kernel does
        if _in_place():
            y = (x - shift.view(view)).mul_(alpha.view(view)).add_(beta.view(view))
        else:
            y = torch.addcmul(beta.view(view), x - shift.view(view), alpha.view(view))
        return y.to(x.dtype).contiguous(memory_format=_output_memory_format(x))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, shift, shifted_mean, invstd, count, eps, mask, group = inputs
        ctx.save_for_backward(x, weight, shift, shifted_mean, invstd, count, mask)
        ctx.save_for_forward(x, weight, shift, shifted_mean, invstd, count, mask)
        ctx.eps = eps
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        view = _channel_view(x)
        dims = _reduce_dims(x)
        shifted = x - shift.view(view)  # (N, C, *) in the compute dtype
        if torch.is_grad_enabled():
            # Double backward: the saved statistics carry no graph, so recompute them from
            # x to let autograd see how they depend on it.
            if ctx.group is not None:
                raise RuntimeError(
                    "batch_norm: double backward through statistics synchronized across "
                    "processes is not supported (sync=True)"
                )
            if mask is None:
                shifted_mean, var = _two_pass_moments(shifted, dims, view, in_place=False)
            else:
                shifted_mean, var = _masked_moments(shifted, _valid(mask), count, dims, view)
            invstd = torch.rsqrt(var + ctx.eps)
        # dL/dy per value; the sums below run over each channel's count values.
        g = grad_output.to(invstd.dtype)
        first_order = not torch.is_grad_enabled() and _in_place(grad_output)
        if first_order:  # the scratch becomes x_hat, then dx: one input-sized tensor
            x_hat = shifted.mul_(invstd.view(view)).add_((-shifted_mean * invstd).view(view))
        else:
            x_hat = torch.addcmul((-shifted_mean * invstd).view(view), shifted, invstd.view(view))
        grad_input, grad_w, grad_b = _gradients(
            ctx, g, x_hat, weight, invstd, count, mask, x.dtype, view, dims, scratch=first_order
        )
        return grad_input, grad_w, grad_b, None, None, None, None, None, None, None


def _sum_of_products(a: Tensor, b: Tensor, dims: list[int]) -> Tensor:
    """Per-channel sum of a * b over ``dims``, with the products formed a slice of the
    batch at a time (at most an eighth of the input alive, not a whole product tensor)."""
    rows = a.shape[0]
    step = max(1, -(-rows // 8))
    if step >= rows or torch.is_grad_enabled():
        return (a * b).sum(dims)
    total = (a[:step] * b[:step]).sum(dims)
    for start in range(step, rows, step):
        total = total + (a[start : start + step] * b[start : start + step]).sum(dims)
    return total


def _normalized(x: Tensor, shift: Tensor, shifted_mean: Tensor, invstd: Tensor) -> Tensor:
    """x_hat = (x - shift - shifted_mean) * invstd, in the compute dtype."""
    view = _channel_view(x)
    shifted = x - shift.view(view)
    return torch.addcmul((-shifted_mean * invstd).view(view), shifted, invstd.view(view))


def _no_sync_derivative(group: Any, kind: str) -> None:
    if group is not None:
        raise RuntimeError(
            f"batch_norm: {kind} derivatives through statistics synchronized across "
            f"processes are not supported (sync=True)"
        )


def _tangent(
    x_hat: Tensor,
    x_t: Tensor | None,
    weight: Tensor | None,
    weight_t: Tensor | None,
    bias_t: Tensor | None,
    invstd: Tensor,
    count: Tensor,
    mask: Tensor | None,
) -> Tensor:
    """The tangent of z = weight * x_hat + bias with batch statistics::

        z_t = weight * invstd * (x_t - mean(x_t) - x_hat * mean(x_hat * x_t))
              + weight_t * x_hat + bias_t

    (the means over the valid values; the two subtracted terms are the tangents of the
    batch mean and variance, the transpose of the backward pass's two paths)."""
    view = _channel_view(x_hat)
    dims = _reduce_dims(x_hat)
    z_t = torch.zeros_like(x_hat)
    if x_t is not None:
        t = x_t.to(x_hat.dtype)
        valid = t if mask is None else torch.where(_valid(mask), t, 0.0)
        mean_t = valid.sum(dims) / count
        mean_xt = (valid * x_hat).sum(dims) / count
        alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
        centred = t - mean_t.view(view) - x_hat * mean_xt.view(view)
        z_t = centred * alpha.view(view)
    if weight_t is not None:
        z_t = z_t + x_hat * weight_t.to(x_hat.dtype).view(view)
    if bias_t is not None:
        z_t = z_t + bias_t.to(x_hat.dtype).view(view)
    return z_t


def _gradients(
    ctx: Any,
    g: Tensor,
    x_hat: Tensor,
    weight: Tensor | None,
    invstd: Tensor,
    count: Tensor,
    mask: Tensor | None,
    input_dtype: torch.dtype,
    view: list[int],
    dims: list[int],
    *,
    scratch: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) of batch normalization with batch statistics, from the
    gradient g reaching its affine output and the normalized input x_hat. With
    ``scratch`` x_hat is this call's own tensor, and dx is computed in it."""
    grad_bias = g.sum(dims)  # (C,)
    grad_weight = _sum_of_products(g, x_hat, dims)  # (C,)
    # With synchronized statistics the means below run over the global batch: sum the
    # sums over the processes (every process, whatever it needs, to keep in step).
    sum_g, sum_g_x_hat = grad_bias, grad_weight
    if ctx.group is not None:
        sum_g, sum_g_x_hat = all_reduce_sum(torch.stack([sum_g, sum_g_x_hat]), ctx.group)
    grad_input = None
    if ctx.needs_input_grad[0]:
        # dx = alpha * (g - mean(g) - x_hat * mean(g * x_hat)): the two subtracted terms
        # are the paths through the batch mean and the batch variance. Evaluated as
        # alpha * g + (x_hat * k1 + k0), two fused passes.
        alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
        k1, k0 = input_gradient_coefficients(alpha, sum_g, sum_g_x_hat, count)
        if scratch:
            through_stats = x_hat.mul_(k1.view(view)).add_(k0.view(view))
        else:
            through_stats = torch.addcmul(k0.view(view), x_hat, k1.view(view))
        if mask is not None:  # the statistics do not depend on padding
            through_stats = torch.where(_valid(mask), through_stats, 0.0)
        if scratch:
            grad_input = through_stats.addcmul_(g, alpha.view(view)).to(input_dtype)
        else:
            grad_input = torch.addcmul(through_stats, g, alpha.view(view)).to(input_dtype)
    grad_w = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_w = grad_weight.to(weight.dtype)
    grad_b = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = grad_bias.to(ctx.bias_dtype)
    return grad_input, grad_w, grad_b


class _NormalizeActivate(torch.autograd.Function):
    """y = act(z), z = (x - shift - shifted_mean) * invstd * weight + bias, in one node.

    Memory-efficient (``save_input`` False): saves y (z for relu) and O(C) values; the
    backward recovers z and x_hat = (z - bias) / weight from it (see
    :mod:`bnkit.kernels.activation`). Otherwise saves x and recomputes z from it. Either
    way the gradient is exact; double backward is not supported.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor,
        shifted_mean: Tensor,
        invstd: Tensor,
        count: Tensor,
        mask: Tensor | None,
        group: Any,
        activation: str,
        param: float | None,
        save_input: bool,
    ) -> Tensor:
        view = _channel_view(x)
        alpha, beta = _affine_terms(shifted_mean, invstd, weight, bias)
        z = torch.addcmul(beta.view(view), x - shift.view(view), alpha.view(view))
        y = act.activate(z, activation, param)
        return y.to(x.dtype).contiguous(memory_format=_output_memory_format(x))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        (
            x,
            weight,
            bias,
            shift,
            shifted_mean,
            invstd,
            count,
            mask,
            group,
            activation,
            param,
            save_input,
        ) = inputs
        if not save_input and act.saves_output(activation):
            save_input = not act.invertible(output, weight, bias, activation, param)
        if save_input:
            saved = x
        elif act.saves_output(activation):
            saved = output
        else:  # relu: keep the pre-activation, which the output cannot give back
            view = _channel_view(x)
            alpha, beta = _affine_terms(shifted_mean, invstd, weight, bias)
            saved = torch.addcmul(beta.view(view), x - shift.view(view), alpha.view(view))
            saved = saved.to(x.dtype)
        ctx.save_for_backward(saved, weight, bias, shift, shifted_mean, invstd, count, mask)
        ctx.save_for_forward(x, weight, bias, shift, shifted_mean, invstd, count, mask)
        ctx.save_input = save_input
        ctx.group = group
        ctx.activation, ctx.param = activation, param
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.input_dtype = x.dtype

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        saved, weight, bias, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        if torch.is_grad_enabled():
            act.refuse_double_backward()
        view = _channel_view(saved)
        dims = _reduce_dims(saved)
        dtype = invstd.dtype
        scale = None if weight is None else weight.to(dtype)
        if ctx.save_input:
            x_hat = (saved - shift.view(view) - shifted_mean.view(view)) * invstd.view(view)
            z = x_hat if scale is None else x_hat * scale.view(view)
            if bias is not None:
                z = z + bias.to(dtype).view(view)
            # the slope from what the memory-efficient form would have saved: y, or z (relu)
            form = (
                act.activate(z, ctx.activation, ctx.param)
                if act.saves_output(ctx.activation)
                else z
            )
            _, slope = act.preactivation_and_slope(form, ctx.activation, ctx.param)
        else:
            z, slope = act.preactivation_and_slope(saved.to(dtype), ctx.activation, ctx.param)
            centred = z if bias is None else z - bias.to(dtype).view(view)
            x_hat = centred if scale is None else centred / scale.view(view)
        g = grad_output.to(dtype) * slope  # dL/dz
        grad_input, grad_w, grad_b = _gradients(
            ctx, g, x_hat, weight, invstd, count, mask, ctx.input_dtype, view, dims
        )
        return grad_input, grad_w, grad_b, *([None] * 9)


class _NormalizeWithBatchStatsForwardAD(_NormalizeWithBatchStats):
    """:class:`_NormalizeWithBatchStats` with a forward-mode rule, for eager calls
    (torch.compile cannot trace an autograd Function that defines one)."""

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *stats_t: Any) -> Tensor:  # fmt: skip
        """Forward-mode derivative (torch.func.jvp, jacfwd, hessian): the statistics are
        functions of x, as in the backward pass (see :func:`_tangent`)."""
        x, weight, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        _no_sync_derivative(ctx.group, "forward-mode")
        x_hat = _normalized(x, shift, shifted_mean, invstd)
        z_t = _tangent(x_hat, x_t, weight, weight_t, bias_t, invstd, count, mask)
        return z_t.to(x.dtype).contiguous(memory_format=_output_memory_format(x))


class _NormalizeActivateForwardAD(_NormalizeActivate):
    """:class:`_NormalizeActivate` with a forward-mode rule, for eager calls."""

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *stats_t: Any) -> Tensor:  # fmt: skip
        """Forward-mode derivative: act'(z) times the tangent of z (see :func:`_tangent`)."""
        x, weight, bias, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        _no_sync_derivative(ctx.group, "forward-mode")
        x_hat = _normalized(x, shift, shifted_mean, invstd)
        dtype = invstd.dtype
        z = x_hat if weight is None else x_hat * weight.to(dtype).view(_channel_view(x))
        if bias is not None:
            z = z + bias.to(dtype).view(_channel_view(x))
        form = act.activate(z, ctx.activation, ctx.param)
        _, slope = act.preactivation_and_slope(
            form if act.saves_output(ctx.activation) else z, ctx.activation, ctx.param
        )
        z_t = _tangent(x_hat, x_t, weight, weight_t, bias_t, invstd, count, mask)
        return (z_t * slope).to(x.dtype).contiguous(memory_format=_output_memory_format(x))


def _eager_or(compiled: Any, eager: Any) -> Any:
    """The autograd Function to apply: with the forward-mode rule unless compiling."""
    return compiled if torch.compiler.is_compiling() else eager


def _update_dtype(device: torch.device) -> torch.dtype:
    """Running statistics are blended in float64 where the device has it (C values: free),
    which reproduces torch's CPU update ``m * batch + (1 - m) * running`` in double."""
    return torch.float32 if device.type == "mps" else torch.float64


class PortableKernel:
    """:class:`bnkit.kernels.Kernel` in plain torch operations (any device, torch.compile)."""

    def batch_stats(self, x: Tensor, mask: Tensor | None = None) -> BatchStats:
        return batch_stats(x, mask)

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
        invstd = torch.rsqrt(stats.var + eps)
        # torch types Function.apply without annotations.
        function = _eager_or(_NormalizeWithBatchStats, _NormalizeWithBatchStatsForwardAD)
        output: Tensor = function.apply(
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
        invstd = torch.rsqrt(stats.var + eps)
        save_input = not memory_efficient  # or, decided from the output: not invertible
        function = _eager_or(_NormalizeActivate, _NormalizeActivateForwardAD)
        output: Tensor = function.apply(
            x,
            weight,
            bias,
            stats.shift,
            stats.shifted_mean,
            invstd,
            stats.count,
            mask,
            group,
            activation,
            param,
            save_input,
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
        dtype = compute_dtype(x.dtype)
        view = _channel_view(x)
        alpha = torch.rsqrt(var.to(dtype) + eps)
        if weight is not None:
            alpha = alpha * weight.to(dtype)
        # (x - mean) is exact for x near mean, unlike x * alpha - mean * alpha.
        centred = x - mean.to(dtype).view(view)  # (N, C, *) in the compute dtype
        if bias is None:
            y = centred * alpha.view(view)
        else:
            y = torch.addcmul(bias.to(dtype).view(view), centred, alpha.view(view))
        return y.to(x.dtype).contiguous(memory_format=_output_memory_format(x))

    def update_running_stats(
        self,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        stats: BatchStats,
        momentum: float | None,
        *,
        num_batches_tracked: Tensor | None,
        unbiased: bool,
        skip_nonfinite: bool,
    ) -> Tensor | None:
        with torch.no_grad():
            dtype = _update_dtype(stats.var.device)
            # Formed in the update dtype, so a float32 mean far from zero is rounded once.
            batch_mean = stats.shift.to(dtype) + stats.shifted_mean.to(dtype)
            batch_var = stats.var.to(dtype)
            if unbiased:
                count = stats.count.to(dtype)
                batch_var = batch_var * count / (count - 1)
            recorded = None
            if skip_nonfinite:
                # A 0-d device tensor: deciding with torch.where keeps the update free of
                # host synchronization and of graph breaks under torch.compile.
                recorded = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()
            if num_batches_tracked is not None:
                if recorded is None:
                    num_batches_tracked.add_(1)
                else:
                    num_batches_tracked.add_(recorded.to(num_batches_tracked.dtype))
            factor: float | Tensor
            if momentum is None:
                # Cumulative average: the k-th recorded batch gets weight 1/k.
                if num_batches_tracked is None:
                    raise ValueError("momentum=None needs num_batches_tracked")
                factor = 1.0 / num_batches_tracked.to(dtype)
            else:
                factor = momentum
            for running, batch in ((running_mean, batch_mean), (running_var, batch_var)):
                if running is None:
                    continue
                old = running.to(dtype)
                new = batch * factor + old * (1.0 - factor)
                if recorded is not None:
                    new = torch.where(recorded, new, old)
                running.copy_(new)
            return recorded


KERNEL = PortableKernel()
