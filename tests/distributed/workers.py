"""Code run in each spawned process of the synchronized batch norm tests.

Each process builds every process's data from the same seed, runs its own share through
a ``sync=True`` layer and one process's worth of the whole batch through a plain layer,
and checks that its slice of the results matches: outputs, input gradients, parameter
gradients summed over the processes, running statistics.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

import bnkit

TIMEOUT = datetime.timedelta(seconds=60)  # a collective that never completes fails, not hangs


def init(rank: int, world_size: int, store_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-10) -> None:
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert error <= rtol * scale, f"{what}: error {error:.3g} > {rtol * scale:.3g}"


def make_layers(
    options: dict[str, Any], sync_group: Any
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A synchronized layer and a plain one with the same (random, shared) parameters."""
    torch.manual_seed(1)
    synced = bnkit.BatchNorm1d(3, sync=True, process_group=sync_group, **options).double()
    plain = bnkit.BatchNorm1d(3, **options).double()
    with torch.no_grad():
        synced.weight.uniform_(0.5, 1.5)
        synced.bias.uniform_(-1, 1)
    plain.load_state_dict(synced.state_dict())
    return synced, plain


def batches(sizes: list[int], step: int, masked: bool) -> list[tuple[torch.Tensor, Any, Any]]:
    """(x, dy, mask) of every process for one step; values far from zero on purpose."""
    generator = torch.Generator().manual_seed(100 + step)
    out = []
    for n in sizes:
        x = 50.0 + 3.0 * torch.randn(n, 3, 4, generator=generator, dtype=torch.float64)
        dy = torch.randn(n, 3, 4, generator=generator, dtype=torch.float64)
        mask = None
        if masked:
            mask = torch.rand(n, 4, generator=generator) > 0.3
            mask[:, 0] = True
        out.append((x, dy, mask))
    return out


def run_scenario(
    rank: int, sizes: list[int], options: dict[str, Any], masked: bool, members: list[int]
) -> None:
    """Several training steps; the processes in ``members`` synchronize, others are alone."""
    group = dist.new_group(members) if len(members) < dist.get_world_size() else None
    synced, plain = make_layers(options, group)
    if rank not in members:
        members = [rank]
    for step in range(3):
        data = batches(sizes, step, masked)
        x, dy, mask = data[rank]
        x = x.clone().requires_grad_(True)
        synced.zero_grad()
        y = synced(x, mask=mask)
        (y * dy).sum().backward()

        # the whole batch of the group, through the plain layer, in one process
        xs = torch.cat([data[r][0] for r in members]).requires_grad_(True)
        dys = torch.cat([data[r][1] for r in members])
        masks = torch.cat([data[r][2] for r in members]) if masked else None
        plain.zero_grad()
        ys = plain(xs, mask=masks)
        (ys * dys).sum().backward()

        start = sum(sizes[r] for r in members if r < rank)
        part = slice(start, start + sizes[rank])
        close(y.detach(), ys.detach()[part], f"rank {rank} step {step} output")
        assert x.grad is not None
        assert xs.grad is not None
        close(x.grad, xs.grad[part], f"rank {rank} step {step} input gradient")
        for name in ("weight", "bias"):
            grad = getattr(synced, name).grad.clone()
            if len(members) > 1:
                dist.all_reduce(grad, group=group)
            close(grad, getattr(plain, name).grad, f"rank {rank} step {step} {name} gradient")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            close(
                getattr(synced, name).double(),
                getattr(plain, name).double(),
                f"rank {rank} step {step} {name}",
                rtol=1e-12,
            )
    # identical, bit for bit, on every process of the group
    for name in ("running_mean", "running_var"):
        mine = getattr(synced, name)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        assert all(torch.equal(everyone[r], mine) for r in members), name


def ghost_batches_stay_local(rank: int, sizes: list[int]) -> None:
    """Ghost batches are normalized with local statistics; the running ones are global."""
    synced, local = make_layers({"ghost_batch_size": 2}, None)
    whole = bnkit.BatchNorm1d(3).double()
    whole.load_state_dict(local.state_dict())
    for step in range(2):
        data = batches(sizes, step, masked=False)
        x = data[rank][0]
        close(synced(x), local(x), f"rank {rank} step {step} output")
        whole(torch.cat([d[0] for d in data]))
        for name in ("running_mean", "running_var"):
            close(getattr(synced, name), getattr(whole, name), f"rank {rank} {name}", 1e-12)


def eval_communicates_nothing(rank: int) -> None:
    """In eval mode each process may call the layer any number of times: no collective."""
    layer = bnkit.BatchNorm1d(3, sync=True).eval()
    for _ in range(rank + 1):
        layer(torch.randn(2, 3))
    dist.barrier()


def _runs_on(passes: object, options: dict[str, Any]) -> list[int]:
    """Check that a synchronized layer with ``options`` runs the operators on ``passes``;
    the local batch sizes of the scenarios (one empty with 3 processes)."""
    from bnkit.kernels import ops

    synced, _ = make_layers(options, None)
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    y = synced(x)
    assert y.grad_fn is not None
    assert y.grad_fn.prims is ops.OPERATORS  # type: ignore[attr-defined]
    assert ops.native_passes(x) is passes
    return [3, 0, 5][: dist.get_world_size()] if dist.get_world_size() == 3 else [4, 1]


def triton_kernels_synchronize(rank: int, world_size: int) -> None:
    """With ``BNKIT_KERNEL=triton`` (under ``TRITON_INTERPRET=1``) a synchronized layer runs
    the Triton kernels, fused activation and mask included, and equals one process."""
    from bnkit.kernels import gpu

    assert gpu.forced()
    assert gpu.available(), gpu.import_error()
    sizes = _runs_on(gpu.PRIMITIVES, {"activation": "leaky_relu"})
    run_scenario(rank, sizes, {}, masked=False, members=list(range(world_size)))
    options = {"activation": "leaky_relu", "activation_param": 0.1}
    run_scenario(rank, sizes, options, True, list(range(world_size)))


def native_kernels_synchronize(rank: int, world_size: int) -> None:
    """On the CPU a synchronized layer runs the C loops (down to one value, for these
    small test tensors; an empty local batch still takes the portable kernel), mask
    included, and equals one process."""
    from bnkit.kernels import cpu

    cpu.SMALL_THRESHOLD = 1
    sizes = _runs_on(cpu.PRIMITIVES, {})
    run_scenario(rank, sizes, {}, masked=False, members=list(range(world_size)))
    run_scenario(rank, sizes, {}, masked=True, members=list(range(world_size)))


def worker(rank: int, world_size: int, store_path: str, scenario: str) -> None:
    init(rank, world_size, store_path)
    try:
        if scenario == "uneven":
            sizes = [3, 0, 5][:world_size] if world_size == 3 else [4, 1]
            run_scenario(rank, sizes, {}, masked=False, members=list(range(world_size)))
        elif scenario == "cumulative-biased":
            sizes = [2, 5, 1][:world_size]
            options = {"momentum": None, "running_var_estimator": "biased"}
            run_scenario(rank, sizes, options, masked=False, members=list(range(world_size)))
        elif scenario == "activation":  # the fused memory-efficient layer, synchronized
            options = {"activation": "leaky_relu", "activation_param": 0.1}
            run_scenario(rank, [3, 0, 5][:world_size], options, True, list(range(world_size)))
        elif scenario == "masked-renorm":
            options = {"renorm": bnkit.Renorm(1.5, 0.5, 0, 0, 0)}
            run_scenario(rank, [3, 2, 4][:world_size], options, True, list(range(world_size)))
        elif scenario == "ghost":
            ghost_batches_stay_local(rank, [4, 6, 2][:world_size])
        elif scenario == "subgroup":
            run_scenario(rank, [3, 4, 2], {}, masked=False, members=[0, 2])
        elif scenario == "native":
            native_kernels_synchronize(rank, world_size)
        elif scenario == "triton":
            triton_kernels_synchronize(rank, world_size)
        elif scenario == "eval":
            eval_communicates_nothing(rank)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's shutdown: a gloo worker thread can drop its last reference to
    # a finished collective (which holds tensors made in Python) while the interpreter
    # shuts down, take the GIL there, and abort the process ("terminate called without an
    # active exception"; seen in about 1 run in 6, in torch's ProcessGroupGloo::runLoop
    # destroying an AsyncAllgatherWork). Everything this worker checks has passed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
