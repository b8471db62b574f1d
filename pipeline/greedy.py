"""The whole greedy run: train, cache and evaluate every stage, skipping what is current.

What is current is decided from hashes (a stage's recorded input lineage, a store's
manifest), never from a file's existence: after stage j is retrained, stage j's cache and
every stage and cache above it are stale and are redone; nothing below is touched. A
stage whose training was stopped continues from its newest good checkpoint.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoints
from pipeline.cache import (
    CacheSettings,
    cache_features,
    cache_ids,
    cache_state,
    read_manifest,
    store_url,
)
from pipeline.evaluate import EvalSettings, evaluate
from pipeline.progress import BarFactory
from pipeline.rundir import Run
from pipeline.train import TrainSettings, checkpoint_folder, train_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    preset: str
    data: Path
    run: Path
    seed: int | None = None
    source: str = "cache"
    dtype: str = "float16"
    workers: int = 2
    memory_budget: int = 8 << 30
    precision: str | None = None  # fp32, or a stopped stage's own on resume
    deterministic: bool = False
    checkpoint_every: int = 1000
    progress: BarFactory | None = None


def run_greedy(settings: RunSettings) -> dict:
    run = Run.open(settings.run, settings.preset, settings.data, settings.seed)
    common = {"workers": settings.workers, "progress": settings.progress}
    last = run.arch.depth - 1

    for j in range(run.arch.depth):
        stopped = checkpoints.checkpoint_steps(checkpoint_folder(run, j))
        if run.stage_current(j) and not stopped:
            log.info("stage %d is trained and current; skipping", j)
        else:
            train_layer(
                TrainSettings(
                    run=run.root,
                    j=j,
                    source=settings.source,
                    memory_budget=settings.memory_budget,
                    resume=bool(stopped),
                    precision=settings.precision,
                    deterministic=settings.deterministic,
                    checkpoint_every=settings.checkpoint_every,
                    **common,
                ),
                run,
            )
        # The last stage's features feed nothing but eval, which reads the one below.
        if j == last or settings.source == "recompute":
            continue
        manifest = read_manifest(store_url(run, j)) or {}
        if cache_state(run, j) == "current" and manifest.get("dtype") == settings.dtype:
            log.info("stage %d features are cached and current; skipping", j)
        else:
            cache_features(CacheSettings(run=run.root, j=j, dtype=settings.dtype, **common))

    previous = _read_report(run.root / "eval.json")
    if (
        previous.get("lineage") == run.lineage(run.arch.depth)
        and previous.get("split") == run.data.eval_split
        and previous.get("caches") == cache_ids(run)
    ):
        log.info("eval.json is current; skipping evaluation")
        return previous
    return evaluate(EvalSettings(run=run.root, **common))


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
