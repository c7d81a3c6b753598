"""The express path: batch norm on a CPU tensor in one C call each way.

Most calls have no ghost batches, renorm or synchronization (in eval none acts, since
they act in training only): a float32, float64, bfloat16 or float16 CPU tensor in a
layout the C loops know, per-channel tensors in the compute dtype (float32 for 16-bit
inputs: the mixed-precision layout), with or without a fused activation, or in training
a mask without one. Without autograd, 16-bit
parameters (and, in eval, 16-bit population statistics: a ``model.to(torch.bfloat16)`` at
inference) are read as float32 copies. For them the general pipeline (statistics
objects, affine terms computed with torch, a separate update of the running statistics)
costs hundreds of microseconds of Python and small torch operations per call, more than
the work itself on a small tensor. Here the
C++ of ``fast.cpp`` decides, and calls the operator ``bnkit::batch_norm`` (registered in
C++): one call to ``bn_forward`` in ``cpu.c`` computes the statistics, updates the
running ones and normalizes, under a native autograd node whose backward is the operator
``bnkit::batch_norm_backward``, one call to ``bn_backward``; the arithmetic is the C
loops', so results agree with the pass operators' kernel (:mod:`bnkit.kernels.ops`) to
rounding. This module registers the two operators' fake kernels, so that
``torch.library.opcheck`` and AOTAutograd trace them. A memory-efficient
activation saves the output where it gives x_hat back (the rule of
:func:`bnkit.kernels.activation.invertible`, which fast.cpp applies to the tensors it
takes), as the pipeline's autograd function does.

:func:`batch_norm` returns None for any call it does not take, and the caller runs the
general pipeline, which also reports invalid arguments: the checks accept only valid
calls and never raise.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bnkit.kernels import activation as act
from bnkit.kernels import cpu, native, outputs, pipeline, portable, primitive
from bnkit.kernels.stats import compute_dtype

__all__ = ["Flags", "batch_norm", "compiled_batch_norm", "flags"]

#: The fused activations' codes in ``cpu.c``'s bn_forward and bn_backward (ACT_*)
_CODES = {None: 0, **cpu._ACTIVATION_CODES}
_NAMES = {code: name for name, code in _CODES.items() if code}  # no activation: absent


class Flags(NamedTuple):
    """A call's options as ``fast.cpp`` reads them (:func:`flags` makes them)."""

    unbiased: bool = True  #: running_var takes the unbiased batch variance
    skip_nonfinite: bool = True
    activation: int = 0  #: the fused activation's code (``_CODES``)
    param: float = 0.0  #: its parameter: leaky_relu's slope, elu's alpha
    from_output: bool = False  #: memory-efficient: training may save y instead of x
    #: training calls too (False with ghost batches, renorm or sync, which the pipeline
    #: carries out; in eval they change nothing)
    training: bool = True


def flags(
    running_var_estimator: str,
    skip_nonfinite: bool,
    activation: str | None,
    param: float | None,
    memory_efficient: bool,
    training: bool = True,
) -> Flags:
    """The :class:`Flags` of validated options (:class:`bnkit.functional.Options`')."""
    return Flags(
        running_var_estimator == "unbiased",
        skip_nonfinite,
        _CODES[activation],
        0.0 if param is None else float(param),
        memory_efficient and activation is not None and act.saves_output(activation),
        training,
    )


_transformed = portable.transformed  # torch.func or forward-mode AD
_compiling = torch.compiler.is_compiling

#: fast.cpp's batch_norm, set on the first call; None where the native code is unavailable
_FAST: Any = None
_started = False


def _start() -> None:
    """Load the native code on the first call and hand fast.cpp what it reads from Python."""
    global _started, _FAST
    _started = True
    extension = native.extension()
    if extension is not None:
        extension.init(torch.nn.Parameter, _double_backward, act.INVERSION_LIMIT, cpu, outputs)
        torch.library.register_fake("bnkit::batch_norm")(_fake_batch_norm)
        torch.library.register_fake("bnkit::batch_norm_backward")(_fake_backward)
        _FAST = extension.batch_norm


def _fake_batch_norm(x: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``bnkit::batch_norm``'s fake kernel: the output like x, the 5 * C saved values in
    the compute dtype, a 0-d bool (whether the running statistics took the batch)."""
    stats = x.new_empty(5 * x.shape[1], dtype=compute_dtype(x.dtype))
    return torch.empty_like(x), stats, x.new_empty((), dtype=torch.bool)


def _fake_backward(
    grad_output: Tensor, src: Tensor, stats: Tensor, *args: Any
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``bnkit::batch_norm_backward``'s fake kernel: (dx, dweight, dbias) where wanted."""
    output_mask, channels = args[-1], (src.shape[1],)
    return (
        torch.empty_like(src) if output_mask[0] else None,
        stats.new_empty(channels) if output_mask[1] else None,
        stats.new_empty(channels) if output_mask[2] else None,
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
    options: Flags,
    mask: Tensor | None = None,
) -> tuple[Tensor, bool | None] | None:
    """(output, recorded) of a call, or None when this path does not take it.

    ``recorded`` is whether the running statistics took the batch (False only for a
    batch with non-finite statistics under ``skip_nonfinite``), None when there were no
    running statistics to update. The arguments have the meaning of
    :func:`bnkit.functional.batch_norm`'s; ``options`` are the rest (:func:`flags`). A
    mask is taken in training without an activation, where it has two valid positions.
    """
    if _compiling() or _transformed():  # first: torch.compile would trace the loading
        return None
    if _FAST is None and not _started:
        _start()
    if _FAST is None:
        return None
    result: tuple[Tensor, bool | None] | None = _FAST(
        x, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked, options, mask,
    )  # fmt: skip
    return result


def _loaded() -> bool:
    """Whether the native code is loaded, loading it on the first call. ``torch.compile``
    runs this function when it traces a call instead of tracing it (the loading takes a
    lock and may build), and keeps its answer."""
    if not _started:
        _start()
    return _FAST is not None


# What torch.compiler.assume_constant_result(_loaded) does, without importing torch._dynamo
# here: that import, made while bnkit.nn is imported, left torch.distributed's spawned
# worker processes (tests/distributed) slow to exit and some aborted at exit.
_loaded._dynamo_marked_constant = True  # type: ignore[attr-defined]


def compiled_batch_norm(
    call: pipeline.Call, plan: pipeline.Plan
) -> tuple[Tensor, Tensor | None] | None:
    """(output, recorded) of a validated, planned call that ``torch.compile`` traces, as
    one ``bnkit::batch_norm`` in the graph (its fake kernel traces; the compiled graph then
    runs the C loops each way), or None for the pipeline: not compiling, exporting (an
    exported graph keeps to torch operations, which any runtime runs), inside a
    ``torch.func`` transform, a call the express path does not take in training (ghost
    batches, renorm, sync, a mask, a deferred update), or a tensor the loops do not take.
    ``call`` holds the population statistics the call reads or updates, or None, as
    :func:`bnkit.kernels.pipeline.batch_norm` takes them. ``recorded`` is the 0-d bool the
    pipeline gives (with running statistics updated under ``skip_nonfinite``), else None."""
    if not _compiling() or torch.compiler.is_exporting() or _transformed():
        return None
    x, running_mean, running_var, weight, bias, num_batches_tracked, mask = call
    whole = plan.chunks is None or list(plan.chunks) == [pipeline.Chunk(0, x.shape[0])]
    if not whole or plan.renorm_limits is not None or plan.group is not None:
        return None
    if plan.deferred is not None or mask is not None:
        return None
    if not x.is_cpu or not cpu.has_dtype(x.dtype) or x.numel() < cpu.SMALL_THRESHOLD:
        return None
    dtype = compute_dtype(x.dtype)
    vectors = (weight, bias, running_mean, running_var)
    if cpu.layout(x) is None or any(
        v is not None and (v.dtype != dtype or not v.is_contiguous()) for v in vectors
    ):
        return None
    update = plan.training and running_mean is not None
    momentum = plan.momentum
    if (update and momentum is not None and not 0 <= momentum <= 1) or not plan.eps > 0:
        return None  # the loops read a negative momentum as the cumulative average
    if not _loaded():
        return None
    name, param = (None, None) if plan.activation is None else plan.activation[:2]
    output, _, recorded = torch.ops.bnkit.batch_norm.default(
        x, weight, bias, running_mean, running_var, num_batches_tracked, None, plan.training,
        -1.0 if momentum is None else float(momentum), float(plan.eps), plan.unbiased,
        plan.skip_nonfinite, _CODES[name], 0.0 if param is None else float(param), False,
    )  # fmt: skip
    return output, recorded if update and plan.skip_nonfinite else None


class _Node(NamedTuple):
    """What fast.cpp's autograd node keeps besides its tensors."""

    eps: float
    training: bool
    activation: int  #: the code (``_CODES``)
    param: float
    from_output: bool  #: the node saved y, not x


def _double_backward(
    saved: tuple[Tensor | None, ...],
    grad_output: Tensor,
    node: tuple[Any, ...],
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients (x, weight, bias) of fast.cpp's node in torch operations: under
    autograd (a double backward), and for gradients batched by
    ``autograd.grad(..., is_grads_batched=True)``, which the C loops cannot read.

    ``saved`` are the node's tensors: (x or y, weight, bias, its 5 * C values, the
    population statistics (eval), the mask), None where absent; ``needs``: which
    gradients are wanted. From the input,
    the portable kernel's forward is recomputed (running statistics left alone) and
    differentiated; from the output (memory-efficient), which has no input to
    differentiate, a double backward is refused and batched gradients take the
    pipeline's backward formula on the portable passes.
    """
    info = _Node(*node)
    name = _NAMES.get(info.activation)
    if info.from_output:
        if torch.is_grad_enabled():
            act.refuse_double_backward()
        return _from_output(saved, grad_output, info, needs)
    x, weight, bias = saved[:3]
    running_mean, running_var, mask = saved[4:7]
    _, need_weight, need_bias = needs  # x's: whether x requires grad
    assert x is not None
    if name is None or bias is None:
        # the bias changes no gradient without an activation: a zero stands in for it
        bias = None
        if need_bias:
            bias = torch.zeros(x.shape[1], dtype=compute_dtype(x.dtype), requires_grad=True)
    elif not need_bias:
        bias = bias.detach()
    if not need_weight and weight is not None:
        weight = weight.detach()
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    create_graph = torch.is_grad_enabled()  # else batched gradients, computed without one
    with torch.enable_grad():
        activation = None if name is None else pipeline.Activation(name, info.param, False)
        output = pipeline.batch_norm(
            pipeline.Call(x, running_mean, running_var, weight, bias, mask=mask),
            pipeline.Plan(info.training, 0.0, info.eps, activation=activation),
            primitive.PORTABLE,
        ).output
        grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=create_graph))
    return tuple(  # type: ignore[return-value]
        next(grads) if t is not None and t.requires_grad else None for t in (x, weight, bias)
    )


def _from_output(
    saved: tuple[Tensor | None, ...],
    grad_output: Tensor,
    info: _Node,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients from the saved output y by the pipeline's formula
    (:func:`bnkit.kernels.primitive._from_output`) on the portable passes, which
    ``torch.func`` batches."""
    y, weight, bias, values = saved[:4]
    assert y is not None
    assert values is not None
    channels = y.shape[1]
    invstd = values[2 * channels : 3 * channels]
    count = torch.tensor(y.numel() // channels, dtype=values.dtype)
    name = _NAMES.get(info.activation, "identity")
    ctx = SimpleNamespace(
        saved_tensors=(y, weight, bias, invstd, count, None),
        activation=name,
        param=info.param if name != "identity" else None,
        prims=portable.PRIMITIVES,
        ghosts=1,
        group=None,
        needs_input_grad=needs,
        bias_dtype=None if bias is None else bias.dtype,
    )
    dx, sum_g, sum_g_x_hat, weight = primitive._from_output(ctx, grad_output)
    return dx, *primitive._parameter_gradients(ctx, weight, sum_g_x_hat, sum_g)
