"""What batch norm + activation keeps for the backward pass, bnkit against torch.

    python -m bnkit.bench.memory [--batch 16] [--size 32] [--channels 64]

Counts the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
each storage counted once, parameters included) for one BN + activation layer and for a
ResNet-style stack of conv-BN-activation blocks, with torch's ``BatchNorm2d`` followed by
the activation module and with bnkit's fused layer (memory-efficient and not). The counts
are deterministic: they depend on shapes only. So is the peak memory of one training
step of the stack that is printed too: the most bytes of tensors created by the step
alive at once, counted operator by operator (:class:`StorageTracker`).
"""

from __future__ import annotations

import argparse
import functools
import json
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


class StorageTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the bytes of the CPU storages torch allocates while the mode is active.

    Every operator call passes through ``__torch_dispatch__``; each storage one of them
    returns that was not seen before is counted as allocated until its last reference
    dies (a finalizer on the storage). ``current`` is what those storages hold now,
    ``peak`` the most they held at once. Counted: the tensors operators return, in the
    forward and the backward pass (gradients included). Not counted: what existed before
    (inputs, parameters), scratch space kernels allocate and free inside one operator
    call, and the allocator's own slack. Exact and deterministic for given shapes.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id of a counted storage -> its bytes
        self._older: set[int] = set()  # ids of storages that existed before they were seen

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _known(self, storage: torch.UntypedStorage) -> bool:
        key = id(storage)
        return key in self._live or key in self._older

    def _remember_older(self, value: object) -> None:
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            storage = value.untyped_storage()
            if not self._known(storage):
                self._older.add(id(storage))
                weakref.finalize(storage, self._older.discard, id(storage))

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # An operator's inputs that are not counted existed before the step (a view of
        # one shares its storage and is no allocation).
        for value in tree_leaves((args, kwargs)):
            self._remember_older(value)
        output = func(*args, **(kwargs or {}))
        for value in tree_leaves(output):
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                continue
            storage = value.untyped_storage()
            key = id(storage)
            if self._known(storage) or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key)
        return output


def peak_bytes(step: Callable[[], object]) -> int:
    """The most bytes of new storages alive at once while ``step()`` runs.

    Example: ``(x * 2).sum()`` holds the product (8 bytes per value of a float64 x)
    before the sum's 8 bytes.

        >>> x = torch.ones(1000, dtype=torch.float64)
        >>> peak_bytes(lambda: (x * 2).sum())
        8008
    """
    tracker = StorageTracker()
    with tracker:
        step()
    return tracker.peak


def peak_of_step(kind: str, activation: str, batch: int, size: int, channels: int) -> int:
    """Peak bytes of new tensors one training step (forward + backward) of the stack holds.

    The step starts with no gradients, after a warm-up on one sample (lazy
    initialization); see :class:`StorageTracker` for what is counted.
    """
    model = stack(kind, activation, channels)
    x = torch.randn(batch, channels, size, size)
    model(x[:1]).sum().backward()  # warm-up: lazy initialization
    model.zero_grad(set_to_none=True)
    return peak_bytes(lambda: model(x).sum().backward())


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
        print("peak bytes of tensors alive during one training step of the 4-block stack:")
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
