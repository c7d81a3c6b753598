"""The memory benchmark's counters: saved-for-backward bytes and the peak of a step."""

from __future__ import annotations

import torch

from bnkit.bench.memory import StorageTracker, peak_bytes, peak_of_step, saved_bytes

FLOAT = 4  # bytes per float32 value


def test_views_and_in_place_writes_of_existing_tensors_are_not_allocations() -> None:
    x = torch.randn(100, 10)
    assert peak_bytes(lambda: (x.t(), x[:5], x.view(-1), x.mul_(2), x.detach())) == 0


def test_peak_counts_tensors_alive_at_once_and_current_drops_when_freed() -> None:
    x = torch.randn(1000)
    tracker = StorageTracker()
    with tracker:
        a = x * 2  # 4000 bytes
        b = a + 1  # 8000 alive
        del a  # 4000
        c = b * 3  # 8000 again
        assert tracker.current == 2 * 1000 * FLOAT
        del b, c
    assert tracker.peak == 2 * 1000 * FLOAT
    assert tracker.current == 0


def test_backward_allocations_are_counted() -> None:
    x = torch.randn(1000, requires_grad=True)
    upstream = torch.ones(1000)
    # forward: y = x * x (kept as output only until backward returns);
    # backward: grad = 2 * x * upstream, in two ops
    forward_only = peak_bytes(lambda: x * x)
    with_backward = peak_bytes(lambda: (x * x).backward(upstream))
    assert forward_only == 1000 * FLOAT
    assert with_backward > forward_only
    assert x.grad is not None


def test_fused_leaky_relu_halves_a_stacks_peak() -> None:
    tensor = 4 * 8 * 8 * 8 * FLOAT
    fused = peak_of_step("bnkit", "leaky_relu", 4, 8, 8)
    unfused = peak_of_step("torch", "leaky_relu", 4, 8, 8)
    assert fused < 0.6 * unfused
    # each of the 4 blocks keeps at least its convolution's input or the BN output
    assert fused >= 4 * tensor


def test_saved_bytes_counts_each_storage_once() -> None:
    x = torch.randn(100, requires_grad=True)
    # mul saves both operands: x twice is one storage; the exp saves its output
    assert saved_bytes(lambda: (x * x).exp()) == 2 * 100 * FLOAT
