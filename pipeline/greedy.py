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
    remove_cache,
    store_url,
)
from pipeline.defaults import DEFAULT_DTYPE
from pipeline.evaluate import EvalSettings, evaluate
from pipeline.plan import PLAN_FILE, Plan, PlanError, PlanSettings
from pipeline.plan import plan as make_plan
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
    dtype: str = DEFAULT_DTYPE
    workers: int = 2
    memory_budget: int = 8 << 30
    precision: str | None = None  # fp32, or a stopped stage's own on resume
    deterministic: bool = False
    checkpoint_every: int = 1000
    plan: bool = False  # measure this machine and plan which stages to cache first
    budget_bytes: int | None = None  # with plan: the storage the caches may take
    keep_caches: bool = False  # with a plan: keep caches that nothing needs any more
    views: int = 1  # views of each training sample in every cache
    augment: bool = False  # train every stage augmented (implied by views > 1)
    progress: BarFactory | None = None


def run_greedy(settings: RunSettings) -> dict:
    """Train, cache and evaluate every stage. With a plan (``RUN/plan.json``, or made
    first with ``settings.plan``), each stage reads the input the plan gives it, only the
    planned stages are cached, and a cache is deleted once nothing needs it."""
    if settings.budget_bytes is not None and not settings.plan:
        # Refused before the run directory is made or touched.
        if not (Path(settings.run) / PLAN_FILE).exists():
            raise PlanError(
                "a storage budget needs a plan: pass --plan with --budget, or make one with "
                f"`greedy-cli plan {settings.preset} --data {settings.data} --run {settings.run} "
                "--budget ...`"
            )
    run = Run.open(settings.run, settings.preset, settings.data, settings.seed)
    common = {"workers": settings.workers, "progress": settings.progress}
    plan = _plan(run, settings)
    measured: dict[int, dict] = {}

    for j in range(run.arch.depth):
        source = settings.source if plan is None else _planned_source(plan, j)
        stopped = checkpoints.checkpoint_steps(checkpoint_folder(run, j))
        if run.stage_current(j) and not stopped:
            log.info("stage %d is trained and current; skipping", j)
        else:
            result = train_layer(
                TrainSettings(
                    run=run.root,
                    j=j,
                    source=source,
                    memory_budget=settings.memory_budget,
                    resume=bool(stopped),
                    precision=settings.precision,
                    deterministic=settings.deterministic,
                    checkpoint_every=settings.checkpoint_every,
                    augment=settings.augment or settings.views > 1,
                    **common,
                ),
                run,
            )
            measured.setdefault(j, {})["train_s"] = result.record["seconds"]

        if _wants_cache(run, plan, settings, j):
            manifest = read_manifest(store_url(run, j)) or {}
            wanted = manifest.get("dtype") == settings.dtype and (
                manifest.get("views", 1) == settings.views
            )
            if cache_state(run, j) == "current" and wanted:
                log.info("stage %d features are cached and current; skipping", j)
            else:
                written = cache_features(
                    CacheSettings(
                        run=run.root,
                        j=j,
                        dtype=settings.dtype,
                        source="cache" if plan is None else source,
                        views=settings.views,
                        **common,
                    )
                )
                measured.setdefault(j, {})["cache_s"] = written["seconds"]
        if plan is not None and not settings.keep_caches:
            for i in plan.deletable_after(j):
                remove_cache(run, i)

    if plan is not None:
        _report_plan(run, plan, measured)
    previous = _read_report(run.root / "eval.json")
    if (
        previous.get("lineage") == run.lineage(run.arch.depth)
        and previous.get("split") == run.data.eval_split
        and previous.get("caches") == cache_ids(run)
    ):
        log.info("eval.json is current; skipping evaluation")
        return previous
    return evaluate(EvalSettings(run=run.root, **common))


def _plan(run: Run, settings: RunSettings) -> Plan | None:
    """The run's plan: made now when asked, else RUN/plan.json when there is one."""
    path = run.root / PLAN_FILE
    if settings.plan:
        made = make_plan(
            PlanSettings(
                preset=str(run.root / "arch.json"),
                data=run.data.root,
                budget_bytes=settings.budget_bytes,
                views=settings.views,
                dtype=settings.dtype,
                run=run.root,
            )
        )
        log.info("planned: cache stages %s, predicted %.0f s", list(made.cached), made.predicted_s)
        return made
    if not path.exists():
        return None
    plan = Plan.load(path)
    if len(plan.stages) != run.arch.depth or plan.preset != run.arch.name:
        raise PlanError(
            f"{path} plans {plan.preset} ({len(plan.stages)} stages), the run trains "
            f"{run.arch.name} ({run.arch.depth}); make the "
            f"plan again with `greedy-cli plan {run.root / 'arch.json'} --data {run.data.root} "
            f"--run {run.root}`"
        )
    log.info("following %s: cache stages %s", path, list(plan.cached))
    return plan


def _planned_source(plan: Plan, j: int) -> str:
    source = plan.source(j)
    return "recompute" if source < 0 else f"cache:{source}"


def _wants_cache(run: Run, plan: Plan | None, settings: RunSettings, j: int) -> bool:
    """Whether stage j's features are written: without a plan every stage but the last
    (unless recomputing); with one, a planned stage while a stage that reads it is not
    yet trained."""
    if plan is None:
        return j < run.arch.depth - 1 and settings.source != "recompute"
    if j not in plan.cached:
        return False
    readers = [s.j for s in plan.stages if s.source == j]
    return any(not run.stage_current(k) for k in readers)


def _report_plan(run: Run, plan: Plan, measured: dict[int, dict]) -> None:
    """Predicted against measured seconds per stage, logged and kept in the run."""
    # A rerun that skips a stage keeps the times measured when it was done.
    path = run.root / "plan-report.json"
    try:
        before = {r["stage"]: r for r in json.loads(path.read_text())["stages"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        before = {}
    rows = []
    for s in plan.stages:
        old = before.get(s.j, {})
        got = {
            "train_s": measured.get(s.j, {}).get("train_s", old.get("measured_train_s")),
            "cache_s": measured.get(s.j, {}).get("cache_s", old.get("measured_cache_s")),
        }
        rows.append(
            {
                "stage": s.j,
                "predicted_train_s": round(s.train_s, 1),
                "measured_train_s": got.get("train_s"),
                "predicted_cache_s": round(s.cache_s, 1) if s.cached else None,
                "measured_cache_s": got.get("cache_s"),
            }
        )
        log.info(
            "stage %d: train predicted %.0f s, measured %s; cache predicted %s, measured %s",
            s.j,
            s.train_s,
            _secs(got.get("train_s")),
            _secs(s.cache_s if s.cached else None),
            _secs(got.get("cache_s")),
        )
    predicted = sum(r["predicted_train_s"] + (r["predicted_cache_s"] or 0) for r in rows)
    done = [r for r in rows if r["measured_train_s"] is not None]
    report = {"predicted_s": round(predicted, 1), "stages": rows}
    if len(done) == len(rows):
        total = sum(r["measured_train_s"] + (r["measured_cache_s"] or 0) for r in rows)
        report["measured_s"] = round(total, 1)
        report["measured_over_predicted"] = round(total / predicted, 3)
        log.info(
            "run: predicted %.0f s, measured %.0f s (%.2fx)", predicted, total, total / predicted
        )
    path.write_text(json.dumps(report, indent=1))


def _secs(value) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
