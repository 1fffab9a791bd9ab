"""Reader for the challenge layout: ``images/``, ``labels.csv``, ``metadata.csv``, ``masks/``, ``splits.csv``.

The organisers' CSVs are hand-made and users' own CSVs will be too, so every row is checked and each
problem becomes one line naming the file and its 1-based line number (header = line 1). The checks
are done on whole pandas columns at once, because a labels table may hold 100 000 boxes; Python
loops only run over the rows that are actually wrong, and over images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..errors import DataError, ProblemLog
from ..imageio import IMAGE_SUFFIXES, image_size
from ..records import Dataset, ImageRecord
from ..tables import read_csv_table, to_numbers

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]

LABELS_FILE = "labels.csv"
METADATA_FILE = "metadata.csv"
SPLITS_FILE = "splits.csv"
IMAGES_DIR = "images"
MASKS_DIR = "masks"

BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
#: Columns that are never classes even if they happen to hold only 0/1 (e.g. a tiny bbox_count).
RESERVED_COLUMNS = frozenset({"image_id", *BOX_COLUMNS, "width", "height", "bbox_count", "split", "id", "index",
                              "score", "confidence", "comment", "comments", "note", "notes"})
#: Normalised coordinates a rounding error above 1 are still normalised, not pixels.
NORMALISED_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------ image lookup


def index_images(folder: Path, problems: ProblemLog) -> dict[str, Path]:
    """Map image id (file stem) and full file name to the file, listing the folder once.

    Listing once instead of probing six suffixes per id keeps a 10 000-image folder fast; two files
    with the same stem (``a.png`` and ``a.jpg``) are ambiguous and reported, the first by name wins.
    """
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in found:
            problems.warn(p, None, f"another image has the same id {p.stem!r} ({found[p.stem].name}); using that one")
            continue
        found[p.stem] = p
        found[p.name] = p
    return found


# -------------------------------------------------------------------------------------- metadata


def read_metadata(path: Path, problems: ProblemLog) -> pd.DataFrame:
    """``metadata.csv`` as a frame indexed by line: image_id, width, height (NaN if bad), bbox_count (NaN if absent).

    Duplicate ids are errors (the later row is dropped): two sizes for one image make every
    normalised box of it ambiguous.
    """
    df = read_csv_table(path, required=("image_id", "width", "height"))
    out = pd.DataFrame(index=df.index)
    out["image_id"] = df["image_id"]
    for col in ("width", "height"):
        out[col] = to_numbers(df[col])
    lower = {c.lower(): c for c in df.columns}
    out["bbox_count"] = to_numbers(df[lower["bbox_count"]]) if "bbox_count" in lower else np.nan

    empty_id = out["image_id"] == ""
    for line in out.index[empty_id]:
        problems.error(path, int(line), "empty image_id, row skipped")
    out = out.loc[~empty_id]

    dup = out["image_id"].duplicated(keep="first")
    if dup.any():
        first_line = out.loc[~dup].reset_index().set_index("image_id")["line"]
        for line, image_id in out.loc[dup, "image_id"].items():
            problems.error(path, int(line), f"duplicate image_id {image_id!r} (first at line {first_line[image_id]}), row skipped")
        out = out.loc[~dup]

    w, h = out["width"].to_numpy(), out["height"].to_numpy()
    bad_size = ~(np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0) & (w == np.round(w)) & (h == np.round(h)))
    for line in out.index[bad_size]:
        raw = df.loc[line]
        problems.warn(path, int(line), f"invalid size width={raw['width']!r} height={raw['height']!r}; size taken from the image header")
    out.loc[bad_size, ["width", "height"]] = np.nan
    return out


# ---------------------------------------------------------------------------------------- labels


def _class_columns(df: pd.DataFrame, numbers: dict[str, np.ndarray], path: Path, class_names: Optional[Sequence[str]],
                   problems: ProblemLog) -> list[str]:
    """Which extra columns are classes: the given ones, else those holding mostly 0/1 values.

    The header is the only source of class names (MoNuSAC's are not the challenge's), but users add
    columns such as ``score`` or ``comment``; a column is taken as a class when at least half of its
    non-empty cells are 0 or 1, so one bad value in a class column is a bad row, not a lost class.
    """
    extra = [c for c in df.columns if c not in ("image_id", *BOX_COLUMNS)]
    if class_names is not None:
        missing = [c for c in class_names if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing class column(s) {', '.join(missing)} (header has: {', '.join(df.columns)})")
        classes = list(class_names)
    else:
        classes = []
        for col in extra:
            if col.lower() in RESERVED_COLUMNS or col.lower().startswith("unnamed:"):
                continue
            filled = (df[col] != "").to_numpy()
            if len(df) == 0:
                classes.append(col)  # header only: every image is healthy, classes still come from the header
            elif filled.any() and np.isin(numbers[col][filled], (0.0, 1.0)).mean() >= 0.5:
                classes.append(col)
    for col in extra:
        if col not in classes:
            problems.warn(path, 1, f"unknown column {col} ignored")
    if not classes:
        raise DataError(f"{path}: no class columns found after {', '.join(('image_id',) + BOX_COLUMNS)} "
                        "(expected one 0/1 column per class)")
    return classes


def _report_rows(problems: ProblemLog, severity: str, path: Path, lines: np.ndarray, rows: np.ndarray, message) -> None:
    """Report each flagged row; ``message`` is a string or a function of the row's position."""
    add = problems.error if severity == "error" else problems.warn
    for i in np.flatnonzero(rows):
        add(path, int(lines[i]), message(i) if callable(message) else message)


def _read_labels(path: Path, class_names: Optional[Sequence[str]], problems: ProblemLog):
    """Parse labels.csv into per-row arrays, dropping (and reporting) rows that cannot be a box.

    Returns ``(ids, lines, coords, labels, classes, raw_counts)`` for the rows still standing, with
    coordinates as written (normalised or pixels, decided later once image sizes are known).
    """
    df = read_csv_table(path, required=("image_id",) + BOX_COLUMNS)
    numbers = {c: to_numbers(df[c]) for c in df.columns if c != "image_id"}
    classes = _class_columns(df, numbers, path, class_names, problems)
    raw_counts = df.loc[df["image_id"] != "", "image_id"].value_counts()

    ids = df["image_id"].to_numpy(dtype=object)
    lines = df.index.to_numpy()
    coords = np.stack([numbers[c] for c in BOX_COLUMNS], axis=1) if len(df) else np.zeros((0, 4))
    values = np.stack([numbers[c] for c in classes], axis=1) if len(df) else np.zeros((0, len(classes)))

    bad_id = ids == ""
    _report_rows(problems, "error", path, lines, bad_id, "empty image_id, row skipped")
    keep = ~bad_id

    bad_coord = keep & ~np.isfinite(coords).all(axis=1)
    _report_rows(problems, "error", path, lines, bad_coord, lambda i: (
        "missing or non-numeric box coordinate ("
        + ", ".join(f"{c}={df[c].iat[i]!r}" for c in BOX_COLUMNS) + "), row skipped"))
    keep &= ~bad_coord

    bad_cells = ~np.isin(values, (0.0, 1.0))
    bad_class = keep & bad_cells.any(axis=1)

    def class_message(i: int) -> str:
        col = classes[int(np.argmax(bad_cells[i]))]
        return f"class column {col} has value {df[col].iat[i]!r} (must be 0 or 1), row skipped"

    _report_rows(problems, "error", path, lines, bad_class, class_message)
    keep &= ~bad_class

    no_class = keep & (values.sum(axis=1) == 0)
    _report_rows(problems, "warning", path, lines, no_class, "box has no class set (all class columns are 0), row skipped")
    keep &= ~no_class

    return ids[keep], lines[keep], coords[keep], values[keep].astype(np.uint8), classes, raw_counts


# ---------------------------------------------------------------------------------------- reader


def read_challenge(
    path: PathLike,
    class_names: Optional[Sequence[str]] = None,
    check_images: bool = True,
    images_dir: Optional[PathLike] = None,
) -> Dataset:
    """Read a data set in the challenge layout (``path`` is the folder or its ``labels.csv``).

    ``check_images`` opens every image header: it catches unreadable files and sizes that disagree
    with metadata.csv before training does, at about a millisecond per image. Without it only the
    file's existence is checked and sizes come from metadata.csv when it has them.
    """
    path = Path(path)
    root = path.parent if path.is_file() else path
    labels_path = path if path.is_file() else root / LABELS_FILE
    metadata_path = root / METADATA_FILE
    image_folder = Path(images_dir) if images_dir is not None else root / IMAGES_DIR
    problems = ProblemLog()

    if not labels_path.is_file():
        raise DataError(f"{labels_path}: labels file not found (the challenge layout needs labels.csv, "
                        "images/ and metadata.csv)")
    if not image_folder.is_dir():
        raise DataError(f"{image_folder}: images folder not found")
    files = index_images(image_folder, problems)
    meta = read_metadata(metadata_path, problems) if metadata_path.is_file() else None
    ids, lines, coords, labels, classes, raw_counts = _read_labels(labels_path, class_names, problems)

    # Where each image is first mentioned, for naming it in problems: its metadata row, or else the
    # first labels.csv row that uses it.
    mention: dict[str, tuple[Path, Optional[int]]] = {}
    size_hint: dict[str, tuple[float, float]] = {}
    if meta is not None:
        for line, image_id, w, h in zip(meta.index, meta["image_id"], meta["width"], meta["height"]):
            mention[image_id] = (metadata_path, int(line))
            size_hint[image_id] = (w, h)
        _check_bbox_counts(meta, raw_counts, metadata_path, labels_path, problems)
    first_rows = pd.Series(lines).groupby(pd.Series(ids), sort=False).first() if len(ids) else pd.Series(dtype=int)
    for image_id, line in first_rows.items():
        if image_id not in mention:
            mention[image_id] = (labels_path, int(line))
            if meta is not None:
                problems.warn(labels_path, int(line),
                              f"image_id {image_id!r} is not in {METADATA_FILE}; size taken from the image header")
    # Order: metadata's, then ids only labels.csv knows; without metadata every other image file is
    # a healthy image.
    order = list(mention)
    covered = set(mention) | {files[i].stem for i in mention if i in files}
    unlisted = sorted({p.stem for p in files.values()} - covered)
    if meta is None:
        order += unlisted
    elif unlisted:
        problems.warn(image_folder, None, f"{len(unlisted)} image file(s) not listed in {METADATA_FILE} "
                      f"are ignored (e.g. {unlisted[0]})")

    sizes = _resolve_sizes(order, files, size_hint, mention, check_images, image_folder, problems)
    boxes = _to_pixels(ids, lines, coords, sizes, labels_path, problems)
    valid = np.isfinite(boxes).all(axis=1)
    ids, boxes, labels = ids[valid], boxes[valid], labels[valid]

    masks = root / MASKS_DIR
    mask_files = {p.stem: p for p in masks.iterdir() if p.suffix.lower() == ".png"} if masks.is_dir() else {}
    split_of = _read_splits(root / SPLITS_FILE, set(sizes), problems)

    records = _group_records(order, sizes, files, ids, boxes, labels, len(classes), mask_files, split_of)
    _warn_emptied(records, raw_counts, mention, problems)
    if not records:
        raise DataError(f"{labels_path}: no usable images in the data set at {root}"
                        + (f" ({len(problems)} problem(s) reported above)" if len(problems) else ""))
    ordered = sorted(problems.items, key=lambda p: (p.file or "", p.row or 0))
    return Dataset(records=records, class_names=list(classes), root=root, format="challenge", problems=ordered)


def _warn_emptied(records: list[ImageRecord], raw_counts: pd.Series, mention: dict, problems: ProblemLog) -> None:
    """An image whose every box row was rejected would pass for healthy: say so once per image."""
    for r in records:
        n = int(raw_counts.get(r.image_id, 0))
        if r.is_healthy and n:
            file, line = mention[r.image_id]
            problems.warn(file, line, f"all {n} box row(s) of {r.image_id!r} were skipped; it now has no boxes "
                          "and counts as healthy")


def _check_bbox_counts(meta: pd.DataFrame, raw_counts: pd.Series, metadata_path: Path, labels_path: Path,
                       problems: ProblemLog) -> None:
    claimed = meta["bbox_count"].to_numpy()
    have = meta["image_id"].map(raw_counts).fillna(0).to_numpy(dtype=np.float64)
    differs = np.isfinite(claimed) & (claimed != have)
    for i in np.flatnonzero(differs):
        problems.warn(metadata_path, int(meta.index[i]), f"bbox_count {claimed[i]:g} for {meta['image_id'].iat[i]!r} "
                      f"but {labels_path.name} has {int(have[i])} row(s) for it")


def _resolve_sizes(order: list[str], files: dict[str, Path], size_hint: dict, mention: dict, check_images: bool,
                   image_folder: Path, problems: ProblemLog) -> dict[str, tuple[int, int]]:
    """Sizes of the images that can be used; missing or unreadable images are reported and left out."""
    sizes: dict[str, tuple[int, int]] = {}
    for image_id in order:
        file = files.get(image_id)
        where_file, where_line = mention.get(image_id, (image_folder, None))
        if file is None:
            problems.error(where_file, where_line, f"image {image_id!r} not found in {image_folder}; image and its boxes skipped")
            continue
        hint = size_hint.get(image_id, (np.nan, np.nan))
        known = bool(np.isfinite(hint).all())
        if known and not check_images:
            sizes[image_id] = (int(hint[0]), int(hint[1]))
            continue
        try:
            header = image_size(file)
        except DataError as exc:
            problems.error(where_file, where_line, f"{exc}; image and its boxes skipped")
            continue
        if known and (int(hint[0]), int(hint[1])) != header:
            problems.warn(where_file, where_line, f"size {int(hint[0])}x{int(hint[1])} of {image_id!r} differs from "
                          f"its image file's {header[0]}x{header[1]}; using the image file's")
        sizes[image_id] = header
    return sizes


def _to_pixels(ids: np.ndarray, lines: np.ndarray, coords: np.ndarray, sizes: dict, labels_path: Path,
               problems: ProblemLog) -> np.ndarray:
    """Scale normalised rows to pixels, keep pixel rows, clip boxes to the image; unusable rows become NaN.

    A row is in pixels when any value exceeds 1: the challenge's own data does not mix conventions
    but users' CSVs do, so it is accepted with a warning (one warning for a file wholly in pixels).
    Rows of images that were not found become NaN silently: their image was reported already.
    """
    row_ids = pd.Series(ids, dtype=object)
    wh = np.stack([row_ids.map({i: s[k] for i, s in sizes.items()}).to_numpy(dtype=np.float64, na_value=np.nan)
                   for k in (0, 1)], axis=1).reshape(len(ids), 2)
    limits = np.concatenate([wh, wh], axis=1)
    usable = np.isfinite(wh).all(axis=1)
    pixel_rows = usable & (coords > 1.0 + NORMALISED_TOLERANCE).any(axis=1)
    if pixel_rows.sum() > 1 and pixel_rows.sum() == usable.sum():
        first = int(lines[np.argmax(pixel_rows)])
        problems.warn(labels_path, first, f"all {int(pixel_rows.sum())} boxes have values > 1: "
                      "read as pixel coordinates, not normalised")
    else:
        _report_rows(problems, "warning", labels_path, lines, pixel_rows,
                     "box has values > 1: read as pixel coordinates, not normalised")
    boxes = coords * np.where(pixel_rows[:, None], 1.0, limits)

    def message(what: str, tail: str):
        return lambda i: f"{what} ({', '.join(f'{c}={v:g}' for c, v in zip(BOX_COLUMNS, coords[i]))}), {tail}"

    zero = usable & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    _report_rows(problems, "error", labels_path, lines, zero, message("zero-area box", "row skipped"))
    with np.errstate(invalid="ignore"):
        outside = usable & ~zero & ((boxes < 0) | (boxes > limits)).any(axis=1)
        clipped = np.clip(boxes, 0, limits)
    gone = outside & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    _report_rows(problems, "error", labels_path, lines, gone, message("box lies outside the image", "row skipped"))
    _report_rows(problems, "warning", labels_path, lines, outside & ~gone,
                 message("box extends outside the image", "clipped"))
    boxes = np.where(outside[:, None], clipped, boxes)
    boxes[zero | gone | ~usable] = np.nan
    return boxes


def _read_splits(path: Path, ids: set, problems: ProblemLog) -> dict[str, str]:
    if not path.is_file():
        return {}
    from ..splits import load_split_file

    mapping = load_split_file(path, problems)
    unknown = sorted(set(mapping) - ids)
    if unknown:
        problems.warn(path, None, f"{len(unknown)} image id(s) not in the data set are ignored (e.g. {unknown[0]!r})")
    return mapping


def _group_records(order, sizes, files, ids, boxes, labels, n_classes, mask_files, split_of) -> list[ImageRecord]:
    """One record per usable image, its rows gathered with one sort instead of a filter per image."""
    codes, uniq = pd.factorize(pd.Series(ids, dtype=object))
    sort = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=len(uniq))
    end = np.cumsum(counts)
    span = {u: (int(e - n), int(e)) for u, e, n in zip(uniq, end, counts)}
    records = []
    for image_id in order:
        if image_id not in sizes:
            continue
        s, e = span.get(image_id, (0, 0))
        rows = sort[s:e]
        width, height = sizes[image_id]
        records.append(ImageRecord(
            image_id=image_id,
            path=files[image_id],
            width=int(width),
            height=int(height),
            boxes=boxes[rows].astype(np.float32),
            labels=labels[rows].reshape(len(rows), n_classes),
            mask_path=mask_files.get(image_id),
            split=split_of.get(image_id),
        ))
    return records
