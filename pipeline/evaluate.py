"""Accuracies of every stage's head, of the final model and of the paper's ensemble."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.cache import cache_ids, cache_state, open_features, read_manifest, store_url
from pipeline.errors import CacheError, RunStateError
from pipeline.loaders import FeatureLoader, ImageLoader
from pipeline.progress import BarFactory, open_bar
from pipeline.rundir import Run, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    run: Path
    split: str | None = None
    batch_size: int = 500
    workers: int = 2
    progress: BarFactory | None = None


class TopK:
    """Running top-1 and top-5 counts."""

    def __init__(self, num_classes: int):
        self.k = min(5, num_classes)
        self.top1 = self.top5 = self.seen = 0

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        best = logits.topk(self.k, dim=1).indices
        self.top1 += (best[:, 0] == y).sum().item()
        self.top5 += (best == y[:, None]).any(dim=1).sum().item()
        self.seen += len(y)

    def result(self, split: str) -> dict:
        return {
            "top1": round(100 * self.top1 / self.seen, 3),
            "top5": round(100 * self.top5 / self.seen, 3),
            "split": split,
            "samples": self.seen,
        }


def evaluate(settings: EvalSettings) -> dict:
    run = Run.open(settings.run)
    split = settings.split or run.data.eval_split
    if split is None:
        raise RunStateError(
            f"the dataset {run.data.root} has no test or val split; pass --split, one of "
            f"{sorted(run.data.splits)}"
        )
    run.data.path(split)
    for j in range(run.arch.depth):
        if not run.stage_current(j):
            raise RunStateError(
                f"stage {j} is not trained (or is stale); eval needs every stage. Run "
                f"`greedy-cli train-layer --run {run.root} --j {j}` (or `greedy-cli run`)"
            )
    modules = [run.load_stage(j) for j in range(run.arch.depth)]
    started = time.perf_counter()

    cached = [_stage_from_cache(run, j, modules[j], split, settings) for j in range(run.arch.depth)]
    final, ensemble, fidelity, from_images = _final_from_images(run, modules, split, settings)
    stages = [
        entry or {"stage": j, **from_images[j], "input": "images", **_times(run, j)}
        for j, entry in enumerate(cached)
    ]

    report = {
        "run": str(run.root),
        "arch": run.arch.name,
        "split": split,
        "stages": stages,
        "final": final,
        "ensemble": ensemble,
        "cache_fidelity": fidelity,
        "lineage": run.lineage(run.arch.depth),
        "caches": cache_ids(run),
        "seconds": round(time.perf_counter() - started, 2),
    }
    path = report_path(run, split)
    write_json_atomic(path, report)
    report["path"] = str(path)
    run.log_metrics({"event": "eval", "split": split, "final_top1": final["top1"]})
    return report


def report_path(run: Run, split: str) -> Path:
    """eval.json for the dataset's evaluation split, eval-<split>.json for any other."""
    if split == run.data.eval_split:
        return run.root / "eval.json"
    return run.root / f"eval-{split}.json"


def _stage_from_cache(run: Run, j: int, modules, split: str, settings: EvalSettings) -> dict | None:
    """Head j on stage j's features, read from its cache or computed from the one below;
    None when neither cache is current."""
    stage, head = modules
    if cache_state(run, j) == "current":
        features, labels, _ = open_features(run, j, split)
        apply, source, source_stage = head, f"features of stage {j}", j
    elif j > 0 and cache_state(run, j - 1) == "current":
        features, labels, _ = open_features(run, j - 1, split)
        apply, source = torch.nn.Sequential(stage, head), f"features of stage {j - 1}"
        source_stage = j - 1
    else:
        return None
    loader = FeatureLoader(
        features, labels, settings.batch_size, name=str(run.features_path(source_stage))
    )
    scores = TopK(run.arch.num_classes)
    with torch.no_grad():
        for x, y in loader.epoch(0):
            scores.update(apply(x), y)
    return {"stage": j, **scores.result(split), "input": source, **_times(run, j)}


def _times(run: Run, j: int) -> dict:
    record = run.record(j) or {}
    manifest = read_manifest(store_url(run, j)) or {}
    return {"train_seconds": record.get("seconds"), "cache_seconds": manifest.get("seconds")}


def _images(run: Run, split: str, settings: EvalSettings) -> ImageLoader:
    return ImageLoader(
        run.data, split, settings.batch_size, run.arch.input_shape, workers=settings.workers
    )


def _final_from_images(run: Run, modules, split: str, settings: EvalSettings):
    """The deployed model in float32 on the images, every head's logits for the ensemble,
    and how far each current cache lies from the float32 trunk."""
    depth = run.arch.depth
    final = TopK(run.arch.num_classes)
    ensemble = TopK(run.arch.num_classes)
    per_stage = [TopK(run.arch.num_classes) for _ in range(depth)]
    cached = {}
    for j in range(depth):
        if cache_state(run, j) == "current":
            cached[j] = open_features(run, j, split)[0]
    max_diff = {j: 0.0 for j in cached}
    max_ref = {j: 0.0 for j in cached}

    loader = _images(run, split, settings)
    bar = open_bar(settings.progress, len(loader), f"eval {split}", "batch")
    offset = 0
    with torch.no_grad():
        for x, y in loader.epoch(0):
            votes = 0
            for j, (stage, head) in enumerate(modules):
                x = stage(x)
                logits = head(x)
                per_stage[j].update(logits, y)
                votes = votes + (2**j) * logits
                if j in cached:
                    stored = storage.to_numpy(np.asarray(cached[j][offset : offset + len(y)]))
                    if not np.isfinite(stored).all():
                        raise CacheError(
                            f"{run.features_path(j)}/{split}: rows {offset}..{offset + len(y)} "
                            "hold non-finite values (a chunk is missing or damaged); write the "
                            f"cache again with `greedy-cli cache-features --run {run.root} --j {j}`"
                        )
                    max_diff[j] = max(max_diff[j], float(np.abs(stored - x.numpy()).max()))
                    max_ref[j] = max(max_ref[j], float(x.abs().max()))
            final.update(logits, y)
            ensemble.update(votes, y)
            offset += len(y)
            bar.update(1)
    bar.close()

    fidelity = [
        {
            "stage": j,
            "max_abs_diff": max_diff[j],
            "max_abs_value": max_ref[j],
            "max_rel_diff": max_diff[j] / max_ref[j] if max_ref[j] else 0.0,
        }
        for j in sorted(cached)
    ]
    from_images = [scores.result(split) for scores in per_stage]
    return final.result(split), ensemble.result(split), fidelity, from_images
