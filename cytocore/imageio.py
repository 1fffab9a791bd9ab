"""Image reading and writing: every supported file becomes an RGB uint8 array.

Users bring bmp/png/jpg/tif from many scanners: grayscale, RGBA, palette and 16-bit images are all
normalised here so no stage has to care. The organisers fed BGR arrays from cv2, so a channel order
option exists; and a pixel limit guards against decompression bombs (a 20000×20000 slide region is
fine, a crafted 10-gigapixel PNG is not) unless the caller raises it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from .atomic import atomic_path
from .errors import DataError

PathLike = Union[str, Path]

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Default pixel limit: 25 000 × 25 000. Raise it with ``max_pixels=`` (or ``--max-pixels``).
DEFAULT_MAX_PIXELS = 25_000 * 25_000


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
        return np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def image_size(path: PathLike) -> tuple[int, int]:
    """``(width, height)`` read from the header only, without decoding pixels."""
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None


def check_decodes(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> None:
    """Decode every byte of an image file, or raise :class:`DataError` naming it (truncated, corrupt).

    The header alone (what :func:`image_size` reads) says nothing about a copy cut short, which only
    fails when the pixels are read -- in the middle of a training run. JPEGs are decoded at 1/8 scale:
    libjpeg still reads the whole entropy-coded stream, so truncation shows, at a fraction of the cost.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(f"{path}: image is {im.width}x{im.height} = {im.width * im.height} pixels, above the "
                                f"limit of {max_pixels} (raise max_pixels / --max-pixels if this is intended)")
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None


def read_image(path: PathLike, channel_order: str = "RGB", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read any supported image as ``(H, W, 3)`` uint8 in ``channel_order`` ("RGB" or "BGR")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(
                    f"{path}: image is {im.width}x{im.height} = {im.width * im.height} pixels, above the "
                    f"limit of {max_pixels} (raise max_pixels / --max-pixels if this is intended)"
                )
            arr = _decode(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None
    if channel_order.upper() == "BGR":
        arr = arr[..., ::-1]
    elif channel_order.upper() != "RGB":
        raise ValueError(f"channel_order must be RGB or BGR, not {channel_order!r}")
    return np.ascontiguousarray(arr)


def _decode(im: Image.Image) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im.load()
    if im.mode in ("RGB",):
        return np.asarray(im, dtype=np.uint8)
    if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1", "L"):
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            # Composite on white: transparent slide regions are background, not black.
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    # 16-bit and float modes (I;16, I, F): scale to 8 bits ourselves, PIL would clip.
    arr = _to_uint8(np.asarray(im))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr[..., :3]


def read_mask(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask PNG as a 2-D uint8 array (values as stored; callers test ``> 0``)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(f"{path}: mask is {im.width}x{im.height}, above the pixel limit {max_pixels}")
            if im.mode == "P":
                im = im.convert("L")
            arr = np.asarray(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read mask ({exc.__class__.__name__}: {exc})") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return _to_uint8(arr) if arr.dtype != np.uint8 else arr


def write_png(path: PathLike, arr: np.ndarray) -> None:
    """Write a uint8 array (H×W or H×W×3/4) as PNG, atomically."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def probability_to_uint8(prob: np.ndarray) -> np.ndarray:
    """Map a [0, 1] probability map to 0..255 (the saliency PNG the evaluator reads)."""
    return np.clip(np.asarray(prob, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
