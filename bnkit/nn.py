"""Drop-in batch normalization layers: ``bnkit.BatchNorm1d/2d/3d``.

They take the same constructor arguments as ``torch.nn.BatchNorm1d/2d/3d`` of the
installed torch, hold the same parameters and buffers under the same state_dict keys
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``, version
2), print the same ``repr`` and, with default options, compute the same outputs, gradients
and running statistics. Checkpoints load either way. The extras are keyword-only:
``running_var_estimator``, ``single_sample``, ``skip_nonfinite`` and ``frozen``.

Base class: :class:`BatchNormNd` derives from ``torch.nn.modules.batchnorm._BatchNorm``
(not from ``torch.nn.BatchNorm2d``):

- deriving from ``_BatchNorm`` keeps code that finds batch norm layers by
  ``isinstance(m, _BatchNorm)`` working (weight-decay exclusion, ``fuse_conv_bn_eval``,
  ``torch.func.replace_all_batch_norm_modules_``, freezing helpers), and inherits torch's
  parameter/buffer registration, ``reset_parameters``, ``extra_repr`` and the
  ``_load_from_state_dict`` that upgrades version-1 checkpoints, so these stay identical
  to torch's by construction;
- not deriving from ``torch.nn.BatchNorm2d`` keeps code that dispatches on torch's exact
  layer classes (quantization fusion patterns, ONNX export, layer converters) from
  treating this layer as torch's and bypassing its forward and extras.

Caveat: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` also matches ``_BatchNorm`` and
would replace these layers by torch's SyncBatchNorm, dropping the extras.
``fuse_conv_bn_eval`` and ``fuse_linear_bn_eval`` fold a layer without an activation
exactly and refuse one with a fused ``activation=`` (see :class:`_ActivationEps`).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar, NoReturn

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.errors import (
    ConfigError,
    DTypeError,
    FusionError,
    ShapeError,
    SizeMismatchError,
    format_shape,
)
from bnkit.functional import (
    NonFiniteMonitor,
    Options,
    Renorm,
    _batch_norm,
    check_eps,
    check_momentum,
    try_express,
)
from bnkit.kernels import pipeline
from bnkit.kernels.activation import default_param
from bnkit.kernels.pipeline import Call
from bnkit.kernels.stats import BatchStats, Update, merge_stats

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormNd", "accumulate_stats"]

#: The settings a layer passes to every call as :class:`Options`, in its field order.
OPTION_NAMES = (
    "running_var_estimator",
    "single_sample",
    "skip_nonfinite",
    "ghost_batch_size",
    "renorm",
    "sync",
    "process_group",
    "activation",
    "activation_param",
    "memory_efficient",
)

# Recent torch releases give the batch norm layers a keyword-only ``bias`` argument; with
# an older torch it is emulated by removing the bias parameter after construction.
_TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(_BatchNorm.__init__).parameters


class _ActivationEps(float):
    """The ``eps`` of a layer with a fused activation: a float that tensor operations refuse.

    torch's fusion utilities (``torch.nn.utils.fusion.fuse_conv_bn_eval`` and
    ``fuse_linear_bn_eval``) accept any ``_BatchNorm`` and fold its ``running_mean``,
    ``running_var``, ``eps``, ``weight`` and ``bias`` into the convolution or linear
    layer, which then computes the normalization without the activation: another
    function, and nothing says so. Every such fold computes ``running_var + eps`` as a
    tensor operation, which dispatches to ``__torch_function__`` here and raises
    :class:`~bnkit.errors.FusionError` naming the layer instead. Everything else is the
    float's own: ``float(eps)``, formatting, comparisons, arithmetic with numbers. The
    layer computes with a plain copy (``_eps``), so its forward, ``torch.compile`` and
    ``torch.export`` never meet this class.
    """

    __slots__ = ("layer",)
    layer: str

    def __new__(cls, value: float, layer: str) -> _ActivationEps:
        self = super().__new__(cls, value)
        self.layer = layer
        return self

    def __reduce__(self) -> tuple[type[_ActivationEps], tuple[float, str]]:
        return type(self), (float(self), self.layer)

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> NoReturn:
        values = (*args, *(kwargs or {}).values())
        layer = next((v.layer for v in values if isinstance(v, cls)), "a bnkit batch norm layer")
        raise FusionError(
            f"{layer}: its eps refuses tensor arithmetic because folding the layer into a "
            f"convolution or linear layer with torch's fusion utilities (fuse_conv_bn_eval, "
            f"fuse_linear_bn_eval) would drop its fused activation. Use bnkit.tools.fold, "
            f"which folds the normalization and keeps the activation as a torch module "
            f"after it; for torch.ao.quantization, set activation=None, put the torch "
            f"activation module after the layer and convert with bnkit.tools.to_torch. "
            f"float(layer.eps) is the plain number."
        )


class BatchNormNd(_BatchNorm):
    r"""Batch normalization over the channel dimension of an (N, C, \*) input.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    In training, E[x] and the biased Var[x] are taken per channel over the batch and all
    spatial positions, and the running statistics are updated::

        running_mean = (1 - momentum) * running_mean + momentum * batch_mean
        running_var  = (1 - momentum) * running_var  + momentum * batch_var_unbiased

    In eval mode (or when frozen) the running statistics are used. The subclasses
    :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` differ only in the
    input ranks they accept.

    Args:
        num_features: C, the number of channels (features).
        eps: added to the variance. Default 1e-5.
        momentum: weight of each new batch in the running statistics, in [0, 1], or None
            for the cumulative average over all batches. Default 0.1.
        affine: learn a per-channel scale ``weight`` (gamma) and shift ``bias`` (beta).
        track_running_stats: keep running statistics; if False, batch statistics are used
            in eval mode too.
        device, dtype: where and in what dtype to create parameters and buffers.
        bias: with ``affine``, also learn the shift. Default True.
        running_var_estimator: ``"unbiased"`` (default, torch) or ``"biased"`` (Keras,
            flax): which batch variance ``running_var`` averages.
        single_sample: a training batch with one value per channel (e.g. input (1, C)),
            whose variance is undefined: ``"raise"`` (default) raises
            :class:`~bnkit.errors.SingleValueError`; ``"running"`` normalizes it with the
            running statistics without updating them; ``"identity"`` returns the input
            unchanged (no normalization, no affine map, statistics untouched; the gradient
            passes straight through and weight and bias get none from that batch).
        skip_nonfinite: if a training batch's statistics hold NaN or Inf, leave the running
            statistics and ``num_batches_tracked`` unchanged and warn once per layer with
            :class:`~bnkit.errors.NonFiniteStatsWarning`. Default True: one bad batch
            (an fp16 overflow, a corrupt sample) would otherwise turn every later eval
            output into NaN. The batch's own output is computed as usual. On CUDA the
            warning is raised a few calls late rather than stalling the GPU; under
            ``torch.compile`` the skip happens but no warning is raised.
        frozen: normalize with the running statistics and never update them, even in
            train mode (fine-tuning with small batches). ``weight`` and ``bias`` still
            train; see :meth:`freeze`.
        renorm: a :class:`~bnkit.functional.Renorm` (also ``bnkit.Renorm``): batch
            renormalization (Ioffe, 2017) in training, with its warm-up schedule counted
            in ``num_batches_tracked``. Needs ``track_running_stats``.
        ghost_batch_size: normalize each consecutive chunk of this many samples with its
            own statistics (ghost batch norm, Hoffer et al. 2017; the last chunk may be
            smaller). The running statistics are updated once per call from all chunks
            merged. None (default) or >= the batch size is plain batch norm.
        sync: in training, compute the statistics over all processes of
            ``process_group`` (synchronized batch norm on any torch.distributed backend:
            gloo on CPU, nccl on GPU). Per-channel (count, mean, M2) are exchanged and
            merged exactly in float64, one collective in the forward and one in the
            backward pass, so uneven and empty local batches are exact and the running
            statistics are identical on every process. Falls back to local statistics
            when torch.distributed is not initialized or the group has one process; eval
            mode communicates nothing. Ghost batches stay per-process (each normalized
            with its local statistics; the running statistics are global). Every process
            must run the layer, and back-propagate through it, the same number of times.
        process_group: the group ``sync`` uses; the world by default.
        activation: None (default), or an activation fused with the layer, which then
            computes act(BN(x)): ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"identity"``.
        activation_param: leaky_relu's negative slope (default 0.01) or elu's alpha
            (default 1.0).
        memory_efficient: with an activation, save the output rather than the input for
            the backward pass (In-Place ABN): the backward recovers x_hat by inverting the
            activation, so a conv-BN-leaky_relu stack keeps one activation tensor per
            block instead of two. ReLU cannot be inverted where it outputs 0: the fused
            relu keeps its pre-activation, half of torch's BatchNorm2d + ReLU for one
            layer, no saving within a stack (use leaky_relu there). A channel with
            gamma = 0 (or |beta| >= 1000 |gamma|) makes that call keep its input instead,
            exactly. ``False``: always keep the input (for comparison). No double backward.

    Shape:
        - Input: (N, C, \*) with the rank the subclass accepts.
        - mask (optional, in forward): (N, \*) bool, True at valid positions.
        - Output: same shape, dtype and memory format as the input.

    Raises:
        ConfigError: a negative num_features or eps, momentum outside [0, 1], an unknown
            option value, ``frozen`` or ``single_sample="running"`` without running stats.
        ShapeError: (in forward) an input of the wrong rank or number of channels.
        SingleValueError: (in forward) one value per channel in training, by default.

    Example:
        >>> bn = BatchNorm2d(3, single_sample="running")
        >>> y = bn(torch.randn(4, 3, 5, 5))
        >>> y.shape, int(bn.num_batches_tracked)
        (torch.Size([4, 3, 5, 5]), 1)

    Note:
        ``momentum`` follows PyTorch's convention, the weight of the new batch; Keras'
        and flax's momentum is 1 minus it. Training normalizes with the *biased* batch
        variance, while ``running_var`` stores the *unbiased* one unless
        ``running_var_estimator="biased"``.
    """

    #: Input ranks accepted, with the layout named in error messages.
    input_layouts: ClassVar[dict[int, str]] = {}

    running_var_estimator: str
    single_sample: str
    skip_nonfinite: bool
    frozen: bool
    renorm: Renorm | None
    ghost_batch_size: int | None
    sync: bool
    process_group: Any
    activation: str | None
    activation_param: float | None
    memory_efficient: bool
    _eps: float  # eps as a plain number, what the forward computes with (see _guard_eps)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        running_var_estimator: str = "unbiased",
        single_sample: str = "raise",
        skip_nonfinite: bool = True,
        frozen: bool = False,
        renorm: Renorm | None = None,
        ghost_batch_size: int | None = None,
        sync: bool = False,
        process_group: Any = None,
        activation: str | None = None,
        activation_param: float | None = None,
        memory_efficient: bool = True,
    ) -> None:
        where = f"{type(self).__name__}({num_features})"
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ConfigError(
                f"{type(self).__name__}: expected num_features to be an int >= 0 "
                f"(the number of channels C), got {num_features!r}"
            )
        # eps = 0 is accepted here, as torch does: it is valid in eval mode. A negative
        # eps is rejected now because no forward could ever use it.
        check_eps(where, eps, use_batch_stats=False)
        check_momentum(where, momentum)
        options = Options(
            where,
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
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise DTypeError(
                f"{where}: expected a floating-point dtype for the parameters and running "
                f"statistics (float16, bfloat16, float32, float64), got {dtype!r}"
            )
        if not isinstance(frozen, bool):
            raise ConfigError(f"{where}: expected frozen to be True or False, got {frozen!r}")
        if renorm is not None and not track_running_stats:
            raise ConfigError(
                f"{where}: renorm corrects the batch statistics towards the running ones, "
                f"which track_running_stats=False does not keep"
            )
        if not track_running_stats and single_sample == "running":
            raise ConfigError(
                f"{where}: single_sample='running' normalizes with the running statistics, "
                f"which track_running_stats=False does not keep; pick one of 'raise', 'identity'"
            )
        if _TORCH_HAS_BIAS_ARG:
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
            )
        else:  # pragma: no cover - torch without the bias argument
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device, dtype
            )
            if affine and not bias:
                self.register_parameter("bias", None)
        # The settings stay attributes (as torch's layer keeps its own), each validated in
        # ``options``; setting one makes the next forward validate them again.
        for name in OPTION_NAMES:
            setattr(self, name, getattr(options, name))
        self.frozen = False
        # Statistics of the micro-batches seen inside accumulate_stats(), else None.
        self._deferred: list[BatchStats] | None = None
        self._nonfinite_monitor = NonFiniteMonitor(where, once=True)
        if frozen:
            self.freeze()

    def freeze(self) -> BatchNormNd:
        """Normalize with the running statistics from now on, in train mode too, and stop
        updating them. Affine parameters keep training (``requires_grad_(False)`` them to
        freeze those as well). Returns the layer.

        Raises:
            ConfigError: the layer keeps no running statistics.
        """
        if self.running_mean is None or self.running_var is None:
            raise ConfigError(
                f"{self._where()}: cannot freeze a layer without running statistics "
                f"(track_running_stats=False)"
            )
        self.frozen = True
        return self

    def unfreeze(self) -> BatchNormNd:
        """Undo :meth:`freeze`: train mode uses and updates batch statistics again."""
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> BatchNormNd:
        # Leaving train mode is a natural point to report pending non-finite batches.
        if not mode:
            self._nonfinite_monitor.flush()
        super().train(mode)
        return self

    def _where(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise DTypeError(
                f"{self._where()}: expected a torch.Tensor input, got {type(input).__name__}"
            )
        if input.dim() not in self.input_layouts:
            expected = " or ".join(
                f"{rank}D input {layout}" for rank, layout in self.input_layouts.items()
            )
            raise ShapeError(
                f"{self._where()}: expected {expected}, got {input.dim()}D input of shape "
                f"{format_shape(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise SizeMismatchError(
                f"{self._where()}: expected {self.num_features} channels in dimension 1, got "
                f"{input.shape[1]} in input of shape {format_shape(input.shape)}"
            )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        r"""Normalize ``input``; in train mode (and not frozen) update the running statistics.

        Args:
            input: (N, C, \*) with the rank this layer accepts.
            mask: optional bool tensor (N, \*) (for (N, C, L): (N, L)), True at valid
                positions, e.g. the non-padded steps of sequences of different lengths.
                Statistics, their gradients and the running statistics come from the valid
                positions only; every position goes through the same affine map (so the
                output at padding is defined, and finite for finite padding). An all-True
                mask is no mask; fewer than two valid values per channel in training
                follow ``single_sample``.
        """
        self._check_input_dim(input)
        if self.frozen:
            training, running_mean, running_var, num_batches_tracked = (
                False,
                self.running_mean,
                self.running_var,
                None,
            )
            momentum: float | None = self.momentum
        else:
            # The same decisions as torch.nn.BatchNorm*d: batch statistics in train mode and
            # whenever there are no running statistics; the running ones are updated only in
            # train mode with track_running_stats.
            update = self.training and self.track_running_stats
            training = self.training or (self.running_mean is None and self.running_var is None)
            running_mean = self.running_mean if not self.training or update else None
            running_var = self.running_var if not self.training or update else None
            num_batches_tracked = self.num_batches_tracked if update else None
            momentum = self.momentum
            if momentum is None and num_batches_tracked is None:
                momentum = 0.0  # torch's factor when there is no counter to average with
        options = self.options
        call = Call(
            input, running_mean, running_var, self.weight, self.bias, num_batches_tracked, mask
        )
        if self._deferred is None:
            express_output = try_express(
                call, training, momentum, self._eps, options, self._nonfinite_monitor
            )
            if express_output is not None:
                return express_output
        output, recorded = _batch_norm(
            call, training, momentum, self._eps, options, deferred=self._deferred
        )
        if recorded is not None and not torch.compiler.is_compiling():
            self._nonfinite_monitor.observe(recorded, tuple(input.shape))
        return output

    @property
    def options(self) -> Options:
        """This layer's extras as one validated :class:`bnkit.functional.Options`, made
        again after any of them is set (raising :class:`ConfigError` for a bad value)."""
        options = self.__dict__.get("_options")
        if options is None:
            options = Options(self._where(), *(getattr(self, name) for name in OPTION_NAMES))
            self.__dict__["_options"] = options
        return options

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in OPTION_NAMES:
            self.__dict__.pop("_options", None)
        if name in ("eps", "activation"):
            self._guard_eps()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]  # untyped in torch
        self._guard_eps()  # a layer pickled by an older bnkit has no ``_eps``

    def _guard_eps(self) -> None:
        """Keep ``eps`` an :class:`_ActivationEps` while the layer has a fused activation
        (a plain value otherwise), and its plain value in ``_eps`` for the forward."""
        attributes = self.__dict__
        if "eps" not in attributes:
            return  # not set up yet
        eps = attributes["eps"]
        if isinstance(eps, _ActivationEps):
            eps = float(eps)
        activation = attributes.get("activation")
        number = isinstance(eps, (int, float)) and not isinstance(eps, bool)
        if number and activation not in (None, "identity"):
            layer = f"{type(self).__name__}({self.num_features}, activation={activation!r})"
            attributes["eps"] = _ActivationEps(eps, layer)
        else:
            attributes["eps"] = eps
        attributes["_eps"] = eps

    def _record(self, stats: BatchStats) -> None:
        """Fold statistics gathered elsewhere (accumulated micro-batches) into the running
        statistics: one update, counted once in ``num_batches_tracked``."""
        if self.running_mean is None or self.running_var is None:
            return
        momentum = self.momentum
        update = Update(
            stats, self.running_mean, self.running_var, self.num_batches_tracked, momentum,
            self.running_var_estimator == "unbiased", self.skip_nonfinite,
        )  # fmt: skip
        recorded = pipeline.select_kernel(self.running_mean).update_running_stats(update)
        if recorded is not None:
            self._nonfinite_monitor.observe(recorded, (int(stats.count[0].item()),))

    def extra_repr(self) -> str:
        """torch's ``extra_repr``, followed by the extras that differ from their defaults."""
        text: str = super().extra_repr()  # type: ignore[no-untyped-call]  # untyped in torch
        defaults: dict[str, Any] = {
            "running_var_estimator": "unbiased",
            "single_sample": "raise",
            "skip_nonfinite": True,
            "frozen": False,
            "renorm": None,
            "ghost_batch_size": None,
            "sync": False,
            "activation": None,
            "activation_param": default_param(self.activation),
            "memory_efficient": True,
        }
        for name, default in defaults.items():
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value!r}"
        return text


class BatchNorm1d(BatchNormNd):
    r"""Batch normalization of (N, C) features or (N, C, L) sequences; see :class:`BatchNormNd`.

    Example:
        >>> bn = BatchNorm1d(16)
        >>> bn(torch.randn(32, 16)).shape
        torch.Size([32, 16])
    """

    input_layouts: ClassVar[dict[int, str]] = {2: "(N, C)", 3: "(N, C, L)"}


class BatchNorm2d(BatchNormNd):
    r"""Batch normalization of (N, C, H, W) images; see :class:`BatchNormNd`.

    Example:
        >>> bn = BatchNorm2d(64)
        >>> bn(torch.randn(8, 64, 4, 4)).shape
        torch.Size([8, 64, 4, 4])
    """

    input_layouts: ClassVar[dict[int, str]] = {4: "(N, C, H, W)"}


class BatchNorm3d(BatchNormNd):
    r"""Batch normalization of (N, C, D, H, W) volumes; see :class:`BatchNormNd`.

    Example:
        >>> bn = BatchNorm3d(4)
        >>> bn(torch.randn(2, 4, 3, 8, 8)).shape
        torch.Size([2, 4, 3, 8, 8])
    """

    input_layouts: ClassVar[dict[int, str]] = {5: "(N, C, D, H, W)"}


@contextlib.contextmanager
def accumulate_stats(model: torch.nn.Module) -> Iterator[None]:
    """Update the running statistics once from all the micro-batches run inside the block.

    Under gradient accumulation a step's batch is split into micro-batches, and each
    would update the running statistics as if it were the whole batch (with the momentum
    applied once per micro-batch). Inside this context manager every bnkit batch norm
    layer of ``model`` normalizes each micro-batch with its own statistics as usual, but
    defers its running-statistics update; on a normal exit each layer updates once from
    the merged (count, mean, M2) statistics of all its micro-batches (Chan et al.'s exact
    merge), so ``running_mean``, ``running_var`` and ``num_batches_tracked`` equal what
    one forward over the concatenated batch would have given. If the block raises, the
    deferred statistics are dropped and the running statistics stay as they were.

    Args:
        model: any module; its bnkit batch norm layers (``bnkit.BatchNorm*d``) take part.
            torch's own batch norm layers cannot defer their updates: a warning names them
            (convert them with ``bnkit.tools.convert``).

    Raises:
        RuntimeError: a layer of ``model`` is already inside ``accumulate_stats``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchNorm1d(8))
        >>> batch = torch.randn(32, 4)
        >>> with accumulate_stats(model):
        ...     for micro_batch in batch.split(8):
        ...         model(micro_batch).square().mean().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    layers = [m for m in model.modules() if isinstance(m, BatchNormNd)]
    others = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, BatchNormNd)
    ]
    if others:
        warnings.warn(
            f"accumulate_stats: torch batch norm layers update their running statistics on "
            f"every micro-batch: {', '.join(others)}. Convert them with bnkit.tools.convert.",
            UserWarning,
            stacklevel=3,
        )
    for layer in layers:
        if layer._deferred is not None:
            raise RuntimeError(f"accumulate_stats: {layer._where()} is already accumulating")
    for layer in layers:
        layer._deferred = []
    try:
        yield
        for layer in layers:
            parts = layer._deferred
            layer._deferred = None
            if parts:
                layer._record(merge_stats(parts))
    finally:
        for layer in layers:
            layer._deferred = None
