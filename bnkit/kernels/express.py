"""The express path: plain batch norm on a CPU tensor in one C call each way.

Most calls are plain: no mask, ghost batches, renorm or synchronization, a float32,
float64, bfloat16 or float16 CPU tensor in a layout the C loops know, per-channel
tensors in the compute dtype (float32 for 16-bit inputs: the mixed-precision layout).
Without autograd, 16-bit parameters (and, in eval, 16-bit population statistics: a
``model.to(torch.bfloat16)`` at inference) are read as float32 copies. For them the
general pipeline (statistics objects, affine terms computed with torch, a separate
update of the running statistics) costs tens of microseconds of Python and small torch
operations per call, more than the work itself on a small tensor. Here the C++ of
``fast.cpp`` decides, and one call to ``bn_forward`` in ``cpu.c`` computes the
statistics, updates the running ones and normalizes, under a native autograd node whose
backward is one call to ``bn_backward``; the arithmetic is the C loops', so results agree
with the operators' kernel (:mod:`bnkit.kernels.ops`) to rounding.

:func:`batch_norm` returns None for any call it does not take, and the caller runs the
general pipeline, which also reports invalid arguments: the checks accept only valid,
plain calls and never raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnkit.kernels import cpu, native, outputs, pipeline, portable, primitive
from bnkit.kernels.stats import compute_dtype

__all__ = ["batch_norm"]

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
        extension.init(torch.nn.Parameter, _double_backward, cpu, outputs)
        _FAST = extension.batch_norm


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
    if _FAST is None or _compiling() or _transformed():
        return None
    result: tuple[Tensor, bool | None] | None = _FAST(
        x, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked, unbiased, skip_nonfinite, relu,
    )  # fmt: skip
    return result


def _double_backward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
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
    differentiated. fast.cpp's backward under autograd, and for gradients batched by
    ``autograd.grad(..., is_grads_batched=True)``, which the C loops cannot read. Without
    a relu the gradients do not depend on the bias, so a zero stands in for it (``bias``
    is saved for the relu only)."""
    if not relu or bias is None:
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
            activation=pipeline.Activation("relu") if relu else None,
        ).output
        grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=create_graph))
    return tuple(  # type: ignore[return-value]
        next(grads) if t is not None and t.requires_grad else None for t in (x, weight, bias)
    )
