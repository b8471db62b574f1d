"""Feature stores: stage j's outputs over every split, in a chunked zarr v3 store.

Layout of ``RUN/features/stage_<j>.zarr`` (or of the fsspec URL named in
``RUN/features/stage_<j>.location``)::

    <split>/features                   (N, C, H, W), float16 by default, chunked along samples
    <split>/labels                     (N,), int64, chunked like the features
    _greedy/chunks/<split>/<i>.json    the record of finished chunk i: rows and checksums
    _greedy/lease/<generation>.json    the writer's claim, renewed while it runs

The group's ``greedy_manifest`` attribute ties the store to the stage weights and the
input it was computed from. A store is incomplete until the commit, the last write of a
run, sets ``complete`` after checking that every chunk has its record. A chunk counts as
finished only through its record, written after the chunk: zarr skips chunks equal to
the fill value, so a chunk file's presence or absence proves nothing.
"""

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline import storage
from pipeline.augment import (
    FreshAugmentation,
    apply_views,
    augmentation_of,
    black,
    draw_views,
)
from pipeline.chunks import LocalChunks
from pipeline.defaults import (
    CODEC_LEVEL_RANGES,
    CODEC_LEVELS,
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_DTYPE,
)
from pipeline.errors import CacheError, RunStateError
from pipeline.loaders import FeatureLoader, ImageLoader
from pipeline.plan import IMAGES
from pipeline.progress import BarFactory, open_bar
from pipeline.rundir import Run

log = logging.getLogger(__name__)

MANIFEST_KEY = "greedy_manifest"
CACHE_FORMAT = 2
RECORDS = "_greedy/chunks"
LEASE_DIR = "_greedy/lease"
LEGACY_LEASE_KEY = "_greedy/lease.json"  # the claim of format-2 writers before numbered claims
LEASE_SECONDS = 60.0
# "<split>:<chunk>:<point>[:exit]" stops the writer at chunk <chunk> of <split>, at
# <point> "before" its write, "mid" write (a torn chunk file) or "after" it (no record).
# ":exit" ends the process on the spot, as a kill would; otherwise InjectedFault is raised.
FAULT_ENV = "GREEDY_CACHE_FAULT"
FAULT_POINTS = ("before", "mid", "after")


class InjectedFault(BaseException):
    """Raised at the point named by GREEDY_CACHE_FAULT; never caught by the pipeline."""


@dataclass(frozen=True)
class CacheSettings:
    run: Path
    j: int
    dtype: str = DEFAULT_DTYPE
    batch_size: int | None = None
    chunk_mb: float = 4.0
    region_mb: float = 256.0
    codec: str = DEFAULT_CODEC
    clevel: int | None = None  # the codec's level in CODEC_LEVELS
    workers: int = 2
    store: str | None = None
    dask_workers: int | None = None
    scheduler: str | None = None
    lease_seconds: float = LEASE_SECONDS
    source: str = "cache"  # stage j's input, as train-layer's --source
    views: int = 1  # views of each training sample: the sample, then augmented copies
    progress: BarFactory | None = None


@dataclass(frozen=True)
class VerifySettings:
    run: Path
    j: int
    rows: int = 64
    seed: int | None = None
    batch_size: int | None = None
    workers: int = 2


# -- where a store lives ------------------------------------------------------


def location_path(run: Run, j: int) -> Path:
    """The file naming stage j's store when it lives elsewhere than the run directory."""
    return run.features_path(j).with_suffix(".location")


def store_url(run: Run, j: int) -> str:
    """Stage j's store: the URL in its location file, else the run directory's path."""
    pointer = location_path(run, j)
    if pointer.is_file():
        return pointer.read_text().strip()
    return str(run.features_path(j))


class _Store:
    """Raw key access to a store through fsspec, beside zarr's own access."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        protocols = self.fs.protocol
        self.local = "file" in (protocols if isinstance(protocols, tuple) else (protocols,))

    def path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        if self.local:
            # A local write lands whole or not at all: write aside, then rename.
            path = Path(self.path(key))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(self.path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False when it already did.

        Atomic on a local filesystem (a hard link fails on an existing name; where hard
        links are not supported, an exclusive create), on S3 (a conditional write) and
        on ``memory://``; other stores check, then write.
        """
        if self.local:
            return self._create_local(Path(self.path(key)), data)
        for attempt in range(3):
            try:
                self.fs.pipe_file(self.path(key), data, mode="create")
                return True
            except FileExistsError:
                break
            except OSError:
                # S3 answers an existing key with 412 Precondition Failed and a concurrent
                # conditional write with 409, both raised by s3fs as plain OSErrors: tell
                # them from a failed write by looking, and try again while nothing is there.
                if self.read(key) is not None:
                    break
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
        # A retried write that had landed the first time finds its own bytes.
        return self.read(key) == data

    @staticmethod
    def _create_local(path: Path, data: bytes) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create exclusively, then fill
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink()

    def keys(self, prefix: str) -> list[str]:
        """The keys directly under ``prefix``, by name, listed afresh (not from a cache)."""
        self.fs.invalidate_cache(self.path(prefix))
        try:
            names = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(f"{prefix}/{name.rstrip('/').rsplit('/', 1)[-1]}" for name in names)

    def delete(self, key: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self.path(key), recursive=recursive)
        except FileNotFoundError:
            pass


def remove_cache(run: Run, j: int) -> int:
    """Delete stage j's store; its size in bytes before deletion (0 when absent)."""
    store = _Store(store_url(run, j))
    if not store.fs.exists(store.root):
        return 0
    size = int(store.fs.du(store.root, total=True))
    store.fs.rm(store.root, recursive=True)
    log.info("removed stage %d's features (%.1f MB) from %s", j, size / 1e6, store.url)
    return size


def _open_group(url: str, mode: str) -> zarr.Group:
    return zarr.open_group(url, mode=mode)


def read_manifest(path) -> dict | None:
    """The manifest of the store at ``path`` (a path or URL); None when there is no store."""
    url = str(path)
    store = _Store(url)
    if store.read("zarr.json") is None:
        return None
    try:
        group = _open_group(url, "r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return {"unreadable": url}
    return group.attrs.get(MANIFEST_KEY, {"unreadable": url})


def cache_state(run: Run, j: int) -> str:
    """One of ``missing``, ``damaged``, ``unsupported``, ``incomplete``, ``stale`` or
    ``current``. ``unsupported``: written by a version of greedy-cli this one cannot read."""
    manifest = read_manifest(store_url(run, j))
    if manifest is None:
        return "missing"
    if not isinstance(manifest, dict) or not {"lineage", "splits", "shape"} <= set(manifest):
        return "damaged"
    fmt = manifest.get("format")
    if fmt != CACHE_FORMAT:
        # Format 1 is this program's earlier layout: write it again. Others are refused.
        return "stale" if fmt == 1 else "unsupported"
    if not manifest.get("complete"):
        return "incomplete"
    if manifest["lineage"] != run.lineage(j + 1):
        return "stale"
    if not _arrays_present(store_url(run, j), manifest):
        return "damaged"
    return "current"


def _arrays_present(url: str, manifest: dict) -> bool:
    """Whether every split's features and labels arrays still have their metadata."""
    store = _Store(url)
    keys = [f"{split}/{name}/zarr.json" for split in manifest["splits"] for name in ARRAYS]
    return all(store.fs.exists(store.path(key)) for key in keys)


ARRAYS = ("features", "labels")


def cache_ids(run: Run) -> list[str | None]:
    """The id of each stage's current cache, None where a stage has none."""
    return [
        read_manifest(store_url(run, j))["id"] if cache_state(run, j) == "current" else None
        for j in range(run.arch.depth)
    ]


def open_features(run: Run, j: int, split: str) -> tuple[zarr.Array, np.ndarray, dict]:
    """Stage j's cached features and labels for ``split``, refusing a store that is not current."""
    url = store_url(run, j)
    state = cache_state(run, j)
    redo = f"`greedy-cli cache-features --run {run.root} --j {j}`"
    if state == "missing":
        raise CacheError(f"stage {j} has no cached features in {url}; run {redo} first")
    if state == "incomplete":
        raise CacheError(
            f"the cache {url} is incomplete; run {redo} to write it again (an interrupted "
            "run resumes, writing only the chunks that are not finished)"
        )
    if state == "stale":
        raise CacheError(
            f"the cache {url} does not match the stages now trained "
            f"(a stage at or below {j} was retrained, or the store's format differs); run {redo}"
        )
    if state == "damaged":
        raise CacheError(
            f"the cache {url} is damaged (its manifest is unreadable or an array is missing); "
            f"run {redo}"
        )
    if state == "unsupported":
        fmt = read_manifest(url).get("format")
        raise CacheError(
            f"the cache {url} has format {fmt!r}; this greedy-cli reads format {CACHE_FORMAT}. "
            f"Read it with the greedy-cli that wrote it, or remove it and run {redo}"
        )
    group = _open_group(url, "r")
    manifest = group.attrs[MANIFEST_KEY]
    if split not in manifest["splits"]:
        raise CacheError(f"{url} has no split {split!r}; it has {sorted(manifest['splits'])}")
    try:
        features, labels = group[f"{split}/features"], np.asarray(group[f"{split}/labels"][:])
    except Exception as err:  # noqa: BLE001 - zarr fails in many ways on damaged metadata
        raise CacheError(
            f"{url}/{split} cannot be read ({type(err).__name__}: {err}); the store is damaged. "
            f"Run {redo}"
        ) from err
    if len(labels) and labels.min() < 0:
        raise CacheError(
            f"{url}/{split}/labels has unwritten entries (a chunk is missing); run {redo}"
        )
    want = (manifest["splits"][split], *manifest["shape"])
    if features.shape != want or labels.shape != want[:1]:
        raise CacheError(
            f"{url}/{split} holds features {features.shape} and labels {labels.shape}, its "
            f"manifest promises {want}; the store was altered. Run {redo}"
        )
    return features, labels, manifest


SOURCE_HELP = (
    "'cache' (stage j-1's features), 'nearest' (the nearest stage below j with current "
    "features, else the images), 'cache:I' (stage I's features) or 'recompute' (the images)"
)


def resolve_source(run: Run, j: int, source: str) -> int:
    """The stage whose features stage j reads (IMAGES for the images) under ``source``."""
    if source == "recompute":
        return IMAGES
    if source in ("cache", "nearest") and j == 0:
        return IMAGES
    if source == "cache":
        return j - 1
    if source == "nearest":
        return max((i for i in range(j) if cache_state(run, i) == "current"), default=IMAGES)
    match = re.fullmatch(r"cache:(\d+)", str(source))
    if match is None:
        raise ValueError(f"source {source!r} is not one of {SOURCE_HELP}")
    i = int(match.group(1))
    if i >= j:
        below = f"a stage below {j} (--source cache:{j - 1} at most)" if j else "'recompute'"
        raise RunStateError(f"stage {j} cannot read the features of stage {i}: give {below}")
    return i


def check_source(source: str) -> str:
    """``source`` when it names an input, else a ValueError listing the choices."""
    if source in ("cache", "nearest", "recompute") or re.fullmatch(r"cache:\d+", str(source)):
        return source
    raise ValueError(f"source {source!r} is not one of {SOURCE_HELP}")


def _check_input(run: Run, j: int, input_stage: int) -> None:
    """Refuse an input whose stages (the one read, those recomputed) are not current."""
    for i in range(max(input_stage, 0), j):
        if not run.stage_current(i):
            raise RunStateError(
                f"stage {i} is not trained (or is stale); run "
                f"`greedy-cli train-layer --run {run.root} --j {i}` first"
            )


def frozen_between(run: Run, first: int, j: int):
    """Stages first..j-1 as a frozen trunk in eval mode, or None when there are none."""
    if first >= j:
        return None
    from stages import Trunk

    trunk = Trunk([run.load_stage(i)[0] for i in range(first, j)]).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk


def describe_input(desc: dict, j: int) -> str:
    """'images', 'stage 1's features' and the stages recomputed on them, for logs."""
    first = desc["stage"] + 1 if desc["kind"] == "features" else 0
    what = "images" if first == 0 else f"stage {first - 1}'s features"
    if first < j:
        between = f"stage {first}" if first == j - 1 else f"stages {first}..{j - 1}"
        what += f", recomputing {between} on every batch"
    if desc.get("augmentation"):
        what += ", freshly augmented"
    if desc.get("views", 1) > 1:
        what += f", one of {desc['views']} views per chunk"
    return what


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
    augment: bool = False,
):
    """The loader of stage j's input, and the frozen stages to apply to it (or None).

    The loader reads the images or a cached stage's features (see :func:`resolve_source`);
    the frozen stages between that input and stage j are returned as a trunk that the
    caller runs on every batch. With ``augment``, images get a fresh augmentation every
    batch, and features are read from one of the store's views per chunk and epoch.
    """
    first = resolve_source(run, j, source) + 1
    _check_input(run, j, first - 1)
    trunk = frozen_between(run, first, j)

    if first == 0:
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
        desc = {"kind": "images", "dataset_id": run.data.id, "recomputed": j}
        if augment:
            aug = augmentation_of(run.arch)
            _, h, w = run.arch.input_shape
            loader = FreshAugmentation(loader, aug, black(run.data), seed, (h, w))
            desc["augmentation"] = asdict(aug)
        return loader, trunk, desc

    features, labels, manifest = open_features(run, first - 1, split)
    views = manifest.get("views", 1) if augment and split == "train" else 1
    if augment and views == 1:
        log.warning(
            "stage %d's cache holds one view per sample: training without augmentation "
            "(write it with `cache-features --views V` for augmented views)",
            first - 1,
        )
    if views > 1:
        features = [features] + [
            open_features(run, first - 1, f"{split}@{v}")[0] for v in range(1, views)
        ]
    loader = FeatureLoader(
        features,
        labels,
        batch_size,
        name=store_url(run, first - 1),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        memory_budget=memory_budget,
    )
    desc = {"kind": "features", "stage": first - 1, "cache_id": manifest["id"], "views": views}
    return (
        loader,
        trunk,
        {
            **desc,
            "dtype": manifest["dtype"],
            "recomputed": j - first,
            "read": "memory" if loader.in_memory else "streamed",
        },
    )


# -- the writer's lease ---------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_holder(store: "_Store") -> dict | None:
    """The current claim on a store: the one of the highest generation, or None."""
    for _ in range(3):
        claims = _claims(store)
        if not claims:
            return None
        generation = max(claims)
        raw = store.read(_lease_key(generation))
        if raw is None:  # released and replaced between the listing and the read
            continue
        try:
            holder = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = None
        if not isinstance(holder, dict):
            # Being written, or torn by a crash: look again once before calling it dead.
            time.sleep(0.5)
            try:
                holder = json.loads(store.read(_lease_key(generation)) or b"")
            except (json.JSONDecodeError, UnicodeDecodeError):
                holder = None
        if not isinstance(holder, dict):  # a claim nobody can renew
            holder = {"host": "?", "pid": -1, "token": "?", "renewed": 0.0, "ttl": 0.0}
        return {**holder, "generation": generation}
    raise CacheError(
        f"the writer's claim on {store.url} keeps changing under this reader; try again"
    )


def _claims(store: "_Store") -> list[int]:
    """The generations of the claims in a store."""
    names = (k.rsplit("/", 1)[-1] for k in store.keys(LEASE_DIR))
    return [int(n[: -len(".json")]) for n in names if re.fullmatch(r"\d+\.json", n)]


def _lease_key(generation: int) -> str:
    return f"{LEASE_DIR}/{generation:012d}.json"


class Lease:
    """One writer per store: a claim in the store, renewed by a thread while it lives.

    Claims are numbered and numbers are never reused: the claim of the highest
    generation holds the store, and a run that ends marks its claim released rather than
    deleting it. A writer claims by creating the next generation's key with a create-only
    write, so of two writers claiming at once exactly one succeeds; the other is refused,
    naming the winner. A claim whose last renewal is older than its ``ttl`` seconds has
    expired and may be taken over, on any store; on the holder's own host a claim whose
    process is gone is taken over at once. A writer whose claim is no longer the highest
    has been taken over, and a writer that could not renew for most of ``ttl`` may have
    been: either stops before its next chunk. The renewal time is the holder's clock:
    hosts sharing a remote store are assumed to keep their clocks within a small
    fraction of ``ttl``.
    """

    def __init__(self, url: str, ttl: float = LEASE_SECONDS):
        self.store = _Store(url)
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        self.generation: int | None = None
        self.lost = False
        self.renewed = 0.0  # time of the last renewal that was written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        return lease_holder(self.store)

    def expired(self, holder: dict) -> bool:
        if holder.get("released"):
            return True
        if time.time() - float(holder.get("renewed", 0.0)) > float(holder.get("ttl", 0.0)):
            return True
        same_host = holder.get("host") == self.identity["host"]
        return same_host and holder.get("pid") != os.getpid() and not _pid_alive(holder["pid"])

    def _refuse(self, holder: dict, at_once: bool = False) -> CacheError:
        if at_once:
            return CacheError(
                f"{self.store.url} was claimed at the same moment by host {holder.get('host')} "
                f"process {holder.get('pid')}; run cache-features again once it has ended"
            )
        age = time.time() - float(holder.get("renewed", 0.0))
        return CacheError(
            f"{self.store.url} is being written by host {holder.get('host')} process "
            f"{holder.get('pid')} (its lease was renewed {age:.0f} s ago and expires "
            f"{holder.get('ttl', 0):.0f} s after a renewal); wait for that run to end "
            "or stop it, then run cache-features again"
        )

    def acquire(self) -> "Lease":
        self._check_legacy_claim()
        holder = self.holder()
        if holder is not None:
            if not self.expired(holder):
                raise self._refuse(holder)
            if not holder.get("released"):
                log.warning(
                    "taking over the lease on %s from host %s process %s: it is no longer renewed",
                    self.store.url,
                    holder.get("host"),
                    holder.get("pid"),
                )
        generation = 0 if holder is None else holder["generation"] + 1
        now = time.time()
        if not self.store.create(_lease_key(generation), self._claim(renewed=now)):
            raise self._refuse(lease_holder(self.store) or {}, at_once=True)
        self.generation, self.renewed = generation, now
        for older in _claims(self.store):  # the claims this one replaces
            if older < generation:
                self.store.delete(_lease_key(older))
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()
        return self

    def _check_legacy_claim(self) -> None:
        """Respect the single claim file of earlier versions while it is renewed."""
        raw = self.store.read(LEGACY_LEASE_KEY)
        if raw is None:
            return
        try:
            holder = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = {}
        if isinstance(holder, dict) and not self.expired(holder):
            raise self._refuse(holder)
        self.store.delete(LEGACY_LEASE_KEY)

    def _claim(self, **extra) -> bytes:
        claim = {**self.identity, "renewed": time.time(), "ttl": self.ttl, **extra}
        return json.dumps(claim).encode()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3) and not self.lost:
            try:
                self.renew()
            except OSError as err:
                # Retried at the next renewal; check() stops the writer if it stays so.
                log.warning("renewing the lease on %s failed: %s", self.store.url, err)

    def renew(self) -> None:
        """Write the claim again, unless another writer has taken it over meanwhile."""
        if (self.holder() or {}).get("token") != self.token:
            self.lost = True
            return
        now = time.time()
        self.store.write(_lease_key(self.generation), self._claim(renewed=now))
        # A takeover between the look and the write leaves a higher claim: look again.
        if max(_claims(self.store), default=-1) > self.generation:
            self.lost = True
            return
        self.renewed = now

    def check(self) -> None:
        if self.lost:
            raise CacheError(
                f"the lease on {self.store.url} was taken over by another writer while this "
                "one ran (it was not renewed in time); this run stops without writing more"
            )
        unrenewed = time.time() - self.renewed
        if self.generation is not None and unrenewed > 0.8 * self.ttl:
            raise CacheError(
                f"the lease on {self.store.url} could not be renewed for {unrenewed:.0f} s "
                f"(it expires after {self.ttl:.0f} s), so another writer may take the store "
                "over; this run stops without writing more. Run cache-features again to "
                "finish the store"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is not None and (self.holder() or {}).get("token") == self.token:
            # Kept, marked released: the next claim takes the next generation.
            self.store.write(_lease_key(self.generation), self._claim(released=True))

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- writing ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What a task needs to compute and write chunks of one split; picklable."""

    run: Path
    j: int
    url: str
    split: str
    dtype: str
    batch_size: int
    workers: int
    lease_token: str
    fault: str | None
    input_stage: int = -1  # the cached stage read, or -1 for the images
    view: int = 0  # which view of the data split this store split holds
    data_split: str = ""  # the dataset's split ("train" for "train@2")


def _parse_fault(value: str | None) -> str | None:
    if not value:
        return None
    parts = value.split(":")
    ok = len(parts) in (3, 4) and parts[1].isdigit() and parts[2] in FAULT_POINTS
    if not ok or (len(parts) == 4 and parts[3] != "exit"):
        raise CacheError(
            f"{FAULT_ENV}={value!r} is malformed; write <split>:<chunk>:<point>[:exit] with "
            f"<point> one of {list(FAULT_POINTS)}"
        )
    return value


def _fault(job: _Job, index: int, point: str, store: "_Store | None" = None, key: str = ""):
    if job.fault is None:
        return
    split, chunk, where, *how = job.fault.split(":")
    if (split, int(chunk), where) != (job.split, index, point):
        return
    if point == "mid":
        # Leave the chunk file torn, as a write cut short leaves it.
        data = store.read(key) or b""
        store.fs.pipe_file(store.path(key), data[: len(data) // 2])
    if how:
        os._exit(86)
    raise InjectedFault(f"{FAULT_ENV}={job.fault}")


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _chunk_keys(split: str, index: int, ndim: int) -> tuple[str, str]:
    tail = "/".join(["c", str(index)] + ["0"] * (ndim - 1))
    return f"{split}/features/{tail}", f"{split}/labels/c/{index}"


def _record_key(split: str, index: int) -> str:
    return f"{RECORDS}/{split}/{index}.json"


def codec_level(codec: str, clevel: int | None) -> int:
    """The level to write ``codec`` at: its default unless given; refused out of range."""
    if clevel is None or codec == "none":  # no compression has no level
        return CODEC_LEVELS[codec]
    low, high = CODEC_LEVEL_RANGES[codec]
    if not low <= clevel <= high:
        raise CacheError(
            f"--clevel {clevel} is out of range for --codec {codec}: give {low} to {high}"
        )
    return clevel


def _compressors(codec: str, clevel: int | None = None):
    """zarr's compressor for ``codec`` at ``clevel`` (its default level when None)."""
    clevel = codec_level(codec, clevel)
    if codec == "zstd":
        return ZstdCodec(level=clevel)
    if codec == "lz4":
        return BloscCodec(cname="lz4", clevel=clevel, shuffle="noshuffle")
    return None


def manifest_id(manifest: dict) -> str:
    keys = (
        "stage",
        "lineage",
        "dtype",
        "shape",
        "chunk_samples",
        "codec",
        "splits",
        "input_stage",
        "views",
        "augmentation",
    )
    return hashlib.sha256(repr([manifest.get(k) for k in keys]).encode()).hexdigest()


def cache_features(settings: CacheSettings) -> dict:
    """Write stage j's outputs over every split, or finish an interrupted store; commit
    it and return its manifest."""
    run = Run.open(settings.run)
    j = settings.j
    run.check_stage_index(j)
    if settings.dtype not in storage.STORAGE_DTYPES:
        raise CacheError(
            f"--dtype {settings.dtype} is not supported; choose one of "
            f"{list(storage.STORAGE_DTYPES)}"
        )
    if settings.codec not in CODECS:
        raise CacheError(f"--codec {settings.codec} is not supported; choose one of {CODECS}")
    level = codec_level(settings.codec, settings.clevel)  # refused before the store is touched
    if not run.stage_current(j):
        raise RunStateError(
            f"stage {j} is not trained (or is stale); run "
            f"`greedy-cli train-layer --run {run.root} --j {j}` first"
        )
    check_source(settings.source)
    input_stage = resolve_source(run, j, settings.source)
    _check_input(run, j, input_stage)
    fault = _parse_fault(os.environ.get(FAULT_ENV))
    run.load_stage(j)  # refuses damaged weights before anything is written
    _check_cluster(settings, settings.store or store_url(run, j))
    if settings.store:
        location_path(run, j).parent.mkdir(parents=True, exist_ok=True)
        location_path(run, j).write_text(settings.store + "\n")
    url = store_url(run, j)

    # Describe the store before writing a byte of it.
    batch_size = settings.batch_size or run.arch.training.batch_size
    out_shape = run.arch.stage_out_shape(j)
    sample_bytes = int(np.prod(out_shape)) * storage.itemsize(settings.dtype)
    chunk = max(1, int(settings.chunk_mb * 2**20 // sample_bytes))
    splits = {s: run.data.count(s) for s in run.data.splits}
    view_params = _views(run, settings, input_stage, splits)
    for v in range(1, settings.views):
        splits[f"train@{v}"] = splits["train"]
    manifest = {
        "format": CACHE_FORMAT,
        "stage": j,
        "lineage": run.lineage(j + 1),
        "dtype": settings.dtype,
        "shape": list(out_shape),
        "chunk_samples": chunk,
        "codec": {"name": settings.codec, "level": level},
        "batch_size": batch_size,
        "splits": splits,
        "input_stage": input_stage,
        "views": settings.views,
        "augmentation": asdict(augmentation_of(run.arch)) if settings.views > 1 else None,
        "complete": False,
    }
    manifest["id"] = manifest_id(manifest)

    with Lease(url, settings.lease_seconds) as lease:
        started = time.perf_counter()
        missing = _prepare_store(url, manifest, settings, view_params)
        _check_space(url, j, manifest, missing, sample_bytes)
        with _cluster(settings, url) as client:
            _write_splits(settings, client, run, url, manifest, missing, lease, fault)
        manifest = _commit(url, manifest, round(time.perf_counter() - started, 2))
    log.info("stage %d features written to %s in %.1f s", j, url, manifest["seconds"])
    return manifest


def _write_splits(settings, client, run, url, manifest, missing, lease, fault) -> None:
    for split, n in manifest["splits"].items():
        data_split, _, view = split.partition("@")
        job = _Job(
            run=run.root,
            j=manifest["stage"],
            url=url,
            split=split,
            dtype=manifest["dtype"],
            batch_size=manifest["batch_size"],
            workers=settings.workers,
            lease_token=lease.token,
            fault=fault,
            input_stage=manifest["input_stage"],
            view=int(view or 0),
            data_split=data_split,
        )
        _write_split(settings, client, job, missing[split], manifest["chunk_samples"], n, lease)


def _prepare_store(
    url: str, manifest: dict, settings: CacheSettings, view_params: np.ndarray | None = None
) -> dict[str, list[int]]:
    """Open the store to resume it, or lay it out anew; return each split's unfinished chunks.

    A store from the same stage, lineage and layout is resumed: chunks whose record is
    missing or whose bytes no longer match it are written again. Anything else is replaced.
    """
    store = _Store(url)
    old = read_manifest(url)
    if isinstance(old, dict) and old.get("format") not in (None, 1, CACHE_FORMAT):
        raise CacheError(
            f"{url} holds a cache of format {old.get('format')!r}, which this greedy-cli "
            f"(format {CACHE_FORMAT}) cannot read or safely replace; remove it first"
        )
    chunk = manifest["chunk_samples"]
    counts = {s: -(-n // chunk) for s, n in manifest["splits"].items()}
    ndim = 1 + len(manifest["shape"])
    if isinstance(old, dict) and old.get("id") == manifest["id"]:
        if not _arrays_present(url, old):
            log.warning("%s lacks some of its arrays; writing it anew", url)
            old = {"splits": old.get("splits", {})}
    if isinstance(old, dict) and old.get("id") == manifest["id"]:
        group = _open_group(url, "r+")
        # Incomplete from here on, until the commit.
        group.attrs[MANIFEST_KEY] = {**manifest, "complete": False}
        missing = {}
        for split, count in counts.items():
            missing[split] = []
            for index in range(count):
                problem = _chunk_problem(store, split, index, ndim)
                if problem is not None:
                    if problem != "unfinished":
                        log.warning("%s chunk %d: %s; writing it again", split, index, problem)
                    store.delete(_record_key(split, index))
                    missing[split].append(index)
        done = sum(counts.values()) - sum(len(m) for m in missing.values())
        if done:
            log.info(
                "resuming %s: %d of %d chunks already finished", url, done, sum(counts.values())
            )
        return missing

    _refuse_losing_work(url, old, manifest)
    if old is not None:
        log.info("replacing %s: it was written for other weights, input or layout", url)
    for key in ("zarr.json", RECORDS, *manifest["splits"], *(old or {}).get("splits", {})):
        store.delete(key, recursive=True)
    group = _open_group(url, "a")
    compressors = _compressors(settings.codec, manifest["codec"]["level"])
    for split, n in manifest["splits"].items():
        group.create_array(
            f"{split}/features",
            shape=(n, *manifest["shape"]),
            chunks=(chunk, *manifest["shape"]),
            dtype=storage.array_dtype(manifest["dtype"]),
            compressors=compressors,
            # Never written (non-finite values are refused), so a missing chunk reads as NaN.
            fill_value=storage.fill_value(manifest["dtype"]),
            overwrite=True,
        )
        group.create_array(
            f"{split}/labels",
            shape=(n,),
            chunks=(chunk,),
            dtype="int64",
            fill_value=-1,
            overwrite=True,
        )
    if view_params is not None:
        group.create_array("train/view_params", data=view_params, overwrite=True)
    # Written last: a store without it is damaged and is replaced by the next run.
    group.attrs[MANIFEST_KEY] = manifest
    return {split: list(range(count)) for split, count in counts.items()}


LAYOUT_OPTIONS = {
    "chunk_samples": "--chunk-mb",
    "codec": "--codec/--clevel",
    "batch_size": "--batch-size",
}


def _refuse_losing_work(url: str, old, manifest: dict) -> None:
    """Refuse to replace an unfinished store of the same weights, input and dtype that
    differs only in layout options: rerunning with its options resumes it instead."""
    if not isinstance(old, dict) or old.get("complete") or old.get("format") != CACHE_FORMAT:
        return
    # Another --dtype is a deliberate change (a float16 store may not even be finishable).
    same = ("stage", "lineage", "input_stage", "views", "splits", "dtype")
    if any(old.get(k) != manifest.get(k) for k in same):
        return
    differs = [k for k in LAYOUT_OPTIONS if old.get(k) != manifest.get(k)]
    if not differs:
        return
    raise CacheError(
        f"{url} is an unfinished store of these weights written with other "
        f"{', '.join(LAYOUT_OPTIONS[k] for k in differs)} ({resume_options(old)}); rerun with "
        "those options to resume it, or remove the store to start again with new ones"
    )


def resume_options(manifest: dict) -> str:
    """The cache-features options that reproduce a store's layout."""
    # Half a sample over the chunk, so that the writer's rounding down gives it back.
    chunk_mb = (manifest["chunk_samples"] + 0.5) * _sample_bytes(manifest) / 2**20
    codec = manifest.get("codec") or {}
    options = [
        f"--dtype {manifest['dtype']}",
        f"--chunk-mb {chunk_mb:.9g}",
        f"--codec {codec.get('name', 'zstd')} --clevel {codec.get('level', 1)}",
        f"--batch-size {manifest['batch_size']}",
    ]
    if manifest.get("input_stage", manifest["stage"] - 1) != manifest["stage"] - 1:
        source = manifest["input_stage"]
        options.append("--source " + ("recompute" if source < 0 else f"cache:{source}"))
    if manifest.get("views", 1) > 1:
        options.append(f"--views {manifest['views']}")
    return " ".join(options)


def _sample_bytes(manifest: dict) -> int:
    return int(np.prod(manifest["shape"])) * storage.itemsize(manifest["dtype"])


def _chunk_problem(store: _Store, split: str, index: int, ndim: int) -> str | None:
    """Why chunk ``index`` is not finished: None when its bytes match its record."""
    raw = store.read(_record_key(split, index))
    if raw is None:
        return "unfinished"
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its record is unreadable"
    for key, kind in zip(_chunk_keys(split, index, ndim), ("features", "labels"), strict=True):
        data = store.read(key)
        if data is None:
            return f"{key} is missing"
        if _sha(data) != record.get(kind):
            return (
                f"{key} does not match its checksum ({len(data)} bytes, "
                f"{record.get(kind + '_bytes')} recorded)"
            )
    return None


def _check_space(url: str, j: int, manifest: dict, missing: dict, sample_bytes: int) -> None:
    """Log the projected size of each split; refuse when a local filesystem lacks the space."""
    chunk = manifest["chunk_samples"]
    needed = 0
    for split, n in manifest["splits"].items():
        rows = sum(min(chunk, n - i * chunk) for i in missing[split])
        total = n * (sample_bytes + 8)
        needed += rows * (sample_bytes + 8)
        log.info(
            "stage %d, split %s: %d samples x %s %s: projected %.1f MB before compression, "
            "%.1f MB of it still to write",
            j,
            split,
            n,
            "x".join(map(str, manifest["shape"])),
            manifest["dtype"],
            total / 1e6,
            rows * (sample_bytes + 8) / 1e6,
        )
    store = _Store(url)
    if not store.local:
        return
    free = _free_bytes(Path(store.root))
    if needed > free:
        raise CacheError(
            f"stage {j}'s cache needs up to {needed / 1e6:.1f} MB in {url} but its filesystem "
            f"has {free / 1e6:.1f} MB free; free space, or write the store elsewhere with "
            "--store URL"
        )


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _regions(missing: list[int], per_region: int) -> list[list[int]]:
    """Runs of consecutive unfinished chunks, at most ``per_region`` chunks each."""
    regions: list[list[int]] = []
    for index in missing:
        if regions and regions[-1][-1] == index - 1 and len(regions[-1]) < per_region:
            regions[-1].append(index)
        else:
            regions.append([index])
    return regions


def _write_split(
    settings, client, job: _Job, missing: list[int], chunk: int, n: int, lease
) -> None:
    """Compute and write the unfinished chunks of one split, as regions of whole chunks.

    Regions never share a chunk, so tasks need no lock. Without a cluster they run one
    after another in this process, with torch using every core.
    """
    if not missing:
        return
    # On a cluster a region is one task. In this process each run of consecutive chunks
    # is one region: a new image loader compiles its pipeline again, which costs seconds.
    per_region = len(missing)
    if client is not None:
        per_region = max(1, int(settings.region_mb // settings.chunk_mb))
    regions = _regions(missing, per_region)
    rows = sum(min(chunk, n - i * chunk) for i in missing)
    bar = open_bar(settings.progress, rows, f"cache stage {job.j} {job.split}", "img")
    try:
        if client is not None:
            _write_on_cluster(client, job, regions, bar, lease)
        else:
            for region in regions:
                lease.check()
                _write_region(job, region[0], region[-1] + 1, lease, on_chunk=bar.update)
    finally:
        bar.close()


def _check_cluster(settings: CacheSettings, url: str) -> None:
    if settings.scheduler and settings.dask_workers:
        raise CacheError("give --scheduler ADDRESS or --dask-workers N, not both")
    if (settings.scheduler or settings.dask_workers) and url.startswith("memory://"):
        if settings.scheduler:
            raise CacheError(
                f"{url} lives in this process's memory, where the workers of --scheduler "
                f"{settings.scheduler} cannot write; use a store on a shared filesystem or URL"
            )


@contextlib.contextmanager
def _cluster(settings: CacheSettings, url: str) -> Iterator:
    """A dask.distributed client for the run's tasks, or None to run them in this process."""
    if not (settings.scheduler or settings.dask_workers):
        yield None
        return
    from distributed import Client, LocalCluster

    if settings.scheduler:
        cluster = None
        client = Client(settings.scheduler)
    elif url.startswith("memory://"):
        # A memory:// store is shared only by workers that are threads of this process.
        cluster = LocalCluster(
            n_workers=settings.dask_workers,
            threads_per_worker=1,
            processes=False,
            dashboard_address=None,
        )
        client = Client(cluster)
    else:
        cluster = LocalCluster(
            n_workers=settings.dask_workers,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        )
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _write_on_cluster(client, job: _Job, regions: list[list[int]], bar, lease) -> None:
    from distributed import as_completed

    futures = [
        client.submit(_write_region, job, r[0], r[-1] + 1, None, pure=False) for r in regions
    ]
    for future in as_completed(futures):
        bar.update(future.result())
        lease.check()


def _write_region(
    job: _Job, first: int, stop_chunk: int, lease: Lease | None, on_chunk=None
) -> int:
    """Compute chunks first..stop_chunk-1 of a split and write them; return the row count.

    Each chunk's outputs are computed in batches that start at the chunk's first row, so
    a chunk's bytes do not depend on where a run started or which task computed it. A
    second thread compresses and writes a chunk while the next one is computed.
    """
    run = Run.open(job.run)
    stage, _ = run.load_stage(job.j)
    between = frozen_between(run, job.input_stage + 1, job.j)
    if between is not None:
        stage = torch.nn.Sequential(between, stage)
    store = _Store(job.url)
    group = _open_group(job.url, "r+")
    features, labels = group[f"{job.split}/features"], group[f"{job.split}/labels"]
    direct = LocalChunks.of(features)  # None where zarr writes (not a local store)
    n, chunk = features.shape[0], features.chunks[0]
    start, stop = first * chunk, min(stop_chunk * chunk, n)
    loader = _region_input(run, job, start, stop)
    augment = _view_augmenter(run, job, group, start, stop)

    pending = None
    with ThreadPoolExecutor(max_workers=1) as writer, torch.no_grad():
        for index, x, y in _chunks_of(loader, first, chunk, stop):
            x = augment(x, index * chunk - start)
            out = torch.cat(
                [stage(x[i : i + job.batch_size]) for i in range(0, len(x), job.batch_size)]
            )
            out = storage.encode(out, job.dtype)  # an overflow is refused by name just below
            _check_finite(out, job.dtype, job.j, job.split, index * chunk)
            if pending is not None:
                pending.result()
            pending = writer.submit(
                _write_chunk, job, store, features, direct, labels, index, out, y.numpy(), lease
            )
            if on_chunk is not None:
                on_chunk(len(y))
        if pending is not None:
            pending.result()
    return stop - start


def _views(run: Run, settings: CacheSettings, input_stage: int, splits: dict):
    """The recorded augmentation of every view of the training split, (N, views, 5), or
    None for one view; refused when the input store holds other views."""
    if settings.views < 1:
        raise CacheError(f"--views {settings.views}: give 1 (no augmentation) or more")
    if settings.views == 1:
        return None
    aug = augmentation_of(run.arch)
    if aug.kind == "none":
        raise CacheError(
            f"--views {settings.views} needs a training augmentation, and {run.arch.name}'s "
            "is 'none'; set training.augmentation in the architecture, or use --views 1"
        )
    if "train" not in splits:
        raise CacheError("--views needs a 'train' split in the dataset")
    if input_stage != IMAGES:
        below = read_manifest(store_url(run, input_stage)) or {}
        if below.get("views", 1) != settings.views:
            raise CacheError(
                f"stage {input_stage}'s cache holds {below.get('views', 1)} view(s), not "
                f"{settings.views}: the views of stage {settings.j} are computed from the same "
                f"views below. Run `greedy-cli cache-features --run {run.root} --j "
                f"{input_stage} --views {settings.views}` first"
            )
    _, h, w = run.arch.input_shape
    return draw_views(aug, splits["train"], settings.views, run.seed, (h, w))


def _view_augmenter(run: Run, job: _Job, group, start: int, stop: int):
    """A function applying the recorded augmentation of ``job.view`` to input rows that
    start at ``offset`` within the region; the identity when nothing is to be applied."""
    if job.view == 0 or job.input_stage != IMAGES:
        return lambda x, offset: x
    params = np.asarray(group[f"{job.data_split}/view_params"][start:stop, job.view])
    aug, fill = augmentation_of(run.arch), black(run.data)
    return lambda x, offset: apply_views(aug, x, params[offset : offset + len(x)], fill)


def _chunks_of(loader, first: int, chunk: int, stop: int) -> Iterator[tuple]:
    """The loader's samples regrouped as whole chunks: (chunk index, inputs, labels)."""
    xs, ys, held, index = [], [], 0, first
    for x, y in loader.epoch(0):
        xs.append(x)
        ys.append(y)
        held += len(y)
        while index * chunk < stop and held >= min(chunk, stop - index * chunk):
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            take = min(chunk, stop - index * chunk)
            yield index, x_all[:take], y_all[:take]
            xs, ys, held, index = [x_all[take:]], [y_all[take:]], held - take, index + 1
    if held or index * chunk < stop:
        raise CacheError(
            f"the input of rows {first * chunk}..{stop} gave {index * chunk + held - first * chunk}"
            " samples; the prepared dataset or the cache below is damaged"
        )


def _write_chunk(job: _Job, store: _Store, features, direct, labels, index, out, y, lease) -> None:
    """Write one chunk, then its record: the record is what makes it finished."""
    if lease is not None:
        lease.check()
    elif (lease_holder(store) or {}).get("token") != job.lease_token:
        raise CacheError(
            f"the lease on {job.url} is no longer held by the run that started this task; "
            "the task stops without writing"
        )
    chunk = features.chunks[0]
    a = index * chunk
    feature_key, label_key = _chunk_keys(job.split, index, features.ndim)

    _fault(job, index, "before")
    # A whole chunk on a local disk is encoded and written directly (pipeline.chunks).
    feature_bytes = direct.write(index, out) if direct is not None else None
    if feature_bytes is None:
        features[a : a + len(out)] = out
    labels[a : a + len(out)] = y
    _fault(job, index, "mid", store, feature_key)
    _fault(job, index, "after")

    if feature_bytes is None:
        feature_bytes = store.read(feature_key)
    label_bytes = store.read(label_key)
    record = {
        "rows": [a, a + len(out)],
        "features": _sha(feature_bytes),
        "features_bytes": len(feature_bytes or b""),
        "labels": _sha(label_bytes),
        "labels_bytes": len(label_bytes or b""),
    }
    store.write(_record_key(job.split, index), json.dumps(record).encode())


def _commit(url: str, manifest: dict, seconds: float) -> dict:
    """Mark the store complete once every chunk has its record; the last write of a run."""
    store = _Store(url)
    chunk = manifest["chunk_samples"]
    digest = hashlib.sha256()
    for split, n in manifest["splits"].items():
        for index in range(-(-n // chunk)):
            raw = store.read(_record_key(split, index))
            if raw is None:
                raise CacheError(
                    f"{url}: chunk {index} of {split} has no record after writing; the store "
                    "stays incomplete. Run cache-features again to finish it"
                )
            digest.update(raw)
    group = _open_group(url, "r+")
    manifest = {**manifest, "complete": True, "seconds": seconds, "records": digest.hexdigest()}
    group.attrs[MANIFEST_KEY] = manifest
    return manifest


def _region_input(run: Run, job: _Job, start: int, stop: int):
    if job.input_stage == IMAGES:
        return ImageLoader(
            run.data,
            job.data_split or job.split,
            job.batch_size,
            run.arch.input_shape,
            indices=np.arange(start, stop),
            workers=job.workers,
        )
    features, labels, _ = open_features(run, job.input_stage, job.split)
    # Streamed chunk by chunk, in order, by the loader's read-ahead thread.
    return FeatureLoader(
        _Rows(features, start, stop),
        labels[start:stop],
        job.batch_size,
        name=store_url(run, job.input_stage),
        memory_budget=0,
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


def _check_finite(out: np.ndarray, dtype: str, j: int, split: str, first: int) -> None:
    bad = ~storage.finite(out.reshape(len(out), -1)).all(axis=1)
    if bad.any():
        sample = first + int(np.flatnonzero(bad)[0])
        raise CacheError(
            f"stage {j} produced a non-finite value for {split} sample {sample} "
            f"(after the cast to {dtype}); nothing of it was written. A float16 overflow "
            "needs --dtype bfloat16 or float32; a NaN means the stage's weights are damaged"
        )


# -- verification ----------------------------------------------------------------


def verify_cache(settings: VerifySettings) -> dict:
    """Check every chunk of stage j's store against its record and recompute a random
    sample of rows from the stage's input; record the outcome in the manifest as
    ``verified`` and return it. A failure raises CacheError after it is recorded."""
    run = Run.open(settings.run)
    j = settings.j
    run.check_stage_index(j)
    url = store_url(run, j)
    state = cache_state(run, j)
    if state != "current":
        raise CacheError(
            f"the cache {url} is {state}, so there is nothing to verify; run "
            f"`greedy-cli cache-features --run {run.root} --j {j}` first"
        )
    stage, _ = run.load_stage(j)
    batch_size = settings.batch_size or run.arch.training.batch_size
    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "big")
    rng = np.random.default_rng(seed)

    with Lease(url):
        store = _Store(url)
        manifest = read_manifest(url)
        chunk, ndim = manifest["chunk_samples"], 1 + len(manifest["shape"])
        bad_chunks, bad_rows, chunks_checked, rows_checked = [], [], 0, 0
        for split, n in manifest["splits"].items():
            for index in range(-(-n // chunk)):
                problem = _chunk_problem(store, split, index, ndim)
                chunks_checked += 1
                if problem is not None:
                    bad_chunks.append(f"{split} chunk {index}: {problem}")
            if bad_chunks:
                continue
            rows = np.sort(rng.choice(n, size=min(settings.rows, n), replace=False))
            features, labels, _ = open_features(run, j, split)
            stored = storage.to_numpy(features.get_orthogonal_selection((rows,)), np.float64)
            exact = _recompute(run, manifest, stage, split, rows, batch_size, settings.workers)
            bad_rows += [
                f"{split} row {r}"
                for r in rows[~_within_rounding(stored, exact, manifest["dtype"])]
            ]
            rows_checked += len(rows)

        ok = not bad_chunks and not bad_rows
        verified = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "ok": ok,
            "rows_checked": rows_checked,
            "chunks_checked": chunks_checked,
            "seed": seed,
            "dtype": manifest["dtype"],
            "problems": (bad_chunks + bad_rows)[:20],
        }
        group = _open_group(url, "r+")
        manifest = {**group.attrs[MANIFEST_KEY], "verified": verified}
        if bad_chunks:
            # The damaged chunks are rewritten by the next cache-features.
            manifest["complete"] = False
        group.attrs[MANIFEST_KEY] = manifest

    redo = f"`greedy-cli cache-features --run {run.root} --j {j}`"
    if bad_chunks:
        raise CacheError(
            f"{url}: {len(bad_chunks)} damaged chunk(s): {'; '.join(bad_chunks[:5])}. The store "
            f"is marked incomplete; run {redo} to write them again"
        )
    if bad_rows:
        raise CacheError(
            f"{url}: {len(bad_rows)} of {rows_checked} recomputed rows differ from the store "
            f"beyond {manifest['dtype']} rounding ({', '.join(bad_rows[:5])}): the store was "
            f"written wrong. Remove it and run {redo}"
        )
    return verified


def _recompute(run, manifest, stage, split, rows, batch_size, workers) -> np.ndarray:
    """Stage j's float32 outputs for ``rows`` of ``split``, from the input the store was
    computed from (the images or a cached stage, and the frozen stages in between)."""
    j, input_stage = manifest["stage"], manifest.get("input_stage", manifest["stage"] - 1)
    between = frozen_between(run, input_stage + 1, j)
    if between is not None:
        stage = torch.nn.Sequential(between, stage)
    data_split, _, view = split.partition("@")
    if input_stage == IMAGES:
        loader = ImageLoader(
            run.data, data_split, batch_size, run.arch.input_shape, indices=rows, workers=workers
        )
        inputs = (x for x, _ in loader.epoch(0))
        if view:
            group = _open_group(store_url(run, j), "r")
            params = np.asarray(group[f"{data_split}/view_params"][:, int(view)])[rows]
            aug, fill = augmentation_of(run.arch), black(run.data)
            inputs = (
                apply_views(aug, x, params[i * batch_size : i * batch_size + len(x)], fill)
                for i, x in enumerate(inputs)
            )
    else:
        below, _, _ = open_features(run, input_stage, split)
        x_all = storage.to_numpy(below.get_orthogonal_selection((rows,)))
        inputs = (
            torch.from_numpy(x_all[i : i + batch_size]) for i in range(0, len(rows), batch_size)
        )
    with torch.no_grad():
        return torch.cat([stage(x) for x in inputs]).numpy().astype(np.float64)


def _within_rounding(stored: np.ndarray, exact: np.ndarray, dtype: str) -> np.ndarray:
    """Per row: every value within one step of the storage dtype at its magnitude, plus a
    float32 allowance for batch-dependent summation order."""
    step = storage.rounding_step(exact, dtype)
    scale = np.abs(exact).reshape(len(exact), -1).max(axis=1)
    slack = step + 1e-5 * scale.reshape(-1, *([1] * (exact.ndim - 1)))
    err = np.abs(stored - exact)
    return (err <= slack).reshape(len(exact), -1).all(axis=1)
