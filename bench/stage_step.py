"""Figure 1: the training step of each stage, from the cache, recomputing the trunk, and on
inputs already in memory as tensors (the limit for the cached path).

Presets: ``fmnist`` on Fashion-MNIST and the paper's ``cifar10-k3`` on CIFAR-shaped
data made for the purpose (:func:`cifar_shaped`). For each stage j of a preset on a
prepared dataset: a run whose stages are trained for
one step (the weights do not change a step's cost) and cached, then ``steps`` timed
training steps of stage j and its head per mode, after ``warmup`` untimed ones:

- cache: the batches the cached path trains on (stage j-1's features, held in memory);
- recompute: images through the frozen stages 0..j-1 on every batch;
- memory: the cached path's batches taken beforehand into a list of float32 tensors.
"""

import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

WARMUP = 5
# A cifar10-k3 step at batch 128 (about 1 GMAC a sample forward, its head included) takes
# 4 to 7 s on the 2-core machine, so the suite times 3 of them per mode to stay within its
# half hour; bench/gpu.py times 50 on a GPU.
CIFAR_STEPS_ON_CPU = 3
CIFAR_WARMUP_ON_CPU = 1


def _time_steps(run, j: int, batches, steps: int, trunk=None, warmup: int = WARMUP) -> float:
    """Seconds per step of stage j and its head over ``batches``, after the warm-up."""
    stage, head = run.build_stage(j)
    params = [*stage.parameters(), *head.parameters()]
    spec = run.arch.training
    opt = torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    started, done = None, 0
    for k, (x, y) in enumerate(batches):
        if k == warmup:
            started = time.perf_counter()
        if trunk is not None:
            with torch.no_grad():
                x = trunk(x)
        loss = F.cross_entropy(head(stage(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = k + 1
        if done == warmup + steps:
            break
    if done < warmup + steps:
        raise SystemExit(f"stage {j}: fewer than {warmup + steps} batches to time")
    return (time.perf_counter() - started) / steps


def _epochs(loader):
    """Batches of consecutive epochs, as long as the caller takes them."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def measure(preset: str, data: Path, steps: int, root: Path, warmup: int = WARMUP) -> list[dict]:
    from pipeline.cache import CacheSettings, cache_features, stage_input
    from pipeline.rundir import Run
    from pipeline.train import TrainSettings, order_seed, train_layer

    run_dir = root / preset
    rows = []
    for j in range(Run.open(run_dir, preset, data, 0).arch.depth):
        run = Run.open(run_dir)
        train_layer(TrainSettings(run=run_dir, j=j, max_steps=1, source="cache"), run)
        bs = run.arch.training.batch_size
        common = {"shuffle": True, "seed": order_seed(run.seed, j), "drop_last": True}
        loader, _, _ = stage_input(run, j, "train", bs, source="cache", **common)
        cached = _time_steps(run, j, _epochs(loader), steps, warmup=warmup)
        memory = [b for _, b in zip(range(warmup + steps), _epochs(loader), strict=False)]
        in_memory = _time_steps(run, j, iter(memory), steps, warmup=warmup)
        loader, trunk, _ = stage_input(run, j, "train", bs, source="recompute", **common)
        recompute = _time_steps(run, j, _epochs(loader), steps, trunk, warmup=warmup)
        rows.append(
            {
                "preset": preset,
                "stage": j,
                "batch_size": bs,
                "steps": steps,
                "warmup_steps": warmup,
                "cache_s": cached,
                "recompute_s": recompute,
                "memory_s": in_memory,
                "cache_over_memory": cached / in_memory,
                "recompute_over_cache": recompute / cached,
            }
        )
        if j < run.arch.depth - 1:
            cache_features(CacheSettings(run=run_dir, j=j))
    return rows


def cifar_shaped(root: Path, per_batch: int = 256) -> Path:
    """A CIFAR-10 dataset of random pixels, prepared: CIFAR's layout and shapes, made here.

    Six batches of ``per_batch`` 32x32x3 images (five for training, one for test) in the
    python-pickle layout that ``prepare cifar10`` reads; the step times measured on it
    are those of CIFAR-10's, since a step's cost does not depend on the pixels.
    """
    import pickle

    import numpy as np

    from pipeline.prepare import PrepareSettings, prepare

    src = root / "cifar-10-batches-py"
    src.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(10)]
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(src / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    out = root / "cifar10"
    prepare(PrepareSettings(dataset="cifar10", src=src, out=out))
    return out


def run(small: bool = False, data: Path | None = None) -> dict:
    """fmnist on Fashion-MNIST, then (unless ``small``) cifar10-k3 on CIFAR-shaped data."""
    data = data or Path("data/fashion-mnist")
    steps = 10 if small else 50
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure("fmnist", data, steps, Path(tmp))
        if not small:
            cifar = cifar_shaped(Path(tmp) / "cifar-shaped")
            rows += measure(
                "cifar10-k3", cifar, CIFAR_STEPS_ON_CPU, Path(tmp), warmup=CIFAR_WARMUP_ON_CPU
            )
    return {"data": str(data), "stages": rows}


def show(result: dict) -> str:
    from bench.common import table

    rows = [
        [
            r["preset"],
            r["stage"],
            r["memory_s"] * 1e3,
            r["cache_s"] * 1e3,
            r["recompute_s"] * 1e3,
            f"{r['cache_over_memory']:.2f}x",
            f"{r['recompute_over_cache']:.2f}x",
        ]
        for r in result["stages"]
    ]
    header = [
        "preset",
        "stage",
        "memory ms",
        "cache ms",
        "recompute ms",
        "cache/memory",
        "recompute/cache",
    ]
    return table(header, rows)
