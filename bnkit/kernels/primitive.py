"""The autograd formulas of batch normalization, once, over any kernel's four passes.

Every kernel implements the same four passes over memory with the same meaning
(:class:`bnkit.kernels.stats.Primitives`): per-channel statistics, the affine map fused
with an activation, the backward pass's two reductions, and the input gradient. The C
loops (:mod:`.cpu`), the Triton kernels (:mod:`.gpu`), the operators that dispatch
between them (:mod:`.ops`) and torch operations (:mod:`.portable`) are such sets.
:class:`PrimitiveKernel` builds the :class:`bnkit.kernels.pipeline.Kernel` protocol on
one, and the two autograd functions here are the only ones a training-mode call
records, whatever runs its passes:

- :class:`_Normalize`, y = (x - shift - shifted_mean) * invstd * weight + bias, and
  :class:`_NormalizeActivate`, y = act(that), with the memory-efficient inversion of a
  fused activation;
- a backward of one reduction pass and one input-gradient pass, the reductions summed
  over a process group for synchronized statistics; a double backward
  (``create_graph=True``, ``torch.func.grad``) in differentiable operations that
  recompute the statistics (and a fused activation's slope) from x;
- a forward-mode rule (``jvp``: ``torch.func.jvp``, ``jacfwd``, ``hessian``,
  ``torch.autograd.forward_ad``), which the classes eager calls use define and their
  ``...Traceable`` bases for ``torch.compile`` do not (Dynamo refuses a Function that
  defines one);
- a vmap rule generated from the formulas (``generate_vmap_rule``): the forward and
  backward run on batched tensors, which the passes batch (torch operations by their
  own rules, the operators of :mod:`.ops` by theirs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from bnkit.distributed import all_reduce_sum
from bnkit.kernels import activation as act
from bnkit.kernels import portable
from bnkit.kernels.stats import BatchStats, Primitives, Update, input_gradient_coefficients

__all__ = ["PORTABLE", "PortableKernel", "PrimitiveKernel", "Primitives"]

_view = portable._channel_view
_dims = portable._reduce_dims


def _parameter_gradients(
    ctx: Any, weight: Tensor | None, sum_g_x_hat: Tensor, sum_g: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """(dweight, dbias) where requested: sum(g' * x_hat) and sum(g')."""
    grad_w = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_w = sum_g_x_hat.to(weight.dtype)
    grad_b = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = sum_g.to(ctx.bias_dtype)
    return grad_w, grad_b


def _global(ctx: Any, sum_g: Tensor, sum_g_x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """The backward pass's two per-channel sums over every process of a synchronized
    layer (one collective; every process takes part, whatever it needs), for dx. The
    parameter gradients stay this process's sums, as torch's SyncBatchNorm gives them."""
    if ctx.group is None:
        return sum_g, sum_g_x_hat
    both = all_reduce_sum(torch.stack([sum_g, sum_g_x_hat]), ctx.group)
    return both[0], both[1]


def _no_sync_derivative(group: Any, kind: str) -> None:
    if group is not None:
        raise RuntimeError(
            f"batch_norm: {kind} through statistics synchronized across processes is not "
            f"supported (sync=True)"
        )


def _no_ghost_derivative(ghosts: int) -> None:
    if ghosts > 1:  # forward-mode AD takes the portable kernel, whose passes loop instead
        raise RuntimeError(
            "batch_norm: forward-mode derivatives of ghost batches normalized in one "
            "launch are not supported"
        )


def _ghosts(n: int) -> dict[str, int]:
    """The keyword asking a pass for ``n`` ghost batches in one launch; none for the whole
    batch, so passes without ghost batches never see it."""
    return {} if n == 1 else {"ghosts": n}


def _per_ghost(n: int, *tensors: Tensor | None) -> list[list[Tensor | None]]:
    """Each ghost batch's part of ``tensors``: a batch tensor's j-th of n equal slices, a
    vector of n * C values' j-th C (None stays None)."""
    return [[None if t is None else t.chunk(n)[j] for t in tensors] for j in range(n)]


def _normalized(x: Tensor, shift: Tensor, shifted_mean: Tensor, invstd: Tensor) -> Tensor:
    """x_hat = (x - shift - shifted_mean) * invstd, in the compute dtype."""
    view = _view(x)
    return torch.addcmul((-shifted_mean * invstd).view(view), x - shift.view(view),
                         invstd.view(view))  # fmt: skip


class _Recomputed(NamedTuple):
    """What a differentiable backward recomputes the forward pass from (one ghost batch's
    part of it); ``bias`` only with a fused activation."""

    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    shift: Tensor
    counts: Tensor  #: values per channel
    mask: Tensor | None


def _differentiable_backward(
    ctx: Any, grad_output: Tensor, saved: _Recomputed
) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias) in differentiable operations, for a double backward (and for
    ``torch.func.grad``, which runs backward passes under autograd): the saved statistics
    carry no graph, so they are recomputed from x to let autograd see how they depend on
    it. Ghost batches one at a time. ``ctx.activation``, if set, is fused."""
    _no_sync_derivative(ctx.group, "double backward")
    need_dx = bool(ctx.needs_input_grad[0])
    activation = getattr(ctx, "activation", None)
    parts = [
        _differentiable_gradients(
            _Recomputed(*part), grad_output_part, ctx.eps, need_dx,  # type: ignore[arg-type]
            None if activation is None else (activation, ctx.param),
        )
        for *part, grad_output_part in _per_ghost(ctx.ghosts, *saved, grad_output)
    ]  # fmt: skip
    dx = None if not need_dx else torch.cat([p[0] for p in parts])  # type: ignore[misc]
    sum_g_x_hat = torch.cat([p[1] for p in parts])
    sum_g = torch.cat([p[2] for p in parts])
    return dx, *_parameter_gradients(ctx, saved.weight, sum_g_x_hat, sum_g)


def _differentiable_gradients(
    saved: _Recomputed, grad_output: Tensor, eps: float, need_dx: bool,
    activation: tuple[str, float | None] | None,
) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """(dx, sum g' * x_hat, sum g') of one batch, in differentiable operations; g' = g *
    act'(z) with a fused ``activation`` (name, param), else g."""
    x, weight, bias, shift, count, mask = saved
    view, dims = _view(x), _dims(x)
    x_hat, invstd = _differentiable_x_hat(x, shift, count, mask, eps)
    g = grad_output.to(invstd.dtype)
    if activation is not None:
        g = g * _slope(x_hat, weight, bias, *activation)
    sum_g, sum_g_x_hat = g.sum(dims), (g * x_hat).sum(dims)
    dx = None
    if need_dx:
        # dx = alpha * (g - mean(g) - x_hat * mean(g * x_hat)): the two subtracted terms
        # are the paths through the batch mean and the batch variance.
        alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
        k1, k0 = input_gradient_coefficients(alpha, sum_g, sum_g_x_hat, count)
        through_stats = torch.addcmul(k0.view(view), x_hat, k1.view(view))
        if mask is not None:  # the statistics do not depend on padding
            through_stats = torch.where(portable._valid(mask), through_stats, 0.0)
        dx = torch.addcmul(through_stats, g, alpha.view(view)).to(x.dtype)
    return dx, sum_g_x_hat, sum_g


def _differentiable_x_hat(
    x: Tensor, shift: Tensor, count: Tensor, mask: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(x_hat, invstd) with the batch statistics recomputed from x in differentiable
    operations (over the valid values with a mask), so that autograd and ``torch.func``
    see how they depend on x; ``shift`` is a constant of the data (the statistics do not
    depend on it)."""
    view, dims = _view(x), _dims(x)
    shifted = x - shift.view(view)  # (N, C, *) in the compute dtype
    if mask is None:
        shifted_mean, var = portable._two_pass_moments(shifted, dims, view, in_place=False)
    else:
        valid = portable._valid(mask)
        shifted_mean, var = portable._masked_moments(shifted, valid, count, dims, view)
    invstd = torch.rsqrt(var + eps)
    x_hat = torch.addcmul((-shifted_mean * invstd).view(view), shifted, invstd.view(view))
    return x_hat, invstd


def _differentiable_output(
    x: Tensor, stats: BatchStats, weight: Tensor | None, bias: Tensor | None, eps: float,
    mask: Tensor | None, activation: tuple[str, float | None] | None,
) -> Tensor:  # fmt: skip
    """Training normalization (and activation) in differentiable torch operations, for a
    ``torch.func`` transform that ``torch.compile`` traces: Dynamo traces no autograd
    Function with a forward-mode rule, and these operations have every rule torch has."""
    x_hat, _ = _differentiable_x_hat(x, stats.shift.detach(), stats.count, mask, eps)
    z = _scaled(x_hat, weight, bias)
    if activation is not None:
        z = act.activate(z, *activation)
    return _tangent_output(z, x)


def _traced_transform(group: Any, ghosts: int) -> bool:
    """Whether ``torch.compile`` traces a call inside a ``torch.func`` transform (or
    forward-mode AD) that :func:`_differentiable_output` computes: one process, one ghost
    batch at a time."""
    traced = torch.compiler.is_compiling() and portable.transformed()
    return traced and group is None and ghosts == 1


def _scaled(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """z = x_hat * weight + bias (either may be None), in differentiable operations."""
    view = _view(x_hat)
    z = x_hat if weight is None else x_hat * weight.to(x_hat.dtype).view(view)
    return z if bias is None else z + bias.to(x_hat.dtype).view(view)


def _slope(
    x_hat: Tensor, weight: Tensor | None, bias: Tensor | None, name: str, param: float | None
) -> Tensor:
    """act'(z) of z = x_hat * weight + bias, in differentiable operations."""
    z = _scaled(x_hat, weight, bias)
    form = act.activate(z, name, param) if act.saves_output(name) else z
    return act.slope(form, name, param)


def _tangent(
    x_hat: Tensor, x_t: Tensor | None, weight: Tensor | None, weight_t: Tensor | None,
    bias_t: Tensor | None, invstd: Tensor, count: Tensor, mask: Tensor | None,
) -> Tensor:  # fmt: skip
    """The tangent of z = weight * x_hat + bias with batch statistics::

        z_t = weight * invstd * (x_t - mean(x_t) - x_hat * mean(x_hat * x_t))
              + weight_t * x_hat + bias_t

    (the means over the valid values; the two subtracted terms are the tangents of the
    batch mean and variance, the transpose of the backward pass's two paths)."""
    view, dims = _view(x_hat), _dims(x_hat)
    z_t = torch.zeros_like(x_hat)
    if x_t is not None:
        t = x_t.to(x_hat.dtype)
        valid = t if mask is None else torch.where(portable._valid(mask), t, 0.0)
        mean_t = valid.sum(dims) / count
        mean_xt = (valid * x_hat).sum(dims) / count
        alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
        centred = t - mean_t.view(view) - x_hat * mean_xt.view(view)
        z_t = centred * alpha.view(view)
    if weight_t is not None:
        z_t = z_t + x_hat * weight_t.to(x_hat.dtype).view(view)
    if bias_t is not None:
        z_t = z_t + bias_t.to(x_hat.dtype).view(view)
    return z_t


def _tangent_output(z_t: Tensor, x: Tensor) -> Tensor:
    return z_t.to(x.dtype).contiguous(memory_format=portable._output_memory_format(x))


class _NormalizeTraceable(torch.autograd.Function):
    """Training normalization with batch statistics, the statistics treated as functions
    of x in every derivative. Forward: one affine pass; saves x and (C,) statistics, as
    torch's kernel does. Backward: one reduction pass and one input-gradient pass by the
    ``prims`` given; with a process ``group`` the reductions are summed over it.

    With a mask, the statistics are functions of the valid entries only: every output
    (padding included) goes through the same affine map, and the paths through the mean
    and variance reach the valid inputs only.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor,
        shifted_mean: Tensor, invstd: Tensor, count: Tensor, eps: float,
        mask: Tensor | None, group: Any, prims: Primitives, ghosts: int,
    ) -> Tensor:  # fmt: skip
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        return prims.affine(x, shift, alpha, beta, **_ghosts(ghosts))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        (x, weight, bias, shift, shifted_mean, invstd, count, eps, mask, group, prims,
         ghosts) = inputs  # fmt: skip
        ctx.save_for_backward(x, weight, shift, shifted_mean, invstd, count, mask)
        ctx.save_for_forward(x, weight, shift, shifted_mean, invstd, count, mask)
        ctx.eps, ctx.group, ctx.prims, ctx.ghosts = eps, group, prims, ghosts
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        none = (None,) * 9
        if torch.is_grad_enabled():
            x, weight, shift, _, _, count, mask = ctx.saved_tensors
            saved = _Recomputed(x, weight, None, shift, count, mask)
            return (*_differentiable_backward(ctx, grad_output, saved), *none)
        x, weight, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        ghosts = _ghosts(ctx.ghosts)
        sum_g, sum_gc = ctx.prims.backward_reduce(grad_output, x, shift, shifted_mean, **ghosts)
        sum_g_x_hat = sum_gc * invstd
        all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = alpha * (g - mean(g) - x_hat * mean(g * x_hat)), with
            # x_hat = ((x - shift) - shifted_mean) * invstd: g * alpha + (x - shift) * k1 + k0.
            alpha = invstd if weight is None else invstd * weight.to(invstd.dtype)
            k1, k0 = input_gradient_coefficients(
                alpha, all_g, all_g_x_hat, count, invstd, shifted_mean
            )
            dx = ctx.prims.backward_input(grad_output, x, shift, alpha, k1, k0, mask=mask, **ghosts)
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *none)


def _apply_positional(cls: Any, *args: Any) -> Any:
    """``Function.apply`` for a call that passes every argument positionally: outside
    ``torch.func`` transforms, without binding default arguments to the forward's
    signature, which ``Function.apply`` does with ``inspect`` on every call of a
    setup_context-style Function (measured: about a fifth of a small layer's call).
    Inside transforms, ``Function.apply`` itself."""
    if torch._C._are_functorch_transforms_active():
        return torch.autograd.Function.apply.__func__(cls, *args)  # type: ignore[attr-defined]
    args = torch._functorch.utils.unwrap_dead_wrappers(args)
    return super(torch.autograd.Function, cls).apply(*args)


class _Normalize(_NormalizeTraceable):
    """:class:`_NormalizeTraceable` with its forward-mode rule, for eager calls."""

    apply = classmethod(_apply_positional)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *stats_t: Any) -> Tensor:  # fmt: skip
        """Forward-mode derivative: the statistics are functions of x, as in the backward
        pass (see :func:`_tangent`)."""
        x, weight, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        _no_sync_derivative(ctx.group, "forward-mode derivatives")
        _no_ghost_derivative(ctx.ghosts)
        x_hat = _normalized(x, shift, shifted_mean, invstd)
        z_t = _tangent(x_hat, x_t, weight, weight_t, bias_t, invstd, count, mask)
        return _tangent_output(z_t, x)


class _NormalizeActivateTraceable(torch.autograd.Function):
    """y = act(z), z = (x - shift - shifted_mean) * invstd * weight + bias, in one node.

    ``save_input`` True (always for relu, and where
    :func:`bnkit.kernels.activation.invertible` says the output does not give x_hat back):
    saves x and recomputes z from it, bit for bit, for the slope. Otherwise (identity,
    leaky_relu, elu: the memory-efficient form) saves only y and O(C) values; the
    backward recovers z = act^-1(y) and act'(z) from y, and x_hat = (z - bias) / weight,
    the division folded into per-channel coefficients. Either way the gradient is exact;
    a double backward recomputes z from x, so it needs ``save_input``. With a process
    ``group``, as :class:`_Normalize`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor,
        shifted_mean: Tensor, invstd: Tensor, count: Tensor, eps: float,
        mask: Tensor | None, activation: str, param: float | None, save_input: bool,
        group: Any, prims: Primitives, ghosts: int,
    ) -> Tensor:  # fmt: skip
        alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
        return prims.affine(x, shift, alpha, beta, activation, param, **_ghosts(ghosts))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        (x, weight, bias, shift, shifted_mean, invstd, count, eps, mask, activation, param,
         save_input, group, prims, ghosts) = inputs  # fmt: skip
        if not save_input:
            # gamma = 0, |beta| >> |gamma| or a saturated elu output make
            # x_hat = (act^-1(y) - beta) / gamma inexact; this call then keeps its input.
            # One host synchronization.
            save_input = not act.invertible(output, weight, bias, activation, param)
        if save_input:
            ctx.save_for_backward(x, weight, bias, shift, shifted_mean, invstd, count, mask)
        else:
            ctx.save_for_backward(output, weight, bias, invstd, count, mask)
        ctx.save_for_forward(x, weight, bias, shift, shifted_mean, invstd, count, mask)
        ctx.save_input, ctx.group, ctx.prims, ctx.ghosts = save_input, group, prims, ghosts
        ctx.activation, ctx.param, ctx.eps = activation, param, eps
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        none = (None,) * 12
        if torch.is_grad_enabled():
            if not ctx.save_input:  # x is not there to differentiate the forward from
                act.refuse_double_backward()
            x, weight, bias, shift, _, _, count, mask = ctx.saved_tensors
            saved = _Recomputed(x, weight, bias, shift, count, mask)
            return (*_differentiable_backward(ctx, grad_output, saved), *none)
        if ctx.save_input:
            dx, sum_g, sum_g_x_hat, weight = _from_input(ctx, grad_output)
        else:
            dx, sum_g, sum_g_x_hat, weight = _from_output(ctx, grad_output)
        return (dx, *_parameter_gradients(ctx, weight, sum_g_x_hat, sum_g), *none)


def _from_input(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Any]:
    """(dx, sum g', sum g' * x_hat, weight) of :class:`_NormalizeActivate` from the saved x."""
    x, weight, bias, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
    name, param = ctx.activation, ctx.param
    alpha, beta = portable._affine_terms(shifted_mean, invstd, weight, bias)
    ghosts = _ghosts(ctx.ghosts)
    sum_g, sum_gc = ctx.prims.backward_reduce(
        grad_output, x, shift, shifted_mean, name, param, False, alpha, beta, **ghosts
    )
    sum_g_x_hat = sum_gc * invstd
    all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
    dx = None
    if ctx.needs_input_grad[0]:
        k1, k0 = input_gradient_coefficients(alpha, all_g, all_g_x_hat, count, invstd, shifted_mean)
        dx = ctx.prims.backward_input(
            grad_output, x, shift, alpha, k1, k0, name, param, False, mask, alpha, beta, **ghosts
        )
    return dx, sum_g, sum_g_x_hat, weight


def _from_output(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Any]:
    """(dx, sum g', sum g' * x_hat, weight) of :class:`_NormalizeActivate` from the saved
    output y: z = act^-1(y), x_hat = (z - bias) / weight."""
    y, weight, bias, invstd, count, mask = ctx.saved_tensors
    name, param = ctx.activation, ctx.param
    dtype = invstd.dtype
    scale = None if weight is None else weight.to(dtype)
    centre = torch.zeros_like(invstd) if bias is None else bias.to(dtype)
    # sum_gc = sum(g' * (z - bias)) = weight * sum(g' * x_hat)
    ghosts = _ghosts(ctx.ghosts)
    sum_g, sum_gc = ctx.prims.backward_reduce(
        grad_output, y, centre, torch.zeros_like(invstd), name, param, True, **ghosts
    )
    sum_g_x_hat = sum_gc if scale is None else sum_gc / scale
    all_g, all_g_x_hat = _global(ctx, sum_g, sum_g_x_hat)
    dx = None
    if ctx.needs_input_grad[0]:
        # dx = alpha * g' + x_hat * k1 + k0, x_hat * k1 = (z - bias) * (k1 / weight)
        alpha = invstd if scale is None else invstd * scale
        per_unit = None if scale is None else 1.0 / scale
        k1, k0 = input_gradient_coefficients(alpha, all_g, all_g_x_hat, count, per_unit)
        dx = ctx.prims.backward_input(grad_output, y, centre, alpha, k1, k0, name, param,
                                      True, mask, **ghosts)  # fmt: skip
    return dx, sum_g, sum_g_x_hat, weight


class _NormalizeActivate(_NormalizeActivateTraceable):
    """:class:`_NormalizeActivateTraceable` with its forward-mode rule, for eager calls."""

    apply = classmethod(_apply_positional)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
            *stats_t: Any) -> Tensor:  # fmt: skip
        """Forward-mode derivative: act'(z) times the tangent of z (see :func:`_tangent`)."""
        x, weight, bias, shift, shifted_mean, invstd, count, mask = ctx.saved_tensors
        _no_sync_derivative(ctx.group, "forward-mode derivatives")
        _no_ghost_derivative(ctx.ghosts)
        x_hat = _normalized(x, shift, shifted_mean, invstd)
        slope = _slope(x_hat, weight, bias, ctx.activation, ctx.param)
        z_t = _tangent(x_hat, x_t, weight, weight_t, bias_t, invstd, count, mask)
        return _tangent_output(z_t * slope, x)


def _function(compiled: Any, eager: Any) -> Any:
    """The autograd Function to apply: with the forward-mode rule unless compiling."""
    return compiled if torch.compiler.is_compiling() else eager


class PrimitiveKernel:
    """:class:`bnkit.kernels.pipeline.Kernel` on a set of :class:`Primitives`; what they
    do not take (see ``Primitives.supports``) runs on the passes in torch operations
    (:data:`bnkit.kernels.portable.PRIMITIVES`), through the same autograd functions, as
    does the update of the running statistics (torch operations on (C,) vectors, no host
    synchronization)."""

    def __init__(self, prims: Primitives) -> None:
        self.prims = prims

    def _passes(self, x: Tensor, mask: Tensor | None, ghosts: int = 1) -> Primitives:
        if ghosts > 1:
            prims = self.ghost_passes(x, mask)
            if prims is None:
                raise ValueError(f"{self.prims.name}: no passes take ghost batches here")
            return prims
        return self.prims if self.prims.supports(x, mask) else portable.PRIMITIVES

    def ghost_passes(self, x: Tensor, mask: Tensor | None) -> Primitives | None:
        """The passes that normalize ghost batches of (x, mask) in one launch
        (``ghosts=k`` to the methods below), or None: the pipeline then runs one ghost
        batch at a time."""
        prims = self._passes(x, mask)
        return prims if prims.ghost_batches else None

    def batch_stats(self, x: Tensor, mask: Tensor | None = None, *, ghosts: int = 1) -> BatchStats:
        return self._passes(x, mask, ghosts).batch_stats(x, mask, **_ghosts(ghosts))

    def normalize_batch(
        self, x: Tensor, stats: BatchStats, weight: Tensor | None, bias: Tensor | None,
        eps: float, mask: Tensor | None = None, group: Any = None, *, ghosts: int = 1,
    ) -> Tensor:  # fmt: skip
        if _traced_transform(group, ghosts):
            return _differentiable_output(x, stats, weight, bias, eps, mask, None)
        invstd = torch.rsqrt(stats.var + eps)
        function = _function(_NormalizeTraceable, _Normalize)
        output: Tensor = function.apply(
            x, weight, bias, stats.shift, stats.shifted_mean, invstd, stats.count, eps, mask,
            group, self._passes(x, mask, ghosts), ghosts,
        )  # fmt: skip
        return output

    def normalize_batch_activation(
        self, x: Tensor, stats: BatchStats, weight: Tensor | None, bias: Tensor | None,
        eps: float, mask: Tensor | None, group: Any, activation: str, param: float | None,
        memory_efficient: bool, *, ghosts: int = 1,
    ) -> Tensor:  # fmt: skip
        if _traced_transform(group, ghosts):
            return _differentiable_output(x, stats, weight, bias, eps, mask, (activation, param))
        prims = self._passes(x, mask, ghosts)
        if mask is not None and not prims.masked_activation and ghosts == 1:
            prims = portable.PRIMITIVES
        invstd = torch.rsqrt(stats.var + eps)
        # or, decided from the output: not invertible (see its setup_context)
        save_input = activation == "relu" or not memory_efficient
        function = _function(_NormalizeActivateTraceable, _NormalizeActivate)
        output: Tensor = function.apply(
            x, weight, bias, stats.shift, stats.shifted_mean, invstd, stats.count, eps, mask,
            activation, param, save_input, group, prims, ghosts,
        )  # fmt: skip
        return output

    def normalize_population(
        self, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
        bias: Tensor | None, eps: float,
    ) -> Tensor:  # fmt: skip
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, mean, var, weight, bias)
        )
        prims = portable.PRIMITIVES if differentiable else self._passes(x, None)
        return portable.normalize_population(x, mean, var, weight, bias, eps, prims.affine)

    def update_running_stats(self, update: Update) -> Tensor | None:
        return portable.update_running_stats(update)


class PortableKernel(PrimitiveKernel):
    """The kernel on the passes in torch operations: any device, dtype and layout, every
    option, ``torch.func`` transforms (their vmap rule) and ``torch.compile``."""

    def __init__(self) -> None:
        super().__init__(portable.PRIMITIVES)


#: The portable kernel (:func:`bnkit.kernels.pipeline.select_kernel`'s other choice).
PORTABLE = PortableKernel()
