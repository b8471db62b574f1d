import pytest
import torch

from stages.psi import DepthToSpace, SpaceToDepth, depth_to_space, space_to_depth


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 28, 28), (4, 12, 8, 16), (1, 256, 14, 14)])
def test_space_to_depth_is_exactly_invertible(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y = space_to_depth(x)
    n, c, h, w = shape
    assert y.shape == (n, 4 * c, h // 2, w // 2)
    assert torch.equal(depth_to_space(y), x)
    assert torch.equal(space_to_depth(depth_to_space(y)), y)


def test_space_to_depth_layout():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = space_to_depth(x)
    # Channel 2*dy + dx holds pixel (2i + dy, 2j + dx).
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_space_to_depth_keeps_every_value():
    x = torch.randn(2, 5, 6, 10)
    assert torch.equal(space_to_depth(x).flatten().sort().values, x.flatten().sort().values)


def test_modules_match_functions():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(SpaceToDepth()(x), space_to_depth(x))
    assert torch.equal(DepthToSpace()(SpaceToDepth()(x)), x)


def test_odd_sizes_are_refused():
    with pytest.raises(ValueError, match="even height and width, got 7x8"):
        space_to_depth(torch.zeros(1, 1, 7, 8))
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        depth_to_space(torch.zeros(1, 6, 2, 2))
