"""Train stage j and its auxiliary head with stages 0..j-1 frozen.

Training writes a checkpoint every ``checkpoint_every`` steps and at every epoch end
(see :mod:`pipeline.checkpoints`); a resumed run continues from the newest good one and
ends bitwise identical to a run that was never stopped, on the same machine with the
same number of torch threads.
"""

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline import checkpoints
from pipeline.augment import FreshAugmentation
from pipeline.cache import check_source, describe_input, stage_input
from pipeline.errors import GreedyError, RunStateError
from pipeline.loaders import ImageLoader
from pipeline.progress import BarFactory, open_bar
from pipeline.rundir import Run, environment_record, state_hash

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Fault-injection point: training stops before this step (0-based count of steps done),
# as a pre-empted machine would, after writing whatever checkpoints were due.
STOP_AT_STEP_ENV = "GREEDY_TRAIN_STOP_AT_STEP"


@dataclass(frozen=True)
class TrainSettings:
    run: Path
    j: int
    preset: str | None = None
    data: Path | None = None
    seed: int | None = None
    source: str | None = None  # "cache" unless a resumed checkpoint says otherwise
    epochs: int | None = None
    max_steps: int | None = None
    workers: int = 2
    memory_budget: int = 8 << 30
    augment: bool = False  # fresh augmentation of images, or a view per chunk of a cache
    resume: bool = False
    restart: bool = False
    checkpoint_every: int = 1000
    deterministic: bool = False
    precision: str | None = None  # "fp32" unless a resumed checkpoint says otherwise
    max_skipped_steps: int = 20
    progress: BarFactory | None = None


@dataclass
class TrainResult:
    record: dict
    losses: list[float] = field(default_factory=list)


class DivergedError(GreedyError):
    """The loss or the gradients became non-finite, or fp16 loss scaling kept failing."""


class TrainingStopped(GreedyError):
    """Training was stopped at the fault-injection point ``GREEDY_TRAIN_STOP_AT_STEP``."""


def order_seed(run_seed: int, j: int) -> int:
    """Seed of stage j's data order; the same for every input source."""
    return run_seed * 1000 + j


def lr_at(step: int, total_steps: int, lr: float, drops: tuple[float, ...], factor: float) -> float:
    """Step schedule: multiply by ``factor`` at each fraction of all steps in ``drops``."""
    passed = sum(step >= round(f * total_steps) for f in drops)
    return lr * factor**passed


def checkpoint_folder(run: Run, j: int) -> Path:
    return run.stage_dir(j) / "checkpoints"


@dataclass
class _Progress:
    """Where training stands: what a checkpoint must hold besides the modules."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` done
    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    wait: float = 0.0
    seconds: float = 0.0  # of ``epoch`` so far
    skipped_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    last_epoch: dict = field(default_factory=dict)  # the newest epoch's metrics

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batch, self.seen, self.correct = epoch, 0, 0, 0
        self.loss_sum = self.wait = self.seconds = 0.0


def train_layer(settings: TrainSettings, run: Run | None = None) -> TrainResult:
    run = run or Run.open(
        settings.run, settings.preset, settings.data, settings.seed, stage=settings.j
    )
    j = settings.j
    run.check_stage_index(j)
    folder = checkpoint_folder(run, j)
    settings = _resolve(settings, folder)
    check_source(settings.source)
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {settings.precision!r}")
    if settings.resume and settings.restart:
        raise ValueError("resume and restart exclude each other; choose one")
    spec = run.arch.training
    epochs = settings.epochs or run.arch.epochs(j)
    _check_checkpoint_choice(run, j, settings, folder)
    _warn_precision_hardware(settings.precision)

    with _determinism(settings.deterministic):
        return _train(run, j, settings, spec, epochs, folder)


def _train(run: Run, j: int, settings: TrainSettings, spec, epochs: int, folder: Path):
    # Input: the images or a cached stage's features, and the frozen stages in between.
    # With augment: fresh random crops and flips of images, or a cached view per chunk.
    loader, trunk, input_desc = stage_input(
        run,
        j,
        "train",
        spec.batch_size,
        source=settings.source,
        shuffle=True,
        seed=order_seed(run.seed, j),
        drop_last=True,
        workers=settings.workers,
        memory_budget=settings.memory_budget,
        augment=settings.augment,
    )
    if len(loader) == 0:
        raise GreedyError(
            f"the training split has {loader.num_samples} samples, fewer than one batch of "
            f"{spec.batch_size}; lower training.batch_size in the architecture, or prepare "
            "more training samples"
        )
    total_steps = epochs * len(loader)
    if settings.max_steps is not None:
        total_steps = settings.max_steps
        epochs = math.ceil(total_steps / len(loader))
    lineage = run.lineage(j)
    trunk_hash = state_hash(trunk) if trunk is not None else None

    # Stage j and its head, initialised from the run's seed.
    torch.manual_seed(order_seed(run.seed, j))
    stage, head = run.build_stage(j)
    params = list(stage.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    scaler = torch.amp.GradScaler("cpu", enabled=settings.precision == "fp16")
    amp_dtype = PRECISIONS[settings.precision]

    # What a checkpoint continues: resuming under anything else would not be this run.
    fingerprint = {
        "stage": j,
        "lineage": lineage,
        "input": input_desc,
        "source": settings.source,
        "total_steps": total_steps,
        "epochs": epochs,
        "steps_per_epoch": len(loader),
        "precision": settings.precision,
        "training": asdict(spec),
    }
    progress = _Progress()
    if settings.resume:
        resumed = _resume(folder, fingerprint, stage, head, optimizer, scaler)
        if resumed is None and run.stage_current(j):
            # Training from the start would overwrite the stage's good weights.
            raise RunStateError(
                f"stage {j} is trained and current, and {folder} holds no usable checkpoint "
                "(damaged ones are set aside as *.damaged); leave out --resume to train it "
                "again from the start"
            )
        progress = resumed or progress
    elif settings.restart:
        removed = checkpoints.remove_checkpoints(folder)
        log.info("stage %d: %d checkpoint(s) removed; training from the start", j, removed)
    run.log_metrics(
        {
            "event": "train_started",
            "stage": j,
            "step": progress.step,
            "settings": _settings_record(settings),
            "total_steps": total_steps,
            "environment": environment_record(),
        }
    )
    log.info(
        "training stage %d of %s from %s: %d epoch(s), %d steps of %d, %s",
        j,
        run.arch.name,
        describe_input(input_desc, j),
        epochs,
        total_steps,
        spec.batch_size,
        settings.precision,
    )

    def save(position: _Progress) -> None:
        state = {
            "fingerprint": fingerprint,
            "stage": stage.state_dict(),
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "schedule": {"step": position.step, "total_steps": total_steps},
            "requested": {k: getattr(settings, k) for k in REQUESTED},
            "random": checkpoints.random_states(),
            "torch_threads": torch.get_num_threads(),
            **asdict(position),
        }
        checkpoints.save_checkpoint(folder, state)

    stop_at = _stop_at_step()
    started = time.perf_counter()
    lr = lr_at(progress.step, total_steps, spec.lr, spec.lr_drops, spec.lr_factor)
    while progress.epoch < epochs and progress.step < total_steps:
        epoch = progress.epoch
        stage.train()
        head.train()
        epoch_start = time.perf_counter() - progress.seconds
        bar = open_bar(
            settings.progress,
            min(len(loader) - progress.batch, total_steps - progress.step),
            f"stage {j} epoch {epoch + 1}/{epochs}",
            "step",
        )
        tick = time.perf_counter()
        for x, y in _batches(loader, epoch, progress.batch):
            progress.wait += time.perf_counter() - tick
            if progress.step >= total_steps:
                break
            if progress.step == stop_at:
                raise TrainingStopped(
                    f"stage {j}: stopped before step {stop_at + 1} as {STOP_AT_STEP_ENV} asks; "
                    f"continue with `greedy-cli train-layer --run {run.root} --j {j} --resume`"
                )
            lr = lr_at(progress.step, total_steps, spec.lr, spec.lr_drops, spec.lr_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr

            where = f"stage {j}, epoch {epoch + 1}, step {progress.step + 1}"
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                if trunk is not None:
                    with torch.no_grad():
                        x = trunk(x)
                logits = head(stage(x))
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise DivergedError(
                    f"{where}: the loss is {loss.item()} ({settings.precision}); the last good "
                    f"checkpoint is in {folder}. Lower the learning rate in the architecture's "
                    "training settings, or train in fp32 or bf16"
                )
            _optimizer_step(optimizer, scaler, loss, params, progress, settings, where)

            progress.losses.append(loss.item())
            progress.loss_sum += loss.item() * len(y)
            progress.correct += (logits.argmax(1) == y).sum().item()
            progress.seen += len(y)
            progress.step += 1
            progress.batch += 1
            bar.update(1)
            if progress.step % settings.checkpoint_every == 0 and progress.batch < len(loader):
                progress.seconds = time.perf_counter() - epoch_start
                save(progress)
            tick = time.perf_counter()
        bar.close()

        # The frozen stages must not have moved, whatever the mode.
        _check_frozen(run, j, lineage, trunk, trunk_hash)
        seconds = time.perf_counter() - epoch_start
        entry = {
            "event": "epoch",
            "stage": j,
            "epoch": epoch + 1,
            "steps": progress.step,
            "loss": progress.loss_sum / max(progress.seen, 1),
            "accuracy": 100 * progress.correct / max(progress.seen, 1),
            "lr": lr,
            "samples_per_s": progress.seen / seconds,
            "data_wait_share": progress.wait / seconds,
            "seconds": seconds,
            "precision": settings.precision,
        }
        progress.last_epoch = entry
        run.log_metrics(entry)
        log.info(
            "stage %d epoch %d/%d  loss %.4f  acc %.2f%%  lr %.3g  %.0f samples/s  "
            "data wait %.0f%%",
            j,
            epoch + 1,
            epochs,
            entry["loss"],
            entry["accuracy"],
            lr,
            entry["samples_per_s"],
            100 * entry["data_wait_share"],
        )
        progress.start_epoch(epoch + 1)
        save(progress)

    stage.eval()
    head.eval()
    record = run.save_stage(
        j,
        stage,
        head,
        {
            "stage": j,
            "lineage": lineage,
            "input": input_desc,
            "source": settings.source,
            "epochs": epochs,
            "steps": progress.step,
            "seconds": round(time.perf_counter() - started, 2),
            "final_train_loss": progress.last_epoch["loss"],
            "final_train_accuracy": progress.last_epoch["accuracy"],
            "precision": settings.precision,
            "deterministic": settings.deterministic,
            "resumed_from_steps": progress.resumed_from,
            "settings": _settings_record(settings),
            "training": asdict(spec),
            "environment": environment_record(),
        },
    )
    checkpoints.remove_checkpoints(folder)
    with contextlib.suppress(OSError):  # kept when it holds checkpoints set aside as damaged
        folder.rmdir()
    run.log_metrics({"event": "stage_trained", "stage": j, "seconds": record["seconds"]})
    return TrainResult(record=record, losses=progress.losses)


REQUESTED = ("source", "epochs", "max_steps", "precision")


def _resolve(settings: TrainSettings, folder: Path) -> TrainSettings:
    """Fill the options left out: on --resume from the newest checkpoint, else defaults."""
    requested = {}
    if settings.resume:
        requested = (checkpoints.newest_index(folder) or {}).get("requested", {})
    chosen = {k: getattr(settings, k) for k in REQUESTED}
    taken = {k: requested.get(k) for k in REQUESTED if chosen[k] is None}
    taken = {k: v for k, v in taken.items() if v is not None}
    if taken:
        log.info(
            "resuming with the checkpoint's %s", ", ".join(f"{k}={v}" for k, v in taken.items())
        )
    defaults = {"source": "cache", "precision": "fp32"}
    filled = {
        k: chosen[k] if chosen[k] is not None else taken.get(k, defaults.get(k)) for k in chosen
    }
    return replace(settings, **filled)


def _batches(loader, epoch: int, start: int):
    """The batches of ``epoch`` from batch ``start`` on."""
    if isinstance(loader, ImageLoader | FreshAugmentation):
        return loader.epoch(epoch, start)
    # Feature batches depend on the whole epoch's read order: read and drop the first ones.
    return islice(loader.epoch(epoch), start, None)


def _optimizer_step(optimizer, scaler, loss, params, progress, settings, where) -> None:
    """One update; refuses non-finite gradients, or fp16 scaling that keeps skipping steps."""
    optimizer.zero_grad(set_to_none=True)
    if not scaler.is_enabled():
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
        if not finite.all():
            raise DivergedError(
                f"{where}: {int((~finite).sum())} of {len(grads)} gradient tensors hold "
                f"non-finite values ({settings.precision}); the last good checkpoint is kept. "
                "Lower the learning rate in the architecture's training settings"
            )
        optimizer.step()
        return

    # fp16: the scaler skips a step whose scaled gradients overflow and lowers the scale.
    scale = scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if scaler.get_scale() < scale:
        progress.skipped_in_a_row += 1
        log.debug("%s: fp16 gradients overflowed; step skipped, scale %g", where, scale)
    else:
        progress.skipped_in_a_row = 0
    if progress.skipped_in_a_row >= settings.max_skipped_steps:
        raise DivergedError(
            f"{where}: the fp16 gradient scaler skipped {progress.skipped_in_a_row} steps in a "
            f"row (scale now {scaler.get_scale():g}); the last good checkpoint is kept. "
            "Train in bf16 or fp32, or lower the learning rate"
        )


def _resume(folder, fingerprint, stage, head, optimizer, scaler) -> _Progress | None:
    found = checkpoints.load_newest(folder)
    if found is None:
        log.info("no checkpoint in %s; training from the start", folder)
        return None
    state, path = found
    if state.get("format") != checkpoints.CHECKPOINT_FORMAT:
        raise checkpoints.CheckpointError(
            f"{path} has format {state.get('format')!r}; this version reads "
            f"{checkpoints.CHECKPOINT_FORMAT}. Pass --restart to discard it"
        )
    differs = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
    if differs:
        raise checkpoints.CheckpointError(
            f"{path} was written for other settings ({', '.join(differs)} differ); resume with "
            "the same --epochs/--steps, --source and --precision, or pass --restart to discard it"
        )
    stage.load_state_dict(state["stage"])
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    checkpoints.restore_random_states(state["random"])
    if state["torch_threads"] != torch.get_num_threads():
        log.warning(
            "%s was written with %d torch threads, this run has %d: the result may differ in "
            "the last bits from an uninterrupted run (give --threads %d for a bitwise match)",
            path,
            state["torch_threads"],
            torch.get_num_threads(),
            state["torch_threads"],
        )
    names = {f.name for f in _Progress.__dataclass_fields__.values()}
    progress = _Progress(**{k: state[k] for k in names})
    progress.resumed_from.append(progress.step)
    log.info(
        "resuming stage %d from %s: epoch %d, step %d",
        fingerprint["stage"],
        path,
        progress.epoch + 1,
        progress.step,
    )
    return progress


def _check_checkpoint_choice(run: Run, j: int, settings: TrainSettings, folder: Path) -> None:
    steps = checkpoints.checkpoint_steps(folder)
    if steps and not (settings.resume or settings.restart):
        raise RunStateError(
            f"stage {j} has checkpoints up to step {steps[-1]} in {folder}; continue with "
            f"`greedy-cli train-layer --run {run.root} --j {j} --resume`, or pass --restart to "
            "discard them"
        )
    if settings.resume and not steps and run.stage_current(j):
        raise RunStateError(
            f"stage {j} is trained and current and has no checkpoint to resume; leave out "
            "--resume to train it again"
        )


def _check_frozen(run: Run, j: int, lineage, trunk, trunk_hash) -> None:
    if run.lineage(j) != lineage:
        raise RunStateError(
            f"a stage below {j} was retrained while stage {j} trained; train stage {j} again "
            f"with `greedy-cli train-layer --run {run.root} --j {j} --restart`"
        )
    if trunk is not None and state_hash(trunk) != trunk_hash:
        raise RunStateError(
            f"the frozen stages 0..{j - 1} changed while stage {j} trained (parameters or "
            "batch-norm statistics); this is a bug, please report it"
        )


def _stop_at_step() -> int | None:
    value = os.environ.get(STOP_AT_STEP_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError as err:
        raise GreedyError(f"{STOP_AT_STEP_ENV}={value!r} is not a step number") from err


@contextlib.contextmanager
def _determinism(on: bool):
    """Refuse non-deterministic kernels and autotuning while training, or say they may run."""
    if not on:
        log.info(
            "not deterministic: torch may choose non-deterministic kernels (cuDNN autotuning "
            "on a GPU); pass --deterministic for bitwise-repeatable runs"
        )
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    log.info(
        "deterministic: non-deterministic torch kernels refused, cuDNN autotuning off; data "
        "order fixed by the seed; %d torch threads (keep the number for equal results)",
        torch.get_num_threads(),
    )
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        torch.backends.cudnn.deterministic = before[2]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _warn_precision_hardware(precision: str) -> None:
    """Say when this CPU has no native instructions for the chosen precision, and that
    torch's float16 kernels on CPU are slow even where it has them."""
    native = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}
    if precision not in native:
        return
    flags = _cpu_flags()
    if not flags & native[precision]:
        log.warning(
            "%s: this CPU has none of %s; torch has no native %s path here, expect it slower "
            "than fp32",
            precision,
            sorted(native[precision]),
            precision,
        )
    if precision == "fp16":
        log.warning(
            "fp16 on CPU: torch %s trains correctly but far slower than fp32 (measured in "
            "docs/training.md); fp16 is meant for GPUs, use fp32 on CPU",
            torch.__version__,
        )


def _settings_record(settings: TrainSettings) -> dict:
    record = asdict(settings)
    record.pop("progress")
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}
