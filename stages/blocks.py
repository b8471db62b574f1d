"""A stage of the trunk and its auxiliary head, as modules."""

import torch
from torch import nn
from torch.nn import functional as F

from stages.arch import StageSpec
from stages.psi import space_to_depth


class Stage(nn.Module):
    """x_{j+1} = relu(BN(W_j P_j x_j)): optional psi, 3x3 conv, optional batch norm, ReLU."""

    def __init__(self, spec: StageSpec, in_channels: int):
        super().__init__()
        self.downsample = spec.downsample
        conv_in = in_channels * 4 if spec.downsample else in_channels
        self.conv = nn.Conv2d(conv_in, spec.width, 3, padding=1, bias=not spec.batch_norm)
        self.bn = nn.BatchNorm2d(spec.width) if spec.batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = space_to_depth(x)
        return F.relu(self.bn(self.conv(x)))


class AuxHead(nn.Module):
    """The auxiliary classifier C_j: k-1 convs of width M~, average to 2x2, linear."""

    def __init__(self, spec: StageSpec, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = spec.width
        for _ in range(spec.k - 1):
            layers.append(
                nn.Conv2d(channels, spec.head_width, 3, padding=1, bias=not spec.batch_norm)
            )
            if spec.batch_norm:
                layers.append(nn.BatchNorm2d(spec.head_width))
            layers.append(nn.ReLU())
            channels = spec.head_width
        self.hidden = nn.Sequential(*layers)
        self.linear = nn.Linear(channels * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.hidden(x), 2)
        return self.linear(x.flatten(1))


class Trunk(nn.Module):
    """Stages 0..n-1 applied in order; used frozen, in eval mode."""

    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x
