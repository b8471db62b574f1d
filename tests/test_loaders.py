import numpy as np
import pytest
import zarr

from pipeline.datasets import DatasetInfo
from pipeline.errors import CacheError
from pipeline.loaders import FeatureLoader, ImageLoader, epoch_permutation
from pipeline.train import lr_at


def test_epoch_permutation_is_a_pure_function():
    a = epoch_permutation(1000, seed=7, epoch=3)
    assert np.array_equal(a, epoch_permutation(1000, seed=7, epoch=3))
    assert not np.array_equal(a, epoch_permutation(1000, seed=7, epoch=4))
    assert not np.array_equal(a, epoch_permutation(1000, seed=8, epoch=3))
    assert np.array_equal(np.sort(a), np.arange(1000))


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((1000, 2, 3, 3)).astype(np.float16)
    values[:, 0, 0, 0] = np.arange(1000)  # each row names itself
    array = zarr.create_array(
        str(tmp_path / "f.zarr"), shape=values.shape, chunks=(64, 2, 3, 3), dtype="float16"
    )
    array[:] = values
    return array, values, np.arange(1000) % 10


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["in-memory", "chunks"])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("buffer_chunks", [1, 3])
def test_feature_loader_covers_every_sample_once(store, budget, drop_last, buffer_chunks):
    array, values, labels = store
    # 1000 samples in batches of 100 or 64 (a partial last batch of 40); with one
    # 64-sample chunk in the buffer, a batch of 100 spans two chunks.
    for batch in (100, 64):
        loader = FeatureLoader(
            array,
            labels,
            batch,
            shuffle=True,
            seed=1,
            drop_last=drop_last,
            memory_budget=budget,
            buffer_chunks=buffer_chunks,
        )
        assert loader.in_memory == bool(budget)
        batches = list(loader.epoch(0))
        expected = 1000 // batch if drop_last else -(-1000 // batch)
        assert len(batches) == len(loader) == expected
        assert all(len(y) == batch for _, y in batches[:-1])
        rows = np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in batches]).astype(int)
        got_labels = np.concatenate([y.numpy() for _, y in batches])
        assert np.array_equal(got_labels, labels[rows])  # labels travel with their rows
        assert len(set(rows.tolist())) == len(rows)
        assert len(rows) == (1000 - 1000 % batch if drop_last else 1000)
        assert not np.array_equal(rows, np.arange(len(rows)))  # shuffled


class _FailingArray:
    """A zarr-like array whose third chunk cannot be read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.chunks = (
            array,
            array.shape,
            array.dtype,
            array.chunks,
        )

    def __getitem__(self, key):
        if isinstance(key, slice) and key.start == 128:
            raise OSError("chunk 2 is damaged")
        return self.array[key]


def test_feature_loader_raises_a_read_error_instead_of_hanging(store):
    array, _, labels = store
    loader = FeatureLoader(_FailingArray(array), labels, 32, memory_budget=0)
    with pytest.raises(CacheError, match=r"rows 128..192 cannot be read \(OSError: chunk 2"):
        list(loader.epoch(0))


def test_feature_loader_stops_its_reader_when_left_early(store):
    array, _, labels = store
    loader = FeatureLoader(array, labels, 32, memory_budget=0)
    batches = loader.epoch(0)
    next(batches)
    batches.close()  # the reader thread is joined, not left blocked
    assert next(iter(loader.epoch(1)))[0].shape == (32, 2, 3, 3)


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["in-memory", "chunks"])
def test_feature_loader_order_depends_only_on_seed_and_epoch(store, budget):
    array, _, labels = store

    def order(seed, epoch):
        loader = FeatureLoader(array, labels, 64, shuffle=True, seed=seed, memory_budget=budget)
        return np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in loader.epoch(epoch)])

    assert np.array_equal(order(1, 2), order(1, 2))
    assert not np.array_equal(order(1, 2), order(1, 3))
    assert not np.array_equal(order(1, 2), order(2, 2))


def test_partial_last_batch_is_kept(store):
    array, values, labels = store
    loader = FeatureLoader(array[:], labels, 300)
    sizes = [len(y) for _, y in loader.epoch(0)]
    assert sizes == [300, 300, 300, 100]


def test_image_loader_order_matches_feature_loader(tiny_data):
    info = DatasetInfo.load(tiny_data)
    n = info.count("train")
    images = ImageLoader(info, "train", 32, (1, 28, 28), shuffle=True, seed=5, drop_last=True)
    plain = ImageLoader(info, "train", n, (1, 28, 28))
    all_x, all_y = next(iter(plain.epoch(0)))
    # Use each image's first 16 pixels as its name.
    names = {tuple(row.flatten()[:16].tolist()): i for i, row in enumerate(all_x)}
    for epoch in (0, 1):
        seen = [
            names[tuple(x.flatten()[:16].tolist())] for xb, _ in images.epoch(epoch) for x in xb
        ]
        assert seen == epoch_permutation(n, 5, epoch)[: len(seen)].tolist()
        features = FeatureLoader(
            all_x.numpy(), all_y.numpy(), 32, shuffle=True, seed=5, drop_last=True
        )
        ys = np.concatenate([y.numpy() for _, y in features.epoch(epoch)])
        assert np.array_equal(ys, all_y.numpy()[seen])


@pytest.mark.parametrize("total", [10, 50, 1000])
def test_step_schedule_drops_at_the_papers_fractions(total):
    lrs = [lr_at(s, total, 0.1, (0.3, 0.6, 0.9), 0.2) for s in range(total)]
    drops = [s for s in range(1, total) if lrs[s] < lrs[s - 1]]
    assert drops == [round(0.3 * total), round(0.6 * total), round(0.9 * total)]
    assert lrs[-1] == pytest.approx(0.1 * 0.2**3)
