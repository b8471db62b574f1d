"""The invertible 2x2 space-to-depth operator (the paper's psi) and its inverse."""

import torch
from torch import nn


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """Rearrange (N, C, H, W) into (N, 4C, H/2, W/2) without losing a value.

    Output channel ``4 * c + 2 * dy + dx`` holds pixel ``(2i + dy, 2j + dx)`` of input
    channel ``c`` at position ``(i, j)``.
    """
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"space_to_depth needs an even height and width, got {h}x{w}; "
            "choose an input size divisible by 2 at every downsampling stage"
        )
    x = x.reshape(n, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def depth_to_space(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`: (N, 4C, H, W) -> (N, C, 2H, 2W)."""
    n, c4, h, w = x.shape
    if c4 % 4:
        raise ValueError(f"depth_to_space needs channels divisible by 4, got {c4}")
    c = c4 // 4
    x = x.reshape(n, c, 2, 2, h, w)
    x = x.permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c, h * 2, w * 2)


class SpaceToDepth(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return space_to_depth(x)


class DepthToSpace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(x)
