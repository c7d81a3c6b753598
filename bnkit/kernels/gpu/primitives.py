"""The four primitives of :mod:`bnkit.kernels.gpu`: launch planning and the custom ops.

Each primitive is a ``torch.library.triton_op`` (namespace ``bnkit_triton``) whose body
is torch operations and ``wrap_triton`` launches, so ``torch.compile`` traces into the
kernels instead of treating them as opaque calls; on a torch without ``triton_op`` they
are plain functions with the same launches. The public functions here take the
library's types (:class:`BatchStats`, optional tensors, activation names) and call them.

Importing this module does not import Triton; the first call does (and decorates the
kernels, :func:`bnkit.kernels.gpu.jit.build`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bnkit.kernels import portable as _portable
from bnkit.kernels.gpu import jit
from bnkit.kernels.stats import BatchStats, Update, compute_dtype

__all__ = [
    "ACTIVATION_CODES",
    "affine",
    "backward_input",
    "backward_reduce",
    "batch_stats",
    "plan",
    "register_ops",
    "update_running_stats",
]

#: Activation names and their codes in the kernels (None: no activation).
ACTIVATION_CODES = {None: 0, "identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3}

#: Values per tile (BLOCK_R * BLOCK_K): what one program loads per loop step.
TILE = 2048
#: The widest tile along the channels of a channels-last input.
CHANNEL_BLOCK = 128
#: How many programs a launch aims at (a few per streaming multiprocessor of a large GPU).
TARGET_PROGRAMS = 1024
#: A program gets at least this many tiles: splitting further only adds partials.
MIN_TILES = 4


class Plan(NamedTuple):
    """How the kernels walk a tensor (see :mod:`bnkit.kernels.gpu.jit`)."""

    channels_last: bool  #: rows of C channels (channels-last, 2D, L = 1) or (N, C, L)
    rows: int  #: R, per ghost batch: N (ncl) or N * spatial (nc), N its samples
    cols: int  #: K: L (ncl) or C (nc)
    inner: int  #: L, the spatial size (1 for nc)
    stride_r: int  #: elements between consecutive rows
    block_r: int
    block_k: int
    groups: int  #: grid axis 0: channels (ncl) or channel blocks (nc)
    blocks: int  #: grid axis 1: blocks of rows (and of columns, ncl)
    col_blocks: int  #: KB: column blocks per row block (1 for nc)
    rows_per: int  #: rows per program, a multiple of block_r
    cols_per: int  #: columns per program, a multiple of block_k
    channels: int  #: NC: C, the stride between ghost batches' per-channel values
    ghosts: int  #: grid axis 2: ghost batches (1: the whole batch)

    def args(self) -> tuple[int, int, int, int, int]:
        """(R, K, L, stride_r, NC) as the kernels take them."""
        return self.rows, self.cols, self.inner, self.stride_r, self.channels

    def split(self) -> tuple[int, int, int]:
        """(KB, ROWS_PER, COLS_PER) as the kernels take them."""
        return self.col_blocks, self.rows_per, self.cols_per


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def prepare(x: Tensor) -> Tensor:
    """x in the memory format the kernels (and torch's batch norm output) use: contiguous,
    or channels-last for a channels-last 4D/5D input. A copy only for other strides."""
    fmt = _portable._output_memory_format(x)
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


def plan(x: Tensor, ghosts: int = 1) -> Plan:
    """The launch plan for a prepared (N, C, *) tensor x (see :func:`prepare`), split into
    ``ghosts`` ghost batches of N / ghosts samples each (a divisor of N)."""
    n, c = x.shape[0] // ghosts, x.shape[1]
    inner = math.prod(x.shape[2:])
    channels_last = x.dim() == 2 or inner == 1 or not x.is_contiguous()
    if channels_last:
        rows = n * inner
        block_k = min(_pow2(c), CHANNEL_BLOCK, TILE)
        block_r = max(1, min(_pow2(rows), TILE // block_k))
        groups = _cdiv(c, block_k)
        tiles_r = _cdiv(rows, block_r)
        programs = min(max(1, TARGET_PROGRAMS // groups), max(1, tiles_r // MIN_TILES))
        rows_per = _cdiv(tiles_r, programs) * block_r
        blocks = _cdiv(rows, rows_per)
        return Plan(
            True, rows, c, 1, c, block_r, block_k, groups, blocks, 1, rows_per, block_k, c, ghosts
        )
    block_k = min(_pow2(inner), TILE)
    block_r = max(1, min(_pow2(n), TILE // block_k))
    tiles_r, tiles_k = _cdiv(n, block_r), _cdiv(inner, block_k)
    programs = min(max(1, TARGET_PROGRAMS // c), max(1, tiles_r * tiles_k // MIN_TILES))
    row_blocks = min(tiles_r, programs)
    col_blocks = min(tiles_k, _cdiv(programs, row_blocks))
    rows_per = _cdiv(tiles_r, row_blocks) * block_r
    cols_per = _cdiv(tiles_k, col_blocks) * block_k
    row_blocks, col_blocks = _cdiv(n, rows_per), _cdiv(inner, cols_per)
    return Plan(
        False,
        n,
        inner,
        inner,
        c * inner,
        block_r,
        block_k,
        c,
        row_blocks * col_blocks,
        col_blocks,
        rows_per,
        cols_per,
        c,
        ghosts,
    )


@contextmanager
def _launching() -> Iterator[None]:
    """Build the kernels if needed; under the interpreter, silence NumPy's floating-point
    warnings (the GPU computes IEEE results without them: 0 * inf in a lane that a
    ``where`` discards, log of a masked-off lane)."""
    jit.build()
    if interpreting():
        import numpy as np

        with np.errstate(all="ignore"):
            yield
    else:
        yield


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_type() -> str:
    """The device type whose tensors the kernels take: CUDA, or the CPU under the
    interpreter."""
    return "cpu" if interpreting() else "cuda"


def _launch(kernel: Any, p: Plan | tuple[int, ...]) -> Any:
    """``kernel[grid]`` through ``wrap_triton`` (when torch has it), for plan p (or a grid)."""
    wrap = getattr(torch.library, "wrap_triton", None)
    fn = kernel if wrap is None else wrap(kernel)
    return fn[(p.groups, p.blocks, p.ghosts) if isinstance(p, Plan) else p]


#: Channels per program of the merge kernel.
MERGE_CHANNELS = 16


def _merge(parts: Tensor, outputs: list[Tensor], chan: bool) -> None:
    """Merge (2 or 3, C, B) partials into ``outputs`` ((C,) each): Chan's update of
    (count, mean, M2) into (count, mean, var), or sums of two partials. One launch."""
    c, blocks = parts.shape[1], parts.shape[2]
    block_b = min(_pow2(blocks), max(1, TILE // MERGE_CHANNELS))
    a, b, *rest = parts.unbind(0)
    third = rest[0] if rest else b
    out_c = outputs[2] if chan else outputs[1]
    _launch(jit.merge_kernel, (_cdiv(c, MERGE_CHANNELS),))(
        a,
        b,
        third,
        outputs[0],
        outputs[1],
        out_c,
        c,
        blocks,
        CHAN=chan,
        BLOCK_C=MERGE_CHANNELS,
        BLOCK_B=block_b,
    )


class _Op:
    """A function registered as the custom op ``bnkit_triton::name`` on its first call, with
    ``torch.library.triton_op`` where torch has it (as it is otherwise). Registering
    imports Triton, which must not happen at import: Triton reads ``TRITON_INTERPRET``
    when it is first imported."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self.op: Callable[..., Any] | None = None

    def register(self) -> Callable[..., Any]:
        if self.op is None:
            triton_op = getattr(torch.library, "triton_op", None)
            if triton_op is None:
                self.op = self.fn
            else:
                self.op = triton_op(f"bnkit_triton::{self.name}", mutates_args=())(self.fn)
        return self.op

    def __call__(self, *args: Any) -> Any:
        return self.register()(*args)


_OPS: list[_Op] = []


def register_ops() -> None:
    """Register the custom ops (and import Triton) now. ``torch.compile`` cannot trace the
    first call's registration: call this before compiling code that uses the kernels."""
    for op in _OPS:
        op.register()


def _op(name: str) -> Callable[[Callable[..., Any]], _Op]:
    """Decorator: ``fn`` as the lazily registered op ``bnkit_triton::name``."""

    def register(fn: Callable[..., Any]) -> _Op:
        _OPS.append(_Op(name, fn))
        return _OPS[-1]

    return register


def _params(dtype: torch.dtype, param: float, saved_dtype: torch.dtype, device: Any) -> Tensor:
    """[param, zfloor] in the compute dtype. zfloor: the ELU pre-activation below which
    alpha * exp(z) is under half an ulp of alpha in ``saved_dtype``, i.e. the output
    rounds to -alpha (the stand-in for z where the output saturated)."""
    zfloor = math.log(torch.finfo(saved_dtype).eps / 2)
    return torch.tensor([param, zfloor], dtype=dtype, device=device)


def _mask_bytes(mask: Tensor) -> Tensor:
    """A (N, *spatial) mask as contiguous bytes; any nonzero byte counts as valid."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


@_op("batch_stats")
def _batch_stats_op(
    x: Tensor, mask: Tensor | None, ghosts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = prepare(x)
    p = plan(x, ghosts)
    dtype = compute_dtype(x.dtype)
    c = x.shape[1] * ghosts
    shift = torch.empty(c, dtype=dtype, device=x.device)
    parts = torch.empty((3, c, p.blocks), dtype=dtype, device=x.device)
    if mask is not None:
        bytes_ = _mask_bytes(mask)
        # Each ghost batch's first valid position, in the mask's order (argmax of bytes
        # that are 0 or 1: the first 1).
        valid = (bytes_.reshape(ghosts, -1) != 0).to(torch.uint8)
        starts = torch.arange(ghosts, device=x.device) * valid.shape[1]
        first = valid.argmax(dim=1) + starts
    else:
        bytes_ = first = shift  # placeholders the kernel does not read
    with _launching():
        _launch(jit.stats_kernel, p)(
            x,
            bytes_,
            first,
            shift,
            parts[0],
            parts[1],
            parts[2],
            *p.args(),
            p.blocks,
            *p.split(),
            CL=p.channels_last,
            HAS_MASK=mask is not None,
            BLOCK_R=p.block_r,
            BLOCK_K=p.block_k,
        )
        count, shifted_mean, var = (torch.empty_like(shift) for _ in range(3))
        _merge(parts, [count, shifted_mean, var], chan=True)
    return count, shift, shifted_mean, var


def batch_stats(x: Tensor, mask: Tensor | None = None, ghosts: int = 1) -> BatchStats:
    """Per-channel (count, shift, shifted mean, biased variance) of x (N, C, *), one read.

    The shift is ``x[0, c, 0, ...]`` (with a mask, x at the first valid position, as the
    CPU kernel). ``mask``: (N, *spatial), nonzero bytes valid. With ``ghosts`` > 1 (a
    divisor of N) each of that many ghost batches of N / ghosts samples gets its own
    statistics, in the same launch: vectors of ghosts * C values, ghost batch j's at
    [j * C, (j + 1) * C).
    """
    count, shift, shifted_mean, var = _batch_stats_op(x.detach(), mask, ghosts)
    assert isinstance(var, Tensor)
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)


@_op("affine")
def _affine_op(
    x: Tensor,
    shift: Tensor,
    alpha: Tensor,
    beta: Tensor,
    activation: int,
    param: float,
    ghosts: int,
) -> Tensor:
    x = prepare(x)
    p = plan(x, ghosts)
    dtype = compute_dtype(x.dtype)
    s, a, b = (v.to(dtype).contiguous() for v in (shift, alpha, beta))
    y = torch.empty_like(x)
    prm = _params(dtype, param, x.dtype, x.device)
    with _launching():
        _launch(jit.affine_kernel, p)(
            x,
            y,
            s,
            a,
            b,
            prm,
            *p.args(),
            *p.split(),
            CL=p.channels_last,
            ACT=activation,
            BLOCK_R=p.block_r,
            BLOCK_K=p.block_k,
        )
    return y


def affine(
    x: Tensor,
    shift: Tensor,
    alpha: Tensor,
    beta: Tensor,
    activation: str | None = None,
    param: float | None = None,
    ghosts: int = 1,
) -> Tensor:
    """y = act((x - shift) * alpha + beta) per channel, in x's dtype and memory format;
    computed in float32 (float64 for float64 x). One read of x, one write of y. With
    ``ghosts`` > 1 the vectors hold ghosts * C values (see :func:`batch_stats`)."""
    y: Tensor = _affine_op(
        x.detach(),
        shift.detach(),
        alpha.detach(),
        beta.detach(),
        ACTIVATION_CODES[activation],
        0.0 if param is None else float(param),
        ghosts,
    )
    return y


def _vectors(dtype: torch.dtype, first: Tensor, *rest: Tensor | None) -> list[Tensor]:
    """(C,) vectors in the compute dtype, contiguous; None becomes ``first`` (a placeholder
    the kernel does not read)."""
    return [(first if v is None else v).to(dtype).contiguous() for v in (first, *rest)]


@_op("backward_reduce")
def _backward_reduce_op(
    g: Tensor,
    src: Tensor,
    shift: Tensor,
    shifted_mean: Tensor,
    z_alpha: Tensor | None,
    z_beta: Tensor | None,
    activation: int,
    param: float,
    from_output: bool,
    ghosts: int,
) -> tuple[Tensor, Tensor]:
    src = prepare(src)
    g = g.contiguous(memory_format=_portable._output_memory_format(src))
    p = plan(src, ghosts)
    dtype = compute_dtype(src.dtype)
    s, m, za, zb = _vectors(dtype, shift, shifted_mean, z_alpha, z_beta)
    c = src.shape[1] * ghosts
    parts = torch.empty((2, c, p.blocks), dtype=dtype, device=src.device)
    prm = _params(dtype, param, src.dtype, src.device)
    with _launching():
        _launch(jit.reduce_kernel, p)(
            g,
            src,
            s,
            m,
            za,
            zb,
            prm,
            parts[0],
            parts[1],
            *p.args(),
            p.blocks,
            *p.split(),
            CL=p.channels_last,
            ACT=activation,
            FROM_Y=from_output,
            BLOCK_R=p.block_r,
            BLOCK_K=p.block_k,
        )
        sum_g, sum_gc = (torch.empty_like(s) for _ in range(2))
        _merge(parts, [sum_g, sum_gc], chan=False)
    return sum_g, sum_gc


def backward_reduce(
    g: Tensor,
    src: Tensor,
    shift: Tensor,
    shifted_mean: Tensor,
    activation: str | None = None,
    param: float | None = None,
    from_output: bool = False,
    z_alpha: Tensor | None = None,
    z_beta: Tensor | None = None,
    ghosts: int = 1,
) -> tuple[Tensor, Tensor]:
    """(sum g', sum g' * (v - shift - shifted_mean)) per channel (and ghost batch, see
    :func:`batch_stats`), in the compute dtype, in one read of g and src; g' = g * act'(z).

    ``from_output`` False: src is x, v = x, and z = (x - shift) * z_alpha + z_beta is
    recomputed for the slope (needed for relu, leaky_relu and elu). ``from_output``
    True: src is the output y of the fused activation, v = z = act^-1(y), and the
    caller passes shift = bias, shifted_mean = 0 (so the second sum is
    sum g' * (z - bias) = gamma * sum g' * x_hat). Where an ELU output saturated, g' = 0
    exactly (no contribution).
    """
    sums: tuple[Tensor, Tensor] = _backward_reduce_op(
        g.detach(),
        src.detach(),
        shift.detach(),
        shifted_mean.detach(),
        None if z_alpha is None else z_alpha.detach(),
        None if z_beta is None else z_beta.detach(),
        ACTIVATION_CODES[activation],
        0.0 if param is None else float(param),
        from_output,
        ghosts,
    )
    return sums


@_op("backward_input")
def _backward_input_op(
    g: Tensor,
    src: Tensor,
    shift: Tensor,
    alpha: Tensor,
    k1: Tensor,
    k0: Tensor,
    z_alpha: Tensor | None,
    z_beta: Tensor | None,
    activation: int,
    param: float,
    from_output: bool,
    mask: Tensor | None,
    ghosts: int,
) -> Tensor:
    src = prepare(src)
    g = g.contiguous(memory_format=_portable._output_memory_format(src))
    p = plan(src, ghosts)
    dtype = compute_dtype(src.dtype)
    s, a, c1, c0, za, zb = _vectors(dtype, shift, alpha, k1, k0, z_alpha, z_beta)
    dx = torch.empty_like(src)
    prm = _params(dtype, param, src.dtype, src.device)
    bytes_ = s if mask is None else _mask_bytes(mask)
    with _launching():
        _launch(jit.input_kernel, p)(
            g,
            src,
            dx,
            s,
            a,
            c1,
            c0,
            za,
            zb,
            prm,
            bytes_,
            *p.args(),
            *p.split(),
            CL=p.channels_last,
            ACT=activation,
            FROM_Y=from_output,
            HAS_MASK=mask is not None,
            BLOCK_R=p.block_r,
            BLOCK_K=p.block_k,
        )
    return dx


def backward_input(
    g: Tensor,
    src: Tensor,
    shift: Tensor,
    alpha: Tensor,
    k1: Tensor,
    k0: Tensor,
    activation: str | None = None,
    param: float | None = None,
    from_output: bool = False,
    mask: Tensor | None = None,
    z_alpha: Tensor | None = None,
    z_beta: Tensor | None = None,
    ghosts: int = 1,
) -> Tensor:
    """dx = g' * alpha + (v - shift) * k1 + k0 per channel (g' * alpha where ``mask`` is
    False), in src's dtype and memory format; g', v and ``ghosts`` as in
    :func:`backward_reduce`. One read of g and src, one write of dx."""
    dx: Tensor = _backward_input_op(
        g.detach(),
        src.detach(),
        shift.detach(),
        alpha.detach(),
        k1.detach(),
        k0.detach(),
        None if z_alpha is None else z_alpha.detach(),
        None if z_beta is None else z_beta.detach(),
        ACTIVATION_CODES[activation],
        0.0 if param is None else float(param),
        from_output,
        mask,
        ghosts,
    )
    return dx


#: Channels per loop step of the update kernel.
UPDATE_BLOCK = 1024


def update_running_stats(update: Update) -> Tensor | None:
    """The update of the running statistics in one launch (one program: O(C) work), the
    portable kernel's arithmetic in float64; returns the 0-d bool ``recorded``, or None
    where the kernel does not take the tensors (not on a CUDA device, or on the CPU under
    ``TRITON_INTERPRET=1``; running statistics or counter not contiguous on the
    statistics' device, a counter that is not int64; nothing changed)."""
    stats, running_mean, running_var, tracked, momentum, unbiased, skip_nonfinite = update
    device = stats.var.device
    if device.type != device_type():
        return None
    runs = [t for t in (running_mean, running_var) if t is not None]
    if any(t.device != device or not t.is_contiguous() for t in runs):
        return None
    if tracked is not None and (tracked.device != device or tracked.dtype != torch.int64):
        return None
    if momentum is None and tracked is None:
        return None
    recorded = torch.empty((), dtype=torch.bool, device=device)
    factor = _momentum(0.0 if momentum is None else float(momentum), device)
    dummy = stats.var
    with _launching():
        _launch(jit.update_kernel, (1,))(
            stats.count,
            stats.shift,
            stats.shifted_mean,
            stats.var,
            dummy if running_mean is None else running_mean,
            dummy if running_var is None else running_var,
            recorded if tracked is None else tracked,
            factor,
            recorded,
            stats.var.numel(),
            HAS_MEAN=running_mean is not None,
            HAS_VAR=running_var is not None,
            HAS_TRACKED=tracked is not None,
            UNBIASED=unbiased,
            SKIP=skip_nonfinite,
            CUMULATIVE=momentum is None,
            BLOCK=min(UPDATE_BLOCK, _pow2(stats.var.numel())),
        )
    return recorded


_MOMENTA: dict[tuple[float, torch.device], Tensor] = {}


def _momentum(value: float, device: torch.device) -> Tensor:
    """The momentum as a float64 tensor on ``device`` (a Triton kernel's float arguments
    are float32), made once per value and device: no copy to the device per call."""
    key = (value, device)
    if key not in _MOMENTA:
        _MOMENTA[key] = torch.tensor([value], dtype=torch.float64, device=device)
    return _MOMENTA[key]
