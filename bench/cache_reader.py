"""How fast the training reader reads a feature store, and what its order costs.

For each stage j given, from stage j-1's store in ``--run``:

- reader: samples/s and MB/s of one shuffled epoch read from the store on disk (memory
  mode off: whole chunks in a shuffled order, a read-ahead thread, a shuffle buffer),
  next to the same reader holding the split in memory (one full random permutation);
- epochs: the seconds of ``--steps`` training steps of stage j, reading from the store
  and from memory, alternated ``--repeats`` times, on copies of the run (the run itself
  is not changed);
- accuracy (``--accuracy-seeds``): stage ``--accuracy-stage`` trained for its full epochs
  with each seed, once in the store reader's order and once in a full random permutation,
  and its head's top-1 on the test split.

The reader's thread shares the cores that torch is given (``--threads``).
Run as ``python -m bench.cache_reader --run RUN``; results go to bench/results/.
"""

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import open_features, store_url
from pipeline.loaders import FeatureLoader
from pipeline.rundir import Run
from pipeline.train import TrainSettings, train_layer

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
IN_MEMORY = 64 << 30
FROM_STORE = 0
PARTS = ("codecs", "reader", "epochs", "accuracy")


def reader_throughput(run: Run, j: int, batch_size: int, seed: int = 0) -> dict:
    """One shuffled epoch of stage j's training input, read from the store and from memory."""
    features, labels, manifest = open_features(run, j - 1, "train")
    sample_bytes = int(np.prod(features.shape[1:])) * features.dtype.itemsize
    result = {"samples": int(features.shape[0]), "chunk_samples": manifest["chunk_samples"]}
    for name, budget in (("store", FROM_STORE), ("memory", IN_MEMORY)):
        loader = FeatureLoader(
            features,
            labels,
            batch_size,
            shuffle=True,
            seed=seed,
            drop_last=True,
            memory_budget=budget,
            name=store_url(run, j - 1),
        )
        started = time.perf_counter()
        seen = sum(len(y) for _, y in loader.epoch(0))
        seconds = time.perf_counter() - started
        result[name] = {
            "seconds": round(seconds, 3),
            "samples_per_s": round(seen / seconds),
            "mb_per_s": round(seen * sample_bytes / seconds / 1e6, 1),
        }
    return result


def codec_comparison(run: Run, j: int, scratch: Path, samples: int = 10000) -> list[dict]:
    """Size, write and read speed of stage j's test features under each codec and chunk size."""
    import zarr

    from pipeline.cache import _compressors

    features, _, _ = open_features(run, j, "test")
    values = np.asarray(features[:samples])
    sample_bytes = values[0].nbytes
    rows = []
    for codec, level in (("zstd", 1), ("zstd", 3), ("lz4", 9), ("none", 0)):
        for chunk_mb in (1.0, 4.0, 16.0):
            chunk = max(1, int(chunk_mb * 2**20 // sample_bytes))
            path = scratch / f"codec-{codec}{level}-{chunk_mb}.zarr"
            array = zarr.create_array(
                str(path),
                shape=values.shape,
                chunks=(chunk, *values.shape[1:]),
                dtype=values.dtype,
                compressors=_compressors(codec, level),
                fill_value=0 if values.dtype == np.uint16 else float("nan"),
            )
            started = time.perf_counter()
            array[:] = values
            write_s = time.perf_counter() - started
            stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            order = np.random.default_rng(0).permutation(-(-len(values) // chunk))
            started = time.perf_counter()
            for c in order:
                np.asarray(array[c * chunk : (c + 1) * chunk])
            read_s = time.perf_counter() - started
            shutil.rmtree(path)
            rows.append(
                {
                    "codec": codec,
                    "level": level,
                    "chunk_mb": chunk_mb,
                    "ratio": round(values.nbytes / stored, 2),
                    "write_mb_per_s": round(values.nbytes / write_s / 1e6, 1),
                    "read_mb_per_s": round(values.nbytes / read_s / 1e6, 1),
                }
            )
    return rows


def _copy_run(run: Run, j: int, dest: Path, seed: int | None = None) -> Run:
    """A run directory holding stages 0..j-1 and a link to stage j-1's store; ``seed``
    replaces the run's seed, which draws stage j's initial weights and sample order."""
    dest.mkdir(parents=True)
    shutil.copy(run.root / "arch.json", dest / "arch.json")
    meta = json.loads((run.root / "run.json").read_text())
    meta["seed"] = run.seed if seed is None else seed
    (dest / "run.json").write_text(json.dumps(meta, indent=2))
    for i in range(j):
        shutil.copytree(run.stage_dir(i), dest / run.stage_dir(i).name)
    (dest / "features").mkdir()
    source = run.features_path(j - 1)
    pointer = source.with_suffix(".location")
    if pointer.is_file():
        shutil.copy(pointer, dest / "features" / pointer.name)
    else:
        (dest / "features" / source.name).symlink_to(source.resolve())
    return Run.open(dest)


def _epochs(run: Run) -> list[dict]:
    lines = (run.root / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "epoch"]


def _test_top1(run: Run, j: int, batch_size: int) -> float:
    """Top-1 of stage j's head on the test split, from stage j-1's store."""
    stage, head = run.load_stage(j)
    features, labels, _ = open_features(run, j - 1, "test")
    loader = FeatureLoader(features, labels, batch_size, memory_budget=IN_MEMORY)
    correct = 0
    with torch.no_grad():
        for x, y in loader.epoch(0):
            correct += (head(stage(x)).argmax(1) == y).sum().item()
    return 100 * correct / loader.num_samples


def train_stage(
    run: Run,
    j: int,
    budget: int,
    epochs: int | None,
    scratch: Path,
    seed: int | None = None,
    steps: int | None = None,
) -> dict:
    """Train stage j on a copy of the run, reading from the store (budget 0) or memory."""
    copy = _copy_run(run, j, scratch / f"stage{j}-{budget}-{time.monotonic_ns()}", seed)
    try:
        settings = TrainSettings(
            run=copy.root, j=j, epochs=epochs, max_steps=steps, memory_budget=budget
        )
        train_layer(settings, copy)
        epochs_done = _epochs(copy)
        return {
            "epoch_seconds": [round(e["seconds"], 2) for e in epochs_done],
            "data_wait_share": [round(e["data_wait_share"], 4) for e in epochs_done],
            "test_top1": round(_test_top1(copy, j, run.arch.training.batch_size), 2),
        }
    finally:
        shutil.rmtree(copy.root)


def measure(
    run_dir: Path,
    stages: tuple[int, ...] = (1, 2),
    accuracy_seeds: tuple[int, ...] = (),
    accuracy_stage: int = 1,
    accuracy_epochs: int | None = None,
    threads: int = 2,
    scratch: Path | None = None,
    parts: tuple[str, ...] = PARTS,
    out: Path | None = None,
    steps: int = 150,
    repeats: int = 3,
) -> dict:
    """The measurements named in ``parts``, as a dict ready for JSON; written to ``out``
    after each one when given."""
    torch.set_num_threads(threads)
    run = Run.open(run_dir)
    batch_size = run.arch.training.batch_size
    result = {
        "run": str(run.root),
        "arch": run.arch.name,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "platform": platform.platform(),
        "batch_size": batch_size,
        "reader": {},
        "epochs": {},
        "accuracy": [],
        "accuracy_epochs": accuracy_epochs or run.arch.epochs(accuracy_stage),
    }
    scratch = Path(scratch or tempfile.gettempdir())

    def save():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")

    if "codecs" in parts:
        log.info("codecs and chunk sizes on stage %d's test features", stages[0] - 1)
        result["codecs"] = codec_comparison(run, stages[0] - 1, scratch)
        save()
    for j in stages:
        if "reader" in parts:
            log.info("stage %d: reader throughput", j)
            result["reader"][j] = reader_throughput(run, j, batch_size)
            save()
        if "epochs" in parts:
            # Alternate the two readers over a number of steps, so that a change of the
            # machine's load falls on both; the median ratio is reported.
            log.info("stage %d: training steps from the store and from memory", j)
            times = {"store": [], "memory": []}
            waits = {"store": [], "memory": []}
            for _ in range(repeats):
                for name, budget in (("store", FROM_STORE), ("memory", IN_MEMORY)):
                    trained = train_stage(run, j, budget, None, scratch, steps=steps)
                    times[name].append(trained["epoch_seconds"][0])
                    waits[name].append(trained["data_wait_share"][0])
            ratios = [a / b for a, b in zip(times["store"], times["memory"], strict=True)]
            result["epochs"][j] = {
                "steps": steps,
                "store_seconds": times["store"],
                "memory_seconds": times["memory"],
                "store_data_wait_share": waits["store"],
                "memory_data_wait_share": waits["memory"],
                "store_over_memory_median": round(float(np.median(ratios)), 3),
            }
            save()
    for seed in accuracy_seeds if "accuracy" in parts else ():
        for order, budget in (("store reader", FROM_STORE), ("full permutation", IN_MEMORY)):
            log.info("seed %d: stage %d, %s order", seed, accuracy_stage, order)
            trained = train_stage(run, accuracy_stage, budget, accuracy_epochs, scratch, seed)
            result["accuracy"].append({"seed": seed, "order": order, **trained})
            log.info("seed %d, %s order: test top-1 %.2f%%", seed, order, trained["test_top1"])
            save()
    result["load_average_after"] = os.getloadavg()
    save()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run with current caches")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accuracy-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--accuracy-stage", type=int, default=1)
    parser.add_argument(
        "--accuracy-epochs", type=int, default=None, help="[default: the stage's epochs]"
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--steps", type=int, default=150, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each reader")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=None, help="folder for run copies")
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_reader.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    result = measure(
        args.run,
        tuple(args.stages),
        tuple(args.accuracy_seeds),
        args.accuracy_stage,
        args.accuracy_epochs,
        args.threads,
        args.scratch,
        tuple(args.parts),
        args.out,
        args.steps,
        args.repeats,
    )
    print(json.dumps({"reader": result["reader"], "epochs": result["epochs"]}, indent=2))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
