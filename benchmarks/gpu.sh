#!/usr/bin/env bash
# The Triton kernels on an NVIDIA GPU, from a fresh checkout, in about 8 minutes:
#
#   1. a virtual environment with torch (its CUDA build), triton and bnkit[lab,dev];
#   2. tests/kernels/test_triton.py compiled for the GPU (BNKIT_TEST_DEVICE=cuda, no
#      interpreter);
#   3. timings: torch's nn.BatchNorm2d against TritonKernel, forward + backward, on
#      ResNet-50's batch-norm shapes at batch 32 and 256, NCHW and channels-last, float32
#      and bfloat16, next to a device-to-device copy of the input (the bandwidth floor:
#      a copy reads and writes the tensor once; training batch norm needs 8 such passes,
#      3 forward and 5 backward), with the peak memory of each.
#
# Usage: bash benchmarks/gpu.sh [> gpu-report.txt]
# Environment: VENV (default $TMPDIR/bnkit-gpu-venv), PYTHON (use this interpreter, skip the install),
#   SKIP_TESTS=1, BENCH_DEVICE (default cuda), BENCH_TINY=1 (one tiny shape: a dry run,
#   e.g. BENCH_DEVICE=cpu TRITON_INTERPRET=1), BENCH_BUDGET_S (default 150).
# Exit status: the tests' (the timings run either way).
set -uo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
say() { echo "== [$(($(date +%s) - started))s] $*"; }

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
else
    VENV=${VENV:-${TMPDIR:-/tmp}/bnkit-gpu-venv}
    say "installing into $VENV"
    # --system-site-packages: a preinstalled CUDA torch/triton is used if pip cannot fetch one
    python3 -m venv --system-site-packages "$VENV" || exit 1
    PY=$VENV/bin/python
    if ! "$PY" -m pip install -q torch triton -e '.[lab,dev]'; then
        say "pip install failed; trying bnkit alone on what is installed"
        "$PY" -m pip install -q --no-deps -e . || exit 1
    fi
fi

"$PY" - <<'PY' || exit 1
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
import triton

print("triton", triton.__version__)
PY

status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    say "tests on cuda (compiled kernels)"
    BNKIT_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 270 \
        "$PY" -m pytest tests/kernels/test_triton.py -q -p no:cacheprovider -rs --durations=5
    status=$?
    say "tests exited with $status"
fi

say "timings"
timeout 200 "$PY" - <<'PY'
"""nn.BatchNorm2d against TritonKernel, training forward + backward, with a copy floor."""

import os
import time

import torch

from bnkit.kernels import batch_norm
from bnkit.kernels.gpu import TritonKernel

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
TINY = os.environ.get("BENCH_TINY", "0") == "1"
BUDGET = float(os.environ.get("BENCH_BUDGET_S", "150"))
CUDA = DEVICE == "cuda"
# ResNet-50's batch norms (channels, height = width), one of each kind of stage.
SHAPES = [(4, 5)] if TINY else [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)]
BATCHES = [2] if TINY else [256, 32]
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
KERNEL = TritonKernel()
start = time.perf_counter()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, iters: int) -> float:
    """Mean milliseconds per call after two warm-up calls (the first compiles)."""
    fn()
    fn()
    sync()
    if CUDA:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def peak(fn) -> float:
    """Peak memory above what was allocated before one call, MiB."""
    if not CUDA:
        return float("nan")
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def case(n: int, c: int, hw: int, dtype: torch.dtype, layout: str) -> str:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    x = 0.5 + 2 * x
    g = torch.randn_like(x)
    x.requires_grad_(True)
    module = torch.nn.BatchNorm2d(c).to(DEVICE)  # float32 parameters, as with autocast
    weight = torch.nn.Parameter(torch.ones(c, device=DEVICE, dtype=dtype))
    bias = torch.nn.Parameter(torch.zeros(c, device=DEVICE, dtype=dtype))
    running = (torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE))

    # x.grad = None first: a gradient accumulated into x.grad would add a pass to both.
    def torch_step() -> torch.Tensor:
        x.grad = None
        y = module(x)
        y.backward(g)
        return y

    def triton_step() -> torch.Tensor:
        x.grad = None
        y = batch_norm(
            x, *running, weight, bias, use_batch_stats=True, momentum=0.1, eps=1e-5,
            kernel=KERNEL,
        ).output
        y.backward(g)
        return y

    def copy() -> torch.Tensor:
        return x.detach().clone(memory_format=torch.preserve_format)

    # Agreement first (a wrong kernel is not worth timing).
    y_torch = torch_step()
    dx_torch = x.grad.clone()
    y_ours = triton_step()
    dx_ours = x.grad.clone()
    assert y_ours.stride() == y_torch.stride(), (y_ours.stride(), y_torch.stride())
    dy_err = (y_ours.float() - y_torch.float()).abs().max().item()
    dx_err = (dx_ours.float() - dx_torch.float()).abs().max().item() / max(
        1e-30, dx_torch.float().abs().max().item()
    )
    numel = x.numel()
    iters = 3 if TINY else max(5, min(50, int(2e9 / (numel * x.element_size() * 8))))
    t_copy = timed(copy, iters)
    t_torch = timed(torch_step, iters)
    t_ours = timed(triton_step, iters)
    m_torch = peak(torch_step)
    m_ours = peak(triton_step)
    pass_ms = t_copy / 2  # one read or one write of the tensor
    gbps = 2 * numel * x.element_size() / (t_copy * 1e-3) / 1e9
    name = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    return (
        f"{n:>4} {c:>5} {hw:>4} {name:>5} {layout:>13} | copy {t_copy:8.3f} ms {gbps:7.0f} GB/s"
        f" | torch {t_torch:8.3f} ms {t_torch / pass_ms:5.1f} passes {m_torch:8.1f} MiB"
        f" | triton {t_ours:8.3f} ms {t_ours / pass_ms:5.1f} passes {m_ours:8.1f} MiB"
        f" | x{t_torch / t_ours:5.2f} | err y {dy_err:.1e} dx {dx_err:.1e}"
    )


print(
    "   N     C   HW dtype        layout | copy (bandwidth floor) | nn.BatchNorm2d fwd+bwd"
    " | TritonKernel fwd+bwd | speed-up | max error vs torch (y abs, dx rel)"
)
print("passes = time / (copy time / 2); training batch norm needs 8 (3 forward, 5 backward)")
for n in BATCHES:
    for c, hw in SHAPES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                if time.perf_counter() - start > BUDGET:
                    print(f"(stopped: {BUDGET:.0f} s budget spent)")
                    raise SystemExit(0)
                try:
                    print(case(n, c, hw, dtype, layout), flush=True)
                except Exception as error:  # report and go on to the next shape
                    print(f"{n} {c} {hw} {dtype} {layout}: {type(error).__name__}: {error}")
                finally:
                    if CUDA:
                        torch.cuda.empty_cache()
print(f"done in {time.perf_counter() - start:.0f} s on {DEVICE}")
PY
say "timings exited with $?"
exit $status
