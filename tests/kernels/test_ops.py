"""bnkit's torch.library operators: schemas, fake kernels and dispatch (opcheck), and every
implementation of each operator against the others (composite torch operations, the C
loops, the Triton kernels through the interpreter)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from bnkit.kernels import cpu, gpu, native, ops
from bnkit.kernels.stats import BatchStats, Update, compute_dtype

ACTIVATIONS = [(None, None), ("relu", None), ("leaky_relu", 0.1), ("elu", 1.0)]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> dict[str, Any]:
    """x, a mask, per-channel vectors and a gradient, far from zero on purpose."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = 3.0 + 2.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    vector = lambda: torch.rand(c, generator=generator, dtype=torch.float64) + 0.5  # noqa: E731
    mask = torch.rand((shape[0], *shape[2:]), generator=generator) > 0.3
    mask.view(-1)[0] = True
    cdt = compute_dtype(dtype)
    return {
        "x": x.to(dtype),
        "g": g.to(dtype),
        "mask": mask,
        "vectors": [vector().to(cdt) for _ in range(5)],
    }


def _calls(data: dict[str, Any], activation: str | None, param: float | None) -> list[Any]:
    """(operator, args) for every operator on these inputs."""
    x, g, mask = data["x"], data["g"], data["mask"]
    s, a, b, k1, k0 = data["vectors"]
    y = torch.ops.bnkit.affine(x, s, a, b, activation, param)
    calls = [
        (torch.ops.bnkit.batch_stats.default, (x, None)),
        (torch.ops.bnkit.batch_stats.default, (x, mask)),
        (torch.ops.bnkit.affine.default, (x, s, a, b, activation, param)),
        (torch.ops.bnkit.backward_reduce.default, (g, x, s, k0, activation, param, False, a, b)),
        (torch.ops.bnkit.backward_input.default,
         (g, x, s, a, k1, k0, activation, param, False, None, a, b)),
    ]  # fmt: skip
    if activation in ("leaky_relu", "elu", None):  # the memory-efficient form, from y
        calls.append(
            (torch.ops.bnkit.backward_reduce.default,
             (g, y, b, torch.zeros_like(b), activation, param, True, None, None))
        )  # fmt: skip
        calls.append(
            (torch.ops.bnkit.backward_input.default,
             (g, y, b, a, k1, k0, activation, param, True, mask if activation is None else None,
              None, None))
        )  # fmt: skip
    if activation is None:
        calls.append(
            (torch.ops.bnkit.backward_input.default,
             (g, x, s, a, k1, k0, None, None, False, mask, None, None))
        )  # fmt: skip
    return calls


@pytest.mark.parametrize(("activation", "param"), ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(activation: str | None, param: float | None, dtype: torch.dtype) -> None:
    """Schemas, fake kernels, no aliasing or hidden mutation (torch.library.opcheck)."""
    data = _inputs((4, 3, 5, 6), dtype, channels_last=False)
    for op, args in _calls(data, activation, param):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _composite(op: Any, args: tuple[Any, ...]) -> Any:
    return ops.composite[op._schema.name.split("::")[1]](*args)


def _close(ours: Any, theirs: Any, tolerance: float, what: str) -> None:
    for a, b in zip(
        ours if isinstance(ours, tuple) else (ours,),
        theirs if isinstance(theirs, tuple) else (theirs,),
        strict=True,
    ):
        assert a.shape == b.shape, what
        assert a.dtype == b.dtype, what
        scale = max(1.0, float(b.double().abs().max()))
        error = float((a.double() - b.double()).abs().max())
        assert error <= tolerance * scale, f"{what}: {error:.3g}"


def _same_as_composite(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> None:
    # 16-bit outputs: one rounding of the same float32 value may differ by one unit
    tolerance = {torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(dtype, 2e-5)
    for activation, param in ACTIVATIONS:
        data = _inputs(shape, dtype, channels_last)
        for op, args in _calls(data, activation, param):
            if op is torch.ops.bnkit.batch_stats.default:
                ours, theirs = op(*args), _composite(op, args)
                # the shift is any value close to the data: compare the mean it gives
                _close(ours[2] + ours[1], theirs[2] + theirs[1], tolerance, f"{op} mean")
                _close((ours[0], ours[3]), (theirs[0], theirs[3]), tolerance, str(op))
                continue
            _close(op(*args), _composite(op, args), tolerance, f"{op} {activation}")


@pytest.mark.skipif(native.library() is None, reason=f"no native code: {native.load_error()}")
@pytest.mark.parametrize(
    ("dtype", "channels_last"),
    list(
        itertools.product(
            [torch.float32, torch.float64, torch.bfloat16, torch.float16], [False, True]
        )
    ),
)
def test_c_loops_agree_with_the_composite(dtype: torch.dtype, channels_last: bool) -> None:
    shape = (8, 6, 7, 9)
    x = torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert ops.native_passes(x) is cpu.PRIMITIVES
    _same_as_composite(shape, dtype, channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_agrees_with_the_composite(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not gpu.available():
        pytest.skip(f"no Triton: {gpu.import_error()}")
    monkeypatch.setattr(gpu, "FORCED", True)  # as BNKIT_KERNEL=triton
    assert ops.native_passes(torch.empty(2, 3, 4, 5, dtype=dtype)) is gpu.PRIMITIVES
    tolerance_dtype = torch.float32 if dtype == torch.float32 else None
    if tolerance_dtype is None:  # bfloat16 data: compare in float32 against its composite
        shape = (4, 3, 5, 6)
        for activation, param in ACTIVATIONS:
            data = _inputs(shape, dtype, channels_last=False)
            for op, args in _calls(data, activation, param)[2:]:
                ours, theirs = op(*args), _composite(op, args)
                _close(ours, theirs, 2e-2, f"{op} {activation}")
        return
    _same_as_composite((4, 3, 5, 6), dtype, channels_last=False)


def test_other_dtypes_take_the_composite() -> None:
    x = torch.randn(4, 3, 5, dtype=torch.float16)
    assert ops.native_passes(x) is None
    count, shift, shifted_mean, var = torch.ops.bnkit.batch_stats(x, None)
    assert var.dtype == torch.float32
    assert count.tolist() == [20.0, 20.0, 20.0]
    torch.testing.assert_close(shift + shifted_mean, x.float().mean((0, 2)))
    torch.testing.assert_close(var, x.float().var((0, 2), correction=0))


def test_meta_tensors_trace() -> None:
    x = torch.empty(4, 3, 5, 6, device="meta").contiguous(memory_format=torch.channels_last)
    v = torch.empty(3, device="meta")
    y = torch.ops.bnkit.affine(x, v, v, v, "relu", None)
    assert y.device.type == "meta"
    assert y.is_contiguous(memory_format=torch.channels_last)
    sums = torch.ops.bnkit.backward_reduce(x, x, v, v, None, None, False, None, None)
    assert [t.shape for t in sums] == [(3,), (3,)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_dispatch_to_triton() -> None:
    x = torch.randn(8, 4, 6, 6, device="cuda")
    if not gpu.available():
        pytest.skip(f"no Triton: {gpu.import_error()}")
    assert ops.native_passes(x) is gpu.PRIMITIVES
    for activation, param in ACTIVATIONS:
        data = _inputs((8, 4, 6, 6), torch.float32, False)
        data = {
            "x": data["x"].cuda(),
            "g": data["g"].cuda(),
            "mask": data["mask"].cuda(),
            "vectors": [v.cuda() for v in data["vectors"]],
        }
        for op, args in _calls(data, activation, param):
            if op is torch.ops.bnkit.batch_stats.default:
                continue
            _close(op(*args), _composite(op, args), 2e-5, f"{op} {activation}")


def _vmapped(arg: Any, batched: bool, size: int) -> Any:
    """``size`` different versions of a tensor argument stacked at dimension 0, or the
    argument as it is: a vector scaled, a batch rolled along its samples (so an
    activation's output stays one), a mask rolled along its last dimension."""
    if not batched:
        return arg
    if arg.dim() == 1:
        return torch.stack([arg * (1.0 + 0.25 * b) for b in range(size)])
    return torch.stack(
        [arg.roll(b, dims=-1 if arg.dtype == torch.bool else 0) for b in range(size)]
    )


@pytest.mark.parametrize("batched", ["all", "data", "vectors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_rules_match_one_call_per_vmapped_call(batched: str, dtype: torch.dtype) -> None:
    """Each operator's vmap rule (the vmapped calls' channels side by side in one call, or
    one call each for a vmapped mask) gives what calling the operator once per vmapped
    call gives, whichever arguments are vmapped."""
    size = 3
    data = _inputs((4, 3, 5, 6), dtype, channels_last=False)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for activation, param in ACTIVATIONS:
        for op, args in _calls(data, activation, param):
            tensors = [isinstance(a, torch.Tensor) for a in args]
            chosen = [
                t and (batched == "all" or (a.dim() == 1) == (batched == "vectors"))
                for t, a in zip(tensors, args, strict=True)
            ]
            if not any(chosen):  # batch_stats has no vectors
                continue
            vargs = [_vmapped(a, c, size) for a, c in zip(args, chosen, strict=True)]
            in_dims = tuple(0 if c else None for c in chosen)
            got = torch.vmap(op, in_dims=in_dims)(*vargs)
            calls = [
                op(*[a[b] if c else a for a, c in zip(vargs, chosen, strict=True)])
                for b in range(size)
            ]
            if isinstance(got, tuple):
                expected: Any = tuple(torch.stack([c[i] for c in calls]) for i in range(len(got)))
            else:
                expected = torch.stack(calls)
            _close(got, expected, tolerance, f"{op} {activation} vmapped {batched}")


# --- the update of the running statistics ----------------------------------------------

UPDATES = list(
    itertools.product(
        [torch.float32, torch.float64],  # the statistics' dtype
        [torch.float32, torch.float64, torch.float16],  # the running statistics'
        [0.1, None],  # momentum (None: the cumulative average)
        [True, False],  # unbiased
        [True, False],  # skip_nonfinite
        [False, True],  # a NaN in the statistics
    )
)


def _update_args(
    dtype: torch.dtype, running: torch.dtype, momentum: float | None, unbiased: bool,
    skip: bool, nan: bool,
) -> tuple[Any, ...]:  # fmt: skip
    """Arguments of ``bnkit::update_running_stats``: statistics of 7 values per channel
    about a shift far from zero, running statistics, a counter at 3."""
    generator = torch.Generator().manual_seed(11)
    c = 37
    shift = 100.0 * torch.randn(c, generator=generator, dtype=torch.float64)
    shifted_mean, var = torch.randn(c, generator=generator), torch.rand(c, generator=generator)
    if nan:
        var[3] = float("nan")
    stats = [torch.full((c,), 7.0), shift, shifted_mean, var]
    rm = torch.randn(c, generator=generator).to(running)
    rv = torch.rand(c, generator=generator).to(running)
    tracked = torch.tensor(3)
    return (*(t.to(dtype) for t in stats), rm, rv, tracked, momentum, unbiased, skip)


def _fresh(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case", UPDATES[::5])
def test_update_opcheck(case: tuple[Any, ...]) -> None:
    """The update's schema (its three mutated arguments) and fake kernel."""
    args = _update_args(*case)
    torch.library.opcheck(
        torch.ops.bnkit.update_running_stats.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


def _update(args: tuple[Any, ...]) -> Update:
    """A fresh copy of the arguments as the native implementations take them."""
    fresh = _fresh(args)
    return Update(BatchStats(*fresh[:4]), *fresh[4:])


def _updated(args: tuple[Any, ...], run: Any) -> list[Any]:
    """(recorded, running mean, running var, counter) after ``run`` updated a copy."""
    args = _fresh(args)
    recorded = run(*args)
    return [bool(recorded), *args[4:7]]


def _same_update(ours: list[Any], theirs: list[Any], what: str) -> None:
    assert ours[0] == theirs[0], what
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        assert a.dtype == b.dtype, what
        assert torch.equal(a.isnan(), b.isnan()), what
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), what


@pytest.mark.skipif(native.library() is None, reason=f"no native code: {native.load_error()}")
@pytest.mark.parametrize("case", UPDATES)
def test_update_c_and_triton_agree_with_the_composite(
    case: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C update (CPU), the Triton one (the interpreter) and the composite torch
    operations leave the same running statistics and counter, bit for bit, and say the
    same about whether the batch was recorded."""
    args = _update_args(*case)
    composite = _updated(args, ops.composite["update_running_stats"])
    op = torch.ops.bnkit.update_running_stats.default
    if case[0] == case[1]:  # the C update takes statistics and running ones of one dtype
        assert cpu.update_running_stats(_update(args)) is not None
    _same_update(_updated(args, op), composite, f"C {case}")
    if gpu.available():
        monkeypatch.setattr(gpu, "FORCED", True)  # as BNKIT_KERNEL=triton
        assert gpu.update_running_stats(_update(args)) is not None
        _same_update(_updated(args, op), composite, f"Triton {case}")


def test_update_without_running_statistics_or_counter() -> None:
    """Only the counter, or only the running statistics: the others stay None."""
    args = list(_update_args(torch.float32, torch.float32, 0.1, True, True, False))
    tracked = args[6]
    torch.ops.bnkit.update_running_stats(*args[:4], None, None, tracked, *args[7:])
    assert int(tracked) == 4
    rm, rv = args[4].clone(), args[5].clone()
    recorded = torch.ops.bnkit.update_running_stats(*args[:4], rm, rv, None, *args[7:])
    assert bool(recorded)
    mean = (args[1].double() + args[2].double()) * 0.1 + args[4].double() * 0.9
    assert torch.equal(rm, mean.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_cuda_matches_the_composite() -> None:
    """The Triton update on a GPU (one launch) against the torch operations on the same
    device, for every case: the same counter and verdict; the running statistics to the
    last bit of a float64 blend that the GPU may fuse into one multiply-add."""
    if not gpu.available():
        pytest.skip(f"no Triton: {gpu.import_error()}")
    for case in UPDATES:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _update_args(*case))
        assert gpu.update_running_stats(_update(args)) is not None, case
        ours = _updated(args, torch.ops.bnkit.update_running_stats.default)
        theirs = _updated(args, ops.composite["update_running_stats"])
        assert ours[0] == theirs[0], case
        assert torch.equal(ours[3], theirs[3]), case
        for a, b in zip(ours[1:3], theirs[1:3], strict=True):
            # one unit in the last place of the running statistics' dtype
            tolerance = {torch.float64: 1e-14, torch.float32: 1e-6}.get(a.dtype, 1e-3)
            torch.testing.assert_close(a, b, rtol=tolerance, atol=0.0, equal_nan=True)
