"""``labels/<image_id>.tif``: the instance label image, as Cellpose (``_masks.tif``) and StarDist write.

One uint32 plane the size of the image (level 0): 0 is background, ``k`` the pixels of the k-th
cell, numbered as the ``label_id`` column of the run's tables. Written with tifffile, zlib-compressed
and tiled (512 px) so a whole slide's plane opens in QuPath, napari or Fiji without loading it
whole, and written from row strips so a memmap plane is never read into memory at once. The file
carries no metadata copied from the input (no description, resolution or software of the source).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Union

import numpy as np

from cytocore.atomic import atomic_path

PathLike = Union[str, Path]
TILE = 512


def _tiles(labels: np.ndarray) -> Iterator[np.ndarray]:
    """Row-major 512×512 tiles (edge tiles zero-padded, as TIFF tiles are), one strip read at a time."""
    h, w = labels.shape
    for y in range(0, h, TILE):
        strip = np.asarray(labels[y : y + TILE], np.uint32)
        for x in range(0, w, TILE):
            tile = np.zeros((TILE, TILE), np.uint32)
            part = strip[:, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def write_label_image(path: PathLike, labels: np.ndarray) -> None:
    """Write an H×W instance label plane (any integer dtype, array or memmap) as a uint32 TIFF, atomically."""
    import tifffile

    labels = labels if hasattr(labels, "shape") else np.asarray(labels)
    if len(labels.shape) != 2:
        raise ValueError(f"a label image is one H×W plane, got shape {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"a label image holds integers, got {labels.dtype}")
    h, w = (int(v) for v in labels.shape)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=h * w * 4 > 2**31) as tif:
            tif.write(_tiles(labels), shape=(h, w), dtype=np.uint32, tile=(TILE, TILE), compression="zlib",
                      photometric="minisblack", metadata=None, software=False)


def read_label_image(path: PathLike) -> np.ndarray:
    """Read a label image back (tests and users' scripts)."""
    import tifffile

    return tifffile.imread(path)
