"""Staleness after a retrain, what `run` redoes, and what `status` shows."""

import json
from pathlib import Path

import zarr

from pipeline.cache import MANIFEST_KEY, read_manifest
from pipeline.status import run_status
from pipeline.train import STOP_AT_STEP_ENV
from tests.test_cli import ok, refused


def files_state(folder: Path) -> dict:
    """Every file under ``folder`` with its modification time and bytes."""
    return {
        p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def events_after(run: Path, line: int) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()[line:]
    entries = [json.loads(x) for x in lines]
    return [(e["event"], e.get("stage")) for e in entries if e["event"] != "epoch"]


def status_row(output: str, j: int) -> list[str]:
    """The words of stage j's row in `status` output."""
    return next(line.split() for line in output.splitlines() if line.startswith(f"{j} "))


def states(run: Path) -> list[tuple[str, str]]:
    return [(s.trained, s.cache) for s in run_status(run).stages]


def test_retrained_stage_1_makes_exactly_its_cache_and_stage_2_stale(
    tmp_path, tiny_data, tiny_arch
):
    run = tmp_path / "run"
    ok("run", tiny_arch, "--data", tiny_data, "--run", run)
    assert states(run) == [("current", "current"), ("current", "current"), ("current", "missing")]
    assert "next: nothing, all current" in ok("status", "--run", run).output
    stage_0 = files_state(run / "stage_0")
    cache_0 = files_state(run / "features" / "stage_0.zarr")
    old_cache_1 = read_manifest(run / "features" / "stage_1.zarr")["id"]

    ok("train-layer", "--run", run, "--j", 1, "--steps", 5)
    assert states(run) == [("current", "current"), ("current", "stale"), ("stale", "missing")]
    out = ok("status", "--run", run).output
    assert status_row(out, 1) == ["1", "current", "stale"]
    assert status_row(out, 2) == ["2", "stale", "not", "needed"]
    assert "evaluation: stale" in out
    assert f"next: greedy-cli cache-features --run {run} --j 1" in out
    stage_1 = files_state(run / "stage_1")

    # `run` redoes stage 1's cache, stage 2 and the evaluation, and nothing else.
    before = len((run / "metrics.jsonl").read_text().splitlines())
    ok("run", tiny_arch, "--data", tiny_data, "--run", run)
    assert events_after(run, before) == [
        ("train_started", 2),
        ("stage_trained", 2),
        ("eval", None),
    ]
    assert read_manifest(run / "features" / "stage_1.zarr")["id"] != old_cache_1
    assert files_state(run / "stage_0") == stage_0
    assert files_state(run / "features" / "stage_0.zarr") == cache_0
    assert files_state(run / "stage_1") == stage_1
    assert states(run) == [("current", "current"), ("current", "current"), ("current", "missing")]
    assert "next: nothing, all current" in ok("status", "--run", run).output


def test_status_shows_the_stores_check(tmp_path, tiny_data, tiny_arch):
    run = tmp_path / "run"
    ok("train-layer", "--run", run, "--j", 0, "--preset", tiny_arch, "--data", tiny_data)
    ok("cache-features", "--run", run, "--j", 0)
    assert "verified" not in ok("status", "--run", run).output

    group = zarr.open_group(str(run / "features" / "stage_0.zarr"), mode="r+")
    manifest = dict(group.attrs[MANIFEST_KEY])
    check = {"time": "2026-01-01T00:00:00+00:00", "ok": True, "rows_checked": 640}
    group.attrs[MANIFEST_KEY] = {**manifest, "verified": check}
    out = ok("status", "--run", run).output
    assert status_row(out, 0) == ["0", "current", "current", "verified"]

    group.attrs[MANIFEST_KEY] = {**manifest, "verified": {**check, "ok": False}}
    out = ok("status", "--run", run).output
    assert status_row(out, 0) == ["0", "current", "current", "failed"]


def test_status_shows_a_stopped_training_and_run_resumes_it(
    tmp_path, tiny_data, tiny_arch, monkeypatch
):
    run = tmp_path / "run"
    ok("train-layer", "--run", run, "--j", 0, "--preset", tiny_arch, "--data", tiny_data)
    ok("cache-features", "--run", run, "--j", 0)
    monkeypatch.setenv(STOP_AT_STEP_ENV, "10")
    refused("train-layer", "--run", run, "--j", 1, "--checkpoint-every", 4, match="stopped before")
    monkeypatch.delenv(STOP_AT_STEP_ENV)

    out = ok("status", "--run", run).output
    assert status_row(out, 1) == ["1", "missing", "missing", "step", "8", "of", "16"]
    assert f"next: greedy-cli train-layer --run {run} --j 1 --resume" in out

    before = len((run / "metrics.jsonl").read_text().splitlines())
    ok("run", tiny_arch, "--data", tiny_data, "--run", run)
    started = json.loads((run / "metrics.jsonl").read_text().splitlines()[before])
    assert started["event"] == "train_started" and started["stage"] == 1
    assert started["step"] == 8 and started["settings"]["resume"] is True
    record = json.loads((run / "stage_1" / "record.json").read_text())
    assert record["resumed_from_steps"] == [8]
    assert "next: nothing, all current" in ok("status", "--run", run).output
