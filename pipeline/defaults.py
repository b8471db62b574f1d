"""Storage formats of the feature cache and their defaults, importable without torch or zarr
(the command line reads them to build its options).

The defaults were chosen by measurement (docs/performance.md, storage; docs/cache.md,
codecs): bfloat16 is the cheapest dtype whose ``fmnist`` accuracy is within the seed
spread of float32's, and lz4 (Blosc, no shuffle) at level 9 decodes four times as fast
as zstd 1 and encodes twice as fast, for about 30% more bytes on ``fmnist``'s features.
"""

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_DTYPE = "bfloat16"
CODECS = ("zstd", "lz4", "none")
DEFAULT_CODEC = "lz4"
CODEC_LEVELS = {"zstd": 1, "lz4": 9, "none": 0}
CODEC_LEVEL_RANGES = {"zstd": (1, 22), "lz4": (0, 9), "none": (0, 0)}
