"""Runs that follow a plan: inputs from the nearest cache below, caches only where planned,
deleted once nothing needs them; and the same weights as caching every stage."""

import json

import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline.plan import predict, rates_from_figures
from pipeline.rundir import Run
from stages import load_architecture


def ok(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def write_plan(run_dir, arch_path, cached):
    arch = load_architecture(str(arch_path))
    plan = predict(arch, rates_from_figures(arch, 1e9, 1000, 100, 100), cached, 512, 128)
    run_dir.mkdir(parents=True)
    plan.save(run_dir)
    return plan


def weights(run_dir, j):
    stage, head = Run.open(run_dir).load_stage(j)
    return {**stage.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """The tiny 3-stage network trained twice with one seed: caching every stage, and
    following a plan that caches stage 1 only."""
    from conftest import TINY_ARCH

    root = tmp_path_factory.mktemp("plan-runs")
    arch = root / "tiny.json"
    arch.write_text(json.dumps(TINY_ARCH))
    full, planned = root / "full", root / "planned"
    ok("run", arch, "--data", tiny_data, "--run", full)
    write_plan(planned, arch, (1,))
    ok("run", arch, "--data", tiny_data, "--run", planned)
    return full, planned, arch


def test_planned_run_reads_what_the_plan_says(runs):
    _, planned, _ = runs
    run = Run.open(planned)
    inputs = [run.record(j)["input"] for j in range(3)]
    assert [i["kind"] for i in inputs] == ["images", "images", "features"]
    assert inputs[1]["recomputed"] == 1  # stage 0 recomputed on every batch
    assert inputs[2]["stage"] == 1 and inputs[2]["recomputed"] == 0
    report = json.loads((planned / "plan-report.json").read_text())
    assert [r["measured_train_s"] is not None for r in report["stages"]] == [True] * 3
    assert report["stages"][1]["measured_cache_s"] is not None


def test_planned_run_deletes_exactly_the_caches_it_may(runs):
    full, planned, _ = runs
    assert not (planned / "features/stage_0.zarr").exists()  # never planned
    assert not (planned / "features/stage_1.zarr").exists()  # read by stage 2, then deleted
    assert (full / "features/stage_0.zarr").exists() and (full / "features/stage_1.zarr").exists()
    assert json.loads((planned / "eval.json").read_text())["final"]["top1"] > 0


def test_planned_run_reaches_the_weights_of_the_fully_cached_run(runs):
    """Stage 0 is trained on the same images; stages 1 and 2 differ only by the float16
    rounding of stage 0's features in the fully cached run."""
    full, planned, _ = runs
    for name, value in weights(full, 0).items():
        assert torch.equal(value, weights(planned, 0)[name]), name
    for j in (1, 2):
        a, b = weights(full, j), weights(planned, j)
        for name in a:
            if a[name].is_floating_point():
                scale = a[name].abs().max().item() + 1e-12
                diff = (a[name] - b[name]).abs().max().item()
                # float16 inputs are within 2^-11 relative; 16 steps of SGD carry that
                # to about 2e-3 of a tensor's largest value here.
                assert diff <= 5e-3 * scale, (j, name, diff, scale)


def test_keep_caches_and_a_rerun_that_needs_nothing(tmp_path, tiny_data, runs):
    _, _, arch = runs
    run_dir = tmp_path / "kept"
    write_plan(run_dir, arch, (1,))
    ok("run", arch, "--data", tiny_data, "--run", run_dir, "--keep-caches")
    store = run_dir / "features/stage_1.zarr"
    assert store.exists()
    before = sorted(p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file())
    weights_before = (run_dir / "stage_2/weights.pt").stat().st_mtime_ns
    ok("run", arch, "--data", tiny_data, "--run", run_dir, "--keep-caches")
    after = sorted(p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file())
    assert before == after  # nothing needed it, nothing rewrote it
    report = json.loads((run_dir / "plan-report.json").read_text())
    assert all(r["measured_train_s"] is not None for r in report["stages"])
    assert (run_dir / "stage_2/weights.pt").stat().st_mtime_ns == weights_before
    ok("run", arch, "--data", tiny_data, "--run", run_dir)
    assert not store.exists()


def test_train_layer_sources(tmp_path, tiny_data, runs):
    full, _, _ = runs
    result = CliRunner().invoke(
        main, ["train-layer", "--run", str(full), "--j", "1", "--source", "cache:1"]
    )
    assert result.exit_code == 1 and "cannot read the features of stage 1" in result.output
    result = CliRunner().invoke(
        main, ["train-layer", "--run", str(full), "--j", "0", "--source", "cache:0"]
    )
    assert result.exit_code == 1 and "give 'recompute'" in result.output
    result = CliRunner().invoke(
        main, ["train-layer", "--run", str(full), "--j", "1", "--source", "somewhere"]
    )
    assert result.exit_code == 2 and "is not one of 'cache'" in result.output


def test_cache_from_the_images_matches_the_chained_cache(tmp_path, runs):
    """Stage 1's features computed from the images (stage 0 recomputed in float32) against
    those computed from stage 0's float16 cache: apart by float16 rounding only."""
    import shutil

    import numpy as np
    import zarr

    from pipeline.cache import MANIFEST_KEY

    full, _, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    ok("cache-features", "--run", copy, "--j", 1, "--source", "recompute")
    chained = zarr.open_group(str(full / "features/stage_1.zarr"), mode="r")
    direct = zarr.open_group(str(copy / "features/stage_1.zarr"), mode="r")
    assert direct.attrs[MANIFEST_KEY]["input_stage"] == -1
    assert chained.attrs[MANIFEST_KEY]["input_stage"] == 0
    from pipeline.storage import to_numpy

    a = to_numpy(chained["test/features"][:], np.float64)
    b = to_numpy(direct["test/features"][:], np.float64)
    dtype = chained.attrs[MANIFEST_KEY]["dtype"]
    # Measured: 8e-4 of the largest value with float16 caches, 6.4e-3 with bfloat16's.
    assert np.abs(a - b).max() <= (2e-3 if dtype == "float16" else 1.6e-2) * np.abs(a).max()
    ok("cache-features", "--run", copy, "--j", 1, "--verify")


def test_resume_with_only_damaged_checkpoints_keeps_the_trained_stage(tmp_path, runs):
    import shutil

    full, _, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    weights = (copy / "stage_2/weights.pt").read_bytes()
    folder = copy / "stage_2/checkpoints"
    folder.mkdir()
    (folder / "step_000000050.json").write_text("not json")
    (folder / "step_000000050.pt").write_bytes(b"junk")
    result = CliRunner().invoke(
        main, ["train-layer", "--run", str(copy), "--j", "2", "--resume", "--steps", "3"]
    )
    assert result.exit_code == 1, result.output
    assert "holds no usable checkpoint" in result.output
    assert (copy / "stage_2/weights.pt").read_bytes() == weights
