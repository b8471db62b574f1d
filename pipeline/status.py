"""What a run directory holds: which stages are trained, cached, verified and current,
which are stale, and the next command to run."""

from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoints
from pipeline.cache import cache_ids, cache_state, read_manifest, resume_options, store_url
from pipeline.rundir import Run, read_json
from pipeline.train import checkpoint_folder


@dataclass(frozen=True)
class StageStatus:
    j: int
    trained: str  # "current", "stale" or "missing"
    cache: str  # a cache_state() value
    verified: str = ""  # "verified" or "failed" per the store's check, "" when never checked
    checkpoint: str = ""  # "step N of M" while a training of the stage is under way


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
        cache = cache_state(run, j)
        stages.append(
            StageStatus(
                j=j,
                trained=trained,
                cache=cache,
                verified=_verified(run, j) if cache in ("current", "incomplete") else "",
                checkpoint=_checkpoint(run, j),
            )
        )

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


def _verified(run: Run, j: int) -> str:
    """The store's own check, written by ``cache-features --verify``, if it was run."""
    check = (read_manifest(store_url(run, j)) or {}).get("verified")
    if not isinstance(check, dict):
        return ""
    return "verified" if check.get("ok") is True else "failed"


def _checkpoint(run: Run, j: int) -> str:
    index = checkpoints.newest_index(checkpoint_folder(run, j))
    if index is None:
        return ""
    return f"step {index.get('step')} of {index.get('total_steps')}"


def _next_command(run: Run, stages: list[StageStatus], evaluated: str) -> str | None:
    last = len(stages) - 1
    for s in stages:
        if s.checkpoint:
            return f"greedy-cli train-layer --run {run.root} --j {s.j} --resume"
        if s.trained != "current":
            return f"greedy-cli train-layer --run {run.root} --j {s.j}"
        if s.j < last and s.cache != "current" and stages[s.j + 1].trained != "current":
            command = f"greedy-cli cache-features --run {run.root} --j {s.j}"
            if s.cache == "incomplete":
                # Resuming needs the options the store was started with.
                command += " " + resume_options(read_manifest(store_url(run, s.j)))
            return command
    if evaluated != "current":
        return f"greedy-cli eval --run {run.root}"
    return None
