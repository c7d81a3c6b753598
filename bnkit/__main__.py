"""The ``bnkit`` command line.

Building the parser imports neither torch nor matplotlib (each command imports what it
needs when it runs), so ``bnkit --help`` answers at once. Ctrl-C and a missing optional
extra end in one line instead of a traceback (see :func:`bnkit._cli.run`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import TextIO

from bnkit import __version__
from bnkit._cli import PlainParser, run
from bnkit.bench.cli import add_commands as add_bench_commands
from bnkit.lab.cli import add_commands as add_lab_commands


def demo(seed: int = 0, out: TextIO | None = None) -> None:
    """Walk through batch normalization with the reference layer: a batch of four, then test.

    Follows one node n of a network: its outputs o_1..o_4 for a mini-batch of four, their
    mean and standard deviation, the Z-transform, gamma and beta, then the population
    statistics gathered over training and their use on a single test sample.
    """
    import numpy as np

    from bnkit import reference as ref

    write = functools.partial(print, file=out or sys.stdout)
    rng = np.random.default_rng(seed)
    np.set_printoptions(precision=4, suppress=True)

    write("Batch normalization of one node n, mini-batch of four (d_1..d_4)")
    o = np.array([[2.0], [5.0], [3.0], [6.0]])  # (N=4, C=1): the node's four outputs
    write(f"  outputs o_i           {o.ravel()}")
    write(f"  batch mean mu         {o.mean():.4f}")
    write(f"  batch std sigma       {o.std():.4f}   (biased: divides by 4)")
    bn = ref.BatchNorm(1)
    z = bn.forward(o)
    write(f"  z_i = (o_i - mu) / sqrt(sigma^2 + eps)  {z.ravel()}")
    bn.gamma[:] = 2.0
    bn.beta[:] = 0.5
    y = bn.forward(o)
    write(f"  gamma * z_i + beta  (gamma = 2, beta = 0.5)  {y.ravel()}")
    write("  beta replaces the node's bias, which the Z-transform removes; gamma restores scale.")

    dx = bn.backward(np.array([[1.0], [0.0], [0.0], [0.0]]))
    write(f"  gradient of y_1 w.r.t. each o_i: {dx.ravel()} (every input moves mu and sigma)")

    write("")
    write("Training: population statistics from 200 batches of four (node outputs ~ N(3, 2^2))")
    bn = ref.BatchNorm(1, momentum=None)  # cumulative: the mean of means, mean of variances
    for _ in range(200):
        bn.forward(rng.normal(3.0, 2.0, size=(4, 1)))
    write(f"  running mean {bn.running_mean[0]:.4f}   running var {bn.running_var[0]:.4f}")
    write("  (unbiased: each batch variance times 4/3; the true values are 3 and 4)")

    write("")
    write("Test: a single sample, where batch statistics would be meaningless")
    sample = np.array([[5.0]])
    write(
        f"  o = {sample.item()}  ->  y = {bn.forward(sample, training=False).item():.4f}"
        f"   ((5 - E[o]) / sqrt(Var[o] + eps), about (5 - 3) / 2 = 1)"
    )
    try:
        bn.forward(sample, training=True)
    except ValueError as error:
        write(f"  in training mode instead: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnkit`` with ``argv`` (default: the process's arguments); return the exit status.

    0: done; 1: data or an optional extra missing (one line on stderr); 2: bad arguments;
    130: interrupted with Ctrl-C.
    """
    return run("bnkit", functools.partial(_main, argv))


def _main(argv: Sequence[str] | None) -> int:
    parser = PlainParser(prog="bnkit", description="Batch normalization done completely.")
    parser.add_argument("--version", action="version", version=f"bnkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="walk through batch normalization with the NumPy reference"
    )
    demo_parser.add_argument("--seed", type=int, default=0)
    add_lab_commands(commands)  # "lab" and "report"
    add_bench_commands(commands)  # "bench"
    commands.add_parser(
        "doctor", help="which code runs a plain call on each device and dtype, and why"
    )
    commands.add_parser("build", help="compile the native CPU code now (containers, clusters, CI)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(seed=args.seed)
        return 0
    if args.command in ("doctor", "build"):
        return _native(args.command)
    return int(args.run_command(args))  # lab, report, bench: 0 done, 1 data missing


def _native(command: str) -> int:
    """``bnkit doctor``: a line per device and dtype; ``bnkit build``: where the native code is."""
    from bnkit import doctor

    if command == "doctor":
        for row in doctor.describe():
            print(f"{row.device:5} {row.dtype:9} {row.kernel:36} {row.why}")
        return 0
    try:
        lines = doctor.build()
    except RuntimeError as error:
        print(f"bnkit build: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
