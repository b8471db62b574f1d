"""Whole chunks of a feature array on a local disk, read without zarr's request machinery.

zarr answers a selection by running coroutines on its own event loop thread, which costs
about as much interpreter time per chunk as the decoding itself. The streaming reader
asks for one whole chunk at a time from a thread that shares the cores with training, so
for the layouts the cache writes (little-endian bytes, then zstd, Blosc or nothing) on a
local store it reads the chunk file and decodes it straight into the caller's buffer.
Reading the file and decoding release the interpreter lock; zarr stays the reader for
every other store and layout, and the bytes are the same either way.
"""

import os
import struct
import sys
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
from zarr.storage import LocalStore

_ZSTD_MAGIC = 0xFD2FB528


class LocalChunks:
    """The chunk files of one zarr v3 array on a local store, decoded into given buffers."""

    def __init__(self, root: Path, array: zarr.Array, codec):
        self.root = root
        self.array = array
        self.codec = codec  # a numcodecs codec, or None for uncompressed chunks
        self.chunk = array.chunks[0]
        self.row_shape = tuple(array.shape[1:])
        self.dtype = array.dtype
        self.chunk_bytes = self.chunk * int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.fill = np.asarray(array.fill_value, self.dtype)

    @classmethod
    def of(cls, array) -> "LocalChunks | None":
        """The direct reader of ``array``, or None where zarr must read it."""
        if not isinstance(array, zarr.Array) or array.metadata.zarr_format != 3:
            return None
        store = array.store_path.store
        if not isinstance(store, LocalStore) or sys.byteorder != "little":
            return None
        if array.chunks[1:] != array.shape[1:]:  # chunks split only the sample axis
            return None
        codecs = list(array.metadata.codecs)
        if not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
            return None
        if codecs[0].endian is not None and codecs[0].endian.value != "little":
            return None
        codec = None
        if len(codecs) == 2:
            if isinstance(codecs[1], ZstdCodec):
                codec = numcodecs.Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
            elif isinstance(codecs[1], BloscCodec):
                codec = _blosc_of(codecs[1], array.dtype.itemsize)
                if codec is None:
                    return None
            else:
                return None
        return cls(Path(store.root) / array.store_path.path, array, codec)

    def read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Rows start..stop into ``out``; a chunk never written reads as the fill value."""
        if out.dtype != self.dtype or out.shape != (stop - start, *self.row_shape):
            raise ValueError(
                f"a buffer of {out.dtype} {out.shape} cannot take rows {start}..{stop} of "
                f"{self.dtype} {self.row_shape}"
            )
        for index in range(start // self.chunk, -(-stop // self.chunk)):
            first = index * self.chunk
            lo, hi = max(start, first), min(stop, first + self.chunk)
            target = out[lo - start : hi - start]
            whole = lo == first and hi - lo == self.chunk and target.flags.c_contiguous
            if whole:
                self._decode(index, target)
            else:  # a chunk read in part: decoded whole, then copied from
                scratch = np.empty((self.chunk, *self.row_shape), self.dtype)
                self._decode(index, scratch)
                target[...] = scratch[lo - first : hi - first]

    def _decode(self, index: int, out: np.ndarray) -> None:
        key = self._key(index)
        flat = out.reshape(-1).view(np.uint8)
        try:
            with open(self.root / key, "rb") as file:
                if self.codec is None:
                    self._check_size(key, os.fstat(file.fileno()).st_size)
                    file.readinto(flat)
                    return
                data = file.read()
        except FileNotFoundError:
            out[...] = self.fill
            return
        if isinstance(self.codec, numcodecs.Blosc) and _blosc_compressed_size(data) != len(data):
            # Blosc trusts its header and would read past the end of a truncated chunk.
            raise ValueError(f"chunk {key} is truncated: {len(data)} bytes")
        size = _decoded_size(data, self.codec)
        if size is None:  # no size in the header: decode, then compare
            decoded = np.frombuffer(self.codec.decode(data), np.uint8)
            self._check_size(key, decoded.size)
            flat[...] = decoded
            return
        self._check_size(key, size)
        self.codec.decode(data, out=flat)

    def write(self, index: int, values: np.ndarray) -> bytes | None:
        """Encode a whole chunk's rows and write its file; return the bytes written, or
        None for a partial chunk, which zarr pads and writes itself.

        The bytes are those zarr writes for the same rows (a test compares them), without
        its event loop and with the encoding outside the interpreter lock.
        """
        if values.dtype != self.dtype or values.shape[1:] != self.row_shape:
            raise ValueError(
                f"rows of {values.dtype} {values.shape[1:]} cannot be written to an array of "
                f"{self.dtype} {self.row_shape}"
            )
        if len(values) != self.chunk or not values.flags.c_contiguous:
            return None
        key = self._key(index)
        flat = values.reshape(-1)
        data = bytes(flat.view(np.uint8)) if self.codec is None else bytes(self.codec.encode(flat))
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def _key(self, index: int) -> str:
        return self.array.metadata.encode_chunk_key((index,) + (0,) * len(self.row_shape))

    def _check_size(self, key: str, size: int) -> None:
        if size != self.chunk_bytes:
            raise ValueError(
                f"chunk {key} holds {size} bytes, not the {self.chunk_bytes} of a chunk"
            )


def _blosc_of(codec: BloscCodec, itemsize: int):
    """numcodecs' Blosc with the settings of zarr's codec (decoding reads them from each
    chunk's header; encoding needs them)."""
    typesize = codec.typesize or itemsize
    if typesize != itemsize:
        return None
    return numcodecs.Blosc(
        cname=codec.cname.value,
        clevel=codec.clevel,
        shuffle=getattr(numcodecs.Blosc, codec.shuffle.value.upper()),
        blocksize=codec.blocksize,
    )


def _decoded_size(data: bytes, codec) -> int | None:
    """The decoded size that a compressed chunk's header announces, or None."""
    if isinstance(codec, numcodecs.Blosc):
        return struct.unpack_from("<I", data, 4)[0] if len(data) >= 16 else None
    return _zstd_content_size(data)


def _blosc_compressed_size(data: bytes) -> int | None:
    return struct.unpack_from("<I", data, 12)[0] if len(data) >= 16 else None


def _zstd_content_size(data: bytes) -> int | None:
    """The content size field of a zstd frame header (RFC 8878, 3.1.1.1)."""
    if len(data) < 6 or struct.unpack_from("<I", data)[0] != _ZSTD_MAGIC:
        return None
    descriptor = data[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(data) < offset + width:
        return None
    value = int.from_bytes(data[offset : offset + width], "little")
    return value + 256 if width == 2 else value
