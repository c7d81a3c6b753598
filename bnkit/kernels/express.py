"""The express path: plain batch norm on a CPU tensor in one C call each way.

Most calls are plain: no mask, ghost batches, renorm or synchronization, a float32 or
float64 CPU tensor in a layout the C loops know, per-channel tensors of the same dtype;
or a bfloat16 or float16 tensor with float32 per-channel tensors (the mixed-precision
layout), whose loops read and write 16-bit values and compute in float32 as the portable
kernel does. Without autograd, 16-bit parameters (and, in eval, 16-bit population
statistics: a ``model.to(torch.bfloat16)`` at inference) are read as float32 copies.
For them the general pipeline (statistics objects, affine terms computed with torch,
a separate update of the running statistics) costs tens of microseconds of Python and
small torch operations per call, more than the work itself on a small tensor. Here one
call to ``bn_forward`` in ``cpu.c`` computes the statistics, updates the running ones and
normalizes, and one call to ``bn_backward`` gives all gradients; the arithmetic is the
fast kernel's (:mod:`bnkit.kernels.cpu`), so results agree with it to rounding.

:func:`batch_norm` returns None for any call it does not take, and the caller runs the
general pipeline, which also reports invalid arguments: the checks here accept only
valid, plain calls and never raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnkit.kernels import activation, cpu, native, outputs, pipeline, portable, primitive

__all__ = ["batch_norm"]

_PLAIN = (Tensor, torch.nn.Parameter)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
#: the dtype of the statistics, parameters and buffers for each input dtype: 16-bit inputs
#: are normalized in float32 (their loops read and write 16-bit values, compute in float)
_COMPUTE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}
_transformed = portable.transformed  # torch.func or forward-mode AD
_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_threads = torch.get_num_threads
_empty = torch.empty
_empty_like = outputs.empty_like  # large outputs reuse kept memory
_INT64 = torch.int64
_FORWARD: dict[torch.dtype, Any] = {}
_BACKWARD: dict[torch.dtype, Any] = {}


#: fast.cpp's batch_norm (this module's, for float and double tensors below the output
#: pool's size, in C++), set on the first call; None where the native code is unavailable
_FAST: Any = None
_started = False


def _start() -> None:
    """Load the native code on the first call and hand fast.cpp what it reads from Python."""
    global _started, _FAST
    _started = True
    extension = native.extension()
    if extension is not None:
        extension.init(torch.nn.Parameter, _double_backward, cpu, outputs)
        _FAST = extension.batch_norm


def _load(dtype: torch.dtype) -> Any:
    """The dtype's ``bn_forward`` (and ``bn_backward``), or None without the library."""
    lib = native.library()
    if lib is None:
        return None
    _FORWARD[dtype] = getattr(lib, f"bn_forward_{_SUFFIX[dtype]}")
    _BACKWARD[dtype] = getattr(lib, f"bn_backward_{_SUFFIX[dtype]}")
    return _FORWARD[dtype]


def _vector_ok(t: Tensor, channels: int, dtype: torch.dtype) -> bool:
    """A (C,) contiguous CPU tensor of ``dtype``, of a plain tensor type."""
    return (
        type(t) in _PLAIN
        and t.dtype == dtype
        and t.is_cpu
        and t.shape == (channels,)
        and t.is_contiguous()
    )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    unbiased: bool,
    skip_nonfinite: bool,
    relu: bool,
) -> tuple[Tensor, bool | None] | None:
    """(output, recorded) of a plain call, or None when this path does not take it.

    ``recorded`` is whether the running statistics took the batch (False only for a
    batch with non-finite statistics under ``skip_nonfinite``), None when there were no
    running statistics to update. The arguments have the meaning of
    :func:`bnkit.functional.batch_norm`'s; ``relu`` fuses a ReLU (saving the input).
    """
    if _FAST is None and not _started:
        _start()
    if _FAST is not None and not _compiling() and not _transformed():
        result: tuple[Tensor, bool | None] | None = _FAST(
            x, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked, unbiased, skip_nonfinite, relu,
        )  # fmt: skip
        if result is not None:
            return result
    # Each check is a few attribute reads: this path exists to be cheap.
    if type(x) not in _PLAIN or not x.is_cpu:
        return None
    dtype = x.dtype
    forward = _FORWARD.get(dtype)
    if forward is None and (dtype not in _SUFFIX or (forward := _load(dtype)) is None):
        return None
    numel = x.numel()
    if numel < cpu.SMALL_THRESHOLD or _compiling() or _transformed():
        return None
    shape = x.shape
    if len(shape) < 2:
        return None
    channels = shape[1]
    rows = shape[0]
    # cpu.layout's decision, written out with C's layout codes (0 = ncl, 1 = nc): the
    # call and its string and tuple cost a tenth of this path on a small tensor.
    if x.is_contiguous():
        if len(shape) == 2:
            kind, inner = 1, 1
        else:
            kind, inner = 0, numel // (rows * channels)
    elif (len(shape) == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        len(shape) == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        kind, inner, rows = 1, 1, numel // channels
    else:
        return None
    if training and rows * inner < 2:
        return None  # one value per channel: the general path applies single_sample
    compute = _COMPUTE[dtype]  # per-channel tensors: float32 for 16-bit inputs
    if not (type(eps) is float or type(eps) is int) or not eps > 0:
        return None
    if (weight is not None and not _vector_ok(weight, channels, compute)) or (
        bias is not None and not _vector_ok(bias, channels, compute)
    ):
        if compute is dtype or not _grad_free(x, weight, bias):
            return None
        # a 16-bit model (model.to(torch.bfloat16)) without gradients: its parameters
        # are read as float32 copies
        weight, bias = _widened(weight, channels, dtype), _widened(bias, channels, dtype)
        if weight is _DECLINE or bias is _DECLINE:
            return None
    if running_mean is None or running_var is None:
        if not training or running_mean is not running_var:
            return None
        update = False
    elif (
        _vector_ok(running_mean, channels, compute)
        and _vector_ok(running_var, channels, compute)
        and not running_mean.requires_grad
        and not running_var.requires_grad
    ):
        update = training
    elif compute is not dtype and not training and _grad_free(x, weight, bias):
        # 16-bit population statistics in eval: read as float32 copies (nothing is written)
        running_mean = _widened(running_mean, channels, dtype)
        running_var = _widened(running_var, channels, dtype)
        if running_mean is _DECLINE or running_var is _DECLINE:
            return None
        update = False
    else:
        return None
    if momentum is None:
        if update and num_batches_tracked is None:
            return None
        factor = -1.0  # the cumulative average (C: momentum < 0)
    elif (type(momentum) is float or type(momentum) is int) and 0 <= momentum <= 1:
        factor = float(momentum)
    else:
        return None
    tracked = num_batches_tracked if update else None
    if tracked is not None and not (
        type(tracked) is Tensor
        and tracked.dtype == _INT64
        and tracked.is_cpu
        and tracked.numel() == 1
    ):
        return None

    if not _grad_free(x, weight, bias):
        call = _Call(
            kind,
            rows,
            channels,
            inner,
            bool(training),
            float(eps),
            running_mean,
            running_var,
            factor,
            tracked,
            bool(unbiased),
            bool(skip_nonfinite),
            relu,
            _threads() if numel >= cpu.PARALLEL_THRESHOLD else 1,
        )
        output: Tensor = _apply(x, weight, bias, call)  # type: ignore[no-untyped-call]
        return output, call.recorded if update else None
    output = _empty_like(x)
    recorded = forward(
        kind,
        x.data_ptr(),
        output.data_ptr(),
        rows,
        channels,
        inner,
        None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        eps,
        training,
        None,
        None if running_mean is None else running_mean.data_ptr(),
        None if running_var is None else running_var.data_ptr(),
        factor,
        None if tracked is None else tracked.data_ptr(),
        unbiased,
        skip_nonfinite,
        relu,
        _threads() if numel >= cpu.PARALLEL_THRESHOLD else 1,
    )
    return output, bool(recorded) if update else None


_DECLINE = torch.empty(0)  # _widened's answer for a tensor this path does not take


def _grad_free(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the call builds no autograd graph."""
    return not _grad_enabled() or not (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def _widened(t: Tensor | None, channels: int, dtype: torch.dtype) -> Tensor | None:
    """A per-channel tensor as float32: itself if it is one, a float32 copy of a valid one
    of the 16-bit ``dtype``, else ``_DECLINE``."""
    if t is None or _vector_ok(t, channels, torch.float32):
        return t
    if _vector_ok(t, channels, dtype):
        return t.float()
    return _DECLINE


class _Call:
    """One call's layout and options, and what came of it (kept off autograd's inputs)."""

    __slots__ = ("channels", "eps", "inner", "kind", "momentum", "recorded", "relu", "rows",
                 "running_mean", "running_var", "skip_nonfinite", "threads", "tracked",
                 "training", "unbiased")  # fmt: skip

    def __init__(
        self,
        kind: int,
        rows: int,
        channels: int,
        inner: int,
        training: bool,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        tracked: Tensor | None,
        unbiased: bool,
        skip_nonfinite: bool,
        relu: bool,
        threads: int,
    ) -> None:
        self.kind = kind
        self.rows = rows
        self.channels = channels
        self.inner = inner
        self.training = training
        self.eps = eps
        self.running_mean = running_mean
        self.running_var = running_var
        self.momentum = momentum
        self.tracked = tracked
        self.unbiased = unbiased
        self.skip_nonfinite = skip_nonfinite
        self.relu = relu
        self.threads = threads
        self.recorded = True

    def forward(
        self,
        function: Any,
        x: Tensor,
        y: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        saved: Tensor | None,
    ) -> None:
        """One ``bn_forward`` call writing y (and ``saved``); sets ``recorded``."""
        running_mean, running_var, tracked = self.running_mean, self.running_var, self.tracked
        self.recorded = bool(
            function(
                self.kind,
                x.data_ptr(),
                y.data_ptr(),
                self.rows,
                self.channels,
                self.inner,
                None if weight is None else weight.data_ptr(),
                None if bias is None else bias.data_ptr(),
                self.eps,
                self.training,
                None if saved is None else saved.data_ptr(),
                None if running_mean is None else running_mean.data_ptr(),
                None if running_var is None else running_var.data_ptr(),
                self.momentum,
                None if tracked is None else tracked.data_ptr(),
                self.unbiased,
                self.skip_nonfinite,
                self.relu,
                self.threads,
            )
        )


class _ExpressBatchNorm(torch.autograd.Function):
    """The express call under autograd: saves x, weight and 5 * C values."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, call: _Call
    ) -> Tensor:
        y = _empty_like(x)
        saved = _empty(5 * call.channels, dtype=_COMPUTE[x.dtype])
        call.forward(_FORWARD[x.dtype], x, y, weight, bias, saved)
        # In eval the population statistics are saved too, as torch saves them: changing
        # them in place before the backward pass then raises autograd's error instead of
        # giving a double backward the changed values.
        population = () if call.training else (call.running_mean, call.running_var)
        ctx.save_for_backward(x, weight, saved, *population)
        ctx.call = call
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, saved, *population = ctx.saved_tensors
        call: _Call = ctx.call
        if _grad_enabled():
            running_mean, running_var = population or (None, None)
            return (
                *_double_backward(
                    x, weight, grad_output, running_mean, running_var,
                    call.eps, call.training, call.relu, *ctx.needs_input_grad[1:3],
                ),
                None,
            )  # fmt: skip
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = x.dtype
        channels = call.channels
        g = grad_output
        if g.dtype != dtype or g.stride() != x.stride():
            g = cpu._as_layout_of(g, x)
        dx = _empty_like(x) if need_x else None
        dw = _empty(channels, dtype=saved.dtype) if need_w else None
        db = _empty(channels, dtype=saved.dtype) if need_b else None
        _BACKWARD[dtype](
            call.kind,
            g.data_ptr(),
            x.data_ptr(),
            None if dx is None else dx.data_ptr(),
            call.rows,
            channels,
            call.inner,
            saved.data_ptr(),
            None if weight is None else weight.data_ptr(),
            None if dw is None else dw.data_ptr(),
            None if db is None else db.data_ptr(),
            call.training,
            call.relu,
            call.threads,
        )
        return dx, dw, db, None


# Function.apply's Python layer binds arguments and unwraps torch.func wrappers: with no
# transform active (checked before) the C++ apply below it does the same work.
_apply = super(torch.autograd.Function, _ExpressBatchNorm).apply


def _double_backward(
    x: Tensor,
    weight: Tensor | None,
    grad_output: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    training: bool,
    relu: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients (x, weight, bias) as functions of the inputs (double backward): the
    portable kernel's forward recomputed (running statistics left alone) and
    differentiated. The gradients do not depend on the bias, so a zero stands in for it
    (it is not saved). Also fast.cpp's backward under autograd."""
    if relu:
        activation.refuse_double_backward()
    bias = None
    if need_bias:
        bias = torch.zeros(x.shape[1], dtype=_COMPUTE[x.dtype], requires_grad=True)
    if not need_weight and weight is not None:
        weight = weight.detach()
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    output = pipeline.batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        use_batch_stats=training,
        momentum=0.0,
        eps=eps,
        kernel=primitive.PORTABLE,
    ).output
    grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True))
    return tuple(  # type: ignore[return-value]
        next(grads) if t is not None and t.requires_grad else None for t in (x, weight, bias)
    )
