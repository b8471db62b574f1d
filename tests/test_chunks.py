"""The direct chunk reader reads what zarr reads, and refuses what zarr would misread."""

import numcodecs
import numpy as np
import pytest
import zarr

from pipeline.cache import _compressors
from pipeline.chunks import LocalChunks, _zstd_content_size
from pipeline.errors import CacheError
from pipeline.loaders import FeatureLoader


def _array(path, codec: str, dtype: str, n: int = 1000, chunk: int = 64, write: bool = True):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n, 3, 2, 2)).astype(np.float32)
    values = values.astype(dtype) if dtype != "uint16" else values.view(np.uint32).astype(np.uint16)
    array = zarr.create_array(
        str(path),
        shape=values.shape,
        chunks=(chunk, 3, 2, 2),
        dtype=dtype,
        compressors=_compressors(codec),  # at the codec's default level
        fill_value=0x7FC0 if dtype == "uint16" else float("nan"),
    )
    if write:
        array[:] = values
    return array, values


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("dtype", ["float16", "uint16", "float32"])
def test_direct_reads_are_zarrs_bytes(tmp_path, codec, dtype):
    array, values = _array(tmp_path / "f.zarr", codec, dtype)
    direct = LocalChunks.of(array)
    assert direct is not None
    # Whole chunks, parts of chunks, and the partial chunk at the end.
    for start, stop in [(0, 64), (64, 256), (10, 20), (30, 700), (960, 1000), (0, 1000)]:
        out = np.empty((stop - start, 3, 2, 2), array.dtype)
        direct.read_into(out, start, stop)
        assert out.tobytes() == values[start:stop].tobytes()


def test_a_missing_chunk_reads_as_the_fill_value(tmp_path):
    array, values = _array(tmp_path / "f.zarr", "zstd", "float16")
    (tmp_path / "f.zarr" / "c" / "2" / "0" / "0" / "0").unlink()
    out = np.empty((256, 3, 2, 2), np.float16)
    LocalChunks.of(array).read_into(out, 0, 256)
    assert np.isnan(out[128:192]).all()
    assert out[:128].tobytes() == values[:128].tobytes()


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_a_truncated_chunk_is_named(tmp_path, codec):
    array, _ = _array(tmp_path / "f.zarr", codec, "float16")
    path = tmp_path / "f.zarr" / "c" / "3" / "0" / "0" / "0"
    path.write_bytes(path.read_bytes()[:-7])
    labels = np.zeros(1000, np.int64)
    loader = FeatureLoader(array, labels, 64, shuffle=True, memory_budget=0)
    with pytest.raises(CacheError, match=r"cannot be read .*(chunk c/3/0/0/0|decompression)"):
        for _ in loader.epoch(0):
            pass


def test_zarr_reads_every_other_store(tmp_path):
    values = np.ones((100, 3), np.float16)
    in_memory = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(100, 3), chunks=(10, 3), dtype="f2"
    )
    in_memory[:] = values
    assert LocalChunks.of(in_memory) is None
    assert LocalChunks.of(values) is None
    split = zarr.create_array(str(tmp_path / "s.zarr"), shape=(100, 4), chunks=(10, 2), dtype="f2")
    assert LocalChunks.of(split) is None  # chunks that split a row


@pytest.mark.parametrize("nbytes", [0, 1, 255, 256, 300, 65791, 65792, 1 << 20])
def test_zstd_header_gives_the_content_size(nbytes):
    frame = numcodecs.Zstd(level=1).encode(np.zeros(nbytes, np.uint8))
    assert _zstd_content_size(bytes(frame)) == nbytes
    assert _zstd_content_size(b"not a zstd frame") is None


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("dtype", ["float16", "uint16", "float32"])
def test_direct_writes_are_zarrs_bytes(tmp_path, codec, dtype):
    by_zarr, values = _array(tmp_path / "zarr.zarr", codec, dtype, n=192)
    direct, _ = _array(tmp_path / "direct.zarr", codec, dtype, n=192, write=False)
    writer = LocalChunks.of(direct)
    for index in range(3):
        written = writer.write(index, values[index * 64 : (index + 1) * 64])
        key = f"c/{index}/0/0/0"
        assert written == (tmp_path / "zarr.zarr" / key).read_bytes()
        assert (tmp_path / "direct.zarr" / key).read_bytes() == written
    assert writer.write(0, values[:10]) is None  # a partial chunk is zarr's to pad


def test_buffers_and_rows_of_another_dtype_or_shape_are_refused(tmp_path):
    array, values = _array(tmp_path / "f.zarr", "lz4", "float16")
    chunks = LocalChunks.of(array)
    with pytest.raises(ValueError, match="cannot take rows 0..64"):
        chunks.read_into(np.empty((64, 3, 2, 2), np.float32), 0, 64)
    with pytest.raises(ValueError, match="cannot be written"):
        chunks.write(0, values[:64].astype(np.float32))
    with pytest.raises(ValueError, match="cannot be written"):
        chunks.write(0, values[:64].reshape(64, 3, 4))
