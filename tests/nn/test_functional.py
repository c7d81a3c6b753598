"""bnkit.functional.batch_norm against torch.nn.functional.batch_norm, argument by argument."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from bnkit.errors import ConfigError
from bnkit.functional import batch_norm
from tests.nn.util import assert_matches

F64 = torch.float64


def test_positional_signature_matches_torch() -> None:
    ours = list(inspect.signature(batch_norm).parameters.values())
    theirs = list(inspect.signature(F.batch_norm).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    assert [p.default for p in ours[: len(theirs)]] == [p.default for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])


@pytest.mark.parametrize(("training", "with_stats"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_matches_torch_functional(training: bool, with_stats: bool, affine: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = 2 + torch.randn(6, 3, 4, generator=g, dtype=F64)
    weight = torch.rand(3, generator=g, dtype=F64) + 0.5 if affine != "none" else None
    bias = torch.randn(3, generator=g, dtype=F64) if affine == "both" else None
    stats = [torch.rand(3, generator=g, dtype=F64), torch.rand(3, generator=g, dtype=F64) + 0.5]
    ours_stats = [s.clone() for s in stats] if with_stats else [None, None]
    theirs_stats = [s.clone() for s in stats] if with_stats else [None, None]
    y_ours = batch_norm(x, *ours_stats, weight, bias, training, 0.3, 1e-3)
    y_theirs = F.batch_norm(x, *theirs_stats, weight, bias, training, 0.3, 1e-3)
    assert_matches(y_ours, y_theirs)
    if with_stats:
        for a, b in zip(ours_stats, theirs_stats, strict=True):
            assert a is not None
            assert b is not None
            assert_matches(a, b)


def test_momentum_factor_as_torch_module_computes_it() -> None:
    """torch's module passes exponential_average_factor = 1/num_batches_tracked for
    momentum=None; passing that factor, or passing momentum=None with the counter, gives
    torch's cumulative average."""
    g = torch.Generator().manual_seed(1)
    module = torch.nn.BatchNorm1d(3, momentum=None, dtype=F64)
    by_factor = [torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)]
    by_counter = [torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)]
    counter = torch.tensor(0)
    for step in range(1, 5):
        x = torch.randn(5, 3, generator=g, dtype=F64) * step
        module(x)
        batch_norm(x, *by_factor, training=True, momentum=1.0 / float(step))
        batch_norm(x, *by_counter, training=True, momentum=None, num_batches_tracked=counter)
        assert int(counter) == step
        for stats in (by_factor, by_counter):
            assert_matches(stats[0], module.running_mean)
            assert_matches(stats[1], module.running_var)


@pytest.mark.parametrize("which", ["mean", "var"])
def test_one_running_statistic_alone_is_rejected_like_torch(which: str) -> None:
    x = torch.randn(5, 3)
    stats = (torch.zeros(3), None) if which == "mean" else (None, torch.ones(3))
    with pytest.raises(ValueError, match="must either both be None"):
        F.batch_norm(x, *stats, training=True)
    with pytest.raises(ConfigError) as info:
        batch_norm(x, *stats, training=True)
    assert str(info.value).startswith(
        "batch_norm: expected running_mean and running_var both given or both None"
    )
    assert "a tensor of shape (3,)" in str(info.value)


def test_eval_mode_eps_zero_is_allowed() -> None:
    x = torch.randn(4, 3, dtype=F64)
    mean, var = torch.zeros(3, dtype=F64), torch.full((3,), 2.0, dtype=F64)
    assert_matches(batch_norm(x, mean, var, eps=0.0), F.batch_norm(x, mean, var, eps=0.0))


def test_vmap_and_jacrev() -> None:
    """torch.func transforms: per-sample batch norm with vmap, and a full Jacobian."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 2, 2, generator=g, dtype=F64)
    mean, var = torch.rand(4, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64) + 1

    for fn in (
        lambda v: batch_norm(v, None, None, training=True),
        lambda v: batch_norm(v, mean, var, training=False),
    ):
        batched = torch.func.vmap(fn)(x)
        assert_matches(batched, torch.stack([fn(sample) for sample in x]))

    def ours(v: torch.Tensor) -> torch.Tensor:
        return batch_norm(v, None, None, training=True)

    def theirs(v: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(v, None, None, training=True)

    assert_matches(torch.func.jacrev(ours)(x[0]), torch.func.jacrev(theirs)(x[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_training_saves_no_more_for_backward_than_torch(dtype: torch.dtype) -> None:
    """The analytic backward keeps only the input (plus per-channel values) alive, like
    torch's kernel, not the intermediates autograd would save for composed operations."""

    def saved_elements(fn: object) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(8, 16, 8, 8).to(dtype).requires_grad_(True)
        weight = torch.ones(16, requires_grad=True)
        bias = torch.zeros(16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, None, None, weight, bias, True)  # type: ignore[operator]
        return total

    assert saved_elements(batch_norm) <= saved_elements(F.batch_norm) + 16 * 64
