"""What batch norm + activation keeps for the backward pass, bnkit against torch.

    python -m bnkit.bench.memory [--batch 16] [--size 32] [--channels 64]

Counts the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
each storage counted once, parameters included) for one BN + activation layer and for a
ResNet-style stack of conv-BN-activation blocks, with torch's ``BatchNorm2d`` followed by
the activation module and with bnkit's fused layer (memory-efficient and not). The counts
are deterministic: they depend on shapes only. The peak resident memory of one training
step of the stack, measured in a fresh process each, is printed too (noisier: it includes
the allocator's behaviour).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import bnkit

#: name -> (torch activation module factory, bnkit activation name)
ACTIVATIONS: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "relu": (torch.nn.ReLU, "relu"),
    "leaky_relu": (lambda: torch.nn.LeakyReLU(0.01), "leaky_relu"),
    "elu": (torch.nn.ELU, "elu"),
}


def saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``step()`` builds its graph."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = step()
    del output
    return sum(storages.values())


def bn_act(kind: str, activation: str, channels: int) -> torch.nn.Module:
    """One batch norm + activation: torch's pair, or bnkit fused (``kind`` bnkit / plain)."""
    if kind == "torch":
        return torch.nn.Sequential(torch.nn.BatchNorm2d(channels), ACTIVATIONS[activation][0]())
    return bnkit.BatchNorm2d(
        channels, activation=ACTIVATIONS[activation][1], memory_efficient=kind == "bnkit"
    )


def stack(kind: str, activation: str, channels: int, blocks: int = 4) -> torch.nn.Module:
    """A ResNet-style stem of conv-BN-activation blocks (convolutions without bias)."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers.append(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        layers.append(bn_act(kind, activation, channels))
    return torch.nn.Sequential(*layers)


KINDS = ("torch", "bnkit", "bnkit-plain")  # bnkit-plain: fused, memory_efficient=False


def measure(batch: int, size: int, channels: int) -> dict[str, Any]:
    """Saved-for-backward bytes of each (activation, kind), for a layer and for a stack."""
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    tensor_bytes = x.numel() * x.element_size()
    results: dict[str, Any] = {"tensor_bytes": tensor_bytes, "layer": {}, "stack": {}}
    for activation in ACTIVATIONS:
        for kind in KINDS:
            for scope, module in (
                ("layer", bn_act(kind, activation, channels)),
                ("stack", stack(kind, activation, channels)),
            ):
                results[scope][f"{activation}/{kind}"] = saved_bytes(functools.partial(module, x))
    return results


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_of_step(kind: str, activation: str, batch: int, size: int, channels: int) -> int:
    """Peak resident bytes one training step of the stack adds, in a fresh process.

    torch's CPU allocator keeps no statistics, so a thread samples the resident memory
    every 0.2 ms while the step runs (torch releases the GIL in its kernels).
    """
    program = f"""
import json, threading, time, torch
from bnkit.bench.memory import resident_bytes, stack
model = stack({kind!r}, {activation!r}, {channels})
x = torch.randn({batch}, {channels}, {size}, {size})
model(x[:1]).sum().backward()  # warm-up on one sample: lazy initialization
model.zero_grad()
peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], resident_bytes())
        time.sleep(0.0002)
before = resident_bytes()
sampler = threading.Thread(target=sample)
sampler.start()
model(x).sum().backward()
running[0] = False
sampler.join()
print(json.dumps(peak[0] - before))
"""
    output = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(output.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnkit.bench.memory", description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    results = measure(args.batch, args.size, args.channels)
    mb = 1e6
    print(
        f"saved for backward, input ({args.batch}, {args.channels}, {args.size}, {args.size}) "
        f"float32 = {results['tensor_bytes'] / mb:.2f} MB per activation tensor"
    )
    print(f"{'':24s}{'torch BN+act':>14s}{'bnkit fused':>14s}{'ratio':>8s}{'fused, plain':>14s}")
    for scope in ("layer", "stack"):
        for activation in ACTIVATIONS:
            figures = [results[scope][f"{activation}/{kind}"] for kind in KINDS]
            torch_mb, bnkit_mb, plain_mb = (figure / mb for figure in figures)
            print(
                f"  {scope + ' ' + activation:22s}{torch_mb:11.2f} MB{bnkit_mb:11.2f} MB"
                f"{figures[1] / figures[0]:8.2f}{plain_mb:11.2f} MB"
            )
    if not args.no_peak:
        print("peak resident memory added by one training step of the 4-block stack:")
        peaks: dict[str, int] = {}
        for activation in ("relu", "leaky_relu"):
            for kind in ("torch", "bnkit"):
                key = f"{activation}/{kind}"
                peaks[key] = peak_of_step(kind, activation, args.batch, args.size, args.channels)
                print(f"  {key:22s}{peaks[key] / mb:11.2f} MB")
        results["peak_step"] = peaks
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
