"""Reading an import's source files (PNG/JPEG, 8- or 16-bit, and .npy): their raw values, and their
size and bit depth from the header alone; each failure a one-line error naming the file.

Apart from the checks and the writing (`components.data.importing`), which read through it, as
`taskatlas predict` and `position` do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.data.shards import ShardError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIX = ".npy"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_LAYOUTS = "(H, W), (H, W, C) or (C, H, W) with C below H and W"  # what an .npy file may hold


def read_raw(path: Path) -> np.ndarray:
    """A PNG/JPEG (8- or 16-bit) or .npy file (`NPY_LAYOUTS`) -> (H, W, C) array of its raw values."""
    try:
        if path.suffix.lower() == ARRAY_SUFFIX:
            raw = np.load(path, allow_pickle=False)
            if _channel_first(raw.shape):
                raw = raw.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        else:
            with Image.open(path) as img:
                raw = np.asarray(img)
    except Image.DecompressionBombError as err:
        raise ShardError(f"{path}: refused, a possible decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ShardError(f"{path}: cannot read ({err})") from None
    if raw.ndim == 2:
        raw = raw[..., None]
    if raw.ndim != 3 or not raw.size:
        want = NPY_LAYOUTS if path.suffix.lower() == ARRAY_SUFFIX else "(H, W) or (H, W, C)"
        raise ShardError(f"{path}: expected an image of shape {want}, got shape {raw.shape}")
    return raw


def _channel_first(shape: tuple[int, ...]) -> bool:
    """An array (C, H, W) with fewer channels than rows and columns: no (H, W, C) image has more
    channels than rows, so the layout is not ambiguous."""
    return len(shape) == 3 and shape[0] < min(shape[1], shape[2])


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding its pixels."""
    try:
        if path.suffix.lower() == ARRAY_SUFFIX:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return tuple(shape[1:] if _channel_first(shape) else shape[:2])
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Image.DecompressionBombError as err:
        raise ShardError(f"{path}: refused, a possible decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ShardError(f"{path}: cannot read ({err})") from None


def sample_bits(path: Path) -> int | None:
    """Bits per sample from the file's header: a PNG's IHDR bit depth, an integer .npy's item
    size, 8 for JPEG; None for float arrays (no encoding to get wrong)."""
    try:
        if path.suffix.lower() == ARRAY_SUFFIX:
            dtype = np.load(path, mmap_mode="r", allow_pickle=False).dtype
            return dtype.itemsize * 8 if dtype.kind in "ui" else None
        with path.open("rb") as f:
            head = f.read(25)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: cannot read ({err})") from None
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) == 25:
        return head[24]
    return 8  # JPEG (and anything else PIL decodes to 8-bit)
