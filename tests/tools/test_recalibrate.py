"""recalibrate: statistics against a by-hand computation, and nothing else changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import bnkit
from bnkit.errors import ConfigError
from bnkit.tools import recalibrate
from tests.tools.models import randomize, resnet

EPS = 1e-5
SIZES = (7, 16, 3, 10)  # unequal batches: the population estimator weighs them by count


def _normalize(h: Tensor, bn: nn.Module) -> Tensor:
    """Training-mode batch norm by hand (biased batch variance), over all but dim 1."""
    dims = [0, *range(2, h.dim())]
    view = [1, -1] + [1] * (h.dim() - 2)
    mean = h.mean(dims, keepdim=True)
    var = h.var(dims, unbiased=False, keepdim=True)
    return (h - mean) / torch.sqrt(var + EPS) * bn.weight.view(view) + bn.bias.view(view)


def _mlp(bn: type[nn.Module] = nn.BatchNorm1d, **kwargs: object) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6),
        bn(6, **kwargs),
        nn.ReLU(),
        nn.Dropout(0.5),  # off while recalibrating: the statistics are inference's
        nn.Linear(6, 4),
        bn(4, **kwargs),
    )
    return randomize(model).double()


def _mlp_inputs(model: nn.Sequential, batches: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Each batch's input to the two batch norm layers, computed by hand."""
    first, second = [], []
    with torch.no_grad():
        for x in batches:
            h1 = model[0](x)
            h2 = model[4](torch.relu(_normalize(h1, model[1])))
            first.append(h1)
            second.append(h2)
    return first, second


def _population(inputs: list[Tensor], *, biased: bool = False) -> tuple[Tensor, Tensor]:
    values = torch.cat([h.transpose(0, 1).reshape(h.shape[1], -1) for h in inputs], dim=1)
    return values.mean(1), values.var(1, unbiased=not biased)


def _paper(inputs: list[Tensor], *, biased: bool = False) -> tuple[Tensor, Tensor]:
    means, variances = [], []
    for h in inputs:
        values = h.transpose(0, 1).reshape(h.shape[1], -1)
        means.append(values.mean(1))
        variances.append(values.var(1, unbiased=not biased))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def _batches(sizes: tuple[int, ...] = SIZES, features: int = 5, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        3.0 + 2.0 * torch.randn(n, features, generator=generator, dtype=torch.float64)
        for n in sizes
    ]


@pytest.mark.parametrize("estimator", ["population", "paper"])
@pytest.mark.parametrize("layer", [nn.BatchNorm1d, bnkit.BatchNorm1d], ids=["torch", "bnkit"])
def test_mlp_statistics_match_a_by_hand_computation(estimator: str, layer: type[nn.Module]) -> None:
    model = _mlp(layer).train()
    batches = _batches()
    expected = _mlp_inputs(model, batches)
    recalibrate(model, batches, estimator=estimator)
    combine = _population if estimator == "population" else _paper
    for bn, inputs in zip((model[1], model[5]), expected, strict=True):
        mean, var = combine(inputs)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-10)
        assert int(bn.num_batches_tracked) == 7  # a step count: never moved back (was 7)


@pytest.mark.parametrize("estimator", ["population", "paper"])
def test_conv_statistics_match_a_by_hand_computation(estimator: str) -> None:
    torch.manual_seed(0)
    model = randomize(
        nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        )
    ).double()
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 2, 5, 6, generator=generator, dtype=torch.float64) for n in SIZES]
    first, second = [], []
    with torch.no_grad():
        for x in batches:
            h1 = model[0](x)
            first.append(h1)
            second.append(model[3](torch.relu(_normalize(h1, model[1]))))
    recalibrate(model.eval(), [(x, "label") for x in batches], estimator=estimator)
    combine = _population if estimator == "population" else _paper
    for bn, inputs in ((model[1], first), (model[4], second)):
        mean, var = combine(inputs)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", ["population", "paper"])
def test_biased_running_variance_layers_get_the_biased_variance(estimator: str) -> None:
    model = _mlp(bnkit.BatchNorm1d, running_var_estimator="biased")
    batches = _batches()
    expected = _mlp_inputs(model, batches)
    recalibrate(model, batches, estimator=estimator)
    combine = _population if estimator == "population" else _paper
    for bn, inputs in zip((model[1], model[5]), expected, strict=True):
        mean, var = combine(inputs, biased=True)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-10)


def test_everything_else_is_restored() -> None:
    model = _mlp(bnkit.BatchNorm1d, momentum=0.3).train()
    model[5].freeze()
    model[3].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    recalibrate(model, _batches())
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, p in model.named_parameters():
        assert p is objects[name]
        assert torch.equal(p, parameters[name]), name
    for name, b in model.named_buffers():
        assert b is buffers[name]
    assert model[1].momentum == model[5].momentum == 0.3
    assert model[5].frozen
    assert not model[1].frozen


def test_state_is_restored_when_a_batch_fails() -> None:
    model = _mlp().train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        recalibrate(model, [_batches()[0], torch.randn(4, 7, dtype=torch.float64)])
    assert model.training
    assert model[3].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_batch_formats_and_max_batches() -> None:
    batches = _batches()
    reference = recalibrate(_mlp(), batches[:2])
    for wrap in (
        lambda x: x,
        lambda x: (x, torch.zeros(len(x))),
        lambda x: [x],
        lambda x: {"input": x, "target": None},
    ):
        model = recalibrate(_mlp(), (wrap(x) for x in batches), max_batches=2)
        for a, b in zip(model.buffers(), reference.buffers(), strict=True):
            assert torch.equal(a, b)


def test_works_under_no_grad_and_moves_nothing_but_statistics() -> None:
    model = _mlp()
    model[1].num_batches_tracked.zero_()
    with torch.no_grad():
        recalibrate(model, _batches())
    assert int(model[1].num_batches_tracked) == len(SIZES)  # at least the batches seen


def test_cumulative_momentum_continues_from_the_recalibrated_batches() -> None:
    model = _mlp(momentum=None)
    batches = _batches()
    recalibrate(model, batches[:3])
    # one more training step with momentum=None weighs the new batch 1/4, the three 3/4
    before = model[1].running_mean.clone()
    model.train()
    with torch.no_grad():
        h = model[0](batches[3])
        model(batches[3])
    torch.testing.assert_close(model[1].running_mean, 0.75 * before + 0.25 * h.mean(0))
    assert int(model[1].num_batches_tracked) == 4


def test_errors() -> None:
    model = _mlp()
    with pytest.raises(
        ConfigError, match="unknown estimator='ema'; expected one of 'population', 'paper'"
    ):
        recalibrate(model, _batches(), estimator="ema")
    with pytest.raises(ConfigError, match="max_batches"):
        recalibrate(model, _batches(), max_batches=0)
    with pytest.raises(ConfigError, match="at least one batch"):
        recalibrate(model, [])
    with pytest.raises(TypeError, match=r"batch 1 is a tuple starting with a str"):
        recalibrate(model, [_batches()[0], ("x", 1)])
    with pytest.raises(TypeError, match=r"batch 0 is a dict with keys \['x'\]"):
        recalibrate(model, [{"x": 1}])


def test_a_layer_no_batch_reaches_warns_and_keeps_its_statistics() -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.BatchNorm1d(3)
            self.aux = nn.BatchNorm1d(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    model = Branches()
    with pytest.warns(UserWarning, match=r"'aux' \(BatchNorm1d\(3\)\) saw none of the 2 batches"):
        recalibrate(model, [torch.randn(4, 3), torch.randn(4, 3)])
    assert torch.equal(model.aux.running_mean, torch.zeros(3))
    assert int(model.aux.num_batches_tracked) == 0
    assert int(model.used.num_batches_tracked) == 2


def test_resnet_recalibrates_its_first_layer_to_the_data() -> None:
    model = resnet().eval()
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 8, 8, generator=generator) + 1 for _ in range(3)]
    recalibrate(model, batches)
    with torch.no_grad():
        stem = torch.cat([model.stem(x) for x in batches])  # (N, C, H, W)
    torch.testing.assert_close(
        model.stem_bn.running_mean, stem.mean((0, 2, 3)), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        model.stem_bn.running_var, stem.transpose(0, 1).reshape(8, -1).var(1), rtol=1e-5, atol=1e-5
    )
    assert not model.training


def test_sync_and_renorm_layers() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4),
        bnkit.BatchNorm1d(4, sync=True, renorm=bnkit.Renorm()),
        bnkit.BatchNorm1d(4, sync=True),
    )
    model[1].num_batches_tracked.fill_(100)  # renorm's schedule: 100 steps done
    batches = [torch.randn(8, 3) for _ in range(3)]
    recalibrate(model, batches)
    assert model[1].sync
    assert model[2].sync
    assert int(model[1].num_batches_tracked) == 100
    assert int(model[2].num_batches_tracked) == 3
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in batches])
    torch.testing.assert_close(model[1].running_mean, h.mean(0))
