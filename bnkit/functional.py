"""Functional batch normalization: a drop-in for ``torch.nn.functional.batch_norm``.

:func:`batch_norm` takes the same positional arguments as
``torch.nn.functional.batch_norm`` and gives the same results (to rounding, and more
accurately for data far from zero), plus keyword-only options for batch norm's known
pain points. It checks its inputs, decides what the batch means (normal, empty, a single
value per channel) and hands the arithmetic to :mod:`bnkit.kernels`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from bnkit import kernels
from bnkit.errors import (
    ConfigError,
    DTypeError,
    NonFiniteStatsWarning,
    ShapeError,
    SingleValueError,
    format_choices,
    format_shape,
)

__all__ = ["RUNNING_VAR_ESTIMATORS", "SINGLE_SAMPLE_MODES", "batch_norm"]

#: Values of ``running_var_estimator``: which batch variance ``running_var`` averages.
RUNNING_VAR_ESTIMATORS = ("unbiased", "biased")
#: Values of ``single_sample``: what a training batch with one value per channel does.
SINGLE_SAMPLE_MODES = ("raise", "running", "identity")


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
    output, recorded = _batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked=num_batches_tracked,
        running_var_estimator=running_var_estimator,
        single_sample=single_sample,
        skip_nonfinite=skip_nonfinite,
        where="batch_norm",
    )
    if recorded is not None and not torch.compiler.is_compiling():
        _FUNCTIONAL_MONITOR.observe(recorded, tuple(input.shape))
    return output


def check_options(
    where: str,
    *,
    momentum: float | None,
    running_var_estimator: str,
    single_sample: str,
    skip_nonfinite: bool,
) -> None:
    """Raise :class:`ConfigError` for an option outside its allowed values."""
    if momentum is not None and (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 <= momentum <= 1
    ):
        raise ConfigError(
            f"{where}: expected momentum in [0, 1] (the weight of each new batch in the running "
            f"statistics) or None (cumulative average), got {momentum!r}"
        )
    _check_choice(where, "running_var_estimator", running_var_estimator, RUNNING_VAR_ESTIMATORS)
    _check_choice(where, "single_sample", single_sample, SINGLE_SAMPLE_MODES)
    if not isinstance(skip_nonfinite, bool):
        raise ConfigError(
            f"{where}: expected skip_nonfinite to be True or False, got {skip_nonfinite!r}"
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
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.dim() < 2:
        raise ShapeError(
            f"{where}: expected input of shape (N, C) or (N, C, *spatial), "
            f"got {input.dim()}D input of shape {format_shape(input.shape)}"
        )
    if not input.is_floating_point():
        raise DTypeError(
            f"{where}: expected a floating-point input (float16, bfloat16, float32, float64), "
            f"got dtype {input.dtype}"
        )
    channels = input.shape[1]
    for name, tensor in per_channel.items():
        if tensor is not None and tuple(tensor.shape) != (channels,):
            raise ShapeError(
                f"{where}: expected {name} of shape ({channels},) to match the {channels} "
                f"channels of the input of shape {format_shape(input.shape)}, "
                f"got shape {format_shape(tensor.shape)}"
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
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    num_batches_tracked: Tensor | None,
    running_var_estimator: str,
    single_sample: str,
    skip_nonfinite: bool,
    where: str,
) -> kernels.BatchNormResult:
    """:func:`batch_norm` with errors attributed to ``where`` (a layer's name), returning
    whether the running statistics recorded the batch instead of warning about it."""
    _check_input(
        where,
        input,
        {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias},
    )
    check_options(
        where,
        momentum=momentum,
        running_var_estimator=running_var_estimator,
        single_sample=single_sample,
        skip_nonfinite=skip_nonfinite,
    )
    if (running_mean is None) != (running_var is None):
        raise ConfigError(
            f"{where}: expected running_mean and running_var both given or both None, got "
            f"running_mean={_given(running_mean)}, running_var={_given(running_var)}"
        )
    shape = tuple(input.shape)
    use_batch_stats = bool(training)
    update = use_batch_stats and (running_mean is not None or running_var is not None)

    values_per_channel = math.prod((shape[0], *shape[2:]))
    if use_batch_stats and values_per_channel == 1:
        if single_sample == "raise":
            raise SingleValueError(_single_value_message(where, shape))
        if single_sample == "identity":
            # A copy, not the input itself: an in-place op after this layer (ReLU(inplace))
            # must not overwrite a tensor the previous layer may have saved for backward.
            return kernels.BatchNormResult(input.clone(), None)
        if running_mean is None or running_var is None:
            raise SingleValueError(
                f"{where}: single_sample='running' normalizes a one-value-per-channel batch "
                f"(input of shape {format_shape(shape)}) with the running statistics, but "
                f"there are none (track_running_stats=False or running_mean=None)"
            )
        use_batch_stats = update = False

    check_eps(where, eps, use_batch_stats=use_batch_stats)
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ConfigError(
            f"{where}: expected running_mean and running_var when normalizing with population "
            f"statistics (training=False), got None"
        )
    if update and momentum is None and num_batches_tracked is None:
        raise ConfigError(
            f"{where}: momentum=None (cumulative average) needs num_batches_tracked to know "
            f"how many batches the running statistics already hold"
        )

    if input.numel() == 0:
        # As torch: an empty batch gives an empty output (connected to weight and bias, so
        # they get zero gradients), leaves the running statistics alone and is still
        # counted in num_batches_tracked.
        if update and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
        view = [1, shape[1]] + [1] * (input.dim() - 2)
        output = input.clone()
        if weight is not None:
            output = output * weight.to(input.dtype).view(view)
        if bias is not None:
            output = output + bias.to(input.dtype).view(view)
        return kernels.BatchNormResult(output, None)

    return kernels.batch_norm(
        input,
        running_mean if update or not use_batch_stats else None,
        running_var if update or not use_batch_stats else None,
        weight,
        bias,
        use_batch_stats=use_batch_stats,
        momentum=momentum,
        eps=float(eps),
        num_batches_tracked=num_batches_tracked if update else None,
        unbiased=running_var_estimator == "unbiased",
        skip_nonfinite=skip_nonfinite,
    )


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

    def observe(self, recorded: Tensor, shape: tuple[int, ...]) -> None:
        """Take note of one batch's ``recorded`` flag (0-d bool tensor)."""
        if self.once and self.warned:
            return
        self.poll()
        if recorded.device.type == "cuda":
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


_FUNCTIONAL_MONITOR = NonFiniteMonitor("batch_norm", once=False)
