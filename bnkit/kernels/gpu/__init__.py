"""Batch norm in Triton for CUDA GPUs: the CPU kernel's primitives, with the same semantics.

:class:`TritonKernel` implements :class:`bnkit.kernels.Kernel` (pass
``kernel=TritonKernel()`` to :func:`bnkit.kernels.batch_norm`) from four primitives
(:data:`PRIMITIVES`, with the autograd functions of :mod:`bnkit.kernels.primitive`, which
the CPU kernel shares),
each one pass over memory and each a ``torch.library.triton_op`` (``bnkit_triton::*``)
that ``torch.compile`` can trace into:

- :func:`batch_stats` ``(x, mask=None) -> BatchStats``: reads x (and the mask's bytes)
  once, writes (C, blocks) partials. Per channel: the count, the shift
  ``x[0, c, 0, ...]`` (with a mask: x at the first valid position), the mean of
  ``x - shift`` and the biased variance; float32 for float16/bfloat16/float32 input,
  float64 for float64. Each program reduces its tiles exactly in registers (tile mean,
  then squared deviations from it) and merges them into a running (count, mean, M2) with
  Chan's update; a second, tiny kernel merges the (C, blocks) partials the same way (two
  passes over the partials, not over x). Never E[x^2] - E[x]^2, never a second read.
- :func:`affine` ``(x, shift, alpha, beta, activation=None, param=None) -> y``: reads x,
  writes y = act((x - shift) * alpha + beta) in x's dtype and memory format.
- :func:`backward_reduce` ``(g, src, shift, shifted_mean, ...) -> (sum g', sum g' (v -
  mean))``: reads g and src (x, or the saved output y of a memory-efficient fused
  activation), writes (C, blocks) partials, which the tiny kernel sums.
- :func:`backward_input` ``(g, src, shift, alpha, k1, k0, ...) -> dx``: reads g and src,
  writes dx = g' alpha + (v - shift) k1 + k0 (g' alpha where the mask is False).

Each primitive is one launch over the tensor (plus the tiny merge for the two
reductions), and a training step is 3 passes forward (statistics, normalization) and 5 backward
(reductions, dx), as the CPU kernel; inference is 2. The per-channel coefficients
(alpha, beta', k1, k0) are torch operations on (C,) vectors, and the running statistics
are updated in one more launch (:func:`update_running_stats`, the operator
``bnkit::update_running_stats``'s CUDA implementation; the portable kernel's arithmetic
in float64): no host synchronization anywhere, except the memory-efficient fused
activation's check that its output can be inverted
(:func:`bnkit.kernels.activation.invertible`, as in the portable kernel).

Layout: a tensor is walked as rows of a 2-D array in its own memory order. NCHW-like
input (contiguous (N, C, *)) as N rows of L = H * W values per channel: program axis 0
is the channel, axis 1 a block of rows and columns, loads contiguous along L.
Channels-last input, 2D (N, C) input and L = 1 as N * spatial rows of C values: program
axis 0 is a block of up to 128 channels, axis 1 a block of rows, loads contiguous along
C. Tiles are 2048 values; a launch aims at about 1024 programs with at least 4 tiles
each, so a large N * H * W is split over many programs per channel. Other strides are
copied to contiguous first. Values are loaded in their dtype and computed in float32
(float64 for float64); outputs are rounded once.

Activations (relu, leaky_relu with its negative slope, elu with its alpha, identity) are
fused into :func:`affine` and, as g' = g act'(z), into both backward primitives. From the
output y: leaky_relu z = y / slope where y < 0; elu z = log1p(y / alpha) and act'(z) =
y + alpha where y <= 0. Where an ELU output saturated (y = -alpha exactly: log1p(-1) =
-inf), the slope is 0 and g' is set to exactly 0, and z takes the finite value at which
the output saturates: no NaN reaches the sums or dx. (:class:`TritonKernel` does not get
there: like the portable kernel it keeps the input for a call whose ELU output comes
near -alpha; the rule matters to callers of the primitives.) The exp and log in the kernels are
Triton's ``tl.exp``/``tl.log`` on exp(z) - 1 and log(1 + q): accurate to about an ulp of
the output's scale (not of tiny values themselves, as expm1/log1p would be).

Use :func:`available` (Triton importable and a CUDA device, or the interpreter) and
:func:`forced` (``BNKIT_KERNEL=triton``) to decide on dispatch. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter (slow:
for tests); Triton reads that variable once, when it is first imported, so set it
before anything imports Triton. This package imports without Triton (and does not import
it): the kernels are built, and the custom ops registered, on first use.
"""

from __future__ import annotations

import importlib.util
import os

from bnkit.kernels.gpu.kernel import KERNEL, PRIMITIVES, TritonKernel, supports
from bnkit.kernels.gpu.primitives import (
    affine,
    backward_input,
    backward_reduce,
    batch_stats,
    interpreting,
    update_running_stats,
)

__all__ = [
    "KERNEL",
    "PRIMITIVES",
    "TritonKernel",
    "affine",
    "available",
    "backward_input",
    "backward_reduce",
    "batch_stats",
    "forced",
    "import_error",
    "supports",
    "update_running_stats",
]


def import_error() -> str | None:
    """Why Triton cannot be used (None when it is installed). Does not import it: Triton
    reads ``TRITON_INTERPRET`` once, when it is first imported."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'bnkit[gpu]')"
    return None


def available() -> bool:
    """Whether the Triton kernels can run here: Triton importable and, unless
    ``TRITON_INTERPRET=1``, a CUDA device present."""
    if import_error() is not None:
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()


def _from_environment() -> bool:
    """Whether ``BNKIT_KERNEL`` says ``triton`` (any case, surrounding spaces ignored)."""
    return os.environ.get("BNKIT_KERNEL", "").strip().lower() == "triton"


#: ``BNKIT_KERNEL=triton``, read once when bnkit is imported (every plain call asks).
FORCED = _from_environment()


def forced() -> bool:
    """Whether the environment asked for the Triton kernels: ``BNKIT_KERNEL=triton`` when
    bnkit was imported.

    Example:
        >>> import os
        >>> forced() == (os.environ.get("BNKIT_KERNEL", "").strip().lower() == "triton")
        True
    """
    return FORCED
