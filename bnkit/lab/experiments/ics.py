"""``ics``: Figure 1 of the batch normalization paper, internal covariate shift.

Ioffe & Szegedy (2015), Figure 1: a fully connected network with three hidden layers of
100 sigmoid units, trained with SGD on mini-batches of 60, with and without batch norm
after each hidden linear layer (which then has no bias: beta replaces it). The figure
shows (a) test accuracy against training steps and (b, c) the 15th, 50th and 85th
percentiles of the input to a typical sigmoid of the last hidden layer over training:
without BN they drift in mean and spread, with BN they stay put.

The paper gives neither the learning rate nor the initial weights' scale beyond "small
random Gaussian values"; here SGD runs at 0.1 and every weight starts from N(0, 0.05^2).
The size of the effect depends on that scale (see :class:`IcsConfig`).

Measured here:

- test accuracy at evenly spaced steps for both networks;
- the steps each needs to reach a target accuracy, by default the final accuracy of the
  network without BN (the paper's own yardstick in its Inception comparison), and their
  ratio;
- for each of the 100 sigmoids of the last hidden layer, the percentiles of its input
  over a fixed probe set (the first test examples, the network in eval mode) at each
  evaluation, and their *drift*: the mean over the three percentiles of the range
  (max - min) each covers during training, divided by the unit's mean 15-85 spread. The
  typical unit plotted is the one with the median drift;
- the Z-transform, gamma and beta at work: on a training batch at the end, each BN
  node's output has the batch mean beta and standard deviation gamma;
- Santurkar et al. (2018, "How Does Batch Normalization Help Optimization?",
  arXiv:1805.11604)'s view, at evenly spaced checkpoints on a training batch (train mode):
  their internal covariate shift of each layer, the change of its gradient when the
  layers before it take their SGD step (:func:`bnkit.tools.santurkar_ics`), and the
  smoothness of the loss along the gradient step: the range of the loss over steps of
  0.25 to 4 times the learning rate (their Figure 4(a)) and the effective beta-smoothness,
  the largest change of the gradient per unit of distance moved along it (Figure 4(c)).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.lines import Line2D
from torch import nn

from bnkit.lab.experiment import Claim, Experiment, Figure, RunContext, Table
from bnkit.lab.formatting import number, percent, ratio_text, steps_text
from bnkit.lab.models import activation_layers, batch_norm_implementation, batch_norm_layers, mlp
from bnkit.lab.plotting import COLORS, new_figure, save_figure
from bnkit.lab.training import derive_seed, steps_to_target, train

__all__ = ["EXPERIMENT", "IcsConfig", "claims", "drift", "run"]

#: The arms: results keys and their labels.
ARMS: dict[str, str] = {"plain": "without BN", "bn": "with BN"}

#: A Z-transform deviation below this (relative to the largest |gamma| or |beta|) is
#: float32 rounding.
Z_TOLERANCE = 1e-4


@dataclass(frozen=True)
class IcsConfig:
    """The ``ics`` configuration (the paper's network; SGD without momentum).

    Args:
        steps: SGD steps per network (the paper: 50,000).
        batch_size: the mini-batch size (the paper: 60).
        lr: the learning rate (the paper does not give it).
        hidden: the hidden layer widths (the paper: 100, 100, 100).
        activation: the hidden nonlinearity (the paper: sigmoid).
        init_std: the initial weights' standard deviation. The paper says "small random
            Gaussian values"; 0.05 for every layer is a reading of that. None: 1/sqrt(fan_in),
            the other experiments' choice, with which the network without BN starts out
            better conditioned and the gap shrinks (on Fashion-MNIST, 50k steps: 1.3x
            fewer steps and a drift of 0.29 against 0.38).
        evaluations: evaluations after step 0.
        probe_samples: test examples whose sigmoid inputs give the percentiles.
        target_accuracy: the accuracy to reach; None: the final accuracy without BN.
        landscape_checkpoints: checkpoints of Santurkar et al.'s measures (ICS and the
            loss landscape along the gradient), evenly spaced over training.
        landscape_steps: the step sizes along the gradient, as multiples of ``lr``.
    """

    steps: int = 8000
    batch_size: int = 60
    lr: float = 0.1
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    init_std: float | None = 0.05
    evaluations: int = 100
    probe_samples: int = 1000
    target_accuracy: float | None = None
    landscape_checkpoints: int = 10
    landscape_steps: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


PERCENTILES = (15.0, 50.0, 85.0)


def drift(tracks: np.ndarray) -> np.ndarray:
    """How far each unit's input percentiles move over training, relative to their spread.

    drift = mean over the percentiles p of (max_t q_p(t) - min_t q_p(t)), divided by the
    mean over t of (q_85(t) - q_15(t)).

    Args:
        tracks: (T, 3, U) the 15th, 50th and 85th percentiles of U units at T times.

    Returns:
        (U,) the drift of each unit; 0 for a distribution that never moves.

    Example:
        >>> t = np.array([[[-1.0], [0.0], [1.0]], [[0.0], [1.0], [2.0]]])  # shifts by 1
        >>> drift(t)
        array([0.5])
    """
    ranges = tracks.max(axis=0) - tracks.min(axis=0)  # (3, U)
    spread = (tracks[:, -1, :] - tracks[:, 0, :]).mean(axis=0)  # (U,)
    result: np.ndarray = ranges.mean(axis=0) / np.maximum(spread, 1e-12)
    return result


def _z_transform_check(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Per node of the last BN layer, on one training batch: the output's batch mean and
    (biased) std against beta and |gamma| * sqrt(var / (var + eps))."""
    model = copy.deepcopy(model).train()  # batch statistics; the copy's buffers absorb the update
    layer = batch_norm_layers(model)[-1]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, inputs, output: seen.update(input=inputs[0], output=output)
        )
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    inputs = seen["input"].double()  # (N, C)
    outputs = seen["output"].double()  # (N, C)
    gamma = layer.weight.detach().double()
    beta = layer.bias.detach().double()
    var = inputs.var(dim=0, unbiased=False)
    expected_std = gamma.abs() * torch.sqrt(var / (var + layer.eps))
    mean_error = float((outputs.mean(dim=0) - beta).abs().max())
    std_error = float((outputs.std(dim=0, unbiased=False) - expected_std).abs().max())
    scale = max(1.0, float(gamma.abs().max()), float(beta.abs().max()))

    # The calculation with real numbers: node 0 of the last BN layer, a batch of four
    # (d_1..d_4), its outputs o_i before BN, mu, sigma, z_i and gamma * z_i + beta.
    seen.clear()
    hook = layer.register_forward_hook(
        lambda _m, inputs, output: seen.update(input=inputs[0], output=output)
    )
    with torch.no_grad():
        model(x[:4])
    hook.remove()
    o = seen["input"][:, 0].double()
    mu = o.mean()
    sigma2 = o.var(unbiased=False)
    z = (o - mu) / torch.sqrt(sigma2 + layer.eps)
    by_hand = gamma[0] * z + beta[0]
    layer_output = seen["output"][:, 0].double()
    worked = {
        "o": [round(float(v), 6) for v in o],
        "mu": round(float(mu), 6),
        "sigma": round(float(sigma2.sqrt()), 6),
        "z": [round(float(v), 6) for v in z],
        "gamma": round(float(gamma[0]), 6),
        "beta": round(float(beta[0]), 6),
        "by_hand": [round(float(v), 6) for v in by_hand],
        "layer": [round(float(v), 6) for v in layer_output],
        "max_error": float((by_hand - layer_output).abs().max()),
    }
    return {
        "worked_example": worked,
        "demo_example": _demo_example(),
        "batch_size": len(x),
        "nodes": len(gamma),
        "max_mean_error": mean_error,
        "max_std_error": std_error,
        "scale": scale,
        "gamma": [round(float(v), 5) for v in gamma],
        "beta": [round(float(v), 5) for v in beta],
    }


#: The mini-batch of four of ``bnkit demo``: one node's outputs, and its gamma and beta.
DEMO_OUTPUTS = (2.0, 5.0, 3.0, 6.0)
DEMO_GAMMA, DEMO_BETA = 2.0, 0.5


def _demo_example() -> dict[str, Any]:
    """``bnkit demo``'s batch of four, by hand and through the lab's batch norm layer."""
    from bnkit.lab.models import batch_norm

    layer = batch_norm(1).double().train()
    eps = float(getattr(layer, "eps", 1e-5))
    with torch.no_grad():
        for name, value in (("weight", DEMO_GAMMA), ("bias", DEMO_BETA)):
            parameter = getattr(layer, name)
            assert isinstance(parameter, torch.Tensor)
            parameter.fill_(value)
        o = torch.tensor(DEMO_OUTPUTS, dtype=torch.float64)
        output = layer(o[:, None])[:, 0]
    mu = o.mean()
    sigma2 = o.var(unbiased=False)
    z = (o - mu) / torch.sqrt(sigma2 + eps)
    by_hand = DEMO_GAMMA * z + DEMO_BETA
    return {
        "o": list(DEMO_OUTPUTS),
        "mu": round(float(mu), 6),
        "sigma": round(float(sigma2.sqrt()), 6),
        "z": [round(float(v), 6) for v in z],
        "gamma": DEMO_GAMMA,
        "beta": DEMO_BETA,
        "by_hand": [round(float(v), 6) for v in by_hand],
        "layer": [round(float(v), 6) for v in output],
        "max_error": float((by_hand - output).abs().max()),
    }


def _percentile_summary(records: list[np.ndarray], steps: list[int]) -> dict[str, Any]:
    """The typical unit's percentile tracks and the drift, or None for a run that diverged
    before its first record or whose inputs became non-finite."""
    summary: dict[str, Any] = {
        "percentile_steps": steps,
        "typical_unit": None,
        "typical_percentiles": [],
        "median_percentiles": [],
        "drift_median": None,
        "drift_typical": None,
    }
    if not records:
        return summary
    tracks = np.stack(records)  # (T, 3, U)
    unit_drift = drift(tracks)
    if not np.isfinite(unit_drift).all():
        return summary
    typical = int(np.argsort(unit_drift, kind="stable")[len(unit_drift) // 2])
    summary.update(
        typical_unit=typical,
        typical_percentiles=np.round(tracks[:, :, typical], 5).tolist(),
        median_percentiles=np.round(np.median(tracks, axis=2), 5).tolist(),
        drift_median=round(float(np.median(unit_drift)), 6),
        drift_typical=round(float(unit_drift[typical]), 6),
    )
    return summary


def _loss_and_gradient(
    model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
) -> tuple[float, torch.Tensor]:
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).double()


def landscape(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, multiples: tuple[float, ...]
) -> dict[str, float]:
    """Santurkar et al.'s loss landscape along the gradient, on one batch (train mode).

    With g the gradient at the weights w: the range (max - min) of the loss L(w - eta g)
    over the step sizes eta = lr * multiples (w itself included), and the effective
    beta-smoothness max over eta of ||grad L(w - eta g) - g|| / ||eta g||. The model's
    weights, buffers and mode are restored.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    state = copy.deepcopy(model.state_dict())
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            loss0, g = _loss_and_gradient(model, params, x, y)
            losses, betas = [loss0], []
            norm = float(g.norm())
            for multiple in multiples:
                eta = lr * multiple
                model.load_state_dict(state)
                with torch.no_grad():
                    offset = 0
                    for p in params:
                        count = p.numel()
                        p.sub_(eta * g[offset : offset + count].view_as(p).to(p.dtype))
                        offset += count
                loss, g_new = _loss_and_gradient(model, params, x, y)
                losses.append(loss)
                moved = eta * norm
                betas.append(float((g_new - g).norm()) / moved if moved > 0 else 0.0)
    finally:
        model.load_state_dict(state)
        model.train(was_training)
    finite = all(np.isfinite(losses)) and all(np.isfinite(betas))
    return {
        "loss_range": round(float(max(losses) - min(losses)), 8) if finite else math.nan,
        "beta_smoothness": round(float(max(betas)), 8) if finite else math.nan,
        "gradient_norm": round(norm, 8),
    }


def santurkar_view(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: IcsConfig
) -> dict[str, Any]:
    """Santurkar et al.'s internal covariate shift of each linear layer and the loss
    landscape along the gradient, on one batch, the model in train mode."""
    from bnkit.tools import santurkar_ics

    was_training = model.training
    model.train()
    try:
        shifts = santurkar_ics(model, nn.functional.cross_entropy, (x, y), lr=config.lr)
    finally:
        model.train(was_training)
    later = shifts[1:]  # the first layer has nothing before it
    return {
        "layers": [s.name for s in later],
        "l2": [round(s.l2, 8) for s in later],
        "relative": [round(s.relative, 8) for s in later],
        "cosine": [round(s.cosine, 8) for s in later],
        **landscape(model, x, y, config.lr, config.landscape_steps),
    }


def _view_checkpoints(config: IcsConfig) -> set[int]:
    """The evaluated steps where Santurkar et al.'s measures are taken: evenly spaced,
    from the first evaluation after step 0 to the last."""
    from bnkit.lab.training import evaluation_steps

    evaluated = evaluation_steps(config.steps, config.evaluations)[1:]
    count = max(1, min(config.landscape_checkpoints, len(evaluated)))
    picks = np.linspace(0, len(evaluated) - 1, count).round().astype(int)
    return {evaluated[i] for i in picks}


def _median(values: list[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return round(float(np.median(known)), 8) if known else None


def _summarize_views(records: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    return {
        "steps": steps,
        "records": records,
        "ics_relative_median": _median([v for r in records for v in r["relative"]]),
        "ics_l2_median": _median([v for r in records for v in r["l2"]]),
        "ics_cosine_median": _median([v for r in records for v in r["cosine"]]),
        "loss_range_median": _median([r["loss_range"] for r in records]),
        "beta_smoothness_median": _median([r["beta_smoothness"] for r in records]),
    }


def run(config: IcsConfig, context: RunContext) -> dict[str, Any]:
    """Train the network with and without BN; return curves, percentiles and checks."""
    data = context.dataset
    probe = data.x_test[: config.probe_samples]
    results: dict[str, Any] = {
        "dataset": data.describe(),
        "batch_norm": batch_norm_implementation(),
        "percentiles": list(PERCENTILES),
    }
    last_biases: list[float] = []
    rng = np.random.default_rng(derive_seed(context.seed, "ics", "landscape"))
    order = rng.permutation(len(data.y_train))
    size = min(config.batch_size, len(order))
    view_batches = [
        torch.from_numpy(order[i : i + size]) for i in range(0, len(order) - size + 1, size)
    ][: max(1, config.landscape_checkpoints)]
    for arm, label in ARMS.items():
        torch.manual_seed(derive_seed(context.seed, "ics", "weights"))
        model = mlp(
            data.num_features,
            data.num_classes,
            hidden=config.hidden,
            activation=config.activation,
            use_batch_norm=arm == "bn",
            init_std=config.init_std,
        )
        last_activation = activation_layers(model)[-1]
        records: list[np.ndarray] = []
        record_steps: list[int] = []
        views: list[dict[str, Any]] = []
        view_steps: list[int] = []
        checkpoints = _view_checkpoints(config)

        def probe_sigmoid(
            step: int,
            net: nn.Module,
            where: nn.Module = last_activation,
            records: list[np.ndarray] = records,
            record_steps: list[int] = record_steps,
            views: list[dict[str, Any]] = views,
            view_steps: list[int] = view_steps,
            checkpoints: set[int] = checkpoints,
        ) -> None:
            if step in checkpoints:
                index = view_batches[len(view_steps) % len(view_batches)]
                views.append(santurkar_view(net, data.x_train[index], data.y_train[index], config))
                view_steps.append(step)
            if step == 0:
                return  # BN's running statistics are still their initial (0, 1) here
            seen: list[torch.Tensor] = []
            hook = where.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
            net(probe)
            hook.remove()
            records.append(np.percentile(seen[0].double().numpy(), PERCENTILES, axis=0))
            record_steps.append(step)

        history = train(
            model,
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=derive_seed(context.seed, "ics", "batches"),
            evaluations=config.evaluations,
            on_evaluate=probe_sigmoid,
            progress=context.progress,
            desc=f"ics {label}",
        )
        results[arm] = {
            **history.to_json(),
            **_percentile_summary(records, record_steps),
            "santurkar": _summarize_views(views, view_steps),
        }
        if arm == "bn":
            batch = data.x_train[: config.batch_size]
            results["z_transform"] = _z_transform_check(model, batch)
        else:
            hidden_linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
            last_bias = hidden_linears[-1].bias
            if last_bias is not None:
                last_biases = [round(float(v), 5) for v in last_bias.detach()]
    results["plain_last_hidden_bias"] = last_biases

    plain, _bn = results["plain"], results["bn"]
    target = config.target_accuracy
    results["target_rule"] = "configured" if target is not None else "final accuracy without BN"
    if target is None:
        target = plain["final_test_accuracy"]
    results["target_accuracy"] = target
    results["landscape_steps"] = list(config.landscape_steps)
    reach = {
        arm: steps_to_target(results[arm]["steps"], results[arm]["test_accuracy"], target)
        for arm in ARMS
    }
    results["steps_to_target"] = reach
    results["speedup"] = (
        round(reach["plain"] / reach["bn"], 4)
        if reach["plain"] is not None and reach["bn"] not in (None, 0)
        else None
    )
    return results


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The claims of Figure 1, decided from the results."""
    plain, bn = results["plain"], results["bn"]
    reach = results["steps_to_target"]
    target = results["target_accuracy"]
    faster = reach["bn"] is not None and (reach["plain"] is None or reach["bn"] < reach["plain"])
    plain_final, bn_final = plain["final_test_accuracy"], bn["final_test_accuracy"]
    higher = bn_final is not None and (plain_final is None or bn_final > plain_final)
    drift_plain, drift_bn = plain["drift_median"], bn["drift_median"]
    z = results["z_transform"]
    z_errors = (z["max_mean_error"], z["max_std_error"])
    z_holds = None not in z_errors and max(z_errors) / z["scale"] < Z_TOLERANCE
    measures = {arm: results[arm]["santurkar"] for arm in ARMS}
    ics_bn, ics_plain = (measures[a]["ics_relative_median"] for a in ("bn", "plain"))
    loss_bn, loss_plain = (measures[a]["loss_range_median"] for a in ("bn", "plain"))
    beta_bn, beta_plain = (measures[a]["beta_smoothness_median"] for a in ("bn", "plain"))
    santurkar = "Santurkar et al. 2018 (How Does Batch Normalization Help Optimization?), "
    checkpoints = len(measures["bn"]["steps"])
    records = measures["bn"]["records"]
    layer_count = len(records[0]["layers"]) if records else 0
    worked = z["worked_example"]
    worked_holds = all(
        example["max_error"] is not None
        and example["max_error"]
        < Z_TOLERANCE * max(1.0, *(abs(v) for v in example["by_hand"] if v is not None))
        for example in (worked, z["demo_example"])
    )
    return [
        Claim(
            claim="With batch normalization the network reaches a given test accuracy in fewer "
            "training steps.",
            anchor="Ioffe & Szegedy 2015, Figure 1(a): on MNIST, 3 hidden layers of 100 "
            "sigmoids, batch 60, 50k steps, the BN network's test accuracy rises faster.",
            measured=f"Target {percent(target)} ({results['target_rule']}): reached at "
            f"{steps_text(reach['bn'])} with BN, {steps_text(reach['plain'])} without "
            f"({ratio_text(results['speedup'])} fewer steps).",
            holds=faster,
        ),
        Claim(
            claim="With batch normalization the network ends at a higher test accuracy.",
            anchor="Ioffe & Szegedy 2015, Figure 1(a): the BN curve stays above the other one.",
            measured=f"Final test accuracy (mean of the last 3 evaluations): "
            f"{percent(bn_final)} with BN, {percent(plain_final)} without.",
            holds=higher,
        ),
        Claim(
            claim="Batch normalization keeps the distribution of a sigmoid's input stable "
            "during training (less internal covariate shift).",
            anchor="Ioffe & Szegedy 2015, Figure 1(b, c): the 15th, 50th and 85th percentiles "
            "of a typical last-layer sigmoid input change a lot without BN, little with BN.",
            measured=f"Drift of the percentiles (their range over training divided by the "
            f"15-85 spread; median over the {len(z['gamma'])} last-layer units): "
            f"{number(drift_bn)} with BN, {number(drift_plain)} without.",
            holds=drift_bn is not None and drift_plain is not None and drift_bn < drift_plain,
        ),
        Claim(
            claim="Measured as the change of a layer's gradient when the layers before it take "
            "their step, batch normalization does not reduce internal covariate shift: the "
            "relative change is at least as large with BN as without.",
            anchor=santurkar + "Figure 3: in a 25-layer linear network and VGG, "
            "||G - G'|| is as large or larger with BN, cos(G, G') as far from 1.",
            measured=f"||G - G'|| / ||G|| of the {layer_count} "
            f"layers after the first, median over {checkpoints} checkpoints: "
            f"{number(ics_bn)} with BN, {number(ics_plain)} without (cosine "
            f"{number(measures['bn']['ics_cosine_median'])} and "
            f"{number(measures['plain']['ics_cosine_median'])}).",
            holds=ics_bn is not None and ics_plain is not None and ics_bn >= ics_plain,
        ),
        Claim(
            claim="Batch normalization makes the loss landscape smoother: along the gradient "
            "step the loss varies less.",
            anchor=santurkar + "Figure 4(a): the range of the loss along the gradient, over "
            "step sizes, is much smaller with BN.",
            measured="Range of the training-batch loss over steps of "
            f"{_multiples(results)} x the learning rate along the gradient, median over "
            f"{checkpoints} checkpoints: {number(loss_bn)} with BN, {number(loss_plain)} "
            "without.",
            holds=loss_bn is not None and loss_plain is not None and loss_bn < loss_plain,
        ),
        Claim(
            claim="With batch normalization the gradient is more predictive: it changes less "
            "per unit of distance moved along it (smaller effective beta-smoothness).",
            anchor=santurkar + "Figure 4(b, c): gradient predictiveness and effective "
            "beta-smoothness, both better with BN.",
            measured="max over the step sizes of ||grad L(w - eta g) - g|| / ||eta g||, median "
            f"over {checkpoints} checkpoints: {number(beta_bn)} with BN, "
            f"{number(beta_plain)} without.",
            holds=beta_bn is not None and beta_plain is not None and beta_bn < beta_plain,
        ),
        Claim(
            claim="In training, each node's BN output has the mini-batch mean beta and "
            "standard deviation gamma: the Z-transform, then the learned scale and shift.",
            anchor="Ioffe & Szegedy 2015, Algorithm 1: normalize with the mini-batch mean "
            "and variance (z_i = (o_i - mu) / sigma), then scale and shift (gamma * z_i + beta).",
            measured=f"On a batch of {z['batch_size']} after training, over "
            f"{z['nodes']} nodes: max |mean - beta| = {number(z['max_mean_error'], '.2g')}, "
            f"max |std - |gamma| sqrt(var / (var + eps))| = "
            f"{number(z['max_std_error'], '.2g')} (tolerance "
            f"{Z_TOLERANCE:g} x {z['scale']:.3g}).",
            holds=z_holds,
            section="calculation",
        ),
        Claim(
            claim="For a mini-batch of four, the layer computes what the calculation gives by "
            "hand: z_i = (o_i - mu) / sqrt(sigma^2 + eps), then gamma * z_i + beta.",
            anchor="Ioffe & Szegedy 2015, Algorithm 1, worked by hand for one node n and a "
            "batch of four d_1..d_4 (the example of bnkit demo, and a trained network's node).",
            measured=f"bnkit demo's batch: max difference "
            f"{number(z['demo_example']['max_error'], '.2g')}. "
            f"Node 0 of the last BN layer: o = {_numbers(worked['o'])}, mu = "
            f"{worked['mu']:.4g}, sigma = {worked['sigma']:.4g}, z = {_numbers(worked['z'])}; "
            f"gamma = {worked['gamma']:.4g}, beta = {worked['beta']:.4g}: by hand "
            f"{_numbers(worked['by_hand'])}, the layer {_numbers(worked['layer'])} (max "
            f"difference {number(worked['max_error'], '.2g')}).",
            holds=worked_holds,
            section="calculation",
        ),
    ]


def _multiples(results: Mapping[str, Any]) -> str:
    multiples = results.get("landscape_steps") or []
    return "/".join(f"{m:g}" for m in multiples) or "several"


def views(results: Mapping[str, Any]) -> dict[str, bool]:
    """Which view of batch norm the numbers support: ``"2015"`` (it reduces the drift of
    the layers' input distributions) and ``"2018"`` (it does not reduce Santurkar et al.'s
    internal covariate shift, but smooths the loss landscape), each decided by the claims
    above (index 2; indices 3, 4 and 5, all three).

    """
    decided = claims(results)
    return {
        "2015": bool(decided[2].holds),
        "2018": bool(decided[3].holds and decided[4].holds and decided[5].holds),
    }


def _numbers(values: list[float | None]) -> str:
    return "[" + ", ".join(number(v, ".3f") for v in values) + "]"


def headline(results: Mapping[str, Any]) -> str:
    """Final accuracies, the speed-up and the drift, in one line."""
    plain, bn = results["plain"], results["bn"]
    return (
        f"acc {percent(bn['final_test_accuracy'])} BN vs {percent(plain['final_test_accuracy'])}; "
        f"{ratio_text(results['speedup'])} fewer steps; drift {number(bn['drift_median'], '.2f')} "
        f"vs {number(plain['drift_median'], '.2f')}"
    )


def plot(results: Mapping[str, Any], out_dir: Path, prefix: str) -> list[Figure]:
    """Test accuracy curves, the percentile tracks, and gamma and beta."""
    figures: list[Figure] = []
    name = results["dataset"]["name"]

    figure, ax = new_figure(height=3.2)
    for arm, label in ARMS.items():
        run_ = results[arm]
        ax.plot(run_["steps"], run_["test_accuracy"], color=COLORS[arm], label=label)
        reached = results["steps_to_target"][arm]
        if reached is not None:
            ax.axvline(reached, color=COLORS[arm], linestyle=":", linewidth=1)
    if results["target_accuracy"] is not None:
        ax.axhline(
            results["target_accuracy"],
            color=COLORS["gray"],
            linestyle="--",
            linewidth=1,
            label=f"target {percent(results['target_accuracy'])}",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Test accuracy, 3x100 sigmoid MLP on {name}")
    ax.legend(loc="lower right")
    file = f"{prefix}accuracy.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "Test accuracy against training steps, with and without BN "
            "(cf. the paper's Figure 1(a)); dotted lines: the step each reaches the "
            "target.",
            alt="Test accuracy against training steps of the sigmoid network with and "
            f"without batch norm: {percent(results['bn']['final_test_accuracy'])} against "
            f"{percent(results['plain']['final_test_accuracy'])} at the end.",
        )
    )

    figure, axes = new_figure(columns=2, width=8.0, height=3.2)
    known = [
        np.asarray(results[arm]["median_percentiles"])
        for arm in ARMS
        if results[arm].get("median_percentiles")
    ]
    limits = (
        (min(float(t.min()) for t in known), max(float(t.max()) for t in known)) if known else None
    )
    for ax, (arm, label) in zip(axes, ARMS.items(), strict=True):
        run_ = results[arm]
        if not run_.get("median_percentiles"):
            ax.set_title(f"{label}: no finite record")
        else:
            tracks = np.asarray(run_["median_percentiles"])  # (T, 3)
            steps = run_["percentile_steps"]
            ax.fill_between(steps, tracks[:, 0], tracks[:, 2], color=COLORS[arm], alpha=0.15)
            for column, style in enumerate((":", "-", "--")):
                ax.plot(steps, tracks[:, column], color=COLORS[arm], linestyle=style)
            ax.set_title(f"{label}: median drift {number(run_['drift_median'], '.2f')}")
        if limits is not None:
            pad = 0.05 * (limits[1] - limits[0] or 1.0)
            ax.set_ylim(limits[0] - pad, limits[1] + pad)
        ax.set_xlabel("training step")
        ax.set_ylabel("input to a last-layer sigmoid")
    handles = [Line2D([], [], color="black", linestyle=style) for style in (":", "-", "--")]
    labels = [f"{p:g}th percentile" for p in PERCENTILES]
    figure.legend(handles, labels, loc="outside lower center", ncols=3)
    file = f"{prefix}percentiles.png"
    save_figure(figure, out_dir / file)
    drifts = f"{number(results['bn']['drift_median'], '.2f')} with BN against " + number(
        results["plain"]["drift_median"], ".2f"
    )
    figures.append(
        Figure(
            file,
            "The input to the sigmoids of the last hidden layer over training, with and "
            "without BN on the same y-scale: the median over the 100 units of each unit's "
            "15th, 50th and 85th percentiles over the probe set (cf. the paper's Figure "
            "1(b, c)). The drift is the range each percentile covers during training "
            "relative to the 15-85 spread, median over units.",
            alt="Two panels on a shared y-scale: the 15th, 50th and 85th percentiles of a "
            "last-layer sigmoid's input against training steps, with and without batch norm; "
            f"median drift {drifts} without.",
        )
    )

    steps_bn = results["bn"]["santurkar"]["steps"]
    figure, axes = new_figure(columns=3, width=11.0, height=3.2)
    view_panels = [
        ("ICS (Santurkar): ||G - G'|| / ||G||", "relative", False),
        ("loss range along the gradient", "loss_range", True),
        ("effective beta-smoothness", "beta_smoothness", True),
    ]
    for ax, (title, key, log) in zip(axes, view_panels, strict=True):
        for arm, label in ARMS.items():
            view = results[arm]["santurkar"]
            values: list[float | None] = [
                _median(list(record[key])) if isinstance(record[key], list) else record[key]
                for record in view["records"]
            ]
            points = [(st, v) for st, v in zip(view["steps"], values, strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=COLORS[arm], label=label)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("median over layers")
    axes[0].legend(loc="best")
    file = f"{prefix}santurkar.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "Santurkar et al.'s view, at "
            f"{len(steps_bn)} checkpoints on a training batch: left, their internal "
            "covariate shift (the relative change of a layer's gradient when the layers "
            "before it step; median over the layers after the first); middle, the range of "
            "the loss along the gradient over steps of 0.25 to 4 learning rates; right, the "
            "largest change of the gradient per unit moved along it (log scales).",
            alt="Three line plots against training steps, with and without batch norm: "
            "Santurkar et al.'s internal covariate shift, the loss range along the gradient, "
            "and the effective beta-smoothness.",
        )
    )

    z = results["z_transform"]
    figure, axes = new_figure(columns=3, width=8.5, height=2.8)
    panels = [
        ("gamma (BN scale)", z["gamma"], COLORS["bn"]),
        ("beta (BN shift)", z["beta"], COLORS["bn"]),
        ("bias without BN", results["plain_last_hidden_bias"], COLORS["plain"]),
    ]
    for ax, (title, values, color) in zip(axes, panels, strict=True):
        if values:
            ax.hist(values, bins=20, color=color, alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("value")
    axes[0].set_ylabel("nodes of the last hidden layer")
    file = f"{prefix}gamma-beta.png"
    save_figure(figure, out_dir / file)
    figures.append(
        Figure(
            file,
            "The learned per-node gamma and beta of the last BN layer, and "
            "for comparison the biases the network without BN learned: beta takes "
            "the bias's place, gamma sets the scale the Z-transform removed.",
            section="calculation",
            alt="Histograms of the learned gamma and beta of the last batch norm layer's "
            "100 nodes, and of the biases of the same layer without batch norm.",
        )
    )
    return figures


def _example_rows(example: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for i, (o, z, y, out) in enumerate(
        zip(example["o"], example["z"], example["by_hand"], example["layer"], strict=True)
    ):
        rows.append(
            [
                f"d_{i + 1}",
                f"{o:.4f}",
                f"{example['mu']:.4f}",
                f"{example['sigma']:.4f}",
                f"{z:.4f}",
                f"{y:.4f}",
                f"{out:.4f}",
            ]
        )
    return rows


_EXAMPLE_HEADER = [
    "example",
    "o_i",
    "mu",
    "sigma",
    "z_i = (o_i - mu) / sqrt(sigma^2 + eps)",
    "gamma * z_i + beta (by hand)",
    "the layer's output",
]


def tables(results: Mapping[str, Any]) -> list[Table]:
    """The batch of four worked by hand (bnkit demo's, and a trained node's), and which
    view of internal covariate shift the numbers support."""
    z = results["z_transform"]
    demo, worked = z["demo_example"], z["worked_example"]
    supported = views(results)
    plain, bn = results["plain"], results["bn"]
    view_rows = [
        [
            "Ioffe & Szegedy 2015",
            "BN keeps each layer's input distribution stable (percentile drift)",
            f"drift {number(bn['drift_median'], '.2f')} with BN, "
            f"{number(plain['drift_median'], '.2f')} without",
            "supported" if supported["2015"] else "not supported",
        ],
        [
            "Santurkar et al. 2018",
            "BN does not reduce ICS measured on gradients, but smooths the loss landscape",
            f"||G - G'|| / ||G|| {number(bn['santurkar']['ics_relative_median'])} with BN, "
            f"{number(plain['santurkar']['ics_relative_median'])} without; loss range "
            f"{number(bn['santurkar']['loss_range_median'])} / "
            f"{number(plain['santurkar']['loss_range_median'])}; beta-smoothness "
            f"{number(bn['santurkar']['beta_smoothness_median'])} / "
            f"{number(plain['santurkar']['beta_smoothness_median'])}",
            "supported" if supported["2018"] else "not supported",
        ],
    ]
    both = {
        (True, True): "Both views are supported here: with BN the input distributions drift "
        "less, and yet the gradient-based internal covariate shift is not smaller while the "
        "landscape is smoother.",
        (True, False): "Here the numbers support the 2015 view (less drift with BN) and not "
        "all of Santurkar et al.'s predictions.",
        (False, True): "Here the numbers support Santurkar et al.'s view, not the 2015 one.",
        (False, False): "Here the numbers support neither view fully.",
    }[(supported["2015"], supported["2018"])]
    return [
        Table(
            f"bnkit demo's mini-batch of four, one node: gamma = {demo['gamma']:g}, beta = "
            f"{demo['beta']:g}; sigma is the biased standard deviation (divides by 4).",
            _EXAMPLE_HEADER,
            _example_rows(demo),
            section="calculation",
        ),
        Table(
            "The same calculation for node 0 of the trained network's last BN layer, on four "
            f"training examples: gamma = {worked['gamma']:.4f}, beta = {worked['beta']:.4f}.",
            _EXAMPLE_HEADER,
            _example_rows(worked),
            section="calculation",
        ),
        Table(
            "Two views of internal covariate shift, decided by the claims below. " + both,
            ["view", "prediction", "measured here", "verdict"],
            view_rows,
            numbers=False,
        ),
    ]


def curves(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The two training runs."""
    return {label: results[arm] for arm, label in ARMS.items()}


EXPERIMENT = Experiment(
    name="ics",
    title="Figure 1: internal covariate shift in a sigmoid MLP",
    section="covariate-shift",
    description=(
        "A fully connected network with 3 hidden layers of 100 sigmoids, SGD on mini-batches "
        "of 60, with and without batch norm after each hidden linear layer (no bias before "
        "BN), weights initialized from N(0, 0.05^2) (the paper: small random Gaussian values). "
        "Test accuracy is measured at evenly spaced steps; the input to each sigmoid "
        "of the last hidden layer is recorded on a fixed probe set of test examples "
        "(eval mode) and summarized by its 15th, 50th and 85th percentiles."
    ),
    quick=IcsConfig(steps=6000, evaluations=60),
    full=IcsConfig(steps=50_000),
    step_fields=("steps",),
    run=run,
    claims=claims,
    plot=plot,
    headline=headline,
    version=2,
    tables=tables,
    curves=curves,
)
