"""Cached views: each view's features are the stages applied to its recorded augmentation,
views are carried up the stages, and training picks them reproducibly."""

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cli import main
from pipeline.augment import Augmentation, apply_views, black
from pipeline.cache import MANIFEST_KEY
from pipeline.loaders import FeatureLoader, ImageLoader
from pipeline.rundir import Run


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def view_run(tmp_path_factory, tiny_data):
    """Stages 0 and 1 trained briefly, stage 0 cached with 3 views, stage 1 from them."""
    from conftest import TINY_ARCH

    root = tmp_path_factory.mktemp("views")
    arch = {
        **TINY_ARCH,
        "training": {**TINY_ARCH["training"], "augmentation": "crop-flip", "crop_padding": 2},
    }
    (root / "arch.json").write_text(json.dumps(arch))
    run = root / "run"
    ok(
        "train-layer",
        "--run",
        run,
        "--j",
        0,
        "--preset",
        root / "arch.json",
        "--data",
        tiny_data,
        "--steps",
        5,
        "--augment",
    )
    ok("cache-features", "--run", run, "--j", 0, "--views", 3, "--dtype", "float16")
    ok("train-layer", "--run", run, "--j", 1, "--steps", 5, "--augment")
    ok("cache-features", "--run", run, "--j", 1, "--views", 3, "--dtype", "float16")
    return run


def stored(run_dir, j, split):
    return zarr.open_group(str(run_dir / f"features/stage_{j}.zarr"), mode="r")[split]


@pytest.mark.parametrize("j", [0, 1])
def test_a_views_features_are_the_stages_on_its_recorded_augmentation(view_run, j):
    run = Run.open(view_run)
    group = zarr.open_group(str(view_run / f"features/stage_{j}.zarr"), mode="r")
    manifest = group.attrs[MANIFEST_KEY]
    assert manifest["views"] == 3 and manifest["augmentation"]["kind"] == "crop-flip"
    params = group["train/view_params"][:]
    assert params.shape == (512, 3, 5)

    rows = np.arange(0, 512, 37)
    loader = ImageLoader(run.data, "train", 64, run.arch.input_shape, indices=rows)
    images = torch.cat([x for x, _ in loader.epoch(0)])
    stages = torch.nn.Sequential(*[run.load_stage(i)[0] for i in range(j + 1)])
    aug = Augmentation("crop-flip", 2)
    for v in range(3):
        split = "train" if v == 0 else f"train@{v}"
        with torch.no_grad():
            want = stages(apply_views(aug, images, params[rows, v], black(run.data))).numpy()
        got = group[f"{split}/features"].get_orthogonal_selection((rows,)).astype(np.float32)
        # Stage 0: one float16 rounding; stage 1 read stage 0's rounded view: two.
        tolerance = (2e-3 if j == 0 else 6e-3) * np.abs(want).max()
        assert np.abs(got - want).max() <= tolerance, (j, v)
    assert not np.array_equal(params[:, 1], params[:, 2])
    assert (params[:, 0, :2] == 2).all() and (params[:, 0, 4] == 0).all()


def test_views_below_must_match(view_run):
    result = invoke("cache-features", "--run", view_run, "--j", 1, "--views", 2)
    assert result.exit_code == 1
    assert "stage 0's cache holds 3 view(s), not 2" in result.output
    assert "--views 2` first" in result.output


def test_training_records_its_views_and_a_view_store_verifies(view_run):
    record = Run.open(view_run).record(1)
    assert record["input"]["views"] == 3
    ok("cache-features", "--run", view_run, "--j", 1, "--verify")


def test_view_choice_per_epoch_is_reproducible(view_run):
    views = [stored(view_run, 0, s)["features"] for s in ("train", "train@1", "train@2")]
    labels = stored(view_run, 0, "train")["labels"][:]

    def epoch(e, budget):
        loader = FeatureLoader(views, labels, 64, shuffle=True, seed=3, memory_budget=budget)
        return torch.cat([x for x, _ in loader.epoch(e)])

    for budget in (8 << 30, 0):  # held in memory, and streamed chunk by chunk
        assert torch.equal(epoch(1, budget), epoch(1, budget))
        assert not torch.equal(epoch(1, budget), epoch(2, budget))
    # Each epoch reads one view's worth of samples, whichever views it picks.
    assert epoch(1, 8 << 30).shape[0] == 512


def test_views_need_an_augmentation(tmp_path, tiny_data, tiny_arch):
    ok(
        "train-layer",
        "--run",
        tmp_path / "r",
        "--j",
        0,
        "--preset",
        tiny_arch,
        "--data",
        tiny_data,
        "--steps",
        2,
    )
    result = invoke("cache-features", "--run", tmp_path / "r", "--j", 0, "--views", 2)
    assert result.exit_code == 1 and "training augmentation, and tiny's is 'none'" in result.output


def test_each_chunk_is_read_from_the_view_the_epoch_chooses(view_run):
    from pipeline.augment import view_choice

    arrays = [stored(view_run, 0, s)["features"] for s in ("train", "train@1", "train@2")]
    values = [a[:].astype(np.float32).reshape(512, -1) for a in arrays]
    labels = stored(view_run, 0, "train")["labels"][:]
    chunk = arrays[0].chunks[0]
    # A view whose crop and flip happen to be the identity equals view 0: keep every match.
    lookup: dict[bytes, list] = {}
    for v in range(3):
        for i in range(512):
            lookup.setdefault(values[v][i].tobytes(), []).append((i, v))
    for epoch in (0, 1, 2):
        want = view_choice(-(-512 // chunk), 3, 3, epoch)
        for budget in (8 << 30, 0):
            loader = FeatureLoader(arrays, labels, 64, shuffle=True, seed=3, memory_budget=budget)
            rows = [x.numpy().reshape(-1).tobytes() for b, _ in loader.epoch(epoch) for x in b]
            chosen = [[i for i, v in lookup[row] if v == want[i // chunk]] for row in rows]
            assert all(len(c) == 1 for c in chosen), (epoch, budget)
            assert sorted(c[0] for c in chosen) == list(range(512))


def test_describe_counts_views():
    one = ok("describe", "fmnist").output
    four = ok("describe", "fmnist", "--views", "4").output
    assert "cached (bfloat16)" in one and "24.5 KiB" in one
    assert "cached (bfloat16, 4 views)" in four and "98.0 KiB" in four
