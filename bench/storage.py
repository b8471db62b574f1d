"""Figure 4: storage dtypes and codecs of the feature cache, and the accuracy of each dtype.

``python -m bench storage`` (part of the suite): stage 0 of ``fmnist`` trained for one
epoch, its float32 outputs over the test split (10,000 samples) held in memory, then for
each storage dtype and codec: bytes on disk per cached element, and write and read MB/s
(of the uncompressed storage-dtype bytes) through zarr with the cache's 4 MiB chunks, and
the largest error against float32 relative to the largest value.

``python -m bench.storage --accuracy --data DATA`` (not in the suite: about 20 minutes a
row on 2 cores): the whole ``fmnist`` preset with each storage dtype, seeds 0 and 1 side
by side, one core each; the test top-1 of each. float16 is the default.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from bench.common import save, table

DTYPES = ("float16", "bfloat16", "float32")
CODECS = (("zstd", 1), ("lz4", 9), ("none", 0))
CHUNK_BYTES = 4 << 20
ACCURACY_ROWS = {dtype: ["--dtype", dtype] for dtype in DTYPES}


def _features(data: Path, root: Path) -> np.ndarray:
    """Stage 0's float32 outputs on the test split, after one epoch of training."""
    from pipeline.loaders import ImageLoader
    from pipeline.rundir import Run
    from pipeline.train import TrainSettings, train_layer

    run = Run.open(root / "run", "fmnist", data, 0)
    train_layer(TrainSettings(run=run.root, j=0, epochs=1), run)
    stage, _ = run.load_stage(0)
    loader = ImageLoader(run.data, "test", run.arch.training.batch_size, run.arch.input_shape)
    with torch.no_grad():
        return torch.cat([stage(x) for x, _ in loader.epoch(0)]).numpy()


def measure(values: np.ndarray, root: Path) -> list[dict]:
    from pipeline import storage
    from pipeline.cache import _compressors

    rows = []
    for dtype in DTYPES:
        stored = storage.encode(torch.from_numpy(values), dtype)
        back = storage.to_numpy(stored)
        error = float(np.abs(back - values).max() / np.abs(values).max())
        chunk = max(1, CHUNK_BYTES // (stored[0].nbytes))
        for codec, level in CODECS:
            path = root / f"{dtype}-{codec}.zarr"
            array = zarr.create_array(
                str(path),
                shape=stored.shape,
                chunks=(chunk, *stored.shape[1:]),
                dtype=stored.dtype,
                compressors=_compressors(codec, level),
                fill_value=storage.fill_value(dtype),
            )
            started = time.perf_counter()
            for first in range(0, len(stored), chunk):
                array[first : first + chunk] = stored[first : first + chunk]
            write_s = time.perf_counter() - started
            started = time.perf_counter()
            read = [
                np.asarray(array[first : first + chunk]) for first in range(0, len(stored), chunk)
            ]
            read_s = time.perf_counter() - started
            if not np.array_equal(np.concatenate(read), stored):
                raise SystemExit(f"{dtype} {codec}: the store does not read back what was written")
            on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
            rows.append(
                {
                    "dtype": dtype,
                    "codec": codec,
                    "level": level,
                    "bytes_per_element": on_disk / values.size,
                    "write_mb_s": stored.nbytes / write_s / 1e6,
                    "read_mb_s": stored.nbytes / read_s / 1e6,
                    "max_rel_error": error,
                }
            )
    return rows


def run(small: bool = False, data: Path | None = None) -> dict:
    data = Path(data or "data/fashion-mnist")
    with tempfile.TemporaryDirectory(dir=data.parent) as tmp:
        values = _features(data, Path(tmp))
        if small:
            values = values[:1000]
        rows = measure(values, Path(tmp))
    return {"data": str(data), "elements": int(values.size), "formats": rows}


def show(result: dict) -> str:
    rows = [
        [
            r["dtype"],
            r["codec"],
            f"{r['bytes_per_element']:.3f}",
            r["write_mb_s"],
            r["read_mb_s"],
            f"{r['max_rel_error']:.1e}",
        ]
        for r in result["formats"]
    ]
    header = ["dtype", "codec", "bytes/element", "write MB/s", "read MB/s", "max rel error"]
    return table(header, rows)


def accuracy(data: Path, out: Path) -> dict:
    """The ``fmnist`` preset trained from each storage dtype, two seeds."""
    from bench.augmentation import SEEDS, _wall, run_row

    out.mkdir(parents=True, exist_ok=True)
    for dtype, extra in ACCURACY_ROWS.items():
        if not (out / f"{dtype}-s{SEEDS[-1]}" / "eval.json").exists():
            print(f"row {dtype} ...", flush=True)
            run_row(dtype, extra, data.resolve(), out.resolve())
    rows = {}
    for dtype in ACCURACY_ROWS:
        finals = [
            json.loads((out / f"{dtype}-s{seed}" / "eval.json").read_text())["final"]["top1"]
            for seed in SEEDS
        ]
        rows[dtype] = {
            "final_top1": finals,
            "mean": round(sum(finals) / len(finals), 2),
            "spread": round((max(finals) - min(finals)) / 2, 2),
            "wall_seconds": [_wall(out, dtype, seed) for seed in SEEDS],
        }
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="train the preset per dtype")
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-storage"))
    args = parser.parse_args(argv)
    if not args.accuracy:
        parser.error("the formats' sizes and speeds run with `python -m bench storage`")
    result = accuracy(args.data, args.out)
    path = save("storage_accuracy", result)
    print(
        table(
            ["dtype", "seed 0", "seed 1", "mean", "+-"],
            [[k, *r["final_top1"], r["mean"], r["spread"]] for k, r in result["rows"].items()],
        )
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
