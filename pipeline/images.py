"""Reading one image file strictly, and converting it to 8-bit RGB in one documented way.

A file's format is what its bytes say, whatever its name. The decoder is Pillow's, with its
defaults: a file whose decode fails or stops short of the size its header declares is bad.
No library-wide decoder setting is changed here.

Conversion to RGB, by the mode Pillow reports:

- ``RGB``: kept as it is.
- ``L`` (grey) and ``1`` (bilevel): the grey value is copied to all three channels.
- ``I;16``, ``I;16B``, ``I;16L`` and ``I`` (16-bit grey): scaled to 8 bits as
  ``round(v * 255 / 65535)``, clipped to 0..255, then copied to three channels.
- ``P`` (palette): each index replaced by its palette colour.
- ``RGBA``, ``LA``, ``PA`` and other modes with alpha: the alpha channel is dropped and the
  colour kept as stored, as torchvision's ImageFolder loader does.
- ``CMYK``, ``YCbCr`` and any other mode: Pillow's own conversion to RGB (no colour profile).

EXIF orientation is not applied (as in torchvision's ImageFolder).
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
SUFFIX_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
}


class BadImage(Exception):
    """A file that is not a whole, decodable image; the message says why."""


@dataclass(frozen=True)
class ImageReport:
    """What a strict read found in one file."""

    mode: str  # the mode Pillow decoded, before conversion to RGB
    format: str  # the format its bytes say, e.g. JPEG, PNG
    width: int
    height: int
    nbytes: int  # the file's size

    def named_as(self, path: Path) -> bool:
        """Whether the file's name suffix agrees with its real format."""
        return SUFFIX_FORMATS.get(path.suffix.lower()) in (None, self.format)


def read_rgb(path: Path) -> tuple[np.ndarray, ImageReport]:
    """Decode ``path`` fully and strictly; return (H, W, 3) uint8 RGB pixels and a report."""
    from PIL import Image, UnidentifiedImageError

    data = Path(path).read_bytes()
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            declared = img.size
            img.load()
            if img.size != declared:
                raise BadImage(f"decoded {img.size}, its header declares {declared}")
            report = ImageReport(img.mode, img.format or "?", *declared, len(data))
            rgb = to_rgb(img)
    except UnidentifiedImageError:
        raise BadImage(f"not an image Pillow can read (starts with {data[:8]!r})") from None
    except (OSError, ValueError, SyntaxError) as err:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated").
        raise BadImage(f"{err}") from None
    if rgb.shape != (declared[1], declared[0], 3):
        raise BadImage(f"decoded to {rgb.shape}, expected {(declared[1], declared[0], 3)}")
    return rgb, report


def read_header(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def to_rgb(img) -> np.ndarray:
    """The documented conversion of a loaded Pillow image to (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("L", "1"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.int64)
        grey = np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
