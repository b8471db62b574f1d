"""Training augmentation as recorded parameters: views of a sample, drawn once, applied exactly.

A view is one augmented copy of a sample. Its parameters are a crop box in the
coordinates of the (padded) image and a flip flag; view 0 is always the un-augmented
sample. Parameters are a pure function of the seed, so a cache can record them and a
test can apply them again.

Two kinds, as in the paper's training:

- ``crop-flip`` (CIFAR and Fashion-MNIST presets): pad ``padding`` pixels on every side
  (the value of a black pixel), crop back to the input size at a random place, flip
  horizontally with probability 1/2.
- ``resized-crop`` (ImageNet presets): a box of 8% to 100% of the area and aspect ratio
  3/4 to 4/3, resized to the input size (bilinear, antialiased), flipped with
  probability 1/2.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

KINDS = ("none", "crop-flip", "resized-crop")
FIELDS = ("top", "left", "height", "width", "flip")  # one int32 row per (sample, view)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Augmentation:
    kind: str = "none"
    padding: int = 4  # crop-flip only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"augmentation {self.kind!r} is not one of {list(KINDS)}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")


def draw_views(
    aug: Augmentation, n: int, views: int, seed: int, size: tuple[int, int]
) -> np.ndarray:
    """(n, views, 5) int32 parameters; view 0 of every sample is the identity."""
    h, w = size
    rng = np.random.default_rng([seed, 0x5EED, views])
    params = np.zeros((n, views, len(FIELDS)), np.int32)
    params[:, :, 2], params[:, :, 3] = h, w
    if aug.kind == "crop-flip":
        p = aug.padding
        params[:, :, 0] = p
        params[:, :, 1] = p
        if views > 1:
            params[:, 1:, 0] = rng.integers(0, 2 * p + 1, (n, views - 1))
            params[:, 1:, 1] = rng.integers(0, 2 * p + 1, (n, views - 1))
            params[:, 1:, 4] = rng.integers(0, 2, (n, views - 1))
    elif aug.kind == "resized-crop" and views > 1:
        boxes = _resized_crop_boxes(rng, n * (views - 1), h, w)
        params[:, 1:, :4] = boxes.reshape(n, views - 1, 4)
        params[:, 1:, 4] = rng.integers(0, 2, (n, views - 1))
    return params


def fresh_views(aug: Augmentation, n: int, seed: int, epoch: int, step: int, size) -> np.ndarray:
    """(n, 5) parameters of a fresh random augmentation of each sample of one batch:
    what training with the trunk recomputed applies at every step, as the authors did."""
    if aug.kind == "none":
        return draw_views(aug, n, 1, seed, size)[:, 0]
    h, w = size
    rng = np.random.default_rng([seed, epoch, step, 0xF2E5])
    params = np.zeros((n, len(FIELDS)), np.int32)
    if aug.kind == "crop-flip":
        params[:, 0] = rng.integers(0, 2 * aug.padding + 1, n)
        params[:, 1] = rng.integers(0, 2 * aug.padding + 1, n)
        params[:, 2], params[:, 3] = h, w
    else:
        params[:, :4] = _resized_crop_boxes(rng, n, h, w)
    params[:, 4] = rng.integers(0, 2, n)
    return params


def view_choice(n: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """Which view of each of ``n`` positions an epoch trains on: a pure function."""
    if views == 1:
        return np.zeros(n, np.int64)
    return np.random.default_rng([seed, epoch, 0xC401CE]).integers(0, views, n)


def apply_views(
    aug: Augmentation, x: torch.Tensor, params: np.ndarray, fill: torch.Tensor
) -> torch.Tensor:
    """Apply one parameter row per sample to a (B, C, H, W) batch.

    ``fill`` (C,) is the value padding takes: a black pixel after normalisation.
    """
    if aug.kind == "none":
        return x
    b, c, h, w = x.shape
    p = torch.as_tensor(params, dtype=torch.int64)
    if aug.kind == "crop-flip":
        pad = aug.padding
        padded = fill.view(1, c, 1, 1).to(x.dtype).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad : pad + h, pad : pad + w] = x
        rows = p[:, 0:1] + torch.arange(h)  # (B, H)
        cols = p[:, 1:2] + torch.arange(w)  # (B, W)
        cols = torch.where(p[:, 4:5].bool(), cols.flip(1), cols)
        batch = torch.arange(b)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    out = torch.empty_like(x)
    for i in range(b):
        top, left, bh, bw, flip = (int(v) for v in p[i])
        crop = x[i : i + 1, :, top : top + bh, left : left + bw]
        if (bh, bw) != (h, w):
            crop = F.interpolate(
                crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )
        out[i] = crop[0].flip(-1) if flip else crop[0]
    return out


def _resized_crop_boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, 4) boxes (top, left, height, width) as in the Inception crop: ten tries at a
    random area and aspect ratio, else the centre at the ratio clamped to its range."""
    tries = 10
    area = h * w * rng.uniform(*SCALE, size=(n, tries))
    ratio = np.exp(rng.uniform(np.log(RATIO[0]), np.log(RATIO[1]), size=(n, tries)))
    bw = np.rint(np.sqrt(area * ratio)).astype(np.int64)
    bh = np.rint(np.sqrt(area / ratio)).astype(np.int64)
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    pick = fits.argmax(axis=1)
    rows = np.arange(n)
    bh, bw, found = bh[rows, pick], bw[rows, pick], fits[rows, pick]
    top = (rng.uniform(size=n) * (h - bh + 1)).astype(np.int64)
    left = (rng.uniform(size=n) * (w - bw + 1)).astype(np.int64)

    # No fit in ten tries: the whole image's centre at the nearest allowed ratio.
    if w / h < RATIO[0]:
        fh, fw = int(round(w / RATIO[0])), w
    elif w / h > RATIO[1]:
        fh, fw = h, int(round(h * RATIO[1]))
    else:
        fh, fw = h, w
    bh, bw = np.where(found, bh, fh), np.where(found, bw, fw)
    top = np.where(found, top, (h - fh) // 2)
    left = np.where(found, left, (w - fw) // 2)
    return np.stack([top, left, bh, bw], axis=1).astype(np.int32)


def augmentation_of(arch) -> Augmentation:
    """The architecture's training augmentation."""
    return Augmentation(arch.training.augmentation, arch.training.crop_padding)


def black(info) -> torch.Tensor:
    """A black pixel after the dataset's normalisation: what padding fills with."""
    return -torch.tensor(info.mean, dtype=torch.float32) / torch.tensor(info.std)


class FreshAugmentation:
    """An image loader whose every batch gets a fresh random augmentation, drawn from the
    seed, the epoch and the batch's index: the authors' way, with the trunk recomputed."""

    def __init__(self, loader, aug: Augmentation, fill: torch.Tensor, seed: int, size):
        self.loader, self.aug, self.fill, self.seed, self.size = loader, aug, fill, seed, size
        self.num_samples = loader.num_samples
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0):
        for step, (x, y) in enumerate(self.loader.epoch(epoch, start), start=start):
            params = fresh_views(self.aug, len(x), self.seed, epoch, step, self.size)
            yield apply_views(self.aug, x, params, self.fill), y
