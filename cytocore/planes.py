"""Image-sized planes on disk: memory bounded by the strip or block being worked on, not the image.

A 20000×20000 field's probability plane is 400 MB as uint8 and its label plane 1.6 GB as uint32.
:func:`disk_plane` keeps such a plane in a memory-mapped temporary file instead: the file is
unlinked as soon as it is mapped, so it is cleaned up when the array goes away (or the process
dies) and never outlives the run. Pages of a mapping that have been touched stay resident (and
count in the process's RSS) until they are dropped, so code that walks a plane strip by strip or
block by block calls :func:`release` after each one: the data stays in the file, the memory is
given back.

Small images do not need any of this: :func:`plane` returns an ordinary zeroed array below
``min_pixels`` and a disk plane above it.
"""
from __future__ import annotations

import mmap
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

#: Planes with more pixels than this go to disk (about a 4096×4096 image).
DISK_MIN_PIXELS = 16_000_000
#: Folder of the temporary plane files (default: the system's temporary folder).
TMPDIR_ENV = "CYTOFUSE_TMPDIR"


def disk_plane(shape: Sequence[int], dtype: Any) -> np.memmap:
    """A zero-filled array of ``shape`` and ``dtype`` in an already-unlinked temporary file.

    The file is sparse until written, so a plane that stays mostly zero (a label plane) costs little
    disk either. ``CYTOFUSE_TMPDIR`` chooses the folder (it should not be a RAM disk).
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    folder = os.environ.get(TMPDIR_ENV) or None
    fd, name = tempfile.mkstemp(prefix="cytofuse-plane-", suffix=".raw", dir=folder)
    try:
        size = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        os.ftruncate(fd, size)
        with os.fdopen(fd, "r+b", closefd=False) as fh:
            arr = np.memmap(fh, dtype=dtype, mode="r+", shape=shape)
    finally:
        os.close(fd)
        try:
            os.unlink(name)  # the mapping keeps the data; the name is gone (POSIX)
        except OSError:  # pragma: no cover - Windows cannot unlink an open file
            import atexit

            atexit.register(lambda: os.path.exists(name) and os.unlink(name))
    return arr


def plane(shape: Sequence[int], dtype: Any, min_pixels: Optional[int] = DISK_MIN_PIXELS) -> np.ndarray:
    """Zeros of ``shape``: in memory up to ``min_pixels`` pixels (the last two axes), on disk above."""
    pixels = int(shape[-2]) * int(shape[-1])
    if min_pixels is None or pixels <= int(min_pixels):
        return np.zeros(tuple(int(s) for s in shape), dtype)
    return disk_plane(shape, dtype)


def _mapping(arr: Any) -> Optional[mmap.mmap]:
    """The ``mmap`` behind a memmap or a view of one, else None."""
    seen = 0
    while arr is not None and seen < 16:
        if isinstance(arr, mmap.mmap):
            return arr
        m = getattr(arr, "_mmap", None)
        if isinstance(m, mmap.mmap):
            return m
        arr = getattr(arr, "base", None)
        seen += 1
    return None


def release(*arrays: Any) -> None:
    """Give back the memory of the touched pages of disk planes (no-op for ordinary arrays).

    On Linux, dropping the pages of a shared file mapping keeps what was written (it stays in the
    page cache or the file; a later read maps it back in), so nothing is flushed synchronously.
    Elsewhere ``MADV_DONTNEED`` may not keep shared data, and this does nothing.
    """
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    for arr in arrays:
        m = _mapping(arr)
        if m is not None and not m.closed:
            m.madvise(mmap.MADV_DONTNEED)


def is_disk_plane(arr: Any) -> bool:
    return _mapping(arr) is not None
