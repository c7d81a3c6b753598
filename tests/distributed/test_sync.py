"""Synchronized batch norm over 2 and 3 gloo processes equals one process's batch norm
over the concatenated batch (float64, 1e-10): outputs, input gradients, parameter
gradients summed over processes, running statistics; uneven and empty local batches,
masks, renorm, a subgroup, local ghost batches, and no communication in eval mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import bnkit
from tests.distributed import workers

pytestmark = pytest.mark.slow  # every test starts processes (torch.multiprocessing, torchrun)


def spawn(world_size: int, scenario: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    mp.spawn(workers.worker, args=(world_size, str(store), scenario), nprocs=world_size, join=True)


@pytest.mark.parametrize(
    ("world_size", "scenario"),
    [
        (2, "uneven"),
        (3, "uneven"),  # one process with an empty batch
        (3, "cumulative-biased"),
        (3, "masked-renorm"),
        (3, "activation"),
        (3, "ghost"),
        (3, "subgroup"),
        (3, "eval"),
    ],
)
def test_synchronized_equals_one_process(world_size: int, scenario: str, tmp_path: Path) -> None:
    spawn(world_size, scenario, tmp_path)


@pytest.mark.parametrize("world_size", [2, 3])
def test_synchronized_c_loops_equal_one_process(world_size: int, tmp_path: Path) -> None:
    from bnkit.kernels import native

    if native.library() is None:
        pytest.skip(f"no native CPU kernel: {native.load_error()}")
    spawn(world_size, "native", tmp_path)


@pytest.mark.parametrize("world_size", [2, 3])
def test_synchronized_triton_kernels_equal_one_process(
    world_size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    # the spawned processes inherit both: the Triton kernels, run by the interpreter
    monkeypatch.setenv("BNKIT_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spawn(world_size, "triton", tmp_path)


def test_torchrun_example_runs_on_cpu() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "sync_cpu.py"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(example),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[:4000]
    assert "2 processes, running statistics identical: True" in result.stdout


def test_without_distributed_sync_is_local() -> None:
    assert not torch.distributed.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    synced = bnkit.BatchNorm1d(3, sync=True).double()
    plain = bnkit.BatchNorm1d(3).double()
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=0)


def test_sync_option_is_checked() -> None:
    with pytest.raises(bnkit.errors.ConfigError, match="sync to be True or False"):
        bnkit.BatchNorm2d(3, sync="yes")  # type: ignore[arg-type]
    assert "sync=True" in repr(bnkit.BatchNorm2d(3, sync=True))
