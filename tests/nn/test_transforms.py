"""torch.func transforms, batched gradients and torch.export with bnkit layers, against
torch's own layer: the calls a drop-in replacement must accept and get right."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import functional_call, hessian, jacfwd, jacrev, jvp, stack_module_state, vmap

import bnkit
from bnkit.errors import ConfigWarning
from bnkit.kernels import native, ops

TOL = {"rtol": 1e-9, "atol": 1e-9}


def _pair(kind: str, channels: int, training: bool, **options: object) -> list[torch.nn.Module]:
    """The same layer from torch and bnkit, float64, with non-trivial parameters and
    running statistics."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for module in (torch.nn, bnkit):
        layer = getattr(module, kind)(channels, dtype=torch.float64, **options)
        layers.append(layer.train(training))
    for name in ("weight", "bias", "running_mean"):
        value = torch.randn(channels, generator=generator, dtype=torch.float64)
        for layer in layers:
            if getattr(layer, name, None) is not None:
                getattr(layer, name).data.copy_(value)
    variance = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    for layer in layers:
        if layer.running_var is not None:
            layer.running_var.data.copy_(variance)
    return layers


@pytest.mark.parametrize("training", [True, False])
def test_vmap_model_ensembling_with_stacked_state(training: bool) -> None:
    torch.manual_seed(0)
    models = [bnkit.BatchNorm2d(3, dtype=torch.float64).train(training) for _ in range(4)]
    for i, model in enumerate(models):
        with torch.no_grad():
            model.weight.fill_(1.0 + i)
            model.running_mean.fill_(0.1 * i)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    expected = [copy.deepcopy(model)(x) for model in models]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = functional_call(base, (p, b), (x,))
        return out

    got = vmap(call)(params, buffers)
    torch.testing.assert_close(got, torch.stack(expected), **TOL)


@pytest.mark.skipif(native.library() is None, reason=f"no native code: {native.load_error()}")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mask", [False, True])
def test_vmap_ensembling_runs_the_native_passes(
    layout: torch.memory_format, mask: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under vmap the operators' batching rules hand the C loops one call with the
    ensemble's channels side by side: same results as each model alone, on the native
    passes (recorded), with a mask and in either layout."""
    ran = []
    find = ops._native_primitives

    def recording(device: str, x: torch.Tensor, valid: torch.Tensor | None) -> object:
        passes = find(device, x, valid)
        ran.append(None if passes is None else passes.name)
        return passes

    monkeypatch.setattr(ops, "_native_primitives", recording)
    torch.manual_seed(0)
    models = [bnkit.BatchNorm2d(16) for _ in range(3)]
    for model in models:
        torch.nn.init.normal_(model.weight)
        torch.nn.init.normal_(model.bias)
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=layout).requires_grad_()
    valid = torch.rand(8, 12, 12) > 0.2 if mask else None
    expected = []
    for model in copy.deepcopy(models):
        y = model(x, mask=valid)
        expected.append((y, *torch.autograd.grad(y.square().sum(), (x, model.weight))))
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = functional_call(base, (p, b), (x,), {"mask": valid})
        return out

    ran.clear()
    got = vmap(loss)(params, buffers)
    assert "C loops" in ran
    grads = vmap(torch.func.grad(lambda p, b: loss(p, b).square().sum()))(params, buffers)
    torch.testing.assert_close(got, torch.stack([e[0] for e in expected]))
    torch.testing.assert_close(
        grads["weight"], torch.stack([e[2] for e in expected]), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("training", [True, False])
def test_batched_gradients(training: bool) -> None:
    theirs, ours = _pair("BatchNorm3d", 3, training)
    x = torch.randn(4, 3, 2, 3, 3, dtype=torch.float64)
    cotangents = torch.randn(5, *x.shape, dtype=torch.float64)
    grads = []
    for layer in (theirs, ours):
        xi = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(layer(xi), xi, cotangents, is_grads_batched=True)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], **TOL)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm2d"])
def test_forward_mode_derivatives_match_torch(training: bool, kind: str) -> None:
    # In training, without running statistics to update (a transform may not change a
    # captured buffer, for torch's layer as for bnkit's).
    theirs, ours = _pair(kind, 3, training, track_running_stats=not training)
    shape = (6, 3) if kind == "BatchNorm1d" else (3, 3, 2, 2)
    x = torch.randn(*shape, dtype=torch.float64)
    tangent = torch.randn_like(x)
    for transform in ("jvp", "jacfwd", "hessian"):
        results = []
        for layer in (theirs, ours):
            if transform == "jvp":
                results.append(jvp(layer, (x,), (tangent,))[1])
            elif transform == "jacfwd":
                results.append(jacfwd(layer)(x))
            else:
                results.append(hessian(lambda v, layer=layer: layer(v).pow(3).sum())(x))
        torch.testing.assert_close(results[1], results[0], **TOL)


def test_forward_mode_with_parameters_and_fused_activation() -> None:
    theirs, ours = _pair("BatchNorm1d", 3, True, track_running_stats=False)
    fused = bnkit.BatchNorm1d(
        3, activation="leaky_relu", track_running_stats=False, dtype=torch.float64
    )
    fused.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, dtype=torch.float64)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    tangents = {name: torch.randn_like(p) for name, p in params.items()}

    def tangent(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_t = jvp(lambda p: functional_call(layer, p, (x,)), (params,), (tangents,))
        return out, out_t

    z, expected = tangent(theirs)
    torch.testing.assert_close(tangent(ours)[1], expected, **TOL)
    slope = torch.where(z > 0, 1.0, 0.01).to(torch.float64)  # leaky_relu'(z)
    torch.testing.assert_close(tangent(fused)[1], slope * expected, **TOL)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("options", "activation"),
    [
        ({}, None),
        ({"activation": "leaky_relu"}, torch.nn.LeakyReLU(0.01)),
        ({"activation": "relu"}, torch.nn.ReLU()),
    ],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_eager_forward_mode_ad_matches_torch(
    training: bool, options: dict[str, object], activation: torch.nn.Module | None,
    layout: torch.memory_format,
) -> None:  # fmt: skip
    """torch.autograd.forward_ad with dual tensors, on tensors the native kernels would
    take (they have no forward-mode rule, so such calls go to the portable kernel)."""
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(0)
    x = torch.randn(8, 16, 8, 8).contiguous(memory_format=layout)
    tangent = torch.randn_like(x)
    ours = bnkit.BatchNorm2d(16, **options).train(training)  # type: ignore[arg-type]
    theirs = torch.nn.BatchNorm2d(16).train(training)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 1.5)
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)
        ours.running_mean.copy_(theirs.running_mean)
        ours.running_var.copy_(theirs.running_var)
    results = []
    for layer in (ours, torch.nn.Sequential(theirs, activation or torch.nn.Identity())):
        with fwad.dual_level():
            y = layer(fwad.make_dual(x, tangent))
            results.append(tuple(t.detach() for t in fwad.unpack_dual(y)[:2]))
    (y_ours, t_ours), (y_theirs, t_theirs) = results
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_ours, t_theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_forward_and_reverse_jacobians_agree_with_a_mask() -> None:
    torch.manual_seed(0)
    layer = bnkit.BatchNorm1d(2, track_running_stats=False, dtype=torch.float64)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.3
    mask[0, 0] = True

    def call(v: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = layer(v, mask)
        return out

    torch.testing.assert_close(jacfwd(call)(x), jacrev(call)(x), **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_torch_export(training: bool) -> None:
    theirs, ours = _pair("BatchNorm2d", 3, training)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    exported = torch.export.export(copy.deepcopy(ours), (x,)).module()
    torch.testing.assert_close(exported(x), copy.deepcopy(theirs)(x), **TOL)


def test_momentum_outside_unit_interval_is_accepted_as_torch_does() -> None:
    theirs, ours = _pair("BatchNorm1d", 3, True)
    for layer in (theirs, ours):
        layer.momentum = -1.2
    x = torch.randn(8, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), **TOL)  # unused: silent
    theirs.train(), ours.train()
    with pytest.warns(ConfigWarning, match="outside"):
        out = ours(x)
    torch.testing.assert_close(out, theirs(x), **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_empty_one_dimensional_input_as_torch() -> None:
    empty = torch.zeros(0)
    expected = torch.nn.functional.batch_norm(empty, torch.zeros(0), torch.ones(0))
    got = bnkit.functional.batch_norm(empty, torch.zeros(0), torch.ones(0))
    assert got.shape == expected.shape == (0,)


def test_quantization_fuser_refuses_bnkit_layers() -> None:
    """torch.ao's fuser matches exact types: it refuses a bnkit layer (fused activation
    or not) rather than fusing it wrongly; bnkit.tools.to_torch is the way in."""
    from torch.ao.quantization import fuse_modules

    for layer in (bnkit.BatchNorm2d(3), bnkit.BatchNorm2d(3, activation="relu")):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), layer).eval()
        with pytest.raises(AssertionError, match="did not find fuser method"):
            fuse_modules(model, [["0", "1"]])
