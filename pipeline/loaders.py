"""Batches for training and inference: images through FFCV, features from a zarr store.

Both loaders draw an epoch's order from :func:`epoch_permutation`, so that a stage
trained from cached features and one trained by recomputing the trunk see the same
samples in the same batches.
"""

import logging
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype

from pipeline.augment import view_choice
from pipeline.chunks import LocalChunks
from pipeline.datasets import DatasetInfo
from pipeline.errors import CacheError
from pipeline.storage import finite, to_tensor

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of an epoch: a pure function of the sample count, seed and epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _make_order(seed: int, shuffle: bool, batch_size: int, drop_last: bool):
    from ffcv.traversal_order.base import TraversalOrder

    class EpochOrder(TraversalOrder):
        """The epoch's order, less its first ``skip`` batches (set to resume mid-epoch)."""

        # FFCV instantiates a custom order by calling the object with the loader.
        def __init__(self):
            self.skip = 0

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int):
            order = self.indices
            if shuffle:
                order = order[epoch_permutation(len(order), seed, epoch)]
            if drop_last:
                order = order[: len(order) - len(order) % batch_size]
            return order[self.skip * batch_size :]

    return EpochOrder()


class ImageLoader:
    """Normalised float32 (N, C, H, W) images and int64 labels from an FFCV dataset."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        batch_size: int,
        image_shape: tuple[int, int, int],
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        indices: np.ndarray | None = None,
        workers: int = 2,
    ):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import NormalizeImage, Squeeze, ToTensor

        self.split = split
        self.batch_size = batch_size
        n = info.count(split) if indices is None else len(indices)
        self.num_samples = n
        self.drop_last = drop_last
        self._order = _make_order(seed, shuffle, batch_size, drop_last)
        mean, std = np.asarray(info.mean), np.asarray(info.std)
        if info.kind == "array":
            image = [NDArrayDecoder(), ToTensor()]
        else:
            # RGB images are normalised by FFCV's workers, through a table of 256 values a
            # channel, and reach this process as float32 (N, H, W, C).
            image = [
                CenterCropRGBImageDecoder(image_shape[1:], ratio=224 / 256),
                NormalizeImage(mean * 255, std * 255, np.float32),
                ToTensor(),
            ]
        self._normalised = info.kind != "array"
        self._loader = Loader(
            str(info.path(split)),
            batch_size=batch_size,
            num_workers=workers,
            order=self._order,
            indices=indices,
            drop_last=drop_last,
            pipelines={
                "image": image,
                "label": [IntDecoder(), ToTensor(), Squeeze()],
            },
        )
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch ``start`` on; the earlier ones are not read."""
        self._order.skip = start
        self._loader.next_epoch = epoch
        for images, labels in self._loader:
            if self._normalised:
                # FFCV reuses its batch buffers: the copy to (N, C, H, W) is the one kept.
                x = images.permute(0, 3, 1, 2).contiguous()
            else:
                x = (images.permute(0, 3, 1, 2).float().div_(255) - self._mean) / self._std
                x = x.contiguous()
            yield x, labels.reshape(-1).to(torch.int64, copy=True)


class FeatureLoader:
    """Float32 batches of a stage's cached features and their labels.

    When the split fits ``memory_budget`` bytes it is read whole, sequentially, and
    batches follow :func:`epoch_permutation` exactly. Otherwise whole chunks are read
    in a shuffled order by a read-ahead thread and samples are shuffled within a
    buffer of ``buffer_chunks`` chunks; the order still depends only on seed and epoch.

    ``features`` may be a list of arrays, the views of the split. A shuffled epoch then
    reads one view of every chunk, chosen by :func:`view_choice` from the seed, the
    epoch and the chunk's position: the same bytes as an epoch of one view.
    """

    def __init__(
        self,
        features,
        labels: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        memory_budget: int = 8 << 30,
        buffer_chunks: int = 8,
        name: str = "features",
    ):
        self.views = list(features) if isinstance(features, list | tuple) else [features]
        features = self.features = self.views[0]
        # A plain array is one chunk; a zarr array reads in its own chunks.
        self.chunk = getattr(features, "chunks", (max(len(labels), 1),))[0]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_samples = features.shape[0]
        self.buffer_chunks = buffer_chunks
        self.name = name
        # Chunk files on a local disk are read directly (see pipeline.chunks).
        self._direct = {id(v): LocalChunks.of(v) for v in self.views}
        nbytes = int(np.prod(features.shape)) * features.dtype.itemsize * len(self.views)
        self._in_memory = None
        if nbytes <= memory_budget:
            log.info("holding %.1f MB of features in memory", nbytes / 1e6)
            held = [self._read(0, self.num_samples, v) for v in self.views]
            # One view is kept as read (no copy); several are stacked as (views, N, ...).
            self._in_memory = held[0][None] if len(held) == 1 else np.stack(held)
        else:
            log.info(
                "streaming %.1f MB of features in whole chunks (above the memory budget of "
                "%.1f MB)",
                nbytes / 1e6,
                memory_budget / 1e6,
            )

    @property
    def in_memory(self) -> bool:
        return self._in_memory is not None

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self._in_memory is not None:
            yield from self._from_memory(epoch)
        else:
            yield from self._from_chunks(epoch)

    def _batches(self, order: np.ndarray) -> Iterator[np.ndarray]:
        stop = len(self) * self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def _view_of_chunks(self, epoch: int) -> np.ndarray:
        """The view each chunk is read from this epoch; view 0 when not shuffling."""
        count = -(-self.num_samples // self.chunk)
        if not self.shuffle:
            return np.zeros(count, np.int64)
        return view_choice(count, len(self.views), self.seed, epoch)

    def _from_memory(self, epoch: int) -> Iterator[Batch]:
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, epoch)
        else:
            order = np.arange(self.num_samples)
        view = self._view_of_chunks(epoch)[np.arange(self.num_samples) // self.chunk]
        for idx in self._batches(order):
            yield to_tensor(self._in_memory[view[idx], idx]), torch.from_numpy(self.labels[idx])

    def _from_chunks(self, epoch: int) -> Iterator[Batch]:
        """Whole chunks in a shuffled order, mixed within blocks of ``buffer_chunks`` chunks.

        A read-ahead thread decodes each block's chunks straight into one of a few
        reused buffers; batches are gathered from a permutation of the block, as from
        memory, so streaming adds only the chunks' decoding. The rows of a partial batch
        left at the end of a block are copied to the head of the next block's buffer.
        """
        chunk = self.chunk
        starts = np.arange(0, self.num_samples, chunk)
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:
            starts = starts[rng.permutation(len(starts))]
        per_block = max(self.buffer_chunks, -(-self.batch_size // chunk))
        views = self._view_of_chunks(epoch)
        head = self.batch_size - 1  # room for the carried rows of a partial batch
        carry_x = None
        carried = np.empty(0, np.int64)  # labels of the carried rows
        for buffer, labels, filled in self._read_ahead(starts, per_block, views, head):
            if carry_x is not None and len(carried):
                buffer[head - len(carried) : head] = carry_x
            rows = buffer[head - len(carried) : head + filled]
            y = np.concatenate([carried, labels])
            mix = rng.permutation(len(y)) if self.shuffle else np.arange(len(y))
            full = len(y) - len(y) % self.batch_size
            for first in range(0, full, self.batch_size):
                idx = mix[first : first + self.batch_size]
                yield to_tensor(rows[idx]), torch.from_numpy(y[idx])
            tail = mix[full:]
            carry_x, carried = rows[tail], y[tail]  # copies: the buffer goes back
        if len(carried) and not self.drop_last:
            yield to_tensor(carry_x), torch.from_numpy(carried)

    def _read_ahead(
        self, starts: np.ndarray, per_block: int, views: np.ndarray, head: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Blocks of ``per_block`` chunks in the order of ``starts``, read by a thread.

        Each item is a buffer whose rows ``head:head + filled`` hold the block, with the
        block's labels; the consumer hands the buffer back with :meth:`_release`. A read
        error is raised here; leaving the loop early stops the thread.
        """
        chunk = self.chunk
        shape = (head + min(per_block, len(starts)) * chunk, *self.features.shape[1:])
        free: queue.Queue = queue.Queue()
        for _ in range(3):  # one being filled, one waiting, one being consumed
            free.put(np.empty(shape, self.features.dtype))
        reads: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def wait(get):
            while not stop.is_set():
                try:
                    return get()
                except (queue.Full, queue.Empty):
                    continue
            return None

        def offer(item) -> bool:
            return wait(lambda: reads.put(item, timeout=0.1) or True) is not None

        def work():
            try:
                for first in range(0, len(starts), per_block):
                    buffer = wait(lambda: free.get(timeout=0.1))
                    if buffer is None:
                        return
                    filled, labels = head, []
                    for s in starts[first : first + per_block]:
                        if stop.is_set():
                            return
                        end = min(s + chunk, self.num_samples)
                        array = self.views[views[s // chunk]]
                        self._read_into(buffer[filled : filled + end - s], s, end, array)
                        labels.append(self.labels[s:end])
                        filled += end - s
                    if not offer((buffer, np.concatenate(labels), filled - head)):
                        return
                offer(None)
            except BaseException as err:  # handed to the consumer, raised there
                offer(err)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := reads.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                free.put(item[0])
        finally:
            stop.set()
            thread.join()

    def _read(self, start: int, stop: int, array) -> np.ndarray:
        """Rows start..stop of ``array``, every value checked (see :meth:`_read_into`); an
        array already in memory is not copied."""
        if isinstance(array, np.ndarray):
            self._check_rows(array[start:stop], start, every_value=True)
            return array[start:stop]
        out = np.empty((stop - start, *array.shape[1:]), array.dtype)
        self._read_into(out, start, stop, array, every_value=True)
        return out

    def _read_into(
        self, out: np.ndarray, start: int, stop: int, array, every_value: bool = False
    ) -> None:
        """Decode rows start..stop into ``out``, refusing rows that were never written.

        The store's writer refuses non-finite values, so a NaN marks a missing chunk,
        whose every value is NaN: unless ``every_value``, only each row's first value is
        checked, which keeps the check out of the way of a streaming epoch.
        """
        try:
            if (direct := self._direct.get(id(array))) is not None:
                direct.read_into(out, start, stop)
            elif isinstance(array, zarr.Array):
                array.get_basic_selection(slice(start, stop), out=_as_nd_buffer(out))
            else:
                out[...] = np.asarray(array[start:stop])
        except Exception as err:  # noqa: BLE001 - a damaged chunk fails in codec-specific ways
            raise CacheError(
                f"{self.name}: rows {start}..{stop} cannot be read ({type(err).__name__}: {err}); "
                "the cache is damaged, write it again with `greedy-cli cache-features`"
            ) from err
        self._check_rows(out, start, every_value)

    def _check_rows(self, rows: np.ndarray, start: int, every_value: bool) -> None:
        for first in range(0, len(rows), 4096):
            block = rows[first : first + 4096].reshape(-1, int(np.prod(rows.shape[1:])))
            if not every_value:
                block = block[:, :1]
            bad = np.flatnonzero(~finite(block).all(axis=1))
            if len(bad):
                raise CacheError(
                    f"{self.name}: row {start + first + bad[0]} holds non-finite values (a chunk "
                    "is missing or damaged); write the cache again with `greedy-cli cache-features`"
                )


def _as_nd_buffer(out: np.ndarray):
    """``out`` as the buffer zarr decodes into, sharing its memory."""
    return default_buffer_prototype().nd_buffer.from_numpy_array(out)
