"""Batch norm speed and memory on a CUDA GPU: ``bnkit bench --device cuda``.

Contenders, timed interleaved in one process (each repetition runs every contender of a
row once, in turn, so clock and thermal drift hit them alike; the figures are medians,
and ratios are medians of per-repetition ratios measured in the same run):

- ``copy``: a device-to-device copy of the input into a preallocated tensor, the
  bandwidth floor. A copy reads and writes the tensor once: 2 tensor-sized passes.
- ``torch``: ``torch.nn.BatchNorm2d`` in eager mode (cuDNN or torch's native CUDA
  kernels, whichever torch picks).
- ``compiled``: ``torch.compile`` of the same layer (``dynamic=False``, compiled afresh
  for every shape after ``torch._dynamo.reset()``; the first call's seconds are reported
  as ``compile_s`` and not timed).
- ``bnkit``: :class:`bnkit.BatchNorm2d`, which on a CUDA tensor runs the Triton kernels of
  :mod:`bnkit.kernels.gpu` (the report's ``kernel`` names what it actually dispatched to).

Parameters and running statistics are float32 for every dtype (as under autocast). Rows,
per (shape, layout, dtype):

=====================  ======  ====================================================
row                    passes  contenders (the first after ``copy`` is the reference)
=====================  ======  ====================================================
``forward``            3       torch, compiled, bnkit (training mode, no autograd)
``fwd+bwd``            8       torch, compiled, bnkit (a training step: y, then dx,
                               dweight, dbias with ``torch.autograd.grad``)
``options fwd+bwd``    8       bnkit, bnkit with a mask (about 90% valid), with ghost
                               batches (a quarter of the batch each), with renorm
``leaky_relu fwd+bwd`` 8       torch BatchNorm2d + LeakyReLU(0.01), bnkit fused
=====================  ======  ====================================================

Training batch norm moves 8 tensor-sized passes (forward: statistics read x, normalize
reads x and writes y; backward: the two reductions read g and x, dx reads g and x and
writes dx), so a contender's effective bandwidth is ``passes * bytes / time`` and its
fraction of the floor is that over the copy's bandwidth (the copy's time per pass times
the passes, over the contender's time). Shapes whose tensors fit in the L2 cache (batch
32's later stages on an H100) can beat the HBM bandwidth; the copy measured on the same
tensor sees the same cache.

Peak memory of a training step (``fwd+bwd`` rows): ``torch.cuda.max_memory_allocated``
after ``torch.cuda.reset_peak_memory_stats``, less what was allocated before the step,
reported as a multiple of the input's size.

Dry run without a GPU: ``bnkit bench --device cpu-triton`` (not listed in ``--help``)
runs the same code on tiny CPU tensors with ``BNKIT_KERNEL=triton TRITON_INTERPRET=1``
(set in a fresh process when this one lacks them; Triton and bnkit read them once), so
that bnkit's layer goes through the Triton kernels in Triton's interpreter. Only
:class:`Device` differs: ``time.perf_counter`` after each sample instead of CUDA events,
no peak memory (``None``), and ``torch.compile(backend="aot_eager")`` instead of
inductor (which would build C++ for the CPU). Its timings mean nothing; it checks that
the benchmark runs end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import bnkit

__all__ = [
    "DRY_RUN_SHAPES",
    "QUICK_SHAPES",
    "ROWS",
    "SHAPES",
    "Device",
    "Options",
    "dry_run_environment",
    "format_row",
    "run",
    "run_command",
]

#: ResNet-50's batch-norm inputs (one per stage) at batch 256 and 32
SHAPES: tuple[tuple[int, int, int, int], ...] = tuple(
    (n, c, hw, hw)
    for n in (256, 32)
    for c, hw in ((64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7))
)
QUICK_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (256, 256, 56, 56),
    (256, 1024, 14, 14),
    (32, 256, 56, 56),
    (32, 2048, 7, 7),
)
DRY_RUN_SHAPES: tuple[tuple[int, int, int, int], ...] = ((2, 3, 2, 2),)
ROWS = ("forward", "fwd+bwd", "options fwd+bwd", "leaky_relu fwd+bwd")
PASSES = {"forward": 3, "fwd+bwd": 8, "options fwd+bwd": 8, "leaky_relu fwd+bwd": 8}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the environment of the dry run
DRY_RUN_ENV = {"BNKIT_KERNEL": "triton", "TRITON_INTERPRET": "1"}


@dataclass(frozen=True)
class Options:
    """What to measure, and how long to try."""

    shapes: Sequence[tuple[int, ...]] = SHAPES
    layouts: Sequence[str] = ("nchw", "channels_last")
    dtypes: Sequence[str] = ("float32", "bfloat16")
    rows: Sequence[str] = ROWS
    repetitions: int = 7
    #: each timed sample repeats the call until it lasts at least this long
    min_sample_s: float = 0.005
    #: no new (shape, layout, dtype) starts after this many seconds; None: no limit
    budget_s: float | None = 240.0
    #: untimed calls of each contender before its samples (the first compiles)
    warm_up_calls: int = 2


@dataclass(frozen=True)
class Device:
    """What differs between a CUDA run and the CPU dry run: where tensors live, how time
    and peak memory are measured, and the compiler backend."""

    type: str = "cuda"

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def compile_backend(self) -> str:
        return "inductor" if self.cuda else "aot_eager"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], Any], calls: int) -> float:
        """Seconds per call over ``calls`` back-to-back calls (CUDA events on a GPU)."""
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - start) / calls
        begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end)) / 1e3 / calls

    def peak_bytes(self, fn: Callable[[], Any]) -> int | None:
        """The most bytes allocated at once during one call, beyond what was allocated
        before it; None where it cannot be measured (the CPU)."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)

    def release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "device": self.type,
            "torch": torch.__version__,
            "bnkit": bnkit.__version__,
            "python": platform.python_version(),
            "compile_backend": self.compile_backend,
        }
        if self.cuda:
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
        else:
            info["gpu"] = "none: CPU dry run through Triton's interpreter"
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
        return info


def dry_run_environment() -> bool:
    """Whether this process runs bnkit's Triton kernels on CPU tensors (the dry run):
    ``BNKIT_KERNEL=triton`` and ``TRITON_INTERPRET=1`` were set before bnkit and Triton
    read them."""
    from bnkit.kernels import gpu

    if any(os.environ.get(key) != value for key, value in DRY_RUN_ENV.items()):
        return False
    return gpu.forced() and gpu.available()


@dataclass
class Case:
    """The tensors of one (shape, layout, dtype): input, upstream gradient, mask."""

    shape: tuple[int, ...]
    layout: str
    dtype: str
    x: torch.Tensor
    grad: torch.Tensor
    mask: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()


def make_case(shape: tuple[int, ...], layout: str, dtype: str, device: Device) -> Case:
    generator = torch.Generator().manual_seed(0)
    x = (0.5 + 2 * torch.randn(shape, generator=generator)).to(device.type, DTYPES[dtype])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.rand((shape[0], *shape[2:]), generator=generator) < 0.9
    mask[0].view(-1)[:2] = True  # at least two valid values per channel
    x.requires_grad_(True)
    return Case(shape, layout, dtype, x, torch.randn_like(x), mask.to(device.type))


def _forward(module: torch.nn.Module, case: Case) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return module(case.x)

    return call


def _step(module: torch.nn.Module, case: Case, mask: bool = False) -> Callable[[], Any]:
    """A training step: the output, then the gradients of x and the parameters."""
    inputs = (case.x, *module.parameters())

    def call() -> Any:
        y = module(case.x, case.mask) if mask else module(case.x)
        return torch.autograd.grad(y, inputs, case.grad)

    return call


def _compiled(case: Case, device: Device) -> torch.nn.Module:
    torch._dynamo.reset()
    layer = torch.nn.BatchNorm2d(case.shape[1], device=device.type)
    compiled: torch.nn.Module = torch.compile(  # type: ignore[assignment]
        layer, backend=device.compile_backend, dynamic=False
    )
    return compiled


def contenders(row: str, case: Case, device: Device) -> dict[str, Callable[[], Any]]:
    """name -> one call of the row's operation; the first is the reference."""
    channels = case.shape[1]
    on = device.type
    if row in ("forward", "fwd+bwd"):
        make = _forward if row == "forward" else _step
        if "compiled" not in case.extras:  # one compiled layer per case, for both rows
            case.extras["compiled"] = _compiled(case, device)
        modules = {
            "torch": torch.nn.BatchNorm2d(channels, device=on),
            "compiled": case.extras["compiled"],
            "bnkit": bnkit.BatchNorm2d(channels, device=on),
        }
        return {name: make(module, case) for name, module in modules.items()}
    if row == "options fwd+bwd":
        ghost = max(1, case.shape[0] // 4)
        renorm = bnkit.Renorm(warmup_steps=0, r_max_steps=0, d_max_steps=0)
        return {
            "bnkit": _step(bnkit.BatchNorm2d(channels, device=on), case),
            "bnkit mask": _step(bnkit.BatchNorm2d(channels, device=on), case, mask=True),
            "bnkit ghost": _step(
                bnkit.BatchNorm2d(channels, device=on, ghost_batch_size=ghost), case
            ),
            "bnkit renorm": _step(bnkit.BatchNorm2d(channels, device=on, renorm=renorm), case),
        }
    if row == "leaky_relu fwd+bwd":
        pair = torch.nn.Sequential(
            torch.nn.BatchNorm2d(channels, device=on), torch.nn.LeakyReLU(0.01)
        )
        fused = bnkit.BatchNorm2d(channels, device=on, activation="leaky_relu")
        return {"torch+leaky_relu": _step(pair, case), "bnkit leaky_relu": _step(fused, case)}
    raise ValueError(f"unknown row {row!r}; expected one of {ROWS}")


def _copy(case: Case) -> Callable[[], Any]:
    source = case.x.detach()
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def _warm_up(
    calls: dict[str, Callable[[], Any]], device: Device, times: int
) -> tuple[dict[str, float], dict[str, str]]:
    """Call each ``times`` times (the first call compiles); the first call's seconds per
    name, and the errors of those that failed (dropped from ``calls``)."""
    first: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in list(calls.items()):
        try:
            device.sync()
            start = time.perf_counter()
            fn()
            device.sync()
            first[name] = time.perf_counter() - start
            for _ in range(times - 1):
                fn()
        except Exception as error:  # one contender failing must not stop the others
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            del calls[name]
    return first, errors


def _calls_per_sample(fn: Callable[[], Any], device: Device, min_sample_s: float) -> int:
    if min_sample_s <= 0:
        return 1
    once = device.seconds(fn, 1)
    return max(1, min(1000, math.ceil(min_sample_s / max(once, 1e-7))))


def interleave(
    calls: dict[str, Callable[[], Any]], device: Device, options: Options
) -> dict[str, list[float]]:
    """Seconds per call of each, one sample per repetition, the contenders alternating."""
    counts = {
        name: _calls_per_sample(fn, device, options.min_sample_s) for name, fn in calls.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(options.repetitions):
        for name, fn in calls.items():
            samples[name].append(device.seconds(fn, counts[name]))
    return samples


def _summary(
    samples: list[float], reference: list[float], copy: list[float], passes: int, nbytes: int
) -> dict[str, Any]:
    median = statistics.median(samples)
    return {
        "ms": median * 1e3,
        "vs_reference": statistics.median(r / t for r, t in zip(reference, samples, strict=True)),
        "gbs": passes * nbytes / median / 1e9,
        "of_floor": statistics.median(
            passes / 2 * c / t for c, t in zip(copy, samples, strict=True)
        ),
        "peak_mb": None,
        "peak_vs_input": None,
    }


def measure_row(row: str, case: Case, device: Device, options: Options) -> dict[str, Any]:
    """One row: per contender its median time, speed against the reference (the row's
    first contender; 2.0 = twice as fast), effective GB/s, fraction of the copy floor and,
    for a training step, peak memory."""
    calls = contenders(row, case, device)
    reference = next(iter(calls))
    first, errors = _warm_up(calls, device, options.warm_up_calls)
    passes = PASSES[row]
    result: dict[str, Any] = {
        "shape": list(case.shape),
        "layout": case.layout,
        "dtype": case.dtype,
        "row": row,
        "passes": passes,
        "megabytes": case.nbytes / 1e6,
        "reference": reference,
        "compile_s": first.get("compiled"),
        "errors": errors,
        "results": {},
    }
    if reference not in calls:
        return result
    samples = interleave({"copy": _copy(case), **calls}, device, options)
    copy = samples.pop("copy")
    result["copy_ms"] = statistics.median(copy) * 1e3
    result["copy_gbs"] = 2 * case.nbytes / statistics.median(copy) / 1e9
    for name, times in samples.items():
        summary = _summary(times, samples[reference], copy, passes, case.nbytes)
        if row != "forward":
            peak = device.peak_bytes(calls[name])
            if peak is not None:
                summary["peak_mb"] = peak / 1e6
                summary["peak_vs_input"] = peak / case.nbytes
        result["results"][name] = summary
    return result


def _cases(options: Options) -> list[tuple[tuple[int, ...], str, str]]:
    return [
        (tuple(shape), layout, dtype)
        for shape in options.shapes
        for dtype in options.dtypes
        for layout in options.layouts
    ]


def kernel_name(device: Device) -> str:
    """What runs bnkit's passes for a tensor on ``device``: the native passes behind its
    operators ("Triton" expected), else the kernel's class (``PortableKernel``)."""
    from bnkit.kernels import ops, select_kernel

    x = torch.zeros(2, 2, 2, 2, device=device.type)
    passes = ops.native_passes(x)
    if select_kernel(x) is not ops.KERNEL or passes is None:
        return type(select_kernel(x)).__name__
    return passes.name


def run(
    options: Options,
    device: Device,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every (shape, layout, dtype) and row; ``report`` sees each row as it comes.
    Cases not started because the budget ran out are listed under ``skipped``."""
    started = time.perf_counter()
    machine = {**device.describe(), "kernel": kernel_name(device)}
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for shape, layout, dtype in _cases(options):
        if options.budget_s is not None and time.perf_counter() - started > options.budget_s:
            skipped.append({"shape": list(shape), "layout": layout, "dtype": dtype})
            continue
        case = make_case(shape, layout, dtype, device)
        for row in options.rows:
            result = measure_row(row, case, device, options)
            rows.append(result)
            if report is not None:
                report(result)
        del case
        device.release()
    seconds = time.perf_counter() - started
    return {"machine": machine, "rows": rows, "skipped": skipped, "seconds": seconds}


_DTYPE_TAGS = {"float32": "f32", "bfloat16": "bf16"}


def format_machine(machine: dict[str, Any]) -> str:
    """One line: the GPU, versions, and the kernel bnkit's layer runs."""
    return (
        f"{machine['gpu']}; torch {machine['torch']} (CUDA {machine.get('cuda')}, cuDNN "
        f"{machine.get('cudnn')}), triton {machine['triton']}, bnkit {machine['bnkit']}: "
        f"{machine['kernel']}; torch.compile backend {machine['compile_backend']}"
    )


def header() -> str:
    return (
        f"{'shape':<16s}{'layout':<7s}{'dtype':<6s}{'row':<20s}{'contender':<18s}"
        f"{'ms':>9s}{'speed':>8s}{'GB/s':>8s}{'floor':>7s}{'peak':>8s}"
    )


def format_row(row: dict[str, Any]) -> list[str]:
    """Lines for a row: the copy floor, then per contender its median time, speed against
    the row's reference, effective GB/s, % of the copy floor and peak memory as a multiple
    of the input (training steps on a GPU)."""
    shape = "x".join(str(d) for d in row["shape"])
    layout = "nchw" if row["layout"] == "nchw" else "cl"
    lead = f"{shape:<16s}{layout:<7s}{_DTYPE_TAGS.get(row['dtype'], row['dtype']):<6s}"
    lead += f"{row['row']:<20s}"
    lines = []
    if "copy_ms" in row:
        lines.append(
            f"{lead}{'copy (floor)':<18s}{row['copy_ms']:9.3f}{'':>8s}{row['copy_gbs']:8.0f}"
            f"{1:7.0%}"
        )
    for name, result in row["results"].items():
        peak = result["peak_vs_input"]
        lines.append(
            f"{lead}{name:<18s}{result['ms']:9.3f}{result['vs_reference']:7.2f}x"
            f"{result['gbs']:8.0f}{result['of_floor']:7.0%}"
            + (f"{peak:7.1f}x" if peak is not None else f"{'-':>8s}")
        )
    for name, error in row["errors"].items():
        lines.append(f"{lead}{name:<18s}failed: {error}")
    if row.get("compile_s") is not None:
        lines.append(f"{lead}{'compiled':<18s}first call (compile) {row['compile_s']:.1f} s")
    return lines


# The command line: ``bnkit bench --device cuda`` (bnkit.bench.cli hands it over).

#: options of ``bnkit bench`` that only the CPU benchmark reads -> their defaults
_CPU_ONLY = {"op": None, "thp": "on", "reuse_memory": "off", "memory": False, "sync": False}


def _problem(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot run on this device (one line), or None."""
    for name, default in _CPU_ONLY.items():
        if getattr(args, name, default) != default:
            return f"--{name.replace('_', '-')} applies to --device cpu only"
    for shape in args.shape or ():
        if len(shape) != 4:
            return f"--device {args.device} measures BatchNorm2d: shapes N x C x H x W, got {shape}"
    if args.dtype and not set(args.dtype) <= set(DTYPES):
        return f"--device {args.device} measures float32 and bfloat16"
    if args.device == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"--device cuda: no CUDA device available (torch {torch.__version__}, {built})"
    if args.json:
        from bnkit.bench.cli import _unwritable

        if reason := _unwritable(args.json):
            return f"cannot write --json {args.json}: {reason}"
    return None


def options_from(args: argparse.Namespace) -> Options:
    """The options ``bnkit bench`` arguments ask for on a GPU or in the dry run."""
    dry = args.device == "cpu-triton"
    default_shapes = DRY_RUN_SHAPES if dry else QUICK_SHAPES if args.quick else SHAPES
    default_budget = None if dry else 100.0 if args.quick else 240.0
    default_repetitions = 1 if dry else 5 if args.quick else 7
    return Options(
        shapes=args.shape or default_shapes,
        layouts=args.layout or ("nchw", "channels_last"),
        dtypes=args.dtype or tuple(DTYPES),
        repetitions=args.repetitions or default_repetitions,
        min_sample_s=0.0 if dry else 0.005,
        budget_s=args.budget or default_budget,
        warm_up_calls=1 if dry else 2,
    )


def _in_dry_run_process(argv: Sequence[str]) -> int:
    """Run the same command in a fresh interpreter with the dry run's environment (Triton
    and bnkit read it once, when imported)."""
    command = [sys.executable, "-m", "bnkit.bench", *(item for item in argv if item != "bench")]
    return subprocess.run(command, env={**os.environ, **DRY_RUN_ENV}, check=False).returncode


def run_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``bnkit bench --device cuda`` (or the ``cpu-triton`` dry run): print the table,
    write ``--json``; 1 with one line on stderr when it cannot run."""
    if problem := _problem(args):
        print(f"bnkit bench: {problem}", file=sys.stderr)
        return 1
    if args.device == "cpu-triton" and not dry_run_environment():
        return _in_dry_run_process(argv)
    device = Device("cuda" if args.device == "cuda" else "cpu")
    options = options_from(args)
    print(format_machine({**device.describe(), "kernel": kernel_name(device)}), flush=True)
    print(header(), flush=True)
    report = run(options, device, lambda row: print("\n".join(format_row(row)), flush=True))
    if report["skipped"]:
        print(
            f"(stopped after {options.budget_s:.0f} s, the budget: {len(report['skipped'])} "
            "shape/layout/dtype combinations not measured)"
        )
    print(f"done in {report['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return 0
