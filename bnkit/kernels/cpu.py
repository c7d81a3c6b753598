"""The fast CPU kernel: float32 and float64 batch norm at close to memory bandwidth.

:func:`bnkit.kernels.select_kernel` picks it for CPU float32/float64 tensors in eager mode
whose memory is one contiguous block, NCHW-like ((N, C, *) contiguous) or channels-last;
everything else (other devices and dtypes, process groups, ``torch.compile``,
``torch.func`` transforms, other strides) goes to the portable kernel, whose results
these agree with to rounding.

Passes over memory (a pass reads or writes the tensor once):

- statistics: 1 (read x), relative to the shift ``x[0, c, 0, ...]`` (the portable
  kernel's). NCHW-like float32 data as shifted sums of d and d^2 in double (x - shift is
  exact in double, so the variance loses only about (1 + t^2) * 1e-16 relative for a shift
  t standard deviations from the mean: far below float32 rounding), float64 data as exact
  two-pass statistics of cache-sized blocks merged with Chan's update; channels-last and
  2D data one row of C values at a time, as sums in the element type over blocks of 16
  rows about the running mean, merged into double with Chan's update (float lanes keep
  the loop memory-bound; the error stays at float32 rounding, tested 1000 standard
  deviations from the shift). Never E[x^2] - E[x]^2 on raw float32, never a second trip
  to memory;
- training forward: statistics + normalization (read x, write y) = 3;
- backward: the two reductions sum(dy) and sum(dy * x_hat) in one pass (read dy, x), then
  dx (read dy, x, write dx) = 5; forward + backward = 8;
- inference: 2. Fused BN + ReLU: the same 3 + 5, the ReLU mask recomputed from x.
- a mask (padded sequences, (N, *spatial) bool): the same 3 + 5; the statistics skip the
  padding (for channels-last and 2D inputs whole rows of C values), the backward's sums
  run over every position and dx adds the paths through the statistics to valid
  positions only. A fused activation with a mask goes to the portable kernel.
- fused BN + identity / leaky_relu / elu: the same 3 + 5 (normalization and activation in
  one pass; g' = g * act'(z) computed on the fly in both backward passes). The
  memory-efficient form saves only the output y (and O(C) vectors) and recovers, per value,
  z = act^-1(y), act'(z) from y and x_hat = (z - bias) / gamma (the division folded into
  per-channel coefficients), as :class:`portable._NormalizeActivate` does; with
  ``memory_efficient=False``, or where :func:`bnkit.kernels.activation.invertible` says
  the output does not give x_hat back (gamma = 0, |beta| >> |gamma|, a saturated elu), it
  saves x and recomputes z from it bit for bit.

The loops are C (``cpu.c``, compiled once by :mod:`bnkit.kernels.native`), parallel over
channels, or over blocks of rows when there are few channels, on
``torch.get_num_threads()`` threads. The per-channel coefficients are computed with
torch on (C,) vectors, in the compute dtype, the same expressions as the portable kernel.

The fused ReLU saves the input x (not the pre-activation z as the portable kernel's
memory-efficient form does): the same number of bytes, and exact for any gamma.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
from torch import Tensor

from bnkit.kernels import activation as act
from bnkit.kernels import native, outputs, portable
from bnkit.kernels.stats import BatchStats, input_gradient_coefficients

__all__ = ["KERNEL", "CpuKernel", "layout", "supports"]

#: Below this many elements the loops run on one thread (starting threads costs more).
PARALLEL_THRESHOLD = 32768
#: Below this many elements the portable kernel is used: at that size the fixed Python
#: costs of the pipeline dominate whichever kernel runs, and the tiniest examples (docs,
#: hand-checked cases) keep going through the plain torch reference path.
SMALL_THRESHOLD = 256

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def layout(x: Tensor) -> tuple[str, int, int, int] | None:
    """How the C loops see ``x``: ("ncl", N, C, L) for a contiguous (N, C, *) tensor,
    ("nc", M, C, 1) for a contiguous 2D or a channels-last tensor (M = N * spatial), None
    for any other strides."""
    if x.dim() < 2:
        return None
    n, c = x.shape[0], x.shape[1]
    if x.is_contiguous():
        if x.dim() == 2:
            return ("nc", n, c, 1)
        return ("ncl", n, c, math.prod(x.shape[2:]))
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return ("nc", x.numel() // c, c, 1)
    return None


def supports(x: Tensor) -> bool:
    """Whether the fast kernel handles ``x``: a plain CPU float32/float64 tensor in eager
    mode (not compiled, not inside a ``torch.func`` transform) with a layout it knows."""
    if type(x) not in _PLAIN_TYPES:
        return False
    if not x.is_cpu or x.dtype not in _SUFFIX or x.layout != torch.strided:
        return False
    if x.numel() < SMALL_THRESHOLD or torch.compiler.is_compiling():
        return False
    # Inside a torch.func transform any of the call's tensors may be a wrapper (a weight
    # stacked for model ensembling, say), which the C loops cannot read.
    if _is_functorch_wrapped(x) or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if x.is_contiguous():
        # layout(x) is not None for any contiguous tensor of rank >= 2
        if x.dim() < 2:
            return False
    elif layout(x) is None:
        return False
    return native.library() is not None


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_RECORDED = torch.tensor(True)
_SKIPPED = torch.tensor(False)


def _threads(x: Tensor) -> int:
    return torch.get_num_threads() if x.numel() >= PARALLEL_THRESHOLD else 1


_FUNCTIONS: dict[tuple[str, torch.dtype], Any] = {}

_I64, _PTR, _INT, _DOUBLE = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
#: Argument types of the fused-activation and masked loops (the _f32 and _f64 variants
#: alike); the plain loops' are in :mod:`bnkit.kernels.native`.
_LOOP_SIGNATURES: dict[str, list[type]] = {
    "bn_act_forward_ncl": [_PTR, _PTR, _I64, _I64, _I64, *[_PTR] * 3, _INT, _DOUBLE, _INT],
    "bn_act_forward_nc": [_PTR, _PTR, _I64, _I64, *[_PTR] * 3, _INT, _DOUBLE, _INT],
    "bn_act_backward_reduce_ncl": [
        *[_PTR] * 2,
        _I64,
        _I64,
        _I64,
        *[_PTR] * 4,
        _INT,
        _DOUBLE,
        _INT,
        *[_PTR] * 2,
        _INT,
    ],
    "bn_act_backward_reduce_nc": [
        *[_PTR] * 2,
        _I64,
        _I64,
        *[_PTR] * 4,
        _INT,
        _DOUBLE,
        _INT,
        *[_PTR] * 2,
        _INT,
    ],
    "bn_act_backward_input_ncl": [
        *[_PTR] * 3,
        _I64,
        _I64,
        _I64,
        *[_PTR] * 6,
        _INT,
        _DOUBLE,
        _INT,
        _INT,
    ],
    "bn_act_backward_input_nc": [*[_PTR] * 3, _I64, _I64, *[_PTR] * 6, _INT, _DOUBLE, _INT, _INT],
    # masks (padded sequences): x, mask, sizes, shift, shifted mean, var, count, threads
    "bn_stats_masked_ncl": [*[_PTR] * 2, _I64, _I64, _I64, *[_PTR] * 4, _INT],
    "bn_stats_masked_nc": [*[_PTR] * 2, _I64, _I64, *[_PTR] * 4, _INT],
    # g, x, mask, dx, sizes, shift, alpha, k1, k0, threads
    "bn_backward_input_masked_ncl": [*[_PTR] * 4, _I64, _I64, _I64, *[_PTR] * 4, _INT],
    "bn_backward_input_masked_nc": [*[_PTR] * 4, _I64, _I64, *[_PTR] * 4, _INT],
}
#: The activations the fused loops implement (their codes in ``cpu.c``); relu has its own.
_ACTIVATION_CODES = {"identity": 0, "leaky_relu": 1, "elu": 2}
_ACTIVATION_NAMES = {code: name for name, code in _ACTIVATION_CODES.items()}


def _call(name: str, x: Tensor, *args: Any) -> Any:
    """Call the C function ``name`` for x's dtype."""
    function = _FUNCTIONS.get((name, x.dtype))
    if function is None:
        lib = native.library()
        assert lib is not None
        function = getattr(lib, f"{name}_{_SUFFIX[x.dtype]}")
        if name in _LOOP_SIGNATURES:
            function.argtypes = _LOOP_SIGNATURES[name]
            function.restype = None
        _FUNCTIONS[name, x.dtype] = function
    return function(*args)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _vector(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A (C,) vector as a contiguous array of ``dtype`` the C code can read."""
    if t.dtype == dtype and not t.requires_grad and t.is_contiguous():
        return t  # already one (``to`` and ``contiguous`` would return it as it is)
    return t.detach().to(dtype).contiguous()


def _empty_like(x: Tensor) -> Tensor:
    """An output with x's memory layout (the one torch's batch norm gives)."""
    return outputs.empty_like(x, memory_format=portable._output_memory_format(x))


def _as_layout_of(g: Tensor, x: Tensor) -> Tensor:
    """g (same shape as x) with x's dtype and memory layout."""
    g = g.to(x.dtype)
    if x.is_contiguous():
        return g.contiguous()
    return g.contiguous(memory_format=portable._output_memory_format(x))


def _mask_fits(x: Tensor, mask: Tensor | None) -> bool:
    """Whether the masked C loops take ``mask`` for x: a contiguous CPU bool (N, *spatial)
    tensor whose memory order is x's row order (NCHW-like x: (N, L) per channel rows;
    channels-last or 2D x: one entry per row of C values)."""
    if mask is None:
        return True
    return (
        type(mask) in _PLAIN_TYPES
        and mask.dtype == torch.bool
        and mask.is_cpu
        and mask.layout == torch.strided
        and mask.is_contiguous()
        and mask.shape == x.shape[:1] + x.shape[2:]
        and not _is_functorch_wrapped(mask)
    )


def _affine(x: Tensor, shift: Tensor, alpha: Tensor, beta: Tensor, relu: bool = False) -> Tensor:
    """y = (x - shift) * alpha + beta per channel (then ReLU), one read and one write."""
    plan = layout(x)
    assert plan is not None
    kind, rows, channels, inner = plan
    dtype = x.dtype
    s, a, b = (_vector(v, dtype) for v in (shift, alpha, beta))
    y = _empty_like(x)
    nt = _threads(x)
    if kind == "ncl":
        _call("bn_affine_ncl", x, x.data_ptr(), y.data_ptr(), rows, channels, inner,
              s.data_ptr(), a.data_ptr(), b.data_ptr(), int(relu), nt)  # fmt: skip
    else:
        _call("bn_affine_nc", x, x.data_ptr(), y.data_ptr(), rows, channels,
              s.data_ptr(), a.data_ptr(), b.data_ptr(), int(relu), nt)  # fmt: skip
    return y


def _input_gradient_terms(
    x: Tensor,
    g: Tensor,
    shift: Tensor,
    shifted_mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    count: Tensor,
    relu_affine: tuple[Tensor, Tensor] | None,
    need_input: bool,
    mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx or None, sum(g' * x_hat), sum(g')) for batch statistics, g' = g (masked by the
    ReLU recomputed from ``relu_affine`` = (alpha, beta') when given). Two passes, or one
    without ``need_input``. With ``mask`` (statistics over the valid positions; no fused
    ReLU) the sums still run over every position, since every output went through the
    same affine map, and only the valid inputs get the paths through the statistics."""
    plan = layout(x)
    assert plan is not None
    kind, rows, channels, inner = plan
    dtype = x.dtype
    g = _as_layout_of(g, x)
    s, m = _vector(shift, dtype), _vector(shifted_mean, dtype)
    za = zb = None
    if relu_affine is not None:
        za, zb = (_vector(v, dtype) for v in relu_affine)
    sum_g = torch.empty(channels, dtype=torch.float64)
    sum_gc = torch.empty(channels, dtype=torch.float64)  # sum(g' * (x - mean))
    nt = _threads(x)
    if kind == "ncl":
        _call("bn_backward_reduce_ncl", x, g.data_ptr(), x.data_ptr(), rows, channels, inner,
              s.data_ptr(), m.data_ptr(), _ptr(za), _ptr(zb), sum_g.data_ptr(),
              sum_gc.data_ptr(), nt)  # fmt: skip
    else:
        _call("bn_backward_reduce_nc", x, g.data_ptr(), x.data_ptr(), rows, channels,
              s.data_ptr(), m.data_ptr(), _ptr(za), _ptr(zb), sum_g.data_ptr(),
              sum_gc.data_ptr(), nt)  # fmt: skip
    sum_g_x_hat = (sum_gc * invstd.to(torch.float64)).to(invstd.dtype)
    sum_g_d = sum_g.to(invstd.dtype)
    if not need_input:
        return None, sum_g_x_hat, sum_g_d
    # dx = alpha * (g' - mean(g') - x_hat * mean(g' * x_hat)), with
    # x_hat = (x - shift) * invstd - shifted_mean * invstd: evaluated as
    # g' * alpha + (x - shift) * k1 + k0.
    alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
    k1, k0 = input_gradient_coefficients(alpha, sum_g_d, sum_g_x_hat, count, invstd, shifted_mean)
    a, k1v, k0v = (_vector(v, dtype) for v in (alpha, k1, k0))
    dx = _empty_like(x)
    if mask is not None:
        assert za is None
        name = f"bn_backward_input_masked_{kind}"
        sizes = (rows, channels, inner) if kind == "ncl" else (rows, channels)
        _call(name, x, g.data_ptr(), x.data_ptr(), mask.data_ptr(), dx.data_ptr(), *sizes,
              s.data_ptr(), a.data_ptr(), k1v.data_ptr(), k0v.data_ptr(), nt)  # fmt: skip
        return dx, sum_g_x_hat, sum_g_d
    if kind == "ncl":
        _call("bn_backward_input_ncl", x, g.data_ptr(), x.data_ptr(), dx.data_ptr(), rows,
              channels, inner, s.data_ptr(), a.data_ptr(), k1v.data_ptr(), k0v.data_ptr(),
              _ptr(za), _ptr(zb), nt)  # fmt: skip
    else:
        _call("bn_backward_input_nc", x, g.data_ptr(), x.data_ptr(), dx.data_ptr(), rows,
              channels, s.data_ptr(), a.data_ptr(), k1v.data_ptr(), k0v.data_ptr(),
              _ptr(za), _ptr(zb), nt)  # fmt: skip
    return dx, sum_g_x_hat, sum_g_d


class _FastNormalizeWithBatchStats(torch.autograd.Function):
    """The portable kernel's training normalization with the C loops forward and backward.

    It saves what :class:`portable._NormalizeWithBatchStats` saves, so that a double
    backward (``create_graph=True``), which needs the statistics recomputed
    differentiably, runs the portable backward. Written with ``forward(ctx, ...)``:
    ``apply`` then skips the per-call signature binding a ``setup_context`` costs.
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
        eps: float,
        mask: Tensor | None = None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, shift, shifted_mean, invstd, count, mask)
        ctx.eps = eps
        ctx.group = None
        ctx.bias_dtype = None if bias is None else bias.dtype
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        return _affine(x, shift, alpha, beta)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            grads = portable._NormalizeWithBatchStats.backward(ctx, grad_output)
            return (*grads[:8], None)
        x, weight, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        dx, sum_g_x_hat, sum_g = _input_gradient_terms(
            x,
            grad_output,
            shift,
            shifted_mean,
            invstd,
            weight,
            count,
            None,
            bool(ctx.needs_input_grad[0]),
            mask,
        )
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *([None] * 6))


def _parameter_gradients(
    ctx: Any, weight: Tensor | None, sum_g_x_hat: Tensor, sum_g: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """(dweight, dbias) where requested: sum(g * x_hat) and sum(g)."""
    grad_w = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_w = sum_g_x_hat.to(weight.dtype)
    grad_b = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = sum_g.to(ctx.bias_dtype)
    return grad_w, grad_b


class _FastNormalizeRelu(torch.autograd.Function):
    """y = relu((x - shift) * alpha + beta') with batch statistics, in one node that saves
    x and O(C) values; the backward recomputes the ReLU mask from x bit for bit."""

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
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias, shift, shifted_mean, invstd, count)
        ctx.bias_dtype = None if bias is None else bias.dtype
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        return _affine(x, shift, alpha, beta, relu=True)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            act.refuse_double_backward()
        x, weight, bias, shift, shifted_mean, invstd, count = ctx.saved_tensors
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        dx, sum_g_x_hat, sum_g = _input_gradient_terms(
            x,
            grad_output,
            shift,
            shifted_mean,
            invstd,
            weight,
            count,
            (alpha, beta),
            bool(ctx.needs_input_grad[0]),
        )
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *([None] * 4))


def _affine_activate(
    x: Tensor, shift: Tensor, alpha: Tensor, beta: Tensor, code: int, param: float
) -> Tensor:
    """y = act((x - shift) * alpha + beta) per channel, one read and one write."""
    plan = layout(x)
    assert plan is not None
    kind, rows, channels, inner = plan
    s, a, b = (_vector(v, x.dtype) for v in (shift, alpha, beta))
    y = _empty_like(x)
    nt = _threads(x)
    if kind == "ncl":
        _call("bn_act_forward_ncl", x, x.data_ptr(), y.data_ptr(), rows, channels, inner,
              s.data_ptr(), a.data_ptr(), b.data_ptr(), code, param, nt)  # fmt: skip
    else:
        _call("bn_act_forward_nc", x, x.data_ptr(), y.data_ptr(), rows, channels,
              s.data_ptr(), a.data_ptr(), b.data_ptr(), code, param, nt)  # fmt: skip
    return y


def _activation_passes(
    src: Tensor,
    g: Tensor,
    vectors: tuple[Tensor, Tensor, Tensor, Tensor],
    code: int,
    param: float,
    from_output: bool,
    coefficients: Any,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The two backward passes of the fused activation over ``src`` (the saved y or x).

    ``vectors`` = (s, m, za, zb) as ``bn_act_backward_reduce`` takes them; the first pass
    gives (sum(g'), sum(g' * (v - s)) - m * sum(g')) in float64, from which
    ``coefficients`` returns (sum_g_x_hat, sum_g, (alpha, k1, k0) or None); with the
    latter, the second pass writes dx = g' * alpha + (v - s) * k1 + k0.
    """
    plan = layout(src)
    assert plan is not None
    kind, rows, channels, inner = plan
    dtype = src.dtype
    g = _as_layout_of(g, src)
    s, m, za, zb = (_vector(v, dtype) for v in vectors)
    sum_g = torch.empty(channels, dtype=torch.float64)
    sum_gc = torch.empty(channels, dtype=torch.float64)
    nt = _threads(src)
    flag = int(from_output)
    if kind == "ncl":
        _call("bn_act_backward_reduce_ncl", src, g.data_ptr(), src.data_ptr(), rows, channels,
              inner, s.data_ptr(), m.data_ptr(), za.data_ptr(), zb.data_ptr(), code, param,
              flag, sum_g.data_ptr(), sum_gc.data_ptr(), nt)  # fmt: skip
    else:
        _call("bn_act_backward_reduce_nc", src, g.data_ptr(), src.data_ptr(), rows, channels,
              s.data_ptr(), m.data_ptr(), za.data_ptr(), zb.data_ptr(), code, param, flag,
              sum_g.data_ptr(), sum_gc.data_ptr(), nt)  # fmt: skip
    sum_g_x_hat, sum_g_d, terms = coefficients(sum_g, sum_gc)
    if terms is None:
        return None, sum_g_x_hat, sum_g_d
    a, k1, k0 = (_vector(v, dtype) for v in terms)
    dx = _empty_like(src)
    if kind == "ncl":
        _call("bn_act_backward_input_ncl", src, g.data_ptr(), src.data_ptr(), dx.data_ptr(),
              rows, channels, inner, s.data_ptr(), a.data_ptr(), k1.data_ptr(), k0.data_ptr(),
              za.data_ptr(), zb.data_ptr(), code, param, flag, nt)  # fmt: skip
    else:
        _call("bn_act_backward_input_nc", src, g.data_ptr(), src.data_ptr(), dx.data_ptr(),
              rows, channels, s.data_ptr(), a.data_ptr(), k1.data_ptr(), k0.data_ptr(),
              za.data_ptr(), zb.data_ptr(), code, param, flag, nt)  # fmt: skip
    return dx, sum_g_x_hat, sum_g_d


class _FastNormalizeActivate(torch.autograd.Function):
    """y = act((x - shift) * alpha + beta') with batch statistics for an invertible
    activation (identity, leaky_relu, elu), as :class:`portable._NormalizeActivate`.

    Memory-efficient (``save_input`` False): saves y and O(C) values; the backward
    recovers z = act^-1(y), act'(z) from y and x_hat = (z - bias) / weight on the fly, the
    division by weight folded into per-channel coefficients. Otherwise saves x and
    recomputes z from it bit for bit. Double backward is not supported.
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
        code: int,
        param: float,
        save_input: bool,
    ) -> Tensor:
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        y = _affine_activate(x, shift, alpha, beta, code, param)
        if not save_input:
            name = _ACTIVATION_NAMES[code]
            save_input = not act.invertible(y, weight, bias, name, param)
        if save_input:
            ctx.save_for_backward(x, weight, bias, shift, shifted_mean, invstd, count)
        else:
            ctx.save_for_backward(y, weight, bias, invstd, count)
        ctx.save_input = save_input
        ctx.code, ctx.param = code, param
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            act.refuse_double_backward()
        need_input = bool(ctx.needs_input_grad[0])
        if ctx.save_input:
            x, weight, bias, shift, shifted_mean, invstd, count = ctx.saved_tensors
            alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)

            def from_input(sum_g: Tensor, sum_gc: Tensor) -> tuple[Tensor, Tensor, Any]:
                sum_g_x_hat = (sum_gc * invstd.to(torch.float64)).to(invstd.dtype)
                sum_g_d = sum_g.to(invstd.dtype)
                if not need_input:
                    return sum_g_x_hat, sum_g_d, None
                # dx = alpha * (g' - mean(g') - x_hat * mean(g' * x_hat)) with
                # x_hat = (x - shift) * invstd - shifted_mean * invstd.
                k1, k0 = input_gradient_coefficients(
                    alpha, sum_g_d, sum_g_x_hat, count, invstd, shifted_mean
                )
                return sum_g_x_hat, sum_g_d, (alpha, k1, k0)

            dx, sum_g_x_hat, sum_g = _activation_passes(
                x,
                grad_output,
                (shift, shifted_mean, alpha, beta),
                ctx.code,
                ctx.param,
                False,
                from_input,
            )
        else:
            y, weight, bias, invstd, count = ctx.saved_tensors
            dtype = invstd.dtype
            scale = None if weight is None else weight.to(dtype)
            centre = torch.zeros_like(invstd) if bias is None else bias.to(dtype)
            zero = torch.zeros_like(invstd)

            def from_output(sum_g: Tensor, sum_gc: Tensor) -> tuple[Tensor, Tensor, Any]:
                # sum_gc = sum(g' * (z - bias)) = weight * sum(g' * x_hat)
                if scale is not None:
                    sum_gc = sum_gc / scale.to(torch.float64)
                sum_g_x_hat, sum_g_d = sum_gc.to(dtype), sum_g.to(dtype)
                if not need_input:
                    return sum_g_x_hat, sum_g_d, None
                # dx = alpha * g' + x_hat * k1 + k0, x_hat * k1 = (z - bias) * (k1 / weight)
                alpha = invstd if scale is None else invstd * scale
                per_unit = None if scale is None else 1.0 / scale
                k1, k0 = input_gradient_coefficients(alpha, sum_g_d, sum_g_x_hat, count, per_unit)
                return sum_g_x_hat, sum_g_d, (alpha, k1, k0)

            dx, sum_g_x_hat, sum_g = _activation_passes(
                y,
                grad_output,
                (centre, zero, centre, centre),
                ctx.code,
                ctx.param,
                True,
                from_output,
            )
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *([None] * 7))


class CpuKernel(portable.PortableKernel):
    """:class:`bnkit.kernels.Kernel` with C loops for CPU float32/float64 tensors; what it
    does not handle (see :func:`supports`) it hands to :class:`PortableKernel`."""

    def batch_stats(self, x: Tensor, mask: Tensor | None = None) -> BatchStats:
        if not supports(x) or not _mask_fits(x, mask):
            return portable.batch_stats(x, mask)
        x = x.detach()
        plan = layout(x)
        assert plan is not None
        kind, rows, channels, inner = plan
        shift, shifted_mean, var = (x.new_empty(channels) for _ in range(3))
        nt = _threads(x)
        if mask is not None:
            valid = torch.empty((), dtype=torch.float64)
            sizes = (rows, channels, inner) if kind == "ncl" else (rows, channels)
            _call(f"bn_stats_masked_{kind}", x, x.data_ptr(), mask.data_ptr(), *sizes,
                  shift.data_ptr(), shifted_mean.data_ptr(), var.data_ptr(), valid.data_ptr(),
                  nt)  # fmt: skip
            count = valid.to(x.dtype).expand(channels).clone()
            return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)
        if kind == "ncl":
            _call("bn_stats_ncl", x, x.data_ptr(), rows, channels, inner, shift.data_ptr(),
                  shifted_mean.data_ptr(), var.data_ptr(), nt)  # fmt: skip
        else:
            _call("bn_stats_nc", x, x.data_ptr(), rows, channels, shift.data_ptr(),
                  shifted_mean.data_ptr(), var.data_ptr(), nt)  # fmt: skip
        count = torch.full((channels,), x.numel() // channels, dtype=x.dtype)
        return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)

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
        if group is not None or not supports(x) or not _mask_fits(x, mask):
            return super().normalize_batch(x, stats, weight, bias, eps, mask, group)
        invstd = torch.rsqrt(stats.var + eps)
        output: Tensor = _FastNormalizeWithBatchStats.apply(  # type: ignore[no-untyped-call]
            x, weight, bias, stats.shift, stats.shifted_mean, invstd, stats.count, eps, mask
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
        fused = activation == "relu" or activation in _ACTIVATION_CODES
        if not fused or mask is not None or group is not None or not supports(x):
            return super().normalize_batch_activation(
                x, stats, weight, bias, eps, mask, group, activation, param, memory_efficient
            )
        invstd = torch.rsqrt(stats.var + eps)
        output: Tensor
        if activation == "relu":
            output = _FastNormalizeRelu.apply(  # type: ignore[no-untyped-call]
                x, weight, bias, stats.shift, stats.shifted_mean, invstd, stats.count
            )
            return output
        save_input = not memory_efficient  # or, decided from the output: not invertible
        output = _FastNormalizeActivate.apply(  # type: ignore[no-untyped-call]
            x,
            weight,
            bias,
            stats.shift,
            stats.shifted_mean,
            invstd,
            stats.count,
            _ACTIVATION_CODES[activation],
            0.0 if param is None else float(param),
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
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, mean, var, weight, bias)
        )
        if differentiable or not supports(x):
            return super().normalize_population(x, mean, var, weight, bias, eps)
        dtype = x.dtype
        alpha = torch.rsqrt(var.to(dtype) + eps)
        if weight is not None:
            alpha = alpha * weight.to(dtype)
        beta = torch.zeros_like(alpha) if bias is None else bias
        return _affine(x, mean, alpha, beta)

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
        """The portable update (blended in float64) as one C call: O(C) work whose cost
        is per-call overhead, which matters for small layers."""
        if not _plain_update(running_mean, running_var, stats, momentum, num_batches_tracked):
            return super().update_running_stats(
                running_mean,
                running_var,
                stats,
                momentum,
                num_batches_tracked=num_batches_tracked,
                unbiased=unbiased,
                skip_nonfinite=skip_nonfinite,
            )
        first = running_mean if running_mean is not None else running_var
        is_double = first is not None and first.dtype == torch.float64
        count = float(stats.count[0].item()) if stats.count.numel() else 0.0
        recorded = _call(
            "bn_update_running",
            stats.var,
            stats.shift.data_ptr(),
            stats.shifted_mean.data_ptr(),
            stats.var.data_ptr(),
            stats.var.numel(),
            count,
            _ptr(running_mean),
            _ptr(running_var),
            int(is_double),
            -1.0 if momentum is None else float(momentum),
            _ptr(num_batches_tracked),
            int(unbiased),
            int(skip_nonfinite),
        )
        if not skip_nonfinite:
            return None
        # A fresh 0-d bool tensor (cloning a constant is cheaper than torch.tensor).
        return (_RECORDED if recorded else _SKIPPED).clone()


def _plain_update(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stats: BatchStats,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> bool:
    """Whether the C update applies: CPU float32/float64 contiguous statistics, running
    statistics of one such dtype, an int64 counter, no autograd on any of them."""
    var = stats.var
    dtype = var.dtype
    channels = var.numel()
    if dtype not in _SUFFIX or torch.compiler.is_compiling():
        return False
    count = stats.count
    for v in (stats.shift, stats.shifted_mean, var, count):
        if type(v) is not Tensor or not v.is_cpu or v.requires_grad:
            return False
    for v in (stats.shift, stats.shifted_mean, var):
        if v.dtype != dtype or not v.is_contiguous():
            return False
    if count.numel() != channels:
        return False
    running_dtype = None
    for t in (running_mean, running_var):
        if t is None:
            continue
        if running_dtype is None:
            running_dtype = t.dtype
        if (
            type(t) not in _PLAIN_TYPES
            or not t.is_cpu
            or t.dtype != running_dtype
            or t.dtype not in _SUFFIX
            or not t.is_contiguous()
            or t.numel() != channels
            or (t.requires_grad and torch.is_grad_enabled())
            or _is_functorch_wrapped(t)
        ):
            return False
    if num_batches_tracked is None:
        return momentum is not None
    return (
        type(num_batches_tracked) is Tensor
        and num_batches_tracked.dtype == torch.int64
        and num_batches_tracked.is_cpu
        and num_batches_tracked.numel() == 1
    )


KERNEL = CpuKernel()
