"""What a run directory holds: which stages are trained, cached and current, and what next."""

from dataclasses import dataclass
from pathlib import Path

from pipeline.cache import cache_ids, cache_state
from pipeline.rundir import Run, read_json


@dataclass(frozen=True)
class StageStatus:
    j: int
    trained: str  # "current", "stale" or "missing"
    cache: str  # a cache_state() value


@dataclass(frozen=True)
class RunStatus:
    run: Path
    arch: str
    stages: tuple[StageStatus, ...]
    evaluated: str  # "current", "stale" or "missing"
    next_command: str | None


def run_status(root: Path) -> RunStatus:
    run = Run.open(root)
    stages = []
    for j in range(run.arch.depth):
        if run.record(j) is None:
            trained = "missing"
        else:
            trained = "current" if run.stage_current(j) else "stale"
        stages.append(StageStatus(j=j, trained=trained, cache=cache_state(run, j)))

    evaluated = "missing"
    if (run.root / "eval.json").is_file():
        report = read_json(run.root / "eval.json", "run `greedy-cli eval` again")
        current = report.get("lineage") == run.lineage(run.arch.depth) and report.get(
            "caches"
        ) == cache_ids(run)
        evaluated = "current" if current else "stale"
    return RunStatus(
        run=run.root,
        arch=run.arch.name,
        stages=tuple(stages),
        evaluated=evaluated,
        next_command=_next_command(run, stages, evaluated),
    )


def _next_command(run: Run, stages: list[StageStatus], evaluated: str) -> str | None:
    last = len(stages) - 1
    for s in stages:
        if s.trained != "current":
            return f"greedy-cli train-layer --run {run.root} --j {s.j}"
        if s.j < last and s.cache != "current" and stages[s.j + 1].trained != "current":
            return f"greedy-cli cache-features --run {run.root} --j {s.j}"
    if evaluated != "current":
        return f"greedy-cli eval --run {run.root}"
    return None
