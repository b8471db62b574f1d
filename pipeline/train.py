"""Train stage j and its auxiliary head with stages 0..j-1 frozen."""

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline.cache import stage_input
from pipeline.errors import GreedyError
from pipeline.progress import BarFactory, open_bar
from pipeline.rundir import Run

log = logging.getLogger(__name__)

SOURCES = ("cache", "recompute")


@dataclass(frozen=True)
class TrainSettings:
    run: Path
    j: int
    preset: str | None = None
    data: Path | None = None
    seed: int | None = None
    source: str = "cache"
    epochs: int | None = None
    max_steps: int | None = None
    workers: int = 2
    memory_budget: int = 8 << 30
    progress: BarFactory | None = None


@dataclass
class TrainResult:
    record: dict
    losses: list[float] = field(default_factory=list)


class DivergedError(GreedyError):
    """The loss became non-finite."""


def order_seed(run_seed: int, j: int) -> int:
    """Seed of stage j's data order; the same for every input source."""
    return run_seed * 1000 + j


def lr_at(step: int, total_steps: int, lr: float, drops: tuple[float, ...], factor: float) -> float:
    """Step schedule: multiply by ``factor`` at each fraction of all steps in ``drops``."""
    passed = sum(step >= round(f * total_steps) for f in drops)
    return lr * factor**passed


def train_layer(settings: TrainSettings, run: Run | None = None) -> TrainResult:
    run = run or Run.open(
        settings.run, settings.preset, settings.data, settings.seed, stage=settings.j
    )
    j = settings.j
    run.check_stage_index(j)
    if settings.source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {settings.source!r}")
    spec = run.arch.training
    epochs = settings.epochs or run.arch.epochs(j)

    # Input: images for stage 0, else stage j-1's features or the recomputed trunk.
    # TODO: the paper's random crops and flips need augmented views in the cache; until
    # then every stage trains on un-augmented inputs, in both sources.
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
    )
    if len(loader) == 0:
        raise GreedyError(
            f"the training split has {loader.num_samples} samples, fewer than one batch of "
            f"{spec.batch_size}"
        )
    total_steps = epochs * len(loader)
    if settings.max_steps is not None:
        total_steps = settings.max_steps
        epochs = math.ceil(total_steps / len(loader))

    # Stage j and its head, initialised from the run's seed.
    torch.manual_seed(order_seed(run.seed, j))
    stage, head = run.build_stage(j)
    params = list(stage.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    log.info(
        "training stage %d of %s from %s: %d epoch(s), %d steps of %d",
        j,
        run.arch.name,
        input_desc["kind"],
        epochs,
        total_steps,
        spec.batch_size,
    )

    started = time.perf_counter()
    losses: list[float] = []
    step = 0
    history = []
    for epoch in range(epochs):
        stage.train()
        head.train()
        seen = correct = 0
        loss_sum = wait = 0.0
        epoch_start = time.perf_counter()
        bar = open_bar(
            settings.progress,
            min(len(loader), total_steps - step),
            f"stage {j} epoch {epoch + 1}/{epochs}",
            "step",
        )
        tick = time.perf_counter()
        for x, y in loader.epoch(epoch):
            wait += time.perf_counter() - tick
            if step >= total_steps:
                break
            lr = lr_at(step, total_steps, spec.lr, spec.lr_drops, spec.lr_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if trunk is not None:
                with torch.no_grad():
                    x = trunk(x)

            logits = head(stage(x))
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise DivergedError(
                    f"stage {j}: the loss is {loss.item()} at epoch {epoch + 1}, step {step}; "
                    "lower the learning rate in the architecture's training settings"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            losses.append(loss.item())
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            step += 1
            bar.update(1)
            tick = time.perf_counter()
        bar.close()

        seconds = time.perf_counter() - epoch_start
        entry = {
            "event": "epoch",
            "stage": j,
            "epoch": epoch + 1,
            "steps": step,
            "loss": loss_sum / max(seen, 1),
            "accuracy": 100 * correct / max(seen, 1),
            "lr": lr,
            "samples_per_s": seen / seconds,
            "data_wait_share": wait / seconds,
            "seconds": seconds,
        }
        history.append(entry)
        run.log_metrics(entry)
        log.info(
            "stage %d epoch %d/%d  loss %.4f  acc %.2f%%  %.0f samples/s  data wait %.0f%%",
            j,
            epoch + 1,
            epochs,
            entry["loss"],
            entry["accuracy"],
            entry["samples_per_s"],
            100 * entry["data_wait_share"],
        )

    stage.eval()
    head.eval()
    record = run.save_stage(
        j,
        stage,
        head,
        {
            "stage": j,
            "lineage": run.lineage(j),
            "input": input_desc,
            "source": settings.source,
            "epochs": epochs,
            "steps": step,
            "seconds": round(time.perf_counter() - started, 2),
            "final_train_loss": history[-1]["loss"],
            "final_train_accuracy": history[-1]["accuracy"],
            "settings": _settings_record(settings),
            "training": asdict(spec),
        },
    )
    run.log_metrics({"event": "stage_trained", "stage": j, "seconds": record["seconds"]})
    return TrainResult(record=record, losses=losses)


def _settings_record(settings: TrainSettings) -> dict:
    record = asdict(settings)
    record.pop("progress")
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}
