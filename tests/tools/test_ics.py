"""ICSProbe against numpy, and santurkar_ics against its definition."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnkit
from bnkit.errors import ConfigError, ShapeError
from bnkit.tools import ICSProbe, santurkar_ics
from tests.tools.models import resnet


def _train(model: nn.Module, inputs: list[Tensor], lr: float = 0.1) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for x in inputs:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_probe_percentiles_match_numpy_for_features() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), bnkit.BatchNorm1d(10), nn.Sigmoid()).double()
    inputs = [torch.randn(33, 4, dtype=torch.float64) for _ in range(6)]
    seen = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().numpy().copy()))
    with ICSProbe(model, features=4) as probe:
        _train(model, inputs)
    record = probe.records["1"]
    assert record.features.tolist() == [0, 3, 6, 9]
    assert record.levels.tolist() == [15.0, 50.0, 85.0]
    assert record.steps.tolist() == list(range(6))
    assert record.mean.shape == record.std.shape == (6, 4)
    assert record.percentiles.shape == (6, 4, 3)
    values = np.stack(seen)[:, :, record.features]  # (T, N, F)
    np.testing.assert_allclose(record.mean, values.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(record.std, values.std(axis=1), rtol=1e-12)
    expected = np.percentile(values, [15, 50, 85], axis=1).transpose(1, 2, 0)  # (T, F, P)
    np.testing.assert_allclose(record.percentiles, expected, rtol=1e-12, atol=1e-14)


def test_probe_on_conv_inputs_pools_batch_and_space() -> None:
    model = resnet().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        stem = model.stem(x).numpy()  # (N, C, H, W), the input of stem_bn
    with ICSProbe(model, ["stem_bn"], features=[1, 5], percentiles=[0, 37.5, 100]) as probe:
        model(x)
    record = probe["stem_bn"]
    values = stem[:, [1, 5]].transpose(1, 0, 2, 3).reshape(2, -1)  # (F, N*H*W)
    expected = np.percentile(values, [0, 37.5, 100], axis=1).T
    np.testing.assert_allclose(record.percentiles[0], expected, rtol=1e-12)
    np.testing.assert_allclose(record.std[0], values.std(axis=1), rtol=1e-12)


def test_probe_defaults_follow_every_batch_norm_input() -> None:
    model = resnet()
    probe = ICSProbe(model)
    model(torch.randn(4, 3, 8, 8))
    probe.remove()
    model(torch.randn(4, 3, 8, 8))
    records = probe.records
    assert list(records) == [n for n, m in model.named_modules() if "bn" in n or n.endswith(".1")]
    assert all(r.steps.tolist() == [0] for r in records.values())
    assert records["head_bn"].features.tolist() == [0, 8, 15]


def test_probe_options() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
    probe = ICSProbe(model, ["0"], features=None, where="output", every=2)
    for _ in range(5):
        model(torch.randn(8, 3))
    model.eval()(torch.randn(8, 3))  # eval calls are not training steps
    record = probe["0"]
    assert record.steps.tolist() == [0, 2, 4]
    assert record.features.tolist() == [0, 1, 2, 3, 4]
    probe.clear()
    assert probe["0"].steps.size == 0
    assert probe["0"].percentiles.shape == (0, 5, 3)
    everything = ICSProbe(model, ["1"], features=2, train_only=False)
    model(torch.randn(8, 3))
    assert everything["1"].steps.tolist() == [0]


def test_probe_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
    with pytest.raises(ConfigError, match="no module named 'fc'"):
        ICSProbe(model, ["fc"])
    with pytest.raises(ConfigError, match="no batch norm layer"):
        ICSProbe(nn.Linear(2, 2))
    for features in (0, [], [-1], True, "all"):
        with pytest.raises(ConfigError, match="features"):
            ICSProbe(model, features=features)
    with pytest.raises(ConfigError, match="percentiles"):
        ICSProbe(model, percentiles=[101])
    with pytest.raises(ConfigError, match="where='middle'; expected one of 'input', 'output'"):
        ICSProbe(model, where="middle")
    with pytest.raises(ConfigError, match="every"):
        ICSProbe(model, every=0)
    probe = ICSProbe(model, features=[7])
    with pytest.raises(ShapeError, match=r"feature 7 asked of '1', whose input of shape \(4, 5\)"):
        model(torch.randn(4, 3))
    probe.remove()


# --- Santurkar et al.'s measure -----------------------------------------------------------


def _batch(n: int = 16) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return x, torch.randn(n, 2, generator=generator, dtype=torch.float64)


def _deep(bn: bool = False, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = 4
    for _ in range(3):
        layers += [nn.Linear(width, 6)]
        layers += [nn.BatchNorm1d(6)] if bn else []
        layers += [nn.Tanh(), nn.Dropout(dropout)]
        width = 6
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers).double()


def test_one_layer_has_no_shift() -> None:
    model = nn.Linear(4, 2).double()
    (shift,) = santurkar_ics(model, F.mse_loss, _batch(), lr=1.0)
    assert (shift.name, shift.l2, shift.cosine, shift.relative) == ("", 0.0, 1.0, 0.0)
    assert shift.grad_norm > 0


@pytest.mark.parametrize("bn", [False, True])
def test_zero_learning_rate_has_no_shift(bn: bool) -> None:
    shifts = santurkar_ics(_deep(bn, dropout=0.3).train(), F.mse_loss, _batch(), lr=0.0)
    assert [s.name for s in shifts] == [
        "0",
        "4" if bn else "3",
        "8" if bn else "6",
        "12" if bn else "9",
    ]
    for shift in shifts:
        assert shift.l2 == pytest.approx(0.0, abs=1e-14)
        assert shift.cosine == pytest.approx(1.0, abs=1e-12)


def test_shift_matches_the_definition_by_hand() -> None:
    # y = W2 tanh(W1 x + b1) + b2: G' of layer 2 after W1, b1 take their SGD step
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, t = _batch()
    lr = 0.7

    def grads(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, ...]:
        params = [p.detach().clone().requires_grad_() for p in (w1, b1, w2, b2)]
        loss = F.mse_loss(
            F.linear(torch.tanh(F.linear(x, params[0], params[1])), params[2], params[3]), t
        )
        return torch.autograd.grad(loss, params)

    w1, b1, w2, b2 = model[0].weight, model[0].bias, model[2].weight, model[2].bias
    g = grads(w1, b1, w2, b2)
    g_new = grads(w1 - lr * g[0], b1 - lr * g[1], w2, b2)
    before = torch.cat([g[2].flatten(), g[3].flatten()])
    after = torch.cat([g_new[2].flatten(), g_new[3].flatten()])

    first, second = santurkar_ics(model, F.mse_loss, (x, t), lr=lr)
    assert first.l2 == 0.0
    assert second.l2 == pytest.approx(float((before - after).norm()), rel=1e-10)
    assert second.cosine == pytest.approx(
        float(F.cosine_similarity(before, after, dim=0)), rel=1e-10
    )
    assert second.grad_norm == pytest.approx(float(before.norm()), rel=1e-12)
    assert second.l2 > 0
    assert second.cosine < 1


@pytest.mark.slow
def test_optimizer_factory_sgd_equals_lr() -> None:
    model = _deep(bn=True).train()
    plain = santurkar_ics(model, F.mse_loss, _batch(), lr=0.2)
    factory = santurkar_ics(
        model,
        F.mse_loss,
        {"input": _batch()[0], "target": _batch()[1]},
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.2),
    )
    for a, b in zip(plain, factory, strict=True):
        assert a.l2 == pytest.approx(b.l2, rel=1e-9, abs=1e-15)
    adam = santurkar_ics(
        model, F.mse_loss, _batch(), optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    assert adam[1].l2 > 0


def test_the_model_is_left_as_it_was() -> None:
    model = _deep(bn=True, dropout=0.2).train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    santurkar_ics(model, F.mse_loss, _batch(), lr=0.5, layers=["4", "0"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # weights and running statistics
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[4].weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


@pytest.mark.slow
def test_chosen_layers_and_errors() -> None:
    model = _deep(bn=True)
    shifts = santurkar_ics(model, F.mse_loss, _batch(), layers=["4", "1"])
    assert [s.name for s in shifts] == ["1", "4"]  # forward order
    assert shifts[0].l2 > 0  # the batch norm's gamma/beta: Linear 0 moved before it
    with pytest.raises(ConfigError, match="cannot measure layer '2': it owns no trainable"):
        santurkar_ics(model, F.mse_loss, _batch(), layers=["2"])
    with pytest.raises(ConfigError, match="cannot measure layer 'x': no such module"):
        santurkar_ics(model, F.mse_loss, _batch(), layers=["x"])
    with pytest.raises(ConfigError, match="lr >= 0"):
        santurkar_ics(model, F.mse_loss, _batch(), lr=-1.0)
    with pytest.raises(ConfigError, match="expected batch to be"):
        santurkar_ics(model, F.mse_loss, (_batch()[0],))
