"""The one folder runner: images in, one writer's files out; resumable, atomic, never stale.

Every command that runs models over a folder (``cytofuse infer``, the single-stage baseline's
inference, ``cytofuse seg predict``) hands :func:`run_images` three things:

* the images, as an iterable of :class:`ImageSource` (:func:`folder_sources` lists a folder; a
  shard of it or whole-slide regions are other iterables of the same thing);
* ``process(image, source)``: what to compute for one image (detections, segmentation...);
* a :class:`RunWriter`, which owns the run folder's layout: it writes one image's files, names
  them (so stale ones can be removed) and rebuilds the combined outputs from the finished images.

What the runner guarantees, whatever the writer:

* **Resume with a fingerprint.** A finished image's last file is its record ``parts/<id>.json``,
  holding the fingerprint of the models and settings that produced it. A later run reuses the image
  only if that fingerprint is its own and the writer's files are all there; anything else is redone.
* **Nothing stale.** Before an image is (re)computed, and when it fails, its record and every
  per-image file the writer names are deleted: no file of an older model survives next to a newer
  table, and a failed image has no files at all.
* **Partial failure is a result.** An image that cannot be read or processed is reported in one
  warning line and listed in :attr:`RunReport.failed`; the others still finish, and the CLI exits
  with status 3 (:data:`EXIT_SOME_FAILED`).
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from .atomic import write_json
from .errors import CytoFuseError, DataError
from .imageio import DEFAULT_MAX_PIXELS, list_images, probability_to_uint8, read_image, write_png
from .planes import release
from .prefetch import prefetch

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]

#: Per-image records (``<id>.json``, written last) and whatever else a writer keeps per image.
PARTS_DIR = "parts"
#: The probability map of each image, 8-bit, same size as the image.
SALIENCY_DIR = "saliency"

#: Exit status of a run in which some inputs failed but the others finished (0: all done,
#: 2: usage or configuration error, 1: anything unexpected).
EXIT_SOME_FAILED = 3

#: Read the next image and write the previous one's files while the networks work on this one.
#: On by default: 3.70 -> 3.25 s per 2048x2048 image (1.14x) on 2 idle cores with ONNX Runtime
#: (``python -m experiments.benchmarks.folder_overlap --images 3 --rounds 1``).
OVERLAP = True

#: Errors that fail one image, not the run. Anything else is a bug and stops the run.
IMAGE_ERRORS = (CytoFuseError, MemoryError, ValueError, RuntimeError, OSError)


@dataclass(frozen=True)
class ImageSource:
    """One input image: its id (file stem), where it is, and how it is read."""

    image_id: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def read(self, channel_order: str = "RGB", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return read_image(self.path, channel_order=channel_order, max_pixels=max_pixels)


def folder_sources(images_dir: PathLike, lister: Callable[[PathLike], list[Path]] = list_images
                   ) -> tuple[list[ImageSource], list[dict]]:
    """The images of a folder in name order, and the files left out (a second file with the same id).

    ``lister`` lists the inputs (``fusion.inputs.list_inputs`` adds whole slides). An empty folder is
    a usage error (:class:`DataError`), not an empty run.
    """
    paths = lister(images_dir)
    if not paths:
        raise DataError(f"{images_dir}: no images (.bmp, .png, .jpg, .tif) in this folder")
    sources: dict[str, ImageSource] = {}
    failed: list[dict] = []
    for path in paths:
        if path.stem in sources:
            message = f"image id {path.stem!r} is already used by {sources[path.stem].name}; rename one of them"
            failed.append({"image": str(path), "error": message})
            log.warning("skipped %s: %s", path.name, message)
            continue
        sources[path.stem] = ImageSource(path.stem, path)
    return list(sources.values()), failed


class RunWriter(Protocol):
    """The layout of one kind of run folder (see ``fusion.outputs`` and ``segmentation.outputs``)."""

    out: Path

    def image_files(self, image_id: str) -> list[Path]:
        """Every per-image file this layout writes for ``image_id`` (whether or not it exists)."""
        ...

    def required_files(self, image_id: str) -> list[Path]:
        """The per-image files a finished image must have (others may be switched off by the config)."""
        ...

    def write_image(self, source: ImageSource, image: np.ndarray, result: Any) -> dict:
        """Write one image's files; return its record (JSON-able), which the runner writes last."""
        ...

    def write_combined(self, records: Mapping[str, dict]) -> Any:
        """Rebuild the combined outputs from the finished images' records (in run order)."""
        ...


@dataclass
class RunReport:
    """What one run did: the finished images' records in input order, the failures, the time taken."""

    n_images: int
    records: dict[str, dict]
    failed: list[dict]
    n_skipped: int
    combined: Any = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_done(self) -> int:
        return len(self.records)

    @property
    def n_processed_now(self) -> int:
        return self.n_done - self.n_skipped

    @property
    def exit_code(self) -> int:
        """0 when every input finished, :data:`EXIT_SOME_FAILED` when any failed."""
        return EXIT_SOME_FAILED if self.failed else 0

    def summary(self) -> dict:
        """The counts every command's ``run.json`` starts with."""
        return {
            "n_images": self.n_images,
            "n_done": self.n_done,
            "n_processed_now": self.n_processed_now,
            "n_skipped_already_done": self.n_skipped,
            "n_failed": len(self.failed),
            "failed": list(self.failed),
        }


def record_path(out: Path, image_id: str) -> Path:
    return Path(out) / PARTS_DIR / f"{image_id}.json"


def read_record(out: Path, image_id: str) -> Optional[dict]:
    """A finished image's record, or None (missing or unreadable: the image is redone)."""
    path = record_path(out, image_id)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return record if isinstance(record, dict) else None


def remove_image_files(writer: RunWriter, image_id: str) -> None:
    """Delete an image's record first (so it no longer counts as done), then its other files."""
    for path in [record_path(writer.out, image_id), *writer.image_files(image_id)]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def finished_record(writer: RunWriter, image_id: str, fingerprint: str) -> Optional[dict]:
    """The record of an image finished by the same models and settings, with all its files; else None."""
    record = read_record(writer.out, image_id)
    if record is None or record.get("fingerprint") != fingerprint:
        return None
    if not all(p.is_file() for p in writer.required_files(image_id)):
        return None
    return record


def run_images(
    sources: Iterable[ImageSource],
    process: Callable[[np.ndarray, ImageSource], Any],
    writer: RunWriter,
    fingerprint: str,
    *,
    read: Callable[[ImageSource], np.ndarray] = ImageSource.read,
    failed: Sequence[dict] = (),
    progress: bool = True,
    desc: str = "images",
    overlap: Optional[bool] = None,
) -> RunReport:
    """Run ``process`` on every image not already finished with ``fingerprint``; write through ``writer``.

    ``failed`` are inputs already left out by the caller (e.g. duplicate ids), reported with the rest.
    Ctrl-C stops between files: finished images keep their records and the next run continues.

    With ``overlap`` (default: the module's :data:`OVERLAP`) the three steps of consecutive images run at the same time: the next image is
    read on one background thread and the previous image's files are written on another while
    ``process`` (the networks, which release the GIL) works on this one. Results, records and
    failures are the same as without it; at most three images are in memory.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    overlap = OVERLAP if overlap is None else bool(overlap)
    started = time.time()
    sources = list(sources)
    records: dict[str, Optional[dict]] = {}
    failures = list(failed)
    todo: list[ImageSource] = []
    for source in sources:
        record = finished_record(writer, source.image_id, fingerprint)
        records[source.image_id] = record
        if record is None:
            todo.append(source)
    skipped = len(sources) - len(todo)
    if skipped:
        log.info("%d of %d images already done in %s: skipped (delete %s/ to redo them)", skipped, len(sources),
                 writer.out, PARTS_DIR)

    def fail(source: ImageSource, exc: BaseException) -> None:
        remove_image_files(writer, source.image_id)
        failures.append({"image": str(source.path), "error": _one_line(exc, source.path)})
        log.warning("skipped %s: %s", source.name, failures[-1]["error"])
        log.debug("traceback", exc_info=exc)

    def finish(source: ImageSource, write: Callable[[], dict]) -> None:
        try:
            record = write()
        except IMAGE_ERRORS as exc:
            fail(source, exc)
            return
        record = {**record, "fingerprint": fingerprint}
        write_json(record_path(writer.out, source.image_id), record)  # last: marks the image as done
        records[source.image_id] = record

    with logging_redirect_tqdm(), _Writes(overlap) as writes:
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo)
        for source, image, error in prefetch(_read_all(todo, read), depth=1 if overlap else 0):
            remove_image_files(writer, source.image_id)
            if error is None:
                try:
                    result = process(image, source)
                except IMAGE_ERRORS as exc:
                    error = exc
            if error is not None:
                fail(source, error)
            else:
                writes.submit(source, lambda s=source, i=image, r=result: writer.write_image(s, i, r), finish)
            del image
            bar.update(1)
        writes.wait()
        bar.close()
    done = {i: r for i, r in records.items() if r is not None}
    combined = writer.write_combined(done)
    return RunReport(n_images=len(sources) + len(failed), records=done, failed=failures, n_skipped=skipped,
                     combined=combined, seconds=round(time.time() - started, 3))


def _read_all(todo: Sequence[ImageSource], read: Callable[[ImageSource], np.ndarray]) -> Iterator[tuple]:
    """``(source, image, None)`` or ``(source, None, error)`` for each image, in order."""
    for source in todo:
        try:
            yield source, read(source), None
        except IMAGE_ERRORS as exc:
            yield source, None, exc


class _Writes:
    """Image outputs written on one background thread (``overlap``) or at once; one write in flight.

    Waiting for the previous image's write before handing over the next bounds memory and keeps
    records in input order; on Ctrl-C the write in flight still finishes, so no half-written image
    is left and a finished one keeps its record.
    """

    def __init__(self, overlap: bool) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cytofuse-write") if overlap else None
        self.pending: Optional[tuple[Any, Any, Callable]] = None

    def submit(self, source: ImageSource, write: Callable[[], dict], finish: Callable) -> None:
        self.wait()
        if self.pool is None:
            finish(source, write)
            return
        self.pending = (source, self.pool.submit(write), finish)

    def wait(self) -> None:
        if self.pending is None:
            return
        source, future, finish = self.pending
        self.pending = None
        finish(source, future.result)

    def __enter__(self) -> "_Writes":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def write_saliency(path: Path, plane: np.ndarray) -> None:
    """The probability map as an 8-bit PNG (float maps in [0, 1] are scaled; uint8 maps are 0..255 already)."""
    write_png(path, plane if plane.dtype == np.uint8 else probability_to_uint8(plane))
    release(plane)  # a disk plane (huge image): the pages the encoder read


def _one_line(exc: BaseException, path: Optional[Path] = None) -> str:
    """A failure in one line: our own errors as they are (without a leading ``path: ``, which the
    failure's ``image`` already names), others prefixed with their type."""
    if isinstance(exc, CytoFuseError):
        text = " ".join(str(exc).split())
        prefix = f"{path}: " if path is not None else None
        return text[len(prefix):] if prefix and text.startswith(prefix) else text
    message = " ".join(str(exc).split())[:300]
    return f"{exc.__class__.__name__}: {message}" if message else exc.__class__.__name__
