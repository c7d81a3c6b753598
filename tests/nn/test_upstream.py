"""PyTorch's own batch-norm test inputs, run against bnkit.

``module_db``'s ModuleInfo for ``nn.BatchNorm1d/2d/3d`` (the constructor arguments and
inputs torch's test_modules.py uses) and ``op_db``'s OpInfo for
``nn.functional.batch_norm`` (its sample inputs): each case runs through torch and bnkit
side by side, and outputs, gradients and running statistics must agree; gradcheck and
gradgradcheck run on bnkit's layer in float64.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import bnkit
from bnkit.errors import ConfigWarning

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules", reason="torch's test inputs need expecttest"
)
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")

MODULE_INFOS = [
    info
    for info in common_modules.module_db
    if info.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
]
(BATCH_NORM_OP,) = [
    op
    for op in common_methods.op_db
    if op.name == "nn.functional.batch_norm" and op.variant_test_name == ""
]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def _module_cases(dtype: torch.dtype) -> Iterator[Any]:
    for info in MODULE_INFOS:
        for training in (True, False):
            for case in info.module_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=True, training=training
            ):
                yield pytest.param(info, case, training, id=f"{info.name}-{case.desc}-{training}")


def _unusual_momentum(momentum: object) -> bool:
    return isinstance(momentum, float) and not 0 <= momentum <= 1


@contextlib.contextmanager
def _expect_momentum_warning(expected: bool) -> Iterator[None]:
    if expected:
        with pytest.warns(ConfigWarning, match="outside"):
            yield
    else:
        yield


def _backward(output: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor | None]:
    cotangent = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape)
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(output, wanted, cotangent, allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("info", "case", "training"), list(_module_cases(torch.float64)))
def test_module_db_inputs_match_torch(
    info: Any, case: Any, training: bool, dtype: torch.dtype
) -> None:
    args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs).to(dtype).train(training)
    ours = getattr(bnkit, info.module_cls.__name__)(*args, **kwargs).to(dtype).train(training)
    generator = torch.Generator().manual_seed(0)
    for value in theirs.state_dict().values():
        if value.is_floating_point():
            value.copy_(torch.rand(value.shape, generator=generator, dtype=dtype) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    (x,) = case.forward_input.args
    x = x.detach().to(dtype)
    updates = training and ours.track_running_stats
    for _ in range(2):  # two steps: the running statistics feed the second in eval
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outputs = [theirs(xs[0])]
        with _expect_momentum_warning(updates and _unusual_momentum(ours.momentum)):
            outputs.append(ours(xs[1]))
        torch.testing.assert_close(outputs[1], outputs[0], **TOL[dtype])
        assert outputs[1].stride() == outputs[0].stride()
        grads = [
            _backward(out, [xi, *layer.parameters()])
            for out, xi, layer in zip(outputs, xs, (theirs, ours), strict=True)
        ]
        for got, want in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(got, want, **TOL[dtype])
        for (name, want), got in zip(
            theirs.state_dict().items(), ours.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(got, want, **TOL[dtype], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("info", "case", "training"), list(_module_cases(torch.float64)))
@pytest.mark.slow
def test_module_db_gradcheck(info: Any, case: Any, training: bool) -> None:
    args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
    layer = getattr(bnkit, info.module_cls.__name__)(*args, **kwargs).double().train(training)
    (x,) = case.forward_input.args
    if x.numel() == 0:
        pytest.skip("gradcheck needs a value to perturb")
    x = x.detach().double().requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]

    def call(inp: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        state = {name: w for (name, _), w in zip(layer.named_parameters(), weights, strict=True)}
        state.update({name: b.clone() for name, b in layer.named_buffers()})
        with warnings.catch_warnings():  # an unusual momentum only moves the copied buffers
            warnings.simplefilter("ignore", ConfigWarning)
            out: torch.Tensor = torch.func.functional_call(layer, state, (inp,))
        return out

    assert torch.autograd.gradcheck(call, (x, *params))
    assert torch.autograd.gradgradcheck(call, (x, *params))


def _op_cases() -> Iterator[Any]:
    for i, sample in enumerate(BATCH_NORM_OP.sample_inputs("cpu", torch.float64, True)):
        yield pytest.param(sample, id=f"sample{i}")


@pytest.mark.parametrize("sample", list(_op_cases()))
def test_opinfo_samples_match_torch_functional(sample: Any) -> None:
    running_mean, running_var, *affine = sample.args
    kwargs = dict(sample.kwargs)
    training = kwargs.get("training", False)
    results = []
    for function in (torch.nn.functional.batch_norm, bnkit.functional.batch_norm):
        x = sample.input.detach().clone().requires_grad_()
        weights = [None if t is None else t.detach().clone().requires_grad_() for t in affine]
        stats = [None if t is None else t.detach().clone() for t in (running_mean, running_var)]
        expect = (
            function is bnkit.functional.batch_norm
            and training
            and stats[0] is not None
            and _unusual_momentum(kwargs.get("momentum", 0.1))
        )
        with _expect_momentum_warning(expect):
            out = function(x, *stats, *weights, **kwargs)
        leaves = [x, *(w for w in weights if w is not None)]
        results.append((out, _backward(out, leaves) if out.numel() else [], stats))
    (want, want_grads, want_stats), (got, got_grads, got_stats) = results
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    for g, w in zip(got_stats, want_stats, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_every_module_info_is_covered() -> None:
    names = {info.name for info in MODULE_INFOS}
    assert names == {"nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"}
    assert sum(1 for _ in _module_cases(torch.float64)) >= 30
    assert sum(1 for _ in _op_cases()) >= 10
