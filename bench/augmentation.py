"""What augmentation costs with cached features: the table of docs/augmentation.md.

Rows, each the whole ``fmnist`` preset (train, cache and evaluate every stage, same
epochs) with seeds 0 and 1:

- no augmentation: one un-augmented view cached;
- V = 2, 4, 8: ``run --views V``, one of V cached views per chunk and epoch;
- recompute: ``run --source recompute --augment``, fresh augmentation at every step and
  the frozen stages recomputed on every batch, as the paper's authors trained.

The two seeds of a row run side by side, one core and one loader thread each, so that
every row meets the same machine. Per row: test top-1 of each stage's head and of the
final model, and the wall time of each seed. Then, per stage above 0 and per V, the
epochs at which caching V views and training from them costs as much as recomputing:
below it, recomputing is cheaper.

Run as ``python -m bench.augmentation --data DATA [--out DIR]``; ``--collect DIR`` only
reads finished rows. Results go to bench/results/augmentation.json. It takes about 1.5
hours on a 2-core machine and needs ~25 GB of disk while V = 8 runs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import save, table

REPO = Path(__file__).resolve().parent.parent
SEEDS = (0, 1)
ROWS = {
    "noaug": [],
    "v2": ["--views", "2"],
    "v4": ["--views", "4"],
    "v8": ["--views", "8"],
    "recompute": ["--source", "recompute", "--augment"],
}
LABELS = {
    "noaug": "no augmentation",
    "v2": "V = 2",
    "v4": "V = 4",
    "v8": "V = 8",
    "recompute": "recompute, fresh augmentation",
}
VIEWS = {"noaug": 1, "v2": 2, "v4": 4, "v8": 8}


def run_row(name: str, extra: list[str], data: Path, out: Path, preset: str = "fmnist") -> None:
    """Both seeds of a row (``run PRESET`` with ``extra`` arguments) side by side, one core
    each; each run's wall time goes to OUT/<row>-s<seed>.wall.json."""
    procs = []
    for seed in SEEDS:
        run_dir = out / f"{name}-s{seed}"
        args = [sys.executable, str(REPO / "cli.py"), "run", preset, "--data", str(data)]
        args += ["--run", str(run_dir), "--seed", str(seed), "--threads", "1", "--workers", "1"]
        env = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log = open(out / f"{name}-s{seed}.log", "w")  # noqa: SIM115 - closed below
        started = time.perf_counter()
        proc = subprocess.Popen(
            args + extra, stdout=log, stderr=subprocess.STDOUT, env=_env(env), cwd=REPO
        )
        procs.append((proc, log, started, out / f"{name}-s{seed}.wall.json"))
    for proc, log, started, wall in procs:
        code = proc.wait()
        log.close()
        if code:
            raise SystemExit(f"row {name}: a run failed with status {code}; see {log.name}")
        wall.write_text(json.dumps({"wall_s": round(time.perf_counter() - started, 1)}) + "\n")
    for seed in SEEDS:  # the caches are not needed once evaluated
        shutil.rmtree(out / f"{name}-s{seed}" / "features", ignore_errors=True)


def _env(extra: dict) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _wall(out: Path, name: str, seed: int) -> float | None:
    path = out / f"{name}-s{seed}.wall.json"
    return float(json.loads(path.read_text())["wall_s"]) if path.exists() else None


def collect(out: Path) -> dict:
    """The finished rows found in OUT, with per-stage times and the break-even epochs."""
    rows = {}
    for name in ROWS:
        seeds = []
        for seed in SEEDS:
            path = out / f"{name}-s{seed}" / "eval.json"
            if not path.exists():
                break
            report = json.loads(path.read_text())
            seeds.append(
                {
                    "seed": seed,
                    "final_top1": report["final"]["top1"],
                    "stage_top1": [s["top1"] for s in report["stages"]],
                    "train_seconds": [s["train_seconds"] for s in report["stages"]],
                    "cache_seconds": [s["cache_seconds"] for s in report["stages"]],
                    "wall_seconds": _wall(out, name, seed),
                }
            )
        if len(seeds) == len(SEEDS):
            rows[name] = {"label": LABELS[name], "seeds": seeds, **_summary(seeds)}
    return {"rows": rows, "epochs": _epochs(out), "break_even": _break_even(rows, out)}


def _summary(seeds: list[dict]) -> dict:
    finals = [s["final_top1"] for s in seeds]
    walls = [s["wall_seconds"] for s in seeds if s["wall_seconds"] is not None]
    return {
        "final_mean": round(sum(finals) / len(finals), 2),
        "final_spread": round((max(finals) - min(finals)) / 2, 2),
        "stage_mean": [
            round(sum(v) / len(v), 2) for v in zip(*(s["stage_top1"] for s in seeds), strict=True)
        ],
        "wall_mean": round(sum(walls) / len(walls), 1) if walls else None,
    }


def _epochs(out: Path) -> int | None:
    for path in sorted(out.glob("*-s0/arch.json")):
        return json.loads(path.read_text())["training"]["epochs"]
    return None


def _gaps(run: Path) -> list[float]:
    """Seconds between the end of stage j-1's training and the start of stage j's: the
    writing of stage j-1's cache, reading it for stage j, and the command's start."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ended = {e["stage"]: e["time"] for e in events if e["event"] == "stage_trained"}
    started = {e["stage"]: e["time"] for e in events if e["event"] == "train_started"}
    return [started[j] - ended[j - 1] for j in sorted(started) if j > 0]


def _break_even(rows: dict, out: Path) -> dict:
    """Epochs at which stage j costs the same cached from V views as recomputed.

    Cached, stage j costs E * c + g: c seconds per epoch read from the cache, g the
    seconds between stage j-1's training and stage j's (writing stage j-1's V views and
    reading them back) beyond what the recomputing run spends there (starting up). Recomputed
    it costs E * r. Caching is the cheaper from E = g / (r - c) epochs on; None when a
    cached epoch is not cheaper.
    """
    epochs = _epochs(out)
    if "recompute" not in rows or not epochs:
        return {}
    idle = [_mean(v) for v in zip(*(_gaps(out / f"recompute-s{s}") for s in SEEDS), strict=True)]
    result = {}
    for name, views in VIEWS.items():
        if name not in rows:
            continue
        gaps = [_mean(v) for v in zip(*(_gaps(out / f"{name}-s{s}") for s in SEEDS), strict=True)]
        per_stage = []
        for j in range(1, len(rows[name]["seeds"][0]["train_seconds"])):
            c = _mean(s["train_seconds"][j] for s in rows[name]["seeds"]) / epochs
            r = _mean(s["train_seconds"][j] for s in rows["recompute"]["seeds"]) / epochs
            w = _mean(s["cache_seconds"][j - 1] for s in rows[name]["seeds"])
            g = gaps[j - 1] - idle[j - 1]
            per_stage.append(
                {
                    "stage": j,
                    "views": views,
                    "cached_epoch_s": round(c, 1),
                    "recomputed_epoch_s": round(r, 1),
                    "write_s": round(w, 1),
                    "write_and_read_s": round(g, 1),
                    "break_even_epochs": round(g / (r - c), 2) if r > c else None,
                }
            )
        result[name] = per_stage
    return result


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def show(result: dict) -> str:
    rows = result["rows"]
    out = [
        table(
            ["row", "final top-1", "+-", "stage tops-1", "wall s (seed 0, 1)"],
            [
                [
                    r["label"],
                    f"{r['final_mean']:.2f}",
                    f"{r['final_spread']:.2f}",
                    " / ".join(f"{v:.2f}" for v in r["stage_mean"]),
                    ", ".join(f"{s['wall_seconds']:.0f}" for s in r["seeds"] if s["wall_seconds"]),
                ]
                for r in rows.values()
            ],
        )
    ]
    lines = [
        [
            LABELS[name],
            b["stage"],
            b["cached_epoch_s"],
            b["recomputed_epoch_s"],
            b["write_s"],
            b["write_and_read_s"],
            "never" if b["break_even_epochs"] is None else b["break_even_epochs"],
        ]
        for name, stages in result["break_even"].items()
        for b in stages
    ]
    if lines:
        header = [
            "row",
            "stage",
            "cached epoch s",
            "recomputed epoch s",
            "write s",
            "write + read s",
            "break-even epochs",
        ]
        out.append(table(header, lines))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="prepared Fashion-MNIST")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-augmentation"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--collect", action="store_true", help="only read finished rows")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        if args.data is None:
            parser.error("--data is needed to run rows")
        for name in args.rows:
            if (args.out / f"{name}-s{SEEDS[-1]}" / "eval.json").exists():
                continue  # finished earlier
            print(f"row {name} ...", flush=True)
            run_row(name, ROWS[name], args.data.resolve(), args.out.resolve())
    result = collect(args.out)
    path = save("augmentation", result)
    print(show(result))
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
