"""The output pool: large outputs reuse kept memory, and never while a tensor uses it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bnkit.functional import batch_norm
from bnkit.kernels import native, outputs

SMALL = 1 << 16  # the pool's size threshold in these tests


@pytest.fixture(autouse=True)
def small_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The pool on, for outputs from 64 kB, emptied before and after each test."""
    monkeypatch.setattr(outputs, "MIN_BYTES", SMALL)
    previous = outputs.set_enabled(True)
    outputs.release()
    yield
    outputs.release()
    outputs.set_enabled(previous)


def _large(*shape: int, fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=fmt
    )


FORMATS = [
    ((4, 8, 32, 32), torch.contiguous_format, torch.preserve_format),
    ((4, 8, 32, 32), torch.channels_last, torch.preserve_format),
    ((4, 8, 32, 32), torch.channels_last, torch.contiguous_format),
    ((4, 8, 32, 32), torch.contiguous_format, torch.channels_last),
    ((2, 8, 4, 16, 16), torch.channels_last_3d, torch.preserve_format),
    ((1, 64, 1, 512), torch.channels_last, torch.preserve_format),  # ambiguous strides
    ((512, 64), torch.contiguous_format, torch.preserve_format),
]


@pytest.mark.parametrize(("shape", "layout", "requested"), FORMATS, ids=str)
def test_outputs_have_torch_s_shape_dtype_and_strides(
    shape: tuple[int, ...], layout: torch.memory_format, requested: torch.memory_format
) -> None:
    x = _large(*shape, fmt=layout).double()
    ours = outputs.empty_like(x, memory_format=requested)
    theirs = torch.empty_like(x, memory_format=requested)
    assert (ours.shape, ours.dtype, ours.stride()) == (theirs.shape, theirs.dtype, theirs.stride())
    assert ours.device == theirs.device
    assert not ours.requires_grad
    assert outputs.stats()["in_use_bytes"] == x.numel() * 8  # it came from the pool


def test_a_freed_output_is_reused_and_a_live_one_never() -> None:
    x = _large(64, 1024)
    first = outputs.empty_like(x)
    address = first.data_ptr()
    view = first[3:]  # a view keeps the memory in use
    del first
    second = outputs.empty_like(x)
    assert second.data_ptr() != address
    del view
    third = outputs.empty_like(x)
    assert third.data_ptr() == address
    assert outputs.stats()["reuses"] >= 1
    assert outputs.stats()["in_use_bytes"] == 2 * x.numel() * 4


def test_outputs_saved_for_backward_or_kept_as_grad_are_not_reused() -> None:
    x = _large(64, 1024).requires_grad_()
    y = batch_norm(x, None, None, training=True)
    z = torch.sigmoid(y)  # saves its output, and y is alive
    grad = torch.randn_like(z)
    z.backward(grad)
    assert x.grad is not None
    kept = [y.clone(), z.clone(), x.grad.clone()]
    for _ in range(3):  # more outputs of the same size while all three live
        other = batch_norm(_large(64, 1024) * 3, None, None, training=True)
        assert other.data_ptr() not in {y.data_ptr(), z.data_ptr(), x.grad.data_ptr()}
    assert torch.equal(y, kept[0])
    assert torch.equal(z, kept[1])
    assert torch.equal(x.grad, kept[2])


def _training_steps(steps: int) -> list[torch.Tensor]:
    """Outputs, gradients and statistics of a few training steps of a 2-layer stack."""
    generator = torch.Generator().manual_seed(3)
    layers = [torch.nn.Conv2d(8, 8, 1, bias=False), torch.nn.Conv2d(8, 8, 1, bias=False)]
    for layer in layers:
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=generator))
    mean, var = torch.zeros(8), torch.ones(8)
    weight = torch.rand(8, generator=generator).requires_grad_()
    results = []
    for _ in range(steps):
        x = torch.randn(16, 8, 32, 32, generator=generator).requires_grad_()
        h = batch_norm(layers[0](x), mean, var, weight, None, True, activation="relu")
        y = batch_norm(layers[1](h), mean, var, weight, None, True)
        y.square().mean().backward()
        assert x.grad is not None
        assert weight.grad is not None
        results += [h.detach(), y.detach(), x.grad, weight.grad.clone()]
        weight.grad = None
    return [*results, mean, var]


def test_training_steps_are_the_same_with_and_without_the_pool() -> None:
    with_pool = _training_steps(3)
    assert outputs.stats()["reuses"] > 0
    outputs.set_enabled(False)
    without = _training_steps(3)
    for ours, theirs in zip(with_pool, without, strict=True):
        assert torch.equal(ours, theirs)


def test_idle_mappings_are_unmapped_by_later_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "IDLE_SECONDS", 0.0)
    idle = outputs.empty_like(_large(64, 1024))
    del idle
    other = _large(32, 1024)
    kept = [outputs.empty_like(other) for _ in range(3)]  # the first marks it idle
    assert outputs.stats()["free_bytes"] == 0
    assert outputs.stats()["in_use_bytes"] == 3 * other.numel() * 4
    del kept
    assert outputs.release() == 3 * other.numel() * 4
    assert outputs.stats() | {"requests": 0, "reuses": 0} == {
        "in_use_bytes": 0, "free_bytes": 0, "requests": 0, "reuses": 0}  # fmt: skip


def test_small_outputs_off_switch_and_dispatch_modes_use_torch() -> None:
    before = outputs.stats()["requests"]
    small = outputs.empty_like(torch.zeros(10))
    assert small.shape == (10,)

    class Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call, misc]
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            return func(*args, **(kwargs or {}))

    with Recorder():  # a memory tracker must see every output's storage made
        outputs.empty_like(_large(64, 1024))
    assert outputs.set_enabled(False) is True
    assert not outputs.enabled()
    outputs.empty_like(_large(64, 1024))
    assert outputs.stats()["requests"] == before


def test_frombuffer_holds_its_buffer_here() -> None:
    assert outputs._holds_its_buffer()


@pytest.mark.slow
def test_environment_turns_the_pool_off() -> None:
    code = "from bnkit.kernels import outputs; print(outputs.enabled())"
    env = {**os.environ, "BNKIT_OUTPUT_POOL": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.skipif(native.library() is None, reason="no native CPU kernel")
def test_the_c_loops_write_into_pool_outputs() -> None:
    x = _large(16, 8, 32, 32, fmt=torch.channels_last)
    before = outputs.stats()["requests"]
    with torch.no_grad():
        y = batch_norm(x, None, None, training=True)
    assert outputs.stats()["requests"] == before + 1
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
