"""Figure 3: cache-features against its limit, max(forward pass alone, writing alone).

For each cached stage j of ``fmnist`` (stages trained one step: a pass costs the same
trained or not), on the training and test splits:

- cache-features: the command's work, end to end, into a fresh store (records,
  checksums and commit included);
- forward alone: stage j over every sample, inputs already in memory as float32 tensors,
  at the command's batch size, outputs cast to the storage dtype;
- write alone: the same outputs, held in memory, written to a zarr store of the same
  chunks and codec.

The limit is max(forward, write): a writer that overlapped the two perfectly.
"""

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from bench.common import table
from pipeline import storage
from pipeline.cache import _compressors
from pipeline.defaults import DEFAULT_CODEC, DEFAULT_DTYPE

PRESET = "fmnist"


def _inputs(run, j: int, split: str, batch_size: int) -> list[torch.Tensor]:
    """Stage j's input batches over ``split``, read beforehand into memory."""
    from pipeline.cache import stage_input

    loader, trunk, _ = stage_input(run, j, split, batch_size, source="cache")
    batches = []
    with torch.no_grad():
        for x, _ in loader.epoch(0):
            batches.append(trunk(x) if trunk is not None else x.clone())
    return batches


def _forward(stage, batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    with torch.no_grad():
        out = [storage.encode(stage(x), DEFAULT_DTYPE) for x in batches]
    seconds = time.perf_counter() - started
    return seconds, np.concatenate(out)


def _write(values: np.ndarray, chunk: int, path: Path) -> float:
    codec = _compressors(DEFAULT_CODEC)
    started = time.perf_counter()
    array = zarr.create_array(
        str(path),
        shape=values.shape,
        chunks=(chunk, *values.shape[1:]),
        dtype=values.dtype,
        compressors=[codec],
        fill_value=storage.fill_value(DEFAULT_DTYPE),
    )
    for first in range(0, len(values), chunk):
        array[first : first + chunk] = values[first : first + chunk]
    return time.perf_counter() - started


def measure(data: Path, root: Path, stages: tuple[int, ...]) -> list[dict]:
    from pipeline.cache import CacheSettings, cache_features, open_features
    from pipeline.rundir import Run
    from pipeline.train import TrainSettings, train_layer

    run_dir = root / PRESET
    Run.open(run_dir, PRESET, data, 0)
    rows = []
    for j in range(max(stages) + 1):
        train_layer(TrainSettings(run=run_dir, j=j, max_steps=1, source="cache"))
        run = Run.open(run_dir)
        started = time.perf_counter()
        manifest = cache_features(CacheSettings(run=run_dir, j=j))
        command = time.perf_counter() - started
        if j not in stages:
            continue
        stage, _ = run.load_stage(j)
        chunk = manifest["chunk_samples"]
        batch_size = manifest["batch_size"]
        forward = write = 0.0
        nbytes = 0
        for split in run.data.splits:
            batches = _inputs(run, j, split, batch_size)
            seconds, values = _forward(stage, batches)
            forward += seconds
            nbytes += values.nbytes
            stored = np.asarray(open_features(run, j, split)[0])
            if not np.array_equal(stored, values):  # the limit must write the same bytes
                raise SystemExit(f"stage {j} {split}: the forward pass differs from the store")
            target = root / f"write-{j}-{split}.zarr"
            write += _write(values, chunk, target)
            shutil.rmtree(target)
            del batches, values, stored
        limit = max(forward, write)
        rows.append(
            {
                "stage": j,
                "samples": sum(run.data.count(split) for split in run.data.splits),
                "bytes": nbytes,
                "command_s": command,
                "forward_s": forward,
                "write_s": write,
                "limit_s": limit,
                "command_over_limit": command / limit,
            }
        )
    return rows


def run(small: bool = False, data: Path | None = None) -> dict:
    data = data or Path("data/fashion-mnist")
    stages = (0,) if small else (0, 1)
    with tempfile.TemporaryDirectory(dir=Path(data).parent) as tmp:
        rows = measure(Path(data), Path(tmp), stages)
    return {"data": str(data), "preset": PRESET, "stages": rows}


def show(result: dict) -> str:
    rows = [
        [
            r["stage"],
            f"{r['bytes'] / 1e6:,.0f}",
            r["forward_s"],
            r["write_s"],
            r["limit_s"],
            r["command_s"],
            f"{r['command_over_limit']:.2f}x",
        ]
        for r in result["stages"]
    ]
    header = ["stage", "MB", "forward s", "write s", "limit s", "cache-features s", "over limit"]
    return table(header, rows)
