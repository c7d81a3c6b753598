"""Measure internal covariate shift: :class:`ICSProbe` (Ioffe & Szegedy 2015, Figure 1)
and :func:`santurkar_ics` (Santurkar et al. 2018, Definition 2.1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bnkit.errors import ConfigError, ShapeError, format_choices, format_shape
from bnkit.tools._common import batch_norm_layers, restore_buffers, save_buffers

__all__ = ["GradientShift", "ICSProbe", "LayerRecord", "santurkar_ics"]

_WHERE = ("input", "output")


@dataclass(frozen=True)
class LayerRecord:
    """The distribution of one layer's input (or output) over training steps, ready to plot.

    Attributes:
        name: the module path.
        features: (F,) the channel indices followed.
        levels: (P,) the percentile levels, e.g. ``[15, 50, 85]``.
        steps: (T,) the index of each recorded call among the layer's training-mode calls.
        mean: (T, F) each feature's mean over the batch (and spatial positions).
        std: (T, F) each feature's standard deviation (ddof 0: of the values themselves).
        percentiles: (T, F, P) each feature's percentiles, interpolated linearly between
            order statistics (numpy's default method).

    Example:
        ``plt.plot(record.steps, record.percentiles[:, 0, :])`` draws the paper's Figure 1
        (b, c) for the first feature followed: one line per percentile level.
    """

    name: str
    features: np.ndarray
    levels: np.ndarray
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    percentiles: np.ndarray


class ICSProbe:
    """Record how the distribution of layers' inputs moves during training.

    Ioffe & Szegedy (2015) call the change of a layer's input distribution during training
    *internal covariate shift*; their Figure 1 (b, c) follows the 15th, 50th and 85th
    percentiles of a sigmoid's input over training steps, with and without batch norm.
    The probe hooks the selected layers and, at each training-mode call, records for a few
    chosen features (channels) the mean, the standard deviation and the percentiles of the
    values (over the batch and all spatial positions). Only those features are copied and
    sorted, and statistics stay on the device until read: cheap enough to keep on for a
    whole training run.

    Args:
        model: the model to watch.
        layers: module paths to watch; default every batch norm layer of the model.
        features: which channels (dimension 1) to follow: an int k for k channels spread
            evenly from the first to the last, a sequence of indices, or None for all.
            Default 3.
        percentiles: percentile levels in [0, 100]. Default (15, 50, 85), as the paper.
        where: ``"input"`` (default: what the layer receives, the paper's measure) or
            ``"output"``.
        every: record one training call in ``every``. Default 1.
        train_only: ignore calls in eval mode (evaluation passes). Default True.

    Raises:
        ConfigError: an unknown layer name, no layer to watch, or an option out of range.
        ShapeError: (during a forward) a feature index beyond the layer's channels.

    Example:
        >>> import bnkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bnkit.BatchNorm1d(8))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with ICSProbe(model, features=2) as probe:
        ...     for step in range(5):
        ...         loss = model(torch.randn(16, 4)).square().mean()
        ...         optimizer.zero_grad(); loss.backward(); optimizer.step()
        >>> record = probe.records["1"]
        >>> record.features.tolist(), record.percentiles.shape, record.steps.tolist()
        ([0, 7], (5, 2, 3), [0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | None = None,
        *,
        features: int | Sequence[int] | None = 3,
        percentiles: Sequence[float] = (15.0, 50.0, 85.0),
        where: str = "input",
        every: int = 1,
        train_only: bool = True,
    ) -> None:
        if layers is None:
            names = [name for name, _ in batch_norm_layers(model)]
        else:
            names = list(dict.fromkeys(layers))
            modules = dict(model.named_modules())
            unknown = [name for name in names if name not in modules]
            if unknown:
                raise ConfigError(
                    f"ICSProbe: no module named {', '.join(map(repr, unknown))} in the model; "
                    f"module names look like {', '.join(map(repr, list(modules)[1:4]))}"
                )
        if not names:
            raise ConfigError(
                "ICSProbe: expected layers to watch, got none (the model has no batch norm "
                "layer: pass layers=[...] with module names)"
            )
        if isinstance(features, bool) or (
            (features is not None and not isinstance(features, (int, Sequence)))
            or (isinstance(features, int) and features < 1)
            or (
                isinstance(features, Sequence)
                and (not features or any(not isinstance(i, int) or i < 0 for i in features))
            )
        ):
            raise ConfigError(
                f"ICSProbe: expected features to be an int >= 1, a non-empty sequence of "
                f"channel indices >= 0, or None, got {features!r}"
            )
        levels = [float(level) for level in percentiles]
        if not levels or any(not 0 <= level <= 100 for level in levels):
            raise ConfigError(
                f"ICSProbe: expected percentiles in [0, 100], got {list(percentiles)!r}"
            )
        if where not in _WHERE:
            raise ConfigError(
                f"ICSProbe: unknown where={where!r}; expected one of {format_choices(_WHERE)}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"ICSProbe: expected every to be an int >= 1, got {every!r}")

        self.names = names
        self.features = features
        self.levels = np.asarray(levels, dtype=np.float64)
        self.where = where
        self.every = every
        self.train_only = train_only
        self._calls = dict.fromkeys(names, 0)
        self._chosen: dict[str, Tensor] = {}
        self._rows: dict[str, list[tuple[int, Tensor, Tensor, Tensor]]] = {n: [] for n in names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name in names:
            module = model.get_submodule(name)
            if where == "input":

                def before(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                    self._observe(name, module, args[0] if args else None)

                self._handles.append(module.register_forward_pre_hook(before))
            else:

                def after(
                    module: nn.Module, args: tuple[Any, ...], output: Any, name: str = name
                ) -> None:
                    self._observe(name, module, output)

                self._handles.append(module.register_forward_hook(after))

    def _observe(self, name: str, module: nn.Module, value: object) -> None:
        if not isinstance(value, Tensor) or value.dim() < 2:
            return
        if self.train_only and not module.training:
            return
        call = self._calls[name]
        self._calls[name] = call + 1
        if call % self.every:
            return
        with torch.no_grad():
            chosen = self._feature_indices(name, value)
            values = value.detach().index_select(1, chosen).transpose(0, 1)  # (F, N, *)
            values = values.reshape(chosen.numel(), -1).to(torch.float64)  # (F, M)
            mean = values.mean(dim=1)
            std = values.std(dim=1, correction=0)
            self._rows[name].append((call, mean, std, _percentiles(values, self.levels)))

    def _feature_indices(self, name: str, value: Tensor) -> Tensor:
        chosen = self._chosen.get(name)
        if chosen is not None:
            return chosen
        channels = value.shape[1]
        if self.features is None:
            indices = list(range(channels))
        elif isinstance(self.features, int):
            k = min(self.features, channels)
            indices = [round(i * (channels - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]
        else:
            indices = list(self.features)
            if max(indices) >= channels:
                raise ShapeError(
                    f"ICSProbe: feature {max(indices)} asked of '{name}', whose {self.where} "
                    f"of shape {format_shape(value.shape)} has {channels} channels"
                )
        chosen = torch.tensor(indices, dtype=torch.long, device=value.device)
        self._chosen[name] = chosen
        return chosen

    @property
    def records(self) -> dict[str, LayerRecord]:
        """What was recorded so far, per layer name, as numpy arrays."""
        return {name: self[name] for name in self.names}

    def __getitem__(self, name: str) -> LayerRecord:
        rows = self._rows[name]
        chosen = self._chosen.get(name)
        features = chosen.cpu().numpy() if chosen is not None else np.zeros(0, np.int64)
        f, p = features.size, self.levels.size
        if not rows:
            empty = np.zeros((0, f))
            return LayerRecord(
                name,
                features,
                self.levels.copy(),
                np.zeros(0, np.int64),
                empty,
                empty,
                np.zeros((0, f, p)),
            )
        steps = np.array([row[0] for row in rows], dtype=np.int64)

        def stack(i: int) -> np.ndarray:
            return torch.stack([row[i] for row in rows]).cpu().numpy()  # type: ignore[misc]

        return LayerRecord(name, features, self.levels.copy(), steps, stack(1), stack(2), stack(3))

    def clear(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        for rows in self._rows.values():
            rows.clear()
        self._calls = dict.fromkeys(self.names, 0)

    def remove(self) -> None:
        """Remove the hooks; what was recorded stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ICSProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()


def _percentiles(values: Tensor, levels: np.ndarray) -> Tensor:
    """(F, P) percentiles of each row of ``values`` (F, M), numpy's linear method."""
    ordered = values.sort(dim=1).values
    count = ordered.shape[1]
    position = torch.as_tensor(levels / 100 * (count - 1), dtype=torch.float64)
    low = position.floor().long().clamp(max=count - 1)
    high = (low + 1).clamp(max=count - 1)
    fraction = (position - low).to(ordered.device)
    low, high = low.to(ordered.device), high.to(ordered.device)
    below, above = ordered[:, low], ordered[:, high]  # (F, P)
    return below + (above - below) * fraction


@dataclass(frozen=True)
class GradientShift:
    """How much a layer's gradient changes when the layers before it take their step first.

    Attributes:
        name: the module path.
        l2: ||G - G'||, the l2 norm of the change (Santurkar et al.'s ICS).
        cosine: cos(G, G') (1: same direction). 1 if both are zero, 0 if one is.
        grad_norm: ||G||.
    """

    name: str
    l2: float
    cosine: float
    grad_norm: float

    @property
    def relative(self) -> float:
        """``l2 / grad_norm`` (0 when the gradient is zero)."""
        return self.l2 / self.grad_norm if self.grad_norm > 0 else 0.0


def santurkar_ics(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Sequence[Any] | Mapping[str, Any],
    *,
    lr: float = 0.1,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    layers: Iterable[str] | None = None,
) -> list[GradientShift]:
    r"""Santurkar et al. (2018)'s internal covariate shift of each layer, on one batch.

    For layer i with weights W_i, G = dL/dW_i at the current weights and G' = dL/dW_i after
    the layers before i (W_1..W_{i-1}) have taken their update step from their own
    gradients, layer i and those after it unchanged, on the same batch:

    .. math::

        \mathrm{ICS}_i = \lVert G_i - G'_i \rVert_2, \qquad
        \cos(G_i, G'_i) = \frac{\langle G_i, G'_i \rangle}{\lVert G_i\rVert \lVert G'_i\rVert}

    A large change means the layer's gradient is stale by the time it is applied: its
    input distribution moved under it. "Layers" are the modules that own trainable
    parameters, ordered by their first call in the forward; "before i" means called before
    layer i (batch norm's gamma and beta included). The model is restored afterwards
    (parameters, gradients, buffers such as running statistics, and the random number
    generator, so dropout draws the same masks for G and G').

    Args:
        model: the model, in the mode to measure (usually train).
        loss_fn: ``loss_fn(output, target)`` -> scalar loss.
        batch: ``(input, target)`` or a dict with ``"input"`` and ``"target"``.
        lr: the SGD step of the earlier layers, W <- W - lr * G. Default 0.1.
        optimizer_factory: instead of SGD, the update is one step of
            ``optimizer_factory(params)`` (a fresh optimizer) over the earlier layers'
            parameters, e.g. ``lambda p: torch.optim.Adam(p, lr=1e-3)``.
        layers: module paths to measure; default every Conv, ConvTranspose and Linear.

    Returns:
        One :class:`GradientShift` per measured layer, in forward order. The first layer has
        nothing before it: l2 = 0, cosine = 1.

    Raises:
        ConfigError: lr < 0, an unknown layer name or one without trainable parameters
            used in the forward, or a batch that is not (input, target).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        ... )
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> shifts = santurkar_ics(model, torch.nn.functional.mse_loss, batch, lr=0.5)
        >>> [(s.name, s.l2 == 0.0) for s in shifts]
        [('0', True), ('2', False)]
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ConfigError(f"santurkar_ics: expected lr >= 0, got {lr!r}")
    inputs, target = _split_batch(batch)
    names = {module: name for name, module in model.named_modules()}
    owners = [
        module for module in names if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    order: list[nn.Module] = []

    def note(module: nn.Module, args: tuple[Any, ...]) -> None:
        if module not in order:
            order.append(module)

    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    saved_buffers = save_buffers(model)
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        rng_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def gradients(params: list[nn.Parameter]) -> list[Tensor]:
            restore_buffers(model, saved_buffers)
            torch.set_rng_state(rng_state)
            for device, state in zip(devices, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, device)
            loss = loss_fn(model(inputs), target)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return [
                torch.zeros_like(p) if g is None else g.detach()
                for p, g in zip(params, grads, strict=True)
            ]

        handles = [module.register_forward_pre_hook(note) for module in owners]
        try:
            params_of: dict[nn.Module, list[nn.Parameter]] = {}
            seen: set[int] = set()
            # every trainable parameter once, attributed to the first module that owns it
            for module in owners:
                own = [
                    p
                    for p in module.parameters(recurse=False)
                    if p.requires_grad and id(p) not in seen
                ]
                seen.update(id(p) for p in own)
                params_of[module] = own
            everything = [p for module in owners for p in params_of[module]]
            first = gradients(everything)
        finally:
            for handle in handles:
                handle.remove()
        gradient = {id(p): g for p, g in zip(everything, first, strict=True)}

        measured = _measured_layers(model, layers, order, names)
        results = []
        try:
            for module in measured:
                position = order.index(module)
                earlier = [p for m in order[:position] for p in params_of[m]]
                own = params_of[module]
                g = torch.cat([gradient[id(p)].reshape(-1) for p in own]).to(torch.float64)
                if not earlier:
                    g_new = g
                else:
                    backup = [p.detach().clone() for p in earlier]
                    _step(earlier, gradient, lr, optimizer_factory)
                    try:
                        g_new = torch.cat([x.reshape(-1) for x in gradients(own)])
                        g_new = g_new.to(torch.float64)
                    finally:
                        with torch.no_grad():
                            for p, value in zip(earlier, backup, strict=True):
                                p.copy_(value)
                results.append(_shift(names[module], g, g_new))
        finally:
            restore_buffers(model, saved_buffers)
    return results


def _split_batch(batch: Sequence[Any] | Mapping[str, Any]) -> tuple[Any, Any]:
    if isinstance(batch, Mapping) and "input" in batch and "target" in batch:
        return batch["input"], batch["target"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"santurkar_ics: expected batch to be (input, target) or a dict with 'input' and "
        f"'target', got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _measured_layers(
    model: nn.Module,
    layers: Iterable[str] | None,
    order: list[nn.Module],
    names: dict[nn.Module, str],
) -> list[nn.Module]:
    if layers is None:
        kinds = (nn.modules.conv._ConvNd, nn.Linear)
        return [module for module in order if isinstance(module, kinds)]
    modules = dict(model.named_modules())
    chosen = []
    for name in layers:
        module = modules.get(name)
        if module is None or module not in order:
            why = (
                "no such module"
                if module is None
                else "it owns no trainable parameter used in the forward"
            )
            raise ConfigError(f"santurkar_ics: cannot measure layer {name!r}: {why}")
        chosen.append(module)
    return sorted(dict.fromkeys(chosen), key=order.index)


def _step(
    params: list[nn.Parameter],
    gradient: dict[int, Tensor],
    lr: float,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
) -> None:
    """One update of ``params`` from their gradients: SGD with ``lr``, or the optimizer's."""
    if optimizer_factory is None:
        with torch.no_grad():
            for p in params:
                p.sub_(gradient[id(p)], alpha=lr)
        return
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = gradient[id(p)].clone()
        optimizer_factory(params).step()
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad


def _shift(name: str, g: Tensor, g_new: Tensor) -> GradientShift:
    norm, norm_new = float(g.norm()), float(g_new.norm())
    if norm == 0 and norm_new == 0:
        cosine = 1.0
    elif norm == 0 or norm_new == 0:
        cosine = 0.0
    else:
        cosine = float(torch.dot(g, g_new)) / (norm * norm_new)
        cosine = max(-1.0, min(1.0, cosine))
    l2 = float((g - g_new).norm())
    return GradientShift(name, l2, cosine if math.isfinite(cosine) else math.nan, norm)
