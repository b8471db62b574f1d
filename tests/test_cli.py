"""Each command through click's CliRunner: exit codes, messages and files."""

import gzip
import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cli import main
from pipeline.cache import MANIFEST_KEY


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(*args, match: str):
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert match in result.output, result.output
    return result


def new_run(run, j, preset, data, *extra):
    """Arguments of the first train-layer on a new run directory."""
    return ("train-layer", "--run", run, "--j", j, "--preset", preset, "--data", data, *extra)


@pytest.fixture
def run_dir(tmp_path, tiny_data, tiny_arch):
    """A run with stage 0 trained."""
    run = tmp_path / "run"
    ok(*new_run(run, 0, tiny_arch, tiny_data))
    return run


def test_describe_preset():
    out = ok("describe", "imagenet-k1").output
    assert "imagenet-k1: 8 stages, input 3x224x224, 1000 classes" in out
    assert "4096x7x7" in out and "6.1 MiB" in out


def test_describe_user_json(tiny_arch):
    out = ok("describe", tiny_arch, "--dtype", "float32").output
    assert "tiny: 3 stages" in out and "cached (float32)" in out


def test_describe_unknown_preset():
    refused("describe", "resnet50", match="unknown preset 'resnet50'; choose one of")


def test_prepare_fashion_mnist(tmp_path, fmnist_src):
    out = tmp_path / "data"
    result = ok("prepare", "fashion-mnist", fmnist_src, "--out", out, "--holdout", 100)
    assert "train 412, holdout 100, test 128" in result.output
    info = json.loads((out / "dataset.json").read_text())
    assert info["splits"]["holdout"]["count"] == 100
    assert info["input_shape"] == [1, 28, 28]
    labels = json.loads((out / "labels.json").read_text())
    assert labels["T-shirt/top"] == 0 and labels["Ankle boot"] == 9
    for split in ("train", "holdout", "test"):
        assert (out / f"{split}.beton").stat().st_size > 0


def test_prepare_fashion_mnist_missing_files(tmp_path):
    refused(
        "prepare",
        "fashion-mnist",
        tmp_path,
        "--out",
        tmp_path / "d",
        match="install the Debian package dataset-fashion-mnist",
    )


def test_prepare_holdout_too_large(tmp_path, fmnist_src):
    refused(
        "prepare",
        "fashion-mnist",
        fmnist_src,
        "--out",
        tmp_path / "d",
        "--holdout",
        512,
        match="--holdout 512 keeps too many samples: give 0 (none) up to 511",
    )


def test_prepare_cifar10(tmp_path, cifar_src):
    out = tmp_path / "cifar"
    result = ok("prepare", "cifar10", cifar_src, "--out", out)
    assert "train 100, test 20" in result.output and "3x32x32" in result.output
    labels = json.loads((out / "labels.json").read_text())
    assert list(labels)[:2] == ["airplane", "automobile"]


def test_prepare_cifar10_needs_src(tmp_path):
    refused("prepare", "cifar10", "--out", tmp_path / "d", match="needs SRC")


def test_prepare_folder_and_train_on_jpegs(tmp_path, folder_src):
    out = tmp_path / "folder-data"
    ok("prepare", "folder", folder_src, "--out", out, "--max-resolution", 64)
    labels = json.loads((out / "labels.json").read_text())
    assert list(labels) == sorted(labels) and len(labels) == 10
    arch = tmp_path / "rgb.json"
    arch.write_text(
        json.dumps(
            {
                "name": "rgb",
                "input_shape": [3, 32, 32],
                "num_classes": 10,
                "stages": [{"width": 4, "downsample": True}],
                "training": {"epochs": 1, "batch_size": 8, "lr": 0.01},
            }
        )
    )
    ok(*new_run(tmp_path / "r", 0, arch, out))
    result = ok("eval", "--run", tmp_path / "r")
    assert "on split val (20 samples)" in result.output


def test_prepare_folder_without_train(tmp_path):
    (tmp_path / "src").mkdir()
    refused(
        "prepare", "folder", tmp_path / "src", "--out", tmp_path / "d", match="has no train/ folder"
    )


def test_train_layer_new_run_needs_preset_and_data(tmp_path):
    refused(
        "train-layer",
        "--run",
        tmp_path / "new",
        "--j",
        0,
        match="the first command on it needs --preset and --data",
    )


def test_train_layer_refuses_data_that_does_not_fit(tmp_path, tiny_data):
    refused(
        *new_run(tmp_path / "r", 0, "cifar10-k3", tiny_data),
        match="takes 3-channel images but",
    )


def test_train_layer_records_settings_and_metrics(run_dir):
    record = json.loads((run_dir / "stage_0" / "record.json").read_text())
    assert record["source"] == "cache" and record["input"]["kind"] == "images"
    assert len(record["stage_hash"]) == 64
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["environment"]["versions"]["torch"]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch = next(e for e in epochs if e["event"] == "epoch")
    assert {"loss", "accuracy", "lr", "samples_per_s", "data_wait_share"} <= set(epoch)


def test_train_layer_refuses_untrained_stage_below(tmp_path, tiny_data, tiny_arch):
    run = tmp_path / "run"
    refused(
        *new_run(run, 1, tiny_arch, tiny_data),
        match=f"stage 0 is not trained (or is stale); run `greedy-cli train-layer --run {run} "
        "--j 0` first",
    )


def test_train_layer_refuses_uncached_stage_below(run_dir):
    refused(
        "train-layer",
        "--run",
        run_dir,
        "--j",
        1,
        match=f"run `greedy-cli cache-features --run {run_dir} --j 0` first",
    )


def test_train_layer_recompute_needs_no_cache(run_dir):
    result = ok("train-layer", "--run", run_dir, "--j", 1, "--source", "recompute", "--steps", 3)
    assert "stage 1 trained" in result.output
    record = json.loads((run_dir / "stage_1" / "record.json").read_text())
    assert record["source"] == "recompute" and record["steps"] == 3


@pytest.mark.parametrize("budget, read", [("8GiB", "memory"), ("0", "streamed")])
def test_train_layer_memory_budget_chooses_how_the_cache_is_read(run_dir, budget, read):
    ok("cache-features", "--run", run_dir, "--j", 0)
    ok("train-layer", "--run", run_dir, "--j", 1, "--steps", 3, "--memory-budget", budget)
    record = json.loads((run_dir / "stage_1" / "record.json").read_text())
    assert record["input"]["read"] == read


def test_memory_budget_must_be_a_size(run_dir):
    result = invoke("train-layer", "--run", run_dir, "--j", 1, "--memory-budget", "lots")
    assert result.exit_code == 2 and "Invalid value for '--memory-budget'" in result.output


def test_train_layer_refuses_stale_cache(run_dir):
    ok("cache-features", "--run", run_dir, "--j", 0)
    ok("train-layer", "--run", run_dir, "--j", 0, "--steps", 2)  # new stage-0 weights
    refused(
        "train-layer", "--run", run_dir, "--j", 1, match="does not match the stages now trained"
    )


def test_train_layer_refuses_incomplete_cache(run_dir):
    ok("cache-features", "--run", run_dir, "--j", 0)
    group = zarr.open_group(str(run_dir / "features" / "stage_0.zarr"), mode="r+")
    group.attrs[MANIFEST_KEY] = {**group.attrs[MANIFEST_KEY], "complete": False}
    refused(
        "train-layer",
        "--run",
        run_dir,
        "--j",
        1,
        match=f"is incomplete; run `greedy-cli cache-features --run {run_dir} --j 0` "
        "to write it again",
    )


def test_train_layer_stage_out_of_range(run_dir):
    refused("train-layer", "--run", run_dir, "--j", 3, match="--j 3 is out of range")


def test_train_layer_refuses_other_preset_on_existing_run(run_dir):
    refused(
        "train-layer",
        "--run",
        run_dir,
        "--j",
        0,
        "--preset",
        "fmnist",
        match="was made with architecture 'tiny'",
    )


def test_other_preset_of_the_same_name_says_what_differs(run_dir, tmp_path):
    from conftest import TINY_ARCH

    other = tmp_path / "tiny-b.json"
    other.write_text(
        json.dumps({**TINY_ARCH, "training": {**TINY_ARCH["training"], "batch_size": 16}})
    )
    refused(
        *("train-layer", "--run", run_dir, "--j", 0, "--preset", other),
        match="differs in training.batch_size.",
    )


def test_cache_features_refuses_untrained_stage(run_dir):
    refused(
        "cache-features",
        "--run",
        run_dir,
        "--j",
        1,
        match=f"stage 1 is not trained (or is stale); run `greedy-cli train-layer --run "
        f"{run_dir} --j 1` first",
    )


def test_cache_features_writes_every_split(run_dir, tiny_data):
    result = ok("cache-features", "--run", run_dir, "--j", 0)
    assert "train 512, test 128" in result.output
    group = zarr.open_group(str(run_dir / "features" / "stage_0.zarr"), mode="r")
    manifest = group.attrs[MANIFEST_KEY]
    assert manifest["complete"] and manifest["dtype"] == "bfloat16"
    assert group["train/features"].shape == (512, 8, 14, 14)
    assert group["test/features"].dtype == np.uint16  # bfloat16 bits
    # Labels follow the dataset's stored order, the last partial batch included.
    source = next(p for p in tiny_data.parent.glob("fmnist-src*/t10k-labels-idx1-ubyte.gz"))
    with gzip.open(source) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    order = [int(i) for i in (tiny_data / "test.sources.txt").read_text().split()]
    want = labels[order]
    assert np.array_equal(group["test/labels"][:], want)


def test_eval_refuses_untrained_stages(run_dir):
    refused("eval", "--run", run_dir, match="stage 1 is not trained")


def test_run_trains_caches_evaluates_then_skips(tmp_path, tiny_data):
    from conftest import TINY_ARCH

    tiny_arch = tmp_path / "tiny6.json"
    tiny_arch.write_text(
        json.dumps({**TINY_ARCH, "training": {**TINY_ARCH["training"], "epochs": 6, "lr": 0.1}})
    )
    run = tmp_path / "run"
    first = ok("run", tiny_arch, "--data", tiny_data, "--run", run)
    assert "final model" in first.output and "ensemble" in first.output
    report = json.loads((run / "eval.json").read_text())
    assert len(report["stages"]) == 3
    for entry in [*report["stages"], report["final"], report["ensemble"]]:
        assert 0 <= entry["top1"] <= entry["top5"] <= 100
        assert entry["split"] == "test"
    assert report["stages"][1]["input"] == "features of stage 1"
    assert report["stages"][2]["input"] == "features of stage 1"
    # The demo data is learnable: the final model beats chance by far.
    assert report["final"]["top1"] > 30

    weights = {j: (run / f"stage_{j}" / "weights.pt").read_bytes() for j in range(3)}
    second = ok("run", tiny_arch, "--data", tiny_data, "--run", run)
    assert "stage 2 is trained and current; skipping" in second.output
    assert "eval.json is current; skipping evaluation" in second.output
    for j in range(3):
        assert (run / f"stage_{j}" / "weights.pt").read_bytes() == weights[j]
    log = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log.count("stage_trained") == 3 and log.count("eval") == 1


def test_corrupt_run_json_is_refused_cleanly(run_dir):
    (run_dir / "run.json").write_text("{not json")
    refused("train-layer", "--run", run_dir, "--j", 0, match="run.json is not valid JSON")


def test_corrupt_weights_are_refused_cleanly(run_dir):
    (run_dir / "stage_0" / "weights.pt").write_bytes(b"truncated")
    refused("cache-features", "--run", run_dir, "--j", 0, match="is damaged or not a weights file")


def test_other_seed_is_refused_and_no_seed_continues(tmp_path, tiny_data, tiny_arch):
    run = tmp_path / "run"
    ok(
        *new_run(run, 0, tiny_arch, tiny_data),
        "--seed",
        1,
        "--steps",
        2,
    )
    refused(
        "train-layer", "--run", run, "--j", 0, "--seed", 2, match="was made with --seed 1, not 2"
    )
    ok("train-layer", "--run", run, "--j", 0, "--steps", 2)
    assert json.loads((run / "run.json").read_text())["seed"] == 1


def test_new_run_refuses_leftovers(run_dir, tiny_data, tiny_arch):
    (run_dir / "run.json").unlink()
    refused(
        *new_run(run_dir, 0, tiny_arch, tiny_data),
        match="holds ['stage_0'] from an earlier run",
    )


def test_eval_unknown_split(run_dir):
    refused("eval", "--run", run_dir, "--split", "val", match="has no split 'val'")


def test_altered_cache_is_refused(run_dir):
    ok("cache-features", "--run", run_dir, "--j", 0)
    group = zarr.open_group(str(run_dir / "features" / "stage_0.zarr"), mode="r+")
    group.create_array("train/labels", shape=(3,), dtype="int64", overwrite=True)
    refused("train-layer", "--run", run_dir, "--j", 1, match="the store was altered")


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
def test_real_fashion_mnist_end_to_end(tmp_path):
    """Prepare the real Fashion-MNIST and run a small greedy network on it."""
    import os

    if not os.path.isdir(FMNIST):
        pytest.skip(f"{FMNIST} missing: install the Debian package dataset-fashion-mnist")
    data = tmp_path / "data"
    ok("prepare", "fashion-mnist", "--out", data, "--holdout", 50000)
    arch = tmp_path / "small.json"
    arch.write_text(
        json.dumps(
            {
                "name": "small",
                "input_shape": [1, 28, 28],
                "num_classes": 10,
                "stages": [
                    {"width": 16, "downsample": True, "batch_norm": True, "k": 2, "head_width": 16},
                    {"width": 32, "downsample": True, "batch_norm": True, "k": 1},
                ],
                "training": {"epochs": 2, "batch_size": 64, "lr": 0.05},
            }
        )
    )
    ok("run", arch, "--data", data, "--run", tmp_path / "run")
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["final"]["samples"] == 10000
    assert report["final"]["top1"] > 75  # 10,000 training images, 2 epochs per stage
    fidelity = report["cache_fidelity"][0]
    # bfloat16 caches (the default) round to half a step, 2^-8 = 3.9e-3 of a value;
    # measured 2.4e-3 of the largest value here.
    assert fidelity["max_rel_diff"] < 2.0**-8


def test_missing_feature_chunk_is_refused(run_dir):
    ok("cache-features", "--run", run_dir, "--j", 0)
    chunks = sorted(
        (run_dir / "features" / "stage_0.zarr" / "train" / "features").rglob("c/*/*/*/*")
    )
    chunks[0].unlink()
    refused("train-layer", "--run", run_dir, "--j", 1, match="holds non-finite values (a chunk")


def test_missing_label_chunk_is_refused(run_dir):
    ok("cache-features", "--run", run_dir, "--j", 0)
    (run_dir / "features" / "stage_0.zarr" / "train" / "labels" / "c" / "0").unlink()
    refused("train-layer", "--run", run_dir, "--j", 1, match="has unwritten entries")


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"width": "eight"}, "stages[0].width must be a positive integer, got 'eight'"),
        ({"width": 8, "downsample": "no"}, "stages[0].downsample must be true or false, got 'no'"),
        ({"width": 8.5}, "stages[0].width must be a positive integer, got 8.5"),
    ],
)
def test_architecture_types_are_checked(tmp_path, stage, message):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "name": "bad",
                "input_shape": [1, 28, 28],
                "num_classes": 10,
                "stages": [stage],
                "training": {"epochs": 1, "batch_size": 8, "lr": 0.1},
            }
        )
    )
    refused("describe", path, match=f"architecture file {path}: {message}")


def test_refused_first_command_leaves_nothing(tmp_path, tiny_data, tiny_arch):
    run = tmp_path / "run"
    refused(
        *new_run(run, 5, tiny_arch, tiny_data),
        match="--j 5 is out of range",
    )
    assert not (run / "run.json").exists()


def test_eval_on_another_split_keeps_eval_json(tmp_path, tiny_data, tiny_arch):
    run = tmp_path / "run"
    ok("run", tiny_arch, "--data", tiny_data, "--run", run)
    before = (run / "eval.json").read_text()
    result = ok("eval", "--run", run, "--split", "train")
    assert "on split train (512 samples)" in result.output
    assert (run / "eval.json").read_text() == before
    assert json.loads((run / "eval-train.json").read_text())["split"] == "train"


def test_status_follows_the_run(run_dir):
    out = ok("status", "--run", run_dir).output
    assert "0      current  missing" in out
    assert f"next: greedy-cli cache-features --run {run_dir} --j 0" in out
    ok("cache-features", "--run", run_dir, "--j", 0)
    ok("train-layer", "--run", run_dir, "--j", 1, "--steps", 2)
    out = ok("status", "--run", run_dir).output
    assert f"next: greedy-cli cache-features --run {run_dir} --j 1" in out
    ok("train-layer", "--run", run_dir, "--j", 0, "--steps", 2)  # retrain: everything above stale
    out = ok("status", "--run", run_dir).output
    assert "0      current  stale" in out and "1      stale" in out
    assert f"next: greedy-cli cache-features --run {run_dir} --j 0" in out


def test_run_with_bfloat16_caches(tmp_path, tiny_data, tiny_arch):
    """Every stage trains from bfloat16 caches; eval finds them within bfloat16 rounding
    of the float32 trunk (2**-8 of the value, at most 2**-7 of the largest)."""
    run = tmp_path / "run"
    ok("run", tiny_arch, "--data", tiny_data, "--run", run, "--dtype", "bfloat16")
    for j in (0, 1):
        manifest = zarr.open_group(str(run / "features" / f"stage_{j}.zarr")).attrs[MANIFEST_KEY]
        assert manifest["dtype"] == "bfloat16"
    report = json.loads((run / "eval.json").read_text())
    fidelity = report["cache_fidelity"]
    assert [f["stage"] for f in fidelity] == [0, 1]
    for f in fidelity:
        assert 0 < f["max_rel_diff"] <= 2**-7
