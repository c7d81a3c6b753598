"""Activations fused with batch norm, and how the backward pass recovers what it needs.

A fused batch norm + activation layer computes z = gamma * x_hat + beta, then y = act(z).
Its backward pass needs x_hat everywhere (the path through the batch variance reaches
every input) and act'(z). Saving the input x for them costs a full tensor on top of the
output y, which the next layer saves anyway. The memory-efficient form (In-Place ABN,
Rota Bulo et al. 2018) saves y alone and recovers z = act^-1(y), then
x_hat = (z - beta) / gamma:

- ``identity``, ``leaky_relu`` (slope a > 0) and ``elu`` are invertible, so y suffices:
  a conv-BN-activation stack keeps one tensor per block instead of two.
- ``relu`` is not: where y = 0 the value of z (hence x_hat, which the backward still
  needs there) is lost. The fused relu saves the pre-activation z instead of the pair
  (x, y), half of what torch's BatchNorm + ReLU keep for one layer; in a stack, whose
  next layer keeps y, that is no saving. Use ``leaky_relu`` for the stack-wide saving.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from bnkit.errors import ConfigError, format_choices

__all__ = [
    "ACTIVATIONS",
    "INVERSION_LIMIT",
    "activate",
    "check_activation",
    "default_param",
    "invertible",
    "preactivation_and_slope",
    "saves_output",
    "slope",
]

#: The activations batch norm can be fused with.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu")

#: A channel whose |beta| is this many times its |gamma| (gamma = 0 included) makes
#: x_hat = (z - beta) / gamma lose more than 3 digits: the fused layer keeps its input.
INVERSION_LIMIT = 1e3


def default_param(name: str | None) -> float | None:
    """The activation's parameter when none is given: leaky_relu's slope 0.01, elu's 1."""
    return {"leaky_relu": 0.01, "elu": 1.0}.get(name or "")


def check_activation(where: str, name: str | None, param: float | None) -> float | None:
    """Validate (activation, activation_param); returns the parameter to use."""
    if name is None:
        if param is not None:
            raise ConfigError(f"{where}: activation_param={param!r} needs an activation")
        return None
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConfigError(
            f"{where}: unknown activation={name!r}; expected None or one of "
            f"{format_choices(ACTIVATIONS)}"
        )
    if name in ("identity", "relu"):
        if param is not None:
            raise ConfigError(f"{where}: activation {name!r} takes no activation_param")
        return None
    value = default_param(name) if param is None else param
    assert value is not None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        what = "negative slope" if name == "leaky_relu" else "alpha"
        raise ConfigError(
            f"{where}: expected activation_param (the {what} of {name}) > 0 and finite, "
            f"got {value!r}; a positive value keeps the activation invertible"
        )
    return float(value)


def activate(z: Tensor, name: str, param: float | None, inplace: bool = False) -> Tensor:
    """y = act(z); with ``inplace``, written over z (a tensor nothing else needs)."""
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu_(z) if inplace else torch.relu(z)
    assert param is not None
    if name == "leaky_relu":
        return F.leaky_relu(z, param, inplace=inplace)
    # torch's elu: its gradient is finite for any z (a torch.where of both branches would
    # back-propagate 0 * inf where expm1 overflows in the branch not taken)
    return F.elu(z, param, inplace=inplace)


def saves_output(name: str) -> bool:
    """Whether the memory-efficient backward can work from the output y (invertible)."""
    return name != "relu"


def invertible(
    output: Tensor, weight: Tensor | None, bias: Tensor | None, name: str, param: float | None
) -> bool:
    """Whether the backward pass can recover x_hat from the saved ``output`` to working
    precision; where it cannot, the fused layer keeps its input for that call (exact).

    Two things break the inversion x_hat = (act^-1(y) - beta) / gamma:

    - a channel with gamma = 0, or |beta| >= ``INVERSION_LIMIT`` * |gamma|: the division
      loses more than 3 digits;
    - an elu output within sqrt(eps) (relative, in the output's dtype) of its floor
      -alpha: z = log1p(y / alpha) keeps less than half its digits there, and is -inf
      where y rounds to -alpha exactly (z below about -17 in float32, -5.5 in bfloat16),
      which would make the channel's gradients NaN.

    One host synchronization when a check runs on an accelerator. While torch.compile or
    torch.export traces the call the values are unknown, and inside a ``torch.func``
    transform (vmap) no value may decide control flow, so the answer is False: the call
    keeps the input (exact; the memory saving is eager mode's).

    The express path's node (``fast.cpp``) applies this rule in C++ to the CPU tensors it
    takes; tests/kernels/test_express.py holds both to the same answers.
    """
    if torch.compiler.is_compiling() or is_fake(output):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if weight is not None:
        limit = INVERSION_LIMIT * weight.detach().abs()
        magnitude = torch.zeros_like(limit) if bias is None else bias.detach().abs()
        if bool((limit <= magnitude).any()):
            return False
    if name == "elu":
        assert param is not None
        floor = -param * (1.0 - math.sqrt(torch.finfo(output.dtype).eps))
        return not bool((output.detach() <= floor).any())
    return True


def slope(saved: Tensor, name: str, param: float | None) -> Tensor:
    """act'(z) from what the forward pass saved: y, or z itself for relu (a new tensor of
    saved's shape; elu's is y + alpha where y <= 0, exact from y)."""
    one = saved.new_ones(())
    if name == "identity":
        return one.expand_as(saved).clone()
    positive = saved > 0
    if name == "relu":
        return positive.to(saved.dtype)
    assert param is not None
    if name == "leaky_relu":
        return torch.where(positive, one, one * param)
    return torch.where(positive, one, saved + param)  # elu


def preactivation_and_slope(
    saved: Tensor, name: str, param: float | None, lean: bool = False
) -> tuple[Tensor, Tensor]:
    """(z, act'(z)) from what the forward pass saved: y, or z itself for relu.

    leaky_relu: z = y / a where y < 0 (y divided by its slope). elu: z = log1p(y / alpha)
    where y <= 0, and act'(z) = alpha * exp(z) = y + alpha there (exact from y, even where
    the inverse loses precision: y close to -alpha, i.e. z below about -15). With
    ``lean`` (no autograd, no ``torch.func`` transform) elu's z is formed in one new
    tensor rather than three.
    """
    d = slope(saved, name, param)
    if name in ("identity", "relu"):
        return saved, d
    if name == "leaky_relu":
        return saved / d, d
    assert param is not None
    if lean:  # elu
        z = (saved / param).log1p_()
        return torch.where(saved > 0, saved, z, out=z), d
    return torch.where(saved > 0, saved, torch.log1p(saved / param)), d


def refuse_double_backward() -> None:
    """Raise the error of a double backward (a backward pass under autograd) through a
    fused activation in its memory-efficient form, which keeps the output and not the
    input the backward pass would differentiate the forward pass from.

    Raises:
        RuntimeError: always.
    """
    raise RuntimeError(
        "batch_norm: double backward through a fused activation needs the layer's input, "
        "which memory_efficient=True does not keep; pass memory_efficient=False (or use "
        "activation=None and a separate activation module)"
    )
