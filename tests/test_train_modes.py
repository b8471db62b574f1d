"""--deterministic, frozen stages under every mode, --precision and non-finite stops."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import checkpoints
from pipeline.loaders import epoch_permutation
from pipeline.rundir import Run, state_hash
from pipeline.train import DivergedError, order_seed
from tests.test_cli import invoke, new_run, ok, refused


def stage_state(run: Path, j: int) -> tuple[str, str, bytes]:
    """Hashes of stage j's and its head's whole state as loaded, and its file's bytes."""
    stage, head = Run.open(run).load_stage(j)
    return state_hash(stage), state_hash(head), (run / f"stage_{j}" / "weights.pt").read_bytes()


def test_deterministic_runs_with_several_workers_are_bitwise_equal(tmp_path, tiny_data, tiny_arch):
    hashes = []
    for name in ("a", "b"):
        run = tmp_path / name
        # FFCV allows at most one loader thread per core: 2 here.
        workers = min(os.cpu_count(), 4)
        args = new_run(run, 0, tiny_arch, tiny_data, "--steps", 50, "--workers", workers)
        out = ok(*args, "--deterministic").output
        assert "deterministic: non-deterministic torch kernels refused" in out
        record = json.loads((run / "stage_0" / "record.json").read_text())
        assert record["deterministic"] is True and record["steps"] == 50
        hashes.append((record["stage_hash"], record["head_hash"], record["final_train_loss"]))
    assert hashes[0] == hashes[1]
    assert not torch.are_deterministic_algorithms_enabled(), "the global setting is restored"


def test_run_without_deterministic_says_so(tmp_path, tiny_data, tiny_arch):
    out = ok(*new_run(tmp_path / "r", 0, tiny_arch, tiny_data, "--steps", 2)).output
    assert "not deterministic" in out and "--deterministic" in out


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory, tiny_data) -> Path:
    """Stages 0 and 1 (both with batch norm) trained and cached in float32."""
    from tests.conftest import TINY_ARCH

    root = tmp_path_factory.mktemp("two-stages")
    arch = root / "tiny.json"
    arch.write_text(json.dumps(TINY_ARCH))
    run = root / "run"
    ok(*new_run(run, 0, arch, tiny_data))
    ok("cache-features", "--run", run, "--j", 0, "--dtype", "float32")
    ok("train-layer", "--run", run, "--j", 1)
    ok("cache-features", "--run", run, "--j", 1, "--dtype", "float32")
    return run


@pytest.mark.parametrize(
    "source, precision",
    [("recompute", "fp32"), ("recompute", "fp16"), ("cache", "bf16")],
)
def test_frozen_stages_do_not_move(two_stages, source, precision):
    arch = json.loads((two_stages / "arch.json").read_text())
    assert arch["stages"][0]["batch_norm"] and arch["stages"][1]["batch_norm"]
    before = [stage_state(two_stages, i) for i in (0, 1)]

    ok(
        "train-layer",
        "--run",
        two_stages,
        "--j",
        2,
        "--source",
        source,
        "--precision",
        precision,
        "--steps",
        8,
        "--checkpoint-every",
        4,
    )
    assert [stage_state(two_stages, i) for i in (0, 1)] == before
    record = json.loads((two_stages / "stage_2" / "record.json").read_text())
    assert record["precision"] == precision and record["source"] == source


def overflowing_rows(n: int, seed: int, first_batch: int, batch_size: int) -> np.ndarray:
    """Rows of the training split that stage 1 sees from batch ``first_batch`` of epoch 0."""
    order = epoch_permutation(n, order_seed(seed, 1), 0)
    return np.sort(order[first_batch * batch_size :])


def test_fp16_overflow_stops_within_one_step(tmp_path, tiny_data, tiny_arch):
    run = tmp_path / "run"
    ok(*new_run(run, 0, tiny_arch, tiny_data))
    ok("cache-features", "--run", run, "--j", 0, "--dtype", "float32")

    # Scale stage 1's inputs from its 9th batch on far past float16's largest value (65504).
    features = zarr.open_group(str(run / "features" / "stage_0.zarr"), mode="r+")["train/features"]
    original = features[:]
    scaled = original.copy()
    rows = overflowing_rows(len(original), 0, 8, 32)
    scaled[rows] *= 1e6
    assert np.isfinite(scaled).all() and scaled.max() > 65504
    features[:] = scaled

    # bfloat16 has float32's range: the same inputs train without a stop.
    ok("train-layer", "--run", run, "--j", 1, "--precision", "bf16", "--steps", 12)

    out = refused(
        "train-layer",
        "--run",
        run,
        "--j",
        1,
        "--precision",
        "fp16",
        "--checkpoint-every",
        4,
        match="stage 1, epoch 1, step 9: the loss is nan (fp16)",
    ).output
    folder = run / "stage_1" / "checkpoints"
    assert f"the last good checkpoint is in {folder}" in out
    record = json.loads((run / "stage_1" / "record.json").read_text())
    assert record["precision"] == "bf16", "the stopped run left the trained stage alone"

    # The last checkpoint, written after step 8, loads and holds finite weights.
    state, path = checkpoints.load_newest(folder)
    assert state["step"] == 8 and path.name == "step_000000008.pt"
    stage, head = Run.open(run).build_stage(1)
    stage.load_state_dict(state["stage"])
    head.load_state_dict(state["head"])
    assert all(torch.isfinite(t).all() for t in (*stage.state_dict().values(),))
    assert state["scaler"]["scale"] > 0

    # With the inputs repaired, the stopped training continues from that checkpoint.
    features[:] = original
    out = ok("train-layer", "--run", run, "--j", 1, "--precision", "fp16", "--resume").output
    assert "resuming stage 1" in out
    assert json.loads((run / "stage_1" / "record.json").read_text())["resumed_from_steps"] == [8]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--precision", "fp8"), "'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        (("--resume", "--restart"), "give --resume or --restart, not both"),
    ],
)
def test_train_options_are_checked(tmp_path, tiny_data, tiny_arch, extra, message):
    result = invoke(*new_run(tmp_path / "r", 0, tiny_arch, tiny_data, *extra))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "r").exists()


def one_parameter_step(precision: str, loss_fn, steps: int, max_skipped: int = 3):
    """Run ``steps`` updates of one parameter tensor through train's optimizer step."""
    from pipeline.train import TrainSettings, _optimizer_step, _Progress

    weight = torch.nn.Parameter(torch.full((4,), 0.5))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    settings = TrainSettings(run=Path("."), j=0, precision=precision, max_skipped_steps=max_skipped)
    progress = _Progress()
    for step in range(steps):
        loss = loss_fn(weight)
        assert torch.isfinite(loss)
        _optimizer_step(optimizer, scaler, loss, [weight], progress, settings, f"step {step + 1}")
    return weight, progress, scaler


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_gradients_stop_the_run(precision):
    # A finite loss whose gradient is not: d/dw sqrt(|w - w|) at 0.
    def loss_fn(w):
        return torch.sqrt((w - w.detach()).abs()).sum()

    with pytest.raises(DivergedError, match=r"step 1: 1 of 1 gradient tensors hold non-finite"):
        one_parameter_step(precision, loss_fn, 1)


def test_fp16_scaler_skipping_in_a_row_stops_the_run():
    # Finite loss, but scaled by 65536 its gradient overflows float32: every step is skipped.
    def loss_fn(w):
        return w.sum() * 1e35

    with pytest.raises(DivergedError, match=r"step 3: the fp16 gradient scaler skipped 3 steps"):
        one_parameter_step("fp16", loss_fn, 10)


def test_fp16_scaler_recovers_from_a_few_skips():
    # Scaled gradients overflow until the scale has dropped below ~300: 8 skips, then steps.
    def loss_fn(w):
        return w.clamp(-1, 1).sum() * 1e36

    weight, progress, scaler = one_parameter_step("fp16", loss_fn, 12, max_skipped=20)
    assert scaler.get_scale() == 65536 / 2**8 and progress.skipped_in_a_row == 0
    assert not torch.equal(weight, torch.full((4,), 0.5)), "later steps were taken"


def test_run_metadata(two_stages):
    record = json.loads((two_stages / "stage_1" / "record.json").read_text())
    env = record["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["cpus"] == os.cpu_count()
    assert {"git_commit", "git_uncommitted_changes", "cpu", "gpus", "torch_threads"} <= set(env)
    assert record["settings"]["precision"] == "fp32" and record["settings"]["checkpoint_every"]
    assert record["training"]["batch_size"] == 32 and record["lineage"][0]

    entries = [json.loads(x) for x in (two_stages / "metrics.jsonl").read_text().splitlines()]
    started = [e for e in entries if e["event"] == "train_started" and e["stage"] == 1]
    assert started[0]["settings"]["source"] == "cache" and started[0]["environment"]["versions"]
    epoch = next(e for e in entries if e["event"] == "epoch" and e["stage"] == 1)
    assert {"loss", "accuracy", "lr", "samples_per_s", "data_wait_share"} <= set(epoch)
    assert epoch["samples_per_s"] > 0 and 0 <= epoch["data_wait_share"] <= 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resume_is_bitwise(two_stages, precision, monkeypatch):
    args = ("train-layer", "--run", two_stages, "--j", 2, "--precision", precision)
    args += ("--steps", 6, "--checkpoint-every", 3, "--restart")
    ok(*args)
    reference = stage_state(two_stages, 2)

    monkeypatch.setenv("GREEDY_TRAIN_STOP_AT_STEP", "4")
    refused(*args, match="stopped before step 5")
    monkeypatch.delenv("GREEDY_TRAIN_STOP_AT_STEP")
    ok("train-layer", "--run", two_stages, "--j", 2, "--resume")
    record = json.loads((two_stages / "stage_2" / "record.json").read_text())
    assert record["precision"] == precision and record["resumed_from_steps"] == [3]
    assert stage_state(two_stages, 2) == reference
