"""Streaming stores: outputs written past the cache hold the same values as ordinary ones."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bnkit.functional import batch_norm
from bnkit.kernels import native

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"no native CPU kernel: {native.load_error()}"
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: (shape, channels-last): rows of 200, 1000 and 3 x 7 x 70 values (ncl), and of 300 and
#: 1000 channels (nc): long enough to stream, of lengths that leave partial lines at
#: both ends of most rows; one short-row case that streams nothing.
SHAPES = [
    ((3, 5, 200), False),
    ((2, 4, 1000), False),
    ((2, 3, 7, 70), False),
    ((40, 300), False),
    ((2, 1000, 3, 5), True),
    ((4, 6, 9), False),
]


def test_loading_sets_the_threshold_to_the_last_level_cache() -> None:
    assert native.stream_bytes() == (native.last_level_cache_bytes() or 0)


def test_last_level_cache_is_the_highest_level(tmp_path: Path) -> None:
    for name, level, size in (("index0", "1", "32K"), ("index2", "2", "512K"),
                              ("index3", "3", "32768K"), ("index4", "x", "1M")):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(level + "\n")
        (tmp_path / name / "size").write_text(size + "\n")
    assert native.last_level_cache_bytes(tmp_path) == 32 << 20
    assert native.last_level_cache_bytes(tmp_path / "missing") is None


@pytest.fixture
def streaming() -> Iterator[None]:
    """Every pass of the C loops streams its output."""
    previous = native.set_stream_bytes(1)
    yield
    native.set_stream_bytes(previous)


def _layer_results(x: torch.Tensor, relu: bool, threads: int) -> list[torch.Tensor]:
    """Training output and gradients, running statistics, eval output."""
    channels = x.shape[1]
    compute = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(channels, generator=generator, dtype=compute).requires_grad_()
    bias = torch.randn(channels, generator=generator, dtype=compute).requires_grad_()
    grad = torch.randn(x.shape, generator=generator).to(x.dtype)
    grad = grad.contiguous(memory_format=_format(x))
    mean, var = torch.zeros(channels, dtype=compute), torch.ones(channels, dtype=compute)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xg = x.detach().clone().requires_grad_()
        y = batch_norm(xg, mean, var, weight, bias, True, activation="relu" if relu else None)
        grads = torch.autograd.grad(y, (xg, weight, bias), grad)
        with torch.no_grad():
            evaluated = batch_norm(x, mean, var, weight, bias, False)
    finally:
        torch.set_num_threads(saved)
    return [y, *grads, mean, var, evaluated]


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(("shape", "channels_last"), SHAPES, ids=str)
def test_streamed_outputs_equal_ordinary_ones(
    shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype, relu: bool
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for threads in (1, 2):
        previous = native.set_stream_bytes(0)
        try:
            ordinary = _layer_results(x, relu, threads)
            native.set_stream_bytes(1)
            streamed = _layer_results(x, relu, threads)
        finally:
            native.set_stream_bytes(previous)
        for ours, theirs in zip(streamed, ordinary, strict=True):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("offset_bytes", [0, 4, 36, 1])
@pytest.mark.usefixtures("streaming")
def test_outputs_at_any_address(offset_bytes: int) -> None:
    """A row starting anywhere in a line, or off the element size, gets every value."""
    lib = native.library()
    assert lib is not None
    rows, channels, inner = 2, 3, 333
    n = rows * channels * inner
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    shift, alpha, beta = torch.randn(3, channels, generator=torch.Generator().manual_seed(1))
    expected = ((x.view(rows, channels, inner) - shift[:, None]) * alpha[:, None]
                + beta[:, None]).reshape(-1)  # fmt: skip
    buffer = torch.full((4 * n + 64,), 0xAB, dtype=torch.uint8)
    address = buffer.data_ptr() + offset_bytes
    lib.bn_affine_ncl_f32(x.data_ptr(), address, rows, channels, inner, shift.data_ptr(),
                          alpha.data_ptr(), beta.data_ptr(), 0, 2)  # fmt: skip
    written = (ctypes.c_float * n).from_address(address)
    assert torch.equal(torch.tensor(list(written), dtype=torch.float32), expected)
    # nothing before or after the output was touched
    assert bool((buffer[:offset_bytes] == 0xAB).all())
    assert bool((buffer[offset_bytes + 4 * n :] == 0xAB).all())


def test_set_stream_bytes_returns_the_previous_value() -> None:
    first = native.set_stream_bytes(12345)
    try:
        assert native.stream_bytes() == 12345
        assert native.set_stream_bytes(-3) == 12345
        assert native.stream_bytes() == 0  # negative: never
    finally:
        native.set_stream_bytes(first)


@pytest.mark.parametrize("nbytes", [0, 1, 63, 64, 1000, (1 << 16) + 77, 3 << 17])
@pytest.mark.parametrize("offset", [0, 1, 40])
def test_streaming_copy_copies_every_byte(nbytes: int, offset: int) -> None:
    """The bandwidth probe of ``bnkit bench``: a copy, whatever the size and alignment."""
    lib = native.library()
    assert lib is not None
    generator = torch.Generator().manual_seed(nbytes)
    source = torch.randint(0, 256, (nbytes + offset,), dtype=torch.uint8, generator=generator)
    target = torch.zeros(nbytes + 2 * offset + 1, dtype=torch.uint8)
    lib.bn_stream_copy(source.data_ptr() + offset, target.data_ptr() + offset, nbytes, 2)
    assert torch.equal(target[offset : offset + nbytes], source[offset:])
    assert not bool(target[:offset].any())
    assert not bool(target[offset + nbytes :].any())
