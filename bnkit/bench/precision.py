"""How accurately batch norm normalizes float32 data that sits far from zero.

    python -m bnkit.bench.precision [--layout nchw|channels_last|both]

For channels at 10**k with a spread of 1e-2 (float32), the largest error of the
normalized output in training and in evaluation (with float32 population statistics, as
buffers hold them), and of the input gradient (relative to its largest value), against
float64 arithmetic on the same float32 values: bnkit's functional form and torch's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import bnkit


def offset_input(
    loc: float, spread: float, shape: tuple[int, ...] = (32, 8, 12, 12)
) -> torch.Tensor:
    """float32 channels at about ``loc`` (each its own) with standard deviation ``spread``."""
    generator = torch.Generator().manual_seed(0)
    channel_loc = loc * (1 + 0.1 * torch.rand(shape[1], generator=generator, dtype=torch.float64))
    view = (1, -1) + (1,) * (len(shape) - 2)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (channel_loc.view(view) + spread * noise).float()


def errors(loc: float, spread: float, layout: str = "nchw") -> dict[str, dict[str, float]]:
    """Max errors against float64 of training output, eval output and input gradient,
    with the input in ``layout`` ("nchw" or "channels_last")."""
    x = offset_input(loc, spread)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results: dict[str, dict[str, float]] = {}
    for name, norm in (("bnkit", bnkit.functional.batch_norm), ("torch", F.batch_norm)):
        exact_x = x.double().requires_grad_(True)
        exact = F.batch_norm(exact_x, None, None, training=True)
        torch.autograd.backward(exact, dy.double())
        approx_x = x.clone().requires_grad_(True)
        approx = norm(approx_x, None, None, training=True)
        torch.autograd.backward(approx, dy)
        assert exact_x.grad is not None
        assert approx_x.grad is not None
        # population statistics as float32 buffers hold them; exact arithmetic on those
        mean, var = x.double().mean((0, 2, 3)).float(), x.double().var((0, 2, 3)).float()
        exact_eval = F.batch_norm(x.double(), mean.double(), var.double())
        approx_eval = norm(x, mean, var)
        gradient_scale = exact_x.grad.abs().max().item()
        results[name] = {
            "train": (approx.double() - exact).abs().max().item(),
            "eval": (approx_eval.double() - exact_eval).abs().max().item(),
            "grad": (approx_x.grad.double() - exact_x.grad).abs().max().item() / gradient_scale,
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnkit.bench.precision", description=__doc__)
    parser.add_argument("--spread", type=float, default=1e-2)
    parser.add_argument("--layout", choices=("nchw", "channels_last", "both"), default="both")
    args = parser.parse_args(argv)
    layouts = ("nchw", "channels_last") if args.layout == "both" else (args.layout,)
    print(f"float32 input, channels at loc with spread {args.spread:g}; max error vs float64")
    print(
        f"{'loc':>8s} {'layout':13s} {'':6s} {'train output':>13s} {'eval output':>12s} "
        f"{'input grad':>11s}"
    )
    for layout in layouts:
        for exponent in (0, 2, 3, 4):
            for name, figures in errors(10.0**exponent, args.spread, layout).items():
                print(
                    f"{10.0**exponent:8.0e} {layout:13s} {name:6s} {figures['train']:13.1e} "
                    f"{figures['eval']:12.1e} {figures['grad']:11.1e}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
