"""Views: parameters drawn from the seed, applied exactly, chosen per epoch reproducibly."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from pipeline.augment import Augmentation, apply_views, draw_views, fresh_views, view_choice

FILL = torch.tensor([-1.0, -2.0, -3.0])


def batch(n=6, h=12, w=10):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["crop-flip", "resized-crop"])
def test_view_zero_is_the_sample(kind):
    aug = Augmentation(kind, padding=3)
    x = batch()
    params = draw_views(aug, len(x), 4, seed=1, size=(12, 10))
    assert torch.equal(apply_views(aug, x, params[:, 0], FILL), x)


def test_crop_flip_matches_pad_crop_flip_per_sample():
    aug = Augmentation("crop-flip", padding=3)
    x = batch()
    params = draw_views(aug, len(x), 5, seed=2, size=(12, 10))
    for v in range(5):
        got = apply_views(aug, x, params[:, v], FILL)
        for i in range(len(x)):
            top, left, h, w, flip = params[i, v]
            padded = torch.stack(
                [F.pad(x[i, c], (3, 3, 3, 3), value=float(FILL[c])) for c in range(3)]
            )
            want = padded[:, top : top + h, left : left + w]
            want = want.flip(-1) if flip else want
            assert torch.equal(got[i], want), (v, i)
    assert (params[:, 1:, :2] != 3).any() and params[:, 1:, 4].any()


def test_resized_crop_matches_torchvision():
    aug = Augmentation("resized-crop")
    x = batch(4, 32, 32)
    params = draw_views(aug, len(x), 3, seed=3, size=(32, 32))
    got = apply_views(aug, x, params[:, 2], FILL)
    for i in range(len(x)):
        top, left, h, w, flip = (int(v) for v in params[i, 2])
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
        want = TF.resized_crop(x[i], top, left, h, w, [32, 32], antialias=True)
        want = want.flip(-1) if flip else want
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_views_and_choices_are_pure_functions_of_the_seed():
    aug = Augmentation("crop-flip", padding=2)
    a = draw_views(aug, 100, 4, seed=5, size=(28, 28))
    assert np.array_equal(a, draw_views(aug, 100, 4, seed=5, size=(28, 28)))
    assert not np.array_equal(a, draw_views(aug, 100, 4, seed=6, size=(28, 28)))
    c = view_choice(1000, 4, seed=5, epoch=2)
    assert np.array_equal(c, view_choice(1000, 4, seed=5, epoch=2))
    assert not np.array_equal(c, view_choice(1000, 4, seed=5, epoch=3))
    assert set(np.unique(c)) == {0, 1, 2, 3}
    assert np.array_equal(view_choice(10, 1, seed=5, epoch=2), np.zeros(10))


def test_fresh_views_change_with_the_step():
    aug = Augmentation("crop-flip", padding=4)
    a = fresh_views(aug, 64, seed=1, epoch=0, step=0, size=(32, 32))
    b = fresh_views(aug, 64, seed=1, epoch=0, step=1, size=(32, 32))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, fresh_views(aug, 64, seed=1, epoch=0, step=0, size=(32, 32)))
    assert a[:, :2].min() >= 0 and a[:, :2].max() <= 8


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="augmentation 'mixup' is not one of"):
        Augmentation("mixup")
