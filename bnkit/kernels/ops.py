"""bnkit's operators: the four passes of a native kernel and the update of the running
statistics as ``torch.library`` operators.

``bnkit::batch_stats``, ``bnkit::affine``, ``bnkit::backward_reduce`` and
``bnkit::backward_input`` have the meaning of :class:`bnkit.kernels.primitive.Primitives`'
fields, ``bnkit::update_running_stats`` that of
:meth:`bnkit.kernels.pipeline.Kernel.update_running_stats` (it mutates the running
statistics and the counter, and returns whether the batch was recorded); a schema each,
and an implementation per dispatch key:

- ``CPU``: the C loops (:data:`bnkit.kernels.cpu.PRIMITIVES`) where they take the
  tensors; the Triton kernels under ``BNKIT_KERNEL=triton`` (which the tests run through
  Triton's interpreter);
- ``CUDA``: the Triton kernels (:data:`bnkit.kernels.gpu.PRIMITIVES`) where Triton is
  available;
- ``CompositeExplicitAutograd``: torch operations, for every other device and for what
  the native passes do not take;
- a fake (meta) implementation, so that ``torch.compile`` and ``torch.export`` can trace
  a graph that calls them;
- a vmap rule for each pass (``torch.library.register_vmap``): the vmapped calls'
  channels side by side in one call, so ``torch.func.vmap`` (model ensembling) runs the
  native pass once. The update has none (it mutates its arguments): inside transforms
  :class:`OperatorKernel` updates in torch operations.

So torch's dispatcher, not bnkit, picks the implementation for a tensor's device.
:data:`OPERATORS` puts them behind the :class:`~bnkit.kernels.primitive.Primitives`
interface, and :class:`bnkit.kernels.primitive.PrimitiveKernel` writes the autograd
formulas over it once. The operators themselves carry no autograd: the formulas (and
forward-mode rules, which torch 2.13 cannot attach to an operator) stay in the
``autograd.Function``s.

They are registered with ``torch.library.Library`` rather than ``custom_op``: a call
through ``custom_op``'s Python wrapper costs several times more (measured: about 37 us
against 5 us per call on this project's 2-core machine), and a training step calls four.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bnkit.kernels import cpu, gpu, native, portable
from bnkit.kernels.primitive import PrimitiveKernel, Primitives
from bnkit.kernels.stats import BatchStats, Update, compute_dtype

__all__ = [
    "KERNEL",
    "OPERATORS",
    "OperatorKernel",
    "composite",
    "native_device",
    "native_passes",
]

_LIB = torch.library.Library("bnkit", "DEF")  # type: ignore[no-untyped-call]
_define: Callable[[str], Any] = _LIB.define
_impl: Callable[[str, Callable[..., Any], str], Any] = _LIB.impl
_define("batch_stats(Tensor x, Tensor? mask) -> (Tensor, Tensor, Tensor, Tensor)")
_define(
    "affine(Tensor x, Tensor shift, Tensor alpha, Tensor beta, str? activation, "
    "float? param) -> Tensor"
)
_define(
    "backward_reduce(Tensor g, Tensor src, Tensor shift, Tensor shifted_mean, "
    "str? activation, float? param, bool from_output, Tensor? z_alpha, Tensor? z_beta) "
    "-> (Tensor, Tensor)"
)
_define(
    "backward_input(Tensor g, Tensor src, Tensor shift, Tensor alpha, Tensor k1, "
    "Tensor k0, str? activation, float? param, bool from_output, Tensor? mask, "
    "Tensor? z_alpha, Tensor? z_beta) -> Tensor"
)
_define(
    "update_running_stats(Tensor count, Tensor shift, Tensor shifted_mean, Tensor var, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
    "float? momentum, bool unbiased, bool skip_nonfinite) -> Tensor"
)


# --- the composite implementation: torch operations, any device -----------------------


def _batch_stats(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = portable.batch_stats(x, mask)
    return stats.count, stats.shift, stats.shifted_mean, stats.var


def _as_update(*args: Any) -> Update:
    """``bnkit::update_running_stats``'s arguments (the statistics' four vectors first)."""
    return Update(BatchStats(*args[:4]), *args[4:])


def _update(*args: Any) -> Tensor:
    update = _as_update(*args)
    recorded = portable.update_running_stats(update)
    return update.stats.count.new_ones((), dtype=torch.bool) if recorded is None else recorded


#: The composite implementation of each operator (torch operations, any device).
composite: dict[str, Callable[..., Any]] = {
    "batch_stats": _batch_stats,
    "affine": portable.affine,
    "backward_reduce": portable.backward_reduce,
    "backward_input": portable.backward_input,
    "update_running_stats": _update,
}


# --- the native implementations, and the fake ones -------------------------------------


def _native(device: str) -> dict[str, Callable[..., Any]]:
    """Each operator's kernel for ``device`` ("cpu", "cuda"): the device's native pass
    where it takes the tensors, else the composite one."""

    def batch_stats(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        prims = _native_primitives(device, x, mask)
        if prims is None:
            return _batch_stats(x, mask)
        stats = prims.batch_stats(x, mask)
        return stats.count, stats.shift, stats.shifted_mean, stats.var

    def affine(x: Tensor, *rest: Any) -> Tensor:
        prims = _native_primitives(device, x, None)
        return portable.affine(x, *rest) if prims is None else prims.affine(x, *rest)

    def backward_reduce(g: Tensor, src: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
        prims = _native_primitives(device, src, None)
        if prims is None:
            return portable.backward_reduce(g, src, *rest)
        return prims.backward_reduce(g, src, *rest)

    def backward_input(g: Tensor, src: Tensor, *rest: Any) -> Tensor:
        activation, mask = rest[4], rest[7]
        prims = _native_primitives(device, src, mask)
        fused = activation not in (None, "identity")
        if prims is None or (mask is not None and fused and not prims.masked_activation):
            # the C loops fuse no activation with a mask
            return portable.backward_input(g, src, *rest)
        return prims.backward_input(g, src, *rest)

    def update_running_stats(*args: Any) -> Tensor:
        update = _as_update(*args)
        if _triton(device):
            recorded = gpu.update_running_stats(update)
            if recorded is not None:
                return recorded
        if device == "cpu":
            taken = cpu.update_running_stats(update)
            if taken is not None:
                return (_RECORDED if taken else _SKIPPED).clone()
        return _update(*args)

    return {
        "batch_stats": batch_stats,
        "affine": affine,
        "backward_reduce": backward_reduce,
        "backward_input": backward_input,
        "update_running_stats": update_running_stats,
    }


# a fresh 0-d bool is a clone of one of these (cheaper than torch.tensor)
_RECORDED = torch.tensor(True)
_SKIPPED = torch.tensor(False)


def _triton(device: str) -> bool:
    """Whether ``device``'s implementations run the Triton kernels where they take the
    tensors: on CUDA, or anywhere with ``BNKIT_KERNEL=triton``, where Triton can run."""
    return (device == "cuda" or gpu.forced()) and gpu.available()


def _native_primitives(device: str, x: Tensor, mask: Tensor | None) -> Primitives | None:
    """The native passes that take (x, mask) on ``device``, or None."""
    if _triton(device) and gpu.supports(x, mask):
        return gpu.PRIMITIVES
    if device == "cpu" and cpu.PRIMITIVES.supports(x, mask):
        return cpu.PRIMITIVES
    return None


def _fake_stats(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = x.shape[1]
    dtype = compute_dtype(x.dtype)
    return tuple(x.new_empty(c, dtype=dtype) for _ in range(4))  # type: ignore[return-value]


def _fake_output(x: Tensor, *rest: Any) -> Tensor:
    return torch.empty_like(x, memory_format=portable._output_memory_format(x))


def _fake_sums(g: Tensor, src: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
    c = src.shape[1]
    dtype = compute_dtype(src.dtype)
    return src.new_empty(c, dtype=dtype), src.new_empty(c, dtype=dtype)


def _fake_input(g: Tensor, src: Tensor, *rest: Any) -> Tensor:
    return _fake_output(src)


def _fake_update(count: Tensor, *rest: Any) -> Tensor:
    return count.new_empty((), dtype=torch.bool)


_CPU, _CUDA = _native("cpu"), _native("cuda")
for _name, _fake in (
    ("batch_stats", _fake_stats),
    ("affine", _fake_output),
    ("backward_reduce", _fake_sums),
    ("backward_input", _fake_input),
    ("update_running_stats", _fake_update),
):
    _impl(_name, composite[_name], "CompositeExplicitAutograd")
    _impl(_name, _CPU[_name], "CPU")
    _impl(_name, _CUDA[_name], "CUDA")
    torch.library.register_fake(f"bnkit::{_name}", _fake, lib=_LIB)

_OPS = torch.ops.bnkit


# --- the vmap rules: the vmapped dimension folded into the channels -------------------

#: Each operator's arguments and outputs: "data" (N, C, *), "mask" (N, *), "vector"
#: (C,), or None for a non-tensor argument.
_ARGUMENTS: dict[str, tuple[str | None, ...]] = {
    "batch_stats": ("data", "mask"),
    "affine": ("data", "vector", "vector", "vector", None, None),
    "backward_reduce": ("data", "data", "vector", "vector", None, None, None, "vector", "vector"),
    "backward_input": (
        "data", "data", "vector", "vector", "vector", "vector", None, None, None, "mask",
        "vector", "vector",
    ),
}  # fmt: skip
_OUTPUTS = {
    "batch_stats": ("vector",) * 4,
    "affine": ("data",),
    "backward_reduce": ("vector", "vector"),
    "backward_input": ("data",),
}


def _fold(kind: str | None, arg: Any, dim: int | None, size: int) -> Any:
    """One argument of a vmapped call as an argument of one call on ``size`` times the
    channels: channel ``b * C + c`` is channel c of the b-th call. A data tensor
    (B, N, C, *) becomes (N, B * C, *), a vector (B, C) becomes (B * C,); an unbatched
    one is repeated. An unbatched mask holds for every call as it is."""
    if kind is None or arg is None or kind == "mask":
        return arg
    if kind == "vector":
        return arg.repeat(size) if dim is None else arg.movedim(dim, 0).reshape(-1)
    batched = arg.unsqueeze(1).expand(arg.shape[0], size, *arg.shape[1:]) if dim is None else (
        arg.movedim(dim, 1)
    )  # fmt: skip
    return batched.reshape(batched.shape[0], -1, *batched.shape[3:])


def _unfold(kind: str, out: Tensor, size: int) -> tuple[Tensor, int]:
    """An output of the folded call, with the dimension of the vmapped calls."""
    if kind == "vector":
        return out.view(size, -1), 0
    return out.view(out.shape[0], size, -1, *out.shape[2:]), 1


def _vmap_rule(name: str) -> Callable[..., Any]:
    """The vmap rule of operator ``name``: one call of the operator on the vmapped calls'
    channels side by side (so the native kernel runs once), or, for a vmapped mask (a
    mask per call, which no channel layout expresses), one call per vmapped call."""
    op = getattr(_OPS, name).default
    kinds, outputs = _ARGUMENTS[name], _OUTPUTS[name]

    def rule(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> Any:
        size = info.batch_size
        if any(kind == "mask" and d is not None for kind, d in zip(kinds, in_dims, strict=True)):
            return _per_call(op, len(outputs), size, in_dims, args)
        folded = [_fold(*a, size) for a in zip(kinds, args, in_dims, strict=True)]
        result = op(*folded)
        parts = [result] if len(outputs) == 1 else list(result)
        unfolded = [_unfold(kind, out, size) for kind, out in zip(outputs, parts, strict=True)]
        values, dims = tuple(u[0] for u in unfolded), tuple(u[1] for u in unfolded)
        return (values[0], dims[0]) if len(outputs) == 1 else (values, dims)

    return rule


def _per_call(
    op: Any, n_outputs: int, size: int, in_dims: tuple[int | None, ...], args: tuple[Any, ...]
) -> Any:
    """The vmapped calls one at a time, their outputs stacked."""
    calls = []
    for b in range(size):
        call = [a if d is None else a.select(d, b) for a, d in zip(args, in_dims, strict=True)]
        result = op(*call)
        calls.append([result] if n_outputs == 1 else list(result))
    stacked = tuple(torch.stack([c[i] for c in calls]) for i in range(n_outputs))
    return (stacked[0], 0) if n_outputs == 1 else (stacked, (0,) * n_outputs)


for _name in _ARGUMENTS:
    torch.library.register_vmap(f"bnkit::{_name}", _vmap_rule(_name), lib=_LIB)


def _op_batch_stats(x: Tensor, mask: Tensor | None = None) -> BatchStats:
    count, shift, shifted_mean, var = _OPS.batch_stats.default(x.detach(), mask)
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)


def _op_affine(
    x: Tensor, shift: Tensor, alpha: Tensor, beta: Tensor, activation: str | None = None,
    param: float | None = None,
) -> Tensor:  # fmt: skip
    y: Tensor = _OPS.affine.default(x, shift, alpha, beta, activation, param)
    return y


def _op_backward_reduce(
    g: Tensor, src: Tensor, shift: Tensor, shifted_mean: Tensor,
    activation: str | None = None, param: float | None = None, from_output: bool = False,
    z_alpha: Tensor | None = None, z_beta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    sums: tuple[Tensor, Tensor] = _OPS.backward_reduce.default(
        g, src, shift, shifted_mean, activation, param, from_output, z_alpha, z_beta
    )
    return sums


def _op_backward_input(
    g: Tensor, src: Tensor, shift: Tensor, alpha: Tensor, k1: Tensor, k0: Tensor,
    activation: str | None = None, param: float | None = None, from_output: bool = False,
    mask: Tensor | None = None, z_alpha: Tensor | None = None, z_beta: Tensor | None = None,
) -> Tensor:  # fmt: skip
    dx: Tensor = _OPS.backward_input.default(
        g, src, shift, alpha, k1, k0, activation, param, from_output, mask, z_alpha, z_beta
    )
    return dx


def native_passes(x: Tensor, mask: Tensor | None = None) -> Primitives | None:
    """The native passes the operators run for (x, mask): the C loops, the Triton kernels,
    or None (the composite torch operations)."""
    return _native_primitives(x.device.type, x, mask)


def native_device(x: Tensor) -> bool:
    """Whether x's device and dtype have native passes, whatever its layout: the C loops
    for a CPU float32, float64, bfloat16 or float16 tensor (once built), the Triton kernels
    for a CUDA one."""
    if torch.compiler.is_compiling():
        return False
    if x.is_cuda:
        return gpu.available()
    return x.is_cpu and cpu.has_dtype(x.dtype) and native.library() is not None


#: The operators behind the :class:`Primitives` interface: the passes of whichever
#: native kernel torch's dispatcher finds for the tensor's device. They take every
#: tensor (each implementation runs torch operations for what its native pass does not
#: take), so the kernel on them never asks again what :func:`bnkit.kernels.pipeline.select_kernel`
#: decided.
OPERATORS = Primitives(
    name="bnkit operators",
    supports=lambda x, mask: True,
    batch_stats=_op_batch_stats,
    affine=_op_affine,
    backward_reduce=_op_backward_reduce,
    backward_input=_op_backward_input,
    masked_activation=True,  # where a device's loops do not, the composite pass does
)


class OperatorKernel(PrimitiveKernel):
    """:class:`PrimitiveKernel` on :data:`OPERATORS`: the kernel
    :func:`bnkit.kernels.pipeline.select_kernel` picks for the tensors a native pass
    takes. Its update of the running statistics is the operator
    ``bnkit::update_running_stats`` (one C call on the CPU, one launch on a GPU, torch
    operations on (C,) vectors elsewhere)."""

    def __init__(self) -> None:
        super().__init__(OPERATORS)

    def update_running_stats(self, update: Update) -> Tensor | None:
        """See :meth:`bnkit.kernels.pipeline.Kernel.update_running_stats`. Inside
        ``torch.func`` transforms, torch operations, which vmap batches: the operator
        mutates its arguments and has no vmap rule."""
        if portable.transformed():
            return super().update_running_stats(update)
        stats = update.stats
        with torch.no_grad():  # the schema's order is Update's, the statistics unpacked
            recorded: Tensor = _OPS.update_running_stats.default(
                stats.count, stats.shift, stats.shifted_mean, stats.var, *update[1:]
            )
        return recorded if update.skip_nonfinite else None

    def ghost_passes(self, x: Tensor, mask: Tensor | None) -> Primitives | None:
        """The native passes themselves where they take ghost batches in one launch (the
        Triton kernels, ``torch.library.triton_op``s of their own): the operators'
        schemas have no ghost batches."""
        passes = native_passes(x, mask)
        return passes if passes is not None and passes.ghost_batches else None


KERNEL = OperatorKernel()
