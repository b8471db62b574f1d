"""Checkpoints and resume: a stopped and resumed train-layer ends bitwise equal to one run
straight through; a damaged newest checkpoint falls back to the previous one."""

import json
from pathlib import Path

import pytest
import torch

from pipeline import checkpoints
from pipeline.train import STOP_AT_STEP_ENV
from tests.test_cli import invoke, new_run, ok, refused

# 512 training samples in batches of 32: 16 steps per epoch. Two epochs, stopped at 60%
# of the second, with a checkpoint every 4 steps: the newest checkpoint is at step 24.
EPOCHS = 2
STOP = 16 + 10
EVERY = 4


def train_args(run: Path, j: int, *extra) -> tuple:
    return (
        "train-layer",
        "--run",
        run,
        "--j",
        j,
        "--epochs",
        EPOCHS,
        "--checkpoint-every",
        EVERY,
        *extra,
    )


def weights(run: Path, j: int) -> dict:
    return torch.load(run / f"stage_{j}" / "weights.pt", weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for part in ("stage", "head"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs"


def epoch_metrics(run: Path, j: int) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return [
        (e["epoch"], e["steps"], e["loss"], e["accuracy"])
        for e in entries
        if e["event"] == "epoch" and e["stage"] == j
    ]


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory) -> Path:
    from tests.conftest import TINY_ARCH

    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(TINY_ARCH))
    return path


def first_stage(run: Path, arch: Path, data: Path) -> tuple:
    """Arguments that train stage 0 of a new run as the reference does."""
    return new_run(run, 0, arch, data, "--epochs", EPOCHS, "--checkpoint-every", EVERY)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, arch_file) -> Path:
    """Stages 0 and 1 trained for two epochs each without a stop."""
    run = tmp_path_factory.mktemp("reference") / "run"
    ok(*first_stage(run, arch_file, tiny_data))
    ok("cache-features", "--run", run, "--j", 0, "--dtype", "float32")
    ok(*train_args(run, 1))
    return run


@pytest.fixture
def stopped(tmp_path, tiny_data, arch_file, monkeypatch):
    """A run like the reference, whose stage j stops at 60% of its second epoch."""

    def make(j: int) -> Path:
        run = tmp_path / f"run{j}"
        first = first_stage(run, arch_file, tiny_data)
        if j == 1:
            ok(*first)
            ok("cache-features", "--run", run, "--j", 0, "--dtype", "float32")
        monkeypatch.setenv(STOP_AT_STEP_ENV, str(STOP))
        refused(*(first if j == 0 else train_args(run, j)), match=f"stopped before step {STOP + 1}")
        monkeypatch.delenv(STOP_AT_STEP_ENV)
        return run

    return make


@pytest.mark.parametrize("j", [0, 1], ids=["images", "cached-features"])
def test_stopped_and_resumed_equals_uninterrupted(stopped, reference, j):
    run = stopped(j)
    folder = run / f"stage_{j}" / "checkpoints"
    assert checkpoints.checkpoint_steps(folder) == [20, 24]

    # The command `status` suggests: the options left out are the checkpoint's.
    out = ok("train-layer", "--run", run, "--j", j, "--resume", "--checkpoint-every", EVERY).output
    assert "resuming with the checkpoint's source=cache, epochs=2, precision=fp32" in out
    assert "resuming stage" in out and "step 24" in out
    assert_bitwise_equal(weights(run, j), weights(reference, j))
    assert epoch_metrics(run, j)[-2:] == epoch_metrics(reference, j)[-2:]
    record = json.loads((run / f"stage_{j}" / "record.json").read_text())
    assert record["resumed_from_steps"] == [24] and record["steps"] == 32
    assert not folder.exists(), "checkpoints of a finished stage are removed"


def test_truncated_newest_checkpoint_falls_back(stopped, reference):
    run = stopped(0)
    newest = run / "stage_0" / "checkpoints" / "step_000000024.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    out = ok(*train_args(run, 0, "--resume")).output
    assert f"checkpoint {newest} is damaged" in out
    assert "resuming from the previous good checkpoint" in out and "step_000000020.pt" in out
    assert_bitwise_equal(weights(run, 0), weights(reference, 0))


def test_checkpoints_need_resume_or_restart(stopped, reference):
    run = stopped(0)
    refused(*train_args(run, 0), match="stage 0 has checkpoints up to step 24")
    refused(*train_args(run, 0, "--resume", "--steps", 40), match="total_steps")

    ok(*train_args(run, 0, "--restart"))
    assert_bitwise_equal(weights(run, 0), weights(reference, 0))


def test_resume_of_a_finished_stage_is_refused(reference):
    refused(*train_args(reference, 1, "--resume"), match="has no checkpoint to resume")


def test_checkpoint_round_trip_restores_random_states(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    states = checkpoints.random_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoints.save_checkpoint(tmp_path, {"step": 7, "epoch": 0, "random": states})

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    state, path = checkpoints.load_newest(tmp_path)
    checkpoints.restore_random_states(state["random"])
    assert path.name == "step_000000007.pt" and state["format"] == checkpoints.CHECKPOINT_FORMAT
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_two_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoints.save_checkpoint(tmp_path, {"step": step, "epoch": 0})
    assert checkpoints.checkpoint_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000000003.json",
        "step_000000003.pt",
        "step_000000004.json",
        "step_000000004.pt",
    ]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda pt: pt.with_suffix(".json").unlink(), "index is missing"),
        (lambda pt: pt.with_suffix(".json").write_text("{"), "index is unreadable"),
        (lambda pt: pt.write_bytes(pt.read_bytes()[:-1] + b"x"), "sha256 differs"),
        (
            lambda pt: pt.with_suffix(".json").write_text(json.dumps({"format": 99})),
            "format 99",
        ),
    ],
    ids=["no-index", "bad-index", "flipped-byte", "other-format"],
)
def test_damaged_newest_checkpoint_is_set_aside(tmp_path, caplog, damage, problem):
    for step in (1, 2):
        checkpoints.save_checkpoint(tmp_path, {"step": step, "epoch": 0})
    damage(tmp_path / "step_000000002.pt")

    state, path = checkpoints.load_newest(tmp_path)
    assert state["step"] == 1 and path.name == "step_000000001.pt"
    assert problem in caplog.text and "falling back" in caplog.text
    assert (tmp_path / "step_000000002.pt.damaged").exists()
    assert checkpoints.checkpoint_steps(tmp_path) == [1]


def test_no_good_checkpoint_at_all(tmp_path):
    checkpoints.save_checkpoint(tmp_path, {"step": 1, "epoch": 0})
    (tmp_path / "step_000000001.pt").write_bytes(b"")
    assert checkpoints.load_newest(tmp_path) is None


def test_stop_variable_must_be_a_number(tmp_path, tiny_data, tiny_arch, monkeypatch):
    monkeypatch.setenv(STOP_AT_STEP_ENV, "ten")
    result = invoke(*new_run(tmp_path / "r", 0, tiny_arch, tiny_data))
    assert result.exit_code == 1 and "is not a step number" in result.output


def test_image_loader_starts_mid_epoch(tiny_data):
    from pipeline.datasets import DatasetInfo
    from pipeline.loaders import ImageLoader

    info = DatasetInfo.load(tiny_data)
    loader = ImageLoader(info, "train", 32, (1, 28, 28), shuffle=True, seed=7, drop_last=True)
    whole = list(loader.epoch(1))
    tail = list(loader.epoch(1, start=10))
    assert len(whole) == 16 and len(tail) == 6
    for (x, y), (tx, ty) in zip(whole[10:], tail, strict=True):
        assert torch.equal(x, tx) and torch.equal(y, ty)
    assert len(list(loader.epoch(2))) == 16, "the next epoch starts at its beginning again"


def test_partial_saves_are_removed_with_the_checkpoints(tmp_path):
    checkpoints.save_checkpoint(tmp_path, {"step": 1, "epoch": 0})
    (tmp_path / "step_000000002.pt.tmp").write_bytes(b"cut off")
    assert checkpoints.checkpoint_steps(tmp_path) == [1]
    assert checkpoints.remove_checkpoints(tmp_path) == 1
    assert not list(tmp_path.iterdir())


def test_a_save_cut_off_by_the_file_size_limit_keeps_the_previous(tmp_path):
    """The kernel refuses writes past RLIMIT_FSIZE as it would on a full disk."""
    import resource
    import signal

    checkpoints.save_checkpoint(tmp_path, {"step": 1, "epoch": 0})
    big = {"step": 2, "epoch": 0, "weights": torch.zeros(1 << 20)}  # 4 MiB
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(checkpoints.CheckpointError, match="the one of step 1 is kept"):
            checkpoints.save_checkpoint(tmp_path, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000000001.json",
        "step_000000001.pt",
    ]
    state, _ = checkpoints.load_newest(tmp_path)
    assert state["step"] == 1
