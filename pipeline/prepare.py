"""Turn a source dataset into FFCV datasets, one per split, plus its label map.

Image files go through two passes. The scan decodes every file strictly, in parallel,
and decides which are written; the size checks and the projected size come from it,
so that nothing is written when a file would not fit. The write then decodes the good
files again inside FFCV's writer processes, in an order shuffled with the recorded seed.
"""

import json
import logging
import os
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.datasets import DATASET_FORMAT, DatasetInfo, SplitInfo
from pipeline.errors import DataError
from pipeline.images import BadImage, ImageReport, read_rgb
from pipeline.progress import BarFactory, open_bar
from pipeline.sources import ArraySplit, FileSplit, SourceSettings, read_source

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "folder")
WRITE_MODES = ("jpg", "raw")
PAGE_SIZE = 8 << 20  # FFCV's default page; no stored sample may exceed it
REPORT_FILE = "prepare-report.json"


@dataclass(frozen=True)
class PrepareSettings:
    dataset: str
    src: Path | None
    out: Path
    holdout: int = 0
    seed: int = 0
    max_resolution: int = 500  # longest stored side of file images; 0 keeps every size
    write_mode: str = "jpg"
    jpeg_quality: int = 90
    workers: int = 2
    strict: bool = False
    devkit: Path | None = None
    overwrite: bool = False
    page_size: int = PAGE_SIZE
    progress: BarFactory | None = None


@dataclass
class SplitScan:
    """What the scan of one file split found."""

    good: np.ndarray  # indices into the split's files
    reports: list  # ImageReport per good file, in the order of ``good``
    bad: list[tuple[str, str]]  # (path, reason)
    pixel_sums: np.ndarray  # (3, 3): per channel, sum and sum of squares of [0, 1] values, count


@dataclass
class PrepareReport:
    """The summary of one prepare: what was written, skipped and converted."""

    dataset: str
    out: str
    label_rule: str
    first_labels: list[tuple[str, int]]
    written: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)  # source mode -> files
    misnamed: list[tuple[str, str]] = field(default_factory=list)  # (path, real format)
    ignored: dict[str, int] = field(default_factory=dict)  # suffix -> files left out
    projected_bytes: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    scan_seconds: float = 0.0
    write_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return sum(self.written.values()) / max(self.seconds, 1e-9)

    def save(self, root: Path) -> None:
        data = asdict(self) | {"images_per_s": self.images_per_s}
        (root / REPORT_FILE).write_text(json.dumps(data, indent=1))


def prepare(settings: PrepareSettings) -> tuple[DatasetInfo, PrepareReport]:
    """Read the source, write ``<split>.beton`` files, ``labels.json`` and ``dataset.json``."""
    _check_settings(settings)
    _refuse_existing(settings.out, settings.overwrite)
    started = time.perf_counter()
    labels, splits = read_source(SourceSettings(settings.dataset, settings.src, settings.devkit))
    splits = _split_holdout(splits, settings.holdout, settings.seed)
    report = PrepareReport(
        dataset=settings.dataset,
        out=str(settings.out),
        label_rule=labels.rule,
        first_labels=[(c, i) for i, c in enumerate(labels.classes[:5])],
    )
    log.info(
        "labels: %d classes, %s: %s%s",
        len(labels.classes),
        labels.rule,
        ", ".join(f"{c} -> {i}" for c, i in report.first_labels),
        ", ..." if len(labels.classes) > 5 else "",
    )

    # Scan every file, then check sizes: all before anything is written.
    scan_started = time.perf_counter()
    scans = _scan_files(splits, settings)
    report.scan_seconds = time.perf_counter() - scan_started
    for name, scan in scans.items():
        _account(report, splits[name], scan)
    _refuse_bad(report, settings)
    report.bytes_read += sum(
        int(split.images.nbytes) for split in splits.values() if isinstance(split, ArraySplit)
    )
    for name, split in splits.items():
        # Each writer process fills pages of its own: up to one page each left part empty.
        padding = settings.workers * settings.page_size
        report.projected_bytes[name] = _check_sizes(split, scans.get(name), settings) + padding
    _log_projection(report, settings)

    out = settings.out
    _claim_out(out, settings.overwrite)
    (out / "labels.json").write_text(json.dumps(labels.index(), indent=1))
    kind = "array" if isinstance(splits["train"], ArraySplit) else "image"
    mean, std = _channel_stats(splits["train"], scans.get("train"))

    split_infos = {}
    write_started = time.perf_counter()
    for k, (name, split) in enumerate(splits.items()):
        rows = _good_rows(split, scans.get(name))
        order = rows[np.random.default_rng([settings.seed, k]).permutation(len(rows))]
        path = out / f"{name}.beton"
        log.info("writing %d samples of split %r to %s", len(order), name, path)
        _write_beton(path, split, order, settings)
        _write_sources(out / f"{name}.sources.txt", split, order)
        split_infos[name] = SplitInfo(file=path.name, count=len(order))
        report.written[name] = len(order)
        report.bytes_written += path.stat().st_size
    report.write_seconds = time.perf_counter() - write_started

    info = DatasetInfo(
        format=DATASET_FORMAT,
        name=settings.dataset,
        id=uuid.uuid4().hex,
        kind=kind,
        input_shape=_input_shape(splits["train"], settings),
        num_classes=len(labels.classes),
        classes=labels.classes,
        splits=split_infos,
        eval_split=next((s for s in ("test", "val") if s in split_infos), None),
        mean=tuple(mean),
        std=tuple(std),
        holdout=settings.holdout,
        seed=settings.seed,
        label_rule=labels.rule,
    )
    report.seconds = time.perf_counter() - started
    report.save(out)
    info.save(out)
    log.info("prepared %s in %.1f s", settings.dataset, report.seconds)
    return DatasetInfo.load(out), report


def _check_settings(settings: PrepareSettings) -> None:
    if settings.dataset not in DATASETS:
        raise DataError(f"unknown dataset {settings.dataset!r}; choose one of {list(DATASETS)}")
    if settings.write_mode not in WRITE_MODES:
        raise DataError(
            f"unknown write mode {settings.write_mode!r}; choose one of {list(WRITE_MODES)}"
        )
    if settings.max_resolution < 0:
        raise DataError(
            f"--max-resolution {settings.max_resolution} is negative; give 0 (keep every "
            "size) or the longest side to store, e.g. 500"
        )


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if (out / "dataset.json").exists() and not overwrite:
        raise DataError(
            f"{out} already holds a prepared dataset; runs made from it would lose their "
            "data. Choose another --out, or pass --overwrite to replace it"
        )


def _claim_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` ready; a prepared dataset there is replaced only when asked."""
    _refuse_existing(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    # Until the new dataset.json is written, the folder holds no dataset at all.
    (out / "dataset.json").unlink(missing_ok=True)


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
        return ArraySplit(split.images[idx], split.labels[idx], split.sources[idx])
    paths = [split.paths[i] for i in idx]
    return FileSplit(split.root, paths, split.labels[idx], split.ignored)


def _scan_one(path: Path) -> tuple[ImageReport, np.ndarray] | str:
    """The file's report and its pixel sums (per channel: sum, sum of squares, count),
    or why it is bad."""
    try:
        rgb, report = read_rgb(path)
    except BadImage as err:
        return str(err)
    except OSError as err:
        return f"unreadable ({err})"
    # Per-channel histograms give exact sums at a fraction of a float pass's cost.
    flat = rgb.reshape(-1, 3)
    hist = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)])
    values = np.arange(256) / 255
    sums = np.stack([hist @ values, hist @ values**2, np.full(3, len(flat))])
    return report, sums


def _scan_files(splits: dict, settings: PrepareSettings) -> dict[str, SplitScan]:
    """Decode every file of every file split strictly, with ``settings.workers`` processes."""
    files = {name: split for name, split in splits.items() if isinstance(split, FileSplit)}
    if not files:
        return {}
    scans = {}
    with ProcessPoolExecutor(settings.workers) as pool:
        for name, split in files.items():
            scans[name] = _scan(name, split, pool, settings)
    return scans


def _scan(name: str, split: FileSplit, pool, settings: PrepareSettings) -> SplitScan:
    results = []
    bar = open_bar(settings.progress, len(split.paths), f"scan {name}", "img")
    chunk = max(1, min(64, len(split.paths) // (8 * settings.workers)))
    for result in pool.map(_scan_one, split.paths, chunksize=chunk):
        results.append(result)
        bar.update(1)
    bar.close()

    good, reports, bad, sums = [], [], [], np.zeros((3, 3))
    for i, (path, result) in enumerate(zip(split.paths, results, strict=True)):
        if isinstance(result, str):
            log.warning("skipping %s: %s", path, result)
            bad.append((str(path), result))
        else:
            good.append(i)
            reports.append(result[0])
            sums += result[1]
    if not good:
        raise DataError(
            f"split {name!r}: none of the {len(split.paths)} files in {split.root} "
            "is a readable image"
        )
    return SplitScan(np.asarray(good, dtype=np.int64), reports, bad, sums)


def _account(report: PrepareReport, split: FileSplit, scan: SplitScan) -> None:
    report.skipped += scan.bad
    known = len(report.misnamed)
    for path_index, image in zip(scan.good, scan.reports, strict=True):
        report.bytes_read += image.nbytes
        if image.mode != "RGB":
            report.converted[image.mode] = report.converted.get(image.mode, 0) + 1
        path = split.paths[path_index]
        if not image.named_as(path):
            report.misnamed.append((str(path), image.format))
    for suffix, count in split.ignored.items():
        report.ignored[suffix] = report.ignored.get(suffix, 0) + count
    for path, real in report.misnamed[known : known + 5]:
        log.info("%s is a %s file despite its name; read as %s", path, real, real)


def _refuse_bad(report: PrepareReport, settings: PrepareSettings) -> None:
    if not report.skipped:
        return
    if settings.strict:
        listing = "; ".join(f"{p}: {why}" for p, why in report.skipped[:10])
        more = f" (and {len(report.skipped) - 10} more)" if len(report.skipped) > 10 else ""
        raise DataError(
            f"{len(report.skipped)} bad image files, and --strict is on: {listing}{more}. "
            "Nothing was written; replace or remove them, or run without --strict to skip them"
        )
    log.warning("skipping %d bad image files in all", len(report.skipped))


def _stored_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """(width, height) as FFCV's RGB field stores them: longest side cut to the maximum."""
    ratio = max_resolution / max(width, height) if max_resolution else 1.0
    if ratio >= 1:
        return width, height
    return int(ratio * width), int(ratio * height)


def _check_sizes(split, scan: SplitScan | None, settings: PrepareSettings) -> int:
    """Refuse any sample larger than a page; return the split's projected bytes."""
    if isinstance(split, ArraySplit):
        sample = int(np.prod(split.images.shape[1:]))
        if sample > settings.page_size:
            raise DataError(
                f"samples of {sample:,} bytes do not fit a page of {settings.page_size:,} bytes"
            )
        return sample * len(split.labels)

    projected = 0
    for i, image in zip(scan.good, scan.reports, strict=True):
        w, h = _stored_size(image.width, image.height, settings.max_resolution)
        raw = w * h * 3
        if raw > settings.page_size:
            fits = int((settings.page_size / 3) ** 0.5)
            raise DataError(
                f"{split.paths[i]} is {image.width}x{image.height} ({raw:,} bytes as RGB), "
                f"larger than a page of the dataset ({settings.page_size:,} bytes) with "
                f"--max-resolution {settings.max_resolution}; pass --max-resolution {fits} "
                "or less. Nothing was written"
            )
        if settings.write_mode == "raw":
            projected += raw
        elif image.format == "JPEG":
            projected += int(image.nbytes * (w * h) / (image.width * image.height))
        else:
            projected += raw // 8
    return projected


def _log_projection(report: PrepareReport, settings: PrepareSettings) -> None:
    sizes = ", ".join(f"{k} {_mb(v)}" for k, v in report.projected_bytes.items())
    estimate = " (JPEG sizes estimated from the sources)" if settings.write_mode == "jpg" else ""
    log.info("projected size: %s%s", sizes, estimate)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _good_rows(split, scan: SplitScan | None) -> np.ndarray:
    return np.arange(len(split.labels)) if scan is None else scan.good


def _input_shape(split, settings: PrepareSettings) -> tuple[int, int, int]:
    if isinstance(split, ArraySplit):
        _, h, w, c = split.images.shape
        return (c, h, w)
    side = settings.max_resolution or 0
    return (3, side, side)


def _channel_stats(split, scan: SplitScan | None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values in [0, 1], over the training split (for
    image files, as stored before any resizing)."""
    if isinstance(split, ArraySplit):
        pixels = split.images.reshape(-1, split.images.shape[-1]).astype(np.float64) / 255
        return pixels.mean(0).tolist(), pixels.std(0).tolist()
    total, squares, count = scan.pixel_sums
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(squares / count - mean**2, 0)).tolist()


class _ArrayRows:
    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        return self.split.images[i], int(self.split.labels[i])


class _FileRows:
    """Rows for FFCV's writer processes. A raise there would hang the writer, so a file
    that fails now (changed since the scan) is noted in ``failures`` and written black."""

    def __init__(self, split: FileSplit, failures: Path):
        self.split = split
        self.failures = failures

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        try:
            rgb = read_rgb(self.split.paths[i])[0]
        except Exception as err:  # noqa: BLE001 - every failure must reach the parent
            with open(self.failures / f"{os.getpid()}.txt", "a") as f:
                f.write(f"{self.split.paths[i]}\t{type(err).__name__}: {err}\n")
            rgb = np.zeros((8, 8, 3), np.uint8)
        return rgb, int(self.split.labels[i])


def _write_beton(path: Path, split, order: np.ndarray, settings: PrepareSettings) -> None:
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    failures = path.with_suffix(".failures")
    failures.mkdir(exist_ok=True)
    if isinstance(split, ArraySplit):
        image_field = NDArrayField(dtype=np.dtype("uint8"), shape=split.images.shape[1:])
        rows = _ArrayRows(split)
    else:
        image_field = RGBImageField(
            write_mode=settings.write_mode,
            max_resolution=settings.max_resolution or None,
            jpeg_quality=settings.jpeg_quality,
        )
        rows = _FileRows(split, failures)
    tmp = path.with_suffix(".beton.partial")
    writer = DatasetWriter(
        str(tmp),
        {"image": image_field, "label": IntField()},
        page_size=settings.page_size,
        num_workers=settings.workers,
    )
    writer.from_indexed_dataset(rows, indices=order.tolist(), chunksize=64)

    failed = [line for f in sorted(failures.iterdir()) for line in f.read_text().splitlines()]
    for f in failures.iterdir():
        f.unlink()
    failures.rmdir()
    if failed:
        tmp.unlink()
        raise DataError(
            f"{len(failed)} files failed while writing {path.name} though the scan read them "
            f"(changed meanwhile?): {'; '.join(failed[:5])}. Nothing was kept; prepare again"
        )
    tmp.replace(path)


def _write_sources(path: Path, split, order: np.ndarray) -> None:
    """One line per stored sample, in stored order: its source file or source index."""
    if isinstance(split, ArraySplit):
        lines = (str(int(split.sources[i])) for i in order)
    else:
        lines = (str(split.paths[i].relative_to(split.root.parent)) for i in order)
    path.write_text("\n".join(lines) + "\n")


def summary(report: PrepareReport) -> list[str]:
    """The report as a few lines a person can read at a glance."""
    written = ", ".join(f"{k} {v:,}" for k, v in report.written.items())
    converted = ", ".join(f"{m} {n:,}" for m, n in sorted(report.converted.items())) or "none"
    lines = [
        f"written: {written}",
        f"skipped: {len(report.skipped):,} bad files"
        + (f" (listed in {REPORT_FILE})" if report.skipped else ""),
        f"converted to RGB: {converted}",
        f"bytes: read {_mb(report.bytes_read)}, written {_mb(report.bytes_written)}",
        f"time: {report.seconds:.1f} s (scan {report.scan_seconds:.1f}, write "
        f"{report.write_seconds:.1f}), {report.images_per_s:,.0f} images/s",
    ]
    if report.misnamed:
        formats = Counter(real for _, real in report.misnamed)
        named = ", ".join(f"{n} {fmt}" for fmt, n in formats.items())
        lines.append(f"named as another format: {named} (read by their bytes)")
    if report.ignored:
        left = ", ".join(f"{s} {n}" for s, n in sorted(report.ignored.items()))
        lines.append(f"left out, not image files by their names: {left}")
    return lines
