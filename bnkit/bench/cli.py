"""``bnkit bench``: batch norm speed against torch and the memory-bandwidth floor.

    bnkit bench [--quick] [--compile] [--memory] [--sync] [--json FILE]
    python -m bnkit.bench ...

Measures forward (training), forward + backward, eval and fused BN + ReLU forward +
backward for ResNet-50's batch-norm shapes at batch 32, (4096, 1024) and (8, 16, 8, 8), in
NCHW and channels-last layouts (see :mod:`bnkit.bench.speed` for the method), and prints a
table: per implementation its median time, its speed relative to torch eager (``2.00x``:
twice as fast; interleaved repetitions, median of per-repetition ratios) and the fraction
of the bandwidth floor it reaches. The measurements run in a fresh process with
``THP_MEM_ALLOC_ENABLE=1`` (torch then backs large CPU allocations with transparent huge
pages, which saves page faults on fresh buffers); ``--thp both`` measures with torch's
default (off) too. ``--reuse-memory on`` makes the measuring process's allocator keep
freed memory for new tensors (as jemalloc or tcmalloc do; glibc's returns blocks over
32 MB to the system, and each new output then faults in fresh, zeroed pages), which
shows the kernels' speed without that cost; ``both`` measures each way.

``--device cuda`` measures on a GPU instead (see :mod:`bnkit.bench.cuda`): torch's
``BatchNorm2d`` (cuDNN), its ``torch.compile`` and bnkit's layer (the Triton kernels),
forward and forward + backward, with bnkit's mask, ghost batch, renorm and fused
leaky_relu rows, against a device-to-device copy, with each training step's peak memory;
``--quick`` (4 shapes, about 2 minutes on an H100) and ``--budget`` bound its time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, TextIO

from bnkit._cli import PlainParser, plain, run

__all__ = ["add_commands", "format_machine", "format_row", "main", "run_command"]

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
_NAMES = ("bnkit", "compiled", "bnkit compiled")
#: column labels of the implementations whose names do not fit
_LABELS = {"bnkit compiled": "bnkit comp"}
# The names of bnkit.bench.speed.DTYPES and .OPERATIONS, repeated so that building the
# parser (bnkit --help) does not import torch; a test keeps them equal.
_DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")
_OPERATIONS = (
    "forward", "fwd+bwd", "eval", "bn+relu fwd+bwd", "bn+leaky fwd+bwd", "bn+elu fwd+bwd"
)  # fmt: skip


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a shape like 32x64x56x56 (at least N x C, positive), got {text!r}"
        )
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


#: --device values; "cpu-triton" (the dry run of the CUDA benchmark) is left out of --help
_DEVICES = ("cpu", "cuda", "cpu-triton")


def _device(text: str) -> str:
    if text not in _DEVICES:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 shapes, 3 repetitions (CI); --device cuda: 4 shapes, 5 repetitions",
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="cpu",
        metavar="{cpu,cuda}",
        help="cpu (default), or cuda: torch eager, torch.compile and bnkit on the GPU",
    )
    parser.add_argument(
        "--budget",
        type=_seconds,
        metavar="SECONDS",
        help="--device cuda: start no new shape after this long (default 240, --quick 100)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--memory", action="store_true", help="also run bnkit.bench.memory")
    parser.add_argument("--sync", action="store_true", help="also run bnkit.bench.sync")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument(
        "--shape", action="append", type=_shape, metavar="NxCx...", help="shape(s) to use"
    )
    parser.add_argument(
        "--layout", action="append", choices=("nchw", "channels_last"), help="layout(s)"
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=_DTYPE_NAMES,
        help="dtype(s); float32 by default (bfloat16, float16: informational; 16-bit "
        "activations with float32 parameters)",
    )
    parser.add_argument(
        "--op",
        action="append",
        choices=_OPERATIONS,
        help="operation(s); default: the first four (the leaky_relu and elu rows when named)",
    )
    parser.add_argument(
        "--repetitions", type=_positive_int, help="interleaved repetitions (default 7)"
    )
    parser.add_argument(
        "--thp",
        choices=("on", "off", "both"),
        default="on",
        help=f"{THP_VARIABLE}=1 (on, default), torch's default (off), or both",
    )
    parser.add_argument(
        "--reuse-memory",
        choices=("off", "on", "both"),
        default="off",
        help="on: the allocator keeps freed memory for new outputs (no fresh pages); "
        "off (default): glibc's default; both",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure, write JSON


def add_commands(subparsers: Any) -> None:
    """Register ``bench`` on an argparse subparsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    bench = subparsers.add_parser(
        "bench",
        help="batch norm speed: bnkit vs torch vs the memory-bandwidth floor",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(bench)
    bench.set_defaults(run_command=run_command)


def _config(args: argparse.Namespace) -> Any:
    from bnkit.bench.speed import QUICK_SHAPES, SHAPES, Config

    config = Config(
        shapes=args.shape or (QUICK_SHAPES if args.quick else SHAPES),
        layouts=args.layout or ("nchw", "channels_last"),
        dtypes=args.dtype or ("float32",),
        compile=args.compile,
        repetitions=args.repetitions or (3 if args.quick else 7),
    )
    if args.op:
        config.operations = tuple(args.op)
    return config


def format_machine(info: dict[str, Any]) -> str:
    """One line describing where the figures come from."""
    native = "native code" if info["native_kernel"] else f"portable only ({info['native_error']})"
    compiled = info.get("native_compile_s")
    first = f", first call {info['native_first_call_s']:.2f} s"
    if compiled is not None:
        first += f" (compiled in {compiled:.2f} s)"
    return (
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} with "
        f"{info['torch_threads']} threads, bnkit {info['bnkit']}: {native}{first}; "
        f"{THP_VARIABLE}={info[THP_VARIABLE]}, freed memory "
        f"{info.get('freed_memory', 'returned to the system')}"
    )


def _header(names: Sequence[str]) -> str:
    columns = "".join(
        f"{_LABELS.get(name, name) + ' ms':>14s}{'x torch':>9s}{'floor':>7s}{'+new':>6s}"
        for name in names
    )
    if "compiled" in names:
        columns += f"{'x comp':>8s}{'compile s':>11s}"
    head = f"{'shape':<19s}{'layout':<8s}{'operation':<17s}{'MB':>7s}{'floor ms':>10s}"
    return f"{head}{'+new ms':>9s}{'torch ms':>10s}{'floor':>7s}{'+new':>6s}{columns}"


#: appended to the shape for the dtypes other than float32
_DTYPE_TAGS = {"float64": " f64", "bfloat16": " bf16", "float16": " f16"}


def format_row(row: dict[str, Any]) -> str:
    """A table line: per implementation its time, speed vs torch (torch time / time), % of
    the floor and % of the floor plus the new outputs' page faults ("+new"); with torch
    compile, bnkit's speed against it and the compile time."""
    results = row["results"]
    shape = "x".join(str(d) for d in row["shape"]) + _DTYPE_TAGS.get(row["dtype"], "")
    layout = "nchw" if row["layout"] == "nchw" else "cl"
    torch_result = results["torch"]
    line = (
        f"{shape:<19s}{layout:<8s}{row['operation']:<17s}{row['megabytes']:7.1f}"
        f"{row['floor_ms']:10.3f}{row['floor_with_outputs_ms']:9.3f}"
        f"{torch_result['ms']:10.3f}{torch_result['of_floor']:7.0%}"
        f"{torch_result['of_floor_with_outputs']:6.0%}"
    )
    for name in _NAMES:
        if name in results:
            result = results[name]
            line += (
                f"{result['ms']:14.3f}{1.0 / result['vs_torch']:8.2f}x{result['of_floor']:7.0%}"
                f"{result['of_floor_with_outputs']:6.0%}"
            )
    if "compiled" in results:
        line += f"{1.0 / results['bnkit']['vs_compiled']:7.2f}x{row['compile_s']:11.1f}"
    return line


def _measure_here(args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    """Measure in this process, printing rows as they come."""
    from bnkit.bench import speed

    config = _config(args)
    print(format_machine(speed.machine()), file=out, flush=True)
    names = list(_NAMES) if config.compile else ["bnkit"]
    print(_header(names), file=out, flush=True)
    return speed.run(config, report=lambda row: print(format_row(row), file=out, flush=True))


def _measure_in_child(argv: Sequence[str], thp: str, reuse: str, out: TextIO) -> dict[str, Any]:
    """Measure in a fresh interpreter with THP_MEM_ALLOC_ENABLE and the allocator set as
    asked."""
    env = dict(os.environ)
    if thp == "on":
        env[THP_VARIABLE] = "1"
    else:
        env.pop(THP_VARIABLE, None)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "figures.json")
        command = [sys.executable, "-m", "bnkit.bench", *argv, "--reuse-memory", reuse]
        command += ["--worker", path]
        process = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
        out.write(process.stdout)
        if process.returncode != 0:
            raise RuntimeError(f"bnkit bench: the measuring process failed ({process.returncode})")
        with open(path) as file:
            figures: dict[str, Any] = json.load(file)
    return figures


def _strip(argv: Sequence[str]) -> list[str]:
    """The measuring options of argv: without the ones handled here."""
    kept: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--json", "--thp", "--reuse-memory"):
            skip = True
            continue
        if item in ("--memory", "--sync", "bench") or item.startswith(
            ("--json=", "--thp=", "--reuse-memory=")
        ):
            continue
        kept.append(item)
    return kept


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written (a missing folder, a folder in its place), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"no folder {folder}"
    if os.path.isdir(path):
        return "it is a folder"
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "permission denied"
    return None


def run_command(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit bench`` with parsed arguments; returns the exit status.

    1 (with one line on stderr) when ``--json FILE`` cannot be written: checked before
    measuring, so no run is wasted.
    """
    out = sys.stdout
    if args.device != "cpu":
        from bnkit.bench import cuda

        return cuda.run_command(args, sys.argv[1:] if argv is None else argv)
    if args.json and not args.worker and (reason := _unwritable(args.json)):
        print(f"bnkit bench: cannot write --json {args.json}: {reason}", file=sys.stderr)
        return 1
    if args.worker:
        if args.reuse_memory == "on":
            from bnkit.bench import speed

            speed.keep_freed_memory()
        figures = _measure_here(args, out)
        with open(args.worker, "w") as file:
            json.dump(figures, file)
        return 0
    raw = list(sys.argv[1:] if argv is None else argv)
    settings = ("on", "off") if args.thp == "both" else (args.thp,)
    reuses = ("off", "on") if args.reuse_memory == "both" else (args.reuse_memory,)
    report: dict[str, Any] = {"runs": {}}
    for reuse in reuses:
        for thp in settings:
            heading = f"{THP_VARIABLE}={'1' if thp == 'on' else 'unset (torch default: off)'}"
            if reuse == "on":
                heading += ", freed memory kept for new tensors"
            print(f"== {heading}", file=out)
            # runs: "on", "off" (THP), "on+reuse", "off+reuse"
            key = thp if reuse == "off" else f"{thp}+reuse"
            report["runs"][key] = _measure_in_child(_strip(raw), thp, reuse, out)
    if args.memory:
        from bnkit.bench import memory

        print("== bnkit.bench.memory", file=out, flush=True)
        memory.main(["--no-peak"] if args.quick else [])
    if args.sync:
        from bnkit.bench import sync

        print("== bnkit.bench.sync", file=out, flush=True)
        sync.main(["--steps", "5"] if args.quick else [])
    if args.json:
        try:
            with open(args.json, "w") as file:
                json.dump(report, file, indent=2)
        except OSError as error:
            print(f"bnkit bench: cannot write --json {args.json}: {error}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bnkit.bench``: the same options as ``bnkit bench``."""
    parser = PlainParser(
        prog="python -m bnkit.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(parser)
    args = parser.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    if args.worker:  # the measuring child: on Ctrl-C its parent says so, once
        try:
            return run_command(args, raw)
        except KeyboardInterrupt:
            return 130
    return run("python -m bnkit.bench", lambda: run_command(args, raw))
