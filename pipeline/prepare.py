"""Turn a source dataset into FFCV datasets, one per split, plus its label map."""

import gzip
import json
import logging
import pickle
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets import DATASET_FORMAT, DatasetInfo, SplitInfo
from pipeline.errors import DataError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DATASETS = ("fashion-mnist", "cifar10", "imagenet", "folder")


@dataclass(frozen=True)
class PrepareSettings:
    dataset: str
    src: Path | None
    out: Path
    holdout: int = 0
    seed: int = 0
    max_resolution: int = 256
    workers: int = 2


@dataclass
class ArraySplit:
    """Images held in memory as (N, H, W, C) uint8, with their labels."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class FileSplit:
    """Image files on disk, with their labels."""

    paths: list[Path]
    labels: np.ndarray


class _ArrayRows:
    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        return self.split.images[i], int(self.split.labels[i])


class _FileRows:
    def __init__(self, split: FileSplit):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.split.paths[i]) as img:
            rgb = np.asarray(img.convert("RGB"))
        return rgb, int(self.split.labels[i])


def prepare(settings: PrepareSettings) -> DatasetInfo:
    """Read the source, write ``<split>.beton`` files, ``labels.json`` and ``dataset.json``."""
    if settings.dataset not in DATASETS:
        raise DataError(f"unknown dataset {settings.dataset!r}; choose one of {list(DATASETS)}")
    started = time.perf_counter()

    if settings.dataset == "fashion-mnist":
        classes, splits = _read_fashion_mnist(settings.src or FASHION_MNIST_DIR)
    elif settings.dataset == "cifar10":
        classes, splits = _read_cifar10(_require_src(settings))
    else:
        classes, splits = _read_class_folders(_require_src(settings))
    splits = _split_holdout(splits, settings.holdout, settings.seed)

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    # Until the new dataset.json is written, the folder holds no dataset at all.
    (out / "dataset.json").unlink(missing_ok=True)
    (out / "labels.json").write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=1))
    kind = "array" if isinstance(splits["train"], ArraySplit) else "image"
    mean, std = _channel_stats(splits["train"])

    split_infos = {}
    for name, split in splits.items():
        path = out / f"{name}.beton"
        log.info("writing %d samples of split %r to %s", len(split.labels), name, path)
        _write_beton(path, split, settings)
        split_infos[name] = SplitInfo(file=path.name, count=int(len(split.labels)))

    if kind == "array":
        _, h, w, c = splits["train"].images.shape
        input_shape = (c, h, w)
    else:
        input_shape = (3, settings.max_resolution, settings.max_resolution)
    info = DatasetInfo(
        format=DATASET_FORMAT,
        name=settings.dataset,
        id=uuid.uuid4().hex,
        kind=kind,
        input_shape=input_shape,
        num_classes=len(classes),
        classes=tuple(classes),
        splits=split_infos,
        eval_split=next((s for s in ("test", "val") if s in split_infos), None),
        mean=tuple(mean),
        std=tuple(std),
        holdout=settings.holdout,
        seed=settings.seed,
    )
    info.save(out)
    log.info("prepared %s in %.1f s", settings.dataset, time.perf_counter() - started)
    return info


def _require_src(settings: PrepareSettings) -> Path:
    if settings.src is None:
        raise DataError(f"prepare {settings.dataset} needs SRC, the folder of the source files")
    if not settings.src.is_dir():
        raise DataError(f"source folder {settings.src} does not exist")
    return settings.src


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes, its header promises {expected}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(src: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (src / name).is_file():
            return src / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {src}; install the Debian package "
        "dataset-fashion-mnist or pass the folder holding the IDX files as SRC"
    )


def _read_fashion_mnist(src: Path) -> tuple[list[str], dict[str, ArraySplit]]:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(src, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(src, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{split}: {len(images)} images but {len(labels)} labels in {src}")
        splits[split] = ArraySplit(images[..., None].copy(), labels)
    return list(FASHION_MNIST_CLASSES), splits


def _read_cifar10(src: Path) -> tuple[list[str], dict[str, ArraySplit]]:
    def load(name):
        path = src / name
        if not path.is_file():
            raise DataError(
                f"CIFAR-10 batch {path} not found; SRC must be the cifar-10-batches-py folder"
            )
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")

    meta = load("batches.meta")
    classes = [name.decode() for name in meta[b"label_names"]]
    splits = {}
    for split, names in (
        ("train", [f"data_batch_{i}" for i in range(1, 6)]),
        ("test", ["test_batch"]),
    ):
        batches = [load(n) for n in names]
        data = np.concatenate([b[b"data"] for b in batches])
        labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches]).astype(np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        splits[split] = ArraySplit(images, labels)
    return classes, splits


def _sorted_classes(names: list[str]) -> list[str]:
    if all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _read_class_folders(src: Path) -> tuple[list[str], dict[str, FileSplit]]:
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise DataError(f"{src} has no train/ folder; expected SRC/train/<class>/<image>")
    classes = _sorted_classes([d.name for d in train_dir.iterdir() if d.is_dir()])
    if not classes:
        raise DataError(f"{train_dir} holds no class folders")
    index = {c: i for i, c in enumerate(classes)}

    splits = {}
    for split in ("train", "val"):
        root = src / split
        if split == "val" and not root.is_dir():
            continue
        present = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not present:
            raise DataError(
                f"{root} holds no class folders; a flat validation folder needs its labels "
                "(not yet supported: move the images into <class>/ folders)"
            )
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DataError(f"{root} has classes not in train/: {unknown[:10]}")
        paths, labels = [], []
        for name in present:
            for p in sorted((root / name).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(p)
                    labels.append(index[name])
        if not paths:
            raise DataError(f"{root} holds no image files ({sorted(IMAGE_SUFFIXES)})")
        splits[split] = FileSplit(paths, np.asarray(labels, dtype=np.int64))
    return classes, splits


def _split_holdout(splits: dict, holdout: int, seed: int) -> dict:
    if holdout == 0:
        return splits
    train = splits["train"]
    n = len(train.labels)
    if not 0 < holdout < n:
        raise DataError(
            f"--holdout {holdout} keeps too many samples: give 0 (none) up to {n - 1} "
            f"of the {n} training samples"
        )
    order = np.random.default_rng(seed).permutation(n)
    keep, held = np.sort(order[holdout:]), np.sort(order[:holdout])
    out = {"train": _take(train, keep), "holdout": _take(train, held)}
    out.update((name, split) for name, split in splits.items() if name != "train")
    return out


def _take(split, idx: np.ndarray):
    if isinstance(split, ArraySplit):
        return ArraySplit(split.images[idx], split.labels[idx])
    return FileSplit([split.paths[i] for i in idx], split.labels[idx])


def _channel_stats(split) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values in [0, 1], over the training split."""
    if isinstance(split, ArraySplit):
        pixels = split.images.reshape(-1, split.images.shape[-1]).astype(np.float64) / 255
        return pixels.mean(0).tolist(), pixels.std(0).tolist()
    rows = _FileRows(split)
    pick = np.random.default_rng(0).permutation(len(rows))[:500]
    sums, sq, count = np.zeros(3), np.zeros(3), 0
    for i in pick:
        img = rows[int(i)][0].reshape(-1, 3).astype(np.float64) / 255
        sums += img.sum(0)
        sq += (img**2).sum(0)
        count += len(img)
    mean = sums / count
    return mean.tolist(), np.sqrt(sq / count - mean**2).tolist()


def _write_beton(path: Path, split, settings: PrepareSettings) -> None:
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    if isinstance(split, ArraySplit):
        image_field = NDArrayField(dtype=np.dtype("uint8"), shape=split.images.shape[1:])
        rows = _ArrayRows(split)
    else:
        image_field = RGBImageField(write_mode="jpg", max_resolution=settings.max_resolution)
        rows = _FileRows(split)
    tmp = path.with_suffix(".beton.partial")
    writer = DatasetWriter(
        str(tmp), {"image": image_field, "label": IntField()}, num_workers=settings.workers
    )
    writer.from_indexed_dataset(rows, shuffle_indices=False)
    tmp.replace(path)
