"""Recompute batch norm's population statistics with the weights fixed: :func:`recalibrate`."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.errors import ConfigError, format_choices
from bnkit.nn import BatchNormNd
from bnkit.tools._common import batch_input, batch_norm_layers, describe, has_running_stats

__all__ = ["ESTIMATORS", "recalibrate"]

#: Values of ``estimator``: how :func:`recalibrate` combines the batches.
ESTIMATORS = ("population", "paper")


class _Statistics:
    """Per-channel statistics of everything a layer saw, accumulated in float64.

    Keeps the exact merge (count, mean, M2) of all values (Chan et al.'s pairwise update)
    and, for the paper's estimator, the sums of the batch means and batch variances.
    """

    def __init__(self, biased: bool) -> None:
        self.biased = biased
        self.batches = 0
        self.count: Tensor | None = None  # () float64: values per channel so far
        self.mean: Tensor | None = None  # (C,)
        self.m2: Tensor | None = None  # (C,) sum of squared deviations from the mean
        self.sum_of_means: Tensor | None = None  # (C,)
        self.sum_of_vars: Tensor | None = None  # (C,)
        self.batches_with_var = 0

    def add(self, x: Tensor) -> None:
        """Fold in one batch, x of shape (N, C, *)."""
        channels = x.shape[1]
        values = x.detach().to(torch.float64).transpose(0, 1).reshape(channels, -1)  # (C, M)
        count = values.shape[1]
        if count == 0:
            return
        mean = values.mean(dim=1)
        m2 = (values - mean[:, None]).square().sum(dim=1)
        self.batches += 1
        if self.count is None or self.mean is None or self.m2 is None:
            self.count = torch.tensor(float(count), dtype=torch.float64, device=mean.device)
            self.mean, self.m2 = mean, m2
            self.sum_of_means = torch.zeros_like(mean)
            self.sum_of_vars = torch.zeros_like(mean)
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
            self.count = total
        assert self.sum_of_means is not None
        assert self.sum_of_vars is not None
        self.sum_of_means = self.sum_of_means + mean
        # The batch's variance as the layer would record it: unbiased m/(m-1) unless the
        # layer stores biased variances; a single value has no unbiased variance.
        divisor = count if self.biased else count - 1
        if divisor > 0:
            self.sum_of_vars = self.sum_of_vars + m2 / divisor
            self.batches_with_var += 1

    def population(self) -> tuple[Tensor, Tensor]:
        """Mean and (unbiased, or biased) variance of all the values seen."""
        assert self.count is not None
        assert self.mean is not None
        assert self.m2 is not None
        divisor = self.count if self.biased else (self.count - 1).clamp(min=1)
        return self.mean, self.m2 / divisor

    def paper(self) -> tuple[Tensor, Tensor]:
        """The average of the batch means and the average of the batch variances."""
        assert self.sum_of_means is not None
        assert self.sum_of_vars is not None
        return self.sum_of_means / self.batches, self.sum_of_vars / max(self.batches_with_var, 1)


def recalibrate(
    model: nn.Module,
    batches: Iterable[object],
    *,
    max_batches: int | None = None,
    estimator: str = "population",
) -> nn.Module:
    r"""Recompute every batch norm layer's population statistics from ``batches`` (PreciseBN).

    The running averages kept during training mix statistics of weights that kept
    changing and forget early batches only gradually; Wu & Johnson (2021, "Rethinking
    'Batch' in BatchNorm") recompute them with the final weights. The model runs on each
    batch under ``torch.no_grad``, batch norm layers in train mode (each normalizes with its
    batch's statistics, as in training) and every other module in eval mode (dropout off,
    as at inference). A forward pre-hook gathers each layer's per-channel
    (count, mean, M2) in float64; batches are merged exactly (Chan et al.), no activation
    is kept. Then, per layer:

    - ``estimator="population"``: ``running_mean`` is the mean of all values the layer saw
      and ``running_var`` their unbiased variance, as if the batches were one
      (count-weighted, exact);
    - ``estimator="paper"``: the original paper's (Ioffe & Szegedy 2015, Algorithm 2) mean of
      the batch means and mean of the unbiased batch variances (m/(m-1) per batch of m
      values);

    A bnkit layer with ``running_var_estimator="biased"`` gets the biased variance. With
    ``momentum=None`` (cumulative average) ``num_batches_tracked`` becomes the number of
    batches the layer saw, so further training weighs the recalibrated statistics as that
    many batches; with a momentum it is a step count (batch renorm's schedule reads it) and
    becomes at least that number, never less than it was.

    Weights, the modules' train/eval modes, the layers' momentum and ``frozen`` and
    ``sync`` flags are left as they were. Recalibrating on unlabeled data from a new
    distribution is AdaBN (Li et al. 2016), a remedy for covariate shift between training
    and deployment.

    Args:
        model: the model, in any mode; its batch norm layers with running statistics
            are updated in place (frozen ones too).
        batches: an iterable of batches: each a tensor, a tuple or list whose first
            element is the input, or a dict with an ``"input"`` key. Inputs are moved to the
            model's device.
        max_batches: use at most this many batches.
        estimator: ``"population"`` (default) or ``"paper"``.

    Returns:
        ``model``.

    Raises:
        ConfigError: an unknown ``estimator``, ``max_batches`` < 1, or no batch at all.
        TypeError: a batch of another kind.

    Warns:
        UserWarning: some layers saw no batch (a branch the forward did not take); they keep
            their statistics.

    Example:
        AdaBN: a model trained on one distribution, deployed on a shifted one.

        >>> import bnkit
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bnkit.BatchNorm1d(8)).eval()
        >>> shifted = [3 * torch.randn(64, 4) + 5 for _ in range(10)]  # unlabeled, new domain
        >>> model = recalibrate(model, shifted)
        >>> features = torch.cat([model[0](x) for x in shifted]).detach()
        >>> torch.allclose(model[1].running_mean, features.mean(0), atol=1e-5)
        True
        >>> model.training, int(model[1].num_batches_tracked)
        (False, 10)

    Note:
        A batch's input to a layer depends on the layers before it, which normalize with
        that batch's statistics as in training. Use batches of the training batch size:
        statistics of batch-normalized features depend on it. Layers with ``sync=True``
        normalize and count locally during the pass (no collectives): in distributed
        training, recalibrate on one process and broadcast the buffers (DDP's default
        ``broadcast_buffers`` does), or give every process the same batches.
    """
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ConfigError(
            f"recalibrate: unknown estimator={estimator!r}; expected one of "
            f"{format_choices(ESTIMATORS)}"
        )
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ConfigError(
            f"recalibrate: expected max_batches to be None or an int >= 1, got {max_batches!r}"
        )
    layers = [(name, bn) for name, bn in batch_norm_layers(model) if has_running_stats(bn)]
    statistics = {
        id(bn): _Statistics(getattr(bn, "running_var_estimator", "unbiased") == "biased")
        for _, bn in layers
    }
    device = _device_of(model)

    modes = [(module, module.training) for module in model.modules()]
    # bnkit options switched off for the pass: frozen (normalize with batch statistics like
    # the other layers) and sync (no collectives: the other processes may not be here).
    flags = [
        (bn, option, getattr(bn, option))
        for _, bn in layers
        if isinstance(bn, BatchNormNd)
        for option in ("frozen", "sync")
        if hasattr(bn, option)
    ]
    saved = {
        id(bn): [(b, b.detach().clone()) for b in bn.buffers(recurse=False)] for _, bn in layers
    }
    handles = []
    count = 0
    try:
        model.eval()
        for _, bn in layers:
            bn.train()

            def gather(module: nn.Module, args: tuple[object, ...]) -> None:
                if args and isinstance(args[0], Tensor):
                    statistics[id(module)].add(args[0])

            handles.append(bn.register_forward_pre_hook(gather))
        for layer, option, _ in flags:
            setattr(layer, option, False)
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and count >= max_batches:
                    break
                x = batch_input(batch, "recalibrate", index)
                model(x.to(device) if device is not None else x)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
        for layer, option, value in flags:
            setattr(layer, option, value)
        with torch.no_grad():
            for buffers in saved.values():  # the train-mode forwards updated them
                for buffer, value in buffers:
                    buffer.copy_(value)
    if count == 0:
        raise ConfigError("recalibrate: expected at least one batch, got none")

    missed = []
    with torch.no_grad():
        for name, bn in layers:
            stats = statistics[id(bn)]
            if stats.batches == 0:
                missed.append(describe(name, bn))
                continue
            mean, var = stats.population() if estimator == "population" else stats.paper()
            _store(bn, mean, var, stats.batches)
    if missed:
        warnings.warn(
            f"recalibrate: {', '.join(missed)} saw none of the {count} batches and kept "
            f"{'its' if len(missed) == 1 else 'their'} statistics",
            UserWarning,
            stacklevel=2,
        )
    return model


def _store(bn: _BatchNorm, mean: Tensor, var: Tensor, batches: int) -> None:
    """Write the statistics and count the batches as :func:`recalibrate` documents."""
    assert bn.running_mean is not None
    assert bn.running_var is not None
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.dtype))
    if bn.num_batches_tracked is not None:
        if bn.momentum is None:  # the cumulative average now holds exactly these batches
            bn.num_batches_tracked.fill_(batches)
        else:  # a step count (renorm's schedule reads it): never moved back
            bn.num_batches_tracked.clamp_(min=batches)


def _device_of(model: nn.Module) -> torch.device | None:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else None
