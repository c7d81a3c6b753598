"""The cost of synchronized batch norm: a training step over 2 gloo processes on CPU.

    python -m bnkit.bench.sync [--processes 2] [--steps 30] [--batch 16]

Each process trains the same small CNN (DistributedDataParallel over gloo) on its own
batch, once with ``sync=True`` batch norm and once with local batch norm; steps of the
two alternate so that drifts of the shared machine hit both alike. Rank 0 prints the
median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn
from torch.nn.parallel import DistributedDataParallel

import bnkit


def small_cnn(sync: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1, bias=False),
        bnkit.BatchNorm2d(32, sync=sync),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, stride=2, bias=False),
        bnkit.BatchNorm2d(64, sync=sync),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def _worker(rank: int, world_size: int, store: str, steps: int, batch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    models = {
        name: DistributedDataParallel(small_cnn(sync))
        for name, sync in (("sync", True), ("local", False))
    }
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    generator = torch.Generator().manual_seed(rank)
    for step in range(steps + 3):  # 3 warm-up steps
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (batch,), generator=generator)
        for name, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizers[name].zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
            optimizers[name].step()
            dist.barrier()
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        sync_ms = 1e3 * statistics.median(times["sync"])
        local_ms = 1e3 * statistics.median(times["local"])
        print(
            f"training step, small CNN, {world_size} gloo processes x batch {batch} (3x32x32), "
            f"median of {steps}:"
        )
        print(f"  local batch norm        {local_ms:8.2f} ms")
        print(f"  synchronized batch norm {sync_ms:8.2f} ms   ({sync_ms / local_ms:.2f}x local)")
    # Release DDP's communication state before the process group: the other order can
    # abort the process at exit.
    del models, optimizers
    dist.barrier()
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnkit.bench.sync", description=__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        spawn(  # type: ignore[no-untyped-call]  # untyped in torch
            _worker,
            args=(args.processes, f"{directory}/store", args.steps, args.batch),
            nprocs=args.processes,
            join=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
