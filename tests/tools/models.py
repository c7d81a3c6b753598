"""Small models for the tools' tests: a ResNet-style network with residual blocks written
as functions (``out + shortcut``) and BatchNorm1d heads, and helpers to give batch norm
layers non-trivial statistics and parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnkit

BatchNormFactory = Callable[[int, int], nn.Module]  # (rank, channels) -> layer


def torch_bn(rank: int, channels: int) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank](channels)


def bnkit_bn(rank: int, channels: int) -> nn.Module:
    return {1: bnkit.BatchNorm1d, 2: bnkit.BatchNorm2d, 3: bnkit.BatchNorm3d}[rank](channels)


class Block(nn.Module):
    """conv-bn-relu-conv-bn, plus an identity or conv-bn shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int, bn: BatchNormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(2, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(2, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem, two residual blocks, global pooling and a BatchNorm1d head:
    BN1d -> Linear -> BN1d -> ReLU -> Linear."""

    def __init__(self, bn: BatchNormFactory = torch_bn, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = bn(2, width)
        self.layer1 = Block(width, width, 1, bn)
        self.layer2 = Block(width, 2 * width, 2, bn)
        self.head_bn = bn(1, 2 * width)
        self.fc1 = nn.Linear(2 * width, 16, bias=False)
        self.fc1_bn = bn(1, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (N, C)
        x = self.head_bn(x)
        return self.fc2(F.relu(self.fc1_bn(self.fc1(x))))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm layer random affine parameters and running statistics (far
    from the identity, so a fold that ignored one would show), and return the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            c = module.num_features

            def draw(low: float, high: float, ref: Tensor, c: int = c) -> Tensor:
                value = low + (high - low) * torch.rand(c, generator=generator, dtype=torch.float64)
                return value.to(ref.dtype)

            if module.weight is not None:
                module.weight.copy_(draw(0.5, 2.0, module.weight))
            if module.bias is not None:
                module.bias.copy_(draw(-1.0, 1.0, module.bias))
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(draw(-0.5, 0.5, module.running_mean))
                module.running_var.copy_(draw(0.3, 3.0, module.running_var))
                module.num_batches_tracked.fill_(7)
    return model


def resnet(
    bn: BatchNormFactory = torch_bn, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> ResNet:
    torch.manual_seed(seed)
    return randomize(ResNet(bn), seed).to(dtype)


class ScaledBatchNorm2d(bnkit.BatchNorm2d):
    """A bnkit layer with an extra that changes its eval output beyond an affine map and
    that the tools do not know (``output_power=``): what to_torch must refuse and fold
    must keep."""

    def __init__(self, *args: object, output_power: int = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.output_power = output_power

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) ** self.output_power


def batch_norm_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)]
