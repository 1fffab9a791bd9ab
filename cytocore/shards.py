"""One folder, several workers: each runs its share of the images; the last to finish merges.

A worker given ``Shard(i, n)`` (``--shard i/n``, or msrun's rank and size) runs images ``i, i+n,
i+2n, ...`` of the folder's name order through the ordinary folder runner
(:func:`cytocore.runfolder.run_images`) into the *same* run folder, so every finished image has its
usual per-image files and record, resumable as ever. It then writes ``shards/<i>-of-<n>.json``:
which images it covered, with which fingerprint, and which failed.

The combined outputs (``predictions.csv``, COCO, GeoJSON...) are rebuilt from the per-image parts,
so merging needs no extra format: whichever worker finds all ``n`` markers present, for the same
image list and fingerprint, rebuilds them from every image's record in the folder's order, exactly
as one process would have. Two workers finishing at the same moment may both merge; the outputs are
written atomically and identical, so that costs only time. Running the command again without a shard
also merges: every image is already done, so it only rebuilds the combined outputs.

The workers share the run folder (one machine, or a shared disk across machines).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from .atomic import write_json
from .errors import CytoFuseError
from .runfolder import ImageSource, RunReport, RunWriter, finished_record, run_images

log = logging.getLogger("cytofuse")

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` (0-based) of ``count``: every ``count``-th image from ``index`` on."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise CytoFuseError(f"shard {self.index}/{self.count}: needs 0 <= I < N (I counts from 0)")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` as on the command line (``--shard 0/2`` and ``--shard 1/2`` split a folder in two)."""
        try:
            index, count = (int(part) for part in str(text).split("/"))
        except ValueError:
            raise CytoFuseError(f"--shard {text!r}: expected I/N, e.g. 0/2 (I counts from 0)") from None
        return cls(index, count)

    def take(self, items: Sequence[Any]) -> list:
        """This worker's share; interleaved, so neighbouring (often similar-sized) images spread evenly."""
        return list(items)[self.index::self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_from_env() -> Optional[Shard]:
    """The launcher's rank and size as a shard, or None for a lone process.

    Under msrun the worker joins the job first if the models did not (ONNX Runtime needs no MindSpore,
    but msrun's scheduler waits for every worker to join), then takes the rank MindSpore assigned.
    """
    from . import distributed

    if distributed.launched() and not distributed.joined():
        from . import runtime

        runtime.setup(seed=None)
    if distributed.joined():
        return Shard(distributed.rank(), distributed.size()) if distributed.size() > 1 else None
    return None


def marker_path(out: Path, shard: Shard) -> Path:
    return Path(out) / SHARDS_DIR / f"{shard.index}-of-{shard.count}.json"


class _PerImageOnly:
    """A writer that writes an image's files but leaves the combined outputs to the merge."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer
        self.out = writer.out

    def image_files(self, image_id: str) -> list[Path]:
        return self.writer.image_files(image_id)

    def required_files(self, image_id: str) -> list[Path]:
        return self.writer.required_files(image_id)

    def write_image(self, source: ImageSource, image: np.ndarray, result: Any) -> dict:
        return self.writer.write_image(source, image, result)

    def write_combined(self, records: Mapping[str, dict]) -> None:
        return None


def run_shard(
    sources: Iterable[ImageSource],
    process: Callable[[np.ndarray, ImageSource], Any],
    writer: RunWriter,
    fingerprint: str,
    shard: Shard,
    *,
    read: Callable[[ImageSource], np.ndarray] = ImageSource.read,
    failed: Sequence[dict] = (),
    progress: bool = True,
    desc: str = "images",
) -> RunReport:
    """Run this worker's share of ``sources``; merge if it is the last share to finish.

    Returns the whole run's report when this worker merged (``combined`` set), else its own share's
    (``combined`` None, ``extra["waiting_for"]`` lists the shards not finished yet).
    """
    sources = list(sources)
    mine = shard.take(sources)
    marker = marker_path(writer.out, shard)
    marker.unlink(missing_ok=True)  # running again: not finished until this run is
    report = run_images(mine, process, _PerImageOnly(writer), fingerprint, read=read, progress=progress,
                        desc=f"{desc} {shard}")
    write_json(marker, {
        "shard": str(shard), "fingerprint": fingerprint, "images": [s.image_id for s in mine],
        "failed": report.failed, "n_skipped": report.n_skipped, "seconds": report.seconds,
    })
    merged = merge_shards(sources, writer, fingerprint, shard.count, failed)
    if merged is not None:
        log.info("shard %s finished last: wrote the combined outputs of all %d shards", shard, shard.count)
        return merged
    waiting = pending_shards(sources, writer.out, fingerprint, shard.count)
    log.info("shard %s done (%d images); the last shard to finish writes the combined outputs (waiting for %s)",
             shard, len(mine), ", ".join(waiting))
    report.extra["waiting_for"] = waiting
    report.n_images = len(mine)
    return report


def run_share(
    sources: Iterable[ImageSource],
    process: Callable[[np.ndarray, ImageSource], Any],
    writer: RunWriter,
    fingerprint: str,
    shard: Optional[Shard] = None,
    **options: Any,
) -> RunReport:
    """:func:`run_shard` with a shard of several workers, else the plain :func:`run_images` (same options)."""
    if shard is not None and shard.count > 1:
        return run_shard(sources, process, writer, fingerprint, shard, **options)
    return run_images(sources, process, writer, fingerprint, **options)


def _read_marker(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _shard_markers(sources: Sequence[ImageSource], out: Path, fingerprint: str, count: int) -> list[Optional[dict]]:
    """Each shard's marker if it belongs to this run (same fingerprint, same share of these images), else None."""
    markers: list[Optional[dict]] = []
    for index in range(count):
        shard = Shard(index, count)
        marker = _read_marker(marker_path(out, shard))
        wanted = [s.image_id for s in shard.take(sources)]
        ok = marker is not None and marker.get("fingerprint") == fingerprint and marker.get("images") == wanted
        markers.append(marker if ok else None)
    return markers


def pending_shards(sources: Sequence[ImageSource], out: Path, fingerprint: str, count: int) -> list[str]:
    """The shards (``"I/N"``) of this run that have not finished yet."""
    markers = _shard_markers(sources, out, fingerprint, count)
    return [str(Shard(i, count)) for i, m in enumerate(markers) if m is None]


def merge_shards(sources: Sequence[ImageSource], writer: RunWriter, fingerprint: str, count: int,
                 failed: Sequence[dict] = ()) -> Optional[RunReport]:
    """Write the combined outputs of a sharded run once every shard finished; None while some have not."""
    markers = _shard_markers(sources, writer.out, fingerprint, count)
    if any(m is None for m in markers):
        return None
    records = {s.image_id: finished_record(writer, s.image_id, fingerprint) for s in sources}
    done = {i: r for i, r in records.items() if r is not None}
    failures = list(failed) + [f for m in markers for f in m.get("failed", [])]  # type: ignore[union-attr]
    combined = writer.write_combined(done)
    return RunReport(n_images=len(sources) + len(failed), records=done, failed=failures,
                     n_skipped=sum(int(m.get("n_skipped", 0)) for m in markers),  # type: ignore[union-attr]
                     combined=combined, seconds=max(float(m.get("seconds", 0.0)) for m in markers),  # type: ignore[union-attr]
                     extra={"shards": count})
