"""Whole-slide images as lazily read level-0 arrays, and the tissue mask that skips empty glass.

A slide (``.svs``, ``.ndpi``, ``.scn``, ``.bif``, pyramidal ``.tif``…) is far larger than memory, so
it is never decoded whole: :class:`LazyRGB` looks like an ``(H, W, 3)`` uint8 array to the tiled
prediction and the crop extractor, and each slice reads just that region of level 0 through
tiffslide (pure Python, on tifffile). ``.mrxs`` / ``.vms`` need OpenSlide, used through its wheel
(``openslide-python`` + ``openslide-bin``) when installed. Both are optional extras:
``pip install 'cytofuse[slides]'``.

Privacy: only the pyramid's image levels are read. The slide's label and macro images (which may
show a patient name or barcode) and its vendor metadata are never read into any output; only the
µm per pixel is taken from the properties.

Tissue mask: a thumbnail (about ``downsample`` level-0 px per thumbnail px) is split into glass
(bright and unstained) and tissue, and tissue is grown by ``margin`` level-0 px so cells at its edge
keep their context. Glass regions are returned as a constant colour without decoding them, and the
segmentation stage skips network tiles that are entirely constant (see ``fusion.tissue``), so empty
glass costs neither decoding nor network time. Coordinates everywhere are level-0 pixels.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .errors import CytoFuseError, DataError

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]

#: Formats that are only ever slides.
SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide", ".qptiff")
#: Formats that tiffslide cannot read: OpenSlide's wheel is needed.
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu")
#: TIFFs may be slides (pyramidal) or plain images; a pyramid or this many pixels makes a slide.
TIFF_SUFFIXES = (".tif", ".tiff")
SLIDE_SUFFIXES = SLIDE_ONLY_SUFFIXES + TIFF_SUFFIXES
EXTRA_HINT = "install the slide extra: pip install 'cytofuse[slides]'"
GLASS_FILL = 255


def _require_tiffslide() -> Any:
    try:
        import tiffslide
    except ImportError:
        raise CytoFuseError(f"reading whole slides needs tiffslide: {EXTRA_HINT}") from None
    return tiffslide


def is_pyramidal_tiff(path: PathLike) -> bool:
    """True for a TIFF with reduced-resolution levels (a slide), False for a plain one-level TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0] if tif.series else None
            return bool(series is not None and len(series.levels) > 1)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: let the plain reader report it
        return False


def is_slide(path: PathLike) -> bool:
    """Whether ``path`` is read as a whole slide (lazily) rather than decoded as a plain image."""
    suffix = Path(path).suffix.lower()
    if suffix in SLIDE_ONLY_SUFFIXES:
        return True
    return suffix in TIFF_SUFFIXES and is_pyramidal_tiff(path)


class Slide:
    """An open slide: level-0 size, µm per pixel, region reads and thumbnails (never label/macro images)."""

    def __init__(self, path: PathLike, backend: Optional[str] = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        suffix = self.path.suffix.lower()
        self.backend = backend or ("openslide" if suffix in OPENSLIDE_SUFFIXES else "tiffslide")
        try:
            if self.backend == "openslide":
                try:
                    import openslide
                except ImportError:
                    raise CytoFuseError(f"{self.path}: {suffix} slides need OpenSlide: pip install openslide-python "
                                        "openslide-bin") from None
                self._slide = openslide.OpenSlide(str(self.path))
            else:
                self._slide = _require_tiffslide().TiffSlide(str(self.path))
        except CytoFuseError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
            raise DataError(f"{self.path}: cannot open as a slide ({exc.__class__.__name__}: {exc})") from None
        self.width, self.height = (int(v) for v in self._slide.dimensions)
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]

    @property
    def mpp(self) -> Optional[float]:
        """µm per level-0 pixel from the slide's properties (mean of x and y), or None when unknown."""
        props = self._slide.properties
        values = []
        for key in ("x", "y"):
            for prefix in ("tiffslide", "openslide"):
                v = props.get(f"{prefix}.mpp-{key}")
                if v not in (None, ""):
                    try:
                        f = float(v)
                    except (TypeError, ValueError):
                        continue
                    if math.isfinite(f) and f > 0:
                        values.append(f)
                        break
        return float(np.mean(values)) if values else None

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level-0 pixels ``[y0:y1, x0:x1]`` as ``(h, w, 3)`` uint8 (alpha dropped; outside the slide: white)."""
        w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0:
            return np.zeros((max(h, 0), max(w, 0), 3), np.uint8)
        if self.backend == "tiffslide":
            arr = np.asarray(self._slide.read_region((x0, y0), 0, (w, h), as_array=True))
        else:
            arr = np.asarray(self._slide.read_region((x0, y0), 0, (w, h)))
        return _rgb(arr)

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The slide at about ``1/downsample`` of level 0, from the nearest finer pyramid level."""
        tw, th = max(1, math.ceil(self.width / downsample)), max(1, math.ceil(self.height / downsample))
        from PIL import Image

        level = int(self._slide.get_best_level_for_downsample(downsample))
        lw, lh = (int(v) for v in self._slide.level_dimensions[level])
        if self.backend == "tiffslide":
            arr = np.asarray(self._slide.read_region((0, 0), level, (lw, lh), as_array=True))
        else:
            arr = np.asarray(self._slide.read_region((0, 0), level, (lw, lh)))
        return np.asarray(Image.fromarray(_rgb(arr)).resize((tw, th), Image.BOX))

    def close(self) -> None:
        self._slide.close()


def _rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        raise DataError(f"slide pixels are {arr.dtype}, expected 8-bit RGB")
    return np.ascontiguousarray(arr[..., :3])


# ------------------------------------------------------------------------------------------ tissue


@dataclass
class TissueMask:
    """Tissue (True) or glass at ``downsample`` level-0 px per cell, grown by the margin already."""

    mask: np.ndarray
    downsample: int

    def window(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The level-0 pixel mask of a region (nearest-neighbour up-sampling of the thumbnail mask)."""
        d = self.downsample
        cy0, cy1 = y0 // d, -(-y1 // d)
        cx0, cx1 = x0 // d, -(-x1 // d)
        block = self.mask[cy0:cy1, cx0:cx1]
        full = np.repeat(np.repeat(block, d, axis=0), d, axis=1)
        return full[y0 - cy0 * d : y1 - cy0 * d, x0 - cx0 * d : x1 - cx0 * d]

    def any_in(self, x0: int, y0: int, x1: int, y1: int) -> bool:
        d = self.downsample
        return bool(self.mask[y0 // d : -(-y1 // d), x0 // d : -(-x1 // d)].any())

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_from_thumbnail(thumb: np.ndarray, downsample: int, margin: int = 96, max_grey: float = 235.0,
                          min_saturation: float = 0.08) -> TissueMask:
    """Glass is bright and unstained: tissue = darker than ``max_grey`` or more saturated than ``min_saturation``.

    The Pap stain colours every cell; clean glass is near-white and grey. Fixed thresholds (rather
    than Otsu) keep a slide that is all tissue from being split in two. Tissue is then grown by
    ``margin`` level-0 pixels.
    """
    from scipy import ndimage as ndi

    rgb = np.asarray(thumb, np.float32)
    grey = rgb.mean(axis=2)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
    tissue = (grey < max_grey) | (saturation > min_saturation)
    grow = int(math.ceil(margin / downsample))
    if grow > 0 and tissue.any():
        yy, xx = np.mgrid[-grow : grow + 1, -grow : grow + 1]
        tissue = ndi.binary_dilation(tissue, structure=(yy * yy + xx * xx) <= grow * grow)
    return TissueMask(tissue, int(downsample))


def thumbnail_of_array(image: np.ndarray, downsample: int) -> np.ndarray:
    """Box-filtered thumbnail of an in-memory image, read strip by strip (for plain images)."""
    from PIL import Image

    h, w = image.shape[:2]
    tw, th = max(1, math.ceil(w / downsample)), max(1, math.ceil(h / downsample))
    return np.asarray(Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., :3])).resize((tw, th), Image.BOX))


def thumbnail_downsample(width: int, height: int, max_side: int = 2048, at_least: int = 8) -> int:
    """An integer level-0 px per thumbnail px so the thumbnail's longer side is at most ``max_side``."""
    return max(int(at_least), int(math.ceil(max(width, height) / max_side)))


# ------------------------------------------------------------------------------------- lazy arrays


class LazyRGB:
    """A level-0 RGB image read region by region: ``shape``, ``dtype``, ``ndim`` and slicing as NumPy has.

    ``read(x0, y0, x1, y1)`` returns ``(y1 - y0, x1 - x0, 3)`` uint8. With a tissue mask, glass pixels
    read as :data:`GLASS_FILL` and fully-glass regions are not decoded at all. ``lazy_rgb`` tells
    the segmentation stage not to convert it with ``np.asarray`` (which would decode everything).
    """

    lazy_rgb = True
    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, read: Callable[[int, int, int, int], np.ndarray], width: int, height: int,
                 tissue: Optional[TissueMask] = None, name: str = "image") -> None:
        self._read = read
        self.shape = (int(height), int(width), 3)
        self.tissue = tissue
        self.name = name
        self.regions_read = 0
        self.regions_skipped = 0

    def __len__(self) -> int:
        return self.shape[0]

    def region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        h, w = self.shape[:2]
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        if self.tissue is not None and not self.tissue.any_in(x0, y0, x1, y1):
            self.regions_skipped += 1
            return np.full((y1 - y0, x1 - x0, 3), GLASS_FILL, np.uint8)
        self.regions_read += 1
        pixels = np.asarray(self._read(x0, y0, x1, y1))
        if self.tissue is not None:
            glass = ~self.tissue.window(x0, y0, x1, y1)
            if glass.any():
                pixels = pixels.copy() if not pixels.flags.writeable else pixels
                pixels[glass] = GLASS_FILL
        return pixels

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key) or len(key) > 3:
            raise IndexError("LazyRGB supports [rows], [rows, cols] and [rows, cols, channels] slices")
        rows = key[0]
        cols = key[1] if len(key) > 1 else slice(None)
        chans = key[2] if len(key) > 2 else slice(None)
        h, w = self.shape[:2]
        row_int, col_int = isinstance(rows, (int, np.integer)), isinstance(cols, (int, np.integer))
        if row_int or col_int:  # an integer index is a one-wide slice, then dropped
            r = slice(int(rows) % h, int(rows) % h + 1) if row_int else rows
            c = slice(int(cols) % w, int(cols) % w + 1) if col_int else cols
            return _squeeze(self[r, c, chans], row_int, col_int)
        if not isinstance(rows, slice) or not isinstance(cols, slice):
            raise IndexError("LazyRGB supports slices only (no fancy indexing)")
        y0, y1, sy = rows.indices(h)
        x0, x1, sx = cols.indices(w)
        if sy < 1 or sx < 1:
            raise IndexError("LazyRGB supports positive steps only")
        if sy == 1 and sx == 1:
            return self.region(x0, y0, x1, y1)[:, :, chans]
        # strided sample (e.g. a background-colour estimate): read only the rows asked for
        ys = range(y0, y1, sy)
        out = np.empty((len(ys), len(range(x0, x1, sx)), 3), np.uint8)
        for i, y in enumerate(ys):
            out[i] = self.region(x0, y, x1, y + 1)[0, ::sx]
        return out[:, :, chans]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Decoding a whole slide is refused: callers must read regions."""
        raise MemoryError(f"{self.name}: a whole slide is read region by region, not converted to one array")


def _squeeze(out: np.ndarray, row_int: bool, col_int: bool) -> np.ndarray:
    if row_int and col_int:
        return out[0, 0]
    if row_int:
        return out[0]
    if col_int:
        return out[:, 0]
    return out


def array_source(image: np.ndarray, tissue: Optional[TissueMask] = None, name: str = "image") -> LazyRGB:
    """An in-memory image behind the same interface (plain images with the tissue mask on)."""
    arr = np.asarray(image)
    return LazyRGB(lambda x0, y0, x1, y1: arr[y0:y1, x0:x1, :3], arr.shape[1], arr.shape[0], tissue, name)


def slide_source(slide: Slide, tissue: Optional[TissueMask] = None) -> LazyRGB:
    return LazyRGB(slide.read, slide.width, slide.height, tissue, slide.path.name)
