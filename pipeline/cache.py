"""Feature stores: stage j's outputs over every split, in a chunked zarr v3 store.

Layout of ``RUN/features/stage_<j>.zarr``::

    <split>/features   (N, C, H, W), float16 by default, chunked along samples
    <split>/labels     (N,), int64

The group's ``greedy_manifest`` attribute ties the store to the stage weights and the
input it was computed from; ``complete`` is set last, once every split is written.
"""

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from pipeline.errors import CacheError, RunStateError
from pipeline.loaders import FeatureLoader, ImageLoader
from pipeline.progress import BarFactory, open_bar
from pipeline.rundir import Run

log = logging.getLogger(__name__)

MANIFEST_KEY = "greedy_manifest"
CACHE_FORMAT = 1
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class CacheSettings:
    run: Path
    j: int
    dtype: str = "float16"
    batch_size: int | None = None
    chunk_mb: float = 4.0
    region_mb: float = 1024.0
    clevel: int = 1
    workers: int = 2
    progress: BarFactory | None = None


def manifest_id(manifest: dict) -> str:
    keys = ("stage", "lineage", "dtype")
    return hashlib.sha256(repr([manifest[k] for k in keys]).encode()).hexdigest()


def read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return {"unreadable": str(path)}
    return group.attrs.get(MANIFEST_KEY, {"unreadable": str(path)})


def cache_state(run: Run, j: int) -> str:
    """One of ``missing``, ``damaged``, ``incomplete``, ``stale`` or ``current``."""
    manifest = read_manifest(run.features_path(j))
    if manifest is None:
        return "missing"
    if not isinstance(manifest, dict) or not {"lineage", "splits", "shape"} <= set(manifest):
        return "damaged"
    if manifest.get("format") != CACHE_FORMAT:
        return "stale"
    if not manifest.get("complete"):
        return "incomplete"
    if manifest["lineage"] != run.lineage(j + 1):
        return "stale"
    return "current"


def cache_ids(run: Run) -> list[str | None]:
    """The id of each stage's current cache, None where a stage has none."""
    return [
        read_manifest(run.features_path(j))["id"] if cache_state(run, j) == "current" else None
        for j in range(run.arch.depth)
    ]


def open_features(run: Run, j: int, split: str) -> tuple[zarr.Array, np.ndarray, dict]:
    """Stage j's cached features and labels for ``split``, refusing a store that is not current."""
    path = run.features_path(j)
    state = cache_state(run, j)
    redo = f"`greedy-cli cache-features --run {run.root} --j {j}`"
    if state == "missing":
        raise CacheError(f"stage {j} has no cached features in {path}; run {redo} first")
    if state == "incomplete":
        raise CacheError(f"the cache {path} is incomplete; run {redo} to write it again")
    if state == "stale":
        raise CacheError(
            f"the cache {path} does not match the stages now trained "
            f"(a stage at or below {j} was retrained, or the store's format differs); run {redo}"
        )
    if state == "damaged":
        raise CacheError(f"the cache {path} is damaged (its manifest is unreadable); run {redo}")
    group = zarr.open_group(str(path), mode="r")
    manifest = group.attrs[MANIFEST_KEY]
    if split not in manifest["splits"]:
        raise CacheError(f"{path} has no split {split!r}; it has {sorted(manifest['splits'])}")
    try:
        features, labels = group[f"{split}/features"], np.asarray(group[f"{split}/labels"][:])
    except Exception as err:  # noqa: BLE001 - zarr fails in many ways on damaged metadata
        raise CacheError(
            f"{path}/{split} cannot be read ({type(err).__name__}: {err}); the store is damaged. "
            f"Run {redo}"
        ) from err
    if len(labels) and labels.min() < 0:
        raise CacheError(
            f"{path}/{split}/labels has unwritten entries (a chunk is missing); run {redo}"
        )
    want = (manifest["splits"][split], *manifest["shape"])
    if features.shape != want or labels.shape != want[:1]:
        raise CacheError(
            f"{path}/{split} holds features {features.shape} and labels {labels.shape}, its "
            f"manifest promises {want}; the store was altered. Run {redo}"
        )
    return features, labels, manifest


def stage_input(
    run: Run,
    j: int,
    split: str,
    batch_size: int,
    source: str = "cache",
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    workers: int = 2,
    memory_budget: int = 8 << 30,
):
    """The loader of stage j's input, and the frozen trunk to apply to it (or None).

    Stage 0 reads images. Above it, ``source="cache"`` reads stage j-1's features;
    ``source="recompute"`` reads images and runs the frozen stages 0..j-1 on them.
    """
    if j == 0 or source == "recompute":
        for i in range(j):
            if not run.stage_current(i):
                raise RunStateError(
                    f"stage {i} is not trained (or is stale); run "
                    f"`greedy-cli train-layer --run {run.root} --j {i}` first"
                )
        trunk = None
        if j > 0:
            from stages import Trunk

            trunk = Trunk([run.load_stage(i)[0] for i in range(j)]).eval()
            for p in trunk.parameters():
                p.requires_grad_(False)
        loader = ImageLoader(
            run.data,
            split,
            batch_size,
            run.arch.input_shape,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            workers=workers,
        )
        return loader, trunk, {"kind": "images", "dataset_id": run.data.id}

    if source != "cache":
        raise ValueError(f"source must be 'cache' or 'recompute', got {source!r}")
    if not run.stage_current(j - 1):
        raise RunStateError(
            f"stage {j - 1} is not trained (or is stale); run "
            f"`greedy-cli train-layer --run {run.root} --j {j - 1}` first"
        )
    features, labels, manifest = open_features(run, j - 1, split)
    loader = FeatureLoader(
        features,
        labels,
        batch_size,
        name=str(run.features_path(j - 1)),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        memory_budget=memory_budget,
    )
    return (
        loader,
        None,
        {"kind": "features", "cache_id": manifest["id"], "dtype": manifest["dtype"]},
    )


def cache_features(settings: CacheSettings) -> dict:
    """Write stage j's outputs over every split; return the manifest."""
    run = Run.open(settings.run)
    j = settings.j
    run.check_stage_index(j)
    if settings.dtype not in STORAGE_DTYPES:
        raise CacheError(
            f"--dtype {settings.dtype} is not supported; choose one of {list(STORAGE_DTYPES)}"
        )
    if not run.stage_current(j):
        raise RunStateError(
            f"stage {j} is not trained (or is stale); run "
            f"`greedy-cli train-layer --run {run.root} --j {j}` first"
        )
    stage, _ = run.load_stage(j)
    batch_size = settings.batch_size or run.arch.training.batch_size
    out_shape = run.arch.stage_out_shape(j)
    sample_bytes = int(np.prod(out_shape)) * np.dtype(settings.dtype).itemsize
    chunk = max(1, int(settings.chunk_mb * 2**20 // sample_bytes))
    splits = {s: run.data.count(s) for s in run.data.splits}

    # Describe the store before writing a byte of it.
    manifest = {
        "format": CACHE_FORMAT,
        "stage": j,
        "lineage": run.lineage(j + 1),
        "dtype": settings.dtype,
        "shape": list(out_shape),
        "chunk_samples": chunk,
        "codec": {"name": "zstd", "level": settings.clevel},
        "batch_size": batch_size,
        "splits": splits,
        "complete": False,
    }
    manifest["id"] = manifest_id(manifest)
    for split, n in splits.items():
        log.info(
            "stage %d, split %s: %d samples x %s %s = %.1f MB before compression",
            j,
            split,
            n,
            out_shape,
            settings.dtype,
            n * sample_bytes / 1e6,
        )

    path = run.features_path(j)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    group.attrs[MANIFEST_KEY] = manifest
    started = time.perf_counter()
    for split, n in splits.items():
        features = group.create_array(
            f"{split}/features",
            shape=(n, *out_shape),
            chunks=(chunk, *out_shape),
            dtype=settings.dtype,
            compressors=ZstdCodec(level=settings.clevel),
            # Never written (non-finite values are refused), so a missing chunk reads as NaN.
            fill_value=float("nan"),
        )
        labels = group.create_array(
            f"{split}/labels", shape=(n,), chunks=(n,), dtype="int64", fill_value=-1
        )
        _write_split(run, settings, stage, split, features, labels, batch_size)

    manifest = {**manifest, "complete": True, "seconds": round(time.perf_counter() - started, 2)}
    group.attrs[MANIFEST_KEY] = manifest
    log.info("stage %d features written to %s in %.1f s", j, path, manifest["seconds"])
    return manifest


def _write_split(run, settings, stage, split, features, labels, batch_size) -> None:
    """Compute and write one split as dask tasks, each a region of whole chunks.

    Regions never share a chunk, so tasks need no lock. They run on dask's synchronous
    scheduler, in this process, with torch using every core.
    TODO: accept a dask.distributed scheduler address to run the regions on a cluster.
    """
    n = features.shape[0]
    chunk = features.chunks[0]
    chunk_bytes = chunk * int(np.prod(features.shape[1:])) * features.dtype.itemsize
    region = chunk * max(1, int(settings.region_mb * 2**20 // chunk_bytes))
    regions = [(a, min(a + region, n)) for a in range(0, n, region)]
    bar = open_bar(settings.progress, n, f"cache stage {settings.j} {split}", "img")
    tasks = [
        dask.delayed(_write_region)(
            run, settings, stage, split, features, a, b, batch_size, chunk, bar
        )
        for a, b in regions
    ]
    results = dask.compute(*tasks, scheduler="synchronous")
    labels[:] = np.concatenate(results)
    bar.close()


def _write_region(run, settings, stage, split, features, start, stop, batch_size, chunk, progress):
    """Compute samples start..stop and write them chunk by chunk; return their labels.

    A chunk is compressed and written by a second thread while the next one is computed.
    """
    loader = _region_input(run, settings, split, start, stop, batch_size)
    buffer = np.empty((chunk, *features.shape[1:]), dtype=settings.dtype)
    labels, filled, offset, pending = [], 0, start, None
    with ThreadPoolExecutor(max_workers=1) as writer, torch.no_grad():
        for x, y in loader.epoch(0):
            out = stage(x).numpy().astype(settings.dtype)
            _check_finite(out, settings.j, split, offset + filled)
            labels.append(y.numpy())
            used = 0
            while used < len(out):
                take = min(chunk - filled, len(out) - used)
                buffer[filled : filled + take] = out[used : used + take]
                filled, used = filled + take, used + take
                if filled == chunk or offset + filled == stop:
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(_store, features, offset, buffer[:filled].copy())
                    offset, filled = offset + filled, 0
            progress.update(len(y))
        if pending is not None:
            pending.result()
    if offset != stop:
        raise CacheError(f"split {split}: wrote samples {start}..{offset}, expected up to {stop}")
    return np.concatenate(labels)


def _store(features, offset: int, values: np.ndarray) -> None:
    features[offset : offset + len(values)] = values


def _region_input(
    run: Run, settings: CacheSettings, split: str, start: int, stop: int, batch_size: int
):
    if settings.j == 0:
        return ImageLoader(
            run.data,
            split,
            batch_size,
            run.arch.input_shape,
            indices=np.arange(start, stop),
            workers=settings.workers,
        )
    features, labels, _ = open_features(run, settings.j - 1, split)
    return FeatureLoader(
        _Rows(features, start, stop),
        labels[start:stop],
        batch_size,
        name=str(run.features_path(settings.j - 1)),
    )


class _Rows:
    """Rows start..stop of a zarr array, read lazily chunk by chunk."""

    def __init__(self, array, start, stop):
        self.array, self.start, self.stop = array, start, stop
        self.shape = (stop - start, *array.shape[1:])
        self.dtype = array.dtype
        self.chunks = array.chunks

    def __getitem__(self, key: slice):
        a, b, _ = key.indices(self.shape[0])
        return self.array[self.start + a : self.start + b]


def _check_finite(out: np.ndarray, j: int, split: str, first: int) -> None:
    bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    if bad.any():
        sample = first + int(np.flatnonzero(bad)[0])
        raise CacheError(
            f"stage {j} produced a non-finite value for {split} sample {sample} "
            f"(after the cast to the storage dtype); nothing further was written"
        )
