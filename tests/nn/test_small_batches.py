"""Masks, ghost batches, batch renorm and micro-batch statistics, against the reference."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bnkit
from bnkit import errors
from bnkit import reference as ref
from tests.cases import CASES, Case
from tests.nn.util import BNKIT_CLASSES

SPATIAL = [c for c in CASES if c.rank > 2 and c.shape[0] * int(np.prod(c.shape[2:])) >= 4]
BATCHES = [c for c in CASES if c.shape[0] >= 5]


def make_layer(case: Case, **extras: Any) -> bnkit.nn.BatchNormNd:
    layer = BNKIT_CLASSES[case.rank](
        case.channels,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        dtype=torch.float64,
        **extras,
    )
    gamma, beta = case.params()
    if case.affine:
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(gamma))
            layer.bias.copy_(torch.from_numpy(beta))
    return layer


def run(
    layer: torch.nn.Module, x: np.ndarray, dy: np.ndarray, **kwargs: Any
) -> dict[str, np.ndarray]:
    """Forward and backward in float64: output, input gradient and parameter gradients."""
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt, **kwargs)
    y.backward(torch.from_numpy(dy))
    assert xt.grad is not None
    out = {"y": y.detach().numpy(), "dx": xt.grad.numpy()}
    weight = getattr(layer, "weight", None)
    if weight is not None:
        out["dgamma"] = weight.grad.numpy()
        out["dbeta"] = layer.bias.grad.numpy()
    return out


def close(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float = 1e-10) -> None:
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= rtol * scale, f"{what}: error {error:.3g} > {rtol * scale:.3g}"


def check_against(
    result: dict[str, np.ndarray],
    y: np.ndarray,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray],
    case: Case,
    rtol: float,
) -> None:
    close(result["y"], y, "output", rtol)
    close(result["dx"], grads[0], "dx", rtol)
    if case.affine:
        close(result["dgamma"], grads[1], "dgamma", rtol)
        close(result["dbeta"], grads[2], "dbeta", rtol)


def tolerance(case: Case) -> float:
    """1e-10, widened for the table's badly conditioned case (values 1e5 times the spread)."""
    return 1e-10 * max(1.0, abs(case.loc) / case.scale * 1e-2)


def random_mask(case: Case, seed: int) -> np.ndarray:
    """About a third of the positions invalid; the first two always valid."""
    rng = np.random.default_rng(seed)
    mask = rng.random((case.shape[0], *case.shape[2:])) > 0.35
    mask.reshape(-1)[:2] = True  # a fresh array: reshape is a view
    return mask


# --------------------------------------------------------------------------------- masks


MASK_CASES = [c for c in CASES if c.shape[0] * int(np.prod(c.shape[2:])) >= 3]


@pytest.mark.parametrize("case", MASK_CASES, ids=[c.id for c in MASK_CASES])
def test_masked_layer_matches_the_reference(case: Case) -> None:
    layer = make_layer(case)
    gamma, beta = case.params()
    for step in range(3):
        x = case.input(seed=step)
        dy = np.random.default_rng(10 + step).normal(size=case.shape)
        mask = random_mask(case, seed=step)
        layer.zero_grad()
        result = run(layer, x, dy, mask=torch.from_numpy(mask))
        y, cache = ref.batch_norm_train(x, gamma, beta, case.eps, mask=mask)
        check_against(result, y, ref.batch_norm_backward(dy, cache), case, tolerance(case))
    # the running statistics come from the valid values only
    bn = ref.BatchNorm(case.channels, case.eps, case.momentum, case.affine)
    expected_mean, expected_var = bn.running_mean, bn.running_var
    for step in range(3):
        x, mask = case.input(seed=step), random_mask(case, seed=step)
        stats = ref.batch_stats(x, mask)
        momentum = 1.0 / (step + 1) if case.momentum is None else case.momentum
        expected_mean, expected_var = ref.update_running_stats(
            expected_mean, expected_var, stats.mean, stats.var, stats.count, momentum
        )
    close(layer.running_mean.numpy(), expected_mean, "running_mean", tolerance(case))
    close(layer.running_var.numpy(), expected_var, "running_var", tolerance(case))
    assert int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize("case", SPATIAL, ids=[c.id for c in SPATIAL])
def test_all_ones_mask_is_no_mask(case: Case) -> None:
    plain, masked = make_layer(case), make_layer(case)
    x = case.input()
    dy = np.random.default_rng(1).normal(size=case.shape)
    ones = torch.ones((case.shape[0], *case.shape[2:]), dtype=torch.bool)
    expected, actual = run(plain, x, dy), run(masked, x, dy, mask=ones)
    for name, value in expected.items():
        close(actual[name], value, name, tolerance(case))
    close(masked.running_var.numpy(), plain.running_var.numpy(), "running_var", tolerance(case))


def test_padding_never_reaches_the_statistics() -> None:
    """Padding holding NaN or huge values changes neither the statistics nor valid outputs."""
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = mask[3, 2:] = False
    garbage = x.clone()
    garbage[~mask.unsqueeze(1).expand_as(x)] = float("nan")
    a, b = bnkit.BatchNorm1d(3, dtype=torch.float64), bnkit.BatchNorm1d(3, dtype=torch.float64)
    y, y_garbage = a(x, mask=mask), b(garbage, mask=mask)
    valid = mask.unsqueeze(1).expand_as(x)
    torch.testing.assert_close(y_garbage[valid], y[valid], rtol=0, atol=1e-14)
    torch.testing.assert_close(b.running_mean, a.running_mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(b.running_var, a.running_var, rtol=0, atol=1e-15)


def test_mask_in_eval_is_the_same_affine_map() -> None:
    layer = bnkit.BatchNorm1d(3).eval()
    x = torch.randn(4, 3, 5)
    mask = torch.rand(4, 5) > 0.5
    torch.testing.assert_close(layer(x, mask=mask), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_half_precision(dtype: torch.dtype) -> None:
    x = torch.randn(6, 4, 10)
    mask = torch.rand(6, 10) > 0.3
    full, half = bnkit.BatchNorm1d(4), bnkit.BatchNorm1d(4)
    expected = full(x, mask=mask)
    y = half(x.to(dtype), mask=mask)
    assert y.dtype == dtype
    assert half.running_mean.dtype == torch.float32
    torch.testing.assert_close(
        y.float(), expected, rtol=0, atol=0.02 if dtype == torch.float16 else 0.1
    )
    torch.testing.assert_close(half.running_var, full.running_var, rtol=0.02, atol=1e-3)


def test_masked_channels_last() -> None:
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    mask = torch.rand(3, 5, 6) > 0.4
    a, b = bnkit.BatchNorm2d(4).double(), bnkit.BatchNorm2d(4).double()
    y = a(x, mask=mask)
    y_cl = b(x.to(memory_format=torch.channels_last), mask=mask)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    ("mode", "check"),
    [("identity", "input"), ("running", "population")],
)
def test_too_few_valid_values_follow_single_sample(mode: str, check: str) -> None:
    layer = bnkit.BatchNorm1d(2, single_sample=mode)
    with torch.no_grad():
        layer.running_mean.fill_(0.5)
        layer.running_var.fill_(4.0)
    x = torch.randn(3, 2, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 2] = True  # one valid value per channel
    y = layer(x, mask=mask)
    expected = x if check == "input" else (x - 0.5) / torch.sqrt(torch.tensor(4.0 + 1e-5))
    torch.testing.assert_close(y, expected)
    assert int(layer.num_batches_tracked) == 0


def test_too_few_valid_values_raise_by_default() -> None:
    layer = bnkit.BatchNorm1d(2)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(errors.SingleValueError) as raised:
        layer(torch.randn(3, 2, 4), mask=mask)
    message = str(raised.value)
    for words in (
        "BatchNorm1d(2)",
        "two valid values per channel",
        "got 1",
        "(3, 2, 4)",
        "'running'",
    ):
        assert words in message, message


@pytest.mark.parametrize(
    ("mask", "error", "words"),
    [
        (
            torch.ones(3, 5, dtype=torch.bool),
            errors.ShapeError,
            ["(N, *spatial) = (3, 4)", "got (3, 5)"],
        ),
        (torch.ones(3, 4), errors.DTypeError, ["bool mask", "torch.float32"]),
        (np.ones((3, 4), dtype=bool), errors.ShapeError, ["bool tensor", "ndarray"]),
    ],
)
def test_bad_masks_are_clear_errors(mask: Any, error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as raised:
        bnkit.BatchNorm1d(2)(torch.randn(3, 2, 4), mask=mask)
    assert isinstance(raised.value, ValueError)
    for word in ["BatchNorm1d(2)", *words]:
        assert word in str(raised.value), str(raised.value)


# ---------------------------------------------------------------------------- ghost batches


def ghost_size(case: Case) -> int:
    n = case.shape[0]
    return next(k for k in (3, 4, 2) if k < n and (n % k != 1 or case.rank > 2))


@pytest.mark.parametrize("case", BATCHES, ids=[c.id for c in BATCHES])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_ghost_batches_match_the_reference(case: Case, masked: bool) -> None:
    size = ghost_size(case)
    layer = make_layer(case, ghost_batch_size=size)
    gamma, beta = case.params()
    x = case.input()
    dy = np.random.default_rng(3).normal(size=case.shape)
    mask = None
    if masked:
        mask = random_mask(case, seed=4)
        for start in range(0, case.shape[0], size):  # two valid values per ghost batch
            flat = mask[start : start + size].reshape(-1)
            flat[:2] = True
            mask[start : start + size] = flat.reshape(mask[start : start + size].shape)
    kwargs = {} if mask is None else {"mask": torch.from_numpy(mask)}
    result = run(layer, x, dy, **kwargs)
    y, cache = ref.ghost_batch_norm_train(x, gamma, beta, size, case.eps, mask=mask)
    check_against(result, y, ref.ghost_batch_norm_backward(dy, cache), case, tolerance(case))
    # one update per call, from all the ghost batches merged
    momentum = 1.0 if case.momentum is None else case.momentum
    mean, var = ref.update_running_stats(
        np.zeros(case.channels),
        np.ones(case.channels),
        cache.stats.mean,
        cache.stats.var,
        cache.stats.count,
        momentum,
    )
    close(layer.running_mean.numpy(), mean, "running_mean", tolerance(case))
    close(layer.running_var.numpy(), var, "running_var", tolerance(case))
    assert int(layer.num_batches_tracked) == 1


@given(st.integers(0, 3), st.sampled_from([(7, 3), (5, 2, 3), (4, 2, 2, 2)]))
def test_ghost_batch_at_least_the_batch_is_plain_batch_norm(extra: int, shape: tuple) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    cls = BNKIT_CLASSES[len(shape)]
    plain, ghost = cls(shape[1]).double(), cls(shape[1], ghost_batch_size=shape[0] + extra).double()
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=0, atol=0)


def test_last_ghost_batch_with_one_sample() -> None:
    x = torch.randn(7, 3)
    with pytest.raises(errors.SingleValueError, match=r"ghost batch 3 of 3 \(samples 6 to 6\)"):
        bnkit.BatchNorm1d(3, ghost_batch_size=3)(x)
    layer = bnkit.BatchNorm1d(3, ghost_batch_size=3, single_sample="identity")
    y = layer(x)
    torch.testing.assert_close(y[6:], x[6:], rtol=0, atol=0)
    plain = bnkit.BatchNorm1d(3)  # the running statistics come from the first six only
    plain(x[:6])
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    torch.testing.assert_close(layer.running_var, plain.running_var)


def test_bad_ghost_batch_size() -> None:
    for value, words in [
        (0, "ghost_batch_size >= 1, got 0"),
        (2.5, "integer >= 1 or None, got 2.5"),
    ]:
        with pytest.raises(errors.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            bnkit.BatchNorm2d(4, ghost_batch_size=value)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- renorm


def test_renorm_schedule_matches_the_reference() -> None:
    renorm = bnkit.Renorm(r_max=2.5, d_max=4.0, warmup_steps=10, r_max_steps=50, d_max_steps=30)
    for step in [0, 5, 9, 10, 11, 20, 29, 30, 31, 49, 50, 51, 1000]:
        expected = ref.renorm_limits(step, 2.5, 4.0, 10, 50, 30)
        actual = renorm.limits(torch.tensor(step))
        assert (float(actual[0]), float(actual[1])) == pytest.approx(expected, rel=1e-15)


@given(
    st.integers(0, 100),
    st.integers(0, 100),
    st.integers(0, 100),
    st.integers(0, 200),
)
def test_renorm_schedule_on_drawn_steps(warmup: int, r_steps: int, d_steps: int, step: int) -> None:
    renorm = bnkit.Renorm(3.0, 5.0, warmup, r_steps, d_steps)
    r_max, d_max = renorm.limits(step)
    assert (float(r_max), float(d_max)) == pytest.approx(
        ref.renorm_limits(step, 3.0, 5.0, warmup, r_steps, d_steps), rel=1e-15
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("limits", [(1.5, 0.5), (3.0, 5.0)], ids=["clipped", "loose"])
def test_renorm_matches_the_reference(case: Case, limits: tuple[float, float]) -> None:
    r_max, d_max = limits
    layer = make_layer(case, renorm=bnkit.Renorm(r_max, d_max, 0, 0, 0))
    rng = np.random.default_rng(11)
    running_mean = rng.normal(size=case.channels) * 2 + case.loc
    running_var = rng.uniform(0.1, 10.0, size=case.channels) * case.scale**2
    with torch.no_grad():
        layer.running_mean.copy_(torch.from_numpy(running_mean))
        layer.running_var.copy_(torch.from_numpy(running_var))
    gamma, beta = case.params()
    x = case.input()
    dy = np.random.default_rng(5).normal(size=case.shape)
    result = run(layer, x, dy)
    y, cache = ref.batch_renorm_train(
        x, gamma, beta, running_mean, running_var, r_max, d_max, case.eps
    )
    check_against(result, y, ref.batch_renorm_backward(dy, cache), case, tolerance(case))
    # the running statistics are updated from the batch as in plain batch norm
    momentum = 1.0 if case.momentum is None else case.momentum
    mean, var = ref.update_running_stats(
        running_mean, running_var, cache.stats.mean, cache.stats.var, cache.stats.count, momentum
    )
    close(layer.running_mean.numpy(), mean, "running_mean", tolerance(case))
    close(layer.running_var.numpy(), var, "running_var", tolerance(case))


def test_renorm_follows_its_schedule_in_the_layer() -> None:
    """During the warm-up renorm is batch norm; afterwards it is not."""
    torch.manual_seed(0)
    renorm = bnkit.Renorm(r_max=3.0, d_max=5.0, warmup_steps=3, r_max_steps=6, d_max_steps=6)
    layer, plain = bnkit.BatchNorm1d(4, renorm=renorm).double(), bnkit.BatchNorm1d(4).double()
    gaps = []
    for _ in range(8):
        x = 5 + 3 * torch.randn(16, 4, dtype=torch.float64)
        gaps.append(float((layer(x) - plain(x)).abs().max().detach()))
    assert max(gaps[:3]) < 1e-12
    assert min(gaps[4:]) > 1e-3
    torch.testing.assert_close(layer.running_mean, plain.running_mean, rtol=1e-14, atol=0)


def test_renorm_per_ghost_batch_with_a_mask() -> None:
    """Renorm, ghost batches and masks compose: renorm per ghost batch, masks inside."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(6, 3, 5))
    dy = rng.normal(size=x.shape)
    mask = rng.random((6, 5)) > 0.3
    mask[[0, 3], :2] = True
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    running_mean, running_var = rng.normal(size=3), rng.uniform(1, 20, size=3)
    layer = bnkit.BatchNorm1d(3, renorm=bnkit.Renorm(2.0, 1.0, 0, 0, 0), ghost_batch_size=3)
    layer.double()
    with torch.no_grad():
        for tensor, value in [
            (layer.weight, gamma),
            (layer.bias, beta),
            (layer.running_mean, running_mean),
            (layer.running_var, running_var),
        ]:
            tensor.copy_(torch.from_numpy(value))
    result = run(layer, x, dy, mask=torch.from_numpy(mask))
    ys, dxs, dgamma, dbeta = [], [], 0.0, 0.0
    for part in (slice(0, 3), slice(3, 6)):
        y, cache = ref.batch_renorm_train(
            x[part], gamma, beta, running_mean, running_var, 2.0, 1.0, mask=mask[part]
        )
        dx, dg, db = ref.batch_renorm_backward(dy[part], cache)
        ys.append(y)
        dxs.append(dx)
        dgamma, dbeta = dgamma + dg, dbeta + db
    close(result["y"], np.concatenate(ys), "y")
    close(result["dx"], np.concatenate(dxs), "dx")
    close(result["dgamma"], np.asarray(dgamma), "dgamma")
    close(result["dbeta"], np.asarray(dbeta), "dbeta")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"r_max": 0.5}, "r_max >= 1"),
        ({"d_max": -1.0}, "d_max >= 0"),
        ({"warmup_steps": -1}, "warmup_steps to be an integer >= 0"),
        ({"r_max_steps": 1.5}, "r_max_steps to be an integer >= 0"),
    ],
)
def test_bad_renorm_settings(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(errors.ConfigError, match=words):
        bnkit.Renorm(**kwargs)


def test_renorm_needs_running_statistics() -> None:
    with pytest.raises(errors.ConfigError, match="track_running_stats=False"):
        bnkit.BatchNorm1d(3, renorm=bnkit.Renorm(), track_running_stats=False)
    with pytest.raises(errors.ConfigError, match="running_mean=None"):
        bnkit.functional.batch_norm(
            torch.randn(4, 3), None, None, training=True, renorm=bnkit.Renorm()
        )
    with pytest.raises(errors.ConfigError, match="num_batches_tracked"):
        bnkit.functional.batch_norm(
            torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, renorm=bnkit.Renorm()
        )


# ------------------------------------------------------------------- micro-batch statistics


def small_model(**extras: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3, padding=1),
        bnkit.BatchNorm1d(4, **extras),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6, 5),
        bnkit.BatchNorm1d(5, **extras),
    ).double()


@pytest.mark.parametrize(
    "extras",
    [{}, {"momentum": None}, {"running_var_estimator": "biased"}, {"ghost_batch_size": 4}],
    ids=["ema", "cumulative", "biased", "ghost"],
)
def test_accumulated_micro_batches_equal_one_batch(extras: dict[str, Any]) -> None:
    """The first batch norm layer sees the same values either way: its statistics match.

    (Layers after it do not: their inputs depend on how the layers before normalized.)
    """
    whole, micro = small_model(**extras), small_model(**extras)
    for step in range(3):
        batch = torch.randn(24, 2, 6, dtype=torch.float64) * (step + 1) + step
        whole(batch)
        with bnkit.accumulate_stats(micro):
            for part in batch.split([8, 8, 6, 2]):
                micro(part)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(micro[1], name), getattr(whole[1], name), rtol=1e-12, atol=1e-14
        )
    assert int(micro[5].num_batches_tracked) == 3


def test_accumulated_statistics_equal_the_reference_merge() -> None:
    layer = bnkit.BatchNorm1d(3, momentum=0.3).double()
    parts = [
        np.random.default_rng(i).normal(i, i + 1, size=(n, 3)) for i, n in enumerate([5, 2, 9])
    ]
    with bnkit.accumulate_stats(layer):
        for part in parts:
            layer(torch.from_numpy(part))
    stats = ref.merge_stats([ref.batch_stats(p) for p in parts])
    mean, var = ref.update_running_stats(
        np.zeros(3), np.ones(3), stats.mean, stats.var, stats.count, 0.3
    )
    close(layer.running_mean.numpy(), mean, "running_mean", 1e-13)
    close(layer.running_var.numpy(), var, "running_var", 1e-13)


def test_accumulate_normalizes_each_micro_batch_with_its_own_statistics() -> None:
    model, reference_model = small_model(), small_model()
    parts = torch.randn(12, 2, 6, dtype=torch.float64).split(4)
    with bnkit.accumulate_stats(model):
        outputs = [model(part) for part in parts]
    for part, output in zip(parts, outputs, strict=True):
        torch.testing.assert_close(output, copy.deepcopy(reference_model)(part), rtol=0, atol=0)


def test_accumulate_drops_the_statistics_when_the_block_raises() -> None:
    model = small_model()
    before = copy.deepcopy(model.state_dict())

    def failed_step() -> None:
        with bnkit.accumulate_stats(model):
            model(torch.randn(8, 2, 6, dtype=torch.float64))
            raise KeyError("a failed step")

    with pytest.raises(KeyError):
        failed_step()
    for name, value in before.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    model(torch.randn(8, 2, 6, dtype=torch.float64))  # updates normally again
    assert int(model[1].num_batches_tracked) == 1


def test_accumulate_is_not_reentrant() -> None:
    model = small_model()
    with (
        bnkit.accumulate_stats(model),
        pytest.raises(RuntimeError, match="already accumulating"),
        bnkit.accumulate_stats(model),
    ):
        pass


def test_accumulate_warns_about_torch_layers() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), bnkit.BatchNorm1d(3))
    with (
        pytest.warns(UserWarning, match=r"torch batch norm layers .* 0\b"),
        bnkit.accumulate_stats(model),
    ):
        model(torch.randn(4, 3))


def test_accumulate_in_eval_or_frozen_records_nothing() -> None:
    model = small_model().eval()
    with bnkit.accumulate_stats(model):
        model(torch.randn(4, 2, 6, dtype=torch.float64))
    assert int(model[1].num_batches_tracked) == 0


# ---------------------------------------------------------------- gradcheck and compile


CLIPPED = bnkit.Renorm(1.5, 0.5, 0, 0, 0)


@pytest.mark.parametrize(
    ("options", "use_mask", "affine"),
    [
        ({}, True, True),
        ({"ghost_batch_size": 3}, False, True),
        ({"ghost_batch_size": 3}, True, True),
        ({"renorm": CLIPPED}, False, True),
        ({"renorm": CLIPPED, "ghost_batch_size": 4}, True, True),
        ({"renorm": CLIPPED}, True, False),
    ],
    ids=["mask", "ghost", "ghost-mask", "renorm", "renorm-ghost-mask", "renorm-noaffine"],
)
@pytest.mark.slow
def test_gradcheck(options: dict[str, Any], use_mask: bool, affine: bool) -> None:
    """float64 gradcheck of the functional form. For renorm, the population statistics are
    chosen so that r and d are clipped: there they are locally constant, so the true
    derivative equals renorm's gradient (which treats them as constants everywhere)."""
    torch.manual_seed(0)
    x = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_(affine)
    bias = torch.randn(3, dtype=torch.float64).requires_grad_(affine)
    running_mean = torch.tensor([10.0, -10.0, 10.0], dtype=torch.float64)
    running_var = torch.tensor([100.0, 0.01, 100.0], dtype=torch.float64)
    mask = (torch.rand(7, 4) > 0.3) if use_mask else None
    if mask is not None:
        mask[:, :2] = True

    def f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return bnkit.functional.batch_norm(
            x,
            running_mean.clone(),
            running_var.clone(),
            weight if affine else None,
            bias if affine else None,
            True,
            0.1,
            1e-5,
            num_batches_tracked=torch.tensor(0),
            mask=mask,
            **options,
        )

    assert torch.autograd.gradcheck(f, (x, weight, bias), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (x, weight, bias), eps=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*should not be instantiated.*:DeprecationWarning")
@pytest.mark.slow
def test_compiled_variants_match_eager() -> None:
    torch._dynamo.reset()
    options = {"renorm": bnkit.Renorm(2.0, 1.0, 0, 2, 2), "ghost_batch_size": 4}
    eager = bnkit.BatchNorm1d(3, **options).double()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager")
    for step in range(4):
        x = torch.randn(10, 3, 6, dtype=torch.float64) + step
        mask = torch.rand(10, 6) > 0.2
        mask[:, :2] = True
        torch.testing.assert_close(
            compiled(x, mask=mask), eager(x, mask=mask), rtol=1e-12, atol=1e-12
        )
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var, rtol=1e-12, atol=0)
    assert int(compiled_layer.num_batches_tracked) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_variants_keep_dtype_and_channels_last(dtype: torch.dtype) -> None:
    options = {"renorm": bnkit.Renorm(2.0, 1.0, 0, 0, 0), "ghost_batch_size": 3}
    x = torch.randn(7, 4, 5, 6).to(memory_format=torch.channels_last)
    mask = torch.rand(7, 5, 6) > 0.2
    full, low = bnkit.BatchNorm2d(4, **options), bnkit.BatchNorm2d(4, **options)
    expected = full(x, mask=mask)
    y = low(x.to(dtype), mask=mask)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert low.running_var.dtype == torch.float32
    atol = {torch.float32: 1e-5, torch.float16: 0.02, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=atol)
