"""Source datasets as they come: IDX files, CIFAR python batches, class-folder trees.

Each reader returns the label map and the splits, images in memory (:class:`ArraySplit`)
or files on disk (:class:`FileSplit`); nothing is decoded here.
"""

import gzip
import io
import logging
import pickle
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.images import SUFFIX_FORMATS

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
IMAGE_SUFFIXES = frozenset(SUFFIX_FORMATS)
DEVKIT_NAME = "ILSVRC2012_devkit_t12"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})$")


@dataclass(frozen=True)
class LabelMap:
    """Class names in label order, and how that order was decided."""

    classes: tuple[str, ...]
    rule: str

    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


@dataclass
class ArraySplit:
    """Images held in memory as (N, H, W, C) uint8, with their labels.

    ``sources[i]`` is row i's index in the source split, kept through holdout draws.
    """

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray


@dataclass
class FileSplit:
    """Image files under ``root``, with their labels."""

    root: Path
    paths: list[Path]
    labels: np.ndarray
    ignored: Counter  # files left out by their suffix: suffix -> count


@dataclass(frozen=True)
class SourceSettings:
    dataset: str
    src: Path | None
    devkit: Path | None = None


def read_source(settings: SourceSettings) -> tuple[LabelMap, dict]:
    """The label map and the splits of ``settings.dataset``."""
    if settings.dataset == "fashion-mnist":
        return _read_fashion_mnist(settings.src or FASHION_MNIST_DIR)
    src = _require_src(settings)
    if settings.dataset == "cifar10":
        return _read_cifar(src, "cifar-10-batches-py", CIFAR10_LAYOUT)
    if settings.dataset == "cifar100":
        return _read_cifar(src, "cifar-100-python", CIFAR100_LAYOUT)
    return _read_class_folders(src, settings)


def sort_classes(names: list[str]) -> LabelMap:
    """Names sorted as text (as torchvision's ImageFolder does), or as numbers when
    every name is an integer."""
    if names and all(re.fullmatch(r"[0-9]+", n) for n in names):
        return LabelMap(tuple(sorted(names, key=lambda n: (int(n), n))), "sorted as numbers")
    return LabelMap(tuple(sorted(names)), "sorted as text")


def _require_src(settings: SourceSettings) -> Path:
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


def _read_fashion_mnist(src: Path) -> tuple[LabelMap, dict[str, ArraySplit]]:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(src, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(src, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{split}: {len(images)} images but {len(labels)} labels in {src}")
        splits[split] = ArraySplit(images[..., None].copy(), labels, np.arange(len(labels)))
    return LabelMap(FASHION_MNIST_CLASSES, "the dataset's published order"), splits


@dataclass(frozen=True)
class CifarLayout:
    meta: str
    names_key: bytes
    labels_key: bytes
    splits: tuple[tuple[str, tuple[str, ...]], ...]


CIFAR10_LAYOUT = CifarLayout(
    meta="batches.meta",
    names_key=b"label_names",
    labels_key=b"labels",
    splits=(
        ("train", tuple(f"data_batch_{i}" for i in range(1, 6))),
        ("test", ("test_batch",)),
    ),
)
CIFAR100_LAYOUT = CifarLayout(
    meta="meta",
    names_key=b"fine_label_names",
    labels_key=b"fine_labels",
    splits=(("train", ("train",)), ("test", ("test",))),
)


def _read_cifar(
    src: Path, folder: str, layout: CifarLayout
) -> tuple[LabelMap, dict[str, ArraySplit]]:
    def load(name):
        path = src / name
        if not path.is_file():
            raise DataError(f"CIFAR file {path} not found; SRC must be the {folder} folder")
        with open(path, "rb") as f:
            try:
                batch = pickle.load(f, encoding="bytes")
            except (pickle.UnpicklingError, EOFError, ValueError) as err:
                raise DataError(f"{path} is not a CIFAR python batch ({err})") from err
        if not isinstance(batch, dict):
            raise DataError(f"{path} is not a CIFAR python batch (holds a {type(batch)})")
        return batch

    meta = load(layout.meta)
    if layout.names_key not in meta:
        raise DataError(f"{src / layout.meta} has no {layout.names_key.decode()} entry")
    classes = tuple(name.decode() for name in meta[layout.names_key])
    splits = {}
    for split, names in layout.splits:
        batches = [load(n) for n in names]
        for name, batch in zip(names, batches, strict=True):
            if b"data" not in batch or layout.labels_key not in batch:
                raise DataError(
                    f"{src / name} lacks b'data' or {layout.labels_key!r}; is SRC the "
                    f"{folder} folder?"
                )
        data = np.concatenate([b[b"data"] for b in batches])
        labels = np.concatenate([np.asarray(b[layout.labels_key]) for b in batches])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DataError(
                f"{split} of {src}: data {data.shape} and {len(labels)} labels, expected "
                "(N, 3072) and N"
            )
        if labels.min() < 0 or labels.max() >= len(classes):
            raise DataError(f"{split} of {src} has labels outside 0..{len(classes) - 1}")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        splits[split] = ArraySplit(images, labels.astype(np.int64), np.arange(len(labels)))
    return LabelMap(classes, f"the order of {layout.meta}"), splits


def _image_files(folder: Path) -> tuple[list[Path], Counter]:
    """Files under ``folder`` with an image suffix, in sorted order; the others counted."""
    paths, ignored = [], Counter()
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(path)
        else:
            ignored[path.suffix.lower() or "(none)"] += 1
    return paths, ignored


def _class_dirs(root: Path) -> list[str]:
    return [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]


def _read_class_folders(src: Path, settings: SourceSettings) -> tuple[LabelMap, dict]:
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise DataError(f"{src} has no train/ folder; expected SRC/train/<class>/<image>")
    labels = sort_classes(_class_dirs(train_dir))
    if not labels.classes:
        raise DataError(f"{train_dir} holds no class folders; expected {train_dir}/<class>/")

    splits = {"train": _read_split_folders(train_dir, labels)}
    val_dir = src / "val"
    if val_dir.is_dir():
        if _class_dirs(val_dir):
            splits["val"] = _read_split_folders(val_dir, labels)
        else:
            splits["val"] = _read_flat_val(val_dir, labels, src, settings)
    return labels, splits


def _read_split_folders(root: Path, labels: LabelMap) -> FileSplit:
    present = set(_class_dirs(root))
    missing = sorted(set(labels.classes) - present)
    extra = sorted(present - set(labels.classes))
    if missing or extra:
        raise DataError(
            f"the classes of {root} differ from train/'s: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), not in train/ "
            f"{extra[:10]}{' ...' if len(extra) > 10 else ''} ({len(extra)}); every split "
            "needs the same class folders"
        )
    index = labels.index()
    paths, targets, ignored = [], [], Counter()
    for name in labels.classes:
        files, left_out = _image_files(root / name)
        paths += files
        targets += [index[name]] * len(files)
        ignored += left_out
    loose, _ = _image_files_top(root)
    if loose:
        log.warning("%s: %d image files outside class folders are left out", root, len(loose))
        ignored["(outside class folders)"] += len(loose)
    if not paths:
        raise DataError(f"{root} holds no image files ({sorted(IMAGE_SUFFIXES)})")
    return FileSplit(root, paths, np.asarray(targets, dtype=np.int64), ignored)


def _image_files_top(root: Path) -> tuple[list[Path], Counter]:
    files = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, Counter(p.suffix.lower() for p in files if p not in images)


def _read_flat_val(root: Path, labels: LabelMap, src: Path, settings: SourceSettings):
    paths, ignored = _image_files_top(root)
    if not paths:
        raise DataError(f"{root} holds neither class folders nor image files")
    devkit = settings.devkit
    if devkit is None and settings.dataset == "imagenet":
        devkit = next(
            (p for p in (src / DEVKIT_NAME, src / f"{DEVKIT_NAME}.tar.gz") if p.exists()), None
        )
    if devkit is None:
        remedy = (
            f"pass --devkit PATH ({DEVKIT_NAME} folder or .tar.gz holding {DEVKIT_TRUTH} and "
            f"{DEVKIT_META}), or place it at {src / DEVKIT_NAME}"
            if settings.dataset == "imagenet"
            else "move them into <class>/ folders as in train/"
        )
        raise DataError(
            f"{root} holds {len(paths)} image files and no class folders, and nothing "
            f"labels them; {remedy}"
        )
    synsets, truth = read_devkit(devkit)
    index = labels.index()
    targets = []
    for path in paths:
        match = VAL_NAME.match(path.stem)
        if match is None:
            raise DataError(
                f"{path} is not named ILSVRC2012_val_<8 digits>; the devkit's ground truth "
                "labels validation images by that number"
            )
        number = int(match.group(1))
        if not 1 <= number <= len(truth):
            raise DataError(
                f"{path} is image {number}, the ground truth in {devkit} covers 1..{len(truth)}"
            )
        synset = synsets.get(truth[number - 1])
        if synset is None:
            raise DataError(
                f"the ground truth in {devkit} gives {path.name} class id {truth[number - 1]}, "
                f"which {DEVKIT_META} does not define"
            )
        if synset not in index:
            raise DataError(f"{path.name} is labelled {synset}, which has no folder in train/")
        targets.append(index[synset])
    log.info("labelled %d flat validation images from %s", len(paths), devkit)
    return FileSplit(root, paths, np.asarray(targets, dtype=np.int64), ignored)


def read_devkit(devkit: Path) -> tuple[dict[int, str], list[int]]:
    """The ILSVRC2012 devkit's class ids -> synsets (from meta.mat) and the validation
    ground truth, as class ids in image-number order."""
    import scipy.io

    truth_bytes = _devkit_member(devkit, DEVKIT_TRUTH)
    meta_bytes = _devkit_member(devkit, DEVKIT_META)
    try:
        truth = [int(line) for line in truth_bytes.decode().split()]
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{DEVKIT_TRUTH} in {devkit} is not one class id per line") from err
    try:
        table = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        synsets = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in np.atleast_1d(table)}
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"{DEVKIT_META} in {devkit} has no readable synsets table ({err})") from err
    return synsets, truth


def _devkit_member(devkit: Path, member: str) -> bytes:
    if devkit.is_dir():
        path = devkit / member
        if not path.is_file():
            raise DataError(f"devkit {devkit} lacks {member}")
        return path.read_bytes()
    if not devkit.is_file():
        raise DataError(f"devkit {devkit} does not exist")
    try:
        with tarfile.open(devkit) as tar:
            names = [n for n in tar.getnames() if n.endswith(member)]
            if not names:
                raise DataError(f"devkit archive {devkit} lacks {member}")
            return tar.extractfile(names[0]).read()
    except tarfile.TarError as err:
        raise DataError(f"devkit {devkit} is neither a folder nor a tar archive ({err})") from err
