"""The benchmarks' own arithmetic, and a run of the GPU script on the CPU at tiny sizes."""

import json

import pytest

from bench import augmentation, gpu


def _row(out, name, seed, train, cache, gaps, final=90.0, wall=100.0):
    """A finished run: eval.json, arch.json, metrics.jsonl (``gaps``: seconds between
    training stage j-1 and stage j) and the wall time."""
    run = out / f"{name}-s{seed}"
    run.mkdir()
    stages = [
        {"top1": final - 2 + j, "train_seconds": t, "cache_seconds": c}
        for j, (t, c) in enumerate(zip(train, cache, strict=True))
    ]
    report = {"stages": stages, "final": {"top1": final}}
    (run / "eval.json").write_text(json.dumps(report))
    (run / "arch.json").write_text(json.dumps({"training": {"epochs": 6}}))
    events, now = [], 0.0
    for j, seconds in enumerate(train):
        now += gaps[j - 1] if j else 0.0
        events.append({"event": "train_started", "stage": j, "time": now})
        now += seconds
        events.append({"event": "stage_trained", "stage": j, "time": now})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (out / f"{name}-s{seed}.wall.json").write_text(json.dumps({"wall_s": wall}))


def test_break_even_epochs(tmp_path):
    # Cached: 6 epochs of 10 s at stage 1, after 32 s of writing stage 0's 2 views and
    # reading them back; the recomputing run starts stage 1 2 s after stage 0 ends.
    # Recomputed: 6 epochs of 14 s. (32 - 2) / (14 - 10) = 7.5 epochs.
    for seed in (0, 1):
        v2 = {"train": [30, 60, 90], "cache": [24, 30, None], "gaps": [32, 40]}
        _row(tmp_path, "v2", seed, **v2, final=90 + seed)
        _row(tmp_path, "recompute", seed, train=[30, 84, 80], cache=[None] * 3, gaps=[2, 2])
    result = augmentation.collect(tmp_path)
    assert set(result["rows"]) == {"v2", "recompute"}
    v2 = result["rows"]["v2"]
    assert v2["final_mean"] == 90.5 and v2["final_spread"] == 0.5 and v2["wall_mean"] == 100.0
    stage1, stage2 = result["break_even"]["v2"]
    assert stage1["break_even_epochs"] == pytest.approx(7.5) and stage1["write_and_read_s"] == 30
    assert stage2["break_even_epochs"] is None  # a cached epoch (15 s) is not cheaper (13.3 s)
    assert "V = 2" in augmentation.show(result)


def test_gpu_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(
        [
            "--device",
            "cpu",
            "--presets",
            "fmnist",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert [r["stage"] for r in result["stages"]] == [0, 1, 2]
    for row in result["stages"]:
        assert row["memory_s"] > 0 and row["cache_s"] > 0 and row["recompute_s"] > 0
