"""The fast CPU kernel: batch norm at close to memory bandwidth.

:func:`bnkit.kernels.select_kernel` picks it (through the operators) for CPU float32,
float64, bfloat16 and float16 tensors (the 16-bit ones computed in float32) in eager mode
whose memory is one contiguous block, NCHW-like ((N, C, *) contiguous) or channels-last,
and inside ``torch.func`` transforms through the operators' vmap rules; everything else
(other devices and dtypes, ``torch.compile``, other strides, a fused activation with a
mask) goes to the portable kernel, whose results these agree with to rounding. The loops
are this device's :class:`bnkit.kernels.primitive.Primitives` (:data:`PRIMITIVES`): the
autograd functions that call them, synchronized layers included, are shared with the
Triton kernels.

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
  positions only. A fused activation with a mask takes the portable input-gradient pass.
- fused BN + identity / leaky_relu / elu: the same 3 + 5 (normalization and activation in
  one pass; g' = g * act'(z) computed on the fly in both backward passes). The
  memory-efficient form saves only the output y (and O(C) vectors) and recovers, per value,
  z = act^-1(y), act'(z) from y and x_hat = (z - bias) / gamma (the division folded into
  per-channel coefficients), as :class:`bnkit.kernels.primitive._NormalizeActivate`
  does for every kernel; with
  ``memory_efficient=False``, or where :func:`bnkit.kernels.activation.invertible` says
  the output does not give x_hat back (gamma = 0, |beta| >> |gamma|, a saturated elu), it
  saves x and recomputes z from it bit for bit.

The loops are C (``cpu.c``, compiled once by :mod:`bnkit.kernels.native`), parallel over
channels, or over blocks of rows when there are few channels, on
``torch.get_num_threads()`` threads. The per-channel coefficients are computed with
torch on (C,) vectors, in the compute dtype, the same expressions as the portable kernel.

The fused ReLU saves the input x: exact for any gamma.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
from torch import Tensor

from bnkit.kernels import native, outputs, portable
from bnkit.kernels.primitive import PrimitiveKernel, Primitives
from bnkit.kernels.stats import BatchStats, Update, compute_dtype

__all__ = ["KERNEL", "PRIMITIVES", "CpuKernel", "layout", "supports", "update_running_stats"]

#: Below this many elements the loops run on one thread (starting threads costs more).
PARALLEL_THRESHOLD = 32768
#: Below this many elements the portable kernel is used: at that size the fixed Python
#: costs of the pipeline dominate whichever kernel runs, and the tiniest examples (docs,
#: hand-checked cases) keep going through the plain torch reference path.
SMALL_THRESHOLD = 256

#: The data types the loops take (16-bit data computed in float32), by C suffix.
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
#: The types the C update of the running statistics takes.
_UPDATE_DTYPES = (torch.float32, torch.float64)


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


def has_dtype(dtype: torch.dtype) -> bool:
    """Whether the C loops exist for ``dtype`` (float32, float64, bfloat16, float16)."""
    return dtype in _SUFFIX


def supports(x: Tensor) -> bool:
    """Whether the fast kernel handles ``x``: a plain CPU float32, float64, bfloat16 or
    float16 tensor in eager mode (not compiled, not inside a ``torch.func`` transform)
    with a layout it knows."""
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
#: The activations' codes in ``cpu.c`` (ACT_*): the fused loops implement the first three
#: (the plain ones fuse relu with a flag of their own); relu's code is for the whole-call
#: bn_forward and bn_backward.
_ACTIVATION_CODES: dict[str | None, int] = {"identity": 0, "leaky_relu": 1, "elu": 2, "relu": 3}


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
    dtype = compute_dtype(x.dtype)
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


def _layout_of(x: Tensor) -> tuple[str, int, int, int]:
    plan = layout(x)
    assert plan is not None
    return plan


def batch_stats(x: Tensor, mask: Tensor | None = None) -> BatchStats:
    """Per-channel (count, shift, shifted mean, biased variance) of x, one read (over the
    positions where ``mask`` is True when one is given)."""
    kind, rows, channels, inner = _layout_of(x)
    dtype = compute_dtype(x.dtype)
    shift, shifted_mean, var = (x.new_empty(channels, dtype=dtype) for _ in range(3))
    nt = _threads(x)
    if mask is not None:
        valid = torch.empty((), dtype=torch.float64)
        sizes = _sizes(kind, rows, channels, inner)
        _call(f"bn_stats_masked_{kind}", x, x.data_ptr(), mask.data_ptr(), *sizes,
              shift.data_ptr(), shifted_mean.data_ptr(), var.data_ptr(), valid.data_ptr(),
              nt)  # fmt: skip
        count = valid.to(dtype).expand(channels).clone()
        return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)
    if kind == "ncl":
        _call("bn_stats_ncl", x, x.data_ptr(), rows, channels, inner, shift.data_ptr(),
              shifted_mean.data_ptr(), var.data_ptr(), nt)  # fmt: skip
    else:
        _call("bn_stats_nc", x, x.data_ptr(), rows, channels, shift.data_ptr(),
              shifted_mean.data_ptr(), var.data_ptr(), nt)  # fmt: skip
    count = torch.full((channels,), x.numel() // channels, dtype=dtype)
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)


def affine(
    x: Tensor,
    shift: Tensor,
    alpha: Tensor,
    beta: Tensor,
    activation: str | None = None,
    param: float | None = None,
) -> Tensor:
    """y = act((x - shift) * alpha + beta) per channel, one read and one write."""
    kind, rows, channels, inner = _layout_of(x)
    s, a, b = (_vector(v, compute_dtype(x.dtype)) for v in (shift, alpha, beta))
    y = _empty_like(x)
    nt = _threads(x)
    sizes = _sizes(kind, rows, channels, inner)
    if activation in (None, "identity", "relu"):
        _call(f"bn_affine_{kind}", x, x.data_ptr(), y.data_ptr(), *sizes, s.data_ptr(),
              a.data_ptr(), b.data_ptr(), int(activation == "relu"), nt)  # fmt: skip
    else:
        _call(f"bn_act_forward_{kind}", x, x.data_ptr(), y.data_ptr(), *sizes, s.data_ptr(),
              a.data_ptr(), b.data_ptr(), _ACTIVATION_CODES[activation], _param(param),
              nt)  # fmt: skip
    return y


def _param(param: float | None) -> float:
    return 0.0 if param is None else float(param)


def _sizes(kind: str, rows: int, channels: int, inner: int) -> tuple[int, ...]:
    """The loops' size arguments: (N, C, L) for ncl, (M, C) for nc."""
    return (rows, channels, inner) if kind == "ncl" else (rows, channels)


def _z_pointers(
    z_alpha: Tensor | None, z_beta: Tensor | None, dtype: torch.dtype, plain: bool,
    relu: bool, placeholder: Tensor,
) -> tuple[int | None, int | None]:  # fmt: skip
    """Pointers to the coefficients of z = (x - shift) * z_alpha + z_beta as the loops take
    them: the plain loops read them for relu only (null otherwise, or where absent); the
    fused-activation loops take an unread placeholder for an absent one."""
    if plain and (not relu or z_alpha is None or z_beta is None):
        return None, None
    za, zb = (placeholder if v is None else _vector(v, dtype) for v in (z_alpha, z_beta))
    return za.data_ptr(), zb.data_ptr()


def _plain_loop(activation: str | None, from_output: bool) -> bool:
    """Whether the plain loops (which fuse relu only, recomputing it from x) serve the
    backward pass; otherwise the fused-activation loops do."""
    return activation == "relu" or (activation in (None, "identity") and not from_output)


def backward_reduce(
    g: Tensor,
    src: Tensor,
    shift: Tensor,
    shifted_mean: Tensor,
    activation: str | None = None,
    param: float | None = None,
    from_output: bool = False,
    z_alpha: Tensor | None = None,
    z_beta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum g', sum g' * (v - shift - shifted_mean)) per channel, summed in double, in
    one read of g and src (see :class:`bnkit.kernels.primitive.Primitives`)."""
    kind, rows, channels, inner = _layout_of(src)
    dtype = compute_dtype(src.dtype)
    g = _as_layout_of(g, src)
    s, m = _vector(shift, dtype), _vector(shifted_mean, dtype)
    sum_g = torch.empty(channels, dtype=torch.float64)
    sum_gc = torch.empty(channels, dtype=torch.float64)
    nt = _threads(src)
    sizes = _sizes(kind, rows, channels, inner)
    plain = _plain_loop(activation, from_output)
    za, zb = _z_pointers(z_alpha, z_beta, dtype, plain, activation == "relu", s)
    if plain:
        _call(f"bn_backward_reduce_{kind}", src, g.data_ptr(), src.data_ptr(), *sizes,
              s.data_ptr(), m.data_ptr(), za, zb, sum_g.data_ptr(), sum_gc.data_ptr(),
              nt)  # fmt: skip
    else:
        code = _ACTIVATION_CODES[activation or "identity"]
        _call(f"bn_act_backward_reduce_{kind}", src, g.data_ptr(), src.data_ptr(), *sizes,
              s.data_ptr(), m.data_ptr(), za, zb, code, _param(param), int(from_output),
              sum_g.data_ptr(), sum_gc.data_ptr(), nt)  # fmt: skip
    return sum_g.to(dtype), sum_gc.to(dtype)


def backward_input(
    g: Tensor,
    src: Tensor,
    shift: Tensor,
    alpha: Tensor,
    k1: Tensor,
    k0: Tensor,
    activation: str | None = None,
    param: float | None = None,
    from_output: bool = False,
    mask: Tensor | None = None,
    z_alpha: Tensor | None = None,
    z_beta: Tensor | None = None,
) -> Tensor:
    """dx = g' * alpha + (v - shift) * k1 + k0 (g' * alpha where ``mask`` is False), one
    read of g and src and one write (see :class:`bnkit.kernels.primitive.Primitives`)."""
    kind, rows, channels, inner = _layout_of(src)
    dtype = compute_dtype(src.dtype)
    g = _as_layout_of(g, src)
    s, a, c1, c0 = (_vector(v, dtype) for v in (shift, alpha, k1, k0))
    dx = _empty_like(src)
    nt = _threads(src)
    sizes = _sizes(kind, rows, channels, inner)
    coefficients = (s.data_ptr(), a.data_ptr(), c1.data_ptr(), c0.data_ptr())
    plain = _plain_loop(activation, from_output)
    if mask is not None:  # no activation: the CPU kernel fuses none with a mask
        _call(f"bn_backward_input_masked_{kind}", src, g.data_ptr(), src.data_ptr(),
              mask.data_ptr(), dx.data_ptr(), *sizes, *coefficients, nt)  # fmt: skip
        return dx
    za, zb = _z_pointers(z_alpha, z_beta, dtype, plain, activation == "relu", s)
    if plain:
        _call(f"bn_backward_input_{kind}", src, g.data_ptr(), src.data_ptr(), dx.data_ptr(),
              *sizes, *coefficients, za, zb, nt)  # fmt: skip
    else:
        code = _ACTIVATION_CODES[activation or "identity"]
        _call(f"bn_act_backward_input_{kind}", src, g.data_ptr(), src.data_ptr(),
              dx.data_ptr(), *sizes, *coefficients, za, zb, code, _param(param),
              int(from_output), nt)  # fmt: skip
    return dx


def _supports(x: Tensor, mask: Tensor | None) -> bool:
    return supports(x) and _mask_fits(x, mask)


#: The C loops as the shared primitives (:mod:`bnkit.kernels.primitive`).
PRIMITIVES = Primitives(
    name="C loops",
    supports=_supports,
    batch_stats=batch_stats,
    affine=affine,
    backward_reduce=backward_reduce,
    backward_input=backward_input,
    masked_activation=False,
)


class CpuKernel(PrimitiveKernel):
    """:class:`bnkit.kernels.pipeline.Kernel` with C loops for CPU float32, float64,
    bfloat16 and float16 tensors; what they do not take (see :func:`supports`) goes to
    the portable kernel. (The library runs the loops through the operators of
    :mod:`bnkit.kernels.ops`; this kernel calls them directly.)"""

    def __init__(self) -> None:
        super().__init__(PRIMITIVES)


def update_running_stats(update: Update) -> bool | None:
    """The portable update (blended in float64) as one C call, where it applies (CPU
    float32/float64 contiguous statistics and running statistics, an int64 counter, no
    autograd on any of them): O(C) work whose cost is per-call overhead, which matters
    for small layers. Returns whether the batch was recorded, or None where the C update
    does not apply (nothing changed)."""
    stats, running_mean, running_var, num_batches_tracked, momentum, unbiased, skip = update
    if not _plain_update(running_mean, running_var, stats, momentum, num_batches_tracked):
        return None
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
        int(skip),
    )
    return bool(recorded)


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
    if dtype not in _UPDATE_DTYPES or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False  # any of the tensors may be a wrapper, which the C code cannot read
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
            or t.dtype not in _UPDATE_DTYPES
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
