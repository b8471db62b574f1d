"""The benchmarks' own arithmetic, and a run of the GPU script on the CPU at tiny sizes."""

import json

import pytest

from bench import augmentation, gpu


def _row(out, name, seed, train, cache, final=90.0, wall=100.0):
    run = out / f"{name}-s{seed}"
    run.mkdir()
    stages = [
        {"top1": final - 2 + j, "train_seconds": t, "cache_seconds": c}
        for j, (t, c) in enumerate(zip(train, cache, strict=True))
    ]
    report = {"stages": stages, "final": {"top1": final}}
    (run / "eval.json").write_text(json.dumps(report))
    (run / "arch.json").write_text(json.dumps({"training": {"epochs": 6}}))
    (out / f"{name}-s{seed}.wall").write_text(f"{wall}\n")


def test_break_even_epochs(tmp_path):
    # Cached: 6 epochs of 10 s at stage 1, after writing stage 0's 2 views in 24 s.
    # Recomputed: 6 epochs of 14 s. 24 / (14 - 10) = 6 epochs.
    for seed in (0, 1):
        _row(tmp_path, "v2", seed, train=[30, 60, 90], cache=[24, 30, None], final=90 + seed)
        _row(tmp_path, "recompute", seed, train=[30, 84, 80], cache=[None] * 3)
    result = augmentation.collect(tmp_path)
    assert set(result["rows"]) == {"v2", "recompute"}
    v2 = result["rows"]["v2"]
    assert v2["final_mean"] == 90.5 and v2["final_spread"] == 0.5 and v2["wall_mean"] == 100.0
    stage1, stage2 = result["break_even"]["v2"]
    assert stage1["break_even_epochs"] == pytest.approx(6.0)
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
