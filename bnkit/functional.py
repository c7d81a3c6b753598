"""Functional batch normalization: a drop-in for ``torch.nn.functional.batch_norm``.

:func:`batch_norm` takes the same positional arguments as
``torch.nn.functional.batch_norm`` and gives the same results (to rounding, and more
accurately for data far from zero), plus keyword-only options for batch norm's known
pain points. It checks its inputs, decides what the batch means (normal, empty, a single
value per channel) and hands the arithmetic to :mod:`bnkit.kernels`.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnkit import distributed
from bnkit.errors import (
    ConfigError,
    ConfigWarning,
    DeviceMismatchError,
    DTypeError,
    MissingStatsError,
    NonFiniteStatsWarning,
    ShapeError,
    SingleValueError,
    SizeMismatchError,
    format_choices,
    format_shape,
)
from bnkit.kernels import express, gpu, pipeline
from bnkit.kernels.activation import check_activation
from bnkit.kernels.pipeline import Call
from bnkit.kernels.stats import BatchStats

__all__ = ["RUNNING_VAR_ESTIMATORS", "SINGLE_SAMPLE_MODES", "Renorm", "batch_norm"]

#: Values of ``running_var_estimator``: which batch variance ``running_var`` averages.
RUNNING_VAR_ESTIMATORS = ("unbiased", "biased")
#: Values of ``single_sample``: what a training batch with one value per channel does.
SINGLE_SAMPLE_MODES = ("raise", "running", "identity")


@dataclass(frozen=True)
class Renorm:
    """Batch renormalization (Ioffe, 2017) and its schedule.

    In training, with the batch's sigma_B = sqrt(var_B + eps) and the population's
    sigma = sqrt(running_var + eps)::

        r     = clip(sigma_B / sigma, 1 / r_max, r_max)
        d     = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        x_hat = (x - mu_B) / sigma_B * r + d

    with r and d constants in the backward pass (the gradient still flows through mu_B
    and sigma_B). Within the limits, training normalizes with the population statistics,
    as inference will, so small or non-i.i.d. batches stop skewing the model; the limits
    keep the first steps, when the population statistics are still poor, close to batch
    norm. Evaluation is unchanged.

    The limits follow the paper's schedule, counted in ``num_batches_tracked`` (training
    batches before this one): plain batch norm (r_max = 1, d_max = 0) for ``warmup_steps``,
    then r_max grows linearly to its final value at step ``r_max_steps`` and d_max at step
    ``d_max_steps``. ``Renorm(warmup_steps=0, r_max_steps=0, d_max_steps=0)`` applies the
    final limits from the first step.

    Args:
        r_max: the final limit of r, >= 1. d_max: the final limit of d, >= 0.
        warmup_steps, r_max_steps, d_max_steps: the schedule, integers >= 0.

    Raises:
        ConfigError: a value out of range.

    Example:
        >>> renorm = Renorm(r_max=3.0, d_max=5.0)
        >>> [round(float(v), 3) for v in renorm.limits(22500)]
        [2.0, 4.375]
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5000
    r_max_steps: int = 40000
    d_max_steps: int = 25000

    def __post_init__(self) -> None:
        for name in ("r_max", "d_max"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ConfigError(f"Renorm: expected {name} to be a finite number, got {value!r}")
        if not self.r_max >= 1.0:
            raise ConfigError(
                f"Renorm: expected r_max >= 1 (r is clipped to [1/r_max, r_max]), got {self.r_max}"
            )
        if not self.d_max >= 0.0:
            raise ConfigError(
                f"Renorm: expected d_max >= 0 (d is clipped to [-d_max, d_max]), got {self.d_max}"
            )
        for name in ("warmup_steps", "r_max_steps", "d_max_steps"):
            value = getattr(self, name)
            count = _integer(value)
            if count is None or count < 0:
                raise ConfigError(f"Renorm: expected {name} to be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, count)

    @property
    def scheduled(self) -> bool:
        """Whether the limits depend on the step (else they are final from the start)."""
        return max(self.warmup_steps, self.r_max_steps, self.d_max_steps) > 0

    def limits(self, step: Tensor | int) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) at ``step`` (batches already trained on), as float64 0-d tensors.

        Computed with tensor operations, so a step held in a device buffer needs no host
        synchronization and no graph break under ``torch.compile``.
        """
        t = torch.as_tensor(step, dtype=torch.float64)

        def progress(final_step: int) -> Tensor:
            if final_step <= self.warmup_steps:  # final as soon as the warm-up ends
                return (t >= self.warmup_steps).to(torch.float64)
            span = final_step - self.warmup_steps
            return torch.clamp((t - self.warmup_steps) / span, 0.0, 1.0)

        r_max = 1.0 + (self.r_max - 1.0) * progress(self.r_max_steps)
        return r_max, self.d_max * progress(self.d_max_steps)


@dataclass(frozen=True)
class Options:
    """The extras of a batch-norm call, validated once when made: a layer keeps one and
    makes a new one when a setting changes; :func:`batch_norm` makes one per call.

    The fields are :func:`batch_norm`'s keyword arguments of the same names (see there);
    ``where`` names the caller in error messages (``"batch_norm"``, ``"BatchNorm2d(64)"``).
    ``ghost_batch_size`` is stored as an int and ``activation_param`` with its default
    filled in.

    Raises:
        ConfigError: an option outside its allowed values.
    """

    where: str = "batch_norm"
    running_var_estimator: str = "unbiased"
    single_sample: str = "raise"
    skip_nonfinite: bool = True
    ghost_batch_size: int | None = None
    renorm: Renorm | None = None
    sync: bool = False
    process_group: Any = None
    activation: str | None = None
    activation_param: float | None = None
    memory_efficient: bool = True

    def __post_init__(self) -> None:
        where = self.where
        _check_choice(where, "running_var_estimator", self.running_var_estimator,
                      RUNNING_VAR_ESTIMATORS)  # fmt: skip
        _check_choice(where, "single_sample", self.single_sample, SINGLE_SAMPLE_MODES)
        for name in ("skip_nonfinite", "sync", "memory_efficient"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{where}: expected {name} to be True or False, got {getattr(self, name)!r}"
                )
        size = check_ghost_batch_size(where, self.ghost_batch_size)
        object.__setattr__(self, "ghost_batch_size", size)
        if self.renorm is not None and not isinstance(self.renorm, Renorm):
            raise ConfigError(
                f"{where}: expected renorm=bnkit.Renorm(...) or None, got {self.renorm!r}"
            )
        param = check_activation(where, self.activation, self.activation_param)
        object.__setattr__(self, "activation_param", param)
        plain = self.ghost_batch_size is None and self.renorm is None and not self.sync
        flags = express.flags(self.running_var_estimator, self.skip_nonfinite,
                              self.activation, param, self.memory_efficient, plain)  # fmt: skip
        object.__setattr__(self, "_express", flags)  # computed once: read on every call

    @property
    def fused(self) -> pipeline.Activation | None:
        """The activation fused with the normalization, or None."""
        if self.activation is None:
            return None
        return pipeline.Activation(self.activation, self.activation_param, self.memory_efficient)

    @property
    def express(self) -> express.Flags:
        """The options as the express path reads them. With ghost batches, renorm or sync
        it takes eval calls only (they change nothing there); a mask, per call, is decided
        there too."""
        flags: express.Flags = self.__dict__["_express"]
        return flags


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    running_var_estimator: str = "unbiased",
    single_sample: str = "raise",
    skip_nonfinite: bool = True,
    mask: Tensor | None = None,
    ghost_batch_size: int | None = None,
    renorm: Renorm | None = None,
    sync: bool = False,
    process_group: Any = None,
    activation: str | None = None,
    activation_param: float | None = None,
    memory_efficient: bool = True,
) -> Tensor:
    r"""Normalize each channel of a batch: ``torch.nn.functional.batch_norm`` plus options.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    per channel, over the batch and all spatial dimensions. With ``training=True`` E[x] and
    the *biased* Var[x] are the batch's and, if ``running_mean``/``running_var`` are given,
    those are updated in place::

        running_mean = (1 - momentum) * running_mean + momentum * batch_mean
        running_var  = (1 - momentum) * running_var  + momentum * batch_var_unbiased

    With ``training=False`` the running statistics are used and nothing is updated.

    Args:
        input: (N, C) or (N, C, *spatial), floating point. float16/bfloat16 are
            normalized with float32 statistics and returned in their own dtype.
        running_mean, running_var: (C,) population statistics, both or neither (they
            are required when ``training=False``).
        weight, bias: (C,) gamma and beta, or None for 1 and 0.
        training: normalize with the batch's statistics (and update the running ones).
        momentum: weight of the new batch in the running statistics, in [0, 1]; or None
            for the cumulative average (mean of all batch means and variances so far),
            which needs ``num_batches_tracked``.
        eps: added to the variance; > 0 when training, >= 0 otherwise.
        num_batches_tracked: optional 0-d integer tensor counting the batches folded into
            the running statistics; incremented in place on each update. With
            ``momentum=None`` the k-th batch gets weight 1/k, as ``torch.nn.BatchNorm*d``
            does.
        running_var_estimator: ``"unbiased"`` (torch, default) stores n/(n-1) * var_B,
            ``"biased"`` stores var_B (Keras, flax).
        single_sample: what a training batch with one value per channel does (its
            variance is undefined): ``"raise"`` (default) raises
            :class:`~bnkit.errors.SingleValueError`; ``"running"`` normalizes it with the
            running statistics and leaves them unchanged; ``"identity"`` returns (a copy
            of) the input unchanged, running statistics untouched, gradient passed
            straight through, no gradient for weight and bias.
        skip_nonfinite: when a training batch's statistics hold NaN or Inf, leave the
            running statistics and ``num_batches_tracked`` untouched (the output is
            still computed from the batch) and warn with
            :class:`~bnkit.errors.NonFiniteStatsWarning`. Default True.
        mask: bool tensor of shape (N, *spatial) (for (N, C, L): (N, L)), True at valid
            positions (padded sequences). The statistics, their gradients and the running
            statistics come from the valid positions only (the unbiased correction uses
            the valid count); every position, padding included, goes through the same
            per-channel affine map, so padding should hold finite values. An all-True
            mask is no mask. Fewer than two valid values per channel in training follow
            ``single_sample``. Ignored (but checked) when normalizing with population
            statistics.
        ghost_batch_size: normalize each consecutive chunk of this many samples with its
            own statistics (ghost batch norm, Hoffer et al. 2017); the last chunk may be
            smaller (a chunk with one value per channel follows ``single_sample``). The
            running statistics are updated once, from all chunks merged (which equals
            the whole batch's statistics). None, or >= N, is plain batch norm.
        renorm: a :class:`Renorm` to apply batch renormalization in training; needs the
            running statistics, and ``num_batches_tracked`` for a scheduled one.
        sync: in training, compute the statistics over every process of ``process_group``
            (synchronized batch norm, any torch.distributed backend): per-channel (count,
            mean, M2) are exchanged and merged exactly in float64 (one collective in the
            forward pass, one in the backward pass), so uneven and empty local batches are
            exact. Every process must call it the same number of times and back-propagate
            through every call. Without an initialized process group, or with a group of
            one, the statistics are the local ones. With ghost batches, each is normalized
            with its local statistics and only the running statistics are global.
        process_group: the group to synchronize over; the world by default.
        activation: None, or an activation applied to the output, fused with the
            normalization: ``"relu"``, ``"leaky_relu"``, ``"elu"`` or ``"identity"``.
        activation_param: leaky_relu's negative slope (default 0.01) or elu's alpha
            (default 1.0); > 0.
        memory_efficient: with an activation, save the output for the backward pass
            instead of the input (In-Place ABN): x_hat is recovered from y by inverting
            the activation, so a conv-BN-activation stack keeps one tensor per block
            instead of two. relu is not invertible: its fused form saves the
            pre-activation (half of torch's BatchNorm + ReLU pair for one layer, but no
            saving in a stack, whose next layer keeps the output; use leaky_relu). A
            channel with gamma = 0, or |beta| >= 1000 |gamma|, makes the inversion
            inexact: the call then keeps its input instead (exact, no saving).
            ``False`` always keeps the input. Double backward is not supported with an
            activation.

    Shape:
        - input: (N, C) or (N, C, *spatial)
        - output: same shape and dtype as input (channels-last stays channels-last)

    Returns:
        The normalized tensor.

    Raises:
        ShapeError: input with fewer than 2 dimensions, or a per-channel tensor whose
            shape is not (C,).
        DTypeError: input not floating point.
        ConfigError: eps <= 0 when training (< 0 otherwise), momentum outside [0, 1],
            an unknown option value, running statistics missing when they are needed or
            only one of them given.
        SingleValueError: one value per channel in training with ``single_sample="raise"``.

    Example:
        >>> x = torch.randn(8, 3)
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, mean, var, training=True)
        >>> bool(y.mean(0).abs().max() < 1e-5) and bool(mean.abs().sum() > 0)
        True

    Note:
        The momentum convention is PyTorch's: the weight of the *new* batch. Keras' and
        flax's momentum is the weight of the *old* value (their 0.99 is torch's 0.01).
        Training normalizes with the biased batch variance, while ``running_var`` stores
        the unbiased one by default, so eval-mode outputs on the training batch differ
        slightly from training-mode outputs.
    """
    options = _options(
        "batch_norm",
        running_var_estimator,
        single_sample,
        skip_nonfinite,
        ghost_batch_size,
        renorm,
        sync,
        process_group,
        activation,
        activation_param,
        memory_efficient,
    )
    call = Call(input, running_mean, running_var, weight, bias, num_batches_tracked, mask)
    express_output = try_express(call, training, momentum, eps, options, _FUNCTIONAL_MONITOR)
    if express_output is not None:
        return express_output
    output, recorded = _batch_norm(call, training, momentum, eps, options)
    if recorded is not None and not torch.compiler.is_compiling():
        _FUNCTIONAL_MONITOR.observe(recorded, tuple(input.shape))
    return output


@functools.lru_cache(maxsize=64, typed=True)
def _cached_options(*fields: Any) -> Options:
    return Options(*fields)


def _options(*fields: Any) -> Options:
    """``Options(*fields)``, made once per distinct set of values (validating takes a
    quarter of a small call's time); ``typed``, so that 1 is not taken for True."""
    # the defaults, the common case, without a lookup (True == 1: the flags' types too)
    if fields == _DEFAULT_FIELDS and type(fields[3]) is type(fields[6]) is type(fields[10]) is bool:
        return _DEFAULT_OPTIONS
    try:
        return _cached_options(*fields)
    except TypeError:  # an unhashable value: Options says what is wrong with it
        return Options(*fields)


def try_express(
    call: Call,
    training: bool,
    momentum: float | None,
    eps: float,
    options: Options,
    monitor: NonFiniteMonitor,
) -> Tensor | None:
    """The output of a call on a CPU tensor by :mod:`bnkit.kernels.express` (one C call
    each way; a batch the running statistics skipped is reported to ``monitor``), or
    None: then :func:`_batch_norm` runs the general pipeline, which also reports invalid
    arguments. The express path takes ghost batches, renorm and sync in eval only
    (:attr:`Options.express`), a mask only in training without an activation, and not the
    calls where the Triton kernels are asked for."""
    if gpu.forced():
        return None
    result = express.batch_norm(
        call.input,
        call.running_mean,
        call.running_var,
        call.weight,
        call.bias,
        training,
        momentum,
        eps,
        call.num_batches_tracked,
        options.express,
        call.mask,
    )
    if result is None:
        return None
    output, recorded = result
    if recorded is False:
        monitor.observe(False, tuple(call.input.shape))
    return output


def check_momentum(where: str, momentum: float | None) -> None:
    """Raise :class:`ConfigError` unless momentum is None or a finite number (torch takes
    any; :func:`warn_unusual_momentum` says when one outside [0, 1] is used)."""
    if momentum is not None and (not _is_real(momentum) or not math.isfinite(momentum)):
        raise ConfigError(
            f"{where}: expected momentum to be a number in [0, 1] (the weight of each new "
            f"batch in the running statistics) or None (cumulative average), got {momentum!r}"
        )


def _is_real(value: object) -> bool:
    """A real number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (Python's or NumPy's), not a bool; else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


def warn_unusual_momentum(where: str, momentum: float | None) -> None:
    """torch accepts any momentum; one outside [0, 1] extrapolates the running statistics
    past the batch's, which is almost certainly not meant: say so (each time it is used)."""
    if momentum is not None and not 0 <= momentum <= 1:
        warnings.warn(
            f"{where}: momentum={momentum!r} is outside [0, 1]; the running statistics "
            f"become (1 - momentum) * running + momentum * batch, which extrapolates past "
            f"the batch's statistics",
            ConfigWarning,
            stacklevel=4,
        )


def check_eps(where: str, eps: float, *, use_batch_stats: bool) -> None:
    """Reject eps where torch does: <= 0 with batch statistics, < 0 otherwise (NaN always)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError(f"{where}: expected eps to be a number, got {eps!r}")
    if use_batch_stats and not eps > 0:
        raise ConfigError(
            f"{where}: expected eps > 0 when normalizing with batch statistics (it keeps "
            f"1/sqrt(var + eps) finite for a constant channel), got eps={eps}"
        )
    if not eps >= 0:
        raise ConfigError(f"{where}: expected eps >= 0, got eps={eps}")


def _check_choice(where: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"{where}: unknown {name}={value!r}; expected one of {format_choices(choices)}"
        )


def _check_input(where: str, input: Tensor, per_channel: dict[str, Tensor | None]) -> None:
    if not isinstance(input, Tensor):
        raise DTypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.dim() < 2 and not (input.dim() == 1 and input.numel() == 0):
        # (torch accepts an empty 1D input with empty per-channel tensors: no channels)
        raise ShapeError(
            f"{where}: expected input of shape (N, C) or (N, C, *spatial), "
            f"got {input.dim()}D input of shape {format_shape(input.shape)}"
        )
    if not input.is_floating_point():
        raise DTypeError(
            f"{where}: expected a floating-point input (float16, bfloat16, float32, float64), "
            f"got dtype {input.dtype}"
        )
    channels = input.shape[1] if input.dim() > 1 else 0
    for name, tensor in per_channel.items():
        if tensor is not None and not isinstance(tensor, Tensor):
            raise DTypeError(
                f"{where}: expected {name} to be a torch.Tensor of shape ({channels},) or None, "
                f"got {type(tensor).__name__}"
            )
        if tensor is not None and not tensor.is_floating_point():
            raise DTypeError(
                f"{where}: expected a floating-point {name} (float16, bfloat16, float32, "
                f"float64), got dtype {tensor.dtype}"
            )
        if tensor is not None and tensor.device != input.device:
            raise DeviceMismatchError(
                f"{where}: expected {name} on the input's device {input.device}, "
                f"got {tensor.device}"
            )
        if tensor is not None and tuple(tensor.shape) != (channels,):
            raise SizeMismatchError(
                f"{where}: expected {name} of shape ({channels},) to match the {channels} "
                f"channels of the input of shape {format_shape(input.shape)}, "
                f"got shape {format_shape(tensor.shape)}"
            )


def _check_counter(where: str, input: Tensor, num_batches_tracked: object) -> None:
    """num_batches_tracked: None, or a one-element integer tensor on the input's device."""
    if num_batches_tracked is None:
        return
    if not isinstance(num_batches_tracked, Tensor):
        raise DTypeError(
            f"{where}: expected num_batches_tracked to be a 0-d integer tensor or None, "
            f"got {type(num_batches_tracked).__name__}"
        )
    if num_batches_tracked.is_floating_point() or num_batches_tracked.is_complex():
        raise DTypeError(
            f"{where}: expected an integer num_batches_tracked, got dtype "
            f"{num_batches_tracked.dtype}"
        )
    if num_batches_tracked.numel() != 1:
        raise ShapeError(
            f"{where}: expected num_batches_tracked to hold one count (shape ()), got shape "
            f"{format_shape(num_batches_tracked.shape)}"
        )
    if num_batches_tracked.device != input.device:
        raise DeviceMismatchError(
            f"{where}: expected num_batches_tracked on the input's device {input.device}, "
            f"got {num_batches_tracked.device}"
        )


def _given(tensor: Tensor | None) -> str:
    return "None" if tensor is None else f"a tensor of shape {format_shape(tensor.shape)}"


def _single_value_message(where: str, shape: tuple[int, ...]) -> str:
    return (
        f"{where}: expected more than 1 value per channel when training, got input of shape "
        f"{format_shape(shape)} (1 value per channel), whose batch variance is undefined. "
        f"Use a larger batch, call .eval(), or pick single_sample= from "
        f"{format_choices(SINGLE_SAMPLE_MODES)}: 'running' normalizes with the running "
        f"statistics, 'identity' returns the input unchanged"
    )


def _batch_norm(
    call: Call,
    training: bool,
    momentum: float | None,
    eps: float,
    options: Options,
    deferred: list[BatchStats] | None = None,
) -> pipeline.BatchNormResult:
    """:func:`batch_norm` with validated ``options``, returning whether the running
    statistics recorded the batch instead of warning about it, and appending the batch's
    statistics to ``deferred`` instead of updating, when given."""
    input, running_mean, running_var, weight, bias, num_batches_tracked, mask = call
    where = options.where
    _check_input(
        where,
        input,
        {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias},
    )
    _check_counter(where, input, num_batches_tracked)
    check_momentum(where, momentum)
    if (running_mean is None) != (running_var is None):
        raise ConfigError(
            f"{where}: expected running_mean and running_var both given or both None, got "
            f"running_mean={_given(running_mean)}, running_var={_given(running_var)}"
        )
    if mask is not None:
        _check_mask(where, input, mask)
    fused = options.fused
    single_sample, ghost_batch_size = options.single_sample, options.ghost_batch_size
    renorm = options.renorm
    shape = tuple(input.shape)
    use_batch_stats = bool(training)
    update = use_batch_stats and (running_mean is not None or running_var is not None)
    # Synchronized statistics: only in training, only with someone to talk to.
    group = (
        distributed.active_group(options.process_group)
        if options.sync and use_batch_stats
        else None
    )

    values_per_channel = math.prod((shape[0], *shape[2:]))
    if use_batch_stats and values_per_channel == 1 and group is None:
        if single_sample == "raise":
            raise SingleValueError(_single_value_message(where, shape))
        if single_sample == "identity":
            # A copy, not the input itself: an in-place op after this layer (ReLU(inplace))
            # must not overwrite a tensor the previous layer may have saved for backward.
            return pipeline.BatchNormResult(pipeline._activate(input.clone(), fused), None)
        if running_mean is None or running_var is None:
            raise SingleValueError(
                f"{where}: single_sample='running' normalizes a one-value-per-channel batch "
                f"(input of shape {format_shape(shape)}) with the running statistics, but "
                f"there are none (track_running_stats=False or running_mean=None)"
            )
        use_batch_stats = update = False

    check_eps(where, eps, use_batch_stats=use_batch_stats)
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise MissingStatsError(
            f"{where}: expected running_mean and running_var when normalizing with population "
            f"statistics (training=False), got None"
        )
    if update and deferred is None:
        warn_unusual_momentum(where, momentum)
    if update and momentum is None and num_batches_tracked is None:
        raise ConfigError(
            f"{where}: momentum=None (cumulative average) needs num_batches_tracked to know "
            f"how many batches the running statistics already hold"
        )

    if input.numel() == 0 and group is None:
        # As torch: an empty batch gives an empty output (connected to weight and bias, so
        # they get zero gradients), leaves the running statistics alone and is still
        # counted in num_batches_tracked.
        if update and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
        output = input.clone()
        if input.dim() < 2:  # no channels: nothing to scale
            return pipeline.BatchNormResult(output, None)
        view = [1, shape[1]] + [1] * (input.dim() - 2)
        if weight is not None:
            output = output * weight.to(input.dtype).view(view)
        if bias is not None:
            output = output + bias.to(input.dtype).view(view)
        return pipeline.BatchNormResult(pipeline._activate(output, fused), None)

    chunks = None
    few_values = None
    if group is not None and ghost_batch_size is None:
        # The number of values per channel is only known once every process has reported.
        few_values = functools.partial(
            _global_mode, where, shape, single_sample, running_mean is not None
        )
    elif use_batch_stats:
        chunks = (
            _plan_chunks(where, input, mask, ghost_batch_size, single_sample)
            if input.numel() > 0
            else []  # an empty batch of a synchronized layer: no ghost batch of its own
        )
        if any(chunk.mode == "running" for chunk in chunks) and running_mean is None:
            raise SingleValueError(
                f"{where}: single_sample='running' normalizes a ghost batch with fewer than "
                f"two values per channel with the running statistics, but there are none"
            )
    renorm_limits = None
    if renorm is not None and use_batch_stats:
        renorm_limits = _renorm_limits(where, renorm, running_mean, num_batches_tracked)

    # The population statistics the call reads (eval) or updates, and their counter.
    population = update or not use_batch_stats
    running_mean, running_var = (running_mean, running_var) if population else (None, None)
    tensors = call._replace(
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=num_batches_tracked if update else None,
    )
    plan = pipeline.Plan(
        training=use_batch_stats,
        momentum=momentum,
        eps=float(eps),
        unbiased=options.running_var_estimator == "unbiased",
        skip_nonfinite=options.skip_nonfinite,
        activation=fused,
        chunks=chunks,
        renorm_limits=renorm_limits,
        deferred=deferred if update else None,
        group=group,
        few_values=few_values,
    )
    # Under torch.compile a call the express path would take is one operator in the graph.
    compiled = express.compiled_batch_norm(tensors, plan)
    if compiled is not None:
        return pipeline.BatchNormResult(*compiled)
    return pipeline.batch_norm(tensors, plan)


def _global_mode(
    where: str, shape: tuple[int, ...], single_sample: str, has_running: bool, count: int
) -> str:
    """What a synchronized batch with ``count`` values per channel over all processes does."""
    if count >= 2:
        return "batch"
    if single_sample == "raise" or (single_sample == "running" and not has_running):
        raise SingleValueError(
            f"{where}: expected at least two values per channel over all processes when "
            f"training, got {count} (this process's input has shape {format_shape(shape)}), "
            f"whose batch variance is undefined. Use larger batches, call .eval(), or pick "
            f"single_sample= from {format_choices(SINGLE_SAMPLE_MODES)}"
        )
    return single_sample


def check_ghost_batch_size(where: str, ghost_batch_size: int | None) -> int | None:
    """ghost_batch_size as an int (NumPy integers accepted) or None; :class:`ConfigError`
    unless it is None or an integer >= 1."""
    if ghost_batch_size is None:
        return None
    size = _integer(ghost_batch_size)
    if size is None:
        raise ConfigError(
            f"{where}: expected ghost_batch_size to be an integer >= 1 or None, "
            f"got {ghost_batch_size!r}"
        )
    if size < 1:
        raise ConfigError(f"{where}: expected ghost_batch_size >= 1, got {size}")
    return size


def _check_mask(where: str, input: Tensor, mask: Tensor) -> None:
    expected = (input.shape[0], *input.shape[2:])
    if not isinstance(mask, Tensor):
        raise ShapeError(
            f"{where}: expected mask to be a bool tensor of shape (N, *spatial) = "
            f"{format_shape(expected)}, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise DTypeError(
            f"{where}: expected a bool mask (True = valid position), got dtype {mask.dtype}"
        )
    if tuple(mask.shape) != expected:
        raise ShapeError(
            f"{where}: expected a mask of shape (N, *spatial) = {format_shape(expected)} for "
            f"input of shape {format_shape(input.shape)}, got {format_shape(mask.shape)}"
        )
    if mask.device != input.device:
        raise ShapeError(
            f"{where}: expected the mask on the input's device {input.device}, got {mask.device}"
        )


def _plan_chunks(
    where: str,
    input: Tensor,
    mask: Tensor | None,
    ghost_batch_size: int | None,
    single_sample: str,
) -> list[pipeline.Chunk]:
    """The ghost batches and, for each, whether it has the two values per channel that a
    variance needs; those that do not follow ``single_sample``.

    With a mask the valid counts are data: reading them costs one host synchronization
    (none under ``torch.compile``, where the check is skipped: a chunk without two valid
    values then gives NaN statistics, which ``skip_nonfinite`` keeps out of the running
    statistics).
    """
    ranges = pipeline.ghost_chunks(input.shape[0], ghost_batch_size)
    per_sample = math.prod(input.shape[2:])
    if mask is None:
        counts: list[int] | None = [(stop - start) * per_sample for start, stop in ranges]
    elif torch.compiler.is_compiling():
        counts = None
    else:
        per_sample_valid = mask.reshape(input.shape[0], -1).sum(1)  # (N,)
        totals = torch.stack([per_sample_valid[a:b].sum() for a, b in ranges])
        counts = [int(c) for c in totals.tolist()]
    chunks = []
    for number, (start, stop) in enumerate(ranges, 1):
        mode = "batch"
        if counts is not None and counts[number - 1] < 2:
            if single_sample == "raise":
                raise SingleValueError(
                    _few_values_message(where, input, mask, ranges, number, counts[number - 1])
                )
            mode = single_sample
        chunks.append(pipeline.Chunk(start, stop, mode))
    return chunks


def _few_values_message(
    where: str,
    input: Tensor,
    mask: Tensor | None,
    ranges: list[tuple[int, int]],
    number: int,
    count: int,
) -> str:
    values = "valid values" if mask is not None else "values"
    part = "the batch"
    if len(ranges) > 1:
        start, stop = ranges[number - 1]
        part = f"ghost batch {number} of {len(ranges)} (samples {start} to {stop - 1})"
    return (
        f"{where}: expected at least two {values} per channel when training, got {count} in "
        f"{part} of input of shape {format_shape(input.shape)}, whose batch variance is "
        f"undefined. Use more (valid) values per batch, call .eval(), or pick single_sample= "
        f"from {format_choices(SINGLE_SAMPLE_MODES)}"
    )


def _renorm_limits(
    where: str,
    renorm: Renorm,
    running_mean: Tensor | None,
    num_batches_tracked: Tensor | None,
) -> tuple[Tensor, Tensor]:
    if running_mean is None:
        raise ConfigError(
            f"{where}: batch renorm corrects the batch statistics towards the running ones, "
            f"but there are none (track_running_stats=False or running_mean=None)"
        )
    if num_batches_tracked is None:
        if renorm.scheduled:
            raise ConfigError(
                f"{where}: a scheduled Renorm needs num_batches_tracked to know the step; "
                f"pass it, or use Renorm(warmup_steps=0, r_max_steps=0, d_max_steps=0)"
            )
        return renorm.limits(0)
    return renorm.limits(num_batches_tracked.detach())


class NonFiniteMonitor:
    """Warns when a batch's statistics were not recorded, without stalling the device.

    On CPU the flag is read at once. On CUDA it is copied to pinned host memory without
    blocking and read at a later call once an event says the copy is done (or when
    :meth:`flush` is called), so the warning may arrive a few steps late but the training
    loop never waits for the GPU. Other devices read the flag at once (a synchronization).

    Args:
        where: the name the warning starts with (a layer, or ``batch_norm``).
        once: warn only the first time (a layer); else every time (the functional form,
            where Python's warning filter then shows it once per call site).
    """

    def __init__(self, where: str, *, once: bool) -> None:
        self.where = where
        self.once = once
        self.warned = False
        self._pending: list[tuple[Tensor, Any, tuple[int, ...]]] = []

    def observe(self, recorded: Tensor | bool, shape: tuple[int, ...]) -> None:
        """Take note of one batch's ``recorded`` flag (a bool, or a 0-d bool tensor)."""
        if self.once and self.warned:
            return
        self.poll()
        if isinstance(recorded, bool):  # known on the host already
            if not recorded:
                self._warn(shape)
        elif not _holds_values(recorded):  # meta / fake tensors: nothing to read
            return
        elif recorded.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(recorded, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # untyped in torch
            event.record()
            self._pending.append((host, event, shape))
        elif not bool(recorded):
            self._warn(shape)

    def poll(self, *, wait: bool = False) -> None:
        """Read the flags whose copies have completed (all of them with ``wait``)."""
        while self._pending:
            host, event, shape = self._pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self._pending.pop(0)
            if not bool(host):
                self._warn(shape)

    def flush(self) -> None:
        """Wait for and report every pending flag."""
        self.poll(wait=True)

    def _warn(self, shape: tuple[int, ...]) -> None:
        if self.once and self.warned:
            self._pending.clear()
            return
        self.warned = True
        further = " Further skipped batches are not reported." if self.once else ""
        warnings.warn(
            f"{self.where}: a training batch of shape {format_shape(shape)} has non-finite "
            f"statistics (NaN or Inf); running_mean, running_var and num_batches_tracked were "
            f"left unchanged.{further} Look for NaN/Inf in the input of this layer.",
            NonFiniteStatsWarning,
            stacklevel=4,
        )

    def __getstate__(self) -> dict[str, Any]:
        # Pending CUDA events cannot be pickled or deep-copied; they are only a delay.
        return {"where": self.where, "once": self.once, "warned": self.warned}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pending = []


def _holds_values(t: Tensor) -> bool:
    """Whether ``t`` has data to read: not a meta tensor (a model built before its weights
    are loaded), not a fake one (tracing by torch.export and torch.compile)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


_DEFAULT_OPTIONS = Options()
_DEFAULT_FIELDS = tuple(getattr(_DEFAULT_OPTIONS, f.name) for f in fields(Options))
# _options checks the types of the flags skip_nonfinite, sync and memory_efficient by index
assert tuple(i for i, value in enumerate(_DEFAULT_FIELDS) if type(value) is bool) == (3, 6, 10)

_FUNCTIONAL_MONITOR = NonFiniteMonitor("batch_norm", once=False)
