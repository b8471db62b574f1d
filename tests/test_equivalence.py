"""The cache changes nothing but the cost."""

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import CacheSettings, cache_features
from pipeline.loaders import ImageLoader
from pipeline.rundir import Run
from pipeline.train import TrainSettings, train_layer


@pytest.fixture
def trained_run(tmp_path, tiny_data, tiny_arch):
    run = Run.open(tmp_path / "run", str(tiny_arch), tiny_data, seed=3)
    train_layer(TrainSettings(run=run.root, j=0, max_steps=10), run)
    return run


def test_float32_cache_gives_the_recompute_losses(trained_run):
    run = trained_run
    cache_features(
        CacheSettings(run=run.root, j=0, dtype="float32", batch_size=run.arch.training.batch_size)
    )
    cached = train_layer(TrainSettings(run=run.root, j=1, source="cache", max_steps=20), run)
    recomputed = train_layer(
        TrainSettings(run=run.root, j=1, source="recompute", max_steps=20), run
    )

    assert cached.record["input"]["kind"] == "features"
    assert recomputed.record["input"]["kind"] == "images"
    a, b = np.array(cached.losses), np.array(recomputed.losses)
    assert len(a) == len(b) == 20
    assert np.all(np.abs(a - b) <= 1e-5 * np.abs(b)), np.abs(a - b) / np.abs(b)


def _within_float16_rounding(stored: np.ndarray, exact: np.ndarray) -> None:
    # One float16 step at the value's magnitude (2^-10 relative), or the smallest subnormal.
    step = np.maximum(np.abs(exact) * 2.0**-10, 2.0**-24)
    err = np.abs(stored.astype(np.float64) - exact.astype(np.float64))
    assert np.all(err <= step), float((err / step).max())


def test_float16_cache_is_the_stage_applied_to_its_input(trained_run):
    run = trained_run
    train_layer(TrainSettings(run=run.root, j=0, max_steps=10), run)
    cache_features(CacheSettings(run=run.root, j=0, dtype="float16"))
    train_layer(TrainSettings(run=run.root, j=1, max_steps=10), run)
    cache_features(CacheSettings(run=run.root, j=1, dtype="float16"))
    stage0, _ = run.load_stage(0)
    stage1, _ = run.load_stage(1)

    for split in ("train", "test"):
        cache0 = zarr.open_group(str(run.features_path(0)), mode="r")[f"{split}/features"][:]
        cache1 = zarr.open_group(str(run.features_path(1)), mode="r")[f"{split}/features"][:]
        assert cache0.dtype == cache1.dtype == np.float16

        # Stage 0 on the images, every sample including the last partial batch.
        loader = ImageLoader(run.data, split, 100, run.arch.input_shape)
        with torch.no_grad():
            exact0 = torch.cat([stage0(x) for x, _ in loader.epoch(0)]).numpy()
        assert exact0.shape == cache0.shape
        _within_float16_rounding(cache0, exact0)

        # Stage 1 on its input: stage 0's cached features.
        with torch.no_grad():
            exact1 = stage1(torch.from_numpy(cache0.astype(np.float32))).numpy()
        _within_float16_rounding(cache1, exact1)
