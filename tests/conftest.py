"""Small datasets made on the spot: Fashion-MNIST-shaped IDX files, CIFAR batches, folders."""

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.prepare import PrepareSettings, prepare


def pattern_images(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus a bright square whose place depends on the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    step = size // 5
    for i, c in enumerate(labels):
        top, left = (c // 5) * (size // 2) + 2, (c % 5) * step
        images[i, top : top + step, left : left + step] = 230
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fmnist_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("fmnist-src")
    for prefix, n, seed in (("train", 512, 0), ("t10k", 128, 1)):
        images, labels = pattern_images(n, 28, 1, seed)
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return src


@pytest.fixture(scope="session")
def tiny_data(fmnist_src, tmp_path_factory) -> Path:
    """A prepared 512/128-sample dataset; shared by tests, never written to."""
    out = tmp_path_factory.mktemp("fmnist-data")
    prepare(PrepareSettings(dataset="fashion-mnist", src=fmnist_src, out=out))
    return out


TINY_ARCH = {
    "name": "tiny",
    "input_shape": [1, 28, 28],
    "num_classes": 10,
    "stages": [
        {"width": 8, "downsample": True, "batch_norm": True, "k": 2, "head_width": 8},
        {"width": 8, "downsample": False, "batch_norm": True, "k": 1},
        {"width": 16, "downsample": True, "batch_norm": False, "k": 2, "head_width": 16},
    ],
    "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
}


@pytest.fixture
def tiny_arch(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_ARCH))
    return path


@pytest.fixture
def cifar_src(tmp_path) -> Path:
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(batches):
        images, labels = pattern_images(20, 32, 3, i)
        data = images.transpose(0, 3, 1, 2).reshape(20, -1)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    return src


@pytest.fixture
def folder_src(tmp_path) -> Path:
    from PIL import Image

    src = tmp_path / "folder"
    for split, n, seed in (("train", 40, 0), ("val", 20, 1)):
        images, labels = pattern_images(n, 40, 3, seed)
        for i, (img, c) in enumerate(zip(images, labels, strict=True)):
            folder = src / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    return src
