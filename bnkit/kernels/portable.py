"""The portable kernel: batch normalization in plain torch operations, for any device.

Numerics (why it is written this way):

- Statistics are computed on ``x - shift`` with ``shift`` = the channel's first value
  (``x[0, c, 0, ...]``). For data far from zero (a channel at 1e4 with spread 1e-2) that
  subtraction is exact in the input's dtype, so the mean and variance of the difference
  are as accurate as for centred data. The variance is then the exact two-pass one (the
  mean, then the mean squared deviation from it): never E[x^2] - E[x]^2. A sample of the
  data is a good enough shift: if it lies t standard deviations from the mean, the
  rounding error grows only by a factor of about t. On large CPU tensors each block of
  about :data:`BLOCK_BYTES` gets its own two passes (while it is in cache), and Chan's
  merge (:func:`bnkit.kernels.stats.merge_stats`) combines the blocks exactly.
- The normalization is ``(x - shift) * alpha + beta'`` with alpha = weight / sqrt(var + eps)
  and beta' = bias - shifted_mean * alpha: every term is of the order of the output. The
  usual folded form ``x * alpha + (bias - mean * alpha)`` (torch's CPU kernel) adds two
  terms of size |x| * alpha and loses about eps_machine * |x| / std of accuracy, i.e.
  percent-level errors in float32 for the data above. Likewise inference uses
  ``(x - running_mean) * alpha + bias``.
- float16 and bfloat16 inputs are promoted to float32 inside each operation; statistics,
  accumulation and the affine map run in float32 and only the output is rounded back.
  Alternatives considered: accumulating float32 input in float64 fixes the statistics but
  not the folded normalization, costs a float64 copy of the input, and float64 is slow or
  missing on many GPUs (and absent on MPS).
- torch's own fused batch-norm reductions are not used for the passes, though they are
  faster: ``torch.batch_norm_update_stats`` on the shifted data and
  ``aten.native_batch_norm_backward`` for the backward's two sums (with the shift as its
  mean) made a CPU training step 12-14% faster on channels-last and 2D tensors, but on
  those layouts torch's CPU kernels accumulate float32 in float32, one element after
  another: the float32 precision benchmark's training output at loc 1e4, channels-last,
  went from 7.8e-7 to 1.0e-5 of error, and the input gradient from 2.1e-7 to 2.6e-6.

What is here: the four passes of :class:`bnkit.kernels.stats.Primitives` in torch
operations (:data:`PRIMITIVES`; also the composite implementation of :mod:`.ops`'
operators), inference-mode normalization (composed operations that autograd
differentiates) and the update of the running statistics. The autograd formulas over the
passes, the same for every kernel, are :mod:`bnkit.kernels.primitive`'s;
:data:`bnkit.kernels.primitive.PORTABLE` is the kernel on these passes. Each pass works
in place on its own scratch tensor where it may (no autograd recording, no ``torch.func``
transform), so a training step keeps no more input-sized tensors alive than torch's
layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from bnkit.kernels import activation as act
from bnkit.kernels.stats import BatchStats, Primitives, Update, compute_dtype, merge_stats

__all__ = [
    "PRIMITIVES",
    "affine",
    "backward_input",
    "backward_reduce",
    "batch_stats",
    "normalize_population",
    "transformed",
    "update_running_stats",
]


#: Whether a torch.func transform is active (torch.compile traces this test; it would
#: take torch._C._functorch.peek_interpreter_stack() for a transform every time)
_transforms_active = torch._C._are_functorch_transforms_active


def transformed() -> bool:
    """Whether a ``torch.func`` transform or forward-mode AD (``torch.autograd.forward_ad``)
    is active: the calls this kernel takes whatever the tensors, since only its autograd
    functions have vmap and forward-mode rules."""
    return _transforms_active() or forward_ad._current_level >= 0


def _channel_view(x: Tensor) -> list[int]:
    """Shape that broadcasts a (C,) vector against x (N, C, *): [1, C, 1, ...]."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def _output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format torch's batch norm gives its output: channels-last for a
    channels-last 4D or 5D input, contiguous for anything else (and inside torch.func
    transforms, which cannot query other memory formats of their tensors)."""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return torch.contiguous_format
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    if (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def _in_place(*operands: Tensor) -> bool:
    """Whether a tensor made inside this kernel may be reused in place: not under a
    torch.func transform or with a batched ``operand`` (batched gradients), where it may
    be unbatched while what it is combined with is batched."""
    if torch.compiler.is_compiling():
        return not transformed()  # a traced transform's tensors are wrappers too
    functorch = torch._C._functorch
    return functorch.peek_interpreter_stack() is None and not any(
        functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t)
        for t in operands
    )


def _affine_terms(
    shifted_mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-channel (alpha, beta') such that y = (x - shift) * alpha + beta'."""
    alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
    beta = -shifted_mean * alpha
    if bias is not None:
        beta = beta + bias.to(invstd.dtype)
    return alpha, beta


def _two_pass_moments(
    shifted: Tensor, dims: list[int], view: list[int], *, in_place: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance: the mean first, then the mean squared deviation
    from it (exact two-pass; several times faster than torch.var_mean's Welford on CPU)."""
    mean = shifted.mean(dims)  # (C,)
    # in place: the caller's scratch becomes the deviations (no second input-sized tensor)
    reuse = in_place and _in_place()
    deviation = shifted.sub_(mean.view(view)) if reuse else shifted - mean.view(view)
    # mul_ rather than square_: square_ has no vmap batching rule.
    squared = deviation.mul_(deviation) if reuse else deviation * deviation
    return mean, squared.mean(dims)


def batch_stats(x: Tensor, mask: Tensor | None = None) -> BatchStats:
    """Per-channel (count, shift, shifted_mean, biased var) of x (N, C, *), no autograd graph.

    With ``mask`` (bool, (N, *spatial), True = valid) the statistics run over the valid
    positions only. Padding may hold anything (NaN included): it is selected away with
    ``torch.where``, never multiplied by zero.

    Example:
        >>> x = 1e4 + 1e-2 * torch.randn(64, 3)
        >>> stats = batch_stats(x)
        >>> bool((stats.var.sqrt() / 1e-2 - 1).abs().max() < 0.5)
        True
    """
    x = x.detach()
    if mask is not None:
        return _masked_batch_stats(x, mask)
    first = (0, slice(None)) + (0,) * (x.dim() - 2)
    shift = x[first].to(compute_dtype(x.dtype)).clone()  # (C,)
    (rows,) = _rows(x)
    blocks = _blocks(rows) if _in_place(x) else [_WHOLE]
    if len(blocks) == 1:
        # Mixed-dtype subtraction promotes half inputs to float32 without a separate copy.
        return _shifted_stats(x - shift.view(_channel_view(x)), shift)
    return _blocked_stats(rows, shift, blocks)


def _blocked_stats(rows: Tensor, shift: Tensor, blocks: list[Block]) -> BatchStats:
    """Statistics a block at a time, each block's two passes on a scratch still in cache;
    then Chan's merge of the blocks of samples (all relative to the same shift)."""
    (s,) = _vectors(rows, shift)
    scratch = torch.empty(_largest(rows, blocks), dtype=shift.dtype)
    starts = sorted({block[0].start for block in blocks})
    means, variances = (shift.new_empty(len(starts), shift.numel()) for _ in range(2))
    counts = shift.new_empty(len(starts), 1)
    for block in blocks:
        part = rows[block]
        shifted = torch.sub(part, s[:, block[1]], out=_fit(scratch, part))
        i = starts.index(block[0].start)
        stats = _shifted_stats(shifted, shift)
        means[i, block[1]], variances[i, block[1]] = stats.shifted_mean, stats.var
        counts[i] = stats.count[0]
    parts = zip(counts, means, variances, strict=True)
    return merge_stats([BatchStats(c.expand_as(shift), shift, m, v) for c, m, v in parts])


def _shifted_stats(shifted: Tensor, shift: Tensor) -> BatchStats:
    """The statistics of ``shifted`` = x - shift (N, C, *), which becomes scratch."""
    view = _channel_view(shifted)
    shifted_mean, var = _two_pass_moments(shifted, _reduce_dims(shifted), view)  # (C,), (C,)
    channels = shifted.shape[1]
    count = torch.full(
        (channels,), shifted.numel() // max(channels, 1), dtype=var.dtype, device=var.device
    )
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)


def _valid(mask: Tensor) -> Tensor:
    """A (N, *spatial) mask as (N, 1, *spatial), broadcasting against (N, C, *spatial)."""
    return mask.unsqueeze(1)


def _masked_moments(
    shifted: Tensor, valid: Tensor, count: Tensor, dims: list[int], view: list[int]
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the valid entries of ``shifted``, two passes."""
    zero = shifted.new_zeros(())
    mean = torch.where(valid, shifted, zero).sum(dims) / count  # (C,)
    deviation = torch.where(valid, shifted - mean.view(view), zero)  # (N, C, *)
    return mean, (deviation * deviation).sum(dims) / count


def _masked_batch_stats(x: Tensor, mask: Tensor) -> BatchStats:
    """Masked statistics: the shift is the valid values' mean from a first pass (no sample
    of the data is known to be valid without a host synchronization), then two passes."""
    dtype = compute_dtype(x.dtype)
    view = _channel_view(x)
    dims = _reduce_dims(x)
    valid = _valid(mask)  # (N, 1, *)
    count = valid.to(dtype).sum(dims).expand(x.shape[1]).clone()  # (C,)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    shift = torch.where(valid, x.to(dtype), zero).sum(dims) / count  # (C,)
    shifted_mean, var = _masked_moments(x - shift.view(view), valid, count, dims, view)
    return BatchStats(count=count, shift=shift, shifted_mean=shifted_mean, var=var)


def _update_dtype(device: torch.device) -> torch.dtype:
    """Running statistics are blended in float64 where the device has it (C values: free),
    which reproduces torch's CPU update ``m * batch + (1 - m) * running`` in double."""
    return torch.float32 if device.type == "mps" else torch.float64


def _scratch(*operands: Tensor) -> bool:
    """Whether a pass may overwrite a tensor it made: nothing records it for autograd and
    :func:`_in_place` allows it for ``operands``."""
    return not torch.is_grad_enabled() and _in_place(*operands)


#: On the CPU a pass over a tensor larger than twice this many bytes goes a block at a
#: time, so that what one operation writes is still in cache when the next reads it:
#: ``(x - s) * a + b`` then reads x and writes y once, instead of three times. 2 MB, the
#: L2 cache of two cores of the machine it was tuned on, measured fastest for the
#: statistics; 1 MB and 4 MB were slower.
BLOCK_BYTES = 2 << 20

#: A block: (samples or rows, channels) of an (N, C, *) tensor.
Block = tuple[slice, slice]
_WHOLE: Block = (slice(None), slice(None))


def _blocks(x: Tensor) -> list[Block]:
    """Blocks of about :data:`BLOCK_BYTES` of x: a few samples (rows of a (rows, C) view)
    each, or a few channels of one sample where a sample is larger. One block (the whole
    tensor) off the CPU, where a launch per block would cost more, for small tensors, and
    while tracing (the blocks write with ``out=``, which a traced graph cannot record)."""
    rows, channels = x.shape[0], x.shape[1]
    nbytes = x.numel() * x.element_size()
    if not x.is_cpu or nbytes <= 2 * BLOCK_BYTES or torch.compiler.is_compiling():
        return [_WHOLE]
    row_bytes = nbytes // rows
    if row_bytes <= BLOCK_BYTES or x.dim() == 2:
        step = max(1, BLOCK_BYTES // row_bytes)
        return [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]
    width = max(1, channels * BLOCK_BYTES // row_bytes)
    return [
        (slice(r, r + 1), slice(c, c + width))
        for r in range(rows)
        for c in range(0, channels, width)
    ]


def _rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """(N, C, *) tensors as (rows, C) views when every one has its channels innermost
    (channels-last, or 2D): torch blocks and reduces those fastest as rows. Otherwise the
    tensors as they are, blocked by samples."""
    rows = []
    for x in tensors:
        inner = x.movedim(1, -1)
        if not inner.is_contiguous():
            return tensors
        rows.append(inner.view(-1, x.shape[1]))
    return tuple(rows)


def _largest(x: Tensor, blocks: list[Block]) -> int:
    """Elements in the largest block (the first)."""
    return x[blocks[0]].numel()


def _fit(scratch: Tensor, part: Tensor) -> Tensor:
    """The start of a flat scratch buffer shaped as the contiguous block ``part``, or a
    new tensor like ``part`` if it is not contiguous."""
    if not part.is_contiguous():
        return torch.empty_like(part, dtype=scratch.dtype)
    return scratch[: part.numel()].view(part.shape)


def _vectors(x: Tensor, *vectors: Tensor) -> list[Tensor]:
    """(C,) vectors in x's compute dtype, shaped to broadcast against x."""
    view = _channel_view(x)
    return [v.to(compute_dtype(x.dtype)).view(view) for v in vectors]


def _output(y: Tensor, like: Tensor) -> Tensor:
    return y.to(like.dtype).contiguous(memory_format=_output_memory_format(like))


def _z(x: Tensor, s: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """z = (x - s) * a + b for broadcast vectors s, a, b, into ``out`` if given (which may
    be a block of a larger tensor); rounded the same way either way (a backward
    recomputing the forward's z gets it bit for bit)."""
    if out is None and not _scratch(x, s, a, b):
        return (x - s) * a + b
    t = x - s if out is None else torch.sub(x, s, out=out)
    return t.mul_(a).add_(b)  # not addcmul, which is several times slower with vector b


def affine(
    x: Tensor, shift: Tensor, alpha: Tensor, beta: Tensor, activation: str | None = None,
    param: float | None = None,
) -> Tensor:  # fmt: skip
    """y = act((x - shift) * alpha + beta), in x's dtype and torch's output layout. The
    difference ``x - shift`` is the one new input-sized tensor where it may be scaled,
    shifted and activated in place (see :func:`_scratch`), as torch's kernel keeps one."""
    s, a, b = _vectors(x, shift, alpha, beta)
    scratch = _scratch(x, shift, alpha, beta)
    if not scratch or len(_blocks(x)) == 1:
        z = _z(x, s, a, b)
        return _output(z if activation is None else act.activate(z, activation, param, scratch), x)
    fmt = _output_memory_format(x)
    y = torch.empty_like(x, dtype=compute_dtype(x.dtype), memory_format=fmt)
    rows, out = _rows(x, y)
    s, a, b = _vectors(rows, shift, alpha, beta)
    for block in _blocks(rows):  # the rounding of _z's, a block at a time
        c = block[1]
        part = _z(rows[block], s[:, c], a[:, c], b[:, c], out[block])
        if activation is not None:
            act.activate(part, activation, param, inplace=True)
    return _output(y, x)


class _Gradient(NamedTuple):
    """What both backward passes start from: g' = g * act'(z) and v (x, or the z
    recovered from the output), in the compute dtype; ``fresh`` when v is a new tensor
    the pass may overwrite."""

    g: Tensor
    v: Tensor
    fresh: bool


def _gradient(
    g: Tensor, src: Tensor, shift: Tensor, activation: str | None, param: float | None,
    from_output: bool, z_alpha: Tensor | None, z_beta: Tensor | None, scratch: bool,
) -> _Gradient:  # fmt: skip
    """g' and v: src is x (the slope from z = (x - shift) * z_alpha + z_beta, recomputed as
    the forward pass computed it) or, with ``from_output``, the output y (v = act^-1(y),
    0 where an elu saturated, where the slope is 0). With ``scratch`` at most two new
    input-sized tensors are alive at once."""
    name = activation or "identity"
    dtype = compute_dtype(src.dtype)
    if from_output and name != "identity":
        v, slope = act.preactivation_and_slope(src.to(dtype), name, param, scratch)
        if name == "elu" and scratch:
            v = v.masked_fill_(slope == 0, 0.0)
        elif name == "elu":
            v = torch.where(slope == 0, 0.0, v)
        fresh = True
    elif name == "identity" or z_alpha is None or z_beta is None:  # slope 1
        return _Gradient(g.to(dtype), src.to(dtype), False)
    else:
        s, za, zb = _vectors(src, shift, z_alpha, z_beta)
        z = _z(src, s, za, zb)
        form = act.activate(z, name, param, scratch) if act.saves_output(name) else z
        slope, v, fresh = act.slope(form, name, param), src.to(dtype), False
    return _Gradient(slope.mul_(g) if scratch else slope * g, v, fresh)


def backward_reduce(
    g: Tensor, src: Tensor, shift: Tensor, shifted_mean: Tensor, activation: str | None = None,
    param: float | None = None, from_output: bool = False, z_alpha: Tensor | None = None,
    z_beta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(sum g', sum g' * (v - shift - shifted_mean)) per channel (see
    :class:`bnkit.kernels.stats.Primitives`)."""
    scratch = _scratch(g, src, shifted_mean)
    grad = _gradient(g, src, shift, activation, param, from_output, z_alpha, z_beta, scratch)
    if not scratch:
        s, m = _vectors(src, shift, shifted_mean)
        dims = _reduce_dims(src)
        return grad.g.sum(dims), (grad.g * (grad.v - s - m)).sum(dims)
    # sum g' * (v - s) - m * sum g': v - s is exact for v near the shift, and m (the mean's
    # distance from a sample of the data) is of the order of the spread, so this loses no
    # more than the statistics' own rounding; a block at a time, v - s in one scratch.
    vs, gs = _rows(grad.v, grad.g)
    dims = _reduce_dims(vs)
    (s,) = _vectors(vs, shift)
    blocks = _blocks(vs)
    scratch_v = None if grad.fresh else vs.new_empty(_largest(vs, blocks))
    sums, products = (vs.new_zeros(shift.numel()) for _ in range(2))
    for block in blocks:
        v, g, c = vs[block], gs[block], block[1]
        out = v if scratch_v is None else _fit(scratch_v, v)
        sums[c] += g.sum(dims)
        products[c] += torch.sub(v, s[:, c], out=out).mul_(g).sum(dims)
    return sums, products - shifted_mean.to(sums.dtype) * sums


def backward_input(
    g: Tensor, src: Tensor, shift: Tensor, alpha: Tensor, k1: Tensor, k0: Tensor,
    activation: str | None = None, param: float | None = None, from_output: bool = False,
    mask: Tensor | None = None, z_alpha: Tensor | None = None, z_beta: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """dx = g' * alpha + (v - shift) * k1 + k0 (g' * alpha where ``mask`` is False), in
    src's dtype and layout; ``v - shift`` becomes dx in place where it may."""
    scratch = _scratch(g, src, alpha, k1, k0)
    grad = _gradient(g, src, shift, activation, param, from_output, z_alpha, z_beta, scratch)
    s, a, c1, c0 = _vectors(src, shift, alpha, k1, k0)
    valid = None if mask is None else _valid(mask)  # the statistics ignore padding
    if not scratch:
        through_stats = torch.addcmul(c0, grad.v - s, c1)
        if valid is not None:
            through_stats = torch.where(valid, through_stats, 0.0)
        return _output(torch.addcmul(through_stats, grad.g, a), src)
    if len(_blocks(grad.v)) == 1:
        dx = _z(grad.v, s, c1, c0, grad.v if grad.fresh else None)
        if valid is not None:
            dx.masked_fill_(~valid, 0.0)
        return _output(dx.addcmul_(grad.g, a), src)
    dx = grad.v if grad.fresh else torch.empty_like(grad.v)
    vs, gs, out = _rows(grad.v, grad.g, dx)
    if mask is not None and vs.dim() == 2:  # rows (of samples and positions)
        valid = mask.reshape(-1, 1)
    s, a, c1, c0 = _vectors(vs, shift, alpha, k1, k0)
    for block in _blocks(vs):  # v - s becomes dx in place, a block at a time
        c = block[1]
        part = _z(vs[block], s[:, c], c1[:, c], c0[:, c], out[block])
        if valid is not None:
            part.masked_fill_(~valid[block[0]], 0.0)
        part.addcmul_(gs[block], a[:, c])
    return _output(dx, src)


#: The four passes in torch operations: any device, dtype and layout, every option,
#: ``torch.func`` transforms and ``torch.compile``.
PRIMITIVES = Primitives(
    name="torch operations",
    supports=lambda x, mask: True,
    batch_stats=batch_stats,
    affine=affine,
    backward_reduce=backward_reduce,
    backward_input=backward_input,
    masked_activation=True,
)


def normalize_population(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, affine_pass: Callable[..., Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """Inference-mode normalization, ``(x - mean) * weight / sqrt(var + eps) + bias``:
    the (C,) coefficients in torch operations, then ``affine_pass`` (a kernel's
    :attr:`~bnkit.kernels.stats.Primitives.affine`; by default :func:`affine`, which
    autograd differentiates with respect to every argument). ``x - mean`` is exact for x
    near the mean, unlike x * alpha - mean * alpha."""
    dtype = compute_dtype(x.dtype)
    alpha = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        alpha = alpha * weight.to(dtype)
    beta = torch.zeros_like(alpha) if bias is None else bias.to(dtype)
    return (affine_pass or affine)(x, mean.to(dtype), alpha, beta)


def update_running_stats(update: Update) -> Tensor | None:
    """Fold the batch statistics into the running ones, in place, in torch operations on
    (C,) vectors (no host synchronization); see
    :meth:`bnkit.kernels.pipeline.Kernel.update_running_stats`."""
    stats, running_mean, running_var, num_batches_tracked, momentum, unbiased, skip = update
    with torch.no_grad():
        dtype = _update_dtype(stats.var.device)
        # Formed in the update dtype, so a float32 mean far from zero is rounded once.
        batch_mean = stats.shift.to(dtype) + stats.shifted_mean.to(dtype)
        batch_var = stats.var.to(dtype)
        if unbiased:
            count = stats.count.to(dtype)
            batch_var = batch_var * count / (count - 1)
        # The mean and the variance side by side: each operation below is one launch for
        # both on a GPU (or MPS), where the update is otherwise a dozen small launches.
        batch = torch.stack((batch_mean, batch_var))
        recorded = None
        if skip:
            # A 0-d device tensor: deciding with torch.where keeps the update free of
            # host synchronization and of graph breaks under torch.compile. v - v is 0
            # exactly for finite v and NaN for NaN and +-Inf: two operations, where
            # torch.isfinite is four.
            recorded = ((batch - batch) == 0).all()
        if num_batches_tracked is not None:
            if recorded is None:
                num_batches_tracked.add_(1)
            else:
                num_batches_tracked.add_(recorded.to(num_batches_tracked.dtype))
        factor: float | Tensor
        if momentum is None:
            # Cumulative average: the k-th recorded batch gets weight 1/k.
            if num_batches_tracked is None:
                raise ValueError("momentum=None needs num_batches_tracked")
            factor = 1.0 / num_batches_tracked.to(dtype)
        else:
            factor = momentum
        runnings = [r for r in (running_mean, running_var) if r is not None]
        if not runnings:
            return recorded
        if len(runnings) == 2:
            old = torch.stack(runnings).to(dtype)
        else:  # one of the two, as a row
            batch = (batch_mean if running_mean is not None else batch_var).unsqueeze(0)
            old = runnings[0].to(dtype).unsqueeze(0)
        new = batch * factor + old * (1.0 - factor)
        if recorded is not None:
            new = torch.where(recorded, new, old)
        for k, running in enumerate(runnings):
            running.copy_(new[k])
        return recorded
