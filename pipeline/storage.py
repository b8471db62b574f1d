"""Storage dtypes of feature caches: how float32 features are stored and read back.

float16 and float32 are stored as themselves. bfloat16 has no zarr data type, so its
values are stored as their 16 bits in a uint16 array, and the store's manifest names the
dtype; a uint16 feature array always holds bfloat16 bits. bfloat16 keeps float32's range
(no overflow where float16 tops out at 65504) with 8 bits of precision against float16's
11.
"""

import numpy as np
import torch

from pipeline.defaults import STORAGE_DTYPES  # noqa: F401 - re-exported

_ARRAY_DTYPE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
_BF16_NAN = 0x7FC0
_BF16_EXPONENT = 0x7F80  # all ones: an infinity or a NaN


def array_dtype(name: str) -> np.dtype:
    """The zarr array's dtype for a storage dtype."""
    return np.dtype(_ARRAY_DTYPE[name])


def itemsize(name: str) -> int:
    return array_dtype(name).itemsize


def fill_value(name: str):
    """The value a chunk never written reads as: a NaN, which the writer never stores."""
    return _BF16_NAN if name == "bfloat16" else float("nan")


def encode(x: torch.Tensor, name: str) -> np.ndarray:
    """A float32 tensor cast to the storage dtype, as the array to store."""
    if name == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).numpy()
    with np.errstate(over="ignore"):  # an overflow is caught by finite_rows afterwards
        return x.numpy().astype(_ARRAY_DTYPE[name])


def to_tensor(stored: np.ndarray) -> torch.Tensor:
    """Stored features as a float32 tensor."""
    if stored.dtype == np.uint16:
        return torch.from_numpy(stored).view(torch.bfloat16).float()
    return torch.from_numpy(stored).float()


def to_numpy(stored: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Stored features as a float32 (or ``dtype``) array."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    return stored.astype(dtype)


def finite(stored: np.ndarray) -> np.ndarray:
    """Elementwise: the stored value is finite."""
    if stored.dtype == np.uint16:
        return (stored & _BF16_EXPONENT) != _BF16_EXPONENT
    return np.isfinite(stored)


def rounding_step(exact: np.ndarray, name: str) -> np.ndarray:
    """One step of the storage dtype at the magnitude of each exact value."""
    if name == "float16":
        return np.maximum(np.abs(exact) * 2.0**-10, 2.0**-24)
    if name == "bfloat16":
        return np.maximum(np.abs(exact) * 2.0**-7, 2.0**-133)
    return np.abs(exact) * 2.0**-23
