""":class:`TritonKernel`: the Triton primitives as a
:class:`bnkit.kernels.primitive.PrimitiveKernel` (the autograd functions it shares with
the CPU kernel)."""

from __future__ import annotations

import torch
from torch import Tensor

from bnkit.kernels.gpu import primitives as prim
from bnkit.kernels.primitive import PrimitiveKernel, Primitives

__all__ = ["KERNEL", "PRIMITIVES", "TritonKernel", "supports"]

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
    if x.device.type != prim.device_type():
        return False
    if mask is None:
        return True
    return (
        type(mask) in _PLAIN_TYPES
        and mask.device == x.device
        and mask.shape == x.shape[:1] + x.shape[2:]
        and not _is_functorch_wrapped(mask)
    )


#: The Triton kernels as the shared primitives (:mod:`bnkit.kernels.primitive`).
PRIMITIVES = Primitives(
    name="Triton",
    supports=supports,
    batch_stats=prim.batch_stats,
    affine=prim.affine,
    backward_reduce=prim.backward_reduce,
    backward_input=prim.backward_input,
    masked_activation=True,
    ghost_batches=True,
)


class TritonKernel(PrimitiveKernel):
    """:class:`bnkit.kernels.pipeline.Kernel` with Triton kernels for CUDA tensors (CPU
    tensors under ``TRITON_INTERPRET=1``), synchronized layers included; what they do
    not take (see :func:`supports`) goes to the portable kernel."""

    def __init__(self) -> None:
        super().__init__(PRIMITIVES)


KERNEL = TritonKernel()
