"""Figure 2: the whole greedy run with caching, with recomputing, and its limit, by depth.

Networks of J = 2, 3, ... stages: the ``fmnist`` preset's three stages, then further
128-channel stages at 7x7, each with its k=2 head, one epoch per stage (so that the
deepest fits the suite's time; every J and both modes train the same epochs). Per J:

- cached: ``run`` (train every stage, cache every stage below the last, evaluate);
- recompute: ``run --source recompute`` (no cache; every frozen stage runs on every
  batch, in training and in evaluation);
- limit: the compute alone, from timed steps on inputs already in memory as float32
  tensors: for each stage, its training steps (one epoch of batches) at the measured time
  per step, plus for each cached stage one forward pass over every sample at the measured
  time per batch.
"""

import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import table

BASE = "fmnist"
EXTRA = {"width": 128, "downsample": False, "batch_norm": True, "k": 2, "head_width": 128}
TIMED = 30  # steps or batches timed per stage for the limit, after WARMUP
WARMUP = 5


def architecture(depth: int, epochs: int = 1) -> dict:
    from stages import load_architecture

    arch = load_architecture(BASE).to_dict()
    stages = [dict(s) for s in arch["stages"][:depth]]
    stages += [dict(EXTRA, epochs=None) for _ in range(depth - len(stages))]
    arch.update(name=f"{BASE}-J{depth}", stages=stages, notes="bench.whole_run")
    arch["training"]["epochs"] = epochs
    return arch


def _limit(arch_path: Path, samples: dict[str, int]) -> dict:
    """Seconds of compute alone: training steps and cached stages' forward passes."""
    from torch.nn import functional as F

    from stages import AuxHead, Stage, load_architecture

    arch = load_architecture(str(arch_path))
    bs = arch.training.batch_size
    steps = samples["train"] // bs  # the training loader drops the last partial batch
    batches = sum(-(-n // bs) for n in samples.values())
    per_stage = []
    for j, spec in enumerate(arch.stages):
        stage, head = Stage(spec, arch.stage_in_shape(j)[0]), AuxHead(spec, arch.num_classes)
        x = torch.randn(bs, *arch.stage_in_shape(j))
        y = torch.randint(0, arch.num_classes, (bs,))
        opt = torch.optim.SGD([*stage.parameters(), *head.parameters()], lr=0.01, momentum=0.9)

        def train_step():
            loss = F.cross_entropy(head(stage(x)), y)  # noqa: B023 - timed right here
            opt.zero_grad(set_to_none=True)  # noqa: B023
            loss.backward()
            opt.step()  # noqa: B023

        step = _per_call(train_step)
        stage.eval()
        with torch.no_grad():
            forward = _per_call(lambda: stage(x))  # noqa: B023
        cached = j < arch.depth - 1
        per_stage.append(
            {
                "stage": j,
                "step_s": step,
                "forward_batch_s": forward,
                "train_s": step * steps * arch.epochs(j),
                "cache_s": forward * batches if cached else 0.0,
            }
        )
    total = sum(s["train_s"] + s["cache_s"] for s in per_stage)
    return {"seconds": total, "stages": per_stage}


def _per_call(fn) -> float:
    for _ in range(WARMUP):
        fn()
    started = time.perf_counter()
    for _ in range(TIMED):
        fn()
    return (time.perf_counter() - started) / TIMED


def _timed_run(arch_path: Path, data: Path, run_dir: Path, source: str) -> dict:
    from pipeline.greedy import RunSettings, run_greedy

    started = time.perf_counter()
    report = run_greedy(
        RunSettings(preset=str(arch_path), data=data, run=run_dir, seed=0, source=source)
    )
    return {"seconds": time.perf_counter() - started, "final_top1": report["final"]["top1"]}


def measure(data: Path, root: Path, depths: tuple[int, ...]) -> list[dict]:
    from pipeline.datasets import DatasetInfo

    info = DatasetInfo.load(data)
    samples = {split: info.count(split) for split in info.splits}
    rows = []
    for depth in depths:
        arch_path = root / f"J{depth}.json"
        arch_path.write_text(json.dumps(architecture(depth)))
        cached = _timed_run(arch_path, data, root / f"J{depth}-cache", "cache")
        recompute = _timed_run(arch_path, data, root / f"J{depth}-recompute", "recompute")
        limit = _limit(arch_path, samples)
        rows.append(
            {
                "depth": depth,
                "cached_s": cached["seconds"],
                "recompute_s": recompute["seconds"],
                "limit_s": limit["seconds"],
                "cached_over_limit": cached["seconds"] / limit["seconds"],
                "recompute_over_cached": recompute["seconds"] / cached["seconds"],
                "cached_top1": cached["final_top1"],
                "recompute_top1": recompute["final_top1"],
                "limit": limit["stages"],
            }
        )
    return rows


def run(small: bool = False, data: Path | None = None) -> dict:
    data = Path(data or "data/fashion-mnist")
    depths = (2,) if small else (2, 3, 4, 5)
    with tempfile.TemporaryDirectory(dir=data.parent) as tmp:
        rows = measure(data, Path(tmp), depths)
    return {"data": str(data), "epochs_per_stage": 1, "depths": rows}


def show(result: dict) -> str:
    rows = [
        [
            r["depth"],
            r["limit_s"],
            r["cached_s"],
            r["recompute_s"],
            f"{r['cached_over_limit']:.2f}x",
            f"{r['recompute_over_cached']:.2f}x",
        ]
        for r in result["depths"]
    ]
    header = ["J", "limit s", "cached s", "recompute s", "cached/limit", "recompute/cached"]
    return table(header, rows)
