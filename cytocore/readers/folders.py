"""Reader for a folder per class (classifier data): ``<root>/<split>/<class>/*`` or ``<root>/<class>/*``.

Each image is a crop of one cell or tissue class, so it becomes a record whose single box is the
whole image with a one-hot label: the classifier's crop loader then needs no special case. Sizes
come from image headers only (no pixel decoding), so listing a few thousand tiles stays quick.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import DataError, ProblemLog
from ..imageio import IMAGE_SUFFIXES, image_size
from ..records import Dataset, ImageRecord

PathLike = Union[str, Path]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_layout(root: PathLike) -> Optional[dict[Optional[str], list[Path]]]:
    """``{split or None: [class folders]}`` if ``root`` looks like a folder-per-class set, else None.

    With splits, every top folder holds class folders and no images; without, the top folders hold
    the images themselves.
    """
    root = Path(root)
    tops = _subfolders(root)
    if not tops:
        return None
    if any(_images_in(t) for t in tops):
        return {None: [t for t in tops if _images_in(t)]}
    layout = {t.name: [c for c in _subfolders(t) if _images_in(c)] for t in tops}
    layout = {k: v for k, v in layout.items() if v}
    return layout or None


def read_folders(path: PathLike, class_names: Optional[Sequence[str]] = None) -> Dataset:
    """Read ``<root>/<split>/<class>/*`` (or ``<root>/<class>/*``) as whole-image one-hot records.

    Class names are the sorted class-folder names over all splits unless ``class_names`` fixes them
    (folders of other names are then reported and skipped). Image ids are file stems; a stem used
    twice gets its ``<split>__<class>__`` prefix so ids stay unique.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    layout = folder_layout(root)
    if layout is None:
        raise DataError(f"{root}: no class folders with images (expected <root>/<split>/<class>/*.jpg "
                        "or <root>/<class>/*.jpg)")
    problems = ProblemLog()
    if class_names is None:
        class_names = sorted({c.name for folders in layout.values() for c in folders})
    index = {name: k for k, name in enumerate(class_names)}

    entries: list[tuple[Optional[str], str, Path]] = []
    for split, folders in layout.items():
        for folder in folders:
            if folder.name not in index:
                problems.warn(folder, None, f"folder {folder.name!r} is not one of the classes {list(class_names)}, skipped")
                continue
            entries.extend((split, folder.name, f) for f in _images_in(folder))
    stems: dict[str, int] = {}
    for _, _, f in entries:
        stems[f.stem] = stems.get(f.stem, 0) + 1

    records = []
    for split, cls, file in entries:
        try:
            width, height = image_size(file)
        except DataError as exc:
            problems.error(file, None, f"{str(exc).split(': ', 1)[-1]}; skipped")
            continue
        image_id = file.stem if stems[file.stem] == 1 else "__".join(p for p in (split, cls, file.stem) if p)
        label = np.zeros((1, len(class_names)), np.uint8)
        label[0, index[cls]] = 1
        records.append(ImageRecord(
            image_id=image_id, path=file, width=width, height=height,
            boxes=np.array([[0, 0, width, height]], np.float32), labels=label, split=split,
        ))
    if not records:
        raise DataError(f"{root}: no readable images in the class folders ({len(problems)} problem(s) reported above)")
    return Dataset(records=records, class_names=list(class_names), root=root, format="folders", problems=problems.items)
