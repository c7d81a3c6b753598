#!/usr/bin/env bash
# The Triton kernels on an NVIDIA GPU, from a fresh checkout, in about 8 minutes:
#
#   1. a virtual environment with torch (its CUDA build), triton and bnkit[lab,dev];
#   2. tests/kernels/test_triton.py and test_ops.py compiled for the GPU
#      (BNKIT_TEST_DEVICE=cuda, no interpreter), and tests/bench/test_cuda_bench.py (the
#      benchmark's dry run and errors);
#   3. bnkit bench --device cuda (bnkit/bench/cuda.py): torch's nn.BatchNorm2d (cuDNN),
#      its torch.compile and bnkit's layer (the Triton kernels), forward and forward +
#      backward, timed interleaved on ResNet-50's batch-norm shapes at batch 256 then 32,
#      float32 and bfloat16, NCHW and channels-last, next to a device-to-device copy of
#      the input (the bandwidth floor: a copy reads and writes the tensor once; training
#      batch norm needs 8 such passes, 3 forward and 5 backward), with each training
#      step's peak memory, and bnkit's mask, ghost batch, renorm and fused leaky_relu rows;
#      every figure also goes to gpu-bench.json.
#
# Usage: bash benchmarks/gpu.sh [> gpu-report.txt]
# Environment: VENV (default $TMPDIR/bnkit-gpu-venv), PYTHON (use this interpreter, skip the install),
#   SKIP_TESTS=1, BENCH_DEVICE (default cuda; cpu: a dry run of all of it on tiny CPU
#   tensors through Triton's interpreter, tests included), BENCH_TINY=1 (one tiny shape),
#   BENCH_BUDGET_S (default 150: no new shape starts after it), BENCH_JSON (default
#   gpu-bench.json), BENCH_ARGS (more options of bnkit bench, e.g. --quick).
# Exit status: the tests' (the benchmark runs either way).
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

BENCH_DEVICE=${BENCH_DEVICE:-cuda}
interpret=0  # on a GPU the kernels are compiled
if [ "$BENCH_DEVICE" = cpu ]; then
    interpret=1
fi
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    say "tests on $BENCH_DEVICE (TRITON_INTERPRET=$interpret)"
    BNKIT_TEST_DEVICE=$BENCH_DEVICE TRITON_INTERPRET=$interpret timeout 270 \
        "$PY" -m pytest tests/kernels/test_triton.py tests/kernels/test_ops.py \
        tests/bench/test_cuda_bench.py \
        -q -p no:cacheprovider -rs --durations=5
    status=$?
    say "tests exited with $status"
fi

bench=(--budget "${BENCH_BUDGET_S:-150}")
if [ "$BENCH_DEVICE" = cpu ]; then
    bench=(--device cpu-triton)  # the dry run: tiny CPU tensors through Triton's interpreter
else
    bench+=(--device "$BENCH_DEVICE" --json "${BENCH_JSON:-gpu-bench.json}")
fi
if [ "${BENCH_TINY:-0}" = 1 ]; then
    bench+=(--shape 2x4x5x5 --repetitions 1)
fi
say "bnkit bench ${bench[*]} ${BENCH_ARGS:-}"
# shellcheck disable=SC2086  # BENCH_ARGS: extra options, split on spaces
TRITON_INTERPRET=$interpret timeout 240 "$PY" -m bnkit.bench "${bench[@]}" ${BENCH_ARGS:-}
say "bench exited with $?"
exit $status
