"""The portable kernel: the shared autograd functions on passes in torch operations.

Its peak memory is held against torch's layer exactly (counted storages, not timings),
and every kernel is checked to record the same autograd function.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from bnkit.bench.memory import peak_bytes
from bnkit.kernels import ops, portable, primitive, select_kernel
from bnkit.kernels.pipeline import Call, Plan, batch_norm
from bnkit.kernels.stats import BatchStats, Update


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, backward: bool) -> None:
    y = layer(x)
    if backward:
        y.backward(dy)


def _portable_layer(channels: int) -> torch.nn.Module:
    """A bnkit layer whose calls run on the portable kernel (no C loops, no express)."""

    class Portable(bnkit.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert self.running_mean is not None
            assert self.running_var is not None
            tensors = Call(x, self.running_mean, self.running_var, self.weight, self.bias)
            return batch_norm(tensors, Plan(True, eps=self.eps), primitive.PORTABLE).output

    return Portable(channels)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_portable_peak_memory_is_torchs(backward: bool, layout: str) -> None:
    """A training step keeps no more input-sized tensors alive than torch's layer: one
    forward (the output), two with the backward (output and dx). What may differ is a
    few per-channel vectors (here 16 values each), far below a sixteenth of an input."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(backward)
    dy = torch.randn_like(x)
    ours, theirs = _portable_layer(16), torch.nn.BatchNorm2d(16)
    peaks = [peak_bytes(lambda m=m: _step(m, x, dy, backward)) for m in (ours, theirs)]
    input_size = x.numel() * x.element_size()
    assert peaks[1] >= input_size  # torch's output at least: the count sees allocations
    assert peaks[0] < peaks[1] + input_size / 16, f"portable {peaks[0]} bytes, torch {peaks[1]}"


def test_portable_layer_matches_torch() -> None:
    """The helper layer above really is batch norm (so the memory test measures one)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12, dtype=torch.float64, requires_grad=True)
    ours, theirs = _portable_layer(16).double(), torch.nn.BatchNorm2d(16).double()
    y, y_torch = ours(x), theirs(x)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_torch,) = torch.autograd.grad(y_torch, x, dy)
    torch.testing.assert_close(y, y_torch)
    torch.testing.assert_close(dx, dx_torch)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_every_kernel_records_the_same_autograd_function(activation: str | None) -> None:
    """The portable kernel and the operators' kernel leave the same node; only the passes
    it runs (``grad_fn.prims``) differ."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 5, 5) > 0.3  # a mask keeps the call off the express path
    nodes = []
    for kernel in (primitive.PORTABLE, select_kernel(x)):
        fused = None if activation is None else bnkit.kernels.Activation(activation, 0.1)
        tensors = Call(x, None, None, None, None, mask=mask)
        y = batch_norm(tensors, Plan(True, activation=fused), kernel).output
        assert y.grad_fn is not None
        nodes.append((type(y.grad_fn).__name__, y.grad_fn.prims))
    expected = "_NormalizeBackward" if activation is None else "_NormalizeActivateBackward"
    assert nodes[0] == (expected, portable.PRIMITIVES)
    if ops.native_passes(x, mask) is not None:  # the C loops are built here
        assert nodes[1] == (expected, ops.OPERATORS)


def test_double_backward_through_the_operators_matches_the_portable_kernel() -> None:
    """A second derivative of the native kernel's output (the differentiable backward)
    equals the portable kernel's."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    results = []
    for kernel in (primitive.PORTABLE, select_kernel(x)):
        inp = x.clone().requires_grad_()
        y = batch_norm(Call(inp, None, None, None, None), Plan(True), kernel).output
        (g,) = torch.autograd.grad(y.pow(3).sum(), inp, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), inp)
        results.append(h)
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize(
    ("name", "module"), [("leaky_relu", torch.nn.LeakyReLU), ("elu", torch.nn.ELU)]
)
def test_portable_fused_activation_peak_is_at_most_torchs_pair(
    backward: bool, name: str, module: type[torch.nn.Module]
) -> None:
    """The memory-efficient fused layer on the portable kernel keeps no more input-sized
    tensors alive than torch's BatchNorm2d + activation: one forward (the pair keeps
    two), three with the backward, as the pair (elu: a bool mask more)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12, requires_grad=backward)
    dy = torch.randn_like(x)
    param = 0.1 if name == "leaky_relu" else 1.0

    def ours() -> torch.Tensor:
        plan = Plan(True, activation=bnkit.kernels.Activation(name, param))
        return batch_norm(Call(x, None, None, None, None), plan, primitive.PORTABLE).output

    pair = torch.nn.Sequential(torch.nn.BatchNorm2d(16, affine=False), module(param))
    peaks = []
    for f in (ours, lambda: pair(x)):
        peaks.append(peak_bytes(lambda f=f: f().backward(dy) if backward else f()))
    input_size = x.numel() * x.element_size()
    assert peaks[1] >= (3 if backward else 2) * input_size  # what torch's pair keeps
    # elu's backward also holds a bool mask (a quarter of a float32 input) for y > 0
    slack = input_size / (3 if name == "elu" else 16)
    assert peaks[0] < peaks[1] + slack, f"portable {peaks[0]}, torch {peaks[1]}"
    if not backward:
        assert peaks[0] < peaks[1] - input_size / 2  # one tensor fewer than the pair


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d", "mixed"])
@pytest.mark.parametrize("activation", [None, "leaky_relu", "elu"])
@pytest.mark.parametrize("blocks", ["samples", "channels"])
def test_passes_by_blocks_equal_whole_tensor_passes(
    layout: str, activation: str | None, blocks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On large CPU tensors the passes go a block at a time (for the cache): a few samples
    (or rows of a channels-last tensor), or a few channels of one sample. The elementwise
    results are the same bit for bit as one pass over the whole tensor, and the
    per-channel sums and statistics the same to rounding."""
    torch.manual_seed(0)
    shape = (10, 6) if layout == "2d" else (10, 6, 4, 5)
    x = torch.randn(*shape) * 3 + 2
    g = torch.randn_like(x)
    if layout in ("channels_last", "mixed"):  # mixed: x channels-last, g not
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    mask = torch.rand((shape[0], *shape[2:])) > 0.3
    shift, alpha, beta, k1, k0 = (torch.randn(shape[1]) for _ in range(5))
    param = 0.1 if activation == "leaky_relu" else 1.0

    def passes() -> list[torch.Tensor]:
        y = portable.affine(x, shift, alpha, beta, activation, param)
        sums = portable.backward_reduce(g, x, shift, k0, activation, param, False, alpha, beta)
        from_y = activation is not None
        dx = portable.backward_input(
            g, y if from_y else x, beta if from_y else shift, alpha, k1, k0, activation,
            param, from_y, mask,
        )  # fmt: skip
        stats = portable.batch_stats(x)
        return [y, *sums, dx, stats.shift, stats.shifted_mean, stats.var, stats.count]

    whole = passes()
    sample = x.numel() * 4 // shape[0]
    size = sample * 3 if blocks == "samples" else sample // 4  # about 3 samples, 4 channels
    monkeypatch.setattr(portable, "BLOCK_BYTES", size)
    split = portable._blocks(x)
    assert len(split) > 2
    if blocks == "channels" and layout == "nchw":
        assert split[0] == (slice(0, 1), slice(0, 1))
    blocked = passes()
    for a, b in zip(whole, blocked, strict=True):
        assert a.stride() == b.stride()
        if a.shape == x.shape:
            assert torch.equal(a, b)
        else:  # per-channel sums: the blocks' partial sums added up
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("block_bytes", [8192, 1024])  # blocks of samples, of channels
def test_passes_by_blocks_keep_precision_far_from_zero(
    layout: str, block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocked statistics (Chan's merge of the blocks) and the blocked backward reduction
    (sum g' * (v - shift) - shifted_mean * sum g') stay as accurate as the whole-tensor
    passes on channels at 1e4 with spread 1e-2, where torch's float32 kernel loses
    percents."""
    from bnkit.bench.precision import offset_input

    monkeypatch.setattr(portable, "BLOCK_BYTES", block_bytes)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = offset_input(1e4, 1e-2).contiguous(memory_format=fmt)
    assert len(portable._blocks(x)) > 2
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    layer = _portable_layer(x.shape[1])
    errors = []
    for norm, data in ((layer.double(), x.double()), (layer.float(), x)):
        data = data.clone().requires_grad_(True)
        y = norm(data)
        y.backward(dy.to(y.dtype))
        errors.append((y.double(), data.grad.double()))
    (exact_y, exact_dx), (y, dx) = errors
    assert (y - exact_y).abs().max() < 2e-6
    assert (dx - exact_dx).abs().max() < 1e-6 * exact_dx.abs().max()


def test_eager_calls_bind_no_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside transforms the autograd functions skip ``Function.apply``'s binding of
    default arguments (``inspect.signature`` on every call, a fifth of a small layer's
    time): every argument is passed. Inside transforms torch's own apply runs."""
    import inspect

    layer = bnkit.BatchNorm2d(4, activation="leaky_relu", track_running_stats=False)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    mask = torch.ones(3, 5, 5, dtype=torch.bool)  # a mask: the pipeline, not the express path
    expected = torch.func.vmap(lambda t: layer(t, mask=mask))(x.detach().unsqueeze(0))[0]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect.signature called")

    monkeypatch.setattr(inspect, "signature", refuse)
    y = layer(x, mask=mask)
    assert type(y.grad_fn).__name__ == "_NormalizeActivateBackward"
    y.sum().backward()
    monkeypatch.undo()
    torch.testing.assert_close(y, expected)


@settings(deadline=None, max_examples=60)
@given(
    shape=st.sampled_from([(9, 5), (7, 3, 11), (6, 7, 3, 4), (5, 6, 2, 3, 2), (3, 13, 4, 4)]),
    channels_last=st.booleans(),
    parts=st.integers(3, 80),
    seed=st.integers(0, 2**16),
)
def test_any_blocking_gives_the_whole_tensor_passes(
    shape: tuple[int, ...], channels_last: bool, parts: int, seed: int
) -> None:
    """Fuzzed: whatever the block size (blocks of samples, of rows, or of channels, with
    ragged last blocks), the blocked passes give the whole-tensor ones: elementwise
    results bit for bit, sums and statistics to rounding."""
    generator = torch.Generator().manual_seed(seed)
    x = 5.0 + torch.randn(shape, generator=generator)
    if channels_last and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    g = torch.randn(x.shape, generator=generator).contiguous(
        memory_format=portable._output_memory_format(x)
    )
    shift, alpha, beta, k1, k0 = (torch.randn(shape[1], generator=generator) for _ in range(5))

    def passes() -> list[torch.Tensor]:
        stats = portable.batch_stats(x)
        return [
            portable.affine(x, shift, alpha, beta),
            *portable.backward_reduce(g, x, shift, k0),
            portable.backward_input(g, x, shift, alpha, k1, k0),
            stats.shifted_mean + stats.shift,
            stats.var,
            stats.count,
        ]

    whole = passes()
    original = portable.BLOCK_BYTES
    portable.BLOCK_BYTES = max(4, x.numel() * 4 // parts)  # about ``parts`` blocks
    try:
        assert len(portable._blocks(x)) > 1
        blocked = passes()
    finally:
        portable.BLOCK_BYTES = original
    for a, b in zip(whole, blocked, strict=True):
        assert a.stride() == b.stride()
        if a.shape == x.shape:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
# inductor loads part of itself with torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_update_skips_nonfinite_statistics_when_compiled_by_inductor(bad: float) -> None:
    """The portable update's finiteness test (v - v == 0) survives inductor's code
    generation: a batch with a NaN or an infinite statistic leaves the running statistics
    and the counter as they were, and a finite one is recorded as in eager mode."""
    torch._dynamo.reset()

    def update(stats: BatchStats, rm: torch.Tensor, rv: torch.Tensor, n: torch.Tensor) -> Any:
        return portable.update_running_stats(Update(stats, rm, rv, n, 0.1, True, True))

    compiled = torch.compile(update, fullgraph=True)
    count, shift = torch.full((3,), 8.0), torch.tensor([1.0, 2.0, 3.0])
    for var, expect in ((torch.tensor([0.5, bad, 2.0]), False), (torch.ones(3), True)):
        stats = BatchStats(count, shift, torch.tensor([0.1, 0.2, 0.3]), var)
        results = []
        for fn in (compiled, update):
            rm, rv, n = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
            recorded = fn(stats, rm, rv, n)
            results.append((bool(recorded), rm, rv, int(n)))
        (got, rm, rv, n), (eager, rm_e, rv_e, n_e) = results
        assert got is eager is expect
        assert n == n_e == int(expect)
        assert torch.equal(rm, rm_e)
        assert torch.equal(rv, rv_e)
        if not expect:
            assert torch.equal(rm, torch.zeros(3))
            assert torch.equal(rv, torch.ones(3))
