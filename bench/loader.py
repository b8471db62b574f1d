"""The front of the pipeline: FFCV's loader against a torchvision DataLoader over the same
JPEG files, both decoding on the CPU with the same worker count, batch size and output
(224x224 centre crops as float tensors).

The files are the 20 ImageNet photographs foolbox ships, resized to 256x256 and saved as
JPEG (quality 90), repeated; FFCV reads the dataset ``prepare`` wrote from those files
(the same size, JPEG quality 90), torchvision reads the files themselves.
"""

import tempfile
import time
from pathlib import Path

from bench.prepare import build_tree

WORKERS = 2
BATCH = 128


def ffcv_pass(data: Path, epochs: int) -> tuple[int, float]:
    from pipeline.datasets import DatasetInfo
    from pipeline.loaders import ImageLoader

    info = DatasetInfo.load(data)
    loader = ImageLoader(info, "train", BATCH, (3, 224, 224), shuffle=True, workers=WORKERS)
    for _ in loader.epoch(0):  # the first epoch compiles FFCV's pipeline
        pass
    started, count = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        for x, _ in loader.epoch(epoch):
            count += len(x)
    return count, time.perf_counter() - started


def torchvision_pass(root: Path, epochs: int) -> tuple[int, float]:
    import torch
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    transform = transforms.Compose(
        [
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    dataset = ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, persistent_workers=True
    )
    for _ in loader:  # the same warm-up epoch as FFCV's
        pass
    started, count = time.perf_counter(), 0
    for _ in range(epochs):
        for x, _ in loader:
            count += len(x)
    return count, time.perf_counter() - started


def run(small: bool = False) -> dict:
    from pipeline.prepare import PrepareSettings, prepare

    n, epochs = (256, 1) if small else (4000, 2)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        build_tree(src, n, side=256)
        prepare(PrepareSettings("folder", src, Path(tmp) / "data", max_resolution=256))
        ffcv_count, ffcv_seconds = ffcv_pass(Path(tmp) / "data", epochs)
        tv_count, tv_seconds = torchvision_pass(src / "train", epochs)
    return {
        "files": n,
        "epochs_timed": epochs,
        "workers": WORKERS,
        "batch_size": BATCH,
        "ffcv": {
            "images": ffcv_count,
            "seconds": ffcv_seconds,
            "images_per_s": ffcv_count / ffcv_seconds,
        },
        "torchvision": {
            "images": tv_count,
            "seconds": tv_seconds,
            "images_per_s": tv_count / tv_seconds,
        },
        "ffcv_speedup": (ffcv_count / ffcv_seconds) / (tv_count / tv_seconds),
    }


def show(result: dict) -> str:
    from bench.common import table

    rows = [
        [
            "FFCV Loader",
            result["ffcv"]["seconds"],
            result["ffcv"]["images_per_s"],
        ],
        [
            "torchvision ImageFolder + DataLoader",
            result["torchvision"]["seconds"],
            result["torchvision"]["images_per_s"],
        ],
    ]
    head = (
        f"{result['files']:,} files x {result['epochs_timed']} epochs, batch "
        f"{result['batch_size']}, {result['workers']} workers, 256x256 JPEGs to 224x224 "
        "centre crops; "
        f"FFCV {result['ffcv_speedup']:.2f}x"
    )
    return head + "\n" + table(["loader", "seconds", "images/s"], rows)
