"""``cytofuse infer --anonymise``: the run's inputs renamed to salted-hash keys before anything is written.

The folder runner names every per-image file, table row and record by ``source.image_id`` and
``source.name``; giving it sources whose id is the key (:class:`cytocore.anonymise.Anonymiser`)
and whose name is the key plus the file's suffix anonymises every output at once. What the runner
reports about failures (file paths, error messages quoting the file) is scrubbed the same way. The
key file is written before the run starts, so an interrupted run can be mapped back too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from cytocore.anonymise import Anonymiser
from cytocore.runfolder import ImageSource

PathLike = Union[str, Path]


@dataclass(frozen=True)
class AnonymousSource(ImageSource):
    """An input read from ``path`` but known to every output as ``alias`` (its key plus the suffix)."""

    alias: str = ""

    @property
    def name(self) -> str:
        return self.alias


def anonymous_sources(sources: Sequence[ImageSource], failed: Sequence[dict], key_path: PathLike
                      ) -> tuple[list[ImageSource], list[dict], Anonymiser]:
    """The sources keyed by salted hash, the caller's failures scrubbed, and the anonymiser (key file saved)."""
    anonymiser = Anonymiser(key_path)
    out = []
    for src in sources:
        key = anonymiser.key(src.image_id, src.path.name)
        out.append(AnonymousSource(key, src.path, alias=key + src.path.suffix.lower()))
    for item in failed:  # duplicate ids: keyed too, so the key file names them
        path = Path(item.get("image", ""))
        anonymiser.key(path.stem, path.name)
    anonymiser.save()
    return out, scrub_failures(failed, anonymiser), anonymiser


def scrub_failures(failed: Sequence[dict], anonymiser: Anonymiser) -> list[dict]:
    """Failure entries with every input path, file name and id replaced by its key."""
    names = {}
    for image_id, (file_name, key) in anonymiser.mapping.items():
        if file_name:
            names[file_name] = key + Path(file_name).suffix.lower()
        names[image_id] = key
    out = []
    for item in failed:
        entry = {}
        for k, v in item.items():
            text = str(v)
            if k == "image":
                text = names.get(Path(text).name, names.get(Path(text).stem, "(anonymised)"))
            else:
                for original in sorted(names, key=len, reverse=True):  # file names before the ids they contain
                    if "." in original or len(original) >= 6:  # a short id ("a") would hit ordinary words
                        text = text.replace(original, names[original])
            entry[k] = text
        out.append(entry)
    return out
