"""Which kernel runs where, and building the native code ahead of time.

``bnkit doctor`` prints, for each device present and each input dtype, the kernel
:func:`bnkit.kernels.select_kernel` picks for a plain training call and why;
``bnkit build`` compiles the native CPU code now (for containers, clusters and CI, where
the first call should not pay for it) and says where it went and how long it took.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

__all__ = ["Choice", "build", "describe"]

DTYPES = ("float32", "float64", "bfloat16", "float16")


class Choice(NamedTuple):
    """The kernel a device and dtype get, and why."""

    device: str
    dtype: str
    kernel: str
    why: str


def _devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


#: the autograd node of a plain express call's output -> the path that ran it
_EXPRESS = {
    "CppFunction": "express: bnkit::batch_norm (C++, fast.cpp) calling the native C loops",
}


def _why_portable(device: str) -> str:
    from bnkit.kernels import gpu, native

    if device == "cpu":
        if native.library() is None:
            return f"portable torch operations: native loops unavailable ({native.load_error()})"
        return "portable torch operations (no native loop for this case)"
    if device == "cuda":
        return f"portable torch operations: {gpu.import_error() or 'Triton declined it'}"
    return "portable torch operations (no kernel specific to this device)"


def describe() -> list[Choice]:
    """What runs a plain training call of ``bnkit.BatchNorm2d(64)`` on a contiguous
    (32, 64, 8, 8) input, for each device present and each input dtype: observed from the
    autograd node the call leaves on its output, so it is what ran, not what should."""
    import torch

    import bnkit
    from bnkit.kernels import ops

    rows = []
    for device in _devices():
        for name in DTYPES:
            dtype = getattr(torch, name)
            layer = bnkit.BatchNorm2d(64, device=device)  # float32 parameters, as AMP keeps them
            if dtype == torch.float64:
                layer = layer.double()
            x = torch.randn(32, 64, 8, 8, device=device).to(dtype).requires_grad_()
            grad_fn = layer(x).grad_fn
            node = type(grad_fn).__name__
            if node in _EXPRESS:
                why = _EXPRESS[node]
            elif getattr(grad_fn, "prims", None) is ops.OPERATORS:
                passes = ops.native_passes(x)
                prims = "composite torch operations" if passes is None else passes.name
                why = f"bnkit operators (bnkit.kernels.ops) running the {prims}"
            else:
                why = _why_portable(device)
            rows.append(Choice(device, name, node.removesuffix("Backward"), why))
    return rows


def build() -> list[str]:
    """Compile (or find in the cache) the native code now. Returns one line: where it is
    and how long it took.

    Raises:
        RuntimeError: it cannot be built or loaded; the message says why.
    """
    from bnkit.kernels import native

    if os.environ.get("BNKIT_NATIVE", "1") == "0":
        raise RuntimeError("BNKIT_NATIVE=0 turns the native code off")
    start = time.perf_counter()
    extension = native.extension()
    if extension is None:
        raise RuntimeError(f"the native code cannot be built: {native.load_error()}")
    where = getattr(extension, "__file__", "?")
    return [f"native CPU kernels  {where}  ({time.perf_counter() - start:.1f} s)"]
