"""Synchronized batch norm on CPU with torchrun: each process holds a few samples.

    torchrun --standalone --nproc-per-node 2 examples/sync_cpu.py

Every process trains on its own 4 samples; the batch norm statistics are those of all 8,
and the running statistics end up identical on every process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import bnkit


def main() -> None:
    if not {"RANK", "WORLD_SIZE"} <= set(os.environ):
        # Run alone, init_process_group would wait for peers that never come.
        sys.exit(
            "examples/sync_cpu.py needs torchrun, which starts its processes:\n"
            "  torchrun --standalone --nproc-per-node 2 examples/sync_cpu.py"
        )
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights everywhere
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bnkit.BatchNorm2d(8, sync=True),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # different data on each process
    for _ in range(5):
        images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    running_mean = model.module[1].running_mean
    gathered = [torch.empty_like(running_mean) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, running_mean)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        print(f"{dist.get_world_size()} processes, running statistics identical: {same}")
    # Release DDP's communication state before the process group goes: tearing down in
    # the other order can abort the process at exit.
    del model, optimizer
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
