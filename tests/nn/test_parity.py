"""bnkit.BatchNorm*d against torch.nn.BatchNorm*d over the shared case table.

Several training steps (so running statistics and num_batches_tracked are compared after
each), then eval mode; forward outputs and the gradients of input, weight and bias.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.cases import CASE_IDS, CASES, Case
from tests.nn.util import (
    assert_matches,
    case_input,
    clone_input,
    condition,
    input_grad_scale,
    twin_layers,
)

LAYER_OPTIONS: list[dict[str, Any]] = [{}, {"track_running_stats": False}, {"bias": False}]
OPTION_IDS = ["default", "no-running-stats", "no-bias"]


def _step(theirs: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    cond = condition(x)
    x_theirs, x_ours = clone_input(x), clone_input(x)
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    assert_matches(y_ours, y_theirs, cond=cond, what="output")
    dy = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    y_theirs.backward(dy)
    y_ours.backward(dy)
    assert x_theirs.grad is not None
    assert x_ours.grad is not None
    scale = input_grad_scale(x, dy, theirs.weight, theirs.eps)
    assert_matches(x_ours.grad, x_theirs.grad, cond=cond, scale=scale, what="input grad")
    for name in ("weight", "bias"):
        p_theirs, p_ours = getattr(theirs, name), getattr(ours, name)
        assert (p_theirs is None) == (p_ours is None), name
        if p_theirs is not None:
            assert_matches(p_ours.grad, p_theirs.grad, cond=cond, what=f"{name} grad")
            p_theirs.grad = p_ours.grad = None
    for name in ("running_mean", "running_var"):
        b_theirs, b_ours = getattr(theirs, name), getattr(ours, name)
        assert (b_theirs is None) == (b_ours is None), name
        if b_theirs is not None:
            assert_matches(b_ours, b_theirs, cond=cond, what=name)
    if theirs.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.slow
def test_train_then_eval_matches_torch(
    case: Case, options: dict[str, Any], dtype: torch.dtype
) -> None:
    kwargs = {"eps": case.eps, "momentum": case.momentum, "affine": case.affine, **options}
    theirs, ours = twin_layers(
        case.rank, case.channels, dtype, torch_kwargs=kwargs, params=case.params()
    )
    for step in range(3):
        _step(theirs, ours, case_input(case, step, dtype), seed=100 + step)
    theirs.eval()
    ours.eval()
    _step(theirs, ours, case_input(case, 3, dtype), seed=200)


@pytest.mark.parametrize("case", [c for c in CASES if c.rank in (4, 5)], ids=lambda c: c.id)
def test_channels_last_matches_torch(case: Case) -> None:
    fmt = torch.channels_last if case.rank == 4 else torch.channels_last_3d
    theirs, ours = twin_layers(case.rank, case.channels, torch.float64, params=case.params())
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        x = case_input(case, 0, torch.float64).contiguous(memory_format=fmt)
        x_theirs, x_ours = clone_input(x), clone_input(x)
        y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
        assert y_ours.stride() == y_theirs.stride()
        assert y_ours.is_contiguous(memory_format=fmt)
        assert_matches(y_ours, y_theirs)
        dy = torch.randn_like(y_theirs)
        y_theirs.backward(dy)
        y_ours.backward(dy)
        assert_matches(x_ours.grad, x_theirs.grad)
        assert x_ours.grad.is_contiguous(memory_format=fmt) == x_theirs.grad.is_contiguous(
            memory_format=fmt
        )


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: torch.randn(5, 4, 3, 6, dtype=torch.float64).permute(2, 1, 0, 3),  # odd strides
        lambda: torch.randn(3, 5, 4, dtype=torch.float64).transpose(1, 2),  # (N, C, L), C last
        lambda: torch.randn(4, 5, dtype=torch.float64).t(),  # (N, C) transposed
        lambda: torch.randn(3, 4, 1, 1, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last
        ),  # both contiguous and channels-last
    ],
    ids=["permuted-4d", "transposed-3d", "transposed-2d", "1x1-channels-last"],
)
def test_output_layout_matches_torch(make_input: Any) -> None:
    x = make_input()
    theirs, ours = twin_layers(x.dim(), x.shape[1], torch.float64)
    y_theirs, y_ours = theirs(x), ours(x)
    assert y_ours.stride() == y_theirs.stride()
    assert_matches(y_ours, y_theirs)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (4, 3, 0, 4), (0, 3, 2, 2, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_matches_torch(shape: tuple[int, ...], momentum: float | None) -> None:
    """torch 2.x: empty output, running statistics untouched, the batch still counted,
    zero gradients for weight and bias."""
    theirs, ours = twin_layers(len(shape), 3, torch.float64, torch_kwargs={"momentum": momentum})
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        x = torch.randn(shape, dtype=torch.float64)
        x_theirs, x_ours = clone_input(x), clone_input(x)
        y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
        assert y_ours.shape == y_theirs.shape == x.shape
        y_theirs.sum().backward()
        y_ours.sum().backward()
        assert torch.equal(ours.weight.grad, theirs.weight.grad)
        assert torch.equal(ours.bias.grad, theirs.bias.grad)
        assert torch.equal(ours.weight.grad, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(ours.running_mean, theirs.running_mean)
        assert torch.equal(ours.running_var, theirs.running_var)
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
    assert int(ours.num_batches_tracked) == 1
    # A normal batch after the empty one: the cumulative average counts the empty batch
    # too (torch's behaviour), so the next factor is 1/2.
    for layer in (theirs, ours):
        layer.train()
    x = torch.randn(6, *shape[1:2], *[max(d, 2) for d in shape[2:]], dtype=torch.float64)
    theirs(x)
    ours(x)
    assert_matches(ours.running_mean, theirs.running_mean)
    assert_matches(ours.running_var, theirs.running_var)


def test_isinstance_relations() -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    import bnkit.nn as bnn

    layer = bnn.BatchNorm2d(4)
    assert isinstance(layer, _BatchNorm)
    assert isinstance(layer, bnn.BatchNormNd)
    assert not isinstance(layer, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("rank", [2, 4, 5])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None, "eps": 1e-3},
        {"affine": False, "track_running_stats": False},
        {"bias": False},
    ],
)
def test_repr_matches_torch(rank: int, kwargs: dict[str, Any]) -> None:
    theirs, ours = twin_layers(rank, 7, torch.float32, torch_kwargs=kwargs)
    assert repr(ours) == repr(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours._version == theirs._version == 2
