"""Which stages to cache: the fastest greedy run within a storage budget.

Stage j trains from the nearest stage below it that is cached, or from the images,
recomputing the frozen stages in between on every batch. A plan is the set of cached
stages. For each candidate set the model below predicts the run's time and its peak
storage; the plan is the fastest set whose peak fits the budget.

Per sample, with rates measured on this machine or given:

- loading the input of stage j from source s: an image (s = images) or s's cached bytes;
- training stage j: a forward pass of every frozen stage from s+1 to j-1 and a training
  step of stage j and its head, for every epoch of stage j;
- caching stage j (train and eval splits, ``views`` views of each training sample): the
  same forward passes, one of stage j, and writing its bytes.

Loading and writing add to compute when they share the processor (measured on a CPU
machine), or overlap with it, costing the larger of the two (``overlap``: a GPU machine
whose loaders run on its CPUs).

A cache can be deleted once every stage that reads it is trained and the next cache up,
computed from it, is written; the peak storage is the largest sum of caches alive at once.
Evaluation costs the same under every plan and is left out of the comparison.
"""

import dataclasses
import itertools
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.defaults import DEFAULT_DTYPE
from pipeline.errors import GreedyError
from stages import Architecture

log = logging.getLogger(__name__)

IMAGES = -1
PLAN_FILE = "plan.json"
WARMUP_REPEATS = 3  # untimed calls before a stage is timed
MAX_SEARCH_STAGES = 16  # 2^15 candidate sets at most
UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "PIB": 2**50,
}


class PlanError(GreedyError):
    """A plan that cannot be made from the given figures."""


@dataclass(frozen=True)
class Rates:
    """What a plan assumes of the machine, per sample and per byte."""

    stage_forward_s: tuple[float, ...]  # seconds per sample: stage j's forward pass
    stage_train_s: tuple[float, ...]  # seconds per sample: a training step of stage j + head
    image_s: float  # seconds per sample: loading and decoding one image
    read_bytes_per_s: float  # reading a feature store
    write_bytes_per_s: float  # writing a feature store
    source: str  # how the figures were obtained
    overlap: bool = False  # loading and writing run alongside compute (a GPU machine)

    def per_sample(self, io_s: float, compute_s: float) -> float:
        return max(io_s, compute_s) if self.overlap else io_s + compute_s


@dataclass(frozen=True)
class StagePlan:
    j: int
    source: int  # the cached stage it trains from, or IMAGES
    cached: bool
    cache_bytes: int  # the whole store (both splits, every view); 0 when not cached
    bytes_per_view: int  # one view of the training split
    read_s_per_epoch: float  # reading stage j's cache for one epoch of training
    recompute_s_per_epoch: float  # recomputing stage j's output from its source instead
    train_s: float  # predicted time to train stage j
    cache_s: float  # predicted time to write its cache (0 when not cached)


@dataclass(frozen=True)
class Plan:
    preset: str
    cached: tuple[int, ...]
    stages: tuple[StagePlan, ...]
    predicted_s: float
    peak_bytes: int
    budget_bytes: int | None
    train_samples: int
    eval_samples: int
    views: int
    dtype: str
    rates: Rates
    recompute_all_s: float = 0.0  # the same run caching nothing (the authors' way)
    cache_all_s: float = 0.0  # caching every stage below the last, whatever its storage
    cache_all_peak_bytes: int = 0

    def source(self, j: int) -> int:
        return self.stages[j].source

    def deletable_after(self, j: int) -> list[int]:
        """Caches no longer needed once stage j is trained (and cached, if planned)."""
        out = []
        for i in self.cached:
            readers = [s.j for s in self.stages if s.source == i]
            if readers and max(readers) == j:
                out.append(i)
        return out

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
            data["rates"] = Rates(
                **{
                    **data["rates"],
                    "stage_forward_s": tuple(data["rates"]["stage_forward_s"]),
                    "stage_train_s": tuple(data["rates"]["stage_train_s"]),
                }
            )
            data["stages"] = tuple(StagePlan(**s) for s in data["stages"])
            data["cached"] = tuple(data["cached"])
            return cls(**data)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise PlanError(
                f"{path} is not a readable plan ({type(err).__name__}: {err}); make it again "
                "with `greedy-cli plan PRESET --run DIR`"
            ) from err

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / PLAN_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


def parse_bytes(text: str) -> int:
    """'4TB', '500 GiB', '1e12' -> bytes (TB = 10^12, TiB = 2^40)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS:
        raise PlanError(
            f"cannot read {text!r} as a size; write a number and a unit, e.g. 4TB, 500GB, 1.5TiB"
        )
    try:
        return int(float(match.group(1)) * UNITS[unit])
    except ValueError:
        raise PlanError(f"cannot read {text!r} as a size; e.g. 4TB") from None


def rates_from_figures(
    arch: Architecture,
    macs_per_s: float,
    images_per_s: float,
    read_mb_s: float,
    write_mb_s: float,
    overlap: bool = False,
) -> Rates:
    """Rates from a machine's figures: a training step costs three forward passes."""
    for name, value in (
        ("--macs-per-s", macs_per_s),
        ("--images-per-s", images_per_s),
        ("--read-mb-s", read_mb_s),
        ("--write-mb-s", write_mb_s),
    ):
        if not (value > 0 and math.isfinite(value)):
            raise PlanError(f"{name} must be a positive finite number, got {value!r}")
    costs = arch.costs()
    return Rates(
        stage_forward_s=tuple(c.stage_macs / macs_per_s for c in costs),
        stage_train_s=tuple(3 * (c.stage_macs + c.head_macs) / macs_per_s for c in costs),
        image_s=1 / images_per_s,
        read_bytes_per_s=read_mb_s * 1e6,
        write_bytes_per_s=write_mb_s * 1e6,
        source=(
            f"given: {macs_per_s:.3g} multiply-adds/s, {images_per_s:,.0f} images/s, "
            f"read {read_mb_s:,.0f} MB/s, write {write_mb_s:,.0f} MB/s; loading "
            + ("overlapped with compute" if overlap else "added to compute")
        ),
        overlap=overlap,
    )


def make_plan(
    arch: Architecture,
    rates: Rates,
    train_samples: int,
    eval_samples: int,
    budget_bytes: int | None = None,
    views: int = 1,
    dtype: str = DEFAULT_DTYPE,
) -> Plan:
    """The fastest set of cached stages whose peak storage fits ``budget_bytes``."""
    if arch.depth > MAX_SEARCH_STAGES:
        raise PlanError(f"{arch.depth} stages; the search covers at most {MAX_SEARCH_STAGES}")
    candidates = range(arch.depth - 1)  # the last stage's output is never read
    best = None
    for r in range(len(candidates) + 1):
        for cached in itertools.combinations(candidates, r):
            plan = predict(arch, rates, cached, train_samples, eval_samples, views, dtype)
            if budget_bytes is not None and plan.peak_bytes > budget_bytes:
                continue
            key = (plan.predicted_s, plan.peak_bytes)
            if best is None or key < (best.predicted_s, best.peak_bytes):
                best = plan
    # Caching nothing needs no storage, so some plan always fits.
    nothing = predict(arch, rates, (), train_samples, eval_samples, views, dtype)
    everything = predict(arch, rates, tuple(candidates), train_samples, eval_samples, views, dtype)
    return dataclasses.replace(
        best,
        budget_bytes=budget_bytes,
        recompute_all_s=nothing.predicted_s,
        cache_all_s=everything.predicted_s,
        cache_all_peak_bytes=everything.peak_bytes,
    )


def predict(
    arch: Architecture,
    rates: Rates,
    cached: tuple[int, ...],
    train_samples: int,
    eval_samples: int,
    views: int = 1,
    dtype: str = DEFAULT_DTYPE,
) -> Plan:
    """The predicted time and peak storage of a run that caches the stages ``cached``."""
    costs = arch.costs(dtype)
    cached = tuple(sorted(cached))
    n_cache = train_samples * views + eval_samples

    def source_of(j: int) -> int:
        return max((i for i in cached if i < j), default=IMAGES)

    def load_s(source: int) -> float:
        """Seconds per sample to load an image or read a cached sample of ``source``."""
        if source == IMAGES:
            return rates.image_s
        return costs[source].cached_bytes / rates.read_bytes_per_s

    def recompute_s(source: int, j: int) -> float:
        """Seconds per sample of the frozen stages between ``source`` and stage j."""
        return sum(rates.stage_forward_s[source + 1 : j])

    stages = []
    for j in range(arch.depth):
        source = source_of(j)
        load, between = load_s(source), recompute_s(source, j)
        step = rates.per_sample(load, between + rates.stage_train_s[j])
        train_s = arch.epochs(j) * train_samples * step
        is_cached = j in cached
        cache_bytes = n_cache * costs[j].cached_bytes if is_cached else 0
        cache_s = 0.0
        if is_cached:
            write = costs[j].cached_bytes / rates.write_bytes_per_s
            forward = between + rates.stage_forward_s[j]
            cache_s = n_cache * rates.per_sample(load + write, forward)
        # For the table: one epoch of stage j's output read from its cache, or recomputed
        # from the nearest cache below it (or the images).
        read_epoch = train_samples * costs[j].cached_bytes / rates.read_bytes_per_s
        recompute_epoch = train_samples * rates.per_sample(load, between + rates.stage_forward_s[j])
        stages.append(
            StagePlan(
                j=j,
                source=source,
                cached=is_cached,
                cache_bytes=cache_bytes,
                bytes_per_view=train_samples * costs[j].cached_bytes,
                read_s_per_epoch=read_epoch,
                recompute_s_per_epoch=recompute_epoch,
                train_s=train_s,
                cache_s=cache_s,
            )
        )

    # Cache i lives until the next cache up (computed from it) is written; the last one
    # until the last stage is trained.
    sizes = {i: stages[i].cache_bytes for i in cached}
    peak = max(
        [sizes[a] + sizes[b] for a, b in itertools.pairwise(cached)] + list(sizes.values()) + [0]
    )
    return Plan(
        preset=arch.name,
        cached=cached,
        stages=tuple(stages),
        predicted_s=sum(s.train_s + s.cache_s for s in stages),
        peak_bytes=peak,
        budget_bytes=None,
        train_samples=train_samples,
        eval_samples=eval_samples,
        views=views,
        dtype=dtype,
        rates=rates,
    )


def measure_rates(
    arch: Architecture,
    image_s: float,
    store_dir: Path,
    batch_size: int | None = None,
    repeats: int = 20,
) -> Rates:
    """Stage forward and training-step times on this machine, with random inputs and
    weights; read and write speed of a zarr store written in ``store_dir``."""
    import torch

    forward, train = [], []
    for j, spec in enumerate(arch.stages):
        c, h, w = arch.stage_in_shape(j)
        # Keep a measured batch near 64 MiB of input so that large maps fit in memory.
        batch = batch_size or max(2, min(arch.training.batch_size, (64 << 20) // (4 * c * h * w)))
        f, t = _time_stage(spec, (c, h, w), arch.num_classes, batch, repeats)
        forward.append(f)
        train.append(t)
        log.debug("stage %d: forward %.3g s, train %.3g s per sample", j, f, t)

    read, write = measure_store(store_dir)
    return Rates(
        stage_forward_s=tuple(forward),
        stage_train_s=tuple(train),
        image_s=image_s,
        read_bytes_per_s=read,
        write_bytes_per_s=write,
        source=f"measured on this machine ({torch.get_num_threads()} threads)",
    )


def _time_stage(spec, shape, num_classes: int, batch: int, repeats: int) -> tuple[float, float]:
    """Seconds per sample of a forward pass of the stage, and of a training step of the
    stage and its head, on random inputs."""
    import torch

    from stages import AuxHead, Stage

    x = torch.randn(batch, *shape)
    y = torch.randint(0, num_classes, (batch,))
    stage, head = Stage(spec, shape[0]), AuxHead(spec, num_classes)
    opt = torch.optim.SGD([*stage.parameters(), *head.parameters()], lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(stage(x)), y).backward()
        opt.step()

    train = _per_sample(step, batch, repeats)
    stage.eval()
    with torch.no_grad():
        forward = _per_sample(lambda: stage(x), batch, repeats)
    return forward, train


def _per_sample(fn, batch: int, repeats: int) -> float:
    for _ in range(WARMUP_REPEATS):  # the first calls allocate and pick kernels
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / (repeats * batch)


def measure_store(store_dir: Path, nbytes: int = 256 << 20) -> tuple[float, float]:
    """Write then read ``nbytes`` of float16 post-ReLU-like values in whole chunks:
    (read, write) bytes per second, through the codec the cache uses."""
    import shutil
    import tempfile

    import numpy as np
    import zarr

    from pipeline.cache import _compressors
    from pipeline.defaults import DEFAULT_CODEC

    rng = np.random.default_rng(0)
    rows, row = 4096, nbytes // (4096 * 2)
    block = np.maximum(rng.standard_normal((256, row), dtype=np.float32), 0).astype(np.float16)
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".plan-probe-", dir=store_dir)
    try:
        array = zarr.create_array(
            tmp,
            shape=(rows, row),
            chunks=(256, row),
            dtype="float16",
            compressors=_compressors(DEFAULT_CODEC),
        )
        started = time.perf_counter()
        for i in range(0, rows, 256):
            array[i : i + 256] = block
        write = nbytes / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(0, rows, 256):
            array[i : i + 256]
        read = nbytes / (time.perf_counter() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read, write


@dataclass(frozen=True)
class PlanSettings:
    preset: str
    data: Path | None = None
    train_samples: int | None = None
    eval_samples: int | None = None
    budget_bytes: int | None = None
    views: int = 1
    dtype: str = DEFAULT_DTYPE
    run: Path | None = None
    macs_per_s: float | None = None
    images_per_s: float | None = None
    read_mb_s: float | None = None
    write_mb_s: float | None = None
    overlap: bool = False
    store_dir: Path | None = None  # where to probe the store's speed


def plan(settings: PlanSettings) -> Plan:
    """Measure (or take) the rates, choose the cached stages, write the plan to the run."""
    from pipeline.datasets import DatasetInfo
    from stages import load_architecture

    arch = load_architecture(settings.preset)
    info = DatasetInfo.load(settings.data) if settings.data else None
    n_train = settings.train_samples or (info.count("train") if info else None)
    n_eval = settings.eval_samples
    if n_eval is None:
        n_eval = info.count(info.eval_split) if info and info.eval_split else 0
    if n_train is None:
        raise PlanError("give --data DATA or --samples N (the training samples to plan for)")

    figures = (settings.macs_per_s, settings.read_mb_s, settings.write_mb_s)
    if all(f is not None for f in figures) and settings.images_per_s is not None:
        rates = rates_from_figures(
            arch,
            settings.macs_per_s,
            settings.images_per_s,
            settings.read_mb_s,
            settings.write_mb_s,
            settings.overlap,
        )
    elif any(f is not None for f in figures):
        raise PlanError(
            "give all four of --macs-per-s, --images-per-s, --read-mb-s and --write-mb-s to "
            "plan from figures; to measure this machine, give none of them (or only "
            "--images-per-s)"
        )
    else:
        if settings.images_per_s is not None:
            image_s = 1 / settings.images_per_s
        elif info is not None:
            image_s = measure_images(info, arch)
        else:
            raise PlanError("give --data DATA (to measure image loading) or --images-per-s")
        probe = settings.store_dir or (settings.run / "features" if settings.run else Path("."))
        rates = measure_rates(arch, image_s, probe)

    result = make_plan(
        arch, rates, n_train, n_eval, settings.budget_bytes, settings.views, settings.dtype
    )
    if settings.run is not None:
        Path(settings.run).mkdir(parents=True, exist_ok=True)
        result.save(settings.run)
    return result


def measure_images(info, arch: Architecture, batches: int = 20) -> float:
    """Seconds per sample for the image loader to deliver normalised training batches."""
    from pipeline.loaders import ImageLoader

    loader = ImageLoader(info, "train", arch.training.batch_size, arch.input_shape, shuffle=True)
    count, started = 0, None
    for k, (x, _) in enumerate(loader.epoch(0)):
        if k == 2:  # the first batches include FFCV's compilation: time from here
            started = time.perf_counter()
        elif k > 2:
            count += len(x)
        if k == batches + 2:
            break
    if started is None or count == 0:
        raise PlanError(f"{info.root} has too few training batches to measure image loading")
    return (time.perf_counter() - started) / count
