"""Batch norm speed on the CPU: bnkit against torch and against the memory-bandwidth floor.

Batch norm does a few flops per value, so its time is the time to move the tensor
through memory. The floor of an operation is its number of tensor-sized passes (a pass
reads or writes the tensor once) at the best bandwidth this process reaches with a copy
and a triad into preallocated buffers (torch's) and a copy with streaming stores (bnkit's
C library; ordinary stores read each output line before writing it, streaming ones do
not), measured in the same repetitions:

================================  ======  =============================================
operation                          passes  what
================================  ======  =============================================
``forward`` (training)              3       statistics (read x), normalize (read x, write y)
``eval``                            2       read x, write y
``fwd+bwd`` (training)              8       forward 3, backward: reductions 2, dx 3
``bn+relu fwd+bwd`` (training)      8       as fwd+bwd, the ReLU folded in
``bn+leaky fwd+bwd`` (training)     8       as fwd+bwd, a leaky ReLU (slope 0.01) folded in
``bn+elu fwd+bwd`` (training)       8       as fwd+bwd, an ELU folded in
================================  ======  =============================================

The last two run only when asked for (``--op``); the others are the default.

A new tensor can cost more than its pass: the operating system maps and zeroes fresh
pages on first touch (bnkit's large outputs avoid that by reusing memory it keeps,
:mod:`bnkit.kernels.outputs`; torch's do not). Each repetition also times that cost
(writing a fresh tensor against writing a preallocated one) and the table shows, beside
the floor, the floor plus the fresh outputs the operation must create (one for forward
and eval, two for the training step: y and dx) and each implementation's fraction of it.

Implementations, timed interleaved (each repetition runs every one once, so load from
other processes hits them alike; the figures are medians over repetitions of per-repetition
ratios): ``torch`` = ``torch.nn.functional.batch_norm`` (+ the activation function),
``compiled`` = ``torch.compile`` of ``torch.nn.BatchNorm*d`` (+ its module) when asked
(compiled afresh for
each row after ``torch._dynamo.reset()``, its compile time reported separately, and
bnkit's speed against it), ``bnkit`` = :func:`bnkit.functional.batch_norm` with default
options (``activation=...`` for the fused rows: the activation folded in), and with
``compiled`` also ``bnkit compiled`` = ``torch.compile`` of ``bnkit.BatchNorm*d`` (the
fused rows' with the activation). Running
statistics are updated by all of them.

Where the memory of a new output comes from matters as much as the kernel: glibc's
allocator returns a freed tensor larger than 32 MB to the operating system at once, so
the next one faults in fresh pages, which the system zeroes (a write pass of its own)
before the kernel writes them. A caching allocator keeps freed memory and hands it out
again (jemalloc and tcmalloc do; :func:`keep_freed_memory` makes glibc's do it), and
then an output costs its pass and no more: the ``+new`` columns fall to the floor.

This module measures in the current process: :mod:`bnkit.bench.cli` runs it in a fresh
process per ``THP_MEM_ALLOC_ENABLE`` setting (torch reads that variable when it starts)
and allocator setting.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import bnkit
from bnkit.functional import batch_norm

__all__ = [
    "OPERATIONS",
    "PASSES",
    "QUICK_SHAPES",
    "SHAPES",
    "Config",
    "keep_freed_memory",
    "machine",
    "measure",
    "run",
]

#: ResNet-50's batch-norm inputs at batch 32, a wide fully connected layer, a small case.
SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 112, 112),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
    (4096, 1024),
    (8, 16, 8, 8),
)
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((32, 256, 56, 56), (4096, 1024), (8, 16, 8, 8))
#: the fused rows' activation, as bnkit names it, and its torch function and module
FUSED: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor], type[torch.nn.Module]]] = {
    "bn+relu fwd+bwd": ("relu", torch.relu, torch.nn.ReLU),
    "bn+leaky fwd+bwd": ("leaky_relu", F.leaky_relu, torch.nn.LeakyReLU),
    "bn+elu fwd+bwd": ("elu", F.elu, torch.nn.ELU),
}
OPERATIONS = ("forward", "fwd+bwd", "eval", *FUSED)
#: what runs when no operation is named
DEFAULT_OPERATIONS = OPERATIONS[:4]
#: tensor-sized memory passes of each operation (the floor)
PASSES = {"forward": 3, "fwd+bwd": 8, "eval": 2, **dict.fromkeys(FUSED, 8)}
#: new tensor-sized outputs each operation must create (y; y and dx)
OUTPUTS = {"forward": 1, "fwd+bwd": 2, "eval": 1, **dict.fromkeys(FUSED, 2)}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: 16-bit activations keep float32 parameters and buffers (mixed precision)
_HALF = (torch.bfloat16, torch.float16)


@dataclass
class Config:
    """What to measure."""

    shapes: Sequence[tuple[int, ...]] = SHAPES
    layouts: Sequence[str] = ("nchw", "channels_last")
    dtypes: Sequence[str] = ("float32",)
    operations: Sequence[str] = DEFAULT_OPERATIONS
    compile: bool = False
    repetitions: int = 7
    #: each timed sample runs the operation until at least this many seconds have passed
    min_sample_s: float = 0.005
    extras: dict[str, Any] = field(default_factory=dict)


_ALLOCATOR = {"freed_memory": "returned to the system"}
#: glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> None:
    """Make this process's C allocator (glibc's malloc) keep the memory of freed tensors
    for later ones, as a caching allocator does: every block comes from the heap (no
    block is given its own mapping, which freeing would unmap) and the heap is never
    trimmed. New outputs then reuse pages instead of faulting in fresh ones.

    Raises:
        RuntimeError: the C library is not glibc (no ``mallopt``) or refused a setting.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as error:
        raise RuntimeError(f"keeping freed memory needs glibc's mallopt: {error}") from None
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        raise RuntimeError("glibc's mallopt refused M_MMAP_MAX=0 or M_TRIM_THRESHOLD")
    _ALLOCATOR["freed_memory"] = "kept by the allocator"


def machine() -> dict[str, Any]:
    """The CPU, thread count and versions the figures were taken with."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from bnkit.kernels import native

    start = time.perf_counter()
    library = native.library()
    load_s = time.perf_counter() - start
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bnkit": bnkit.__version__,
        "python": platform.python_version(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "freed_memory": _ALLOCATOR["freed_memory"],
        "native_kernel": library is not None,
        "native_error": native.load_error(),
        "native_first_call_s": round(load_s, 4),
        "native_compile_s": native.build_seconds(),
    }


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor | None:
    """x in the layout, or None where the layout does not apply (channels_last on 2D)."""
    if layout == "nchw":
        return x
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return None


def _module(
    channels: int, rank: int, dtype: torch.dtype, library: Any = torch.nn, **options: Any
) -> Any:
    """A BatchNorm1d/2d/3d of ``library`` (torch.nn or bnkit, which takes ``options``)
    for inputs of ``rank``."""
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}.get(rank, "BatchNorm3d")
    return getattr(library, name)(channels, dtype=dtype, **options)


def _candidates(
    operation: str, x: torch.Tensor, compiled: dict[str, torch.nn.Module]
) -> dict[str, Callable[[], Any]]:
    """name -> a callable running the operation once (``compiled``: name -> a compiled
    module, run as it is)."""
    channels = x.shape[1]
    dtype = x.dtype
    param_dtype = torch.float32 if dtype in _HALF else dtype
    weight = torch.ones(channels, dtype=param_dtype)
    bias = torch.zeros(channels, dtype=param_dtype)
    running = {
        name: (torch.zeros(channels, dtype=param_dtype), torch.ones(channels, dtype=param_dtype))
        for name in ("torch", "bnkit")
    }
    activation, torch_activation, _ = FUSED.get(operation, (None, None, None))

    def torch_call(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor, training: bool) -> Any:
        mean, var = running["torch"]
        y = F.batch_norm(inp, mean, var, w, b, training=training)
        return y if torch_activation is None else torch_activation(y)

    def bnkit_call(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor, training: bool) -> Any:
        mean, var = running["bnkit"]
        return batch_norm(inp, mean, var, w, b, training=training, activation=activation)

    calls: dict[str, Callable[..., Any]] = {"torch": torch_call, "bnkit": bnkit_call}
    for name, module in compiled.items():

        def compiled_call(
            inp: torch.Tensor,
            w: torch.Tensor,
            b: torch.Tensor,
            training: bool,
            module: torch.nn.Module = module,
        ) -> Any:
            return module(inp)

        calls[name] = compiled_call

    result: dict[str, Callable[[], Any]] = {}
    for name, call in calls.items():
        if operation in ("forward", "eval"):
            training = operation == "forward"

            def run_forward(call: Callable[..., Any] = call, training: bool = training) -> Any:
                with torch.no_grad():
                    return call(x, weight, bias, training)

            result[name] = run_forward
        else:
            xg = x.detach().clone().requires_grad_(True)
            wg = weight.detach().clone().requires_grad_(True)
            bg = bias.detach().clone().requires_grad_(True)
            grad = torch.randn_like(x)
            if name in compiled:
                inputs: tuple[torch.Tensor, ...] = (xg, *compiled[name].parameters())
            else:
                inputs = (xg, wg, bg)

            def run_backward(
                call: Callable[..., Any] = call,
                xg: torch.Tensor = xg,
                wg: torch.Tensor = wg,
                bg: torch.Tensor = bg,
                grad: torch.Tensor = grad,
                inputs: tuple[torch.Tensor, ...] = inputs,
            ) -> Any:
                y = call(xg, wg, bg, True)
                return torch.autograd.grad(y, inputs, grad)

            result[name] = run_backward
    return result


def _time(fn: Callable[[], Any], inner: int) -> float:
    """Seconds per call of fn, over ``inner`` calls."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def _inner(fn: Callable[[], Any], min_sample_s: float) -> int:
    """How many calls make one sample last at least ``min_sample_s``."""
    once = _time(fn, 1)
    return max(1, min(10000, math.ceil(min_sample_s / max(once, 1e-7))))


def _bandwidth_probes(x: torch.Tensor) -> dict[str, tuple[Callable[[], Any], int]]:
    """Copy (2 passes) and triad a = b + s * c (3 passes) on buffers of x's size, with
    torch; and, with bnkit's C library, a copy with streaming stores (2 passes), which
    skips the read of each output line that an ordinary store makes: with it the floor
    is the fastest a pass can move the bytes, whichever kind of store a kernel uses."""
    from bnkit.kernels import native

    flat = x.detach().reshape(-1)
    a, b, c = (torch.empty_like(flat) for _ in range(3))
    b.copy_(flat)
    c.copy_(flat)
    probes: dict[str, tuple[Callable[[], Any], int]] = {
        "copy": (lambda: a.copy_(b), 2),
        "triad": (lambda: torch.add(b, c, alpha=0.5, out=a), 3),
    }
    lib = native.library()
    if lib is not None:
        nbytes = flat.numel() * flat.element_size()
        threads = torch.get_num_threads()
        probes["streaming copy"] = (
            lambda: lib.bn_stream_copy(b.data_ptr(), a.data_ptr(), nbytes, threads),
            2,
        )
    return probes


def _fresh_output_probes(x: torch.Tensor) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Writing a new tensor of x's size, and writing a preallocated one: the difference is
    what a new output costs beyond its pass (mapping and zeroing its pages)."""
    kept = torch.empty_like(x)
    return (lambda: torch.empty_like(x).fill_(1.0)), (lambda: kept.fill_(1.0))


def _compile_module(
    x: torch.Tensor, operation: str, training: bool, library: Any = torch.nn
) -> tuple[torch.nn.Module, float]:
    """torch.compile'd BatchNorm of ``library`` (torch.nn, + the fused row's activation
    module; or bnkit, the activation fused) for x, and the seconds its first call took
    (from a reset compiler: no graph or recompilation budget carried over from another
    row)."""
    torch._dynamo.reset()
    dtype = torch.float32 if x.dtype in _HALF else x.dtype
    fused = library is bnkit and operation in FUSED
    options = {"activation": FUSED[operation][0]} if fused else {}
    layers: list[torch.nn.Module] = [_module(x.shape[1], x.dim(), dtype, library, **options)]
    if operation in FUSED and not fused:
        layers.append(FUSED[operation][2]())
    module = torch.nn.Sequential(*layers)
    if x.dtype in _HALF:
        module = module.to(x.dtype)
    module.train(training)
    compiled: torch.nn.Module = torch.compile(module)  # type: ignore[assignment]
    start = time.perf_counter()
    if training:
        xg = x.detach().clone().requires_grad_(True)
        y = compiled(xg)
        torch.autograd.grad(y, (xg, *compiled.parameters()), torch.ones_like(y))
    else:
        with torch.no_grad():
            compiled(x)
    return compiled, time.perf_counter() - start


def measure(
    shape: tuple[int, ...], layout: str, dtype_name: str, operation: str, config: Config
) -> dict[str, Any] | None:
    """One row: per implementation the median time, the median ratio to torch's time and
    the median fraction of the floor, over interleaved repetitions. None if ``layout``
    does not apply to ``shape``."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator).to(dtype)
    x = _layout(base, layout)
    if x is None:
        return None
    compiled: dict[str, torch.nn.Module] = {}
    compile_s = None
    if config.compile:
        compiled["compiled"], compile_s = _compile_module(x, operation, operation != "eval")
        compiled["bnkit compiled"], _ = _compile_module(x, operation, operation != "eval", bnkit)
    candidates = _candidates(operation, x, compiled)
    probes = _bandwidth_probes(x)
    fresh, kept = _fresh_output_probes(x)
    nbytes = x.numel() * x.element_size()
    for fn in candidates.values():  # warm up: first calls allocate, compile, load
        fn()
    inner = {name: _inner(fn, config.min_sample_s) for name, fn in candidates.items()}
    probe_inner = {name: _inner(fn, config.min_sample_s) for name, (fn, _) in probes.items()}
    fresh_inner = _inner(fresh, config.min_sample_s)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    bandwidth: list[float] = []
    by_probe: dict[str, list[float]] = {name: [] for name in probes}
    new_output: list[float] = []
    for _ in range(config.repetitions):
        for name, (fn, passes) in probes.items():
            by_probe[name].append(passes * nbytes / _time(fn, probe_inner[name]))
        bandwidth.append(max(values[-1] for values in by_probe.values()))
        new_output.append(max(0.0, _time(fresh, fresh_inner) - _time(kept, fresh_inner)))
        for name, fn in candidates.items():
            times[name].append(_time(fn, inner[name]))
    floor = [PASSES[operation] * nbytes / bw for bw in bandwidth]
    with_outputs = [f + OUTPUTS[operation] * n for f, n in zip(floor, new_output, strict=True)]
    row: dict[str, Any] = {
        "shape": list(shape),
        "layout": layout,
        "dtype": dtype_name,
        "operation": operation,
        "megabytes": nbytes / 1e6,
        "bandwidth_gbs": statistics.median(bandwidth) / 1e9,
        "probe_bandwidth_gbs": {
            name: statistics.median(values) / 1e9 for name, values in by_probe.items()
        },
        "floor_ms": statistics.median(floor) * 1e3,
        "new_output_ms": statistics.median(new_output) * 1e3,
        "floor_with_outputs_ms": statistics.median(with_outputs) * 1e3,
        "compile_s": compile_s,
        "results": {},
    }
    for name, samples in times.items():
        ratios = [t / ref for t, ref in zip(samples, times["torch"], strict=True)]
        of_floor = [f / t for f, t in zip(floor, samples, strict=True)]
        of_with = [f / t for f, t in zip(with_outputs, samples, strict=True)]
        row["results"][name] = {
            "ms": statistics.median(samples) * 1e3,
            "vs_torch": statistics.median(ratios),
            "of_floor": statistics.median(of_floor),
            "of_floor_with_outputs": statistics.median(of_with),
        }
        if "compiled" in times:
            to_compiled = [t / c for t, c in zip(samples, times["compiled"], strict=True)]
            row["results"][name]["vs_compiled"] = statistics.median(to_compiled)
    return row


def run(config: Config, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every (shape, layout, dtype, operation) row; ``report`` sees each row."""
    rows = []
    for shape in config.shapes:
        for layout in config.layouts:
            for dtype_name in config.dtypes:
                for operation in config.operations:
                    row = measure(tuple(shape), layout, dtype_name, operation, config)
                    if row is None:
                        continue
                    rows.append(row)
                    if report is not None:
                        report(row)
    return {"machine": machine(), "rows": rows}
